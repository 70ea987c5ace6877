#!/usr/bin/env python3
"""Generate the protobuf/gRPC modules of the ``hopper_delegation`` Python client.

Reads every ``proto/hopper/delegation/v1/*.proto`` of this repository and writes, flat, into
``clients/python/src/hopper_delegation/_proto/``:

    <name>_pb2.py / <name>_pb2.pyi            messages     (protoc --python_out, --mypy_out)
    <name>_pb2_grpc.py / <name>_pb2_grpc.pyi  stubs, servicers (--grpc_python_out, --mypy_grpc_out)

so that they import as ``hopper_delegation._proto.<name>_pb2`` (and ``..._pb2_grpc``). Every
generated ``from hopper.delegation.v1 import ...`` is rewritten to
``from hopper_delegation._proto import ...``, so nothing imports a top-level ``hopper``
package (upstream Hopper ships one of its own), and the module name that ``*_pb2.py`` gives
its message classes (``__module__``, used by pickle) is rewritten the same way.

Install the pinned generator tools first, in a virtualenv of their own:

    python -m venv .venv-generate
    .venv-generate/bin/python -m pip install -r clients/python/requirements-generate.txt

then run, from the repository root or anywhere:

    .venv-generate/bin/python clients/python/scripts/generate.py          # (re)generate
    .venv-generate/bin/python clients/python/scripts/generate.py --check  # verify, write nothing

``--check`` regenerates into a temporary directory and exits 1, with a summary of the
differences, if the committed files are not exactly what the pinned tools produce (missing,
stale or changed files). The script refuses to run (exit 2) when the installed tool versions
differ from ``requirements-generate.txt``: the grpcio-tools version is the floor the generated
code imposes on users (``grpcio>=`` that version, ``protobuf>=`` its embedded protoc's), so it
must not change by accident. Output is deterministic: running it twice gives identical files.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from pathlib import Path

SCRIPT = Path(__file__).resolve()
CLIENT_DIR = SCRIPT.parents[1]  # clients/python
REPO_ROOT = SCRIPT.parents[3]  # the repository
PROTO_ROOT = REPO_ROOT / "proto"  # include root: imports read "hopper/delegation/v1/..."
PROTO_PACKAGE_DIR = Path("hopper", "delegation", "v1")  # relative to PROTO_ROOT
OUT_DIR = CLIENT_DIR / "src" / "hopper_delegation" / "_proto"
REQUIREMENTS = CLIENT_DIR / "requirements-generate.txt"

PROTO_PY_PACKAGE = "hopper.delegation.v1"  # what protoc names the modules
TARGET_PY_PACKAGE = "hopper_delegation._proto"  # where they live in this client

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")

INIT_TEXT = '''\
"""Generated protobuf and gRPC modules of the Hopper delegation API (package hopper.delegation.v1).

Written by clients/python/scripts/generate.py; do not edit. Regenerate with that script.
"""
'''

# `from hopper.delegation.v1 import x_pb2 as y` (mypy-protobuf, grpcio-tools and protoc all
# write this form), possibly indented.
_FROM_IMPORT = re.compile(
    r"^(?P<indent>[ \t]*)from[ \t]+hopper\.delegation\.v1[ \t]+import[ \t]", re.M
)
# The module name handed to protobuf's builder, e.g. `_builder.BuildTopDescriptorsAndMessages(
# DESCRIPTOR, 'hopper.delegation.v1.resources_pb2', _globals)`.
_BUILDER_MODULE = re.compile(r"""(?P<q>['"])hopper\.delegation\.v1\.(?P<mod>\w+_pb2)(?P=q)""")
# Anything else that would still import the top-level `hopper` package.
_LEFTOVER_IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+hopper(?:\.|[ \t])|import[ \t]+hopper(?:\.|[ \t]|$|,))", re.M
)


class GenerateError(Exception):
    pass


def _read_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise GenerateError(f"{REQUIREMENTS}: not an exact pin: {raw!r}")
        pins[name.strip().lower()] = version.strip()
    return pins


def _check_tool_versions() -> None:
    pins = _read_pins()
    wrong = []
    for name, wanted in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != wanted:
            wrong.append(f"  {name}: pinned {wanted}, installed {have or 'nothing'}")
    if wrong:
        raise GenerateError(
            f"the generator tools in {sys.executable}'s environment do not match "
            f"{REQUIREMENTS.relative_to(REPO_ROOT)}:\n" + "\n".join(wrong) + "\n"
            f"install them with: {sys.executable} -m pip install -r {REQUIREMENTS}"
        )


def _plugin(name: str) -> str:
    """Path of a protoc plugin installed by a pinned package (in this interpreter's scripts)."""
    candidates = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    for directory in candidates:
        found = shutil.which(name, path=directory)
        if found:
            return found
    found = shutil.which(name)
    if found:
        return found
    raise GenerateError(f"{name} not found next to {sys.executable}; install {REQUIREMENTS.name}")


def _proto_files() -> list[str]:
    files = sorted(
        p.relative_to(PROTO_ROOT).as_posix()
        for p in (PROTO_ROOT / PROTO_PACKAGE_DIR).glob("*.proto")
    )
    if not files:
        raise GenerateError(f"no .proto files in {PROTO_ROOT / PROTO_PACKAGE_DIR}")
    return files


def _run_protoc(out: Path) -> None:
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",  # adds grpc_tools' bundled google/protobuf/*.proto to the include path
        f"--proto_path={PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        *_proto_files(),
    ]
    result = subprocess.run(args, cwd=PROTO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise GenerateError(
            f"protoc failed (exit {result.returncode}):\n{result.stderr}{result.stdout}"
        )
    if result.stderr.strip():  # e.g. "warning: Import ... is unused."
        print(result.stderr.rstrip(), file=sys.stderr)


def _rewrite(name: str, text: str) -> str:
    text = _FROM_IMPORT.sub(lambda m: f"{m['indent']}from {TARGET_PY_PACKAGE} import ", text)
    if name.endswith(".py"):
        text = _BUILDER_MODULE.sub(
            lambda m: f"{m['q']}{TARGET_PY_PACKAGE}.{m['mod']}{m['q']}", text
        )
    leftover = _LEFTOVER_IMPORT.search(text)
    if leftover:
        line = text.count("\n", 0, leftover.start()) + 1
        raise GenerateError(
            f"{name}:{line}: an import of the top-level `hopper` package is left that this script "
            f"does not know how to rewrite: {leftover.group(0).strip()!r}"
        )
    text = text.replace("\r\n", "\n")
    if not text.endswith("\n"):
        text += "\n"
    return text


def generate() -> dict[str, str]:
    """Run the generators and return {file name in _proto/: content}."""
    with tempfile.TemporaryDirectory(prefix="hopper-delegation-gen-") as tmp:
        out = Path(tmp)
        _run_protoc(out)
        gen_dir = out / PROTO_PACKAGE_DIR
        produced = sorted(p for p in out.rglob("*") if p.is_file())
        strays = [p.relative_to(out).as_posix() for p in produced if p.parent != gen_dir]
        if strays:
            raise GenerateError(f"unexpected generated files outside {PROTO_PACKAGE_DIR}: {strays}")
        files = {p.name: _rewrite(p.name, p.read_text(encoding="utf-8")) for p in produced}
    files["__init__.py"] = INIT_TEXT
    return dict(sorted(files.items()))


def _committed(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        return {}
    return {
        p.name: p.read_text(encoding="utf-8")
        for p in sorted(directory.iterdir())
        if p.is_file() and (p.name == "__init__.py" or p.name.endswith(GENERATED_SUFFIXES))
    }


def write(files: dict[str, str]) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    old = _committed(OUT_DIR)
    for name in sorted(set(old) - set(files)):  # e.g. a .proto that was removed
        (OUT_DIR / name).unlink()
        print(f"removed  {name}")
    for name, text in files.items():
        if old.get(name) != text:
            (OUT_DIR / name).write_bytes(text.encode("utf-8"))  # LF on every platform
            print(f"{'updated' if name in old else 'created'}  {name}")
    print(f"{len(files)} files in {OUT_DIR.relative_to(REPO_ROOT)} are up to date")


def check(files: dict[str, str]) -> int:
    old = _committed(OUT_DIR)
    missing = sorted(set(files) - set(old))
    stale = sorted(set(old) - set(files))
    changed = sorted(n for n in set(files) & set(old) if files[n] != old[n])
    if not (missing or stale or changed):
        print(
            f"OK: {len(files)} generated files in {OUT_DIR.relative_to(REPO_ROOT)} are up to date"
        )
        return 0
    rel = OUT_DIR.relative_to(REPO_ROOT).as_posix()
    print(f"generated code in {rel} is out of date:")
    for name in missing:
        print(f"  missing  {name}")
    for name in stale:
        print(f"  stale    {name} (no .proto produces it any more)")
    for name in changed:
        diff = list(
            difflib.unified_diff(
                old[name].splitlines(),
                files[name].splitlines(),
                f"{rel}/{name} (committed)",
                f"{rel}/{name} (regenerated)",
                lineterm="",
                n=1,
            )
        )
        plus = sum(1 for d in diff if d.startswith("+") and not d.startswith("+++"))
        minus = sum(1 for d in diff if d.startswith("-") and not d.startswith("---"))
        print(f"  changed  {name} (+{plus} -{minus})")
        for line in diff[:40]:
            print(f"    {line}")
        if len(diff) > 40:
            print(f"    ... {len(diff) - 40} more diff lines")
    print(f"run: {Path(sys.executable).name} {SCRIPT.relative_to(REPO_ROOT)}")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and exit 1 if the committed files differ",
    )
    opts = parser.parse_args(argv)
    try:
        _check_tool_versions()
        files = generate()
        if opts.check:
            return check(files)
        write(files)
        return 0
    except GenerateError as exc:
        print(f"generate.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
