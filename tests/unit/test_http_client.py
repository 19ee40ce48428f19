"""slimta.http's client connections and the relay's X-Smtp-Reply parser, no sockets."""

from __future__ import annotations

import http.client
import socket
import ssl
from typing import Any
from urllib.parse import urlparse, urlsplit

import gevent.socket
import pytest

from slimta.http import HTTPConnection, HTTPSConnection, get_connection
from slimta.relay.http import HttpRelay, _parse_smtp_reply
from slimta.util._connect import create_connection

pytestmark = pytest.mark.timeout(10)


# ------------------------------------------------------------ get_connection
@pytest.mark.parametrize(
    ("url", "cls", "host", "port"),
    [
        ("http://mail.example.com/deliver", HTTPConnection, "mail.example.com", 80),
        ("http://mail.example.com:8025/", HTTPConnection, "mail.example.com", 8025),
        ("https://mail.example.com/", HTTPSConnection, "mail.example.com", 443),
        ("https://mail.example.com:8443/x?y=1", HTTPSConnection, "mail.example.com", 8443),
        ("HTTPS://Mail.Example.com:8443/", HTTPSConnection, "mail.example.com", 8443),
        ("http://[2001:db8::1]:8080/", HTTPConnection, "2001:db8::1", 8080),
        ("https://[::1]/", HTTPSConnection, "::1", 443),
        ("http:///just/a/path", HTTPConnection, "localhost", 80),
        ("https:///just/a/path", HTTPSConnection, "localhost", 443),
        ("/no/scheme/no/host", HTTPConnection, "localhost", 80),
        ("ftp://files.example.com/", HTTPConnection, "files.example.com", 80),
        ("http://user:secret@mail.example.com:81/", HTTPConnection, "mail.example.com", 81),
        (b"http://mail.example.com:8025/", HTTPConnection, "mail.example.com", 8025),
        (b"https://mail.example.com/", HTTPSConnection, "mail.example.com", 443),
        (urlsplit("https://mail.example.com:1/"), HTTPSConnection, "mail.example.com", 1),
        (urlsplit(b"http://mail.example.com:2/"), HTTPConnection, "mail.example.com", 2),
        (urlparse("https://mail.example.com:3/p;q"), HTTPSConnection, "mail.example.com", 3),
        (urlparse(b"http://mail.example.com:4/"), HTTPConnection, "mail.example.com", 4),
    ],
)
def test_get_connection(url: Any, cls: type, host: str, port: int) -> None:
    conn = get_connection(url)
    assert type(conn) is cls
    # http.client keeps the host's case (DNS ignores it).
    assert (conn.host.lower(), conn.port) == (host, port)
    assert conn.sock is None  # nothing connected yet


def test_get_connection_scheme_is_case_insensitive_in_parsed_results() -> None:
    parts = urlsplit("https://mail.example.com/")._replace(scheme="HTTPS")
    assert isinstance(get_connection(parts), HTTPSConnection)


def test_get_connection_passes_the_context() -> None:
    context = ssl.create_default_context()
    conn = get_connection("https://mail.example.com/", context)
    assert isinstance(conn, HTTPSConnection)
    assert conn._context is context


def test_https_default_context_verifies() -> None:
    conn = get_connection("https://mail.example.com/")
    assert isinstance(conn, HTTPSConnection)
    assert conn._context.verify_mode == ssl.CERT_REQUIRED
    assert conn._context.check_hostname is True


def test_http_ignores_the_context() -> None:
    conn = get_connection("http://mail.example.com/", ssl.create_default_context())
    assert type(conn) is HTTPConnection


def test_bad_port_is_refused() -> None:
    with pytest.raises(http.client.InvalidURL):
        get_connection("http://mail.example.com:port/")


@pytest.mark.parametrize("cls", [HTTPConnection, HTTPSConnection])
def test_connections_open_gevent_sockets(cls: type[http.client.HTTPConnection]) -> None:
    conn = cls("mail.example.com", 8080, timeout=3.0)
    assert conn._create_connection is create_connection  # type: ignore[attr-defined]
    assert (conn.host, conn.port, conn.timeout) == ("mail.example.com", 8080, 3.0)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_address_literals_connect_without_the_resolver(
    family: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    try:
        listener = socket.create_server((host, 0), family=family)
    except OSError:
        pytest.skip(f"no {host} here")
    port = listener.getsockname()[1]

    def no_resolver(*args: object, **kwargs: object) -> None:
        raise AssertionError("the resolver was asked for an address literal")

    monkeypatch.setattr(gevent.socket, "getaddrinfo", no_resolver)
    monkeypatch.setattr(gevent.socket, "create_connection", no_resolver)
    with listener, create_connection((host, port), 3.0) as sock:
        assert isinstance(sock, gevent.socket.socket)
        assert sock.family == family
        assert sock.gettimeout() == 3.0
        assert sock.getpeername()[:2] == (host, port)


def test_names_are_resolved_through_gevent(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def fake(address: object, *args: object, **kwargs: object) -> None:
        calls.append(address)
        raise OSError("resolved")

    monkeypatch.setattr(gevent.socket, "create_connection", fake)
    with pytest.raises(OSError, match="resolved"):
        create_connection(("mail.example.com", 25))
    assert calls == [("mail.example.com", 25)]


def test_a_refused_literal_closes_its_socket() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        create_connection(("127.0.0.1", port))


def test_connections_are_stdlib_connections() -> None:
    assert issubclass(HTTPConnection, http.client.HTTPConnection)
    assert issubclass(HTTPSConnection, http.client.HTTPSConnection)


def test_close_without_a_socket() -> None:
    conn = HTTPSConnection("mail.example.com")
    conn.close()
    conn.close()
    assert conn.sock is None


# ------------------------------------------------------------- X-Smtp-Reply
@pytest.mark.parametrize(
    ("value", "code", "message", "command"),
    [
        (
            '250; message="2.6.0 Message accepted for delivery"',
            "250",
            "2.6.0 Message accepted for delivery",
            None,
        ),
        ('550; message="5.1.1 No such user"; command="RCPT"', "550", "5.1.1 No such user", "RCPT"),
        (
            '  451 ;message = "4.3.0 Busy" ; command = "[SEND_DATA]"  ',
            "451",
            "4.3.0 Busy",
            "[SEND_DATA]",
        ),
        ('550; MESSAGE="5.0.0 x"', "550", "5.0.0 x", None),
        # RFC 9110 quoted-pairs, as WsgiEdge writes them.
        (
            r'550; message="5.1.1 <\"a b\"@example.com> unknown"',
            "550",
            '5.1.1 <"a b"@example.com> unknown',
            None,
        ),
        (r'550; message="5.0.0 back\\slash"', "550", "5.0.0 back\\slash", None),
        # 4.0's WsgiEdge does not escape quotes.
        (
            '550; message="5.1.1 <"a b"@example.com> unknown"',
            "550",
            '5.1.1 <"a b"@example.com> unknown',
            None,
        ),
        ('550; message="5.1.1 "q""; command="RCPT"', "550", '5.1.1 "q"', "RCPT"),
        # No enhanced code: the reply's default applies.
        ('421; message="Going away"', "421", "4.0.0 Going away", None),
        ('250; message=""', "250", "2.0.0", None),
        # UTF-8 text that http.client decoded as Latin-1.
        ('550; message="5.1.1 caf\xc3\xa9"', "550", "5.1.1 caf\xe9", None),
        ('250; message="tab\tinside"', "250", "2.0.0 tab\tinside", None),
    ],
)
def test_parse_smtp_reply(value: str, code: str, message: str, command: str | None) -> None:
    reply = _parse_smtp_reply(value, ("127.0.0.1", 80))
    assert reply is not None
    assert reply.code == code
    assert reply.message == message
    assert reply.command == command
    assert reply.address == ("127.0.0.1", 80)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "250",
        "250 Ok",
        "250; Ok",
        "250; message=2.0.0 Ok",
        '250; message="2.0.0 Ok',
        '650; message="x"',
        '25; message="x"',
        '2500; message="x"',
        'abc; message="x"',
        '250; command="MAIL"; message="x"',
        '250; message="x"; other="y"',
        '250; message="x"; command="MAIL" trailing',
        '250; message="line\r\nbreak"',
        '250; message="nul\x00"',
        '250; message="bell\x07"',
        '250; message="next line\xc2\x85"',  # U+0085 as UTF-8 read as Latin-1
        '250; message="' + "x" * 5000 + '"',
    ],
)
def test_parse_smtp_reply_refuses(value: str) -> None:
    assert _parse_smtp_reply(value) is None


# ------------------------------------------------------------------ HttpRelay
def test_relay_defaults() -> None:
    relay = HttpRelay("http://mail.example.com:8025/deliver?to=inbox")
    assert relay.address == ("mail.example.com", 8025)
    assert relay.where == "mail.example.com:8025"
    assert relay.path == "/deliver?to=inbox"
    assert relay.context is None
    assert (relay.http_verb, relay.sender_header, relay.recipient_header, relay.ehlo_header) == (
        "POST",
        "X-Envelope-Sender",
        "X-Envelope-Recipient",
        "X-Ehlo",
    )
    assert relay.pool_size is None and relay.timeout is None and relay.idle_timeout is None


def test_relay_https_default_context_verifies() -> None:
    relay = HttpRelay("https://[2001:db8::25]")
    assert relay.address == ("2001:db8::25", 443)
    assert relay.where == "[2001:db8::25]:443"
    assert relay.path == "/"
    assert relay.context is not None
    assert relay.context.verify_mode == ssl.CERT_REQUIRED and relay.context.check_hostname


def test_relay_positional_arguments() -> None:
    context = ssl.create_default_context()
    relay = HttpRelay("https://mx.test/", 3, context, "relay.test", 4.0, 5.0)
    assert relay.pool_size == 3
    assert relay.context is context
    assert relay.ehlo_as == "relay.test"
    assert (relay.timeout, relay.idle_timeout) == (4.0, 5.0)


@pytest.mark.parametrize(
    "url",
    ["ftp://mx.test/", "mailto:postmaster@mx.test", "http://user:pw@mx.test/", "http://mx.test:x/"],
)
def test_relay_refuses_url(url: str) -> None:
    with pytest.raises(ValueError):
        HttpRelay(url)


class _RecordingSocket:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))


@pytest.mark.parametrize("cls", [HTTPConnection, HTTPSConnection])
def test_request_head_and_bytes_body_go_in_one_write(
    cls: type[http.client.HTTPConnection],
) -> None:
    conn = cls("mail.example.com")
    sock = _RecordingSocket()
    conn.sock = sock
    conn.request("POST", "/in", body=b"Subject: hi\r\n\r\nbody\r\n", headers={"X-Ehlo": "me"})
    [write] = sock.writes
    head, _, body = write.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /in HTTP/1.1\r\n")
    assert b"\r\nX-Ehlo: me" in head
    assert b"\r\nContent-Length: 21" in head
    assert body == b"Subject: hi\r\n\r\nbody\r\n"


def test_other_bodies_are_written_as_http_client_does() -> None:
    conn = HTTPConnection("mail.example.com")
    sock = _RecordingSocket()
    conn.sock = sock
    conn.request("POST", "/in", body=[b"one", b"two"], headers={"Content-Length": "6"})
    assert sock.writes[1:] == [b"one", b"two"]
    assert sock.writes[0].endswith(b"\r\n\r\n")
