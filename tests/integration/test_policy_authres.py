"""slimta.policy.authres against a real DNS server (tests/dnsserver.py).

SPF, DKIM key and DMARC policy records are TXT records on the test server;
messages are signed with a fresh RSA-2048 key by slimta's own DkimSign.
"""

from __future__ import annotations

import base64
import re
import time

import pytest

import dnsserver
from dnsserver import DnsServer
from slimta.envelope import Envelope
from slimta.policy.authres import AddAuthenticationResults
from slimta.util.dns import DNSResolver

pytest.importorskip("dkim")
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from slimta.policy.dkim import DkimSign

pytestmark = pytest.mark.timeout(30)

dns_server = dnsserver.dns_server

DOMAIN = "example.test"
SELECTOR = "sel"
IP = "192.0.2.10"
OTHER_IP = "198.51.100.1"
ID = "mx.receiver.test"

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@receiver.test\r\n"
    b"Subject: hello there\r\n"
    b"Date: Sun, 06 Dec 2026 05:00:00 +0000\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


def _txt(record: str) -> str:
    """*record* as TXT rdata text: quoted strings of at most 255 octets."""
    return " ".join(f'"{record[i : i + 200]}"' for i in range(0, len(record), 200))


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    """``(private PEM, DKIM key record)``, made here."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode("ascii")


@pytest.fixture
def zone(dns_server: DnsServer, key: tuple[bytes, str]) -> DnsServer:
    """SPF allows 192.0.2.0/24 for example.test; the key; p=reject."""
    dns_server.set(DOMAIN, "TXT", [(300, _txt("v=spf1 ip4:192.0.2.0/24 -all"))])
    dns_server.set(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT", [(300, _txt(key[1]))])
    dns_server.set(f"_dmarc.{DOMAIN}", "TXT", [(300, _txt("v=DMARC1; p=reject"))])
    return dns_server


def _envelope(
    data: bytes = MESSAGE,
    *,
    sender: str = "alice@example.test",
    ip: str | None = IP,
    signed_by: bytes | None = None,
) -> Envelope:
    env = Envelope(sender, ["bob@receiver.test"])
    env.parse(data)
    if signed_by is not None:
        DkimSign(SELECTOR, DOMAIN, signed_by).apply(env)
        assert env.flatten()[0].startswith(b"DKIM-Signature:")
    env.client = {"ip": ip, "host": None, "name": "mail.example.test", "protocol": "ESMTP"}
    return env


def _results(env: Envelope, **options: object) -> str:
    """Apply the policy; the value of the field it added, unfolded."""
    AddAuthenticationResults(ID, **options).apply(env)  # type: ignore[arg-type]
    header_bytes = env.flatten()[0]
    assert header_bytes.startswith(b"Authentication-Results: ")
    fields = re.findall(rb"^Authentication-Results:", header_bytes, re.MULTILINE | re.I)
    first = re.match(rb"Authentication-Results: ([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", header_bytes)
    assert first is not None
    for line in first.group(0).split(b"\r\n"):
        assert len(line) <= 78, line
    assert len(fields) >= 1
    return re.sub(rb"\r\n[ \t]", b" ", first.group(1)).decode("ascii")


def _with_body(env: Envelope, body: bytes) -> Envelope:
    env.message = body
    return env


def test_all_pass(zone: DnsServer, key: tuple[bytes, str]) -> None:
    env = _envelope(signed_by=key[0])
    assert _results(env) == (
        f"{ID}; spf=pass smtp.mailfrom=alice@example.test; "
        "dkim=pass header.d=example.test header.s=sel; "
        "dmarc=pass header.from=example.test policy.dmarc=reject"
    )


def test_spf_fail_dkim_pass_aligned_dmarc_passes(zone: DnsServer, key: tuple[bytes, str]) -> None:
    value = _results(_envelope(ip=OTHER_IP, signed_by=key[0]))
    assert "spf=fail smtp.mailfrom=alice@example.test;" in value
    assert "dkim=pass header.d=example.test" in value
    assert value.endswith("dmarc=pass header.from=example.test policy.dmarc=reject")


def test_body_change_fails_dkim_and_dmarc(zone: DnsServer, key: tuple[bytes, str]) -> None:
    env = _with_body(_envelope(ip=OTHER_IP, signed_by=key[0]), b"Hello Eve.\r\n")
    value = _results(env)
    assert "dkim=fail header.d=example.test header.s=sel;" in value
    assert value.endswith("dmarc=fail header.from=example.test policy.dmarc=reject")


def test_no_signature_spf_aligned_relaxed_and_strict(zone: DnsServer) -> None:
    zone.set("bounce.example.test", "TXT", [(300, _txt("v=spf1 ip4:192.0.2.10 -all"))])
    env = _envelope(sender="b@bounce.example.test")
    value = _results(env)
    assert value == (
        f"{ID}; spf=pass smtp.mailfrom=b@bounce.example.test; dkim=none; "
        "dmarc=pass header.from=example.test policy.dmarc=reject"
    )
    zone.set(f"_dmarc.{DOMAIN}", "TXT", [(300, _txt("v=DMARC1; p=quarantine; aspf=s"))])
    DNSResolver.cache.clear()
    value = _results(_envelope(sender="b@bounce.example.test"), dkim=False)
    assert value == (
        f"{ID}; spf=pass smtp.mailfrom=b@bounce.example.test; "
        "dmarc=fail header.from=example.test policy.dmarc=quarantine"
    )


def test_subdomain_uses_parent_record_and_sp(zone: DnsServer) -> None:
    zone.set(f"_dmarc.{DOMAIN}", "TXT", [(300, _txt("v=DMARC1; p=reject; sp=none"))])
    zone.set("news.example.test", "TXT", [(300, _txt("v=spf1 ip4:192.0.2.10 -all"))])
    data = MESSAGE.replace(b"alice@example.test", b"alice@news.example.test")
    value = _results(_envelope(data, sender="alice@news.example.test"))
    assert value.endswith("dmarc=pass header.from=news.example.test policy.dmarc=none")


def test_no_dmarc_record(zone: DnsServer) -> None:
    zone.remove(f"_dmarc.{DOMAIN}")
    value = _results(_envelope())
    assert value.endswith("dkim=none; dmarc=none header.from=example.test")


def test_message_without_from(zone: DnsServer) -> None:
    data = MESSAGE.replace(b"From: Alice <alice@example.test>\r\n", b"")
    assert _results(_envelope(data)).endswith("; dkim=none; dmarc=none")


@pytest.mark.parametrize(
    "record",
    ["v=DMARC1; p=bogus", "v=DMARC1; rua=mailto:a@example.test", "v=DMARC1; p=reject; adkim=x"],
)
def test_malformed_dmarc_record(zone: DnsServer, record: str) -> None:
    zone.set(f"_dmarc.{DOMAIN}", "TXT", [(300, _txt(record))])
    assert _results(_envelope()).endswith("dmarc=permerror header.from=example.test")


def test_two_from_fields_permerror(zone: DnsServer) -> None:
    data = b"From: mallory@evil.test\r\n" + MESSAGE
    assert _results(_envelope(data)).endswith("dmarc=permerror")


def test_servfail_gives_temperror(zone: DnsServer, key: tuple[bytes, str]) -> None:
    zone.fail(f"_dmarc.{DOMAIN}")
    zone.fail(f"{SELECTOR}._domainkey.{DOMAIN}")
    zone.fail(DOMAIN)
    value = _results(_envelope(signed_by=key[0]))
    assert value == (
        f"{ID}; spf=temperror smtp.mailfrom=alice@example.test; "
        "dkim=temperror header.d=example.test header.s=sel; "
        "dmarc=temperror header.from=example.test"
    )


def test_spf_temperror_makes_dmarc_temperror_not_fail(zone: DnsServer) -> None:
    zone.fail(DOMAIN)
    value = _results(_envelope())
    assert value == (
        f"{ID}; spf=temperror smtp.mailfrom=alice@example.test; dkim=none; "
        "dmarc=temperror header.from=example.test policy.dmarc=reject"
    )


def test_dns_timeout_gives_temperror_in_time(zone: DnsServer, key: tuple[bytes, str]) -> None:
    zone.drop(f"{SELECTOR}._domainkey.{DOMAIN}")
    zone.drop(f"_dmarc.{DOMAIN}")
    env = _envelope(signed_by=key[0])
    with zone.slimta_resolver(timeout=5.0):
        zone.set(DOMAIN, "TXT", [(300, _txt("v=spf1 ip4:192.0.2.0/24 -all"))])
        start = time.monotonic()
        value = _results(env, timeout=0.5)
        elapsed = time.monotonic() - start
    assert elapsed < 2.0
    assert "dkim=temperror header.d=example.test" in value
    assert value.endswith("dmarc=temperror header.from=example.test")


def test_missing_key_is_permerror(zone: DnsServer, key: tuple[bytes, str]) -> None:
    zone.remove(f"{SELECTOR}._domainkey.{DOMAIN}")
    value = _results(_envelope(ip=OTHER_IP, signed_by=key[0]))
    assert "dkim=permerror header.d=example.test header.s=sel;" in value
    assert value.endswith("dmarc=fail header.from=example.test policy.dmarc=reject")


def test_forged_results_removed_foreign_kept(zone: DnsServer) -> None:
    forged = (
        b"Authentication-Results: MX.Receiver.Test; dkim=pass header.d=bank.test\r\n"
        b"Authentication-Results: (looks real)\r\n mx.receiver.test;\r\n spf=pass\r\n"
        b"Authentication-Results: other.test; spf=pass smtp.mailfrom=x@other.test\r\n"
    )
    env = _envelope(forged + MESSAGE)
    _results(env)
    header_bytes = env.flatten()[0]
    assert b"bank.test" not in header_bytes
    assert b"looks real" not in header_bytes
    assert b"Authentication-Results: other.test; spf=pass" in header_bytes
    assert len(re.findall(rb"(?mi)^authentication-results:", header_bytes)) == 2
    assert header_bytes.endswith(MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n")


def test_injection_in_from_and_sender(zone: DnsServer) -> None:
    data = MESSAGE.replace(
        b"alice@example.test>", b"alice@example.test;dkim=pass header.d=bank.test>"
    )
    value = _results(_envelope(data, sender="x;\r\nX-Evil: 1@example.test"))
    assert "bank.test" not in value
    assert "X-Evil" not in value
    # The sender is no address: no smtp.mailfrom; the From domain is no
    # domain name: permerror, without header.from.
    assert value == f"{ID}; spf=pass; dkim=none; dmarc=permerror"
    quoted = _results(_envelope(sender='we;i"rd@example.test'))
    assert 'smtp.mailfrom="we;i\\"rd"@example.test;' in quoted


def test_null_sender_and_unknown_ip(zone: DnsServer) -> None:
    zone.set("mail.example.test", "TXT", [(300, _txt("v=spf1 ip4:192.0.2.10 -all"))])
    value = _results(_envelope(sender=""))
    assert value.startswith(f"{ID}; spf=pass smtp.mailfrom=postmaster@mail.example.test;")
    # The HELO domain is within the organizational domain: aligned.
    assert value.endswith("dmarc=pass header.from=example.test policy.dmarc=reject")
    value = _results(_envelope(ip=None))
    assert value == (f"{ID}; dkim=none; dmarc=fail header.from=example.test policy.dmarc=reject")
