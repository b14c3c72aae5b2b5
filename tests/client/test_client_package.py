"""sluice-client installs on its own: the stubs, grpcio and protobuf, nothing of the server."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

from tests.client.client_venv import build_wheel, client_python

__all__ = ["client_python"]


def test_the_wheel_holds_only_the_stubs_and_asks_only_for_grpcio_and_protobuf(
    tmp_path: Path,
) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    packaged = {n.split("/")[1] for n in names if n.startswith("sluice/")}
    assert packaged == {"v1"}, packaged
    assert "sluice/v1/template_pb2_grpc.py" in names
    assert "sluice/v1/ingest_pb2.pyi" in names  # typed for the caller's mypy
    requires = sorted(
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    )
    assert requires == ["grpcio<2,>=1.85.1", "protobuf<8,>=7.35.1"], requires
    assert not any("==" in r for r in requires)


def test_a_client_only_venv_imports_the_stubs_and_not_the_server(client_python: Path) -> None:
    probe = (
        "import importlib.util, sys\n"
        "from sluice.v1 import ingest_pb2_grpc, template_pb2_grpc, suppression_pb2_grpc\n"
        "missing = [m for m in ('sluice.common', 'asyncpg', 'redis', 'opentelemetry')"
        " if importlib.util.find_spec(m) is not None]\n"
        "print('present:', missing)\n"
        "sys.exit(1 if missing else 0)\n"
    )
    done = subprocess.run(
        [str(client_python), "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
