"""PROXY protocol mix-ins on a real SmtpEdge over 127.0.0.1 sockets.

The header and the first SMTP commands go out in one ``sendall``, as a
proxy forwarding a fast client would send them: the mix-in must read the
header alone and leave the commands to the session. Connections without a
valid header are closed before the banner, and the edge never sees them.

(``conftest.py`` of this directory monkey-patches with gevent first.)
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest

from slimta.edge import EdgeServer
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.logging import parseline
from slimta.smtp import reply as named_replies
from slimta.util.proxyproto import ProxyProtocol, ProxyProtocolV1, ProxyProtocolV2

pytestmark = pytest.mark.timeout(15)

IO_TIMEOUT = 5.0
HOSTNAME = "mx.test"
LOGGER = "slimta.util.proxyproto"

BANNER = ("220", None)
SENDER_OK = ("250", "2.1.0")
RECIPIENT_OK = ("250", "2.1.5")
START_DATA = ("354", None)
QUEUED = ("250", "2.6.0")
BYE = ("221", "2.0.0")
#: Only the code: the session's text for unknown verbs is not pinned here.
UNKNOWN_COMMAND = (named_replies.unknown_command.code, None)

SIGNATURE = bytes.fromhex("0d0a0d0a000d0a515549540a")
V1_TCP4 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::25 40000 25\r\n"
MESSAGE = b"From: a@example.test\r\nSubject: proxied\r\n\r\nbody\r\n"
OPENING = b"EHLO client.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"


def v2_header(command: int, family: int, block: bytes, tlvs: bytes = b"") -> bytes:
    payload = block + tlvs
    return SIGNATURE + bytes([0x20 | command, family]) + struct.pack(">H", len(payload)) + payload


def v2_inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    return (
        socket.inet_pton(family, src)
        + socket.inet_pton(family, dst)
        + struct.pack(">HH", sport, dport)
    )


V2_TCP4 = v2_header(0x1, 0x11, v2_inet("192.0.2.7", "198.51.100.2", 41000, 25), b"\x04\x00\x02ok")
V2_TCP6 = v2_header(0x1, 0x21, v2_inet("2001:db8::7", "2001:db8::25", 41001, 25))
V2_LOCAL = v2_header(0x0, 0x00, b"")


# ------------------------------------------------------------------ edges


class BannerValidators(SmtpValidators):
    """Records the address every banner hook is given."""

    seen: list[Any] = []

    def handle_banner(self, reply: Any, address: Any) -> None:
        self.seen.append(address)


class RecordingEdge(SmtpEdge):
    """The wrapped edge: records the address each ``handle`` call receives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handled: list[Any] = []
        self.errors: list[BaseException] = []
        #: Set whenever the outermost ``handle`` returns, however it ends.
        self.done = gevent.event.Event()

    def handle(self, socket: Any, address: Any) -> None:
        self.handled.append(address)
        super().handle(socket, address)


class Watched:
    """Outermost in the bases: records exceptions escaping the whole handle."""

    errors: list[BaseException]
    done: gevent.event.Event

    def handle(self, sock: Any, addr: Any) -> None:
        try:
            super().handle(sock, addr)  # type: ignore[misc]
        except gevent.GreenletExit:
            raise
        except BaseException as exc:
            self.errors.append(exc)
            raise
        finally:
            self.done.set()


class V1Edge(Watched, ProxyProtocolV1, RecordingEdge):
    pass


class V2Edge(Watched, ProxyProtocolV2, RecordingEdge):
    pass


class AnyEdge(Watched, ProxyProtocol, RecordingEdge):
    pass


class QuickV1Edge(V1Edge):
    proxyproto_timeout = 0.5


class QuickV2Edge(V2Edge):
    proxyproto_timeout = 0.5


class QuickAnyEdge(AnyEdge):
    proxyproto_timeout = 0.5


class AddressEchoEdge(EdgeServer):
    """A minimal edge that writes the address it was given and returns."""

    def handle(self, socket: Any, address: Any) -> None:
        socket.sendall(repr(address).encode() + b"\r\n")


class EchoV1Edge(ProxyProtocolV1, AddressEchoEdge):
    pass


class RecordingQueue:
    """``enqueue(envelope) -> [(envelope, 'id')]``, keeping the envelopes."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    def enqueue(self, envelope: Any) -> list[tuple[Any, Any]]:
        self.envelopes.append(envelope)
        return [(envelope, "id")]


@pytest.fixture
def start() -> Iterator[Callable[..., tuple[Any, int, RecordingQueue]]]:
    """Factory: ``start(edge_class, **kwargs) -> (edge, port, queue)``."""
    edges: list[Any] = []

    def factory(cls: type, **kwargs: Any) -> tuple[Any, int, RecordingQueue]:
        queue = RecordingQueue()
        if issubclass(cls, SmtpEdge):
            kwargs.setdefault("hostname", HOSTNAME)
        edge = cls(("127.0.0.1", 0), queue, **kwargs)
        edge.server.init_socket()
        edge.start()
        edges.append(edge)
        return edge, edge.server.server_port, queue

    yield factory
    errors: list[BaseException] = []
    for edge in edges:
        edge.kill()
        errors.extend(getattr(edge, "errors", []))
    assert not errors, f"handle raised: {errors!r}"


class Client:
    """A raw-socket client that reads CRLF-terminated replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> tuple[str, str]:
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError(f"closed; unparsed {self.buf!r}")
                self.buf += data
            line, _, self.buf = self.buf.partition(b"\r\n")
            text = line.decode("utf-8")
            lines.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                return text[:3], "\n".join(lines)

    def expect(self, named: tuple[str, str | None]) -> str:
        code, text = self.read_reply()
        want_code, want_esc = named
        assert code == want_code, f"expected {named}, got {code} {text!r}"
        if want_esc is not None:
            assert text.startswith(want_esc + " "), f"expected {named}, got {code} {text!r}"
        return text

    def closed_without_reply(self) -> bool:
        """True when the server closed without sending a byte (orderly FIN)."""
        return self.sock.recv(4096) == b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def connect() -> Iterator[Callable[[int], Client]]:
    clients: list[Client] = []

    def factory(port: int) -> Client:
        client = Client(port)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


@pytest.fixture
def pplog(caplog: pytest.LogCaptureFixture) -> Callable[[], list[tuple[str, dict[str, Any]]]]:
    """``pplog() -> [(operation, data), ...]`` logged by the mix-ins so far."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    def lines() -> list[tuple[str, dict[str, Any]]]:
        found = []
        for record in caplog.records:
            if record.name == LOGGER:
                _, _, operation, data = parseline(record.getMessage())
                found.append((operation, data))
        return found

    return lines


@pytest.fixture(autouse=True)
def _fresh_banner_log() -> None:
    BannerValidators.seen = []


def complete_transaction(client: Client, header: bytes) -> None:
    """Send *header* and the opening commands at once, then finish the message."""
    client.send(header + OPENING)
    client.expect(BANNER)
    code, _ = client.read_reply()
    assert code == "250"
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)
    client.send(MESSAGE + b".\r\nQUIT\r\n")
    client.expect(QUEUED)
    client.expect(BYE)


# ---------------------------------------------------------------- success


@pytest.mark.parametrize(
    ("cls", "header", "source"),
    [
        (V1Edge, V1_TCP4, ("192.0.2.1", 56324)),
        (V1Edge, V1_TCP6, ("2001:db8::1", 40000)),
        (V2Edge, V2_TCP4, ("192.0.2.7", 41000)),
        (V2Edge, V2_TCP6, ("2001:db8::7", 41001)),
        (AnyEdge, V1_TCP4, ("192.0.2.1", 56324)),
        (AnyEdge, V2_TCP6, ("2001:db8::7", 41001)),
    ],
)
def test_header_gives_the_client_address(start, connect, pplog, cls, header, source):
    edge, port, queue = start(cls, validator_class=BannerValidators)
    client = connect(port)
    complete_transaction(client, header)
    assert edge.handled == [source]
    assert BannerValidators.seen == [source]
    [envelope] = queue.envelopes
    assert envelope.client["ip"] == source[0]
    assert envelope.sender == "a@example.test"
    assert envelope.recipients == ["b@example.test"]
    assert ("ppsuccess", {"src_addr": source}) in pplog()


@pytest.mark.parametrize(
    ("cls", "header"),
    [(V1Edge, b"PROXY UNKNOWN\r\n"), (AnyEdge, b"PROXY UNKNOWN whatever\r\n")],
)
def test_unknown_uses_the_real_peer(start, connect, cls, header):
    edge, port, queue = start(cls)
    client = connect(port)
    complete_transaction(client, header)
    [address] = edge.handled
    assert address == client.sock.getsockname()
    assert queue.envelopes[0].client["ip"] == "127.0.0.1"


def test_v2_unspec_uses_the_real_peer(start, connect):
    edge, port, queue = start(V2Edge)
    client = connect(port)
    complete_transaction(client, v2_header(0x1, 0x00, b""))
    assert edge.handled == [client.sock.getsockname()]
    assert queue.envelopes[0].client["ip"] == "127.0.0.1"


def test_header_sent_in_pieces(start, connect):
    edge, port, _ = start(AnyEdge)
    client = connect(port)
    for index in range(0, len(V1_TCP4), 7):
        client.send(V1_TCP4[index : index + 7])
    client.send(b"EHLO client.test\r\n")
    client.expect(BANNER)
    assert client.read_reply()[0] == "250"
    assert edge.handled == [("192.0.2.1", 56324)]


def test_mixin_on_a_plain_edge_server(start, connect):
    _, port, _ = start(EchoV1Edge)
    client = connect(port)
    client.send(V1_TCP6)
    assert client.sock.recv(4096) == b"('2001:db8::1', 40000)\r\n"


# ------------------------------------------------------------------ refusals


def assert_refused(edge: Any, client: Client, queue: RecordingQueue) -> None:
    assert client.closed_without_reply()
    assert edge.done.wait(IO_TIMEOUT)
    assert edge.handled == []
    assert queue.envelopes == []


@pytest.mark.parametrize(
    ("cls", "data"),
    [
        (V1Edge, b"PROXY TCP4 192.0.2.1 198.51.100.2 056324 25\r\n"),
        (V1Edge, b"PROXY TCP4 192.0.2.1  198.51.100.2 56324 25\r\n"),
        (V1Edge, b"PROXY TCP6 192.0.2.1 198.51.100.2 56324 25\r\n"),
        (V1Edge, b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\n"),
        (V1Edge, b"PROXY UNKNOWN " + b"x" * 120 + b"\r\n"),
        (V1Edge, V2_TCP4),
        (V2Edge, V2_TCP4[:12] + b"\x11" + V2_TCP4[13:]),
        (V2Edge, v2_header(0x1, 0x11, b"\x00" * 11)),
        (V2Edge, v2_header(0x1, 0x12, v2_inet("192.0.2.7", "198.51.100.2", 1, 25))),
        (V2Edge, V1_TCP4),
        (AnyEdge, b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 65536\r\n"),
        (AnyEdge, V2_TCP4[:12] + b"\x31" + V2_TCP4[13:]),
    ],
)
def test_malformed_header_closes_before_the_banner(start, connect, pplog, cls, data):
    edge, port, queue = start(cls)
    client = connect(port)
    client.send(data + OPENING + MESSAGE + b".\r\n")
    assert_refused(edge, client, queue)
    assert [op for op, _ in pplog()].count("ppinvalid") == 1


@pytest.mark.parametrize("cls", [V1Edge, V2Edge, AnyEdge])
def test_no_header_closes_before_the_banner(start, connect, pplog, cls):
    edge, port, queue = start(cls)
    client = connect(port)
    client.send(b"EHLO x\r\n")
    assert_refused(edge, client, queue)
    [(_, data)] = [line for line in pplog() if line[0] == "ppinvalid"]
    assert "does not start with a PROXY" in data["message"]


@pytest.mark.parametrize(
    ("cls", "partial"),
    [
        (QuickV1Edge, b""),
        (QuickV2Edge, b""),
        (QuickAnyEdge, b""),
        (QuickV1Edge, V1_TCP4[:20]),
        (QuickV2Edge, V2_TCP4[:20]),
        (QuickAnyEdge, V2_TCP4[:10]),
    ],
)
def test_timeout_closes_before_the_banner(start, connect, pplog, cls, partial):
    edge, port, queue = start(cls)
    client = connect(port)
    if partial:
        client.send(partial)
    assert_refused(edge, client, queue)
    [(_, data)] = [line for line in pplog() if line[0] == "ppinvalid"]
    assert "within 0.5 seconds" in data["message"]


@pytest.mark.parametrize(
    ("cls", "partial"),
    [(V1Edge, V1_TCP4[:-1]), (V2Edge, V2_TCP4[:-1]), (AnyEdge, b""), (V1Edge, b"")],
)
def test_eof_inside_the_header_closes(start, connect, pplog, cls, partial):
    edge, port, queue = start(cls)
    client = connect(port)
    client.send(partial)
    client.sock.shutdown(socket.SHUT_WR)
    assert_refused(edge, client, queue)
    [(_, data)] = [line for line in pplog() if line[0] == "ppinvalid"]
    assert "closed" in data["message"]


@pytest.mark.parametrize("cls", [V2Edge, AnyEdge])
def test_v2_local_closes_without_the_edge(start, connect, pplog, cls):
    edge, port, queue = start(cls)
    client = connect(port)
    client.send(V2_LOCAL)
    assert_refused(edge, client, queue)
    operations = [op for op, _ in pplog()]
    assert "pplocal" in operations
    assert "ppinvalid" not in operations


def test_plain_edge_treats_a_proxy_line_as_a_command(start, connect):
    _, port, queue = start(SmtpEdge, validator_class=BannerValidators)
    client = connect(port)
    client.send(V1_TCP4)
    client.expect(BANNER)
    client.expect(UNKNOWN_COMMAND)
    assert BannerValidators.seen == [client.sock.getsockname()]
    client.send(b"QUIT\r\n")
    client.expect(BYE)
    assert queue.envelopes == []


def test_header_comes_before_implicit_tls(start, server_context, client_context):
    # The proxy writes the header in clear text, then relays the TLS stream.
    edge, port, _ = start(V2Edge, context=server_context, tls_immediately=True)
    raw_sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    try:
        raw_sock.sendall(V2_TCP4)
        tls_sock = client_context.wrap_socket(raw_sock, server_hostname=HOSTNAME)
        banner = tls_sock.recv(4096)
        assert banner.startswith(b"220 ")
        tls_sock.sendall(b"QUIT\r\n")
        assert tls_sock.recv(4096).startswith(b"221 ")
    finally:
        raw_sock.close()
    assert edge.handled == [("192.0.2.7", 41000)]
