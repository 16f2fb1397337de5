"""Envelope addresses (RFC 5321 section 4.1.2, RFC 6531 for SMTPUTF8): parse and format.

Pure and cheap: the SMTP edge calls `parse_path` for every MAIL FROM and RCPT TO, so the common case (a
plain ASCII dot-string at a host name) is one regular expression; only quoted, UTF-8 or odd input takes the
slow path, which says exactly what is wrong.

Choices worth knowing:
- The address is split at the *last* `@`: a quoted local part may hold an `@` (`"a@b"@example.com`), a
  domain never does.
- `Address.local` is the local part with its quotes removed and its backslash escapes resolved; `str()`
  puts quotes back only where RFC 5321 needs them, so `"abc"@x` comes out as `abc@x` (the same mailbox).
- The domain is kept as given, case and all; it is checked for shape, not looked up.
- RFC 5321 section 4.5.3.1 limits: local part 64 octets, domain 255, path 256 (with the angle brackets,
  so 254 for `local@domain`). One exception: a local part that carries a prvs or SRS tag may be longer than
  64 octets, because the rewriter (we, Exim or postsrsd) adds the tag to a local part that was within the
  limit, and refusing the bounce to it would lose it. The path limit still applies to tagged addresses.
- A source route (`<@a,@b:user@c>`) is accepted and dropped, as RFC 5321 section 4.1.2 asks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import AddressError, GatewayError

MAX_LOCAL = 64  # octets, RFC 5321 section 4.5.3.1.1
MAX_DOMAIN = 255  # octets, section 4.5.3.1.2
MAX_PATH = 256  # octets including "<" and ">", section 4.5.3.1.3
MAX_ADDRESS = MAX_PATH - 2  # local@domain without the angle brackets
MAX_LABEL = 63  # octets per domain label (RFC 1035)

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"  # the hyphen escaped: other ranges follow it in classes
# Regular-expression sources for the fast path, shared with prvs.py and srs.py so that their hot paths
# need one match per address: a plain ASCII dot-string, and an ASCII host name.
# Possessive quantifiers (Python 3.11): each class is disjoint from what may follow it, so nothing is
# ever given back, and not recording backtrack points makes the match faster. A label is runs of letters
# and digits joined by runs of hyphens: no hyphen first or last.
# Only on single classes: a possessive repeat of a group matches wrongly before CPython 3.11.5
# (gh-106052), and Debian 12's python3 is 3.11.2 ("user.@example.com" passed). The group repeats stay
# greedy; their separators are disjoint from the classes, so they give back at most one step.
PLAIN_LOCAL = rf"[{_ATEXT}]++(?:\.[{_ATEXT}]++)*"
_PLAIN_LABEL = r"[A-Za-z0-9_]++(?:-++[A-Za-z0-9_]++)*"
PLAIN_DOMAIN = rf"{_PLAIN_LABEL}(?:\.{_PLAIN_LABEL})*"
_PLAIN = re.compile(rf"<?({PLAIN_LOCAL})@({PLAIN_DOMAIN})>?")
# A local part that can be written without quotes (RFC 6531 adds every non-ASCII character to atext).
_DOT_STRING = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*")
# A domain label: letters, digits, hyphens, and (RFC 6531) U-labels. Underscores are not RFC 5321, but
# they occur in real host names and refusing them would lose mail, so they are let through.
_LABEL = re.compile(
    r"[A-Za-z0-9_\u0080-\U0010ffff](?:[A-Za-z0-9_\u0080-\U0010ffff-]*[A-Za-z0-9_\u0080-\U0010ffff])?"
)
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")  # dcontent, section 4.1.3
# Characters a quoted local part may hold as they are (qtextSMTP plus UTF-8), and those that need "\".
_QTEXT = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]*")
_TAGGED = re.compile(r"(?:prvs=|srs[01][=+-])", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True, slots=True)
class Address:
    """An envelope mailbox. Build it with `parse_address`/`parse_path`, which check it."""

    local: str  # the local part, unquoted (the quotes of "a b"@x are gone; escapes resolved)
    domain: str  # as given (case kept); IDNA/UTF-8 allowed

    def __str__(self) -> str:
        return f"{quote_local(self.local)}@{self.domain}"


def quote_local(local: str) -> str:
    """The local part as RFC 5321 writes it: bare when it is a dot-string, else a quoted string."""
    if _DOT_STRING.fullmatch(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_path(text: str) -> Address | None:
    """Parse `<local@domain>`, `local@domain` or the null sender `<>` (returned as None).

    Raises AddressError saying what is wrong.
    """
    m = _PLAIN.fullmatch(text)
    if m is not None and (text[0] == "<") == (text[-1] == ">"):
        local, domain = m.group(1, 2)
        if len(local) <= MAX_LOCAL and plain_lengths_ok(local, domain):
            return Address(local, domain)
    return _parse_slow(text)


def plain_lengths_ok(local: str, domain: str, extra: int = 0) -> bool:
    """Length checks for a pair that matched PLAIN_LOCAL and PLAIN_DOMAIN (ASCII: characters are octets).

    `extra` octets are added to the local part (a tag about to be added, or one already stripped). The
    64-octet local-part limit is left to the caller, since a tagged local part is exempt from it.
    """
    if len(local) + extra + len(domain) >= MAX_ADDRESS or len(domain) > MAX_DOMAIN:
        return False
    return len(domain) <= MAX_LABEL or all(len(label) <= MAX_LABEL for label in domain.split("."))


def parse_address(text: str) -> Address:
    """Like `parse_path`, but the null sender is an error: use it where a mailbox is required."""
    address = parse_path(text)
    if address is None:
        raise AddressError("the null sender <> is not a mailbox: an address is required here", "5.1.3")
    return address


def parse_domain(text: str) -> str:
    """Check a domain (or address literal) on its own and return it unchanged; raises AddressError."""
    _check_domain(text, text)
    return text


def is_dot_string(local: str) -> bool:
    """True when the local part can be written without quotes."""
    return _DOT_STRING.fullmatch(local) is not None


def _parse_slow(text: str) -> Address | None:
    inner = text
    if text.startswith("<") or text.endswith(">"):
        if not (text.startswith("<") and text.endswith(">") and len(text) >= 2):
            raise AddressError(f"{_show(text)}: unbalanced angle brackets; write <local@domain>")
        inner = text[1:-1]
        if inner == "":
            return None  # the null sender
    if inner == "":
        raise AddressError("the address is empty; the null sender is written <>")
    if inner.startswith("@"):
        # A source route: RFC 5321 section 4.1.2 says accept it and ignore it.
        colon = inner.find(":")
        if colon < 0:
            raise AddressError(f"{_show(text)}: source route without ':' before the mailbox")
        inner = inner[colon + 1 :]
    try:
        octets = len(inner.encode("utf-8"))
    except UnicodeEncodeError:
        raise AddressError(f"{_show(text)}: not valid UTF-8") from None
    at = inner.rfind("@")
    if at < 0:
        raise AddressError(f"{_show(text)}: no '@': an envelope address must be local@domain")
    raw_local, domain = inner[:at], inner[at + 1 :]
    if raw_local == "":
        raise AddressError(f"{_show(text)}: the local part before '@' is empty")
    if domain == "":
        raise AddressError(f"{_show(text)}: the domain after '@' is empty")

    if raw_local.startswith('"'):
        local = _unquote(raw_local, text)
    else:
        if not _DOT_STRING.fullmatch(raw_local):
            raise AddressError(f"{_show(text)}: {_why_not_dot_string(raw_local)}")
        local = raw_local
    _check_domain(domain, text)

    local_octets = len(raw_local.encode("utf-8"))
    if local_octets > MAX_LOCAL and not _TAGGED.match(local):
        raise AddressError(
            f"{_show(text)}: the local part is {local_octets} octets; RFC 5321 allows at most {MAX_LOCAL}"
        )
    if octets > MAX_ADDRESS:
        raise AddressError(
            f"{_show(text)}: the path is {octets + 2} octets with its angle brackets; "
            f"RFC 5321 allows at most {MAX_PATH}"
        )
    return Address(local, domain)


def _unquote(raw: str, text: str) -> str:
    if len(raw) < 2 or not raw.endswith('"'):
        raise AddressError(f'{_show(text)}: a quoted local part must be one quoted string, "..."@domain')
    body = raw[1:-1]
    if "\\" not in body:
        if '"' in body:
            raise AddressError(f"{_show(text)}: a '\"' inside a quoted local part must be written \\\"")
        if not _QTEXT.fullmatch(body):
            raise AddressError(f"{_show(text)}: a control character in the quoted local part")
        return body
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            if i + 1 == len(body):
                raise AddressError(f"{_show(text)}: the quoted local part ends in a lone backslash")
            nxt = body[i + 1]
            # quoted-pairSMTP is a backslash and one printable ASCII character (RFC 5321 section 4.1.2)
            if not " " <= nxt <= "~":
                raise AddressError(f"{_show(text)}: a backslash escapes a character that cannot be escaped")
            out.append(nxt)
            i += 2
            continue
        if ch == '"':
            raise AddressError(f"{_show(text)}: a '\"' inside a quoted local part must be written \\\"")
        if not _QTEXT.fullmatch(ch):
            raise AddressError(f"{_show(text)}: a control character in the quoted local part")
        out.append(ch)
        i += 1
    return "".join(out)


def _why_not_dot_string(local: str) -> str:
    if local.startswith(".") or local.endswith("."):
        return "the local part starts or ends with '.'; quote it (\"...\") if it really does"
    if ".." in local:
        return "the local part has '..'; quote it (\"...\") if it really does"
    if '"' in local:
        return 'a quoted string must be the whole local part ("..."@domain), not part of it'
    bad = next((c for c in local if not _DOT_STRING.fullmatch(c) and c != "."), "?")
    return f'{bad!r} is not allowed in an unquoted local part; quote the local part ("...")'


def _check_domain(domain: str, text: str) -> None:
    try:
        octets = len(domain.encode("utf-8"))
    except UnicodeEncodeError:
        raise AddressError(f"{_show(text)}: the domain is not valid UTF-8") from None
    if octets > MAX_DOMAIN:
        raise AddressError(
            f"{_show(text)}: the domain is {octets} octets; RFC 5321 allows at most {MAX_DOMAIN}"
        )
    if domain.startswith("["):
        if not _ADDRESS_LITERAL.fullmatch(domain):
            raise AddressError(f"{_show(text)}: {domain!r} is not an address literal like [192.0.2.1]")
        return
    for label in domain.split("."):
        if label == "":
            raise AddressError(
                f"{_show(text)}: the domain has an empty label (a leading, trailing or double dot)"
            )
        if not _LABEL.fullmatch(label):
            raise AddressError(
                f"{_show(text)}: domain label {label!r} may hold only letters, digits and inner hyphens"
            )
        if len(label.encode("utf-8")) > MAX_LABEL:
            raise AddressError(f"{_show(text)}: domain label {label[:20]!r}... is over {MAX_LABEL} octets")


def within_path_limit(address: Address, given: str, what: str, error: type[GatewayError]) -> str:
    """`address`, which a signer or forwarder made from `given` by adding to it, as text; `error` if it
    would be over the path limit (section 4.5.3.1.3): no next hop would take it."""
    text = str(address)
    if len(text.encode()) > MAX_ADDRESS:
        raise error(
            f"{_show(given)}: the {what} address would be over RFC 5321's {MAX_PATH}-octet path limit"
        )
    return text


def _show(text: str) -> str:
    """The offending input, shortened: an error line must stay one readable line."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    return repr(shown)
