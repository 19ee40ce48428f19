"""A queue policy that rewrites recipients, e.g. to forward one address to another."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from slimta.policy import QueuePolicy

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["Forward"]

#: A replacement as :func:`re.sub` takes it: a template or a function of the match.
Replacement: TypeAlias = "str | Callable[[re.Match[str]], str]"

_V = TypeVar("_V")


class Forward(QueuePolicy):
    """Rewrites each recipient with the first of a list of regex substitutions.

    Each recipient is tried against the mappings in the order they were
    added; the first one whose pattern matches and whose result is not empty
    replaces the recipient, and no later mapping is tried for it::

        forward = Forward()
        forward.add_mapping(r"^postmaster@.*$", "admin@example.com")
        forward.add_mapping(r"@old\\.example$", "@new.example")
        queue.add_policy(forward)

    .. versionchanged:: 4.0
       The RCPT ``NOTIFY`` and ``ORCPT`` of a rewritten recipient
       (:attr:`~slimta.envelope.Envelope.dsn_notify`,
       :attr:`~slimta.envelope.Envelope.dsn_orcpt`) stay with it under its
       new address.
    """

    def __init__(self) -> None:
        #: ``(compiled pattern, replacement, count)`` in the order added.
        self.mapping: list[tuple[re.Pattern[str], Replacement, int]] = []

    def add_mapping(
        self, pattern: str | re.Pattern[str], repl: Replacement, count: int = 0
    ) -> None:
        """Add a substitution, tried after those added before.

        :param pattern: a regular expression, as a string or compiled.
        :param repl: the replacement, as :func:`re.sub` takes it: a string
            (with ``\\1`` or ``\\g<name>`` references) or a function from the
            match to a string.
        :param count: the most substitutions in one recipient; 0 for all.
        """
        compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
        self.mapping.append((compiled, repl, count))

    def _rewrite(self, recipient: str) -> str:
        for pattern, repl, count in self.mapping:
            result, matches = pattern.subn(repl, recipient, count)
            if matches and result:
                return result
        return recipient

    def apply(self, envelope: Envelope) -> None:
        """Rewrite the recipients of *envelope* in place."""
        renamed: list[tuple[str, str]] = []
        recipients = envelope.recipients
        for index, old in enumerate(recipients):
            new = self._rewrite(old)
            if new != old:
                recipients[index] = new
                renamed.append((old, new))
        if renamed:
            envelope.dsn_notify = _moved(envelope.dsn_notify, renamed)
            envelope.dsn_orcpt = _moved(envelope.dsn_orcpt, renamed)


def _moved(data: dict[str, _V] | None, renamed: list[tuple[str, str]]) -> dict[str, _V] | None:
    """*data* (keyed by recipient) with each entry under the recipient's new name.

    When two recipients become one address, the first one's entry is kept.
    """
    if not data:
        return data
    moved = dict(data)
    for old, _ in renamed:
        moved.pop(old, None)
    for old, new in renamed:
        if old in data:
            moved.setdefault(new, data[old])
    return moved
