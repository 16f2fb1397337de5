"""Every SMTP reply the gateway makes, named once (as aiosmtpd's testing/statuscodes.py does).

A reply carries its basic code, its enhanced status code (RFC 3463) and text an operator can read. The
class of a reply is checked when it is built, so a "reject" with a 4xx code cannot be made by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reply:
    code: int
    status: str  # the enhanced status code, "X.Y.Z"
    text: str
    # Ours, but about the next hop (down, broken, out of step): not the client's error (guard.ErrorTally).
    from_next_hop: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code {self.code} is out of range")
        if self.status and self.status[0] != str(self.code)[0]:
            raise ValueError(f"enhanced status {self.status} does not match reply code {self.code}")

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def positive(self) -> bool:
        return self.code < 400

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}" if self.status else f"{self.code} {self.text}"


# --- positive ---------------------------------------------------------------------------------------
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")

# --- transient --------------------------------------------------------------------------------------
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_SESSIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_CLIENT = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
NEXT_HOP_DOWN = Reply(451, "4.4.1", "Next hop not reachable, try again later", from_next_hop=True)
NEXT_HOP_TIMEOUT = Reply(451, "4.4.2", "Next hop timed out, try again later", from_next_hop=True)
NEXT_HOP_BROKEN = Reply(451, "4.4.2", "Next hop connection broken, try again later", from_next_hop=True)
NEXT_HOP_PROTOCOL = Reply(451, "4.5.0", "Next hop protocol error, try again later", from_next_hop=True)
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
SEPARATE_TRANSACTION = Reply(452, "4.5.3", "Send this recipient in a separate transaction")
KEYRING_UNAVAILABLE = Reply(451, "4.3.5", "Signing keys unavailable, try again later")
# [state] null_sender_rate: RFC 3463 X.7.1, delivery not authorized (for now); the sender's queue retries.
NULL_SENDER_RATE = Reply(450, "4.7.1", "Too many bounces from your network, slow down")

# --- permanent --------------------------------------------------------------------------------------
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_NEWLINE = Reply(554, "5.5.0", "Bare <LF> or <CR> received; use <CR><LF>")


def relay_denied(address: str) -> Reply:
    return Reply(554, "5.7.1", f"<{address}>: Relay access denied")


def client_not_trusted(ip: str) -> Reply:
    return Reply(554, "5.7.1", f"Client host [{ip}] is not allowed to relay through this gateway")


def bounce_refused(address: str, why: str) -> Reply:
    """A null-sender message to an address we never signed (RFC 3464 DSNs go to the envelope sender)."""
    return Reply(550, "5.7.1", f"<{address}>: bounce to an address we never signed ({why})")


def ledger_too_big(recipient: str, limit: int) -> Reply:
    """552 5.3.4: what is too big is the part the ledger reads, not the message (RFC 3463 X.3.4 "too big
    for system"); the sender learns that a smaller answer (headers only, RET=HDRS) would be read."""
    return Reply(
        552,
        "5.3.4",
        f"<{recipient}>: a null-sender message to an address we never signed must show what it answers "
        f"within its first {limit // 1024} KiB",
    )


def ledger_unavailable(recipient: str) -> Reply:
    """451 4.3.0: the Message-ID ledger's store could not answer; never a 5xx for our outage."""
    return Reply(451, "4.3.0", f"<{recipient}>: message ledger unavailable, try again later")


def tag_refused(address: str, why: str) -> Reply:
    """A non-null sender writing to an invalid tag, where the operator chose to refuse it."""
    return Reply(550, "5.7.1", f"<{address}>: invalid return-path tag ({why})")



def bad_address(address: str, why: str, status: str = "5.1.3") -> Reply:
    return Reply(501 if status.startswith("5.5") else 553, status, f"<{address}>: {why}")


# --- the SMTP edge (relay.py, smtpd.py) ---------------------------------------------------------------
# RFC 3463 X.3.3 "system not capable of selected features": the next hop lost an extension (8BITMIME,
# SMTPUTF8, DSN) since we offered it; transient, as it may come back.
NEXT_HOP_CANNOT_CARRY = Reply(
    451, "4.3.3", "Next hop cannot carry this message now, try again later", from_next_hop=True
)
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")

# --- the SMTP conversation (smtpcore.py: the server's state machine) ---------------------------------
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
CANNOT_VRFY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321")
EXPN_NOT_IMPLEMENTED = Reply(502, "5.5.1", "EXPN not implemented")
STARTTLS_NOT_AVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
# RFC 5321 §2.3.8: CR and LF only ever together; a command with a lone one (or a NUL) is not run.
BARE_CR_OR_NUL = Reply(500, "5.5.2", "Error: bare <CR> or NUL in command line")
HELO_FIRST = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
MAIL_IN_PROGRESS = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
XFORWARD_NOT_AUTHORIZED = Reply(550, "5.7.0", "Error: insufficient authorization")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
PATH_SYNTAX = Reply(501, "5.5.4", "Syntax: address must be in angle brackets")
MALFORMED_PATH = Reply(553, "5.1.3", "Malformed address")
NULL_RECIPIENT = Reply(501, "5.1.3", "The null address is not a recipient")
PARAMETERS_NEED_EHLO = Reply(501, "5.5.4", "Parameters need EHLO")
PARAMETER_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters")
BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter")
BAD_BODY = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
BAD_SMTPUTF8 = Reply(501, "5.5.4", "SMTPUTF8 takes no value")
BAD_RET = Reply(501, "5.5.4", "RET must be FULL or HDRS")
BAD_ENVID = Reply(501, "5.5.4", "Bad ENVID parameter")
BAD_NOTIFY = Reply(501, "5.5.4", "Bad NOTIFY parameter")
BAD_ORCPT = Reply(501, "5.5.4", "Bad ORCPT parameter")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")


def greeting(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP")


def helo_ok(hostname: str) -> Reply:
    return Reply(250, "", hostname)


def malformed_address(status: str) -> Reply:
    """A path addresses.parse_path refused; its status says whether syntax (5.5.x) or the address."""
    return Reply(501 if status.startswith("5.5") else 553, status, MALFORMED_PATH.text)


def helo_syntax(verb: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {verb} hostname")


def no_argument(verb: str) -> Reply:
    """RSET, DATA and STARTTLS take no argument."""
    return Reply(501, "5.5.4", f"Syntax: {verb}")


def duplicate_parameter(verb: str, keyword: str) -> Reply:
    return Reply(501, "5.5.4", f"Duplicate {verb} parameter {keyword}")


def unknown_parameter(verb: str, keyword: str) -> Reply:
    return Reply(555, "5.5.4", f"{verb} parameter {keyword} not recognized")


def bad_xforward(why: str) -> Reply:
    return Reply(501, "5.5.4", why)
