"""`batv-gateway keys ...`: create, list, rotate, retire, prune, export and import keys.

Every change is one read-modify-write under the keyring's lock (keystore.locked), written crash-safely
(keystore.save). The rules themselves (which id is free, what prune may drop) live in keystore.py; this
module only parses flags and prints. Nothing here prints a secret, except `export`, whose job it is.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..core.errors import KeyringError, UsageError
from ..core.keyring import Key
from ..ops import keystore
from .main import (
    EXIT_OK,
    Settings,
    add_config_option,
    add_now_option,
    now_of,
    settings_of,
)

KEYS = "[--keyring PATH | --config FILE]"


def register(subparsers: Any) -> None:
    keys = subparsers.add_parser(
        "keys", prog="batv-gateway keys",
        help="manage the keyring: init, list, add, activate, rotate, retire, prune, export, import, "
        "ledger-secret",
        usage="batv-gateway keys "
        "{init,list,add,activate,rotate,retire,prune,export,import,ledger-secret} ...",
        description="Manage the keyring file (default keys/keyring.toml; see keys/README.md).",
    )
    keys.set_defaults(help_parser=keys)
    verbs = keys.add_subparsers(title="commands", metavar="COMMAND")

    def verb(name: str, synopsis: str, description: str, handler: Callable[[argparse.Namespace], int],
             now: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = verbs.add_parser(
            name, prog=f"batv-gateway keys {name}", help=description.split(".")[0],
            usage=f"batv-gateway keys {name} {synopsis}",
            description=description,
        )
        parser.add_argument("--keyring", metavar="PATH", type=Path,
                            help="the keyring file (default: from --config, else keys/keyring.toml)")
        add_config_option(parser)
        if now:
            add_now_option(parser)
        parser.set_defaults(handler=handler)
        return parser

    verb("init", f"{KEYS} [--now TIME]",
         "Create a keyring with one active key, and record that signing begins now. An existing keyring "
         "is left as it is (exit 0), so provisioning may run it every time.", _init)
    p = verb("list", f"{KEYS} [--now TIME] [--json]",
             "Show each key's id, state, age and fingerprint (first 8 hex digits of SHA-256 of the "
             "secret), never the secret.", _list)
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    verb("add", f"{KEYS} [--now TIME]",
         "Add a new key in state verify: it verifies at once and signs only once activated.", _add)
    p = verb("activate", f"{KEYS} [--now TIME] ID",
             "Make key ID the signing key. The previous active key keeps verifying (state verify).",
             _activate)
    p.add_argument("id", metavar="ID", type=_key_id)
    p = verb("rotate", f"{KEYS} [--now TIME] [--no-prune] [--lifetime DAYS] [--srs-max-age DAYS] "
             "[--grace DAYS]",
             "Prune, add a key and activate it, in one step: the command a cron job runs.", _rotate)
    _prune_options(p)
    p.add_argument("--no-prune", action="store_true", help="do not prune first")
    p = verb("retire", f"{KEYS} [--now TIME] ID",
             "Stop key ID from verifying. Tags it signed are refused from then on.", _retire)
    p.add_argument("id", metavar="ID", type=_key_id)
    p = verb("prune", f"{KEYS} [--now TIME] [--lifetime DAYS] [--srs-max-age DAYS] [--grace DAYS] "
             "[--dry-run]",
             "Retire keys that stopped signing longer ago than the longest tag lifetime (the BATV "
             "lifetime or the SRS maximum age), and delete retired keys after a grace period.", _prune)
    _prune_options(p)
    p.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    p = verb("export", f"{KEYS} [--format {{toml,kubernetes}}] [--name NAME] [--namespace NS] "
             "[--output FILE]",
             "Write the keyring, secrets included, for another MX host ('keys import') or as a "
             "Kubernetes Secret manifest.", _export, now=False)
    p.add_argument("--format", choices=("toml", "kubernetes"), default="toml")
    p.add_argument("--name", default="batv-gateway-keyring", help="the Secret's name (kubernetes)")
    p.add_argument("--namespace", help="the Secret's namespace (kubernetes)")
    p.add_argument("--output", "-o", metavar="FILE", type=Path,
                   help="write to FILE (mode 0600) instead of standard output")
    p = verb("import", f"{KEYS} FILE | -",
             "Replace the keyring with an exported one (TOML or a Kubernetes Secret manifest). "
             "Refuses to replace a newer keyring (higher generation) with an older one.", _import,
             now=False)
    p.add_argument("file", metavar="FILE", help="an export, or - for standard input")
    verb("ledger-secret", f"{KEYS} [--now TIME]",
         "Give a keyring made before the Message-ID ledger its secret (docs/ledger.md); the ledger is "
         "off without one. A keyring that has one keeps it (exit 0): a new secret would forget every "
         "record. Export and import the keyring afterwards so that every host shares it.", _ledger_secret)


def _prune_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lifetime", metavar="DAYS", type=_days,
                        help="BATV tag lifetime (default: from --config, else 7)")
    parser.add_argument("--srs-max-age", metavar="DAYS", type=_days,
                        help="SRS maximum age (default: from --config, else 21)")
    parser.add_argument("--grace", metavar="DAYS", type=_days, default=keystore.DEFAULT_GRACE_DAYS,
                        help="days a retired key is kept before it is deleted "
                        f"(default {keystore.DEFAULT_GRACE_DAYS})")


def _key_id(text: str) -> int:
    if not re.fullmatch(r"[0-9]", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a key id: key ids are the digits 0 to 9")
    return int(text)


def _days(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days")
    return int(text)


def _settings(args: argparse.Namespace) -> Settings:
    return settings_of(args)


def _path(args: argparse.Namespace) -> Path:
    explicit: Path | None = args.keyring
    return explicit if explicit is not None else _settings(args).keyring_path


def _max_tag_days(args: argparse.Namespace) -> int:
    # The config is read only if a flag leaves a lifetime open.
    settings = _settings(args) if args.lifetime is None or args.srs_max_age is None else Settings()
    lifetime = args.lifetime if args.lifetime is not None else settings.lifetime_days
    srs_max_age = args.srs_max_age if args.srs_max_age is not None else settings.srs_max_age_days
    return max(int(lifetime), int(srs_max_age))


def _change(
    args: argparse.Namespace, change: Callable[[keystore.KeyringFile], keystore.KeyringFile]
) -> tuple[keystore.KeyringFile, keystore.KeyringFile]:
    """Load, change and save under the lock; (before, after). Nothing is written if nothing changed."""
    path = _path(args)
    with keystore.locked(path):
        before = keystore.load(path)
        after = change(before)
        if after is not before:
            keystore.save(path, after)
    return before, after


def _describe(key: Key) -> str:
    return f"key {key.id} ({key.state.value}, fingerprint {key.fingerprint})"


# ---------------------------------------------------------------- the verbs


def _init(args: argparse.Namespace) -> int:
    path = _path(args)
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    with keystore.locked(path):
        if path.exists() or path.is_symlink():
            # Idempotent for provisioning (Ansible, cloud-init): not an error, and not a single byte,
            # owner or mode changed.
            print(f"{path}: a keyring already exists; left as it is")
            return EXIT_OK
        kf = keystore.new_keyring(now_of(args), record_start=True, ledger=True)
        keystore.save(path, kf)
    print(f"{path}: created with {_describe(kf.keyring.active)}")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    path = _path(args)
    kf = keystore.load(path)
    now = now_of(args)
    rows = []
    for key in sorted(kf.keyring.keys, key=lambda k: k.id):
        rows.append({
            "id": key.id,
            "state": key.state.value,
            "age_days": max(0, (now - key.created).days),
            "fingerprint": key.fingerprint,
            "created": _iso(key.created),
            "changed": _iso(key.changed),
            "signed_until": _iso(key.signed_until) if key.signed_until else None,
        })
    began = kf.keyring.signing_began
    if args.json:
        document = {"keyring": str(path), "generation": kf.generation, "updated": _iso(kf.updated),
                    "signing_began": _iso(began) if began else None, "keys": rows}
        print(json.dumps(document, indent=2))
        return EXIT_OK
    print(f"# {path}: generation {kf.generation}, updated {_iso(kf.updated)}")
    print(f"# {signing_began_line(kf.keyring.signing_began, _settings(args).lifetime_days)}")
    print(f"{'ID':<3}{'STATE':<9}{'AGE':>6}  {'FINGERPRINT':<12}{'CREATED':<22}CHANGED")
    for row in rows:
        print(f"{row['id']:<3}{row['state']:<9}{str(row['age_days']) + 'd':>6}  {row['fingerprint']:<12}"
              f"{row['created']:<22}{row['changed']}")
    return EXIT_OK


def signing_began_line(began: datetime | None, lifetime_days: int) -> str:
    """What `keys list` and check-config say about the grace window for bounces to untagged addresses."""
    if began is None:
        return ("no signing start recorded (a keyring from before it was): no grace window for bounces"
                " to untagged addresses")
    ends = datetime.fromtimestamp((keystore.utc_day(began) + lifetime_days) * 86400, UTC)
    return (f"signing began {_iso(began)}: bounces to untagged addresses are accepted until {_iso(ends)}"
            " unless [policy] bounce_grace = false")


def _add(args: argparse.Namespace) -> int:
    added: list[Key] = []

    def change(kf: keystore.KeyringFile) -> keystore.KeyringFile:
        new, key = keystore.add_key(kf, now_of(args))
        added.append(key)
        return new

    _change(args, change)
    print(f"added {_describe(added[0])}; activate it with 'batv-gateway keys activate {added[0].id}'")
    return EXIT_OK


def _activate(args: argparse.Namespace) -> int:
    before, after = _change(args, lambda kf: keystore.activate(kf, args.id, now_of(args)))
    if after is before:
        print(f"key {args.id} is already active")
    else:
        old = before.keyring.active.id
        print(f"activated {_describe(after.keyring.active)}; key {old} now verifies only")
    return EXIT_OK


def _rotate(args: argparse.Namespace) -> int:
    messages: list[str] = []
    max_tag_days = _max_tag_days(args)
    refused: list[KeyringError] = []

    def change(kf: keystore.KeyringFile) -> keystore.KeyringFile:
        now = now_of(args)
        if not args.no_prune:
            kf, report = keystore.prune(kf, now, max_tag_days, args.grace)
            messages.extend(_prune_messages(report))
        old = kf.keyring.active
        try:
            added, key = keystore.add_key(kf, now)
        except KeyringError as exc:
            # No free id: still keep what prune did, so the grace period of the keys it retired starts
            # now and a later run finds ids to hand out.
            refused.append(exc)
            return kf
        kf = keystore.activate(added, key.id, now)
        messages.append(f"activated new {_describe(kf.keyring.active)}; key {old.id} now verifies only")
        return kf

    _change(args, change)
    for line in messages:
        print(line)
    if refused:
        raise refused[0]
    return EXIT_OK


def _retire(args: argparse.Namespace) -> int:
    before, after = _change(args, lambda kf: keystore.retire(kf, args.id, now_of(args)))
    if after is before:
        print(f"key {args.id} is already retired")
        return EXIT_OK
    key = before.keyring.get(args.id)
    assert key is not None
    settings = _settings(args)
    live = keystore.tags_live_until_day(key, max(settings.lifetime_days, settings.srs_max_age_days))
    if live is not None and live >= keystore.utc_day(now_of(args)):
        # Allowed (a leaked key must go at once), but the operator should know what it costs.
        print(f"warning: key {args.id} may still have live tags; bounces to them will now be refused",
              file=sys.stderr)
    print(f"retired key {args.id}")
    return EXIT_OK


def _prune_messages(report: keystore.PruneReport) -> list[str]:
    lines = [f"retired key {i}: every tag it signed has expired" for i in report.retired]
    lines += [f"deleted retired key {i}: its id may be handed out again" for i in report.deleted]
    return lines


def _prune(args: argparse.Namespace) -> int:
    max_tag_days = _max_tag_days(args)
    reports: list[keystore.PruneReport] = []

    def change(kf: keystore.KeyringFile) -> keystore.KeyringFile:
        new, report = keystore.prune(kf, now_of(args), max_tag_days, args.grace)
        reports.append(report)
        return kf if args.dry_run else new

    _change(args, change)
    lines = _prune_messages(reports[0])
    prefix = "would have " if args.dry_run else ""
    for line in lines:
        print(prefix + line)
    if not lines:
        print("nothing to prune")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    kf = keystore.load(_path(args))
    if args.format == "kubernetes":
        text = keystore.kubernetes_secret(kf, args.name, args.namespace)
    else:
        text = keystore.dump(kf)
    output: Path | None = args.output
    if output is None:
        sys.stdout.write(text)
    else:
        keystore.write_atomic(output, text)
        print(f"{output}: exported generation {kf.generation} ({len(kf.keyring.keys)} keys)", file=sys.stderr)
    return EXIT_OK


_MANIFEST_DATA = re.compile(r"^\s+keyring\.toml:\s*(\S+)\s*$", re.MULTILINE)


def _import_text(text: str, source: str) -> keystore.KeyringFile:
    """An export in either format: TOML as written by `export`, or our Kubernetes Secret manifest."""
    if re.match(r"\s*apiVersion:", text):
        found = _MANIFEST_DATA.search(text)
        if found is None:
            raise KeyringError(f"{source}: a manifest without data 'keyring.toml'")
        try:
            text = base64.b64decode(found.group(1), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise KeyringError(f"{source}: data 'keyring.toml' is not base64 of UTF-8 text") from None
    return keystore.parse(text, source)


def _import(args: argparse.Namespace) -> int:
    if args.file == "-":
        source, text = "<stdin>", sys.stdin.read()
    else:
        try:
            source, text = args.file, Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{args.file}: cannot read: {exc}") from None
    incoming = _import_text(text, source)
    path = _path(args)
    with keystore.locked(path):
        current = keystore.load(path) if path.exists() else None
        if current is not None:
            if incoming.generation < current.generation:
                raise KeyringError(
                    f"{source}: generation {incoming.generation} is older than {path} (generation "
                    f"{current.generation}); import refuses to downgrade: export again from the newest host"
                )
            if incoming.generation == current.generation:
                if incoming == current:
                    print(f"{path}: already at generation {current.generation}; nothing to do")
                    return EXIT_OK
                raise KeyringError(
                    f"{source}: generation {incoming.generation} differs from {path} at the same generation:"
                    " the keyrings were changed on two hosts; make changes on one host and export from it"
                )
        keystore.save(path, incoming)
    print(f"{path}: imported generation {incoming.generation}, active {_describe(incoming.keyring.active)}")
    return EXIT_OK


def _ledger_secret(args: argparse.Namespace) -> int:
    path = _path(args)
    before, after = _change(args, lambda kf: keystore.add_ledger_secret(kf, now_of(args)))
    if after is before:
        print(f"{path}: the keyring has a ledger secret already; left as it is")
    else:
        print(f"{path}: added a ledger secret (generation {after.generation}); the Message-ID ledger "
              "turns on at the next start of serve; export and import this keyring on the other hosts")
    return EXIT_OK


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

