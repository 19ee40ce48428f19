"""A relay that discards every message and reports success.

Useful for tests and benchmarks of the receiving side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimta.relay import Relay
from slimta.smtp.reply import Reply
from slimta.util.ids import uuid4_hex

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["BlackholeRelay"]


class BlackholeRelay(Relay):
    """Discards every message; each attempt succeeds at once.

    Relay policies are not run: nothing is delivered, so there is nothing
    for them to prepare.
    """

    def _attempt(self, envelope: Envelope, attempts: int) -> Reply:
        return self.attempt(envelope, attempts)

    def attempt(self, envelope: Envelope, attempts: int) -> Reply:
        """Discard *envelope*.

        :returns: ``250 2.0.0 Message Delivered; <random hex id>``.
        """
        return Reply("250", f"2.0.0 Message Delivered; {uuid4_hex()}")
