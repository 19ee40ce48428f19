"""Relays that deliver over SMTP (and LMTP), and their errors.

Error tree::

    RelayError
     +-- SmtpRelayError                the reply that failed, and the step
          +-- SmtpTransientRelayError  (also a TransientRelayError): 4xx
          +-- SmtpPermanentRelayError  (also a PermanentRelayError): 5xx
"""

from __future__ import annotations

from slimta.relay import PermanentRelayError, RelayError, TransientRelayError
from slimta.smtp.reply import Reply

__all__ = ["SmtpPermanentRelayError", "SmtpRelayError", "SmtpTransientRelayError"]


def _command_name(command: bytes | str | None) -> str:
    if command is None:
        return "[unknown command]"
    if isinstance(command, bytes):
        return command.decode("ascii", "replace")
    return command


class SmtpRelayError(RelayError):
    """A reply from (or about) the remote server ended a delivery attempt.

    :param type: ``'Transient'`` or ``'Permanent'``, for the message.
    :param reply: the :class:`~slimta.smtp.reply.Reply`; its ``command``
        names the step that failed.
    """

    def __init__(self, type: str, reply: Reply) -> None:
        command = _command_name(reply.command)
        msg = f"{type} failure on {command}: {reply.code} {reply.message}"
        super().__init__(msg, reply)

    @staticmethod
    def factory(reply: Reply) -> SmtpRelayError:
        """The error class for *reply*: permanent for 5xx, else transient."""
        if (reply.code or "").startswith("5"):
            return SmtpPermanentRelayError(reply)
        return SmtpTransientRelayError(reply)


class SmtpTransientRelayError(SmtpRelayError, TransientRelayError):
    """A 4xx reply, or a connection problem: try again later."""

    def __init__(self, reply: Reply) -> None:
        super().__init__("Transient", reply)


class SmtpPermanentRelayError(SmtpRelayError, PermanentRelayError):
    """A 5xx reply: the message (or recipient) failed for good."""

    def __init__(self, reply: Reply) -> None:
        super().__init__("Permanent", reply)
