"""Queues store accepted messages and deliver them through a relay.

This module holds the :class:`QueueStorage` interface and :class:`QueueError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from slimta.core import SlimtaError

if TYPE_CHECKING:
    from slimta.envelope import Envelope
    from slimta.smtp.reply import Reply

__all__ = ["QueueError", "QueueStorage"]


class QueueError(SlimtaError):
    """Storing or loading a message failed.

    :param msg: what went wrong.
    :param reply: the reply an edge sends instead of the default
        ``451 4.3.0 Error queuing message``; ``None`` for the default.
    """

    def __init__(self, msg: str = "Error queuing message", reply: Reply | None = None) -> None:
        super().__init__(msg)
        #: The reply for the client, or ``None`` for the edge's default.
        self.reply = reply


class QueueStorage:
    """Where a queue keeps its messages; every backend implements this.

    Recipient indexes given to :meth:`set_recipients_delivered` are positions
    in the recipient list of the envelope returned by the latest :meth:`get`
    (or written by :meth:`write` when there was no :meth:`get`); every
    backend removes those recipients from what later :meth:`get` calls
    return. Backends raise :class:`QueueError` when storage fails, and
    :meth:`write` returns only once the message is stored.
    """

    def write(self, envelope: Envelope, timestamp: float) -> str:
        """Store a new message, next attempt at *timestamp*, attempts 0.

        :returns: the new message's unique id.
        """
        raise NotImplementedError()

    def set_timestamp(self, id: str, timestamp: float) -> None:
        """Store the time of the next delivery attempt."""
        raise NotImplementedError()

    def increment_attempts(self, id: str) -> int:
        """Count one more delivery attempt; :returns: the new count."""
        raise NotImplementedError()

    def set_recipients_delivered(self, id: str, rcpt_indexes: Sequence[int]) -> None:
        """Mark recipients (indexes, see the class notes) as done."""
        raise NotImplementedError()

    def load(self) -> Iterable[tuple[float, str]]:
        """Every stored message as ``(timestamp, id)``; used at queue start."""
        raise NotImplementedError()

    def get(self, id: str) -> tuple[Envelope, int]:
        """The message and its attempt count.

        :raises KeyError: when *id* is not stored.
        """
        raise NotImplementedError()

    def remove(self, id: str) -> None:
        """Delete a message (delivered or failed for good); missing ids are ignored."""
        raise NotImplementedError()

    def wait(self) -> Iterable[tuple[float, str]]:
        """Block until other processes add messages, and yield them.

        :raises NotImplementedError: when the backend cannot (the default).
        """
        raise NotImplementedError()

    def get_info(self) -> dict[str, Any]:
        """Statistics; at least ``{'size': <number of messages>}``."""
        raise NotImplementedError()

    @staticmethod
    def _remove_delivered_rcpts(envelope: Envelope, rcpt_indexes: Iterable[int]) -> None:
        """Drop the recipients at *rcpt_indexes* from *envelope* in place."""
        drop = set(rcpt_indexes)
        envelope.recipients = [r for i, r in enumerate(envelope.recipients) if i not in drop]
