"""An Orchestration worker: registers itself with a lease and keeps it, watches for the hops
sent to it, accepts each, does the work, and completes it (the completion bubbles up).

    python clients/python/examples/worker.py --id web-ci --parent web [--tasks N]

It picks up hops that were pending before it started, and after a lapse of its lease re-reads
them (a renewal revives no expired hop, but new ones may have come meanwhile).
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

from hopper_delegation import (
    AlreadyExists,
    Delegation,
    EventKind,
    FailedPrecondition,
    HopperClient,
    InstanceStatus,
    LeaseKeeper,
    Scope,
)

LEASE = 10.0  # seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--id", required=True, help="this worker's instance id")
    parser.add_argument("--parent", required=True, help="the Project instance above it")
    parser.add_argument("--tasks", type=int, default=0, help="exit after N tasks (0: never)")
    args = parser.parse_args()

    with HopperClient() as client:  # HOPPER_SERVER, HOPPER_TOKEN
        # A restart of this worker: the same instance, the same lease.
        with contextlib.suppress(AlreadyExists):
            client.register_instance(
                id=args.id, name=f"worker {args.id}", scope=Scope.ORCHESTRATION,
                parent_id=args.parent, status=InstanceStatus.RUNNING, lease=LEASE,
            )  # fmt: skip
        lapsed = threading.Event()
        done = 0
        with LeaseKeeper(client, args.id, LEASE, on_lapse=lapsed.set):
            watch = client.watch(args.id, kinds=[EventKind.DELEGATION_CREATED])
            watch.start()  # caught up: what the listing misses, the watch brings
            backlog = list(client.list_pending_delegations(instance_id=args.id))
            print(f"worker {args.id}: ready, {len(backlog)} hop(s) waiting", flush=True)
            while not args.tasks or done < args.tasks:
                if lapsed.is_set():
                    lapsed.clear()
                    backlog += client.list_pending_delegations(instance_id=args.id)
                if not backlog:
                    event = next(watch)
                    if event.delegation and event.delegation.target_instance_id == args.id:
                        backlog.append(event.delegation)
                    continue
                if work_on(client, backlog.pop(0)):
                    done += 1
            watch.close()


def work_on(client: HopperClient, hop: Delegation) -> bool:
    """Accepts the hop, works, completes it; False if another worker took it first."""
    try:
        client.accept_delegation(id=hop.id)
    except FailedPrecondition:
        return False  # rejected, cancelled or expired meanwhile
    print(f"working on {hop.task_id} ({hop.id})", flush=True)
    started = time.monotonic()
    time.sleep(0.1)  # the work
    done = client.complete_delegation(
        id=hop.id, result={"worker": hop.target_instance_id, "seconds": time.monotonic() - started}
    )
    bubbled = len(done.completed_ancestors)
    print(f"completed {hop.task_id}; bubbled up {bubbled} hop(s); task {done.task.status.name}")
    return True


if __name__ == "__main__":
    main()
