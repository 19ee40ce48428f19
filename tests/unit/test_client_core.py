"""The sans-IO SMTP client core: bytes out, replies in, no sockets."""

from __future__ import annotations

import base64

import pytest

from slimta.smtp import _events as ev
from slimta.smtp._client import (
    CLEARTEXT_MECHANISMS,
    CLIENT_MECHANISMS,
    CONVERSION_NOT_ALLOWED,
    SASL_CANCEL,
    SMTPUTF8_REQUIRED,
    ClientConnection,
    auth_argument,
    choose_mechanism,
    decode_challenge,
    encode_response,
    mail_argument,
    needs_binarymime,
    needs_smtputf8,
    rcpt_argument,
)
from slimta.smtp._reply import ReplySyntaxError
from slimta.smtp._server import ServerConnection
from slimta.smtp.extensions import Extensions


def extensions(*names: str) -> Extensions:
    ext = Extensions()
    for name in names:
        ext.add(name)
    return ext


def drain(conn: ClientConnection) -> list[tuple[bytes, int, str]]:
    out = []
    while (got := conn.next_reply()) is not None:
        out.append((got[0], got[1].code, got[1].message))
    return out


# ---------------------------------------------------------------- matching
def test_replies_match_commands_in_order() -> None:
    conn = ClientConnection()
    conn.expect(b"[BANNER]")
    conn.send_command(b"EHLO", b"client.test")
    assert conn.data_to_send() == b"EHLO client.test\r\n"
    assert conn.waiting == 2
    conn.receive_data(b"220 mx.test ESMTP\r\n250-mx.test\r\n250 PIPE")
    assert drain(conn) == [(b"[BANNER]", 220, "mx.test ESMTP")]
    conn.receive_data(b"LINING\r\n")
    assert drain(conn) == [(b"EHLO", 250, "mx.test\r\nPIPELINING")]
    assert conn.waiting == 0


def test_unsolicited_reply() -> None:
    conn = ClientConnection()
    conn.receive_data(b"421 4.4.2 timeout\r\n")
    assert drain(conn) == [(b"[UNSOLICITED]", 421, "4.4.2 timeout")]


def test_bad_reply_raises() -> None:
    conn = ClientConnection()
    conn.expect(b"[BANNER]")
    conn.receive_data(b"hello\r\n")
    with pytest.raises(ReplySyntaxError):
        conn.next_reply()


@pytest.mark.parametrize(
    ("advertised", "command", "ends"),
    [
        ((), b"MAIL", True),
        ((), b"RCPT", True),
        (("PIPELINING",), b"MAIL", False),
        (("PIPELINING",), b"rcpt", False),
        (("PIPELINING",), b"RSET", False),
        (("PIPELINING",), b"DATA", True),
        (("PIPELINING",), b"EHLO", True),
        (("PIPELINING",), b"AUTH", True),
        (("PIPELINING",), b"STARTTLS", True),
        (("PIPELINING",), b"QUIT", True),
        (("PIPELINING",), b"NOOP", True),
    ],
)
def test_group_rules(advertised: tuple[str, ...], command: bytes, ends: bool) -> None:
    assert ClientConnection(extensions(*advertised)).ends_group(command) is ends


def test_command_injection_refused() -> None:
    conn = ClientConnection()
    with pytest.raises(ValueError):
        conn.send_command(b"MAIL", b"FROM:<a@b>\r\nRCPT TO:<c@d>")
    with pytest.raises(ValueError):
        conn.send_command(b"MA IL")
    with pytest.raises(ValueError):
        rcpt_argument("a@b\n.com")
    assert conn.data_to_send() == b""


def test_start_tls_drops_injected_bytes() -> None:
    conn = ClientConnection(extensions("PIPELINING", "STARTTLS"))
    conn.send_command(b"STARTTLS")
    conn.receive_data(b"220 2.0.0 go ahead\r\n250 injected\r\n")
    got = conn.next_reply()
    assert got is not None and (got[0], got[1].code) == (b"STARTTLS", 220)
    assert conn.start_tls() == b"250 injected\r\n"
    assert conn.next_reply() is None
    assert "STARTTLS" not in conn.extensions


def test_bdat_last_chunk_is_told_apart() -> None:
    # The reply to the LAST chunk ends the transaction (RFC 3030 2).
    from slimta.smtp._client import bdat_frames

    conn = ClientConnection(extensions("PIPELINING", "CHUNKING"))
    conn.expect(b"[BANNER]")
    conn.send_command(b"EHLO", b"client.test")
    conn.send_command(b"MAIL", mail_argument("a@example.com"))
    conn.send_command(b"RCPT", rcpt_argument("b@example.com"))
    for frame in bdat_frames([b"0123456789"], chunk_size=4):
        conn.send_data(frame, b"BDAT")
    conn.send_data(b"BDAT 0 last\r\n", b"BDAT")
    conn.receive_data(b"220 mx\r\n" + b"250 ok\r\n" * 6)
    assert [command for command, _, _ in drain(conn)] == [
        b"[BANNER]",
        b"EHLO",
        b"MAIL",
        b"RCPT",
        b"BDAT",
        b"BDAT",
        b"BDAT LAST",
    ]
    assert conn.state.name == "READY"
    conn.receive_data(b"503 5.5.1 no transaction\r\n")
    assert drain(conn) == [(b"BDAT LAST", 503, "5.5.1 no transaction")]


# -------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, b"FROM:<a@example.com>"),
        ({"size": 123}, b"FROM:<a@example.com> SIZE=123"),
        ({"body": "8BITMIME"}, b"FROM:<a@example.com> BODY=8BITMIME"),
        ({"smtputf8": True}, b"FROM:<a@example.com> SMTPUTF8"),
    ],
)
def test_mail_argument(kwargs: dict[str, object], expected: bytes) -> None:
    assert mail_argument("a@example.com", **kwargs) == expected  # type: ignore[arg-type]


def test_mail_argument_null_sender_and_utf8() -> None:
    assert mail_argument("") == b"FROM:<>"
    assert mail_argument("δ@example.com", smtputf8=True) == "FROM:<δ@example.com> SMTPUTF8".encode()
    with pytest.raises(UnicodeEncodeError):
        mail_argument("δ@example.com")


def test_needs() -> None:
    assert not needs_smtputf8("a@example.com", ["b@example.com"])
    assert needs_smtputf8("", ["δ@example.com"])
    assert needs_smtputf8("δ@example.com", [])
    assert not needs_binarymime(b"abc\r\n", b"x" * 998)
    assert needs_binarymime(b"a\x00b")
    assert needs_binarymime(b"x" * 999 + b"\r\n")
    assert SMTPUTF8_REQUIRED[1].startswith("5.6.7") and SMTPUTF8_REQUIRED[0] in (553, 554)
    assert CONVERSION_NOT_ALLOWED == (554, "5.6.3 Conversion not allowed")


# -------------------------------------------------------------------- SASL
@pytest.mark.parametrize(
    ("advertised", "encrypted", "requested", "expected"),
    [
        ("PLAIN LOGIN CRAM-MD5", True, None, b"PLAIN"),
        ("LOGIN CRAM-MD5", True, None, b"LOGIN"),
        ("PLAIN LOGIN CRAM-MD5", False, None, b"CRAM-MD5"),
        ("PLAIN LOGIN", False, None, 504),
        (None, True, None, 504),
        ("CRAM-MD5", True, b"PLAIN", 504),
        ("PLAIN", False, "plain", 538),
        ("PLAIN", True, "plain", b"PLAIN"),
        ("XOAUTH2", True, "XOAUTH2", 504),
    ],
)
def test_choose_mechanism(
    advertised: str | None, encrypted: bool, requested: bytes | str | None, expected: object
) -> None:
    got = choose_mechanism(advertised, encrypted, requested)
    if isinstance(expected, bytes):
        assert got == expected
    else:
        assert isinstance(got, tuple) and got[0] == expected


@pytest.mark.parametrize(
    ("mechanism", "initial", "expected"),
    [
        (b"CRAM-MD5", None, b"CRAM-MD5"),
        (b"PLAIN", b"\0user\0pw", b"PLAIN " + base64.b64encode(b"\0user\0pw")),
        # RFC 4954 4: an empty initial response is sent as "=".
        (b"EXTERNAL", b"", b"EXTERNAL ="),
    ],
)
def test_auth_argument(mechanism: bytes, initial: bytes | None, expected: bytes) -> None:
    assert auth_argument(mechanism, initial) == expected


@pytest.mark.parametrize("mechanism", [b"", b"plain", b"PLAIN X", b"A" * 21, b"PLAIN\r\nRSET"])
def test_auth_argument_refuses_bad_names(mechanism: bytes) -> None:
    with pytest.raises(ValueError):
        auth_argument(mechanism)


def test_auth_framing_joined_to_server_core() -> None:
    # The AUTH line and a response line go through the core like any other.
    conn = ClientConnection(extensions("PIPELINING", "AUTH CRAM-MD5"))
    conn.send_command(b"AUTH", auth_argument(b"CRAM-MD5"))
    assert conn.ends_group(b"AUTH")
    assert conn.data_to_send() == b"AUTH CRAM-MD5\r\n"
    # RFC 2195 2, the example exchange.
    conn.receive_data(b"334 PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n")
    command, reply = conn.next_reply() or (b"", None)
    assert command == b"AUTH" and reply is not None and reply.code == 334
    assert decode_challenge(reply.message) == b"<1896.697170952@postoffice.reston.mci.net>"
    conn.send_line(encode_response(b"tim b913a602c7eda7a495b4e6e7334d3890"), b"AUTH")
    assert conn.data_to_send() == (b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n")
    with pytest.raises(ValueError):
        conn.send_line(b"abc\r\nQUIT", b"AUTH")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("VXNlcm5hbWU6", b"Username:"),
        ("  UGFzc3dvcmQ6 ", b"Password:"),
        ("", b""),
        ("not base64!", None),
        ("VXNlcm5hbWU", None),  # bad padding
        ("δ", None),
    ],
)
def test_decode_challenge(text: str, expected: bytes | None) -> None:
    assert decode_challenge(text) == expected


def test_encode_response_and_cancel() -> None:
    assert encode_response(b"user") == b"dXNlcg=="
    assert encode_response(b"") == b""
    assert SASL_CANCEL == b"*"
    assert set(CLIENT_MECHANISMS) >= CLEARTEXT_MECHANISMS
    assert CLIENT_MECHANISMS[0] == b"PLAIN" and b"CRAM-MD5" not in CLEARTEXT_MECHANISMS


# ------------------------------------------- client core joined to server core
def run_server(server: ServerConnection, data: bytes) -> bytes:
    """Feed *data*, answer every event with its usual success reply."""
    server.receive_data(data)
    while True:
        event = server.next_event()
        if isinstance(event, ev.NeedData | ev.ConnectionClosed):
            return server.data_to_send()
        if isinstance(event, ev.Data):
            server.respond(354, "Start mail input; end with <CRLF>.<CRLF>")
        elif isinstance(event, ev.Quit):
            server.respond(221, "2.0.0 Bye")
        elif isinstance(event, ev.RcptTo) and event.address.startswith("bad"):
            server.respond(550, "5.1.1 No such user")
        else:
            server.respond(250, "2.0.0 Ok")


def test_pipelined_transaction_against_server_core() -> None:
    from slimta.smtp._client import dot_stuff

    server_ext = extensions("PIPELINING", "8BITMIME")
    server = ServerConnection(server_ext)
    server.greet(220, "mx.test ESMTP")
    client = ClientConnection()
    client.expect(b"[BANNER]")
    client.receive_data(server.data_to_send())
    client.send_command(b"EHLO", b"client.test")
    client.receive_data(run_server(server, client.data_to_send()))
    replies = drain(client)
    assert [r[:2] for r in replies] == [(b"[BANNER]", 220), (b"EHLO", 250)]
    client.extensions = Extensions()
    client.extensions.parse_string(replies[1][2])
    assert client.pipelining

    # One group: MAIL, RCPT, RCPT, DATA; one write, four replies in order.
    for verb, arg in [
        (b"MAIL", mail_argument("a@example.com")),
        (b"RCPT", rcpt_argument("good@example.com")),
        (b"RCPT", rcpt_argument("bad@example.com")),
        (b"DATA", None),
    ]:
        assert client.ends_group(verb) is (verb == b"DATA")
        client.send_command(verb, arg)
    group = client.data_to_send()
    assert group.count(b"\r\n") == 4
    client.receive_data(run_server(server, group))
    assert [r[:2] for r in drain(client)] == [
        (b"MAIL", 250),
        (b"RCPT", 250),
        (b"RCPT", 550),
        (b"DATA", 354),
    ]
    client.send_data(b"".join(dot_stuff(b"Subject: t\r\n\r\n.hidden\n.\nend")))
    client.receive_data(run_server(server, client.data_to_send()))
    assert [r[:2] for r in drain(client)] == [(b"[SEND_DATA]", 250)]
    client.send_command(b"QUIT")
    client.receive_data(run_server(server, client.data_to_send()))
    assert [r[:2] for r in drain(client)] == [(b"QUIT", 221)]
