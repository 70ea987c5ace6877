"""A watch holds exactly the log, nothing missing and nothing twice, through the faults it
promises to ride: a SIGKILL and restart of the server under writers, the loss of the replica
it reads from, a hung server, and a cursor the log no longer reaches."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import Database, MakeServer, Server
from load import Writers, hierarchy, logged

from hopper_delegation import (
    AsyncHopperClient,
    CursorExpired,
    Event,
    HopperClient,
    NotFound,
    OutOfRange,
    Watch,
)


class Collector:
    """Reads a watch on a thread of its own into ``events``."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.watch:
                self.events.append(event)
        except BaseException as error:
            self.error = error

    def wait_for(self, last_sequence: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.error is None:
            if self.events and self.events[-1].sequence >= last_sequence:
                break
            time.sleep(0.05)
        self.watch.close()
        self.thread.join(timeout=10)
        assert self.error is None, self.error

    def seen(self) -> list[tuple[int, int, str]]:
        return [(e.sequence, e.kind, e.delegation.id if e.delegation else "") for e in self.events]


def test_a_watch_holds_the_log_across_a_sigkill_and_restart(server: Server) -> None:
    with HopperClient(server.target) as client:
        hierarchy(client)
    live_watch = HopperClient(server.target).watch(
        "global", descendants=True, progress_interval=0.3
    )
    live_watch.start()  # "from now" is now, before the writers start
    live = Collector(live_watch)
    history = Collector(
        HopperClient(server.target).watch(
            "global", descendants=True, after=0, progress_interval=0.3
        )
    )
    writers = Writers(server.target).start()
    time.sleep(1.0)
    server.kill()
    time.sleep(0.5)
    server.start()
    time.sleep(1.0)
    assert writers.join() > 0
    log = logged(server.target)
    # Events from the first message on: the live watch started with the writers, after the
    # hierarchy (which has no events).
    for collector in (live, history):
        collector.wait_for(log[-1][0])
        assert collector.seen() == log, "the watch must hold exactly the log"
        assert collector.watch.reconnects >= 1
        assert collector.watch.cursor == log[-1][0]


def test_a_watch_moves_to_another_replica_when_its_own_dies(
    make_server: MakeServer, postgres: Database
) -> None:
    first = make_server(postgres).start()
    second = make_server(postgres).start()
    replicas = f"http://127.0.0.1:{first.port},127.0.0.1:{second.port}"
    with HopperClient(second.target) as client:
        hierarchy(client)
    # pick_first: the watches read from the first replica while it lives.
    watches = [
        Collector(
            HopperClient(replicas).watch("global", descendants=True, after=0, progress_interval=0.3)
        )
        for _ in range(3)
    ]
    writers = Writers(second.target, count=3).start()
    time.sleep(1.0)
    first.kill()
    time.sleep(1.5)
    assert writers.join() > 0
    log = logged(second.target)
    for watch in watches:
        watch.wait_for(log[-1][0])
        assert watch.seen() == log
        assert watch.watch.reconnects >= 1


def test_a_hung_server_is_a_fault_the_watch_resumes_from(server: Server) -> None:
    with HopperClient(server.target) as client:
        hierarchy(client)
        client.create_task(id="before", title="before", instance_id="global")
        client.create_delegation(
            task_id="before", source_instance_id="global", target_instance_id="project"
        )
        watch = Collector(client.watch("global", descendants=True, after=0, progress_interval=0.3))
        time.sleep(0.5)
        server.pause()  # the connection stays open; nothing comes back
        time.sleep(2.0)
        server.resume()
        client.create_task(id="after", title="after", instance_id="global")
        hop = client.create_delegation(
            task_id="after", source_instance_id="global", target_instance_id="project"
        )
        watch.wait_for(2)
        assert [e.delegation.id for e in watch.events if e.delegation][1:] == [hop.id]
        assert [e.sequence for e in watch.events] == [1, 2]
        assert watch.watch.reconnects >= 1


def test_an_expired_cursor_says_where_history_begins(
    make_server: MakeServer, database: Database
) -> None:
    server = make_server(database, ["--event-retention", "0s", "--prune-interval", "50ms"]).start()
    with HopperClient(server.target) as client:
        hierarchy(client)
        client.create_task(id="t", title="t", instance_id="global")
        hop = client.create_delegation(
            task_id="t", source_instance_id="global", target_instance_id="project"
        )
        client.accept_delegation(id=hop.id)
        deadline = time.monotonic() + 30
        while True:
            try:
                next(client.watch("global", descendants=True, after=0))
            except CursorExpired as expired:
                if expired.resume_after < 2:
                    continue  # pruned only in part yet
                assert (expired.resume_after, expired.oldest_available) == (2, 3)
                assert "resume after sequence 2" in expired.message
                break
            assert time.monotonic() < deadline, "the log was never pruned"
            time.sleep(0.05)
        # Resuming from where history begins is accepted; a cursor ahead of the log is not.
        watch = client.watch("global", descendants=True, after=2, progress_interval=0.3)
        assert watch.start() == 2  # live before the pruner can take what comes next
        client.create_task(id="u", title="u", instance_id="global")
        later = client.create_delegation(
            task_id="u", source_instance_id="global", target_instance_id="project"
        )
        assert next(watch).delegation == later
        watch.close()
        with pytest.raises(OutOfRange) as ahead:
            next(client.watch("global", after=10**9))
        assert not isinstance(ahead.value, CursorExpired)
        with pytest.raises(NotFound):
            next(client.watch("nowhere"))


async def test_an_async_watch_holds_the_log_across_a_sigkill_and_restart(server: Server) -> None:
    with HopperClient(server.target) as client:
        hierarchy(client)
    writers = Writers(server.target).start()
    async with AsyncHopperClient(server.target) as aclient:
        watch = aclient.watch("global", descendants=True, after=0, progress_interval=0.3)
        seen: list[tuple[int, int, str]] = []

        async def read() -> None:
            async for e in watch:
                seen.append((e.sequence, e.kind, e.delegation.id if e.delegation else ""))

        reader = asyncio.create_task(read())
        await asyncio.sleep(1.0)
        server.kill()
        await asyncio.sleep(0.5)
        server.start()
        await asyncio.sleep(1.0)
        assert await asyncio.to_thread(writers.join) > 0
        log = await asyncio.to_thread(logged, server.target)
        async with asyncio.timeout(60):
            while not seen or seen[-1][0] < log[-1][0]:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await watch.aclose()
        await reader
        assert seen == log
        assert watch.reconnects >= 1


def test_start_returns_once_the_stream_is_caught_up(server: Server) -> None:
    with HopperClient(server.target) as client:
        hierarchy(client)
        client.create_task(id="t", title="t", instance_id="global")
        hop = client.create_delegation(
            task_id="t", source_instance_id="global", target_instance_id="project"
        )
        client.accept_delegation(id=hop.id)
        replaying = client.watch("global", descendants=True, after=0)
        assert replaying.start() == 2
        live = client.watch("global", descendants=True)
        assert live.start() == 2
        done = client.complete_delegation(id=hop.id)
        assert [e.sequence for e in (next(replaying), next(replaying), next(replaying))] == [
            1,
            2,
            3,
        ]
        assert next(live).delegation == done.delegation
        replaying.close()
        live.close()


async def test_an_async_start_returns_once_the_stream_is_caught_up(server: Server) -> None:
    with HopperClient(server.target) as client:
        hierarchy(client)
        client.create_task(id="t", title="t", instance_id="global")
        hop = client.create_delegation(
            task_id="t", source_instance_id="global", target_instance_id="project"
        )
    async with AsyncHopperClient(server.target) as aclient:
        watch = aclient.watch("global", descendants=True, after=0)
        assert await watch.start() == 1
        await aclient.accept_delegation(id=hop.id)
        assert [(await anext(watch)).sequence for _ in range(2)] == [1, 2]
        await watch.aclose()


def test_the_cursor_never_runs_ahead_of_what_was_delivered(server: Server) -> None:
    with HopperClient(server.target) as client:
        hierarchy(client)
        for task in ("a", "b", "c"):
            client.create_task(id=task, title=task, instance_id="global")
            client.create_delegation(
                task_id=task, source_instance_id="global", target_instance_id="project"
            )
        watch = client.watch("global", descendants=True, after=0)
        assert watch.start() == 3  # the three events are read ahead
        assert watch.cursor == 0, "nothing is delivered yet"
        assert next(watch).sequence == 1
        assert watch.cursor == 1
        # Resuming from the persisted cursor delivers what this watch has not.
        resumed = client.watch("global", descendants=True, after=watch.cursor)
        assert [next(resumed).sequence for _ in range(2)] == [2, 3]
        resumed.close()
        watch.close()


async def test_a_timeout_around_a_read_leaves_the_async_watch_usable(server: Server) -> None:
    with HopperClient(server.target) as client:
        hierarchy(client)
    async with AsyncHopperClient(server.target) as aclient:
        watch = aclient.watch("global", descendants=True, progress_interval=0.3)
        await watch.start()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(watch), 0.1)  # nothing happens: the caller gives up
        await aclient.create_task(id="t", title="t", instance_id="global")
        hop = await aclient.create_delegation(
            task_id="t", source_instance_id="global", target_instance_id="project"
        )
        event = await asyncio.wait_for(anext(watch), 10)
        assert event.delegation is not None and event.delegation.id == hop.id
        await watch.aclose()
