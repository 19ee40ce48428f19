"""What an SMTP session must prove about TLS, and what it found.

:class:`~slimta.relay.smtp.mx.MxSmtpRelay` decides, per exchanger, whether
a policy applies to the connection (DANE, :mod:`slimta.relay.smtp.dane`, or
MTA-STS, :mod:`slimta.relay.smtp.mtasts`) and hands the
:class:`~slimta.relay.smtp.client.SmtpRelayClient` a :class:`TlsRequirement`:
the context to negotiate TLS with, an optional check of the server's
certificate chain, and whether a failure blocks delivery (``enforce``) or
is only reported (MTA-STS ``testing``).

Every TLS outcome under a policy (a session that negotiated TLS as the
policy asks, or the reason it did not) becomes a :class:`TlsOutcome`, passed
to the requirement's *report* callable. Their :class:`TlsResult` values are
the result types of RFC 8460 (SMTP TLS reporting), so that a TLSRPT module
can count them per policy domain as they come.

A failure that blocks delivery is the transient reply
``451 4.7.5 <reason>`` (RFC 3463: X.7.5 "cryptographic failure"), whose
reason names the host and the cause; the message stays queued.

A message sent with REQUIRETLS (RFC 8689) that cannot be relayed as it asks
fails for good with :func:`requiretls_failure`:
``550 5.7.30 REQUIRETLS support required: <reason>`` (X.7.30, registered by
RFC 8689).
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gevent.local import local

from slimta.smtp.reply import Reply

__all__ = [
    "POLICY_FAILED_ESC",
    "REQUIRETLS_ESC",
    "TlsCheck",
    "TlsOutcome",
    "TlsRequirement",
    "TlsResult",
    "classify_tls_error",
    "peer_chain",
    "policy_failure",
    "requiretls_failure",
    "session_addresses",
    "track_addresses",
    "verifies",
]

#: The enhanced status code of every delivery a TLS policy refused.
POLICY_FAILED_ESC = "4.7.5"

#: The enhanced status code of a REQUIRETLS message that could not be relayed
#: as RFC 8689 asks: "REQUIRETLS support required".
REQUIRETLS_ESC = "5.7.30"


class TlsResult(enum.Enum):
    """How TLS went under a policy; the values are RFC 8460's result types."""

    #: TLS negotiated and the server authenticated as the policy asks.
    SUCCESS = "success"
    #: The server did not offer STARTTLS, or refused it.
    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    #: The certificate is not valid for the exchanger's name.
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    #: The certificate has expired (or is not valid yet).
    CERTIFICATE_EXPIRED = "certificate-expired"
    #: No trusted chain: unknown CA, self-signed, no TLSA record matched.
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    #: The TLSA records could not be used (lookup failed, malformed).
    TLSA_INVALID = "tlsa-invalid"
    #: The DNSSEC-validating resolver gave no usable answer.
    DNSSEC_INVALID = "dnssec-invalid"
    #: The MTA-STS policy could not be fetched.
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    #: The MTA-STS policy file is not valid.
    STS_POLICY_INVALID = "sts-policy-invalid"
    #: The policy host's certificate did not verify (PKIX).
    STS_WEBPKI_INVALID = "sts-webpki-invalid"
    #: Anything else, e.g. an MX host that the MTA-STS policy does not list.
    VALIDATION_FAILURE = "validation-failure"


@dataclass(frozen=True, slots=True)
class TlsOutcome:
    """One TLS result under a policy: a session, or a refusal before one.

    :attr:`policy_type` is RFC 8460's: ``'sts'``, ``'tlsa'`` or
    ``'no-policy-found'``.
    """

    #: ``'sts'`` (MTA-STS), ``'tlsa'`` (DANE) or ``'no-policy-found'``.
    policy_type: str
    #: The policy domain: the recipient domain.
    domain: str
    #: The exchanger's host name ('' when the outcome concerns no one host).
    mx_host: str
    result: TlsResult
    #: Human-readable detail; the reason of the reply for a failure.
    detail: str = ""
    #: Whether the failure stopped delivery (``False`` in MTA-STS testing
    #: mode, where it is only reported).
    enforced: bool = True
    #: RFC 8460's "policy-string": the MTA-STS policy's lines, or the TLSA
    #: records ("3 1 1 <hex>"); empty when not known.
    policy_string: tuple[str, ...] = ()
    #: RFC 8460's "mx-host" of an MTA-STS policy: its ``mx`` patterns.
    mx_patterns: tuple[str, ...] = ()
    #: This side's address in the session ("sending-mta-ip"); '' without one.
    sending_ip: str = ""
    #: The exchanger's address in the session ("receiving-ip"); '' without one.
    receiving_ip: str = ""

    @property
    def successful(self) -> bool:
        """True for :attr:`TlsResult.SUCCESS`."""
        return self.result is TlsResult.SUCCESS


#: A check of the server's certificate chain (DER, leaf first) after the
#: handshake: ``None`` when it passes, else the result and a reason.
TlsCheck = Callable[[Sequence[bytes]], "tuple[TlsResult, str] | None"]


def _no_report(outcome: TlsOutcome) -> None:
    pass


@dataclass(frozen=True, slots=True)
class TlsRequirement:
    """What a connection to one exchanger must satisfy.

    Requirements compare equal by policy type, domain, host, :attr:`enforce`,
    :attr:`key` and the policy they report (not by context or callables): the
    relay keeps one connection pool per exchanger and requirement, so a
    connection is only reused for messages that ask the same of it, and its
    outcomes name the policy that applies now.
    """

    #: ``'tlsa'`` (DANE) or ``'sts'`` (MTA-STS).
    policy_type: str
    #: The policy domain (the recipient domain).
    domain: str
    #: The exchanger's name; the name the certificate must be valid for
    #: when *context* checks host names.
    host: str
    #: The context the STARTTLS handshake uses (it verifies what PKIX
    #: verification the policy needs).
    context: ssl.SSLContext = field(compare=False, hash=False)
    #: Whether a failure blocks delivery (``451 4.7.5``); when ``False``
    #: (MTA-STS testing) the session goes on as without a policy.
    enforce: bool = True
    #: Checks the certificate chain after the handshake (DANE).
    check: TlsCheck | None = field(default=None, compare=False, hash=False)
    #: What sets this requirement apart from others for the same host
    #: (mode, TLSA records ...).
    key: Hashable = None
    #: Called with each :class:`TlsOutcome`.
    report: Callable[[TlsOutcome], None] = field(
        default=_no_report, compare=False, hash=False, repr=False
    )
    #: The :attr:`TlsOutcome.policy_string` of the outcomes.
    policy_string: tuple[str, ...] = ()
    #: The :attr:`TlsOutcome.mx_patterns` of the outcomes.
    mx_patterns: tuple[str, ...] = ()

    @property
    def authenticates(self) -> bool:
        """True when a session that meets this requirement has authenticated
        the server: it is enforced and either checks the chain (DANE usable
        records) or verifies it and the host name (MTA-STS). What a
        REQUIRETLS message needs (RFC 8689 4.2.1)."""
        return self.enforce and (self.check is not None or verifies(self.context))

    @property
    def label(self) -> str:
        """``'DANE'`` or ``'MTA-STS'``, for messages."""
        return "DANE" if self.policy_type == "tlsa" else "MTA-STS"

    def outcome(self, result: TlsResult, detail: str = "") -> TlsOutcome:
        """A :class:`TlsOutcome` of this requirement, reported at once; the
        addresses are those of this greenlet's session (see
        :func:`track_addresses`)."""
        sending_ip, receiving_ip = session_addresses()
        outcome = TlsOutcome(
            self.policy_type,
            self.domain,
            self.host,
            result,
            detail,
            self.enforce and result is not TlsResult.SUCCESS,
            self.policy_string,
            self.mx_patterns,
            sending_ip,
            receiving_ip,
        )
        self.report(outcome)
        return outcome


#: The addresses of the connection each greenlet (pool client) made last.
_session = local()
_NO_ADDRESSES = ("", "")


def _socket_addresses(sock: Any) -> tuple[str, str]:
    try:
        return str(sock.getsockname()[0]), str(sock.getpeername()[0])
    except (AttributeError, OSError, IndexError, TypeError):
        return _NO_ADDRESSES


def track_addresses(connect: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ``socket_creator`` so that the outcomes of the session it
    connects carry the session's addresses (RFC 8460's "sending-mta-ip" and
    "receiving-ip"): they are kept per greenlet, and each pool client
    connects and negotiates TLS in its own greenlet."""

    def creator(address: Any, *args: Any, **kwargs: Any) -> Any:
        _session.addresses = _NO_ADDRESSES
        sock = connect(address, *args, **kwargs)
        _session.addresses = _socket_addresses(sock)
        return sock

    return creator


def session_addresses() -> tuple[str, str]:
    """``(ours, theirs)``: the addresses of the connection this greenlet made
    last through a :func:`track_addresses` creator, else ``('', '')``."""
    addresses: tuple[str, str] = getattr(_session, "addresses", _NO_ADDRESSES)
    return addresses


def verifies(context: ssl.SSLContext) -> bool:
    """True when *context* checks certificates and host names (PKIX)."""
    return context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def requiretls_failure(reason: str, command: bytes = b"MAIL") -> Reply:
    """The reply of a REQUIRETLS message that cannot be relayed as it asks:
    ``550 5.7.30 REQUIRETLS support required: <reason>`` (RFC 8689 4.2.1)."""
    return Reply("550", f"{REQUIRETLS_ESC} REQUIRETLS support required: {reason}", command=command)


def policy_failure(label: str, reason: str, command: bytes = b"STARTTLS") -> Reply:
    """The reply of a delivery a TLS policy refused: ``451 4.7.5 <label>: <reason>``."""
    return Reply("451", f"{POLICY_FAILED_ESC} {label}: {reason}", command=command)


#: OpenSSL verification error numbers (``X509_V_ERR_*``).
_CERT_NOT_YET_VALID = 9
_CERT_HAS_EXPIRED = 10
_HOSTNAME_MISMATCH = 62


def classify_tls_error(error: BaseException | None, host: str) -> tuple[TlsResult, str]:
    """The :class:`TlsResult` and a reason for a failed TLS handshake with *host*."""
    if isinstance(error, ssl.SSLCertVerificationError):
        code = getattr(error, "verify_code", None)
        text = getattr(error, "verify_message", None) or str(error)
        if code in (_CERT_HAS_EXPIRED, _CERT_NOT_YET_VALID):
            result = TlsResult.CERTIFICATE_EXPIRED
        elif code == _HOSTNAME_MISMATCH:
            result = TlsResult.CERTIFICATE_HOST_MISMATCH
        else:
            result = TlsResult.CERTIFICATE_NOT_TRUSTED
        return result, f"certificate of {host} not valid: {text}"
    if error is None:
        return TlsResult.VALIDATION_FAILURE, f"TLS negotiation with {host} failed"
    text = getattr(error, "reason", None) or str(error) or type(error).__name__
    return TlsResult.VALIDATION_FAILURE, f"TLS negotiation with {host} failed: {text}"


def peer_chain(sock: object) -> list[bytes]:
    """The certificate chain the peer of TLS socket *sock* sent, DER, leaf first.

    Python 3.13 has ``get_unverified_chain()``; before, the same list comes
    from the private ``_sslobj`` (3.10 to 3.12). Without either, only the
    leaf is returned.
    """
    leaf: bytes | None = getattr(sock, "getpeercert", lambda binary_form: None)(binary_form=True)
    chain: list[bytes] = []
    getter = getattr(sock, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
    if callable(getter):
        try:
            for cert in getter() or ():
                if isinstance(cert, bytes):
                    chain.append(cert)
                else:
                    chain.append(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
        except (AttributeError, ValueError, ssl.SSLError):
            chain = []
    if leaf is not None and (not chain or chain[0] != leaf):
        chain.insert(0, leaf)
    return chain
