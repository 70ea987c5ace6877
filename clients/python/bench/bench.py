"""What the client costs over the raw generated stubs, measured in one run, sides alternated.

    python clients/python/bench/bench.py [--server-bin target/release/hopper-delegation]
        [--database-url URL] [--rounds 4] [--seconds 3] [--events 20000]

1. Lifecycles per second, one caller: CreateTask, two routed hops each accepted, and a
   completion that bubbles to Global (6 RPCs), through ``HopperClient`` against the same
   requests (request ids and all) on ``*_pb2_grpc`` stubs over one channel.
2. Events per second one reader takes from a replay of ``--events`` events: ``watch()``
   (records, cursor, silence watchdog) against a raw loop over the stub's stream.

It starts its own server on a free port over a fresh database (SQLite in a temp dir unless
``--database-url``), prints each round and the ratios of the medians.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc

from hopper_delegation import HopperClient, Scope
from hopper_delegation._proto import (
    delegation_service_pb2 as dpb,
)
from hopper_delegation._proto import (
    delegation_service_pb2_grpc,
    resources_pb2,
    task_service_pb2_grpc,
)
from hopper_delegation._proto import (
    task_service_pb2 as tpb,
)

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def lifecycle_client(client: HopperClient) -> None:
    task = client.create_task(title="bench", instance_id="global")
    down = client.create_delegation(
        task_id=task.id, source_instance_id="global", target_instance_id="project"
    )
    client.accept_delegation(id=down.id)
    leaf = client.create_delegation(
        task_id=task.id, source_instance_id="project", target_instance_id="orch"
    )
    client.accept_delegation(id=leaf.id)
    client.complete_delegation(id=leaf.id, result={"ok": True, "n": 1})


def lifecycle_raw(
    tasks: task_service_pb2_grpc.TaskServiceStub,
    delegations: delegation_service_pb2_grpc.DelegationServiceStub,
) -> None:
    from google.protobuf import struct_pb2

    def rid() -> str:
        return uuid.uuid4().hex

    task = tasks.CreateTask(
        tpb.CreateTaskRequest(title="bench", instance_id="global", request_id=rid()), timeout=30
    ).task
    down = delegations.CreateDelegation(
        dpb.CreateDelegationRequest(
            task_id=task.id, source_instance_id="global", target_instance_id="project",
            delegation_type=resources_pb2.DELEGATION_TYPE_ROUTE, request_id=rid(),
        ), timeout=30,
    ).delegation  # fmt: skip
    delegations.AcceptDelegation(dpb.AcceptDelegationRequest(id=down.id), timeout=30)
    leaf = delegations.CreateDelegation(
        dpb.CreateDelegationRequest(
            task_id=task.id, source_instance_id="project", target_instance_id="orch",
            delegation_type=resources_pb2.DELEGATION_TYPE_ROUTE, request_id=rid(),
        ), timeout=30,
    ).delegation  # fmt: skip
    delegations.AcceptDelegation(dpb.AcceptDelegationRequest(id=leaf.id), timeout=30)
    result = struct_pb2.Struct()
    result.update({"ok": True, "n": 1})
    delegations.CompleteDelegation(
        dpb.CompleteDelegationRequest(id=leaf.id, result=result), timeout=30
    )


def rate(run: Callable[[], None], seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        done += 1
    return done / (time.perf_counter() - started)


def replay_watch(client: HopperClient, last: int) -> float:
    started = time.perf_counter()
    watch = client.watch("global", descendants=True, after=0)
    n = 0
    for event in watch:
        n += 1
        if event.sequence >= last:
            break
    watch.close()
    return n / (time.perf_counter() - started)


def replay_raw(stub: delegation_service_pb2_grpc.DelegationServiceStub, last: int) -> float:
    started = time.perf_counter()
    request = dpb.WatchEventsRequest(
        instance_id="global", include_descendants=True, after_sequence=0
    )
    call = stub.WatchEvents(request)
    n = 0
    for response in call:
        if response.HasField("event"):
            n += 1
            if response.event.sequence >= last:
                break
    call.cancel()
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--server-bin", type=Path, default=REPO / "target/release/hopper-delegation"
    )
    parser.add_argument("--database-url")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="hopper-pybench-"))
    url = args.database_url or f"sqlite://{scratch / 'bench.db'}"
    port = free_port()
    server = subprocess.Popen(
        [str(args.server_bin), "serve", "--listen", f"127.0.0.1:{port}", "--database-url", url],
        cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        client = HopperClient(f"http://{target}")
        client.register_instance(id="global", name="Global", scope=Scope.GLOBAL)
        client.register_instance(id="project", name="P", scope=Scope.PROJECT, parent_id="global")
        client.register_instance(
            id="orch", name="O", scope=Scope.ORCHESTRATION, parent_id="project"
        )
        channel = grpc.insecure_channel(target)
        tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        delegations = delegation_service_pb2_grpc.DelegationServiceStub(channel)
        for _ in range(20):  # warm both
            lifecycle_client(client)
            lifecycle_raw(tasks, delegations)

        print(
            f"lifecycles/s, 1 caller, {args.seconds:g} s per side and round ({url.split(':')[0]})"
        )
        ours, raw = [], []
        for n in range(args.rounds):
            ours.append(rate(lambda: lifecycle_client(client), args.seconds))
            raw.append(rate(lambda: lifecycle_raw(tasks, delegations), args.seconds))
            print(f"  round {n + 1}: HopperClient {ours[-1]:7.1f}   raw stubs {raw[-1]:7.1f}")
        lifecycle_ratio = statistics.median(ours) / statistics.median(raw)

        # The log now holds 6 events per lifecycle; top it up to --events.
        head = client.watch("global", descendants=True)
        last = head.start() or 0
        head.close()
        while last < args.events:
            lifecycle_raw(tasks, delegations)
            last += 6
        head = client.watch("global", descendants=True)
        last = head.start() or 0
        head.close()
        print(f"events/s, one reader, a replay of {last} events")
        ours_e, raw_e = [], []
        for n in range(args.rounds):
            ours_e.append(replay_watch(client, last))
            raw_e.append(replay_raw(delegations, last))
            print(f"  round {n + 1}: watch() {ours_e[-1]:9.0f}   raw stub {raw_e[-1]:9.0f}")
        events_ratio = statistics.median(ours_e) / statistics.median(raw_e)
        print(f"lifecycles: HopperClient / raw = {lifecycle_ratio:.2f}")
        print(f"events:     watch() / raw      = {events_ratio:.2f}")
        client.close()
        channel.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
