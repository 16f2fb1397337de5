"""The exception tree.

An expected outcome (a forged tag, an expired SRS address) is a value, never an exception. Exceptions are
for input that cannot be used at all and for the operator's own files. Every message says what is wrong
and, where it can, what fixes it. No message ever carries a secret.
"""

from __future__ import annotations


class GatewayError(Exception):
    """The root of every error this package raises on purpose."""


class AddressError(GatewayError, ValueError):
    """An envelope address that cannot be parsed or is over an RFC 5321 limit.

    `status_hint` is the enhanced status code (RFC 3463) an SMTP front end should answer with.
    """

    def __init__(self, message: str, status_hint: str = "5.1.3") -> None:
        super().__init__(message)
        self.status_hint = status_hint


class SrsError(GatewayError, ValueError):
    """An address SRS cannot forward (for example one without a domain)."""


class PrvsError(GatewayError, ValueError):
    """An address that must not be prvs-signed, or a key that cannot sign."""


class ConfigError(GatewayError):
    """A config file, or a flag, that cannot be used. The message names the file and the key."""


class KeyringError(GatewayError):
    """A keyring file that cannot be used. The message names the file, the key id and the fix."""


class UsageError(GatewayError):
    """A command line that cannot be used (exit code 2)."""
