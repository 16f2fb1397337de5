"""The in-memory keyring: key ids 0-9, their secrets, and which key signs.

Pure: no file, no clock. The file format and its safe writing live in `keystore.py`.

prvs names its key by the digit in the tag, so prvs verifies with exactly that key. SRS has no key id, so
it tries every key that is not retired, the active one first.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .errors import KeyringError

KEY_IDS = range(10)
MIN_SECRET_BYTES = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SHA1_BLOCK = 64
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))
if TYPE_CHECKING:
    _Sha1 = hashlib._Hash


def _pads(secret: bytes) -> tuple[_Sha1, _Sha1]:
    """SHA-1 states after the HMAC inner and outer pads of `secret` (RFC 2104 section 2).

    SHA-1 because prvs (and Exim, which we must match) is HMAC-SHA1; as an HMAC it is not weak.
    """
    if len(secret) > _SHA1_BLOCK:
        secret = hashlib.sha1(secret).digest()  # noqa: S324 - RFC 2104 key hashing for HMAC-SHA1
    secret = secret.ljust(_SHA1_BLOCK, b"\0")
    return (
        hashlib.sha1(secret.translate(_IPAD)),  # noqa: S324 - the HMAC-SHA1 inner pad
        hashlib.sha1(secret.translate(_OPAD)),  # noqa: S324 - the HMAC-SHA1 outer pad
    )


class KeyState(enum.Enum):
    ACTIVE = "active"  # signs, and verifies
    VERIFY = "verify"  # verifies only
    RETIRED = "retired"  # neither; kept so that its id is not handed out again too soon


@dataclass(frozen=True)
class Key:
    id: int
    # repr=False: a Key may end up in a traceback or a debug log; its secret must not.
    secret: bytes = field(repr=False)
    state: KeyState = KeyState.ACTIVE
    created: datetime = _EPOCH
    changed: datetime = _EPOCH
    # When this key last stopped being the active key; None while it is active or if it never signed.
    # Tags it signed may be live until then plus the longest tag lifetime, so prune and id reuse need it.
    signed_until: datetime | None = None

    @property
    def fingerprint(self) -> str:
        """The first 8 hex digits of SHA-256 of the secret: lets hosts be compared without showing it."""
        return hashlib.sha256(self.secret).hexdigest()[:8]

    @property
    def verifies(self) -> bool:
        return self.state is not KeyState.RETIRED


@dataclass(frozen=True)
class Keyring:
    """An immutable set of keys. Exactly one is active, unless the keyring is verify-only (see below)."""

    keys: tuple[Key, ...]
    # When this keyring first signed (`keys init`); None in a keyring written before it was recorded.
    # Bounces to mail sent before it carry no tag, so the inbound policy gives them a grace window.
    signing_began: datetime | None = None
    # The Message-ID ledger's HMAC secret (ledger.LedgerKeys); None in a keyring written before it was
    # kept, where the ledger is off. repr=False: it must never reach a log.
    ledger_secret: bytes | None = field(default=None, repr=False)
    # Cached keyed HMAC objects: .copy() of a keyed HMAC is cheaper than hmac.new()/hmac.digest() per use.
    _hmacs: Mapping[int, hmac.HMAC] = field(init=False, repr=False, compare=False)
    # RFC 2104's precomputation per key that verifies: SHA-1 states that have absorbed secret^ipad and
    # secret^opad. Two C-level copies per MAC beat HMAC.copy(), which wraps the same copy in Python calls;
    # prvs sign and verify must stay close to the cost of one bare HMAC (see `mac`).
    _pads: Mapping[int, tuple[_Sha1, _Sha1]] = field(init=False, repr=False, compare=False)
    _active_id: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for key in self.keys:
            if key.id not in KEY_IDS:
                raise KeyringError(f"key id {key.id} is out of range: key ids are 0 to 9")
            if key.id in seen:
                raise KeyringError(f"key id {key.id} appears twice: each id may be used once")
            seen.add(key.id)
        active = [k for k in self.keys if k.state is KeyState.ACTIVE]
        if len(active) > 1:
            ids = ", ".join(str(k.id) for k in active)
            raise KeyringError(f"keys {ids} are all active: exactly one key may be active")
        hmacs = {k.id: hmac.new(k.secret, digestmod="sha1") for k in self.keys if k.verifies}
        object.__setattr__(self, "_hmacs", hmacs)
        object.__setattr__(self, "_pads", {k.id: _pads(k.secret) for k in self.keys if k.verifies})
        object.__setattr__(self, "_active_id", active[0].id if active else None)

    @classmethod
    def from_secrets(cls, secrets: Iterable[tuple[int, bytes]]) -> Keyring:
        """A keyring from bare secrets (the CLI's --secret-file): the first signs, the others verify."""
        keys = []
        for n, (key_id, secret) in enumerate(secrets):
            keys.append(Key(key_id, secret, KeyState.ACTIVE if n == 0 else KeyState.VERIFY))
        return cls(tuple(keys))

    @property
    def active(self) -> Key:
        for key in self.keys:
            if key.state is KeyState.ACTIVE:
                return key
        raise KeyringError("the keyring has no active key: run 'batv-gateway keys activate ID'")

    @property
    def signing_began_day(self) -> int | None:
        """The UTC day number (the tags' clock) of `signing_began`, or None when it is not known."""
        if self.signing_began is None:
            return None
        return int(self.signing_began.timestamp()) // 86400

    @property
    def has_active(self) -> bool:
        return self._active_id is not None

    def get(self, key_id: int) -> Key | None:
        for key in self.keys:
            if key.id == key_id:
                return key
        return None

    def verifier(self, key_id: int) -> hmac.HMAC | None:
        """A fresh keyed HMAC-SHA1 for a key that may verify (not retired), or None."""
        base = self._hmacs.get(key_id)
        return base.copy() if base is not None else None

    def signer(self) -> tuple[int, hmac.HMAC]:
        """The active key's id and a fresh keyed HMAC-SHA1."""
        key = self.active
        return key.id, self._hmacs[key.id].copy()

    @property
    def active_id(self) -> int:
        """The id of the key that signs (cheap: no search); raises KeyringError when there is none."""
        if self._active_id is None:
            raise KeyringError("the keyring has no active key: run 'batv-gateway keys activate ID'")
        return self._active_id

    def mac(self, key_id: int, message: bytes) -> bytes | None:
        """HMAC-SHA1(secret of key_id, message) for a key that may verify (not retired), or None.

        The same value as hmac.digest(secret, message, "sha1"), from the cached pads: the prvs hot path.
        """
        pads = self._pads.get(key_id)
        if pads is None:
            return None
        inner_pad, outer_pad = pads
        inner = inner_pad.copy()
        inner.update(message)
        outer = outer_pad.copy()
        outer.update(inner.digest())
        return outer.digest()

    def srs_secrets(self) -> tuple[bytes, ...]:
        """Secrets for SRS: the active key's first (it signs), then every other key that verifies."""
        ordered = sorted(
            (k for k in self.keys if k.verifies), key=lambda k: (k.state is not KeyState.ACTIVE, k.id)
        )
        return tuple(k.secret for k in ordered)
