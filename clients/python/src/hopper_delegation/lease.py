""":class:`LeaseKeeper`: renews an instance's lease at a third of its period, so the instance
stays responsive and its hops do not expire.

On the blocking client it runs a thread, on the async client a task; either way it is a
context manager (``with`` / ``async with``). It rides through faults (UNAVAILABLE and the
like: the server's restart brake protects leases while the service is down) by retrying
sooner, and stops on a refusal (the instance is unknown, has no lease, or is not the caller's),
keeping it in :attr:`LeaseKeeper.error` and raising it when the keeper is stopped.

``on_lapse()`` is called once per lapse: when a renewal shows that the lease lapsed on the
server's clock before it (the lease ran out while the server could not be reached), or when a
whole period has passed on this machine without a renewal. A renewal revives no expired hop:
re-read your pending work then. ``on_renewed(live_until)`` follows every renewal. Both may be
coroutine functions on the async client.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from . import _ops
from .aio import AsyncHopperClient
from .client import HopperClient
from .errors import HopperError
from .records import Instance

log = logging.getLogger("hopper_delegation.lease")

OnLapse = Callable[[], Awaitable[None] | None]
OnRenewed = Callable[[datetime], Awaitable[None] | None]


class LeaseKeeper:
    """Keeps ``instance_id``'s ``lease`` (its registered period) renewed; see the module."""

    def __init__(
        self,
        client: HopperClient | AsyncHopperClient,
        instance_id: str,
        lease: timedelta | float,
        *,
        on_lapse: OnLapse | None = None,
        on_renewed: OnRenewed | None = None,
    ) -> None:
        self.client = client
        self.instance_id = instance_id
        self.lease = lease if isinstance(lease, timedelta) else timedelta(seconds=lease)
        self.on_lapse = on_lapse
        self.on_renewed = on_renewed
        #: Until when the instance is live, on the server's clock (``None`` before the first
        #: renewal).
        self.live_until: datetime | None = None
        #: The refusal (or the error) that stopped the keeper, if one did.
        self.error: Exception | None = None
        #: How many renewals succeeded.
        self.renewals = 0
        self._renewed_at: float | None = None  # time.monotonic() of the last renewal
        self._lapse_reported = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None

    # --- the decisions, shared by the thread and the task -----------------------------------

    @property
    def period(self) -> float:
        return self.lease.total_seconds()

    def _attempt_timeout(self) -> float:
        return max(self.period / 3, 0.5)

    def _after(
        self, instance: Instance | None, error: Exception | None
    ) -> tuple[list[Callable[[], object]], float | None]:
        """What follows one renewal attempt: the callbacks now due, and the pause before the
        next attempt (``None``: stop, on a refusal)."""
        due: list[Callable[[], object]] = []
        if error is not None:
            if not isinstance(error, HopperError) or not error.retryable:
                self.error = error
                log.warning("lease keeper of %s stops: %s", self.instance_id, error)
                return due, None
            if self._lapsed_here() and self.on_lapse:
                due.append(self.on_lapse)
            return due, self.period / 10
        assert instance is not None
        if instance.lease is not None and instance.lease != self.lease:
            log.warning(
                "%s holds a lease of %s, not %s: keeping that", self.instance_id, instance.lease,
                self.lease,
            )  # fmt: skip
            self.lease = instance.lease
        live_until = instance.lease_expires_at or datetime.now().astimezone()
        # The renewal happened at live_until - lease on the server's clock: later than the
        # previous live_until means the lease lapsed in between.
        if (
            self.live_until is not None
            and live_until - self.lease > self.live_until
            and not self._lapse_reported
            and self.on_lapse
        ):
            due.append(self.on_lapse)
        self.live_until = live_until
        self._renewed_at = time.monotonic()
        self._lapse_reported = False
        self.renewals += 1
        if self.on_renewed:
            on_renewed = self.on_renewed
            due.append(lambda: on_renewed(live_until))
        return due, self.period / 3

    def _lapsed_here(self) -> bool:
        """Whether a whole period passed here without a renewal (reported once)."""
        if self._renewed_at is None or self._lapse_reported:
            return False
        if time.monotonic() - self._renewed_at < self.period:
            return False
        self._lapse_reported = True
        return True

    def _started(self) -> None:
        if self._thread is not None or self._task is not None:
            raise RuntimeError(f"the lease keeper of {self.instance_id} was started already")

    # --- blocking: a thread -----------------------------------------------------------------

    def start(self) -> LeaseKeeper:
        """Starts the keeper thread (blocking client); renews at once."""
        if not isinstance(self.client, HopperClient):
            raise TypeError("an AsyncHopperClient's keeper starts with `async with` or astart()")
        for callback in (self.on_lapse, self.on_renewed):
            if inspect.iscoroutinefunction(callback):
                raise TypeError("a blocking keeper's callbacks are plain functions")
        self._started()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{self.instance_id}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        client = self.client
        assert isinstance(client, HopperClient)
        while not self._stop.is_set():
            instance, error = None, None
            try:
                instance = client._call(
                    _ops.renew_instance_lease(instance_id=self.instance_id),
                    attempt_timeout=self._attempt_timeout(),
                )
            except Exception as e:
                error = e
            due, pause = self._after(instance, error)
            for callback in due:
                _safely(callback)
            if pause is None:
                return
            self._stop.wait(pause)

    def stop(self) -> None:
        """Stops the thread; raises the refusal that stopped it earlier, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is None and self.error is not None:
            raise self.error

    # --- async: a task ----------------------------------------------------------------------

    async def astart(self) -> LeaseKeeper:
        """Starts the keeper task (async client); renews at once."""
        if not isinstance(self.client, AsyncHopperClient):
            raise TypeError("a HopperClient's keeper starts with `with` or start()")
        self._started()
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._arun(self.client, self._stopping))
        return self

    async def _arun(self, client: AsyncHopperClient, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            instance, error = None, None
            try:
                instance = await client._call(
                    _ops.renew_instance_lease(instance_id=self.instance_id),
                    attempt_timeout=self._attempt_timeout(),
                )
            except Exception as e:
                error = e
            due, pause = self._after(instance, error)
            for callback in due:
                await _asafely(callback)
            if pause is None:
                return
            try:
                async with asyncio.timeout(pause):
                    await stopping.wait()
            except TimeoutError:
                pass

    async def astop(self) -> None:
        """Stops the task; raises the refusal that stopped it earlier, if any."""
        await self._aend()
        if self.error is not None:
            raise self.error

    async def _aend(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._task is not None:
            await self._task

    async def __aenter__(self) -> LeaseKeeper:
        return await self.astart()

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        await self._aend()
        if exc_type is None and self.error is not None:
            raise self.error


def _safely(callback: Callable[[], object]) -> object:
    """Runs a user's callback; what it raises is logged, and the keeper keeps renewing."""
    try:
        return callback()
    except Exception:
        log.exception("a lease keeper's callback raised")
        return None


async def _asafely(callback: Callable[[], object]) -> None:
    value = _safely(callback)
    if inspect.isawaitable(value):
        try:
            await value
        except Exception:
            log.exception("a lease keeper's callback raised")
