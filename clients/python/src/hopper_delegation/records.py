"""The records the client returns: frozen dataclasses with the proto's field names.

Times are timezone-aware ``datetime``s (UTC), durations ``timedelta``s, results ``dict``s in
which integral numbers are ``int`` again (a protobuf ``Struct`` holds every number as a
double), and enums the ``IntEnum``s of :mod:`hopper_delegation.enums`. Ids the proto leaves
empty (no parent, no rejection) are ``None``. Conversion to and from the wire lives here too.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any, TypeVar

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from ._proto import delegation_service_pb2 as dpb
from ._proto import instance_service_pb2 as ipb
from ._proto import resources_pb2 as rpb
from .enums import (
    DelegationStatus,
    DelegationType,
    EventKind,
    ExpiryReason,
    InstanceStatus,
    Scope,
    TaskStatus,
)

# --- Wire conversions ---------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
E = TypeVar("E", bound=IntEnum)


@functools.lru_cache(maxsize=4096)
def _at(seconds: int, nanos: int) -> datetime:
    # Cached: a record's times repeat (created, delegated, updated, the event's own), and a
    # watch converts thousands of records a second.
    return _EPOCH + timedelta(0, seconds, nanos // 1000)


def _time(ts: timestamp_pb2.Timestamp) -> datetime | None:
    """A Timestamp as an aware UTC datetime; ``None`` if unset (no record is at the epoch)."""
    seconds, nanos = ts.seconds, ts.nanos
    return _at(seconds, nanos) if seconds or nanos else None


def _required_time(ts: timestamp_pb2.Timestamp) -> datetime:
    return _at(ts.seconds, ts.nanos)


def _duration(message: Any, field: str) -> timedelta | None:
    if not message.HasField(field):
        return None
    d: duration_pb2.Duration = getattr(message, field)
    return timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)


def to_duration(value: timedelta | float | None) -> duration_pb2.Duration | None:
    """A ``timedelta`` (or seconds) as a wire Duration; ``None`` stays unset."""
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def _by_value(enum: type[E]) -> dict[int, E]:
    return {member.value: member for member in enum}


# Members by number: a dict lookup, where calling the IntEnum costs twenty times as much.
_SCOPE = _by_value(Scope)
_INSTANCE_STATUS = _by_value(InstanceStatus)
_TASK_STATUS = _by_value(TaskStatus)
_DELEGATION_TYPE = _by_value(DelegationType)
_DELEGATION_STATUS = _by_value(DelegationStatus)
_EXPIRY_REASON = _by_value(ExpiryReason)
_EVENT_KIND = _by_value(EventKind)


def _optional(text: str) -> str | None:
    return text or None


def _from_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        # A whole number within a double's exact range came from an integer.
        if number.is_integer() and abs(number) <= 2**53:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return from_struct(value.struct_value)
    if kind == "list_value":
        return [_from_value(v) for v in value.list_value.values]
    return None


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a ``dict``, integral numbers as ``int``."""
    return {key: _from_value(value) for key, value in struct.fields.items()}


def to_struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    """A JSON-like mapping as a Struct; ``None`` stays unset."""
    if value is None:
        return None
    struct = struct_pb2.Struct()
    struct.update(dict(value))
    return struct


def _struct(message: Any, field: str) -> dict[str, Any] | None:
    return from_struct(getattr(message, field)) if message.HasField(field) else None


# --- Records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instance:
    """A Hopper instance: one node of the Global -> Project -> Orchestration tree."""

    id: str
    name: str
    scope: Scope
    parent_id: str | None
    status: InstanceStatus
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    lease: timedelta | None
    lease_expires_at: datetime | None

    @classmethod
    def from_proto(cls, m: rpb.Instance) -> Instance:
        return cls(
            id=m.id,
            name=m.name,
            scope=_SCOPE[m.scope],
            parent_id=_optional(m.parent_id),
            status=_INSTANCE_STATUS[m.status],
            config=from_struct(m.config),
            created_at=_required_time(m.created_at),
            updated_at=_required_time(m.updated_at),
            lease=_duration(m, "lease"),
            lease_expires_at=_time(m.lease_expires_at),
        )


@dataclass(frozen=True, slots=True)
class Task:
    """A unit of work, held by one instance at a time."""

    id: str
    title: str
    description: str
    instance_id: str
    parent_task_id: str | None
    status: TaskStatus
    result: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_proto(cls, m: rpb.Task) -> Task:
        return cls(
            id=m.id,
            title=m.title,
            description=m.description,
            instance_id=m.instance_id,
            parent_task_id=_optional(m.parent_task_id),
            status=_TASK_STATUS[m.status],
            result=_struct(m, "result"),
            created_at=_required_time(m.created_at),
            updated_at=_required_time(m.updated_at),
        )


@dataclass(frozen=True, slots=True)
class Delegation:
    """One hop of a task from a source instance to a target instance."""

    id: str
    task_id: str
    parent_delegation_id: str | None
    source_instance_id: str
    target_instance_id: str
    delegation_type: DelegationType
    status: DelegationStatus
    delegated_at: datetime
    accepted_at: datetime | None
    completed_at: datetime | None
    result: dict[str, Any] | None
    rejection_reason: str | None
    notes: str
    delegated_by: str
    created_at: datetime
    updated_at: datetime
    accept_by: datetime | None
    complete_by: datetime | None
    expired_at: datetime | None
    expiry_reason: ExpiryReason | None

    @classmethod
    def from_proto(cls, m: rpb.Delegation) -> Delegation:
        # Positional and inlined: a watch converts one per event (see docs/PERFORMANCE.md).
        time, at = _time, _at
        created, updated = m.created_at, m.updated_at
        return cls(
            m.id,
            m.task_id,
            m.parent_delegation_id or None,
            m.source_instance_id,
            m.target_instance_id,
            _DELEGATION_TYPE[m.delegation_type],
            _DELEGATION_STATUS[m.status],
            _required_time(m.delegated_at),
            time(m.accepted_at),
            time(m.completed_at),
            from_struct(m.result) if m.HasField("result") else None,
            m.rejection_reason or None,
            m.notes,
            m.delegated_by,
            at(created.seconds, created.nanos),
            at(updated.seconds, updated.nanos),
            time(m.accept_by),
            time(m.complete_by),
            time(m.expired_at),
            _EXPIRY_REASON.get(m.expiry_reason),
        )


@dataclass(frozen=True, slots=True)
class Event:
    """A state change of a delegation, or the completion of a task, at its log position."""

    sequence: int
    kind: EventKind
    occurred_at: datetime
    delegation: Delegation | None
    task_id: str
    caused_by_delegation_id: str | None

    @classmethod
    def from_proto(cls, m: dpb.DelegationEvent) -> Event:
        return cls(
            m.sequence,
            _EVENT_KIND[m.kind],
            _required_time(m.occurred_at),
            Delegation.from_proto(m.delegation) if m.HasField("delegation") else None,
            m.task_id,
            m.caused_by_delegation_id or None,
        )


@dataclass(frozen=True, slots=True)
class Completion:
    """What CompleteDelegation changed."""

    delegation: Delegation
    completed_ancestors: tuple[Delegation, ...]
    task: Task


@dataclass(frozen=True, slots=True)
class Cancellation:
    """What CancelDelegation changed."""

    delegation: Delegation
    cancelled_descendants: tuple[Delegation, ...]
    task: Task
    cancelled_subtasks: tuple[Task, ...]


@dataclass(frozen=True, slots=True)
class TaskCompletion:
    """What CompleteTask changed."""

    task: Task
    completed_delegations: tuple[Delegation, ...]


@dataclass(frozen=True, slots=True)
class TaskCancellation:
    """What CancelTask changed."""

    task: Task
    cancelled_delegations: tuple[Delegation, ...]
    cancelled_subtasks: tuple[Task, ...]


@dataclass(frozen=True, slots=True)
class DelegationChain:
    """A task's chain of live hops, origin first, and where the task is now."""

    task_id: str
    delegations: tuple[Delegation, ...]
    origin_instance_id: str
    current_instance_id: str


@dataclass(frozen=True, slots=True)
class DelegationTree:
    """A task, its subtasks at any depth, and all their delegations."""

    task: Task
    subtasks: tuple[Task, ...]
    delegations: tuple[Delegation, ...]


@dataclass(frozen=True, slots=True)
class InstanceTreeNode:
    """One instance of a tree, with its current load."""

    instance: Instance
    pending_delegations: int
    accepted_delegations: int

    @classmethod
    def from_proto(cls, m: ipb.InstanceTreeNode) -> InstanceTreeNode:
        return cls(
            instance=Instance.from_proto(m.instance),
            pending_delegations=m.pending_delegations,
            accepted_delegations=m.accepted_delegations,
        )


def delegations(ms: Sequence[rpb.Delegation]) -> tuple[Delegation, ...]:
    """Delegation records of a repeated field."""
    return tuple(Delegation.from_proto(m) for m in ms)


def tasks(ms: Sequence[rpb.Task]) -> tuple[Task, ...]:
    """Task records of a repeated field."""
    return tuple(Task.from_proto(m) for m in ms)
