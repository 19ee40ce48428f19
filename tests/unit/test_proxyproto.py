"""The PROXY protocol parsers and header readers, bytes in and results out.

The readers are driven by :class:`FakeStream`, an in-memory byte stream that
hands out at most ``chunk`` bytes per call (like data arriving in pieces)
and honours ``MSG_PEEK``; no sockets, no gevent.
"""

from __future__ import annotations

import socket
import struct

import pytest

from slimta.util import proxyproto
from slimta.util.proxyproto import (
    LocalConnection,
    ProxyProtocolError,
    ProxyProtocolV1,
    ProxyProtocolV2,
    ProxyResult,
    parse_v1,
    parse_v2,
    v2_header_size,
)

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
UNKNOWN = (None, None)
SMTP = b"EHLO client.test\r\nMAIL FROM:<a@example.test>\r\n"


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header with the given second-half bytes and body."""
    size = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", size) + body


def ipv4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET, src)
        + socket.inet_pton(socket.AF_INET, dst)
        + struct.pack("!HH", sport, dport)
    )


def ipv6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + struct.pack("!HH", sport, dport)
    )


def unix_block(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\x00") + dst.ljust(108, b"\x00")


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


class FakeStream:
    """An in-memory stream: ``recv(n, flags)`` returns at most *chunk* bytes."""

    def __init__(self, data: bytes, chunk: int | None = None) -> None:
        self.data = data
        self.chunk = chunk
        self.consumed = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        available = self.data[self.consumed :]
        if self.chunk is not None:
            available = available[: self.chunk]
        out = available[:bufsize]
        if not flags & socket.MSG_PEEK:
            self.consumed += len(out)
        return out

    @property
    def rest(self) -> bytes:
        return self.data[self.consumed :]


# ------------------------------------------------------------- v1 valid


@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
            ("192.0.2.1", 56324),
            ("198.51.100.2", 25),
        ),
        (
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
            ("0.0.0.0", 0),
            ("255.255.255.255", 65535),
        ),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8::25 40000 587\r\n",
            ("2001:db8::1", 40000),
            ("2001:db8::25", 587),
        ),
        # Addresses are normalised.
        (
            b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::FFFF:192.0.2.1 1 2\r\n",
            ("2001:db8::1", 1),
            ("::ffff:c000:201", 2),
        ),
        (b"PROXY UNKNOWN\r\n", UNKNOWN, UNKNOWN),
        # Spec 2.1: whatever follows UNKNOWN up to the CRLF is ignored.
        (b"PROXY UNKNOWN ffff:: 1.2.3.4 99999 x\r\n", UNKNOWN, UNKNOWN),
        (b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n", UNKNOWN, UNKNOWN),  # exactly 107 bytes
    ],
)
def test_parse_v1_valid(line, source, destination):
    result = parse_v1(line)
    assert result == ProxyResult(source, destination)
    assert not result.local
    assert ProxyProtocolV1.parse_pp_line(line) == (source, destination)


def test_parse_v1_longest_tcp6_line():
    full = ":".join(["ffff"] * 8)
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) <= 107
    assert parse_v1(line).source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)


# ----------------------------------------------------------- v1 invalid

GOOD4 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"PROXY",
        b"PROXY \r\n",
        b"PROXY\r\n",
        b"proxy TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
        b"PROXY tcp4 192.0.2.1 198.51.100.2 56324 25\r\n",
        b"PROXY TCP5 192.0.2.1 198.51.100.2 56324 25\r\n",
        b"PROXY UDP4 192.0.2.1 198.51.100.2 56324 25\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY UNKNOWN\n",
        # Line endings: LF only, CR only, no ending, extra CR or LF inside.
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\n\r\n",
        b"PROXY TCP4 192.0.2.1\r198.51.100.2 56324 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n\r\n",
        b"PROXY UNKNOWN \r\r\n",
        # Spacing: doubled, leading, trailing, tabs.
        b"PROXY  TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
        b"PROXY TCP4  192.0.2.1 198.51.100.2 56324 25\r\n",
        b"PROXY TCP4 192.0.2.1  198.51.100.2 56324 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324  25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25 \r\n",
        b" PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
        b"PROXY\tTCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
        b"PROXY TCP4 192.0.2.1\t198.51.100.2 56324 25\r\n",
        # Field count.
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25 25\r\n",
        b"PROXY TCP4\r\n",
        # Ports: leading zeros, signs, range, not decimal.
        b"PROXY TCP4 192.0.2.1 198.51.100.2 056324 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 025\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 00 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 +25 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 99999 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 100000 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 0x19 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1_000 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 \xd9\xa1 25\r\n",
        # Addresses: leading zeros, wrong family, names, zones, junk.
        b"PROXY TCP4 192.0.2.01 198.51.100.2 56324 25\r\n",
        b"PROXY TCP4 192.000.2.1 198.51.100.2 56324 25\r\n",
        b"PROXY TCP4 192.0.2 198.51.100.2 56324 25\r\n",
        b"PROXY TCP4 192.0.2.256 198.51.100.2 56324 25\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.2 56324 25\r\n",
        b"PROXY TCP4 192.0.2.1 2001:db8::1 56324 25\r\n",
        b"PROXY TCP6 192.0.2.1 2001:db8::1 56324 25\r\n",
        b"PROXY TCP6 2001:db8::1 198.51.100.2 56324 25\r\n",
        b"PROXY TCP6 fe80::1%eth0 2001:db8::1 56324 25\r\n",
        b"PROXY TCP6 2001:db8:::1 2001:db8::1 56324 25\r\n",
        b"PROXY TCP4 localhost 198.51.100.2 56324 25\r\n",
        b"PROXY TCP4 3221225985 198.51.100.2 56324 25\r\n",
        b"PROXY TCP4 \xd9\xa1.0.0.1 198.51.100.2 56324 25\r\n",
        # Too long: 108 bytes.
        b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",
    ],
)
def test_parse_v1_invalid(line):
    with pytest.raises(ProxyProtocolError):
        parse_v1(line)
    with pytest.raises(ProxyProtocolError):
        ProxyProtocolV1.parse_pp_line(line)


def test_parse_v1_error_messages_say_what_is_wrong():
    with pytest.raises(ProxyProtocolError, match="CRLF"):
        parse_v1(GOOD4[:-2] + b"\n")
    with pytest.raises(ProxyProtocolError, match="source port"):
        parse_v1(b"PROXY TCP4 192.0.2.1 198.51.100.2 025 25\r\n")
    with pytest.raises(ProxyProtocolError, match="IPv6 destination address in a TCP4"):
        parse_v1(b"PROXY TCP4 192.0.2.1 ::1 1 25\r\n")
    with pytest.raises(ProxyProtocolError, match="over 107"):
        parse_v1(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n")


def test_error_is_a_value_error():
    assert issubclass(ProxyProtocolError, ValueError)


def test_module_constants():
    for name in (
        "unknown_pp_source_address",
        "unknown_pp_dest_address",
        "invalid_pp_source_address",
        "invalid_pp_dest_address",
    ):
        assert getattr(proxyproto, name) == (None, None)
        assert name in proxyproto.__all__
    for name in proxyproto.__all__:
        assert hasattr(proxyproto, name)


def test_result_is_frozen():
    result = parse_v1(GOOD4)
    with pytest.raises(AttributeError):
        result.local = True  # type: ignore[misc]


# ------------------------------------------------------------- v2 valid


def test_v2_ipv4_ports_are_big_endian():
    # 25 is 0x0019 on the wire; little-endian decoding would give 6400.
    header = v2(0x21, 0x11, ipv4_block("192.0.2.1", "198.51.100.2", 56324, 25))
    assert header[-2:] == b"\x00\x19"
    assert parse_v2(header) == ProxyResult(("192.0.2.1", 56324), ("198.51.100.2", 25))
    swapped = header[:-2] + b"\x19\x00"
    assert parse_v2(swapped).destination == ("198.51.100.2", 6400)


def test_v2_length_is_big_endian():
    body = ipv4_block("192.0.2.1", "198.51.100.2", 1, 2)
    header = v2(0x21, 0x11, body)
    assert header[14:16] == b"\x00\x0c"
    assert v2_header_size(header) == 28
    # 0x0c00 read big-endian is 3072: this header is then far too short.
    little = header[:14] + b"\x0c\x00" + body
    assert v2_header_size(little) == 16 + 3072
    with pytest.raises(ProxyProtocolError, match="truncated"):
        parse_v2(little)


def test_v2_ipv6():
    header = v2(0x21, 0x21, ipv6_block("2001:db8::1", "2001:db8::25", 40000, 587))
    assert parse_v2(header) == ProxyResult(("2001:db8::1", 40000), ("2001:db8::25", 587))


def test_v2_unix():
    header = v2(0x21, 0x31, unix_block(b"/run/client.sock", b"/run/mta.sock"))
    assert parse_v2(header) == ProxyResult(("/run/client.sock", None), ("/run/mta.sock", None))


def test_v2_unix_unnamed_and_undecodable_paths():
    header = v2(0x21, 0x31, unix_block(b"", b"/tmp/\xff"))
    result = parse_v2(header)
    assert result.source == UNKNOWN
    assert result.destination == ("/tmp/\udcff", None)


def test_v2_unspec_proxy_ignores_its_block():
    assert parse_v2(v2(0x21, 0x00, b"")) == ProxyResult(UNKNOWN, UNKNOWN)
    assert parse_v2(v2(0x21, 0x00, b"\x01\x02\x03")) == ProxyResult(UNKNOWN, UNKNOWN)


@pytest.mark.parametrize(
    ("fam", "body"),
    [
        (0x00, b""),
        (0x11, ipv4_block("192.0.2.1", "198.51.100.2", 1, 2)),
        (0x21, b"\x00" * 36),
        (0x00, tlv(0x04, b"\x00" * 5)),
        # The spec says to ignore a LOCAL header's family and addresses.
        (0x55, b"anything"),
    ],
)
def test_v2_local(fam, body):
    result = parse_v2(v2(0x20, fam, body))
    assert result == ProxyResult(UNKNOWN, UNKNOWN, local=True)
    assert result.local


@pytest.mark.parametrize(
    "tlvs",
    [
        tlv(0x01, b"smtp"),
        tlv(0x02, b"mx.example.test") + tlv(0x04, b""),
        tlv(0x03, b"\x00\x00\x00\x00") + tlv(0x05, b"id-1") + tlv(0x20, b"\x01" + b"\x00" * 4),
        tlv(0x04, b"\x00" * 300),
        tlv(0xEE, b""),
    ],
)
def test_v2_tlvs_are_skipped(tlvs):
    block = ipv4_block("192.0.2.1", "198.51.100.2", 56324, 25)
    assert parse_v2(v2(0x21, 0x11, block + tlvs)).source == ("192.0.2.1", 56324)
    block6 = ipv6_block("::1", "::2", 3, 4)
    assert parse_v2(v2(0x21, 0x21, block6 + tlvs)).destination == ("::2", 4)


# ----------------------------------------------------------- v2 invalid

IPV4_BODY = ipv4_block("192.0.2.1", "198.51.100.2", 56324, 25)
GOOD_V2 = v2(0x21, 0x11, IPV4_BODY)


@pytest.mark.parametrize("index", range(12))
def test_v2_bad_signature_byte(index):
    header = bytearray(GOOD_V2)
    header[index] ^= 0x40
    with pytest.raises(ProxyProtocolError, match="signature"):
        parse_v2(bytes(header))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"", "16 bytes"),
        (GOOD_V2[:15], "16 bytes"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n", "signature"),
        (v2(0x11, 0x11, IPV4_BODY), "version 1"),
        (v2(0x01, 0x11, IPV4_BODY), "version 0"),
        (v2(0x31, 0x11, IPV4_BODY), "version 3"),
        (v2(0x22, 0x11, IPV4_BODY), "command"),
        (v2(0x2F, 0x11, IPV4_BODY), "command"),
        # Families and transports other than UNSPEC and STREAM over INET/INET6/UNIX.
        (v2(0x21, 0x12, IPV4_BODY), "family/transport"),
        (v2(0x21, 0x10, IPV4_BODY), "family/transport"),
        (v2(0x21, 0x01, IPV4_BODY), "family/transport"),
        (v2(0x21, 0x22, b"\x00" * 36), "family/transport"),
        (v2(0x21, 0x32, b"\x00" * 216), "family/transport"),
        (v2(0x21, 0x41, b"\x00" * 36), "family/transport"),
        # Address blocks too short for the family.
        (v2(0x21, 0x11, IPV4_BODY[:11]), "needs 12"),
        (v2(0x21, 0x11, b""), "needs 12"),
        (v2(0x21, 0x21, b"\x00" * 35), "needs 36"),
        (v2(0x21, 0x21, IPV4_BODY), "needs 36"),
        (v2(0x21, 0x31, b"\x00" * 215), "needs 216"),
        # Length field against the bytes given.
        (v2(0x21, 0x11, IPV4_BODY, length=13), "truncated"),
        (v2(0x21, 0x11, IPV4_BODY, length=11), "more"),
        (GOOD_V2[:-1], "truncated"),
        (GOOD_V2 + b"EHLO", "more"),
        (v2(0x20, 0x00, b"", length=1), "truncated"),
        # Malformed TLVs.
        (v2(0x21, 0x11, IPV4_BODY + b"\x04"), "inside a TLV"),
        (v2(0x21, 0x11, IPV4_BODY + b"\x04\x00"), "inside a TLV"),
        (v2(0x21, 0x11, IPV4_BODY + b"\x04\x00\x01"), "overruns"),
        (v2(0x21, 0x11, IPV4_BODY + tlv(0x04, b"ab")[:-1]), "overruns"),
        (v2(0x21, 0x11, IPV4_BODY + tlv(0x01, b"") + b"\x02\x01\x00"), "overruns"),
        (v2(0x21, 0x21, b"\x00" * 36 + b"\x01\xff\xff" + b"x" * 10), "overruns"),
    ],
)
def test_parse_v2_invalid(header, message):
    with pytest.raises(ProxyProtocolError, match=message):
        parse_v2(header)


def test_v2_header_size():
    assert v2_header_size(GOOD_V2) == len(GOOD_V2)
    assert v2_header_size(GOOD_V2[:16]) == 28
    assert v2_header_size(v2(0x20, 0x00, b"", length=0xFFFF)) == 16 + 0xFFFF
    with pytest.raises(ProxyProtocolError):
        v2_header_size(GOOD_V2[:15])


# ------------------------------------------------------------ v1 reader


@pytest.mark.parametrize("chunk", [None, 1, 2, 5, 44, 45])
def test_process_pp_v1_reads_exactly_the_header(chunk):
    stream = FakeStream(GOOD4 + SMTP, chunk)
    src, dst = ProxyProtocolV1.process_pp_v1(stream, b"")
    assert (src, dst) == (("192.0.2.1", 56324), ("198.51.100.2", 25))
    assert stream.rest == SMTP


def test_process_pp_v1_with_initial_bytes():
    stream = FakeStream(GOOD4[8:] + SMTP, 3)
    src, _ = ProxyProtocolV1.process_pp_v1(stream, GOOD4[:8])
    assert src == ("192.0.2.1", 56324)
    assert stream.rest == SMTP


def test_process_pp_v1_unknown():
    stream = FakeStream(b"PROXY UNKNOWN\r\n" + SMTP)
    assert ProxyProtocolV1.process_pp_v1(stream, b"") == (UNKNOWN, UNKNOWN)
    assert stream.rest == SMTP


@pytest.mark.parametrize("chunk", [None, 1, 10])
def test_process_pp_v1_stops_at_107_bytes(chunk):
    stream = FakeStream(b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n", chunk)
    with pytest.raises(ProxyProtocolError, match="107"):
        ProxyProtocolV1.process_pp_v1(stream, b"")
    assert stream.consumed == 107


def test_process_pp_v1_lf_only_line_is_rejected_at_the_lf():
    stream = FakeStream(GOOD4[:-2] + b"\n" + SMTP)
    with pytest.raises(ProxyProtocolError, match="CRLF"):
        ProxyProtocolV1.process_pp_v1(stream, b"")
    assert stream.rest == SMTP


@pytest.mark.parametrize("data", [b"EHLO client.test\r\n", b"GET / HTTP/1.0\r\n", SIG])
def test_process_pp_v1_rejects_other_protocols_at_once(data):
    stream = FakeStream(data + SMTP)
    with pytest.raises(ProxyProtocolError, match="does not start with a PROXY v1"):
        ProxyProtocolV1.process_pp_v1(stream, b"")
    assert stream.consumed == 0


def test_process_pp_v1_rejects_a_wrong_prefix_without_waiting_for_more():
    # "PROXX" can never become a header: no need to wait for an LF.
    stream = FakeStream(b"PROXX", 1)
    with pytest.raises(ProxyProtocolError, match="does not start"):
        ProxyProtocolV1.process_pp_v1(stream, b"")


@pytest.mark.parametrize("cut", [0, 1, 6, 20, len(GOOD4) - 1])
def test_process_pp_v1_eof(cut):
    stream = FakeStream(GOOD4[:cut], 4)
    with pytest.raises(ProxyProtocolError, match="closed"):
        ProxyProtocolV1.process_pp_v1(stream, b"")


def test_process_pp_v1_initial_past_the_header():
    with pytest.raises(ProxyProtocolError, match="already read"):
        ProxyProtocolV1.process_pp_v1(FakeStream(b""), b"PROXY UNKNOWN\r\nEHLO")


# ------------------------------------------------------------ v2 reader

V2_WITH_TLV = v2(0x21, 0x11, IPV4_BODY + tlv(0x02, b"mx.example.test"))


@pytest.mark.parametrize("chunk", [None, 1, 7, 16, 17])
def test_process_pp_v2_reads_exactly_the_header(chunk):
    stream = FakeStream(V2_WITH_TLV + SMTP, chunk)
    src, dst = ProxyProtocolV2.process_pp_v2(stream, b"")
    assert (src, dst) == (("192.0.2.1", 56324), ("198.51.100.2", 25))
    assert stream.rest == SMTP


def test_process_pp_v2_with_initial_bytes():
    stream = FakeStream(V2_WITH_TLV[8:] + SMTP, 5)
    src, _ = ProxyProtocolV2.process_pp_v2(stream, V2_WITH_TLV[:8])
    assert src == ("192.0.2.1", 56324)
    assert stream.rest == SMTP


def test_process_pp_v2_local_raises_local_connection():
    stream = FakeStream(v2(0x20, 0x00, tlv(0x04, b"pad")) + SMTP)
    with pytest.raises(LocalConnection):
        ProxyProtocolV2.process_pp_v2(stream, b"")
    assert stream.rest == SMTP


def test_process_pp_v2_rejects_other_protocols_at_once():
    stream = FakeStream(b"EHLO x\r\n", 1)
    with pytest.raises(ProxyProtocolError, match="does not start with a PROXY v2"):
        ProxyProtocolV2.process_pp_v2(stream, b"")
    assert stream.consumed == 1


def test_process_pp_v2_checks_the_fixed_part_before_reading_on():
    stream = FakeStream(v2(0x11, 0x11, IPV4_BODY) + SMTP)
    with pytest.raises(ProxyProtocolError, match="version 1"):
        ProxyProtocolV2.process_pp_v2(stream, b"")
    assert stream.consumed == 16


@pytest.mark.parametrize("cut", [0, 5, 15, 16, 27])
def test_process_pp_v2_eof(cut):
    stream = FakeStream(GOOD_V2[:cut], 3)
    with pytest.raises(ProxyProtocolError, match="closed"):
        ProxyProtocolV2.process_pp_v2(stream, b"")


def test_process_pp_v2_initial_past_the_header():
    with pytest.raises(ProxyProtocolError, match="already read"):
        ProxyProtocolV2.process_pp_v2(FakeStream(b""), v2(0x20, 0x00, b"") + b"E")
