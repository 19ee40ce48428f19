"""SMTP protocol library: sans-IO cores, gevent adapters and their errors.

Exception tree::

    slimta.core.SlimtaError
     +-- SmtpError
          +-- ConnectionLost        the peer closed the connection
          +-- MessageTooBig         message data exceeded the SIZE limit
          +-- BadReply              a reply from a server did not parse
          +-- RemoteProtocolError   the peer broke the protocol; carries a reply

    RuntimeError
     +-- LocalProtocolError         this side asked for a move the protocol
                                    does not allow (a bug in the caller)

"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimta.core import SlimtaError
from slimta.smtp._errors import LocalProtocolError

if TYPE_CHECKING:
    from slimta.smtp.reply import Reply

__all__ = [
    "BadReply",
    "ConnectionLost",
    "LocalProtocolError",
    "MessageTooBig",
    "RemoteProtocolError",
    "SmtpError",
]


class SmtpError(SlimtaError):
    """Base class for errors of the SMTP protocol library."""


class ConnectionLost(SmtpError):
    """The socket was closed, reset or timed out before the exchange ended."""

    def __init__(self, msg: str = "Connection was closed prematurely") -> None:
        super().__init__(msg)


class MessageTooBig(SmtpError):
    """The message data exceeded the size limit advertised with SIZE."""

    def __init__(self, msg: str = "Message exceeded maximum size") -> None:
        super().__init__(msg)


class BadReply(SmtpError):
    """A reply line from a server was not a valid SMTP reply.

    :param data: the offending raw bytes, kept in :attr:`data`.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(f"Bad SMTP reply from server: {data[:200]!r}")
        #: The bytes that could not be parsed.
        self.data = data


class RemoteProtocolError(SmtpError):
    """The peer violated the protocol; :attr:`reply` is what it was told.

    .. versionadded:: 4.0
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        #: The reply sent (or to send) to the peer.
        self.reply = reply
