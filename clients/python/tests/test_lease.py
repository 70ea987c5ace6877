"""The lease keeper keeps an instance responsive for as long as it runs, through a server
restart, and once stopped lets the instance's hops expire, as the source's watch sees."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from conftest import Server

from hopper_delegation import (
    AsyncHopperClient,
    DelegationStatus,
    EventKind,
    ExpiryReason,
    FailedPrecondition,
    HopperClient,
    LeaseKeeper,
    NotFound,
    Scope,
)

LEASE = timedelta(seconds=1)


def leased_worker(client: HopperClient, lease: timedelta = LEASE) -> str:
    """Global -> Project -> a leased Orchestration worker, and a hop pending at it: its id."""
    client.register_instance(id="global", name="Global", scope=Scope.GLOBAL)
    client.register_instance(id="project", name="Project", scope=Scope.PROJECT, parent_id="global")
    client.register_instance(
        id="worker", name="Worker", scope=Scope.ORCHESTRATION, parent_id="project", lease=lease
    )
    client.create_task(id="t", title="t", instance_id="project")
    hop = client.create_delegation(
        task_id="t", source_instance_id="project", target_instance_id="worker"
    )
    return hop.id


def test_a_kept_lease_keeps_the_worker_responsive_and_a_stopped_one_lets_it_lapse(
    server: Server,
) -> None:
    with HopperClient(server.target) as client:
        hop = leased_worker(client)
        renewed: list[datetime] = []
        with LeaseKeeper(client, "worker", LEASE, on_renewed=renewed.append) as keeper:
            time.sleep(5 * LEASE.total_seconds())
            assert client.get_delegation(id=hop).status is DelegationStatus.PENDING
            live_until = keeper.live_until
            assert live_until is not None and live_until > datetime.now(UTC)
        assert keeper.renewals >= 10 and len(renewed) == keeper.renewals
        assert renewed == sorted(renewed)
        watch = client.watch("project", after=0, kinds=[EventKind.DELEGATION_EXPIRED])
        expired = next(watch)
        watch.close()
        assert expired.delegation is not None and expired.delegation.id == hop
        assert expired.delegation.expiry_reason is ExpiryReason.TARGET_UNRESPONSIVE
        assert client.get_delegation(id=hop).status is DelegationStatus.EXPIRED


def test_a_kept_lease_rides_through_a_restart_on_the_restart_brake(server: Server) -> None:
    lease = timedelta(seconds=2)
    with HopperClient(server.target, timeout=1) as client:
        hop = leased_worker(client, lease)
        lapses: list[bool] = []
        with LeaseKeeper(client, "worker", lease, on_lapse=lambda: lapses.append(True)) as keeper:
            time.sleep(1)
            server.kill()
            time.sleep(3.5)  # past the lease, and past the brake's gap of 3 s
            server.start()
            before = keeper.renewals
            time.sleep(3 * lease.total_seconds())
            assert keeper.renewals > before
            assert lapses == [True], "the lapse seen here is reported once"
            # The brake gave the lease a new period before anything expired.
            assert client.get_delegation(id=hop).status is DelegationStatus.PENDING


def test_a_keeper_stops_on_a_refusal(server: Server) -> None:
    with HopperClient(server.target) as client:
        client.register_instance(id="global", name="Global", scope=Scope.GLOBAL)
        keeper = LeaseKeeper(client, "nobody", LEASE).start()
        time.sleep(0.5)
        with pytest.raises(NotFound):
            keeper.stop()
        with (
            pytest.raises(FailedPrecondition, match="no lease"),
            LeaseKeeper(client, "global", LEASE),
        ):
            time.sleep(0.5)


async def test_an_async_keeper_keeps_the_lease(server: Server) -> None:
    with HopperClient(server.target) as client:
        hop = leased_worker(client)
    renewed: list[datetime] = []

    async def on_renewed(live_until: datetime) -> None:
        renewed.append(live_until)

    async with AsyncHopperClient(server.target) as aclient:
        async with LeaseKeeper(aclient, "worker", LEASE, on_renewed=on_renewed) as keeper:
            await asyncio.sleep(4 * LEASE.total_seconds())
            assert (await aclient.get_delegation(id=hop)).status is DelegationStatus.PENDING
        assert keeper.renewals >= 8 and len(renewed) == keeper.renewals
        with pytest.raises(TypeError):
            LeaseKeeper(aclient, "worker", LEASE).start()


def test_a_callback_that_raises_does_not_stop_the_keeper(server: Server) -> None:
    with HopperClient(server.target) as client:
        hop = leased_worker(client)

        def broken(live_until: datetime) -> None:
            raise RuntimeError("the instance's own bug")

        with LeaseKeeper(client, "worker", LEASE, on_renewed=broken) as keeper:
            time.sleep(3 * LEASE.total_seconds())
        assert keeper.renewals >= 6 and keeper.error is None
        assert client.get_delegation(id=hop).status is DelegationStatus.PENDING
        with pytest.raises(RuntimeError, match="started already"):
            keeper.start()
