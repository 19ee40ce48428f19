"""Client AUTH (RFC 4954) through pysasl's client mechanisms.

First :meth:`AuthSession.client_attempt` alone, against scripted replies;
then :meth:`Client.auth` and the relay's ``credentials`` against a real
SmtpEdge with STARTTLS. aiosmtpd, an independent server, is in
``test_relay_aiosmtpd.py``.

The rules: the client only uses a mechanism the server advertised; PLAIN and
LOGIN only once the connection is encrypted, CRAM-MD5 also without; anything
else is refused here, before the secret leaves the process, and the secret
never reaches a log.
"""

from __future__ import annotations

import base64
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from slimta.edge.smtp import SmtpValidators
from slimta.envelope import Envelope
from slimta.relay.smtp import SmtpPermanentRelayError, SmtpTransientRelayError
from slimta.relay.smtp.static import StaticSmtpRelay
from slimta.smtp import RemoteProtocolError
from slimta.smtp.auth import (
    AuthSession,
    InsecureMechanismError,
    InvalidMechanismError,
    client_sasl,
    mask_auth_line,
)
from slimta.smtp.client import Client
from slimta.smtp.io import IO
from slimta.smtp.reply import Reply

pytestmark = pytest.mark.timeout(20)

# Named replies: (code, enhanced status code).
AUTH_OK = ("235", "2.7.0")
AUTH_INVALID = ("535", "5.7.8")
AUTH_TEMPFAIL = ("454", "4.7.0")
AUTH_CANCELED = ("501", "5.7.0")
NOT_ADVERTISED = ("504", "5.5.4")
ENCRYPTION_REQUIRED = ("538", "5.7.11")
TLS_READY = ("220", "2.0.0")
START_INPUT = ("354", None)
QUEUED = ("250", "2.6.0")
OK = ("250", "2.0.0")

#: RFC 2195 2: the example CRAM-MD5 exchange.
RFC2195_CHALLENGE = "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"
RFC2195_RESPONSE = b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"

SECRET = "s3cr3t-pässwörd"


def b64(data: str | bytes) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def is_(reply: Reply, named: tuple[str, str | None]) -> bool:
    return reply.code == named[0] and reply.enhanced_status_code == named[1]


# ----------------------------------------------------- AuthSession, scripted
class Script:
    """An ``exchange`` callable: records each line, answers from a list."""

    def __init__(self, *replies: tuple[str, str]) -> None:
        self.replies = list(replies)
        self.sent: list[bytes] = []

    def __call__(self, line: bytes) -> tuple[str, str]:
        self.sent.append(line)
        return self.replies.pop(0)


def session(encrypted: bool = True) -> AuthSession:
    return AuthSession(client_sasl(), encrypted=lambda: encrypted)


def test_plain_sends_one_initial_response() -> None:
    script = Script(("235", "2.7.0 Authentication successful"))
    reply = session().client_attempt("user", SECRET, "admin", b"PLAIN", exchange=script)
    assert script.sent == [b"AUTH PLAIN " + b64(f"admin\0user\0{SECRET}")]
    assert is_(reply, AUTH_OK) and reply.command == b"AUTH"
    assert reply.raw_message == "Authentication successful"


def test_login_answers_both_challenges() -> None:
    script = Script(("334", "VXNlcm5hbWU6"), ("334", "UGFzc3dvcmQ6"), ("235", "2.7.0 OK"))
    reply = session().client_attempt("user", SECRET, None, "login", exchange=script)
    assert script.sent == [b"AUTH LOGIN", b64("user"), b64(SECRET)]
    assert is_(reply, AUTH_OK)


def test_cram_md5_rfc2195_example_in_cleartext() -> None:
    script = Script(("334", RFC2195_CHALLENGE), ("235", "2.7.0 OK"))
    reply = session(encrypted=False).client_attempt(
        "tim", "tanstaaftanstaaf", None, "CRAM-MD5", exchange=script
    )
    # The server speaks first: no initial response on the AUTH line.
    assert script.sent == [b"AUTH CRAM-MD5", RFC2195_RESPONSE]
    assert is_(reply, AUTH_OK)


def test_bytes_arguments() -> None:
    script = Script(("235", "2.7.0 OK"))
    session().client_attempt(b"user", SECRET.encode(), b"admin", b"plain", exchange=script)
    assert script.sent == [b"AUTH PLAIN " + b64(f"admin\0user\0{SECRET}")]


@pytest.mark.parametrize(
    ("mechanism", "challenges"),
    [
        # A third challenge LOGIN does not expect.
        ("LOGIN", [("334", "VXNlcm5hbWU6"), ("334", "UGFzc3dvcmQ6"), ("334", "")]),
        # A challenge that is not base64.
        ("LOGIN", [("334", "Username:")]),
        ("CRAM-MD5", [("334", "not base64!")]),
        # PLAIN sent its response already; a second challenge is unexpected.
        ("PLAIN", [("334", ""), ("334", "")]),
    ],
)
def test_unexpected_challenge_cancels(mechanism: str, challenges: list[tuple[str, str]]) -> None:
    script = Script(*challenges, ("501", "5.7.0 Authentication canceled"))
    reply = session().client_attempt("user", SECRET, None, mechanism, exchange=script)
    assert script.sent[-1] == b"*" and script.sent.count(b"*") == 1
    assert is_(reply, AUTH_CANCELED)


def test_server_going_on_after_cancel_is_protocol_error() -> None:
    script = Script(("334", "!!"), ("334", "!!"))
    with pytest.raises(RemoteProtocolError) as info:
        session().client_attempt("user", SECRET, None, "LOGIN", exchange=script)
    assert info.value.reply.code == "421" and info.value.reply.command == b"AUTH"
    assert script.sent == [b"AUTH LOGIN", b"*"]


@pytest.mark.parametrize("mechanism", ["GSSAPI", "XOAUTH2", "EXTERNAL", "SCRAM-SHA-256", ""])
def test_unknown_mechanism(mechanism: str) -> None:
    script = Script()
    with pytest.raises(InvalidMechanismError) as info:
        session().client_attempt("user", SECRET, None, mechanism, exchange=script)
    assert is_(info.value.reply, NOT_ADVERTISED)
    assert script.sent == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_cleartext_mechanism_refused_without_tls(mechanism: str) -> None:
    script = Script()
    with pytest.raises(InsecureMechanismError) as info:
        session(encrypted=False).client_attempt("user", SECRET, None, mechanism, exchange=script)
    assert is_(info.value.reply, ENCRYPTION_REQUIRED)
    assert script.sent == []


@pytest.mark.parametrize(
    ("line", "masked"),
    [
        (b"AUTH PLAIN AHVzZXIAcHc=\r\n", b"AUTH PLAIN ********\r\n"),
        (b"AUTH LOGIN\r\n", b"AUTH LOGIN\r\n"),
        (b"auth login dXNlcg==", b"AUTH login ********"),
        (b"dXNlcg==\r\n", b"********\r\n"),
        (b"\r\n", b"********\r\n"),
        (b"*\r\n", b"*\r\n"),
        (b"AUTH\r\n", b"********\r\n"),  # a response that is valid base64
    ],
)
def test_mask_auth_line(line: bytes, masked: bytes) -> None:
    assert mask_auth_line(line) == masked


def secret_forms(secret: str = SECRET) -> list[bytes]:
    """The secret as it could appear in a log: raw and inside base64."""
    raw = secret.encode()
    return [raw, b64(raw), b64(b"\0user\0" + raw), b64(b"\0" + raw)]


def logged(caplog: pytest.LogCaptureFixture, prefixes: tuple[str, ...]) -> bytes:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(prefixes)).encode()


def test_on_a_plain_io_like_4_0(caplog: pytest.LogCaptureFixture) -> None:
    # AuthSession(auth, io) without an exchange reads and writes the IO.
    caplog.set_level(logging.DEBUG)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(f"334 {RFC2195_CHALLENGE}\r\n235 2.7.0 OK\r\n".encode())
        io = IO(ours, ("127.0.0.1", 25))
        reply = AuthSession(client_sasl(), io).client_attempt(
            "tim", "tanstaaftanstaaf", None, "CRAM-MD5"
        )
        assert is_(reply, AUTH_OK)
        theirs.settimeout(5)
        assert theirs.recv(4096) == b"AUTH CRAM-MD5\r\n" + RFC2195_RESPONSE + b"\r\n"
        with pytest.raises(InsecureMechanismError):
            AuthSession(client_sasl(), io).client_attempt("u", "p", None, "PLAIN")
    text = logged(caplog, ("slimta",))
    assert b"AUTH CRAM-MD5" in text and b"********" in text
    assert RFC2195_RESPONSE not in text


# --------------------------------------------------------- Client vs SmtpEdge
class AuthValidators(SmtpValidators):
    """Accepts user/SECRET; ``tempfail`` gets 454; records every attempt."""

    seen: list[tuple[str, str | None, bytes]]

    def handle_auth(self, reply: Reply, creds: Any) -> None:
        self.seen.append((creds.authcid, creds.authzid, creds.mechanism))
        if creds.authcid == "tempfail":
            reply.code = "454"
            reply.message = "4.7.0 Temporary authentication failure"
        elif creds.authcid != "user" or not creds.check_secret(SECRET):
            reply.code = "535"
            reply.message = "5.7.8 Authentication credentials invalid"


@pytest.fixture
def validators() -> type[AuthValidators]:
    class PerTest(AuthValidators):
        seen = []

    return PerTest


@pytest.fixture
def auth_edge(
    make_edge: Any, server_context: ssl.SSLContext, validators: type[AuthValidators]
) -> Callable[..., int]:
    """Factory: the port of an edge with STARTTLS and ``auth=True`` by default."""

    def factory(**kwargs: Any) -> int:
        kwargs.setdefault("auth", True)
        kwargs.setdefault("context", server_context)
        kwargs.setdefault("validator_class", validators)
        _, port, _ = make_edge(**kwargs)
        return int(port)

    return factory


@pytest.fixture
def greeted(client_context: ssl.SSLContext) -> Iterator[Callable[..., Client]]:
    """Factory: ``greeted(port, tls=False)`` -> a client after EHLO (and STARTTLS)."""
    clients: list[Client] = []

    def factory(port: int, tls: bool = False) -> Client:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        client = Client(sock, ("127.0.0.1", port))
        clients.append(client)
        assert client.get_banner().code == "220"
        assert client.ehlo("client.test").code == "250"
        if tls:
            assert is_(client.starttls(client_context), TLS_READY)
            assert client.ehlo("client.test").code == "250"
        return client

    yield factory
    for client in clients:
        client.io.close()


def test_plain_is_the_default_under_tls(auth_edge: Any, greeted: Any, validators: Any) -> None:
    client = greeted(auth_edge(), tls=True)
    assert client.extensions.getparam("AUTH") == "CRAM-MD5 LOGIN PLAIN"
    reply = client.auth("user", SECRET)
    assert is_(reply, AUTH_OK) and reply.command == b"AUTH"
    assert reply.address == client.io.address
    assert validators.seen == [("user", "user", b"PLAIN")]
    client.mailfrom("a@example.com")
    client.rcptto("b@example.com")
    assert is_(client.data(), START_INPUT)
    assert is_(client.send_data(b"Subject: s\r\n\r\nsecure\r\n"), QUEUED)


def test_login_when_asked_under_tls(auth_edge: Any, greeted: Any, validators: Any) -> None:
    client = greeted(auth_edge(), tls=True)
    assert is_(client.auth("user", SECRET, None, b"login"), AUTH_OK)
    assert validators.seen == [("user", "user", b"LOGIN")]


def test_authzid_is_sent(auth_edge: Any, greeted: Any, validators: Any) -> None:
    client = greeted(auth_edge(), tls=True)
    assert is_(client.auth("user", SECRET, "admin"), AUTH_OK)
    assert validators.seen == [("user", "admin", b"PLAIN")]


def test_cram_md5_is_the_default_in_cleartext(
    auth_edge: Any, greeted: Any, validators: Any
) -> None:
    client = greeted(auth_edge())
    assert not client.io.encrypted
    assert is_(client.auth("user", SECRET), AUTH_OK)
    assert validators.seen == [("user", "user", b"CRAM-MD5")]


@pytest.mark.parametrize("tls", [True, False])
def test_wrong_password(auth_edge: Any, greeted: Any, validators: Any, tls: bool) -> None:
    client = greeted(auth_edge(), tls=tls)
    reply = client.auth("user", "wrong")
    assert is_(reply, AUTH_INVALID) and client.last_error is reply
    # The session goes on: a second try with the right secret works.
    assert is_(client.auth("user", SECRET), AUTH_OK)
    mechanism = b"PLAIN" if tls else b"CRAM-MD5"
    assert [m for _, _, m in validators.seen] == [mechanism, mechanism]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_cleartext_mechanism_refused_locally(
    auth_edge: Any, greeted: Any, validators: Any, mechanism: str
) -> None:
    client = greeted(auth_edge())
    reply = client.auth("user", SECRET, mechanism=mechanism)
    assert is_(reply, ENCRYPTION_REQUIRED) and reply.command == b"AUTH"
    assert client.last_error is reply
    assert validators.seen == []
    assert is_(client.custom_command(b"NOOP"), OK)  # nothing else was sent


def test_only_cleartext_mechanisms_advertised(
    auth_edge: Any, greeted: Any, validators: Any
) -> None:
    client = greeted(auth_edge(auth=[b"PLAIN", b"LOGIN"]))
    assert is_(client.auth("user", SECRET), NOT_ADVERTISED)
    assert validators.seen == []
    assert is_(client.custom_command(b"NOOP"), OK)


@pytest.mark.parametrize(
    ("auth", "mechanism"),
    [
        (False, None),  # no AUTH keyword at all
        (False, "PLAIN"),  # 4.0 sent PLAIN anyway
        ([b"CRAM-MD5"], "PLAIN"),
        ([b"CRAM-MD5"], "LOGIN"),
        ([b"PLAIN"], "XOAUTH2"),  # not one this client runs
    ],
)
def test_mechanism_not_advertised(
    auth_edge: Any, greeted: Any, validators: Any, auth: Any, mechanism: str | None
) -> None:
    client = greeted(auth_edge(auth=auth), tls=True)
    reply = client.auth("user", SECRET, mechanism=mechanism)
    assert is_(reply, NOT_ADVERTISED) and reply.command == b"AUTH"
    assert validators.seen == []
    assert is_(client.custom_command(b"NOOP"), OK)


def test_auth_flushes_the_pipeline(auth_edge: Any, greeted: Any) -> None:
    client = greeted(auth_edge(), tls=True)
    rset = client.rset()
    assert not rset  # pipelined, not read yet
    assert is_(client.auth("user", SECRET), AUTH_OK)
    assert is_(rset, OK)


def test_client_never_logs_the_secret(
    auth_edge: Any, greeted: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = auth_edge()
    tls = greeted(port, tls=True)
    assert is_(tls.auth("user", SECRET), AUTH_OK)
    assert is_(greeted(port, tls=True).auth("user", SECRET, mechanism="LOGIN"), AUTH_OK)
    clear = greeted(port)
    assert is_(clear.auth("user", SECRET), AUTH_OK)
    client_side = logged(caplog, ("slimta.smtp.client", "slimta.smtp.auth", "slimta.smtp.io"))
    assert b"AUTH PLAIN ********" in client_side
    assert b"AUTH LOGIN" in client_side and b"AUTH CRAM-MD5" in client_side
    for form in [*secret_forms(), b64("user")]:
        assert form not in client_side


# ------------------------------------------------------ relay credentials
@pytest.fixture
def relays(client_context: ssl.SSLContext) -> Iterator[Callable[..., StaticSmtpRelay]]:
    made: list[StaticSmtpRelay] = []

    def factory(port: int, **kw: Any) -> StaticSmtpRelay:
        kw.setdefault("connect_timeout", 3.0)
        kw.setdefault("command_timeout", 3.0)
        kw.setdefault("ehlo_as", "relay.test")
        kw.setdefault("context", client_context)
        relay = StaticSmtpRelay("127.0.0.1", port, **kw)
        made.append(relay)
        return relay

    yield factory
    for relay in made:
        relay.kill()


def envelope() -> Envelope:
    env = Envelope("sender@example.com", ["rcpt@example.com"])
    env.parse(b"Subject: auth\r\n\r\nbody\r\n")
    return env


@pytest.mark.parametrize(
    ("credentials", "mechanism"),
    [
        (("user", SECRET), b"PLAIN"),
        (("user", SECRET, "admin"), b"PLAIN"),
        (("user", SECRET, None, "LOGIN"), b"LOGIN"),
        (("user", SECRET, None, b"CRAM-MD5"), b"CRAM-MD5"),
        (lambda: ("user", SECRET), b"PLAIN"),
    ],
)
def test_relay_credentials(
    make_edge: Any,
    server_context: ssl.SSLContext,
    validators: Any,
    relays: Any,
    credentials: Any,
    mechanism: bytes,
) -> None:
    _, port, queue = make_edge(auth=True, context=server_context, validator_class=validators)
    results = relays(port, credentials=credentials).attempt(envelope(), 0)
    assert is_(results["rcpt@example.com"], QUEUED)
    assert [m for _, _, m in validators.seen] == [mechanism]
    assert queue.envelopes[0].client["auth"]


def test_relay_cram_md5_without_tls(make_edge: Any, validators: Any, relays: Any) -> None:
    _, port, queue = make_edge(auth=True, validator_class=validators)  # no STARTTLS
    relays(port, credentials=("user", SECRET)).attempt(envelope(), 0)
    assert validators.seen == [("user", "user", b"CRAM-MD5")]
    assert len(queue.envelopes) == 1


@pytest.mark.parametrize(
    ("credentials", "error", "named"),
    [
        (("user", "wrong"), SmtpPermanentRelayError, AUTH_INVALID),
        (("tempfail", SECRET), SmtpTransientRelayError, AUTH_TEMPFAIL),
    ],
)
def test_relay_auth_failure(
    auth_edge: Any,
    relays: Any,
    credentials: Any,
    error: type[Exception],
    named: tuple[str, str],
) -> None:
    with pytest.raises(error) as info:
        relays(auth_edge(), credentials=credentials).attempt(envelope(), 0)
    reply = info.value.reply  # type: ignore[attr-defined]
    assert is_(reply, named) and reply.command == b"AUTH"


def test_relay_refuses_cleartext_secret(make_edge: Any, validators: Any, relays: Any) -> None:
    # PLAIN and LOGIN advertised without STARTTLS: nothing is sent.
    _, port, queue = make_edge(auth=[b"PLAIN", b"LOGIN"], validator_class=validators)
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(port, credentials=("user", SECRET)).attempt(envelope(), 0)
    assert is_(info.value.reply, NOT_ADVERTISED) and info.value.reply.command == b"AUTH"
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(port, credentials=("user", SECRET, None, "PLAIN")).attempt(envelope(), 0)
    assert is_(info.value.reply, ENCRYPTION_REQUIRED)
    assert validators.seen == [] and queue.envelopes == []
