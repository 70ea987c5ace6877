"""Load for the fault tests: writers that keep delegating through faults, and the log as the
server holds it (read by a raw stub, to check the client's watch against)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from hopper_delegation import FailedPrecondition, HopperClient, HopperError, Scope
from hopper_delegation._proto import delegation_service_pb2, delegation_service_pb2_grpc


def hierarchy(client: HopperClient) -> None:
    client.register_instance(id="global", name="Global", scope=Scope.GLOBAL)
    client.register_instance(id="project", name="Project", scope=Scope.PROJECT, parent_id="global")


@dataclass
class Writers:
    """``count`` threads, each creating tasks at Global and routing them to Project and
    accepting, until stopped; every write retried through faults (creates by their request
    id; an accept that landed before the fault is FAILED_PRECONDITION on its retry)."""

    target: str
    count: int = 2
    stop: threading.Event = field(default_factory=threading.Event)
    written: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Writers:
        for n in range(self.count):
            t = threading.Thread(target=self._run, args=(n,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _run(self, n: int) -> None:
        done = 0
        try:
            with HopperClient(self.target, retry_attempts=30, timeout=5) as client:
                while not self.stop.is_set():
                    task = client.create_task(title=f"w{n}-{done}", instance_id="global")
                    hop = client.create_delegation(
                        task_id=task.id, source_instance_id="global", target_instance_id="project"
                    )
                    _until_done(functools.partial(client.accept_delegation, id=hop.id))
                    done += 1
        except BaseException as error:  # reported by join()
            self.errors.append(error)
        finally:
            self.written.append(done)

    def join(self) -> int:
        """Stops the writers; the number of hops they made."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        assert not self.errors, self.errors
        return sum(self.written)


def _until_done(write: Callable[[], object]) -> None:
    for _ in range(100):
        try:
            write()
            return
        except FailedPrecondition:
            return  # it landed before the fault
        except HopperError as error:
            if not error.retryable:
                raise
            threading.Event().wait(0.1)
    raise TimeoutError("a write kept failing")


def logged(target: str, instance_id: str = "global") -> list[tuple[int, int, str]]:
    """The log as the server replays it from the start: (sequence, kind, delegation id) of
    every event of ``instance_id``'s subtree, read with a raw stub up to the first progress
    mark, which follows the replay."""
    address = target.removeprefix("http://").split(",")[0]
    with grpc.insecure_channel(address) as channel:
        stub = delegation_service_pb2_grpc.DelegationServiceStub(channel)
        request = delegation_service_pb2.WatchEventsRequest(
            instance_id=instance_id, include_descendants=True, after_sequence=0
        )
        out: list[tuple[int, int, str]] = []
        call = stub.WatchEvents(request, timeout=60)
        for response in call:
            if response.HasField("progress"):
                call.cancel()
                break
            e = response.event
            out.append((e.sequence, int(e.kind), e.delegation.id))
        return out
