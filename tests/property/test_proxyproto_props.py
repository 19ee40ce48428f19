"""Properties of the PROXY protocol parsers and readers (hypothesis).

* any input gives a result or :class:`ProxyProtocolError`, never another
  exception;
* headers built by an independent encoder parse back to what was encoded;
* the readers give the same result however the input arrives, and leave
  every byte after the header unread.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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

SLOW = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SIGNATURE = bytes.fromhex("0d0a0d0a000d0a515549540a")

# ----------------------------------------------------------------- encoder


def encode_v1(source: tuple[object, int], destination: tuple[object, int]) -> bytes:
    """``PROXY TCP4|TCP6 ...`` for two ipaddress objects of one version."""
    src_ip, src_port = source
    dst_ip, dst_port = destination
    proto = "TCP4" if isinstance(src_ip, ipaddress.IPv4Address) else "TCP6"
    return f"PROXY {proto} {src_ip} {dst_ip} {src_port} {dst_port}\r\n".encode("ascii")


def encode_tlvs(tlvs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes([kind]) + struct.pack(">H", len(value)) + value for kind, value in tlvs)


def encode_v2(command: int, family: int, block: bytes, tlvs: list[tuple[int, bytes]]) -> bytes:
    """A v2 header: signature, version 2, command, family, length, payload."""
    payload = block + encode_tlvs(tlvs)
    return SIGNATURE + bytes([0x20 | command, family]) + struct.pack(">H", len(payload)) + payload


def inet_block(source: tuple[object, int], destination: tuple[object, int]) -> bytes:
    src_ip, src_port = source
    dst_ip, dst_port = destination
    assert isinstance(src_ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    assert isinstance(dst_ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    return src_ip.packed + dst_ip.packed + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")


# -------------------------------------------------------------- strategies

ports = st.integers(0, 65535)
v4_pairs = st.tuples(st.tuples(st.ip_addresses(v=4), ports), st.tuples(st.ip_addresses(v=4), ports))
v6_pairs = st.tuples(st.tuples(st.ip_addresses(v=6), ports), st.tuples(st.ip_addresses(v=6), ports))
tlv_lists = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=40)),
    max_size=4,
)
unix_paths = st.binary(min_size=1, max_size=108).filter(lambda p: b"\x00" not in p)

#: Text made of the v1 grammar's pieces, to reach deep into the parser.
v1_tokens = st.lists(
    st.sampled_from(
        [
            "PROXY",
            " ",
            "  ",
            "TCP4",
            "TCP6",
            "UNKNOWN",
            "192.0.2.1",
            "2001:db8::1",
            "::",
            "0",
            "00",
            "25",
            "65535",
            "65536",
            "-1",
            "\r",
            "\n",
            "\r\n",
            ".",
            ":",
            "%",
            "\t",
            "é",
        ]
    ),
    max_size=14,
).map(lambda parts: "".join(parts).encode("utf-8"))


class ChunkedStream:
    """In-memory stream handing out the input in the given chunk sizes."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data = data
        self.sizes = sizes or [1]
        self.turn = 0
        self.consumed = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        limit = self.sizes[self.turn % len(self.sizes)]
        out = self.data[self.consumed : self.consumed + min(limit, bufsize)]
        if not flags & socket.MSG_PEEK:
            self.consumed += len(out)
            self.turn += 1
        return out


def parse_or_error(parser, data: bytes) -> ProxyResult | None:
    try:
        result = parser(data)
    except ProxyProtocolError:
        return None
    assert isinstance(result, ProxyResult)
    return result


# -------------------------------------------------------------- robustness


@SLOW
@given(st.binary(max_size=200))
def test_parse_v1_raises_only_proxy_errors(data):
    parse_or_error(parse_v1, data)
    parse_or_error(parse_v1, b"PROXY " + data)
    parse_or_error(parse_v1, b"PROXY " + data + b"\r\n")


@SLOW
@given(v1_tokens)
def test_parse_v1_token_soup(data):
    result = parse_or_error(parse_v1, data)
    if result is not None:
        assert data.startswith(b"PROXY ") and data.endswith(b"\r\n")
        assert data.count(b"\r") == 1 and data.count(b"\n") == 1
        assert len(data) <= 107
        if data.startswith(b"PROXY UNKNOWN"):
            assert result.source == result.destination == (None, None)


@SLOW
@given(st.binary(max_size=300))
def test_parse_v2_raises_only_proxy_errors(data):
    parse_or_error(parse_v2, data)
    parse_or_error(parse_v2, SIGNATURE + data)
    if len(data) >= 2:
        # A consistent length field, so that the body is examined too.
        body = data[2:]
        parse_or_error(parse_v2, SIGNATURE + data[:2] + struct.pack(">H", len(body)) + body)


@SLOW
@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300))
def test_parse_v2_any_command_and_family(ver_cmd, family, body):
    header = SIGNATURE + bytes([ver_cmd, family]) + struct.pack(">H", len(body)) + body
    result = parse_or_error(parse_v2, header)
    if result is not None:
        assert ver_cmd in (0x20, 0x21)
        assert result.local == (ver_cmd == 0x20)


@SLOW
@given(st.binary(max_size=40))
def test_v2_header_size_raises_only_proxy_errors(data):
    try:
        size = v2_header_size(SIGNATURE + data)
    except ProxyProtocolError:
        return
    assert 16 <= size <= 16 + 0xFFFF


# -------------------------------------------------------------- round trips


@SLOW
@given(st.one_of(v4_pairs, v6_pairs))
def test_v1_round_trip(pair):
    source, destination = pair
    line = encode_v1(source, destination)
    assert len(line) <= 107
    result = parse_v1(line)
    assert result == ProxyResult((str(source[0]), source[1]), (str(destination[0]), destination[1]))
    assert ProxyProtocolV1.parse_pp_line(line) == (result.source, result.destination)


@SLOW
@given(st.one_of(v4_pairs, v6_pairs), tlv_lists)
def test_v2_inet_round_trip(pair, tlvs):
    source, destination = pair
    family = 0x11 if isinstance(source[0], ipaddress.IPv4Address) else 0x21
    header = encode_v2(0x1, family, inet_block(source, destination), tlvs)
    assert v2_header_size(header) == len(header)
    result = parse_v2(header)
    assert result == ProxyResult((str(source[0]), source[1]), (str(destination[0]), destination[1]))


@SLOW
@given(unix_paths, unix_paths, tlv_lists)
def test_v2_unix_round_trip(src, dst, tlvs):
    block = src.ljust(108, b"\x00") + dst.ljust(108, b"\x00")
    result = parse_v2(encode_v2(0x1, 0x31, block, tlvs))
    assert result.source[0] is not None and result.destination[0] is not None
    assert result.source[0].encode("utf-8", "surrogateescape") == src
    assert result.destination[0].encode("utf-8", "surrogateescape") == dst


@SLOW
@given(st.integers(0, 255), st.binary(max_size=100), tlv_lists)
def test_v2_local_round_trip(family, block, tlvs):
    result = parse_v2(encode_v2(0x0, family, block, tlvs))
    assert result == ProxyResult((None, None), (None, None), local=True)


@SLOW
@given(v4_pairs, tlv_lists, st.integers(1, 3))
def test_v2_truncated_or_extended_is_rejected(pair, tlvs, cut):
    header = encode_v2(0x1, 0x11, inet_block(*pair), tlvs)
    for bad in (header[:-cut], header + b"\x00" * cut):
        assert parse_or_error(parse_v2, bad) is None


# ------------------------------------------------------- readers and splits


@SLOW
@given(
    st.one_of(v4_pairs, v6_pairs),
    st.lists(st.integers(1, 60), max_size=8),
    st.binary(max_size=50),
)
def test_v1_reader_independent_of_splits(pair, sizes, rest):
    line = encode_v1(*pair)
    stream = ChunkedStream(line + rest, sizes)
    assert ProxyProtocolV1.process_pp_v1(stream, b"") == ProxyProtocolV1.parse_pp_line(line)
    assert stream.data[stream.consumed :] == rest


@SLOW
@given(
    st.one_of(v4_pairs, v6_pairs),
    tlv_lists,
    st.lists(st.integers(1, 60), max_size=8),
    st.binary(max_size=50),
)
def test_v2_reader_independent_of_splits(pair, tlvs, sizes, rest):
    source, _ = pair
    family = 0x11 if isinstance(source[0], ipaddress.IPv4Address) else 0x21
    header = encode_v2(0x1, family, inet_block(*pair), tlvs)
    stream = ChunkedStream(header + rest, sizes)
    expected = parse_v2(header)
    assert ProxyProtocolV2.process_pp_v2(stream, b"") == (expected.source, expected.destination)
    assert stream.data[stream.consumed :] == rest


@SLOW
@given(st.binary(max_size=300), st.lists(st.integers(1, 60), max_size=8))
def test_readers_on_arbitrary_input(data, sizes):
    """Any input: a result or ProxyProtocolError; v1 never consumes over 107 bytes."""
    for reader, limit in (
        (ProxyProtocolV1.process_pp_v1, 107),
        (ProxyProtocolV2.process_pp_v2, 16 + 0xFFFF),
    ):
        stream = ChunkedStream(data, sizes)
        with contextlib.suppress(ProxyProtocolError, LocalConnection):
            reader(stream, b"")
        assert stream.consumed <= limit
