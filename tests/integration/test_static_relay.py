"""StaticSmtpRelay / StaticLmtpRelay against real servers on 127.0.0.1.

Servers: our SmtpEdge, Postfix's smtp-sink (with its failure injection) and
small scripted raw-socket servers for behaviour the others cannot show.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest

from slimta.edge.smtp import SmtpValidators
from slimta.envelope import Envelope
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.smtp import SmtpPermanentRelayError, SmtpTransientRelayError
from slimta.relay.smtp.static import StaticLmtpRelay, StaticSmtpRelay
from slimta.smtp.reply import Reply

pytestmark = pytest.mark.timeout(30)

TIMED_OUT = ("421", "4.4.2")
TLS_FAILED = ("421", "4.7.0")
CLOSED = ("421", "4.3.0")
QUEUED = ("250", "2.6.0")
NO_SUCH_USER = ("550", "5.1.1")
UTF8_REQUIRED = ("553", "5.6.7")

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


def is_(reply: Reply | None, named: tuple[str, str | None]) -> bool:
    assert reply is not None
    return reply.code == named[0] and reply.enhanced_status_code == named[1]


def message(sender: str = "sender@example.com", rcpts: list[str] | None = None) -> Envelope:
    env = Envelope(sender, rcpts or ["rcpt@example.com"])
    env.parse(b"Subject: test\r\nFrom: sender@example.com\r\n\r\nhello\n.\nworld\r\n")
    return env


class CountingValidators(SmtpValidators):
    """Counts connections (banners) and refuses recipients starting with bad."""

    banners = 0
    security: list[str | None] = []

    def handle_banner(self, reply: Reply, address: Any) -> None:
        type(self).banners += 1

    def handle_mail(self, reply: Reply, sender: str, params: Any) -> None:
        type(self).security.append(self.session.security)

    def handle_rcpt(self, reply: Reply, recipient: str, params: Any) -> None:
        if recipient.startswith("bad"):
            reply.code = "550"
            reply.message = "5.1.1 No such user"

    def handle_auth(self, reply: Reply, creds: Any) -> None:
        if not creds.check_secret("secret"):
            reply.code = "535"
            reply.message = "5.7.8 Authentication credentials invalid"


@pytest.fixture
def validators() -> type[CountingValidators]:
    class Fresh(CountingValidators):
        banners = 0
        security: list[str | None] = []

    return Fresh


@pytest.fixture
def relays() -> Iterator[Callable[..., StaticSmtpRelay]]:
    made: list[StaticSmtpRelay] = []

    def factory(port: int, cls: type[StaticSmtpRelay] = StaticSmtpRelay, **kw: Any) -> Any:
        kw.setdefault("connect_timeout", 3.0)
        kw.setdefault("command_timeout", 3.0)
        kw.setdefault("ehlo_as", "relay.test")
        relay = cls("127.0.0.1", port, **kw)
        made.append(relay)
        return relay

    yield factory
    for relay in made:
        relay.kill()


# ------------------------------------------------------------------ SmtpEdge
def test_delivers_to_edge(make_edge: Any, relays: Any, validators: Any) -> None:
    _, port, queue = make_edge(validator_class=validators)
    relay = relays(port)
    results = relay.attempt(message(rcpts=["a@example.com", "b@example.com"]), 0)
    assert set(results) == {"a@example.com", "b@example.com"}
    assert all(is_(r, QUEUED) for r in results.values())
    env = queue.envelopes[0]
    assert env.sender == "sender@example.com"
    assert env.recipients == ["a@example.com", "b@example.com"]
    assert env.message == b"hello\r\n.\r\nworld\r\n"
    assert env.headers["Subject"] == "test"
    assert validators.security == [None]


def test_partial_recipient_failure(make_edge: Any, relays: Any, validators: Any) -> None:
    _, port, queue = make_edge(validator_class=validators)
    results = relays(port).attempt(message(rcpts=["good@example.com", "bad@example.com"]), 0)
    assert is_(results["good@example.com"], QUEUED)
    err = results["bad@example.com"]
    assert isinstance(err, SmtpPermanentRelayError) and is_(err.reply, NO_SUCH_USER)
    assert err.reply.command == b"RCPT"
    assert queue.envelopes[0].recipients == ["good@example.com"]


def test_all_recipients_refused(make_edge: Any, relays: Any, validators: Any) -> None:
    _, port, queue = make_edge(validator_class=validators)
    relay = relays(port, idle_timeout=5.0)
    with pytest.raises(SmtpPermanentRelayError) as info:
        relay.attempt(message(rcpts=["bad1@example.com", "bad2@example.com"]), 0)
    assert is_(info.value.reply, NO_SUCH_USER)
    # RSET was sent and the connection is still usable for the next message.
    assert is_(relay.attempt(message(), 0)["rcpt@example.com"], QUEUED)
    assert validators.banners == 1 and len(queue.envelopes) == 1


def test_connection_reuse(make_edge: Any, relays: Any, validators: Any) -> None:
    _, port, queue = make_edge(validator_class=validators)
    relay = relays(port, idle_timeout=5.0)
    relay.attempt(message(), 0)
    relay.attempt(message(), 0)
    assert len(queue.envelopes) == 2
    assert validators.banners == 1


def test_no_reuse_without_idle_timeout(make_edge: Any, relays: Any, validators: Any) -> None:
    _, port, _ = make_edge(validator_class=validators)
    relay = relays(port)
    relay.attempt(message(), 0)
    relay.attempt(message(), 0)
    assert validators.banners == 2


def test_server_timeout_while_idle_requeues(make_edge: Any, relays: Any, validators: Any) -> None:
    edge, port, queue = make_edge(validator_class=validators, command_timeout=0.3)
    relay = relays(port, idle_timeout=10.0)
    relay.attempt(message(), 0)
    assert edge.session_ended.wait(5)  # the edge said 421 4.4.2 and closed
    results = relay.attempt(message(), 0)
    assert is_(results["rcpt@example.com"], QUEUED)
    assert validators.banners == 2 and len(queue.envelopes) == 2


def test_smtputf8_and_8bit(make_edge: Any, relays: Any) -> None:
    _, port, queue = make_edge()
    env = Envelope("δοκιμή@example.com", ["ü@example.com"])
    env.parse("Subject: x\r\n\r\nGrüße\r\n".encode())
    relays(port).attempt(env, 0)
    assert queue.envelopes[0].sender == "δοκιμή@example.com"
    assert queue.envelopes[0].message == "Grüße\r\n".encode()


def test_binary_content_uses_bdat(make_edge: Any, relays: Any) -> None:
    _, port, queue = make_edge()
    env = Envelope("a@example.com", ["b@example.com"])
    env.parse(b"Subject: bin\r\n\r\nx\x00y\rz")
    relays(port).attempt(env, 0)
    assert queue.envelopes[0].message == b"x\x00y\rz"


def test_opportunistic_starttls(
    make_edge: Any,
    relays: Any,
    validators: Any,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    _, port, _ = make_edge(validator_class=validators, context=server_context)
    relays(port, context=client_context).attempt(message(), 0)
    assert validators.security == ["TLS"]


def test_starttls_handshake_failure_is_transient(
    make_edge: Any, relays: Any, server_context: ssl.SSLContext
) -> None:
    _, port, queue = make_edge(context=server_context)
    relay = relays(port)  # default context: the test CA is not trusted
    with pytest.raises(SmtpTransientRelayError) as info:
        relay.attempt(message(), 0)
    assert is_(info.value.reply, TLS_FAILED) and info.value.reply.command == b"STARTTLS"
    assert not queue.envelopes


def test_reply_timeout_under_tls(
    make_edge: Any,
    relays: Any,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    release = gevent.event.Event()

    class Stalling(SmtpValidators):
        def handle_rcpt(self, reply: Reply, recipient: str, params: Any) -> None:
            release.wait(10)

    _, port, _ = make_edge(validator_class=Stalling, context=server_context)
    start = time.monotonic()
    try:
        with pytest.raises(SmtpTransientRelayError) as info:
            relays(port, context=client_context, command_timeout=0.5).attempt(message(), 0)
    finally:
        release.set()
    assert time.monotonic() - start < 3
    # MAIL, RCPT and DATA went pipelined: their replies are read in the DATA step.
    assert is_(info.value.reply, TIMED_OUT) and info.value.reply.command == b"DATA"


def test_tls_required_without_starttls(make_edge: Any, relays: Any) -> None:
    _, port, queue = make_edge()
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(port, tls_required=True).attempt(message(), 0)
    assert info.value.reply.command == b"STARTTLS"
    assert not queue.envelopes


def test_tls_required_with_starttls(
    make_edge: Any,
    relays: Any,
    validators: Any,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    _, port, _ = make_edge(validator_class=validators, context=server_context)
    relays(port, tls_required=True, context=client_context).attempt(message(), 0)
    assert validators.security == ["TLS"]


def test_tls_immediately(
    make_edge: Any,
    relays: Any,
    validators: Any,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    _, port, _ = make_edge(validator_class=validators, context=server_context, tls_immediately=True)
    relays(port, tls_immediately=True, context=client_context).attempt(message(), 0)
    assert validators.security == ["TLS"]


def test_auth_after_starttls(
    make_edge: Any,
    relays: Any,
    validators: Any,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    _, port, queue = make_edge(validator_class=validators, context=server_context, auth=True)
    relays(port, context=client_context, credentials=("user", "secret")).attempt(message(), 0)
    assert queue.envelopes[0].client["auth"]
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(port, context=client_context, credentials=lambda: ("user", "x")).attempt(
            message(), 0
        )
    assert info.value.reply.code == "535" and info.value.reply.command == b"AUTH"


def test_utf8_to_server_without_smtputf8(relays: Any, scripted: Any) -> None:
    server = scripted(ehlo=b"250 mx.test\r\n")
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(server.port).attempt(Envelope("δ@example.com", ["a@example.com"]), 0)
    assert is_(info.value.reply, UTF8_REQUIRED)
    assert b"MAIL" not in b"".join(server.commands)


# -------------------------------------------------------------- raw servers
class Scripted:
    """A one-connection-at-a-time raw SMTP server driven by a reply table."""

    def __init__(self, **replies: bytes) -> None:
        self.replies = {
            "banner": b"220 mx.test ESMTP\r\n",
            "ehlo": b"250-mx.test\r\n250 PIPELINING\r\n",
            "helo": b"250 mx.test\r\n",
            "mail": b"250 2.1.0 Ok\r\n",
            "rcpt": b"250 2.1.5 Ok\r\n",
            "data": b"354 go\r\n",
            "dot": b"250 2.0.0 Ok\r\n",
            "rset": b"250 2.0.0 Ok\r\n",
            "quit": b"221 2.0.0 Bye\r\n",
        }
        self.replies.update(replies)
        self.commands: list[bytes] = []
        self.connections = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.greenlet = gevent.spawn(self._serve)

    def _serve(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            self.connections += 1
            with contextlib.closing(conn), contextlib.suppress(OSError):
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        file = conn.makefile("rb")
        reply = self.replies["banner"]
        if reply is None or reply == b"":
            file.readline()  # never answer
            return
        conn.sendall(reply)
        in_data = False
        while True:
            line = file.readline()
            if not line:
                return
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    if self.replies["dot"] == b"SILENT":
                        self._silent(file)
                        return
                    conn.sendall(self.replies["dot"])
                continue
            self.commands.append(line)
            verb = line.split()[0].decode().lower() if line.split() else ""
            reply = self.replies.get(verb, b"500 5.5.2 unknown\r\n")
            if reply == b"CLOSE":
                return
            if reply == b"SILENT":
                self._silent(file)
                return
            conn.sendall(reply)
            if verb == "data" and reply.startswith(b"354"):
                in_data = True
            if verb == "quit":
                return

    def _silent(self, file: Any) -> None:
        # Never answer again: read (and record) until the client gives up.
        while line := file.readline():
            self.commands.append(line)

    def close(self) -> None:
        self.greenlet.kill()
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def factory(**replies: bytes) -> Scripted:
        server = Scripted(**replies)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.close()


def test_ehlo_500_falls_back_to_helo(relays: Any, scripted: Any) -> None:
    server = scripted(ehlo=b"500 5.5.1 What?\r\n")
    results = relays(server.port).attempt(message(), 0)
    assert results["rcpt@example.com"].code == "250"
    verbs = [c.split()[0] for c in server.commands]
    assert verbs[:3] == [b"EHLO", b"HELO", b"MAIL"]


def test_ehlo_other_error_is_relay_error(relays: Any, scripted: Any) -> None:
    server = scripted(ehlo=b"554 5.7.1 go away\r\n")
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(server.port).attempt(message(), 0)
    assert info.value.reply.command == b"EHLO"
    assert b"HELO" not in b"".join(server.commands)


def test_error_banner(relays: Any, scripted: Any) -> None:
    server = scripted(banner=b"554 5.3.2 no service\r\n")
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(server.port).attempt(message(), 0)
    assert info.value.reply.command == b"[BANNER]"


def test_close_mid_reply_is_transient(relays: Any, scripted: Any) -> None:
    server = scripted()

    # The server sends half of the EHLO reply, then closes.
    def half_then_close(conn: socket.socket) -> None:
        conn.sendall(b"220 mx.test\r\n")
        conn.makefile("rb").readline()
        conn.sendall(b"250-mx.test\r\n250-PIPEL")

    server._session = half_then_close
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(server.port).attempt(message(), 0)
    assert is_(info.value.reply, CLOSED) and info.value.reply.command == b"EHLO"


def test_data_rejected_after_354(relays: Any, scripted: Any) -> None:
    server = scripted(dot=b"452 4.3.1 out of storage\r\n")
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(server.port).attempt(message(), 0)
    assert info.value.reply.code == "452" and info.value.reply.command == b"[SEND_DATA]"
    assert b"RSET\r\n" in server.commands


def test_banner_timeout(relays: Any, scripted: Any) -> None:
    server = scripted(banner=b"")
    start = time.monotonic()
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(server.port, command_timeout=0.5).attempt(message(), 0)
    assert time.monotonic() - start < 3
    assert is_(info.value.reply, TIMED_OUT) and info.value.reply.command == b"[BANNER]"


@pytest.mark.parametrize(
    ("ehlo", "silent", "step"),
    [
        # Pipelined, the replies to MAIL, RCPT and DATA are read in the DATA step.
        (b"250-mx.test\r\n250 PIPELINING\r\n", "mail", b"DATA"),
        (b"250 mx.test\r\n", "mail", b"MAIL"),
        (b"250 mx.test\r\n", "rcpt", b"RCPT"),
        (b"250 mx.test\r\n", "data", b"DATA"),
    ],
)
def test_command_reply_timeout(
    relays: Any, scripted: Any, ehlo: bytes, silent: str, step: bytes
) -> None:
    server = scripted(ehlo=ehlo, **{silent: b"SILENT"})
    start = time.monotonic()
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(server.port, command_timeout=0.5).attempt(message(), 0)
    assert 0.4 < time.monotonic() - start < 3
    assert is_(info.value.reply, TIMED_OUT) and info.value.reply.command == step


def test_data_reply_timeout_uses_data_timeout(relays: Any, scripted: Any) -> None:
    server = scripted(dot=b"SILENT")
    start = time.monotonic()
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(server.port, command_timeout=5.0, data_timeout=0.5).attempt(message(), 0)
    assert time.monotonic() - start < 3
    assert is_(info.value.reply, TIMED_OUT) and info.value.reply.command == b"[SEND_DATA]"


def test_timeout_ends_the_connection(relays: Any, scripted: Any) -> None:
    # After a timeout the session is unusable: the next message gets a new
    # connection instead of reading the late reply as its own.
    server = scripted(ehlo=b"250 mx.test\r\n", rcpt=b"SILENT")
    relay = relays(server.port, command_timeout=0.3, idle_timeout=5.0)
    with pytest.raises(SmtpTransientRelayError):
        relay.attempt(message(), 0)
    server.replies["rcpt"] = b"250 2.1.5 Ok\r\n"
    assert is_(relay.attempt(message(), 0)["rcpt@example.com"], ("250", "2.0.0"))
    assert server.connections == 2


def test_connect_timeout(relays: Any) -> None:
    # A listener that never accepts, its backlog filled: the next SYN is
    # dropped and connect() would hang.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    try:
        start = time.monotonic()
        with pytest.raises(TransientRelayError) as info:
            relays(port, connect_timeout=0.5).attempt(message(), 0)
        assert time.monotonic() - start < 5
        reply = info.value.reply
        # Either the connect timed out or (rarely) the banner never came.
        assert is_(reply, TIMED_OUT) and reply.command in (b"[CONNECT]", b"[BANNER]")
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_connection_refused(relays: Any) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(port).attempt(message(), 0)
    assert info.value.reply.code == "451" and info.value.reply.command == b"[CONNECT]"
    # The reply names the host and the error, for the log and the bounce.
    assert info.value.reply.message == (
        f"4.3.0 Connection failed: 127.0.0.1:{port}: Connection refused"
    )


def test_lmtp_per_recipient_data_replies(relays: Any, scripted: Any) -> None:
    server = scripted(lhlo=b"250-mx.test\r\n250 PIPELINING\r\n")

    def lmtp_session(conn: socket.socket) -> None:
        file = conn.makefile("rb")
        conn.sendall(b"220 lmtp.test LMTP\r\n")
        rcpts = 0
        while line := file.readline():
            server.commands.append(line)
            verb = line.split()[0].upper()
            if verb == b"LHLO":
                conn.sendall(b"250-lmtp.test\r\n250 PIPELINING\r\n")
            elif verb in (b"MAIL", b"RSET"):
                conn.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == b"RCPT":
                rcpts += 1
                conn.sendall(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go\r\n")
                while file.readline() != b".\r\n":
                    pass
                conn.sendall(b"250 2.0.0 first ok\r\n" + b"452 4.2.2 over quota\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return

    server._session = lmtp_session
    results = relays(server.port, cls=StaticLmtpRelay).attempt(
        message(rcpts=["a@example.com", "b@example.com"]), 0
    )
    assert results["a@example.com"].code == "250"
    err = results["b@example.com"]
    assert isinstance(err, SmtpTransientRelayError) and err.reply.code == "452"
    assert b"RSET\r\n" in server.commands


# ------------------------------------------------------------------ smtp-sink
@pytest.fixture
def smtp_sink() -> Iterator[Callable[..., int]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", *options, f"127.0.0.1:{port}", "100"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        deadline = time.monotonic() + 5
        while True:  # poll until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                gevent.sleep(0.02)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(5)


pytestmark_sink = pytest.mark.skipif(not shutil.which(SMTP_SINK), reason="no smtp-sink")


@pytestmark_sink
def test_sink_delivers(smtp_sink: Any, relays: Any) -> None:
    port = smtp_sink()
    relay = relays(port, idle_timeout=2.0)
    for _ in range(2):
        results = relay.attempt(message(rcpts=["a@example.com", "b@example.com"]), 0)
        assert all(r.code == "250" for r in results.values())


@pytestmark_sink
def test_sink_rcpt_hard_reject(smtp_sink: Any, relays: Any) -> None:
    port = smtp_sink("-f", "RCPT")
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(port).attempt(message(), 0)
    assert info.value.reply.code.startswith("5") and info.value.reply.command == b"RCPT"


@pytestmark_sink
def test_sink_rcpt_soft_reject(smtp_sink: Any, relays: Any) -> None:
    port = smtp_sink("-r", "RCPT")
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(port).attempt(message(), 0)
    assert info.value.reply.code.startswith("4") and info.value.reply.command == b"RCPT"


@pytestmark_sink
def test_sink_data_reject(smtp_sink: Any, relays: Any) -> None:
    port = smtp_sink("-f", "DATA")
    relay = relays(port, idle_timeout=2.0)
    with pytest.raises(PermanentRelayError) as info:
        relay.attempt(message(), 0)
    assert info.value.reply.command == b"DATA"


@pytestmark_sink
def test_sink_end_of_data_soft_reject(smtp_sink: Any, relays: Any) -> None:
    port = smtp_sink("-r", ".")
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(port).attempt(message(), 0)
    assert info.value.reply.command == b"[SEND_DATA]"


@pytestmark_sink
def test_sink_421_disconnect(smtp_sink: Any, relays: Any) -> None:
    port = smtp_sink("-Q", "MAIL")
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(port).attempt(message(), 0)
    assert info.value.reply.code == "421"


@pytestmark_sink
def test_sink_silent_disconnect(smtp_sink: Any, relays: Any) -> None:
    port = smtp_sink("-q", "RCPT")
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(port).attempt(message(), 0)
    assert is_(info.value.reply, CLOSED)


# ------------------------------------------------------------ BDAT for size
def _sent_bdat(caplog: pytest.LogCaptureFixture) -> bool:
    return any("BDAT " in record.getMessage() for record in caplog.records)


def large_message(lines: int) -> Envelope:
    env = Envelope("a@example.com", ["b@example.com"])
    # Lines starting with a dot: BDAT must carry them unstuffed.
    env.parse(b"Subject: big\r\n\r\n" + b".dot line of text\r\n" * lines)
    return env


@pytest.mark.parametrize(("threshold", "bdat"), [(1000, True), (100_000, False), (None, False)])
def test_bdat_for_messages_over_the_threshold(
    make_edge: Any,
    relays: Any,
    caplog: pytest.LogCaptureFixture,
    threshold: int | None,
    bdat: bool,
) -> None:
    caplog.set_level(logging.DEBUG, logger="slimta.smtp.io")
    _, port, queue = make_edge()
    relays(port, bdat_threshold=threshold).attempt(large_message(200), 0)  # 3.8 KB
    assert queue.envelopes[0].message == b".dot line of text\r\n" * 200
    assert _sent_bdat(caplog) is bdat


def test_no_bdat_without_chunking(relays: Any, scripted: Any) -> None:
    # The scripted server advertises PIPELINING only.
    server = scripted()
    relays(server.port, bdat_threshold=10).attempt(large_message(50), 0)
    assert not any(line.startswith(b"BDAT") for line in server.commands)
    assert b"DATA\r\n" in server.commands


def test_8bit_large_message_as_bdat_says_8bitmime(
    make_edge: Any, relays: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="slimta.smtp.io")
    _, port, queue = make_edge()
    env = Envelope("a@example.com", ["b@example.com"])
    env.parse(b"Subject: x\r\n\r\n" + "Grüße aus der Ferne\r\n".encode() * 100)
    relays(port, bdat_threshold=1000).attempt(env, 0)
    assert queue.envelopes[0].message == "Grüße aus der Ferne\r\n".encode() * 100
    assert _sent_bdat(caplog)
    assert any("BODY=8BITMIME" in record.getMessage() for record in caplog.records)
