"""A relay that delivers each message to the mail exchangers of its domain.

One :meth:`MxSmtpRelay.attempt` goes through these steps:

1. The destination domain is the part after the last ``@`` of the *first*
   recipient, lower-cased (split messages by domain first, e.g. with
   ``RecipientDomainSplit``). No ``@``: :class:`NoDomainError`.
2. A domain given to :meth:`MxSmtpRelay.force_mx` goes to its fixed
   destination, without DNS.
3. Otherwise its MX records are looked up through
   :meth:`DNSResolver.query_cached <slimta.util.dns.DNSResolver.query_cached>`,
   which keeps answers for their TTL (RFC 5321 5.1):

   * a null MX (RFC 7505) fails at once: ``556 5.1.10``;
   * MX records are sorted by preference, equal preferences in random
     order; the order is kept while the cached answer is the same, so that
     retries rotate through one list;
   * no MX records (NODATA): the domain itself is the only exchanger
     ("implicit MX", preference 0), provided it has an A or AAAA record,
     else ``550 5.1.2``;
   * the domain does not exist (NXDOMAIN): ``550 5.1.2``;
   * any other DNS failure (SERVFAIL, timeout): ``451 4.4.3``, try later.

4. :meth:`MxSmtpRelay.choose_mx` picks the first exchanger to try. When the
   connection to it fails before the server said anything (refused,
   unreachable, connect timeout), the others are tried in preference order
   (RFC 5321 5.1: "try at least two"), up to :attr:`MxSmtpRelay.max_mx_tries`
   in all. A reply from a server, error or not, ends the attempt.

Delivery to each exchanger goes through a
:class:`~slimta.relay.smtp.static.StaticSmtpRelay`, one per ``(host, port)``,
so connections are pooled and reused per exchanger.

TLS that an attacker cannot strip
---------------------------------

With ``mta_sts=True`` and ``dane=True`` (both off by default, as in 4.0), the
attempt applies the recipient domain's MTA-STS policy
(:mod:`slimta.relay.smtp.mtasts`, RFC 8461) and each exchanger's DANE TLSA
records (:mod:`slimta.relay.smtp.dane`, RFC 7672):

* MTA-STS ``enforce``: MX hosts that match none of the policy's ``mx``
  patterns are skipped (none left: ``451 4.7.5``); the others must offer
  STARTTLS and present a certificate valid for their MX name under
  *verify_context*.
* MTA-STS ``testing``: delivery goes on as without a policy; what would have
  failed is logged and reported.
* DANE: an exchanger with DNSSEC-validated, usable TLSA records must offer
  STARTTLS and present a certificate chain matching one of them; this
  replaces the MTA-STS certificate check for that host (RFC 8461 2: MTA-STS
  never overrides DANE), while an ``enforce`` policy's MX patterns still
  choose the hosts. Validated records that are all unusable still make TLS
  mandatory, unauthenticated. A failed TLSA lookup in a signed zone makes
  the host unusable for now.

A refusal is transient, ``451 4.7.5 <DANE|MTA-STS>: <reason>``, the reason
naming the host and the cause; like an unreachable exchanger, it makes the
attempt go on to the next exchanger, and the message stays queued when none
is left. Each TLS outcome under a policy is a
:class:`~slimta.relay.smtp.tlspolicy.TlsOutcome`, logged and passed to
*tls_report* (the hook for TLS reporting, RFC 8460). Connections are pooled
per exchanger and requirement, so a connection made under one policy is
never reused for mail that asks something else.

Domains given to :meth:`MxSmtpRelay.force_mx` and address literals are
delivered without either policy.

REQUIRETLS and ``TLS-Required: No`` (RFC 8689)
----------------------------------------------

A message whose :attr:`~slimta.envelope.Envelope.requiretls` is set goes
only where RFC 8689 4.2.1 allows:

* to an exchanger that MTA-STS (a policy in ``enforce`` or ``testing`` mode
  whose ``mx`` patterns it matches; the policy is then enforced for this
  message whatever its mode) or DANE (usable, validated TLSA records)
  authenticates; DANE records that are all unusable do not do;
* over TLS that the policy authenticated, to a server whose EHLO reply
  after STARTTLS offers REQUIRETLS; ``MAIL`` then carries ``REQUIRETLS``.

An exchanger that fails any of these is skipped like an unreachable one.
When none is left the message fails for good,
``550 5.7.30 REQUIRETLS support required: <reason>``, so that the queue
bounces it (the bounce carries only the header block, see
:mod:`slimta.bounce`); so does a relay with neither *mta_sts* nor *dane*,
and a domain that has no MTA-STS policy when no exchanger has DANE records.
Failures that may pass (an exchanger that cannot be reached, a failed TLSA
lookup, an MTA-STS policy that could not be fetched) stay transient.
Forced domains and address literals are not found through MX records: a
REQUIRETLS message goes there only over TLS that the relay's verifying
*context* authenticated, to a server offering REQUIRETLS.

A message with a ``TLS-Required: No`` header field (and no REQUIRETLS,
:attr:`~slimta.envelope.Envelope.tls_optional`) is delivered as if neither
policy were configured: its sender asked that MTA-STS and DANE not stop it.
The relay's own *context* and *tls_required* still apply.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import random
import ssl
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import pycares.errno

from slimta import logging as slogging
from slimta.relay import (
    AttemptResult,
    PermanentRelayError,
    Relay,
    RelayError,
    TransientRelayError,
)
from slimta.relay.smtp.dane import Dane, DaneStatus, check_chain
from slimta.relay.smtp.mtasts import MtaSts, PolicyFetchError, StsPolicy
from slimta.relay.smtp.static import StaticSmtpRelay
from slimta.relay.smtp.tlspolicy import (
    POLICY_FAILED_ESC,
    REQUIRETLS_ESC,
    TlsOutcome,
    TlsRequirement,
    TlsResult,
    policy_failure,
    requiretls_failure,
    track_addresses,
    verifies,
)
from slimta.smtp.reply import Reply
from slimta.util._connect import create_connection
from slimta.util.dns import DNSError, DNSResolver, TlsaRecord

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["MxSmtpRelay", "NoDomainError"]

_log = logging.getLogger(__name__)

#: One mail exchanger: ``(preference, host)``.
MxHost: TypeAlias = tuple[int, str]

#: The ``command`` of the reply a pool client reports when it could not
#: connect at all (see :mod:`slimta.relay.smtp.client`).
_CONNECT_STEPS = (b"[CONNECT]", "[CONNECT]")

#: The steps at which a TLS policy refuses an exchanger (451 4.7.5), before
#: any mail was sent: the attempt goes on to the next exchanger.
_POLICY_STEPS = (b"STARTTLS", b"[TLS]", b"[TLSA]")

#: The steps at which a server's own TLS failed a policy (as opposed to a
#: DNS lookup or a policy fetch), which for a REQUIRETLS message is final.
_SERVER_TLS_STEPS = (b"STARTTLS", b"[TLS]")

#: Seconds to wait for a DNS answer at most (c-ares normally gives up first).
_DNS_WAIT = 60.0

#: At most this many remembered per-domain MX orders (oldest dropped first).
_MAX_ORDERS = 4096


class _MxAnswer(Protocol):
    """What a DNS MX record looks like (4.0 attribute names)."""

    @property
    def host(self) -> str: ...

    @property
    def priority(self) -> int: ...


class NoDomainError(PermanentRelayError):
    """The recipient address has no domain, so there is no MX to look up.

    The reply is ``550 5.1.5 Recipient address has no domain: <recipient>``.

    :param recipient: the address without an ``@``.
    """

    def __init__(self, recipient: str) -> None:
        msg = f"Recipient address has no domain: {recipient}"
        super().__init__(msg, Reply("550", f"5.1.5 {msg}"))
        #: The address without a domain.
        self.recipient = recipient


def _destination_domain(envelope: Envelope) -> str:
    """The lower-cased domain of the envelope's first recipient."""
    if not envelope.recipients:
        raise PermanentRelayError("No recipients", Reply("554", "5.5.1 No recipients"))
    rcpt = envelope.recipients[0]
    _, at, domain = rcpt.rpartition("@")
    if not at or not domain:
        raise NoDomainError(rcpt)
    return domain.lower()


def _address_literal(domain: str) -> str | None:
    """The IP address a domain literal names (RFC 5321 4.1.3): ``[192.0.2.1]``
    or ``[IPv6:2001:db8::1]``; ``None`` when *domain* is a name.

    :raises PermanentRelayError: a bracketed literal that is not one of
        those two forms.
    """
    if not domain.startswith("["):
        return None
    inner = domain[1:-1] if domain.endswith("]") else ""
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        msg = f"Invalid address literal: {domain}"
        raise PermanentRelayError(msg, Reply("550", f"5.1.2 {msg}")) from None


def _dns_name(domain: str) -> str:
    """The name to query for *domain*: its A-labels when it is an IDN."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _mx_host(host: str) -> str:
    return host.rstrip(".").lower()


def _is_null_mx(records: Iterable[MxHost]) -> bool:
    # RFC 7505 3: the null MX is "MX 0 ." and must be the only MX; a mixed
    # answer is treated as null too, as Postfix does (the safe reading).
    return any(host == "" for _, host in records)


def _records_from_answer(domain: str, answer: Iterable[_MxAnswer]) -> list[MxHost]:
    """``(preference, host)`` pairs from DNS MX records.

    :raises PermanentRelayError: ``556 5.1.10`` for a null MX (RFC 7505).
    """
    records = [(int(rec.priority), _mx_host(rec.host)) for rec in answer]
    if _is_null_mx(records):
        msg = f"Recipient address has null MX: {domain}"
        raise PermanentRelayError(msg, Reply("556", f"5.1.10 {msg}"))
    return records


def _order_mx(records: Iterable[MxHost], rng: random.Random) -> list[MxHost]:
    """*records* sorted by preference, equal preferences in random order.

    RFC 5321 5.1: the client "MUST randomize" among equal preferences to
    spread the load.
    """
    keyed = [(pref, rng.random(), host) for pref, host in records]
    keyed.sort()
    return [(pref, host) for pref, _, host in keyed]


def _connect_failed(exc: TransientRelayError) -> bool:
    """True when *exc* says no connection was made (no server reply yet)."""
    return exc.reply.command in _CONNECT_STEPS


def _policy_refused(exc: TransientRelayError) -> bool:
    """True when a TLS policy refused the exchanger before mail was sent."""
    reply = exc.reply
    return (
        reply.code == "451"
        and reply.enhanced_status_code == POLICY_FAILED_ESC
        and reply.command in _POLICY_STEPS
    )


def _tls_refused(exc: RelayError) -> bool:
    """True when a TLS policy or the REQUIRETLS rules refused an exchanger
    before a REQUIRETLS message was sent (``451 4.7.5`` or ``550 5.7.30``)."""
    return exc.reply.enhanced_status_code in (POLICY_FAILED_ESC, REQUIRETLS_ESC)


def _requiretls_refusal(reason: str) -> PermanentRelayError:
    """An exchanger (or a domain) that a REQUIRETLS message may not go to."""
    reply = requiretls_failure(reason, b"[REQUIRETLS]")
    return PermanentRelayError(f"REQUIRETLS: {reason}", reply)


def _requiretls_final(exc: RelayError) -> RelayError:
    """What ends a REQUIRETLS attempt whose last exchanger was refused with
    *exc*: for good (``550 5.7.30``) unless the cause may pass."""
    reply = exc.reply
    if reply.enhanced_status_code == REQUIRETLS_ESC:
        return exc
    if reply.enhanced_status_code != POLICY_FAILED_ESC or reply.command not in _SERVER_TLS_STEPS:
        return exc
    final = requiretls_failure(reply.raw_message or "TLS failed", reply.command)
    final.address = reply.address
    return PermanentRelayError(f"REQUIRETLS: {reply.raw_message}", final)


def _sts_strings(policy: StsPolicy | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """RFC 8460's "policy-string" (the policy's lines) and "mx-host" (its
    ``mx`` patterns) of an MTA-STS policy, for TLS reports."""
    if policy is None:
        return (), ()
    lines = tuple(line.strip(" \t\r") for line in policy.text.split("\n") if line.strip(" \t\r"))
    if not lines:
        lines = (
            f"version: {policy.version}",
            f"mode: {policy.mode}",
            *(f"mx: {pattern}" for pattern in policy.mx),
            f"max_age: {policy.max_age}",
        )
    return lines, policy.mx


def _tlsa_strings(records: Iterable[TlsaRecord]) -> tuple[str, ...]:
    """RFC 8460's "policy-string" of TLSA records: their presentation format."""
    return tuple(
        f"{rec.cert_usage} {rec.selector} {rec.matching_type} "
        f"{rec.cert_association_data.hex().upper()}"
        for rec in records
    )


def _records_key(records: Iterable[TlsaRecord]) -> Hashable:
    """The TLSA records as a key, without their TTLs."""
    return tuple(
        sorted(
            (r.cert_usage, r.selector, r.matching_type, r.cert_association_data) for r in records
        )
    )


def _dane_context() -> ssl.SSLContext:
    """The context of DANE handshakes: the TLSA records, not PKIX, decide."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _have_cryptography() -> bool:
    try:
        import cryptography.x509  # noqa: F401
    except ImportError:
        return False
    return True


def _dns_failed(domain: str, qtype: str, exc: BaseException) -> TransientRelayError:
    # The detail (which may name resolvers) goes to the log, not the reply.
    _log.warning("%s lookup for %s failed: %s", qtype, domain, exc)
    return TransientRelayError(
        f"DNS lookup failed: {domain} {qtype}", Reply("451", "4.4.3 DNS lookup failed")
    )


def _no_records(domain: str) -> PermanentRelayError:
    msg = f"No usable DNS records found: {domain}"
    return PermanentRelayError(msg, Reply("550", f"5.1.2 {msg}"))


class MxSmtpRelay(Relay):
    """Delivers each message over SMTP to the MX hosts of its domain.

    See the module documentation for the steps of one attempt.

    :param context: the client :class:`ssl.SSLContext` for STARTTLS;
        ``ssl.create_default_context()`` when ``None``.
    :param port: the port of every exchanger (25 in real life; other values
        are for tests and special setups). Keyword-only; an extension of 4.0.
    :param rng: the :class:`random.Random` that orders equal MX preferences
        (a seeded one makes the order repeatable). Keyword-only; an extension
        of 4.0.
    :param local_hosts: the names this MTA is known by as an exchanger, for
        the RFC 5321 5.1 loop check: when one of them is among a domain's
        MX hosts, it and every exchanger of equal or lower preference (a
        higher number) are dropped, and if nothing is left the message fails
        with ``550 5.4.6``. Empty by default (no check); e.g.
        ``local_hosts=[socket.getfqdn()]``. Keyword-only; an extension of 4.0.
    :param mta_sts: apply the MTA-STS policies of recipient domains (see the
        module documentation): ``True``, or an
        :class:`~slimta.relay.smtp.mtasts.MtaSts` of your own (its cache,
        fetcher, clock). Keyword-only; default off, as in 4.0.
    :param mta_sts_cache: with ``mta_sts=True``, a directory where policies
        are kept between runs (e.g. next to the queue's storage).
    :param dane: apply DANE (RFC 7672) to exchangers with DNSSEC-validated
        TLSA records: ``True``, which asks the name servers of
        ``/etc/resolv.conf`` (they must be a DNSSEC-validating resolver on
        this host or a trusted path), or a
        :class:`~slimta.relay.smtp.dane.Dane` of your own. DANE-TA(2)
        records need the ``cryptography`` package. Keyword-only; default off.
    :param verify_context: the context for exchangers an MTA-STS ``enforce``
        policy covers: it must verify certificates and host names. By
        default *context* when it does, else
        ``ssl.create_default_context()``. Also the context the policies are
        fetched with when ``mta_sts=True``.
    :param tls_report: called with every
        :class:`~slimta.relay.smtp.tlspolicy.TlsOutcome` (each TLS session
        under a policy, each refusal, each failed policy fetch), e.g. to
        count them for TLS reports.
    :raises ValueError: *verify_context* does not verify certificates and
        host names, or *mta_sts_cache* is given without ``mta_sts=True``.
    :param client_kwargs: the :class:`~slimta.relay.smtp.static.StaticSmtpRelay`
        keyword arguments, passed to every static relay: ``pool_size``,
        ``socket_creator`` (e.g. :func:`slimta.util.build_ipv4_socket_creator`
        for IPv4 only), ``ehlo_as``, ``tls_immediately``, ``tls_required``,
        the timeouts, ``credentials``, ``binary_encoder``.

    TLS with the default *context* is opportunistic but verifying: STARTTLS is
    used whenever a server offers it, and the certificate must be valid for
    the MX host name. An exchanger whose certificate does not verify (e.g.
    self-signed) makes the handshake fail, which is a transient failure with
    a TLS reply (``421 4.7.0``): the message is not sent in plain text, and
    the next attempt may pick another exchanger. Many public exchangers
    present self-signed or mismatched certificates, so mail for their
    domains is deferred attempt after attempt until the queue gives up and
    bounces it. To encrypt opportunistically
    without authenticating servers, pass a context with ``check_hostname``
    off and ``verify_mode`` ``ssl.CERT_NONE``; to refuse delivery without
    TLS, pass ``tls_required=True``.

    One :class:`~slimta.relay.smtp.static.StaticSmtpRelay` is made (by
    :meth:`new_static_relay`) and kept per ``(host, port)``; relays with no
    connections and no waiting messages are dropped once there are more
    than :attr:`max_static_relays`.

    .. versionchanged:: 4.0
       *context* replaces the ``tls`` dict; STARTTLS is opportunistic.
       Unlike python-slimta 4.0: NXDOMAIN fails permanently instead of
       falling back to the domain's A record, an implicit MX needs an A or
       AAAA record, a null MX fails with ``556 5.1.10``, equal preferences
       are tried in random order, an unreachable exchanger makes the same
       attempt go on to the next one, and *port*, *rng*, *local_hosts*,
       *mta_sts*, *mta_sts_cache*, *dane*, *verify_context* and
       *tls_report* are new.
    """

    #: Most exchangers tried within one attempt when connections fail.
    max_mx_tries = 5

    #: Above this many cached static relays, idle ones are dropped.
    max_static_relays = 1024

    def __init__(
        self,
        context: ssl.SSLContext | None = None,
        *,
        port: int = 25,
        rng: random.Random | None = None,
        local_hosts: Iterable[str] = (),
        mta_sts: bool | MtaSts = False,
        mta_sts_cache: str | os.PathLike[str] | None = None,
        dane: bool | Dane = False,
        verify_context: ssl.SSLContext | None = None,
        tls_report: Callable[[TlsOutcome], None] | None = None,
        **client_kwargs: Any,
    ) -> None:
        super().__init__()
        #: Normalised names of this host as an exchanger (see *local_hosts*).
        self.local_hosts = frozenset(_mx_host(host) for host in local_hosts)
        self.context = context if context is not None else ssl.create_default_context()
        if verify_context is None:
            verify_context = self.context if verifies(self.context) else None
        #: The context of exchangers under an MTA-STS ``enforce`` policy.
        self.verify_context = verify_context or ssl.create_default_context()
        if not verifies(self.verify_context):
            raise ValueError("verify_context must verify certificates and host names")
        if mta_sts_cache is not None and (isinstance(mta_sts, MtaSts) or not mta_sts):
            raise ValueError("mta_sts_cache applies only with mta_sts=True")
        #: The :class:`~slimta.relay.smtp.mtasts.MtaSts` policies, or ``None``.
        self.mta_sts: MtaSts | None = None
        if isinstance(mta_sts, MtaSts):
            self.mta_sts = mta_sts
        elif mta_sts:
            self.mta_sts = MtaSts(mta_sts_cache, context=self.verify_context)
        #: The :class:`~slimta.relay.smtp.dane.Dane` lookups, or ``None``.
        self.dane: Dane | None = None
        if isinstance(dane, Dane):
            self.dane = dane
        elif dane:
            self.dane = Dane()
        if self.dane is not None and not _have_cryptography():
            _log.warning(
                "DANE-TA(2) records cannot be checked without the cryptography package: "
                "mail to exchangers that publish only such records will be deferred"
            )
        self._dane_ctx = _dane_context() if self.dane is not None else None
        # (domain, host) -> (the DANE status or policy, its requirement)
        self._requirements: dict[tuple[str, str], tuple[object, TlsRequirement]] = {}
        #: Called with each :class:`~slimta.relay.smtp.tlspolicy.TlsOutcome`.
        self.tls_report = tls_report
        self.port = port
        self.client_kwargs = client_kwargs
        self._rng = rng if rng is not None else random.SystemRandom()
        self._forced: dict[str, tuple[str, int]] = {}
        # (host, port), or (host, port, requirement) for a TLS policy
        self._relays: dict[tuple[Any, ...], StaticSmtpRelay] = {}
        # domain -> (the answer it was made from, the ordered records)
        self._orders: dict[str, tuple[frozenset[MxHost], list[MxHost]]] = {}

    # ------------------------------------------------------------- overridable
    def choose_mx(self, records: Sequence[MxHost], attempts: int) -> str:
        """The exchanger to try first in this attempt.

        The default rotates through the records with each failed attempt.

        :param records: ``(preference, host)`` pairs in delivery order.
        :param attempts: how many attempts failed before this one.
        :returns: a host name.
        """
        return records[attempts % len(records)][1]

    def new_static_relay(self, destination: str, port: int) -> StaticSmtpRelay:
        """A new relay delivering to *destination*; override to customise.

        :param destination: the exchanger's host name.
        :param port: its port.
        :returns: a :class:`~slimta.relay.smtp.static.StaticSmtpRelay` built
            with this relay's *context* and *client_kwargs*.
        """
        return StaticSmtpRelay(destination, port, context=self.context, **self.client_kwargs)

    def force_mx(self, domain: str, destination: str, port: int = 25) -> None:
        """Deliver mail for *domain* to *destination*, without DNS lookups.

        :param domain: the recipient domain (case does not matter).
        :param destination: the host (name or address) to deliver to.
        :param port: its port.
        """
        self._forced[domain.lower()] = (destination, port)

    # ------------------------------------------------------------------ lookup
    def _query(self, name: str, qtype: str) -> list[Any]:
        """The records of type *qtype* for *name*, kept by TTL.

        Answers come from :meth:`DNSResolver.query_cached
        <slimta.util.dns.DNSResolver.query_cached>`, so NXDOMAIN and NODATA
        are remembered for a while too.

        :raises DNSError: NXDOMAIN, NODATA or another failure.
        """
        result = DNSResolver.query_cached(name, qtype)
        # c-ares has its own timeouts; this only guards against a lookup
        # that never completes, without a gevent.Timeout to catch.
        result.wait(_DNS_WAIT)
        if not result.ready():
            raise DNSError(pycares.errno.ARES_ETIMEOUT)
        records: list[Any] = result.get(block=False)
        return records

    def _has_address(self, domain: str) -> bool:
        """True when *domain* has an A or AAAA record (implicit MX)."""
        name = _dns_name(domain)
        for qtype in ("A", "AAAA"):
            try:
                if self._query(name, qtype):
                    return True
            except DNSError as exc:
                if exc.errno not in (pycares.errno.ARES_ENODATA, pycares.errno.ARES_ENOTFOUND):
                    raise _dns_failed(domain, qtype, exc) from None
        return False

    def _lookup_mx(self, domain: str) -> list[MxHost]:
        """The exchangers of *domain*, unordered; raises the relay errors."""
        try:
            answer: list[_MxAnswer] = self._query(_dns_name(domain), "MX")
        except DNSError as exc:
            if exc.errno == pycares.errno.ARES_ENOTFOUND:
                # RFC 5321 5.1: the domain does not exist; never fall back.
                msg = f"Domain does not exist: {domain}"
                raise PermanentRelayError(msg, Reply("550", f"5.1.2 {msg}")) from None
            if exc.errno != pycares.errno.ARES_ENODATA:
                raise _dns_failed(domain, "MX", exc) from None
            answer = []
        records = _records_from_answer(domain, answer)
        if records:
            return records
        # RFC 5321 5.1: no MX records, so the domain is its own exchanger,
        # if it has an address at all.
        if not self._has_address(domain):
            raise _no_records(domain)
        return [(0, _dns_name(domain))]

    def _without_self(self, domain: str, records: list[MxHost]) -> list[MxHost]:
        """*records* less this host and every exchanger it ranks above
        (RFC 5321 5.1); raises ``550 5.4.6`` when nothing is left."""
        local = self.local_hosts
        mine = [preference for preference, host in records if host in local]
        if not mine:
            return records
        cutoff = min(mine)
        kept = [record for record in records if record[0] < cutoff]
        if not kept:
            msg = f"Mail for {domain} loops back to myself"
            raise PermanentRelayError(msg, Reply("550", f"5.4.6 {msg}"))
        return kept

    def _mx_records(self, domain: str) -> list[MxHost]:
        """The exchangers of *domain* in delivery order."""
        records = self._lookup_mx(domain)
        if self.local_hosts:
            records = self._without_self(domain, records)
        key = frozenset(records)
        known = self._orders.get(domain)
        if known is not None and known[0] == key:
            return known[1]
        ordered = _order_mx(records, self._rng)
        self._orders.pop(domain, None)
        while len(self._orders) >= _MAX_ORDERS:
            del self._orders[next(iter(self._orders))]
        self._orders[domain] = (key, ordered)
        return ordered

    # ---------------------------------------------------------------- policies
    def _report(self, outcome: TlsOutcome) -> None:
        """Log a TLS outcome and hand it to :attr:`tls_report`."""
        if outcome.successful:
            _log.debug(
                "%s TLS to %s for %s: success", outcome.policy_type, outcome.mx_host, outcome.domain
            )
        elif outcome.enforced:
            _log.warning(
                "TLS policy (%s) of %s refused %s: %s [%s]",
                outcome.policy_type,
                outcome.domain,
                outcome.mx_host or "delivery",
                outcome.detail,
                outcome.result.value,
            )
        else:
            _log.info(
                "TLS policy (%s, not enforced) of %s: %s [%s]",
                outcome.policy_type,
                outcome.domain,
                outcome.detail,
                outcome.result.value,
            )
        hook = self.tls_report
        if hook is not None:
            try:
                hook(outcome)
            except Exception:
                slogging.log_exception(__name__)

    def _sts_policy(self, domain: str) -> StsPolicy | None:
        """The MTA-STS policy that applies to *domain* (``none`` mode: no policy)."""
        return self._sts_lookup(domain)[0]

    def _sts_lookup(self, domain: str) -> tuple[StsPolicy | None, PolicyFetchError | None]:
        """:meth:`_sts_policy`, and why the live policy could not be fetched."""
        if self.mta_sts is None:
            return None, None
        found = self.mta_sts.lookup(_dns_name(domain))
        error = found.error
        if error is not None:
            strings = _sts_strings(found.policy)
            self._report(TlsOutcome("sts", domain, "", error.result, error.reason, False, *strings))
        policy = found.policy
        if policy is None or policy.mode == "none":
            return None, error
        return policy, error

    def _sts_hosts(self, domain: str, policy: StsPolicy, records: list[MxHost]) -> list[MxHost]:
        """The exchangers an MTA-STS policy lets *domain*'s mail go to (RFC 8461 4.1)."""
        kept = [record for record in records if policy.matches(record[1])]
        if len(kept) == len(records):
            return records
        for _, host in records:
            if not policy.matches(host):
                reason = f"{host} is not an MX host of the MTA-STS policy of {domain}"
                result = TlsResult.VALIDATION_FAILURE
                enforced = policy.enforce
                strings = _sts_strings(policy)
                self._report(TlsOutcome("sts", domain, host, result, reason, enforced, *strings))
        if not policy.enforce:
            return records
        if not kept:
            reason = f"no MX host of {domain} matches its policy"
            raise TransientRelayError(
                f"MTA-STS: {reason}", policy_failure("MTA-STS", reason, b"[MX]")
            )
        return kept

    def _requirement(
        self, domain: str, host: str, policy: StsPolicy | None
    ) -> TlsRequirement | None:
        """What TLS must achieve with *host*: DANE first, then MTA-STS."""
        source: object = policy
        if self.dane is not None:
            status = self.dane.lookup(host)
            if status.kind == "failed":
                result = status.result or TlsResult.TLSA_INVALID
                self._report(TlsOutcome("tlsa", domain, host, result, status.reason, True))
                raise TransientRelayError(
                    f"DANE: {status.reason}", policy_failure("DANE", status.reason, b"[TLSA]")
                )
            if status.applies:
                source = status
        if source is None:
            return None
        # The same DANE status or cached policy object: the same requirement
        # (every message asks; building one costs more than finding it).
        known = self._requirements.get((domain, host))
        if known is not None and known[0] is source:
            return known[1]
        requirement = self._new_requirement(domain, host, source)
        if len(self._requirements) >= _MAX_ORDERS:
            self._requirements.clear()
        self._requirements[(domain, host)] = (source, requirement)
        return requirement

    def _new_requirement(self, domain: str, host: str, source: object) -> TlsRequirement:
        if isinstance(source, DaneStatus):
            assert self._dane_ctx is not None
            records = source.records
            tlsa = _tlsa_strings(records)
            if source.kind == "unusable":
                # RFC 7672 2.2: validated but unusable records still mean TLS.
                return TlsRequirement(
                    "tlsa",
                    domain,
                    host,
                    self._dane_ctx,
                    True,
                    None,
                    ("tlsa", None),
                    self._report,
                    policy_string=tlsa,
                )

            def check(chain: Sequence[bytes]) -> tuple[TlsResult, str] | None:
                return check_chain(records, chain, host)

            key = ("tlsa", _records_key(records))
            return TlsRequirement(
                "tlsa", domain, host, self._dane_ctx, True, check, key, self._report, tlsa
            )
        assert isinstance(source, StsPolicy)
        strings, patterns = _sts_strings(source)
        if source.enforce:
            return TlsRequirement(
                "sts",
                domain,
                host,
                self.verify_context,
                True,
                None,
                ("sts", True),
                self._report,
                strings,
                patterns,
            )
        # testing: as without a policy, with the outcomes reported
        return TlsRequirement(
            "sts",
            domain,
            host,
            self.context,
            False,
            None,
            ("sts", False),
            self._report,
            strings,
            patterns,
        )

    # ---------------------------------------------------------------- delivery
    def _get_static_relay(
        self, host: str, port: int, requirement: TlsRequirement | None = None
    ) -> StaticSmtpRelay:
        key: tuple[Any, ...] = (host, port) if requirement is None else (host, port, requirement)
        relay = self._relays.get(key)
        if relay is None:
            if len(self._relays) >= self.max_static_relays:
                self._drop_idle_relays()
            relay = self.new_static_relay(host, port)
            if requirement is not None:
                # Every client of this pool negotiates TLS as the policy asks;
                # its outcomes carry the session's addresses (RFC 8460).
                kwargs = relay.client_kwargs
                connect = track_addresses(kwargs.get("socket_creator") or create_connection)
                relay.client_kwargs = {
                    **kwargs,
                    "tls_requirement": requirement,
                    "socket_creator": connect,
                }
            self._relays[key] = relay
        return relay

    def _drop_idle_relays(self) -> None:
        for key, relay in list(self._relays.items()):
            if not relay.pool and not relay.queue:
                del self._relays[key]

    def _try_order(self, records: Sequence[MxHost], attempts: int) -> list[str]:
        """The hosts to try in this attempt: the chosen one, then the rest."""
        first = self.choose_mx(records, attempts)
        rest = [host for _, host in records if host != first]
        return [first, *dict.fromkeys(rest)][: max(1, self.max_mx_tries)]

    def attempt(self, envelope: Envelope, attempts: int) -> AttemptResult:
        """Deliver *envelope* to an exchanger of its first recipient's domain.

        A domain that is an address literal (``user@[192.0.2.1]``,
        ``user@[IPv6:2001:db8::1]``) is delivered to that address on
        :attr:`port`, without DNS.

        :param envelope: the message; every recipient goes to the same
            exchanger.
        :param attempts: how many attempts failed before this one (rotates
            the first exchanger tried, see :meth:`choose_mx`).
        :returns: what the static relay returns: one result per recipient.
        :raises NoDomainError: the first recipient has no domain.
        :raises PermanentRelayError: the domain does not exist, has a null MX
            or no usable records, is an invalid address literal, or a server
            refused the message for good.
        :raises TransientRelayError: DNS failed for now, no exchanger could be
            reached, a TLS policy (MTA-STS, DANE) refused every exchanger
            tried (``451 4.7.5``), or a server refused the message for now.
        :raises PermanentRelayError: ``550 5.7.30`` for a REQUIRETLS message
            that no exchanger may take (see the module documentation).
        """
        domain = _destination_domain(envelope)
        forced = self._forced.get(domain)
        if forced is not None:
            return self._get_static_relay(*forced).attempt(envelope, attempts)
        literal = _address_literal(domain)
        if literal is not None:
            # RFC 5321 5.1: an address literal is the host itself; no DNS.
            return self._get_static_relay(literal, self.port).attempt(envelope, attempts)
        records = self._mx_records(domain)
        if envelope.requiretls:
            return self._attempt_requiretls(envelope, attempts, domain, records)
        if self._policies and envelope.tls_optional:
            # RFC 8689 4.2.2: the sender asked that MTA-STS and DANE not
            # stand in the way; the relay's own TLS settings still apply.
            hosts = self._try_order(records, attempts)
            return self._first_usable(hosts, envelope, attempts, domain, lambda host: None)
        policy = self._sts_policy(domain)
        if policy is not None:
            records = self._sts_hosts(domain, policy, records)
        hosts = self._try_order(records, attempts)
        if not self._policies:
            return self._first_usable(hosts, envelope, attempts, domain, lambda host: None)

        def requirement(host: str) -> TlsRequirement | None:
            return self._requirement(domain, host, policy)

        return self._first_usable(hosts, envelope, attempts, domain, requirement)

    def _first_usable(
        self,
        hosts: Sequence[str],
        envelope: Envelope,
        attempts: int,
        domain: str,
        requirement: Callable[[str], TlsRequirement | None],
        requiretls: bool = False,
    ) -> AttemptResult:
        """Deliver to the first of *hosts* that can be reached and that the
        TLS policies (*requirement* of each host) and, for a REQUIRETLS
        message, the REQUIRETLS rules let the message go to."""
        for i, host in enumerate(hosts):
            try:
                relay = self._get_static_relay(host, self.port, requirement(host))
                return relay.attempt(envelope, attempts)
            except TransientRelayError as exc:
                # RFC 8461 (and 7672): a host refused by a TLS policy is
                # skipped like an unreachable one, before any mail was sent.
                usable = _connect_failed(exc) or (
                    _tls_refused(exc) if requiretls else _policy_refused(exc)
                )
                if not usable or i + 1 == len(hosts):
                    if requiretls and usable:
                        raise _requiretls_final(exc) from None
                    raise
                last: RelayError = exc
            except PermanentRelayError as exc:
                # RFC 8689 4.2.1: an exchanger that cannot take a REQUIRETLS
                # message is skipped too; after the last, the message fails.
                if not (requiretls and _tls_refused(exc)) or i + 1 == len(hosts):
                    raise
                last = exc
            _log.info(
                "MX %s:%s for %s unusable (%s %s), trying %s",
                host,
                self.port,
                domain,
                last.reply.code,
                last.reply.message,
                hosts[i + 1],
            )
        raise AssertionError("unreachable")  # pragma: no cover

    # -------------------------------------------------------------- REQUIRETLS
    def _attempt_requiretls(
        self, envelope: Envelope, attempts: int, domain: str, records: list[MxHost]
    ) -> AttemptResult:
        """Deliver a REQUIRETLS message as RFC 8689 4.2.1 says: only to
        exchangers an MTA-STS policy or DANE authenticates, over that TLS, to
        servers offering REQUIRETLS; ``550 5.7.30`` when there are none."""
        if not self._policies:
            raise _requiretls_refusal(
                f"neither MTA-STS nor DANE can authenticate the MX hosts of {domain}"
            )
        policy, fetch_error = self._sts_lookup(domain)
        if policy is not None:
            try:
                records = self._sts_hosts(domain, policy, records)
            except TransientRelayError as exc:
                raise _requiretls_refusal(exc.reply.raw_message or "") from None
            # A testing policy lists the valid hosts as well: only they may
            # take the message, and they must pass as under enforce.
            records = [record for record in records if policy.matches(record[1])]
            if not records:
                raise _requiretls_refusal(f"MTA-STS: no MX host of {domain} matches its policy")
        elif self.dane is None:
            if fetch_error is not None:
                # The policy may come back: try again later.
                reason = f"policy of {domain} not available: {fetch_error.reason}"
                raise TransientRelayError(
                    f"MTA-STS: {reason}", policy_failure("MTA-STS", reason, b"[MX]")
                )
            raise _requiretls_refusal(f"{domain} has no MTA-STS policy, and DANE is off")

        def requirement(host: str) -> TlsRequirement:
            return self._requiretls_requirement(domain, host, policy, fetch_error)

        hosts = self._try_order(records, attempts)
        return self._first_usable(hosts, envelope, attempts, domain, requirement, True)

    def _requiretls_requirement(
        self,
        domain: str,
        host: str,
        policy: StsPolicy | None,
        fetch_error: PolicyFetchError | None,
    ) -> TlsRequirement:
        """The requirement under which *host* may take a REQUIRETLS message:
        one that authenticates it (DANE usable records, else MTA-STS enforced).

        :raises PermanentRelayError: ``550 5.7.30``, nothing authenticates it.
        :raises TransientRelayError: ``451 4.7.5``, its TLSA lookup failed, or
            the MTA-STS policy could not be fetched and nothing else applies.
        """
        found = self._requirement(domain, host, policy)
        if found is None:
            if fetch_error is not None:
                reason = f"policy of {domain} not available: {fetch_error.reason}"
                raise TransientRelayError(
                    f"MTA-STS: {reason}", policy_failure("MTA-STS", reason, b"[MX]")
                )
            raise _requiretls_refusal(f"no MTA-STS policy or DANE record authenticates {host}")
        if found.authenticates:
            return found
        if found.policy_type == "tlsa":
            raise _requiretls_refusal(f"the TLSA records of {host} are all unusable")
        # MTA-STS testing: enforced for this message, with PKIX verification.
        return dataclasses.replace(
            found, context=self.verify_context, enforce=True, key=("sts", True)
        )

    @property
    def _policies(self) -> bool:
        return self.mta_sts is not None or self.dane is not None

    def kill(self) -> None:
        """Kill every static relay's connections."""
        for relay in list(self._relays.values()):
            relay.kill()
