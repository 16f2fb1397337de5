"""`batv-gateway keys ...`, in-process through main(argv) and once end to end as a subprocess."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.cli.main import main
from gateway.core.keyring import KeyState
from gateway.ops import keystore

T0 = "2024-01-01T12:00:00Z"
REPO = Path(__file__).resolve().parent.parent


class Run:
    """main(argv) against a keyring in a temp folder; keeps all output so tests can look for secrets."""

    def __init__(self, keyring: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.keyring = keyring
        self.capsys = capsys
        self.printed: list[str] = []

    def __call__(self, *argv: str, keyring: bool = True) -> tuple[int, str, str]:
        args = ["keys", *argv] + (["--keyring", str(self.keyring)] if keyring else [])
        code = main(args)
        out, err = self.capsys.readouterr()
        self.printed += [out, err]
        return code, out, err

    def secrets_b64(self) -> list[str]:
        kf = keystore.load(self.keyring)
        return [base64.b64encode(k.secret).decode() for k in kf.keyring.keys]


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    return Run(tmp_path / "keys" / "keyring.toml", capsys)


def states(path: Path) -> dict[int, str]:
    return {k.id: k.state.value for k in keystore.load(path).keyring.keys}


def test_init_creates_one_active_key_mode_0600_and_records_when_signing_began(run: Run) -> None:
    code, out, _ = run("init", "--now", T0)
    assert code == 0
    assert out.startswith(f"{run.keyring}: created with key 0 (active, fingerprint ")
    assert oct(run.keyring.stat().st_mode & 0o777) == "0o600"
    assert oct(run.keyring.parent.stat().st_mode & 0o777) == "0o700"
    assert keystore.load(run.keyring).keyring.signing_began == datetime(2024, 1, 1, 12, tzinfo=UTC)


def test_a_second_init_leaves_the_keyring_as_it_is_and_exits_0(run: Run) -> None:
    run("init", "--now", T0)
    # Whatever a second init could touch, made different from what init itself would write.
    run.keyring.chmod(0o400)
    os.chown(run.keyring, 4242, 4243)
    before, st = run.keyring.read_bytes(), run.keyring.stat()
    code, out, err = run("init", "--now", "2024-06-01T00:00:00Z")
    assert (code, err) == (0, "")
    assert out == f"{run.keyring}: a keyring already exists; left as it is\n"
    after = run.keyring.stat()
    assert run.keyring.read_bytes() == before
    assert (after.st_ino, after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns) == (
        st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns
    )


def test_list_shows_id_state_age_fingerprint_and_never_a_secret(run: Run) -> None:
    run("init", "--now", T0)
    run("add", "--now", "2024-01-03T00:00:00Z")
    code, out, _ = run("list", "--now", "2024-01-11T12:00:00Z")
    assert code == 0
    kf = keystore.load(run.keyring)
    lines = out.splitlines()
    assert lines.pop(0) == f"# {run.keyring}: generation 2, updated 2024-01-03T00:00:00Z"
    assert lines.pop(0) == (
        f"# signing began {T0}: bounces to untagged addresses are accepted until 2024-01-08T00:00:00Z"
        " unless [policy] bounce_grace = false"
    )
    assert lines[0].split() == ["ID", "STATE", "AGE", "FINGERPRINT", "CREATED", "CHANGED"]
    assert lines[1].split() == [
        "0",
        "active",
        "10d",
        kf.keyring.get(0).fingerprint,  # type: ignore[union-attr]
        T0,
        T0,
    ]
    assert lines[2].split()[:4] == ["1", "verify", "8d", kf.keyring.get(1).fingerprint]  # type: ignore[union-attr]
    code, out, _ = run("list", "--json", "--now", "2024-01-11T12:00:00Z")
    document = json.loads(out)
    assert document["generation"] == 2
    assert document["signing_began"] == T0
    rows = [(k["id"], k["state"], k["age_days"]) for k in document["keys"]]
    assert rows == [(0, "active", 10), (1, "verify", 8)]
    assert document["keys"][0]["fingerprint"] == kf.keyring.get(0).fingerprint  # type: ignore[union-attr]
    assert len(document["keys"][0]["fingerprint"]) == 8
    for secret in run.secrets_b64():
        assert all(secret not in text for text in run.printed)
    assert "secret" not in out


def test_add_activate_retire(run: Run) -> None:
    run("init", "--now", T0)
    code, out, _ = run("add", "--now", "2024-01-02T00:00:00Z")
    assert code == 0 and out.startswith("added key 1 (verify, fingerprint ")
    assert "activate it with 'batv-gateway keys activate 1'" in out
    code, out, _ = run("activate", "1", "--now", "2024-01-03T00:00:00Z")
    assert code == 0 and "key 0 now verifies only" in out
    assert states(run.keyring) == {0: "verify", 1: "active"}
    assert keystore.load(run.keyring).keyring.get(0).signed_until is not None  # type: ignore[union-attr]
    assert run("activate", "1")[1] == "key 1 is already active\n"
    code, _, err = run("activate", "5")
    assert code == 2 and "there is no key 5: the keyring holds keys 0, 1" in err
    code, _, err = run("retire", "1")
    assert code == 2 and "key 1 is the active key: activate another key first" in err
    # Key 0 stopped signing on 2024-01-03: its tags may still be live, and retire says so.
    code, out, err = run("retire", "0", "--now", "2024-01-04T00:00:00Z")
    assert code == 0 and out == "retired key 0\n" and "may still have live tags" in err
    assert states(run.keyring) == {0: "retired", 1: "active"}
    code, _, err = run("activate", "0")
    assert code == 2 and "key 0 is retired and cannot sign again" in err


def test_prune_dry_run_then_retire_then_delete(run: Run) -> None:
    run("init", "--now", T0)
    run("rotate", "--now", T0)  # key 1 signs; key 0 stopped on 2024-01-01
    gen = keystore.load(run.keyring).generation
    code, out, _ = run("prune", "--now", "2024-01-10T00:00:00Z")
    assert (code, out) == (0, "nothing to prune\n")
    # Lifetimes 7 and 21: the last live day of key 0's tags is Jan 1 + 21 + 1 (margin) = Jan 23.
    code, out, _ = run("prune", "--now", "2024-01-23T23:59:59Z")
    assert out == "nothing to prune\n"
    code, out, _ = run("prune", "--dry-run", "--now", "2024-01-24T00:00:00Z")
    assert out == "would have retired key 0: every tag it signed has expired\n"
    assert keystore.load(run.keyring).generation == gen
    code, out, _ = run("prune", "--now", "2024-01-24T00:00:00Z")
    assert out == "retired key 0: every tag it signed has expired\n"
    assert states(run.keyring) == {0: "retired", 1: "active"}
    code, out, _ = run("prune", "--now", "2024-01-31T00:00:00Z", "--grace", "7")
    assert out == "deleted retired key 0: its id may be handed out again\n"
    assert states(run.keyring) == {1: "active"}


def test_prune_honours_shorter_lifetimes_given_as_flags(run: Run) -> None:
    run("init", "--now", T0)
    run("rotate", "--now", T0)
    code, out, _ = run("prune", "--lifetime", "3", "--srs-max-age", "5", "--now", "2024-01-08T00:00:00Z")
    assert code == 0
    assert out == "retired key 0: every tag it signed has expired\n"


def test_rotate_prunes_and_ids_cycle_until_none_is_free(run: Run) -> None:
    run("init", "--now", T0)
    # Rotating daily with --no-prune fills all ten ids.
    for day in range(2, 11):
        code, out, _ = run("rotate", "--no-prune", "--now", f"2024-01-{day:02d}T00:00:00Z")
        assert code == 0, out
    assert sorted(states(run.keyring)) == list(range(10))
    code, _, err = run("rotate", "--no-prune", "--now", "2024-01-11T00:00:00Z")
    assert code == 2
    assert "all ten key ids 0-9 are in use: run 'batv-gateway keys prune'" in err
    # Weeks later, rotate prunes first: keys 0-8 have no live tags left and are retired (and that is
    # saved), but none is deleted before its grace period, so there is still no free id.
    code, out, err = run("rotate", "--now", "2024-02-20T00:00:00Z")
    assert code == 2 and "all ten key ids 0-9 are in use" in err
    assert out.splitlines() == [f"retired key {i}: every tag it signed has expired" for i in range(9)]
    assert states(run.keyring) == {**{i: "retired" for i in range(9)}, 9: "active"}
    # A grace period (7 days) later they are deleted, and the id after the newest key (9) comes round: 0.
    code, out, _ = run("rotate", "--now", "2024-02-27T00:00:00Z")
    assert code == 0
    deleted = [f"deleted retired key {i}: its id may be handed out again" for i in range(9)]
    assert out.splitlines()[:9] == deleted
    assert out.splitlines()[-1].startswith("activated new key 0 (active")
    assert states(run.keyring) == {0: "active", 9: "verify"}


def test_export_import_between_hosts_refuses_to_downgrade(run: Run, tmp_path: Path) -> None:
    other = tmp_path / "mx2" / "keyring.toml"
    other.parent.mkdir()
    run("init", "--now", T0)
    code, exported, _ = run("export")
    assert code == 0 and keystore.parse(exported, "x") == keystore.load(run.keyring)
    old_export = tmp_path / "old.toml"
    old_export.write_text(exported)
    code, out, _ = run_import(run, old_export, other)
    assert code == 0 and "imported generation 1" in out
    assert keystore.load(other) == keystore.load(run.keyring)
    code, out, _ = run_import(run, old_export, other)
    assert code == 0 and "already at generation 1; nothing to do" in out

    # mx1 moves on; mx2 takes the newer export (through a file written 0600).
    run("add", "--now", "2024-01-02T00:00:00Z")
    new_export = tmp_path / "new.toml"
    code, _, err = run("export", "--output", str(new_export))
    assert code == 0 and "exported generation 2" in err
    assert oct(new_export.stat().st_mode & 0o777) == "0o600"
    assert run_import(run, new_export, other)[0] == 0
    assert keystore.load(other).generation == 2

    # The stale copy cannot undo it.
    code, _, err = run_import(run, old_export, other)
    assert code == 2 and "generation 1 is older than" in err and "refuses to downgrade" in err
    assert keystore.load(other).generation == 2

    # Two hosts changed the keyring separately: refused, not merged.
    diverged = keystore.load(other)
    diverged_kf, _ = keystore.add_key(diverged, keystore.load(other).updated)
    keystore.save(other, diverged_kf)  # generation 3 on mx2
    run("add", "--now", "2024-01-03T00:00:00Z")  # generation 3 on mx1, different keys
    code, _, _ = run("export", "--output", str(new_export))
    code, _, err = run_import(run, new_export, other)
    assert code == 2 and "the keyrings were changed on two hosts" in err


def run_import(run: Run, source: Path, target: Path) -> tuple[int, str, str]:
    code = main(["keys", "import", str(source), "--keyring", str(target)])
    out, err = run.capsys.readouterr()
    return code, out, err


def test_kubernetes_export_imports_back_and_stdin_works(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("init", "--now", T0)
    code, manifest, _ = run("export", "--format", "kubernetes", "--name", "gw", "--namespace", "mail")
    assert code == 0
    assert manifest.startswith("apiVersion: v1\nkind: Secret\nmetadata:\n  name: gw\n  namespace: mail\n")
    target = tmp_path / "k8s.toml"
    monkeypatch.setattr(sys, "stdin", _Stdin(manifest))
    code = main(["keys", "import", "-", "--keyring", str(target)])
    assert code == 0
    assert keystore.load(target) == keystore.load(run.keyring)


class _Stdin:
    def __init__(self, text: str) -> None:
        self.text = text

    def read(self) -> str:
        return self.text


def test_import_refuses_a_weak_keyring(run: Run, tmp_path: Path) -> None:
    weak = tmp_path / "weak.toml"
    weak.write_text(
        'version = 1\ngeneration = 9\nupdated = 2024-01-01T00:00:00Z\n[[key]]\nid = 0\nstate = "active"\n'
        'created = 2024-01-01T00:00:00Z\nchanged = 2024-01-01T00:00:00Z\nsecret = "c2hvcnQ="\n'
    )
    code, _, err = run("import", str(weak))
    assert code == 2 and f"{weak}: key 0: secret is 5 bytes; at least 32" in err
    assert not run.keyring.exists()


def test_a_loose_keyring_is_refused_by_every_command_with_the_chmod_fix(run: Run) -> None:
    run("init", "--now", T0)
    run.keyring.chmod(0o644)
    for argv in (["list"], ["add"], ["rotate"], ["prune"], ["export"]):
        code, out, err = run(*argv)
        assert code == 2, argv
        assert f"chmod 600 {run.keyring}" in err and out == ""


@pytest.mark.parametrize(
    "verb", ["init", "list", "add", "activate", "rotate", "retire", "prune", "export", "import"]
)
def test_every_command_has_a_synopsis_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: batv-gateway keys {verb} [--keyring PATH | --config FILE]")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys"]) == 2
    assert "init" in capsys.readouterr().err
    assert main(["keys", "activate", "x"]) == 2
    assert "'x' is not a key id: key ids are the digits 0 to 9" in capsys.readouterr().err
    assert main(["keys", "list", "--now", "yesterday"]) == 2
    assert "is not a time" in capsys.readouterr().err
    assert main(["keys", "list", "--now", "2024-01-01T00:00:00"]) == 2
    assert "add Z for UTC" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
    assert main([]) == 2
    assert main(["--version"]) == 0


def test_keys_subprocess_end_to_end(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.toml"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def gateway(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "keys", *argv, "--keyring", str(keyring)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
            check=False,
        )

    assert gateway("init", "--now", T0).returncode == 0
    assert gateway("rotate", "--now", "1704153600").returncode == 0  # 2024-01-02T00:00:00Z
    listed = gateway("list", "--json", "--now", "2024-01-02T00:00:00Z")
    assert listed.returncode == 0
    keys = json.loads(listed.stdout)["keys"]
    assert [(k["id"], k["state"]) for k in keys] == [(0, "verify"), (1, "active")]
    loaded = keystore.load(keyring).keyring
    assert loaded.active.id == 1 and loaded.get(0).state is KeyState.VERIFY  # type: ignore[union-attr]
    keyring.chmod(0o644)
    refused = gateway("list")
    assert refused.returncode == 2
    assert f"chmod 600 {keyring}" in refused.stderr


def test_rotation_scenario_with_an_injected_clock(run: Run) -> None:
    """A tag signed before `rotate` verifies after it; once the lifetime has passed and `prune` has run it
    no longer does; tags of the new key verify throughout. prvs and SRS both."""
    lifetime = ["--lifetime", "30"]  # longer than SRS's 21 days, so prune waits 30 + 1 days

    def tag(verb: str, now: str, *argv: str) -> tuple[int, str]:
        code = main([*verb.split(), "--keyring", str(run.keyring), "--now", now, *argv])
        out, err = run.capsys.readouterr()
        assert len(out.splitlines()) == 1, err
        return code, out.strip()

    run("init", "--now", "2024-01-01T12:00:00Z")
    _, old_tag = tag("sign", "2024-01-01T12:00:00Z", *lifetime, "user@example.com")
    _, old_srs = tag("srs forward", "2024-01-01T12:00:00Z", "--alias", "fwd.example.net", "user@example.com")
    assert old_tag.startswith("prvs=0")

    assert run("rotate", "--now", "2024-01-02T12:00:00Z", *lifetime)[0] == 0
    _, new_tag = tag("sign", "2024-01-02T12:00:00Z", *lifetime, "user@example.com")
    assert new_tag.startswith("prvs=1")

    # After the rotation, before and after prune runs: both keys' tags verify, the old SRS address too.
    for now in ("2024-01-02T12:00:00Z", "2024-01-20T00:00:00Z", "2024-01-30T00:00:00Z"):
        assert run("prune", "--now", now, *lifetime)[1] == "nothing to prune\n"
        assert tag("verify", now, *lifetime, old_tag) == (0, "user@example.com"), now
        assert tag("verify", now, *lifetime, new_tag) == (0, "user@example.com"), now
        if now < "2024-01-22":
            assert tag("srs reverse", now, old_srs) == (0, "user@example.com"), now

    # Key 0 stopped signing on Jan 2: its last tags live through Jan 2 + 30 + 1 (margin) = Feb 2.
    assert run("prune", "--now", "2024-02-02T23:59:59Z", *lifetime)[1] == "nothing to prune\n"
    assert run("prune", "--now", "2024-02-03T00:00:00Z", *lifetime)[1] == (
        "retired key 0: every tag it signed has expired\n"
    )
    code, answer = tag("verify", "2024-02-03T00:00:00Z", *lifetime, old_tag)
    assert code == 1 and not answer.startswith("user@")
    # Not only expired: with the clock turned back, the old tag is refused because key 0 no longer verifies.
    code, answer = tag("verify", "2024-01-20T00:00:00Z", *lifetime, old_tag)
    assert code == 1 and answer.startswith("unknown-key: ")
    code, answer = tag("srs reverse", "2024-01-10T00:00:00Z", old_srs)
    assert code == 1 and answer.startswith("bad-hash: ")

    # The new key signs and verifies throughout, and after prune.
    assert tag("verify", "2024-02-01T00:00:00Z", *lifetime, new_tag) == (0, "user@example.com")
    _, fresh = tag("sign", "2024-02-03T00:00:00Z", *lifetime, "user@example.com")
    assert fresh.startswith("prvs=1")
    assert tag("verify", "2024-02-03T00:00:00Z", *lifetime, fresh) == (0, "user@example.com")


def test_a_second_keys_command_waits_for_the_lock_and_gives_up_clearly(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("init", "--now", T0)
    before = run.keyring.read_bytes()
    monkeypatch.setattr(keystore, "DEFAULT_LOCK_TIMEOUT", 0.0)
    with keystore.locked(run.keyring):
        code, _, err = run("add")
    assert code == 2 and "another batv-gateway keys command holds the lock; try again" in err
    assert run.keyring.read_bytes() == before
    assert run("add")[0] == 0


def test_concurrent_keys_commands_do_not_lose_updates(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.toml"
    keystore.save(keyring, keystore.new_keyring(datetime.now(UTC)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "keys", "add", "--keyring", str(keyring)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=tmp_path,
        )
        for _ in range(4)
    ]
    results = [(*proc.communicate(timeout=60), proc.returncode) for proc in procs]
    assert [code for _, _, code in results] == [0, 0, 0, 0], results
    kf = keystore.load(keyring)
    # Each read-modify-write saw the one before it: four new keys, four new generations.
    assert kf.generation == 5
    assert sorted(k.id for k in kf.keyring.keys) == [0, 1, 2, 3, 4]


def test_keys_take_the_keyring_path_and_lifetimes_from_the_config(run: Run, tmp_path: Path) -> None:
    keyring = tmp_path / "etc" / "keyring.toml"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\nkeyring = "{keyring}"\n\n[batv]\nlifetime_days = 3\n\n[srs]\nmax_age_days = 4\n'
    )
    code, out, err = run("init", "--config", str(config), "--now", T0, keyring=False)
    assert code == 0, err
    assert keystore.load(keyring).keyring.active.id == 0
    run("rotate", "--config", str(config), "--now", T0, keyring=False)
    # max(3, 4) + 1 margin: key 0's tags live through Jan 6.
    assert run("prune", "--config", str(config), "--now", "2024-01-06T23:00:00Z", keyring=False)[1] == (
        "nothing to prune\n"
    )
    code, out, _ = run("prune", "--config", str(config), "--now", "2024-01-07T00:00:00Z", keyring=False)
    assert out == "retired key 0: every tag it signed has expired\n"
    code, _, err = run("list", "--config", str(tmp_path / "missing.toml"), keyring=False)
    assert code == 2 and "missing.toml" in err


def test_an_unwritable_place_is_one_line_and_exit_2(run: Run, tmp_path: Path) -> None:
    run("init", "--now", T0)
    code, _, err = run("export", "--output", str(tmp_path / "no" / "such" / "folder" / "x.toml"))
    assert code == 2
    assert err.startswith("batv-gateway: error: ") and "No such file or directory" in err
    assert "Traceback" not in err


def test_list_says_when_a_keyring_has_no_recorded_signing_start(run: Run) -> None:
    # What an older version wrote: no signing_began line, so no grace window.
    run.keyring.parent.mkdir(mode=0o700)
    keystore.save(run.keyring, keystore.new_keyring(datetime(2024, 1, 1, 12, tzinfo=UTC)))
    assert "signing_began" not in run.keyring.read_text()
    code, out, _ = run("list", "--now", T0)
    assert code == 0
    assert out.splitlines()[1] == (
        "# no signing start recorded (a keyring from before it was): no grace window for bounces to"
        " untagged addresses"
    )
    code, out, _ = run("list", "--json", "--now", T0)
    assert json.loads(out)["signing_began"] is None


# ---------------------------------------------------------------- owner, group and mode of the keyring


@pytest.mark.parametrize("verb", ["import", "rotate"])
@pytest.mark.parametrize(
    ("uid", "gid", "mode"),
    [(4242, 4243, 0o600), (0, 4243, 0o640)],  # the gateway's own user; root with the gateway's group
)
def test_a_write_as_root_keeps_the_keyrings_owner_group_and_mode(
    run: Run, tmp_path: Path, verb: str, uid: int, gid: int, mode: int
) -> None:
    """`keys import` over ssh as root used to leave root:root 0600, which the gateway could not read."""
    assert os.geteuid() == 0, "this test runs as root, as the Postfix tests do"
    run("init", "--now", T0)
    newer = tmp_path / "from-mx1.toml"
    keystore.save(newer, keystore.add_key(keystore.load(run.keyring), datetime(2024, 1, 2, tzinfo=UTC))[0])
    os.chown(run.keyring, uid, gid)
    run.keyring.chmod(mode)
    before = run.keyring.read_bytes()
    argv = ["import", str(newer)] if verb == "import" else ["rotate", "--now", "2024-02-01T00:00:00Z"]
    code, _, err = run(*argv)
    assert (code, err) == (0, "")
    st = run.keyring.stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (uid, gid, oct(mode))
    assert run.keyring.read_bytes() != before
    assert keystore.load(run.keyring).generation == (2 if verb == "import" else 3)
    # The lock file root made must not lock the gateway's user out of its next `keys` command either.
    lock = keystore.lock_path(run.keyring).stat()
    assert (lock.st_uid, lock.st_gid) == (uid, gid)
    assert sorted(p.name for p in run.keyring.parent.iterdir()) == ["keyring.toml", "keyring.toml.lock"]


def test_a_write_that_cannot_keep_the_owner_is_refused_and_leaves_the_keyring(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A user other than root cannot give the new file root's ownership: it says so and writes nothing."""
    assert os.geteuid() == 0, "this test switches to another user, which takes root"
    # Not under pytest's tmp_path, which only root may enter.
    base = Path(tempfile.mkdtemp(prefix="batv-owner-"))
    try:
        base.chmod(0o711)
        folder = base / "keys"
        folder.mkdir(mode=0o700)
        os.chown(folder, 4242, 4242)
        keyring = folder / "keyring.toml"
        keystore.save(keyring, keystore.new_keyring(datetime(2024, 1, 1, 12, tzinfo=UTC)))
        os.chown(keyring, 0, 4242)
        keyring.chmod(0o640)  # root's, readable by the gateway's group: the Debian ssl-cert pattern
        before, st = keyring.read_bytes(), keyring.stat()
        os.setegid(4242)
        os.seteuid(4242)
        try:
            code = main(["keys", "rotate", "--now", "2024-02-01T00:00:00Z", "--keyring", str(keyring)])
        finally:
            os.seteuid(0)
            os.setegid(0)
        out, err = capsys.readouterr()
        assert (code, out) == (2, "")
        assert err == (
            f"batv-gateway: error: {keyring}: belongs to root:4242 and this user (4242) cannot keep that"
            " owner, so the file was left as it is: run the command as root\n"
        )
        after = keyring.stat()
        assert keyring.read_bytes() == before
        assert (after.st_ino, after.st_uid, after.st_gid, after.st_mode) == (
            st.st_ino, st.st_uid, st.st_gid, st.st_mode
        )
        assert sorted(p.name for p in folder.iterdir()) == ["keyring.toml", "keyring.toml.lock"]
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------- the fleet push, written once


def fleet_push(document: Path) -> str:
    """The shell block after the fleet-push marker: the same text must stand in both runbooks."""
    text = document.read_text(encoding="utf-8")
    marker = "<!-- fleet push: keep identical in keys/README.md and docs/operations.md -->\n"
    assert text.count(marker) == 1, document
    block = text.split(marker, 1)[1]
    assert block.startswith("```sh\n"), document
    return block[len("```sh\n") : block.index("\n```\n")]


def test_keys_readme_and_operations_give_one_and_the_same_fleet_push() -> None:
    readme = fleet_push(REPO / "keys" / "README.md")
    assert readme == fleet_push(REPO / "docs" / "operations.md")
    export = "batv-gateway keys export --config $CONF"
    assert f'{export} | ssh "$h" batv-gateway keys import --config $CONF -' in readme


def test_init_makes_a_ledger_secret_and_ledger_secret_gives_one_to_an_older_keyring(
    run: Run, tmp_path: Path
) -> None:
    run("init", "--now", T0)
    kf = keystore.load(run.keyring)
    assert kf.keyring.ledger_secret is not None
    code, out, _ = run("ledger-secret")
    assert (code, out) == (0, f"{run.keyring}: the keyring has a ledger secret already; left as it is\n")
    # A keyring from before the ledger: the verb adds one, says so, and it travels with an export.
    keystore.save(run.keyring, keystore.KeyringFile(replace(kf.keyring, ledger_secret=None), 1, kf.updated))
    code, out, _ = run("ledger-secret", "--now", "2024-01-02T00:00:00Z")
    assert code == 0 and "added a ledger secret (generation 2)" in out
    secret = keystore.load(run.keyring).keyring.ledger_secret
    assert secret is not None
    code, exported, _ = run("export")
    assert keystore.parse(exported, "x").keyring.ledger_secret == secret
    _, listed, _ = run("list")
    _, as_json, _ = run("list", "--json")
    assert base64.b64encode(secret).decode() not in listed + as_json + out
