"""DANE TLSA matching (RFC 6698, 7671, 7672) against trustme-made certificates.

Every usable combination of usage (DANE-TA 2, DANE-EE 3), selector (0 whole
certificate, 1 public key) and matching type (0 exact, 1 SHA-256, 2 SHA-512)
authenticates the chain it was made from and nothing else. The lookups
(AD bit, unusable records, failures) are tested against a DNS server in
tests/integration/test_mx_tls_policy.py.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from slimta.relay.smtp.dane import DANE_EE, DANE_TA, check_chain, record_matches, spki_der, usable
from slimta.relay.smtp.tlspolicy import TlsResult
from slimta.util.dns import TlsaRecord

HOST = "mx1.test"
NOW = datetime.datetime.now(datetime.UTC)


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))


def chain_of(leaf: trustme.LeafCert) -> list[bytes]:
    """The DER chain a server with *leaf* sends: leaf, then intermediates."""
    return [der(blob.bytes()) for blob in leaf.cert_chain_pems]


def tlsa(usage: int, selector: int, mtype: int, cert: bytes) -> TlsaRecord:
    data = cert if selector == 0 else spki_der(cert)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return TlsaRecord(usage, selector, mtype, data, 300)


def flipped(record: TlsaRecord) -> TlsaRecord:
    data = bytearray(record.cert_association_data)
    data[-1] ^= 1
    return TlsaRecord(record.cert_usage, record.selector, record.matching_type, bytes(data), 300)


@pytest.fixture(scope="module")
def root() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def inter(root: trustme.CA) -> trustme.CA:
    return root.create_child_ca()


@pytest.fixture(scope="module")
def chain(inter: trustme.CA) -> list[bytes]:
    """mx1.test's chain: leaf issued by an intermediate CA, and that CA."""
    made = chain_of(inter.issue_cert(HOST))
    assert len(made) == 2
    return made


# ----------------------------------------------------------------- records
@pytest.mark.parametrize(
    ("usage", "selector", "mtype", "size", "is_usable"),
    [
        (3, 1, 1, 32, True),
        (3, 0, 2, 64, True),
        (2, 1, 0, 91, True),
        (2, 0, 1, 32, True),
        (0, 1, 1, 32, False),  # PKIX-TA: not used for SMTP (RFC 7672 3.1.3)
        (1, 1, 1, 32, False),  # PKIX-EE: idem
        (4, 1, 1, 32, False),
        (3, 2, 1, 32, False),
        (3, 1, 3, 32, False),
        (3, 1, 1, 31, False),  # SHA-256 data must be 32 bytes
        (3, 1, 2, 32, False),  # SHA-512 data must be 64 bytes
        (3, 1, 0, 0, False),
    ],
)
def test_usable_records(usage: int, selector: int, mtype: int, size: int, is_usable: bool) -> None:
    assert usable(TlsaRecord(usage, selector, mtype, b"\x01" * size, 300)) is is_usable


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def test_spki_is_the_certificates_public_key(key_type: trustme.KeyType) -> None:
    ca = trustme.CA(key_type=key_type)
    for cert in [*chain_of(ca.issue_cert(HOST, key_type=key_type)), der(ca.cert_pem.bytes())]:
        expected = (
            x509.load_der_x509_certificate(cert)
            .public_key()
            .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        )
        assert spki_der(cert) == expected


@pytest.mark.parametrize(
    "data", [b"", b"\x30", b"\x30\x03\x02\x01", b"\x02\x01\x00", b"not a certificate at all"]
)
def test_spki_of_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        spki_der(data)


# -------------------------------------------------------- every combination
@pytest.mark.parametrize("usage", [DANE_TA, DANE_EE])
@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_each_usage_selector_and_matching_type(
    chain: list[bytes], usage: int, selector: int, mtype: int
) -> None:
    # DANE-EE names the leaf; DANE-TA the intermediate CA the server sends.
    cert = chain[0] if usage == DANE_EE else chain[1]
    record = tlsa(usage, selector, mtype, cert)
    assert usable(record)
    assert record_matches(record, cert)
    assert check_chain([record], chain, HOST) is None
    # The same kind of record for another CA's key, or a digest one bit
    # off, matches nothing. (A "2 0 0" certificate with a bit flipped in its
    # signature still names the same key: the key is what the record trusts.)
    other_ca = trustme.CA()
    other = der(other_ca.cert_pem.bytes())
    if usage == DANE_EE:
        other = chain_of(other_ca.issue_cert(HOST))[0]
    bad_records = [tlsa(usage, selector, mtype, other)]
    if mtype != 0 or selector == 1:
        bad_records.append(flipped(record))
    for bad in bad_records:
        assert not record_matches(bad, cert)
        result = check_chain([bad], chain, HOST)
        assert result is not None and result[0] is TlsResult.CERTIFICATE_NOT_TRUSTED
        assert "mx1.test" in result[1]


def test_ee_record_does_not_match_the_ca(chain: list[bytes]) -> None:
    # DANE-EE is about the leaf only, even if a CA of the chain matches.
    assert check_chain([tlsa(DANE_EE, 1, 1, chain[1])], chain, HOST) is not None


def test_one_matching_record_among_others(chain: list[bytes], root: trustme.CA) -> None:
    other = der(root.issue_cert("other.test").cert_chain_pems[0].bytes())
    records = [
        tlsa(DANE_EE, 1, 1, other),
        TlsaRecord(1, 1, 1, hashlib.sha256(spki_der(chain[0])).digest(), 300),  # PKIX-EE
        tlsa(DANE_EE, 1, 2, chain[0]),
    ]
    assert check_chain(records, chain, HOST) is None


def test_pkix_usages_authenticate_nothing(chain: list[bytes]) -> None:
    records = [
        TlsaRecord(0, 0, 1, hashlib.sha256(chain[1]).digest(), 300),
        TlsaRecord(1, 0, 1, hashlib.sha256(chain[0]).digest(), 300),
    ]
    result = check_chain(records, chain, HOST)
    assert result is not None and result[0] is TlsResult.CERTIFICATE_NOT_TRUSTED


# ---------------------------------------------------------------- DANE-EE
def test_ee_ignores_names_and_dates(inter: trustme.CA) -> None:
    # RFC 7672 3.1.1: neither the name nor the expiry of the key matters.
    leaf = inter.issue_cert(
        "somewhere-else.test",
        not_before=NOW - datetime.timedelta(days=30),
        not_after=NOW - datetime.timedelta(days=1),
    )
    chain = chain_of(leaf)
    assert check_chain([tlsa(DANE_EE, 1, 1, chain[0])], chain, HOST) is None
    assert check_chain([tlsa(DANE_EE, 0, 1, chain[0])], chain[:1], HOST) is None


# ---------------------------------------------------------------- DANE-TA
def test_ta_checks_the_name(inter: trustme.CA) -> None:
    chain = chain_of(inter.issue_cert("other.test"))
    result = check_chain([tlsa(DANE_TA, 1, 1, chain[1])], chain, HOST)
    assert result is not None and result[0] is TlsResult.CERTIFICATE_HOST_MISMATCH
    assert check_chain([tlsa(DANE_TA, 1, 1, chain[1])], chain, "OTHER.test.") is None


@pytest.mark.parametrize(
    ("names", "host", "ok"),
    [
        (["*.test"], "mx1.test", True),
        (["*.test"], "a.mx1.test", False),
        (["*.mx1.test"], "mx1.test", False),
        (["a.test", "mx1.test"], "mx1.test", True),
    ],
)
def test_ta_name_rules(inter: trustme.CA, names: list[str], host: str, ok: bool) -> None:
    chain = chain_of(inter.issue_cert(*names))
    result = check_chain([tlsa(DANE_TA, 0, 1, chain[1])], chain, host)
    assert (result is None) is ok


def test_ta_checks_dates(inter: trustme.CA) -> None:
    expired = chain_of(
        inter.issue_cert(
            HOST,
            not_before=NOW - datetime.timedelta(days=30),
            not_after=NOW - datetime.timedelta(days=1),
        )
    )
    result = check_chain([tlsa(DANE_TA, 1, 1, expired[1])], expired, HOST)
    assert result is not None and result[0] is TlsResult.CERTIFICATE_EXPIRED
    # The same chain at a time it was valid.
    when = NOW - datetime.timedelta(days=10)
    assert check_chain([tlsa(DANE_TA, 1, 1, expired[1])], expired, HOST, now=when) is None


def test_ta_rejects_a_forged_chain(chain: list[bytes]) -> None:
    # An attacker's leaf for the right name, followed by the real CA that
    # the TLSA record names: the CA did not sign it.
    attacker = trustme.CA()
    forged = [chain_of(attacker.issue_cert(HOST))[0], chain[1]]
    result = check_chain([tlsa(DANE_TA, 1, 1, chain[1])], forged, HOST)
    assert result is not None and result[0] is TlsResult.CERTIFICATE_NOT_TRUSTED


def test_ta_rejects_a_chain_with_the_ca_alone() -> None:
    # The TA itself as the "leaf" is only good for its own name.
    ca = trustme.CA()
    ca_der = der(ca.cert_pem.bytes())
    result = check_chain([tlsa(DANE_TA, 0, 0, ca_der)], [ca_der], HOST)
    assert result is not None


def test_ta_full_certificate_not_sent(root: trustme.CA, chain: list[bytes]) -> None:
    # "2 0 0" carries the anchor itself, so the server need not send it.
    root_der = der(root.cert_pem.bytes())
    assert check_chain([tlsa(DANE_TA, 0, 0, root_der)], chain, HOST) is None
    # A digest of the unsent root cannot be checked (RFC 7671 5.2.2).
    result = check_chain([tlsa(DANE_TA, 1, 1, root_der)], chain, HOST)
    assert result is not None and result[0] is TlsResult.CERTIFICATE_NOT_TRUSTED


def test_ta_root_sent_by_the_server(root: trustme.CA, chain: list[bytes]) -> None:
    root_der = der(root.cert_pem.bytes())
    assert check_chain([tlsa(DANE_TA, 1, 2, root_der)], [*chain, root_der], HOST) is None


def test_ta_with_rsa_keys() -> None:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    inter = ca.create_child_ca(key_type=trustme.KeyType.RSA)
    chain = chain_of(inter.issue_cert(HOST, key_type=trustme.KeyType.RSA))
    assert check_chain([tlsa(DANE_TA, 1, 1, chain[1])], chain, HOST) is None


# ------------------------------------------------------------------- edges
def test_no_certificate_at_all() -> None:
    result = check_chain([TlsaRecord(3, 1, 1, b"\x00" * 32, 300)], [], HOST)
    assert result is not None and "sent no certificate" in result[1]


def test_garbage_certificates_do_not_raise(chain: list[bytes]) -> None:
    records = [tlsa(DANE_TA, 1, 1, chain[1]), tlsa(DANE_EE, 1, 1, chain[0])]
    result = check_chain(records, [b"garbage", b"\x30\x00"], HOST)
    assert result is not None and result[0] is TlsResult.CERTIFICATE_NOT_TRUSTED
    # A matching TA after a garbage leaf: the path cannot be read.
    result = check_chain(records, [b"garbage", chain[1]], HOST)
    assert result is not None and result[0] is TlsResult.CERTIFICATE_NOT_TRUSTED
