"""Every RPC of the service, written once for both clients: its keyword arguments (named as the
proto's fields), the request it sends, how its response becomes a record, and how it may be
retried. :class:`~hopper_delegation.HopperClient` runs these blocking,
:class:`~hopper_delegation.AsyncHopperClient` on ``grpc.aio``; neither repeats them.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from ._proto import delegation_service_pb2 as dpb
from ._proto import instance_service_pb2 as ipb
from ._proto import task_service_pb2 as tpb
from .enums import (
    DelegationDirection,
    DelegationStatus,
    DelegationType,
    InstanceStatus,
    Scope,
)
from .records import (
    Cancellation,
    Completion,
    Delegation,
    DelegationChain,
    DelegationTree,
    Instance,
    InstanceTreeNode,
    Task,
    TaskCancellation,
    TaskCompletion,
    delegations,
    tasks,
    to_duration,
    to_struct,
)

T = TypeVar("T")


class Retry(enum.Enum):
    """How the client retries a call itself, beyond the service config's retries of reads."""

    #: A read: the channel retries it on UNAVAILABLE (the service config).
    READ = "read"
    #: A transition or an update: retried on ABORTED only, where nothing was written.
    WRITE = "write"
    #: A create with its request_id: retried on UNAVAILABLE, ABORTED and DEADLINE_EXCEEDED,
    #: the same request_id each time, so that it lands once.
    CREATE = "create"


@dataclass(frozen=True, slots=True)
class Unary(Generic[T]):
    """One unary call: ``service``'s ``method`` with ``request``, its response ``convert``ed."""

    service: str
    method: str
    request: Message
    convert: Callable[[Any], T]
    retry: Retry = Retry.READ


@dataclass(frozen=True, slots=True)
class Paged(Generic[T]):
    """A list RPC read to its end: the items of every page, in order."""

    service: str
    method: str
    request: Message
    items: Callable[[Any], Sequence[T]]

    def after(self, page_token: str) -> Any:
        """The request for the page after the one that ended with ``page_token``."""
        request: Any = type(self.request)()
        request.CopyFrom(self.request)
        request.page_token = page_token
        return request


M = TypeVar("M", bound=Callable[..., Any])


def named(method: M, build: Callable[..., Any], client: str) -> M:
    """``method``, a client's method made from ``build``, under its name and with its doc."""
    method.__name__ = build.__name__
    method.__qualname__ = f"{client}.{build.__name__}"
    method.__doc__ = build.__doc__
    return method


def new_request_id() -> str:
    """A fresh request id: the same one is sent on every retry of a create."""
    return uuid.uuid4().hex


def _wire(value: enum.IntEnum | None) -> Any:
    return 0 if value is None else int(value)


# --- InstanceService ------------------------------------------------------------------------


def register_instance(
    *,
    name: str,
    scope: Scope,
    id: str = "",
    parent_id: str | None = None,
    status: InstanceStatus | None = None,
    config: Mapping[str, Any] | None = None,
    lease: timedelta | float | None = None,
    request_id: str | None = None,
) -> Unary[Instance]:
    """Registers an instance (``lease`` in seconds or a ``timedelta``: keep it with a
    :class:`~hopper_delegation.LeaseKeeper`). Retried safely: a request id is made if none
    is given."""
    request = ipb.RegisterInstanceRequest(
        id=id,
        name=name,
        scope=_wire(scope),
        parent_id=parent_id or "",
        status=_wire(status),
        config=to_struct(config),
        request_id=request_id or new_request_id(),
        lease=to_duration(lease),
    )
    return Unary(
        "InstanceService",
        "RegisterInstance",
        request,
        lambda r: Instance.from_proto(r.instance),
        Retry.CREATE,
    )


def get_instance(*, id: str) -> Unary[Instance]:
    """Reads one instance."""
    return Unary(
        "InstanceService",
        "GetInstance",
        ipb.GetInstanceRequest(id=id),
        lambda r: Instance.from_proto(r.instance),
    )


def list_instances(
    *,
    scope: Scope | None = None,
    parent_id: str | None = None,
    status: InstanceStatus | None = None,
    page_size: int = 0,
) -> Paged[Instance]:
    """Every instance matching the filters, ordered by id, read a page at a time."""
    request = ipb.ListInstancesRequest(
        scope=_wire(scope), parent_id=parent_id or "", status=_wire(status), page_size=page_size
    )
    return Paged(
        "InstanceService",
        "ListInstances",
        request,
        lambda r: [Instance.from_proto(m) for m in r.instances],
    )


def update_instance_status(*, id: str, status: InstanceStatus) -> Unary[Instance]:
    """Sets an instance's run state."""
    return Unary(
        "InstanceService",
        "UpdateInstanceStatus",
        ipb.UpdateInstanceStatusRequest(id=id, status=_wire(status)),
        lambda r: Instance.from_proto(r.instance),
    )


def get_instance_tree(*, root_id: str = "") -> Unary[list[InstanceTreeNode]]:
    """A subtree of instances with their load, ordered by id (``""``: all the caller sees)."""
    return Unary(
        "InstanceService",
        "GetInstanceTree",
        ipb.GetInstanceTreeRequest(root_id=root_id),
        lambda r: [InstanceTreeNode.from_proto(n) for n in r.nodes],
    )


def renew_instance_lease(*, instance_id: str) -> Unary[Instance]:
    """Renews an instance's lease for one period; the instance's ``lease_expires_at`` is the
    new ``live_until``."""
    return Unary(
        "InstanceService",
        "RenewInstanceLease",
        ipb.RenewInstanceLeaseRequest(instance_id=instance_id),
        lambda r: Instance.from_proto(r.instance),
    )


# --- TaskService ----------------------------------------------------------------------------


def create_task(
    *,
    title: str,
    instance_id: str = "",
    id: str = "",
    description: str = "",
    parent_task_id: str | None = None,
    request_id: str | None = None,
) -> Unary[Task]:
    """Creates a task at an instance (a subtask: where its parent is). Retried safely."""
    request = tpb.CreateTaskRequest(
        id=id,
        title=title,
        description=description,
        instance_id=instance_id,
        parent_task_id=parent_task_id or "",
        request_id=request_id or new_request_id(),
    )
    return Unary(
        "TaskService", "CreateTask", request, lambda r: Task.from_proto(r.task), Retry.CREATE
    )


def get_task(*, id: str) -> Unary[Task]:
    """Reads one task."""
    return Unary(
        "TaskService", "GetTask", tpb.GetTaskRequest(id=id), lambda r: Task.from_proto(r.task)
    )


def list_subtasks(*, task_id: str, page_size: int = 0) -> Paged[Task]:
    """Every direct subtask of a task, oldest first."""
    request = tpb.ListSubtasksRequest(task_id=task_id, page_size=page_size)
    return Paged("TaskService", "ListSubtasks", request, lambda r: tasks(r.subtasks))


def complete_task(
    *, task_id: str, result: Mapping[str, Any] | None = None
) -> Unary[TaskCompletion]:
    """Completes a task where it is; the completion bubbles up its chain."""
    request = tpb.CompleteTaskRequest(task_id=task_id, result=to_struct(result))
    return Unary(
        "TaskService",
        "CompleteTask",
        request,
        lambda r: TaskCompletion(Task.from_proto(r.task), delegations(r.completed_delegations)),
        Retry.WRITE,
    )


def cancel_task(*, task_id: str) -> Unary[TaskCancellation]:
    """Cancels a task, its active delegations and its unfinished subtasks."""
    return Unary(
        "TaskService",
        "CancelTask",
        tpb.CancelTaskRequest(task_id=task_id),
        lambda r: TaskCancellation(
            Task.from_proto(r.task),
            delegations(r.cancelled_delegations),
            tasks(r.cancelled_subtasks),
        ),
        Retry.WRITE,
    )


# --- DelegationService ----------------------------------------------------------------------


def create_delegation(
    *,
    task_id: str,
    source_instance_id: str,
    target_instance_id: str,
    delegation_type: DelegationType = DelegationType.ROUTE,
    notes: str = "",
    delegated_by: str = "",
    request_id: str | None = None,
    accept_within: timedelta | float | None = None,
    complete_within: timedelta | float | None = None,
    id: str = "",
) -> Unary[Delegation]:
    """Sends a task from the instance holding it to another (PENDING). Retried safely: a
    request id is made if none is given, and reused on every retry."""
    request = dpb.CreateDelegationRequest(
        task_id=task_id,
        source_instance_id=source_instance_id,
        target_instance_id=target_instance_id,
        delegation_type=_wire(delegation_type),
        notes=notes,
        delegated_by=delegated_by,
        request_id=request_id or new_request_id(),
        accept_within=to_duration(accept_within),
        complete_within=to_duration(complete_within),
        id=id,
    )
    return Unary(
        "DelegationService",
        "CreateDelegation",
        request,
        lambda r: Delegation.from_proto(r.delegation),
        Retry.CREATE,
    )


def _delegation(method: str, request: Message, retry: Retry = Retry.WRITE) -> Unary[Delegation]:
    return Unary(
        "DelegationService", method, request, lambda r: Delegation.from_proto(r.delegation), retry
    )


def get_delegation(*, id: str) -> Unary[Delegation]:
    """Reads one delegation."""
    return _delegation("GetDelegation", dpb.GetDelegationRequest(id=id), Retry.READ)


def update_delegation(*, id: str, notes: str) -> Unary[Delegation]:
    """Replaces a delegation's notes."""
    return _delegation(
        "UpdateDelegation", dpb.UpdateDelegationRequest(id=id, notes=notes), Retry.READ
    )


def accept_delegation(*, id: str) -> Unary[Delegation]:
    """PENDING -> ACCEPTED."""
    return _delegation("AcceptDelegation", dpb.AcceptDelegationRequest(id=id))


def reject_delegation(*, id: str, reason: str) -> Unary[Delegation]:
    """PENDING -> REJECTED; the task goes back to the source."""
    return _delegation("RejectDelegation", dpb.RejectDelegationRequest(id=id, reason=reason))


def complete_delegation(
    *, id: str, result: Mapping[str, Any] | None = None, notes: str | None = None
) -> Unary[Completion]:
    """ACCEPTED -> COMPLETED, bubbling up the chain."""
    request = dpb.CompleteDelegationRequest(id=id, result=to_struct(result), notes=notes)
    return Unary(
        "DelegationService",
        "CompleteDelegation",
        request,
        lambda r: Completion(
            Delegation.from_proto(r.delegation),
            delegations(r.completed_ancestors),
            Task.from_proto(r.task),
        ),
        Retry.WRITE,
    )


def cancel_delegation(*, id: str) -> Unary[Cancellation]:
    """PENDING or ACCEPTED -> CANCELLED, with every active hop and open subtask below it."""
    return Unary(
        "DelegationService",
        "CancelDelegation",
        dpb.CancelDelegationRequest(id=id),
        lambda r: Cancellation(
            Delegation.from_proto(r.delegation),
            delegations(r.cancelled_descendants),
            Task.from_proto(r.task),
            tasks(r.cancelled_subtasks),
        ),
        Retry.WRITE,
    )


def list_task_delegations(*, task_id: str, page_size: int = 0) -> Paged[Delegation]:
    """Every delegation of a task, oldest first."""
    request = dpb.ListTaskDelegationsRequest(task_id=task_id, page_size=page_size)
    return Paged(
        "DelegationService", "ListTaskDelegations", request, lambda r: delegations(r.delegations)
    )


def list_pending_delegations(*, instance_id: str, page_size: int = 0) -> Paged[Delegation]:
    """The pending delegations sent to an instance, oldest first."""
    request = dpb.ListPendingDelegationsRequest(instance_id=instance_id, page_size=page_size)
    return Paged(
        "DelegationService", "ListPendingDelegations", request, lambda r: delegations(r.delegations)
    )


def list_instance_delegations(
    *,
    instance_id: str,
    direction: DelegationDirection | None = None,
    statuses: Iterable[DelegationStatus] = (),
    page_size: int = 0,
) -> Paged[Delegation]:
    """The delegations an instance received (INCOMING), sent (OUTGOING) or either (``None``),
    in any of ``statuses`` (empty: all), oldest first."""
    request = dpb.ListInstanceDelegationsRequest(
        instance_id=instance_id,
        direction=_wire(direction),
        statuses=[_wire(s) for s in statuses],
        page_size=page_size,
    )
    return Paged(
        "DelegationService",
        "ListInstanceDelegations",
        request,
        lambda r: delegations(r.delegations),
    )


def count_delegations(
    *, instance_id: str, direction: DelegationDirection | None = None
) -> Unary[dict[DelegationStatus, int]]:
    """An instance's delegations counted by status (every status, zeros included)."""
    request = dpb.CountDelegationsRequest(instance_id=instance_id, direction=_wire(direction))
    return Unary(
        "DelegationService",
        "CountDelegations",
        request,
        lambda r: {DelegationStatus(c.status): c.count for c in r.counts},
    )


def get_delegation_chain(*, task_id: str) -> Unary[DelegationChain]:
    """A task's chain of live hops, origin first."""
    return Unary(
        "DelegationService",
        "GetDelegationChain",
        dpb.GetDelegationChainRequest(task_id=task_id),
        lambda r: DelegationChain(
            r.task_id, delegations(r.delegations), r.origin_instance_id, r.current_instance_id
        ),
    )


def get_delegation_tree(*, task_id: str) -> Unary[DelegationTree]:
    """The whole tree below a task in one call."""
    return Unary(
        "DelegationService",
        "GetDelegationTree",
        dpb.GetDelegationTreeRequest(task_id=task_id),
        lambda r: DelegationTree(
            Task.from_proto(r.task), tasks(r.subtasks), delegations(r.delegations)
        ),
    )
