"""slimta.smtp.client.Client against a real SmtpEdge on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import pytest

from slimta.edge.smtp import SmtpValidators
from slimta.smtp import ConnectionLost
from slimta.smtp.client import Client, LmtpClient
from slimta.smtp.reply import Reply

pytestmark = pytest.mark.timeout(20)

BANNER = ("220", None)
OK = ("250", "2.0.0")
QUEUED = ("250", "2.6.0")
SENDER_OK = ("250", "2.1.0")
RECIPIENT_OK = ("250", "2.1.5")
START_INPUT = ("354", None)
TLS_READY = ("220", "2.0.0")
TLS_FAILED = ("421", "4.7.0")
UTF8_REQUIRED = ("553", "5.6.7")
BYE = ("221", "2.0.0")


def is_(reply: Reply, named: tuple[str, str | None]) -> bool:
    return reply.code == named[0] and reply.enhanced_status_code == named[1]


@pytest.fixture
def connect() -> Any:
    clients: list[Client] = []

    def factory(port: int, cls: type[Client] = Client) -> Client:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        client = cls(sock, ("127.0.0.1", port))
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.io.close()


def test_plain_session_pipelined(edge: Any, connect: Callable[..., Client]) -> None:
    _, port, queue = edge
    client = connect(port)
    assert is_(client.get_banner(), BANNER)
    ehlo = client.ehlo("client.test")
    assert ehlo.code == "250" and "\n" not in (ehlo.message or "")
    assert "PIPELINING" in client.extensions and "8BITMIME" in client.extensions
    mail = client.mailfrom("sender@example.com")
    rcpt = client.rcptto("rcpt@example.com")
    assert not mail and not rcpt  # pipelined: not read yet
    assert len(client.reply_queue) == 2
    assert is_(client.data(), START_INPUT)
    assert is_(mail, SENDER_OK) and is_(rcpt, RECIPIENT_OK)
    assert mail.command == b"MAIL" and rcpt.address == ("127.0.0.1", port)
    reply = client.send_data(b"Subject: hi\r\n\r\n", b".dot\nbare lf\n.\nend")
    assert is_(reply, QUEUED)
    assert is_(client.quit(), BYE)
    assert queue.wait()
    envelope = queue.envelopes[0]
    assert envelope.sender == "sender@example.com"
    assert envelope.recipients == ["rcpt@example.com"]
    assert envelope.message == b".dot\r\nbare lf\r\n.\r\nend\r\n"


def test_helo_and_rset(edge: Any, connect: Callable[..., Client]) -> None:
    _, port, _ = edge
    client = connect(port)
    client.get_banner()
    assert client.helo(b"client.test").code == "250"
    assert len(client.extensions) == 0
    assert is_(client.mailfrom("a@example.com"), SENDER_OK)  # no pipelining
    assert client.rset().code == "250"
    assert client.custom_command(b"NOOP").code == "250"
    assert not client.has_reply_waiting()


def test_send_empty_data_and_bdat(edge: Any, connect: Callable[..., Client]) -> None:
    _, port, queue = edge
    client = connect(port)
    client.get_banner()
    client.ehlo("client.test")
    client.mailfrom("a@example.com")
    client.rcptto("b@example.com")
    assert is_(client.data(), START_INPUT)
    assert client.send_empty_data().code == "250"
    client.mailfrom("a@example.com", body="BINARYMIME")
    client.rcptto("b@example.com")
    reply = client.send_bdat(b"Subject: b\r\n\r\n", b"x\x00y\nz", binary=True, chunk_size=5)
    assert reply.code == "250", reply
    assert queue.envelopes[-1].message == b"x\x00y\nz"


def test_non_ascii_without_smtputf8_is_refused_locally(
    edge: Any, connect: Callable[..., Client]
) -> None:
    _, port, _ = edge
    client = connect(port)
    client.get_banner()
    client.helo("client.test")  # no extensions: no SMTPUTF8
    reply = client.mailfrom("δοκιμή@example.com")
    assert is_(reply, UTF8_REQUIRED) and client.last_error is reply
    assert is_(client.rcptto("δ@example.com"), UTF8_REQUIRED)
    assert client.custom_command(b"NOOP").code == "250"  # nothing else was sent


def test_smtputf8_when_advertised(edge: Any, connect: Callable[..., Client]) -> None:
    _, port, queue = edge
    client = connect(port)
    client.get_banner()
    client.ehlo("client.test")
    client.mailfrom("δοκιμή@example.com")
    client.rcptto("ü@example.com")
    assert is_(client.data(), START_INPUT)
    assert client.send_data(b"Subject: u\r\n\r\nhi\r\n").code == "250"
    assert queue.envelopes[0].sender == "δοκιμή@example.com"


def test_starttls_then_mail(
    make_edge: Any,
    connect: Callable[..., Client],
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    _, port, queue = make_edge(context=server_context)
    client = connect(port)
    client.get_banner()
    client.ehlo("client.test")
    assert "STARTTLS" in client.extensions
    assert is_(client.starttls(client_context), TLS_READY)
    assert client.io.encrypted and len(client.extensions) == 0
    client.ehlo("client.test")
    assert "STARTTLS" not in client.extensions
    client.mailfrom("a@example.com")
    client.rcptto("b@example.com")
    assert is_(client.data(), START_INPUT)
    assert is_(client.send_data(b"Subject: s\r\n\r\nsecure\r\n"), QUEUED)
    assert queue.envelopes[0].message == b"secure\r\n"


# AUTH (Client.auth, relay credentials): tests/integration/test_client_auth.py


def test_starttls_handshake_failure_closes(
    make_edge: Any, connect: Callable[..., Client], server_context: ssl.SSLContext
) -> None:
    _, port, queue = make_edge(context=server_context)
    client = connect(port)
    client.get_banner()
    client.ehlo("client.test")
    # The default context does not trust the test CA.
    reply = client.starttls(ssl.create_default_context())
    assert is_(reply, TLS_FAILED) and reply.command == b"STARTTLS"
    assert not client.io.encrypted
    with pytest.raises(OSError):
        client.ehlo("client.test")
    assert not queue.envelopes


def test_lmtp_client_has_no_ehlo(edge: Any, connect: Callable[..., Client]) -> None:
    _, port, _ = edge
    client = connect(port, LmtpClient)
    with pytest.raises(NotImplementedError):
        client.ehlo("x")
    with pytest.raises(NotImplementedError):
        client.helo("x")


@pytest.fixture
def mute_server() -> Any:
    """A listener that accepts connections and never reads or writes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted: list[socket.socket] = []

    def accept() -> int:
        return listener.getsockname()[1]

    yield accept, accepted, listener
    for conn in accepted:
        conn.close()
    listener.close()


def test_deadline_bounds_a_read(mute_server: Any, connect: Callable[..., Client]) -> None:
    port_of, accepted, listener = mute_server
    client = connect(port_of())
    accepted.append(listener.accept()[0])
    client.deadline = time.monotonic() + 0.3
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        client.get_banner()
    assert 0.2 < time.monotonic() - start < 3


def test_deadline_bounds_a_write(mute_server: Any, connect: Callable[..., Client]) -> None:
    port_of, accepted, listener = mute_server
    client = connect(port_of())
    accepted.append(listener.accept()[0])
    client.deadline = time.monotonic() + 0.3
    # Far more than the socket buffers take while the server reads nothing.
    body = (b"x" * 70 + b"\r\n") * ((64 << 20) // 72)
    with pytest.raises(TimeoutError) as info:
        client.send_data(b"Subject: big\r\n\r\n", body)
    assert any(entry.name == "_send_now" for entry in info.traceback)


def test_deadline_passed_raises_at_once(mute_server: Any, connect: Callable[..., Client]) -> None:
    port_of, accepted, listener = mute_server
    client = connect(port_of())
    accepted.append(listener.accept()[0])
    client.deadline = time.monotonic() - 1
    with pytest.raises(TimeoutError):
        client.get_banner()


class _CloseOnMail(SmtpValidators):
    def handle_mail(self, reply: Reply, sender: str, params: dict[bytes, Any]) -> None:
        reply.code = "421"
        reply.message = "4.3.2 Going away"


def test_command_after_421_is_connection_lost(make_edge: Any, connect: Any) -> None:
    # The server closes after a 421: the core refuses to send more, and the
    # caller meets ConnectionLost as it would on the closed socket.
    _, port, queue = make_edge(validator_class=_CloseOnMail)
    client = connect(port)
    client.get_banner()
    client.ehlo("client.test")
    mail = client.mailfrom("a@example.com")
    client.flush_pipeline()
    assert mail.code == "421" and client.last_error is mail
    with pytest.raises(ConnectionLost):
        client.rset()
    with pytest.raises(ConnectionLost):
        client.quit()
    assert queue.calls == 0
