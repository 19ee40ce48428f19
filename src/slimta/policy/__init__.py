"""Policies: code that looks at or changes each message on its way through.

A :class:`QueuePolicy` runs once per message when it is queued, before it is
stored, so its changes last (adding ``Received:`` or ``Message-Id:``
headers, forwarding, splitting by recipient). A :class:`RelayPolicy` runs
before every delivery attempt and its changes are not stored (a per-attempt
check, or a change that only one relay needs).

Register them with :meth:`slimta.queue.Queue.add_policy` and
:meth:`slimta.relay.Relay.add_policy`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from slimta.core import SlimtaError

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["PolicyError", "QueuePolicy", "RelayPolicy", "apply_queue_policies"]


class PolicyError(SlimtaError):
    """A policy could not do its work."""


class QueuePolicy:
    """Base class of policies that run once per message, before storage.

    Subclasses override :meth:`apply`.
    """

    def apply(self, envelope: Envelope) -> Iterable[Envelope] | None:
        """Look at or change *envelope* before the queue stores it.

        :param envelope: the message being queued; changes to it are stored.
        :returns: ``None`` (or an empty iterable) to keep *envelope*, or the
            envelopes that replace it (e.g. one per recipient); policies
            added later run on each of them.
        :raises NotImplementedError: in this base class.
        """
        raise NotImplementedError()


class RelayPolicy:
    """Base class of policies that run before every delivery attempt.

    Subclasses override :meth:`apply`.
    """

    def apply(self, envelope: Envelope) -> None:
        """Look at or change *envelope* before one delivery attempt.

        Changes are not stored: a later attempt starts from the stored
        message again.

        :param envelope: the message about to be delivered.
        :raises slimta.relay.PermanentRelayError: to fail the message for good.
        :raises slimta.relay.TransientRelayError: to fail this attempt only.
        :raises NotImplementedError: in this base class.
        """
        raise NotImplementedError()


def apply_queue_policies(policies: Iterable[QueuePolicy], envelope: Envelope) -> list[Envelope]:
    """Run *policies* in order on *envelope*, as a queue does before storing.

    A policy that returns envelopes replaces the one it was given by them;
    the later policies run on each.

    :returns: the envelopes to store, at least one.
    """
    envelopes = [envelope]
    for policy in policies:
        products: list[Envelope] = []
        for env in envelopes:
            replaced = policy.apply(env)
            new = list(replaced) if replaced is not None else []
            products.extend(new or [env])
        envelopes = products
    return envelopes
