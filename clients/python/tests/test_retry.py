"""A create whose connection is cut after the server took it, before the answer came back, is
retried by the client with the same request id, and makes one record."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from conftest import Server
from load import hierarchy

from hopper_delegation import HopperClient


class Proxy:
    """A TCP proxy to the server that can swallow the server's answers and then cut the
    client's connection: the request arrives, its response never does."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.swallowing = threading.Event()
        self.requests_seen = threading.Event()
        self.connections: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.connections.append((client, server))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if not answers and self.swallowing.is_set():
                    self.requests_seen.set()
                if answers and self.swallowing.is_set():
                    continue  # the answer is lost
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Closes every connection and lets new ones through."""
        for client, server in self.connections:
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        self.connections.clear()
        self.swallowing.clear()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_a_create_retried_after_a_cut_connection_makes_one_record(server: Server) -> None:
    proxy = Proxy(server.port)
    try:
        with HopperClient(server.target) as direct:
            hierarchy(direct)
            direct.create_task(id="t", title="t", instance_id="global")
            with HopperClient(f"http://127.0.0.1:{proxy.port}", keepalive=None) as client:
                client.get_task(id="t")  # connected through the proxy
                proxy.swallowing.set()
                made: list[object] = []
                creator = threading.Thread(
                    target=lambda: made.append(
                        client.create_delegation(
                            task_id="t", source_instance_id="global", target_instance_id="project"
                        )
                    )
                )
                creator.start()
                assert proxy.requests_seen.wait(10)
                # The server commits the hop; its answer is swallowed; then the line is cut.
                deadline = time.monotonic() + 10
                while not list(direct.list_task_delegations(task_id="t")):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                proxy.cut()
                creator.join(timeout=30)
            hops = list(direct.list_task_delegations(task_id="t"))
            assert len(made) == 1, "the retried create returned"
            assert [h.id for h in hops] == [made[0].id]  # type: ignore[attr-defined]
    finally:
        proxy.close()
