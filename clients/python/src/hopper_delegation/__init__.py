"""The Python client of the Hopper delegation service.

``HopperClient`` (blocking) and ``AsyncHopperClient`` (``grpc.aio``) have one method per RPC
returning records (:mod:`.records`); :meth:`HopperClient.watch` streams events that are never
missed or repeated; :class:`LeaseKeeper` keeps an instance's lease; :mod:`.compat` serves
upstream Hopper's ``TaskDelegationRepository``.
"""

from .aio import AsyncHopperClient
from .client import HopperClient
from .enums import (
    DelegationDirection,
    DelegationStatus,
    DelegationType,
    EventKind,
    ExpiryReason,
    InstanceStatus,
    Scope,
    TaskStatus,
)
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    CursorExpired,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    HopperError,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from .lease import LeaseKeeper
from .records import (
    Cancellation,
    Completion,
    Delegation,
    DelegationChain,
    DelegationTree,
    Event,
    Instance,
    InstanceTreeNode,
    Task,
    TaskCancellation,
    TaskCompletion,
)
from .watch import AsyncWatch, Watch

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncHopperClient",
    "AsyncWatch",
    "Cancellation",
    "Cancelled",
    "Completion",
    "CursorExpired",
    "DataLoss",
    "DeadlineExceeded",
    "Delegation",
    "DelegationChain",
    "DelegationDirection",
    "DelegationStatus",
    "DelegationTree",
    "DelegationType",
    "Event",
    "EventKind",
    "ExpiryReason",
    "FailedPrecondition",
    "HopperClient",
    "HopperError",
    "Instance",
    "InstanceStatus",
    "InstanceTreeNode",
    "Internal",
    "InvalidArgument",
    "LeaseKeeper",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Scope",
    "Task",
    "TaskCancellation",
    "TaskCompletion",
    "TaskStatus",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "Watch",
]
