"""DataSender and the client core's data encoding (RFC 5321 4.5.2, smuggling).

The round-trip tests feed the encoded data to the server core in DATA and
check that the body comes back exactly, with its line endings normalised.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimta.smtp import _events as ev
from slimta.smtp._client import DotStuffer, bdat_frames, dot_stuff, normalize_line_endings
from slimta.smtp._server import ServerConnection
from slimta.smtp.datasender import DataSender
from slimta.smtp.extensions import Extensions

#: Every sequence a lenient server might take for the end of data.
_SMUGGLING = re.compile(rb"(?<!\r)\n\.(\r?\n)|\r\n\.(?:\n|\r(?!\n))|\r\.\r")


def wire(*parts: bytes) -> bytes:
    return b"".join(DataSender(*parts))


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ((), b".\r\n"),
        ((b"",), b".\r\n"),
        ((b"abc",), b"abc\r\n.\r\n"),
        ((b"abc\r\n",), b"abc\r\n.\r\n"),
        ((b".abc\r\n",), b"..abc\r\n.\r\n"),
        ((b"a\r\n.\r\nb",), b"a\r\n..\r\nb\r\n.\r\n"),
        ((b"hi\n.\nstill\n",), b"hi\r\n..\r\nstill\r\n.\r\n"),
        ((b"a\r.\rb",), b"a\r\n..\r\nb\r\n.\r\n"),
        ((b"a\n.\r\nb",), b"a\r\n..\r\nb\r\n.\r\n"),
        ((b"head\r\n", b".body\r\n"), b"head\r\n..body\r\n.\r\n"),
        ((b"head\r", b"\n.body"), b"head\r\n..body\r\n.\r\n"),
        ((b"head\r", b"\n", b"\nx"), b"head\r\n\r\nx\r\n.\r\n"),
        ((b"a.", b".b"), b"a..b\r\n.\r\n"),
        ((b"..\r\n",), b"...\r\n.\r\n"),
    ],
)
def test_wire_form(parts: tuple[bytes, ...], expected: bytes) -> None:
    assert wire(*parts) == expected


def test_end_marker_attribute() -> None:
    assert DataSender(b"x\r\n").end_marker == b".\r\n"
    assert DataSender(b"x").end_marker == b"\r\n.\r\n"
    assert DataSender().end_marker == b".\r\n"


def test_bare_lf_dot_line_is_stuffed_not_end_of_data() -> None:
    out = wire(b"Subject: x\r\n\r\nfirst\n.\nMAIL FROM:<evil@example.com>\n")
    assert b"\r\n..\r\n" in out
    assert out.count(b"\r\n.\r\n") == 1 and out.endswith(b"\r\n.\r\n")


def test_send_buffers_on_io() -> None:
    class FakeIO:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def buffered_send(self, data: bytes) -> None:
            self.sent.append(data)

    io = FakeIO()
    DataSender(b".a", b"b").send(io)  # type: ignore[arg-type]
    assert b"".join(io.sent) == b"..ab\r\n.\r\n"


def test_dot_stuff_matches_datasender() -> None:
    assert b"".join(dot_stuff(b"x\n.", b"y")) == wire(b"x\n.", b"y")


def test_stuffer_end_marker_tracks_line_start() -> None:
    stuffer = DotStuffer()
    assert stuffer.end_marker == b".\r\n"
    stuffer.feed(b"abc")
    assert stuffer.end_marker == b"\r\n.\r\n"


def test_bdat_frames() -> None:
    assert list(bdat_frames([b""])) == [b"BDAT 0 LAST\r\n"]
    frames = list(bdat_frames([b"ab\n", b"cd"], chunk_size=3))
    assert frames == [b"BDAT 3\r\nab\r", b"BDAT 3 LAST\r\n\ncd"]
    assert list(bdat_frames([b"a\nb"], binary=True)) == [b"BDAT 3 LAST\r\na\nb"]
    with pytest.raises(ValueError):
        list(bdat_frames([b"x"], chunk_size=0))


# ------------------------------------------------------------- round trip
def server_receives(data: bytes) -> ev.Event:
    """Run a server core to DATA, feed *data*, return the content event."""
    conn = ServerConnection(Extensions())
    conn.greet(220, "mx.test ESMTP")
    conn.receive_data(b"HELO client.test\r\nMAIL FROM:<a@example.com>\r\n")
    conn.receive_data(b"RCPT TO:<b@example.com>\r\nDATA\r\n")
    while True:
        event = conn.next_event()
        assert not isinstance(event, ev.ConnectionClosed)
        if isinstance(event, ev.NeedData):
            if data:
                conn.receive_data(data)
                data = b""
                continue
            raise AssertionError("server core wants more data")
        if isinstance(event, ev.MessageReceived | ev.MessageRefused):
            return event
        conn.respond(354 if isinstance(event, ev.Data) else 250, "ok")


def expected_body(*parts: bytes) -> bytes:
    body = normalize_line_endings(b"".join(parts))
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


_BYTES = st.binary(max_size=200) | st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b" ", b"x.y"]), max_size=40
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(_BYTES, max_size=4))
def test_round_trip_through_server_core(parts: list[bytes]) -> None:
    event = server_receives(wire(*parts))
    assert event == ev.MessageReceived(expected_body(*parts))


@settings(max_examples=300, deadline=None)
@given(st.lists(_BYTES, max_size=4))
def test_no_smuggling_sequence_before_the_end(parts: list[bytes]) -> None:
    out = wire(*parts)
    body = out[: -len(DataSender(*parts).end_marker)]
    assert _SMUGGLING.search(out) is None
    assert b"\r\n.\r\n" not in body
    assert not body.startswith(b".\r\n")
    # Only CRLF line endings on the wire.
    assert b"\r" not in out.replace(b"\r\n", b"") and b"\n" not in out.replace(b"\r\n", b"")
