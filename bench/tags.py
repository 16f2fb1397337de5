"""Tag operations per second, each as a ratio to one bare HMAC-SHA1 over the same bytes, in the same run.

    python3 bench/tags.py              # about 10 seconds
    python3 bench/tags.py --rounds 60  # more rounds on a noisy machine

The baseline is `hmac.digest(secret, message, "sha1")`, the fastest one-shot stdlib HMAC, where message is
exactly what the operation feeds its HMAC (K || DDD || address for prvs; the lowercased SRS fields for
SRS). The HMAC is the one cost a tag operation cannot avoid, so the ratio says how much the rest costs:
1.0 would mean "as fast as the bare HMAC", 0.5 "the rest costs as much as the HMAC".

Each round times the baseline and every operation with timeit; the figures are the best round of each
(the least disturbed by other work on the machine), and the per-round ratios' median is shown beside the
ratio as a check on noise. Nothing is asserted: speed belongs here, never in the tests.
"""

from __future__ import annotations

import argparse
import hmac
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

try:
    import gateway  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core import prvs, srs
from gateway.core.keyring import Keyring

SECRET = b"bench-secret-0123456789abcdef0123"
TODAY = 20000
ADDRESS = "first.last@mail.example.com"
ALIAS = "fwd.example.net"


def operations() -> list[tuple[str, Callable[[], object], bytes]]:
    """(name, the operation, the bytes its HMAC covers)."""
    keyring = Keyring.from_secrets([(1, SECRET)])
    signed = prvs.sign(ADDRESS, keyring, TODAY)
    stamp = signed[5:9]  # K DDD
    secrets = [SECRET]
    options = srs.SrsOptions()
    forwarded = srs.forward(ADDRESS, ALIAS, secrets, TODAY, options)
    local, domain = ADDRESS.split("@")
    srs_message = (srs.timestamp(TODAY) + domain + local).lower().encode()
    checks = [
        ("prvs sign", lambda: prvs.sign(ADDRESS, keyring, TODAY) == signed),
        ("prvs verify", lambda: prvs.verify(signed, keyring, TODAY).verdict is prvs.PrvsVerdict.VALID),
        ("srs forward", lambda: srs.forward(ADDRESS, ALIAS, secrets, TODAY, options) == forwarded),
        ("srs reverse", lambda: srs.reverse(forwarded, secrets, TODAY, options).address == ADDRESS),
    ]
    for name, check in checks:
        if not check():
            raise SystemExit(f"{name} does not give the expected result; not benchmarking it")
    return [
        ("prvs sign", lambda: prvs.sign(ADDRESS, keyring, TODAY), f"{stamp}{ADDRESS}".encode()),
        ("prvs verify", lambda: prvs.verify(signed, keyring, TODAY), f"{stamp}{ADDRESS}".encode()),
        ("srs forward", lambda: srs.forward(ADDRESS, ALIAS, secrets, TODAY, options), srs_message),
        ("srs reverse", lambda: srs.reverse(forwarded, secrets, TODAY, options), srs_message),
    ]


def seconds_per_call(func: Callable[[], object], number: int) -> float:
    return timeit.timeit(func, number=number) / number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timing rounds (the best of them is reported)")
    parser.add_argument("--number", type=int, default=10_000, help="calls per timing")
    args = parser.parse_args(argv)

    ops = operations()
    best: dict[str, float] = {}
    best_bare: dict[str, float] = {}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in ops}
    for _ in range(args.rounds):
        for name, func, message in ops:
            bare = seconds_per_call(lambda m=message: hmac.digest(SECRET, m, "sha1"), args.number)
            took = seconds_per_call(func, args.number)
            best[name] = min(best.get(name, took), took)
            best_bare[name] = min(best_bare.get(name, bare), bare)
            ratios[name].append(bare / took)

    print(f"python {sys.version.split()[0]}, {args.rounds} rounds of {args.number} calls; best round shown")
    print(f"{'operation':<12} {'ops/s':>11} {'bare HMAC ops/s':>16} {'ratio':>6} {'median ratio':>13}")
    for name, _, _ in ops:
        rate, bare_rate = 1 / best[name], 1 / best_bare[name]
        print(
            f"{name:<12} {rate:>11,.0f} {bare_rate:>16,.0f} {rate / bare_rate:>6.2f} "
            f"{statistics.median(ratios[name]):>13.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
