"""HttpRelay against real HTTP servers on 127.0.0.1.

Servers: :class:`gevent.pywsgi.WSGIServer` running a small WSGI application
written here (what a well-behaved server does, with or without TLS), and raw
:class:`gevent.server.StreamServer` peers that follow a script per
connection (what a broken or hostile one does).
"""

from __future__ import annotations

import base64
import contextlib
import gc
import logging
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.queue
import pytest
import trustme
from gevent.pywsgi import WSGIHandler, WSGIServer
from gevent.server import StreamServer

from slimta.envelope import Envelope
from slimta.queue import Queue
from slimta.queue.dict import DictStorage
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.http import HttpRelay
from slimta.relay.smtp import SmtpPermanentRelayError, SmtpTransientRelayError
from slimta.smtp.reply import Reply

pytestmark = pytest.mark.timeout(30)

#: Seconds a test waits for anything before failing.
WAIT = 5.0

ACCEPTED = '250; message="2.6.0 Message accepted for delivery"'
MESSAGE = b"From: sender@example.com\r\nSubject: test\r\n\r\nhello\r\nworld\r\n"

# Named replies: (code, enhanced status code).
QUEUED = ("250", "2.6.0")
CONNECT_FAILED = ("451", "4.4.0")
CONNECTION_FAILED = ("451", "4.4.2")
TIMED_OUT = ("451", "4.4.2")
TLS_FAILED = ("451", "4.7.0")
BAD_RESPONSE = ("451", "4.5.0")
INTERRUPTED = ("451", "4.3.0")
NO_SUCH_USER = ("550", "5.1.1")
BUSY = ("451", "4.3.0")
HTTP_PERMANENT = ("550", "5.0.0")
HTTP_TRANSIENT = ("450", "4.0.0")


def is_(reply: Reply | None, named: tuple[str, str]) -> bool:
    assert reply is not None
    return reply.code == named[0] and reply.enhanced_status_code == named[1]


def message(sender: str = "sender@example.com", rcpts: list[str] | None = None) -> Envelope:
    env = Envelope(sender, rcpts if rcpts is not None else ["rcpt@example.com"])
    env.parse(MESSAGE)
    return env


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


# --------------------------------------------------------------- WSGI server
class App:
    """A WSGI application recording each request and answering as told.

    :attr:`answer` is ``(status, headers, body)``, or a callable taking the
    environ and returning one.
    """

    def __init__(self) -> None:
        self.answer: Any = ("204 No Content", [("X-Smtp-Reply", ACCEPTED)], b"")
        self.requests: list[dict[str, Any]] = []
        #: One item per request, as it arrives.
        self.arrived: gevent.queue.Queue[dict[str, Any]] = gevent.queue.Queue()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        request = {**environ, "body": body}
        self.requests.append(request)
        self.arrived.put(request)
        answer = self.answer(environ) if callable(self.answer) else self.answer
        status, headers, data = answer
        start_response(status, list(headers))
        return [data]


class Server:
    """A running WSGIServer for an :class:`App`, counting its connections."""

    def __init__(self, app: App, context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.connections = 0
        #: One item per connection the server is done with.
        self.closed: gevent.queue.Queue[int] = gevent.queue.Queue()
        server = self

        class Counting(WSGIHandler):  # type: ignore[misc]
            def handle(self) -> None:
                server.connections += 1
                try:
                    super().handle()
                finally:
                    server.closed.put(1)

        kwargs: dict[str, Any] = {"ssl_context": context} if context is not None else {}
        self.wsgi = WSGIServer(
            ("127.0.0.1", 0),
            app,
            handler_class=Counting,
            log=None,
            error_log=logging.getLogger("test.wsgi"),
            **kwargs,
        )
        self.wsgi.start()
        self.port: int = self.wsgi.server_port

    def url(self, scheme: str = "http", host: str = "127.0.0.1", path: str = "/") -> str:
        return f"{scheme}://{host}:{self.port}{path}"


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def factory(app: App | None = None, context: ssl.SSLContext | None = None) -> Server:
        server = Server(app or App(), context)
        made.append(server)
        return server

    yield factory
    for server in made:
        server.wsgi.stop(timeout=1)


@pytest.fixture
def server(servers: Callable[..., Server]) -> Server:
    return servers()


@pytest.fixture
def relays() -> Iterator[Callable[..., HttpRelay]]:
    made: list[HttpRelay] = []

    def factory(url: str, **kwargs: Any) -> HttpRelay:
        kwargs.setdefault("ehlo_as", "relay.test")
        kwargs.setdefault("timeout", WAIT)
        relay = HttpRelay(url, **kwargs)
        made.append(relay)
        return relay

    yield factory
    for relay in made:
        relay.kill()


# ------------------------------------------------------------------ raw peers
class PeerConnection:
    """One accepted connection of a :class:`Peer`, for its script."""

    def __init__(self, sock: socket.socket, peer: Peer) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = b""

    def _fill(self) -> bool:
        with gevent.Timeout(WAIT, AssertionError("peer read timed out")):
            data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def read_request(self) -> bytes | None:
        """One whole request (head and Content-Length body); ``None`` at EOF."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.buf = rest
        while len(self.buf) < length:
            if not self._fill():
                return None
        body, self.buf = self.buf[:length], self.buf[length:]
        request = head + b"\r\n\r\n" + body
        self.peer.requests.append(request)
        self.peer.arrived.put(request)
        return request

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self, status: str = "204 No Content", *headers: str, body: bytes = b"") -> None:
        lines = [f"HTTP/1.1 {status}", *headers]
        if body or not status.startswith("204"):
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def accept(self) -> None:
        """Answer 204 with the accepted X-Smtp-Reply."""
        self.answer("204 No Content", f"X-Smtp-Reply: {ACCEPTED}")

    def wait_eof(self) -> None:
        """Block until the client closes (or resets) the connection."""
        with contextlib.suppress(OSError):
            while self._fill():
                pass

    def close(self) -> None:
        self.sock.close()


Script = Callable[[PeerConnection], None]


class Peer:
    """A StreamServer running ``scripts[n]`` for its n-th connection (the
    last script for any later one)."""

    def __init__(
        self,
        *scripts: Script,
        context: ssl.SSLContext | None = None,
        rcvbuf: int | None = None,
        **ssl_args: Any,
    ) -> None:
        self.scripts = scripts
        self.connections = 0
        self.requests: list[bytes] = []
        self.arrived: gevent.queue.Queue[bytes] = gevent.queue.Queue()
        #: Set when a script returns (the server then closes the socket).
        self.done: gevent.queue.Queue[int] = gevent.queue.Queue()
        kwargs: dict[str, Any] = {"ssl_context": context, **ssl_args} if context else {}
        listener = socket.socket()
        if rcvbuf is not None:
            # Inherited by accepted sockets: a client sending more blocks soon.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        self.server = StreamServer(listener, self._handle, **kwargs)
        self.server.start()
        self.port: int = self.server.server_port

    def _handle(self, sock: socket.socket, address: Any) -> None:
        index = self.connections
        self.connections += 1
        script = self.scripts[min(index, len(self.scripts) - 1)]
        try:
            script(PeerConnection(sock, self))
        finally:
            self.done.put(index)

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/"


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def factory(*scripts: Script, **kwargs: Any) -> Peer:
        peer = Peer(*scripts, **kwargs)
        made.append(peer)
        return peer

    yield factory
    for peer in made:
        peer.server.stop(timeout=1)


def keep_alive(conn: PeerConnection) -> None:
    """Accept every request on the connection until the client closes."""
    while conn.read_request() is not None:
        conn.accept()


# =========================================================== well-behaved server
def test_delivers_and_returns_the_smtp_reply(server: Server, relays: Any) -> None:
    relay = relays(server.url(path="/deliver?box=1"))
    reply = relay.attempt(message(rcpts=["a@example.com", "b@example.com"]), 0)
    assert isinstance(reply, Reply) and is_(reply, QUEUED)
    assert reply.message == "2.6.0 Message accepted for delivery"
    assert reply.address == ("127.0.0.1", server.port)
    (request,) = server.app.requests
    assert request["REQUEST_METHOD"] == "POST"
    assert request["PATH_INFO"] == "/deliver" and request["QUERY_STRING"] == "box=1"
    assert request["CONTENT_TYPE"] == "message/rfc822"
    assert request["HTTP_X_EHLO"] == "relay.test"
    assert request["HTTP_X_ENVELOPE_SENDER"] == b64("sender@example.com")
    # The WSGI server joins the repeated header with commas.
    assert request["HTTP_X_ENVELOPE_RECIPIENT"].split(",") == [
        b64("a@example.com"),
        b64("b@example.com"),
    ]
    header, body = message().flatten()
    assert request["body"] == header + body
    assert int(request["CONTENT_LENGTH"]) == len(header + body)


def test_request_on_the_wire(peers: Any, relays: Any) -> None:
    def script(conn: PeerConnection) -> None:
        conn.read_request()
        conn.accept()

    peer = peers(script)
    relay = relays(peer.url(), ehlo_as=lambda: "called.test")
    env = message("", ["a@example.com", "b\u00e9@\u00e9xample.com", "c@example.com"])
    assert is_(relay.attempt(env, 0), QUEUED)
    head, _, body = peer.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST / HTTP/1.1"
    header, message_body = env.flatten()
    assert body == header + message_body
    assert f"Content-Length: {len(body)}".encode() in lines
    assert b"Content-Type: message/rfc822" in lines
    assert b"X-Ehlo: called.test" in lines
    # The null sender is an empty header; one recipient header each, UTF-8.
    assert b"X-Envelope-Sender: " in lines
    rcpts = [line for line in lines if line.startswith(b"X-Envelope-Recipient:")]
    assert [base64.b64decode(line.split(b": ")[1]).decode("utf-8") for line in rcpts] == [
        "a@example.com",
        "b\u00e9@\u00e9xample.com",
        "c@example.com",
    ]
    assert f"Host: 127.0.0.1:{peer.port}".encode() in lines


def test_success_without_smtp_reply_returns_none(server: Server, relays: Any) -> None:
    server.app.answer = ("200 OK", [("Content-Type", "text/plain")], b"thanks")
    assert relays(server.url()).attempt(message(), 0) is None


@pytest.mark.parametrize(
    ("status", "headers", "error", "named"),
    [
        (
            "503 Service Unavailable",
            [("X-Smtp-Reply", '451; message="4.3.0 Busy"')],
            SmtpTransientRelayError,
            BUSY,
        ),
        (
            "500 Internal Server Error",
            [("X-Smtp-Reply", '550; message="5.1.1 No such user"; command="RCPT"')],
            SmtpPermanentRelayError,
            NO_SUCH_USER,
        ),
        (
            "401 Unauthorized",
            [("X-Smtp-Reply", '535; message="5.7.8 Bad credentials"')],
            SmtpPermanentRelayError,
            ("535", "5.7.8"),
        ),
        # An SMTP reply decides over the HTTP status.
        (
            "400 Bad Request",
            [("X-Smtp-Reply", '452; message="4.5.3 Too many"')],
            SmtpTransientRelayError,
            ("452", "4.5.3"),
        ),
        (
            "503 Service Unavailable",
            [("X-Smtp-Reply", '554; message="5.5.1 No"')],
            SmtpPermanentRelayError,
            ("554", "5.5.1"),
        ),
        # Without one: 4xx permanent, the rest transient.
        ("404 Not Found", [], PermanentRelayError, HTTP_PERMANENT),
        ("403 Forbidden", [], PermanentRelayError, HTTP_PERMANENT),
        ("500 Internal Server Error", [], TransientRelayError, HTTP_TRANSIENT),
        ("502 Bad Gateway", [], TransientRelayError, HTTP_TRANSIENT),
        (
            "302 Found",
            [("Location", "http://elsewhere.test/")],
            TransientRelayError,
            HTTP_TRANSIENT,
        ),
        ("429 Too Many Requests", [], TransientRelayError, HTTP_TRANSIENT),
        ("408 Request Timeout", [], TransientRelayError, HTTP_TRANSIENT),
        # A malformed or contradicting X-Smtp-Reply counts as absent.
        (
            "500 Internal Server Error",
            [("X-Smtp-Reply", "550 no quotes")],
            TransientRelayError,
            HTTP_TRANSIENT,
        ),
        (
            "400 Bad Request",
            [("X-Smtp-Reply", '250; message="2.0.0 Ok"')],
            PermanentRelayError,
            HTTP_PERMANENT,
        ),
        (
            "503 Service Unavailable",
            [
                ("X-Smtp-Reply", '550; message="5.0.0 a"'),
                ("X-Smtp-Reply", '550; message="5.0.0 b"'),
            ],
            TransientRelayError,
            HTTP_TRANSIENT,
        ),
    ],
)
def test_error_mapping(
    server: Server,
    relays: Any,
    status: str,
    headers: list[tuple[str, str]],
    error: type[Exception],
    named: tuple[str, str],
) -> None:
    server.app.answer = (status, headers, b"some text\n")
    with pytest.raises(error) as info:
        relays(server.url()).attempt(message(), 0)
    assert type(info.value) is error
    assert is_(info.value.reply, named)


def test_error_reason_is_the_message(server: Server, relays: Any) -> None:
    server.app.answer = ("404 Nowhere To Be Found", [], b"")
    with pytest.raises(PermanentRelayError) as info:
        relays(server.url()).attempt(message(), 0)
    assert str(info.value) == "Nowhere To Be Found"
    assert info.value.reply.message == "5.0.0 Nowhere To Be Found"


def test_smtp_reply_command_and_quotes(server: Server, relays: Any) -> None:
    value = r'550; message="5.1.1 <\"a b\"@example.com> unknown"; command="RCPT"'
    server.app.answer = ("500 Internal Server Error", [("X-Smtp-Reply", value)], b"")
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(server.url()).attempt(message(), 0)
    reply = info.value.reply
    assert reply.message == '5.1.1 <"a b"@example.com> unknown'
    assert reply.command == "RCPT"
    assert str(info.value) == 'Permanent failure on RCPT: 550 5.1.1 <"a b"@example.com> unknown'


def test_error_smtp_reply_on_success_is_ignored(
    server: Server, relays: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server.app.answer = ("204 No Content", [("X-Smtp-Reply", '550; message="5.0.0 No"')], b"")
    with caplog.at_level(logging.WARNING, logger="slimta.relay.http"):
        assert relays(server.url()).attempt(message(), 0) is None
    assert "bad_smtp_reply" in caplog.text


def test_malformed_smtp_reply_is_logged(
    server: Server, relays: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server.app.answer = ("503 Service Unavailable", [("X-Smtp-Reply", "junk")], b"")
    with (
        caplog.at_level(logging.WARNING, logger="slimta.relay.http"),
        pytest.raises(TransientRelayError),
    ):
        relays(server.url()).attempt(message(), 0)
    assert "bad_smtp_reply" in caplog.text and "junk" in caplog.text


def test_requests_and_responses_are_logged(
    server: Server, relays: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="slimta.relay.http"):
        relays(server.url()).attempt(message(), 0)
    assert ":client_request " in caplog.text and "X-Envelope-Sender" in caplog.text
    assert ":client_response " in caplog.text and "status=204" in caplog.text


def test_long_error_body_is_not_read_and_costs_the_connection(server: Server, relays: Any) -> None:
    server.app.answer = ("500 Internal Server Error", [], b"x" * 300_000)
    relay = relays(server.url(), idle_timeout=WAIT)
    for _ in range(2):
        with pytest.raises(TransientRelayError):
            relay.attempt(message(), 0)
    assert server.connections == 2


def test_unread_body_costs_the_connection(peers: Any, relays: Any) -> None:
    def stalled(conn: PeerConnection) -> None:
        conn.read_request()
        conn.send(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100000\r\n\r\n" + b"x" * 65536
        )
        # A request on this connection would read the rest as its response.
        if conn.read_request() is not None:
            conn.send(b"x" * (100000 - 65536))
            conn.answer("204 No Content", 'X-Smtp-Reply: 250; message="2.0.0 Wrong"')
            keep_alive(conn)

    peer = peers(stalled, keep_alive)
    relay = relays(peer.url(), idle_timeout=WAIT)
    with pytest.raises(TransientRelayError):
        relay.attempt(message(), 0)
    assert is_(relay.attempt(message(), 0), QUEUED)
    assert peer.connections == 2


def test_short_error_body_keeps_the_connection(server: Server, relays: Any) -> None:
    server.app.answer = ("500 Internal Server Error", [], b"x" * 60_000)
    relay = relays(server.url(), idle_timeout=WAIT)
    for _ in range(3):
        with pytest.raises(TransientRelayError):
            relay.attempt(message(), 0)
    assert server.connections == 1


# ----------------------------------------------------------------- keep-alive
def test_connection_is_reused(server: Server, relays: Any) -> None:
    relay = relays(server.url(), idle_timeout=WAIT)
    for _ in range(3):
        assert is_(relay.attempt(message(), 0), QUEUED)
    assert server.connections == 1
    assert len(server.app.requests) == 3


def test_without_idle_timeout_each_message_has_its_connection(server: Server, relays: Any) -> None:
    relay = relays(server.url())
    for _ in range(2):
        assert is_(relay.attempt(message(), 0), QUEUED)
    assert server.connections == 2


def test_idle_connection_closes_after_idle_timeout(server: Server, relays: Any) -> None:
    relay = relays(server.url(), idle_timeout=0.05)
    relay.attempt(message(), 0)
    (client,) = relay.pool
    client.join(WAIT)
    assert client.dead and not relay.pool
    server.closed.get(timeout=WAIT)


def test_pool_size_bounds_connections(server: Server, relays: Any) -> None:
    gate = gevent.event.Event()

    def answer(environ: dict[str, Any]) -> Any:
        gate.wait(WAIT)
        return ("204 No Content", [("X-Smtp-Reply", ACCEPTED)], b"")

    server.app.answer = answer
    relay = relays(server.url(), pool_size=2, idle_timeout=WAIT)
    attempts = [gevent.spawn(relay.attempt, message(), 0) for _ in range(5)]
    for _ in range(2):
        server.app.arrived.get(timeout=WAIT)
    assert server.connections == 2 and len(server.app.requests) == 2
    gate.set()
    gevent.joinall(attempts, timeout=WAIT, raise_error=True)
    assert all(is_(g.value, QUEUED) for g in attempts)
    assert server.connections == 2 and len(server.app.requests) == 5


def test_server_closing_between_messages(peers: Any, relays: Any) -> None:
    def once(conn: PeerConnection) -> None:
        conn.read_request()
        conn.accept()  # keep-alive as far as the client knows, then gone

    peer = peers(once)
    relay = relays(peer.url(), idle_timeout=WAIT)
    assert is_(relay.attempt(message(), 0), QUEUED)
    assert peer.done.get(timeout=WAIT) == 0
    assert is_(relay.attempt(message(), 0), QUEUED)
    assert peer.connections == 2
    assert len(peer.requests) == 2  # nothing went to the closed connection


def test_connection_closed_as_the_request_goes_is_retried(peers: Any, relays: Any) -> None:
    def first(conn: PeerConnection) -> None:
        conn.read_request()
        conn.accept()
        # The idle-timeout race: the request arrives, the server closes.
        conn.read_request()

    peer = peers(first, keep_alive)
    relay = relays(peer.url(), idle_timeout=WAIT)
    assert is_(relay.attempt(message(), 0), QUEUED)
    assert is_(relay.attempt(message(), 0), QUEUED)
    assert peer.connections == 2
    assert len(peer.requests) == 3
    assert peer.requests[1] == peer.requests[2]


def test_no_retry_once_the_response_began(peers: Any, relays: Any) -> None:
    def first(conn: PeerConnection) -> None:
        conn.read_request()
        conn.accept()
        conn.read_request()
        conn.send(b"HTTP/1.1 20")

    peer = peers(first, keep_alive)
    relay = relays(peer.url(), idle_timeout=WAIT)
    assert is_(relay.attempt(message(), 0), QUEUED)
    with pytest.raises(TransientRelayError) as info:
        relay.attempt(message(), 0)
    assert is_(info.value.reply, BAD_RESPONSE)
    assert peer.connections == 1 and len(peer.requests) == 2


def test_no_retry_on_a_new_connection(peers: Any, relays: Any) -> None:
    def close_after_request(conn: PeerConnection) -> None:
        conn.read_request()

    peer = peers(close_after_request, keep_alive)
    with pytest.raises(TransientRelayError) as info:
        relays(peer.url(), idle_timeout=WAIT).attempt(message(), 0)
    assert is_(info.value.reply, CONNECTION_FAILED)
    where = f"127.0.0.1:{peer.port}"
    assert str(info.value) == (
        f"Connection to {where} failed: Remote end closed connection without response"
    )
    assert peer.connections == 1


def test_retry_happens_only_once(peers: Any, relays: Any) -> None:
    def first(conn: PeerConnection) -> None:
        conn.read_request()
        conn.accept()
        conn.read_request()

    def close_after_request(conn: PeerConnection) -> None:
        conn.read_request()

    peer = peers(first, close_after_request, keep_alive)
    relay = relays(peer.url(), idle_timeout=WAIT)
    relay.attempt(message(), 0)
    with pytest.raises(TransientRelayError) as info:
        relay.attempt(message(), 0)
    assert is_(info.value.reply, CONNECTION_FAILED)
    assert peer.connections == 2


# ------------------------------------------------------------- broken servers
def test_connection_refused(relays: Any) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(TransientRelayError) as info:
        relays(f"http://127.0.0.1:{port}/").attempt(message(), 0)
    assert is_(info.value.reply, CONNECT_FAILED)
    assert info.value.reply.message == (
        f"4.4.0 Connection to 127.0.0.1:{port} failed: [Errno 111] Connection refused"
    )


def test_garbage_response(peers: Any, relays: Any) -> None:
    def garbage(conn: PeerConnection) -> None:
        conn.read_request()
        conn.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    peer = peers(garbage)
    with pytest.raises(TransientRelayError) as info:
        relays(peer.url()).attempt(message(), 0)
    assert is_(info.value.reply, BAD_RESPONSE)
    assert f"Invalid HTTP response from 127.0.0.1:{peer.port}: " in str(info.value)


def test_endless_header_line(peers: Any, relays: Any) -> None:
    def endless(conn: PeerConnection) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 204 No Content\r\nX-Long: " + b"x" * 100_000)
        conn.wait_eof()

    peer = peers(endless)
    with pytest.raises(TransientRelayError) as info:
        relays(peer.url()).attempt(message(), 0)
    assert is_(info.value.reply, BAD_RESPONSE)


def test_closes_at_once(peers: Any, relays: Any) -> None:
    peer = peers(lambda conn: None)
    with pytest.raises(TransientRelayError) as info:
        relays(peer.url()).attempt(message(), 0)
    assert is_(info.value.reply, CONNECTION_FAILED)
    assert f"Connection to 127.0.0.1:{peer.port} failed: " in str(info.value)


def test_closes_mid_headers(peers: Any, relays: Any) -> None:
    def cut(conn: PeerConnection) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 503 Service Unavailable\r\nX-Smtp-Reply: 550; mess")

    peer = peers(cut)
    # The header section ends at EOF as far as http.client goes: what arrived
    # of the reply does not parse, so the status decides.
    with pytest.raises(TransientRelayError) as info:
        relays(peer.url()).attempt(message(), 0)
    assert is_(info.value.reply, HTTP_TRANSIENT)


def test_content_length_longer_than_body(peers: Any, relays: Any) -> None:
    def short(conn: PeerConnection) -> None:
        conn.read_request()
        conn.send(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
            b'X-Smtp-Reply: 250; message="2.0.0 Ok"\r\n\r\nonly this'
        )

    peer = peers(short, keep_alive)
    relay = relays(peer.url(), idle_timeout=WAIT)
    # The answer was complete before the body: it stands.
    assert is_(relay.attempt(message(), 0), ("250", "2.0.0"))
    assert is_(relay.attempt(message(), 0), QUEUED)
    assert peer.connections == 2


def test_content_length_longer_than_body_and_silence(peers: Any, relays: Any) -> None:
    eof = gevent.event.Event()

    def stall(conn: PeerConnection) -> None:
        conn.read_request()
        conn.send(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
            b'X-Smtp-Reply: 250; message="2.0.0 Ok"\r\n\r\nonly this'
        )
        conn.wait_eof()
        eof.set()

    peer = peers(stall)
    relay = relays(peer.url(), timeout=1.0, idle_timeout=WAIT)
    assert is_(relay.attempt(message(), 0), ("250", "2.0.0"))
    # The client gives up on the body within its timeout.
    assert eof.wait(WAIT)


def test_content_length_shorter_than_body(peers: Any, relays: Any) -> None:
    def long(conn: PeerConnection) -> None:
        conn.read_request()
        conn.send(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
            b'X-Smtp-Reply: 250; message="2.0.0 Ok"\r\n\r\nokHTTP/1.1 200 smuggled\r\n\r\n'
        )
        keep_alive(conn)

    peer = peers(long, keep_alive)
    relay = relays(peer.url(), idle_timeout=WAIT)
    assert is_(relay.attempt(message(), 0), ("250", "2.0.0"))
    # What followed the body is never read as the next response.
    assert is_(relay.attempt(message(), 0), QUEUED)
    assert len(peer.requests) == 2


def test_unasked_bytes_while_idle_cost_the_connection(peers: Any, relays: Any) -> None:
    first_done = gevent.event.Event()
    sent = gevent.event.Event()

    def chatty(conn: PeerConnection) -> None:
        conn.read_request()
        conn.accept()
        first_done.wait(WAIT)
        conn.send(b'HTTP/1.1 204 No Content\r\nX-Smtp-Reply: 250; message="2.0.0 Fake"\r\n\r\n')
        sent.set()
        keep_alive(conn)

    peer = peers(chatty, keep_alive)
    relay = relays(peer.url(), idle_timeout=WAIT)
    assert is_(relay.attempt(message(), 0), QUEUED)
    first_done.set()
    assert sent.wait(WAIT)
    reply = relay.attempt(message(), 0)
    assert is_(reply, QUEUED) and "Fake" not in str(reply)
    assert peer.connections == 2 and len(peer.requests) == 2


def test_http_10_response_closes(peers: Any, relays: Any) -> None:
    def old(conn: PeerConnection) -> None:
        conn.read_request()
        conn.send(b'HTTP/1.0 200 OK\r\nX-Smtp-Reply: 250; message="2.0.0 Ok"\r\n\r\nbody')

    peer = peers(old)
    relay = relays(peer.url(), idle_timeout=WAIT)
    for _ in range(2):
        assert is_(relay.attempt(message(), 0), ("250", "2.0.0"))
    assert peer.connections == 2


def test_chunked_response_keeps_the_connection(peers: Any, relays: Any) -> None:
    def chunked(conn: PeerConnection) -> None:
        while conn.read_request() is not None:
            conn.send(
                b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n"
                b'X-Smtp-Reply: 421; message="4.3.2 Later"\r\n\r\n'
                b"5\r\nhello\r\n0\r\n\r\n"
            )

    peer = peers(chunked)
    relay = relays(peer.url(), idle_timeout=WAIT)
    for _ in range(2):
        with pytest.raises(SmtpTransientRelayError) as info:
            relay.attempt(message(), 0)
        assert is_(info.value.reply, ("421", "4.3.2"))
    assert peer.connections == 1


def test_early_answer_while_sending_is_read(peers: Any, relays: Any) -> None:
    def refuse_size(conn: PeerConnection) -> None:
        while b"\r\n\r\n" not in conn.buf:
            conn._fill()
        conn.send(
            b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 0\r\n"
            b'X-Smtp-Reply: 552; message="5.3.4 Message exceeded size limit"\r\n\r\n'
        )
        # Closed with most of the body unread: a reset, as the client sends.

    peer = peers(refuse_size, rcvbuf=4096)
    env = Envelope("sender@example.com", ["rcpt@example.com"])
    env.parse(b"Subject: big\r\n\r\n" + b"x" * 8_000_000)
    relay = relays(peer.url(), idle_timeout=WAIT)
    for _ in range(2):
        with pytest.raises(SmtpPermanentRelayError) as info:
            relay.attempt(env, 0)
        assert is_(info.value.reply, ("552", "5.3.4"))
    assert peer.connections == 2


def test_hangs_before_answering(peers: Any, relays: Any) -> None:
    def hang(conn: PeerConnection) -> None:
        conn.read_request()
        conn.wait_eof()

    peer = peers(hang)
    with pytest.raises(TransientRelayError) as info:
        relays(peer.url(), timeout=1.0).attempt(message(), 0)
    assert is_(info.value.reply, TIMED_OUT)
    assert str(info.value) == f"Connection to 127.0.0.1:{peer.port} timed out after 1 s"
    assert peer.done.get(timeout=WAIT) == 0  # the client hung up


def test_trickles_the_response(peers: Any, relays: Any) -> None:
    def trickle(conn: PeerConnection) -> None:
        conn.read_request()
        for byte in b"HTTP/1.1 204 No Content\r\n" * 100:
            conn.send(bytes([byte]))
            gevent.sleep(0.01)

    peer = peers(trickle)
    with pytest.raises(TransientRelayError) as info:
        relays(peer.url(), timeout=0.3).attempt(message(), 0)
    assert is_(info.value.reply, TIMED_OUT)


def test_kill_mid_request_fails_the_attempt(peers: Any, relays: Any) -> None:
    def hang(conn: PeerConnection) -> None:
        conn.read_request()
        conn.wait_eof()

    peer = peers(hang)
    relay = relays(peer.url(), timeout=None)
    attempt = gevent.spawn(relay.attempt, message(), 0)
    peer.arrived.get(timeout=WAIT)
    relay.kill()
    with pytest.raises(TransientRelayError) as info:
        attempt.get(timeout=WAIT)
    assert is_(info.value.reply, INTERRUPTED)


def test_bad_ehlo_fails_before_sending(
    peers: Any, relays: Any, caplog: pytest.LogCaptureFixture
) -> None:
    peer = peers(keep_alive)
    with pytest.raises(ValueError), caplog.at_level(logging.ERROR, logger="slimta.relay.http"):
        relays(peer.url(), ehlo_as="two words").attempt(message(), 0)
    assert "exception:ValueError:unhandled" in caplog.text
    assert peer.requests == []


# ------------------------------------------------------------------------ TLS
@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


def context_for(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def test_tls_delivery_and_reuse(
    servers: Any, relays: Any, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    server = servers(context=server_context)
    relay = relays(server.url("https"), context=client_context, idle_timeout=WAIT)
    for _ in range(2):
        assert is_(relay.attempt(message(), 0), QUEUED)
    assert server.connections == 1
    assert server.app.requests[0]["wsgi.url_scheme"] == "https"
    relay.kill()
    server.closed.get(timeout=WAIT)


def test_tls_checks_the_host_name(
    servers: Any, relays: Any, tls_ca: trustme.CA, client_context: ssl.SSLContext
) -> None:
    server = servers(context=context_for(tls_ca, "other.test"))
    with pytest.raises(TransientRelayError) as info:
        relays(server.url("https"), context=client_context).attempt(message(), 0)
    assert is_(info.value.reply, TLS_FAILED)
    text = str(info.value)
    assert text.startswith(f"TLS negotiation with 127.0.0.1:{server.port} failed: ")
    assert "match" in text or "mismatch" in text
    assert server.app.requests == []


def test_tls_untrusted_certificate(
    servers: Any, relays: Any, other_ca: trustme.CA, client_context: ssl.SSLContext
) -> None:
    server = servers(context=context_for(other_ca, "127.0.0.1"))
    with pytest.raises(TransientRelayError) as info:
        relays(server.url("https"), context=client_context).attempt(message(), 0)
    assert is_(info.value.reply, TLS_FAILED)
    assert "certificate verify failed" in str(info.value)


def test_tls_default_context_verifies(
    servers: Any, relays: Any, server_context: ssl.SSLContext
) -> None:
    server = servers(context=server_context)
    with pytest.raises(TransientRelayError) as info:
        relays(server.url("https")).attempt(message(), 0)
    assert is_(info.value.reply, TLS_FAILED)
    assert server.app.requests == []


def test_tls_to_a_plain_server(server: Server, relays: Any, client_context: ssl.SSLContext) -> None:
    with pytest.raises(TransientRelayError) as info:
        relays(server.url("https"), context=client_context).attempt(message(), 0)
    assert is_(info.value.reply, TLS_FAILED)


def test_tls_close_sends_close_notify(
    peers: Any, relays: Any, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    ends: gevent.queue.Queue[str] = gevent.queue.Queue()

    def serve(conn: PeerConnection) -> None:
        try:
            keep_alive(conn)
        except ssl.SSLEOFError:
            ends.put("EOF without close_notify")
        else:
            ends.put("close_notify")

    # Without suppress_ragged_eofs, EOF before close_notify raises.
    peer = peers(serve, context=server_context, suppress_ragged_eofs=False)
    relay = relays(peer.url("https"), context=client_context, idle_timeout=0.05)
    assert is_(relay.attempt(message(), 0), QUEUED)
    assert ends.get(timeout=WAIT) == "close_notify"


def test_kill_while_closing_tls_closes_the_socket(
    peers: Any, relays: Any, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    closing = gevent.event.Event()
    release = gevent.event.Event()
    after: gevent.queue.Queue[bytes | str] = gevent.queue.Queue()

    def mute(conn: PeerConnection) -> None:
        keep_alive(conn)
        closing.set()  # the client's close_notify came; not answered yet
        release.wait(WAIT)
        plain = conn.sock.unwrap()  # type: ignore[attr-defined]
        try:
            with gevent.Timeout(WAIT):
                after.put(plain.recv(1))
        except gevent.Timeout:
            after.put("still open")

    peer = peers(mute, context=server_context)
    relay = relays(peer.url("https"), context=client_context, idle_timeout=0.05)
    assert is_(relay.attempt(message(), 0), QUEUED)
    assert closing.wait(WAIT)
    (client,) = relay.pool
    relay.kill()  # while the client waits for the server's close_notify
    assert client.dead
    release.set()
    assert after.get(timeout=2 * WAIT) == b""


@pytest.mark.filterwarnings("error::ResourceWarning")
def test_tls_handshake_timeout_closes_the_socket(peers: Any, relays: Any) -> None:
    def silent(conn: PeerConnection) -> None:
        conn.wait_eof()  # a TCP server that never says a word of TLS

    # Garbage left by earlier tests is collected first, so that the check
    # below sees only this test's sockets.
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous_hook
    peer = peers(silent)
    relay = relays(peer.url("https"), timeout=0.5)
    with pytest.raises(TransientRelayError) as info:
        relay.attempt(message(), 0)
    assert is_(info.value.reply, TIMED_OUT)
    assert peer.done.get(timeout=WAIT) == 0
    gc.collect()  # an unclosed socket would warn now


def test_tls_peer_closing_keep_alive_is_retried(
    peers: Any, relays: Any, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    def first(conn: PeerConnection) -> None:
        conn.read_request()
        conn.accept()
        conn.read_request()

    peer = peers(first, keep_alive, context=server_context)
    relay = relays(peer.url("https"), context=client_context, idle_timeout=WAIT)
    assert is_(relay.attempt(message(), 0), QUEUED)
    assert is_(relay.attempt(message(), 0), QUEUED)
    assert peer.connections == 2 and len(peer.requests) == 3


# ---------------------------------------------------------------------- queue
class Bounces:
    def __init__(self) -> None:
        self.made: gevent.queue.Queue[tuple[Envelope, Reply]] = gevent.queue.Queue()

    def __call__(self, envelope: Envelope, reply: Reply) -> None:
        self.made.put((envelope, reply))
        return None


class RemovingStorage(DictStorage):
    """DictStorage announcing each message it removes (delivered or bounced)."""

    def __init__(self) -> None:
        super().__init__()
        self.removed: gevent.queue.Queue[str] = gevent.queue.Queue()

    def remove(self, id: str) -> None:
        super().remove(id)
        self.removed.put(id)


def test_through_a_queue(server: Server, relays: Any) -> None:
    relay = relays(server.url(), idle_timeout=WAIT)
    storage = RemovingStorage()
    bounces = Bounces()
    queue = Queue(storage, relay, bounce_factory=bounces)
    queue.start()
    try:
        results = queue.enqueue(message(rcpts=["a@example.com", "b@example.com"]))
        id = results[0][1]
        assert isinstance(id, str)
        assert storage.removed.get(timeout=WAIT) == id
        request = server.app.arrived.get(timeout=WAIT)
        assert (
            request["HTTP_X_ENVELOPE_RECIPIENT"] == f"{b64('a@example.com')},{b64('b@example.com')}"
        )

        # Refused for good: bounced with the server's reply.
        server.app.answer = (
            "500 Internal Server Error",
            [("X-Smtp-Reply", '550; message="5.1.1 No such user"')],
            b"",
        )
        queue.enqueue(message(rcpts=["gone@example.com"]))
        envelope, reply = bounces.made.get(timeout=WAIT)
        assert envelope.recipients == ["gone@example.com"]
        assert is_(reply, NO_SUCH_USER)
    finally:
        queue.kill(block=True, timeout=WAIT)
        queue.relay_pool.join(timeout=WAIT)
