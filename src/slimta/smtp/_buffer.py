"""The receive buffer of the server core: framing of lines, DATA and BDAT.

One buffer, one reader (design decision): bytes from the socket go in with
:meth:`ReceiveBuffer.feed` and come out as command lines, dot-unstuffed DATA
chunks or exact BDAT chunks. Lines end only at CRLF (RFC 5321 2.3.8); a bare
CR or LF never ends anything. Every method takes bounded work and keeps a
bounded amount of memory, whatever the peer sends.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataChunk", "LineTooLong", "ReceiveBuffer"]

#: Largest unterminated DATA tail kept in the buffer while waiting for a CRLF.
_DATA_TAIL = 65536


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
    """Bytes received from a peer, waiting to be framed."""

    __slots__ = ("_buf", "_discarding", "_line_len", "_line_start")

    def __init__(self) -> None:
        self._buf = bytearray()
        # In a line longer than the limit, dropping bytes until its CRLF.
        self._discarding = False
        # DATA: are we at the start of a line, and how long is the current one.
        self._line_start = True
        self._line_len = 0

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def clear(self) -> int:
        """Drop everything buffered (STARTTLS); :returns: how many bytes."""
        count = len(self._buf)
        self._buf.clear()
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
        buf = self._buf
        end = buf.find(b"\r\n", 0, limit + 2 if not self._discarding else len(buf))
        if end < 0 and len(buf) > limit + 1:
            # Too long already: its end may still be in the buffer, and
            # pipelined commands after it must survive.
            end = buf.find(b"\r\n", limit)
            self._discarding = True
        if end < 0:
            if self._discarding:
                # Keep a trailing CR: its LF may be in the next read.
                keep = 1 if buf.endswith(b"\r") else 0
                del buf[: len(buf) - keep]
            return None
        if self._discarding or end > limit:
            self._discarding = False
            del buf[: end + 2]
            return LINE_TOO_LONG
        line = bytes(buf[:end])
        del buf[: end + 2]
        return line

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
        buf = self._buf
        if not buf:
            return None
        if self._line_start and buf.startswith(b".\r\n"):
            del buf[:3]
            return DataChunk(b"", True, False, self._line_len)
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            raw = bytes(buf[: end + 2])
            del buf[: end + 5]
            return self._unstuff(raw, True, line_limit)
        last = buf.rfind(b"\r\n")
        if last >= 0:
            raw = bytes(buf[: last + 2])
            del buf[: last + 2]
            return self._unstuff(raw, False, line_limit)
        if len(buf) < _DATA_TAIL:
            return None
        # One very long line: pass it on in pieces, keeping a trailing CR or
        # dot that could begin a terminator with the next read.
        keep = 1 if buf.endswith(b"\r") else 0
        raw = bytes(buf[: len(buf) - keep])
        del buf[: len(buf) - keep]
        return self._unstuff(raw, False, line_limit)

    def _unstuff(self, raw: bytes, ended: bool, line_limit: int) -> DataChunk:
        line_start = self._line_start
        if line_start and raw.startswith(b"."):
            raw = raw[1:]
        if b"\r\n." in raw:
            raw = raw.replace(b"\r\n.", b"\r\n")
        crlf = raw.count(b"\r\n")
        bare = raw.count(b"\n") != crlf or raw.count(b"\r") != crlf
        # Line length: cheap when the chunk cannot hold a long line.
        carried = self._line_len
        if crlf == 0:
            longest = carried + len(raw)
            self._line_len = longest
            self._line_start = False
        else:
            if carried + len(raw) > line_limit:
                lines = raw.split(b"\r\n")
                longest = max(carried + len(lines[0]), max(map(len, lines)))
            else:
                # Short enough that no line can pass the limit: an upper bound.
                longest = carried + len(raw)
            self._line_len = 0
            self._line_start = True
        return DataChunk(raw, ended, bare, longest)

    def extract_exact(self, count: int) -> bytes:
        """Take up to *count* bytes as they are (BDAT); may return fewer."""
        buf = self._buf
        data = bytes(buf[:count])
        del buf[:count]
        return data
