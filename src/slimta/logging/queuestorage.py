"""Log lines about queue storage: messages written, updated and removed.

Every line has type ``queue`` and the message id as its id, e.g.
``queue:1a2b3c:remove``.
"""

from __future__ import annotations

import logging
from typing import Protocol

from slimta.logging import logline

__all__ = ["QueueStorageLogger"]


class _Envelope(Protocol):
    """What the logger reads from a :class:`slimta.envelope.Envelope`."""

    @property
    def sender(self) -> object: ...

    @property
    def recipients(self) -> object: ...


class QueueStorageLogger:
    """Writes ``queue`` lines about stored messages to a :class:`logging.Logger`.

    All lines are at DEBUG; nothing is formatted when DEBUG is disabled.

    :param log: Where the lines go, usually ``logging.getLogger(__name__)``.
    """

    def __init__(self, log: logging.Logger) -> None:
        #: The underlying logger.
        self.log = log

    def write(self, id: str, envelope: _Envelope) -> None:
        """Log that a message was stored, with its ``sender`` and ``recipients``.

        :param id: The message id.
        :param envelope: The message stored.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(
                self.log.debug,
                "queue",
                id,
                "write",
                sender=envelope.sender,
                recipients=envelope.recipients,
            )

    def update_meta(self, id: str, /, **what: object) -> None:
        """Log a change to a message's metadata (operation ``meta``).

        :param id: The message id.
        :param what: The metadata changed, e.g. ``attempts=2``, each logged
            as its own key.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "queue", id, "meta", **what)

    def remove(self, id: str) -> None:
        """Log that a message was removed from storage.

        :param id: The message id.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "queue", id, "remove")
