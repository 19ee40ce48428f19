"""StaticSmtpRelay and Client against aiosmtpd, an independent SMTP server.

aiosmtpd runs in a child process (``aiosmtpd_server.py`` says why) and
records each message it accepts, byte for byte, before it answers; so once
the relay has its reply, the record is there to read.
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.encoders
import email.policy
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent.select
import pytest
import trustme

from slimta.envelope import Envelope
from slimta.relay.smtp import SmtpPermanentRelayError, SmtpTransientRelayError
from slimta.relay.smtp.static import StaticSmtpRelay
from slimta.smtp._client import normalize_line_endings
from slimta.smtp.client import Client
from slimta.smtp.reply import Reply

pytest.importorskip("aiosmtpd")

pytestmark = pytest.mark.timeout(30)

SERVER_SCRIPT = Path(__file__).with_name("aiosmtpd_server.py")
#: Seconds the child may take to start listening.
START_TIMEOUT = 15.0

# Named replies: (code, enhanced status code).
QUEUED = ("250", "2.0.0")
NO_SUCH_USER = ("550", "5.1.1")
MAILBOX_FULL = ("452", "4.2.2")
MESSAGE_REFUSED = ("554", "5.6.0")
TRY_LATER = ("451", "4.3.0")
UTF8_REQUIRED = ("553", "5.6.7")
CONVERSION_NOT_ALLOWED = ("554", "5.6.3")
TLS_FAILED = ("421", "4.7.0")
AUTH_OK = ("235", "2.7.0")
AUTH_INVALID = ("535", "5.7.8")
AUTH_TEMPFAIL = ("454", "4.7.0")
NOT_ADVERTISED = ("504", "5.5.4")
ENCRYPTION_REQUIRED = ("538", "5.7.11")

USERS = {"user": "secret", "ünï": "pässwörd"}

#: Lines that start with dots, bare CR and LF, and no final line break.
TRICKY_BODY = b".leading dot\n..two dots\r\n.\r\nbare\rcr and bare\nlf\n.\n...end"


def is_(reply: Reply | None, named: tuple[str, str]) -> bool:
    assert reply is not None
    return reply.code == named[0] and reply.enhanced_status_code == named[1]


def on_the_wire(*parts: bytes) -> bytes:
    """What a server should read for message *parts*, once unstuffed."""
    data = normalize_line_endings(b"".join(parts))
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def message(
    sender: str = "sender@example.com",
    rcpts: list[str] | None = None,
    body: bytes = b"hello\n.\nworld\r\n",
    headers: bytes = b"Subject: test\r\nFrom: sender@example.com\r\n",
) -> Envelope:
    env = Envelope(sender, rcpts or ["rcpt@example.com"])
    env.parse(headers + b"\r\n" + body)
    return env


class Aiosmtpd:
    """One running aiosmtpd child and what it recorded."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, spool: Path) -> None:
        self.proc = proc
        self.port = port
        self.spool = spool

    def messages(self) -> list[dict[str, Any]]:
        """Every accepted message, oldest first; ``content`` as bytes."""
        out = []
        for path in sorted(self.spool.glob("*.json")):
            record = json.loads(path.read_text())
            record["content"] = base64.b64decode(record["content"])
            out.append(record)
        return out

    def auth_commands(self) -> list[str]:
        """The mechanism of every AUTH command received."""
        log = self.spool / "auth.log"
        return log.read_text().split() if log.exists() else []

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def server_pem(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Key and chain for ``127.0.0.1``, as aiosmtpd loads them."""
    path = tmp_path_factory.mktemp("aiosmtpd-tls") / "server.pem"
    tls_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def aiosmtpd(tmp_path: Path) -> Iterator[Callable[..., Aiosmtpd]]:
    """Factory: ``aiosmtpd(**options) -> Aiosmtpd`` (options: see the script)."""
    servers: list[Aiosmtpd] = []

    def start(**options: Any) -> Aiosmtpd:
        spool = tmp_path / f"spool{len(servers)}"
        spool.mkdir()
        stderr = open(tmp_path / f"stderr{len(servers)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), json.dumps({"spool": str(spool), **options})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        stderr.close()
        assert proc.stdout is not None
        # A cooperative wait (select is gevent's here) with a deadline.
        readable, _, _ = gevent.select.select([proc.stdout], [], [], START_TIMEOUT)
        line = proc.stdout.readline() if readable else b""
        if not line.strip().isdigit():
            proc.kill()
            proc.wait(5)
            log = (tmp_path / f"stderr{len(servers)}.log").read_text(errors="replace")
            pytest.fail(f"aiosmtpd did not start: {line!r}\n{log}")
        server = Aiosmtpd(proc, int(line), spool)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def relays() -> Iterator[Callable[..., StaticSmtpRelay]]:
    made: list[StaticSmtpRelay] = []

    def factory(port: int, **kw: Any) -> StaticSmtpRelay:
        kw.setdefault("connect_timeout", 5.0)
        kw.setdefault("command_timeout", 5.0)
        kw.setdefault("ehlo_as", "relay.test")
        relay = StaticSmtpRelay("127.0.0.1", port, **kw)
        made.append(relay)
        return relay

    yield factory
    for relay in made:
        relay.kill()


@pytest.fixture
def connect() -> Iterator[Callable[[int], Client]]:
    clients: list[Client] = []

    def factory(port: int) -> Client:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        client = Client(sock, ("127.0.0.1", port))
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.io.close()


# ------------------------------------------------------------------ delivery
def test_single_recipient_byte_for_byte(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd()
    env = message(body=TRICKY_BODY)
    header, body = env.flatten()
    results = relays(server.port).attempt(env, 0)
    assert list(results) == ["rcpt@example.com"]
    assert is_(results["rcpt@example.com"], QUEUED)
    [got] = server.messages()
    assert got["mail_from"] == "sender@example.com"
    assert got["rcpt_tos"] == ["rcpt@example.com"]
    assert got["helo"] == "relay.test"
    assert got["content"] == on_the_wire(header, body)
    assert got["content"].endswith(b"\r\n.\r\nbare\r\ncr and bare\r\nlf\r\n.\r\n...end\r\n")
    assert not got["tls"] and got["auth"] is None


def test_multiple_recipients_one_transaction(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd()
    rcpts = ["a@example.com", "b@example.com", "c@example.org"]
    results = relays(server.port).attempt(message(rcpts=rcpts), 0)
    assert list(results) == rcpts
    assert all(is_(reply, QUEUED) for reply in results.values())
    [got] = server.messages()
    assert got["rcpt_tos"] == rcpts


def test_rejected_recipient_is_partial_delivery(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd()
    rcpts = ["good@example.com", "bad@example.com", "full@example.com", "also@example.com"]
    results = relays(server.port).attempt(message(rcpts=rcpts), 0)
    assert is_(results["good@example.com"], QUEUED) and is_(results["also@example.com"], QUEUED)
    bad = results["bad@example.com"]
    assert isinstance(bad, SmtpPermanentRelayError) and is_(bad.reply, NO_SUCH_USER)
    assert bad.reply.command == b"RCPT"
    full = results["full@example.com"]
    assert isinstance(full, SmtpTransientRelayError) and is_(full.reply, MAILBOX_FULL)
    [got] = server.messages()
    assert got["rcpt_tos"] == ["good@example.com", "also@example.com"]


def test_all_recipients_rejected(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd()
    relay = relays(server.port, idle_timeout=5.0)
    with pytest.raises(SmtpPermanentRelayError) as info:
        relay.attempt(message(rcpts=["bad1@example.com", "bad2@example.com"]), 0)
    assert is_(info.value.reply, NO_SUCH_USER) and info.value.reply.command == b"RCPT"
    # The connection is still good for the next message.
    assert is_(relay.attempt(message(), 0)["rcpt@example.com"], QUEUED)
    assert [m["connection"] for m in server.messages()] == [1]


@pytest.mark.parametrize(
    ("sender", "error", "named"),
    [
        ("reject@example.com", SmtpPermanentRelayError, MESSAGE_REFUSED),
        ("defer@example.com", SmtpTransientRelayError, TRY_LATER),
    ],
)
def test_error_after_data(
    aiosmtpd: Any, relays: Any, sender: str, error: type[Exception], named: tuple[str, str]
) -> None:
    server = aiosmtpd()
    relay = relays(server.port, idle_timeout=5.0)
    with pytest.raises(error) as info:
        relay.attempt(message(sender=sender), 0)
    reply = info.value.reply  # type: ignore[attr-defined]
    assert is_(reply, named) and reply.command == b"[SEND_DATA]"
    assert server.messages() == []
    # RSET went out and the same connection delivers the next message.
    assert is_(relay.attempt(message(), 0)["rcpt@example.com"], QUEUED)
    assert [m["connection"] for m in server.messages()] == [1]


# ------------------------------------------------------------ 8-bit, UTF-8
EIGHT_BIT_BODY = "Grüße aus Köln\n.ünïcödé line\n".encode()
EIGHT_BIT_HEADERS = b"Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n"


def test_8bit_with_8bitmime(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd()  # decode_data=False advertises 8BITMIME
    env = message(body=EIGHT_BIT_BODY, headers=EIGHT_BIT_HEADERS)
    header, body = env.flatten()
    assert is_(relays(server.port).attempt(env, 0)["rcpt@example.com"], QUEUED)
    [got] = server.messages()
    assert "BODY=8BITMIME" in got["mail_options"]
    assert got["content"] == on_the_wire(header, body)


def test_8bit_without_8bitmime_is_encoded(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd(decode_data=True)  # no 8BITMIME; refuses non-ASCII data
    env = message(body=EIGHT_BIT_BODY, headers=EIGHT_BIT_HEADERS)
    relay = relays(server.port, binary_encoder=email.encoders.encode_base64)
    assert is_(relay.attempt(env, 0)["rcpt@example.com"], QUEUED)
    [got] = server.messages()
    assert not any(opt.upper().startswith("BODY=") for opt in got["mail_options"])
    assert got["content"].isascii()
    parsed = email.message_from_bytes(got["content"], policy=email.policy.SMTP)
    assert parsed["Content-Transfer-Encoding"] == "base64"
    # base64 carries the original bytes, bare line feeds included.
    assert parsed.get_payload(decode=True) == EIGHT_BIT_BODY


def test_8bit_without_8bitmime_nor_encoder_is_refused(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd(decode_data=True)
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(server.port).attempt(message(body=EIGHT_BIT_BODY, headers=EIGHT_BIT_HEADERS), 0)
    assert is_(info.value.reply, CONVERSION_NOT_ALLOWED)
    assert server.messages() == []


def test_smtputf8_when_enabled(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd(smtputf8=True)
    env = message(
        sender="δοκιμή@παράδειγμα.δοκιμή",
        rcpts=["ünï@example.com", "ascii@example.com"],
        headers="Subject: ünï\r\nFrom: δοκιμή@παράδειγμα.δοκιμή\r\n".encode(),
        body=EIGHT_BIT_BODY,
    )
    header, body = env.flatten()
    results = relays(server.port).attempt(env, 0)
    assert all(is_(reply, QUEUED) for reply in results.values())
    [got] = server.messages()
    assert got["smtp_utf8"] and "SMTPUTF8" in got["mail_options"]
    assert got["mail_from"] == "δοκιμή@παράδειγμα.δοκιμή"
    assert got["rcpt_tos"] == ["ünï@example.com", "ascii@example.com"]
    assert got["content"] == on_the_wire(header, body)


def test_utf8_address_without_smtputf8_is_refused_locally(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd()
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(server.port).attempt(message(rcpts=["ünï@example.com"]), 0)
    assert is_(info.value.reply, UTF8_REQUIRED)
    assert server.messages() == []


# ----------------------------------------------------------------------- TLS
def test_starttls(
    aiosmtpd: Any, relays: Any, server_pem: str, client_context: ssl.SSLContext
) -> None:
    server = aiosmtpd(cert=server_pem)
    env = message(body=TRICKY_BODY)
    header, body = env.flatten()
    relay = relays(server.port, context=client_context, tls_required=True)
    assert is_(relay.attempt(env, 0)["rcpt@example.com"], QUEUED)
    [got] = server.messages()
    assert got["tls"] and got["content"] == on_the_wire(header, body)


def test_starttls_untrusted_certificate_is_transient(
    aiosmtpd: Any, relays: Any, server_pem: str
) -> None:
    server = aiosmtpd(cert=server_pem)
    # The default context does not trust the test CA: never go on in plaintext.
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(server.port, context=ssl.create_default_context()).attempt(message(), 0)
    assert is_(info.value.reply, TLS_FAILED)
    assert server.messages() == []


def test_tls_required_without_starttls(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd()  # answers STARTTLS with 454 4.7.0 (RFC 3207 4)
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(server.port, tls_required=True).attempt(message(), 0)
    assert info.value.reply.code == "454" and info.value.reply.command == b"STARTTLS"
    assert server.messages() == []


# ---------------------------------------------------------------------- AUTH
@pytest.mark.parametrize(
    ("credentials", "mechanism"),
    [
        (("user", "secret"), "PLAIN"),
        (("user", "secret", None, "LOGIN"), "LOGIN"),
        (lambda: ("ünï", "pässwörd"), "PLAIN"),
    ],
)
def test_auth_over_starttls(
    aiosmtpd: Any,
    relays: Any,
    server_pem: str,
    client_context: ssl.SSLContext,
    credentials: Any,
    mechanism: str,
) -> None:
    server = aiosmtpd(cert=server_pem, users=USERS)
    relay = relays(server.port, context=client_context, credentials=credentials)
    assert is_(relay.attempt(message(), 0)["rcpt@example.com"], QUEUED)
    [got] = server.messages()
    assert got["tls"] and got["auth"] in USERS
    assert server.auth_commands() == [mechanism]


@pytest.mark.parametrize(
    ("credentials", "error", "named"),
    [
        (("user", "wrong"), SmtpPermanentRelayError, AUTH_INVALID),
        (("nobody", "secret", None, "LOGIN"), SmtpPermanentRelayError, AUTH_INVALID),
        (("tempfail", "x"), SmtpTransientRelayError, AUTH_TEMPFAIL),
    ],
)
def test_auth_failure_is_relay_error(
    aiosmtpd: Any,
    relays: Any,
    server_pem: str,
    client_context: ssl.SSLContext,
    credentials: Any,
    error: type[Exception],
    named: tuple[str, str],
) -> None:
    server = aiosmtpd(cert=server_pem, users=USERS)
    relay = relays(server.port, context=client_context, credentials=credentials)
    with pytest.raises(error) as info:
        relay.attempt(message(), 0)
    reply = info.value.reply  # type: ignore[attr-defined]
    assert is_(reply, named) and reply.command == b"AUTH"
    assert server.messages() == []


def test_auth_cram_md5_in_cleartext(aiosmtpd: Any, relays: Any) -> None:
    # Advertised: CRAM-MD5 LOGIN PLAIN, no STARTTLS. Only CRAM-MD5 may be used.
    server = aiosmtpd(users=USERS, cram_md5=True, auth_require_tls=False)
    relay = relays(server.port, credentials=("user", "secret"))
    assert is_(relay.attempt(message(), 0)["rcpt@example.com"], QUEUED)
    [got] = server.messages()
    assert not got["tls"] and got["auth"] == "user"
    assert server.auth_commands() == ["CRAM-MD5"]
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(server.port, credentials=("user", "wrong")).attempt(message(), 0)
    assert is_(info.value.reply, AUTH_INVALID)


def test_auth_cleartext_mechanisms_refused_without_tls(aiosmtpd: Any, relays: Any) -> None:
    # aiosmtpd offers PLAIN and LOGIN in plaintext; the secret must not go out.
    server = aiosmtpd(users=USERS, auth_require_tls=False)
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(server.port, credentials=("user", "secret")).attempt(message(), 0)
    assert is_(info.value.reply, NOT_ADVERTISED) and info.value.reply.command == b"AUTH"
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(server.port, credentials=("user", "secret", None, b"PLAIN")).attempt(message(), 0)
    assert is_(info.value.reply, ENCRYPTION_REQUIRED)
    assert server.auth_commands() == [] and server.messages() == []


def test_client_auth_against_aiosmtpd(
    aiosmtpd: Any, connect: Any, server_pem: str, client_context: ssl.SSLContext
) -> None:
    server = aiosmtpd(cert=server_pem, users=USERS, cram_md5=True)
    client = connect(server.port)
    client.get_banner()
    client.ehlo("client.test")
    assert "AUTH" not in client.extensions  # aiosmtpd: only after STARTTLS
    assert is_(client.auth("user", "secret"), NOT_ADVERTISED)
    assert client.starttls(client_context).code == "220"
    client.ehlo("client.test")
    assert client.extensions.getparam("AUTH") == "CRAM-MD5 LOGIN PLAIN"
    assert is_(client.auth("user", "wrong", mechanism="LOGIN"), AUTH_INVALID)
    assert is_(client.auth("user", "wrong", mechanism="CRAM-MD5"), AUTH_INVALID)
    assert is_(client.auth("ünï", "pässwörd"), AUTH_OK)
    assert server.auth_commands() == ["LOGIN", "CRAM-MD5", "PLAIN"]


# ---------------------------------------------------------------- pooling
def test_idle_connection_is_reused(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd()
    relay = relays(server.port, pool_size=1, idle_timeout=10.0)
    for n in range(3):
        env = message(rcpts=[f"r{n}@example.com"])
        assert is_(relay.attempt(env, 0)[f"r{n}@example.com"], QUEUED)
    got = server.messages()
    assert [m["rcpt_tos"] for m in got] == [
        ["r0@example.com"],
        ["r1@example.com"],
        ["r2@example.com"],
    ]
    assert {m["connection"] for m in got} == {1}
    assert len({tuple(m["peer"]) for m in got}) == 1


def test_without_idle_timeout_each_message_connects(aiosmtpd: Any, relays: Any) -> None:
    server = aiosmtpd()
    relay = relays(server.port, pool_size=1)
    for _ in range(2):
        assert is_(relay.attempt(message(), 0)["rcpt@example.com"], QUEUED)
    assert [m["connection"] for m in server.messages()] == [1, 2]


# ------------------------------------------------------------- plain Client
def test_client_session(aiosmtpd: Any, connect: Any) -> None:
    server = aiosmtpd(smtputf8=True)
    client = connect(server.port)
    assert client.get_banner().code == "220"
    ehlo = client.ehlo("client.test")
    assert ehlo.code == "250" and ehlo.message == "aiosmtpd.test"
    for keyword in ("SIZE", "8BITMIME", "SMTPUTF8"):
        assert keyword in client.extensions
    assert "PIPELINING" not in client.extensions
    # Without PIPELINING each reply is read at once.
    assert client.mailfrom("a@example.com", data_size=100).code == "250"
    assert client.rcptto("b@example.com").code == "250"
    assert is_(client.rcptto("bad@example.com"), NO_SUCH_USER)
    assert client.data().code == "354"
    parts = (b"Subject: parts\r", b"\n\r\n.one", b"\n.", b"\r\n..\rtwo\n", b".")
    assert is_(client.send_data(*parts), QUEUED)
    assert client.rset().code == "250"
    assert client.custom_command(b"NOOP").code == "250"
    assert client.quit().code == "221"
    [got] = server.messages()
    assert "SIZE=100" in got["mail_options"]
    assert got["rcpt_tos"] == ["b@example.com"]
    assert got["content"] == b"Subject: parts\r\n\r\n.one\r\n.\r\n..\r\ntwo\r\n.\r\n"
