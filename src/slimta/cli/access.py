"""Who may do what: the SMTP validators of ``slimta serve``.

The rules, checked by :class:`ServeValidators` on every session:

* **Connections** (at the banner): beyond ``limits.max_connections`` in all,
  or ``limits.max_connections_per_ip`` from one address outside the trusted
  networks, the client is told ``421 4.7.0`` and disconnected.
* **Submission** (listeners of kind ``submission`` and ``smtps``): MAIL
  needs a successful AUTH first (``530 5.7.0``), and AUTH needs TLS (the
  library refuses PLAIN and LOGIN in clear text with ``538 5.7.11``).
* **Privileged clients** are those that authenticated or connect from a
  ``server.trusted_networks`` network. Nothing is trusted by default, not
  even loopback.
* **Others**, at MAIL: at most ``limits.max_messages_per_minute_per_ip``
  messages a minute (``450 4.7.1``), not listed on a ``policies.dnsbl``
  zone (``554 5.7.1``), and with ``policies.spf = "enforce"`` no SPF
  ``fail`` (``550 5.7.23``; a temporary DNS error gives ``451 4.7.24``).
* **Recipients**: in a local domain, the address must be a ``[users]``
  entry when any is listed (``550 5.1.1``; ``postmaster`` always exists);
  any other domain only for privileged clients (``550 5.7.1 Relaying
  denied``). So the server is never an open relay unless its configuration
  trusts everyone.

:class:`Access` holds what the rules read; a reload replaces it whole, and
each session keeps the one it started with.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from slimta.cli.config import IPNetwork, LimitsConfig
from slimta.edge.smtp import SmtpValidators
from slimta.lookup.auth import LookupAuth
from slimta.lookup.drivers import DictLookup
from slimta.smtp.reply import Reply
from slimta.util.dnsbl import DnsBlocklistGroup
from slimta.util.spf import EnforceSpf

__all__ = ["Access", "Counters", "Runtime", "ServeValidators", "validators_for"]

#: The seconds a message-rate limit counts over.
RATE_WINDOW = 60.0
#: The most seconds MAIL waits for the DNS blocklists.
DNSBL_TIMEOUT = 5.0


def _domain_of(address: str) -> str | None:
    """The lower-case domain of *address*, or ``None`` without one."""
    _, at, domain = address.rpartition("@")
    return domain.rstrip(".").lower() if at and domain else None


def _is_postmaster(address: str) -> bool:
    local = address.rpartition("@")[0] if "@" in address else address
    return local.lower() == "postmaster"


class _CaseFolded(Mapping[str, Any]):
    """The ``[users]`` table for :class:`~slimta.lookup.drivers.DictLookup`:
    records under lower-case addresses, looked up in any case."""

    def __init__(self, users: Iterable[tuple[str, str]]) -> None:
        self._records = {address: {"password": hashed} for address, hashed in users}

    def __getitem__(self, key: str) -> Any:
        return self._records[key.lower()]

    def __iter__(self) -> Any:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


class Access:
    """What the validators consult, built from one configuration.

    :param domains: the local domains (lower case).
    :param users: ``(address, password hash)`` pairs (addresses lower case).
    :param catch_all: every local part of a local domain has a mailbox.
    :param trusted: the networks whose clients may relay without AUTH.
    :param limits: the ``[limits]`` section.
    :param spf: an :class:`EnforceSpf` to refuse SPF failures, or ``None``.
    :param dnsbl: the blocklists to refuse listed clients, or ``None``.
    """

    def __init__(
        self,
        domains: Iterable[str],
        users: Iterable[tuple[str, str]],
        catch_all: bool,
        trusted: Iterable[IPNetwork],
        limits: LimitsConfig,
        spf: EnforceSpf | None = None,
        dnsbl: DnsBlocklistGroup | None = None,
    ) -> None:
        self.domains = frozenset(domains)
        users = list(users)
        self.users = frozenset(address for address, _ in users)
        self.catch_all = catch_all
        self.trusted = tuple(trusted)
        self.limits = limits
        self.spf = spf
        self.dnsbl = dnsbl
        #: Checks AUTH against the users' hashes; ``None`` without users.
        self.auth = LookupAuth(DictLookup(_CaseFolded(users), "{address}")) if users else None

    def is_trusted(self, ip: object) -> bool:
        """True when *ip* (a string, or anything else for "unknown") is in a
        trusted network."""
        if not isinstance(ip, str) or not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped  # ::ffff:192.0.2.1 on a dual-stack socket
        return any(address in network for network in self.trusted)

    def is_local(self, address: str) -> bool:
        """True when *address* is delivered here (a local domain, or a bare
        ``postmaster`` without a domain)."""
        domain = _domain_of(address)
        if domain is None:
            return _is_postmaster(address)
        return domain in self.domains

    def has_mailbox(self, address: str) -> bool:
        """True when the local *address* may receive mail."""
        if self.catch_all or not self.users or _is_postmaster(address):
            return True
        return address.lower() in self.users


class Counters:
    """Connections open now and recent messages, per client address; shared
    by every listener and kept across reloads.

    :param clock: monotonic seconds (injected for tests).
    """

    #: Above this many addresses tracked, stale message counts are swept.
    _SWEEP_ABOVE = 10000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        #: Connections open now, in all.
        self.total = 0
        self._open: dict[str, int] = {}
        self._messages: dict[str, deque[float]] = {}

    def opened(self, ip: str) -> None:
        self.total += 1
        self._open[ip] = self._open.get(ip, 0) + 1

    def closed(self, ip: str) -> None:
        self.total -= 1
        left = self._open.get(ip, 1) - 1
        if left > 0:
            self._open[ip] = left
        else:
            self._open.pop(ip, None)

    def connections(self, ip: str) -> int:
        """Connections open now from *ip*."""
        return self._open.get(ip, 0)

    def allow_message(self, ip: str, per_minute: int) -> bool:
        """Count a new message from *ip*; False (and not counted) when it
        already started *per_minute* in the last minute."""
        now = self.clock()
        recent = self._messages.get(ip)
        if recent is None:
            if len(self._messages) > self._SWEEP_ABOVE:
                self._sweep(now)
            recent = self._messages[ip] = deque()
        while recent and recent[0] <= now - RATE_WINDOW:
            recent.popleft()
        if len(recent) >= per_minute:
            return False
        recent.append(now)
        return True

    def _sweep(self, now: float) -> None:
        stale = [
            ip
            for ip, times in self._messages.items()
            if not times or times[-1] <= now - RATE_WINDOW
        ]
        for ip in stale:
            del self._messages[ip]


class Runtime:
    """What lives as long as the server: the current :class:`Access`
    (replaced on reload) and the :class:`Counters`."""

    def __init__(self, access: Access, counters: Counters | None = None) -> None:
        self.access = access
        self.counters = counters if counters is not None else Counters()


def _refuse(reply: Reply, code: str, message: str) -> None:
    reply.code = code
    reply.message = message


class ServeValidators(SmtpValidators):
    """The hooks of every ``slimta serve`` session; see the module notes.

    Each listener gets a subclass from :func:`validators_for` that sets
    :attr:`runtime` and :attr:`requires_auth`.
    """

    #: The server's shared state.
    runtime: ClassVar[Runtime]
    #: MAIL needs AUTH first (submission, smtps).
    requires_auth: ClassVar[bool] = False

    def __init__(self, session: Any) -> None:
        super().__init__(session)
        # One Access for the whole session, even if a reload comes meanwhile.
        self.access = self.runtime.access
        address = session.address
        self.ip: str | None = address[0] if address and isinstance(address[0], str) else None
        self.trusted = self.access.is_trusted(self.ip)

    @property
    def privileged(self) -> bool:
        """The client may relay: it authenticated, or is in a trusted network."""
        return self.trusted or bool(self.session.auth)

    def handle_banner(self, reply: Reply, address: Any) -> None:
        limits = self.access.limits
        counters = self.runtime.counters
        if limits.max_connections and counters.total > limits.max_connections:
            _refuse(reply, "421", "4.7.0 Too many connections, try again later")
        elif (
            limits.max_connections_per_ip
            and self.ip is not None
            and not self.trusted
            and counters.connections(self.ip) > limits.max_connections_per_ip
        ):
            _refuse(reply, "421", "4.7.0 Too many connections from your address, try again later")

    def handle_auth(self, reply: Reply, creds: Any) -> None:
        auth = self.access.auth
        if auth is None:
            _refuse(reply, "535", "5.7.8 Authentication credentials invalid")
            return
        auth.handle_auth(reply, creds)

    def handle_mail(self, reply: Reply, sender: str, params: Any) -> None:
        session = self.session
        if self.requires_auth and not session.auth:
            if session.security is None:
                _refuse(reply, "530", "5.7.0 Must issue a STARTTLS command first")
            else:
                _refuse(reply, "530", "5.7.0 Authentication required")
            return
        if self.privileged or self.ip is None:
            return
        access = self.access
        per_minute = access.limits.max_messages_per_minute_per_ip
        if per_minute and not self.runtime.counters.allow_message(self.ip, per_minute):
            _refuse(reply, "450", "4.7.1 Too many messages from your address, try again later")
            return
        if access.dnsbl is not None:
            listed = access.dnsbl.get(self.ip, timeout=DNSBL_TIMEOUT)
            if listed:
                zone = sorted(listed)[0]
                _refuse(reply, "554", f"5.7.1 Service unavailable; [{self.ip}] is listed on {zone}")
                return
        if access.spf is not None:
            result, reason = access.spf.query(sender, self.ip, session.ehlo_as)
            if result == "fail":
                _refuse(reply, "550", f"5.7.23 SPF validation failed: {reason}")
            elif result == "temperror":
                _refuse(reply, "451", f"4.7.24 SPF validation error: {reason}")

    def handle_rcpt(self, reply: Reply, recipient: str, params: Any) -> None:
        access = self.access
        if access.is_local(recipient):
            if not access.has_mailbox(recipient):
                _refuse(reply, "550", "5.1.1 No such user here")
        elif not self.privileged:
            _refuse(reply, "550", "5.7.1 Relaying denied")


def validators_for(runtime: Runtime, requires_auth: bool) -> type[ServeValidators]:
    """A validators class for one listener."""
    attrs = {"runtime": runtime, "requires_auth": requires_auth}
    name = "SubmissionValidators" if requires_auth else "SmtpValidators"
    return type(name, (ServeValidators,), attrs)
