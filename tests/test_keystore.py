"""The keyring file: strict load, permission check, crash-safe write, lock, id cycling, prune, reload."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.core.errors import KeyringError
from gateway.core.keyring import Key, KeyState
from gateway.ops import keystore

T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SECRET = b"S" * 32
SECRET_B64 = base64.b64encode(SECRET).decode()


def counter_token(start: int = 1):  # type: ignore[no-untyped-def]
    """Deterministic 32-byte secrets, so tests can tell keys apart without randomness."""
    state = {"n": start}

    def token(n: int) -> bytes:
        state["n"] += 1
        return bytes([state["n"] % 256]) * n

    return token


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


def keyring_text(*entries: str, generation: int = 1) -> str:
    head = f"version = 1\ngeneration = {generation}\nupdated = 2024-01-01T12:00:00Z\n"
    return head + "".join(entries)


def entry(key_id: int, state: str = "active", secret: str = SECRET_B64, extra: str = "") -> str:
    return (
        f'\n[[key]]\nid = {key_id}\nstate = "{state}"\ncreated = 2024-01-01T12:00:00Z\n'
        f'changed = 2024-01-01T12:00:00Z\nsecret = "{secret}"\n{extra}'
    )


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "keyring.toml"
    keystore.save(path, keystore.new_keyring(T0, counter_token(), record_start=True))
    return path


# ---------------------------------------------------------------- format


def test_new_keyring_round_trips_through_the_file_with_mode_0600(saved: Path) -> None:
    loaded = keystore.load(saved)
    assert oct(saved.stat().st_mode & 0o777) == "0o600"
    assert loaded.generation == 1
    assert loaded.updated == T0
    (key,) = loaded.keyring.keys
    assert (key.id, key.state, key.created, key.changed) == (0, KeyState.ACTIVE, T0, T0)
    assert key.signed_until is None
    assert len(key.secret) == 32
    assert keystore.parse(keystore.dump(loaded), "x") == loaded


def test_signing_began_is_recorded_once_and_travels_with_every_change_and_copy(saved: Path) -> None:
    kf = keystore.load(saved)
    assert kf.keyring.signing_began == T0
    assert kf.keyring.signing_began_day == 19723  # 2024-01-01
    assert "\nsigning_began = 2024-01-01T12:00:00Z\n" in saved.read_text()
    later = T0 + 40 * DAY
    changed, key = keystore.add_key(kf, later, counter_token(7))
    changed = keystore.activate(changed, key.id, later)
    changed, _ = keystore.prune(changed, later + 30 * DAY, 21)
    assert changed.generation == 4
    keystore.save(saved, changed)
    copied = keystore.parse(keystore.dump(keystore.load(saved)), "export")  # what `keys import` reads
    assert copied == changed and copied.keyring.signing_began == T0


def test_a_keyring_from_before_signing_began_was_recorded_loads_without_one(tmp_path: Path) -> None:
    assert keystore.new_keyring(T0).keyring.signing_began is None  # only `keys init` asks for a start
    text = keyring_text(entry(0))
    kf = keystore.load(write(tmp_path / "old.toml", text))
    assert kf.keyring.signing_began is None and kf.keyring.signing_began_day is None
    # Written back as it came: no start is made up (that would open a grace window nobody asked for).
    assert "signing_began" not in keystore.dump(kf)
    assert keystore.add_key(kf, T0, counter_token())[0].keyring.signing_began is None


def test_new_secrets_come_from_the_secrets_module_and_differ() -> None:
    first = keystore.new_keyring(T0).keyring.active.secret
    second = keystore.new_keyring(T0).keyring.active.secret
    assert len(first) == keystore.NEW_SECRET_BYTES >= 32
    assert first != second


def test_a_valid_hand_written_keyring_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path / "k.toml",
        keyring_text(
            entry(3, "active"),
            entry(4, "verify", base64.b64encode(b"v" * 40).decode(), "signed_until = 2024-01-02T00:00:00Z\n"),
            entry(5, "retired", base64.b64encode(b"r" * 32).decode()),
        ),
    )
    kf = keystore.load(path)
    assert kf.keyring.active.id == 3
    assert kf.keyring.get(4) == Key(4, b"v" * 40, KeyState.VERIFY, T0, T0, datetime(2024, 1, 2, tzinfo=UTC))
    assert kf.keyring.verifier(5) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (keyring_text(entry(0, secret="not*base64!")), "key 0: secret is not valid base64"),
        (
            keyring_text(entry(2, secret=base64.b64encode(b"short").decode())),
            "key 2: secret is 5 bytes; at least 32",
        ),
        (keyring_text(entry(1), entry(1, "verify")), "key 1: the id appears twice"),
        (keyring_text(entry(0, "verify")), "no key is active"),
        (keyring_text(entry(0), entry(1)), "keys 0, 1 are all active"),
        (keyring_text(entry(10)), "id must be a digit 0 to 9"),
        (keyring_text(entry(0, "sleeping")), "key 0: state must be one of active, verify, retired"),
        (keyring_text(entry(0, extra="colour = 1\n")), "key 0: unknown setting 'colour'"),
        (keyring_text(entry(0)) + "extra = 1\n", "unknown setting 'extra'"),
        (keyring_text(entry(0)).replace("version = 1", "version = 2"), "version must be 1"),
        (keyring_text(entry(0)).replace("generation = 1", "generation = 0"), "generation must be"),
        (
            keyring_text(entry(0)).replace("created = 2024-01-01T12:00:00Z", "created = 2024-01-01T12:00:00"),
            "key 0: created must be a UTC date and time",
        ),
        (keyring_text(), "no [[key]] entries"),
        (
            keyring_text(entry(0)).replace("\n[[key]]", 'signing_began = "2024-01-01"\n\n[[key]]'),
            "signing_began must be a UTC date and time",
        ),
        (
            keyring_text(entry(0)).replace("\n[[key]]", "signing_began = 2024-01-01T12:00:00\n\n[[key]]"),
            "signing_began must be a UTC date and time",
        ),
        ("version = [", "not valid TOML"),
    ],
)
def test_a_malformed_keyring_is_refused_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(KeyringError) as caught:
        keystore.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert SECRET_B64 not in message and "not*base64!" not in message


def test_a_keyring_readable_by_group_or_others_is_refused_with_the_chmod_fix(saved: Path) -> None:
    saved.chmod(0o644)
    with pytest.raises(KeyringError) as caught:
        keystore.load(saved)
    assert str(caught.value) == (
        f"{saved}: keyring is readable by group or others (mode 0644); it is refused, as ssh refuses"
        f" a loose private key: fix it with 'chmod 600 {saved}'"
    )
    saved.chmod(0o620)
    with pytest.raises(KeyringError, match="writable by group or others"):
        keystore.load(saved)
    saved.chmod(0o600)
    assert keystore.load(saved).keyring.active.id == 0


def test_a_missing_keyring_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="keys init"):
        keystore.load(tmp_path / "none.toml")


def test_a_symlinked_keyring_loads_and_writes_go_to_the_real_file(saved: Path) -> None:
    # A Kubernetes Secret volume is a tree of symbolic links.
    link = saved.with_name("link.toml")
    link.symlink_to(saved)
    kf = keystore.load(link)
    new, _ = keystore.add_key(kf, T0 + DAY, counter_token(60))
    with keystore.locked(link):
        keystore.save(link, new)
    assert link.is_symlink() and keystore.load(saved) == new
    assert keystore.lock_path(link) == keystore.lock_path(saved)
    saved.chmod(0o644)
    with pytest.raises(KeyringError, match=f"chmod 600 {link}"):
        keystore.load(link)


def fake_stat(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 1, 1, 1, uid, 0, 10, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "refused"),
    [
        (0o600, 1000, False),
        (0o400, 1000, False),
        (0o640, 1000, True),  # group-readable and not root's: refused, as ssh does
        (0o604, 1000, True),
        (
            0o640,
            0,
            False,
        ),  # root-owned, group-readable: PostgreSQL's exception (Kubernetes fsGroup, ssl-cert)
        (0o440, 0, False),
        (0o644, 0, True),  # others may read: always refused
        (0o660, 0, True),  # group may write: always refused
    ],
)
def test_permission_rule(mode: int, uid: int, refused: bool) -> None:
    path = Path("/etc/batv-gateway/keyring.toml")
    if refused:
        with pytest.raises(KeyringError, match=f"mode {mode:04o}.*'chmod 600 {path}'"):
            keystore.check_permissions(path, fake_stat(mode, uid))
    else:
        keystore.check_permissions(path, fake_stat(mode, uid))


def test_no_secret_in_reprs() -> None:
    kf = keystore.new_keyring(T0, counter_token())
    secret = kf.keyring.active.secret
    for text in (repr(kf), repr(kf.keyring), repr(kf.keyring.active), str(kf)):
        assert repr(secret) not in text and base64.b64encode(secret).decode() not in text


def test_kubernetes_secret_manifest_carries_the_keyring_file() -> None:
    kf = keystore.new_keyring(T0, counter_token())
    manifest = keystore.kubernetes_secret(kf, "gw-keys", "mail")
    assert "kind: Secret\n" in manifest and "  namespace: mail\n" in manifest
    data = manifest.split("keyring.toml: ")[1].strip()
    assert keystore.parse(base64.b64decode(data).decode(), "m") == kf


# ---------------------------------------------------------------- crash safety and the lock


def test_a_failure_between_write_and_rename_leaves_the_old_keyring_intact(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = saved.read_bytes()
    new, _ = keystore.add_key(keystore.load(saved), T0 + DAY, counter_token(50))

    def crash(src: object, dst: object) -> None:
        # By now the temp file is written and fsynced: this is the moment between write and rename.
        assert Path(str(src)).read_text() == keystore.dump(new)
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(keystore.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        keystore.save(saved, new)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert keystore.load(saved).generation == 1
    assert sorted(p.name for p in saved.parent.iterdir()) == ["keyring.toml"]


def test_a_process_killed_between_write_and_rename_leaves_the_old_keyring_loading(saved: Path) -> None:
    before = saved.read_bytes()
    child = textwrap.dedent(f"""
        import os, sys
        from datetime import datetime, timezone
        from pathlib import Path
        from gateway.ops import keystore
        path = Path({str(saved)!r})
        new, _ = keystore.add_key(keystore.load(path), datetime(2024, 1, 2, tzinfo=timezone.utc))
        keystore.os.replace = lambda src, dst: os._exit(9)   # die hard: no cleanup, no finally
        keystore.save(path, new)
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60, check=False)
    assert result.returncode == 9, result.stderr
    assert saved.read_bytes() == before
    leftovers = [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and oct(leftovers[0].stat().st_mode & 0o777) == "0o600"
    assert keystore.load(saved).generation == 1
    # The leftover temp file does not get in the way of the next write.
    new, key = keystore.add_key(keystore.load(saved), T0 + DAY)
    keystore.save(saved, new)
    assert keystore.load(saved).keyring.get(key.id) is not None


def test_save_refuses_to_write_a_keyring_that_would_not_load(saved: Path) -> None:
    kf = keystore.load(saved)
    weak = keystore.KeyringFile(
        keystore.Keyring((Key(0, b"short", KeyState.ACTIVE, T0, T0),)), kf.generation + 1, T0
    )
    with pytest.raises(KeyringError, match="at least 32"):
        keystore.save(saved, weak)
    assert keystore.load(saved) == kf


def test_the_lock_keeps_a_second_writer_out(saved: Path) -> None:
    with keystore.locked(saved):
        with pytest.raises(KeyringError, match="another batv-gateway keys command holds the lock"):
            with keystore.locked(saved, timeout=0):
                pass
    with keystore.locked(saved, timeout=0):
        pass
    assert oct(keystore.lock_path(saved).stat().st_mode & 0o777) == "0o600"


# ---------------------------------------------------------------- key management rules


def test_activate_moves_signing_and_records_when_the_old_key_stopped() -> None:
    kf = keystore.new_keyring(T0, counter_token())
    kf, added = keystore.add_key(kf, T0 + DAY, counter_token(9))
    assert (added.id, added.state, kf.generation) == (1, KeyState.VERIFY, 2)
    kf = keystore.activate(kf, 1, T0 + 2 * DAY)
    old, new = kf.keyring.get(0), kf.keyring.get(1)
    assert old == Key(0, old.secret, KeyState.VERIFY, T0, T0 + 2 * DAY, T0 + 2 * DAY)  # type: ignore[union-attr]
    assert new is not None and new.state is KeyState.ACTIVE and new.signed_until is None
    assert kf.generation == 3 and kf.updated == T0 + 2 * DAY
    assert keystore.activate(kf, 1, T0 + 3 * DAY) is kf  # already active: no change, no new generation


def test_the_active_key_cannot_be_retired_and_a_retired_key_cannot_sign_again() -> None:
    kf = keystore.new_keyring(T0, counter_token())
    with pytest.raises(KeyringError, match="key 0 is the active key"):
        keystore.retire(kf, 0, T0)
    kf, _ = keystore.add_key(kf, T0, counter_token(5))
    kf = keystore.retire(kf, 1, T0 + DAY)
    with pytest.raises(KeyringError, match="key 1 is retired"):
        keystore.activate(kf, 1, T0 + DAY)
    with pytest.raises(KeyringError, match="there is no key 7: the keyring holds keys 0, 1"):
        keystore.retire(kf, 7, T0)


def test_ids_cycle_and_are_refused_when_none_is_free() -> None:
    kf = keystore.new_keyring(T0, counter_token())
    ids = []
    for n in range(9):
        kf, key = keystore.add_key(kf, T0 + n * DAY, counter_token(10 + n))
        ids.append(key.id)
    assert ids == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(KeyringError, match="all ten key ids 0-9 are in use: run 'batv-gateway keys prune'"):
        keystore.add_key(kf, T0 + 10 * DAY)


def test_a_freed_id_is_reused_as_late_as_possible() -> None:
    kf = keystore.new_keyring(T0, counter_token())
    for n in range(1, 4):  # keys 1, 2, 3
        kf, _ = keystore.add_key(kf, T0 + n * DAY, counter_token(10 + n))
    keys = tuple(k for k in kf.keyring.keys if k.id != 1)  # pretend 1 was pruned
    kf = keystore.KeyringFile(keystore.Keyring(keys), kf.generation, kf.updated)
    assert keystore.free_key_id(kf) == 4  # after the newest (3), not the hole at 1


def test_prune_waits_for_the_longest_tag_lifetime_then_retires_then_deletes_after_grace() -> None:
    kf = keystore.new_keyring(T0, counter_token())
    kf, _ = keystore.add_key(kf, T0, counter_token(20))
    kf = keystore.activate(kf, 1, T0)  # key 0 stops signing on day D
    kf, fresh = keystore.add_key(kf, T0, counter_token(30))  # key 2: verify, never signed
    day_d = keystore.utc_day(T0)
    # A tag signed late on day D verifies through day D + 21 (SRS max age); one more day for other hosts.
    last_live = day_d + 21 + keystore.MARGIN_DAYS
    assert keystore.tags_live_until_day(kf.keyring.get(0), 21) == last_live  # type: ignore[arg-type]
    on_last_live_day = datetime.fromtimestamp(last_live * 86400 + 86399, UTC)
    same, report = keystore.prune(kf, on_last_live_day, max_tag_days=21)
    assert same is kf and report == keystore.PruneReport((), ())
    day_after = on_last_live_day + timedelta(seconds=1)
    kf, report = keystore.prune(kf, day_after, max_tag_days=21)
    assert report == keystore.PruneReport(retired=(0,), deleted=())
    assert kf.keyring.get(0).state is KeyState.RETIRED  # type: ignore[union-attr]
    assert kf.keyring.get(fresh.id).state is KeyState.VERIFY  # type: ignore[union-attr]  # on its way to hosts
    kept, report = keystore.prune(kf, day_after + 6 * DAY, max_tag_days=21, grace_days=7)
    assert kept is kf and report.deleted == ()
    kf, report = keystore.prune(kf, day_after + 7 * DAY, max_tag_days=21)
    assert report.deleted == (0,) and kf.keyring.get(0) is None


def test_prune_does_not_delete_a_key_retired_early_while_its_tags_may_be_live() -> None:
    kf = keystore.new_keyring(T0, counter_token())
    kf, _ = keystore.add_key(kf, T0, counter_token(20))
    kf = keystore.activate(kf, 1, T0)
    kf = keystore.retire(kf, 0, T0)  # a leaked key, retired at once
    for days in (5, 22):
        kf2, report = keystore.prune(kf, T0 + days * DAY, max_tag_days=21, grace_days=0)
        assert report.deleted == () and kf2 is kf
    _, report = keystore.prune(kf, T0 + 23 * DAY, max_tag_days=21, grace_days=0)
    assert report.deleted == (0,)


# ---------------------------------------------------------------- reload


def test_loader_reports_changes_and_never_hands_out_a_bad_keyring(saved: Path) -> None:
    loader = keystore.KeyringLoader(saved)
    first = loader.poll()
    assert first.changed and first.error is None and first.keyring == keystore.load(saved)
    assert loader.poll() == keystore.Reload(False, first.keyring)

    # Touched, same content: not a change.
    os.utime(saved, ns=(1, 1))
    assert loader.poll() == keystore.Reload(False, first.keyring)

    # A real change, written the safe way.
    new, _ = keystore.add_key(first.keyring, T0 + DAY, counter_token(40))  # type: ignore[arg-type]
    keystore.save(saved, new)
    second = loader.poll()
    assert second.changed and second.keyring == new and loader.current == new

    # A broken file (say, edited by hand): the error once, the last good keyring stays in force.
    keystore.write_atomic(saved, keyring_text(entry(0), entry(1)))
    broken = loader.poll()
    assert not broken.changed and broken.keyring == new
    assert broken.error is not None and "all active" in str(broken.error)
    assert loader.poll() == keystore.Reload(False, new)

    # Loose permissions are an error too; fixing the file brings the new keyring in.
    keystore.save(saved, first.keyring)  # type: ignore[arg-type]
    saved.chmod(0o604)
    loose = loader.poll()
    assert loose.keyring == new and loose.error is not None and "chmod 600" in str(loose.error)
    saved.chmod(0o600)
    fixed = loader.poll()
    assert fixed.changed and fixed.keyring == first.keyring


def test_loader_without_a_file_reports_the_error_and_no_keyring(tmp_path: Path) -> None:
    loader = keystore.KeyringLoader(tmp_path / "missing.toml")
    result = loader.poll()
    assert result.keyring is None and not result.changed
    assert result.error is not None and "keys init" in str(result.error)
    assert loader.poll() == keystore.Reload(False, None)  # reported once per state of the file


# ---------------------------------------------------------------- the ledger secret


def test_the_ledger_secret_travels_with_every_change_and_copy_and_is_never_shown(tmp_path: Path) -> None:
    kf = keystore.new_keyring(T0, ledger=True)
    secret = kf.keyring.ledger_secret
    assert secret is not None and len(secret) == keystore.NEW_SECRET_BYTES
    assert keystore.new_keyring(T0).keyring.ledger_secret is None  # only when asked (keys init, serve)
    changed, key = keystore.add_key(kf, T0 + DAY, counter_token(7))
    changed = keystore.activate(changed, key.id, T0 + DAY)
    copied = keystore.parse(keystore.dump(changed), "export")  # what `keys import` reads
    assert copied == changed and copied.keyring.ledger_secret == secret
    assert base64.b64encode(secret).decode() not in repr(copied)


def test_a_keyring_without_a_ledger_secret_gets_one_once(tmp_path: Path) -> None:
    kf = keystore.load(write(tmp_path / "old.toml", keyring_text(entry(0))))
    assert kf.keyring.ledger_secret is None and "ledger_secret" not in keystore.dump(kf)
    given = keystore.add_ledger_secret(kf, T0, counter_token(3))
    assert given.generation == kf.generation + 1 and given.keyring.ledger_secret is not None
    assert keystore.add_ledger_secret(given, T0) is given  # a second one would forget every record


def test_a_short_ledger_secret_is_refused_without_showing_it(tmp_path: Path) -> None:
    short = base64.b64encode(b"tiny").decode()
    text = keyring_text(entry(0)).replace("version = 1\n", f'version = 1\nledger_secret = "{short}"\n')
    with pytest.raises(KeyringError) as caught:
        keystore.load(write(tmp_path / "short.toml", text))
    assert "ledger_secret is 4 bytes; at least 16" in str(caught.value) and short not in str(caught.value)
