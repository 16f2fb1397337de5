"""`batv-gateway sign|verify|srs forward|srs reverse`: the exact contract of issue 3, and every interop
vector run through these verbs (batched through `-` on standard input), not only through the library."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.main import main
from gateway.ops import keystore

VECTORS = Path(__file__).resolve().parent / "vectors"
REPO = Path(__file__).resolve().parent.parent
NOW = "2024-01-01T12:00:00Z"  # day 19723, as in prvs-exim-0001
JSON_KEYS = ["input", "ok", "output", "verdict", "reason"]


def read_vectors(name: str) -> list[dict[str, Any]]:
    with open(VECTORS / name, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


class Tags:
    """main(argv) with standard input fed from a list of lines; returns (exit code, output lines, stderr)."""

    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, folder: Path):
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.folder = folder
        self.files = 0

    def secret(self, value: str | bytes) -> Path:
        self.files += 1
        path = self.folder / f"secret{self.files}"
        path.write_bytes(value.encode() if isinstance(value, str) else value)
        return path

    def __call__(self, *argv: str, stdin: Iterable[str] | None = None) -> tuple[int, list[str], str]:
        if stdin is not None:
            data = "".join(f"{line}\n" for line in stdin).encode("utf-8")
            self.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        code = main(list(argv))
        out, err = self.capsys.readouterr()
        return code, out.splitlines(), err

    def json(self, *argv: str, stdin: list[str]) -> tuple[int, list[dict[str, Any]]]:
        code, lines, err = self(*argv, "--json", "-", stdin=stdin)
        assert code in (0, 1), err
        objects = [json.loads(line) for line in lines]
        assert len(objects) == len(stdin)
        for obj, given in zip(objects, stdin, strict=True):
            assert list(obj) == JSON_KEYS
            assert obj["input"] == given
        assert code == (0 if all(o["ok"] for o in objects) else 1)
        return code, objects


@pytest.fixture
def tags(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Tags:
    return Tags(capsys, monkeypatch, tmp_path)


# ---------------------------------------------------------------- every vector, through the CLI


def test_every_prvs_exim_vector_through_sign_and_verify(tags: Tags) -> None:
    rows = read_vectors("prvs-exim.jsonl")
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["op"] == "sign":
            key = ("sign", row["secret"], row["key_num"] or "0", row["unix_time"])
        else:
            secrets = row.get("secrets_by_key") or {str(k): row["secret"] for k in range(10)}
            key = ("check", json.dumps(secrets, sort_keys=True), row["unix_time"])
        groups[key].append(row)
    checked = 0
    for key, cases in groups.items():
        inputs = [case["input"] for case in cases]
        if key[0] == "sign":
            _, secret, key_num, unix_time = key
            argv = ["sign", "--secret-file", f"{key_num}:{tags.secret(secret)}", "--now", str(unix_time)]
            _, answers = tags.json(*argv, stdin=inputs)
            for case, answer in zip(cases, answers, strict=True):
                if case["output"] is None:  # Exim refused it ("user": not a qualified address)
                    assert (answer["ok"], answer["verdict"], answer["output"]) == (False, "refused", None)
                    assert answer["reason"]
                else:
                    assert (answer["ok"], answer["output"], answer["verdict"]) == (
                        True,
                        case["output"],
                        "signed",
                    )
                checked += 1
        else:
            _, secrets_json, unix_time = key
            argv = ["verify", "--now", str(unix_time)]
            for key_id, secret in sorted(json.loads(secrets_json).items()):
                argv += ["--secret-file", f"{key_id}:{tags.secret(secret)}"]
            _, answers = tags.json(*argv, stdin=inputs)
            for case, answer in zip(cases, answers, strict=True):
                expected = case["draft_rule_verdict"]
                if expected == "valid":
                    assert (answer["ok"], answer["verdict"]) == (True, "valid"), case["id"]
                    assert answer["output"] == case["decoded_address"]
                else:
                    assert (answer["ok"], answer["output"]) == (False, None), case["id"]
                    allowed = {
                        "hash_mismatch": {"bad-hash"},
                        "expired": {"expired"},
                        # Exim's "not prvs" covers both an address without a tag and a broken tag.
                        "not_prvs": {"malformed"}
                        if case["input"].lower().startswith("prvs=")
                        else {"unsigned"},
                    }[expected]
                    assert answer["verdict"] in allowed, case["id"]
                checked += 1
    assert checked == len(rows) == 133


def srs_verdict(case: dict[str, Any]) -> str:
    """The verdict our CLI must give for a refused SRS case, from the implementation's error text."""
    error = (case.get("error") or "").lower()
    if case["op"] == "forward":
        return "refused"
    if "timestamp" in error or "time stamp" in error:
        return "expired"
    if "hash" in error:
        return "bad-hash"
    if "not match" in error or "not an srs" in error:
        return "not-srs"
    raise AssertionError(f"no verdict for {case['id']}: {error}")


@pytest.mark.parametrize("name", ["srs-mailsrs.jsonl", "srs-postsrsd.jsonl", "srs-pysrs.jsonl"])
def test_every_srs_vector_through_srs_forward_and_reverse(tags: Tags, name: str) -> None:
    rows = read_vectors(name)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        key = json.dumps([row["op"], row["secrets"], row["params"], row["unix_time"], row.get("alias")])
        groups[key].append(row)
    checked = 0
    for cases in groups.values():
        first = cases[0]
        params = first["params"]
        argv = ["srs", first["op"]]
        if first["op"] == "forward":
            argv += ["--alias", first["alias"]]
        argv += [
            "--separator",
            params["separator"],
            "--hash-length",
            str(params["hash_length"]),
            "--hash-min",
            str(params["hash_min"]),
            "--max-age",
            str(params["max_age_days"]),
        ]
        if params["always_rewrite"]:
            argv.append("--always-rewrite")
        for secret in first["secrets"]:
            argv += ["--secret-file", str(tags.secret(secret))]
        argv += ["--now", str(first["unix_time"])]
        _, answers = tags.json(*argv, stdin=[case["input"] for case in cases])
        for case, answer in zip(cases, answers, strict=True):
            assert answer["ok"] is case["ok"], case["id"]
            if case["ok"]:
                assert answer["output"] == case["output"], case["id"]
                if case["op"] == "reverse":
                    assert answer["verdict"] == "valid"
                else:
                    assert answer["verdict"] == (
                        "unchanged" if case["output"] == case["input"] else "rewritten"
                    )
            else:
                assert answer["output"] is None, case["id"]
                assert answer["verdict"] == srs_verdict(case), case["id"]
                assert answer["reason"]
            checked += 1
    assert checked == len(rows)


# ---------------------------------------------------------------- the contract


def test_plain_output_is_one_line_per_input_in_order(tags: Tags) -> None:
    secret = tags.secret("s3cr3t")
    inputs = ["user@example.com", "", "user", "<>", "first.last@example.net"]
    code, lines, _ = tags("sign", "--secret-file", str(secret), "--now", NOW, "-", stdin=inputs)
    assert code == 1
    assert len(lines) == len(inputs)
    assert lines[0] == "prvs=07306ca43e=user@example.com"  # prvs-exim-0001
    assert all(line.startswith("refused: ") for line in lines[1:4])
    assert lines[4].startswith("prvs=0730") and lines[4].endswith("=first.last@example.net")
    code, lines, _ = tags(
        "verify",
        "--secret-file",
        str(secret),
        "--now",
        NOW,
        "-",
        stdin=[lines[0], "user@example.com", lines[0].replace("ca43e", "ca43f")],
    )
    assert code == 1
    assert lines[0] == "user@example.com"
    assert lines[1].startswith("unsigned: ")
    assert lines[2].startswith("bad-hash: ")


def test_addresses_on_the_command_line_and_exit_0_when_all_succeed(tags: Tags) -> None:
    secret = tags.secret("s3cr3t")
    code, lines, _ = tags(
        "sign", "--secret-file", str(secret), "--now", NOW, "user@example.com", "a@b.example"
    )
    assert code == 0 and lines[0] == "prvs=07306ca43e=user@example.com" and len(lines) == 2
    code, lines, _ = tags("verify", "--secret-file", str(secret), "--now", NOW, *lines)
    assert code == 0 and lines == ["user@example.com", "a@b.example"]


def test_secret_file_drops_exactly_one_trailing_newline_and_takes_any_length(tags: Tags) -> None:
    expected = "prvs=07306ca43e=user@example.com"
    for content in ("s3cr3t", "s3cr3t\n"):
        code, lines, _ = tags(
            "sign", "--secret-file", str(tags.secret(content)), "--now", NOW, "user@example.com"
        )
        assert (code, lines) == (0, [expected])
    code, lines, _ = tags(
        "sign", "--secret-file", str(tags.secret("s3cr3t\n\n")), "--now", NOW, "user@example.com"
    )
    assert lines != [expected]
    code, _, err = tags("sign", "--secret-file", str(tags.secret("\n")), "user@example.com")
    assert code == 2 and "the file is empty" in err
    code, _, err = tags("sign", "--secret-file", str(tags.folder / "missing"), "user@example.com")
    assert code == 2 and "cannot read" in err


def test_secret_file_key_prefix_first_signs_all_verify(tags: Tags) -> None:
    one, two = tags.secret("s3cr3t"), tags.secret("correct horse battery staple")
    code, lines, _ = tags("sign", "--secret-file", f"1:{one}", "--now", NOW, "user@example.com")
    assert lines == ["prvs=173087dfdd=user@example.com"]  # prvs-exim-0002
    code, signed_by_two, _ = tags(
        "sign", "--secret-file", f"3:{two}", "--secret-file", f"1:{one}", "--now", NOW, "user@example.com"
    )
    assert signed_by_two[0].startswith("prvs=3730")
    both = ["--secret-file", f"1:{one}", "--secret-file", f"3:{two}", "--now", NOW]
    code, lines, _ = tags("verify", *both, lines[0], signed_by_two[0])
    assert (code, lines) == (0, ["user@example.com", "user@example.com"])
    code, lines, _ = tags("verify", "--secret-file", f"1:{one}", "--now", NOW, signed_by_two[0])
    assert code == 1 and lines[0].startswith("unknown-key: ")
    code, _, err = tags("verify", "--secret-file", str(one), "--secret-file", str(two), lines[0])
    assert code == 2 and "key id 0 is given twice" in err


def test_srs_takes_several_secret_files_the_first_signs(tags: Tags) -> None:
    old, new = tags.secret("srs-secret"), tags.secret("another-forwarder-secret")
    forward = ["srs", "forward", "--alias", "fwd.example.net", "--now", NOW]
    code, lines, _ = tags(*forward, "--secret-file", str(old), "user@example.com")
    assert lines == ["SRS0=Ym1z=IL=example.com=user@fwd.example.net"]  # srs-mailsrs-0001
    code, rev, _ = tags(
        "srs", "reverse", "--secret-file", str(new), "--secret-file", str(old), "--now", NOW, lines[0]
    )
    assert (code, rev) == (0, ["user@example.com"])
    code, rev, _ = tags("srs", "reverse", "--secret-file", str(new), "--now", NOW, "--json", lines[0])
    answer = json.loads(rev[0])
    assert (code, answer["ok"], answer["verdict"], answer["output"]) == (1, False, "bad-hash", None)


def test_now_accepts_iso_8601_utc_and_unix_seconds(tags: Tags) -> None:
    secret = str(tags.secret("s3cr3t"))
    results = set()
    for now in (
        "2024-01-01T12:00:00Z",
        "2024-01-01T12:00:00+00:00",
        "1704110400",
        "2024-01-01T13:00:00+01:00",
    ):
        code, lines, _ = tags("sign", "--secret-file", secret, "--now", now, "user@example.com")
        results.add((code, lines[0]))
    assert results == {(0, "prvs=07306ca43e=user@example.com")}
    for bad in ("2024-01-01T12:00:00", "noon", ""):
        code, _, err = tags("sign", "--secret-file", secret, "--now", bad, "user@example.com")
        assert code == 2 and "--now" in err


def test_lifetime_flag(tags: Tags) -> None:
    secret = str(tags.secret("s3cr3t"))
    code, lines, _ = tags(
        "sign", "--secret-file", secret, "--now", NOW, "--lifetime", "30", "user@example.com"
    )
    assert lines[0].startswith("prvs=0753")  # expiry day 19723 + 30 = 19753
    later = str(1704110400 + 20 * 86400)
    assert tags("verify", "--secret-file", secret, "--now", later, "--lifetime", "30", lines[0])[0] == 0
    code, out, _ = tags("verify", "--secret-file", secret, "--now", later, lines[0])
    assert code == 1 and not out[0].startswith("user@")


def test_usage_errors_exit_2(tags: Tags) -> None:
    secret = str(tags.secret("s3cr3t"))
    cases = [
        (["sign", "--secret-file", secret], "give at least one ADDRESS"),
        (["sign", "--secret-file", secret, "-", "user@example.com"], "give no other ADDRESS"),
        (["sign", "--secret-file", secret, "--keyring", "k.toml", "a@b.example"], "not allowed with"),
        (["srs", "forward", "--secret-file", secret, "a@b.example"], "--alias"),
        (["srs", "reverse", "--separator", "x", "--secret-file", secret, "a@b.example"], "invalid choice"),
        (["srs", "reverse", "--hash-length", "four", "--secret-file", secret, "a@b.example"], "whole number"),
        (["verify", "--lifetime", "-1", "--secret-file", secret, "a@b.example"], "--lifetime"),
        (["srs"], "forward"),
    ]
    for argv, message in cases:
        code, lines, err = tags(*argv, stdin=[])
        assert code == 2, argv
        assert message in err, (argv, err)
        assert lines == []


@pytest.mark.parametrize(
    ("argv", "synopsis"),
    [
        (
            ["sign"],
            "usage: batv-gateway sign [--keyring PATH | --secret-file [K:]FILE ...] [--config FILE] "
            "[--now TIME] [--lifetime DAYS] [--json] ADDRESS... | -",
        ),
        (
            ["verify"],
            "usage: batv-gateway verify [--keyring PATH | --secret-file [K:]FILE ...] [--config FILE] "
            "[--now TIME] [--lifetime DAYS] [--json] ADDRESS... | -",
        ),
        (
            ["srs", "forward"],
            "usage: batv-gateway srs forward --alias DOMAIN [--separator {=,+,-}] "
            "[--hash-length N] [--hash-min N] [--max-age DAYS] [--always-rewrite] "
            "[--keyring PATH | --secret-file [K:]FILE ...] [--config FILE] [--now TIME] "
            "[--json] ADDRESS... | -",
        ),
        (
            ["srs", "reverse"],
            "usage: batv-gateway srs reverse [--separator {=,+,-}] [--hash-length N] "
            "[--hash-min N] [--max-age DAYS] [--always-rewrite] "
            "[--keyring PATH | --secret-file [K:]FILE ...] [--config FILE] [--now TIME] "
            "[--json] ADDRESS... | -",
        ),
    ],
)
def test_help_is_a_man_page_synopsis(
    argv: list[str], synopsis: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert " ".join(out.split("\n\n")[0].split()) == synopsis
    assert "Exit codes: 0" in " ".join(out.split())


# ---------------------------------------------------------------- the keyring as the key source


@pytest.fixture
def keyring(tmp_path: Path) -> Path:
    path = tmp_path / "keyring.toml"
    kf = keystore.new_keyring(datetime(2024, 1, 1, tzinfo=UTC))
    keystore.save(path, kf)
    return path


def test_sign_and_verify_with_the_keyring(tags: Tags, keyring: Path) -> None:
    code, signed, _ = tags("sign", "--keyring", str(keyring), "--now", NOW, "user@example.com")
    assert code == 0 and signed[0].startswith("prvs=0730")
    code, lines, _ = tags("verify", "--keyring", str(keyring), "--now", NOW, "--json", signed[0])
    answer = json.loads(lines[0])
    assert code == 0 and answer["ok"] and answer["output"] == "user@example.com"
    secret = keystore.load(keyring).keyring.active.secret
    code, lines, _ = tags("verify", "--secret-file", str(tags.secret(secret)), "--now", NOW, signed[0])
    assert (code, lines) == (0, ["user@example.com"])


def test_the_default_keyring_is_keys_keyring_toml(
    tags: Tags, keyring: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (keyring.parent / "keys").mkdir()
    keyring.rename(keyring.parent / "keys" / "keyring.toml")
    monkeypatch.chdir(keyring.parent)
    code, lines, _ = tags("srs", "forward", "--alias", "fwd.example.net", "--now", NOW, "user@example.com")
    assert (
        code == 0
        and lines[0].startswith("SRS0=")
        and lines[0].endswith("=IL=example.com=user@fwd.example.net")
    )
    assert tags("srs", "reverse", "--now", NOW, lines[0])[:2] == (0, ["user@example.com"])


def test_config_names_the_keyring_and_the_lifetimes(tags: Tags, keyring: Path, tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\nkeyring = "{keyring}"\n\n[batv]\nlifetime_days = 30\n\n'
        '[srs]\nseparator = "+"\nmax_age_days = 5\n'
    )
    code, lines, err = tags("sign", "--config", str(config), "--now", NOW, "user@example.com")
    assert code == 0, err
    assert lines[0].startswith("prvs=0753")
    code, lines, _ = tags(
        "srs",
        "forward",
        "--config",
        str(config),
        "--alias",
        "fwd.example.net",
        "--now",
        NOW,
        "user@example.com",
    )
    assert code == 0 and lines[0].startswith("SRS0+")
    six_days_later = str(1704110400 + 6 * 86400)
    code, rev, _ = tags("srs", "reverse", "--config", str(config), "--now", six_days_later, lines[0])
    assert code == 1 and rev[0].startswith("expired: ")
    code, rev, _ = tags(
        "srs", "reverse", "--config", str(config), "--max-age", "21", "--now", six_days_later, lines[0]
    )
    assert (code, rev) == (0, ["user@example.com"])
    code, _, err = tags("sign", "--config", str(tmp_path / "none.toml"), "user@example.com")
    assert code == 2 and "none.toml" in err


def test_a_loose_keyring_is_refused(tags: Tags, keyring: Path) -> None:
    keyring.chmod(0o644)
    code, lines, err = tags("verify", "--keyring", str(keyring), "user@example.com")
    assert code == 2 and lines == [] and f"chmod 600 {keyring}" in err


def test_verbs_end_to_end_as_a_subprocess(keyring: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def gateway(*argv: str, stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
            check=False,
        )

    signed = gateway(
        "sign", "--keyring", str(keyring), "--now", NOW, "-", stdin="a@example.com\nb@example.org\n"
    )
    assert signed.returncode == 0, signed.stderr
    tagged = signed.stdout.splitlines()
    assert len(tagged) == 2
    checked = gateway(
        "verify",
        "--keyring",
        str(keyring),
        "--now",
        NOW,
        "--json",
        "-",
        stdin="".join(f"{t}\n" for t in [*tagged, "c@example.net"]),
    )
    assert checked.returncode == 1
    verdicts = [json.loads(line)["verdict"] for line in checked.stdout.splitlines()]
    assert verdicts == ["valid", "valid", "unsigned"]
