"""Queue policies that split a message into one copy per recipient or per domain.

Relays that deliver to one destination per attempt, such as
:class:`~slimta.relay.smtp.mx.MxSmtpRelay`, need each message to go to one
domain; these policies give them that. Each copy is a deep copy
(:meth:`Envelope.copy <slimta.envelope.Envelope.copy>`), so policies that run
later may change one without changing the others, and carries the RCPT
``NOTIFY`` and ``ORCPT`` of its own recipients only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from slimta.policy import QueuePolicy

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["RecipientDomainSplit", "RecipientSplit"]

_V = TypeVar("_V")


class RecipientSplit(QueuePolicy):
    """Splits a message with several recipients into one copy per recipient.

    A message with one recipient or none is kept as it is.
    """

    def apply(self, envelope: Envelope) -> list[Envelope] | None:
        """:returns: one copy of *envelope* per recipient, or ``None`` to keep it."""
        if len(envelope.recipients) <= 1:
            return None
        return [_copy_for(envelope, [rcpt]) for rcpt in envelope.recipients]


class RecipientDomainSplit(QueuePolicy):
    """Splits a message into one copy per recipient domain.

    Recipients are grouped by the part after their last ``@``, compared in
    lower case; the groups come in the order of their first recipient. Each
    recipient without a domain (such as ``postmaster``) gets a copy of its
    own, after the groups. A message that makes one group is kept as it is.
    """

    def apply(self, envelope: Envelope) -> list[Envelope] | None:
        """:returns: one copy of *envelope* per group, or ``None`` to keep it."""
        groups: dict[str, list[str]] = {}
        alone: list[list[str]] = []
        for rcpt in envelope.recipients:
            _, at, domain = rcpt.rpartition("@")
            if at and domain:
                groups.setdefault(domain.lower(), []).append(rcpt)
            else:
                alone.append([rcpt])
        if len(groups) + len(alone) <= 1:
            return None
        return [_copy_for(envelope, rcpts) for rcpts in [*groups.values(), *alone]]


def _copy_for(envelope: Envelope, recipients: list[str]) -> Envelope:
    """A deep copy of *envelope* for *recipients* and their DSN parameters only."""
    new = envelope.copy(recipients)
    new.dsn_notify = _only(envelope.dsn_notify, recipients)
    new.dsn_orcpt = _only(envelope.dsn_orcpt, recipients)
    return new


def _only(data: dict[str, _V] | None, recipients: list[str]) -> dict[str, _V] | None:
    if data is None:
        return None
    return {rcpt: data[rcpt] for rcpt in recipients if rcpt in data}
