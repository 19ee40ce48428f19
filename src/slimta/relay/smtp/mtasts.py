"""MTA-STS (RFC 8461): recipient domains that ask for authenticated TLS.

A domain publishes a TXT record at ``_mta-sts.<domain>``
(``v=STSv1; id=<id>``) and a policy file at
``https://mta-sts.<domain>/.well-known/mta-sts.txt``::

    version: STSv1
    mode: enforce
    mx: mail.example.com
    mx: *.backup.example.com
    max_age: 604800

:class:`MtaSts` finds the policy that applies to a domain
(:meth:`MtaSts.lookup`), which :class:`~slimta.relay.smtp.mx.MxSmtpRelay`
then applies: in ``enforce`` mode only MX hosts matching an ``mx`` pattern
are used, over TLS with a certificate valid for the MX name; in ``testing``
mode delivery goes on as without a policy and failures are only reported;
``none`` is no policy.

Discovery and caching (RFC 8461 3 and 5.1):

* The TXT record is looked up through
  :meth:`DNSResolver.query_cached <slimta.util.dns.DNSResolver.query_cached>`.
  Records not starting with ``v=STSv1`` are ignored; unless exactly one is
  left and it is valid, the domain has no live policy.
* A policy is kept for its ``max_age`` from the time it was fetched, in
  memory and, with *cache_dir*, in one JSON file per domain (so it outlives
  restarts). It is fetched again only when the TXT record's ``id`` differs
  from the cached one's, or no unexpired policy is cached.
* When no live policy can be had (no TXT record, DNS failure, fetch
  failure, invalid file), an unexpired cached policy still applies; without
  one the domain is treated as having no policy. After a failed fetch the
  same ``id`` is not fetched again for :attr:`MtaSts.retry_interval`
  seconds (RFC 8461 3.3 suggests at least five minutes).

Fetching (:class:`HttpsPolicyFetcher`): HTTPS to ``mta-sts.<domain>`` with
a verifying :class:`ssl.SSLContext`, its address looked up through
:class:`~slimta.util.dns.DNSResolver`; only ``200`` with a ``text/plain``
body of at most :data:`MAX_POLICY_SIZE` bytes, within a time bound;
redirects are not followed and nothing is cached by HTTP rules.

Parsing (:func:`parse_policy`) follows the RFC's grammar strictly
(``version: STSv1``, ``mode``, ``max_age`` of at most 31557600, ``mx``
patterns: a domain name, or ``*.`` and a domain name; unknown fields are
ignored but must be well-formed; a repeated ``version``, ``mode`` or
``max_age`` is an error). The one leniency: blank lines are skipped.

Not done: proactive refresh of cached policies before they expire
(RFC 8461 3.3, "SHOULD"); a policy is refreshed when a delivery needs it.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import os
import re
import ssl
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gevent
import pycares.errno
from gevent.event import AsyncResult

from slimta import logging as slogging
from slimta.http import HTTPSConnection
from slimta.relay.smtp.tlspolicy import TlsResult
from slimta.util._connect import create_connection
from slimta.util.dns import DNSError, DNSResolver

__all__ = [
    "FETCH_TIMEOUT",
    "MAX_AGE_LIMIT",
    "MAX_POLICY_SIZE",
    "POLICY_PATH",
    "HttpsPolicyFetcher",
    "MtaSts",
    "PolicyError",
    "PolicyFetchError",
    "StsLookup",
    "StsPolicy",
    "mx_pattern_matches",
    "parse_policy",
    "parse_txt_record",
    "policy_id_from_txt",
]

_log = logging.getLogger(__name__)

#: The largest ``max_age`` a policy may give (RFC 8461 3.2): about a year.
MAX_AGE_LIMIT = 31557600
#: The largest policy file fetched, in bytes (RFC 8461 3.3 suggests 64 KiB).
MAX_POLICY_SIZE = 65536
#: Where the policy file is, on ``mta-sts.<domain>``.
POLICY_PATH = "/.well-known/mta-sts.txt"
#: Seconds a fetch may take in all (RFC 8461 3.3 suggests one minute).
FETCH_TIMEOUT = 60.0
#: Seconds to wait for a DNS answer at most (c-ares normally gives up first).
_DNS_WAIT = 60.0

_MODES = frozenset({"enforce", "testing", "none"})
_WSP = " \t"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
#: RFC 5321 Domain: sub-domain *("." sub-domain).
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
#: Policy field names: the extension grammar covers the known ones too.
_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_STS_ID = re.compile(r"[A-Za-z0-9]{1,32}")
#: TXT extension values: no "=", ";", space or control characters.
_TXT_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
#: Characters never allowed in a policy field value (CTLs but TAB).
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class PolicyError(ValueError):
    """A policy file or ``_mta-sts`` TXT record that is not valid."""


class PolicyFetchError(Exception):
    """A policy could not be fetched (or was not valid).

    :param reason: what went wrong, naming the domain.
    :param result: the RFC 8460 result type: ``sts-policy-fetch-error``,
        ``sts-webpki-invalid`` (the policy host's certificate) or
        ``sts-policy-invalid``.
    """

    def __init__(self, reason: str, result: TlsResult = TlsResult.STS_POLICY_FETCH_ERROR) -> None:
        super().__init__(reason)
        #: What went wrong.
        self.reason = reason
        #: The RFC 8460 result type.
        self.result = result


# ------------------------------------------------------------------ parsing
def _valid_domain(name: str) -> bool:
    if len(name) > 253 or not _DOMAIN.fullmatch(name):
        return False
    return all(len(label) <= 63 for label in name.split("."))


def mx_pattern_matches(pattern: str, host: str) -> bool:
    """Whether MX host name *host* matches policy ``mx`` *pattern* (RFC 8461 4.1).

    Case does not matter; a trailing dot on *host* is ignored. ``*.`` stands
    for exactly one whole label: ``*.example.com`` matches
    ``mail.example.com`` but neither ``example.com`` nor
    ``a.b.example.com``.
    """
    pattern = pattern.lower()
    host = host.rstrip(".").lower()
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A parsed MTA-STS policy (see :func:`parse_policy`)."""

    #: ``'enforce'``, ``'testing'`` or ``'none'``.
    mode: str
    #: Seconds the policy may be cached.
    max_age: int
    #: The ``mx`` patterns, lower-case, in file order, without repeats.
    mx: tuple[str, ...] = ()
    #: Always ``'STSv1'``.
    version: str = "STSv1"
    #: The policy file's text, as fetched (kept for the disk cache).
    text: str = field(default="", compare=False, repr=False)

    @property
    def enforce(self) -> bool:
        """True in ``enforce`` mode."""
        return self.mode == "enforce"

    @property
    def testing(self) -> bool:
        """True in ``testing`` mode."""
        return self.mode == "testing"

    def matches(self, host: str) -> bool:
        """Whether MX host *host* matches one of the policy's ``mx`` patterns."""
        return any(mx_pattern_matches(pattern, host) for pattern in self.mx)


def _field_value(value: str, line_no: int) -> str:
    value = value.strip(_WSP)
    if not value:
        raise PolicyError(f"line {line_no}: empty value")
    if _CTL.search(value):
        raise PolicyError(f"line {line_no}: control character in value")
    return value


def parse_policy(data: bytes | str) -> StsPolicy:
    """Parse an MTA-STS policy file (RFC 8461 3.2).

    Lines end with LF or CRLF; each is ``name: value``. ``version``
    (``STSv1``), ``mode`` (``enforce``, ``testing`` or ``none``) and
    ``max_age`` (1 to 10 digits, at most :data:`MAX_AGE_LIMIT`) must each
    appear once; ``mx`` at least once unless the mode is ``none``. Names and
    values are case-sensitive. Other fields are ignored if well-formed.
    Blank lines are skipped.

    :param data: the file, UTF-8 bytes or text.
    :returns: the :class:`StsPolicy`.
    :raises PolicyError: anything else, with the reason.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError("policy is not UTF-8") from None
    else:
        text = data
    seen: dict[str, str] = {}
    patterns: list[str] = []
    for line_no, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip(_WSP):
            continue
        name, colon, value = line.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise PolicyError(f"line {line_no}: not a 'name: value' field")
        value = _field_value(value, line_no)
        if name == "mx":
            pattern = value.lower()
            base = pattern[2:] if pattern.startswith("*.") else pattern
            if not _valid_domain(base):
                raise PolicyError(f"line {line_no}: invalid mx pattern {value!r}")
            if pattern not in patterns:
                patterns.append(pattern)
            continue
        if name not in ("version", "mode", "max_age"):
            continue  # RFC 8461 3.2: unknown fields are ignored
        if name in seen:
            raise PolicyError(f"line {line_no}: {name} repeated")
        seen[name] = value
    version = seen.get("version")
    if version is None:
        raise PolicyError("no version field")
    if version != "STSv1":
        raise PolicyError(f"unknown version {version!r}")
    mode = seen.get("mode")
    if mode is None:
        raise PolicyError("no mode field")
    if mode not in _MODES:
        raise PolicyError(f"unknown mode {mode!r}")
    max_age_text = seen.get("max_age")
    if max_age_text is None:
        raise PolicyError("no max_age field")
    if not _MAX_AGE.fullmatch(max_age_text):
        raise PolicyError(f"invalid max_age {max_age_text!r}")
    max_age = int(max_age_text)
    if max_age > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {max_age} is over {MAX_AGE_LIMIT}")
    if not patterns and mode != "none":
        raise PolicyError(f"no mx field in {mode} mode")
    return StsPolicy(mode, max_age, tuple(patterns), version, text)


def _is_sts_record(text: str) -> bool:
    """Whether a TXT record claims to be MTA-STS: ``v=STSv1`` and a delimiter."""
    if not text.startswith("v=STSv1"):
        return False
    rest = text[len("v=STSv1") :].lstrip(_WSP)
    return not rest or rest.startswith(";")


def parse_txt_record(text: str) -> str:
    """The policy ``id`` of an ``_mta-sts`` TXT record (RFC 8461 3.1).

    :param text: the record, its strings joined.
    :returns: the ``id`` (1 to 32 letters and digits).
    :raises PolicyError: not ``v=STSv1`` followed by ``;``-separated fields,
        exactly one of them ``id``, the others well-formed extensions.
    """
    parts = text.split(";")
    if parts[0].rstrip(_WSP) != "v=STSv1":
        raise PolicyError("record does not start with v=STSv1")
    fields = parts[1:]
    if fields and not fields[-1].strip(_WSP):
        fields.pop()  # one trailing delimiter is allowed
    policy_id: str | None = None
    for part in fields:
        item = part.strip(_WSP)
        name, eq, value = item.partition("=")
        if not eq:
            raise PolicyError(f"field {item!r} is not name=value")
        if name == "id":
            if policy_id is not None:
                raise PolicyError("id repeated")
            if not _STS_ID.fullmatch(value):
                raise PolicyError(f"invalid id {value!r}")
            policy_id = value
        elif not _FIELD_NAME.fullmatch(name) or not _TXT_EXT_VALUE.fullmatch(value):
            raise PolicyError(f"invalid field {item!r}")
    if policy_id is None:
        raise PolicyError("no id field")
    return policy_id


def policy_id_from_txt(texts: Iterable[str]) -> str | None:
    """The policy ``id`` from a domain's ``_mta-sts`` TXT records, if any.

    Records not starting with ``v=STSv1`` are dropped; unless exactly one is
    left and it is valid, there is no policy (``None``).
    """
    candidates = [text for text in texts if _is_sts_record(text)]
    if len(candidates) != 1:
        return None
    try:
        return parse_txt_record(candidates[0])
    except PolicyError:
        return None


@functools.lru_cache(maxsize=4096)
def _id_from_texts(texts: tuple[str, ...]) -> str | None:
    """:func:`policy_id_from_txt`, remembered: the same records come back
    for every message to a domain."""
    return policy_id_from_txt(texts)


# ------------------------------------------------------------------ fetching
class _FetchTimeout(Exception):
    """The fetch's own deadline passed; never caught by anything else."""


def _addresses(host: str) -> list[str]:
    """The addresses of *host* through DNSResolver: IPv4 first, then IPv6."""
    found: list[str] = []
    for qtype in ("A", "AAAA"):
        result = DNSResolver.query_cached(host, qtype)
        result.wait(_DNS_WAIT)
        if not result.ready():
            continue
        try:
            found.extend(rec.host for rec in result.get(block=False))
        except DNSError:
            continue
    return found


class HttpsPolicyFetcher:
    """Fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt``.

    :param context: the verifying client :class:`ssl.SSLContext`;
        ``ssl.create_default_context()`` when ``None``.
    :param port: the HTTPS port (443; other values are for tests).
    :param timeout: seconds the whole fetch may take.
    :param max_size: the largest body accepted, in bytes.
    :param resolve: ``f(host) -> [address, ...]``; by default A then AAAA
        records through :class:`~slimta.util.dns.DNSResolver`.
    """

    def __init__(
        self,
        context: ssl.SSLContext | None = None,
        *,
        port: int = 443,
        timeout: float = FETCH_TIMEOUT,
        max_size: int = MAX_POLICY_SIZE,
        resolve: Callable[[str], Sequence[str]] = _addresses,
    ) -> None:
        self.context = context if context is not None else ssl.create_default_context()
        self.port = port
        self.timeout = timeout
        self.max_size = max_size
        self.resolve = resolve

    def __call__(self, domain: str) -> bytes:
        """The policy file of *domain*, unparsed.

        :raises PolicyFetchError: no address, connection or TLS failure
            (``sts-webpki-invalid`` for a certificate that does not verify),
            a status other than 200, a media type other than ``text/plain``,
            a body over *max_size*, or the time bound passed.
        """
        host = f"mta-sts.{domain}"
        timer = gevent.Timeout(self.timeout, _FetchTimeout())
        timer.start()
        try:
            return self._get(host)
        except _FetchTimeout:
            raise PolicyFetchError(f"fetching the policy from {host} timed out") from None
        except ssl.SSLCertVerificationError as exc:
            reason = getattr(exc, "verify_message", None) or str(exc)
            raise PolicyFetchError(
                f"certificate of {host} not valid: {reason}", TlsResult.STS_WEBPKI_INVALID
            ) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise PolicyFetchError(f"fetching the policy from {host} failed: {detail}") from None
        finally:
            timer.close()

    def _connect(self, address: tuple[str, int], *args: Any, **kwargs: Any) -> Any:
        host, port = address[0], address[1]
        addresses = self.resolve(host)
        if not addresses:
            raise OSError(f"no address for {host}")
        error: OSError | None = None
        for ip in addresses:
            try:
                return create_connection((ip, port), self.timeout)
            except OSError as exc:
                error = exc
        assert error is not None
        raise error

    def _get(self, host: str) -> bytes:
        conn = HTTPSConnection(host, self.port, timeout=self.timeout, context=self.context)
        # Addresses come from slimta's resolver; TLS still checks *host*.
        conn._create_connection = self._connect
        try:
            conn.request(
                "GET",
                POLICY_PATH,
                headers={"Accept": "text/plain", "Connection": "close", "User-Agent": "slimta"},
            )
            response = conn.getresponse()
            if response.status != 200:
                # RFC 8461 3.3: redirects are not followed.
                where = response.getheader("Location")
                extra = f" (redirect to {where} not followed)" if where else ""
                raise PolicyFetchError(
                    f"policy host {host} answered {response.status} {response.reason}{extra}"
                )
            media = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if media != "text/plain":
                raise PolicyFetchError(
                    f"policy from {host} is {media or 'untyped'}, not text/plain"
                )
            length = response.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > self.max_size:
                raise PolicyFetchError(f"policy from {host} is over {self.max_size} bytes")
            body = response.read(self.max_size + 1)
            if len(body) > self.max_size:
                raise PolicyFetchError(f"policy from {host} is over {self.max_size} bytes")
            return body
        finally:
            conn.close()


# ------------------------------------------------------------------ caching
@dataclass(frozen=True, slots=True)
class StsLookup:
    """What :meth:`MtaSts.lookup` found for a domain."""

    #: The policy to apply: the live one, else an unexpired cached one;
    #: ``None`` when there is neither.
    policy: StsPolicy | None
    #: The ``id`` of that policy.
    policy_id: str | None = None
    #: Why the live policy could not be fetched this time, if it could not.
    error: PolicyFetchError | None = None


@dataclass(frozen=True, slots=True)
class _Cached:
    policy_id: str
    policy: StsPolicy
    fetched: float
    expires: float
    #: What :meth:`MtaSts.lookup` answers while this is the live policy.
    found: StsLookup = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "found", StsLookup(self.policy, self.policy_id))


_NOTHING = StsLookup(None)


class MtaSts:
    """Finds and caches the MTA-STS policies of recipient domains.

    :param cache_dir: a directory for the policies, one JSON file per
        domain, so they outlive restarts (created if missing); ``None``
        keeps them in memory only.
    :param fetcher: ``f(domain) -> bytes``, the policy file; raises
        :class:`PolicyFetchError`. By default an :class:`HttpsPolicyFetcher`
        with *context*.
    :param context: the verifying :class:`ssl.SSLContext` of the default
        fetcher.
    :param clock: seconds since the epoch (the cache on disk outlives the
        process); inject one in tests.
    :param retry_interval: seconds before a policy ``id`` whose fetch failed
        is fetched again.
    :param max_entries: how many policies are kept in memory at most.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        fetcher: Callable[[str], bytes] | None = None,
        context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        retry_interval: float = 300.0,
        max_entries: int = 10000,
    ) -> None:
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
        self.fetcher = fetcher if fetcher is not None else HttpsPolicyFetcher(context)
        self.clock = clock
        self.retry_interval = retry_interval
        self.max_entries = max_entries
        #: Policy files fetched (successfully or not).
        self.fetches = 0
        self._memory: dict[str, _Cached] = {}
        # domain -> (id, not before, error) after a failed fetch
        self._failures: dict[str, tuple[str, float, PolicyFetchError]] = {}
        self._in_flight: dict[tuple[str, str], AsyncResult] = {}

    def policy(self, domain: str) -> StsPolicy | None:
        """The policy that applies to *domain* (see :meth:`lookup`)."""
        return self.lookup(domain).policy

    def lookup(self, domain: str) -> StsLookup:
        """The policy that applies to mail for *domain*, and how it was found.

        Looks the TXT record up, fetches the policy when its ``id`` is new,
        and falls back to the cached policy as RFC 8461 5.1 says. DNS and
        fetch failures are not raised: they show in the result.
        """
        domain = domain.rstrip(".").lower()
        cached = self._cached(domain)
        live_id = self._live_id(domain)
        if live_id is None or (cached is not None and cached.policy_id == live_id):
            return _NOTHING if cached is None else cached.found
        failed = self._failures.get(domain)
        if failed is not None and failed[0] == live_id and self.clock() < failed[1]:
            return self._fallback(cached, failed[2])
        key = (domain, live_id)
        waiting = self._in_flight.get(key)
        if waiting is not None:
            result: StsLookup = waiting.get()
            return result
        ar = self._in_flight[key] = AsyncResult()
        try:
            result = self._refresh(domain, live_id, cached)
        except BaseException:
            # Killed (or a fetcher's own error): the others fall back as on
            # any failed fetch, rather than receive this greenlet's exception.
            ar.set(self._fallback(cached, PolicyFetchError(f"fetch for {domain} interrupted")))
            raise
        else:
            ar.set(result)
            return result
        finally:
            del self._in_flight[key]

    def forget(self, domain: str) -> None:
        """Drop the cached policy of *domain*, in memory and on disk."""
        domain = domain.rstrip(".").lower()
        self._memory.pop(domain, None)
        self._failures.pop(domain, None)
        path = self._path(domain)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    # -------------------------------------------------------------- internals
    def _live_id(self, domain: str) -> str | None:
        """The ``id`` of the domain's TXT record; ``None`` for none or failure."""
        name = f"_mta-sts.{domain}"
        # Every delivery asks: answer from the DNS cache without a lookup
        # (and without an AsyncResult) when it can.
        kept = DNSResolver.cache.peek(name, "TXT")
        if isinstance(kept, list):
            return _id_from_texts(tuple(rec.text for rec in kept))
        if kept is not None:  # NXDOMAIN or NODATA, kept
            return None
        result = DNSResolver.query_cached(name, "TXT")
        # c-ares has its own timeouts; this only bounds a lookup that never ends.
        result.wait(_DNS_WAIT)
        try:
            if not result.ready():
                raise DNSError(pycares.errno.ARES_ETIMEOUT)
            records = result.get(block=False)
        except DNSError as exc:
            if exc.errno not in (pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_ENODATA):
                _log.info("MTA-STS TXT lookup for %s failed: %s", domain, exc)
            return None
        return _id_from_texts(tuple(rec.text for rec in records))

    def _fallback(self, cached: _Cached | None, error: PolicyFetchError) -> StsLookup:
        if cached is None:
            return StsLookup(None, None, error)
        return StsLookup(cached.policy, cached.policy_id, error)

    def _refresh(self, domain: str, live_id: str, cached: _Cached | None) -> StsLookup:
        self.fetches += 1
        try:
            policy = parse_policy(self.fetcher(domain))
        except PolicyError as exc:
            error = PolicyFetchError(
                f"policy of {domain} is not valid: {exc}", TlsResult.STS_POLICY_INVALID
            )
        except PolicyFetchError as exc:
            error = exc
        except Exception as exc:
            # A fetcher of the caller's that broke: delivery goes on as for
            # any failed fetch, and the traceback is logged once.
            slogging.log_exception(__name__)
            error = PolicyFetchError(f"fetching the policy of {domain} failed: {exc!r}")
        else:
            now = self.clock()
            entry = _Cached(live_id, policy, now, now + policy.max_age)
            self._failures.pop(domain, None)
            self._remember(domain, entry)
            self._save(domain, entry)
            return StsLookup(policy, live_id)
        self._failures[domain] = (live_id, self.clock() + self.retry_interval, error)
        _log.warning(
            "MTA-STS policy %s of %s not fetched (%s); %s",
            live_id,
            domain,
            error.reason,
            "the cached one applies" if cached is not None else "no policy applies",
        )
        return self._fallback(cached, error)

    def _remember(self, domain: str, entry: _Cached) -> None:
        memory = self._memory
        memory.pop(domain, None)
        if len(memory) >= self.max_entries:
            now = self.clock()
            for old in [d for d, e in memory.items() if e.expires <= now]:
                del memory[old]
            while len(memory) >= self.max_entries:
                del memory[next(iter(memory))]
        memory[domain] = entry

    def _cached(self, domain: str) -> _Cached | None:
        """The unexpired cached policy of *domain*, from memory or disk."""
        entry = self._memory.get(domain)
        if entry is None:
            entry = self._load(domain)
            if entry is not None:
                self._remember(domain, entry)
        if entry is not None and self.clock() >= entry.expires:
            self._memory.pop(domain, None)
            return None
        return entry

    def _path(self, domain: str) -> str | None:
        # Only plain host names become file names: no separators, no dots first.
        if self.cache_dir is None or not _valid_domain(domain):
            return None
        return os.path.join(self.cache_dir, f"{domain}.json")

    def _load(self, domain: str) -> _Cached | None:
        path = self._path(domain)
        if path is None:
            return None
        try:
            with open(path, encoding="utf-8") as stream:
                data = json.load(stream)
            if data.get("domain") != domain:
                return None
            policy = parse_policy(str(data["policy"]))
            return _Cached(str(data["id"]), policy, float(data["fetched"]), float(data["expires"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            _log.warning("MTA-STS cache file %s ignored: %s", path, exc)
            return None

    def _save(self, domain: str, entry: _Cached) -> None:
        path = self._path(domain)
        if path is None or self.cache_dir is None:
            return
        data = {
            "domain": domain,
            "id": entry.policy_id,
            "fetched": entry.fetched,
            "expires": entry.expires,
            "policy": entry.policy.text,
        }
        try:
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.cache_dir)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as stream:
                    json.dump(data, stream)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            _log.warning("MTA-STS cache file %s not written: %s", path, exc)
