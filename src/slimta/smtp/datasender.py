"""Encode message data for the DATA command (RFC 5321 4.5.2).

.. versionchanged:: 4.0
   Bare CR and bare LF are normalised to CRLF before dot-stuffing, so that
   content can never carry an end-of-data sequence (SMTP smuggling).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from slimta.smtp._client import DotStuffer

if TYPE_CHECKING:
    from slimta.smtp.io import IO

__all__ = ["DataSender"]


class DataSender:
    """The dot-stuffed wire form of message data, followed by the end marker.

    Iterating yields byte chunks: each part with its line endings made CRLF
    and a ``.`` doubled at the start of every line (also where a part starts
    a line), then :attr:`end_marker`.

    :param parts: the message data, e.g. the header bytes and the body.
    """

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts
        stuffer = DotStuffer()
        self._chunks = [chunk for chunk in (stuffer.feed(part) for part in parts) if chunk]
        #: ``b'.\\r\\n'`` when the data is empty or ends with a line break,
        #: else ``b'\\r\\n.\\r\\n'``.
        self.end_marker = stuffer.end()

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks
        yield self.end_marker

    def send(self, io: IO) -> None:
        """Buffer every chunk on *io* (the caller flushes)."""
        for chunk in self:
            io.buffered_send(chunk)
