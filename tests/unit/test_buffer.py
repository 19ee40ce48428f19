"""ReceiveBuffer: CRLF-only line framing, DATA unstuffing and BDAT chunks."""

from __future__ import annotations

import pytest

from slimta.smtp._buffer import LINE_TOO_LONG, DataChunk, ReceiveBuffer

LIMIT = 20
#: Unterminated DATA tail the buffer keeps before passing a long line on.
DATA_TAIL = 65536


def buffer_with(*pieces: bytes) -> ReceiveBuffer:
    buf = ReceiveBuffer()
    for piece in pieces:
        buf.feed(piece)
    return buf


def lines(buf: ReceiveBuffer, limit: int = LIMIT) -> list[object]:
    out: list[object] = []
    while (line := buf.extract_line(limit)) is not None:
        out.append(line)
    return out


def data(buf: ReceiveBuffer, line_limit: int = 998) -> list[DataChunk]:
    out = []
    while (chunk := buf.extract_data(line_limit)) is not None:
        out.append(chunk)
        if chunk.ended:
            break
    return out


def joined(chunks: list[DataChunk]) -> bytes:
    return b"".join(c.data for c in chunks)


# --------------------------------------------------------------------- lines
def test_lines_end_only_at_crlf() -> None:
    buf = buffer_with(b"ONE\r\nTWO\nstill two\rthree\r\nFOUR")
    assert lines(buf) == [b"ONE", b"TWO\nstill two\rthree"]
    assert len(buf) == 4


def test_partial_line_waits() -> None:
    buf = buffer_with(b"NOOP")
    assert buf.extract_line(LIMIT) is None
    buf.feed(b"\r")
    assert buf.extract_line(LIMIT) is None
    buf.feed(b"\n")
    assert buf.extract_line(LIMIT) == b"NOOP"
    assert len(buf) == 0


def test_empty_line() -> None:
    assert lines(buffer_with(b"\r\n\r\n")) == [b"", b""]


def test_line_of_exactly_the_limit() -> None:
    buf = buffer_with(b"x" * LIMIT + b"\r\nNEXT\r\n")
    assert lines(buf) == [b"x" * LIMIT, b"NEXT"]


@pytest.mark.parametrize("extra", [1, 2, 3, 100, 10000])
def test_over_long_line_in_one_piece(extra: int) -> None:
    # The whole line and its CRLF are in the buffer: one LINE_TOO_LONG, then
    # the next line as usual.
    buf = buffer_with(b"x" * (LIMIT + extra) + b"\r\nNEXT\r\n")
    assert lines(buf) == [LINE_TOO_LONG, b"NEXT"]


@pytest.mark.parametrize("extra", [1, 2, 3, 100, 10000])
def test_over_long_line_then_its_crlf(extra: int) -> None:
    buf = buffer_with(b"x" * (LIMIT + extra))
    assert buf.extract_line(LIMIT) is None
    buf.feed(b"\r\nNEXT\r\n")
    assert lines(buf) == [LINE_TOO_LONG, b"NEXT"]


def test_over_long_line_is_dropped_while_it_arrives() -> None:
    buf = ReceiveBuffer()
    for _ in range(1000):
        buf.feed(b"y" * 1000)
        assert buf.extract_line(LIMIT) is None
        assert len(buf) <= LIMIT + 2
    buf.feed(b"\r\nNEXT\r\n")
    assert lines(buf) == [LINE_TOO_LONG, b"NEXT"]


def test_discarding_keeps_a_trailing_cr() -> None:
    buf = buffer_with(b"z" * 100 + b"\r")
    assert buf.extract_line(LIMIT) is None
    assert len(buf) == 1
    buf.feed(b"\nNEXT\r\n")
    assert lines(buf) == [LINE_TOO_LONG, b"NEXT"]


def test_discarding_ignores_bare_lf() -> None:
    buf = buffer_with(b"z" * 100, b"\n" + b"z" * 10)
    assert buf.extract_line(LIMIT) is None
    buf.feed(b"\r\nNEXT\r\n")
    assert lines(buf) == [LINE_TOO_LONG, b"NEXT"]


def test_clear() -> None:
    buf = buffer_with(b"STARTTLS\r\nMAIL FROM:<a@b>\r\n")
    assert buf.extract_line(LIMIT) == b"STARTTLS"
    assert buf.clear() == len(b"MAIL FROM:<a@b>\r\n")
    assert len(buf) == 0
    assert buf.extract_line(LIMIT) is None


def test_clear_stops_discarding() -> None:
    buf = buffer_with(b"z" * 100)
    assert buf.extract_line(LIMIT) is None
    buf.clear()
    buf.feed(b"EHLO a\r\n")
    assert buf.extract_line(LIMIT) == b"EHLO a"


# ---------------------------------------------------------------------- DATA
def test_data_empty_message() -> None:
    buf = buffer_with(b".\r\nNEXT\r\n")
    buf.start_data()
    chunks = data(buf)
    assert [(c.data, c.ended) for c in chunks] == [(b"", True)]
    assert buf.extract_line(LIMIT) == b"NEXT"


def test_data_whole_message() -> None:
    buf = buffer_with(b"Subject: x\r\n\r\n..dot\r\nend\r\n.\r\nQUIT\r\n")
    buf.start_data()
    chunks = data(buf)
    assert joined(chunks) == b"Subject: x\r\n\r\n.dot\r\nend\r\n"
    assert chunks[-1].ended
    assert not any(c.bare_newline for c in chunks)
    assert buf.extract_line(LIMIT) == b"QUIT"


def test_data_waits_for_a_whole_line() -> None:
    buf = buffer_with(b"abc")
    buf.start_data()
    assert buf.extract_data(998) is None
    buf.feed(b"\r\n.")
    chunk = buf.extract_data(998)
    assert chunk is not None
    assert (chunk.data, chunk.ended) == (b"abc\r\n", False)
    assert buf.extract_data(998) is None
    buf.feed(b"\r")
    assert buf.extract_data(998) is None
    buf.feed(b"\n")
    chunk = buf.extract_data(998)
    assert chunk is not None
    assert (chunk.data, chunk.ended) == (b"", True)


def test_data_dot_line_split_from_its_line_start() -> None:
    buf = buffer_with(b"abc\r\n")
    buf.start_data()
    assert joined(data(buf)) == b"abc\r\n"
    buf.feed(b"..x\r\n.\r\n")
    chunks = data(buf)
    assert joined(chunks) == b".x\r\n"
    assert chunks[-1].ended


@pytest.mark.parametrize(
    "fake_end", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n"]
)
def test_data_only_crlf_dot_crlf_ends(fake_end: bytes) -> None:
    buf = buffer_with(b"a" + fake_end + b"MAIL FROM:<x@y>\r\n")
    buf.start_data()
    chunks = data(buf)
    assert not any(c.ended for c in chunks)
    assert any(c.bare_newline for c in chunks)
    buf.feed(b".\r\n")
    chunks = data(buf)
    assert chunks[-1].ended


@pytest.mark.parametrize(
    ("wire", "bare"),
    [
        (b"ok\r\n", False),
        (b"a\nb\r\n", True),
        (b"a\rb\r\n", True),
        (b"a\r\r\n", True),
        (b"a\n\r\n", True),
        (b"\r\n\r\n", False),
    ],
)
def test_data_bare_newline_flag(wire: bytes, bare: bool) -> None:
    buf = buffer_with(wire + b".\r\n")
    buf.start_data()
    chunks = data(buf)
    assert any(c.bare_newline for c in chunks) is bare
    assert joined(chunks) == wire


def test_data_long_line_passed_on_in_pieces() -> None:
    buf = ReceiveBuffer()
    buf.start_data()
    total = b""
    longest = 0
    for _ in range(5):
        buf.feed(b"x" * DATA_TAIL)
        for chunk in data(buf):
            total += chunk.data
            longest = max(longest, chunk.longest_line)
        assert len(buf) < DATA_TAIL
    buf.feed(b"\r\n.\r\n")
    chunks = data(buf)
    total += joined(chunks)
    assert chunks[-1].ended
    assert total == b"x" * (5 * DATA_TAIL) + b"\r\n"
    assert longest == 5 * DATA_TAIL


def test_data_long_piece_keeps_trailing_cr() -> None:
    buf = buffer_with(b"x" * DATA_TAIL + b"\r")
    buf.start_data()
    chunk = buf.extract_data(998)
    assert chunk is not None
    assert chunk.data == b"x" * DATA_TAIL
    assert not chunk.bare_newline
    assert len(buf) == 1
    buf.feed(b"\n.\r\n")
    chunks = data(buf)
    assert joined(chunks) == b"\r\n"
    assert chunks[-1].ended
    assert not chunks[-1].bare_newline


def test_data_long_line_starting_with_dot_is_unstuffed_once() -> None:
    buf = buffer_with(b".." + b"y" * DATA_TAIL)
    buf.start_data()
    chunks = data(buf)
    buf.feed(b"\r\n.\r\n")
    chunks += data(buf)
    assert joined(chunks) == b"." + b"y" * DATA_TAIL + b"\r\n"


def test_data_longest_line() -> None:
    buf = buffer_with(b"short\r\n" + b"L" * 1200 + b"\r\nend\r\n.\r\n")
    buf.start_data()
    chunks = data(buf)
    assert max(c.longest_line for c in chunks) == 1200


def test_data_longest_line_under_the_limit_is_at_most_the_limit() -> None:
    buf = buffer_with(b"a" * 10 + b"\r\n" + b"b" * 20 + b"\r\n.\r\n")
    buf.start_data()
    chunks = data(buf, line_limit=998)
    assert 20 <= max(c.longest_line for c in chunks) <= 998


def test_data_longest_line_counts_across_chunks() -> None:
    buf = ReceiveBuffer()
    buf.start_data()
    buf.feed(b"q" * DATA_TAIL)
    first = data(buf, line_limit=998)
    buf.feed(b"q" * 10 + b"\r\n.\r\n")
    rest = data(buf, line_limit=998)
    assert max(c.longest_line for c in first + rest) == DATA_TAIL + 10


def test_start_data_resets_line_state() -> None:
    buf = buffer_with(b"x" * DATA_TAIL)
    buf.start_data()
    data(buf)  # mid-line now
    buf.start_data()
    buf.feed(b".\r\n")
    chunks = data(buf)
    assert [(c.data, c.ended) for c in chunks] == [(b"", True)]


# ---------------------------------------------------------------------- BDAT
def test_extract_exact() -> None:
    buf = buffer_with(b"0123456789NOOP\r\n")
    assert buf.extract_exact(4) == b"0123"
    assert buf.extract_exact(6) == b"456789"
    assert buf.extract_line(LIMIT) == b"NOOP"


def test_extract_exact_may_return_fewer() -> None:
    buf = buffer_with(b"abc")
    assert buf.extract_exact(10) == b"abc"
    assert buf.extract_exact(10) == b""
    assert len(buf) == 0


def test_extract_exact_takes_raw_bytes() -> None:
    raw = b"\r\n.\r\n\n\r\x00..x"
    buf = buffer_with(raw)
    assert buf.extract_exact(len(raw)) == raw
