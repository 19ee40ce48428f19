"""The sans-IO SMTP server core: client bytes in, events and reply bytes out.

Most cases are rows of ``(setup, client bytes, expected replies)`` run by
:class:`Session`, which drives a :class:`ServerConnection` the way the gevent
adapter does and answers every event with the python-slimta 4.0 default reply.
Expected replies are named prefixes of the last line of each reply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from slimta.smtp import _events as ev
from slimta.smtp._server import (
    AUTH_LINE_LIMIT,
    COMMAND_LINE_LIMIT,
    PARAM_LINE_LIMIT,
    ServerConnection,
)
from slimta.smtp._state import State
from slimta.smtp.extensions import Extensions

# --------------------------------------------------------------------------
# Named replies: the code and enhanced status code a reply line starts with.
# --------------------------------------------------------------------------
GREETING = b"220 "
HELLO_OK = b"250 "
OK = b"250 2.0.0"
SENDER_OK = b"250 2.1.0"
RCPT_OK = b"250 2.1.5"
QUEUED = b"250 2.6.0"
CHUNK_OK = b"250 2.0.0"
CANNOT_VRFY = b"252 2.5.0"
START_DATA = b"354 "
TLS_GO = b"220 2.7.0"
AUTH_CHALLENGE = b"334 "
AUTH_OK = b"235 2.7.0"
BYE = b"221 2.0.0"
TOO_MANY_ERRORS = b"421 4.7.0"
TOO_MANY_RCPTS = b"452 4.5.3"
UNRECOGNIZED = b"500 5.5.2"  # unknown verb, too long, bad characters, bad UTF-8
BAD_ARGUMENTS = b"501 5.5.4"
BAD_SENDER = b"501 5.1.7"
BAD_RECIPIENT = b"501 5.1.3"
NOT_IMPLEMENTED = b"502 5.5.1"
BAD_SEQUENCE = b"503 5.5.1"
BDAT_SYNTAX = b"521 5.5.4"
AUTH_FAILED = b"535 5.7.8"
BARE_NEWLINE_IN_DATA = b"550 5.5.2"
TOO_BIG = b"552 5.3.4"
NEED_SMTPUTF8 = b"553 5.6.7"
LONG_DATA_LINE = b"554 5.6.0"
UNKNOWN_PARAM = b"555 5.5.4"

#: The SIZE limit of the default extension set.
SIZE_LIMIT = 1000

#: The 4.0 default replies (spec 4.8), per event class.
DEFAULTS: dict[type[ev.Event], Callable[[Any], tuple[str, str]]] = {
    ev.Ehlo: lambda e: (250, f"mx.test Hello {e.name}"),
    ev.Helo: lambda e: (250, f"mx.test Hello {e.name}"),
    ev.MailFrom: lambda e: (250, f"2.1.0 Sender <{e.address}> Ok"),
    ev.RcptTo: lambda e: (250, f"2.1.5 Recipient <{e.address}> Ok"),
    ev.Data: lambda e: (354, "Start mail input; end with <CRLF>.<CRLF>"),
    ev.MessageReceived: lambda e: (250, "2.6.0 Message accepted for delivery"),
    ev.MessageRefused: lambda e: (e.code, e.message),
    ev.Rset: lambda e: (250, "2.0.0 Ok"),
    ev.Noop: lambda e: (250, "2.0.0 Ok"),
    ev.Quit: lambda e: (221, "2.0.0 Bye"),
    ev.Vrfy: lambda e: (
        252,
        "2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
    ),
    ev.UnknownCommand: lambda e: (500, "5.5.2 Syntax error, command unrecognized"),
    ev.StartTls: lambda e: (220, "2.7.0 Go ahead"),
    ev.Auth: lambda e: (535, "5.7.8 Authentication credentials invalid"),
    ev.AuthResponse: lambda e: (535, "5.7.8 Authentication credentials invalid"),
}


def default_extensions(*, size: int | None = SIZE_LIMIT) -> Extensions:
    ext = Extensions()
    for keyword in (
        "8BITMIME",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
        "BINARYMIME",
        "STARTTLS",
    ):
        ext.add(keyword)
    ext.add("AUTH", "PLAIN LOGIN")
    if size is not None:
        ext.add("SIZE", size)
    return ext


def split_replies(data: bytes) -> list[bytes]:
    """Split reply bytes into whole replies (continuation lines included)."""
    replies: list[bytes] = []
    current = b""
    for line in data.split(b"\r\n")[:-1]:
        current += line + b"\r\n"
        if len(line) == 3 or line[3:4] == b" ":
            replies.append(current)
            current = b""
    assert not current, f"unterminated reply {current!r}"
    assert data.endswith(b"\r\n") or not data
    return replies


def last_lines(data: bytes) -> list[bytes]:
    """The last line of each reply, CRLF removed."""
    return [reply.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1] for reply in split_replies(data)]


def assert_replies(data: bytes, expected: list[bytes]) -> None:
    lines = last_lines(data)
    got = [line[: len(exp)] for line, exp in zip(lines, expected, strict=False)]
    got += lines[len(expected) :]
    assert got == expected, lines


class Session:
    """Drives a :class:`ServerConnection` like the adapter, answering with defaults.

    :param answers: per event class, a function giving ``(code, message)``
        that replaces the default answer.
    """

    def __init__(
        self,
        extensions: Extensions | None = None,
        *,
        greet: bool = True,
        answers: dict[type[ev.Event], Callable[[Any], tuple[str, str]]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.extensions = default_extensions() if extensions is None else extensions
        self.conn = ServerConnection(self.extensions, **kwargs)
        self.answers = dict(DEFAULTS)
        self.answers.update(answers or {})
        #: Every event seen, NeedData excluded.
        self.events: list[ev.Event] = []
        if greet:
            self.conn.greet(220, "mx.test ESMTP")
            assert_replies(self.conn.data_to_send(), [GREETING])

    def send(self, data: bytes) -> bytes:
        """Feed *data* (``b''`` = end of input), run to NeedData; the reply bytes."""
        self.conn.receive_data(data)
        self.pump()
        return self.conn.data_to_send()

    def pump(self) -> ev.Event:
        conn = self.conn
        while True:
            event = conn.next_event()
            if isinstance(event, ev.NeedData):
                return event
            self.events.append(event)
            if isinstance(event, ev.ConnectionClosed):
                return event
            if isinstance(event, ev.AuthAborted):
                continue  # the core answered already
            code, message = self.answers[type(event)](event)
            conn.respond(code, message)

    def events_of(self, *kinds: type[ev.Event]) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, kinds)]

    @property
    def closed(self) -> bool:
        return self.conn.state is State.CLOSED


SETUPS = {
    "fresh": b"",
    "ready": b"EHLO client.test\r\n",
    "mail": b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\n",
    "rcpt": b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n",
}


def session_at(setup: str, **kwargs: Any) -> Session:
    session = Session(**kwargs)
    if SETUPS[setup]:
        session.send(SETUPS[setup])
    return session


# --------------------------------------------------------------------------
# The table: (setup, client bytes, expected replies).
# --------------------------------------------------------------------------
U = "δοκιμή@παράδειγμα.δοκιμή"

TABLE: list[tuple[str, bytes, list[bytes]]] = [
    # EHLO / HELO
    ("fresh", b"EHLO client.test\r\n", [HELLO_OK]),
    ("fresh", b"ehlo client.test\r\n", [HELLO_OK]),
    ("fresh", b"HELO client.test\r\n", [HELLO_OK]),
    ("fresh", b"EHLO\r\n", [BAD_ARGUMENTS]),
    ("fresh", b"EHLO \r\n", [BAD_ARGUMENTS]),
    ("fresh", b"HELO\r\n", [BAD_ARGUMENTS]),
    ("rcpt", b"EHLO again\r\nDATA\r\n", [HELLO_OK, BAD_SEQUENCE]),
    ("rcpt", b"HELO again\r\nDATA\r\n", [HELLO_OK, BAD_SEQUENCE]),
    # sequence before EHLO
    ("fresh", b"MAIL FROM:<a@example.com>\r\n", [BAD_SEQUENCE]),
    ("fresh", b"RCPT TO:<a@example.com>\r\n", [BAD_SEQUENCE]),
    ("fresh", b"DATA\r\n", [BAD_SEQUENCE]),
    ("fresh", b"STARTTLS\r\n", [BAD_SEQUENCE]),
    ("fresh", b"AUTH PLAIN AGEAYg==\r\n", [BAD_SEQUENCE]),
    ("fresh", b"NOOP\r\n", [OK]),
    ("fresh", b"RSET\r\n", [OK]),
    ("fresh", b"VRFY someone\r\n", [CANNOT_VRFY]),
    ("fresh", b"QUIT\r\n", [BYE]),
    # simple commands
    ("ready", b"NOOP with an argument\r\n", [OK]),
    ("ready", b"RSET extra\r\n", [BAD_ARGUMENTS]),
    ("ready", b"QUIT now\r\n", [BAD_ARGUMENTS]),
    ("ready", b"VRFY\r\n", [BAD_ARGUMENTS]),
    ("ready", b"VRFY postmaster\r\n", [CANNOT_VRFY]),
    ("ready", b"XFOO bar\r\n", [UNRECOGNIZED]),
    ("ready", b"EXPN list\r\n", [UNRECOGNIZED]),
    ("ready", b"\r\n", [UNRECOGNIZED]),
    ("ready", b" NOOP\r\n", [UNRECOGNIZED]),
    ("ready", b"NO-OP\r\n", [UNRECOGNIZED]),
    # MAIL
    ("ready", b"MAIL FROM:<a@example.com>\r\n", [SENDER_OK]),
    ("ready", b"mail from:<a@example.com>\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM: <a@example.com>\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<>\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<@relay.example:a@example.com>\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<a@[192.0.2.1]>\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:a@example.com\r\n", [BAD_SENDER]),
    ("ready", b"MAIL FROM:<a@example.com\r\n", [BAD_SENDER]),
    ("ready", b"MAIL FROM:<a@>\r\n", [BAD_SENDER]),
    ("ready", b"MAIL FROM:<a b@example.com>\r\n", [BAD_SENDER]),
    ("ready", b"MAIL FROM:<a@example.com>junk\r\n", [BAD_ARGUMENTS]),
    ("ready", b"MAIL TO:<a@example.com>\r\n", [BAD_ARGUMENTS]),
    ("ready", b"MAIL\r\n", [BAD_ARGUMENTS]),
    ("ready", b"MAIL FROM:<a@example.com> FOO=bar\r\n", [UNKNOWN_PARAM]),
    ("ready", b"MAIL FROM:<a@example.com> =bar\r\n", [BAD_ARGUMENTS]),
    ("ready", b"MAIL FROM:<a@example.com> FOO=\r\n", [BAD_ARGUMENTS]),
    ("ready", b"MAIL FROM:<a@example.com> BODY=7BIT BODY=7BIT\r\n", [BAD_ARGUMENTS]),
    (
        "ready",
        b"MAIL FROM:<a@example.com>\r\nMAIL FROM:<a@example.com>\r\n",
        [SENDER_OK, BAD_SEQUENCE],
    ),
    # SIZE (RFC 1870)
    ("ready", b"MAIL FROM:<a@example.com> SIZE=1000\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<a@example.com> size=999\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<a@example.com> SIZE=1001\r\n", [TOO_BIG]),
    ("ready", b"MAIL FROM:<a@example.com> SIZE=99999999999999999999\r\n", [TOO_BIG]),
    ("ready", b"MAIL FROM:<a@example.com> SIZE=abc\r\n", [BAD_ARGUMENTS]),
    ("ready", b"MAIL FROM:<a@example.com> SIZE=-1\r\n", [BAD_ARGUMENTS]),
    ("ready", b"MAIL FROM:<a@example.com> SIZE\r\n", [BAD_ARGUMENTS]),
    # 8BITMIME (RFC 6152) and BINARYMIME (RFC 3030)
    ("ready", b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<a@example.com> BODY=7BIT\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<a@example.com> body=8bitmime\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<a@example.com> BODY=9BIT\r\n", [BAD_ARGUMENTS]),
    ("ready", b"MAIL FROM:<a@example.com> BODY\r\n", [BAD_ARGUMENTS]),
    # SMTPUTF8 (RFC 6531)
    ("ready", b"MAIL FROM:<a@example.com> SMTPUTF8\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<a@example.com> SMTPUTF8=yes\r\n", [BAD_ARGUMENTS]),
    ("ready", f"MAIL FROM:<{U}>\r\n".encode(), [NEED_SMTPUTF8]),
    ("ready", f"MAIL FROM:<{U}> SMTPUTF8\r\n".encode(), [SENDER_OK]),
    ("ready", f"MAIL FROM:<{U}> SMTPUTF8\r\nRCPT TO:<{U}>\r\n".encode(), [SENDER_OK, RCPT_OK]),
    ("mail", f"RCPT TO:<{U}>\r\n".encode(), [NEED_SMTPUTF8]),
    # AUTH= on MAIL (RFC 4954 section 5)
    ("ready", b"MAIL FROM:<a@example.com> AUTH=<>\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<a@example.com> AUTH=user+40example.com\r\n", [SENDER_OK]),
    ("ready", b"MAIL FROM:<a@example.com> AUTH=user+zz\r\n", [BAD_ARGUMENTS]),
    # RCPT
    ("mail", b"RCPT TO:<b@example.com>\r\n", [RCPT_OK]),
    ("mail", b"rcpt to:<b@example.com>\r\n", [RCPT_OK]),
    ("mail", b"RCPT TO:<postmaster>\r\n", [RCPT_OK]),
    ("mail", b"RCPT TO:<PostMaster>\r\n", [RCPT_OK]),
    ("mail", b'RCPT TO:<"john doe"@example.com>\r\n', [RCPT_OK]),
    ("mail", b"RCPT TO:<b@[IPv6:2001:db8::1]>\r\n", [RCPT_OK]),
    ("mail", b"RCPT TO:<>\r\n", [BAD_RECIPIENT]),
    ("mail", b"RCPT TO:b@example.com\r\n", [BAD_RECIPIENT]),
    ("mail", b"RCPT TO:<b@example.com> NOTIFY=NEVER\r\n", [UNKNOWN_PARAM]),
    ("mail", b"RCPT FROM:<b@example.com>\r\n", [BAD_ARGUMENTS]),
    ("mail", b"DATA\r\n", [BAD_SEQUENCE]),
    ("mail", b"MAIL FROM:<a@example.com>\r\n", [BAD_SEQUENCE]),
    ("ready", b"RCPT TO:<b@example.com>\r\n", [BAD_SEQUENCE]),
    ("ready", b"DATA\r\n", [BAD_SEQUENCE]),
    # DATA
    ("rcpt", b"DATA\r\n", [START_DATA]),
    ("rcpt", b"DATA now\r\n", [BAD_ARGUMENTS]),
    ("rcpt", b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\n", [START_DATA, QUEUED]),
    ("rcpt", b"DATA\r\n.\r\n", [START_DATA, QUEUED]),
    ("rcpt", b"DATA\r\nhi\r\n.\r\nDATA\r\n", [START_DATA, QUEUED, BAD_SEQUENCE]),
    ("rcpt", b"RSET\r\nDATA\r\n", [OK, BAD_SEQUENCE]),
    ("rcpt", b"DATA\r\nbare\nLF\r\n.\r\n", [START_DATA, BARE_NEWLINE_IN_DATA]),
    ("rcpt", b"DATA\r\nbare\rCR\r\n.\r\n", [START_DATA, BARE_NEWLINE_IN_DATA]),
    ("rcpt", b"MAIL FROM:<a@example.com>\r\nDATA\r\n", [BAD_SEQUENCE, START_DATA]),
    # BDAT (RFC 3030)
    ("rcpt", b"BDAT 5 LAST\r\nhello", [QUEUED]),
    ("rcpt", b"bdat 5 last\r\nhello", [QUEUED]),
    ("rcpt", b"BDAT 0 LAST\r\n", [QUEUED]),
    ("rcpt", b"BDAT 3\r\nabcBDAT 2 LAST\r\nde", [CHUNK_OK, QUEUED]),
    ("rcpt", b"BDAT 3\r\nabcBDAT 0 LAST\r\n", [CHUNK_OK, QUEUED]),
    ("rcpt", b"BDAT 3\r\nabcDATA\r\n", [CHUNK_OK, BAD_SEQUENCE]),
    ("rcpt", b"BDAT 3\r\nabcMAIL FROM:<a@example.com>\r\n", [CHUNK_OK, BAD_SEQUENCE]),
    ("rcpt", b"BDAT 6 LAST\r\nbare\nx", [BARE_NEWLINE_IN_DATA]),
    ("ready", b"BDAT 4\r\nNOOPNOOP\r\n", [BAD_SEQUENCE, OK]),
    ("mail", b"BDAT 4 LAST\r\nNOOPNOOP\r\n", [BAD_SEQUENCE, OK]),
    ("fresh", b"BDAT 4\r\nNOOPNOOP\r\n", [BAD_SEQUENCE, OK]),
    ("rcpt", b"BDAT x\r\nNOOP\r\n", [BDAT_SYNTAX]),
    ("rcpt", b"BDAT\r\nNOOP\r\n", [BDAT_SYNTAX]),
    ("rcpt", b"BDAT -1\r\nNOOP\r\n", [BDAT_SYNTAX]),
    ("rcpt", b"BDAT 5 MORE\r\nNOOP\r\n", [BDAT_SYNTAX]),
    ("ready", b"BDAT x\r\nNOOP\r\n", [BDAT_SYNTAX]),
    # BODY=BINARYMIME needs BDAT; binary content may hold bare LF and long lines
    (
        "ready",
        b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
        [SENDER_OK, RCPT_OK, BAD_SEQUENCE],
    ),
    (
        "ready",
        b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\nRCPT TO:<b@example.com>\r\n"
        b"BDAT 6 LAST\r\nbare\nx",
        [SENDER_OK, RCPT_OK, QUEUED],
    ),
    # STARTTLS and AUTH sequencing
    ("ready", b"STARTTLS\r\n", [TLS_GO]),
    ("ready", b"STARTTLS now\r\n", [BAD_ARGUMENTS]),
    ("mail", b"STARTTLS\r\n", [BAD_SEQUENCE]),
    ("ready", b"AUTH\r\n", [BAD_ARGUMENTS]),
    ("ready", b"AUTH PLAIN a b\r\n", [BAD_ARGUMENTS]),
    ("mail", b"AUTH PLAIN AGEAYg==\r\n", [BAD_SEQUENCE]),
    ("rcpt", b"AUTH PLAIN AGEAYg==\r\n", [BAD_SEQUENCE]),
    # characters and line endings in commands
    ("ready", b"NOOP\x00\r\n", [UNRECOGNIZED]),
    ("ready", b"MAIL FROM:<a\x00@example.com>\r\n", [UNRECOGNIZED]),
    ("ready", b"NOOP \x01\r\n", [UNRECOGNIZED]),
    ("ready", b"NOOP \x7f\r\n", [UNRECOGNIZED]),
    ("ready", b"NOOP \xff\xfe\r\n", [UNRECOGNIZED]),
    ("ready", b"MAIL FROM:<\xc3(@example.com>\r\n", [UNRECOGNIZED]),
    ("ready", b"NOOP\nNOOP\r\n", [UNRECOGNIZED]),
    ("ready", b"NOOP\rNOOP\r\n", [UNRECOGNIZED]),
    ("ready", b"NOOP\n\r\nNOOP\r\n", [UNRECOGNIZED, OK]),
    # line length limits (RFC 5321 4.5.3.1.4)
    ("ready", b"NOOP " + b"x" * (COMMAND_LINE_LIMIT - 5) + b"\r\n", [OK]),
    ("ready", b"NOOP " + b"x" * (COMMAND_LINE_LIMIT - 4) + b"\r\n", [UNRECOGNIZED]),
    ("ready", b"NOOP " + b"x" * (COMMAND_LINE_LIMIT - 4) + b"\r\nNOOP\r\n", [UNRECOGNIZED, OK]),
]


@pytest.mark.parametrize(("setup", "data", "expected"), TABLE)
def test_table(setup: str, data: bytes, expected: list[bytes]) -> None:
    session = session_at(setup)
    assert_replies(session.send(data), expected)


@pytest.mark.parametrize(("setup", "data", "expected"), TABLE)
def test_table_byte_by_byte(setup: str, data: bytes, expected: list[bytes]) -> None:
    session = session_at(setup)
    out = b"".join(session.send(data[i : i + 1]) for i in range(len(data)))
    assert_replies(out, expected)


# --------------------------------------------------------------------------
# Greeting, EHLO, HELO
# --------------------------------------------------------------------------
def test_ehlo_reply_lists_extensions_in_order() -> None:
    session = Session()
    out = session.send(b"EHLO client.test\r\n")
    assert out == (
        b"250-mx.test Hello client.test\r\n"
        b"250-8BITMIME\r\n"
        b"250-PIPELINING\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n"
        b"250-SMTPUTF8\r\n"
        b"250-CHUNKING\r\n"
        b"250-BINARYMIME\r\n"
        b"250-STARTTLS\r\n"
        b"250-AUTH PLAIN LOGIN\r\n"
        b"250 SIZE 1000\r\n"
    )
    assert session.events == [ev.Ehlo("client.test")]
    assert session.conn.state is State.READY


def test_helo_reply_is_one_line() -> None:
    session = Session()
    assert session.send(b"HELO client.test\r\n") == b"250 mx.test Hello client.test\r\n"
    assert session.events == [ev.Helo("client.test")]


def test_ehlo_refused_keeps_session_unhelloed() -> None:
    session = Session(answers={ev.Ehlo: lambda e: (550, "5.7.1 Go away")})
    assert_replies(session.send(b"EHLO bad.test\r\n"), [b"550 5.7.1"])
    assert_replies(session.send(b"MAIL FROM:<a@example.com>\r\n"), [BAD_SEQUENCE])


def test_helo_keeps_size_limit() -> None:
    session = Session()
    session.send(b"HELO client.test\r\n")
    assert_replies(session.send(b"MAIL FROM:<a@example.com> SIZE=5000\r\n"), [TOO_BIG])
    out = session.send(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
        + b"x" * 600
        + b"\r\n"
        + b"x" * 600
        + b"\r\n.\r\n"
    )
    assert_replies(out, [SENDER_OK, RCPT_OK, START_DATA, TOO_BIG])
    refused = session.events_of(ev.MessageRefused)
    assert len(refused) == 1
    assert refused[0].too_big  # type: ignore[attr-defined]


def test_helo_keeps_smtputf8_and_parameter_rules() -> None:
    session = Session()
    session.send(b"HELO client.test\r\n")
    out = session.send(
        f"MAIL FROM:<{U}>\r\nMAIL FROM:<a@example.com> FOO=1\r\n"
        "MAIL FROM:<a@example.com> BODY=9BIT\r\n".encode()
    )
    assert_replies(out, [NEED_SMTPUTF8, UNKNOWN_PARAM, BAD_ARGUMENTS])


def test_greeting_other_than_220_serves_only_quit() -> None:
    session = Session(greet=False)
    session.conn.greet(554, "5.3.2 No service")
    assert session.conn.data_to_send() == b"554 5.3.2 No service\r\n"
    out = session.send(b"EHLO client.test\r\nNOOP\r\nMAIL FROM:<a@example.com>\r\nQUIT\r\n")
    assert_replies(out, [BAD_SEQUENCE, BAD_SEQUENCE, BAD_SEQUENCE, BYE])
    assert session.closed


def test_greeting_421_closes() -> None:
    session = Session(greet=False)
    session.conn.greet(421, "4.3.2 Busy")
    assert session.conn.next_event() == ev.ConnectionClosed()


# --------------------------------------------------------------------------
# Events carry what the client sent
# --------------------------------------------------------------------------
def test_events_of_a_whole_transaction() -> None:
    session = Session()
    session.send(
        b"EHLO client.test\r\n"
        b"MAIL FROM:<a@example.com> SIZE=10 BODY=8BITMIME\r\n"
        b"RCPT TO:<b@example.com>\r\n"
        b"RCPT TO:<postmaster>\r\n"
        b"DATA\r\n"
        b"Subject: hi\r\n\r\nbody\r\n.\r\n"
        b"VRFY someone\r\nXFOO arg\r\nRSET\r\nNOOP\r\nQUIT\r\n"
    )
    assert session.events == [
        ev.Ehlo("client.test"),
        ev.MailFrom("a@example.com", {b"SIZE": b"10", b"BODY": b"8BITMIME"}),
        ev.RcptTo("b@example.com", {}),
        ev.RcptTo("postmaster", {}),
        ev.Data(),
        ev.MessageReceived(b"Subject: hi\r\n\r\nbody\r\n"),
        ev.Vrfy("someone"),
        ev.UnknownCommand("XFOO", "arg"),
        ev.Rset(),
        ev.Noop(),
        ev.Quit(),
        ev.ConnectionClosed(),
    ]


def test_mail_event_params_are_bytes() -> None:
    session = session_at("ready")
    session.send(f"MAIL FROM:<{U}> SMTPUTF8 AUTH=<>\r\n".encode())
    assert session.events[-1] == ev.MailFrom(U, {b"SMTPUTF8": True, b"AUTH": b"<>"})


def test_source_route_dropped() -> None:
    session = session_at("mail")
    session.send(b"RCPT TO:<@a.example,@b.example:c@d.example>\r\n")
    assert session.events[-1] == ev.RcptTo("c@d.example", {})


def test_unknown_command_without_argument() -> None:
    session = session_at("ready")
    session.send(b"XFOO\r\n")
    assert session.events[-1] == ev.UnknownCommand("XFOO", None)


def test_unknown_command_answer_is_the_callers() -> None:
    session = session_at("ready", answers={ev.UnknownCommand: lambda e: (250, "2.0.0 Fine")})
    assert_replies(session.send(b"XCLIENT NAME=x\r\n"), [OK])
    assert session.conn.errors == 0


# --------------------------------------------------------------------------
# PIPELINING (RFC 2920)
# --------------------------------------------------------------------------
def test_pipelined_replies_come_in_one_batch_in_order() -> None:
    session = Session()
    conn = session.conn
    conn.receive_data(
        b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
        b"RCPT TO:<c@example.com>\r\nDATA\r\n"
    )
    seen = []
    while True:
        event = conn.next_event()
        if isinstance(event, ev.NeedData):
            break
        seen.append(type(event))
        conn.respond(*DEFAULTS[type(event)](event))
    assert seen == [ev.Ehlo, ev.MailFrom, ev.RcptTo, ev.RcptTo, ev.Data]
    out = conn.data_to_send()
    assert_replies(out, [HELLO_OK, SENDER_OK, RCPT_OK, RCPT_OK, START_DATA])
    assert conn.data_to_send() == b""


def test_pipelined_commands_after_a_failed_one_are_handled_in_order() -> None:
    session = session_at("ready")
    out = session.send(
        b"MAIL FROM:<bad\r\n"
        b"MAIL FROM:<a@example.com>\r\n"
        b"RCPT TO:<>\r\n"
        b"RCPT TO:<b@example.com>\r\n"
        b"XFOO\r\n"
        b"DATA\r\n"
        b"hello\r\n.\r\n"
        b"QUIT\r\n"
    )
    assert_replies(
        out,
        [BAD_SENDER, SENDER_OK, BAD_RECIPIENT, RCPT_OK, UNRECOGNIZED, START_DATA, QUEUED, BYE],
    )
    assert session.closed


def test_pipelined_after_refused_recipient_data_is_refused() -> None:
    answers = {ev.RcptTo: lambda e: (550, "5.1.1 No such user")}
    session = session_at("ready", answers=answers)
    out = session.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n")
    assert_replies(out, [SENDER_OK, b"550 5.1.1", BAD_SEQUENCE])


def test_replies_before_data_are_not_lost_when_data_refused() -> None:
    answers = {ev.Data: lambda e: (554, "5.7.1 No thanks")}
    session = session_at("rcpt", answers=answers)
    out = session.send(b"DATA\r\nMAIL FROM:<a@example.com>\r\n")
    # The transaction stays open: MAIL is nested.
    assert_replies(out, [b"554 5.7.1", BAD_SEQUENCE])


# --------------------------------------------------------------------------
# SIZE (RFC 1870)
# --------------------------------------------------------------------------
def _data_session(limit: int = SIZE_LIMIT) -> Session:
    ext = default_extensions(size=limit)
    session = Session(ext)
    out = session.send(SETUPS["rcpt"] + b"DATA\r\n")
    assert_replies(out, [HELLO_OK, SENDER_OK, RCPT_OK, START_DATA])
    return session


def test_body_of_exactly_the_limit_is_accepted() -> None:
    session = _data_session()
    body = b"x" * 498 + b"\r\n" + b"y" * 498 + b"\r\n"
    assert len(body) == SIZE_LIMIT
    assert_replies(session.send(body + b".\r\n"), [QUEUED])
    assert session.events[-1] == ev.MessageReceived(body)


def test_size_counts_unstuffed_content() -> None:
    session = _data_session()
    body = b"." + b"x" * 497 + b"\r\n" + b"." + b"y" * 497 + b"\r\n"
    wire = b"." + body[:500] + b"." + body[500:]
    assert len(body) == SIZE_LIMIT
    assert len(wire) > SIZE_LIMIT
    assert_replies(session.send(wire + b".\r\n"), [QUEUED])
    assert session.events[-1] == ev.MessageReceived(body)


def test_body_one_over_the_limit_is_refused() -> None:
    session = _data_session()
    body = b"x" * 498 + b"\r\n" + b"y" * 499 + b"\r\n"
    assert len(body) == SIZE_LIMIT + 1
    assert_replies(session.send(body + b".\r\n"), [TOO_BIG])
    refused = session.events[-1]
    assert isinstance(refused, ev.MessageRefused)
    assert refused.too_big
    assert session.conn.state is State.READY


def test_oversized_body_is_drained_and_memory_stays_bounded() -> None:
    session = _data_session()
    conn = session.conn
    line = b"z" * 78 + b"\r\n"
    for _ in range(2000):  # 160 kB against a 1000-octet limit
        assert session.send(line) == b""
        assert sum(map(len, conn._parts)) <= SIZE_LIMIT
        assert len(conn._buf) <= len(line)
    assert_replies(session.send(b".\r\n"), [TOO_BIG])
    assert not session.events_of(ev.MessageReceived)
    # The session goes on after the refusal.
    assert_replies(session.send(b"MAIL FROM:<a@example.com>\r\n"), [SENDER_OK])


def test_size_zero_means_no_limit() -> None:
    session = _data_session(limit=0)
    body = (b"x" * 900 + b"\r\n") * 50
    assert_replies(session.send(body + b".\r\n"), [QUEUED])
    assert session.events[-1] == ev.MessageReceived(body)


def test_size_limit_on_bdat() -> None:
    session = session_at("rcpt")
    out = session.send(b"BDAT 600\r\n" + b"a" * 600 + b"BDAT 600 LAST\r\n" + b"b" * 600)
    assert_replies(out, [CHUNK_OK, TOO_BIG])
    assert not session.events_of(ev.MessageReceived, ev.MessageRefused)
    assert sum(map(len, session.conn._parts)) <= SIZE_LIMIT
    # The chunk octets were consumed; later chunks of the dead message are refused.
    assert_replies(session.send(b"BDAT 2 LAST\r\nxyNOOP\r\n"), [BAD_SEQUENCE, OK])
    assert_replies(session.send(b"RSET\r\nMAIL FROM:<a@example.com>\r\n"), [OK, SENDER_OK])


def test_bdat_of_exactly_the_limit_is_accepted() -> None:
    session = session_at("rcpt")
    first, last = b"a" * 398 + b"\r\n", b"b" * 598 + b"\r\n"
    out = session.send(b"BDAT 400\r\n" + first + b"BDAT 600 LAST\r\n" + last)
    assert_replies(out, [CHUNK_OK, QUEUED])
    assert session.events[-1] == ev.MessageReceived(first + last)


def test_size_not_offered_refuses_the_parameter() -> None:
    ext = default_extensions(size=None)
    session = Session(ext)
    out = session.send(b"EHLO c\r\nMAIL FROM:<a@example.com> SIZE=10\r\n")
    assert_replies(out, [HELLO_OK, UNKNOWN_PARAM])


# --------------------------------------------------------------------------
# 8BITMIME, BINARYMIME, SMTPUTF8 not offered
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dropped", "mail", "expected"),
    [
        ("8BITMIME", b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\n", UNKNOWN_PARAM),
        ("SMTPUTF8", b"MAIL FROM:<a@example.com> SMTPUTF8\r\n", UNKNOWN_PARAM),
        ("AUTH", b"MAIL FROM:<a@example.com> AUTH=<>\r\n", UNKNOWN_PARAM),
        ("BINARYMIME", b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\n", BAD_ARGUMENTS),
        ("CHUNKING", b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\n", BAD_ARGUMENTS),
    ],
)
def test_parameter_of_an_extension_not_offered(dropped: str, mail: bytes, expected: bytes) -> None:
    ext = default_extensions()
    ext.drop(dropped)
    session = Session(ext)
    assert_replies(session.send(b"EHLO c\r\n" + mail), [HELLO_OK, expected])


def test_bdat_when_chunking_not_offered_consumes_the_octets() -> None:
    ext = default_extensions()
    ext.drop("CHUNKING")
    session = Session(ext)
    out = session.send(SETUPS["rcpt"] + b"BDAT 8 LAST\r\nQUIT\r\n\r\nNOOP\r\n")
    assert_replies(out, [HELLO_OK, SENDER_OK, RCPT_OK, NOT_IMPLEMENTED, OK])
    assert not session.closed


# --------------------------------------------------------------------------
# CHUNKING / BDAT (RFC 3030)
# --------------------------------------------------------------------------
def test_bdat_events() -> None:
    session = session_at("rcpt")
    out = session.send(b"BDAT 4\r\nab\r\nBDAT 5\r\n.\r\ncdBDAT 4 LAST\r\nef\r\n")
    assert_replies(out, [CHUNK_OK, CHUNK_OK, QUEUED])
    assert session.events[-2:] == [
        ev.Data(chunking=True),
        ev.MessageReceived(b"ab\r\n.\r\ncdef\r\n"),
    ]


def test_bdat_content_is_not_unstuffed_and_dot_does_not_end_it() -> None:
    session = session_at("rcpt")
    out = session.send(b"BDAT 11 LAST\r\n..a\r\n.\r\nb\r\n")
    assert_replies(out, [QUEUED])
    assert session.events[-2:] == [ev.Data(chunking=True), ev.MessageReceived(b"..a\r\n.\r\nb\r\n")]


def test_bdat_chunks_split_across_reads() -> None:
    session = session_at("rcpt")
    assert_replies(session.send(b"BDAT 10\r\n01234"), [])
    assert session.conn.state is State.BDAT
    assert_replies(session.send(b"56789BDAT 3 LAST\r\nab"), [CHUNK_OK])
    assert_replies(session.send(b"c"), [QUEUED])
    assert session.events[-1] == ev.MessageReceived(b"0123456789abc")
    assert session.conn.state is State.READY


def test_bdat_refused_first_chunk_consumes_octets_and_kills_transaction() -> None:
    answers = {ev.Data: lambda e: (554, "5.7.1 Not from you")}
    session = session_at("rcpt", answers=answers)
    out = session.send(b"BDAT 6\r\nNOOP\r\nBDAT 6 LAST\r\nNOOP\r\nNOOP\r\n")
    assert_replies(out, [b"554 5.7.1", BAD_SEQUENCE, OK])
    assert not session.events_of(ev.MessageReceived, ev.MessageRefused)
    assert session.events_of(ev.Noop) == [ev.Noop()]


def test_bdat_binary_content_accepts_bare_newlines_and_long_lines() -> None:
    session = Session(default_extensions(size=0))
    session.send(b"EHLO c\r\n")
    blob = bytes(range(256)) * 8
    out = session.send(
        b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\nRCPT TO:<b@example.com>\r\n"
        + f"BDAT {len(blob)} LAST\r\n".encode()
        + blob
    )
    assert_replies(out, [SENDER_OK, RCPT_OK, QUEUED])
    assert session.events[-1] == ev.MessageReceived(blob)


def test_bdat_text_with_long_line_is_refused() -> None:
    body = b"x" * 999 + b"\r\n"
    body_limit_ext = default_extensions(size=0)
    session = Session(body_limit_ext)
    session.send(SETUPS["rcpt"])
    out = session.send(f"BDAT {len(body)} LAST\r\n".encode() + body)
    assert_replies(out, [LONG_DATA_LINE])


def test_malformed_bdat_closes_the_connection() -> None:
    session = session_at("rcpt")
    out = session.send(b"BDAT 12x\r\nNOOP\r\n")
    assert_replies(out, [BDAT_SYNTAX])
    assert session.closed
    assert session.events[-1] == ev.ConnectionClosed()
    assert not session.events_of(ev.Noop)


@pytest.mark.parametrize(
    "bdat_line",
    [b"BDAT 19 LAST" + b" " * 600, b"BDAT 19 LAST\x00"],
    ids=["over-long", "nul"],
)
def test_refused_bdat_line_does_not_run_its_octets_as_commands(bdat_line: bytes) -> None:
    # A BDAT line refused before its count is read leaves the chunk octets
    # unconsumed: the stream is out of sync, so the session must end with 521
    # like any malformed BDAT (RFC 3030 section 3; Postfix), not run the
    # octets as commands.
    session = session_at("rcpt")
    out = session.send(bdat_line + b"\r\nMAIL FROM:<x@y.z>\r\n")
    assert_replies(out, [BDAT_SYNTAX])
    assert session.closed
    assert len(session.events_of(ev.MailFrom)) == 1  # only the setup's MAIL


# --------------------------------------------------------------------------
# Strict syntax, errors and limits
# --------------------------------------------------------------------------
def test_recipient_limit_exact() -> None:
    session = session_at("mail", max_recipients=3)
    out = session.send(b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(5)))
    assert_replies(out, [RCPT_OK] * 3 + [TOO_MANY_RCPTS] * 2)
    assert len(session.events_of(ev.RcptTo)) == 3


def test_refused_recipients_do_not_count_against_the_limit() -> None:
    answers = {
        ev.RcptTo: lambda e: (550, "5.1.1 No") if "bad" in e.address else DEFAULTS[ev.RcptTo](e)
    }
    session = session_at("mail", max_recipients=2, answers=answers)
    out = session.send(
        b"RCPT TO:<bad1@x.test>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<bad2@x.test>\r\n"
        b"RCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\n"
    )
    assert_replies(out, [b"550 5.1.1", RCPT_OK, b"550 5.1.1", RCPT_OK, TOO_MANY_RCPTS])


def test_recipient_limit_resets_per_transaction() -> None:
    session = session_at("ready", max_recipients=1)
    txn = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n"
    out = session.send(txn + b"DATA\r\nx\r\n.\r\n" + txn + b"RSET\r\n" + txn)
    one = [SENDER_OK, RCPT_OK, TOO_MANY_RCPTS]
    assert_replies(out, [*one, START_DATA, QUEUED, *one, OK, *one])


def test_default_recipient_limit_is_1000() -> None:
    session = session_at("mail")
    out = session.send(b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(1001)))
    assert_replies(out, [RCPT_OK] * 1000 + [TOO_MANY_RCPTS])


@pytest.mark.parametrize(
    "bad",
    [b"XFOO\r\n", b"MAIL FROM:<\r\n", b"DATA\r\n", b"\x00\r\n", b"NOOP " + b"x" * 600 + b"\r\n"],
)
def test_too_many_errors_closes_with_421(bad: bytes) -> None:
    session = session_at("ready")
    out = session.send(bad * 25 + b"NOOP\r\n")
    lines = last_lines(out)
    assert len(lines) == 21
    assert all(line.startswith((UNRECOGNIZED, BAD_SENDER, BAD_SEQUENCE)) for line in lines[:20])
    assert lines[20].startswith(TOO_MANY_ERRORS)
    assert session.closed
    assert session.events[-1] == ev.ConnectionClosed()
    assert not session.events_of(ev.Noop)


def test_max_errors_is_configurable() -> None:
    session = session_at("ready", max_errors=3)
    out = session.send(b"XFOO\r\nNOOP\r\nXBAR\r\nMAIL\r\nNOOP\r\n")
    assert_replies(out, [UNRECOGNIZED, OK, UNRECOGNIZED, BAD_ARGUMENTS, TOO_MANY_ERRORS])
    assert session.conn.errors == 3
    assert session.closed


def test_mail_and_rcpt_lines_may_reach_2046_octets() -> None:
    def mail(total: int) -> bytes:
        head, tail = b"MAIL FROM:<", b"@example.com>"
        return head + b"a" * (total - len(head) - len(tail)) + tail + b"\r\n"

    def rcpt(total: int) -> bytes:
        head, tail = b"RCPT TO:<", b"@example.com>"
        return head + b"b" * (total - len(head) - len(tail)) + tail + b"\r\n"

    session = session_at("ready")
    assert len(mail(PARAM_LINE_LIMIT)) == PARAM_LINE_LIMIT + 2
    out = session.send(
        mail(PARAM_LINE_LIMIT + 1)
        + mail(PARAM_LINE_LIMIT)
        + rcpt(PARAM_LINE_LIMIT + 1)
        + rcpt(PARAM_LINE_LIMIT)
    )
    assert_replies(out, [UNRECOGNIZED, SENDER_OK, UNRECOGNIZED, RCPT_OK])


def test_over_long_partial_line_is_never_buffered_without_bound() -> None:
    session = session_at("ready")
    conn = session.conn
    piece = b"x" * 65536
    for _ in range(5 * 1024 * 1024 // len(piece)):
        assert session.send(piece) == b""
        assert len(conn._buf) <= AUTH_LINE_LIMIT + 2
    assert_replies(session.send(b"\r\n"), [UNRECOGNIZED])
    assert_replies(session.send(b"NOOP\r\n"), [OK])
    assert conn.errors == 1


def test_over_long_line_split_at_its_crlf() -> None:
    session = session_at("ready")
    assert session.send(b"NOOP " + b"x" * 70000 + b"\r") == b""
    assert_replies(session.send(b"\nNOOP\r\n"), [UNRECOGNIZED, OK])


@pytest.mark.parametrize("length", [AUTH_LINE_LIMIT + 1, AUTH_LINE_LIMIT + 2, 20000, 70000])
def test_over_long_line_with_pipelined_command_in_the_same_read(length: int) -> None:
    # The CRLF of an over-long line must not be discarded with the line: the
    # 500 is due at once and the next command must run.
    session = session_at("ready")
    line = b"NOOP " + b"x" * (length - 5)
    out = session.send(line + b"\r\nNOOP\r\n")
    assert_replies(out, [UNRECOGNIZED, OK])
    assert session.events_of(ev.Noop) == [ev.Noop()]


def test_bad_sequence_replies() -> None:
    session = Session()
    out = session.send(b"MAIL FROM:<a@example.com>\r\nEHLO c\r\nRCPT TO:<b@example.com>\r\n")
    assert_replies(out, [BAD_SEQUENCE, HELLO_OK, BAD_SEQUENCE])
    assert session.conn.errors == 2


# --------------------------------------------------------------------------
# DATA: dot-unstuffing, terminator, line checks
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("wire", "body"),
    [
        (b".\r\n", b""),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"..foo\r\n.\r\n", b".foo\r\n"),
        (b"...\r\n.\r\n", b"..\r\n"),
        (b"a\r\n..b\r\n..\r\nc\r\n.\r\n", b"a\r\n.b\r\n.\r\nc\r\n"),
        (b". \r\n.\r\n", b" \r\n"),
        (b"a.\r\n.b\r\n.\r\n", b"a.\r\nb\r\n"),
        (b"\r\n\r\n.\r\n", b"\r\n\r\n"),
        (b"no newline at end\r\n.\r\n", b"no newline at end\r\n"),
        (b"8bit \xff\xfe\x80\r\n.\r\n", b"8bit \xff\xfe\x80\r\n"),
    ],
)
@pytest.mark.parametrize("split", [False, True])
def test_dot_unstuffing(wire: bytes, body: bytes, split: bool) -> None:
    session = _data_session(limit=0)
    if split:
        out = b"".join(session.send(wire[i : i + 1]) for i in range(len(wire)))
    else:
        out = session.send(wire)
    assert_replies(out, [QUEUED])
    assert session.events[-1] == ev.MessageReceived(body)


@pytest.mark.parametrize(("length", "expected"), [(998, QUEUED), (999, LONG_DATA_LINE)])
def test_data_line_limit(length: int, expected: bytes) -> None:
    session = _data_session(limit=0)
    body = b"a\r\n" + b"x" * length + b"\r\nb\r\n"
    assert_replies(session.send(body + b".\r\n"), [expected])


def test_data_line_limit_is_configurable() -> None:
    ext = default_extensions(size=0)
    session = Session(ext, data_line_limit=10)
    session.send(SETUPS["rcpt"])
    out = session.send(b"DATA\r\n0123456789\r\n.\r\nDATA\r\n")
    assert_replies(out, [START_DATA, QUEUED, BAD_SEQUENCE])
    session.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
    assert_replies(session.send(b"DATA\r\n0123456789A\r\n.\r\n"), [START_DATA, LONG_DATA_LINE])


def test_long_data_line_over_many_reads_is_drained() -> None:
    session = _data_session(limit=0)
    conn = session.conn
    for _ in range(40):
        assert session.send(b"y" * 65536) == b""
        assert len(conn._buf) <= 65536
    assert_replies(session.send(b"\r\n.\r\n"), [LONG_DATA_LINE])


def test_eof_in_data_gives_no_message() -> None:
    session = _data_session()
    session.send(b"partial message\r\n")
    session.send(b"")
    assert session.events[-1] == ev.ConnectionClosed()
    assert not session.events_of(ev.MessageReceived, ev.MessageRefused)


def test_eof_closes() -> None:
    session = session_at("ready")
    assert session.send(b"NOOP\r\nNOO") == b"250 2.0.0 Ok\r\n"
    session.send(b"")
    assert session.events[-1] == ev.ConnectionClosed()
    assert session.closed


# --------------------------------------------------------------------------
# SMTP smuggling (SEC Consult, December 2023)
# --------------------------------------------------------------------------
SMUGGLED = (
    b"MAIL FROM:<admin@bank.example>\r\n"
    b"RCPT TO:<victim@example.com>\r\n"
    b"DATA\r\n"
    b"From: admin@bank.example\r\n\r\nsmuggled\r\n"
)
FAKE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\n.\r"]


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
@pytest.mark.parametrize("split", [False, True])
def test_smuggling_forms_do_not_end_data(fake_end: bytes, split: bool) -> None:
    session = session_at("rcpt")
    wire = b"DATA\r\nFrom: a@example.com\r\n\r\nreal" + fake_end + SMUGGLED + b"\r\n.\r\n"
    if split:
        out = b"".join(session.send(wire[i : i + 1]) for i in range(len(wire)))
    else:
        out = session.send(wire)
    assert_replies(out, [START_DATA, BARE_NEWLINE_IN_DATA])
    messages = session.events_of(ev.MessageReceived, ev.MessageRefused)
    assert len(messages) == 1
    assert isinstance(messages[0], ev.MessageRefused)
    assert not messages[0].too_big
    assert len(session.events_of(ev.MailFrom)) == 1  # only the setup's MAIL
    assert session.conn.state is State.READY


def test_bare_lf_in_command_does_not_split_it() -> None:
    session = session_at("ready")
    out = session.send(b"NOOP\nMAIL FROM:<spoof@example.com>\r\n")
    assert_replies(out, [UNRECOGNIZED])
    assert not session.events_of(ev.MailFrom, ev.Noop)


# --------------------------------------------------------------------------
# STARTTLS (RFC 3207; CVE-2011-0411)
# --------------------------------------------------------------------------
def test_starttls_discards_pipelined_plaintext() -> None:
    ext = default_extensions()
    session = Session(ext)
    session.send(b"EHLO c\r\n")
    out = session.send(
        b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<b@example.com>\r\nAUTH PLAIN x\r\n"
    )
    assert_replies(out, [TLS_GO])
    assert session.events_of(ev.StartTls) == [ev.StartTls()]
    assert not session.events_of(ev.MailFrom, ev.RcptTo, ev.Auth)
    conn = session.conn
    assert conn.state is State.HELLO
    assert conn.encrypted
    assert "STARTTLS" not in ext
    assert len(conn._buf) == 0
    # After the handshake: the client must EHLO again, and STARTTLS is gone.
    assert_replies(session.send(b"MAIL FROM:<a@example.com>\r\n"), [BAD_SEQUENCE])
    out = session.send(b"EHLO c\r\n")
    assert b"STARTTLS" not in out
    assert_replies(out, [HELLO_OK])
    assert_replies(session.send(b"STARTTLS\r\n"), [BAD_SEQUENCE])


def test_starttls_resets_transaction_and_auth() -> None:
    answers = {ev.Auth: lambda e: (235, "2.7.0 Authentication successful")}
    session = session_at("ready", answers=answers)
    assert_replies(session.send(b"AUTH PLAIN AGEAYg==\r\n"), [AUTH_OK])
    assert session.conn.authenticated
    assert_replies(session.send(b"STARTTLS\r\n"), [TLS_GO])
    assert not session.conn.authenticated


def test_starttls_refused_keeps_pipelined_commands() -> None:
    answers = {ev.StartTls: lambda e: (454, "4.7.0 TLS not available")}
    session = session_at("ready", answers=answers)
    out = session.send(b"STARTTLS\r\nNOOP\r\n")
    assert_replies(out, [b"454 4.7.0", OK])
    assert not session.conn.encrypted


def test_starttls_when_encrypted_is_refused() -> None:
    session = Session(encrypted=True)
    out = session.send(b"EHLO c\r\nSTARTTLS\r\nNOOP\r\n")
    assert_replies(out, [HELLO_OK, BAD_SEQUENCE, OK])
    assert not session.events_of(ev.StartTls)


def test_starttls_not_offered() -> None:
    ext = default_extensions()
    ext.drop("STARTTLS")
    session = Session(ext)
    assert_replies(session.send(b"EHLO c\r\nSTARTTLS\r\n"), [HELLO_OK, NOT_IMPLEMENTED])


# --------------------------------------------------------------------------
# AUTH (RFC 4954)
# --------------------------------------------------------------------------
def _auth_conn(**kwargs: Any) -> ServerConnection:
    session = session_at("ready", **kwargs)
    return session.conn


def test_auth_not_offered() -> None:
    ext = default_extensions()
    ext.drop("AUTH")
    session = Session(ext)
    assert_replies(session.send(b"EHLO c\r\nAUTH PLAIN AGEAYg==\r\n"), [HELLO_OK, NOT_IMPLEMENTED])


def test_auth_with_initial_response() -> None:
    conn = _auth_conn()
    conn.receive_data(b"AUTH plain AHVzZXIAcGFzcw==\r\n")
    assert conn.next_event() == ev.Auth("PLAIN", "AHVzZXIAcGFzcw==")
    conn.respond(235, "2.7.0 Authentication successful")
    assert_replies(conn.data_to_send(), [AUTH_OK])
    assert conn.authenticated
    assert conn.state is State.READY


def test_auth_empty_initial_response() -> None:
    conn = _auth_conn()
    conn.receive_data(b"AUTH PLAIN =\r\n")
    assert conn.next_event() == ev.Auth("PLAIN", "=")


def test_auth_challenge_exchange() -> None:
    conn = _auth_conn()
    conn.receive_data(b"AUTH LOGIN\r\n")
    assert conn.next_event() == ev.Auth("LOGIN", None)
    conn.challenge("VXNlcm5hbWU6")
    assert conn.data_to_send() == b"334 VXNlcm5hbWU6\r\n"
    assert conn.state is State.AUTH
    assert conn.next_event() == ev.NeedData()
    conn.receive_data(b"dXNlcg==\r\n")
    assert conn.next_event() == ev.AuthResponse("dXNlcg==")
    conn.challenge("UGFzc3dvcmQ6")
    assert conn.data_to_send() == b"334 UGFzc3dvcmQ6\r\n"
    conn.receive_data(b"cGFzcw==\r\n")
    assert conn.next_event() == ev.AuthResponse("cGFzcw==")
    conn.respond(235, "2.7.0 Authentication successful")
    assert_replies(conn.data_to_send(), [AUTH_OK])
    assert conn.authenticated
    assert conn.state is State.READY
    # Only once per session.
    conn.receive_data(b"AUTH PLAIN AGEAYg==\r\n")
    assert conn.next_event() == ev.NeedData()
    assert_replies(conn.data_to_send(), [BAD_SEQUENCE])


def test_auth_empty_challenge() -> None:
    conn = _auth_conn()
    conn.receive_data(b"AUTH PLAIN\r\n")
    conn.next_event()
    conn.challenge("")
    assert conn.data_to_send() in (AUTH_CHALLENGE + b"\r\n", b"334\r\n")


def test_auth_cancelled_by_client() -> None:
    conn = _auth_conn()
    conn.receive_data(b"AUTH LOGIN\r\n")
    conn.next_event()
    conn.challenge("VXNlcm5hbWU6")
    conn.receive_data(b"*\r\nNOOP\r\n")
    assert conn.next_event() == ev.AuthResponse("*")
    conn.respond(501, "5.7.0 Authentication cancelled")
    assert conn.next_event() == ev.Noop()
    assert not conn.authenticated
    assert conn.errors == 1


def test_auth_failure_counts_and_allows_retry() -> None:
    conn = _auth_conn()
    conn.receive_data(b"AUTH PLAIN AHUAcA==\r\n")
    conn.next_event()
    conn.respond(535, "5.7.8 Authentication credentials invalid")
    assert_replies(conn.data_to_send(), [AUTH_FAILED])
    assert conn.errors == 1
    assert not conn.authenticated
    conn.receive_data(b"AUTH PLAIN AHUAcA==\r\n")
    assert conn.next_event() == ev.Auth("PLAIN", "AHUAcA==")


def test_auth_response_keeps_control_characters_for_the_caller() -> None:
    conn = _auth_conn()
    conn.receive_data(b"AUTH LOGIN\r\n")
    conn.next_event()
    conn.challenge("")
    conn.receive_data(b"a\tb\r\n")
    assert conn.next_event() == ev.AuthResponse("a\tb")


def test_over_long_auth_response_ends_the_exchange() -> None:
    # RFC 4954 section 4: the reply to a bad response ends the AUTH command;
    # the next line is a command again, not one more SASL response.
    conn = _auth_conn()
    conn.receive_data(b"AUTH LOGIN\r\n")
    conn.next_event()
    conn.challenge("VXNlcm5hbWU6")
    conn.data_to_send()
    conn.receive_data(b"A" * (AUTH_LINE_LIMIT + 10))
    assert conn.next_event() == ev.NeedData()
    conn.receive_data(b"\r\n")
    assert conn.next_event() == ev.AuthAborted()
    assert conn.next_event() == ev.NeedData()
    assert last_lines(conn.data_to_send())[0][:3] == b"500"
    assert conn.state is State.READY
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() == ev.Noop()


def test_invalid_utf8_auth_response_ends_the_exchange() -> None:
    conn = _auth_conn()
    conn.receive_data(b"AUTH LOGIN\r\n")
    conn.next_event()
    conn.challenge("VXNlcm5hbWU6")
    conn.data_to_send()
    conn.receive_data(b"\xff\xfe\r\nNOOP\r\n")
    assert conn.next_event() == ev.AuthAborted()
    event = conn.next_event()
    assert_replies(conn.data_to_send(), [b"50"])
    assert conn.state is not State.AUTH
    assert event == ev.Noop()


# --------------------------------------------------------------------------
# Decisions: respond, close, misuse
# --------------------------------------------------------------------------
def test_respond_221_or_421_closes() -> None:
    session = session_at("ready", answers={ev.MailFrom: lambda e: (421, "4.3.2 Shutting down")})
    out = session.send(b"MAIL FROM:<a@example.com>\r\nNOOP\r\n")
    assert_replies(out, [b"421 4.3.2"])
    assert session.closed
    assert not session.events_of(ev.Noop)


def test_close_queues_last_reply_once() -> None:
    session = session_at("ready")
    conn = session.conn
    conn.close(421, "4.4.2 Connection timed out", newline_first=True)
    conn.close(421, "4.4.2 again")
    assert conn.data_to_send() == b"\r\n421 4.4.2 Connection timed out\r\n"
    assert conn.next_event() == ev.ConnectionClosed()


def test_respond_newline_first() -> None:
    conn = _auth_conn()
    conn.receive_data(b"NOOP\r\n")
    conn.next_event()
    conn.respond(250, "2.0.0 Ok", newline_first=True)
    assert conn.data_to_send() == b"\r\n250 2.0.0 Ok\r\n"


def test_multiline_respond() -> None:
    conn = _auth_conn()
    conn.receive_data(b"NOOP\r\n")
    conn.next_event()
    conn.respond(250, "2.0.0 one\r\ntwo")
    assert conn.data_to_send() == b"250-2.0.0 one\r\n250 two\r\n"


def test_next_event_before_greet_raises() -> None:
    conn = ServerConnection(default_extensions())
    with pytest.raises(RuntimeError):
        conn.next_event()


def test_greet_twice_raises() -> None:
    session = Session()
    with pytest.raises(RuntimeError):
        session.conn.greet(220, "again")


def test_respond_without_event_raises() -> None:
    conn = _auth_conn()
    with pytest.raises(RuntimeError):
        conn.respond(250, "Ok")


def test_next_event_while_waiting_for_respond_raises() -> None:
    conn = _auth_conn()
    conn.receive_data(b"NOOP\r\nNOOP\r\n")
    conn.next_event()
    with pytest.raises(RuntimeError):
        conn.next_event()


def test_challenge_outside_auth_raises() -> None:
    conn = _auth_conn()
    conn.receive_data(b"NOOP\r\n")
    conn.next_event()
    with pytest.raises(RuntimeError):
        conn.challenge("eA==")


def test_extensions_read_at_command_time() -> None:
    ext = default_extensions()
    session = Session(ext)
    session.send(b"EHLO c\r\n")
    ext.add("SIZE", 10)
    assert_replies(session.send(b"MAIL FROM:<a@example.com> SIZE=11\r\n"), [TOO_BIG])
