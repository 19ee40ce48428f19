"""Events the server core reports: what the client did.

Events are immutable; parameters come as read-only mappings. Each command
event waits for an answer: the caller decides on a reply and
passes it to :meth:`slimta.smtp._server.ServerConnection.respond`. The core
answers protocol errors (bad syntax, bad sequence, limits) itself and does
not report them as events.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "Auth",
    "AuthAborted",
    "AuthResponse",
    "ConnectionClosed",
    "Data",
    "Ehlo",
    "Event",
    "Helo",
    "MailFrom",
    "MessageReceived",
    "MessageRefused",
    "NeedData",
    "Noop",
    "Quit",
    "RcptTo",
    "Rset",
    "StartTls",
    "UnknownCommand",
    "Vrfy",
]


class Event:
    """Base class of everything :meth:`ServerConnection.next_event` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class NeedData(Event):
    """No complete command is buffered: send pending output, then read more."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The session is over (QUIT, a 421, too many errors or end of input)."""


@dataclass(frozen=True, slots=True)
class Ehlo(Event):
    """``EHLO name``: default answer 250 plus the extension list."""

    name: str


@dataclass(frozen=True, slots=True)
class Helo(Event):
    """``HELO name``: default answer 250."""

    name: str


@dataclass(frozen=True, slots=True)
class StartTls(Event):
    """``STARTTLS`` (RFC 3207): answer 220, then the caller starts TLS."""


@dataclass(frozen=True, slots=True)
class Auth(Event):
    """``AUTH mechanism [initial-response]`` (RFC 4954).

    The caller runs the SASL exchange with :meth:`ServerConnection.challenge`
    and ends it with :meth:`ServerConnection.respond`.
    """

    mechanism: str
    #: The initial response as sent (base64 text), ``None`` if absent.
    initial_response: str | None


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    """One client line of a SASL exchange, as sent (base64 text or ``*``)."""

    line: str


@dataclass(frozen=True, slots=True)
class AuthAborted(Event):
    """The core ended a SASL exchange itself (an unusable line); it has
    already answered, so no :meth:`respond` is due."""


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    """``MAIL FROM:<address> params``; ``address`` is ``''`` for ``<>``."""

    address: str
    #: Upper-cased keyword to value, ``True`` for a keyword without one.
    params: Mapping[bytes, bytes | bool]


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    """``RCPT TO:<address> params``."""

    address: str
    #: Upper-cased keyword to value, ``True`` for a keyword without one.
    params: Mapping[bytes, bytes | bool]


@dataclass(frozen=True, slots=True)
class Data(Event):
    """``DATA``, or the first ``BDAT`` of a transaction when ``chunking``.

    Answer 354 to accept the message content; any other code refuses it.
    """

    chunking: bool = False


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """The whole message content arrived (end of DATA or ``BDAT ... LAST``)."""

    #: Message bytes, dot-unstuffed, with CRLF line endings.
    data: bytes


@dataclass(frozen=True, slots=True)
class MessageRefused(Event):
    """The content ended but the core refuses it (size, bare CR/LF, long line).

    The suggested reply is ``code`` and ``message``; ``too_big`` tells a size
    refusal apart from the others.
    """

    code: int
    message: str
    too_big: bool


@dataclass(frozen=True, slots=True)
class Rset(Event):
    """``RSET``."""


@dataclass(frozen=True, slots=True)
class Noop(Event):
    """``NOOP``."""


@dataclass(frozen=True, slots=True)
class Quit(Event):
    """``QUIT``."""


@dataclass(frozen=True, slots=True)
class Vrfy(Event):
    """``VRFY string``: default answer 252 (RFC 5321 3.5.3)."""

    argument: str


@dataclass(frozen=True, slots=True)
class UnknownCommand(Event):
    """A well-formed command line with a verb the core does not know.

    ``code`` and ``message`` are the suggested reply: ``502`` for a verb of
    RFC 5321 that is not implemented here, ``500`` for anything else.
    """

    verb: str
    argument: str | None
    code: int = 500
    message: str = "5.5.1 Command unrecognized"
