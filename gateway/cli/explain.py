"""`batv-gateway explain ADDRESS | FILE | -`: what the gateway would do with an address or a saved message,
and why, in words: the answer to "why was this refused?".

It reads the config and the keyring as `serve` does (the same --config and quick-start flags, the same
embedded default), asks the one policy, and hands the typed verdicts to gateway/explain.py for the words.
It opens no socket and changes no file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..core.addresses import Address, parse_path
from ..core.errors import AddressError, GatewayError, UsageError
from .main import EXIT_NO, EXIT_OK, add_now_option, add_quickstart_flags, now_of

if TYPE_CHECKING:
    from ..ops.config import Config
    from ..policy.policy import Policy

# A message is read up to this much: its header and a DSN's report come first, and an operator's
# FILE.eml must not be able to fill the memory.
MAX_MESSAGE = 1 << 20

USAGE = (
    "batv-gateway explain [--config FILE] [--keyring PATH] [--domain DOMAIN ...] [--srs-alias DOMAIN]\n"
    "                            [--now TIME] [--sender ADDRESS] [--json] ADDRESS | FILE | -"
)
DESCRIPTION = """\
Say what the gateway would do with ADDRESS, or with a saved message, and why: the verdict, the SMTP reply
with its enhanced status code, and the tag's fields. It answers "why was this refused?".

ADDRESS (local@domain or <local@domain>) is explained three ways:
  inbound, as the RCPT TO of a bounce (the null sender <>) and of any other sender, and
  outbound, as the envelope sender (MAIL FROM): the tag it would get, or why it is left alone.
  A malformed address gets the SMTP edge's own reply (553 5.1.3 Malformed address) and the reason.
  For a prvs tag: the key digit and that key's state in the keyring (active, verify, retired or
  unknown), the day stamp DDD and the day it expires, the days left, the day it was signed and how long
  ago (the expiry day minus our lifetime: right when the tag was made with the same lifetime), and
  whether the hash matches.
  For an SRS0 or SRS1 address in our alias domain: the timestamp and its age, whether the hash matches,
  and the address it decodes to. The expected hash and the secrets are never shown.

FILE (an argument that names an existing file; - reads standard input) is a saved message, read up to
1 MiB. The envelope recipient is taken from the topmost Delivered-To, else X-Original-To, else the first
address of To; the envelope sender from Return-Path (<> is a bounce; without one, both cases are shown).
Only the inbound verdict is explained. For a DSN (multipart/report), the returned Original-Recipient,
Final-Recipient, Action, Status and Message-ID are shown too, for information.

The config is read as 'serve' reads it: --config, else the embedded default of 'serve' (example.com,
the SRS alias fwd.example.com, keys/keyring.toml), with --keyring, --domain and --srs-alias on top. The
inbound verdict is that of the config's first inbound listener (its observe setting counts), or of the
[policyd] section when there is no inbound listener."""
EPILOG = """\
output:
  One "label: words" line per fact, then per role a "ROLE:" line with "  verdict: ..." and "  why: ...",
  for example
      verdict: reject (550 5.7.1 <bob@example.com>: bounce to an address we never signed (unsigned))
  --json prints one object: {"input", "passes", "facts": {label: words},
  "verdicts": [{"role", "action", "reason", "reply", "passes", "verdict", "why"}]}.

exit status:
  0 every inbound verdict lets the mail through (observe mode counts as through), 1 one refuses it,
  2 a usage error, or a message, config or keyring that cannot be read. An ADDRESS without --sender
  has two inbound verdicts, so an unsigned address in a signed domain exits 1: its bounces are refused.
  With the Message-ID ledger on such a bounce is accepted at RCPT and decided at the end of DATA, which
  explain cannot see: that counts as through.
  The outbound verdict never counts.

examples:
  batv-gateway explain --config /etc/batv-gateway/gateway.toml prvs=1234abcdef=bob@example.com
  batv-gateway explain --config /etc/batv-gateway/gateway.toml --sender '<>' bob@example.com
  batv-gateway explain --config /etc/batv-gateway/gateway.toml --now 2024-01-01T12:00:00Z bounce.eml"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "explain",
        prog="batv-gateway explain",
        help="say what the gateway would do with an address or a saved message, and why",
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # serve's flags, so that the same command line that starts the gateway explains it; --listen has no
    # meaning here, so it is hidden and refused.
    add_quickstart_flags(parser, argparse.SUPPRESS)
    add_now_option(parser)
    parser.add_argument(
        "--sender",
        metavar="ADDRESS",
        help="explain the inbound verdict for this envelope sender only ('<>' for a bounce); for a FILE, "
        "instead of its Return-Path",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    parser.add_argument("subject", metavar="ADDRESS | FILE | -", help="an address, a saved message, or -")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    # Imported here: every other command builds this parser, and none of them needs the email package.
    from ..ops import keystore
    from ..policy import explain
    from ..policy.policy import Policy

    if args.listen is not None:
        raise UsageError("--listen: explain listens nowhere; give --config, --keyring, --domain, --srs-alias")
    given_sender = _given_sender(args.sender)
    subject: str = args.subject
    message = _read_message(subject) if _names_a_message(subject) else None

    config = _config(args)
    policy = Policy(config.policy, keystore.load(config.keyring_path).keyring)
    observe, mode = _inbound_mode(config)
    ledger = _ledger_on(config, policy)
    today = keystore.utc_day(now_of(args))
    context = (("today", explain.date_words(today)), ("inbound", mode))
    if message is not None:
        data, source = message
        explanation = explain.explain_message(
            explain.read_envelope(data),
            policy,
            today,
            source=source,
            given_sender=given_sender,
            observe=observe,
            ledger=ledger,
        )
    else:
        senders = given_sender if given_sender is not None else (None, explain.ANY_SENDER)
        explanation = explain.explain_address(
            subject, policy, today, senders=senders, observe=observe, ledger=ledger
        )
    explanation = replace(explanation, facts=context + explanation.facts)

    if args.json:
        sys.stdout.write(json.dumps(explanation.as_json()) + "\n")
    else:
        sys.stdout.write("".join(line + "\n" for line in explanation.lines()))
    sys.stdout.flush()
    return EXIT_OK if explanation.passes else EXIT_NO


def _given_sender(text: str | None) -> tuple[Address | None] | None:
    if text is None:
        return None
    try:
        return (parse_path(text),)
    except AddressError as exc:
        raise UsageError(f"--sender: {exc}") from None


def _names_a_message(subject: str) -> bool:
    """- and an existing file are messages; so is what can only be a file name (a path or *.eml without an
    '@'), so that a mistyped file name is reported as a missing file rather than as a malformed address."""
    if subject == "-" or os.path.exists(subject):
        return True
    return "@" not in subject and ("/" in subject or subject.endswith(".eml"))


def _read_message(subject: str) -> tuple[bytes, str]:
    """The message's first MAX_MESSAGE bytes and words for where they came from."""
    if subject == "-":
        data, source = sys.stdin.buffer.read(MAX_MESSAGE + 1), "standard input"
    else:
        source = subject
        try:
            with open(subject, "rb") as handle:
                data = handle.read(MAX_MESSAGE + 1)
        except OSError as exc:
            raise GatewayError(f"{subject}: cannot read the message: {exc.strerror or exc}") from None
    if len(data) > MAX_MESSAGE:
        return data[:MAX_MESSAGE], f"{source} (its first {MAX_MESSAGE >> 20} MiB)"
    return data, source


def _config(args: argparse.Namespace) -> Config:
    """The config as `serve` builds it from the same flags (cli_serve.load_config, without listeners)."""
    from ..ops import config as config_module

    base = config_module.load(args.config) if args.config is not None else config_module.embedded_serve()
    return config_module.with_flags(
        base, keyring=args.keyring, domains=tuple(args.domain), srs_alias=args.srs_alias
    )


def _inbound_mode(config: Config) -> tuple[bool, str]:
    """Observe or enforce, and the words for whose: the first inbound listener's, else [policyd]'s."""
    from ..ops.config import Role

    listener = next((lc for lc in config.listeners if lc.role is Role.INBOUND), None)
    if listener is not None:
        observe, whose = listener.observe, f"as the listener {listener.name!r} answers"
    else:
        observe, whose = config.policyd.observe, "as the Postfix policy service ([policyd]) answers"
    return observe, f"{whose}, in {'observe' if observe else 'enforce'} mode"


def _ledger_on(config: Config, policy: Policy) -> bool:
    """Does the inbound verdict defer an untagged bounce to the ledger, as `serve` would? Only a listener
    reads the message ([policyd] never does), with [ledger] enabled and a ledger secret in the keyring."""
    from ..ops.config import Role

    inbound = any(lc.role is Role.INBOUND for lc in config.listeners)
    return inbound and config.ledger.enabled and policy.ledger_keys is not None
