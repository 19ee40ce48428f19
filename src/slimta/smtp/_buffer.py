"""The receive buffer of the server core: framing of lines, DATA and BDAT.

One buffer, one reader (design decision): bytes from the socket go in with
:meth:`ReceiveBuffer.feed` and come out as command lines, dot-unstuffed DATA
chunks or exact BDAT chunks. Lines end only at CRLF (RFC 5321 2.3.8); a bare
CR or LF never ends anything. Every method takes bounded work and keeps a
bounded amount of memory, whatever the peer sends.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = ["DataChunk", "LineTooLong", "ReceiveBuffer"]

#: Largest unterminated DATA tail kept in the buffer while waiting for a CRLF.
_DATA_TAIL = 65536


@functools.lru_cache(maxsize=8)
def _long_line(limit: int) -> re.Pattern[bytes]:
    """A line of more than *limit* octets; anchored at line starts, so cheap."""
    return re.compile(rb"(?m)^[^\r\n]{%d}" % (limit + 1))


class LineTooLong:
    """Returned by :meth:`ReceiveBuffer.extract_line` for an over-long line.

    The line was discarded up to and including its CRLF.
    """

    __slots__ = ()


#: The single :class:`LineTooLong` marker.
LINE_TOO_LONG = LineTooLong()


@dataclass(slots=True)
class DataChunk:
    """Message data taken from the buffer while in DATA."""

    #: Dot-unstuffed bytes with their CRLFs, the terminator excluded.
    data: bytes
    #: True when the ``<CRLF>.<CRLF>`` terminator was consumed.
    ended: bool
    #: True when *data* holds a CR or LF that is not part of a CRLF.
    bare_newline: bool
    #: Length of the longest line in this chunk, CRLF excluded, counting the
    #: part of a line started in an earlier chunk; when under the limit given
    #: to :meth:`ReceiveBuffer.extract_data` it may be an upper bound.
    longest_line: int


class ReceiveBuffer:
    """Bytes received from a peer, waiting to be framed.

    The bytes are kept as one immutable ``bytes`` object and a read offset:
    taking a line moves the offset and copies only the line, and new data
    replaces the buffer outright when everything before was consumed, which
    is the usual case.
    """

    __slots__ = ("_data", "_discarding", "_line_len", "_line_start", "_pos")

    def __init__(self) -> None:
        self._data = b""
        self._pos = 0
        # In a line longer than the limit, dropping bytes until its CRLF.
        self._discarding = False
        # DATA: are we at the start of a line, and how long is the current one.
        self._line_start = True
        self._line_len = 0

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        pos = self._pos
        if pos >= len(self._data):
            self._data = bytes(data)
        else:
            self._data = self._data[pos:] + data
        self._pos = 0

    def __len__(self) -> int:
        return len(self._data) - self._pos

    def _drop(self, count: int) -> None:
        """Forget *count* bytes from the read offset on."""
        self._pos += count
        if self._pos >= len(self._data):
            self._data = b""
            self._pos = 0

    def _drop_all_but_cr(self) -> None:
        """Forget everything unread but a trailing CR, whose LF may follow."""
        data = self._data
        self._data = b"\r" if data.endswith(b"\r") and self._pos < len(data) else b""
        self._pos = 0

    def clear(self) -> int:
        """Drop everything buffered (STARTTLS); :returns: how many bytes."""
        count = len(self)
        self._data = b""
        self._pos = 0
        self._discarding = False
        return count

    def extract_line(self, limit: int) -> bytes | LineTooLong | None:
        """Take one CRLF-terminated line, without its CRLF.

        :param limit: most octets allowed before the CRLF.
        :returns: the line; :data:`LINE_TOO_LONG` once an over-long line has
            been discarded through its CRLF; ``None`` when no full line is
            buffered yet (an over-long partial line is dropped meanwhile, so
            memory stays bounded).
        """
        data = self._data
        pos = self._pos
        if not self._discarding:
            end = data.find(b"\r\n", pos, pos + limit + 2)
            if end >= 0:
                self._pos = end + 2
                if end + 2 >= len(data):
                    self._data = b""
                    self._pos = 0
                return data[pos:end]
            if len(data) - pos <= limit + 1:
                return None
            # Too long already: its end may still be in the buffer, and
            # pipelined commands after it must survive.
            self._discarding = True
            end = data.find(b"\r\n", pos + limit)
        else:
            end = data.find(b"\r\n", pos)
        if end < 0:
            self._drop_all_but_cr()
            return None
        self._discarding = False
        self._drop(end + 2 - pos)
        return LINE_TOO_LONG

    def start_data(self) -> None:
        """Begin DATA content: the buffer is at the start of a line."""
        self._line_start = True
        self._line_len = 0

    def extract_data(self, line_limit: int) -> DataChunk | None:
        """Take DATA content up to the terminator or to the last full line.

        Only ``<CRLF>.<CRLF>`` ends the data (RFC 5321 4.1.1.4; the first CRLF
        may be the one that ended the DATA command). One leading dot is removed
        from each line (RFC 5321 4.5.2). :returns: ``None`` when nothing can be
        taken yet.
        """
        data = self._data
        pos = self._pos
        size = len(data)
        if pos >= size:
            return None
        if self._line_start and data.startswith(b".\r\n", pos):
            self._drop(3)
            return DataChunk(b"", True, False, self._line_len)
        end = data.find(b"\r\n.\r\n", pos)
        if end >= 0:
            raw = data[pos : end + 2]
            self._drop(end + 5 - pos)
            return self._unstuff(raw, True, line_limit)
        last = data.rfind(b"\r\n", pos)
        if last >= 0:
            raw = data[pos : last + 2]
            self._drop(last + 2 - pos)
            return self._unstuff(raw, False, line_limit)
        if size - pos < _DATA_TAIL:
            return None
        # One very long line: pass it on in pieces, keeping a trailing CR
        # that could begin a terminator with the next read.
        keep = 1 if data.endswith(b"\r") else 0
        raw = data[pos : size - keep]
        self._drop(size - keep - pos)
        return self._unstuff(raw, False, line_limit)

    def _unstuff(self, raw: bytes, ended: bool, line_limit: int) -> DataChunk:
        line_start = self._line_start
        if line_start and raw.startswith(b"."):
            raw = raw[1:]
        # No match returns raw itself; "in" on bytes would first try to
        # read the needle as an int and build a TypeError for it.
        raw = raw.replace(b"\r\n.", b"\r\n")
        crlf = raw.count(b"\r\n")
        # CRs and LFs outside CRLF pairs, counted in one pass.
        bare = len(raw) - len(raw.translate(None, b"\r\n")) != 2 * crlf
        # Line length: cheap when the chunk cannot hold a long line.
        carried = self._line_len
        if crlf == 0:
            longest = carried + len(raw)
            self._line_len = longest
            self._line_start = False
        else:
            if carried + len(raw) > line_limit:
                if carried + raw.find(b"\r\n") > line_limit or _long_line(line_limit).search(raw):
                    lines = raw.split(b"\r\n")
                    longest = max(carried + len(lines[0]), max(map(len, lines)))
                else:
                    # No line passes the limit: the limit is an upper bound.
                    longest = line_limit
            else:
                # Short enough that no line can pass the limit: an upper bound.
                longest = carried + len(raw)
            self._line_len = 0
            self._line_start = True
        return DataChunk(raw, ended, bare, longest)

    def extract_exact(self, count: int) -> bytes:
        """Take up to *count* bytes as they are (BDAT); may return fewer."""
        data = self._data
        pos = self._pos
        chunk = data[pos : pos + count]
        self._drop(len(chunk))
        return chunk
