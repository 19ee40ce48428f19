"""Read DATA content from an :class:`~slimta.smtp.io.IO` (RFC 5321 4.1.1.4).

The framing is the server core's (:mod:`slimta.smtp._buffer`): only
``<CRLF>.<CRLF>`` ends the data, so ``\\n.\\n`` and the other endings a
lenient reader accepts cannot smuggle a second message through.

.. versionchanged:: 4.0
   The data ends only at ``<CRLF>.<CRLF>``; a ``.`` line ended by a bare LF
   or followed by spaces is content. Data over the size limit is read and
   discarded up to the terminator before :class:`~slimta.smtp.MessageTooBig`
   is raised, so that the rest of the message is never read as commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimta.smtp import MessageTooBig
from slimta.smtp._buffer import ReceiveBuffer

if TYPE_CHECKING:
    from slimta.smtp.io import IO

__all__ = ["DataReader"]

#: Line length the core is asked to measure; DataReader reports none, so any
#: value does, and a large one keeps the measuring cheap.
_NO_LINE_LIMIT = 1 << 30


class DataReader:
    """Reads one message's DATA content, dot-unstuffed, from *io*.

    :param io: the connection; bytes already in its ``recv_buffer`` are read
        first, and bytes after the terminator are put back there, so that
        pipelined commands that follow the data still work.
    :param max_size: most bytes of content accepted, or ``None`` for no limit.
    """

    def __init__(self, io: IO, max_size: int | None = None) -> None:
        self.io = io
        self.max_size = max_size

    def recv(self) -> bytes:
        """Read up to and including the ``<CRLF>.<CRLF>`` terminator.

        :returns: the content with one leading dot removed from each line
            that had one, line endings as received, terminator excluded.
        :raises MessageTooBig: the content exceeded *max_size*; it was read
            through the terminator and discarded.
        :raises ConnectionLost: the connection ended before the terminator.
        """
        buffer = ReceiveBuffer()
        buffer.start_data()
        buffer.feed(self.io.recv_buffer)
        self.io.recv_buffer = b""
        limit = self.max_size
        parts: list[bytes] = []
        size = 0
        too_big = False
        while True:
            chunk = buffer.extract_data(_NO_LINE_LIMIT)
            if chunk is None:
                buffer.feed(self.io.raw_recv())
                continue
            if not too_big:
                size += len(chunk.data)
                if limit is not None and size > limit:
                    too_big = True
                    parts.clear()
                else:
                    parts.append(chunk.data)
            if chunk.ended:
                break
        self.io.recv_buffer = buffer.extract_exact(len(buffer))
        if too_big:
            raise MessageTooBig()
        return b"".join(parts)
