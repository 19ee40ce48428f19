"""SMTP AUTH on a real SmtpEdge (RFC 4954), with and without TLS.

The 4.0 contract: AUTH is advertised (``CRAM-MD5 LOGIN PLAIN``) whether or
not the session is encrypted, the cleartext mechanisms PLAIN and LOGIN are
refused until TLS is up, and the server never checks a secret itself --
``handle_auth`` decides (without it every well-formed exchange succeeds).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import smtplib
import socket

import gevent
import pytest

from slimta.edge.smtp import SmtpValidators
from slimta.smtp.server import Server

pytestmark = pytest.mark.timeout(20)

# Named replies: (code, enhanced status code or None for "no code").
BANNER = ("220", None)
EHLO_OK = ("250", None)
TLS_READY = ("220", "2.0.0")
SENDER_OK = ("250", "2.1.0")
RECIPIENT_OK = ("250", "2.1.5")
OK = ("250", "2.0.0")
START_INPUT = ("354", None)
AUTH_OK = ("235", "2.7.0")
AUTH_INVALID = ("535", "5.7.8")
ENCRYPTION_REQUIRED = ("538", "5.7.11")
BAD_SEQUENCE = ("503", "5.5.1")
BAD_ARGUMENTS = ("501", "5.5.4")
BAD_MECHANISM = ("504", "5.5.4")
BAD_AUTH_STRING = ("501", "5.5.2")
AUTH_CANCELED = ("501", "5.0.0")
AUTH_LINE_TOO_LONG = ("500", "5.5.6")
LINE_TOO_LONG = ("500", "5.5.2")
TOO_MANY_ERRORS = ("421", "4.7.0")
TIMED_OUT = ("421", "4.4.2")
SHUTTING_DOWN = ("421", "4.3.2")
UNHANDLED = ("451", "4.3.0")

#: What ``auth=True`` advertises in EHLO (4.0: the same with or without TLS).
MECHANISMS = "CRAM-MD5 LOGIN PLAIN"
#: RFC 4954 4: servers must take SASL lines of 12288 octets.
SASL_LINE_LIMIT = 12288

MESSAGE = b"From: a@example.test\r\nSubject: auth\r\n\r\nbody\r\n"


def b64(text: str | bytes) -> str:
    if isinstance(text, str):
        text = text.encode("utf-8")
    return base64.b64encode(text).decode("ascii")


def plain(user: str, password: str, authzid: str = "") -> str:
    """The base64 PLAIN response (RFC 4616)."""
    return b64(f"{authzid}\0{user}\0{password}")


def cram_answer(challenge_b64: str, user: str, password: str) -> str:
    challenge = base64.b64decode(challenge_b64)
    digest = hmac.HMAC(password.encode(), challenge, hashlib.md5).hexdigest()
    return b64(f"{user} {digest}")


class Recorder(SmtpValidators):
    """Accepts alice/secret only; records what the session looked like."""

    seen: list

    def handle_auth(self, reply, creds):
        self.seen.append(("auth", creds.authcid, creds.authzid))
        if not (creds.check_secret("secret") and creds.authcid == "alice"):
            reply.code = "535"
            reply.message = "5.7.8 Authentication credentials invalid"

    def handle_mail(self, reply, sender, params):
        self.seen.append(("mail", self.session.auth, self.session.protocol))


@pytest.fixture
def recorder():
    class PerTest(Recorder):
        seen = []

    return PerTest


@pytest.fixture
def auth_edge(make_edge, server_context, recorder):
    """Factory: an edge with ``auth=True``, STARTTLS and :class:`Recorder`."""

    def factory(**kwargs):
        kwargs.setdefault("auth", True)
        kwargs.setdefault("context", server_context)
        kwargs.setdefault("validator_class", recorder)
        return make_edge(**kwargs)

    return factory


def smtp_auth(client: smtplib.SMTP, mechanism: str, user: str, password: str):
    """Run one AUTH exchange with smtplib; return ``(code, text)``, never raise."""
    client.ehlo_or_helo_if_needed()
    client.user, client.password = user, password
    method = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
    try:
        return client.auth(mechanism, method)
    except smtplib.SMTPAuthenticationError as exc:
        return exc.smtp_code, exc.smtp_error


def starttls(client, context):
    """Upgrade a greeted raw client with STARTTLS and greet again."""
    client.send(b"STARTTLS\r\n")
    client.expect(TLS_READY)
    assert client.buf == b""
    client.sock = context.wrap_socket(client.sock, server_hostname="mx.test")
    code, text = client.command("EHLO client.test")
    assert code == "250", text
    return text


def ehlo_lines(text: str) -> list[str]:
    return text.split("\n")[1:]


def send_message(client, sender="a@example.test", params=""):
    """A whole transaction over a raw client; returns the final reply."""
    client.send(f"MAIL FROM:<{sender}>{params}\r\n".encode())
    client.expect(SENDER_OK)
    client.send(b"RCPT TO:<b@example.test>\r\n")
    client.expect(RECIPIENT_OK)
    client.send(b"DATA\r\n")
    client.expect(START_INPUT)
    client.send(MESSAGE + b".\r\n")
    return client.read_reply()


def deliver(client, queue, **kwargs):
    """Send one message over a raw client; ``(client auth, protocol)`` of it."""
    reply = send_message(client, **kwargs)
    assert reply[0] == "250", reply
    client_info = queue.envelopes[-1].client
    return client_info["auth"], client_info["protocol"]


# ------------------------------------------------------------- advertising


def test_auth_advertised_before_and_after_starttls(auth_edge, smtp, client_context):
    _, port, _ = auth_edge()
    client = smtp(port)
    client.ehlo("client.test")
    assert client.has_extn("auth")
    assert client.esmtp_features["auth"].split() == MECHANISMS.split()
    client.starttls(context=client_context)
    client.ehlo("client.test")
    assert client.esmtp_features["auth"].split() == MECHANISMS.split()


def test_auth_not_advertised_or_accepted_when_disabled(make_edge, raw):
    _, port, _ = make_edge()
    client = raw(port)
    _, text = client.greet()
    assert not any(line.startswith("AUTH") for line in ehlo_lines(text))
    code, _ = client.command("AUTH PLAIN " + plain("alice", "secret"))
    assert code in ("500", "502")


def test_auth_list_of_mechanisms(make_edge, raw, server_context, client_context, recorder):
    _, port, _ = make_edge(auth=[b"PLAIN"], context=server_context, validator_class=recorder)
    client = raw(port)
    _, text = client.greet()
    assert "AUTH PLAIN" in ehlo_lines(text)
    starttls(client, client_context)
    client.send(b"AUTH LOGIN\r\n")
    client.expect(BAD_MECHANISM)
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)


# -------------------------------------------------------- without TLS


@pytest.mark.parametrize(
    "command",
    [
        "AUTH PLAIN " + plain("alice", "secret"),
        "AUTH PLAIN",
        "AUTH LOGIN",
        "AUTH LOGIN " + b64("alice"),
        "auth plain " + plain("alice", "secret"),
    ],
    ids=["plain-initial", "plain-bare", "login-bare", "login-initial", "lowercase"],
)
def test_cleartext_mechanisms_refused_without_tls(auth_edge, raw, recorder, command):
    _, port, queue = auth_edge()
    client = raw(port)
    client.greet()
    client.send(command.encode() + b"\r\n")
    client.expect(ENCRYPTION_REQUIRED)
    # No challenge was sent and nothing was handed to handle_auth.
    assert client.buf == b""
    assert recorder.seen == []
    # Not authenticated: the session goes on, and a later AUTH is allowed.
    assert deliver(client, queue) == (None, "ESMTP")
    assert ("mail", None, "ESMTP") in recorder.seen
    client.send(b"AUTH CRAM-MD5\r\n")
    code, _ = client.read_reply()
    assert code == "334"


def test_cram_md5_without_tls(auth_edge, smtp, reply_is, recorder):
    _, port, queue = auth_edge()
    client = smtp(port, local_hostname="client.test")
    assert reply_is(smtp_auth(client, "CRAM-MD5", "alice", "secret"), AUTH_OK)
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    [envelope] = queue.envelopes
    assert envelope.client["auth"] == ("alice", "alice")
    assert envelope.client["protocol"] == "ESMTPA"
    assert recorder.seen == [("auth", "alice", "alice"), ("mail", ("alice", "alice"), "ESMTPA")]


def test_cram_md5_wrong_password(auth_edge, smtp, reply_is, recorder):
    _, port, queue = auth_edge()
    client = smtp(port)
    assert reply_is(smtp_auth(client, "CRAM-MD5", "alice", "wrong"), AUTH_INVALID)
    assert reply_is(smtp_auth(client, "CRAM-MD5", "mallory", "secret"), AUTH_INVALID)
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    [envelope] = queue.envelopes
    assert envelope.client["auth"] is None
    assert envelope.client["protocol"] == "ESMTP"


def test_cram_md5_over_raw_socket(auth_edge, raw):
    _, port, _ = auth_edge()
    client = raw(port)
    client.greet()
    client.send(b"AUTH CRAM-MD5\r\n")
    code, challenge = client.read_reply()
    assert code == "334"
    # A <msg-id> style challenge (RFC 2195), base64 on the wire.
    decoded = base64.b64decode(challenge, validate=True)
    assert decoded.startswith(b"<") and decoded.endswith(b">")
    client.send(cram_answer(challenge, "alice", "secret").encode() + b"\r\n")
    client.expect(AUTH_OK)


def test_cram_md5_challenges_are_fresh(auth_edge, raw):
    _, port, _ = auth_edge()
    challenges = set()
    for _ in range(3):
        client = raw(port)
        client.greet()
        client.send(b"AUTH CRAM-MD5\r\n")
        code, challenge = client.read_reply()
        assert code == "334"
        challenges.add(challenge)
        # An answer computed for another challenge does not pass.
        client.send(cram_answer(b64("<1.2@mx.test>"), "alice", "secret").encode() + b"\r\n")
        client.expect(AUTH_INVALID)
    assert len(challenges) == 3


def test_cram_md5_initial_response_refused(auth_edge, raw, recorder):
    # CRAM-MD5 is server-first (RFC 2195): the secret is proven against a
    # fresh challenge. An initial response can only answer a challenge the
    # server never sent -- the empty one -- so it must be refused (RFC 4954
    # 4: 501). Accepted, one digest of the empty challenge, sniffed once
    # (CRAM-MD5 is allowed without TLS), logs in again in every session.
    _, port, _ = auth_edge()
    replies = []
    for _ in range(2):
        client = raw(port)
        client.greet()
        replies.append(client.command("AUTH CRAM-MD5 " + cram_answer("", "alice", "secret")))
        client.close()
    assert [code for code, _ in replies] == ["501", "501"], replies
    assert recorder.seen == []


# ------------------------------------------------------------ after STARTTLS


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_auth_after_starttls(auth_edge, smtp, reply_is, client_context, recorder, mechanism):
    _, port, queue = auth_edge()
    client = smtp(port, local_hostname="client.test")
    client.starttls(context=client_context)
    client.ehlo()
    assert reply_is(smtp_auth(client, mechanism, "alice", "secret"), AUTH_OK)
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    [envelope] = queue.envelopes
    assert envelope.client["auth"] == ("alice", "alice")
    assert envelope.client["protocol"] == "ESMTPSA"
    assert recorder.seen[-1] == ("mail", ("alice", "alice"), "ESMTPSA")


def test_login_after_starttls(auth_edge, smtp, reply_is, client_context):
    # smtplib.login() picks CRAM-MD5 first; the other mechanisms are tested above.
    _, port, queue = auth_edge()
    client = smtp(port)
    client.starttls(context=client_context)
    assert reply_is(client.login("alice", "secret"), AUTH_OK)
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    [envelope] = queue.envelopes
    assert envelope.client["auth"] == ("alice", "alice")
    assert envelope.client["protocol"] == "ESMTPSA"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_wrong_password_after_starttls(
    auth_edge, smtp, reply_is, client_context, recorder, mechanism
):
    _, port, queue = auth_edge()
    client = smtp(port)
    client.starttls(context=client_context)
    client.ehlo()
    assert reply_is(smtp_auth(client, mechanism, "alice", "wrong"), AUTH_INVALID)
    assert reply_is(smtp_auth(client, mechanism, "bob", "secret"), AUTH_INVALID)
    # A failed AUTH does not use up the session's one AUTH.
    assert reply_is(smtp_auth(client, mechanism, "alice", "secret"), AUTH_OK)
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    assert queue.envelopes[0].client["auth"] == ("alice", "alice")


def test_login_wrong_password_raises(auth_edge, smtp, client_context):
    _, port, _ = auth_edge()
    client = smtp(port)
    client.starttls(context=client_context)
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        client.login("alice", "wrong")
    assert info.value.smtp_code == 535


def test_plain_authzid_is_reported(auth_edge, raw, client_context, recorder):
    _, port, queue = auth_edge()
    client = raw(port)
    client.greet()
    starttls(client, client_context)
    client.send(f"AUTH PLAIN {plain('alice', 'secret', authzid='bob')}\r\n".encode())
    client.expect(AUTH_OK)
    assert deliver(client, queue) == (("alice", "bob"), "ESMTPSA")


def test_plain_without_initial_response(auth_edge, raw, client_context):
    _, port, _ = auth_edge()
    client = raw(port)
    client.greet()
    starttls(client, client_context)
    client.send(b"AUTH PLAIN\r\n")
    # RFC 4954 4: "334" SP, even when the challenge is empty.
    assert client.read_line() == b"334 "
    client.send(plain("alice", "secret").encode() + b"\r\n")
    client.expect(AUTH_OK)


def test_login_two_challenges_over_raw_tls(auth_edge, raw, client_context):
    _, port, queue = auth_edge()
    client = raw(port)
    client.greet()
    starttls(client, client_context)
    client.send(b"AUTH LOGIN\r\n")
    assert client.read_line() == b"334 " + base64.b64encode(b"Username:")
    client.send(b64("alice").encode() + b"\r\n")
    assert client.read_line() == b"334 " + base64.b64encode(b"Password:")
    client.send(b64("secret").encode() + b"\r\n")
    client.expect(AUTH_OK)
    assert deliver(client, queue) == (("alice", "alice"), "ESMTPSA")


def test_login_initial_response_skips_username_challenge(auth_edge, raw, client_context):
    _, port, _ = auth_edge()
    client = raw(port)
    client.greet()
    starttls(client, client_context)
    client.send(f"AUTH LOGIN {b64('alice')}\r\n".encode())
    assert client.read_line() == b"334 " + base64.b64encode(b"Password:")
    client.send(b64("secret").encode() + b"\r\n")
    client.expect(AUTH_OK)


def test_pipelined_sasl_responses(auth_edge, raw, client_context):
    # Answers already buffered when the challenge goes out are still answers.
    _, port, _ = auth_edge()
    client = raw(port)
    client.greet()
    starttls(client, client_context)
    client.send(f"AUTH LOGIN\r\n{b64('alice')}\r\n{b64('secret')}\r\nNOOP\r\n".encode())
    assert client.read_line() == b"334 " + base64.b64encode(b"Username:")
    assert client.read_line() == b"334 " + base64.b64encode(b"Password:")
    client.expect(AUTH_OK)
    client.expect(OK)


@pytest.fixture
def tls_client(auth_edge, raw, client_context):
    """Factory: a raw client greeted again after STARTTLS; ``(client, queue)``."""

    def factory(**kwargs):
        _, port, queue = auth_edge(**kwargs)
        client = raw(port)
        client.greet()
        starttls(client, client_context)
        return client, queue

    return factory


def test_auth_twice_refused(tls_client):
    client, queue = tls_client()
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)
    # RFC 4954 4: once authenticated, AUTH gets 503, even for another user.
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(BAD_SEQUENCE)
    client.send(b"AUTH LOGIN\r\n")
    client.expect(BAD_SEQUENCE)
    assert client.buf == b""
    assert deliver(client, queue) == (("alice", "alice"), "ESMTPSA")


def test_smtplib_second_auth_gets_503(auth_edge, smtp, reply_is, client_context):
    _, port, _ = auth_edge()
    client = smtp(port)
    client.starttls(context=client_context)
    assert reply_is(client.login("alice", "secret"), AUTH_OK)
    # smtplib returns a 503 instead of raising it.
    assert reply_is(smtp_auth(client, "PLAIN", "alice", "secret"), BAD_SEQUENCE)


def test_authentication_survives_rset_and_ehlo(tls_client):
    # Whatever a new EHLO does to AUTH, the core (which answers AUTH) and the
    # edge (which stamps envelope.client['auth']) must agree about it.
    client, queue = tls_client()
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)
    client.send(b"RSET\r\n")
    client.expect(OK)
    assert deliver(client, queue) == (("alice", "alice"), "ESMTPSA")
    code, _ = client.command("EHLO client.test")
    assert code == "250"
    code, text = client.command(f"AUTH PLAIN {plain('alice', 'secret')}")
    if code == "503":
        # Still authenticated after EHLO: so must the next message be.
        assert deliver(client, queue) == (("alice", "alice"), "ESMTPSA")
    else:
        assert code == "235", text


def test_auth_inside_mail_transaction_refused(tls_client, recorder):
    client, _ = tls_client()
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    client.expect(SENDER_OK)
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(BAD_SEQUENCE)
    client.send(b"RCPT TO:<b@example.test>\r\n")
    client.expect(RECIPIENT_OK)
    client.send(b"AUTH LOGIN\r\n")
    client.expect(BAD_SEQUENCE)
    assert not any(entry[0] == "auth" for entry in recorder.seen)
    # After the transaction, AUTH is allowed again.
    client.send(b"RSET\r\n")
    client.expect(OK)
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)


def test_auth_before_ehlo_refused(auth_edge, raw):
    _, port, _ = auth_edge()
    client = raw(port)
    client.expect(BANNER)
    client.send(b"AUTH CRAM-MD5\r\n")
    code, _ = client.read_reply()
    assert code == "503"


@pytest.mark.parametrize("command", [b"AUTH", b"AUTH ", b"AUTH  \t"])
def test_auth_without_argument(tls_client, command):
    client, _ = tls_client()
    client.send(command + b"\r\n")
    client.expect(BAD_ARGUMENTS)
    # The session survives (4.0 crashed it with 421 4.3.0).
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)


def test_auth_with_extra_words(tls_client):
    client, _ = tls_client()
    client.send(b"AUTH PLAIN abcd efgh\r\n")
    client.expect(BAD_ARGUMENTS)


@pytest.mark.parametrize("mechanism", ["FOO", "DIGEST-MD5", "GSSAPI", "EXTERNAL", "XOAUTH2"])
def test_unknown_mechanism(tls_client, recorder, mechanism):
    client, _ = tls_client()
    client.send(f"AUTH {mechanism}\r\n".encode())
    client.expect(BAD_MECHANISM)
    client.send(f"AUTH {mechanism} {b64('x')}\r\n".encode())
    client.expect(BAD_MECHANISM)
    assert recorder.seen == []


@pytest.mark.parametrize(
    "initial",
    [
        "!!!",
        "AG=x",
        "AGFsaWNlAHNlY3JldA",  # missing padding
        "AGFsaWNl=AHNlY3JldA==",  # misplaced padding
        "AGFsaWNlAHNlY3JldA==junk",
        "AGFsaWNl\tAHNlY3JldA==",
        "====",
    ],
)
def test_malformed_initial_response(tls_client, recorder, initial):
    client, _ = tls_client()
    client.send(f"AUTH PLAIN {initial}\r\n".encode())
    client.expect(BAD_AUTH_STRING)
    assert client.buf == b""
    assert recorder.seen == []
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)


def test_malformed_challenge_answer(tls_client, recorder):
    client, _ = tls_client()
    client.send(b"AUTH LOGIN\r\n")
    assert client.read_line().startswith(b"334 ")
    client.send(b"not base64!\r\n")
    client.expect(BAD_AUTH_STRING)
    # The exchange is over: the next line is a command again.
    client.send(b"NOOP\r\n")
    client.expect(OK)
    assert recorder.seen == []


def test_non_utf8_challenge_answer(tls_client):
    client, _ = tls_client()
    client.send(b"AUTH LOGIN\r\n")
    assert client.read_line().startswith(b"334 ")
    client.send(b"\xff\xfe\r\n")
    client.expect(BAD_AUTH_STRING)
    client.send(b"NOOP\r\n")
    client.expect(OK)


def test_non_utf8_credentials(tls_client, recorder):
    # pysasl raises a bare UnicodeDecodeError for these (not its own error).
    client, _ = tls_client()
    client.send(b"AUTH PLAIN " + base64.b64encode(b"\0\xffalice\0secret") + b"\r\n")
    client.expect(BAD_AUTH_STRING)
    client.send(b"NOOP\r\n")
    client.expect(OK)
    assert recorder.seen == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_cancel_with_star(tls_client, recorder, mechanism):
    client, _ = tls_client()
    client.send(f"AUTH {mechanism}\r\n".encode())
    assert client.read_line().startswith(b"334 ")
    client.send(b"*\r\n")
    # RFC 4954 4: a cancelled exchange MUST get 501.
    client.expect(AUTH_CANCELED)
    assert recorder.seen == []
    client.send(b"NOOP\r\n")
    client.expect(OK)
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)


def test_cancel_after_second_challenge(tls_client, recorder):
    client, _ = tls_client()
    client.send(f"AUTH LOGIN {b64('alice')}\r\n".encode())
    assert client.read_line() == b"334 " + base64.b64encode(b"Password:")
    client.send(b"*\r\n")
    client.expect(AUTH_CANCELED)
    assert recorder.seen == []


def test_star_as_initial_response(tls_client, recorder):
    client, _ = tls_client()
    client.send(b"AUTH PLAIN *\r\n")
    code, _ = client.read_reply()
    assert code == "501"
    assert recorder.seen == []


def test_empty_initial_response(tls_client, recorder):
    # RFC 4954 4: "=" is a present but empty response; pysasl refuses an
    # empty PLAIN message, so this is a 501, not a base64 error or a 334.
    client, _ = tls_client()
    client.send(b"AUTH PLAIN =\r\n")
    code, _ = client.read_reply()
    assert code == "501"
    assert client.buf == b""
    assert recorder.seen == []
    client.send(b"NOOP\r\n")
    client.expect(OK)


def test_empty_challenge_answer(tls_client, recorder):
    client, _ = tls_client()
    client.send(b"AUTH PLAIN\r\n")
    assert client.read_line() == b"334 "
    client.send(b"=\r\n")
    code, _ = client.read_reply()
    assert code == "501"
    client.send(b"AUTH PLAIN\r\n")
    assert client.read_line() == b"334 "
    client.send(b"\r\n")
    code, _ = client.read_reply()
    assert code == "501"
    assert recorder.seen == []


def test_over_long_sasl_line(tls_client, recorder):
    client, _ = tls_client()
    client.send(b"AUTH LOGIN\r\n")
    assert client.read_line().startswith(b"334 ")
    client.send(b"A" * (SASL_LINE_LIMIT + 4) + b"\r\n")
    client.expect(AUTH_LINE_TOO_LONG)
    # The exchange is over: the next line is a command again.
    client.send(b"NOOP\r\n")
    client.expect(OK)
    assert recorder.seen == []
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)


def test_over_long_sasl_line_in_pieces(tls_client):
    # The line arrives in many writes and the server must not wait for all
    # of it before deciding (nor buffer it).
    client, _ = tls_client()
    client.send(b"AUTH LOGIN\r\n")
    assert client.read_line().startswith(b"334 ")
    for _ in range(8):
        client.send(b"A" * 4096)
    client.send(b"\r\nNOOP\r\n")
    client.expect(AUTH_LINE_TOO_LONG)
    client.expect(OK)


def test_sasl_line_at_the_limit_is_read(tls_client, recorder):
    # A 12288-octet base64 user name is a valid (if odd) LOGIN answer.
    client, _ = tls_client()
    client.send(b"AUTH LOGIN\r\n")
    assert client.read_line().startswith(b"334 ")
    answer = b64("u" * (SASL_LINE_LIMIT // 4 * 3))
    assert len(answer) == SASL_LINE_LIMIT
    client.send(answer.encode() + b"\r\n")
    assert client.read_line() == b"334 " + base64.b64encode(b"Password:")
    client.send(b64("secret").encode() + b"\r\n")
    client.expect(AUTH_INVALID)


def test_over_long_auth_command(tls_client):
    client, _ = tls_client()
    client.send(b"AUTH PLAIN " + b"A" * (SASL_LINE_LIMIT + 4) + b"\r\nNOOP\r\n")
    code, text = client.read_reply()
    # Either "line too long" reply will do; the next command must still run.
    assert (code, text.split()[0]) in (LINE_TOO_LONG, AUTH_LINE_TOO_LONG)
    client.expect(OK)


def test_failed_auth_counts_towards_max_errors(tls_client, recorder):
    client, _ = tls_client(max_errors=3)
    client.send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\n".encode())
    client.expect(AUTH_INVALID)
    client.send(b"AUTH PLAIN !!!\r\n")
    client.expect(BAD_AUTH_STRING)
    # RFC 4954 9: no disconnect before three failures; the third one does.
    client.send(f"AUTH PLAIN {plain('mallory', 'secret')}\r\n".encode())
    client.expect(AUTH_INVALID)
    client.expect(TOO_MANY_ERRORS)
    assert client.at_eof()


def test_cancelled_and_too_long_count_towards_max_errors(tls_client):
    client, _ = tls_client(max_errors=3)
    client.send(b"AUTH LOGIN\r\n")
    client.read_line()
    client.send(b"*\r\n")
    client.expect(AUTH_CANCELED)
    client.send(b"AUTH LOGIN\r\n")
    client.read_line()
    client.send(b"A" * (SASL_LINE_LIMIT + 4) + b"\r\n")
    client.expect(AUTH_LINE_TOO_LONG)
    client.send(b"AUTH FOO\r\n")
    client.expect(BAD_MECHANISM)
    client.expect(TOO_MANY_ERRORS)
    assert client.at_eof()


def test_refused_cleartext_counts_towards_max_errors(auth_edge, raw):
    _, port, _ = auth_edge(max_errors=3)
    client = raw(port)
    client.greet()
    for _ in range(3):
        client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
        client.expect(ENCRYPTION_REQUIRED)
    client.expect(TOO_MANY_ERRORS)
    assert client.at_eof()


def test_handle_auth_exception(make_edge, raw, server_context, client_context):
    class Broken(SmtpValidators):
        def handle_auth(self, reply, creds):
            raise RuntimeError("password database is down")

    _, port, queue = make_edge(auth=True, context=server_context, validator_class=Broken)
    client = raw(port)
    client.greet()
    starttls(client, client_context)
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(UNHANDLED)
    assert deliver(client, queue) == (None, "ESMTPS")


def test_handle_auth_can_close(make_edge, raw, server_context, client_context):
    class Closer(SmtpValidators):
        def handle_auth(self, reply, creds):
            reply.code = "421"
            reply.message = "4.7.0 Go away"

    edge, port, _ = make_edge(auth=True, context=server_context, validator_class=Closer)
    client = raw(port)
    client.greet()
    starttls(client, client_context)
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(("421", "4.7.0"))
    # The server ends TLS (close_notify) and the connection; answering its
    # close_notify spares it the wait for ours.
    client.sock = client.sock.unwrap()
    assert client.at_eof()
    assert edge.session_ended.wait(5)


def test_disconnect_during_exchange(auth_edge, raw, smtp, client_context, reply_is):
    edge, port, _ = auth_edge()
    client = raw(port)
    client.greet()
    client.send(b"AUTH CRAM-MD5\r\n")
    assert client.read_line().startswith(b"334 ")
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()
    assert edge.session_ended.wait(5)
    # The make_edge fixture fails the test if the session greenlet crashed.
    good = smtp(port)
    good.starttls(context=client_context)
    assert reply_is(good.login("alice", "secret"), AUTH_OK)


def test_stalled_exchange_times_out(auth_edge, raw):
    edge, port, _ = auth_edge(command_timeout=0.5)
    client = raw(port)
    client.greet()
    client.send(b"AUTH CRAM-MD5\r\n")
    assert client.read_line().startswith(b"334 ")
    # The server, not a sleep, decides when: the read blocks until 421.
    client.expect(TIMED_OUT)
    assert client.at_eof()
    assert edge.session_ended.wait(5)


def test_stop_during_exchange(auth_edge, raw):
    edge, port, _ = auth_edge()
    client = raw(port)
    client.greet()
    client.send(b"AUTH CRAM-MD5\r\n")
    assert client.read_line().startswith(b"334 ")
    stopper = gevent.spawn(edge.stop, 0.2)
    client.expect(SHUTTING_DOWN)
    client.close()
    stopper.join(timeout=10)
    assert stopper.successful()


# ------------------------------------------------------------------ SMTPS


def test_smtps_login_and_sendmail(auth_edge, smtp, reply_is, client_context, recorder):
    _, port, queue = auth_edge(tls_immediately=True)
    client = smtp(port, cls=smtplib.SMTP_SSL, context=client_context, local_hostname="c.test")
    client.ehlo()
    assert not client.has_extn("starttls")
    assert client.esmtp_features["auth"].split() == MECHANISMS.split()
    assert reply_is(client.login("alice", "secret"), AUTH_OK)
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    [envelope] = queue.envelopes
    assert envelope.client["auth"] == ("alice", "alice")
    assert envelope.client["protocol"] == "ESMTPSA"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtps_cleartext_mechanisms(auth_edge, smtp, reply_is, client_context, mechanism):
    _, port, _ = auth_edge(tls_immediately=True)
    client = smtp(port, cls=smtplib.SMTP_SSL, context=client_context)
    assert reply_is(smtp_auth(client, mechanism, "alice", "wrong"), AUTH_INVALID)
    assert reply_is(smtp_auth(client, mechanism, "alice", "secret"), AUTH_OK)


# ------------------------------------------------------- STARTTLS resets AUTH


def test_starttls_forgets_authentication(auth_edge, raw, client_context, recorder):
    _, port, queue = auth_edge()
    client = raw(port)
    client.greet()
    client.send(b"AUTH CRAM-MD5\r\n")
    code, challenge = client.read_reply()
    assert code == "334"
    client.send(cram_answer(challenge, "alice", "secret").encode() + b"\r\n")
    client.expect(AUTH_OK)
    assert deliver(client, queue) == (("alice", "alice"), "ESMTPA")
    # RFC 3207 4.2: after the handshake the server forgets the AUTH.
    starttls(client, client_context)
    assert deliver(client, queue) == (None, "ESMTPS")
    assert recorder.seen[-1] == ("mail", None, "ESMTPS")
    # ...so the client may (and must) authenticate again, now over TLS.
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)
    assert deliver(client, queue) == (("alice", "alice"), "ESMTPSA")


def test_starttls_forgets_authentication_smtplib(auth_edge, smtp, reply_is, client_context):
    _, port, queue = auth_edge()
    client = smtp(port)
    client.ehlo()
    assert reply_is(smtp_auth(client, "CRAM-MD5", "alice", "secret"), AUTH_OK)
    client.starttls(context=client_context)
    client.ehlo()
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    [envelope] = queue.envelopes
    assert envelope.client["auth"] is None
    assert envelope.client["protocol"] == "ESMTPS"


def test_auth_pipelined_after_starttls_is_dropped(auth_edge, raw, client_context, recorder):
    # CVE-2011-0411 applied to AUTH: plaintext after STARTTLS never runs.
    _, port, _ = auth_edge()
    client = raw(port)
    client.greet()
    client.send(f"STARTTLS\r\nAUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(TLS_READY)
    assert client.buf == b""
    client.sock = client_context.wrap_socket(client.sock, server_hostname="mx.test")
    client.command("EHLO client.test")
    assert recorder.seen == []
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)


# ----------------------------------------------------------- MAIL ... AUTH=


@pytest.mark.parametrize(
    ("param", "submitter"),
    [
        (" AUTH=alice+40example.com", "alice@example.com"),
        (" AUTH=<>", None),
        (" auth=alice+40example.com", "alice@example.com"),
        (" AUTH=a+2Bb+40example.com", "a+b@example.com"),
        ("", None),
    ],
)
def test_mail_auth_parameter_when_authenticated(tls_client, param, submitter):
    client, queue = tls_client()
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)
    reply = send_message(client, params=param)
    assert reply[0] == "250", reply
    [envelope] = queue.envelopes
    assert envelope.client["submitter"] == submitter


@pytest.mark.parametrize("param", [" AUTH=alice+40example.com", " AUTH=<>"])
def test_mail_auth_parameter_when_not_authenticated(tls_client, param):
    # RFC 4954 5: accepted from anyone, but untrusted means "as if AUTH=<>".
    client, queue = tls_client()
    reply = send_message(client, params=param)
    assert reply[0] == "250", reply
    [envelope] = queue.envelopes
    assert envelope.client["submitter"] is None
    assert envelope.client["auth"] is None


def test_mail_auth_parameter_after_failed_auth(tls_client):
    client, queue = tls_client()
    client.send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\n".encode())
    client.expect(AUTH_INVALID)
    reply = send_message(client, params=" AUTH=alice+40example.com")
    assert reply[0] == "250", reply
    assert queue.envelopes[0].client["submitter"] is None


def test_mail_auth_parameter_smtplib(auth_edge, smtp, reply_is, client_context):
    _, port, queue = auth_edge()
    client = smtp(port)
    client.starttls(context=client_context)
    assert reply_is(client.login("alice", "secret"), AUTH_OK)
    client.sendmail(
        "a@example.test", ["b@example.test"], MESSAGE, mail_options=["AUTH=alice+40example.com"]
    )
    [envelope] = queue.envelopes
    assert envelope.client["submitter"] == "alice@example.com"


@pytest.mark.parametrize(
    "param",
    [" AUTH=a+4", " AUTH=a+4g", " AUTH=a+zz", " AUTH", " AUTH=", " AUTH=a=b"],
)
def test_mail_auth_parameter_malformed(tls_client, param):
    client, _ = tls_client()
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)
    client.send(f"MAIL FROM:<a@b>{param}\r\n".encode())
    client.expect(BAD_ARGUMENTS)
    client.send(b"MAIL FROM:<a@b> AUTH=<>\r\n")
    client.expect(SENDER_OK)


def test_mail_auth_parameter_without_auth_extension(make_edge, raw):
    # RFC 4954 5 only defines AUTH= where AUTH is advertised.
    _, port, _ = make_edge()
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@b> AUTH=<>\r\n")
    client.expect(("555", "5.5.4"))


def test_submitter_does_not_leak_to_the_next_message(tls_client):
    client, queue = tls_client()
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    client.expect(AUTH_OK)
    assert send_message(client, params=" AUTH=alice+40example.com")[0] == "250"
    assert send_message(client)[0] == "250"
    first, second = queue.envelopes
    assert first.client["submitter"] == "alice@example.com"
    assert second.client["submitter"] is None


# ------------------------------------------------- no handle_auth (4.0 contract)


class NoAuthHook(SmtpValidators):
    def handle_mail(self, reply, sender, params):
        pass


@pytest.mark.parametrize("validator_class", [None, NoAuthHook], ids=["none", "no-hook"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_without_handle_auth_every_exchange_succeeds(
    make_edge, smtp, reply_is, server_context, client_context, validator_class, mechanism
):
    # The 4.0 contract: the server never checks secrets; handle_auth decides,
    # so without it any well-formed exchange, whatever the password, is 235.
    _, port, queue = make_edge(auth=True, context=server_context, validator_class=validator_class)
    client = smtp(port)
    client.starttls(context=client_context)
    client.ehlo()
    assert reply_is(smtp_auth(client, mechanism, "anyone", "anything"), AUTH_OK)
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    [envelope] = queue.envelopes
    assert envelope.client["auth"] == ("anyone", "anyone")
    assert envelope.client["protocol"] == "ESMTPSA"


def test_without_handle_auth_cleartext_still_needs_tls(make_edge, raw, server_context):
    _, port, _ = make_edge(auth=True, context=server_context)
    client = raw(port)
    client.greet()
    client.send(f"AUTH PLAIN {plain('anyone', 'anything')}\r\n".encode())
    client.expect(ENCRYPTION_REQUIRED)


def test_without_handle_auth_malformed_still_refused(
    make_edge, raw, server_context, client_context
):
    _, port, _ = make_edge(auth=True, context=server_context)
    client = raw(port)
    client.greet()
    starttls(client, client_context)
    client.send(b"AUTH PLAIN !!!\r\n")
    client.expect(BAD_AUTH_STRING)
    client.send(b"AUTH PLAIN =\r\n")
    code, _ = client.read_reply()
    assert code == "501"


# ------------------------------------------------------ broken TLS handshakes


@pytest.fixture
def short_tls_handshake(monkeypatch):
    # SmtpEdge does not pass tls_handshake_timeout through; change the
    # Server default instead so a silent client is dropped quickly.
    monkeypatch.setitem(Server.__init__.__kwdefaults__, "tls_handshake_timeout", 0.5)


def test_smtps_silent_client_is_dropped(
    short_tls_handshake, auth_edge, smtp, reply_is, client_context
):
    edge, port, queue = auth_edge(tls_immediately=True)
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        # Nothing is sent; the server gives up on the handshake by itself.
        assert edge.session_ended.wait(5)
        assert silent.recv(1) == b""
    finally:
        silent.close()
    client = smtp(port, cls=smtplib.SMTP_SSL, context=client_context)
    assert reply_is(client.login("alice", "secret"), AUTH_OK)
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    assert len(queue.envelopes) == 1


def test_starttls_silent_client_is_dropped(
    short_tls_handshake, auth_edge, raw, smtp, reply_is, client_context
):
    edge, port, _ = auth_edge()
    client = raw(port)
    client.greet()
    client.send(b"STARTTLS\r\n")
    client.expect(TLS_READY)
    assert edge.session_ended.wait(5)
    assert client.at_eof()
    good = smtp(port)
    good.starttls(context=client_context)
    assert reply_is(good.login("alice", "secret"), AUTH_OK)


def test_garbage_instead_of_client_hello(auth_edge, raw, smtp, reply_is, client_context):
    edge, port, queue = auth_edge()
    client = raw(port)
    client.greet()
    client.send(b"STARTTLS\r\n")
    client.expect(TLS_READY)
    client.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode() * 4)
    assert edge.session_ended.wait(5)
    with pytest.raises((OSError, EOFError)):
        # Whatever the server wrote (maybe a TLS alert), it is not SMTP.
        while True:
            line = client.read_line()
            assert not line.startswith(b"235")
    good = smtp(port)
    good.starttls(context=client_context)
    assert reply_is(good.login("alice", "secret"), AUTH_OK)
    assert good.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    assert len(queue.envelopes) == 1


def test_plaintext_client_on_smtps_port(auth_edge, raw, smtp, reply_is, client_context):
    edge, port, _ = auth_edge(tls_immediately=True)
    client = raw(port)
    client.send(f"EHLO x\r\nAUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    assert edge.session_ended.wait(5)
    client.close()
    good = smtp(port, cls=smtplib.SMTP_SSL, context=client_context)
    assert reply_is(good.login("alice", "secret"), AUTH_OK)


# ------------------------------------------------------------ logging


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_sasl_data_never_logged(auth_edge, smtp, reply_is, client_context, caplog, mechanism):
    _, port, _ = auth_edge()
    with caplog.at_level("DEBUG", logger="slimta.smtp.server"):
        client = smtp(port, local_hostname="client.test")
        client.starttls(context=client_context)
        client.ehlo()
        assert reply_is(smtp_auth(client, mechanism, "alice", "secret"), AUTH_OK)
        client.quit()
    text = caplog.text
    assert "recv" in text and "********" in text
    # PLAIN's and LOGIN's answers, and the start of CRAM-MD5's ("alice ...").
    for secret in (plain("alice", "secret"), b64("secret"), b64("alice"), b64("alice ")[:8]):
        assert secret not in text


def test_cleartext_auth_line_masked_in_log(auth_edge, raw, caplog):
    _, port, _ = auth_edge()
    with caplog.at_level("DEBUG", logger="slimta.smtp.server"):
        client = raw(port)
        client.greet()
        client.send(b"AUTH PLAIN " + plain("alice", "secret").encode() + b"\r\nNOOP\r\n")
        client.read_reply()
        client.read_reply()
    assert plain("alice", "secret") not in caplog.text
    assert "AUTH PLAIN ********" in caplog.text
