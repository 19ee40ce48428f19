"""DANE for SMTP (RFC 7672): exchangers authenticated by DNSSEC-signed TLSA records.

For each exchanger, :meth:`Dane.lookup` asks a :class:`~slimta.util.dns.TrustedResolver`
(a DNSSEC-validating resolver that the relay trusts, on this host or a trusted
network) and sorts the host into one of four cases (RFC 7672 2.2):

``none``
    The host's address records are not validated (an unsigned zone), or its
    ``_25._tcp.<host>`` TLSA records are absent or not validated: DANE does
    not apply, and TLS stays as it would be without it.
``usable``
    Validated TLSA records of usage DANE-TA(2) or DANE-EE(3), selector 0
    (whole certificate) or 1 (public key), matching type 0 (exact), 1
    (SHA-256) or 2 (SHA-512): TLS is mandatory and the server's certificate
    chain must match one of them (:func:`check_chain`).
``unusable``
    Validated TLSA records, none usable (PKIX-TA(0) and PKIX-EE(1) are not
    used for SMTP, RFC 7672 3.1.3; unknown parameters; wrong digest
    lengths): TLS is still mandatory, but the certificate is not checked, as
    Postfix's "dane" level does.
``failed``
    The host's address records are validated but its TLSA lookup failed
    (SERVFAIL, which a validating resolver answers to bogus data, or a
    timeout), or the validating resolver did not answer at all: the host is
    not used for now (RFC 7672 2.2.1), so an attacker cannot turn DANE off by
    blocking the lookup.

Checks (RFC 7672 3.1):

* DANE-EE(3): the leaf certificate (or its public key) matches the record;
  names and dates are not checked (RFC 7672 3.1.1).
* DANE-TA(2): a certificate the server sent (or the one in a "2 0 0"
  record) matches the record, the chain from the leaf to it verifies
  signature by signature, the certificates below it are within their
  dates, and the leaf is valid for the exchanger's name (RFC 7672 3.2.3:
  subjectAltName DNS names, or the common name when there are none; a
  ``*.`` wildcard matches one whole left-most label). This needs the
  ``cryptography`` package; without it, DANE-TA matches fail with a reason
  that says so. A trust anchor given only as a public key or a digest must
  be among the certificates the server sends, as RFC 7671 5.2.2 asks of
  servers.

The whole chain the server sent is read with ``get_unverified_chain()``
(Python 3.13) or the same private method of Python 3.10 to 3.12; only the
leaf would otherwise be available.

The MX RRset itself need not be validated (RFC 7672 2.2.1 allows DANE with
MX hosts from an insecure MX lookup: a forged MX name stays visible in the
logs); the TLSA base domain is the MX host name as found, without CNAME
expansion.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pycares.errno

from slimta.relay.smtp.tlspolicy import TlsResult
from slimta.util.dns import DNSError, SecureAnswer, TlsaRecord, TrustedResolver

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "DANE_EE",
    "DANE_TA",
    "Dane",
    "DaneStatus",
    "check_chain",
    "record_matches",
    "spki_der",
    "usable",
]

_log = logging.getLogger(__name__)

#: TLSA certificate usage DANE-TA(2): a trust anchor of the server's chain.
DANE_TA = 2
#: TLSA certificate usage DANE-EE(3): the server's own certificate or key.
DANE_EE = 3
#: Selectors: the whole certificate (0), its SubjectPublicKeyInfo (1).
_SELECTORS = frozenset({0, 1})
#: Matching types: exact (0), SHA-256 (1), SHA-512 (2), and digest sizes.
_DIGEST_SIZES = {0: None, 1: 32, 2: 64}


def usable(record: TlsaRecord) -> bool:
    """True when *record* can authenticate an SMTP server (RFC 7672 3.1).

    Usage DANE-TA(2) or DANE-EE(3), selector 0 or 1, matching type 0, 1 or
    2, with data of the digest's length (any non-empty length for type 0).
    """
    if record.cert_usage not in (DANE_TA, DANE_EE) or record.selector not in _SELECTORS:
        return False
    if record.matching_type not in _DIGEST_SIZES:
        return False
    size = _DIGEST_SIZES[record.matching_type]
    data = record.cert_association_data
    return len(data) == size if size is not None else len(data) > 0


# ---------------------------------------------------------------- DER reading
def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """The tag, value start and value end of the DER element at *pos*."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tag")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER element")
    return tag, pos, end


def spki_der(cert: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of DER certificate *cert* (selector 1).

    Reads the X.509 structure just far enough: Certificate, tbsCertificate,
    then its seventh element (after the optional version, serial number,
    signature algorithm, issuer, validity and subject).

    :raises ValueError: *cert* is not a DER certificate.
    """
    tag, start, end = _tlv(cert, 0)
    if tag != 0x30 or end != len(cert):
        raise ValueError("not a DER certificate")
    tag, pos, tbs_end = _tlv(cert, start)
    if tag != 0x30:
        raise ValueError("no tbsCertificate")
    tag, _, end = _tlv(cert, pos)
    if tag == 0xA0:  # [0] EXPLICIT version
        pos = end
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        _, _, pos = _tlv(cert, pos)
    tag, _, end = _tlv(cert, pos)
    if tag != 0x30 or end > tbs_end:
        raise ValueError("no subjectPublicKeyInfo")
    return cert[pos:end]


def _selected(record: TlsaRecord, cert: bytes) -> bytes | None:
    if record.selector == 0:
        return cert
    try:
        return spki_der(cert)
    except ValueError:
        return None


def record_matches(record: TlsaRecord, cert: bytes) -> bool:
    """True when DER certificate *cert* matches *record* (selector, matching type)."""
    data = _selected(record, cert)
    if data is None:
        return False
    if record.matching_type == 1:
        data = hashlib.sha256(data).digest()
    elif record.matching_type == 2:
        data = hashlib.sha512(data).digest()
    elif record.matching_type != 0:
        return False
    return hmac.compare_digest(data, record.cert_association_data)


# ----------------------------------------------------------- DANE-TA chains
def _name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 6.4 matching, the wildcard only as the whole left-most label."""
    pattern = pattern.rstrip(".").lower()
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:] and "*" not in rest
    return pattern == host and "*" not in pattern


def _leaf_names(cert: x509.Certificate) -> list[str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        names: list[str] = []
    else:
        names = san.value.get_values_for_type(x509.DNSName)
    if names:
        return names
    # RFC 7672 3.2.3: the common name, when there is no DNS name.
    return [str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _verify_path(
    path: Sequence[bytes], host: str, now: datetime.datetime
) -> tuple[TlsResult, str] | None:
    """Check a chain ending at its trust anchor (DANE-TA): signatures, CA
    flags, dates below the anchor, and the leaf's name."""
    try:
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
    except ImportError:
        return (
            TlsResult.CERTIFICATE_NOT_TRUSTED,
            f"certificate of {host} matches a DANE-TA record, which needs the "
            "cryptography package to be checked",
        )
    try:
        certs = [x509.load_der_x509_certificate(der) for der in path]
    except ValueError:
        return TlsResult.CERTIFICATE_NOT_TRUSTED, f"certificate chain of {host} is malformed"
    for cert, issuer in itertools.pairwise(certs):
        try:
            constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.value.ca:
            return (
                TlsResult.CERTIFICATE_NOT_TRUSTED,
                f"certificate chain of {host}: issuer is no CA",
            )
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return TlsResult.CERTIFICATE_NOT_TRUSTED, f"certificate chain of {host} does not verify"
    below_anchor = certs[:-1] if len(certs) > 1 else certs
    for cert in below_anchor:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return TlsResult.CERTIFICATE_EXPIRED, f"certificate of {host} has expired"
    if not any(_name_matches(name, host) for name in _leaf_names(certs[0])):
        return TlsResult.CERTIFICATE_HOST_MISMATCH, f"certificate of {host} is not valid for {host}"
    return None


def _issuer_is(cert: bytes, anchor: bytes) -> bool:
    """Whether DER *anchor*'s subject is DER *cert*'s issuer (cheap pre-check)."""
    try:
        from cryptography import x509

        return bool(
            x509.load_der_x509_certificate(cert).issuer
            == x509.load_der_x509_certificate(anchor).subject
        )
    except (ImportError, ValueError):
        return True  # let _verify_path say what is wrong


def check_chain(
    records: Iterable[TlsaRecord],
    chain: Sequence[bytes],
    host: str,
    *,
    now: datetime.datetime | None = None,
) -> tuple[TlsResult, str] | None:
    """Check a server's certificate chain against its TLSA records.

    :param records: the host's TLSA records; unusable ones are ignored.
    :param chain: the DER certificates the server sent, leaf first.
    :param host: the exchanger's name (the TLSA base domain), for DANE-TA's
        name check.
    :param now: the time for DANE-TA's date checks (UTC); now by default.
    :returns: ``None`` when one record authenticates the server, else the
        :class:`~slimta.relay.smtp.tlspolicy.TlsResult` and a reason naming
        the host.
    """
    host = host.rstrip(".").lower()
    good = [rec for rec in records if usable(rec)]
    if not chain:
        return TlsResult.CERTIFICATE_NOT_TRUSTED, f"{host} sent no certificate"
    leaf = chain[0]
    if any(rec.cert_usage == DANE_EE and record_matches(rec, leaf) for rec in good):
        return None
    anchors = [rec for rec in good if rec.cert_usage == DANE_TA]
    failure: tuple[TlsResult, str] | None = None
    when = now if now is not None else datetime.datetime.now(datetime.UTC)
    for index, cert in enumerate(chain):
        if any(record_matches(rec, cert) for rec in anchors):
            failure = _verify_path(chain[: index + 1], host, when)
            if failure is None:
                return None
    # A "2 0 0" record holds the anchor itself; the server need not send it.
    for rec in anchors:
        if rec.selector != 0 or rec.matching_type != 0:
            continue
        anchor = rec.cert_association_data
        for index in range(len(chain)):
            if chain[index] == anchor or not _issuer_is(chain[index], anchor):
                continue
            failure = _verify_path([*chain[: index + 1], anchor], host, when)
            if failure is None:
                return None
    if failure is not None:
        return failure
    return TlsResult.CERTIFICATE_NOT_TRUSTED, f"certificate of {host} matches no TLSA record"


# ------------------------------------------------------------------ lookups
@dataclass(frozen=True, slots=True)
class DaneStatus:
    """What DANE asks of connections to one exchanger (see the module doc)."""

    #: ``'none'``, ``'usable'``, ``'unusable'`` or ``'failed'``.
    kind: str
    #: The usable records (``'usable'``), or all records (``'unusable'``).
    records: tuple[TlsaRecord, ...] = ()
    #: For ``'failed'``: the result type and the reason.
    result: TlsResult | None = None
    reason: str = ""

    @property
    def applies(self) -> bool:
        """True when TLS is mandatory for the host (``usable``/``unusable``)."""
        return self.kind in ("usable", "unusable")


_NONE = DaneStatus("none")


class Dane:
    """Looks up and classifies the TLSA records of exchangers.

    :param resolver: the :class:`~slimta.util.dns.TrustedResolver` to ask; by
        default one using the name servers of ``/etc/resolv.conf``, which
        must then be a DNSSEC-validating resolver on this host or on a
        trusted network: its AD bit is believed.
    :param port: the SMTP port whose TLSA records apply (``_25._tcp``).
    """

    #: At most this many hosts' classifications are remembered.
    max_remembered = 4096

    def __init__(self, resolver: TrustedResolver | None = None, *, port: int = 25) -> None:
        self.resolver = resolver if resolver is not None else TrustedResolver()
        self.port = port
        # host -> (address answer, TLSA answer, status): while the resolver
        # returns the same cached answers, the status is the same object.
        self._known: dict[str, tuple[SecureAnswer, SecureAnswer, DaneStatus]] = {}

    def lookup(self, host: str) -> DaneStatus:
        """What DANE asks of connections to *host* (see the module doc).

        Never raises for DNS failures: they become ``'failed'`` or ``'none'``
        as RFC 7672 2.2 says.
        """
        host = host.rstrip(".").lower()
        try:
            address = self.resolver.query(host, "A")
        except DNSError as exc:
            return DaneStatus(
                "failed",
                result=TlsResult.DNSSEC_INVALID,
                reason=f"validating resolver gave no answer for {host} ({exc})",
            )
        if not address.authenticated or address.errno == pycares.errno.ARES_ENOTFOUND:
            return _NONE
        name = f"_{self.port}._tcp.{host}"
        try:
            answer = self.resolver.query(name, "TLSA")
        except DNSError as exc:
            return DaneStatus(
                "failed",
                result=TlsResult.TLSA_INVALID,
                reason=f"TLSA lookup for {host} failed ({exc})",
            )
        if not answer.authenticated or not answer.records:
            return _NONE
        known = self._known.get(host)
        if known is not None and known[0] is address and known[1] is answer:
            return known[2]
        records: list[Any] = [rec for rec in answer.records if isinstance(rec, TlsaRecord)]
        good = tuple(rec for rec in records if usable(rec))
        if good:
            status = DaneStatus("usable", good)
        else:
            _log.info("TLSA records of %s are all unusable: TLS without authentication", host)
            status = DaneStatus("unusable", tuple(records))
        if len(self._known) >= self.max_remembered:
            self._known.clear()
        self._known[host] = (address, answer, status)
        return status
