"""DSN parameters (RFC 3461) on MAIL and RCPT in the server core."""

from __future__ import annotations

import pytest

from slimta.smtp import _events as ev
from slimta.smtp._server import ServerConnection
from slimta.smtp.extensions import Extensions

OK = b"250"
BAD_SYNTAX = b"501 5.5.4"
UNSUPPORTED = b"555 5.5.4"


def session(dsn: bool = True) -> ServerConnection:
    ext = Extensions()
    for name in ("8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"):
        ext.add(name)
    if dsn:
        ext.add("DSN")
    conn = ServerConnection(ext)
    conn.greet(220, "mx.test ESMTP")
    conn.receive_data(b"EHLO client.test\r\n")
    conn.next_event()
    conn.respond(250, "mx.test")
    assert conn.next_event() == ev.NeedData()
    conn.data_to_send()
    return conn


def command(conn: ServerConnection, line: bytes) -> tuple[ev.Event | None, bytes]:
    conn.receive_data(line + b"\r\n")
    event = conn.next_event()
    if isinstance(event, ev.NeedData):
        return None, conn.data_to_send()
    conn.respond(250, "2.0.0 Ok")
    conn.next_event()
    return event, conn.data_to_send()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (b"RET=FULL", {b"RET": b"FULL"}),
        (b"RET=hdrs", {b"RET": b"hdrs"}),
        (b"ENVID=QQ314159", {b"ENVID": b"QQ314159"}),
        (b"ENVID=a+2Bb RET=HDRS", {b"ENVID": b"a+2Bb", b"RET": b"HDRS"}),
    ],
)
def test_mail_dsn_parameters_accepted(params: bytes, expected: dict[bytes, bytes]) -> None:
    conn = session()
    event, out = command(conn, b"MAIL FROM:<a@example.test> " + params)
    assert isinstance(event, ev.MailFrom)
    assert event.params == expected
    assert out.startswith(OK)


@pytest.mark.parametrize(
    "params",
    [b"RET=PARTIAL", b"RET", b"ENVID=" + b"x" * 101, b"ENVID=a+zz", b"ENVID=a+4"],
)
def test_mail_dsn_parameters_refused(params: bytes) -> None:
    conn = session()
    event, out = command(conn, b"MAIL FROM:<a@example.test> " + params)
    assert event is None
    assert out.startswith(BAD_SYNTAX)


@pytest.mark.parametrize(
    "params",
    [
        b"NOTIFY=NEVER",
        b"NOTIFY=SUCCESS,FAILURE",
        b"NOTIFY=delay",
        b"ORCPT=rfc822;bob@example.test",
        b"ORCPT=rfc822;b+2Bob@example.test NOTIFY=FAILURE,DELAY",
    ],
)
def test_rcpt_dsn_parameters_accepted(params: bytes) -> None:
    conn = session()
    command(conn, b"MAIL FROM:<a@example.test>")
    event, out = command(conn, b"RCPT TO:<b@example.test> " + params)
    assert isinstance(event, ev.RcptTo)
    assert out.startswith(OK)


@pytest.mark.parametrize(
    "params",
    [
        b"NOTIFY=NEVER,FAILURE",
        b"NOTIFY=SOMETIMES",
        b"NOTIFY=FAILURE,FAILURE",
        b"NOTIFY",
        b"ORCPT=bob@example.test",
        b"ORCPT=;bob@example.test",
        b"ORCPT=rfc822;bad+zzhex",
    ],
)
def test_rcpt_dsn_parameters_refused(params: bytes) -> None:
    conn = session()
    command(conn, b"MAIL FROM:<a@example.test>")
    event, out = command(conn, b"RCPT TO:<b@example.test> " + params)
    assert event is None
    assert out.startswith(BAD_SYNTAX)


def test_dsn_parameters_unsupported_without_the_extension() -> None:
    conn = session(dsn=False)
    _, out = command(conn, b"MAIL FROM:<a@example.test> RET=FULL")
    assert out.startswith(UNSUPPORTED)
    command(conn, b"MAIL FROM:<a@example.test>")
    _, out = command(conn, b"RCPT TO:<b@example.test> NOTIFY=NEVER")
    assert out.startswith(UNSUPPORTED)
