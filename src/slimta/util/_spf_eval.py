"""SPF ``check_host()`` (RFC 7208 sections 4 to 7) on slimta's DNS resolver.

:func:`check_host` evaluates the SPF record of a domain for a client
address. It is written for :class:`slimta.util.spf.EnforceSpf` and is private.

What it does:

* mechanisms ``all include a mx ptr ip4 ip6 exists`` and the modifier
  ``redirect``; ``exp`` is checked for syntax and otherwise ignored (the
  reason text is ours, not the domain's explanation); unknown modifiers are
  ignored (6);
* the limit of 10 terms that query DNS (4.6.4), the 10 MX and 10 PTR names
  per term, and the limit of 2 void lookups, all giving ``permerror``;
  ``include`` loops end at the 10-term limit;
* macros (7): ``s l o d i p h v`` with digits, ``r`` and delimiters, and
  ``%% %_ %-``. ``%{p}`` expands to ``unknown`` (allowed by 7.3; it saves
  DNS queries the RFC discourages); ``c r t``, valid only in ``exp``, give
  ``permerror`` elsewhere.

DNS failures other than NXDOMAIN and NODATA, and running out of time, give
``temperror``. Nothing here blocks except the waits on the resolver, each
bounded by the deadline of the whole check.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Any

import gevent
import pycares

from slimta.util.dns import DNSResolver, reverse_name

__all__ = ["SpfError", "check_host"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: DNS errors that mean "nothing there" (a void lookup, 4.6.4).
_VOID = frozenset({pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_ENODATA})
#: Terms that cause DNS queries (4.6.4); at most 10 per check_host().
_MAX_DNS_TERMS = 10
#: Lookups that found nothing; more than 2 is a permerror (4.6.4).
_MAX_VOID = 2
#: MX and PTR names looked at per term (4.6.4).
_MAX_NAMES = 10

_MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_VERSION = re.compile(r"v=spf1(?: |$)", re.IGNORECASE)
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)\Z", re.DOTALL)
_MACRO = re.compile(r"%(?:\{([A-Za-z])([0-9]*)(r?)([.+,/_=-]*)\}|(.))", re.IGNORECASE | re.DOTALL)
#: A DNS label; ``_`` allowed, as in the common ``_spf.example.com``.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


class SpfError(Exception):
    """Evaluation ended with *result* (``'permerror'`` or ``'temperror'``)."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


def _perm(reason: str) -> SpfError:
    return SpfError("permerror", reason)


def _temp(reason: str) -> SpfError:
    return SpfError("temperror", reason)


@dataclass
class _State:
    """What one evaluation shares across include and redirect."""

    ip: IPAddress
    sender: str
    helo: str
    deadline: float
    dns_terms: int = 0
    void: int = 0

    def count_term(self) -> None:
        # 4.6.4: include, a, mx, ptr, exists and redirect count.
        self.dns_terms += 1
        if self.dns_terms > _MAX_DNS_TERMS:
            raise _perm("more than 10 DNS-querying terms")

    def lookup(self, name: str, rtype: str) -> list[Any]:
        """The records; ``[]`` for NXDOMAIN or NODATA (counted as void)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _temp(f"timed out before looking up {name} {rtype}")
        result = DNSResolver.query_cached(name, rtype)
        # gevent measures timeouts from its loop's last look at the clock.
        gevent.get_hub().loop.update_now()
        # wait() raises nothing when time runs out: no Timeout to confuse.
        result.wait(left)
        if not result.ready():
            raise _temp(f"timed out looking up {name} {rtype}")
        if result.successful():
            records = list(result.value)
            if records:
                return records
        elif getattr(result.exception, "errno", None) not in _VOID:
            raise _temp(f"DNS error looking up {name} {rtype}: {result.exception}")
        self.void += 1
        if self.void > _MAX_VOID:
            raise _perm("more than 2 void DNS lookups")
        return []

    def addresses(self, name: str) -> list[IPAddress]:
        rtype = "A" if self.ip.version == 4 else "AAAA"
        found = []
        for record in self.lookup(name, rtype):
            try:
                found.append(ipaddress.ip_address(record.host))
            except (AttributeError, ValueError):
                continue
        return found


def _valid_domain(domain: str) -> bool:
    """A multi-label name of valid labels (4.3); the last one not numeric."""
    domain = domain.rstrip(".")
    labels = domain.split(".")
    if len(domain) > 253 or len(labels) < 2:
        return False
    if labels[-1].isdigit():
        return False
    return all(_LABEL.match(label) for label in labels)


def _client_ip(ip: str) -> IPAddress:
    addr = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # 5: an IPv4 client seen on an IPv6 socket
    return addr


# Macros (7) -------------------------------------------------------------


def _macro_value(letter: str, state: _State, domain: str) -> str:
    local, _, sender_domain = state.sender.rpartition("@")
    if letter == "s":
        return state.sender
    if letter == "l":
        return local
    if letter == "o":
        return sender_domain
    if letter == "d":
        return domain
    if letter == "i":
        if state.ip.version == 4:
            return str(state.ip)
        return ".".join(state.ip.exploded.replace(":", ""))  # 7.3: dotted nibbles
    if letter == "p":
        return "unknown"
    if letter == "v":
        return "in-addr" if state.ip.version == 4 else "ip6"
    if letter == "h":
        return state.helo
    # c, r and t are only allowed in exp (7.2), which is not evaluated.
    raise _perm(f"macro letter {letter!r} not allowed here")


def _expand(text: str, state: _State, domain: str) -> str:
    out = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char != "%":
            if not 0x21 <= ord(char) <= 0x7E:
                raise _perm(f"bad character in {text!r}")
            out.append(char)
            pos += 1
            continue
        match = _MACRO.match(text, pos)
        if match is None:
            raise _perm(f"bad macro in {text!r}")
        pos = match.end()
        escape = match.group(5)
        if escape is not None:
            replacement = {"%": "%", "_": " ", "-": "%20"}.get(escape)
            if replacement is None:
                raise _perm(f"bad macro in {text!r}")
            out.append(replacement)
            continue
        letter, digits, reverse, delimiters = match.group(1, 2, 3, 4)
        value = _macro_value(letter.lower(), state, domain)
        parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
        if reverse:
            parts.reverse()
        if digits:
            keep = int(digits)
            if keep == 0:
                raise _perm(f"zero label count in {text!r}")  # 7.1
            parts = parts[-keep:]
        out.append(".".join(parts))
    return "".join(out)


def _target(spec: str | None, state: _State, domain: str) -> str:
    """The domain a term names (its domain-spec expanded), or *domain*."""
    if spec is None:
        return domain
    name = _expand(spec, state, domain).rstrip(".")
    # 7.3: long results lose labels on the left until they fit.
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    if not name or ".." in name or name.startswith("."):
        raise _perm(f"bad domain {spec!r}")
    return name


# Parsing (4.6, 5, 6) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Directive:
    qualifier: str
    name: str
    #: The domain-spec or address text after ``:``, if any.
    value: str | None
    cidr4: int
    cidr6: int


def _split_cidr(text: str, ip6_only: bool = False) -> tuple[str, int | None, int | None]:
    """``'dom/24//64'`` -> ``('dom', 24, 64)``; missing lengths are None."""
    cidr6: int | None = None
    cidr4: int | None = None
    match = re.search(r"//([0-9]+)\Z", text)
    if match:
        cidr6 = int(match.group(1))
        text = text[: match.start()]
    match = re.search(r"/([0-9]+)\Z", text)
    if match:
        if ip6_only:
            cidr6 = int(match.group(1))
        else:
            cidr4 = int(match.group(1))
        text = text[: match.start()]
    for length, limit in ((cidr4, 32), (cidr6, 128)):
        if length is not None and length > limit:
            raise _perm(f"bad prefix length in {text!r}")
    return text, cidr4, cidr6


def _parse_directive(term: str) -> _Directive:
    qualifier = "pass"
    if term[0] in _QUALIFIERS:
        qualifier = _QUALIFIERS[term[0]]
        term = term[1:]
    match = re.match(r"([A-Za-z0-9]+)(?=[:/]|\Z)(.*)\Z", term, re.DOTALL)
    if match is None or match.group(1).lower() not in _MECHANISMS:
        raise _perm(f"unknown mechanism {term!r}")
    name = match.group(1).lower()
    rest = match.group(2)
    value: str | None = None
    cidr4: int | None = None
    cidr6: int | None = None
    if name in ("all",):
        if rest:
            raise _perm(f"bad term {term!r}")
    elif name in ("include", "exists"):
        if not rest.startswith(":") or len(rest) < 2:
            raise _perm(f"{name} needs a domain: {term!r}")
        value = rest[1:]
    elif name in ("a", "mx"):
        body, cidr4, cidr6 = _split_cidr(rest)
        if body:
            if not body.startswith(":") or len(body) < 2:
                raise _perm(f"bad term {term!r}")
            value = body[1:]
    elif name == "ptr":
        if rest:
            if not rest.startswith(":") or len(rest) < 2:
                raise _perm(f"bad term {term!r}")
            value = rest[1:]
    else:  # ip4, ip6
        if not rest.startswith(":"):
            raise _perm(f"{name} needs an address: {term!r}")
        body, cidr4, cidr6 = _split_cidr(rest[1:], ip6_only=name == "ip6")
        if name == "ip4" and cidr6 is not None:
            raise _perm(f"bad term {term!r}")
        try:
            addr = ipaddress.ip_address(body)
        except ValueError:
            raise _perm(f"bad address in {term!r}") from None
        if addr.version != (4 if name == "ip4" else 6):
            raise _perm(f"bad address in {term!r}")
        value = body
    if value is not None and name not in ("ip4", "ip6"):
        _check_macro_syntax(value)
    return _Directive(
        qualifier, name, value, 32 if cidr4 is None else cidr4, 128 if cidr6 is None else cidr6
    )


def _check_macro_syntax(text: str) -> None:
    """Raise permerror for a macro-string that can never expand (4.6)."""
    pos = 0
    while pos < len(text):
        if text[pos] == "%":
            match = _MACRO.match(text, pos)
            if match is None or (match.group(5) is not None and match.group(5) not in "%_-"):
                raise _perm(f"bad macro in {text!r}")
            if match.group(1) is not None and match.group(1).lower() not in "slodiphvcrt":
                raise _perm(f"bad macro letter in {text!r}")
            pos = match.end()
        else:
            pos += 1


@dataclass
class _Record:
    directives: list[_Directive]
    redirect: str | None


def _parse(text: str) -> _Record:
    directives = []
    modifiers: dict[str, str] = {}
    for term in text.split(" ")[1:]:
        if not term:
            continue
        match = _MODIFIER.match(term)
        if match is not None and term[0] not in _QUALIFIERS:
            key = match.group(1).lower()
            if key in ("redirect", "exp"):
                if key in modifiers:
                    raise _perm(f"{key}= given twice")  # 6
                if not match.group(2):
                    raise _perm(f"{key}= without a domain")
                _check_macro_syntax(match.group(2))
                modifiers[key] = match.group(2)
            continue  # 6: unknown modifiers are ignored
        directives.append(_parse_directive(term))
    return _Record(directives, modifiers.get("redirect"))


# Evaluation (4, 5) ------------------------------------------------------


def _fetch(domain: str, state: _State) -> _Record | None:
    """The parsed SPF record of *domain*; None when it has none (4.5)."""
    texts = []
    for record in state.lookup(domain, "TXT"):
        text = getattr(record, "text", "")
        if _VERSION.match(text):
            texts.append(text)
    if not texts:
        return None
    if len(texts) > 1:
        raise _perm(f"{domain} has more than one SPF record")
    return _parse(texts[0])


def _in_network(ip: IPAddress, addr: IPAddress, directive: _Directive) -> bool:
    if ip.version != addr.version:
        return False
    length = directive.cidr4 if ip.version == 4 else directive.cidr6
    return ip in ipaddress.ip_network(f"{addr}/{length}", strict=False)


def _matches(directive: _Directive, domain: str, state: _State) -> bool:
    name = directive.name
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        assert directive.value is not None
        return _in_network(state.ip, ipaddress.ip_address(directive.value), directive)
    state.count_term()
    target = _target(directive.value, state, domain)
    if name == "include":
        result, _ = _check(target, state)
        if result == "pass":
            return True
        if result in ("fail", "softfail", "neutral"):
            return False
        if result == "none":
            raise _perm(f"include:{target} has no SPF record")  # 5.2
        raise SpfError(result, f"include:{target} gave {result}")
    if name == "a":
        return any(_in_network(state.ip, a, directive) for a in state.addresses(target))
    if name == "mx":
        records = state.lookup(target, "MX")
        if len(records) > _MAX_NAMES:
            raise _perm(f"{target} has more than 10 MX records")  # 4.6.4
        for record in records:
            if record.host and any(
                _in_network(state.ip, a, directive) for a in state.addresses(record.host)
            ):
                return True
        return False
    if name == "ptr":
        return _ptr_matches(target, state)
    # exists: any A record will do, whatever the client's address family (5.7).
    return bool(state.lookup(target, "A"))


def _ptr_matches(target: str, state: _State) -> bool:
    """5.5: a validated name of the client that is *target* or below it."""
    try:
        records = state.lookup(reverse_name(str(state.ip)), "PTR")
    except SpfError as exc:
        if exc.result == "permerror":
            raise
        return False  # 5.5: a DNS error on the PTR lookup is no match
    names = [r.name for r in records][:_MAX_NAMES]
    target = target.lower()
    for name in names:
        name = name.rstrip(".").lower()
        if name != target and not name.endswith("." + target):
            continue
        try:
            if state.ip in state.addresses(name):
                return True
        except SpfError as exc:
            if exc.result == "permerror":
                raise
            continue  # 5.5: a failed validation lookup just skips the name
    return False


def _check(domain: str, state: _State) -> tuple[str, str]:
    if not _valid_domain(domain):
        return "none", f"{domain!r} is not a valid domain"  # 4.3
    record = _fetch(domain, state)
    if record is None:
        return "none", f"{domain} has no SPF record"
    for directive in record.directives:
        if _matches(directive, domain, state):
            term = directive.name + (":" + directive.value if directive.value else "")
            return directive.qualifier, f"{domain} matched {term}"
    if record.redirect is not None:
        state.count_term()
        target = _target(record.redirect, state, domain)
        result, reason = _check(target, state)
        if result == "none":
            raise _perm(f"redirect={target} has no SPF record")  # 6.1
        return result, reason
    return "neutral", f"{domain} matched nothing"  # 4.7


def check_host(ip: str, domain: str, sender: str, helo: str, *, deadline: float) -> tuple[str, str]:
    """Evaluate *domain*'s SPF policy for the client *ip* (RFC 7208 4).

    :param ip: the client's address.
    :param domain: the domain whose policy applies.
    :param sender: ``local@domain`` (``postmaster@helo`` for a null sender).
    :param helo: the HELO/EHLO name, for ``%{h}``.
    :param deadline: ``time.monotonic()`` value at which to give up
        (``temperror``).
    :returns: ``(result, reason)``; *result* is one of ``pass fail softfail
        neutral none permerror temperror``.
    :raises ValueError: *ip* is not an IP address.
    """
    state = _State(_client_ip(ip), sender, helo, deadline)
    try:
        return _check(domain.rstrip("."), state)
    except SpfError as exc:
        return exc.result, exc.reason
