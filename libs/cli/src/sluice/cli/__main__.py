"""The ``sluice`` command: serve a service, migrate, run a local stack, demo, bench.

Only argument parsing lives here; each subcommand's module is imported when it runs, so
``sluice --help`` stays fast and a broken optional part cannot break the others.

Exit codes (also in ``sluice --help`` and the README)::

    0    success
    1    the command failed while running (a service's supervised task died)
    2    usage or configuration error (bad arguments, a bad or unknown SLUICE_* variable)
    3    a dependency was unavailable at start-up (PostgreSQL, Redis)
    4    a listener could not bind its address (port in use)
    130  interrupted
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sluice.common.errors import ConfigError, Unavailable
from sluice.common.service import ListenError, ServiceFailed

ENVIRONMENT_HELP = """\
configuration (environment, read once at start-up):
  DATABASE_URL              PostgreSQL, e.g. postgresql://sluice@db:5432/sluice
  REDIS_URL                 Redis, e.g. redis://cache:6379/0
  SLUICE_LISTEN_HOST        address the gRPC servers bind (default 127.0.0.1)
  SLUICE_INGEST_PORT        ingest gRPC port (default 50051)
  SLUICE_ROUTER_PORT        router gRPC port (default 50052)
  SLUICE_SENDER_PORT        sender gRPC port (default 50053)
  SLUICE_SENDER_TARGET      where routers reach a sender (default 127.0.0.1:50053)
  SLUICE_PROVIDERS_FILE     providers TOML (default: the built-in sandbox set)
  SLUICE_LOG_LEVEL, SLUICE_LOG_FORMAT (text|json), SLUICE_OTEL_EXPORTER (none|console|otlp)
  ... and the other SLUICE_* settings listed in the README's configuration reference.

exit codes: 0 ok, 1 failed while running, 2 usage or configuration error, 3 a dependency
  (PostgreSQL, Redis) unavailable at start-up, 4 a port could not be bound, 130 interrupted.
"""

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3
EXIT_LISTEN = 4
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sluice`` command (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="sluice",
        description=(
            "Sluice: intent-based email dispatch.\n\n"
            "Clients submit email intents over gRPC to ingest, which stores them in\n"
            "PostgreSQL; the router leases them, picks the cheapest suitable provider and\n"
            "hands batches to the sender, which keeps every provider within its rate limits\n"
            "(token buckets in Redis).\n\n"
            "Start here: 'sluice demo' (starts a throwaway stack if none is running) or\n"
            "'sluice dev' (the whole stack in the foreground). 'sluice COMMAND --help' tells more."
        ),
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run one service in the foreground (the production entry point)",
        description=(
            "Runs one Sluice service until SIGTERM or SIGINT. On a stop signal the health "
            "service turns NOT_SERVING first, in-flight calls drain for up to "
            "SLUICE_SHUTDOWN_GRACE_SECONDS, the router gives back its leases, and resources "
            "close. ingest and router need DATABASE_URL; sender needs REDIS_URL."
        ),
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "service",
        choices=("ingest", "router", "sender"),
        help="ingest (port 50051), router (50052) or sender (50053)",
    )

    sub.add_parser(
        "migrate",
        help="apply database migrations to DATABASE_URL (idempotent, safe to run concurrently)",
        description=(
            "Applies the SQL migrations that DATABASE_URL does not have yet, in order, under "
            "a PostgreSQL advisory lock, so several processes (or Kubernetes Jobs) may run it "
            "at once. Prints what it applied, or 'up to date'."
        ),
    )

    partitions = sub.add_parser(
        "partitions",
        help="create the coming months' intent partitions; drop expired ones (run monthly)",
        description=(
            "Creates the monthly partitions of the intents table up to --ahead months after "
            "the current one, moving any rows the default partition caught for them, and, "
            "with --retain-months, drops partitions (and their idempotency keys) that ended "
            "more than that many months ago. Without --retain-months nothing is dropped."
        ),
    )
    partitions.add_argument("--ahead", type=_positive_int, default=3, help="months (default 3)")
    partitions.add_argument("--retain-months", type=_positive_int, default=None)

    dev = sub.add_parser(
        "dev",
        help="run ingest, router and sender in one foreground process for local work",
        description=(
            "Starts all three services in this process with sandbox providers. When "
            "DATABASE_URL / REDIS_URL are unset it starts its own throwaway PostgreSQL and "
            "Redis (state under --state-dir); it migrates the database and seeds the demo "
            "templates. Ctrl-C stops everything, embedded servers included."
        ),
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dev.add_argument(
        "--state-dir",
        default=".sluice",
        help="where embedded PostgreSQL/Redis keep their files (default ./.sluice)",
    )

    demo = sub.add_parser(
        "demo",
        help="submit a sample mixed campaign, watch it go out, print a summary",
        description=(
            "Submits a mixed campaign (transactional, marketing and digest intents, a few "
            "invalid addresses, one address that the sandbox fails permanently, "
            "internationalised addresses) to a running stack over gRPC, shows progress until "
            "nothing of the campaign is pending, then prints counts per status and provider, "
            "throughput and cost per 1,000 sends. Without --target it uses a stack answering "
            "on 127.0.0.1:50051, or starts one itself exactly like 'sluice dev' and stops it "
            "afterwards. Exits 1 if the timeout passes with intents still pending."
        ),
    )
    demo.add_argument(
        "--count",
        type=_positive_int,
        default=300,
        help="number of intents to submit (default 300: about 20-30 s with sandbox limits)",
    )
    demo.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="ingest address of a running stack (default: 127.0.0.1:50051 if it answers)",
    )
    demo.add_argument(
        "--router",
        metavar="HOST:PORT",
        help="router address of that stack (default: the --target host, port 50052)",
    )
    demo.add_argument(
        "--campaign",
        help=(
            "campaign id; idempotency keys derive from it, so re-running with the same id "
            "submits nothing new (default: a fresh id)"
        ),
    )
    demo.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up waiting after this long (default 120)",
    )
    demo.add_argument(
        "--state-dir",
        default=".sluice",
        help="state folder for the embedded servers when the demo starts its own stack",
    )

    status = sub.add_parser(
        "status",
        help="the queue, providers (health, limiter headroom, cost) and throughput, live",
        description=(
            "Redraws a running stack's queue and providers in place until Ctrl-C. Sends the "
            "token in SLUICE_TOKEN (scope read), as 'sluice demo' does."
        ),
    )
    status.add_argument("--router", default="127.0.0.1:50052", metavar="HOST:PORT")
    status.add_argument("--sender", default="127.0.0.1:50053", metavar="HOST:PORT")
    status.add_argument("--once", action="store_true", help="print one snapshot and exit")
    status.add_argument("--interval", type=float, default=5.0, metavar="SECONDS")

    bench = sub.add_parser(
        "bench",
        help="run the benchmarks (same as 'python -m bench' from the repository root)",
        description=(
            "Measures end-to-end emails/s through ingest, PostgreSQL, router, sender and an "
            "unlimited sandbox provider (median of --runs), the ingest rate, and a bare "
            "database pipeline baseline, and prints a table."
        ),
    )
    bench.add_argument("--count", type=_positive_int, default=20_000, help="intents per run")
    bench.add_argument("--runs", type=_positive_int, default=3, help="runs per stage")

    token = sub.add_parser(
        "token",
        help="make a new API token and the tokens-file entry that lists its hash",
        description=(
            "Prints a new random token (give it to the caller; it is shown once) and the "
            "[[tokens]] entry to add to SLUICE_AUTH_TOKENS_FILE, which holds only its SHA-256."
        ),
    )
    token.add_argument("--name", required=True, help="who holds it (shows in logs, metrics)")
    token.add_argument("--scopes", required=True, help="comma-separated: submit, read, admin, send")
    return parser


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} must be at least 1")
    return value


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "serve":
        from sluice.cli.serve import run_serve

        return run_serve(args.service)
    if command == "migrate":
        from sluice.cli.serve import run_migrate

        return run_migrate()
    if command == "partitions":
        from sluice.cli.partitions import run_partitions

        return run_partitions(args.ahead, args.retain_months)
    if command == "dev":
        from sluice.cli.dev import run_dev

        return run_dev(args.state_dir)
    if command == "demo":
        from sluice.cli.demo import run_demo_command

        return run_demo_command(
            count=args.count,
            target=args.target,
            router=args.router,
            campaign=args.campaign,
            timeout=args.timeout,
            state_dir=args.state_dir,
        )
    if command == "status":
        from sluice.cli.status import run_status

        return run_status(
            router=args.router, sender=args.sender, once=args.once, interval=args.interval
        )
    if command == "bench":
        return _run_bench(args.count, args.runs)
    if command == "token":
        return _make_token(args.name, args.scopes)
    raise AssertionError(f"unhandled command {command}")


def _make_token(name: str, scopes_arg: str) -> int:
    import tomllib

    from sluice.common.auth import new_token, parse_tokens, tokens_file_text

    scopes = tuple(s.strip() for s in scopes_arg.split(",") if s.strip())
    token = new_token()
    entry = tokens_file_text({name: scopes}, {name: token})
    # Validated like the server validates the file, so what we print always loads.
    parse_tokens(tomllib.loads(entry), "--scopes")
    print(f"token (give it to {name}; it is not stored anywhere):\n  {token}\n")
    print("add to the tokens file (SLUICE_AUTH_TOKENS_FILE):\n")
    print(entry, end="")
    return 0


def _run_bench(count: int, runs: int) -> int:
    # bench/ is a top-level package of the repository, not part of the installed product:
    # run it the documented way (python -m bench from the repository root) in a child process.
    here = Path.cwd().resolve()
    for root in (here, *here.parents):
        if (root / "bench" / "__main__.py").is_file():
            argv = [sys.executable, "-m", "bench", "--count", str(count), "--runs", str(runs)]
            return subprocess.call(argv, cwd=root)
    print(
        "sluice bench: no bench/ package found here or above; run 'python -m bench' "
        "(or 'uv run python -m bench') from the Sluice repository root",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``sluice`` command and returns its exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"sluice {args.command}: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except Unavailable as exc:
        print(f"sluice {args.command}: cannot start: {exc.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ListenError as exc:
        print(f"sluice {args.command}: cannot listen: {exc.message}", file=sys.stderr)
        return EXIT_LISTEN
    except ServiceFailed as exc:
        # The traceback of the task that died is in the log; this is the one-line summary.
        print(f"sluice {args.command}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"sluice {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
