"""A queue look-alike that relays each message at once, storing nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from slimta.relay import Relay, RelayError, TransientRelayError
from slimta.util.ids import uuid4_hex

if TYPE_CHECKING:
    from slimta.envelope import Envelope
    from slimta.policy import QueuePolicy

__all__ = ["ProxyQueue"]


class ProxyQueue:
    """Relays each message while the client waits; nothing is stored.

    An edge in front of it answers with the relay's own reply when delivery
    fails, so the client keeps the message and its responsibility.

    :param relay: the :class:`~slimta.relay.Relay` to deliver through.

    .. versionchanged:: 4.0
       When the relay reports per-recipient results and every recipient
       failed, the failure is returned (a transient one if any) instead of
       a random id: the client must not think the message was accepted.
    """

    def __init__(self, relay: Relay) -> None:
        #: The :class:`~slimta.relay.Relay`.
        self.relay = relay

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str | RelayError]]:
        """Deliver *envelope* now.

        :returns: ``[(envelope, id)]`` with a random id on success, or
            ``[(envelope, error)]`` with the :class:`~slimta.relay.RelayError`.
        """
        try:
            results = self.relay._attempt(envelope, 0)
        except RelayError as exc:
            return [(envelope, exc)]
        error = _all_failed(envelope, results)
        if error is not None:
            return [(envelope, error)]
        return [(envelope, uuid4_hex())]

    def start(self) -> None:
        """Nothing to start."""

    def kill(self) -> None:
        """Nothing to stop."""

    def flush(self) -> None:
        """Nothing waits in this queue."""

    def add_policy(self, policy: QueuePolicy) -> None:
        """Not supported: there is no queueing step to run policies in.

        :raises NotImplementedError: always.
        """
        raise NotImplementedError()


def _all_failed(envelope: Envelope, results: Any) -> RelayError | None:
    """The error to report when per-recipient *results* failed every recipient."""
    if isinstance(results, Mapping):
        outcomes = [results.get(rcpt) for rcpt in envelope.recipients]
    elif isinstance(results, list | tuple):
        outcomes = list(results)
    else:
        return None
    errors = [outcome for outcome in outcomes if isinstance(outcome, RelayError)]
    if not outcomes or len(errors) < len(outcomes):
        return None
    for error in errors:
        if isinstance(error, TransientRelayError):
            return error
    return errors[0]
