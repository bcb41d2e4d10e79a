"""The ``alphaforge`` command line (``./alphaforge COMMAND`` runs ``python -m shared.ops.cli COMMAND`` in .venv).

Commands:
  up                     run everything in the foreground (embedded PostgreSQL/Redis when the URLs are unset)
  test [PYTEST ARGS]     ruff (lint and format), mypy, then pytest
  migrate                apply database migrations to DATABASE_URL
  bars import PATH       import bars: a CSV or Parquet file, or a folder of SYMBOL.csv / .parquet files
                         (--timeframe 1m..1d, --tz for timestamps without a UTC offset)
  bars demo              load a synthetic demo universe
  bars actions import FILE
                         import splits, dividends and delistings from a CSV or Parquet file
                         (columns symbol,date,action,value; shared/marketdata/actions.py)
  user create NAME       create an account (--admin for an administrator); prints a generated password
                         unless --password-stdin reads one from standard input

``bars`` uses DATABASE_URL, or, when it is unset, the embedded PostgreSQL under the data dir (the same one
``up`` uses; it may be running or not).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import ConfigError
from shared.infra.config import Settings
from shared.infra.migrate import PROJECT_ROOT
from shared.marketdata.series import TIMEFRAME_SECONDS

if TYPE_CHECKING:
    from sqlalchemy import Engine


def _caller_path(raw: str) -> Path:
    """A path from the command line, relative to where the user ran ``./alphaforge`` (it cds to the repo)."""
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path
    return Path(os.environ.get("ALPHAFORGE_CALLER_CWD") or Path.cwd()) / path


def _print_result(result: object) -> None:
    if result is None:
        return
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        values = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
        values |= {n: getattr(result, n) for n, v in vars(type(result)).items() if isinstance(v, property)}
        for name, value in values.items():
            print(f"{name}: {value}")
    else:
        print(result)


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[Engine]:
    """An engine on DATABASE_URL, or on a migrated embedded PostgreSQL that is stopped afterwards."""
    from shared.infra import migrate
    from shared.infra.db import make_engine
    from shared.ops.embedded import EmbeddedPostgres

    embedded: EmbeddedPostgres | None = None
    url = settings.database_url
    try:
        if not url:
            data_dir = settings.data_dir.resolve()
            embedded = EmbeddedPostgres(data_dir / "postgres")
            print(f"DATABASE_URL is not set: using the embedded PostgreSQL in {data_dir}", file=sys.stderr)
            url = embedded.start()
            migrate.upgrade(url)
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()
    finally:
        if embedded is not None:
            embedded.stop()


def cmd_up(args: argparse.Namespace) -> int:
    from shared.ops.launcher import run_up

    return run_up(Settings.from_env())


def cmd_test(args: argparse.Namespace) -> int:
    return run_checks(args.pytest_args)


def run_checks(pytest_args: Sequence[str]) -> int:
    steps = [
        ("ruff", [sys.executable, "-m", "ruff", "check", "."]),
        ("ruff format", [sys.executable, "-m", "ruff", "format", "--check", "."]),
        ("mypy", [sys.executable, "-m", "mypy"]),
        ("pytest", [sys.executable, "-m", "pytest", *pytest_args]),
    ]
    for name, argv in steps:
        print(f"==> {name}: {shlex.join(['python', *argv[1:]])}", flush=True)
        code = subprocess.call(argv, cwd=PROJECT_ROOT)
        if code != 0:
            print(f"==> {name} failed (exit code {code})", file=sys.stderr, flush=True)
            return code
    print("==> all checks passed", flush=True)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from shared.infra import migrate

    url = Settings.from_env().require_database_url()
    migrate.upgrade(url)
    print("database is at the latest migration")
    return 0


def cmd_bars_import(args: argparse.Namespace) -> int:
    from shared.marketdata.table_import import import_path

    def load(engine: Engine, path: Path) -> object:
        return import_path(engine, path, timeframe=args.timeframe, tz=args.tz, exchange_tz=args.exchange_tz)

    return _import(_caller_path(args.file), load, folders=True)


def cmd_bars_actions_import(args: argparse.Namespace) -> int:
    from shared.marketdata.actions import import_actions

    def load(engine: Engine, path: Path) -> object:
        return import_actions(engine, path, replace=args.replace)

    return _import(_caller_path(args.file), load, folders=False)


def _import(path: Path, load: Callable[[Engine, Path], object], *, folders: bool) -> int:
    """Run an import of ``path`` against the database; a refused file is its problems on stderr and exit code 1."""
    from shared.marketdata.csv_import import BarsImportError

    if not (path.exists() if folders else path.is_file()):
        print(f"error: no such {'file or folder' if folders else 'file'}: {path}", file=sys.stderr)
        return 1
    with _database(Settings.from_env()) as engine:
        try:
            report = load(engine, path)
        except BarsImportError as exc:
            print(f"error: {exc}", file=sys.stderr)  # names the file and lists bad rows by line number
            return 1
    _print_result(report)
    return 0


def cmd_bars_demo(args: argparse.Namespace) -> int:
    from shared.marketdata.demo import DemoConflict, load_demo_universe

    with _database(Settings.from_env()) as engine:
        try:
            result = load_demo_universe(
                engine, symbols=args.symbols, years=args.years, seed=args.seed, replace=args.replace
            )
        except DemoConflict as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    _print_result(result)
    return 0


def cmd_user_create(args: argparse.Namespace) -> int:
    import secrets as secrets_module

    from shared.accounts import audit, users
    from shared.errors import AppError
    from shared.infra.db import make_session_factory, session_scope
    from shared.infra.models import UserRole

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        generated = False
    else:
        password = secrets_module.token_urlsafe(18)
        generated = True
    role = UserRole.ADMIN if args.admin else UserRole.USER
    with _database(Settings.from_env()) as engine:
        try:
            with session_scope(make_session_factory(engine)) as session:
                user = users.create_user(session, args.name, password, role=role)
                audit.record(
                    session,
                    audit.AuditAction.USER_CREATED,
                    actor_id=None,
                    actor_username=None,
                    resource_type="user",
                    resource_id=user.id,
                    details={"via": "cli", "username": user.username, "role": role.value},
                )
                user_id, username = user.id, user.username
        except AppError as exc:  # taken username, invalid name or password
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
    print(f"created {role.value} {username!r} (id {user_id})")
    if generated:
        print(f"password: {password}  (shown once; log in with POST /api/auth/login)")
    return 0


def _time_zone(raw: str) -> str:
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(raw)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown time zone {raw!r} (an IANA name, e.g. America/New_York)") from None
    return raw


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alphaforge",
        description="AlphaForge: run backtests and screens as distributed jobs.",
        epilog="Configuration comes from environment variables; see shared/infra/config.py (README: Configuration).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start database, broker, API, worker and beat in the foreground")
    up.set_defaults(func=cmd_up)

    test = sub.add_parser("test", help="run ruff (lint, format), mypy and pytest (extra arguments go to pytest)")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed to pytest")
    test.set_defaults(func=cmd_test)

    migrate = sub.add_parser("migrate", help="apply database migrations to DATABASE_URL")
    migrate.set_defaults(func=cmd_migrate)

    bars = sub.add_parser("bars", help="load bars")
    bars_sub = bars.add_subparsers(dest="bars_command", required=True, metavar="SUBCOMMAND")
    imp = bars_sub.add_parser("import", help="import bars from a CSV or Parquet file, or a folder of them")
    imp.add_argument(
        "file", metavar="FILE_OR_FOLDER", help="a CSV or Parquet file, or a folder of SYMBOL.csv / SYMBOL.parquet files"
    )
    imp.add_argument("--timeframe", choices=list(TIMEFRAME_SECONDS),
                     help="the bars' timeframe (default: 1d for a date column; for a timestamp column, the most "
                          "common spacing of the bars)")  # fmt: skip
    imp.add_argument("--tz", type=_time_zone,
                     help="time zone of timestamps written without a UTC offset (default: --exchange-tz)")  # fmt: skip
    imp.add_argument("--exchange-tz", type=_time_zone,
                     help="the symbols' exchange time zone, kept with them (sessions and local dates of intraday bars;"
                          " new symbols: America/New_York)")  # fmt: skip
    imp.set_defaults(func=cmd_bars_import)
    demo = bars_sub.add_parser("demo", help="load a synthetic demo universe")
    demo.add_argument("--symbols", type=_positive_int, default=500, help="number of symbols (default 500)")
    demo.add_argument("--years", type=_positive_int, default=10, help="years of daily bars (default 10)")
    demo.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    demo.add_argument("--replace", action="store_true",
                      help="replace the series of symbols that hold other bars (refused without it)")  # fmt: skip
    demo.set_defaults(func=cmd_bars_demo)
    actions = bars_sub.add_parser("actions", help="corporate actions: splits, dividends, delistings")
    actions_sub = actions.add_subparsers(dest="actions_command", required=True, metavar="SUBCOMMAND")
    actions_import = actions_sub.add_parser(
        "import", help="import splits, dividends and delistings from a CSV or Parquet file"
    )
    actions_import.add_argument(
        "file", metavar="FILE", help="columns symbol,date,action,value (action: split, dividend or delist)"
    )
    actions_import.add_argument("--replace", action="store_true",
                                help="the file is its symbols' whole history: their stored actions and delisting "
                                     "it lacks are deleted")  # fmt: skip
    actions_import.set_defaults(func=cmd_bars_actions_import)

    user = sub.add_parser("user", help="manage accounts (for operators)")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="SUBCOMMAND")
    create = user_sub.add_parser("create", help="create an account")
    create.add_argument("name", metavar="NAME", help="username (3 to 64 of a-z 0-9 _ . -)")
    create.add_argument("--admin", action="store_true", help="an administrator (may read every user's data)")
    create.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input (default: generate one)"
    )
    create.set_defaults(func=cmd_user_create)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["test"] and argv[1:2] not in (["-h"], ["--help"]):
        return run_checks(argv[1:])  # everything goes to pytest verbatim (argparse mangles leading options)
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
