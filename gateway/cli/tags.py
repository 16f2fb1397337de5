"""`batv-gateway sign|verify|srs forward|srs reverse`: the debugging and interop verbs.

Operators compare our tags with Exim's ${prvs} or postsrsd's output, and scripts check thousands of
addresses, so these verbs take the keyring or bare secrets, can pin the clock, and read addresses from
standard input one per line (as `postmap -q -` does), answering exactly one line per input, in order,
flushed as it goes so they also work as a coprocess. The contract (pinned by tests/test_cli_tags.py):

    batv-gateway sign   [KEYS] [--now TIME] [--lifetime DAYS] [--json] ADDRESS... | -
    batv-gateway verify [KEYS] [--now TIME] [--lifetime DAYS] [--json] ADDRESS... | -
    batv-gateway srs forward --alias DOMAIN [SRS-OPTIONS] [KEYS] [--now TIME] [--json] ADDRESS... | -
    batv-gateway srs reverse [SRS-OPTIONS] [KEYS] [--now TIME] [--json] ADDRESS... | -
    KEYS        = --keyring PATH | --secret-file [K:]FILE ...
    SRS-OPTIONS = --separator {=,+,-} --hash-length N --hash-min N --max-age DAYS --always-rewrite

A plain output line is the resulting address, or "VERDICT: REASON" when there is none. With --json it is
{"input", "ok", "output", "verdict", "reason"}. Exit code 0 when every address succeeded, 1 when any
did not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core import prvs, srs
from ..core.errors import GatewayError, KeyringError, UsageError
from ..core.keyring import Keyring
from ..ops import keystore
from .main import EXIT_NO, EXIT_OK, add_config_option, add_now_option, now_of, settings_of

KEYS = "[--keyring PATH | --secret-file [K:]FILE ...] [--config FILE]"
SRS_OPTIONS = "[--separator {=,+,-}] [--hash-length N] [--hash-min N] [--max-age DAYS] [--always-rewrite]"
INPUT = "[--json] ADDRESS... | -"

# Verdicts of the verbs that transform an address (sign, srs forward); verify and srs reverse use the
# verdict enums of prvs.py and srs.py.
SIGNED = "signed"
REWRITTEN = "rewritten"
UNCHANGED = "unchanged"
REFUSED = "refused"


@dataclass(frozen=True)
class Outcome:
    """The answer for one input address: one output line."""

    ok: bool
    output: str | None
    verdict: str
    reason: str


def register(subparsers: Any) -> None:
    sign = subparsers.add_parser(
        "sign", prog="batv-gateway sign",
        help="prvs-sign addresses (BATV, Exim-compatible)",
        usage=f"batv-gateway sign {KEYS} [--now TIME] [--lifetime DAYS] {INPUT}",
        description="Sign each ADDRESS with the active key (or the first --secret-file) as Exim's "
        "${prvs} does. '-' reads addresses from standard input, one per line.",
        epilog=_EPILOG,
    )
    _common(sign)
    _lifetime(sign)
    sign.set_defaults(handler=_run_sign)

    verify = subparsers.add_parser(
        "verify", prog="batv-gateway verify",
        help="check prvs tags: valid, unsigned, malformed, bad-hash, expired, unknown-key",
        usage=f"batv-gateway verify {KEYS} [--now TIME] [--lifetime DAYS] {INPUT}",
        description="Check each prvs-tagged ADDRESS against the key its digit names. The output is the "
        "original address when the tag is valid.",
        epilog=_EPILOG,
    )
    _common(verify)
    _lifetime(verify)
    verify.set_defaults(handler=_run_verify)

    srs_parser = subparsers.add_parser(
        "srs", prog="batv-gateway srs",
        help="SRS forward and reverse (Mail::SRS, postsrsd, pysrs compatible)",
        usage="batv-gateway srs {forward,reverse} ...",
        description="Rewrite envelope senders with the SRS Guarded scheme, or undo it.",
    )
    srs_parser.set_defaults(help_parser=srs_parser)
    srs_verbs = srs_parser.add_subparsers(title="commands", metavar="COMMAND")
    forward = srs_verbs.add_parser(
        "forward", prog="batv-gateway srs forward",
        help="rewrite senders to SRS0/SRS1 addresses at --alias",
        usage=f"batv-gateway srs forward --alias DOMAIN {SRS_OPTIONS} {KEYS} [--now TIME] {INPUT}",
        description="Rewrite each sender ADDRESS so that bounces come back to DOMAIN.",
        epilog=_EPILOG,
    )
    forward.add_argument("--alias", metavar="DOMAIN", required=True, help="the forwarding domain")
    _srs_options(forward)
    _common(forward)
    forward.set_defaults(handler=_run_forward)
    reverse = srs_verbs.add_parser(
        "reverse", prog="batv-gateway srs reverse",
        help="undo SRS: valid, not-srs, malformed, bad-hash, expired",
        usage=f"batv-gateway srs reverse {SRS_OPTIONS} {KEYS} [--now TIME] {INPUT}",
        description="Check each SRS ADDRESS and print the original sender it encodes.",
        epilog=_EPILOG,
    )
    _srs_options(reverse)
    _common(reverse)
    reverse.set_defaults(handler=_run_reverse)


_EPILOG = (
    "--secret-file [K:]FILE may repeat: the first signs, all verify; K (one digit, default 0) is the "
    "prvs key id. A secret file holds the raw secret; one trailing newline is not part of it. "
    "TIME is ISO 8601 UTC (2024-01-01T12:00:00Z) or unix seconds. Exit codes: 0 every address "
    "succeeded, 1 any did not, 2 usage error."
)


def _common(parser: argparse.ArgumentParser) -> None:
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--keyring", metavar="PATH", type=Path,
                      help="the keyring file (default: from --config, else keys/keyring.toml)")
    keys.add_argument("--secret-file", metavar="[K:]FILE", action="append", dest="secret_files",
                      help="a bare secret instead of the keyring (repeatable)")
    add_config_option(parser)
    add_now_option(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("addresses", metavar="ADDRESS", nargs="*", help="addresses, or - for standard input")


def _lifetime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lifetime", metavar="DAYS", type=_number,
                        help="days a prvs tag lives (default: from --config, else 7)")


def _srs_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--separator", choices=("=", "+", "-"), help="the character after SRS0/SRS1")
    parser.add_argument("--hash-length", metavar="N", type=_number, help="hash characters to write")
    parser.add_argument("--hash-min", metavar="N", type=_number, help="hash characters to accept")
    parser.add_argument("--max-age", metavar="DAYS", type=_number,
                        help="days an SRS address lives (default: from --config, else 21)")
    parser.add_argument("--always-rewrite", action="store_true", default=None,
                        help="rewrite even senders in the alias domain")


def _number(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


# ---------------------------------------------------------------- keys


def read_secret_file(spec: str) -> tuple[int, bytes]:
    """--secret-file [K:]FILE: (key id, raw secret). Any length: vectors use secrets such as "s3cr3t"."""
    match = re.fullmatch(r"([0-9]):(.+)", spec, re.DOTALL)
    key_id, name = (int(match.group(1)), match.group(2)) if match else (0, spec)
    try:
        secret = Path(name).read_bytes()
    except OSError as exc:
        raise UsageError(f"--secret-file {name}: cannot read: {exc.strerror}") from None
    if secret.endswith(b"\n"):
        secret = secret[:-1]
    if not secret:
        raise UsageError(f"--secret-file {name}: the file is empty")
    return key_id, secret


def _secrets(args: argparse.Namespace) -> list[tuple[int, bytes]] | None:
    specs: list[str] | None = args.secret_files
    return [read_secret_file(spec) for spec in specs] if specs else None


def _keyring(args: argparse.Namespace) -> Keyring:
    """The keys for prvs: the --secret-file secrets (each under its id) or the keyring file."""
    given = _secrets(args)
    if given is not None:
        ids = [key_id for key_id, _ in given]
        for key_id in ids:
            if ids.count(key_id) > 1:
                raise UsageError(
                    f"--secret-file: key id {key_id} is given twice: prefix each file with its own id, "
                    "as in --secret-file 1:FILE"
                )
        return Keyring.from_secrets(given)
    return keystore.load(_keyring_path(args)).keyring


def _srs_secrets(args: argparse.Namespace) -> tuple[bytes, ...]:
    """The secrets for SRS, the signing one first. SRS has no key id, so K: prefixes do not matter."""
    given = _secrets(args)
    if given is not None:
        return tuple(secret for _, secret in given)
    return keystore.load(_keyring_path(args)).keyring.srs_secrets()


def _keyring_path(args: argparse.Namespace) -> Path:
    explicit: Path | None = args.keyring
    return explicit if explicit is not None else settings_of(args).keyring_path


def _lifetime_days(args: argparse.Namespace) -> int:
    given: int | None = args.lifetime
    return given if given is not None else settings_of(args).lifetime_days


def _srs_options_of(args: argparse.Namespace) -> srs.SrsOptions:
    """The SRS options: the config's [srs] table (or the defaults), then each flag given on top."""
    settings = settings_of(args)
    base = settings.srs_options or srs.SrsOptions(max_age=settings.srs_max_age_days)
    chosen: dict[str, Any] = {}
    for name in ("separator", "hash_length", "hash_min", "max_age", "always_rewrite"):
        value = getattr(args, name)
        if value is not None:
            chosen[name] = value
    if "hash_length" in chosen and "hash_min" not in chosen:
        # Accept no shorter hashes than we write, as Mail::SRS does when only the length is set.
        chosen["hash_min"] = chosen["hash_length"]
    try:
        return replace(base, **chosen)
    except (GatewayError, ValueError, TypeError) as exc:
        raise UsageError(f"SRS options: {exc}") from None


# ---------------------------------------------------------------- input and output


def _inputs(args: argparse.Namespace) -> Iterator[str]:
    addresses: list[str] = args.addresses
    if not addresses:
        raise UsageError("give at least one ADDRESS, or - to read addresses from standard input")
    if "-" in addresses:
        if len(addresses) > 1:
            raise UsageError("'-' reads every address from standard input: give no other ADDRESS with it")
        return _stdin_lines()
    return iter(addresses)


def _stdin_lines() -> Iterator[str]:
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        for line in sys.stdin:
            yield line.removesuffix("\n").removesuffix("\r")
        return
    for raw in stream:
        # A line that is not UTF-8 still gets its answer line (an address with U+FFFD will be refused).
        yield raw.decode("utf-8", "replace").removesuffix("\n").removesuffix("\r")


def _emit(args: argparse.Namespace, address: str, outcome: Outcome) -> None:
    if args.json:
        line = json.dumps({"input": address, "ok": outcome.ok, "output": outcome.output,
                           "verdict": outcome.verdict, "reason": outcome.reason})
    elif outcome.output is not None:
        line = outcome.output
    else:
        line = f"{outcome.verdict}: {outcome.reason}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _run(args: argparse.Namespace, answer: Callable[[str], Outcome]) -> int:
    # Read the inputs' source first: a usage error must come before any output line.
    inputs = _inputs(args)
    all_ok = True
    for address in inputs:
        outcome = answer(address)
        all_ok = all_ok and outcome.ok
        _emit(args, address, outcome)
    return EXIT_OK if all_ok else EXIT_NO


def _today(args: argparse.Namespace) -> int:
    return keystore.utc_day(now_of(args))


# ---------------------------------------------------------------- the verbs


def _run_sign(args: argparse.Namespace) -> int:
    keyring = _keyring(args)
    if not keyring.has_active:
        raise KeyringError("the keyring has no active key to sign with")
    today, lifetime = _today(args), _lifetime_days(args)

    def answer(address: str) -> Outcome:
        try:
            tagged = prvs.sign(address, keyring, today, lifetime)
        except GatewayError as exc:
            return Outcome(False, None, REFUSED, str(exc))
        return Outcome(True, tagged, SIGNED, f"signed with key {keyring.active.id}")

    return _run(args, answer)


def _run_verify(args: argparse.Namespace) -> int:
    keyring = _keyring(args)
    today, lifetime = _today(args), _lifetime_days(args)

    def answer(address: str) -> Outcome:
        result = prvs.verify(address, keyring, today, lifetime)
        ok = result.verdict is prvs.PrvsVerdict.VALID
        return Outcome(ok, result.address if ok else None, result.verdict.value, result.reason)

    return _run(args, answer)


def _run_forward(args: argparse.Namespace) -> int:
    secrets = _srs_secrets(args)
    options = _srs_options_of(args)
    today = _today(args)
    alias: str = args.alias

    def answer(address: str) -> Outcome:
        try:
            rewritten = srs.forward(address, alias, secrets, today, options)
        except GatewayError as exc:
            return Outcome(False, None, REFUSED, str(exc))
        if rewritten == address:
            return Outcome(True, rewritten, UNCHANGED, "the sender is in the alias domain: left as it is")
        return Outcome(True, rewritten, REWRITTEN, f"rewritten for {alias}")

    return _run(args, answer)


def _run_reverse(args: argparse.Namespace) -> int:
    secrets = _srs_secrets(args)
    options = _srs_options_of(args)
    today = _today(args)

    def answer(address: str) -> Outcome:
        result = srs.reverse(address, secrets, today, options)
        ok = result.verdict is srs.SrsVerdict.VALID
        return Outcome(ok, result.address if ok else None, result.verdict.value, result.reason)

    return _run(args, answer)

