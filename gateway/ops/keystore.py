"""The keyring file: strict load, crash-safe write, a lock between CLI runs, and reload for servers.

The file is TOML (format documented in keys/README.md):

    version = 1
    generation = 3                      # +1 on every change; `keys import` refuses to go backwards
    updated = 2024-01-01T12:00:00Z
    signing_began = 2024-01-01T12:00:00Z  # optional: when `keys init` made the first key (grace window)
    ledger_secret = "base64 of 32 random bytes"  # optional: the Message-ID ledger's key (docs/ledger.md)

    [[key]]
    id = 0
    state = "active"                    # active | verify | retired
    created = 2024-01-01T12:00:00Z
    changed = 2024-01-01T12:00:00Z      # the last state change
    signed_until = 2024-01-08T12:00:00Z # optional: when it last stopped being active
    secret = "base64 of at least 32 random bytes"

Loading is strict, like ssh with a private key: a file that group or others may read is refused, and so
is anything malformed. Every message names the file and, where there is one, the key id; none carries a
secret. The key-management operations (`add_key`, `activate`, `retire`, `prune`) are pure functions of a
`KeyringFile` and `now`, so tests pass the clock instead of sleeping.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import grp
import hashlib
import os
import pwd
import secrets
import stat
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..core.errors import KeyringError
from ..core.keyring import KEY_IDS, MIN_SECRET_BYTES, Key, Keyring, KeyState

FORMAT_VERSION = 1
DEFAULT_PATH = Path("keys/keyring.toml")
# 32 bytes = 256 bits, comfortably above HMAC-SHA1's 160-bit output; more would not add strength.
NEW_SECRET_BYTES = 32
# A retired key is kept this long before deletion, so `keys list` still shows what happened to it.
DEFAULT_GRACE_DAYS = 7
# Hosts of one MX group stop signing with an old key only when they import the keyring that activated the
# new one, and their clocks differ: one extra day keeps their last old-key tags live until they expire.
MARGIN_DAYS = 1
MIN_LEDGER_SECRET = 16  # ledger.MIN_SECRET
DEFAULT_LOCK_TIMEOUT = 10.0

_TOP_KEYS = {"version", "generation", "updated", "signing_began", "ledger_secret", "key"}
_KEY_KEYS = {"id", "state", "created", "changed", "signed_until", "secret"}
_KEY_REQUIRED = _KEY_KEYS - {"signed_until"}


@dataclass(frozen=True)
class KeyringFile:
    """A keyring as stored: the keys plus the metadata that orders copies of it across hosts."""

    keyring: Keyring
    generation: int
    updated: datetime


def utc_day(moment: datetime) -> int:
    """The UTC day number (unix_time // 86400) that tags use as their clock."""
    return int(moment.timestamp()) // 86400


def _now_utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now.astimezone(UTC).replace(microsecond=0)


# ---------------------------------------------------------------- parsing and formatting (pure)


def parse(text: str, source: str) -> KeyringFile:
    """A keyring from TOML text; `source` (the file name) starts every error message."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeyringError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise KeyringError(f"{source}: unknown setting {sorted(unknown)[0]!r}: expected {sorted(_TOP_KEYS)}")
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise KeyringError(f"{source}: version must be {FORMAT_VERSION}, not {version!r}")
    generation = data.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        raise KeyringError(f"{source}: generation must be a whole number of 1 or more")
    updated = _parse_time(data.get("updated"), source, "updated")
    # Absent from keyrings written before it was recorded: such a keyring has no grace window.
    signing_began = None
    if "signing_began" in data:
        signing_began = _parse_time(data["signing_began"], source, "signing_began")
    # Absent from keyrings written before the ledger: the ledger is then off ('keys ledger-secret').
    ledger_secret = None
    if "ledger_secret" in data:
        ledger_secret = _parse_secret(data["ledger_secret"], f"{source}: ledger_secret", MIN_LEDGER_SECRET)
    entries = data.get("key")
    if not isinstance(entries, list) or not entries:
        raise KeyringError(f"{source}: no [[key]] entries: run 'batv-gateway keys init' to create a keyring")
    keys = [_parse_key(entry, source, n) for n, entry in enumerate(entries, 1)]
    seen: set[int] = set()
    for key in keys:
        if key.id in seen:
            raise KeyringError(f"{source}: key {key.id}: the id appears twice: each id may be used once")
        seen.add(key.id)
    active = [k.id for k in keys if k.state is KeyState.ACTIVE]
    if not active:
        raise KeyringError(
            f"{source}: no key is active: exactly one must be; run 'batv-gateway keys activate ID'"
        )
    if len(active) > 1:
        ids = ", ".join(str(i) for i in active)
        raise KeyringError(f"{source}: keys {ids} are all active: exactly one key may be active")
    return KeyringFile(Keyring(tuple(keys), signing_began, ledger_secret), generation, updated)


def _parse_key(entry: Any, source: str, n: int) -> Key:
    if not isinstance(entry, dict):
        raise KeyringError(f"{source}: [[key]] entry {n} is not a table")
    key_id = entry.get("id")
    if not isinstance(key_id, int) or isinstance(key_id, bool) or key_id not in KEY_IDS:
        raise KeyringError(f"{source}: [[key]] entry {n}: id must be a digit 0 to 9, not {key_id!r}")
    where = f"{source}: key {key_id}"
    unknown = set(entry) - _KEY_KEYS
    if unknown:
        raise KeyringError(f"{where}: unknown setting {sorted(unknown)[0]!r}: expected {sorted(_KEY_KEYS)}")
    missing = _KEY_REQUIRED - set(entry)
    if missing:
        raise KeyringError(f"{where}: missing {sorted(missing)[0]!r}")
    try:
        state = KeyState(entry["state"])
    except ValueError:
        states = ", ".join(s.value for s in KeyState)
        raise KeyringError(f"{where}: state must be one of {states}, not {entry['state']!r}") from None
    secret = _parse_secret(entry["secret"], f"{where}: secret", MIN_SECRET_BYTES, "keys add")
    created = _parse_time(entry["created"], where, "created")
    changed = _parse_time(entry["changed"], where, "changed")
    signed_until = None
    if "signed_until" in entry:
        signed_until = _parse_time(entry["signed_until"], where, "signed_until")
    return Key(key_id, secret, state, created, changed, signed_until)


def _parse_secret(encoded: Any, where: str, minimum: int, verb: str = "keys ledger-secret") -> bytes:
    if not isinstance(encoded, str):
        raise KeyringError(f"{where} must be a base64 string")
    try:
        secret = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        # The value itself is not repeated: even a broken secret is partly a secret.
        raise KeyringError(f"{where} is not valid base64") from None
    if len(secret) < minimum:
        raise KeyringError(
            f"{where} is {len(secret)} bytes; at least {minimum} random bytes are needed"
            f" (batv-gateway {verb} makes one)"
        )
    return secret


def _parse_time(value: Any, where: str, name: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise KeyringError(f"{where}: {name} must be a UTC date and time such as 2024-01-01T12:00:00Z")
    return value.astimezone(UTC)


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dump(kf: KeyringFile) -> str:
    """The TOML text of a keyring, in the format `parse` reads (and nothing else)."""
    lines = [
        "# batv-gateway keyring: keep mode 0600. Change it with 'batv-gateway keys', see keys/README.md.",
        f"version = {FORMAT_VERSION}",
        f"generation = {kf.generation}",
        f"updated = {_format_time(kf.updated)}",
    ]
    if kf.keyring.signing_began is not None:
        lines.append(f"signing_began = {_format_time(kf.keyring.signing_began)}")
    if kf.keyring.ledger_secret is not None:
        lines.append(f'ledger_secret = "{base64.b64encode(kf.keyring.ledger_secret).decode("ascii")}"')
    for key in sorted(kf.keyring.keys, key=lambda k: k.id):
        lines += [
            "",
            "[[key]]",
            f"id = {key.id}",
            f'state = "{key.state.value}"',
            f"created = {_format_time(key.created)}",
            f"changed = {_format_time(key.changed)}",
        ]
        if key.signed_until is not None:
            lines.append(f"signed_until = {_format_time(key.signed_until)}")
        lines.append(f'secret = "{base64.b64encode(key.secret).decode("ascii")}"')
    return "\n".join(lines) + "\n"


def kubernetes_secret(kf: KeyringFile, name: str, namespace: str | None = None) -> str:
    """A Kubernetes Secret manifest holding the keyring as the file `keyring.toml` (mount it read-only)."""
    data = base64.b64encode(dump(kf).encode("utf-8")).decode("ascii")
    lines = [
        "apiVersion: v1",
        "kind: Secret",
        "metadata:",
        f"  name: {name}",
    ]
    if namespace:
        lines.append(f"  namespace: {namespace}")
    lines += [
        "  labels:",
        "    app.kubernetes.io/name: batv-gateway",
        "  annotations:",
        f'    batv-gateway/keyring-generation: "{kf.generation}"',
        "type: Opaque",
        "data:",
        f"  keyring.toml: {data}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- key management (pure)


def _bump(kf: KeyringFile, keys: tuple[Key, ...], now: datetime) -> KeyringFile:
    return KeyringFile(replace(kf.keyring, keys=keys), kf.generation + 1, now)


def new_keyring(
    now: datetime,
    token: Callable[[int], bytes] = secrets.token_bytes,
    *,
    record_start: bool = False,
    ledger: bool = False,
) -> KeyringFile:
    """A first keyring: key 0, active; with `ledger`, a ledger secret too (`keys init` and serve's
    development keyring ask for it; the throwaway keyrings of tests and the demo do not).

    `record_start` records `now` as when signing began, which opens the inbound grace window for bounces
    to untagged addresses. `keys init` asks for it; the throwaway keyrings of `serve` and the demo do not,
    so that they show enforcement from the first minute.
    """
    now = _now_utc(now)
    key = Key(0, token(NEW_SECRET_BYTES), KeyState.ACTIVE, now, now)
    began = now if record_start else None
    ledger_secret = token(NEW_SECRET_BYTES) if ledger else None
    return KeyringFile(Keyring((key,), signing_began=began, ledger_secret=ledger_secret), 1, now)


def add_ledger_secret(
    kf: KeyringFile, now: datetime, token: Callable[[int], bytes] = secrets.token_bytes
) -> KeyringFile:
    """The keyring with a ledger secret, for one written before the ledger existed. One that has a
    secret keeps it: a new secret forgets every record, and answers to mail sent before are refused."""
    if kf.keyring.ledger_secret is not None:
        return kf
    keyring = replace(kf.keyring, ledger_secret=token(NEW_SECRET_BYTES))
    return KeyringFile(keyring, kf.generation + 1, _now_utc(now))


def free_key_id(kf: KeyringFile) -> int:
    """The next id to hand out, cycling on from the newest key so a freed id is reused as late as possible.

    An id is free only when no key holds it. Keys are deleted only by `prune`, and only once every tag
    they signed has expired, so a free id never meets a live tag of an older key.
    """
    used = {k.id for k in kf.keyring.keys}
    newest = max(kf.keyring.keys, key=lambda k: (k.created, k.id))
    for step in range(1, len(KEY_IDS) + 1):
        candidate = (newest.id + step) % len(KEY_IDS)
        if candidate not in used:
            return candidate
    raise KeyringError(
        "all ten key ids 0-9 are in use: run 'batv-gateway keys prune' to retire and delete keys whose"
        " tags have expired, then try again"
    )


def add_key(
    kf: KeyringFile, now: datetime, token: Callable[[int], bytes] = secrets.token_bytes
) -> tuple[KeyringFile, Key]:
    """A new `verify` key: it verifies at once, so it can reach every host before it signs anywhere."""
    now = _now_utc(now)
    key = Key(free_key_id(kf), token(NEW_SECRET_BYTES), KeyState.VERIFY, now, now)
    return _bump(kf, (*kf.keyring.keys, key), now), key


def _find(kf: KeyringFile, key_id: int) -> Key:
    key = kf.keyring.get(key_id)
    if key is None:
        ids = ", ".join(str(k.id) for k in sorted(kf.keyring.keys, key=lambda k: k.id))
        raise KeyringError(f"there is no key {key_id}: the keyring holds keys {ids}")
    return key


def activate(kf: KeyringFile, key_id: int, now: datetime) -> KeyringFile:
    """Make `key_id` the signing key; the previous active key keeps verifying (state `verify`)."""
    now = _now_utc(now)
    target = _find(kf, key_id)
    if target.state is KeyState.ACTIVE:
        return kf
    if target.state is KeyState.RETIRED:
        raise KeyringError(
            f"key {key_id} is retired and cannot sign again: run 'batv-gateway keys add' for a new key"
        )
    keys = []
    for key in kf.keyring.keys:
        if key.state is KeyState.ACTIVE:
            key = replace(key, state=KeyState.VERIFY, changed=now, signed_until=now)
        elif key.id == key_id:
            key = replace(key, state=KeyState.ACTIVE, changed=now, signed_until=None)
        keys.append(key)
    return _bump(kf, tuple(keys), now)


def retire(kf: KeyringFile, key_id: int, now: datetime) -> KeyringFile:
    """Stop a key from verifying. The active key cannot be retired: activate another first."""
    now = _now_utc(now)
    target = _find(kf, key_id)
    if target.state is KeyState.ACTIVE:
        raise KeyringError(
            f"key {key_id} is the active key: activate another key first ('batv-gateway keys rotate')"
        )
    if target.state is KeyState.RETIRED:
        return kf
    keys = tuple(
        replace(k, state=KeyState.RETIRED, changed=now) if k.id == key_id else k for k in kf.keyring.keys
    )
    return _bump(kf, keys, now)


def tags_live_until_day(key: Key, max_tag_days: int) -> int | None:
    """The last UTC day on which a tag signed by `key` can still verify; None while it signs.

    A prvs tag signed on day D verifies through day D + lifetime, an SRS address through D + max age,
    so a key that stopped signing on day S has live tags through S + the longer of the two, plus
    MARGIN_DAYS for the other hosts of an MX group.
    """
    if key.state is KeyState.ACTIVE:
        return None
    if key.signed_until is None:
        return utc_day(key.created) - 1  # it never signed: no tag of it exists
    return utc_day(key.signed_until) + max_tag_days + MARGIN_DAYS


@dataclass(frozen=True)
class PruneReport:
    retired: tuple[int, ...]
    deleted: tuple[int, ...]


def prune(
    kf: KeyringFile, now: datetime, max_tag_days: int, grace_days: int = DEFAULT_GRACE_DAYS
) -> tuple[KeyringFile, PruneReport]:
    """Retire `verify` keys all of whose tags have expired; delete retired keys after `grace_days`.

    A verify key that never signed is kept: it is a new key on its way to every host (see the runbook).
    A retired key is deleted only once its grace period is over and its tags have expired, so that its
    id can be handed out again safely.
    """
    now = _now_utc(now)
    today = utc_day(now)
    retired: list[int] = []
    deleted: list[int] = []
    keys: list[Key] = []
    for key in kf.keyring.keys:
        live_until = tags_live_until_day(key, max_tag_days)
        if key.state is KeyState.VERIFY and key.signed_until is not None and live_until is not None:
            if today > live_until:
                key = replace(key, state=KeyState.RETIRED, changed=now)
                retired.append(key.id)
        elif key.state is KeyState.RETIRED and live_until is not None:
            if today > live_until and now - key.changed >= timedelta(days=grace_days):
                deleted.append(key.id)
                continue
        keys.append(key)
    report = PruneReport(tuple(retired), tuple(deleted))
    if not retired and not deleted:
        return kf, report
    return _bump(kf, tuple(keys), now), report


# ---------------------------------------------------------------- the file on disk


def check_permissions(path: Path, st: os.stat_result) -> None:
    """Refuse a keyring that anyone but its owner may read or write, as ssh refuses a loose private key.

    One exception, PostgreSQL's rule for its TLS key: a root-owned file may also be read by its group
    (0640, 0440), because only root chose that group. A Kubernetes Secret volume with fsGroup looks like
    that (root:fsGroup, 0440), and so does the Debian ssl-cert pattern.
    """
    if not stat.S_ISREG(st.st_mode):
        raise KeyringError(f"{path}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    allowed = 0o040 if st.st_uid == 0 else 0
    if mode & 0o077 & ~allowed:
        what = "readable" if mode & 0o044 & ~allowed else "writable" if mode & 0o022 else "accessible"
        raise KeyringError(
            f"{path}: keyring is {what} by group or others (mode {mode:04o}); it is refused, as ssh refuses"
            f" a loose private key: fix it with 'chmod 600 {path}'"
        )


def _read(path: Path) -> tuple[bytes, os.stat_result]:
    """The whole file and the stat of the very file read (fstat, so a rename in between cannot mix them)."""
    try:
        # Symbolic links are followed: a Kubernetes Secret volume is made of them. The mode checked is
        # the file's own (fstat of what was opened).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyringError(f"{path}: no keyring here: create one with 'batv-gateway keys init'") from None
    except OSError as exc:
        raise KeyringError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        check_permissions(path, st)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyringError(f"{path}: not UTF-8 text") from None


def load(path: Path) -> KeyringFile:
    """Read and check a keyring file; raises KeyringError naming the file (and key id) and the fix."""
    data, _ = _read(path)
    return parse(_decode(data, path), str(path))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` so that, whenever the process dies, it holds either the old or the new content.

    The temp file is made in the same folder (a rename is atomic only within one file system), with mode
    0600 from the start (mkstemp), and fsynced before the rename; the folder is fsynced after it, so the
    rename itself survives a power cut.

    A file that exists keeps its owner, group and mode: `keys import` run as root over ssh must not hand
    the gateway's user a keyring it cannot read (the reload is refused, the next start fails). When this
    user cannot give the new file that owner, nothing is written (KeyringError). A new file gets mode
    0600 and the caller's owner.
    """
    path = _real(path)
    folder = path.parent
    try:
        existing: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        existing = None
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            if existing is not None:
                _keep_owner_and_mode(handle.fileno(), path, existing)
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(folder)


def _keep_owner_and_mode(fd: int, path: Path, existing: os.stat_result) -> None:
    """Give the temp file (open as `fd`) the owner, group and mode of the file it will replace."""
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (existing.st_uid, existing.st_gid):
        try:
            os.fchown(fd, existing.st_uid, existing.st_gid)
        except PermissionError:
            user = _user_name(existing.st_uid)
            fix = "as root" if existing.st_uid == 0 else f"as {user} (sudo -u {user} batv-gateway keys ...)"
            raise KeyringError(
                f"{path}: belongs to {user}:{_group_name(existing.st_gid)} and this user"
                f" ({_user_name(os.geteuid())}) cannot keep that owner, so the file was left as it is:"
                f" run the command {fix}"
            ) from None
    # Never more than check_permissions lets a keyring have (root's group may read): a write must not
    # open up a file that was too loose to load in the first place.
    os.fchmod(fd, stat.S_IMODE(existing.st_mode) & 0o740)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def save(path: Path, kf: KeyringFile) -> None:
    """Write a keyring crash-safely. Call it under `locked(path)` when the change was read-modify-write."""
    # Parse what we are about to write: a bug here must never leave a keyring that will not load.
    text = dump(kf)
    parse(text, str(path))
    write_atomic(path, text)


def _real(path: Path) -> Path:
    """The file behind any symbolic links: a write must replace it, not the link."""
    return Path(os.path.realpath(path))


def lock_path(path: Path) -> Path:
    real = _real(path)
    return real.with_name(real.name + ".lock")


@contextlib.contextmanager
def locked(path: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path`.lock so that two `keys` commands do not interleave.

    A separate lock file, because the keyring itself is replaced by rename and a lock on the old inode
    would not stop a writer that opened the new one.
    """
    lock_file = lock_path(path)
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise KeyringError(f"{lock_file}: cannot open the lock file: {exc.strerror}") from None
    try:
        _lock_owned_like_keyring(fd, path)
        deadline = time.monotonic() + (DEFAULT_LOCK_TIMEOUT if timeout is None else timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise KeyringError(
                        f"{lock_file}: another batv-gateway keys command holds the lock; try again"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_owned_like_keyring(fd: int, path: Path) -> None:
    """As root, give the lock file the keyring's owner: one it could not open would make every later
    `keys` command of the gateway's user (its cron rotate) fail."""
    if os.geteuid() != 0:
        return
    try:
        keyring = os.stat(path)
    except OSError:
        return
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (keyring.st_uid, keyring.st_gid):
        os.fchown(fd, keyring.st_uid, keyring.st_gid)


# ---------------------------------------------------------------- reload (for servers)


@dataclass(frozen=True)
class Reload:
    """What a `KeyringLoader.poll()` found.

    `keyring` is the keyring to use now: the new one if the file changed and is valid, otherwise the last
    good one (None if there never was one). `error` says why a changed file was refused.
    """

    changed: bool
    keyring: KeyringFile | None
    error: KeyringError | None = None


class KeyringLoader:
    """Reloads a keyring file when it changes, and never hands out a half-read or invalid keyring.

    Writers replace the file by rename, so one open-and-read sees one whole version. A change is noticed
    from the file's identity and times (inode, size, mtime, ctime: a chmod changes ctime), then confirmed
    with a hash of the content, so touching the file is not reported as a change.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, ...] | None = None
        self._digest: bytes | None = None
        self._current: KeyringFile | None = None

    @property
    def current(self) -> KeyringFile | None:
        return self._current

    def poll(self) -> Reload:
        """Look at the file once. An error is reported once per version of the file, not on every poll."""
        signature = _stat_signature(self.path)
        if signature == self._signature:
            return Reload(False, self._current)
        self._signature = signature
        try:
            data, st = _read(self.path)
        except KeyringError as exc:
            return Reload(False, self._current, exc)
        # The fstat of the file actually read: if it was replaced after our stat, the next poll sees it.
        self._signature = _signature(st)
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return Reload(False, self._current)
        self._digest = digest
        try:
            kf = parse(_decode(data, self.path), str(self.path))
        except KeyringError as exc:
            return Reload(False, self._current, exc)
        if self._current is not None and kf == self._current:
            return Reload(False, self._current)
        self._current = kf
        return Reload(True, kf)


def _stat_signature(path: Path) -> tuple[int, ...]:
    try:
        return _signature(os.stat(path))
    except OSError as exc:
        return (-1, exc.errno or 0)


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
