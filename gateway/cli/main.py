"""`batv-gateway`: the sub-command dispatcher.

Each command lives in its own module that exposes `register(subparsers) -> None`; it adds its parser(s)
and sets `handler` (a function of the parsed arguments returning the exit code) as a default. Adding a
command is one line in COMMAND_MODULES.

Exit codes, for every command: 0 success, 1 a "no" verdict (an address that did not verify, sign or
reverse), 2 a usage error or a file (keyring, config) that cannot be used.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..core.errors import GatewayError, UsageError
from ..ops.keystore import DEFAULT_PATH

if TYPE_CHECKING:
    from ..core.srs import SrsOptions

EXIT_OK = 0
EXIT_NO = 1
EXIT_USAGE = 2

DEFAULT_KEYRING = DEFAULT_PATH  # keys/keyring.toml
DEFAULT_LIFETIME_DAYS = 7  # BATV draft section 4 and Exim: a prvs tag lives 7 days
DEFAULT_SRS_MAX_AGE_DAYS = 21  # Mail::SRS, postsrsd and pysrs all default to 21

# One line per command module; each exposes register(subparsers).
COMMAND_MODULES: Sequence[str] = (
    "gateway.cli.keys",
    "gateway.cli.tags",
    "gateway.cli.check",
    "gateway.cli.demo",
    "gateway.cli.serve",
    "gateway.cli.postfix",
    "gateway.cli.milter",
    "gateway.cli.explain",
)

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises instead of exiting, so main() can return 2 in-process."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().rstrip()}")


# ---------------------------------------------------------------- options shared by several commands


def add_quickstart_flags(parser: argparse.ArgumentParser, listen_help: str) -> None:
    """The flags serve, socketmap and policy share, so that each runs without a config file."""
    parser.add_argument(
        "--config", metavar="FILE", type=Path, help="the TOML config (deploy/gateway.example.toml)"
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help=listen_help)
    parser.add_argument("--keyring", metavar="PATH", help="the keyring file")
    parser.add_argument(
        "--domain",
        metavar="DOMAIN",
        action="append",
        default=[],
        help="a local and signed domain (repeatable)",
    )
    parser.add_argument("--srs-alias", metavar="DOMAIN", help="the SRS alias domain for forwarded mail")



@dataclass(frozen=True)
class Settings:
    """What the CLI takes from a config file, or the defaults when none is given."""

    keyring_path: Path = DEFAULT_KEYRING
    lifetime_days: int = DEFAULT_LIFETIME_DAYS
    srs_max_age_days: int = DEFAULT_SRS_MAX_AGE_DAYS
    # The config's whole [srs] table, so `srs forward|reverse --config` matches the running gateway.
    srs_options: SrsOptions | None = None


def settings_from_config(path: Path | None) -> Settings:
    """The one place the CLI reads the config file (gateway.ops.config, raising ConfigError)."""
    if path is None:
        return Settings()
    # Imported here so that commands which never see a config do not pay for (or depend on) it.
    from ..ops import config as config_file

    config = config_file.load(path)
    return Settings(
        keyring_path=Path(config.keyring_path),
        lifetime_days=int(config.lifetime_days),
        srs_max_age_days=int(config.srs_max_age_days),
        srs_options=config.policy.srs_options,
    )


def settings_of(args: argparse.Namespace) -> Settings:
    """settings_from_config(args.config), read once per command however many options need it."""
    cached: Settings | None = getattr(args, "_settings", None)
    if cached is None:
        cached = settings_from_config(getattr(args, "config", None))
        args._settings = cached
    return cached


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="take the keyring path, tag lifetimes and SRS options from this config",
    )


def add_now_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--now",
        metavar="TIME",
        type=parse_time,
        help="pretend it is TIME: ISO 8601 UTC (2024-01-01T12:00:00Z) or unix seconds",
    )


def parse_time(text: str) -> datetime:
    """TIME = ISO 8601 with a UTC offset (2024-01-01T12:00:00Z) or unix seconds."""
    if re.fullmatch(r"-?[0-9]+", text):
        return datetime.fromtimestamp(int(text), UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give ISO 8601 UTC (2024-01-01T12:00:00Z) or unix seconds"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone: add Z for UTC (2024-01-01T12:00:00Z)")
    return moment.astimezone(UTC)


def now_of(args: argparse.Namespace) -> datetime:
    """--now if given, else the real clock: the only place the CLI reads it."""
    given: datetime | None = getattr(args, "now", None)
    return given if given is not None else datetime.now(UTC)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batv-gateway",
        usage="batv-gateway COMMAND [OPTIONS] ...",
        description="A return-path signing gateway (BATV prvs and SRS) that stops backscatter.",
        epilog="Run 'batv-gateway COMMAND --help' for a command's synopsis. "
        "Exit codes: 0 success, 1 a 'no' verdict, 2 a usage error.",
    )
    parser.add_argument("--version", action="version", version=f"batv-gateway {__version__}")
    subparsers = parser.add_subparsers(
        title="commands", metavar="COMMAND", parser_class=_Parser, prog="batv-gateway"
    )
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            # A bare command group such as "batv-gateway keys": show what it offers.
            help_parser: argparse.ArgumentParser = getattr(args, "help_parser", parser)
            help_parser.print_help(sys.stderr)
            return EXIT_USAGE
        return handler(args)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except UsageError as exc:
        print(f"batv-gateway: usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GatewayError as exc:
        print(f"batv-gateway: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `batv-gateway verify - | head`: the reader left. Point stdout at /dev/null so that the
        # interpreter's final flush does not fail a second time; not every answer was delivered: 1.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_NO
    except OSError as exc:
        # A file or socket the command could not use (a folder that does not exist, no permission):
        # one line naming it, not a traceback. OSError messages carry the file name, never its content.
        print(f"batv-gateway: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
