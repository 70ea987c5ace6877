"""Credentials reach the server: a token on plaintext (where grpcio's call credentials would
be dropped without a word) and on TLS, and a client certificate (mTLS); a missing or
insufficient credential is UNAUTHENTICATED or PERMISSION_DENIED."""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from pathlib import Path

import pytest
from conftest import Database, MakeServer

from hopper_delegation import HopperClient, PermissionDenied, Scope, Unauthenticated

ADMIN = secrets.token_hex(16)
WEB = secrets.token_hex(16)


def tokens_file(directory: Path) -> Path:
    def digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    path = directory / "tokens.toml"
    path.write_text(f'admin = ["{digest(ADMIN)}"]\n\n[instances]\nweb = ["{digest(WEB)}"]\n')
    return path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def certificates(d: Path) -> None:
    """ca.crt; server.crt for localhost; web.crt, a client certificate whose CN is "web"."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "1", "-subj", "/CN=Test CA", "-keyout", "ca.key",
            "-out", "ca.crt", cwd=d)  # fmt: skip
    for name, subject, ext in (
        ("server", "/CN=localhost", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("web", "/CN=web", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(ext)
        openssl("req", "-new", *ec, "-subj", subject, "-keyout", f"{name}.key", "-out",
                f"{name}.csr", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out",
                f"{name}.crt", cwd=d)  # fmt: skip


def test_a_token_is_sent_on_plaintext(
    make_server: MakeServer, database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_server(database, ["--auth-tokens", str(tokens_file(tmp_path))]).start()
    with HopperClient(server.target) as anonymous, pytest.raises(Unauthenticated):
        anonymous.register_instance(id="global", name="Global", scope=Scope.GLOBAL)
    with HopperClient(server.target, token=ADMIN) as admin:
        admin.register_instance(id="global", name="Global", scope=Scope.GLOBAL)
        admin.register_instance(id="web", name="Web", scope=Scope.PROJECT, parent_id="global")
    monkeypatch.setenv("HOPPER_TOKEN", WEB)  # the default token
    monkeypatch.setenv("HOPPER_SERVER", server.target)  # and the default target
    with HopperClient() as web:
        assert web.create_task(title="Build", instance_id="web").instance_id == "web"
        with pytest.raises(PermissionDenied):
            web.register_instance(id="root2", name="Root", scope=Scope.GLOBAL)


def test_tls_with_a_token_and_mtls_with_a_certificate(
    make_server: MakeServer, database: Database, tmp_path: Path
) -> None:
    certificates(tmp_path)
    args = [
        *("--auth-tokens", str(tokens_file(tmp_path))),
        *("--tls-cert", str(tmp_path / "server.crt"), "--tls-key", str(tmp_path / "server.key")),
        *("--tls-client-ca", str(tmp_path / "ca.crt")),
    ]
    server = make_server(database, args)
    server.tls_ca = tmp_path / "ca.crt"
    server.start()
    ca = tmp_path / "ca.crt"
    with HopperClient(server.target, ca_cert=ca, token=ADMIN) as admin:
        admin.register_instance(id="global", name="Global", scope=Scope.GLOBAL)
        admin.register_instance(id="web", name="Web", scope=Scope.PROJECT, parent_id="global")
    with HopperClient(
        server.target, ca_cert=ca.read_bytes(), cert=tmp_path / "web.crt", key=tmp_path / "web.key"
    ) as web:
        assert web.create_task(title="Build", instance_id="web").instance_id == "web"
        with pytest.raises(PermissionDenied):
            web.register_instance(id="root2", name="Root", scope=Scope.GLOBAL)
    with HopperClient(server.target, ca_cert=ca) as anonymous, pytest.raises(Unauthenticated):
        anonymous.create_task(title="Build", instance_id="web")
    with pytest.raises(ValueError, match="cert and key"):
        HopperClient(server.target, cert=tmp_path / "web.crt")
