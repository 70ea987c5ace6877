""":class:`HopperClient`, the blocking client: one method per RPC (see ``_ops``), list RPCs as
iterators over every page, and :meth:`HopperClient.watch`."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from . import _ops
from ._channel import Connection, PathOrBytes
from ._proto import delegation_service_pb2_grpc, instance_service_pb2_grpc, task_service_pb2_grpc
from .enums import EventKind
from .errors import from_rpc_error
from .watch import PROGRESS_INTERVAL, Watch, _Cursor

P = ParamSpec("P")
T = TypeVar("T")

#: The status codes each kind of call is retried on by the client itself.
RETRIED_ON: dict[_ops.Retry, frozenset[grpc.StatusCode]] = {
    _ops.Retry.READ: frozenset(),  # the channel's service config retries reads
    _ops.Retry.WRITE: frozenset({grpc.StatusCode.ABORTED}),
    _ops.Retry.CREATE: frozenset(
        {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}
    ),
}


def pause(attempt: int) -> float:
    """The jittered pause before retry ``attempt`` (1-based): 0.1 s doubling up to 2 s."""
    ceiling = min(2.0, 0.1 * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def _unary(
    build: Callable[P, _ops.Unary[T]],
) -> Callable[Concatenate[HopperClient, P], T]:
    def method(self: HopperClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._call(build(*args, **kwargs))

    return _ops.named(method, build, "HopperClient")


def _paged(
    build: Callable[P, _ops.Paged[T]],
) -> Callable[Concatenate[HopperClient, P], Iterator[T]]:
    def method(self: HopperClient, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._pages(build(*args, **kwargs))

    return _ops.named(method, build, "HopperClient")


class HopperClient:
    """A blocking client of the Hopper delegation service.

    ``target``: ``HOPPER_SERVER`` or ``http://127.0.0.1:50051`` by default (``https://``
    means TLS; several replicas may be listed, comma-separated); ``token``: ``HOPPER_TOKEN``
    by default, sent on plaintext as well as TLS; ``ca_cert``, ``cert``/``key`` (paths or
    PEM bytes) for TLS and mTLS; ``timeout`` per attempt of a call, in seconds; ``keepalive``
    the HTTP/2 ping interval in seconds (``None``: off); ``service_config`` replaces the
    shipped one (a dict or its JSON). Creates are retried on faults with the same request id,
    up to ``retry_attempts`` attempts.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        ca_cert: PathOrBytes | None = None,
        cert: PathOrBytes | None = None,
        key: PathOrBytes | None = None,
        timeout: float | None = 30.0,
        keepalive: float | None = 30.0,
        service_config: dict[str, Any] | str | None = None,
        retry_attempts: int = 8,
    ) -> None:
        self.connection = Connection.resolve(
            target, token, ca_cert, cert, key, keepalive, service_config
        )
        self.timeout = timeout
        self.retry_attempts = retry_attempts
        self.channel: grpc.Channel = self.connection.sync_channel()
        self._stubs: dict[str, Any] = {
            "InstanceService": instance_service_pb2_grpc.InstanceServiceStub(self.channel),
            "TaskService": task_service_pb2_grpc.TaskServiceStub(self.channel),
            "DelegationService": delegation_service_pb2_grpc.DelegationServiceStub(self.channel),
        }

    def _call(self, op: _ops.Unary[T], attempt_timeout: float | None = None) -> T:
        method = getattr(self._stubs[op.service], op.method)
        retried_on = RETRIED_ON[op.retry]
        attempt = 1
        while True:
            try:
                response = method(
                    op.request,
                    timeout=attempt_timeout or self.timeout,
                    metadata=self.connection.metadata,
                )
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                if error.code not in retried_on or attempt >= self.retry_attempts:
                    raise error from None
                # ABORTED wrote nothing and may go through at once: a short pause only.
                time.sleep(pause(attempt) / (10 if error.code == grpc.StatusCode.ABORTED else 1))
                attempt += 1
                continue
            return op.convert(response)

    def _pages(self, op: _ops.Paged[T]) -> Iterator[T]:
        method = getattr(self._stubs[op.service], op.method)
        request: Any = op.request
        while True:
            try:
                response = method(request, timeout=self.timeout, metadata=self.connection.metadata)
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None
            yield from op.items(response)
            if not response.next_page_token:
                return
            request = op.after(response.next_page_token)

    register_instance = _unary(_ops.register_instance)
    get_instance = _unary(_ops.get_instance)
    list_instances = _paged(_ops.list_instances)
    update_instance_status = _unary(_ops.update_instance_status)
    get_instance_tree = _unary(_ops.get_instance_tree)
    renew_instance_lease = _unary(_ops.renew_instance_lease)
    create_task = _unary(_ops.create_task)
    get_task = _unary(_ops.get_task)
    list_subtasks = _paged(_ops.list_subtasks)
    complete_task = _unary(_ops.complete_task)
    cancel_task = _unary(_ops.cancel_task)
    create_delegation = _unary(_ops.create_delegation)
    get_delegation = _unary(_ops.get_delegation)
    update_delegation = _unary(_ops.update_delegation)
    list_task_delegations = _paged(_ops.list_task_delegations)
    get_delegation_chain = _unary(_ops.get_delegation_chain)
    get_delegation_tree = _unary(_ops.get_delegation_tree)
    list_pending_delegations = _paged(_ops.list_pending_delegations)
    list_instance_delegations = _paged(_ops.list_instance_delegations)
    count_delegations = _unary(_ops.count_delegations)
    accept_delegation = _unary(_ops.accept_delegation)
    reject_delegation = _unary(_ops.reject_delegation)
    complete_delegation = _unary(_ops.complete_delegation)
    cancel_delegation = _unary(_ops.cancel_delegation)

    def watch(
        self,
        instance_id: str,
        *,
        descendants: bool = False,
        after: int | None = None,
        kinds: Iterable[EventKind] | None = None,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> Watch:
        """The events of ``instance_id``'s delegations (and, with ``descendants``, of every
        instance below it), after sequence ``after`` (``None``: from now on), of ``kinds``
        (``None``: all). Never misses and never repeats an event: see :mod:`.watch`.
        ``progress_interval`` is the server's ``--progress-interval``; three of them without a
        message is a fault."""
        stub = self._stubs["DelegationService"]
        metadata = self.connection.metadata

        def open_stream(request: Any) -> Any:
            return stub.WatchEvents(request, metadata=metadata)

        state = _Cursor(instance_id, descendants, after, kinds, progress_interval)
        return Watch(open_stream, state)

    def watch_events(
        self,
        *,
        instance_id: str,
        include_descendants: bool = False,
        after_sequence: int | None = None,
        kinds: Iterable[EventKind] | None = None,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> Watch:
        """WatchEvents with the proto's field names: the same as :meth:`watch`."""
        return self.watch(
            instance_id,
            descendants=include_descendants,
            after=after_sequence,
            kinds=kinds,
            progress_interval=progress_interval,
        )

    def close(self) -> None:
        """Closes the channel; calls in flight fail with CANCELLED."""
        self.channel.close()

    def __enter__(self) -> HopperClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
