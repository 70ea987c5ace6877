"""``watch``: the events of an instance's delegations, none missed and none twice, across
disconnects, server restarts and a switch between replicas.

The watch keeps a cursor, the sequence of the last event *or progress mark* it received, and
whenever its stream fails with a fault (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED, a reset
stream) or falls silent (no message for three progress intervals: a half-open connection), it
opens a new stream after that cursor, backing off with jitter from 0.1 s to 5 s. The server
replays exactly the events after the cursor; the watch also drops any event at or below it, so
nothing is ever delivered twice. A refusal (NOT_FOUND, PERMISSION_DENIED, …) ends the watch
with its exception; a cursor older than the retained log raises
:class:`~hopper_delegation.CursorExpired`. Persist :attr:`Watch.cursor` and pass it as
``after=`` to resume in another process.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import grpc

from ._proto import delegation_service_pb2 as dpb
from .enums import EventKind
from .errors import from_rpc_error
from .records import Event

log = logging.getLogger("hopper_delegation.watch")

#: The server's default ``--progress-interval``.
PROGRESS_INTERVAL = 5.0

_FAULTS = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _is_fault(error: grpc.RpcError) -> bool:
    call: Any = error
    code = call.code()
    if code in _FAULTS:
        return True
    # A stream reset by a dying server or a proxy reaches grpcio as INTERNAL: transient for
    # NO_ERROR, INTERNAL_ERROR, REFUSED_STREAM and CANCEL, not for a PROTOCOL_ERROR (a
    # misconfiguration that would fail forever).
    reset = _RESET.search(call.details() or "")
    return code == grpc.StatusCode.INTERNAL and reset is not None and reset[1] in "0278"


_RESET = re.compile(r"RST_STREAM with error code (\d)\b")


class _Cursor:
    """What both watches share: the cursor, the request after it, and the backoff."""

    def __init__(
        self,
        instance_id: str,
        descendants: bool,
        after: int | None,
        kinds: Iterable[EventKind] | None,
        progress_interval: float,
    ) -> None:
        self.instance_id = instance_id
        self.descendants = descendants
        self.cursor = after
        self.kinds = [int(k) for k in kinds or ()]
        self.silence = 3 * progress_interval
        self.failures = 0
        self.reconnects = 0

    def request(self) -> dpb.WatchEventsRequest:
        request = dpb.WatchEventsRequest(
            instance_id=self.instance_id,
            include_descendants=self.descendants,
            kinds=self.kinds,  # type: ignore[arg-type]
        )
        if self.cursor is not None:
            request.after_sequence = self.cursor
        return request

    def take(self, response: dpb.WatchEventsResponse) -> Event | None:
        """The event in ``response``, if it is one after the cursor; advances the cursor."""
        self.failures = 0
        if response.HasField("progress"):
            sequence = response.progress.sequence
            if self.cursor is None or sequence > self.cursor:
                self.cursor = sequence
            return None
        event = response.event
        if self.cursor is not None and event.sequence <= self.cursor:
            return None
        self.cursor = event.sequence
        return Event.from_proto(event)

    def backoff(self, why: object) -> float:
        """The pause before the next stream, after a fault."""
        self.failures += 1
        self.reconnects += 1
        ceiling = min(5.0, 0.1 * 2 ** (self.failures - 1))
        pause = random.uniform(ceiling / 2, ceiling)
        log.info(
            "watch of %s: %s; resuming after %s in %.2fs", self.instance_id, why, self.cursor, pause
        )
        return pause


class _Watched:
    """What both watches show: the cursor and the reconnections."""

    _state: _Cursor

    @property
    def cursor(self) -> int | None:
        """The sequence to persist and resume after (``after=``)."""
        return self._state.cursor

    @property
    def reconnects(self) -> int:
        """How many times the watch has opened a new stream after a fault."""
        return self._state.reconnects


class Watch(_Watched, Iterator[Event]):
    """A blocking iterator of events that resumes by itself; see the module's doc."""

    def __init__(
        self,
        open_stream: Callable[[dpb.WatchEventsRequest], Any],
        state: _Cursor,
    ) -> None:
        self._open = open_stream
        self._state = state
        self._call: Any = None
        self._closed = False
        self._wake = threading.Event()
        # Set while __next__ waits on the stream: the watchdog cancels a silent one.
        self._waiting_since: float | None = None
        self._silenced = False
        self._dog: threading.Thread | None = None
        self._ready: deque[Event] = deque()  # read by start(), not yet delivered

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> Event:
        if self._ready:
            return self._ready.popleft()
        while True:
            event = self._state.take(self._message())
            if event is not None:
                return event

    def start(self) -> int | None:
        """Opens the stream and waits until the server has caught it up (its first progress
        mark): every event after the returned cursor will be delivered. Read the state you
        need after this, and nothing between the two is lost."""
        while True:
            response = self._message()
            event = self._state.take(response)
            if event is not None:
                self._ready.append(event)
            elif response.HasField("progress"):
                return self._state.cursor

    def _message(self) -> dpb.WatchEventsResponse:
        """The next message of the stream, opening a new one after a fault."""
        state = self._state
        while True:
            if self._closed:
                raise StopIteration
            if self._call is None:
                self._silenced = False
                self._call = self._open(state.request())
                if self._dog is None:
                    self._dog = threading.Thread(target=self._watchdog, daemon=True)
                    self._dog.start()
            self._waiting_since = time.monotonic()
            try:
                response: dpb.WatchEventsResponse = next(self._call)
                return response
            except StopIteration:
                self._fault("the stream ended")
            except grpc.RpcError as error:
                if self._closed:
                    raise StopIteration from None
                if self._silenced:
                    self._fault(f"no message for {state.silence:.0f}s")
                elif not _is_fault(error):
                    self.close()
                    raise from_rpc_error(error) from None
                else:
                    self._fault(from_rpc_error(error))
            finally:
                self._waiting_since = None

    def _fault(self, why: object) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        self._wake.wait(self._state.backoff(why))

    def _watchdog(self) -> None:
        silence = self._state.silence
        while not self._closed:
            since = self._waiting_since
            if since is not None and time.monotonic() - since >= silence:
                call = self._call
                if call is not None:
                    self._silenced = True
                    call.cancel()
                self._waiting_since = None
            self._wake.wait(silence / 4)

    def close(self) -> None:
        """Ends the watch: the stream is cancelled and iteration stops."""
        self._closed = True
        self._wake.set()
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncWatch(_Watched, AsyncIterator[Event]):
    """An async iterator of events that resumes by itself; see the module's doc."""

    def __init__(
        self,
        open_stream: Callable[[dpb.WatchEventsRequest], Any],
        state: _Cursor,
    ) -> None:
        self._open = open_stream
        self._state = state
        self._call: Any = None
        self._closed = False
        self._closing = asyncio.Event()
        self._ready: deque[Event] = deque()  # read by start(), not yet delivered

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> Event:
        if self._ready:
            return self._ready.popleft()
        while True:
            event = self._state.take(await self._message())
            if event is not None:
                return event

    async def start(self) -> int | None:
        """:meth:`Watch.start`: opens the stream and waits until it is caught up."""
        while True:
            response = await self._message()
            event = self._state.take(response)
            if event is not None:
                self._ready.append(event)
            elif response.HasField("progress"):
                return self._state.cursor

    async def _message(self) -> dpb.WatchEventsResponse:
        """The next message of the stream, opening a new one after a fault."""
        state = self._state
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._call is None:
                self._call = self._open(state.request())
            try:
                async with asyncio.timeout(state.silence):
                    response = await self._call.read()
            except TimeoutError:
                await self._fault(f"no message for {state.silence:.0f}s")
                continue
            except asyncio.CancelledError:
                # grpc.aio raises this from a read of a call cancelled here: aclose().
                if self._closed:
                    raise StopAsyncIteration from None
                raise
            except grpc.RpcError as error:
                if self._closed:
                    raise StopAsyncIteration from None
                if not _is_fault(error):
                    await self.aclose()
                    raise from_rpc_error(error) from None
                await self._fault(from_rpc_error(error))
                continue
            if response is grpc.aio.EOF:
                await self._fault("the stream ended")
                continue
            message: dpb.WatchEventsResponse = response
            return message

    async def _fault(self, why: object) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        pause = self._state.backoff(why)
        try:
            async with asyncio.timeout(pause):
                await self._closing.wait()
        except TimeoutError:
            pass

    async def aclose(self) -> None:
        """Ends the watch: the stream is cancelled and iteration stops."""
        self._closed = True
        self._closing.set()
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["PROGRESS_INTERVAL", "AsyncWatch", "Watch"]
