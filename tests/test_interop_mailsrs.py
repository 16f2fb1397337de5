"""Live interop with Mail::SRS 0.31 itself (Debian libmail-srs-perl, installed by .ci/run).

The vectors in tests/vectors/srs-mailsrs.jsonl were recorded from Mail::SRS with the clock pinned; this
test talks to the real Perl module on today's date, both ways: what it writes we reverse, and what we write
it reverses, for each separator, SRS0 and SRS1, and several secrets (the first signs, all verify). One
Perl process answers a batch of requests on stdin, one JSON object a line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.core import srs

T = TypeVar("T")

# Mail::SRS->new is the Guarded scheme, as in the vectors. Errors come back as {"error": ...}.
PERL = r"""
use strict; use warnings; use JSON::PP; use Mail::SRS;
$| = 1;
my $json = JSON::PP->new->canonical;
while (my $line = <STDIN>) {
    my $req = $json->decode($line);
    my $srs = Mail::SRS->new(Secret => $req->{secrets}, Separator => $req->{separator},
                             HashLength => $req->{hash_length}, HashMin => $req->{hash_length});
    my $out = eval {
        $req->{op} eq 'forward' ? $srs->forward($req->{address}, $req->{alias})
                                : $srs->reverse($req->{address});
    };
    my $err = $@; $err =~ s/\s+$// if $err;
    print $json->encode($err ? {error => $err} : {output => $out}), "\n";
}
"""

SENDERS = [
    "user@example.com",
    "Alice.Smith@Mail.Example.ORG",
    "j_doe+tag@sub1.sub2.example.co.uk",
    "o'brien@example.net",
    "x@a.example",
]
SECRETS = ["srs-secret", "tr0ub4dor&3"]
ALIAS = "fwd.example.net"


def mailsrs(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    perl = shutil.which("perl")
    assert perl is not None, "perl is part of Debian's base system"
    proc = subprocess.run(
        [perl, "-e", PERL],
        input="".join(json.dumps(r) + "\n" for r in requests),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"Mail::SRS (apt-get install libmail-srs-perl) failed: {proc.stderr}"
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(answers) == len(requests)
    return answers


def same_day(check: Callable[[int], T]) -> T:
    """Run check(today) again if midnight UTC passed while Perl and we computed on different days."""
    for _ in range(2):
        today = int(time.time()) // 86400
        result = check(today)
        if int(time.time()) // 86400 == today:
            return result
    raise AssertionError("the day changed twice during one test")


def request(op: str, address: str, separator: str, **extra: Any) -> dict[str, Any]:
    return {
        "op": op,
        "address": address,
        "separator": separator,
        "hash_length": 4,
        "secrets": SECRETS,
        **extra,
    }


def test_both_write_the_same_srs0_and_srs1_bytes_and_reverse_each_other() -> None:
    def check(today: int) -> int:
        compared = 0
        secrets = [s.encode() for s in SECRETS]
        for separator in "=+-":
            options = srs.SrsOptions(separator=separator)
            ours = [srs.forward(s, ALIAS, secrets, today, options) for s in SENDERS]
            srs1_in = [f"SRS0{separator}abcd=IL=example.com=user@first.example"] + [
                srs.forward(s, "first.example", [b"other-forwarder"], today, options) for s in SENDERS
            ]
            ours_srs1 = [srs.forward(s, ALIAS, secrets, today, options) for s in srs1_in]
            theirs = mailsrs(
                [request("forward", s, separator, alias=ALIAS) for s in SENDERS + srs1_in]
                + [request("reverse", a, separator) for a in ours + ours_srs1]
            )
            n = len(SENDERS) + len(srs1_in)
            forwards, reverses = theirs[:n], theirs[n:]
            # Byte for byte the same forward, SRS0 and SRS1.
            assert [f.get("output") for f in forwards] == ours + ours_srs1
            # What we wrote, Mail::SRS reverses: SRS0 to the sender, SRS1 to the SRS0 it wrapped.
            assert [r.get("output") for r in reverses] == SENDERS + srs1_in
            # What Mail::SRS wrote, we reverse.
            for written, original in zip([f["output"] for f in forwards], SENDERS + srs1_in, strict=True):
                back = srs.reverse(written, secrets, today, options)
                assert (back.verdict, back.address) == (srs.SrsVerdict.VALID, original)
                compared += 1
        return compared

    assert same_day(check) == 3 * (2 * len(SENDERS) + 1)


def test_each_refuses_what_the_other_signed_with_another_secret() -> None:
    def check(today: int) -> None:
        ours = srs.forward("user@example.com", ALIAS, [b"a-different-secret"], today, srs.SrsOptions())
        (answer,) = mailsrs([request("reverse", ours, "=")])
        assert answer.get("output") is None and "hash" in answer["error"].lower()
        (theirs,) = mailsrs([request("forward", "user@example.com", "=", alias=ALIAS)])
        back = srs.reverse(theirs["output"], [b"a-different-secret"], today, srs.SrsOptions())
        assert back.verdict is srs.SrsVerdict.BAD_HASH

    same_day(check)


def test_a_verify_only_secret_reverses_in_both() -> None:
    """Rotation: Mail::SRS signs with its first secret and verifies with all; so do we."""

    def check(today: int) -> None:
        old, new = b"old-secret", b"new-secret"
        ours = srs.forward("user@example.com", ALIAS, [old], today, srs.SrsOptions())
        (answer,) = mailsrs([{**request("reverse", ours, "="), "secrets": ["new-secret", "old-secret"]}])
        assert answer.get("output") == "user@example.com"
        (theirs,) = mailsrs(
            [{**request("forward", "user@example.com", "=", alias=ALIAS), "secrets": ["old-secret"]}]
        )
        back = srs.reverse(theirs["output"], [new, old], today, srs.SrsOptions())
        assert (back.verdict, back.address) == (srs.SrsVerdict.VALID, "user@example.com")

    same_day(check)
