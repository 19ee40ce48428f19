"""The scripts of ``examples/`` as real processes.

Each example is started on ``127.0.0.1`` port 0 (it logs the port it got) and
sent mail with :mod:`smtplib` or :mod:`http.client`; what it delivers is read
back from its Maildirs, or received here by an in-process
:class:`~slimta.edge.smtp.SmtpEdge` (smarthost, MX and submission), a small
LMTP server (LMTP) and ``tests/dnsserver.py`` (MX records, DNS blocklists).
Waiting is done on the example's log lines, read from its standard error
with a deadline, or on events set by the receivers here.

Every example also has a ``--help`` test, bad-option tests (argparse's exit
status 2 and a message naming the option) and an ``--open-relay`` test:
without the flag it refuses foreign mail (checked in the smoke tests), with
it it accepts and says so with a warning.
"""

from __future__ import annotations

import base64
import http.client
import mailbox
import os
import re
import select
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import dkim
import gevent
import gevent.queue
import pytest
import trustme
from conftest import reply_is
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from gevent.server import StreamServer

from dnsserver import DnsServer
from slimta.edge.smtp import SmtpValidators
from slimta.lookup.auth import hash_password

pytestmark = pytest.mark.timeout(60)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ALL = sorted(path.name for path in EXAMPLES.glob("*.py"))
#: Seconds any one wait (a log line, a delivery, an exit) may take.
DEADLINE = 30.0

RELAYING_DENIED = ("550", "5.7.1")
NO_MAILBOX = ("550", "5.1.1")
NO_FROM = ("550", "5.6.0")
LISTED = ("554", "5.7.1")
STARTTLS_FIRST = ("530", "5.7.0")
ENCRYPTION_REQUIRED = ("538", "5.7.11")
BAD_CREDENTIALS = ("535", "5.7.8")
NOT_YOUR_ADDRESS = ("553", "5.7.1")
RCPT_OK = ("250", "2.1.5")

MESSAGE = b"From: Carol <carol@example.org>\r\nSubject: hello\r\n\r\nHello there.\r\n"


def test_every_example_is_covered() -> None:
    # A new example needs its smoke test here (and a row in EXTRA_ARGS).
    assert sorted(EXTRA_ARGS) == ALL


class Example:
    """One example process and the lines it logged so far."""

    def __init__(self, name: str, *args: str, cwd: Path) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._partial = b""
        self._seen = 0
        self.host = ""
        self.port = 0

    def _read_more(self, until: float) -> bool:
        """Read what the process wrote; False at its end of output."""
        assert self.proc.stderr is not None
        left = until - time.monotonic()
        assert left > 0, f"{self.name} timed out; it logged:\n" + "\n".join(self.lines)
        # select is gevent's here: the receivers of this process run meanwhile.
        readable, _, _ = select.select([self.proc.stderr.fileno()], [], [], left)
        if not readable:
            return True
        chunk = os.read(self.proc.stderr.fileno(), 65536)
        if not chunk:
            return False
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        self.lines += [line.decode("utf-8", "replace") for line in complete]
        return True

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first line not waited for before that matches *pattern*."""
        until = time.monotonic() + DEADLINE
        regex = re.compile(pattern)
        while True:
            while self._seen < len(self.lines):
                match = regex.search(self.lines[self._seen])
                self._seen += 1
                if match:
                    return match
            if not self._read_more(until):
                raise AssertionError(
                    f"{self.name} ended before logging {pattern!r}:\n" + "\n".join(self.lines)
                )

    def ready(self) -> Example:
        """Wait for the ``listening on HOST:PORT`` line."""
        match = self.wait_for(r"listening on ([\d.]+):(\d+)")
        self.host, self.port = match.group(1), int(match.group(2))
        return self

    def smtp(self, source: str = "127.0.0.1") -> smtplib.SMTP:
        """An SMTP client connected from *source* (any 127.x address works on Linux)."""
        return smtplib.SMTP(self.host, self.port, timeout=DEADLINE, source_address=(source, 0))

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then wait for the exit: ``(status, everything logged)``."""
        self.proc.send_signal(signal.SIGTERM)
        until = time.monotonic() + DEADLINE
        while self._read_more(until):
            pass
        status = self.proc.wait(timeout=max(0.1, until - time.monotonic()))
        return status, "\n".join(self.lines)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()


Run = Callable[..., Example]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    """``run(name, *args)`` starts ``examples/<name>`` in *tmp_path*; killed at teardown."""
    started: list[Example] = []

    def start(name: str, *args: str) -> Example:
        example = Example(name, *args, cwd=tmp_path)
        started.append(example)
        return example

    yield start
    for example in started:
        example.close()


def stopped_cleanly(example: Example) -> None:
    status, log = example.stop()
    assert status == 0, log
    assert "Traceback" not in log, log


def replied(error: smtplib.SMTPResponseException) -> tuple[int, bytes]:
    """The reply in an smtplib exception."""
    return error.smtp_code, error.smtp_error


def delivered(maildir: Path, count: int = 1) -> list[bytes]:
    """The files of the Maildir *maildir*, exactly as written; it must hold *count*."""
    box = mailbox.Maildir(maildir, factory=None, create=False)
    messages = []
    for key in box.iterkeys():
        with box.get_file(key) as file:
            messages.append(file.read())
    assert len(messages) == count, messages
    return messages


# --- TLS and users, shared by several examples ---------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path, tls_ca: trustme.CA) -> dict[str, Path]:
    """``cert``, ``key`` (for 127.0.0.1 and mx.test) and ``ca`` PEM files."""
    cert = tls_ca.issue_cert("127.0.0.1", "mx.test")
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(files["cert"]), append=True)
    cert.private_key_pem.write_to_path(str(files["key"]))
    tls_ca.cert_pem.write_to_path(str(files["ca"]))
    return files


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.toml"
    # The line "slimta passwd alice@example.org" prints.
    path.write_text(f'"alice@example.org" = "{hash_password("secret")}"\n')
    return path


#: Arguments each example needs to start (besides --listen), given the test's files.
EXTRA_ARGS: dict[str, Callable[[Path, dict[str, Path], Path], list[str]]] = {
    "slimta-http.py": lambda tmp, tls, users: [],
    "slimta-lmtp.py": lambda tmp, tls, users: ["--lmtp", "127.0.0.1:9"],
    "slimta-mx.py": lambda tmp, tls, users: [],
    "slimta-policies.py": lambda tmp, tls, users: [],
    "slimta-receive.py": lambda tmp, tls, users: [],
    "slimta-smarthost.py": lambda tmp, tls, users: ["127.0.0.1:9"],
    "slimta-submission.py": lambda tmp, tls, users: [
        *("--cert", str(tls["cert"]), "--key", str(tls["key"]), "--users", str(users)),
    ],
}


# --- --help, bad options, --open-relay ------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_help(name: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--help"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
    # Every example listens where it is told and refuses to relay unless told.
    assert "--listen HOST:PORT" in result.stdout
    assert "--open-relay" in result.stdout


#: What each example requires on its command line, so that argparse gets to
#: the option under test.
REQUIRED = {
    "slimta-smarthost.py": ["mail.test"],
    "slimta-submission.py": ["--cert", "c.pem", "--key", "k.pem", "--users", "u.toml"],
}

BAD_OPTIONS = (
    [
        (name, [*REQUIRED.get(name, []), "--no-such-option"], "unrecognized arguments: --no-such")
        for name in ALL
    ]
    + [(name, ["--listen", "localhost"], "argument --listen: expected HOST:PORT") for name in ALL]
    + [
        ("slimta-receive.py", ["--max-size", "10"], "argument --max-size: expected at least 1024"),
        ("slimta-submission.py", ["--cert", "c.pem", "--key", "k.pem"], "required: --users"),
        (
            "slimta-submission.py",
            ["--users", "u", "--cert", "nope", "--key", "nope"],
            "--cert/--key",
        ),
        ("slimta-smarthost.py", [], "the following arguments are required: HOST[:PORT]"),
        ("slimta-smarthost.py", ["mail.test:99999"], "expected HOST[:PORT]"),
        (
            "slimta-smarthost.py",
            ["mail.test", "--username", "me"],
            "--username and --password-file",
        ),
        ("slimta-smarthost.py", ["mail.test", "--allow", "10.0.0.0/33"], "argument --allow"),
        (
            "slimta-smarthost.py",
            ["mail.test", "--tls", "sometimes"],
            "argument --tls: invalid choice",
        ),
        ("slimta-mx.py", ["--mx-port", "0"], "argument --mx-port: expected a port"),
        ("slimta-http.py", ["--cert", "c.pem"], "--cert and --key go together"),
        ("slimta-http.py", ["--api-key-file", "missing.txt"], "argument --api-key-file"),
        ("slimta-policies.py", ["--forward", "(", "x"], "argument --forward"),
        ("slimta-policies.py", ["--dkim-domain", "example.org"], "go together"),
    ]
)


@pytest.mark.parametrize(("name", "args", "message"), BAD_OPTIONS)
def test_bad_option(tmp_path: Path, name: str, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "usage: " in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ALL)
def test_open_relay_only_when_told(
    run: Run, tmp_path: Path, tls_files: dict[str, Path], users_file: Path, name: str
) -> None:
    args = EXTRA_ARGS[name](tmp_path, tls_files, users_file)
    example = run(name, "--listen", "127.0.0.1:0", "--open-relay", *args)
    example.wait_for(r"WARNING .*--open-relay")
    example.ready()
    if name == "slimta-http.py":
        assert post(example, "anyone@far-away.test", key=None).status == 204
    else:
        with example.smtp(source="127.0.0.2") as client:
            client.ehlo("client.test")
            client.mail("someone@elsewhere.test")
            assert reply_is(client.rcpt("anyone@far-away.test"), RCPT_OK)
    stopped_cleanly(example)


# --- slimta-receive.py ------------------------------------------------------------------


def test_receive(run: Run, tmp_path: Path) -> None:
    with DnsServer() as dns:
        # 127.0.0.2 is listed on bl.test (RFC 5782 2.1: an A record 127.0.0.x).
        dns.set("2.0.0.127.bl.test", "A", [(60, "127.0.0.2")])
        example = run(
            "slimta-receive.py",
            *("--listen", "127.0.0.1:0", "--hostname", "mx.test"),
            *("--domain", "example.org", "--mailbox", "alice"),
            *("--dnsbl", "bl.test", "--dns-server", f"127.0.0.1:{dns.port}"),
            *("--maildir", "mail", "--spool", "spool"),
        ).ready()

        with pytest.raises(smtplib.SMTPConnectError) as listed:
            example.smtp(source="127.0.0.2")
        assert reply_is(replied(listed.value), LISTED)

        with example.smtp() as client:
            client.ehlo("client.test")
            client.mail("carol@example.org")
            assert reply_is(client.rcpt("bob@other.test"), RELAYING_DENIED)
            assert reply_is(client.rcpt("bob@example.org"), NO_MAILBOX)
            assert reply_is(client.rcpt("alice@example.org"), RCPT_OK)
            assert reply_is(client.data(b"Subject: no From\r\n\r\nhi\r\n"), NO_FROM)
            client.rset()
            assert client.sendmail("carol@example.org", ["Alice@Example.org"], MESSAGE) == {}
        example.wait_for(r"maildir:.*:delivered .*recipient='Alice@Example.org'")

    (message,) = delivered(tmp_path / "mail" / "alice")
    assert message.startswith(
        b"Return-Path: <carol@example.org>\r\nDelivered-To: Alice@Example.org\r\n"
    )
    parsed = message_from_bytes(message)
    assert "by mx.test" in parsed["Received"]
    assert parsed["Date"] and parsed["Message-Id"]
    assert parsed.get_payload() == "Hello there.\r\n"
    stopped_cleanly(example)


# --- slimta-submission.py --------------------------------------------------------------


def test_submission(
    run: Run,
    make_edge: Any,
    tls_files: dict[str, Path],
    client_context: ssl.SSLContext,
    users_file: Path,
) -> None:
    _, sink_port, sink = make_edge()
    example = run(
        "slimta-submission.py",
        *("--listen", "127.0.0.1:0", "--hostname", "mx.test"),
        *("--cert", str(tls_files["cert"]), "--key", str(tls_files["key"])),
        *("--users", str(users_file), "--smarthost", f"127.0.0.1:{sink_port}"),
    ).ready()

    with example.smtp() as client:
        client.ehlo("laptop.test")
        assert reply_is(client.mail("alice@example.org"), STARTTLS_FIRST)
        with pytest.raises(smtplib.SMTPAuthenticationError) as cleartext:
            client.login("alice@example.org", "secret")
        assert reply_is(
            (cleartext.value.smtp_code, cleartext.value.smtp_error), ENCRYPTION_REQUIRED
        )

        client.starttls(context=client_context)
        client.ehlo("laptop.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
            client.login("alice@example.org", "not the password")
        assert reply_is(replied(wrong.value), BAD_CREDENTIALS)
        client.login("ALICE@example.org", "secret")
        assert reply_is(client.mail("mallory@example.org"), NOT_YOUR_ADDRESS)
        client.rset()
        assert client.sendmail("alice@example.org", ["bob@far-away.test"], MESSAGE) == {}

    assert sink.wait(DEADLINE), "nothing reached the smarthost"
    (envelope,) = sink.envelopes
    assert envelope.sender == "alice@example.org"
    assert envelope.recipients == ["bob@far-away.test"]
    received = " ".join(envelope.headers["Received"].split())
    assert "by mx.test" in received
    assert "with ESMTPSA" in received  # TLS and AUTH (RFC 3848)
    stopped_cleanly(example)


# --- slimta-smarthost.py ----------------------------------------------------------------


class SmarthostValidators(SmtpValidators):
    """The provider's server: only its one user may send, after STARTTLS."""

    logins: list[tuple[str, str | None]] = []

    def handle_auth(self, reply: Any, creds: Any) -> None:
        if creds.authcid != "relay-user" or not creds.check_secret("relay-password"):
            reply.code = "535"
            reply.message = "5.7.8 Authentication credentials invalid"
        else:
            self.logins.append((creds.authcid, self.session.security))

    def handle_mail(self, reply: Any, sender: str, params: Any) -> None:
        if not self.session.auth:
            reply.code = "530"
            reply.message = "5.7.0 Authentication required"


def test_smarthost(
    run: Run,
    tmp_path: Path,
    make_edge: Any,
    server_context: ssl.SSLContext,
    tls_ca: trustme.CA,
) -> None:
    SmarthostValidators.logins = []
    _, sink_port, sink = make_edge(
        context=server_context, auth=True, validator_class=SmarthostValidators
    )
    (tmp_path / "password.txt").write_text("relay-password\n")
    tls_ca.cert_pem.write_to_path(str(tmp_path / "provider-ca.pem"))
    example = run(
        "slimta-smarthost.py",
        f"127.0.0.1:{sink_port}",
        *("--listen", "127.0.0.1:0", "--allow", "127.0.0.1", "--hostname", "relay.test"),
        *("--tls", "required", "--cafile", "provider-ca.pem"),
        *("--username", "relay-user", "--password-file", "password.txt"),
    ).ready()

    with example.smtp(source="127.0.0.2") as client:
        client.ehlo("stranger.test")
        client.mail("someone@example.org")
        assert reply_is(client.rcpt("bob@far-away.test"), RELAYING_DENIED)
    with example.smtp() as client:
        assert client.sendmail("app@example.org", ["bob@far-away.test"], MESSAGE) == {}

    assert sink.wait(DEADLINE), "nothing reached the smarthost"
    (envelope,) = sink.envelopes
    assert envelope.recipients == ["bob@far-away.test"]
    assert "by relay.test" in envelope.headers["Received"]
    # Logged in with the password file's password, inside TLS.
    assert SmarthostValidators.logins == [("relay-user", "TLS")]
    stopped_cleanly(example)


# --- slimta-mx.py ------------------------------------------------------------------------


def test_mx(run: Run, make_edge: Any) -> None:
    _, sink_port, sink = make_edge()
    # The exchangers' names are resolved by the system (getaddrinfo), not by
    # --dns-server: "localhost" is one it knows.
    zone = {
        "example.test": {"MX": [(300, "10 localhost.")]},
        "other.test": {"MX": [(300, "20 localhost.")]},
    }
    with DnsServer(zone) as dns:
        example = run(
            "slimta-mx.py",
            *("--listen", "127.0.0.1:0", "--allow", "127.0.0.1", "--hostname", "out.test"),
            *("--dns-server", f"127.0.0.1:{dns.port}", "--mx-port", str(sink_port)),
        ).ready()
        with example.smtp(source="127.0.0.2") as client:
            client.ehlo("stranger.test")
            client.mail("someone@example.org")
            assert reply_is(client.rcpt("bob@example.test"), RELAYING_DENIED)
        with example.smtp() as client:
            refused = client.sendmail(
                "app@example.org", ["bob@example.test", "carol@other.test"], MESSAGE
            )
            assert refused == {}

        # One copy per recipient domain, each sent to the MX host.
        until = time.monotonic() + DEADLINE
        while len(sink.envelopes) < 2:
            assert sink.event.wait(until - time.monotonic()), "the copies did not arrive"
            sink.event.clear()
    assert sorted(envelope.recipients[0] for envelope in sink.envelopes) == [
        "bob@example.test",
        "carol@other.test",
    ]
    assert all(len(envelope.recipients) == 1 for envelope in sink.envelopes)
    assert dns.queries[("example.test.", "MX")] == 1
    stopped_cleanly(example)


# --- slimta-lmtp.py -----------------------------------------------------------------------


class LmtpServer:
    """A small LMTP server (RFC 2033) in this process: one reply per
    recipient after the data; ``nobody@`` is unknown (``550 5.1.1``)."""

    def __init__(self) -> None:
        #: ``(sender, recipients, data)`` per message received.
        self.messages: gevent.queue.Queue[tuple[str, list[str], bytes]] = gevent.queue.Queue()
        self.server = StreamServer(("127.0.0.1", 0), self._session)
        self.server.start()
        self.port: int = self.server.server_port

    def _session(self, sock: Any, address: Any) -> None:
        stream = sock.makefile("rb")
        sock.sendall(b"220 lmtp.test LMTP ready\r\n")
        sender, recipients = "", []
        while line := stream.readline():
            verb = line[:4].upper()
            path = re.search(rb"<([^>]*)>", line)
            address_text = path.group(1).decode() if path else ""
            if verb == b"LHLO":
                sock.sendall(b"250-lmtp.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"MAIL":
                sender, recipients = address_text, []
                sock.sendall(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT" and address_text.startswith("nobody@"):
                sock.sendall(b"550 5.1.1 No such user\r\n")
            elif verb == b"RCPT":
                recipients.append(address_text)
                sock.sendall(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                sock.sendall(b"354 Go ahead\r\n")
                data = b""
                while (text := stream.readline()) != b".\r\n":
                    data += text[1:] if text.startswith(b".") else text
                self.messages.put((sender, recipients, data))
                for recipient in recipients:  # RFC 2033 4.2: one reply per recipient
                    sock.sendall(f"250 2.0.0 <{recipient}> delivered\r\n".encode())
            elif verb == b"RSET":
                sock.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                sock.sendall(b"221 2.0.0 Bye\r\n")
                break
            else:
                sock.sendall(b"500 5.5.1 Unknown command\r\n")
        sock.close()


def test_lmtp(run: Run) -> None:
    lmtp = LmtpServer()
    try:
        example = run(
            "slimta-lmtp.py",
            *("--listen", "127.0.0.1:0", "--hostname", "mx.test", "--domain", "example.org"),
            *("--lmtp", f"127.0.0.1:{lmtp.port}"),
        ).ready()
        with example.smtp() as client:
            client.ehlo("client.test")
            client.mail("carol@example.org")
            assert reply_is(client.rcpt("bob@other.test"), RELAYING_DENIED)
            client.rset()
            recipients = ["alice@example.org", "bob@example.org", "nobody@example.org"]
            assert client.sendmail("carol@example.org", recipients, MESSAGE) == {}

        sender, delivered_to, data = lmtp.messages.get(timeout=DEADLINE)
        assert (sender, delivered_to) == ("carol@example.org", recipients[:2])
        assert b"by mx.test" in data and data.endswith(b"\r\n\r\nHello there.\r\n")
        # The unknown recipient alone is bounced to the sender, who is local.
        sender, delivered_to, bounce = lmtp.messages.get(timeout=DEADLINE)
        assert (sender, delivered_to) == ("", ["carol@example.org"])
        assert b"nobody@example.org" in bounce and b"5.1.1" in bounce
        stopped_cleanly(example)
    finally:
        lmtp.server.stop()


# --- slimta-http.py -----------------------------------------------------------------------


def post(example: Example, recipient: str, key: str | None, path: str = "/message") -> Any:
    connection = http.client.HTTPConnection(example.host, example.port, timeout=DEADLINE)
    headers = {
        "Content-Type": "message/rfc822",
        "X-Envelope-Sender": base64.b64encode(b"app@example.com").decode(),
        "X-Envelope-Recipient": base64.b64encode(recipient.encode()).decode(),
    }
    if key is not None:
        headers["X-Api-Key"] = key
    connection.request("POST", path, body=MESSAGE, headers=headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_http(run: Run, tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("first-key\nsecond-key\n")
    example = run(
        "slimta-http.py",
        *("--listen", "127.0.0.1:0", "--hostname", "web.test", "--domain", "example.org"),
        *("--api-key-file", "keys.txt", "--maildir", "mail"),
    ).ready()

    assert post(example, "alice@example.org", key=None).status == 401
    assert post(example, "alice@example.org", key="guess").status == 401
    refused = post(example, "bob@other.test", key="first-key")
    assert refused.status == 403
    assert refused.getheader("X-Smtp-Reply").startswith('550; message="5.7.1 ')
    assert post(example, "alice@example.org", key="first-key", path="/other").status == 404

    accepted = post(example, "alice@example.org", key="second-key")
    assert accepted.status == 204
    assert accepted.getheader("X-Smtp-Reply").startswith("250;")
    queue_id = accepted.getheader("X-Queue-Id")
    assert queue_id
    example.wait_for(r"maildir:.*:delivered .*recipient='alice@example.org'")

    (message,) = delivered(tmp_path / "mail" / "alice")
    parsed = message_from_bytes(message)
    assert f"id {queue_id}" in " ".join(parsed["Received"].split())
    assert parsed.get_payload() == "Hello there.\r\n"
    stopped_cleanly(example)


# --- slimta-policies.py -------------------------------------------------------------------


def test_policies(run: Run, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "dkim.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    record = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)
    example = run(
        "slimta-policies.py",
        *("--listen", "127.0.0.1:0", "--hostname", "mx.test", "--domain", "example.org"),
        *("--forward", "^postmaster@", "alice@", "--maildir", "mail"),
        *("--dkim-domain", "example.org", "--dkim-selector", "sel", "--dkim-key", "dkim.pem"),
        *("--dkim-algorithm", "ed25519-sha256"),
    ).ready()

    recipients = ["alice@example.org", "postmaster@example.org", "bob@example.org"]
    with example.smtp() as client:
        assert client.sendmail("carol@example.org", recipients, MESSAGE) == {}
    # Split into one copy per recipient: three deliveries.
    for _ in recipients:
        example.wait_for(r"maildir:.*:delivered")

    alice = delivered(tmp_path / "mail" / "alice", 2)
    (bob,) = delivered(tmp_path / "mail" / "bob")
    original_to = sorted(message_from_bytes(message)["X-Original-To"] for message in alice)
    assert original_to == ["alice@example.org", "postmaster@example.org"]
    assert message_from_bytes(bob)["X-Original-To"] == "bob@example.org"

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return record if name == b"sel._domainkey.example.org." else None

    for message in [*alice, bob]:
        assert message.startswith(b"Return-Path: <carol@example.org>\r\n")
        assert b"\r\nDKIM-Signature: " in message
        assert dkim.verify(message, dnsfunc=dnsfunc), message
    stopped_cleanly(example)
