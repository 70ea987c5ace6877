"""Upstream Hopper's ``TaskDelegationRepository``, served by this service.

An instance swaps its SQLAlchemy repository (``TaskDelegationRepository(session)``) for
``TaskDelegationRepository(client)``: the same methods under the same names and argument
names, returning :class:`DelegationRecord`s with upstream's attribute names and lower-case
string values (``"route"``, ``"pending"``), so that upstream's pydantic
``DelegationResponse.model_validate(record, from_attributes=True)`` takes them.

Where this service is stricter than upstream's model, it says so: a transition the current
state forbids raises :class:`~hopper_delegation.FailedPrecondition` (upstream's model methods
check nothing), and ``mark_rejected`` without a reason sends ``"no reason given"`` (the service
requires one). ``mark_*`` return ``None`` for an unknown id, as upstream does. A hop that
expired (a deadline or a lapsed lease; upstream has no such status) reads as ``"cancelled"``,
the upstream status of a hop called off with its task sent back, and is counted so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from .client import HopperClient
from .enums import DelegationDirection, DelegationStatus, DelegationType
from .errors import NotFound
from .records import Delegation

T = TypeVar("T")

#: The reason sent when ``mark_rejected`` is given none.
NO_REASON = "no reason given"

_TERMINAL = ("completed", "rejected", "cancelled")


def _status(status: DelegationStatus) -> str:
    """Upstream's word for a status: ``expired`` is not one of them."""
    return "cancelled" if status is DelegationStatus.EXPIRED else status.name.lower()


@dataclass(frozen=True, slots=True)
class DelegationRecord:
    """A delegation with upstream's ``TaskDelegation`` attributes."""

    id: str
    task_id: str
    source_instance_id: str | None
    target_instance_id: str | None
    delegation_type: str
    status: str
    delegated_at: datetime
    accepted_at: datetime | None
    completed_at: datetime | None
    result: dict[str, Any] | None
    rejection_reason: str | None
    notes: str | None
    delegated_by: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def is_pending(self) -> bool:
        return self.status == "pending"

    @property
    def is_active(self) -> bool:
        return self.status in ("pending", "accepted")

    @property
    def is_terminal(self) -> bool:
        return self.status in _TERMINAL

    @classmethod
    def of(cls, d: Delegation) -> DelegationRecord:
        return cls(
            id=d.id,
            task_id=d.task_id,
            source_instance_id=d.source_instance_id or None,
            target_instance_id=d.target_instance_id or None,
            delegation_type=d.delegation_type.name.lower(),
            status=_status(d.status),
            delegated_at=d.delegated_at,
            accepted_at=d.accepted_at,
            completed_at=d.completed_at,
            result=d.result,
            rejection_reason=d.rejection_reason,
            notes=d.notes or None,
            delegated_by=d.delegated_by or None,
            created_at=d.created_at,
            updated_at=d.updated_at,
        )


class TaskDelegationRepository:
    """Upstream's repository methods over a :class:`~hopper_delegation.HopperClient`."""

    def __init__(self, client: HopperClient) -> None:
        self.client = client

    def create_delegation(
        self,
        delegation_id: str,
        task_id: str,
        source_instance_id: str | None,
        target_instance_id: str,
        delegation_type: str = "route",
        delegated_by: str | None = None,
        notes: str | None = None,
    ) -> DelegationRecord:
        """Delegates ``task_id`` as ``delegation_id`` (from where the task is, if
        ``source_instance_id`` is ``None``)."""
        if source_instance_id is None:
            source_instance_id = self.client.get_task(id=task_id).instance_id
        created = self.client.create_delegation(
            id=delegation_id,
            task_id=task_id,
            source_instance_id=source_instance_id,
            target_instance_id=target_instance_id,
            delegation_type=DelegationType[delegation_type.upper()],
            delegated_by=delegated_by or "",
            notes=notes or "",
            # A retry of this create is the same create: the id makes it idempotent.
            request_id=delegation_id,
        )
        return DelegationRecord.of(created)

    def get(self, id: str) -> DelegationRecord | None:
        """One delegation, or ``None``."""
        return _or_none(lambda: DelegationRecord.of(self.client.get_delegation(id=id)))

    def get_delegations_for_task(self, task_id: str) -> list[DelegationRecord]:
        """Every delegation of a task, oldest first."""
        return [DelegationRecord.of(d) for d in self.client.list_task_delegations(task_id=task_id)]

    def get_delegation_chain(self, task_id: str) -> list[DelegationRecord]:
        """The task's delegations from origin to now, as upstream's (every hop, oldest first;
        ``client.get_delegation_chain`` gives only the live chain)."""
        return self.get_delegations_for_task(task_id)

    def get_pending_delegations(self, instance_id: str) -> list[DelegationRecord]:
        """The pending delegations sent to an instance."""
        return self._of(instance_id, DelegationDirection.INCOMING, DelegationStatus.PENDING)

    def get_active_delegations(self, instance_id: str) -> list[DelegationRecord]:
        """The pending and accepted delegations sent to an instance."""
        return self._of(
            instance_id,
            DelegationDirection.INCOMING,
            DelegationStatus.PENDING,
            DelegationStatus.ACCEPTED,
        )

    def get_outgoing_delegations(self, instance_id: str) -> list[DelegationRecord]:
        """Every delegation an instance sent."""
        return self._of(instance_id, DelegationDirection.OUTGOING)

    def _of(
        self, instance_id: str, direction: DelegationDirection, *statuses: DelegationStatus
    ) -> list[DelegationRecord]:
        listed = self.client.list_instance_delegations(
            instance_id=instance_id, direction=direction, statuses=statuses
        )
        return [DelegationRecord.of(d) for d in listed]

    def mark_accepted(self, delegation_id: str) -> DelegationRecord | None:
        return _or_none(
            lambda: DelegationRecord.of(self.client.accept_delegation(id=delegation_id))
        )

    def mark_rejected(
        self, delegation_id: str, reason: str | None = None
    ) -> DelegationRecord | None:
        return _or_none(
            lambda: DelegationRecord.of(
                self.client.reject_delegation(id=delegation_id, reason=reason or NO_REASON)
            )
        )

    def mark_completed(
        self, delegation_id: str, result: dict[str, Any] | None = None
    ) -> DelegationRecord | None:
        return _or_none(
            lambda: DelegationRecord.of(
                self.client.complete_delegation(id=delegation_id, result=result).delegation
            )
        )

    def mark_cancelled(self, delegation_id: str) -> DelegationRecord | None:
        return _or_none(
            lambda: DelegationRecord.of(self.client.cancel_delegation(id=delegation_id).delegation)
        )

    def get_latest_delegation(self, task_id: str) -> DelegationRecord | None:
        """The task's most recent delegation."""
        latest = None
        for latest in self.get_delegations_for_task(task_id):  # noqa: B007
            pass
        return latest

    def get_current_location(self, task_id: str) -> str | None:
        """Where the task's latest delegation took it, while that one is active."""
        latest = self.get_latest_delegation(task_id)
        return latest.target_instance_id if latest is not None and latest.is_active else None

    def count_delegations_by_status(self, instance_id: str) -> dict[str, int]:
        """The delegations sent to an instance, counted by status (every status)."""
        counts = self.client.count_delegations(
            instance_id=instance_id, direction=DelegationDirection.INCOMING
        )
        by_word = dict.fromkeys(("pending", "accepted", "completed", "rejected", "cancelled"), 0)
        for status, n in counts.items():
            by_word[_status(status)] += n
        return by_word


def _or_none(read: Callable[[], T]) -> T | None:
    try:
        return read()
    except NotFound:
        return None
