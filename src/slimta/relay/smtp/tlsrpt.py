"""SMTP TLS reporting (RFC 8460): daily aggregate reports of TLS outcomes.

A recipient domain that wants to hear how senders fared with its MTA-STS or
DANE policy publishes a TXT record at ``_smtp._tls.<domain>``::

    v=TLSRPTv1; rua=mailto:tlsrpt@example.com,https://reports.example.com/tls

A :class:`TlsReporter` counts the
:class:`~slimta.relay.smtp.tlspolicy.TlsOutcome` values an
:class:`~slimta.relay.smtp.mx.MxSmtpRelay` reports (pass
``tls_report=reporter.record``), per UTC day, per policy (type, policy
string, domain, MX patterns) and per failure (result type, our address, the
exchanger's name and address, the reason), for the domains that publish
such a record. Once a day is over, :meth:`TlsReporter.flush` writes one
report per domain, in the JSON format of RFC 8460 section 4.4, gzipped, to
the reports directory, named as section 5.1 says::

    <submitter>!<policy-domain>!<begin>!<end>!<unique-id>.json.gz

:meth:`TlsReporter.send` (or the *queue* option) hands each written report
to a slimta queue, as a mail to each ``mailto:`` address of the domain's
``rua`` (RFC 8460 5.3: ``multipart/report; report-type="tlsrpt"`` with the
report as an ``application/tlsrpt+gzip`` attachment). ``https:`` addresses
are not supported: they are skipped and logged. RFC 8460 5.3 requires the
reports to be DKIM-signed by the reporting domain: add the DKIM signing
policy to that queue (:meth:`Queue.add_policy
<slimta.queue.Queue.add_policy>`). The mails carry ``TLS-Required: No``
(RFC 8689 5), since a report must get through despite the TLS failures it
reports.

Counting costs a dictionary increment per outcome: whether a domain
publishes a record is read from :attr:`DNSResolver.cache
<slimta.util.dns.DNSResolver.cache>` without waiting (the first outcome of a
domain only starts the lookup, through :meth:`DNSResolver.query_cached
<slimta.util.dns.DNSResolver.query_cached>`, and is counted until the answer
says otherwise; :meth:`TlsReporter.flush` looks again before it writes). At
most *max_keys* distinct policies and failure details are counted per day;
beyond, failures are folded into a coarser detail when one exists, else
dropped and counted in :attr:`TlsReporter.dropped`. The counters are saved
to the reports directory (``.tlsrpt-counters.json``) by
:meth:`TlsReporter.save`, every *interval* seconds once
:meth:`TlsReporter.start` ran, on :meth:`TlsReporter.flush` and on
:meth:`TlsReporter.kill`; a new reporter on the same directory carries on
from them, so a restart loses at most one interval of counts.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gzip
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, formatdate, make_msgid
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import unquote

import gevent
import pycares.errno

from slimta import logging as slogging
from slimta.envelope import Envelope
from slimta.relay.smtp.tlspolicy import TlsOutcome, TlsResult
from slimta.util._hostname import local_fqdn
from slimta.util.dns import DNSError, DNSResolver

if TYPE_CHECKING:
    from slimta.queue import QueueError

__all__ = [
    "COUNTERS_FILE",
    "RECORD_VERSION",
    "REPORT_MEDIA_TYPE",
    "TlsReport",
    "TlsReporter",
    "TlsRptError",
    "TlsRptRecord",
    "parse_record",
    "record_from_txt",
    "report_filename",
    "report_message",
]

_log = logging.getLogger(__name__)

#: The version field every TLSRPT record starts with (RFC 8460 3).
RECORD_VERSION = "v=TLSRPTv1"
#: The media type of a gzipped report (RFC 8460 6.4).
REPORT_MEDIA_TYPE = "application/tlsrpt+gzip"
#: The name of the counters file in the reports directory.
COUNTERS_FILE = ".tlsrpt-counters.json"

_DAY = 86400
_WSP = " \t"
_TXT_PREFIX = "_smtp._tls."
#: RFC 8460 3: tlsrpt-ext-name and tlsrpt-ext-value.
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
#: An RFC 3986 URI: a scheme, then URI characters (unreserved, reserved,
#: percent-encoded), less ",", "!" and ";", which RFC 8460 3 wants encoded.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9\-._~:/?#\[\]@$&'()*+=]|%[0-9A-Fa-f]{2})+")
_URI_DELIM = re.compile(r"[ \t]*,[ \t]*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: A host name, as policy domains and the submitter must be.
_DOMAIN = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")
#: A plain address (dot-atom local part, host name domain), after decoding.
_ADDRESS = re.compile(rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.-]{{1,64}}@{_LABEL}(?:\.{_LABEL})*")
#: Seconds what the DNS cache said about a domain's record is taken as is.
_RECHECK = 60.0
#: Most domains remembered so (all are forgotten when there are more).
_MAX_DOMAINS = 10000
#: Longest failure-reason-code kept, in characters.
_MAX_REASON = 256
#: The file name of a report (RFC 8460 5.1).
_FILENAME = re.compile(
    r"(?P<sender>[^!/]+)!(?P<domain>[^!/]+)!(?P<begin>[0-9]+)!(?P<end>[0-9]+)"
    r"(?:!(?P<unique>[A-Za-z0-9]+))?\.json\.gz"
)

#: ``(policy-type, policy-domain, policy-string, mx-host)``.
_PolicyKey: TypeAlias = tuple[str, str, tuple[str, ...], tuple[str, ...]]
#: ``(result-type, sending-mta-ip, receiving-mx-hostname, receiving-ip,
#: failure-reason-code)``; ``''`` where unknown.
_DetailKey: TypeAlias = tuple[str, str, str, str, str]


#: RFC 8460's result type of each result (faster than ``Enum.value``).
_RESULT_TYPES = {result: result.value for result in TlsResult}


def _valid_domain(name: str) -> bool:
    return _DOMAIN.fullmatch(name) is not None


# ------------------------------------------------------------------ records
class TlsRptError(ValueError):
    """A ``_smtp._tls`` TXT record that is not valid (RFC 8460 3)."""


def _mailto_addresses(uri: str) -> list[str]:
    """The addresses of a ``mailto:`` URI (RFC 6068), its header fields
    ignored; an empty list when one of them is not a plain address (e.g. a
    percent-encoded line break)."""
    to = uri[len("mailto:") :].partition("?")[0]
    try:
        decoded = unquote(to, errors="strict")
    except UnicodeDecodeError:
        return []
    addresses = decoded.split(",")
    if not all(_ADDRESS.fullmatch(address) for address in addresses):
        return []
    return addresses


@dataclass(frozen=True, slots=True)
class TlsRptRecord:
    """A parsed ``_smtp._tls`` TXT record (see :func:`parse_record`)."""

    #: The ``rua`` URIs, in record order.
    rua: tuple[str, ...]
    #: The extension fields, ``(name, value)``, in record order (ignored).
    extensions: tuple[tuple[str, str], ...] = ()

    @property
    def mailto(self) -> tuple[str, ...]:
        """The addresses of the ``mailto:`` URIs, without repeats; URIs whose
        addresses are not plain ``local@domain`` ones are left out."""
        found: dict[str, None] = {}
        for uri in self.rua:
            if uri[:7].lower() == "mailto:":
                for address in _mailto_addresses(uri):
                    found.setdefault(address, None)
        return tuple(found)

    @property
    def https(self) -> tuple[str, ...]:
        """The ``https:`` URIs (not supported: reports are not posted)."""
        return tuple(uri for uri in self.rua if uri[:6].lower() == "https:")


def parse_record(text: str) -> TlsRptRecord:
    """Parse a ``_smtp._tls`` TXT record as RFC 8460 section 3 says.

    ``v=TLSRPTv1`` (case-sensitive), then fields, each after a ``;`` with
    optional spaces or tabs around it, and optionally one more ``;`` at the
    end. Exactly one field is ``rua=`` with one or more URIs separated by
    ``,`` (spaces or tabs around it allowed); the URIs must be RFC 3986 URIs
    with ``,``, ``!`` and ``;`` percent-encoded. Other fields are extensions
    (``name=value`` with RFC 8460's characters), kept but ignored.

    :param text: the record, its character-strings joined.
    :returns: the :class:`TlsRptRecord`.
    :raises TlsRptError: anything else, with the reason.
    """
    if not text.startswith(RECORD_VERSION):
        raise TlsRptError(f"record does not start with {RECORD_VERSION}")
    parts = text[len(RECORD_VERSION) :].split(";")
    if len(parts) < 2 or parts[0].strip(_WSP):
        raise TlsRptError(f"{RECORD_VERSION} is not followed by ';'")
    fields = parts[1:]
    if not fields[-1].strip(_WSP):
        fields.pop()  # one trailing delimiter is allowed
    if not fields:
        raise TlsRptError("no fields")
    rua: tuple[str, ...] | None = None
    extensions: list[tuple[str, str]] = []
    for part in fields:
        item = part.strip(_WSP)
        if item.startswith("rua="):
            if rua is not None:
                raise TlsRptError("rua repeated")
            uris = tuple(_URI_DELIM.split(item[4:]))
            for uri in uris:
                if not _URI.fullmatch(uri):
                    raise TlsRptError(f"invalid rua URI {uri!r}")
            rua = uris
            continue
        name, eq, value = item.partition("=")
        if not eq or not _EXT_NAME.fullmatch(name) or not _EXT_VALUE.fullmatch(value):
            raise TlsRptError(f"invalid field {item!r}")
        extensions.append((name, value))
    if rua is None:
        raise TlsRptError("no rua field")
    return TlsRptRecord(rua, tuple(extensions))


def _is_candidate(text: str) -> bool:
    """Whether a TXT record claims to be TLSRPT: the version, then ``;``."""
    if not text.startswith(RECORD_VERSION):
        return False
    rest = text[len(RECORD_VERSION) :].lstrip(_WSP)
    return not rest or rest.startswith(";")


def record_from_txt(texts: Iterable[str]) -> TlsRptRecord | None:
    """The TLSRPT record among a domain's ``_smtp._tls`` TXT records.

    Records that do not start with ``v=TLSRPTv1`` are dropped; unless
    exactly one is left and it is valid, the domain does not implement
    TLSRPT (``None``), as RFC 8460 3 says.
    """
    candidates = [text for text in texts if _is_candidate(text)]
    if len(candidates) != 1:
        return None
    try:
        return parse_record(candidates[0])
    except TlsRptError as exc:
        _log.debug("TLSRPT record %r ignored: %s", candidates[0], exc)
        return None


@functools.lru_cache(maxsize=4096)
def _record_from_texts(texts: tuple[str, ...]) -> TlsRptRecord | None:
    """:func:`record_from_txt`, remembered: the same records come back for
    every outcome of a domain."""
    return record_from_txt(texts)


# ------------------------------------------------------------------ reports
def report_filename(
    submitter: str, policy_domain: str, begin: int, end: int, unique_id: str | None = None
) -> str:
    """The file name of a gzipped report (RFC 8460 5.1).

    :param submitter: the reporting domain (the domain of the
        ``contact-info`` address).
    :param policy_domain: the domain the report is about.
    :param begin: the start of the reported range, in epoch seconds.
    :param end: its end, in epoch seconds.
    :param unique_id: letters and digits telling reports of the same range
        apart.
    :returns: ``<submitter>!<policy-domain>!<begin>!<end>[!<unique-id>].json.gz``.
    :raises ValueError: a domain that is not a host name, or a *unique_id*
        that is not letters and digits.
    """
    for name in (submitter, policy_domain):
        if not _valid_domain(name):
            raise ValueError(f"not a domain name: {name!r}")
    suffix = ""
    if unique_id is not None:
        if not unique_id.isascii() or not unique_id.isalnum():
            raise ValueError(f"unique id must be letters and digits: {unique_id!r}")
        suffix = f"!{unique_id}"
    return f"{submitter}!{policy_domain}!{int(begin)}!{int(end)}{suffix}.json.gz"


def report_message(
    report: bytes,
    filename: str,
    *,
    policy_domain: str,
    submitter: str,
    report_id: str,
    mail_from: str,
    to: str,
    organization: str | None = None,
    date: float | None = None,
) -> bytes:
    """The mail that carries a gzipped report to a ``mailto:`` address
    (RFC 8460 5.3), with CRLF line endings.

    The header has ``Subject: Report Domain: <policy-domain> Submitter:
    <submitter> Report-ID: <<report-id>>``, ``TLS-Report-Domain``,
    ``TLS-Report-Submitter``, ``TLS-Required: No`` and ``Auto-Submitted:
    auto-generated``; the body is ``multipart/report; report-type="tlsrpt"``
    with a short ``text/plain`` part and the report as an
    ``application/tlsrpt+gzip`` attachment named *filename*.

    :param report: the gzipped JSON report.
    :param filename: its file name (see :func:`report_filename`).
    :param policy_domain: the domain the report is about.
    :param submitter: the reporting domain.
    :param report_id: the report's ``report-id``.
    :param mail_from: the ``From`` address.
    :param to: the ``To`` address.
    :param organization: the display name of ``From``.
    :param date: the ``Date``, epoch seconds; now by default.
    """
    msg = EmailMessage()
    msg["From"] = formataddr((organization, mail_from)) if organization else mail_from
    msg["To"] = to
    msg["Date"] = formatdate(date, usegmt=True)
    msg["Message-ID"] = make_msgid("tlsrpt", domain=submitter)
    msg["Subject"] = (
        f"Report Domain: {policy_domain} Submitter: {submitter} Report-ID: <{report_id}>"
    )
    msg["TLS-Report-Domain"] = policy_domain
    msg["TLS-Report-Submitter"] = submitter
    msg["TLS-Required"] = "No"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for {policy_domain}.\n"
    )
    maintype, _, subtype = REPORT_MEDIA_TYPE.partition("/")
    msg.add_attachment(report, maintype=maintype, subtype=subtype, filename=filename)
    msg.set_type("multipart/report")
    msg.set_param("report-type", "tlsrpt")
    return msg.as_bytes(policy=SMTP)


@dataclass(frozen=True, slots=True)
class TlsReport:
    """A report :meth:`TlsReporter.flush` wrote."""

    #: The domain the report is about.
    policy_domain: str
    #: Its ``report-id``.
    report_id: str
    #: The ``.json.gz`` file.
    path: str
    #: The start of the reported day, epoch seconds (00:00:00 UTC).
    begin: int
    #: Its end, epoch seconds (23:59:59 UTC).
    end: int
    #: The report, as the JSON object written.
    report: dict[str, Any] = field(compare=False, repr=False)

    @property
    def filename(self) -> str:
        """The file's name."""
        return os.path.basename(self.path)


def _utc(seconds: int) -> str:
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


class _Counts:
    """The counts of one policy on one day."""

    __slots__ = ("failures", "successes")

    def __init__(self, successes: int = 0) -> None:
        self.successes = successes
        self.failures: dict[_DetailKey, int] = {}


class _TryLater(Exception):
    """The domain's TLSRPT record could not be looked up for now."""


def _day_number(day: datetime.date) -> int:
    return (day - datetime.date(1970, 1, 1)).days


def _atomic_write(directory: str, path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class TlsReporter:
    """Counts TLS outcomes and writes (and mails) RFC 8460 daily reports.

    :param reports_dir: where reports, the counters file and the ``sent``
        subdirectory go (created if missing, mode 0700).
    :param organization: the ``organization-name`` of the reports.
    :param contact: the ``contact-info``: an address (its domain is the
        default *submitter*) or any other text.
    :param clock: seconds since the epoch; days are UTC days of it. Inject
        one in tests.
    :param submitter: the reporting domain: the first part of report file
        names, ``TLS-Report-Submitter``, the right of ``report-id``. Default:
        the domain of *contact* when it is an address, else this host's name.
    :param mail_from: the sender (envelope and ``From``) of report mails.
        Default: *contact* when it is an address, else
        ``tlsrpt-noreply@<submitter>``.
    :param queue: a slimta queue (anything with ``enqueue``): when given,
        :meth:`flush` hands every report written to it (see :meth:`send`).
    :param interval: seconds between saves (and flushes) once :meth:`start`
        ran.
    :param max_keys: most distinct policies plus failure details counted per
        day.
    :param retain_days: days the counts of a domain whose TLSRPT record
        cannot be looked up (DNS failure) are kept for a later flush.
    :param dns_wait: seconds :meth:`flush` and :meth:`send` wait for a
        TLSRPT lookup at most.
    """

    def __init__(
        self,
        reports_dir: str | os.PathLike[str],
        organization: str,
        contact: str,
        *,
        clock: Callable[[], float] = time.time,
        submitter: str | None = None,
        mail_from: str | None = None,
        queue: Any = None,
        interval: float = 300.0,
        max_keys: int = 10000,
        retain_days: int = 7,
        dns_wait: float = 30.0,
    ) -> None:
        self.reports_dir = os.fspath(reports_dir)
        os.makedirs(self.reports_dir, mode=0o700, exist_ok=True)
        #: The ``organization-name``.
        self.organization = organization
        #: The ``contact-info``.
        self.contact = contact
        self.clock = clock
        address = contact[7:] if contact[:7].lower() == "mailto:" else contact
        is_address = _ADDRESS.fullmatch(address) is not None
        if submitter is None:
            submitter = address.rpartition("@")[2].lower() if is_address else local_fqdn()
        if not _valid_domain(submitter):
            raise ValueError(f"submitter must be a domain name: {submitter!r}")
        #: The reporting domain.
        self.submitter = submitter
        #: The sender of report mails.
        self.mail_from = mail_from or (address if is_address else f"tlsrpt-noreply@{submitter}")
        #: Where :meth:`flush` hands reports, if anywhere.
        self.queue = queue
        self.interval = interval
        self.max_keys = max_keys
        self.retain_days = retain_days
        self.dns_wait = dns_wait
        #: Outcomes not counted because a day had *max_keys* keys already.
        self.dropped = 0
        # UTC day number -> policy -> counts
        self._days: dict[int, dict[_PolicyKey, _Counts]] = {}
        # UTC day number -> distinct keys counted that day
        self._keys: dict[int, int] = {}
        self._full_days: set[int] = set()
        self._asking: set[str] = set()
        # domain -> (monotonic time to look again, publishes a record)
        self._domains: dict[str, tuple[float, bool]] = {}
        self._dirty = False
        self._greenlet: gevent.Greenlet | None = None
        self._load()

    # -------------------------------------------------------------- counting
    def record(self, outcome: TlsOutcome) -> None:
        """Count one TLS outcome; pass as ``MxSmtpRelay(tls_report=...)``.

        Outcomes of domains that do not publish a TLSRPT record are not
        counted (see the module documentation).
        """
        domain = outcome.domain
        if not self._publishes(domain):
            return
        day = int(self.clock() // _DAY)
        policies = self._days.get(day)
        if policies is None:
            self._prune(day)
            policies = self._days[day] = {}
        mx = outcome.mx_patterns
        if not mx and outcome.policy_type == "tlsa" and outcome.mx_host:
            mx = (outcome.mx_host,)
        key = (outcome.policy_type, domain, outcome.policy_string, mx)
        counts = policies.get(key)
        if counts is None:
            if not self._room(day):
                self.dropped += 1
                return
            counts = policies[key] = _Counts()
        self._dirty = True
        if outcome.result is TlsResult.SUCCESS:
            counts.successes += 1
            return
        detail = (
            _RESULT_TYPES[outcome.result],
            outcome.sending_ip,
            outcome.mx_host,
            outcome.receiving_ip,
            outcome.detail[:_MAX_REASON],
        )
        failures = counts.failures
        count = failures.get(detail)
        if count is None and not self._room(day):
            # Full: fold into the failure without addresses and reason.
            detail = (detail[0], "", detail[2], "", "")
            count = failures.get(detail)
            if count is None:
                self.dropped += 1
                return
        failures[detail] = (count or 0) + 1

    def _prune(self, today: int) -> None:
        """Drop the counts of days more than *retain_days* before *today*
        that were never flushed, so that memory stays bounded without
        :meth:`flush` (or :meth:`start`)."""
        for day in [day for day in self._days if today - day > self.retain_days]:
            del self._days[day]
            self._keys.pop(day, None)
            self._full_days.discard(day)
            self._dirty = True
            _log.warning("TLS report counts of %s dropped: never flushed", _utc(day * _DAY)[:10])

    def _room(self, day: int) -> bool:
        """Whether one more key may be counted on *day* (and count it)."""
        used = self._keys.get(day, 0)
        if used >= self.max_keys:
            if day not in self._full_days:
                self._full_days.add(day)
                _log.warning(
                    "TLS report counters full for %s (%d keys): further policies "
                    "and failure details are dropped",
                    _utc(day * _DAY)[:10],
                    self.max_keys,
                )
            return False
        self._keys[day] = used + 1
        return True

    def _publishes(self, domain: str) -> bool:
        """Whether *domain* publishes a TLSRPT record, from the DNS cache
        (what it said is remembered for :data:`_RECHECK` seconds); ``True``
        while that is not known yet (the lookup is started)."""
        now = time.monotonic()
        known = self._domains.get(domain)
        if known is not None and now < known[0]:
            return known[1]
        publishes = self._peek(domain)
        if publishes is not None:
            if len(self._domains) >= _MAX_DOMAINS:
                self._domains.clear()
            self._domains[domain] = (now + _RECHECK, publishes)
            return publishes
        return True

    def _peek(self, domain: str) -> bool | None:
        """:meth:`_publishes` from the DNS cache; ``None`` when it does not
        know (the lookup is then started, without waiting for it)."""
        if not _valid_domain(domain):
            return False
        name = _TXT_PREFIX + domain
        kept = DNSResolver.cache.peek(name, "TXT")
        if isinstance(kept, list):
            return _record_from_texts(tuple(rec.text for rec in kept)) is not None
        if kept is not None:  # NXDOMAIN or NODATA, kept
            return False
        if name not in self._asking:
            self._asking.add(name)
            DNSResolver.query_cached(name, "TXT").rawlink(lambda _: self._asking.discard(name))
        return None

    def counts(self, day: datetime.date | None = None) -> dict[str, Any]:
        """The counts of *day* (today by default), for a look at them:
        ``{domain: [{"policy": ..., "summary": ..., "failure-details": ...}]}``
        as in a report."""
        number = int(self.clock() // _DAY) if day is None else _day_number(day)
        by_domain: dict[str, dict[_PolicyKey, _Counts]] = {}
        for key, counts in self._days.get(number, {}).items():
            by_domain.setdefault(key[1], {})[key] = counts
        return {domain: _policies(policies) for domain, policies in sorted(by_domain.items())}

    # ------------------------------------------------------------- reporting
    def flush(self, day: datetime.date | None = None) -> list[TlsReport]:
        """Write the reports of the finished days, then save the counters.

        One report per policy domain and day, for the domains whose TLSRPT
        record is (still) valid; the counts of the others are dropped. When
        the lookup fails for now, the domain's counts are kept for a later
        flush, up to *retain_days*. With *queue*, the reports written are
        then handed to it (:meth:`send`).

        :param day: only this (finished) UTC day; default every finished day.
        :returns: the reports written.
        :raises ValueError: *day* is not over yet.
        """
        today = int(self.clock() // _DAY)
        if day is None:
            days = sorted(number for number in self._days if number < today)
        else:
            number = _day_number(day)
            if number >= today:
                raise ValueError(f"{day} is not over yet")
            days = [number] if number in self._days else []
        written: list[TlsReport] = []
        try:
            for number in days:
                written += self._flush_day(number, today)
        finally:
            self.save()
        if self.queue is not None:
            self.send(self.queue)
        return written

    def _flush_day(self, day: int, today: int) -> list[TlsReport]:
        policies = self._days.pop(day, {})
        self._keys.pop(day, None)
        self._full_days.discard(day)
        self._dirty = True
        by_domain: dict[str, dict[_PolicyKey, _Counts]] = {}
        for key, counts in policies.items():
            by_domain.setdefault(key[1], {})[key] = counts
        written: list[TlsReport] = []
        for domain, entries in sorted(by_domain.items()):
            try:
                record = self._find_record(domain)
            except _TryLater as exc:
                if today - day > self.retain_days:
                    _log.warning("TLS report of %s for day %d dropped: %s", domain, day, exc)
                else:
                    _log.info("TLS report of %s for day %d kept for later: %s", domain, day, exc)
                    self._restore(day, entries)
                continue
            if record is None:
                _log.debug("%s publishes no TLSRPT record: no report", domain)
                continue
            written.append(self._write_report(day, domain, entries))
        return written

    def _restore(self, day: int, entries: dict[_PolicyKey, _Counts]) -> None:
        """Put counts back (merging with any counted meanwhile)."""
        policies = self._days.setdefault(day, {})
        for key, counts in entries.items():
            known = policies.get(key)
            if known is None:
                policies[key] = counts
                self._keys[day] = self._keys.get(day, 0) + 1 + len(counts.failures)
                continue
            known.successes += counts.successes
            for detail, count in counts.failures.items():
                before = known.failures.get(detail)
                if before is None:
                    self._keys[day] = self._keys.get(day, 0) + 1
                known.failures[detail] = (before or 0) + count

    def _find_record(self, domain: str) -> TlsRptRecord | None:
        """The domain's TLSRPT record, looked up (cached); ``None`` if none.

        :raises _TryLater: the lookup failed for now.
        """
        result = DNSResolver.query_cached(_TXT_PREFIX + domain, "TXT")
        result.wait(self.dns_wait)
        if not result.ready():
            raise _TryLater("TXT lookup timed out")
        try:
            records = result.get(block=False)
        except DNSError as exc:
            if exc.errno in (pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_ENODATA):
                return None
            raise _TryLater(f"TXT lookup failed: {exc}") from None
        return _record_from_texts(tuple(rec.text for rec in records))

    def _write_report(self, day: int, domain: str, entries: dict[_PolicyKey, _Counts]) -> TlsReport:
        begin = day * _DAY
        end = begin + _DAY - 1
        unique = uuid.uuid4().hex
        report_id = f"{_utc(begin)[:10]}.{unique}@{self.submitter}"
        report: dict[str, Any] = {
            "organization-name": self.organization,
            "date-range": {"start-datetime": _utc(begin), "end-datetime": _utc(end)},
            "contact-info": self.contact,
            "report-id": report_id,
            "policies": _policies(entries),
        }
        data = json.dumps(report, separators=(",", ":")).encode("utf-8")
        name = report_filename(self.submitter, domain, begin, end, unique)
        path = os.path.join(self.reports_dir, name)
        _atomic_write(self.reports_dir, path, gzip.compress(data, mtime=0))
        _log.info("TLS report %s written for %s", name, domain)
        return TlsReport(domain, report_id, path, begin, end, report)

    def pending(self) -> list[str]:
        """The report files written and not handed to a queue yet, oldest first."""
        names = [
            name
            for name in os.listdir(self.reports_dir)
            if not name.startswith(".") and _FILENAME.fullmatch(name)
        ]
        return sorted(names, key=lambda name: (int(name.split("!")[2]), name))

    def send(self, queue: Any) -> int:
        """Hand each pending report to *queue*: one mail per ``mailto:``
        address of its domain's ``rua`` (see :func:`report_message`).

        A report whose mails were all queued is moved to the ``sent``
        subdirectory; so is one whose domain no longer publishes a record
        with a ``mailto:`` address (``https:`` ones are skipped and logged).
        A report stays pending (and is tried again next time) when the
        domain's record cannot be looked up for now or a mail could not be
        queued; its mails then go again, with the same ``Report-ID``.

        :param queue: a :class:`slimta.queue.Queue` (anything with
            ``enqueue``).
        :returns: how many mails were queued.
        """
        queued = 0
        for name in self.pending():
            match = _FILENAME.fullmatch(name)
            assert match is not None
            domain = match["domain"]
            try:
                record = self._find_record(domain)
            except _TryLater as exc:
                _log.info("TLS report %s not sent yet: %s", name, exc)
                continue
            addresses = record.mailto if record is not None else ()
            if record is not None and record.https:
                _log.info(
                    "TLS report %s not posted to %s: https reporting is not supported",
                    name,
                    ", ".join(record.https),
                )
            if not addresses:
                _log.info("TLS report %s not mailed: %s has no mailto: rua", name, domain)
                self._mark_sent(name)
                continue
            path = os.path.join(self.reports_dir, name)
            try:
                with open(path, "rb") as stream:
                    report = stream.read()
                report_id = str(json.loads(gzip.decompress(report))["report-id"])
            except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
                _log.warning("TLS report %s unreadable, not sent: %s", name, exc)
                continue
            ok = True
            for address in addresses:
                data = report_message(
                    report,
                    name,
                    policy_domain=domain,
                    submitter=self.submitter,
                    report_id=report_id,
                    mail_from=self.mail_from,
                    to=address,
                    organization=self.organization,
                    date=self.clock(),
                )
                envelope = Envelope(self.mail_from, [address])
                envelope.parse(data)
                if self._enqueue(queue, envelope, name):
                    queued += 1
                else:
                    ok = False
            if ok:
                self._mark_sent(name)
        return queued

    @staticmethod
    def _enqueue(queue: Any, envelope: Envelope, name: str) -> bool:
        try:
            results: list[tuple[Envelope, str | QueueError]] = queue.enqueue(envelope)
        except Exception:
            slogging.log_exception(__name__)
            return False
        failed = [str(outcome) for _, outcome in results if not isinstance(outcome, str)]
        if failed or not results:
            _log.warning("TLS report %s not queued for %s: %s", name, envelope.recipients, failed)
            return False
        _log.info("TLS report %s queued for %s", name, envelope.recipients[0])
        return True

    def _mark_sent(self, name: str) -> None:
        sent = os.path.join(self.reports_dir, "sent")
        os.makedirs(sent, mode=0o700, exist_ok=True)
        os.replace(os.path.join(self.reports_dir, name), os.path.join(sent, name))

    # ----------------------------------------------------------- persistence
    @property
    def _counters_path(self) -> str:
        return os.path.join(self.reports_dir, COUNTERS_FILE)

    def save(self) -> None:
        """Write the counters to the reports directory, if they changed."""
        if not self._dirty:
            return
        days = []
        for day, policies in sorted(self._days.items()):
            days.append(
                {
                    "day": day,
                    "policies": [
                        {
                            "key": [key[0], key[1], list(key[2]), list(key[3])],
                            "successes": counts.successes,
                            "failures": [[*detail, n] for detail, n in counts.failures.items()],
                        }
                        for key, counts in policies.items()
                    ],
                }
            )
        data = json.dumps({"version": 1, "days": days}, separators=(",", ":"))
        try:
            _atomic_write(self.reports_dir, self._counters_path, data.encode("utf-8"))
        except OSError as exc:
            _log.warning("TLS report counters not saved: %s", exc)
            return
        self._dirty = False

    def _load(self) -> None:
        """Carry on from the counters a previous reporter saved."""
        try:
            with open(self._counters_path, encoding="utf-8") as stream:
                data = json.load(stream)
            if data.get("version") != 1:
                raise ValueError(f"unknown version {data.get('version')!r}")
            loaded: dict[int, dict[_PolicyKey, _Counts]] = {}
            for entry in data["days"]:
                policies = loaded.setdefault(int(entry["day"]), {})
                for item in entry["policies"]:
                    kind, domain, strings, mx = item["key"]
                    key = (str(kind), str(domain), _strings(strings), _strings(mx))
                    counts = policies[key] = _Counts(int(item["successes"]))
                    for *detail, n in item["failures"]:
                        if len(detail) != 5:
                            raise ValueError(f"bad failure detail {detail!r}")
                        counts.failures[_detail_key(detail)] = int(n)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            _log.warning("TLS report counters %s ignored: %s", self._counters_path, exc)
            return
        for day, policies in loaded.items():
            self._restore(day, policies)

    # ------------------------------------------------------------- lifecycle
    def tick(self) -> None:
        """Save the counters, and flush the finished days (what the greenlet
        of :meth:`start` does every *interval* seconds)."""
        self.flush()

    def start(self) -> None:
        """Start a greenlet that calls :meth:`tick` every *interval* seconds."""
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            gevent.sleep(self.interval)
            try:
                self.tick()
            except Exception:
                slogging.log_exception(__name__)

    def kill(self) -> None:
        """Stop the greenlet of :meth:`start` and save the counters."""
        greenlet = self._greenlet
        self._greenlet = None
        if greenlet is not None:
            greenlet.kill()
        self.save()


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {value!r}")
    return tuple(str(item) for item in value)


def _detail_key(detail: list[Any]) -> _DetailKey:
    return (str(detail[0]), str(detail[1]), str(detail[2]), str(detail[3]), str(detail[4]))


def _policies(entries: dict[_PolicyKey, _Counts]) -> list[dict[str, Any]]:
    """The ``policies`` array of a report (RFC 8460 4.4)."""
    out: list[dict[str, Any]] = []
    for key in sorted(entries):
        counts = entries[key]
        kind, domain, strings, mx = key
        details: list[dict[str, Any]] = []
        ordered = sorted(counts.failures.items(), key=lambda item: (-item[1], item[0]))
        for (result, sending_ip, mx_host, receiving_ip, reason), count in ordered:
            detail: dict[str, Any] = {"result-type": result}
            if sending_ip:
                detail["sending-mta-ip"] = sending_ip
            if mx_host:
                detail["receiving-mx-hostname"] = mx_host
            if receiving_ip:
                detail["receiving-ip"] = receiving_ip
            detail["failed-session-count"] = count
            if reason:
                detail["failure-reason-code"] = reason
            details.append(detail)
        out.append(
            {
                "policy": {
                    "policy-type": kind,
                    "policy-string": list(strings),
                    "policy-domain": domain,
                    "mx-host": list(mx),
                },
                "summary": {
                    "total-successful-session-count": counts.successes,
                    "total-failure-session-count": sum(counts.failures.values()),
                },
                "failure-details": details,
            }
        )
    return out
