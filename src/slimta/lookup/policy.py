"""A queue policy driven by lookup records: aliases, VERP, added headers.

:class:`LookupPolicy` looks up the sender and/or each recipient of a message
as it is queued and acts on these record keys:

``alias``
    A new address that replaces the one looked up. A recipient's DSN
    requests (``NOTIFY``, ``ORCPT``) move with it.
``verp``
    When true, the sender is rewritten as a VERP address for the recipient
    (``owner-bounces@example.com`` to ``owner-bounces+rcpt=host.example@example.com``),
    so that a bounce names the recipient that failed. The recipient then
    gets its own copy of the message. In the sender's record it applies to
    every recipient. False values: ``false``, ``0``, ``''``, ``None`` and
    the strings ``'0'``, ``'false'``, ``'no'``, ``'off'`` (any case), for
    backends that store only text. A null sender stays null.
``add_headers``
    A JSON object (as text, or already a mapping) of header names and
    values, each prepended to the message. Existing headers stay. A
    malformed object, or a header that is not valid, is logged and skipped.

Every lookup is done before the envelope is changed: if one fails, the
:class:`~slimta.lookup.LookupFailed` it raises leaves the message as it
was, and :meth:`slimta.queue.Queue.enqueue` raises it, which the edge
answers with ``451 4.3.0`` (the client tries again later).

.. versionchanged:: 4.0
   ``verp`` is new; a failed lookup raises instead of being taken as "no
   record"; all lookups are done before any change.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from slimta.envelope import Envelope
from slimta.lookup.drivers import LookupBase
from slimta.policy import QueuePolicy

__all__ = ["LookupPolicy", "verp_address"]

_log = logging.getLogger(__name__)

#: Text values of ``verp`` that mean "no".
_FALSE_TEXT = frozenset({"", "0", "false", "no", "off"})

#: What an address from a record may not hold: controls (a CR or LF would
#: end an SMTP command) and angle brackets.
_BAD_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")


class LookupPolicy(QueuePolicy):
    """Apply the lookup records of a message's addresses when it is queued.

    Add it with :meth:`slimta.queue.Queue.add_policy`.

    :param lookup: the driver, a
        :class:`~slimta.lookup.drivers.LookupBase`; addresses are looked
        up with :meth:`~slimta.lookup.drivers.LookupBase.lookup_address`.
    :param on_sender: look the sender up (not the null sender).
    :param on_rcpts: look each recipient up.
    """

    def __init__(self, lookup: LookupBase, on_sender: bool = False, on_rcpts: bool = True) -> None:
        super().__init__()
        self.lookup = lookup
        self.on_sender = on_sender
        self.on_rcpts = on_rcpts

    def apply(self, envelope: Envelope) -> list[Envelope] | None:
        """Rewrite *envelope* after its records.

        :returns: ``None`` when *envelope* was changed in place; with VERP,
            the envelopes that replace it: the recipients without VERP
            together (first, if any), then one per VERP recipient.
        :raises slimta.lookup.LookupFailed: a lookup failed; *envelope* is
            unchanged.
        """
        sender_rec: dict[str, Any] | None = None
        if self.on_sender and envelope.sender:
            sender_rec = self.lookup.lookup_address(envelope.sender)
        rcpt_recs: list[dict[str, Any] | None] = []
        if self.on_rcpts:
            rcpt_recs = [self.lookup.lookup_address(rcpt) for rcpt in envelope.recipients]

        headers: list[tuple[str, str]] = []
        verp_all = False
        if sender_rec:
            alias = _alias(sender_rec)
            if alias is not None:
                envelope.sender = alias
            verp_all = _is_true(sender_rec.get("verp"))
            _collect_headers(sender_rec, headers)
        verp = [verp_all] * len(envelope.recipients)
        for index, record in enumerate(rcpt_recs):
            if not record:
                continue
            alias = _alias(record)
            if alias is not None:
                _rename_recipient(envelope, index, alias)
            verp[index] = verp[index] or _is_true(record.get("verp"))
            _collect_headers(record, headers)
        for name, value in headers:
            try:
                envelope.prepend_header(name, value)
            except ValueError:
                _log.warning("lookup record header %r not added: not a valid header", name)

        if not envelope.sender or "@" not in envelope.sender or not any(verp):
            return None
        return _verp_split(envelope, verp)


def _alias(record: Mapping[str, Any]) -> str | None:
    alias = record.get("alias")
    if alias is None:
        return None
    if not isinstance(alias, str) or not alias or _BAD_ADDRESS.search(alias):
        _log.warning("lookup record alias ignored: not an address")
        return None
    return alias


def _is_true(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_TEXT
    return bool(value)


def _collect_headers(record: Mapping[str, Any], out: list[tuple[str, str]]) -> None:
    raw = record.get("add_headers")
    if raw is None:
        return
    parsed: object = raw
    if isinstance(raw, str | bytes):
        try:
            parsed = json.loads(raw)
        except ValueError:
            _log.warning("lookup record add_headers ignored: not JSON")
            return
    if not isinstance(parsed, Mapping):
        _log.warning("lookup record add_headers ignored: not a JSON object")
        return
    for name, value in parsed.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            _log.warning("lookup record header %r not added: value is not text", name)
            continue
        pair = (str(name), str(value))
        # Two recipients sharing a record add its headers once.
        if pair not in out:
            out.append(pair)


def _rename_recipient(envelope: Envelope, index: int, alias: str) -> None:
    old = envelope.recipients[index]
    envelope.recipients[index] = alias
    # The DSN requests of RCPT are kept by address (RFC 3461 4.1, 4.2).
    if envelope.dsn_notify is not None and old in envelope.dsn_notify:
        envelope.dsn_notify[alias] = envelope.dsn_notify.pop(old)
    if envelope.dsn_orcpt is not None and old in envelope.dsn_orcpt:
        envelope.dsn_orcpt[alias] = envelope.dsn_orcpt.pop(old)


def verp_address(sender: str, recipient: str) -> str:
    """The VERP form of *sender* for *recipient*.

    ``list-bounces@example.com`` for ``user@host.example`` is
    ``list-bounces+user=host.example@example.com``; a recipient without a
    domain is put in whole.
    """
    local, _, domain = sender.rpartition("@")
    rcpt_local, at, rcpt_domain = recipient.rpartition("@")
    encoded = f"{rcpt_local}={rcpt_domain}" if at else recipient
    return f"{local}+{encoded}@{domain}"


def _verp_split(envelope: Envelope, verp: list[bool]) -> list[Envelope]:
    sender = envelope.sender
    assert sender is not None
    rest = [rcpt for rcpt, flag in zip(envelope.recipients, verp, strict=True) if not flag]
    singles = [rcpt for rcpt, flag in zip(envelope.recipients, verp, strict=True) if flag]
    out: list[Envelope] = []
    for rcpt in singles:
        copy = envelope.copy([rcpt])
        copy.sender = verp_address(sender, rcpt)
        out.append(copy)
    if rest:
        envelope.recipients = rest
        out.insert(0, envelope)
    return out
