"""python-slimta 4.0's own example MTA runs unchanged against this package.

``slimta-mail.py`` and ``site_data.py`` (``../shared/compat/``, read-only,
never copied into the project) are copied to a temporary directory and run
there as a real process, with a certificate made by trustme in ``cert.pem``
(the script's default for both key and certificate). Its three listeners are
driven with smtplib:

* inbound (plain, STARTTLS offered): mail for the addresses of
  ``site_data.py`` is accepted and piped to ``tee {message_id}.eml``, with the
  Date, Message-Id and Received headers added; other recipients get
  ``550 5.7.1``; a client listed on ``zen.spamhaus.org`` gets ``520``;
* inbound implicit TLS with AUTH advertised: the same;
* outbound submission: MAIL without AUTH gets ``550 5.7.1``, bad credentials
  ``535 5.7.8``, and after STARTTLS and AUTH the message is relayed by MX to
  a sink on 127.0.0.1:25 (when this test may bind that port).

The one thing set from outside is the DNS resolver, as an operator would
set ``/etc/resolv.conf``: a few lines run before the script point
``slimta.util.dns.DNSResolver`` at a local DNS server, so that the DNSBL and
MX lookups are answered here and never leave the machine.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
import trustme

from dnsserver import DnsServer
from slimta.edge.smtp import SmtpEdge
from slimta.envelope import Envelope

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
#: Where the example lives: $SLIMTA_COMPAT_DIR, else ../shared/compat beside the clone.
COMPAT = Path(
    os.environ.get(
        "SLIMTA_COMPAT_DIR",
        ROOT.parent / "shared" / "compat" / "python-slimta-4.0-examples",
    )
)
DEADLINE = 20.0

#: Runs the script as ``python slimta-mail.py ARGS`` would, after pointing the
#: DNS resolver at the test's server (argv[1]).
LAUNCHER = """
import runpy, sys
from gevent import monkey
monkey.patch_all()
from slimta.util.dns import DNSResolver
DNSResolver.configure(servers=[sys.argv[1]], timeout=1.0, tries=1)
sys.argv = ["slimta-mail.py", *sys.argv[2:]]
runpy.run_path("slimta-mail.py", run_name="__main__")
"""

MESSAGE = b"From: <x@example.org>\r\nSubject: compat\r\n\r\nhello from 4.0\r\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(proc: subprocess.Popen[bytes], ports: list[int], log: Path) -> None:
    until = time.monotonic() + DEADLINE
    for port in ports:
        while True:
            assert proc.poll() is None, f"the example exited:\n{log.read_text()[-3000:]}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                break
            except OSError:
                assert time.monotonic() < until, f"port {port} never listened"
                # Polling a foreign process that has no other way to say it is ready.
                gevent.sleep(0.05)


def _wait_for(pattern: str, where: Path, log: Path) -> list[Path]:
    until = time.monotonic() + DEADLINE
    while not (found := sorted(where.glob(pattern))):
        assert time.monotonic() < until, f"no {pattern} in {where}:\n{log.read_text()[-3000:]}"
        # The pipe relay's child writes the file; nothing tells us when.
        gevent.sleep(0.05)
    return found


class _Sink:
    """A slimta SMTP edge standing in for the recipients' MX host."""

    def __init__(self) -> None:
        self.received: list[Envelope] = []
        self.arrived = gevent.event.Event()

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, Any]]:
        self.received.append(envelope)
        self.arrived.set()
        return [(envelope, "sink-id")]


@pytest.fixture
def example(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The example running; ``indirect`` parameter: list 127.0.0.1 on the DNSBL."""
    if not (COMPAT / "slimta-mail.py").is_file():
        pytest.skip(f"python-slimta's example is not at {COMPAT} (set SLIMTA_COMPAT_DIR)")
    for name in ("slimta-mail.py", "site_data.py"):
        shutil.copy(COMPAT / name, tmp_path / name)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    sink = _Sink()
    sink_edge = None
    try:
        listener = socket.create_server(("127.0.0.1", 25))
    except OSError:
        pass  # not root, or a mail server already there
    else:
        sink_edge = SmtpEdge(listener, sink, hostname="mx.example.net")
        sink_edge.start()

    ports = {name: _free_port() for name in ("inbound", "inbound_ssl", "outbound")}
    log = tmp_path / "output.txt"
    with DnsServer() as dns:
        dns.set("example.net", "MX", [(60, "10 localhost.")])
        if getattr(request, "param", False):
            dns.set("1.0.0.127.zen.spamhaus.org", "A", [(60, "127.0.0.2")])
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    LAUNCHER,
                    f"{dns.host}:{dns.port}",
                    "--inbound-port",
                    str(ports["inbound"]),
                    "--inbound-ssl-port",
                    str(ports["inbound_ssl"]),
                    "--outbound-port",
                    str(ports["outbound"]),
                ],
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_listening(proc, list(ports.values()), log)
            yield {
                "dir": tmp_path,
                "ports": ports,
                "context": client_context,
                "dns": dns,
                "sink": sink if sink_edge is not None else None,
                "log": log,
            }
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=DEADLINE)
            finally:
                if proc.poll() is None:
                    proc.kill()
                if sink_edge is not None:
                    sink_edge.kill()
        assert not dns.errors


def _check_delivered(example: dict[str, Any]) -> bytes:
    [eml] = _wait_for("*.eml", example["dir"], example["log"])
    data = eml.read_bytes()
    headers, _, body = data.partition(b"\r\n\r\n")
    assert body == b"hello from 4.0\r\n"
    names = [line.split(b":")[0] for line in headers.split(b"\r\n") if line[:1] not in b" \t"]
    assert names[0] == b"Received"
    assert {b"Date", b"Message-Id", b"Subject", b"From"} <= set(names)
    # tee named the file after the Message-Id the policy added.
    msg_id = next(line for line in headers.split(b"\r\n") if line.startswith(b"Message-Id:"))
    assert eml.name == msg_id.split(b":", 1)[1].strip().decode() + ".eml"
    return data


def test_inbound_accepts_for_site_addresses_and_pipes_to_tee(example: dict[str, Any]) -> None:
    with smtplib.SMTP("127.0.0.1", example["ports"]["inbound"], timeout=DEADLINE) as client:
        assert client.ehlo("client.example.org")[0] == 250
        assert client.has_extn("starttls")
        assert client.mail("x@example.org")[0] == 250
        code, text = client.rcpt("nobody@example.com")
        assert (code, text) == (550, b"5.7.1 Recipient <nobody@example.com> Not allowed")
        assert client.rcpt("user@example.com")[0] == 250
        code, text = client.data(MESSAGE)
        assert code == 250, text
    data = _check_delivered(example)
    assert b"for <user@example.com>" in data


def test_inbound_banner_is_the_site_banner(example: dict[str, Any]) -> None:
    with socket.create_connection(("127.0.0.1", example["ports"]["inbound"]), DEADLINE) as sock:
        banner = sock.makefile("rb").readline()
    assert banner.startswith(b"220 ")
    assert banner.rstrip().endswith(b"ESMTP example.com Mail Delivery Agent")


@pytest.mark.parametrize("example", [True], indirect=True)
def test_inbound_refuses_a_listed_client(example: dict[str, Any]) -> None:
    with socket.create_connection(("127.0.0.1", example["ports"]["inbound"]), DEADLINE) as sock:
        banner = sock.makefile("rb").readline()
    assert banner.startswith(b"520 ")


def test_inbound_implicit_tls(example: dict[str, Any]) -> None:
    port = example["ports"]["inbound_ssl"]
    with smtplib.SMTP_SSL(
        "localhost", port, context=example["context"], timeout=DEADLINE
    ) as client:
        client.ehlo("client.example.org")
        assert client.has_extn("auth")
        refused = client.sendmail("x@example.org", ["postmaster@example.com"], MESSAGE)
        assert refused == {}
    _check_delivered(example)


def test_outbound_needs_auth(example: dict[str, Any]) -> None:
    port = example["ports"]["outbound"]
    with smtplib.SMTP("localhost", port, timeout=DEADLINE) as client:
        client.starttls(context=example["context"])
        client.ehlo("client.example.org")
        assert client.mail("user@example.com") == (
            550,
            b"5.7.1 Sender <user@example.com> Not allowed",
        )
        client.rset()
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            client.login("user@example.com", "wrong")
        assert caught.value.smtp_code == 535
        assert caught.value.smtp_error == b"5.7.8 Authentication credentials invalid"


def test_outbound_relays_by_mx_after_auth(example: dict[str, Any]) -> None:
    port = example["ports"]["outbound"]
    with smtplib.SMTP("localhost", port, timeout=DEADLINE) as client:
        client.starttls(context=example["context"])
        client.ehlo("client.example.org")
        client.login("user@example.com", "secretpw")
        refused = client.sendmail("user@example.com", ["friend@example.net"], MESSAGE)
        assert refused == {}
    sink = example["sink"]
    if sink is None:
        pytest.skip("127.0.0.1:25 cannot be bound here: MX delivery not checked")
    assert sink.arrived.wait(DEADLINE), example["log"].read_text()[-3000:]
    [envelope] = sink.received
    assert envelope.sender == "user@example.com"
    assert envelope.recipients == ["friend@example.net"]
    header_bytes, body = envelope.flatten()
    assert body == b"hello from 4.0\r\n"
    assert b"\r\nMessage-Id: " in b"\r\n" + header_bytes
