"""Relays deliver queued messages to their next hop.

A queue calls :meth:`Relay._attempt` for each delivery attempt; it runs the
relay's :class:`~slimta.policy.RelayPolicy` chain and then :meth:`Relay.attempt`,
which subclasses implement. Failures are reported by raising one of::

    RelayError                the base: carries the Reply explaining the failure
     +-- PermanentRelayError  550 5.0.0 by default: bounce, never retry
     +-- TransientRelayError  450 4.0.0 by default: retry later

or, for per-recipient outcomes, by returning them in a dict (see
:meth:`Relay.attempt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypeAlias

from slimta.core import SlimtaError
from slimta.policy import RelayPolicy
from slimta.smtp.reply import Reply

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["PermanentRelayError", "Relay", "TransientRelayError"]


class RelayError(SlimtaError):
    """A delivery attempt failed; :attr:`reply` says why.

    :param msg: what went wrong; also the text of the default reply.
    :param reply: the reply explaining the failure (often the remote
        server's); ``None`` builds one from the class's
        :attr:`_default_code` and :attr:`_default_esc` and *msg*.
    """

    #: Reply code of the default reply.
    _default_code = "450"
    #: Enhanced status code of the default reply.
    _default_esc = "4.0.0"

    def __init__(self, msg: str, reply: Reply | None = None) -> None:
        super().__init__(msg)
        if reply is None:
            reply = Reply(self._default_code, f"{self._default_esc} {msg}")
        #: The :class:`~slimta.smtp.reply.Reply` explaining the failure;
        #: always set.
        self.reply: Reply = reply


class PermanentRelayError(RelayError):
    """Delivery failed for good: the queue bounces the message.

    The default reply is ``550 5.0.0 <msg>``.
    """

    _default_code = "550"
    _default_esc = "5.0.0"


class TransientRelayError(RelayError):
    """Delivery failed for now: the queue tries again later.

    The default reply is ``450 4.0.0 <msg>``.
    """

    _default_code = "450"
    _default_esc = "4.0.0"


#: One recipient's outcome: ``None`` or a :class:`Reply` when delivered, a
#: :class:`RelayError` when not.
RecipientResult: TypeAlias = Reply | RelayError | None

#: What :meth:`Relay.attempt` returns: the whole message's outcome (``None`` or
#: a :class:`Reply`), or one outcome per recipient, keyed by address (or a
#: list in the order of ``envelope.recipients``).
AttemptResult: TypeAlias = Reply | Mapping[str, RecipientResult] | Sequence[RecipientResult] | None


class Relay:
    """Base class of relays: delivers a message, or says why it could not."""

    def __init__(self) -> None:
        #: The :class:`~slimta.policy.RelayPolicy` objects run, in order,
        #: before each attempt.
        self.relay_policies: list[RelayPolicy] = []

    def add_policy(self, policy: RelayPolicy) -> None:
        """Run *policy* before every delivery attempt, after those added earlier.

        :param policy: a :class:`~slimta.policy.RelayPolicy`.
        :raises TypeError: *policy* is not a ``RelayPolicy``.
        """
        if not isinstance(policy, RelayPolicy):
            raise TypeError("expected RelayPolicy", policy)
        self.relay_policies.append(policy)

    def _run_policies(self, envelope: Envelope) -> None:
        for policy in self.relay_policies:
            policy.apply(envelope)

    def _attempt(self, envelope: Envelope, attempts: int) -> AttemptResult:
        """Run the relay policies on *envelope*, then :meth:`attempt`.

        This is what queues call.

        :param envelope: the message to deliver.
        :param attempts: how many attempts failed before this one.
        :returns: what :meth:`attempt` returns.
        :raises RelayError: from a policy or from :meth:`attempt`.
        """
        self._run_policies(envelope)
        return self.attempt(envelope, attempts)

    def attempt(self, envelope: Envelope, attempts: int) -> AttemptResult:
        """Deliver *envelope*; subclasses implement this.

        :param envelope: the message to deliver.
        :param attempts: how many attempts failed before this one.
        :returns: ``None`` or a :class:`~slimta.smtp.reply.Reply` when the
            whole message was delivered, or a dict mapping each recipient to
            ``None``/a ``Reply`` (delivered), a :class:`PermanentRelayError`
            (failed for good) or a :class:`TransientRelayError` (try again).
        :raises PermanentRelayError: the message failed for good.
        :raises TransientRelayError: the message should be tried again later.
        :raises NotImplementedError: in this base class.
        """
        raise NotImplementedError()

    def kill(self) -> None:
        """Release the relay's resources (connections, greenlets).

        Nothing to release in this base class.
        """
