"""Reply framing shared by the server and client cores (RFC 5321 section 4.2).

:func:`format_reply` turns a code and text into wire bytes; :class:`ReplyParser`
turns received bytes back into complete replies. Neither does any I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ParsedReply", "ReplyParser", "ReplySyntaxError", "format_reply"]

_LINE_BREAKS = re.compile(r"\r\n|\r|\n")
#: A reply line: three digits, then a space, a hyphen or nothing (RFC 5321 4.2).
_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])([ -]|$)")
#: Longest reply line accepted by the parser, well above the 512 of RFC 5321 4.5.3.1.5.
MAX_REPLY_LINE = 4096
#: Most lines one reply may have before it is judged hostile.
MAX_REPLY_LINES = 256


#: The text of each reply code, by value: cheaper than formatting an int.
_CODE_TEXT = tuple(str(code) for code in range(600))
#: The value of each reply code as received: cheaper than int().
_CODE_VALUE = {text.encode("ascii"): code for code, text in enumerate(_CODE_TEXT) if code >= 100}


def format_reply(code: int, message: str, newline_first: bool = False) -> bytes:
    """Serialise a reply; line breaks in *message* make a multi-line reply.

    Every line of the text becomes its own ``CODE-`` continuation line, so no
    text can inject a line of its own or end the reply early.

    :param code: a reply code, 100 to 599.
    """
    digits = _CODE_TEXT[code]
    if "\n" in message or "\r" in message:
        lines = _LINE_BREAKS.split(message)
        last = lines.pop()
        out = "".join(f"{digits}-{line}\r\n" for line in lines) + f"{digits} {last}\r\n"
    elif message:
        out = f"{digits} {message}\r\n"
    else:
        out = f"{digits}\r\n"
    if newline_first:
        out = "\r\n" + out
    return out.encode("utf-8", "replace")


class ReplySyntaxError(ValueError):
    """Received reply bytes do not form a valid reply; :attr:`data` has them."""

    def __init__(self, data: bytes) -> None:
        super().__init__(f"invalid SMTP reply line: {data[:100]!r}")
        self.data = data


@dataclass(slots=True)
class ParsedReply:
    """One complete reply received from a server."""

    #: The three-digit code, e.g. ``250``.
    code: int
    #: The text of every line, joined with CRLF (enhanced codes left in place).
    message: str
    #: The text of each line, in order.
    lines: tuple[str, ...]


class ReplyParser:
    """Incremental parser of server replies, for the client side.

    Feed bytes with :meth:`feed`; :meth:`next_reply` returns a complete reply
    or ``None`` when more bytes are needed. Only CRLF ends a line.
    """

    __slots__ = ("_buffer", "_code", "_lines")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._code: bytes | None = None

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def take_buffered(self) -> bytes:
        """Remove and return unparsed bytes (used to discard them at STARTTLS)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    @property
    def has_buffered(self) -> bool:
        """True when unparsed bytes are waiting."""
        return bool(self._buffer)

    def next_reply(self) -> ParsedReply | None:
        """Return the next complete reply, or ``None`` if it is not all here yet.

        :raises ReplySyntaxError: on a line that is not a reply line, a code
            that changes within one reply, invalid UTF-8, or an over-long reply.
        """
        buf = self._buffer
        while True:
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_REPLY_LINE:
                    raise ReplySyntaxError(bytes(buf[:100]))
                return None
            line = bytes(buf[:end])
            del buf[: end + 2]
            match = _REPLY_LINE.match(line)
            if match is None or end > MAX_REPLY_LINE:
                raise ReplySyntaxError(line)
            code, separator = match.groups()
            try:
                text = line[4:].decode("utf-8")
            except UnicodeDecodeError:
                raise ReplySyntaxError(line) from None
            if self._code is None:
                if separator != b"-":
                    # A whole reply in one line: the usual case.
                    return ParsedReply(_CODE_VALUE[code], text, (text,))
            elif code != self._code:
                raise ReplySyntaxError(line)
            self._code = code
            self._lines.append(text)
            if len(self._lines) > MAX_REPLY_LINES:
                raise ReplySyntaxError(line)
            if separator != b"-":
                lines = tuple(self._lines)
                self._lines = []
                self._code = None
                return ParsedReply(_CODE_VALUE[code], "\r\n".join(lines), lines)
