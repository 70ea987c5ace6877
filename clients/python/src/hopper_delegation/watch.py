"""``watch``: the events of an instance's delegations, none missed and none twice, across
disconnects, server restarts and a switch between replicas.

The watch keeps a cursor, the sequence of the last event *or progress mark* it received, and
whenever its stream fails with a fault (any retryable status: UNAVAILABLE, ABORTED,
DEADLINE_EXCEEDED, a transient stream reset) or falls silent (no message for three progress
intervals: a half-open connection), it opens a new stream after that cursor, backing off with
jitter from 0.1 s to 5 s. The server replays exactly the events after the cursor; the watch
also drops any event at or below it, so nothing is ever delivered twice. A refusal
(NOT_FOUND, PERMISSION_DENIED, …) ends the watch with its exception; a cursor older than the
retained log raises :class:`~hopper_delegation.CursorExpired`. Persist :attr:`Watch.cursor`
after handling each event and pass it as ``after=`` to resume in another process.

The stream opens on the first ``next()`` (or :meth:`Watch.start`): with ``after=None`` the
watch delivers what happens from then on; call ``start()`` to pin that moment before reading
any state the events will update.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import weakref
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


class _Cursor:
    """What both watches share: the cursor, the request after it, the backoff, and the events
    read ahead by ``start()``."""

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
        self.ready: deque[Event] = deque()  # read by start(), not delivered yet

    def request(self) -> dpb.WatchEventsRequest:
        request = dpb.WatchEventsRequest(
            instance_id=self.instance_id,
            include_descendants=self.descendants,
            kinds=self.kinds,  # type: ignore[arg-type]
        )
        if self.cursor is not None:
            request.after_sequence = self.cursor
        return request

    def delivered(self) -> int | None:
        """The cursor to persist: before the first event read ahead but not delivered yet."""
        return self.ready[0].sequence - 1 if self.ready else self.cursor

    def take(self, response: dpb.WatchEventsResponse) -> Event | None:
        """The event in ``response``, if it is one after the cursor; advances the cursor once
        the event is converted (a progress mark moves it too)."""
        self.failures = 0
        payload = response.WhichOneof("payload")
        if payload == "progress":
            sequence = response.progress.sequence
            if self.cursor is None or sequence > self.cursor:
                self.cursor = sequence
            return None
        if payload != "event":
            return None
        sequence = response.event.sequence
        if self.cursor is not None and sequence <= self.cursor:
            return None
        event = Event.from_proto(response.event)
        self.cursor = sequence
        return event

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
        """The sequence to persist and resume after (``after=``): every event up to it has been
        delivered by this iterator."""
        return self._state.delivered()

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
        self._lock = threading.Lock()  # the call and the flags below, against the watchdog
        self._wake = threading.Event()
        # Set while _message waits on the stream: the watchdog cancels a silent one.
        self._waiting_since: float | None = None
        self._silenced = False
        self._dog: threading.Thread | None = None

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> Event:
        ready = self._state.ready
        if ready:
            return ready.popleft()
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
                self._state.ready.append(event)
            elif response.WhichOneof("payload") == "progress":
                return self._state.cursor

    def _message(self) -> dpb.WatchEventsResponse:
        """The next message of the stream, opening a new one after a fault."""
        state = self._state
        while True:
            with self._lock:
                if self._closed:
                    raise StopIteration
                if self._call is None:
                    self._silenced = False
                    self._call = self._open(state.request())
                    if self._dog is None:
                        self._dog = threading.Thread(
                            target=_watchdog, args=(weakref.ref(self), self._wake), daemon=True
                        )
                        self._dog.start()
                call = self._call
                self._waiting_since = time.monotonic()
            try:
                response: dpb.WatchEventsResponse = next(call)
                return response
            except StopIteration:
                self._fault("the stream ended")
            except grpc.RpcError as rpc_error:
                if self._closed:
                    raise StopIteration from None
                if self._silenced:
                    self._fault(f"no message for {state.silence:.0f}s")
                    continue
                error = from_rpc_error(rpc_error)
                if not error.retryable:
                    self.close()
                    raise error from None
                self._fault(error)
            finally:
                self._waiting_since = None

    def _fault(self, why: object) -> None:
        with self._lock:
            call, self._call = self._call, None
        if call is not None:
            call.cancel()
        self._wake.wait(self._state.backoff(why))

    def _cancel_if_silent(self) -> None:
        with self._lock:
            since = self._waiting_since
            if since is None or time.monotonic() - since < self._state.silence:
                return
            if self._call is not None:
                self._silenced = True
                self._call.cancel()
            self._waiting_since = None

    def close(self) -> None:
        """Ends the watch: the stream is cancelled and iteration stops."""
        with self._lock:
            self._closed = True
            call = self._call
        self._wake.set()
        if call is not None:
            call.cancel()

    def __del__(self) -> None:
        # A watch dropped without close() (a `break` out of its loop) ends its stream.
        if not getattr(self, "_closed", True):
            self.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _watchdog(watch: weakref.ref[Watch], wake: threading.Event) -> None:
    """Cancels the watch's stream when it has been silent too long; holds only a weak
    reference, so that a dropped watch is collected (and closed)."""
    while True:
        w = watch()
        if w is None or w._closed:
            return
        interval = w._state.silence / 4
        w._cancel_if_silent()
        del w
        wake.wait(interval)


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

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> Event:
        ready = self._state.ready
        if ready:
            return ready.popleft()
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
                self._state.ready.append(event)
            elif response.WhichOneof("payload") == "progress":
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
                # grpc.aio cancels the call when a read is cancelled (aclose(), or the
                # caller's own timeout around anext()): that call is done for; the next read
                # opens a new one after the cursor.
                call, self._call = self._call, None
                if call is not None:
                    call.cancel()
                if self._closed:
                    raise StopAsyncIteration from None
                raise
            except grpc.RpcError as rpc_error:
                if self._closed:
                    raise StopAsyncIteration from None
                error = from_rpc_error(rpc_error)
                if not error.retryable:
                    await self.aclose()
                    raise error from None
                await self._fault(error)
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
