"""DataReader: DATA framing over an IO, with the 4.0 defects fixed.

The socket is scripted: each ``recv`` returns the next chunk, then ``b''``
(end of stream), so that the split of the data across reads is controlled.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimta.smtp import ConnectionLost, MessageTooBig
from slimta.smtp.datareader import DataReader
from slimta.smtp.datasender import DataSender
from slimta.smtp.io import IO


class ScriptedSocket:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.reads = 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        return self.chunks.pop(0) if self.chunks else b""

    def sendall(self, data: bytes) -> None:
        raise AssertionError("DataReader never sends")


def reader(*chunks: bytes, buffered: bytes = b"", max_size: int | None = None) -> DataReader:
    io = IO(ScriptedSocket(list(chunks)))
    io.recv_buffer = buffered
    return DataReader(io, max_size)


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b".\r\n", b""),
        (b"abc\r\n.\r\n", b"abc\r\n"),
        (b"..abc\r\n.\r\n", b".abc\r\n"),
        (b"a\r\n..\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\n...x\r\n.\r\n", b"a\r\n..x\r\n"),
        # Bare LF line endings are content, kept as received.
        (b"a\nb\r\n.\r\n", b"a\nb\r\n"),
    ],
)
def test_content_is_unstuffed(wire: bytes, content: bytes) -> None:
    assert reader(wire).recv() == content


@pytest.mark.parametrize(
    "smuggled",
    [b"hi\n.\nstill\r\n", b"hi\r\n.\nstill\r\n", b"hi\n.\r\nstill\r\n", b"hi\r\n. \r\nstill\r\n"],
)
def test_only_crlf_dot_crlf_ends_the_data(smuggled: bytes) -> None:
    # 4.0 ended the data at the first of these and read "still" as a command.
    # A line that starts with a dot still loses it.
    assert reader(smuggled + b".\r\n").recv() == smuggled.replace(b"\r\n.", b"\r\n")


def test_buffered_bytes_are_read_first_and_the_rest_put_back() -> None:
    data = reader(b"c\r\n.\r\nQUIT\r\n", buffered=b"a\r\nb")
    assert data.recv() == b"a\r\nbc\r\n"
    assert data.io.recv_buffer == b"QUIT\r\n"


def test_terminator_split_across_reads() -> None:
    data = reader(b"one\r", b"\n", b".", b"\r", b"\nRSET\r\n")
    assert data.recv() == b"one\r\n"
    assert data.io.recv_buffer == b"RSET\r\n"


def test_whole_exchange_in_the_buffer_reads_nothing() -> None:
    data = reader(buffered=b"x\r\n.\r\nNOOP\r\n")
    assert data.recv() == b"x\r\n"
    assert data.io.socket.reads == 0
    assert data.io.recv_buffer == b"NOOP\r\n"


def test_end_of_stream_before_the_terminator() -> None:
    with pytest.raises(ConnectionLost):
        reader(b"partial\r\n").recv()


def test_limit_reached_reads_through_the_terminator() -> None:
    data = reader(b"x" * 50 + b"\r\n", b"y" * 50 + b"\r\n.\r\n", b"QUIT\r\n", max_size=60)
    with pytest.raises(MessageTooBig):
        data.recv()
    # The rest of the message was discarded, not left to be read as commands.
    assert data.io.recv_buffer == b""
    assert data.io.raw_recv() == b"QUIT\r\n"


def test_content_of_exactly_the_limit_is_accepted() -> None:
    assert reader(b"x" * 8 + b"\r\n.\r\n", max_size=10).recv() == b"x" * 8 + b"\r\n"
    with pytest.raises(MessageTooBig):
        reader(b"x" * 9 + b"\r\n.\r\n", max_size=10).recv()


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=400).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n")),
    cuts=st.lists(st.integers(min_value=0, max_value=420), max_size=6),
)
def test_round_trip_with_datasender_over_any_split(body: bytes, cuts: list[int]) -> None:
    wire = b"".join(DataSender(body))
    points = sorted({min(cut, len(wire)) for cut in cuts} | {0, len(wire)})
    chunks = [wire[a:b] for a, b in itertools.pairwise(points)]
    expected = body if body == b"" or body.endswith(b"\r\n") else body + b"\r\n"
    data = reader(*chunks, b"NEXT\r\n")
    assert data.recv() == expected
    assert data.io.recv_buffer + data.io.raw_recv() == b"NEXT\r\n"
