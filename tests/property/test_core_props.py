"""Properties of the sans-IO server core (hypothesis).

* the events and reply bytes do not depend on how the input is split;
* any input gives events and replies, never an exception, and the receive
  buffer stays bounded;
* dot-stuffing round-trips through DATA;
* the argument parsers raise nothing but ArgumentError.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimta.smtp import _events as ev
from slimta.smtp._address import (
    ArgumentError,
    parse_mail_argument,
    parse_params,
    parse_rcpt_argument,
)
from slimta.smtp._reply import ReplyParser
from slimta.smtp._server import AUTH_LINE_LIMIT, ServerConnection
from slimta.smtp.extensions import Extensions

#: Most a greeted session may hold in its receive buffer while it waits.
BUFFER_BOUND = AUTH_LINE_LIMIT + 65536

SLOW = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ANSWERS: dict[type[ev.Event], tuple[str, str]] = {
    ev.Ehlo: (250, "mx.test Hello"),
    ev.Helo: (250, "mx.test Hello"),
    ev.MailFrom: (250, "2.1.0 Sender Ok"),
    ev.RcptTo: (250, "2.1.5 Recipient Ok"),
    ev.Data: (354, "Start mail input; end with <CRLF>.<CRLF>"),
    ev.MessageReceived: (250, "2.6.0 Message accepted for delivery"),
    ev.Rset: (250, "2.0.0 Ok"),
    ev.Noop: (250, "2.0.0 Ok"),
    ev.Quit: (221, "2.0.0 Bye"),
    ev.Vrfy: (252, "2.5.0 Cannot VRFY user"),
    ev.UnknownCommand: (500, "5.5.2 Syntax error, command unrecognized"),
    ev.StartTls: (220, "2.7.0 Go ahead"),
    ev.AuthResponse: (535, "5.7.8 Authentication credentials invalid"),
}

FRAGMENTS = [
    b"EHLO client.test\r\n",
    b"HELO client.test\r\n",
    b"EHLO\r\n",
    b"MAIL FROM:<a@example.com>\r\n",
    b"MAIL FROM:<a@example.com> SIZE=50 BODY=8BITMIME\r\n",
    b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\n",
    "MAIL FROM:<ü@example.com> SMTPUTF8\r\n".encode(),
    b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<bad\r\n",
    b"RCPT TO:<b@example.com>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"RCPT TO:<>\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"BDAT 3 LAST\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT x\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY x\r\n",
    b"XFOO bar\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN AGEAYg==\r\n",
    b"AUTH LOGIN\r\n",
    b"*\r\n",
    b"QUIT\r\n",
    b"Subject: x\r\n",
    b"..dot\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b".",
    b"\n.\n",
    b"\r.\r",
    b"\x00",
    b"\xff\xfe",
    b"NOOP " + b"x" * 600 + b"\r\n",
    b"y" * 1100 + b"\r\n",
    b"z" * 13000,
    b"w" * 70000,
]

scripts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=24)), max_size=25).map(
    b"".join
)


def make_connection(*, size: int | None = 100, starttls: bool = False) -> ServerConnection:
    ext = Extensions()
    for keyword in ("8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING"):
        ext.add(keyword)
    ext.add("BINARYMIME")
    ext.add("AUTH", "PLAIN LOGIN")
    if starttls:
        ext.add("STARTTLS")
    if size is not None:
        ext.add("SIZE", size)
    conn = ServerConnection(ext, max_recipients=3, max_errors=1000)
    conn.greet(220, "mx.test ESMTP")
    return conn


def drive(
    conn: ServerConnection,
    pieces: list[bytes],
    on_wait: Callable[[ServerConnection], None] | None = None,
) -> tuple[list[ev.Event], bytes]:
    """Feed *pieces* then end of input; the events (NeedData left out) and all output."""
    events: list[ev.Event] = []
    out = [conn.data_to_send()]
    for piece in [*pieces, b""]:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if isinstance(event, ev.NeedData):
                if on_wait is not None:
                    on_wait(conn)
                out.append(conn.data_to_send())
                break
            events.append(event)
            if isinstance(event, ev.ConnectionClosed):
                out.append(conn.data_to_send())
                return events, b"".join(out)
            if isinstance(event, ev.Auth):
                conn.challenge("")
            elif isinstance(event, ev.AuthAborted):
                continue  # the core answered already
            elif isinstance(event, ev.MessageRefused):
                conn.respond(event.code, event.message)
            else:
                conn.respond(*ANSWERS[type(event)])
    raise AssertionError("end of input did not close the session")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def assert_valid_replies(out: bytes) -> None:
    parser = ReplyParser()
    parser.feed(out)
    while parser.next_reply() is not None:
        pass
    assert not parser.has_buffered


# ------------------------------------------------- (a) split independence
@SLOW
@given(script=scripts, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_events_do_not_depend_on_splitting(script: bytes, cuts: list[int]) -> None:
    whole = drive(make_connection(), [script])
    pieces = drive(make_connection(), split(script, cuts))
    assert pieces == whole


@SLOW
@given(script=scripts)
def test_byte_at_a_time_is_the_same_as_whole(script: bytes) -> None:
    script = script[:3000]
    whole = drive(make_connection(), [script])
    single = drive(make_connection(), [script[i : i + 1] for i in range(len(script))])
    assert single == whole


# -------------------------------------------- (b) any input, never raises
def check_bounded(conn: ServerConnection) -> None:
    assert len(conn._buf) <= BUFFER_BOUND


@SLOW
@given(
    script=st.one_of(scripts, st.binary(max_size=2000)),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    starttls=st.booleans(),
)
def test_any_input_gives_events_and_replies(script: bytes, cuts: list[int], starttls: bool) -> None:
    conn = make_connection(starttls=starttls)
    events, out = drive(conn, split(script, cuts), on_wait=check_bounded)
    assert all(isinstance(e, ev.Event) for e in events)
    assert events[-1] == ev.ConnectionClosed()
    assert_valid_replies(out)


@SLOW
@given(prefix=st.sampled_from([b"", b"EHLO c\r\n", b"EHLO c\r\nAUTH LOGIN\r\n"]), rnd=st.binary())
def test_random_bytes_after_hello(prefix: bytes, rnd: bytes) -> None:
    conn = make_connection()
    events, out = drive(conn, [prefix, rnd], on_wait=check_bounded)
    assert events[-1] == ev.ConnectionClosed()
    assert_valid_replies(out)


@settings(max_examples=20, deadline=None)
@given(
    prefix=st.sampled_from(
        [
            b"",
            b"EHLO c\r\n",
            b"EHLO c\r\nAUTH LOGIN\r\n",
            b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n",
            b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nBDAT 99999999\r\n",
        ]
    ),
    byte=st.sampled_from([b"x", b"\r", b"\n", b".", b"\x00"]),
)
def test_floods_stay_bounded(prefix: bytes, byte: bytes) -> None:
    conn = make_connection(size=0)
    flood = [byte * 65536] * 40
    events, _ = drive(conn, [prefix, *flood], on_wait=check_bounded)
    assert events[-1] == ev.ConnectionClosed()


# ------------------------------------------------- (c) dot-stuffing round trip
body_lines = st.lists(
    st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=30,
)
dotty_lines = st.lists(
    st.sampled_from([b".", b"..", b".x", b"", b"x.", b". ", b"...", b"From x"]), max_size=15
)


def stuff(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


@SLOW
@given(
    lines=st.one_of(body_lines, dotty_lines),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_dot_stuffing_round_trip(lines: list[bytes], cuts: list[int]) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    conn = make_connection(size=None)
    drive_to_data = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"
    events, _ = drive(conn, [drive_to_data, *split(stuff(lines) + b".\r\n", cuts)])
    messages = [e for e in events if isinstance(e, ev.MessageReceived | ev.MessageRefused)]
    assert messages == [ev.MessageReceived(body)]


# ------------------------------------------- (d) parsers raise ArgumentError
path_text = st.text(alphabet=st.sampled_from(list('<>@"\\:,.[]= aZ09-+_éü\t\x00\x7f')), max_size=40)


def only_argument_errors(func: Callable[[str], object], text: str) -> None:
    try:
        func(text)
    except ArgumentError as exc:
        assert exc.code in (501, 553, 555)
        assert exc.message[:1].isdigit()


@given(text=st.one_of(st.text(), path_text))
def test_parse_params_raises_only_argument_error(text: str) -> None:
    only_argument_errors(parse_params, text)


@given(text=st.one_of(st.text(), path_text), prefix=st.sampled_from(["", "FROM:", "from: "]))
def test_parse_mail_argument_raises_only_argument_error(text: str, prefix: str) -> None:
    only_argument_errors(parse_mail_argument, prefix + text)


@given(text=st.one_of(st.text(), path_text), prefix=st.sampled_from(["", "TO:", "to: "]))
def test_parse_rcpt_argument_raises_only_argument_error(text: str, prefix: str) -> None:
    only_argument_errors(parse_rcpt_argument, prefix + text)


@given(text=st.one_of(st.text(), path_text))
def test_parsed_mail_rest_parses_as_params_or_argument_error(text: str) -> None:
    try:
        _, rest = parse_mail_argument("FROM:" + text)
        parse_params(rest)
    except ArgumentError:
        pass
