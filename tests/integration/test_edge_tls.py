"""TLS on a real SmtpEdge: STARTTLS (RFC 3207), its injection bug, implicit TLS."""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl

import gevent
import pytest

from slimta.edge.smtp import SmtpValidators

pytestmark = pytest.mark.timeout(20)

# Named replies: (code, enhanced status code or None for "no code").
BANNER = ("220", None)
EHLO_OK = ("250", None)
TLS_READY = ("220", "2.0.0")
SENDER_OK = ("250", "2.1.0")
SHUTTING_DOWN = ("421", "4.3.2")
BYE = ("221", "2.0.0")
NEED_HELLO = ("503", "5.5.1")

MESSAGE = b"From: a@example.test\r\nSubject: secret\r\n\r\nbody\r\n"


class TlsRecorder(SmtpValidators):
    seen: list = []

    def handle_tls(self):
        self.seen.append(("tls", self.session.security))

    def handle_mail(self, reply, sender, params):
        self.seen.append(("mail", self.session.security, self.session.protocol))


@pytest.fixture
def tls_recorder():
    class Recorder(TlsRecorder):
        seen = []

    return Recorder


def test_starttls_advertised_only_with_context(make_edge, smtp, server_context):
    _, plain_port, _ = make_edge()
    _, tls_port, _ = make_edge(context=server_context)
    plain = smtp(plain_port)
    plain.ehlo("client.test")
    assert not plain.has_extn("starttls")
    secure = smtp(tls_port)
    secure.ehlo("client.test")
    assert secure.has_extn("starttls")


def test_starttls_then_sendmail(
    make_edge, smtp, reply_is, server_context, client_context, tls_recorder
):
    _, port, queue = make_edge(context=server_context, validator_class=tls_recorder)
    client = smtp(port, local_hostname="client.test")
    client.ehlo()
    assert reply_is(client.starttls(context=client_context), TLS_READY)
    assert isinstance(client.sock, ssl.SSLSocket)
    client.ehlo()
    # RFC 3207 4.2: STARTTLS is not offered again once TLS is active.
    assert not client.has_extn("starttls")
    assert client.has_extn("pipelining")
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    [envelope] = queue.envelopes
    assert envelope.client["protocol"] == "ESMTPS"
    assert envelope.client["name"] == "client.test"
    assert envelope.headers["Subject"] == "secret"
    assert tls_recorder.seen == [("tls", "TLS"), ("mail", "TLS", "ESMTPS")]


def test_starttls_twice_refused(make_edge, raw, server_context, client_context):
    _, port, _ = make_edge(context=server_context)
    client = raw(port)
    client.greet()
    client.send(b"STARTTLS\r\n")
    client.expect(TLS_READY)
    client.sock = client_context.wrap_socket(client.sock, server_hostname="mx.test")
    code, _ = client.command("EHLO client.test")
    assert code == "250"
    code, _ = client.command("STARTTLS")
    assert code.startswith("5")


def test_starttls_command_injection_is_discarded(make_edge, raw, server_context, client_context):
    # CVE-2011-0411: plaintext pipelined after STARTTLS must not run under TLS.
    _, port, queue = make_edge(context=server_context)
    client = raw(port)
    client.expect(BANNER)
    client.send(b"EHLO x\r\nSTARTTLS\r\nRSET\r\nMAIL FROM:<a@b.test>\r\n")
    client.expect(EHLO_OK)
    client.expect(TLS_READY)
    assert client.buf == b""
    client.sock = client_context.wrap_socket(client.sock, server_hostname="mx.test")
    # Had the injected RSET/MAIL run, MAIL would now be nested (or its reply
    # would be waiting); instead the server wants a fresh EHLO.
    client.send(b"MAIL FROM:<a@b.test>\r\n")
    client.expect(NEED_HELLO)
    code, _ = client.command("EHLO x")
    assert code == "250"
    client.send(b"MAIL FROM:<a@b.test>\r\n")
    client.expect(SENDER_OK)
    assert queue.calls == 0


def test_starttls_forgets_the_earlier_greeting_and_transaction(
    make_edge, raw, server_context, client_context
):
    _, port, _ = make_edge(context=server_context)
    client = raw(port)
    client.greet()
    client.send(b"STARTTLS\r\n")
    client.expect(TLS_READY)
    client.sock = client_context.wrap_socket(client.sock, server_hostname="mx.test")
    client.send(b"RCPT TO:<c@d.test>\r\n")
    code, _ = client.read_reply()
    assert code == "503"


def test_tls_immediately(make_edge, smtp, server_context, client_context, tls_recorder):
    _, port, queue = make_edge(
        context=server_context, tls_immediately=True, validator_class=tls_recorder
    )
    client = smtp(port, cls=smtplib.SMTP_SSL, context=client_context, local_hostname="c.test")
    client.ehlo()
    assert not client.has_extn("starttls")
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    [envelope] = queue.envelopes
    assert envelope.client["protocol"] == "ESMTPS"
    assert tls_recorder.seen[0] == ("tls", "TLS")


def _connect_and_close(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.close()


def _garbage_handshake(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"EHLO this is not TLS\r\n" * 10)
    with contextlib.suppress(OSError):
        sock.recv(4096)
    sock.close()


def _half_handshake(port):
    # A real ClientHello, then the client walks away mid-handshake.
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="mx.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(outgoing.read())
    sock.recv(1)  # the server has answered: the handshake is under way
    sock.close()


def _untrusting_client(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    with pytest.raises(ssl.SSLError):
        ssl.create_default_context().wrap_socket(sock, server_hostname="mx.test")
    sock.close()


@pytest.mark.parametrize(
    "bad_client",
    [_connect_and_close, _garbage_handshake, _half_handshake, _untrusting_client],
    ids=lambda f: f.__name__[1:],
)
def test_failed_implicit_tls_does_not_hurt_the_server(
    make_edge, smtp, server_context, client_context, bad_client
):
    edge, port, queue = make_edge(context=server_context, tls_immediately=True)
    bad_client(port)
    assert edge.session_ended.wait(5)
    assert queue.calls == 0
    client = smtp(port, cls=smtplib.SMTP_SSL, context=client_context)
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    assert len(queue.envelopes) == 1


def test_failed_starttls_handshake_does_not_hurt_the_server(
    make_edge, raw, smtp, server_context, client_context
):
    edge, port, queue = make_edge(context=server_context)
    client = raw(port)
    client.greet()
    client.send(b"STARTTLS\r\n")
    client.expect(TLS_READY)
    client.send(b"this is not a TLS record\r\n" * 10)
    assert edge.session_ended.wait(5)
    client.close()
    good = smtp(port)
    good.starttls(context=client_context)
    assert good.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    assert len(queue.envelopes) == 1


def test_stop_reaches_tls_sessions(make_edge, raw, server_context, client_context):
    edge, port, _ = make_edge(context=server_context, tls_immediately=True)
    client = raw(port, context=client_context)
    client.greet()
    stopper = gevent.spawn(edge.stop, 0.2)
    client.expect(SHUTTING_DOWN)
    client.close()
    stopper.join(timeout=10)
    assert stopper.successful()


def test_quit_over_tls_ends_the_session(make_edge, raw, server_context, client_context):
    # After 221 the server closes the channel (RFC 5321 4.1.1.10), even if the
    # client never answers the TLS close_notify and leaves the TCP link open.
    edge, port, _ = make_edge(context=server_context, tls_immediately=True)
    client = raw(port, context=client_context)
    client.greet()
    client.send(b"QUIT\r\n")
    client.expect(BYE)
    assert client.at_eof()
    assert edge.session_ended.wait(5), "the session is still open after QUIT"
