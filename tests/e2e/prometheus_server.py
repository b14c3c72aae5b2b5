"""A real Prometheus server for end-to-end tests: Debian's ``prometheus`` binary on a free
loopback port, with a temporary configuration and data folder, scraping the given targets
every second and evaluating deploy/prometheus/rules.yml. Stopped (SIGTERM, then kill) and
its folder removed on leaving; its log is printed when the test fails."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sluice.cli.embedded import find_free_port
from tests.conftest import clean_env
from tests.deploy.monitoring import RULES, need_binary

READY_TIMEOUT = 30.0


@dataclass
class Prometheus:
    """A running Prometheus and a client for its HTTP API."""

    url: str
    session: aiohttp.ClientSession
    log_path: Path

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` gives now (``/api/v1/query``)."""
        async with self.session.get(f"{self.url}/api/v1/query", params={"query": expr}) as r:
            body = await r.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, expr: str) -> float | None:
        """The single value ``expr`` gives, or None when it gives no series."""
        result = await self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    async def targets(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.url}/api/v1/targets") as r:
            body = await r.json()
        active: list[dict[str, Any]] = body["data"]["activeTargets"]
        return active


def _config(jobs: Mapping[str, list[str]]) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ],
    }


def _write_config(folder: Path, jobs: Mapping[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    # JSON is YAML, and needs no YAML writer here.
    config.write_text(json.dumps(_config(jobs)), encoding="utf-8")
    return config


def _log(path: Path, limit: int = 20_000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-limit:]


@contextlib.asynccontextmanager
async def prometheus_server(
    folder: Path, jobs: Mapping[str, list[str]]
) -> AsyncIterator[Prometheus]:
    """Runs Prometheus scraping ``jobs`` (job name: ``host:port`` targets of /metrics)."""
    binary = need_binary("prometheus")
    config = _write_config(folder, jobs)
    port = find_free_port()
    log_path = folder / "prometheus.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=clean_env(),
        )
    url = f"http://127.0.0.1:{port}"
    failed = True
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await _wait_ready(proc, session, url, log_path)
            yield Prometheus(url, session, log_path)
            failed = False
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if failed:
            print("----- prometheus log -----\n" + _log(log_path))


async def _wait_ready(
    proc: asyncio.subprocess.Process, session: aiohttp.ClientSession, url: str, log_path: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}:\n" + _log(log_path))
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{url}/-/ready") as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise AssertionError(f"prometheus not ready within {READY_TIMEOUT} s")
