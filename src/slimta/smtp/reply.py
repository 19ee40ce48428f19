"""The mutable :class:`Reply` shared by SMTP servers, clients and validators.

Validators receive a :class:`Reply` filled with the default answer and may
change it; the gevent adapters turn it into wire bytes through the sans-IO
core. Enhanced status codes (RFC 2034, RFC 3463) are kept apart from the text
so that changing the reply code keeps the class digit in step.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from slimta.smtp._reply import format_reply

if TYPE_CHECKING:
    from slimta.smtp.io import IO

__all__ = [
    "Reply",
    "bad_arguments",
    "bad_sequence",
    "connection_failed",
    "invalid_credentials",
    "timed_out",
    "tls_failure",
    "unhandled_error",
    "unknown_command",
    "unknown_parameter",
]

_CODE = re.compile(r"[1-5][0-9][0-9]")
_ESC = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_ESC_PREFIX = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?:[ \t]+|\Z)")


class Reply:
    """An SMTP reply: a three-digit code, an optional enhanced status code and text.

    :param code: the reply code, e.g. ``'250'``.
    :param message: the text; a leading enhanced status code such as
        ``'5.1.1 '`` is split off and stored separately.
    :param command: the command this reply answers (client side).
    :param address: the remote address the reply came from (client side).
    """

    __slots__ = ("_code", "_esc", "_text", "address", "command", "newline_first")

    def __init__(
        self,
        code: str | None = None,
        message: str | None = None,
        command: bytes | str | None = None,
        address: Any = None,
    ) -> None:
        self._code: str | None = None
        #: ``None`` = the default for the code, ``False`` = never shown.
        self._esc: str | bool | None = None
        self._text: str | None = None
        self.code = code
        self.message = message
        self.command = command
        self.address = address
        #: Send a bare CRLF before the reply (timeouts use it).
        self.newline_first = False

    # --- code ------------------------------------------------------------
    @property
    def code(self) -> str | None:
        """The three-digit reply code as a string, or ``None``."""
        return self._code

    @code.setter
    def code(self, value: str | int | None) -> None:
        if not value:
            self._code = None
            return
        value = str(value)
        if not _CODE.fullmatch(value):
            raise ValueError("Invalid SMTP reply code", value)
        self._code = value

    # --- enhanced status code ----------------------------------------------
    @property
    def enhanced_status_code(self) -> str | None:
        """The enhanced status code, its class digit following :attr:`code`."""
        return _effective_esc(self._code, self._esc)

    @enhanced_status_code.setter
    def enhanced_status_code(self, value: str | bool | None) -> None:
        if value is None or value is False:
            self._esc = value
            return
        if value is True or not _ESC.fullmatch(value):
            raise ValueError("Invalid enhanced status code", value)
        self._esc = value

    # --- text --------------------------------------------------------------
    @property
    def message(self) -> str | None:
        """The text, prefixed with the enhanced status code when one applies."""
        wire = self.wire_text()
        return wire if wire or self._text is not None else None

    @message.setter
    def message(self, value: str | None) -> None:
        if value is None:
            self._text = None
            if self._esc is not False:
                self._esc = None
            return
        match = _ESC_PREFIX.match(value)
        if match:
            self._esc = match.group(1)
            self._text = value[match.end() :]
        else:
            if self._esc is not False:
                self._esc = None
            self._text = value

    def wire_text(self) -> str:
        """:attr:`message` as it is sent, ``''`` for none; one call, no
        property lookups, since servers call it for every reply."""
        text = self._text or ""
        esc = _effective_esc(self._code, self._esc)
        if esc is None:
            return text
        return f"{esc} {text}" if text else esc

    @property
    def raw_message(self) -> str | None:
        """The text without its enhanced status code."""
        return self._text

    @raw_message.setter
    def raw_message(self, value: str | None) -> None:
        self._text = value

    # --- behaviour ----------------------------------------------------------
    def copy(self, reply: Reply) -> Reply:
        """Copy code, text and enhanced status code from *reply* into this one.

        :returns: this reply, so ``Reply().copy(bad_sequence)`` works.
        """
        self._code = reply._code
        self._esc = reply._esc
        self._text = reply._text
        self.newline_first = reply.newline_first
        return self

    def is_error(self) -> bool:
        """True when the code is a 4xx or 5xx."""
        return self._code is not None and self._code[0] in "45"

    def to_bytes(self) -> bytes:
        """The reply as it goes on the wire, CRLF-terminated."""
        return format_reply(int(self._code or 451), self.wire_text(), self.newline_first)

    def send(self, io: IO, flush: bool = False) -> None:
        """Buffer this reply on *io*, flushing when *flush* is true."""
        io.send_reply(self)
        if flush:
            io.flush_send()

    def recv(self, io: IO) -> None:
        """Read one (possibly multi-line) reply from *io* into this object."""
        self.code, self.message = io.recv_reply()
        self.address = io.address

    def __bool__(self) -> bool:
        return self._code is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return self.code == other.code and self.message == other.message

    __hash__ = None  # type: ignore[assignment]

    def __contains__(self, substr: str | bytes) -> bool:
        if isinstance(substr, bytes):
            return substr in bytes(self)
        return substr in str(self)

    def __str__(self) -> str:
        return f"{self._code} {self.message}"

    def __bytes__(self) -> bytes:
        return str(self).encode("utf-8")

    def __repr__(self) -> str:
        return f"<Reply code={self._code!r} message={self.message!r}>"


def _unchecked_reply(
    code: str | None,
    esc: str | bool | None,
    text: str | None,
    command: bytes | None = None,
) -> Reply:
    """A :class:`Reply` built without the setters' checks, for values the
    caller knows are valid (the SMTP cores' constants and parsed codes).

    :param esc: the enhanced status code, ``None`` for the code's default,
        ``False`` for none.
    """
    reply = Reply.__new__(Reply)
    reply._code = code
    reply._esc = esc
    reply._text = text
    reply.command = command
    reply.address = None
    reply.newline_first = False
    return reply


def _effective_esc(code: str | None, esc: str | bool | None) -> str | None:
    # The class digit always follows the reply code; 1xx/3xx never carry one.
    if esc is False or code is None or code[0] not in "245":
        return None
    if esc is None or esc is True:
        return f"{code[0]}.0.0"
    return code[0] + esc[1:]


def _predefined(code: str, message: str) -> Reply:
    return Reply(code, message)


#: ``500 5.5.2 Syntax error, command unrecognized``
unknown_command = _predefined("500", "5.5.2 Syntax error, command unrecognized")
#: ``504 5.5.4 Command parameter not implemented``
unknown_parameter = _predefined("504", "5.5.4 Command parameter not implemented")
#: ``503 5.5.1 Bad sequence of commands``
bad_sequence = _predefined("503", "5.5.1 Bad sequence of commands")
#: ``501 5.5.4 Syntax error in parameters or arguments``
bad_arguments = _predefined("501", "5.5.4 Syntax error in parameters or arguments")
#: ``421 4.3.0 Unhandled system error``
unhandled_error = _predefined("421", "4.3.0 Unhandled system error")
#: ``421 4.7.0 TLS negotiation failed``
tls_failure = _predefined("421", "4.7.0 TLS negotiation failed")
#: ``451 4.3.0 Connection failed``
connection_failed = _predefined("451", "4.3.0 Connection failed")
#: ``421 4.4.2 Connection timed out``, sent on a line of its own.
timed_out = _predefined("421", "4.4.2 Connection timed out")
timed_out.newline_first = True
#: ``535 5.7.8 Authentication credentials invalid``
invalid_credentials = _predefined("535", "5.7.8 Authentication credentials invalid")
