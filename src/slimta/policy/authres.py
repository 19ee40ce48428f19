"""A queue policy that records SPF, DKIM and DMARC results (RFC 8601).

:class:`AddAuthenticationResults` checks each received message and prepends
one ``Authentication-Results:`` field naming this server (the *authserv-id*)::

    Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=a@b.example;
            dkim=pass header.d=b.example header.s=sel; dmarc=pass
            header.from=b.example policy.dmarc=reject

What is checked
---------------

* **SPF** (RFC 7208) with :class:`slimta.util.spf.EnforceSpf` for the
  envelope sender (``postmaster@<HELO name>`` for the null sender) and the
  client address; no ``spf`` clause when the client address is unknown.
* **DKIM** (RFC 6376): every ``DKIM-Signature:`` field, verified by dkimpy,
  which looks the keys up through :class:`~slimta.util.dns.DNSResolver`. One
  ``dkim`` clause per signature (the first eight), ``dkim=none`` when there
  is none; dkimpy's own messages go to the ``slimta.policy.authres.dkimpy``
  logger. A missing or unusable key is ``permerror`` (RFC 6376 6.1.2), a
  signature or body hash that does not match ``fail``. dkimpy is optional:
  without it the ``dkim`` clause is left out (``dkim=none`` would claim that
  the message had no signature) and a warning is logged once; DMARC then
  rests on SPF alone.
* **DMARC** (RFC 7489): the domain of the ``From:`` address, aligned with
  the SPF or a passing DKIM domain. ``dmarc=none`` for a message without a
  ``From:`` field or a domain without a policy; ``dmarc=permerror`` for
  several ``From:`` fields, a field without exactly one address, an invalid
  domain, or a malformed or duplicated policy record. The policy that
  applies (``p=``, or ``sp=`` for a subdomain) is written as
  ``policy.dmarc``, as common practice does; nothing is enforced. When
  nothing passes aligned but an SPF or DKIM check had a temporary error,
  the result is ``dmarc=temperror``, not ``fail``.

The organizational domain
-------------------------

RFC 7489 section 3.2 finds it with the Public Suffix List, which slimta does
not ship. Instead the policy record is looked up at the ``From:`` domain,
then at each parent down to two labels, and the domain where a record is
found serves as organizational domain: relaxed alignment accepts it and its
subdomains. For a name under a multi-label public suffix (``co.uk``) no
record is looked for at that suffix, but a public suffix that publishes a
DMARC record itself would be taken as organizational domain.

Safety
------

Existing ``Authentication-Results:`` fields with our authserv-id are removed
first: the sender could have forged them (RFC 8601 section 5). Every value
that came from the client or the message is written only when it has the
syntax RFC 8601 allows (a domain name, or an address written as a
quoted-string when needed); otherwise the property is left out, so nothing
can end the field or add a clause. DNS failures give ``temperror``; the
policy never raises and never takes much longer than *timeout* (its DNS
waits are bounded; an RSA verification is not interruptible).
"""

from __future__ import annotations

import contextlib
import email.utils
import importlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
import pycares

from slimta.policy import QueuePolicy
from slimta.util.dns import DNSResolver
from slimta.util.spf import EnforceSpf

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["AddAuthenticationResults"]

_log = logging.getLogger(__name__)

#: RFC 2045 token: the form of an authserv-id we accept (RFC 8601 2.2 allows a
#: quoted-string too; a host name is what is expected).
_TOKEN = re.compile(r"[!#$%&'*+.0-9A-Z^_`a-z{|}~-]+")
#: A domain name as A-labels (RFC 8601 2.3: header.d, header.from, the
#: domain of smtp.mailfrom), with "_" allowed as DNS does.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
#: RFC 5322 3.2.3 dot-atom-text, a local-part written without quotes.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
#: What a quoted-string can hold once \ and " are escaped: printable ASCII.
_QUOTABLE = re.compile(r"[\x20-\x7e]*")

#: A header field at the start of a line, continuation lines included;
#: group 1 the name, group 2 the body.
_FIELD = re.compile(
    rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)(?:\r?\n)?",
    re.MULTILINE,
)
#: RFC 5322 3.2.2 comments, not nested deeper than this pattern reaches.
_COMMENT = re.compile(r"\((?:[^()\\]|\\.|\((?:[^()\\]|\\.)*\))*\)")

#: RFC 5322 2.1.1: lines SHOULD be at most 78 characters.
_FOLD_AT = 78
_NAME = "Authentication-Results"

_VOID = frozenset({pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_ENODATA})

#: RFC 7489 6.3 policy values.
_POLICIES = frozenset(("none", "quarantine", "reject"))
#: DNS lookups of the policy record at most (the From domain and parents).
_MAX_DMARC_LOOKUPS = 5
#: Signatures verified at most per message: each costs a lookup and an RSA
#: operation, and a sender could add hundreds (RFC 6376 8.4).
_MAX_SIGNATURES = 8


class _TempError(Exception):
    """A DNS lookup failed or ran out of time: the result is temperror."""


class _PermError(Exception):
    """Malformed data (a record, a field): the result is permerror."""


@dataclass(frozen=True, slots=True)
class _DkimResult:
    result: str
    domain: str | None
    selector: str | None


def _lookup_txt(name: str, deadline: float) -> list[bytes] | None:
    """The TXT records of *name*; ``None`` for NXDOMAIN or no TXT record.

    :raises _TempError: a DNS error, or *deadline* (monotonic) reached.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise _TempError(f"no time left to look up {name}")
    result = DNSResolver.query_cached(name, "TXT")
    # gevent measures timeouts from its loop's last look at the clock.
    gevent.get_hub().loop.update_now()
    result.wait(left)
    if not result.ready():
        raise _TempError(f"timed out looking up {name}")
    if result.successful():
        return [record.data for record in result.value] or None
    if getattr(result.exception, "errno", None) in _VOID:
        return None
    raise _TempError(f"DNS error looking up {name}: {result.exception}")


def _quote_address(address: str) -> str | None:
    """*address* as an RFC 8601 pvalue (``local@domain``), or ``None``."""
    local, at, domain = address.rpartition("@")
    if not at or _DOMAIN.fullmatch(domain) is None or len(address) > 256:
        return None
    if not local or _DOT_ATOM.fullmatch(local) is not None:
        return address
    if _QUOTABLE.fullmatch(local) is None:
        return None  # controls, CR/LF, NUL or 8-bit: left out
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"@{domain}'


def _domain(name: str) -> str | None:
    """*name* lower-cased if it is a valid domain name (A-labels), else ``None``."""
    name = name.rstrip(".").lower()
    if len(name) > 253 or _DOMAIN.fullmatch(name) is None:
        return None
    return name


def _within(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


def _authserv_id(body: bytes) -> str | None:
    """The authserv-id of an ``Authentication-Results:`` field body."""
    text = re.sub(r"\r?\n", "", body.decode("utf-8", "replace"))
    text = _COMMENT.sub(" ", text).strip()
    if text.startswith('"'):
        end = re.match(r'"((?:[^"\\]|\\.)*)"', text)
        if end is None:
            return None
        return re.sub(r"\\(.)", r"\1", end.group(1))
    return re.split(r"[\s;]", text, maxsplit=1)[0]


def _fold(words: list[str]) -> str:
    """Join *words* with spaces, breaking lines before 78 columns."""
    lines: list[str] = []
    line = ""
    width = len(_NAME) + 2
    for word in words:
        if line and width + len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line, width = word, 1  # the tab that starts a continuation line
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n\t".join(lines)


class AddAuthenticationResults(QueuePolicy):
    """Prepends an ``Authentication-Results:`` field (RFC 8601) to each message.

    See the module documentation for what is checked and written. Add it to
    the :class:`~slimta.queue.Queue` of a receiving server, before policies
    that change the message (a body change breaks DKIM signatures).

    :param authserv_id: this server's name in the field, usually its host
        name; fields with this id already in the message are removed.
    :param spf: check SPF.
    :param dkim: verify DKIM signatures (needs dkimpy).
    :param dmarc: evaluate DMARC; it uses the SPF and DKIM results that are
        enabled.
    :param timeout: seconds the DNS lookups of one message may take in all;
        those that do not finish in time give ``temperror``.
    :raises ValueError: *authserv_id* is not an RFC 2045 token.
    """

    _warned_no_dkimpy = False

    def __init__(
        self,
        authserv_id: str,
        *,
        spf: bool = True,
        dkim: bool = True,
        dmarc: bool = True,
        timeout: float = 10.0,
    ) -> None:
        if _TOKEN.fullmatch(authserv_id) is None:
            raise ValueError(f"Not a valid authserv-id: {authserv_id!r}")
        #: This server's name in the field.
        self.authserv_id = authserv_id
        self.spf = spf
        self.dkim = dkim
        self.dmarc = dmarc
        #: Seconds the DNS lookups of one message may take.
        self.timeout = timeout

    def apply(self, envelope: Envelope) -> None:
        """Remove forged fields, check *envelope*, prepend the field; never raises."""
        try:
            self._apply(envelope)
        except Exception:
            _log.exception("Authentication-Results not added for message from %r", envelope.sender)

    def _apply(self, envelope: Envelope) -> None:
        deadline = time.monotonic() + self.timeout
        header_bytes, body = self._remove_ours(envelope)
        clauses: list[list[str]] = []

        spf_result: str | None = None
        spf_domain: str | None = None
        if self.spf:
            spf_result, spf_domain, clause = self._check_spf(envelope, deadline)
            if clause:
                clauses.append(clause)

        dkim_results: list[_DkimResult] | None = None
        if self.dkim:
            dkim_results = self._check_dkim(header_bytes + body, deadline)
            if dkim_results is not None:
                clauses.extend(self._dkim_clauses(dkim_results))

        if self.dmarc:
            clauses.append(
                self._check_dmarc(header_bytes, spf_result, spf_domain, dkim_results, deadline)
            )

        words = [f"{self.authserv_id};"]
        if not clauses:
            # RFC 8601 2.2: "none" when no method was applied.
            words.append("none")
        for index, clause in enumerate(clauses):
            last = index == len(clauses) - 1
            words.extend(clause[:-1])
            words.append(clause[-1] if last else clause[-1] + ";")
        envelope.prepend_header(_NAME, _fold(words))

    # forged fields -------------------------------------------------------

    def _remove_ours(self, envelope: Envelope) -> tuple[bytes, bytes]:
        """Remove the fields with our authserv-id; the message flattened."""
        header_bytes, body = envelope.flatten()
        ours = self.authserv_id.lower()
        spans = []
        for match in _FIELD.finditer(header_bytes):
            if match.group(1).lower() != b"authentication-results":
                continue
            found = _authserv_id(match.group(2))
            if found is not None and found.lower() == ours:
                spans.append(match.span())
        if not spans:
            return header_bytes, body
        kept = []
        start = 0
        for begin, end in spans:
            kept.append(header_bytes[start:begin])
            start = end
        kept.append(header_bytes[start:])
        header_bytes = b"".join(kept)
        _log.info("removed %d Authentication-Results field(s) claiming to be ours", len(spans))
        envelope.parse(header_bytes + body)
        return envelope.flatten()

    # SPF ---------------------------------------------------------------

    def _check_spf(
        self, envelope: Envelope, deadline: float
    ) -> tuple[str | None, str | None, list[str]]:
        """``(result, domain checked, clause words)``; no clause without a client IP."""
        client = envelope.client or {}
        ip = client.get("ip")
        if not isinstance(ip, str) or not ip:
            return None, None, []
        helo = client.get("name")
        helo = helo if isinstance(helo, str) else ""
        sender = envelope.sender or ""
        identity = sender or f"postmaster@{helo}"
        timeout = max(deadline - time.monotonic(), 0.001)
        result, _ = EnforceSpf(timeout).query(sender, ip, helo)
        words = [f"spf={result}"]
        quoted = _quote_address(identity)
        if quoted is not None:
            words.append(f"smtp.mailfrom={quoted}")
        domain = _domain(identity.rpartition("@")[2])
        return result, domain, words

    # DKIM --------------------------------------------------------------

    def _check_dkim(self, message: bytes, deadline: float) -> list[_DkimResult] | None:
        """One result per signature, ``[]`` for none; ``None`` without dkimpy."""
        try:
            dkim = importlib.import_module("dkim")
        except ImportError:
            if not AddAuthenticationResults._warned_no_dkimpy:
                AddAuthenticationResults._warned_no_dkimpy = True
                _log.warning("dkimpy is not installed: DKIM signatures are not verified")
            return None
        quiet = logging.getLogger(__name__ + ".dkimpy")
        try:
            verifier = dkim.DKIM(message, logger=quiet)
        except Exception as exc:  # dkimpy raises several types for bad input
            _log.info("message not DKIM-verifiable: %s", exc)
            return [_DkimResult("permerror", None, None)]
        count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
        if count > _MAX_SIGNATURES:
            _log.info("%d DKIM signatures: only the first %d verified", count, _MAX_SIGNATURES)
        return [
            self._verify_one(dkim, verifier, index, deadline)
            for index in range(min(count, _MAX_SIGNATURES))
        ]

    def _verify_one(self, dkim: Any, verifier: Any, index: int, deadline: float) -> _DkimResult:
        fetched: dict[bytes, bytes | None] = {}

        def dnsfunc(name: bytes, timeout: float = 5.0) -> bytes | None:
            text = name.decode("ascii", "replace").rstrip(".")
            records = _lookup_txt(text, deadline)
            # RFC 6376 3.6.2.2: the strings of one record are joined (the
            # resolver has done it); several records make the key unusable.
            value = records[0] if records is not None and len(records) == 1 else None
            fetched[name] = value
            return value

        try:
            # verify() is these two steps; split, a malformed signature
            # (permerror) is told from one that does not verify (fail).
            prep = verifier.verify_headerprep(index)
        except Exception as exc:
            _log.info("DKIM signature %d malformed: %s", index, exc)
            return _DkimResult("permerror", None, None)
        if not prep:
            return _DkimResult("permerror", None, None)
        sig, include_headers, sigheaders = prep
        domain = _domain(bytes(sig.get(b"d", b"")).decode("ascii", "replace"))
        selector = _domain(bytes(sig.get(b"s", b"")).decode("ascii", "replace"))

        def result(value: str) -> _DkimResult:
            return _DkimResult(value, domain, selector)

        try:
            ok = verifier.verify_sig(sig, include_headers, sigheaders[index], dnsfunc)
        except _TempError as exc:
            _log.info("DKIM signature %d: %s", index, exc)
            return result("temperror")
        except dkim.ValidationError as exc:  # body hash mismatch
            _log.info("DKIM signature %d fails: %s", index, exc)
            return result("fail")
        except dkim.DKIMException as exc:
            _log.info("DKIM signature %d: %s", index, exc)
            return result("permerror")
        if ok:
            return result("pass")
        # dkimpy answers False both for a bad signature and a missing or
        # unusable key; RFC 6376 6.1.2 makes the latter a PERMFAIL.
        key = next(iter(fetched.values()), None)
        if key is None:
            return result("permerror")
        try:
            dkim.evaluate_pk(b"key", key)
        except Exception:
            return result("permerror")
        return result("fail")

    def _dkim_clauses(self, results: list[_DkimResult]) -> list[list[str]]:
        if not results:
            return [["dkim=none"]]
        clauses = []
        for found in results:
            words = [f"dkim={found.result}"]
            if found.domain is not None:
                words.append(f"header.d={found.domain}")
            if found.selector is not None:
                words.append(f"header.s={found.selector}")
            clauses.append(words)
        return clauses

    # DMARC -------------------------------------------------------------

    def _check_dmarc(
        self,
        header_bytes: bytes,
        spf_result: str | None,
        spf_domain: str | None,
        dkim_results: list[_DkimResult] | None,
        deadline: float,
    ) -> list[str]:
        from_fields = [
            match.group(2)
            for match in _FIELD.finditer(header_bytes)
            if match.group(1).lower() == b"from"
        ]
        if not from_fields:
            return ["dmarc=none"]
        if len(from_fields) > 1:
            # RFC 7489 6.6.1: which author domain to use is undefined.
            return ["dmarc=permerror"]
        text = re.sub(r"\r?\n", "", from_fields[0].decode("utf-8", "surrogateescape"))
        addresses = [address for _, address in email.utils.getaddresses([text]) if address]
        if len(addresses) != 1:
            return ["dmarc=permerror"]
        domain = addresses[0].rpartition("@")[2].rstrip(".").lower()
        with contextlib.suppress(UnicodeError):
            domain = domain.encode("idna").decode("ascii").lower()
        from_domain = _domain(domain)
        if from_domain is None or "." not in from_domain:
            return ["dmarc=permerror"]
        header_from = f"header.from={from_domain}"
        try:
            found = self._dmarc_record(from_domain, deadline)
        except _TempError as exc:
            _log.info("DMARC for %s: %s", from_domain, exc)
            return ["dmarc=temperror", header_from]
        except _PermError as exc:
            _log.info("DMARC for %s: %s", from_domain, exc)
            return ["dmarc=permerror", header_from]
        if found is None:
            return ["dmarc=none", header_from]
        org_domain, tags = found

        def aligned(name: str | None, mode: str) -> bool:
            if name is None:
                return False
            if mode == "s":
                return name == from_domain
            return _within(name, org_domain)

        # RFC 7489 3.1: an identifier passes and is aligned with the From domain.
        spf_ok = spf_result == "pass" and aligned(spf_domain, tags.get("aspf", "r"))
        dkim_ok = any(
            found.result == "pass" and aligned(found.domain, tags.get("adkim", "r"))
            for found in dkim_results or ()
        )
        policy = tags["p"] if org_domain == from_domain else tags.get("sp", tags["p"])
        if spf_ok or dkim_ok:
            verdict = "pass"
        elif spf_result == "temperror" or any(
            found.result == "temperror" for found in dkim_results or ()
        ):
            # A lookup that may work later could still have given a pass:
            # "fail" would invite a reject for a transient fault.
            verdict = "temperror"
        else:
            verdict = "fail"
        _log.debug("DMARC for %s: %s (policy %s)", from_domain, verdict, policy)
        return [f"dmarc={verdict}", header_from, f"policy.dmarc={policy}"]

    def _dmarc_record(self, domain: str, deadline: float) -> tuple[str, dict[str, str]] | None:
        """``(domain where found, tags)`` of the policy record, or ``None``.

        :raises _TempError: a DNS failure.
        :raises _PermError: several records, or a malformed one.
        """
        labels = domain.split(".")
        for start in range(min(len(labels) - 1, _MAX_DMARC_LOOKUPS)):
            name = ".".join(labels[start:])
            records = _lookup_txt(f"_dmarc.{name}", deadline)
            # RFC 7489 6.6.3 step 3: only records starting with v=DMARC1.
            ours = [
                record
                for record in records or ()
                if re.match(rb"v[ \t]*=[ \t]*DMARC1[ \t]*(?:;|$)", record)
            ]
            if len(ours) > 1:
                raise _PermError(f"{len(ours)} DMARC records at _dmarc.{name}")
            if ours:
                return name, _dmarc_tags(ours[0])
        return None


def _dmarc_tags(record: bytes) -> dict[str, str]:
    """The tags of a DMARC record (RFC 7489 6.4) that this policy uses."""
    try:
        text = record.decode("ascii")
    except UnicodeError:
        raise _PermError("DMARC record not ASCII") from None
    tags: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        name, equals, value = part.partition("=")
        if not equals:
            raise _PermError(f"malformed DMARC tag {part!r}")
        tags.setdefault(name.strip(" \t").lower(), value.strip(" \t"))
    checks: dict[str, Callable[[str], bool]] = {
        "p": lambda value: value in _POLICIES,
        "sp": lambda value: value in _POLICIES,
        "adkim": lambda value: value in ("r", "s"),
        "aspf": lambda value: value in ("r", "s"),
    }
    if "p" not in tags:
        raise _PermError("DMARC record without p=")
    for name, check in checks.items():
        if name in tags:
            tags[name] = tags[name].lower()
            if not check(tags[name]):
                raise _PermError(f"DMARC record with {name}={tags[name]!r}")
    return tags
