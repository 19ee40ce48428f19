"""Check client addresses against DNS blocklists (DNSBLs, RFC 5782).

A DNSBL publishes each listed address as a name under its own domain: the
address's labels reversed, as in reverse DNS. ``192.0.2.1`` is listed on
``dnsbl.example`` when ``1.2.0.192.dnsbl.example`` has an A record, and an
IPv6 address is looked up by its 32 nibbles, reversed (RFC 5782 2.1, 2.4).
A TXT record of the same name may say why it is listed::

    from slimta.util.dnsbl import DnsBlocklist, DnsBlocklistGroup, check_dnsbl

    zen = DnsBlocklist("zen.spamhaus.org")
    if zen.get("192.0.2.1", timeout=5.0):
        reason = zen.get_reason("192.0.2.1", timeout=5.0)

    group = DnsBlocklistGroup()
    group.add_dnsbl("zen.spamhaus.org")
    group.add_dnsbl("bl.spamcop.net")
    matches = group.get("192.0.2.1", timeout=5.0)  # e.g. {'bl.spamcop.net'}

    class Validators(SmtpValidators):
        @check_dnsbl("zen.spamhaus.org")
        def handle_banner(self, reply, address):
            ...

What counts as listed
---------------------

* An A record in ``127.0.0.0/8`` (RFC 5782 2.1): listed.
* NXDOMAIN, or a name without A records: not listed.
* Only A records in ``127.255.255.0/24``: not listed. Lists such as
  Spamhaus answer with these when they refuse the query (too many queries,
  or queries through a public resolver), not when the address is listed;
  a warning is logged, since the list is then of no use.
* Only A records outside ``127.0.0.0/8``: not listed, and a warning is
  logged. Such answers come from a list that has shut down and now resolves
  every name, or from a resolver that rewrites NXDOMAIN; treating them as
  listings would refuse every client.
* Any other failure (SERVFAIL, refused, no answer within the resolver's own
  timeout, a wait longer than *timeout*): the *strict* argument of
  :meth:`DnsBlocklist.get` decides, ``False`` unless asked otherwise, and
  a warning is logged with the list and the address.
* Something that is not an IP address (the path of a Unix socket, the
  ``None`` of a PROXY protocol ``UNKNOWN`` header): not listed, no query.

How waiting works
-----------------

Queries go through :meth:`DNSResolver.query_cached
<slimta.util.dns.DNSResolver.query_cached>`: answers are kept by their TTL
(NXDOMAIN for a minute), identical concurrent queries are sent once, and
nothing else is cached here. A *timeout* bounds how long the caller waits;
when it runs out the caller goes on, and the query, which c-ares cannot
cancel on its own, ends within the resolver's own timeout and retries
(:meth:`~slimta.util.dns.DNSResolver.configure`) with nobody waiting for it.
:class:`DnsBlocklistGroup` runs one greenlet per list and kills any that
are left when its overall timeout runs out. No ``gevent.Timeout`` is raised
into the caller: a failed or slow list never becomes an exception in a
validator hook.

.. versionchanged:: 4.0
   DNS errors other than NXDOMAIN give *strict* (python-slimta 4.0 gave
   ``not strict``, listing every client when a list failed);
   answers outside ``127.0.0.0/8`` and in ``127.255.255.0/24`` are not
   listings; IPv6 addresses are looked up by nibbles; addresses that are
   not IP addresses are not looked up.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import gevent
import pycares
from gevent.pool import Pool

from slimta import logging as slogging
from slimta.util.dns import DNSResolver, reverse_name

__all__ = ["DnsBlocklist", "DnsBlocklistGroup", "check_dnsbl"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Hook = TypeVar("_Hook", bound=Callable[..., Any])

#: Where the A records of listed addresses live (RFC 5782 2.1).
_LISTED = ipaddress.IPv4Network("127.0.0.0/8")
#: Answers some lists give when they refuse to answer (rate limits, public
#: resolvers): not listings.
_REFUSED = ipaddress.IPv4Network("127.255.255.0/24")
#: DNS errors that mean "not listed": NXDOMAIN, and a name without A (or TXT)
#: records.
_NOT_LISTED = frozenset({pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_ENODATA})
#: Seconds ``ip in blocklist``, ``blocklist[ip]`` and ``ip in group`` wait.
_ITEM_TIMEOUT = 10.0


def _client_labels(ip: object) -> str | None:
    """The reversed labels of *ip* that go in front of a list's domain.

    ``'192.0.2.1'`` gives ``'1.2.0.192'``; an IPv6 address its 32 nibbles,
    reversed (RFC 5782 2.4); an IPv4-mapped IPv6 address (a dual-stack
    listener's view of an IPv4 client) its IPv4 labels. ``None`` when *ip*
    is not an IP address.
    """
    if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        ip = str(ip)
    if not isinstance(ip, str):
        return None
    try:
        pointer = reverse_name(ip)
    except ValueError:
        return None
    # The reverse-DNS name without its 'in-addr.arpa' or 'ip6.arpa' suffix.
    return pointer.rsplit(".", 2)[0]


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _update_loop_time() -> None:
    # gevent measures timeouts from the time its loop last looked at the
    # clock; after a long stretch without the hub running that is stale,
    # and a timeout would end that much early.
    gevent.get_hub().loop.update_now()


def _wait_for(name: str, query_type: str, timeout: float | None) -> tuple[bool, Any]:
    """Look *name* up and wait at most *timeout* seconds for the answer.

    :returns: ``(True, records)``; ``(False, exception)`` when the query
        failed; ``(False, None)`` when *timeout* ran out first.
    """
    result = DNSResolver.query_cached(name, query_type)
    _update_loop_time()
    # wait(), unlike get(timeout=...), raises nothing when time runs out:
    # no Timeout of ours can be mistaken for one the caller started.
    result.wait(timeout)
    if not result.ready():
        return False, None
    if result.successful():
        return True, result.value
    return False, result.exception


class DnsBlocklist:
    """One DNS blocklist.

    :param address: the list's domain, e.g. ``'zen.spamhaus.org'``.
    """

    def __init__(self, address: str) -> None:
        #: The list's domain, as given.
        self.address = address
        self._domain = address.rstrip(".")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"

    def _query_name(self, ip: object) -> str | None:
        labels = _client_labels(ip)
        return None if labels is None else f"{labels}.{self._domain}"

    def get(self, ip: Any, timeout: float | None = None, strict: bool = False) -> bool:
        """Whether *ip* is listed.

        :param ip: the address, e.g. ``'192.0.2.1'`` or ``'2001:db8::1'``;
            anything else is not listed and not looked up.
        :param timeout: the most seconds to wait for the answer; ``None``
            waits until the resolver answers or gives up.
        :param strict: the answer when the list could not be asked: DNS
            errors other than NXDOMAIN, or no answer in time. ``True`` fails
            closed (the address counts as listed).
        :returns: ``True`` if an A record in ``127.0.0.0/8`` (outside
            ``127.255.255.0/24``) answers; see the module documentation.

        .. versionchanged:: 4.0
           DNS errors give *strict*, not ``not strict``.
        """
        name = self._query_name(ip)
        if name is None:
            return False
        try:
            answered, value = _wait_for(name, "A", timeout)
        except Exception:
            # A resolver bug must not turn into an error reply for every client.
            slogging.log_exception(__name__, dnsbl=self.address, ip=ip)
            return strict
        if not answered:
            if value is None:
                slogging.logline(
                    log.warning, "dnsbl", self.address, "timed_out", ip=ip, timeout=timeout
                )
            elif getattr(value, "errno", None) in _NOT_LISTED:
                return False
            else:
                slogging.logline(
                    log.warning, "dnsbl", self.address, "lookup_failed", ip=ip, error=str(value)
                )
            return strict
        return self._is_listing(ip, value)

    def _is_listing(self, ip: Any, records: list[Any]) -> bool:
        answers = [str(getattr(record, "host", record)) for record in records]
        refused = False
        for answer in answers:
            try:
                addr = ipaddress.IPv4Address(answer)
            except ValueError:
                continue
            if addr in _REFUSED:
                refused = True
            elif addr in _LISTED:
                slogging.logline(log.debug, "dnsbl", self.address, "listed", ip=ip, answers=answers)
                return True
        operation = "refused" if refused else "bad_answer"
        slogging.logline(log.warning, "dnsbl", self.address, operation, ip=ip, answers=answers)
        return False

    def get_reason(self, ip: Any, timeout: float | None = None) -> str | None:
        """The text the list gives for *ip*: its first TXT record.

        :param ip: the address.
        :param timeout: the most seconds to wait; ``None`` waits until the
            resolver answers or gives up.
        :returns: the text, or ``None`` when there is none, the lookup failed
            (logged, except for NXDOMAIN and no TXT records) or *timeout*
            ran out.
        """
        name = self._query_name(ip)
        if name is None:
            return None
        try:
            answered, value = _wait_for(name, "TXT", timeout)
        except Exception:
            slogging.log_exception(__name__, dnsbl=self.address, ip=ip)
            return None
        if answered:
            return str(value[0].text) if value else None
        if value is None:
            slogging.logline(
                log.warning, "dnsbl", self.address, "reason_timed_out", ip=ip, timeout=timeout
            )
        elif getattr(value, "errno", None) not in _NOT_LISTED:
            slogging.logline(
                log.warning, "dnsbl", self.address, "reason_failed", ip=ip, error=str(value)
            )
        return None

    def __contains__(self, ip: Any) -> bool:
        """``ip in blocklist``: :meth:`get` with a 10 s timeout."""
        return self.get(ip, timeout=_ITEM_TIMEOUT)

    def __getitem__(self, ip: Any) -> str | None:
        """``blocklist[ip]``: :meth:`get_reason` with a 10 s timeout."""
        return self.get_reason(ip, timeout=_ITEM_TIMEOUT)


class DnsBlocklistGroup:
    """Several DNS blocklists, asked in parallel.

    :param pool: the :class:`gevent.pool.Pool` that runs one greenlet per
        list and query; an ``int`` makes a pool of that size; ``None`` (the
        default) an unbounded one. With a bounded pool that is full, a query
        waits for room within its timeout; lists that get none are skipped
        (logged).
    """

    def __init__(self, pool: Pool | int | None = None) -> None:
        if pool is None or isinstance(pool, int):
            pool = Pool(pool)
        #: The pool the greenlets run in.
        self.pool: Pool = pool
        #: The lists, in the order they were added.
        self.dnsbls: list[DnsBlocklist] = []

    def add_dnsbl(self, address: str | DnsBlocklist) -> None:
        """Add a list.

        :param address: the list's domain; a :class:`DnsBlocklist` (or an
            instance of a subclass) is also accepted, and used as it is.
        """
        self.dnsbls.append(address if isinstance(address, DnsBlocklist) else DnsBlocklist(address))

    def _ask_all(
        self,
        dnsbls: Iterable[DnsBlocklist],
        ask: Callable[[DnsBlocklist, float | None], _T],
        timeout: float | None,
        ip: Any,
    ) -> dict[DnsBlocklist, _T]:
        """``ask(dnsbl, seconds_left)`` for each list, in parallel; the
        results that came within *timeout*."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pool = self.pool
        jobs: list[tuple[DnsBlocklist, Any]] = []
        results: dict[DnsBlocklist, _T] = {}
        try:
            for dnsbl in dnsbls:
                if pool.full() and not pool.wait_available(timeout=_remaining(deadline)):
                    slogging.logline(log.warning, "dnsbl", dnsbl.address, "not_checked", ip=ip)
                    continue
                jobs.append((dnsbl, pool.spawn(self._ask_one, ask, dnsbl, _remaining(deadline))))
            _update_loop_time()
            gevent.joinall([job for _, job in jobs], timeout=_remaining(deadline))
            # Read before the kill below: a killed greenlet counts as
            # successful, its value the GreenletExit.
            results = {dnsbl: job.value for dnsbl, job in jobs if job.successful()}
        finally:
            # Whether time ran out or the caller was killed, nothing is left
            # running: a list still unanswered counts as no answer.
            left = [(dnsbl, job) for dnsbl, job in jobs if not job.ready()]
            if left:
                gevent.killall([job for _, job in left])
                for dnsbl, _ in left:
                    slogging.logline(
                        log.warning, "dnsbl", dnsbl.address, "timed_out", ip=ip, timeout=timeout
                    )
        return results

    @staticmethod
    def _ask_one(
        ask: Callable[[DnsBlocklist, float | None], _T], dnsbl: DnsBlocklist, timeout: float | None
    ) -> _T | None:
        try:
            return ask(dnsbl, timeout)
        except Exception:
            # A subclass's get() failing must not end the others' checks.
            slogging.log_exception(__name__, dnsbl=dnsbl.address)
            return None

    def get(self, ip: Any, timeout: float | None = None) -> set[str]:
        """The lists on which *ip* is listed, all asked at once.

        :param ip: the address; anything but an IP address matches nothing.
        :param timeout: the most seconds to wait for all the answers; lists
            that have not answered by then do not match.
        :returns: the :attr:`DnsBlocklist.address` of each matching list.

        Failing lists do not match (``strict=False``).
        """
        if _client_labels(ip) is None:
            return set()
        found = self._ask_all(self.dnsbls, lambda bl, left: bl.get(ip, left), timeout, ip)
        return {dnsbl.address for dnsbl, listed in found.items() if listed}

    def get_reasons(
        self, matches: Iterable[str], ip: Any, timeout: float | None = None
    ) -> dict[str, str | None]:
        """The reasons the lists in *matches* give for *ip*, asked at once.

        :param matches: list addresses, usually what :meth:`get` returned;
            addresses not in the group are ignored.
        :param ip: the address.
        :param timeout: the most seconds to wait for all the answers.
        :returns: ``{list address: reason}`` for each list of *matches*;
            the reason is ``None`` when the list gave none in time.
        """
        wanted = set(matches)
        dnsbls = [dnsbl for dnsbl in self.dnsbls if dnsbl.address in wanted]
        reasons: dict[str, str | None] = dict.fromkeys(dnsbl.address for dnsbl in dnsbls)
        if _client_labels(ip) is None or not dnsbls:
            return reasons
        found = self._ask_all(dnsbls, lambda bl, left: bl.get_reason(ip, left), timeout, ip)
        for dnsbl, reason in found.items():
            if reason is not None:
                reasons[dnsbl.address] = reason
        return reasons

    def __contains__(self, ip: Any) -> bool:
        """``ip in group``: listed on any list, within 10 s."""
        return bool(self.get(ip, timeout=_ITEM_TIMEOUT))


class _Checker(Protocol):
    def get(self, ip: Any, timeout: float | None = None) -> object: ...


def _session_ip(session: Any) -> str | None:
    """The client's IP address from ``session.address``, if it has one."""
    address = getattr(session, "address", None)
    if isinstance(address, tuple | list) and address:
        ip = address[0]
        if isinstance(ip, str) and _client_labels(ip) is not None:
            return ip
    return None


def check_dnsbl(
    address: str | DnsBlocklist | DnsBlocklistGroup,
    match_code: str = "550",
    match_message: str = "5.7.1 Access denied",
    timeout: float = 10.0,
) -> Callable[[_Hook], _Hook]:
    """A decorator for :class:`~slimta.edge.smtp.SmtpValidators` hooks that
    refuses listed clients.

    Before the hook runs, the client's address (``self.session.address[0]``)
    is looked up. If it is listed, the reply gets *match_code* and
    *match_message* and the hook is not called; otherwise the hook is called
    as usual. Lookup failures and timeouts let the session go on
    (``strict=False``), so a failing list never refuses every client::

        class Validators(SmtpValidators):
            @check_dnsbl("zen.spamhaus.org", match_code="554")
            def handle_banner(self, reply, address):
                pass

    :param address: a list's domain, a :class:`DnsBlocklist` or a
        :class:`DnsBlocklistGroup` (listed on any of its lists).
    :param match_code: the reply code for listed clients.
    :param match_message: the reply text for listed clients.
    :param timeout: the most seconds the hook waits for the lists.
    """
    checker: _Checker = DnsBlocklist(address) if isinstance(address, str) else address

    def decorate(hook: _Hook) -> _Hook:
        @functools.wraps(hook)
        def checked(self: Any, reply: Any, *args: Any, **kwargs: Any) -> Any:
            ip = _session_ip(self.session)
            if ip is not None and checker.get(ip, timeout=timeout):
                reply.code = match_code
                reply.message = match_message
                return None
            return hook(self, reply, *args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate
