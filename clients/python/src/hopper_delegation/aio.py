""":class:`AsyncHopperClient`: :class:`~hopper_delegation.HopperClient`'s methods on
``grpc.aio``. A ``grpc.aio`` channel belongs to the event loop it was made on, so the channel is
made on first use, inside the running loop (or by ``async with``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from . import _ops
from ._channel import Connection, PathOrBytes
from ._proto import delegation_service_pb2_grpc, instance_service_pb2_grpc, task_service_pb2_grpc
from .client import RETRIED_ON, pause
from .enums import EventKind
from .errors import from_rpc_error
from .watch import PROGRESS_INTERVAL, AsyncWatch, _Cursor

P = ParamSpec("P")
T = TypeVar("T")


def _unary(
    build: Callable[P, _ops.Unary[T]],
) -> Callable[Concatenate[AsyncHopperClient, P], Awaitable[T]]:
    async def method(self: AsyncHopperClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._call(build(*args, **kwargs))

    return _ops.named(method, build, "AsyncHopperClient")


def _paged(
    build: Callable[P, _ops.Paged[T]],
) -> Callable[Concatenate[AsyncHopperClient, P], AsyncIterator[T]]:
    def method(self: AsyncHopperClient, /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        return self._pages(build(*args, **kwargs))

    return _ops.named(method, build, "AsyncHopperClient")


class AsyncHopperClient:
    """The async client; its arguments are :class:`~hopper_delegation.HopperClient`'s."""

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
        self._channel: grpc.aio.Channel | None = None
        self._closed = False
        self._stubs: dict[str, Any] = {}

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel, made on first use in the running event loop."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._channel is None:
            asyncio.get_running_loop()  # a RuntimeError outside a loop, not a broken channel
            self._channel = self.connection.aio_channel()
            self._stubs = {
                "InstanceService": instance_service_pb2_grpc.InstanceServiceStub(self._channel),
                "TaskService": task_service_pb2_grpc.TaskServiceStub(self._channel),
                "DelegationService": delegation_service_pb2_grpc.DelegationServiceStub(
                    self._channel
                ),
            }
        return self._channel

    def _stub(self, service: str) -> Any:
        _ = self.channel
        return self._stubs[service]

    async def _call(self, op: _ops.Unary[T], attempt_timeout: float | None = None) -> T:
        method = getattr(self._stub(op.service), op.method)
        retried_on = RETRIED_ON[op.retry]
        attempt = 1
        while True:
            try:
                response = await method(
                    op.request,
                    timeout=attempt_timeout or self.timeout,
                    metadata=self.connection.metadata,
                )
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                if error.code not in retried_on or attempt >= self.retry_attempts:
                    raise error from None
                # ABORTED wrote nothing and may go through at once: a short pause only.
                await asyncio.sleep(
                    pause(attempt) / (10 if error.code == grpc.StatusCode.ABORTED else 1)
                )
                attempt += 1
                continue
            return op.convert(response)

    async def _pages(self, op: _ops.Paged[T]) -> AsyncIterator[T]:
        method = getattr(self._stub(op.service), op.method)
        request: Any = op.request
        while True:
            try:
                response = await method(
                    request, timeout=self.timeout, metadata=self.connection.metadata
                )
            except grpc.aio.AioRpcError as error:
                raise from_rpc_error(error) from None
            for item in op.items(response):
                yield item
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
    ) -> AsyncWatch:
        """:meth:`HopperClient.watch`, as an async iterator."""
        stub = self._stub("DelegationService")
        metadata = self.connection.metadata

        def open_stream(request: Any) -> Any:
            return stub.WatchEvents(request, metadata=metadata)

        state = _Cursor(instance_id, descendants, after, kinds, progress_interval)
        return AsyncWatch(open_stream, state)

    def watch_events(
        self,
        *,
        instance_id: str,
        include_descendants: bool = False,
        after_sequence: int | None = None,
        kinds: Iterable[EventKind] | None = None,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> AsyncWatch:
        """WatchEvents with the proto's field names: the same as :meth:`watch`."""
        return self.watch(
            instance_id,
            descendants=include_descendants,
            after=after_sequence,
            kinds=kinds,
            progress_interval=progress_interval,
        )

    async def close(self) -> None:
        """Closes the channel; the client cannot be used afterwards."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncHopperClient:
        _ = self.channel
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
