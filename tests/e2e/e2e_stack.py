"""Runs Sluice services as real processes (``sluice serve ...``) for end-to-end tests.

:func:`service_stack` is an async context manager. Inside it, :meth:`Stack.start` launches
one ``sluice serve <service>`` subprocess on a free port with the stack's environment (the
test's database, Redis URL and key prefix, providers file) and waits until its gRPC health
check answers SERVING. Leaving the block sends SIGTERM to every process (routers first, so
they stop sending before the sender goes away), waits a bounded time, kills whatever is
left, and fails the test when a process did not exit 0 or logged an error. Each process's
stderr goes to a file (a pipe nobody reads would block a chatty process); the logs of every
process are printed when anything failed, so pytest shows them with the failure.

Crash tests use :meth:`Stack.kill` (SIGKILL: no shutdown code runs, and the process's exit
is not checked on leaving) and :meth:`Stack.restart` (the same service again, on the same
port with the same environment, so its clients reconnect to the address they know).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.cli.embedded import find_free_port
from sluice.v1 import intent_pb2
from tests.conftest import REDIS_URL, clean_env

BIN = Path(sys.executable).parent
SLUICE = str(BIN / "sluice")
GRPCURL = str(BIN / "grpcurl")

START_TIMEOUT = 30.0  # seconds until a started service must answer SERVING
STOP_TIMEOUT = 20.0  # seconds a service gets to exit after SIGTERM before it is killed
SHUTDOWN_GRACE = "5"  # SLUICE_SHUTDOWN_GRACE_SECONDS: drain budget inside each service
PORT_ENV = {
    "ingest": "SLUICE_INGEST_PORT",
    "router": "SLUICE_ROUTER_PORT",
    "sender": "SLUICE_SENDER_PORT",
}

# An unlimited sandbox provider that serves every intent and records the ids it accepted.
UNLIMITED_PROVIDERS = """
[[providers]]
name = "e2e"
kind = "sandbox"
cost_per_thousand = 0.1
sustained_rate = 0
burst = 0
intents = ["transactional", "marketing", "digest"]
max_batch_size = 500
settings = { record_ids = true }
"""


def marketing_submissions(
    campaign: str, count: int, *, start: int = 0
) -> list[intent_pb2.IntentSubmission]:
    """``count`` marketing intents for the "welcome" template, keys ``<campaign>-<i>``."""
    return [
        intent_pb2.IntentSubmission(
            idempotency_key=f"{campaign}-{i}",
            campaign_id=campaign,
            recipient=f"user{i}@example.com",
            intent=intent_pb2.INTENT_MARKETING,
            template_id="welcome",
            variables={"name": f"User {i}"},
        )
        for i in range(start, start + count)
    ]


@dataclass
class ServiceProcess:
    """One running ``sluice serve`` process."""

    name: str
    service: str
    port: int
    proc: asyncio.subprocess.Process
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)  # this process's own additions
    killed: bool = False  # SIGKILLed on purpose by Stack.kill: its exit is not checked

    @property
    def target(self) -> str:
        """Where its gRPC server answers."""
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Everything it wrote to stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        """Its JSON log lines as dicts (lines that are not JSON are skipped)."""
        records = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def problems(self) -> list[str]:
        """Log lines that say something went wrong: ERROR/CRITICAL records, tracebacks."""
        bad = []
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                if "Traceback" in line:
                    bad.append(line)
                continue
            if isinstance(record, dict) and record.get("level") in ("ERROR", "CRITICAL"):
                bad.append(line)
        return bad


@dataclass
class Stack:
    """The processes of one test, and the environment they share."""

    env: Mapping[str, str]
    log_dir: Path
    processes: list[ServiceProcess] = field(default_factory=list)
    ports: set[int] = field(default_factory=set)
    # Each process's /metrics port, so stacks side by side never clash on the defaults.
    metrics_ports: dict[str, int] = field(default_factory=dict)

    async def start(self, service: str, *, name: str = "", **env: str) -> ServiceProcess:
        """Starts ``sluice serve service`` on a free port and waits until it is SERVING.

        ``env`` adds to (or overrides) the stack's environment for this process only.
        """
        port = find_free_port()
        # Processes started together could otherwise be handed the same just-freed port.
        while port in self.ports:
            port = find_free_port()
        return await self._launch(service, name or service, port, env)

    async def _launch(
        self, service: str, name: str, port: int, env: Mapping[str, str]
    ) -> ServiceProcess:
        self.ports.add(port)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                SLUICE,
                "serve",
                service,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env={
                    **self.env,
                    PORT_ENV[service]: str(port),
                    "SLUICE_METRICS_PORT": str(
                        self.metrics_ports.setdefault(name, find_free_port())
                    ),
                    **env,
                },
            )
        started = ServiceProcess(name, service, port, proc, log_path, env=dict(env))
        self.processes.append(started)
        await wait_serving(started)
        return started

    async def kill(self, process: ServiceProcess) -> None:
        """SIGKILLs ``process`` (a crash: no shutdown code runs) and waits until it is gone.

        Leaving the stack does not check its exit code; its log is still checked.
        """
        process.killed = True
        if process.proc.returncode is None:
            process.proc.kill()
        await process.proc.wait()

    async def restart(self, process: ServiceProcess, *, name: str = "") -> ServiceProcess:
        """Starts ``process``'s service again on its port with its environment (after
        :meth:`kill`, or after it exited); waits until SERVING. ``name`` defaults to the
        old name with ``-restarted`` appended, so the old log file is kept."""
        if process.proc.returncode is None:
            raise RuntimeError(f"{process.name} is still running; kill it first")
        return await self._launch(
            process.service, name or f"{process.name}-restarted", process.port, process.env
        )

    async def start_many(self, *specs: tuple[str, str, Mapping[str, str]]) -> None:
        """Starts several (service, name, env) at once; Python start-up is the slow part."""
        await asyncio.gather(*(self.start(svc, name=n, **dict(e)) for svc, n, e in specs))


async def health_status(target: str, service: str = "", probe_seconds: float = 1.0) -> int | None:
    """The health status ``target`` reports for ``service``, or None when it does not answer."""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=probe_seconds
            )
        except grpc.aio.AioRpcError:
            return None
        return int(answer.status)


async def wait_serving(process: ServiceProcess) -> None:
    """Polls health until SERVING; fails with the process's log if it exits or is too slow."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.proc.returncode is not None:
            raise AssertionError(
                f"{process.name} exited with {process.proc.returncode} before serving:\n"
                + process.log_text()
            )
        if await health_status(process.target) == health_pb2.HealthCheckResponse.SERVING:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"{process.name} did not answer SERVING within {START_TIMEOUT} s:\n" + process.log_text()
    )


async def _terminate(processes: Sequence[ServiceProcess]) -> list[str]:
    """SIGTERM, bounded wait, kill; returns what went wrong (timeouts, exit codes)."""
    for p in processes:
        if p.proc.returncode is None:
            p.proc.send_signal(signal.SIGTERM)
    failures = []
    for p in processes:
        try:
            await asyncio.wait_for(p.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            p.proc.kill()
            await p.proc.wait()
            failures.append(f"{p.name} did not exit within {STOP_TIMEOUT} s of SIGTERM; killed")
            continue
        if p.proc.returncode != 0:
            failures.append(f"{p.name} exited with {p.proc.returncode} after SIGTERM, not 0")
    return failures


def _dump_logs(processes: Sequence[ServiceProcess], limit: int = 30_000) -> None:
    for p in processes:
        text = p.log_text()
        if len(text) > limit:
            text = f"[... {len(text) - limit} characters cut ...]\n" + text[-limit:]
        print(f"----- {p.name} ({p.service} on {p.target}) stderr -----\n{text}")


def _prepare(log_dir: Path, providers_toml: str | None) -> dict[str, str]:
    """Creates ``log_dir``; writes the providers file there; returns its setting."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if providers_toml is None:
        return {}
    path = log_dir / "providers.toml"
    path.write_text(providers_toml, encoding="utf-8")
    return {"SLUICE_PROVIDERS_FILE": str(path)}


@contextlib.asynccontextmanager
async def service_stack(
    *,
    database_url: str,
    redis_prefix: str,
    log_dir: Path,
    providers_toml: str | None = UNLIMITED_PROVIDERS,
    allow_errors: bool = False,
    **env: str,
) -> AsyncIterator[Stack]:
    """A :class:`Stack` whose processes all stop (SIGTERM) and are checked on exit.

    ``providers_toml`` is written to a file passed as ``SLUICE_PROVIDERS_FILE``; None keeps
    the built-in development providers. ``env`` is extra ``SLUICE_*`` configuration for
    every process. Services log JSON at INFO unless ``env`` says otherwise. Unless
    ``allow_errors``, an ERROR log record or a traceback in any process fails the test.
    """
    base = {
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "SLUICE_REDIS_PREFIX": redis_prefix,
        "SLUICE_LOG_FORMAT": "json",
        "SLUICE_ROUTER_IDLE_SLEEP": "0.05",
        "SLUICE_SHUTDOWN_GRACE_SECONDS": SHUTDOWN_GRACE,
        # A loaded test machine starves processes of CPU; ingest would read that as overload.
        "SLUICE_INGEST_MAX_LOOP_LAG_SECONDS": "0",
        "SLUICE_WEBHOOK_PORT": "0",  # a free port: stacks run side by side
    }
    base.update(_prepare(log_dir, providers_toml))
    stack = Stack(env=clean_env(**base, **env), log_dir=log_dir)
    body_failed = True
    try:
        yield stack
        body_failed = False
    finally:
        # Routers first: they stop sending and give their leases back while the sender and
        # the database are still there; then everything else together.
        alive = [p for p in stack.processes if not p.killed]
        routers = [p for p in alive if p.service == "router"]
        others = [p for p in alive if p.service != "router"]
        failures = await _terminate(routers) + await _terminate(others)
        if not allow_errors:
            for p in stack.processes:
                failures.extend(f"{p.name} logged: {line}" for line in p.problems()[:5])
        if failures or body_failed:
            _dump_logs(stack.processes)
        if failures and not body_failed:
            raise AssertionError("unclean shutdown:\n" + "\n".join(failures))


@dataclass(frozen=True)
class CommandResult:
    """Exit code and output of one command."""

    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"


async def run_command(*argv: str, wait: float = 30.0) -> CommandResult:
    """Runs ``argv`` (no shell) and collects its output; kills it after ``wait`` s."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), wait)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return CommandResult(proc.returncode, out.decode(), err.decode())


async def grpcurl(*args: str, wait: float = 30.0) -> CommandResult:
    """Runs the real ``grpcurl`` binary with ``args``."""
    return await run_command(GRPCURL, *args, wait=wait)
