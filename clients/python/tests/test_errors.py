"""Every exception a real refusal or fault produces, with its code, message and ``retryable``
(PERMISSION_DENIED and UNAUTHENTICATED are in test_security.py, OUT_OF_RANGE in
test_watch.py). INTERNAL is a server bug and CANCELLED the caller's own doing: neither is
provoked here."""

from __future__ import annotations

import subprocess
import threading
import time

import grpc
import pytest
from conftest import ADMIN_URL, Database, MakeServer, Server, free_port
from load import hierarchy

from hopper_delegation import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    HopperClient,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Scope,
    Unavailable,
)


def test_refusals_name_what_is_wrong(server: Server) -> None:
    with HopperClient(server.target) as client:
        hierarchy(client)
        with pytest.raises(NotFound) as missing:
            client.get_task(id="nope")
        assert missing.value.message == "task nope not found"
        assert missing.value.code == grpc.StatusCode.NOT_FOUND and not missing.value.retryable

        with pytest.raises(InvalidArgument) as invalid:
            client.create_task(title="", instance_id="global")
        assert invalid.value.field == "title"
        assert str(invalid.value) == "INVALID_ARGUMENT: title: is required"

        with pytest.raises(AlreadyExists, match="instance global already exists"):
            client.register_instance(id="global", name="again", scope=Scope.GLOBAL)

        client.create_task(id="t", title="t", instance_id="global")
        hop = client.create_delegation(
            task_id="t", source_instance_id="global", target_instance_id="project"
        )
        client.accept_delegation(id=hop.id)
        with pytest.raises(FailedPrecondition, match="accepted") as state:
            client.accept_delegation(id=hop.id)
        assert not state.value.retryable

        # The server takes a result of up to 1 MiB as JSON.
        with pytest.raises(ResourceExhausted) as big:
            client.complete_delegation(id=hop.id, result={"log": "x" * (5 << 20)})
        assert not big.value.retryable
        assert client.get_delegation(id=hop.id).completed_at is None


def test_a_server_that_is_down_is_unavailable_or_past_the_deadline() -> None:
    target = f"http://127.0.0.1:{free_port()}"
    with HopperClient(target, retry_attempts=1) as client:
        # A create fails at once, to be retried with its request id...
        with pytest.raises(Unavailable) as down:
            client.create_task(title="t", instance_id="global")
        assert down.value.retryable
    with HopperClient(target, timeout=0.5) as client:
        # ...a read waits for the server (the service config's waitForReady) up to its deadline.
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as late:
            client.get_task(id="t")
        assert late.value.retryable and time.monotonic() - started >= 0.4


class TableLock:
    """A psql session holding an exclusive lock on a table of a database."""

    def __init__(self, database: Database, table: str) -> None:
        url = ADMIN_URL.rsplit("/", 1)[0] + f"/{database.name}"
        self.psql = subprocess.Popen(
            ["psql", "-qAt", "-v", "ON_ERROR_STOP=1", url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.psql.stdin is not None and self.psql.stdout is not None
        self.psql.stdin.write(
            f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; SELECT 'locked';\n"
        )
        self.psql.stdin.flush()
        assert self.psql.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.psql.stdin is not None
        self.psql.stdin.write("COMMIT;\n\\q\n")
        self.psql.stdin.flush()
        self.psql.wait(timeout=10)


def test_a_write_the_database_aborts_is_aborted_and_retried(
    make_server: MakeServer, postgres: Database
) -> None:
    # The server's sessions give up on a lock after 200 ms (SQLSTATE 55P03: ABORTED).
    subprocess.run(
        [
            "psql",
            "-q",
            ADMIN_URL,
            "-c",
            f"ALTER DATABASE {postgres.name} SET lock_timeout = '200ms'",
        ],
        check=True,
    )
    server = make_server(postgres).start()
    with HopperClient(server.target) as client:
        hierarchy(client)
    lock = TableLock(postgres, "tasks")
    try:
        with (
            HopperClient(server.target, retry_attempts=1) as client,
            pytest.raises(Aborted) as aborted,
        ):
            client.create_task(title="t", instance_id="global")
        assert aborted.value.retryable
        # The client retries an aborted create itself, with its request id: it lands once.
        created: list[object] = []
        with HopperClient(server.target, retry_attempts=50) as client:
            writer = threading.Thread(
                target=lambda: created.append(
                    client.create_task(id="once", title="t", instance_id="global")
                )
            )
            writer.start()
            time.sleep(1.0)
            lock.release()
            writer.join(timeout=30)
            assert len(created) == 1
            assert client.get_task(id="once").title == "t"
    finally:
        if lock.psql.poll() is None:
            lock.release()
