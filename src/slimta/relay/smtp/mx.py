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
"""

from __future__ import annotations

import ipaddress
import logging
import random
import ssl
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import pycares.errno

from slimta.relay import AttemptResult, PermanentRelayError, Relay, TransientRelayError
from slimta.relay.smtp.static import StaticSmtpRelay
from slimta.smtp.reply import Reply
from slimta.util.dns import DNSError, DNSResolver

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["MxSmtpRelay", "NoDomainError"]

_log = logging.getLogger(__name__)

#: One mail exchanger: ``(preference, host)``.
MxHost: TypeAlias = tuple[int, str]

#: The ``command`` of the reply a pool client reports when it could not
#: connect at all (see :mod:`slimta.relay.smtp.client`).
_CONNECT_STEPS = (b"[CONNECT]", "[CONNECT]")

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
       attempt go on to the next one, and *port*, *rng* and *local_hosts*
       are new.
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
        **client_kwargs: Any,
    ) -> None:
        super().__init__()
        #: Normalised names of this host as an exchanger (see *local_hosts*).
        self.local_hosts = frozenset(_mx_host(host) for host in local_hosts)
        self.context = context if context is not None else ssl.create_default_context()
        self.port = port
        self.client_kwargs = client_kwargs
        self._rng = rng if rng is not None else random.SystemRandom()
        self._forced: dict[str, tuple[str, int]] = {}
        self._relays: dict[tuple[str, int], StaticSmtpRelay] = {}
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

    # ---------------------------------------------------------------- delivery
    def _get_static_relay(self, host: str, port: int) -> StaticSmtpRelay:
        relay = self._relays.get((host, port))
        if relay is None:
            if len(self._relays) >= self.max_static_relays:
                self._drop_idle_relays()
            relay = self.new_static_relay(host, port)
            self._relays[(host, port)] = relay
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
            reached, or a server refused the message for now.
        """
        domain = _destination_domain(envelope)
        forced = self._forced.get(domain)
        if forced is not None:
            return self._get_static_relay(*forced).attempt(envelope, attempts)
        literal = _address_literal(domain)
        if literal is not None:
            # RFC 5321 5.1: an address literal is the host itself; no DNS.
            return self._get_static_relay(literal, self.port).attempt(envelope, attempts)
        hosts = self._try_order(self._mx_records(domain), attempts)
        for i, host in enumerate(hosts):
            try:
                return self._get_static_relay(host, self.port).attempt(envelope, attempts)
            except TransientRelayError as exc:
                if i + 1 == len(hosts) or not _connect_failed(exc):
                    raise
                _log.info(
                    "MX %s:%s for %s unreachable (%s %s), trying %s",
                    host,
                    self.port,
                    domain,
                    exc.reply.code,
                    exc.reply.message,
                    hosts[i + 1],
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def kill(self) -> None:
        """Kill every static relay's connections."""
        for relay in list(self._relays.values()):
            relay.kill()
