"""The proto's enums as ``IntEnum``s named as in the proto, their members unprefixed.

``Scope.GLOBAL == resources_pb2.SCOPE_GLOBAL``; the ``UNSPECIFIED`` values are left out, as no
record carries them (a test checks these against the generated descriptors).
"""

from __future__ import annotations

from enum import IntEnum


class Scope(IntEnum):
    """Where an instance sits in the Hopper tree."""

    GLOBAL = 1
    PROJECT = 2
    ORCHESTRATION = 3
    PERSONAL = 4
    FAMILY = 5
    EVENT = 6
    FEDERATED = 7


class InstanceStatus(IntEnum):
    """Run state of an instance; only CREATED, STARTING and RUNNING ones receive delegations."""

    CREATED = 1
    STARTING = 2
    RUNNING = 3
    STOPPING = 4
    STOPPED = 5
    PAUSED = 6
    ERROR = 7
    TERMINATED = 8


class TaskStatus(IntEnum):
    """Status of a task."""

    PENDING = 1
    CLAIMED = 2
    IN_PROGRESS = 3
    BLOCKED = 4
    DONE = 5
    CANCELLED = 6


class DelegationType(IntEnum):
    """How a delegation moves a task between instances."""

    ROUTE = 1
    DECOMPOSE = 2
    ESCALATE = 3
    REASSIGN = 4


class DelegationStatus(IntEnum):
    """Where a delegation is in its lifecycle."""

    PENDING = 1
    ACCEPTED = 2
    REJECTED = 3
    COMPLETED = 4
    CANCELLED = 5
    EXPIRED = 6

    @property
    def is_active(self) -> bool:
        """Pending and accepted delegations can still change."""
        return self in (DelegationStatus.PENDING, DelegationStatus.ACCEPTED)


class ExpiryReason(IntEnum):
    """Why a delegation expired."""

    ACCEPT_DEADLINE = 1
    COMPLETE_DEADLINE = 2
    TARGET_UNRESPONSIVE = 3


class EventKind(IntEnum):
    """What an event records."""

    DELEGATION_CREATED = 1
    DELEGATION_ACCEPTED = 2
    DELEGATION_REJECTED = 3
    DELEGATION_COMPLETED = 4
    DELEGATION_CANCELLED = 5
    TASK_COMPLETED = 6
    DELEGATION_EXPIRED = 7


class DelegationDirection(IntEnum):
    """Which side of a delegation an instance is on (``None`` where taken: either)."""

    INCOMING = 1
    OUTGOING = 2
