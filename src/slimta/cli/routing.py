"""Which relay each recipient goes through, and when failures are retried.

The queue of ``slimta serve`` has one relay, a :class:`Router`: it looks up
each recipient's relay in its :class:`RouteTable` (local domains first, then
the ``[[route]]`` entries in order, then ``relay.default``) and hands each
group of recipients to its relay. The queue splits messages by recipient
domain before storing them (:class:`~slimta.policy.split.RecipientDomainSplit`),
so a message usually has one group and goes through unchanged; the MX relay
needs that, since it delivers to the first recipient's domain.

A reload replaces :attr:`Router.table`; attempts already running finish
with the table they started with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slimta import logging as slogging
from slimta.cli.config import RouteConfig
from slimta.queue import default_backoff
from slimta.relay import RecipientResult, Relay, RelayError, TransientRelayError
from slimta.smtp.reply import Reply

if TYPE_CHECKING:
    from slimta.envelope import Envelope
    from slimta.relay import AttemptResult

__all__ = ["RouteTable", "Router", "make_backoff"]

#: Postfix's ``maximal_backoff_time``: the wait once the schedule runs out
#: and the message is not yet too old (seconds).
_LONGEST_WAIT = 4000.0
#: Without a timestamp a message's age is unknown: give up after this many attempts.
_MAX_ATTEMPTS_WITHOUT_AGE = 100


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Where recipients go.

    :param is_local: true for addresses delivered here.
    :param local: the relay of local addresses (the users' Maildirs).
    :param routes: ``(route, relay)`` in the order of the configuration.
    :param default: the relay of every other address.
    """

    is_local: Callable[[str], bool]
    local: Relay
    routes: tuple[tuple[RouteConfig, Relay], ...]
    default: Relay

    def relay_for(self, recipient: str) -> Relay:
        if self.is_local(recipient):
            return self.local
        _, _, domain = recipient.rpartition("@")
        domain = domain.rstrip(".").lower()
        for route, relay in self.routes:
            if route.matches(domain):
                return relay
        return self.default


class Router(Relay):
    """Delivers each recipient through the relay :attr:`table` names for it."""

    def __init__(self, table: RouteTable) -> None:
        super().__init__()
        #: The current :class:`RouteTable`.
        self.table = table

    def attempt(self, envelope: Envelope, attempts: int) -> AttemptResult:
        table = self.table
        groups: dict[int, tuple[Relay, list[str]]] = {}
        for rcpt in envelope.recipients:
            relay = table.relay_for(rcpt)
            groups.setdefault(id(relay), (relay, []))[1].append(rcpt)
        if len(groups) <= 1:
            relay = table.default if not groups else next(iter(groups.values()))[0]
            return relay._attempt(envelope, attempts)
        results: dict[str, RecipientResult] = {}
        for relay, rcpts in groups.values():
            results.update(_attempt_group(relay, envelope.copy(rcpts), attempts))
        return results


def _attempt_group(relay: Relay, envelope: Envelope, attempts: int) -> dict[str, RecipientResult]:
    """One relay's outcome for its copy of a message, per recipient."""
    rcpts = envelope.recipients
    try:
        outcome = relay._attempt(envelope, attempts)
    except RelayError as exc:
        return dict.fromkeys(rcpts, exc)
    except Exception as exc:
        # Where the queue would log and retry an unexpected error of the
        # whole message, do the same for this group alone.
        slogging.log_exception(__name__)
        error = TransientRelayError(str(exc), Reply("450", "4.0.0 Unhandled delivery error"))
        return dict.fromkeys(rcpts, error)
    if outcome is None or isinstance(outcome, Reply):
        return dict.fromkeys(rcpts, outcome)
    if isinstance(outcome, Mapping):
        return {rcpt: outcome.get(rcpt) for rcpt in rcpts if rcpt in outcome}
    assert isinstance(outcome, Sequence)
    return dict(zip(rcpts, outcome, strict=False))


def make_backoff(
    retry: Sequence[int], max_age: float, *, clock: Callable[[], float] = time.time
) -> Callable[[Envelope, int], float | None]:
    """The queue's ``backoff(envelope, attempts)`` for ``[queue]``.

    :param retry: seconds before the first, second, ... retry, the last one
        repeated; empty for Postfix's schedule
        (:func:`slimta.queue.default_backoff`).
    :param max_age: seconds after which a message that still fails is given
        up (and bounced).
    :param clock: epoch seconds.
    """
    waits = tuple(float(wait) for wait in retry)

    def backoff(envelope: Envelope, attempts: int) -> float | None:
        timestamp = envelope.timestamp
        if timestamp is None:
            if attempts > _MAX_ATTEMPTS_WITHOUT_AGE:
                return None
        elif clock() - timestamp > max_age:
            return None
        if waits:
            return waits[min(attempts, len(waits)) - 1] if attempts > 0 else waits[0]
        wait = default_backoff(envelope, attempts, clock=clock)
        # default_backoff gives up after its own 5 days; max_age decides here.
        return wait if wait is not None else _LONGEST_WAIT

    return backoff
