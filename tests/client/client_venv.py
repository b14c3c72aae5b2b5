"""A virtual environment holding sluice-client and nothing else of Sluice, as another
service would install it (not collected: no test_ prefix)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def uv() -> str:
    candidates = [shutil.which("uv"), Path(sys.executable).parent / "uv"]
    candidates.append(Path.home() / ".local" / "bin" / "uv")  # where pip --user puts it
    for found in candidates:
        if found and Path(found).exists():
            return str(found)
    raise RuntimeError("uv is needed to build the client package (scripts/setup.sh installs it)")


def build_wheel(out: Path) -> Path:
    subprocess.run(
        [uv(), "build", "--wheel", "--out-dir", str(out), str(ROOT / "libs" / "client")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = out.glob("sluice_client-*.whl")
    return wheel


def make_client_venv(where: Path) -> Path:
    """A venv with the built sluice-client wheel and its dependencies; returns its python.
    Dependencies come from uv's cache when it has them (the workspace lock put them there)."""
    wheel = build_wheel(where / "dist")
    venv = where / "venv"
    subprocess.run(
        [uv(), "venv", "--quiet", str(venv)], check=True, capture_output=True, timeout=300
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [uv(), "pip", "install", "--quiet", "--python", str(python), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return python


@pytest.fixture(scope="session")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a venv holding only sluice-client (and grpcio, protobuf)."""
    return make_client_venv(tmp_path_factory.mktemp("client"))
