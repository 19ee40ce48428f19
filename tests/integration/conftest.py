"""Fixtures for integration tests: a real SmtpEdge on 127.0.0.1 and raw clients.

gevent must patch the stdlib before anything imports :mod:`socket` or
:mod:`ssl`; pytest imports this file before the test modules of this
directory, so the patching happens here, first.

``os``, ``signal`` and ``subprocess`` are left alone: the edge does not need
them, and the whole test tree runs in one process. Patched, gevent (>= 25.8.1)
defers ``os.close`` of a pipe to its event loop, so unit tests that wait for a
child's pipe to reach EOF with a blocking ``select`` hang
(``tests/unit/test_util_system.py``).
"""

from gevent import monkey

monkey.patch_all(os=False, signal=False, subprocess=False)

import contextlib  # noqa: E402
import re  # noqa: E402
import smtplib  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.queue  # noqa: E402
import pytest  # noqa: E402
import trustme  # noqa: E402

from slimta.edge.smtp import SmtpEdge  # noqa: E402
from slimta.queue import QueueError  # noqa: E402
from slimta.smtp.io import IO  # noqa: E402
from slimta.smtp.server import Server  # noqa: E402

#: Seconds any single client read may block before the test fails.
IO_TIMEOUT = 5.0
#: Name the edges give themselves (greeting, ``Envelope.receiver``).
HOSTNAME = "mx.test"


def _check_patched() -> None:
    # Fail loudly if something imported socket before the patching above.
    if not monkey.is_module_patched("socket") or not monkey.is_module_patched("ssl"):
        raise RuntimeError("gevent monkey patching did not happen before socket/ssl import")


_check_patched()


def reply_is(reply: tuple[Any, Any], named: tuple[str, str | None]) -> bool:
    """True when *reply* (raw ``(code, text)`` or smtplib ``(int, bytes)``) is
    the *named* ``(code, enhanced status code)``; ``None`` means "no code"."""
    code, text = reply
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    want_code, want_esc = named
    if str(code) != want_code:
        return False
    first = text.split("\n", 1)[0]
    if want_esc is None:
        return not re.match(r"[245]\.\d{1,3}\.\d{1,3} ", first)
    return first == want_esc or first.startswith(want_esc + " ")


class FakeQueueError(QueueError):
    """What a queue returns for a message it refused: a ``QueueError``.

    :param reply: the :class:`~slimta.smtp.reply.Reply` the edge should send,
        or ``None`` for a generic failure.
    """

    def __init__(self, reply: Any = None) -> None:
        super().__init__("queue refused the message", reply)


class RecordingQueue:
    """A queue that records envelopes; may be told to fail.

    Set :attr:`error` to an object returned instead of an id (an exception,
    possibly with a ``.reply``), or :attr:`exception` to an exception that
    :meth:`enqueue` raises. :attr:`event` is set on every call.
    """

    def __init__(self) -> None:
        self.envelopes: list[Any] = []
        self.calls = 0
        self.error: Any = None
        self.exception: BaseException | None = None
        self.event = gevent.event.Event()

    def enqueue(self, envelope: Any) -> list[tuple[Any, Any]]:
        self.calls += 1
        self.event.set()
        if self.exception is not None:
            raise self.exception
        if self.error is not None:
            return [(envelope, self.error)]
        self.envelopes.append(envelope)
        return [(envelope, f"queue-id-{len(self.envelopes)}")]

    def fail_with(self, reply: Any = None) -> None:
        """Return a queue error (with *reply* as its ``.reply``) instead of an id."""
        self.error = FakeQueueError(reply)

    def wait(self, timeout: float = IO_TIMEOUT) -> bool:
        """Wait until :meth:`enqueue` was called at least once."""
        return self.event.wait(timeout)


class RecordingSmtpEdge(SmtpEdge):
    """An SmtpEdge whose tests can see sessions end and park.

    :attr:`session_ended` is set each time the edge closes a client
    connection (an idle session may park and resume in another greenlet, so
    the end of :meth:`handle` is not the end of a session). :attr:`parks`
    receives the :class:`Server` of each session that parks.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Set whenever the edge closes a session's connection.
        self.session_ended = gevent.event.Event()
        self.sessions_ended = 0
        #: One item per parking: wait for them with ``parks.get(timeout=...)``.
        self.parks: gevent.queue.Queue[Server] = gevent.queue.Queue()

    def _closed_one(self) -> None:
        self.sessions_ended += 1
        self.session_ended.set()


class RawClient:
    """A blocking (cooperative) raw-socket SMTP client for tests."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=HOSTNAME)
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(f"connection closed; unparsed {self.buf!r}")
        self.buf += data

    def read_line(self) -> bytes:
        """One CRLF-terminated line, without its CRLF."""
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def read_reply(self) -> tuple[str, str]:
        """One (possibly multi-line) reply: ``(code, text)``, lines joined with LF.

        A leading empty line (the timeout reply's ``newline_first``) is skipped.
        """
        lines: list[str] = []
        while True:
            line = self.read_line()
            if not line and not lines:
                continue
            text = line.decode("utf-8")
            lines.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                return text[:3], "\n".join(lines)

    def read_replies(self, count: int) -> list[tuple[str, str]]:
        return [self.read_reply() for _ in range(count)]

    def expect(self, named: tuple[str, str | None]) -> str:
        """Read one reply, assert it is the *named* ``(code, esc)``; return its text."""
        code, text = self.read_reply()
        assert reply_is((code, text), named), f"expected {named}, got {code} {text!r}"
        return text

    def command(self, line: bytes | str) -> tuple[str, str]:
        """Send one command line (CRLF added) and read its reply."""
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.read_reply()

    def greet(self, ehlo: str = "client.test") -> tuple[str, str]:
        """Read the banner, send EHLO, return the EHLO reply."""
        code, _ = self.read_reply()
        assert code == "220"
        return self.command(f"EHLO {ehlo}")

    def at_eof(self) -> bool:
        """True when the server closed the connection (nothing more to read)."""
        if self.buf:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture(autouse=True)
def _no_ptr_lookups(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Edges skip PTR lookups, except in the PTR tests: elsewhere they would
    query the machine's resolver, whose speed is not the tests' business."""
    if not request.module.__name__.endswith("test_ptrlookup"):
        monkeypatch.setattr(SmtpEdge, "ptr_lookup", False)


@pytest.fixture
def make_edge(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., tuple[RecordingSmtpEdge, int, RecordingQueue]]]:
    """Factory: ``make_edge(**SmtpEdge kwargs) -> (edge, port, queue)``.

    The edge listens on 127.0.0.1 with an ephemeral port and a
    :class:`RecordingQueue`. Any greenlet (session or not) that dies of an
    exception fails the test at teardown, and so does an edge that cannot be
    killed. Teardown kills every edge.
    """
    edges: dict[int, RecordingSmtpEdge] = {}
    errors: list[BaseException] = []

    hub = gevent.get_hub()
    report_error = hub.handle_error

    def record_error(context: Any, kind: Any, value: Any, tb: Any) -> None:
        errors.append(value if value is not None else kind)
        report_error(context, kind, value, tb)

    monkeypatch.setattr(hub, "handle_error", record_error, raising=False)

    io_close = IO.close

    def close_and_record(io: IO) -> None:
        try:
            port = io.socket.getsockname()[1]
        except (OSError, ValueError):
            port = None
        try:
            io_close(io)
        finally:
            for edge_port, edge in edges.items():
                if port is None or port == edge_port:
                    edge._closed_one()

    monkeypatch.setattr(IO, "close", close_and_record)

    server_park = Server.park

    def park_and_record(server: Server, on_wake: Callable[[], None]) -> None:
        server_park(server, on_wake)
        port = server.io.socket.getsockname()[1]
        if port in edges:
            edges[port].parks.put(server)

    monkeypatch.setattr(Server, "park", park_and_record)

    def factory(**kwargs: Any) -> tuple[RecordingSmtpEdge, int, RecordingQueue]:
        queue = kwargs.pop("queue", None)
        if queue is None:
            queue = RecordingQueue()
        kwargs.setdefault("hostname", HOSTNAME)
        edge = RecordingSmtpEdge(("127.0.0.1", 0), queue, **kwargs)
        edge.server.init_socket()  # bind now, so the port is known
        edge.start()
        port = edge.server.server_port
        edges[port] = edge
        return edge, port, queue

    yield factory
    for edge in edges.values():
        with gevent.Timeout(10, AssertionError("edge.kill() did not return")):
            edge.kill()
    assert not errors, f"greenlets died of unexpected exceptions: {errors!r}"


@pytest.fixture
def edge(
    make_edge: Callable[..., tuple[RecordingSmtpEdge, int, RecordingQueue]],
) -> tuple[RecordingSmtpEdge, int, RecordingQueue]:
    """A default SmtpEdge (no limits, no TLS): ``(edge, port, queue)``."""
    return make_edge()


@pytest.fixture
def raw() -> Iterator[Callable[..., RawClient]]:
    """Factory: ``raw(port, context=None) -> RawClient``; closed at teardown."""
    clients: list[RawClient] = []

    def factory(port: int, context: ssl.SSLContext | None = None) -> RawClient:
        client = RawClient(port, context)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


@pytest.fixture
def smtp() -> Iterator[Callable[..., smtplib.SMTP]]:
    """Factory: ``smtp(port) -> smtplib.SMTP`` connected to 127.0.0.1."""
    clients: list[smtplib.SMTP] = []

    def factory(port: int, cls: type[smtplib.SMTP] = smtplib.SMTP, **kwargs: Any) -> smtplib.SMTP:
        client = cls("127.0.0.1", port, timeout=IO_TIMEOUT, **kwargs)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        with contextlib.suppress(OSError):
            client.close()


@pytest.fixture(name="reply_is")
def reply_is_fixture() -> Callable[[tuple[Any, Any], tuple[str, str | None]], bool]:
    """The :func:`reply_is` helper, for assertions on smtplib replies."""
    return reply_is


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """Server context with a certificate for ``mx.test`` and ``127.0.0.1``."""
    cert = tls_ca.issue_cert(HOSTNAME, "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def client_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """Client context trusting the test CA (hostname checks on)."""
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    return ctx
