"""How a client reaches the server: target, credentials, keepalive and the service config.

``http://host:port`` is plaintext, ``https://host:port`` TLS; several ``host:port``s joined by
commas (``http://10.0.0.1:50051,10.0.0.2:50051``) are replicas, picked first-available, and a
target in gRPC's own syntax (``dns:///svc:50051``, ``unix:/run/hopper.sock``, ``ipv4:…``)
passes through (TLS if certificates are given). The token is sent as call metadata on every
call, plaintext as well as TLS: grpcio's call credentials would drop it on plaintext silently.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import grpc

DEFAULT_TARGET = "http://127.0.0.1:50051"

PathOrBytes = str | os.PathLike[str] | bytes


def shipped_service_config() -> dict[str, Any]:
    """The service config shipped with the package (proto/…/service_config.json)."""
    text = resources.files("hopper_delegation").joinpath("service_config.json").read_text()
    config: dict[str, Any] = json.loads(text)
    return config


def _read(value: PathOrBytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Connection:
    """Everything needed to open a channel, resolved from the client's arguments."""

    target: str
    secure: bool
    metadata: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, Any], ...]
    credentials: grpc.ChannelCredentials | None

    @classmethod
    def resolve(
        cls,
        target: str | None,
        token: str | None,
        ca_cert: PathOrBytes | None,
        cert: PathOrBytes | None,
        key: PathOrBytes | None,
        keepalive: float | None,
        service_config: dict[str, Any] | str | None,
    ) -> Connection:
        target = target or os.environ.get("HOPPER_SERVER") or DEFAULT_TARGET
        token = token if token is not None else os.environ.get("HOPPER_TOKEN")
        if (cert is None) != (key is None):
            raise ValueError("cert and key go together (mTLS needs both)")
        grpc_target, secure = _parse_target(
            target, tls_given=ca_cert is not None or cert is not None
        )
        credentials = None
        if secure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca_cert),
                private_key=_read(key),
                certificate_chain=_read(cert),
            )
        config = shipped_service_config() if service_config is None else service_config
        options: list[tuple[str, Any]] = [
            ("grpc.service_config", config if isinstance(config, str) else json.dumps(config)),
            ("grpc.enable_retries", 1),
            # The server's limit; a result may be up to 1 MiB as JSON.
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            # grpcio's reconnect backoff grows to 120 s: a server back after a restart would
            # wait that long for its clients, and a lease lapse meanwhile. Retry within 1 s.
            # (Not grpc.min_reconnect_backoff_ms: it is also the connect timeout, and 100 ms
            # fails connections to a busy server.)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if "," in grpc_target:
            # gRPC would send the whole list as :authority, which HTTP/2 servers refuse.
            first = grpc_target.split(":", 1)[1].split(",")[0]
            options += [("grpc.lb_policy_name", "pick_first"), ("grpc.default_authority", first)]
        if keepalive:
            options += [
                ("grpc.keepalive_time_ms", int(keepalive * 1000)),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return cls(grpc_target, secure, metadata, tuple(options), credentials)

    def sync_channel(self) -> grpc.Channel:
        if self.credentials is not None:
            return grpc.secure_channel(self.target, self.credentials, options=self.options)
        return grpc.insecure_channel(self.target, options=self.options)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.credentials is not None:
            return grpc.aio.secure_channel(self.target, self.credentials, options=self.options)
        return grpc.aio.insecure_channel(self.target, options=self.options)


def _parse_target(target: str, *, tls_given: bool) -> tuple[str, bool]:
    """gRPC's target string for ``target``, and whether to use TLS."""
    for scheme, secure in (("http://", False), ("https://", True)):
        if target.startswith(scheme):
            hosts = [h for h in target[len(scheme) :].rstrip("/").split(",") if h]
            if not hosts:
                raise ValueError(f"no host in target {target!r}")
            if len(hosts) == 1:
                return hosts[0], secure
            names = [h.rsplit(":", 1)[0] for h in hosts]
            if not all(_is_ip(n) for n in names):
                raise ValueError(
                    f"several replicas in {target!r} must be IP addresses; "
                    "for names use a DNS target such as dns:///hopper:50051"
                )
            family = "ipv6" if all(":" in n for n in names) else "ipv4"
            return f"{family}:{','.join(hosts)}", secure
    return target, tls_given
