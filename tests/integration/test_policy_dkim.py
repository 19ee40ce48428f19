"""slimta.policy.dkim end to end: keys in a real DNS server, a real Queue.

The public keys are TXT records of ``<selector>._domainkey.<domain>`` on
the test DNS server (tests/dnsserver.py); dkimpy's verifier looks them up
there with dnspython.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import dns.resolver
import pytest

import dnsserver
from dnsserver import DnsServer
from slimta.envelope import Envelope
from slimta.queue import Queue
from slimta.queue.dict import DictStorage

dkim = pytest.importorskip("dkim")
pytest.importorskip("nacl.signing")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa  # noqa: E402

from slimta.policy.dkim import DkimSign  # noqa: E402

pytestmark = pytest.mark.timeout(30)

dns_server = dnsserver.dns_server

DOMAIN = "example.test"

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@other.test\r\n"
    b"Subject: hello there\r\n"
    b"Date: Sun, 06 Dec 2026 05:00:00 +0000\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


def _txt(record: bytes) -> str:
    """*record* as TXT rdata text: quoted strings of at most 255 octets."""
    text = record.decode("ascii")
    return " ".join(f'"{text[i : i + 200]}"' for i in range(0, len(text), 200))


@pytest.fixture(scope="module")
def key_pairs() -> dict[str, tuple[str, bytes, bytes]]:
    """``algorithm -> (selector, private PEM, TXT record)``, made here."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    none = serialization.NoEncryption()
    pem = serialization.Encoding.PEM
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_public = ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return {
        "rsa-sha256": (
            "rsa2048",
            rsa_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, none),
            b"v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_public),
        ),
        "ed25519-sha256": (
            "ed",
            ed_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, none),
            b"v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_public),
        ),
    }


@pytest.fixture
def verify(
    dns_server: DnsServer, key_pairs: dict[str, tuple[str, bytes, bytes]]
) -> Callable[[bytes], bool]:
    """dkimpy's verifier, looking keys up on the test DNS server."""
    for selector, _, record in key_pairs.values():
        dns_server.set(f"{selector}._domainkey.{DOMAIN}", "TXT", [(300, _txt(record))])
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.host]
    resolver.port = dns_server.port
    resolver.lifetime = 5.0

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        # RFC 6376 3.6.2.2: the strings of one record are joined.
        return b"".join(answer[0].strings)

    def check(message: bytes) -> bool:
        return bool(dkim.verify(message, dnsfunc=dnsfunc))

    return check


def _policy(key_pairs, algorithm: str, **options) -> DkimSign:
    selector, private, _ = key_pairs[algorithm]
    return DkimSign(selector, DOMAIN, private, algorithm=algorithm, **options)


def _signed(key_pairs, algorithm: str, data: bytes = MESSAGE, **options) -> bytes:
    env = Envelope("alice@example.test", ["bob@other.test"])
    env.parse(data)
    _policy(key_pairs, algorithm, **options).apply(env)
    header_bytes, body = env.flatten()
    return header_bytes + body


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_verifies_against_the_dns_record(
    dns_server: DnsServer, verify, key_pairs, algorithm: str
) -> None:
    message = _signed(key_pairs, algorithm)
    assert message.startswith(b"DKIM-Signature:")
    assert verify(message)
    selector = key_pairs[algorithm][0]
    # Looked up there (twice for RSA: the record is too big for UDP, then TCP).
    assert dns_server.queries[(f"{selector}._domainkey.{DOMAIN}.", "TXT")] >= 1
    # Tampering, and what tampering is allowed.
    assert not verify(message.replace(b"Hello Bob.", b"Hello Eve."))
    assert not verify(message.replace(b"Subject: hello", b"Subject: goodbye"))
    assert verify(message.replace(b"To:", b"X-Added: unsigned\r\nTo:"))
    assert verify(message.replace(b"Subject: hello there", b"SUBJECT:  hello\r\n\tthere"))


def test_wrong_key_in_dns_fails(dns_server: DnsServer, verify, key_pairs) -> None:
    message = _signed(key_pairs, "ed25519-sha256")
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = other.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    dns_server.set(
        f"ed._domainkey.{DOMAIN}",
        "TXT",
        [(300, _txt(b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)))],
    )
    assert not verify(message)


def test_through_a_queue_the_stored_message_verifies(verify, key_pairs) -> None:
    store = DictStorage()
    queue = Queue(store)
    queue.add_policy(_policy(key_pairs, "rsa-sha256", oversign=True))
    outside = Envelope("carol@other.test", ["bob@other.test"])
    outside.parse(MESSAGE.replace(b"alice@example.test>", b"carol@other.test>"))
    env = Envelope("alice@example.test", ["bob@other.test"])
    env.parse(MESSAGE.replace(b"\r\n", b"\n"))  # bare LF: stored as sent, CRLF

    results = queue.enqueue(env) + queue.enqueue(outside)
    ids = [result for _, result in results]
    assert all(isinstance(id, str) for id in ids), results
    stored = [store.get(id)[0] for id in ids]
    messages = [b"".join(envelope.flatten()) for envelope in stored]
    assert messages[0].startswith(b"DKIM-Signature:")
    assert messages[0].endswith(MESSAGE)
    assert verify(messages[0])
    # Not our domain: stored as received.
    assert messages[1] == MESSAGE.replace(b"alice@example.test>", b"carol@other.test>")
