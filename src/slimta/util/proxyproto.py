"""The HAProxy PROXY protocol (v1 text and v2 binary headers) for edges.

A proxy in front of an edge sends, as the very first bytes of each
connection, a header naming the client it accepted the connection from.
Without it every session would appear to come from the proxy, and
validators, DNS blocklists and ``Envelope.client['ip']`` would all see the
proxy's address.

The module has two layers:

* A sans-IO part that turns header bytes into a :class:`ProxyResult`:
  :func:`parse_v1`, :func:`parse_v2` and :func:`v2_header_size`. Any header
  that breaks the specification raises :class:`ProxyProtocolError`.
* The 4.0 mix-ins, :class:`ProxyProtocolV1`, :class:`ProxyProtocolV2` and
  :class:`ProxyProtocol`, placed before an
  :class:`~slimta.edge.EdgeServer` subclass in the bases::

      class MyEdge(ProxyProtocolV1, SmtpEdge):
          pass

  Their ``handle(sock, addr)`` reads exactly the header (never a byte of
  the SMTP session behind it), under :attr:`proxyproto_timeout
  <ProxyProtocolV1.proxyproto_timeout>`, then calls the edge's ``handle``
  with the client's address from the header.

A listener with a mix-in requires the header on every connection and must
only be reachable by the trusted proxy: whoever can connect to it can claim
any source address. The header is never auto-detected, and a connection
without a valid one is closed before anything is sent.

.. versionchanged:: 4.0
   A malformed, missing, incomplete or late header now closes the
   connection; the wrapped ``handle`` is not called (4.0 called it with
   :data:`invalid_pp_source_address`). v2 lengths and ports are read in
   network byte order, as the specification says (4.0 read them
   little-endian). A v1 ``UNKNOWN`` or v2 ``UNSPEC`` header gives the
   connection's real peer address to ``handle`` instead of ``(None, None)``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol, cast

import gevent

from slimta.logging import getSocketLogger

__all__ = [
    "LocalConnection",
    "ProxyProtocol",
    "ProxyProtocolError",
    "ProxyProtocolV1",
    "ProxyProtocolV2",
    "ProxyResult",
    "invalid_pp_dest_address",
    "invalid_pp_source_address",
    "parse_v1",
    "parse_v2",
    "unknown_pp_dest_address",
    "unknown_pp_source_address",
    "v2_header_size",
]

log = getSocketLogger(__name__)

#: An ``(ip, port)`` pair; ``(None, None)`` when the header gives none. For a
#: v2 ``AF_UNIX`` header it is ``(path, None)``.
Address = tuple[str | None, int | None]

#: The source address of a v1 ``UNKNOWN`` (or v2 ``UNSPEC``/``LOCAL``) header.
unknown_pp_source_address: tuple[None, None] = (None, None)

#: The destination address of a v1 ``UNKNOWN`` (or v2 ``UNSPEC``/``LOCAL``)
#: header.
unknown_pp_dest_address: tuple[None, None] = (None, None)

#: The source address 4.0 passed on for a header it could not read. Kept for
#: compatibility; the mix-ins now close such connections instead.
invalid_pp_source_address: tuple[None, None] = (None, None)

#: The destination address 4.0 used for a header it could not read. Kept
#: for compatibility.
invalid_pp_dest_address: tuple[None, None] = (None, None)

#: Longest v1 header, CRLF included (spec section 2.1).
_V1_MAX_LENGTH = 107
_V1_PREFIX = b"PROXY "
#: Decimal port without sign or leading zero (spec 2.1: no leading zeros).
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
#: Characters an IPv4 or IPv6 address may use; excludes zone ids (``%eth0``).
_V1_ADDRESS = re.compile(rb"[0-9A-Fa-f:.]+")

#: The 12 bytes every v2 header starts with (spec section 2.2).
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version/command, family/transport and the 16-bit length.
_V2_FIXED_LENGTH = 16
_V2_VERSION = 0x2
_V2_LOCAL = 0x0
_V2_PROXY = 0x1
#: The family/transport byte: UNSPEC, and TCP over IPv4, IPv6 and UNIX.
_V2_UNSPEC = 0x00
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_UNIX_STREAM = 0x31
#: Address block length by family/transport byte (spec 2.2).
_V2_ADDRESS_LENGTHS = {_V2_TCP4: 12, _V2_TCP6: 36, _V2_UNIX_STREAM: 216}
_V2_FAMILY_NAMES = {_V2_TCP4: "TCP over IPv4", _V2_TCP6: "TCP over IPv6", _V2_UNIX_STREAM: "UNIX"}
#: Bytes a TLV uses before its value: type, then a 16-bit length.
_TLV_HEAD_LENGTH = 3
#: Most unread input discarded before closing a rejected connection.
_DRAIN_LIMIT = 65536


class ProxyProtocolError(ValueError):
    """A PROXY protocol header is malformed, incomplete or missing.

    Its message says what was wrong, for the log.
    """


class LocalConnection(Exception):
    """Raised by :meth:`ProxyProtocolV2.process_pp_v2` for a v2 ``LOCAL`` header.

    The proxy opened the connection itself (typically a health check); it
    carries no client.
    """


@dataclass(frozen=True, slots=True)
class ProxyResult:
    """What a PROXY header says about the connection."""

    #: The client's ``(ip, port)``; ``(None, None)`` for v1 ``UNKNOWN``, v2
    #: ``UNSPEC`` and ``LOCAL``; ``(path, None)`` for v2 ``AF_UNIX``.
    source: Address
    #: The address the client connected to, in the same form.
    destination: Address
    #: True for a v2 ``LOCAL`` header: the proxy's own connection (a health
    #: check), to be served with its real endpoints or closed.
    local: bool = False


_UNKNOWN = ProxyResult(unknown_pp_source_address, unknown_pp_dest_address)
_LOCAL = ProxyResult(unknown_pp_source_address, unknown_pp_dest_address, local=True)


# --------------------------------------------------------------------- v1


def parse_v1(line: bytes) -> ProxyResult:
    """Parse a complete v1 (text) header.

    The accepted forms are ``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n``
    and ``TCP6`` alike, with exactly one space between fields, addresses of
    the named family and decimal ports 0-65535 without leading zeros; and
    ``PROXY UNKNOWN``, optionally followed by a space and anything up to the
    CRLF.

    :param line: the header, CRLF included, at most 107 bytes.
    :returns: the addresses; ``(None, None)`` for both with ``UNKNOWN``.
    :raises ProxyProtocolError: the line is not such a header.
    """
    if len(line) > _V1_MAX_LENGTH:
        raise ProxyProtocolError(f"v1 header is {len(line)} bytes, over {_V1_MAX_LENGTH}")
    if not line.startswith(_V1_PREFIX):
        raise ProxyProtocolError("v1 header does not start with 'PROXY '")
    if not line.endswith(b"\r\n"):
        raise ProxyProtocolError("v1 header does not end with CRLF")
    body = line[len(_V1_PREFIX) : -2]
    if body.find(b"\r") != -1 or body.find(b"\n") != -1:
        raise ProxyProtocolError("v1 header contains a bare CR or LF")
    protocol, space, rest = body.partition(b" ")
    if protocol == b"UNKNOWN":
        # Spec 2.1: with UNKNOWN the rest of the line is to be ignored.
        return _UNKNOWN
    if protocol == b"TCP4":
        version = 4
    elif protocol == b"TCP6":
        version = 6
    else:
        raise ProxyProtocolError(f"v1 header has unknown protocol {protocol!r}")
    fields = rest.split(b" ")
    if not space or len(fields) != 4 or b"" in fields:
        raise ProxyProtocolError(
            "v1 header is not 'PROXY TCPn <src> <dst> <sport> <dport>' with single spaces"
        )
    src_ip, dst_ip, src_port, dst_port = fields
    return ProxyResult(
        (_v1_ip(src_ip, version, "source"), _v1_port(src_port, "source")),
        (_v1_ip(dst_ip, version, "destination"), _v1_port(dst_port, "destination")),
    )


def _v1_ip(text: bytes, version: int, which: str) -> str:
    """The normalised IP address in *text*, which must be of IP *version*."""
    if _V1_ADDRESS.fullmatch(text) is None:
        raise ProxyProtocolError(f"v1 header has an invalid {which} address {text!r}")
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        raise ProxyProtocolError(f"v1 header has an invalid {which} address {text!r}") from None
    if address.version != version:
        raise ProxyProtocolError(
            f"v1 header has an IPv{address.version} {which} address in a TCP{version} header"
        )
    return str(address)


def _v1_port(text: bytes, which: str) -> int:
    """The port number in *text*: decimal, no sign or leading zero, 0-65535."""
    if _V1_PORT.fullmatch(text) is None or int(text) > 65535:
        raise ProxyProtocolError(f"v1 header has an invalid {which} port {text!r}")
    return int(text)


# --------------------------------------------------------------------- v2


def v2_header_size(data: bytes) -> int:
    """How many bytes the v2 header that *data* starts with takes in all.

    Checks the fixed part first, so that a reader can give up before
    waiting for the rest.

    :param data: at least the first 16 bytes of the header.
    :returns: 16 plus the header's length field (read big-endian).
    :raises ProxyProtocolError: fewer than 16 bytes, a wrong signature, a
        version other than 2 or a command other than ``LOCAL``/``PROXY``.
    """
    if len(data) < _V2_FIXED_LENGTH:
        raise ProxyProtocolError(f"v2 header needs {_V2_FIXED_LENGTH} bytes, got {len(data)}")
    if data[: len(_V2_SIGNATURE)] != _V2_SIGNATURE:
        raise ProxyProtocolError("v2 header has an invalid signature")
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != _V2_VERSION:
        raise ProxyProtocolError(f"v2 header has version {version}, not 2")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"v2 header has unknown command {command:#x}")
    # Spec 2.2: the length is in network byte order (4.0 read it little-endian).
    (length,) = struct.unpack_from("!H", data, 14)
    return _V2_FIXED_LENGTH + int(length)


def parse_v2(header: bytes) -> ProxyResult:
    """Parse a complete v2 (binary) header.

    ``PROXY`` headers must be ``UNSPEC`` (family/transport byte 0) or a
    stream over ``AF_INET``, ``AF_INET6`` or ``AF_UNIX``, with an address
    block at least as long as the family needs; any TLVs after it must fit
    the header exactly (their contents are skipped). ``LOCAL`` headers are
    accepted whatever their address block holds, which the specification
    says to ignore.

    :param header: exactly the header: 16 bytes plus its length field.
    :returns: the addresses; ``local`` is true for ``LOCAL``.
    :raises ProxyProtocolError: *header* is not exactly such a header.
    """
    size = v2_header_size(header)
    if len(header) < size:
        raise ProxyProtocolError(f"v2 header is truncated: {len(header)} of {size} bytes")
    if len(header) > size:
        raise ProxyProtocolError(f"v2 header is {size} bytes, got {len(header) - size} more")
    if header[12] & 0x0F == _V2_LOCAL:
        return _LOCAL
    family = header[13]
    block = header[_V2_FIXED_LENGTH:]
    if family == _V2_UNSPEC:
        # An unknown protocol: its address block has no known layout.
        return _UNKNOWN
    needed = _V2_ADDRESS_LENGTHS.get(family)
    if needed is None:
        raise ProxyProtocolError(f"v2 header has unsupported family/transport {family:#04x}")
    if len(block) < needed:
        raise ProxyProtocolError(
            f"v2 address block is {len(block)} bytes, {_V2_FAMILY_NAMES[family]} needs {needed}"
        )
    _check_tlvs(block[needed:])
    if family == _V2_UNIX_STREAM:
        src_path, dst_path = struct.unpack_from("!108s108s", block)
        return ProxyResult(_unix_address(src_path), _unix_address(dst_path))
    ip_type: type[ipaddress.IPv4Address | ipaddress.IPv6Address]
    if family == _V2_TCP4:
        layout, ip_type = "!4s4sHH", ipaddress.IPv4Address
    else:
        layout, ip_type = "!16s16sHH", ipaddress.IPv6Address
    src_ip, dst_ip, src_port, dst_port = struct.unpack_from(layout, block)
    return ProxyResult(
        (str(ip_type(src_ip)), int(src_port)),
        (str(ip_type(dst_ip)), int(dst_port)),
    )


def _check_tlvs(data: bytes) -> None:
    """Check that *data* is a sequence of whole TLVs (spec 2.2.7)."""
    position = 0
    while position < len(data):
        if len(data) - position < _TLV_HEAD_LENGTH:
            raise ProxyProtocolError("v2 header ends inside a TLV's type and length")
        (length,) = struct.unpack_from("!H", data, position + 1)
        end = position + _TLV_HEAD_LENGTH + int(length)
        if end > len(data):
            raise ProxyProtocolError(f"v2 TLV of type {data[position]:#04x} overruns the header")
        position = end


def _unix_address(field: bytes) -> Address:
    """``(path, None)`` from a NUL-padded 108-byte path; ``(None, None)`` if empty."""
    path = field.split(b"\x00", 1)[0]
    if not path:
        return unknown_pp_source_address
    # Paths are bytes; surrogateescape keeps every one of them round-trippable.
    return (path.decode("utf-8", "surrogateescape"), None)


# ---------------------------------------------------------------- reading


class _Socket(Protocol):
    """What the readers need of a connection's socket."""

    def recv(self, bufsize: int, flags: int = ..., /) -> bytes: ...

    def setblocking(self, flag: bool, /) -> None: ...

    def close(self) -> None: ...


class _Handler(Protocol):
    """The wrapped edge: anything with ``handle(socket, address)``."""

    def handle(self, socket: Any, address: Any) -> None: ...


def _recv_exactly(sock: _Socket, count: int) -> bytes:
    """Read exactly *count* bytes, looping on short reads."""
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ProxyProtocolError("connection closed inside the PROXY header")
        data += chunk
    return bytes(data)


def _check_prefix(data: bytes | bytearray, prefix: bytes, name: str) -> None:
    """Fail as soon as *data* can no longer start with *prefix*."""
    size = min(len(data), len(prefix))
    if data[:size] != prefix[:size]:
        raise ProxyProtocolError(f"connection does not start with a PROXY {name} header")


def _read_v1(sock: _Socket, initial: bytes) -> bytes:
    """Read a v1 header line, CRLF included, without reading past it.

    Peeks to find the line's end, then takes only the line's bytes from the
    socket. Bytes peeked without an LF all belong to the line, so they are
    consumed at once and the next peek waits for new data.
    """
    line = bytearray(initial)
    _check_prefix(line, _V1_PREFIX, "v1")
    while True:
        end = line.find(b"\n")
        if end >= 0:
            if end + 1 != len(line):
                raise ProxyProtocolError("bytes after the v1 header were already read")
            return bytes(line)
        if len(line) >= _V1_MAX_LENGTH:
            raise ProxyProtocolError(f"no CRLF within the first {_V1_MAX_LENGTH} bytes")
        peeked = sock.recv(_V1_MAX_LENGTH - len(line), socket.MSG_PEEK)
        if not peeked:
            raise ProxyProtocolError("connection closed inside the PROXY header")
        newline = peeked.find(b"\n")
        wanted = newline + 1 if newline >= 0 else len(peeked)
        _check_prefix(line + peeked[:wanted], _V1_PREFIX, "v1")
        line += _recv_exactly(sock, wanted)


def _read_v2(sock: _Socket, initial: bytes) -> bytes:
    """Read a v2 header: its 16 fixed bytes, then exactly its length more."""
    header = bytearray(initial)
    _check_prefix(header, _V2_SIGNATURE, "v2")
    while len(header) < _V2_FIXED_LENGTH:
        chunk = sock.recv(_V2_FIXED_LENGTH - len(header))
        if not chunk:
            raise ProxyProtocolError("connection closed inside the PROXY header")
        header += chunk
        _check_prefix(header, _V2_SIGNATURE, "v2")
    size = v2_header_size(bytes(header))
    if len(header) > size:
        raise ProxyProtocolError("bytes after the v2 header were already read")
    header += _recv_exactly(sock, size - len(header))
    return bytes(header)


def _read_v1_result(sock: _Socket, initial: bytes) -> ProxyResult:
    line = _read_v1(sock, initial)
    log.recv(sock, line)
    return parse_v1(line)


def _read_v2_result(sock: _Socket, initial: bytes) -> ProxyResult:
    header = _read_v2(sock, initial)
    log.recv(sock, header)
    return parse_v2(header)


def _read_any_result(sock: _Socket) -> ProxyResult:
    """Peek at the first bytes and read a v1 or v2 header accordingly."""
    peeked = sock.recv(8, socket.MSG_PEEK)
    if not peeked:
        raise ProxyProtocolError("connection closed before a PROXY header")
    # The two versions already differ in their first byte ('P' or CR).
    if peeked[:1] == _V1_PREFIX[:1]:
        return _read_v1_result(sock, b"")
    if peeked[:1] == _V2_SIGNATURE[:1]:
        return _read_v2_result(sock, b"")
    raise ProxyProtocolError("connection does not start with a PROXY header")


def _close(sock: _Socket) -> None:
    """Close a rejected connection with an orderly FIN.

    Closing with unread input makes the kernel send RST, and a client could
    then miss the close; so the input that has already arrived is discarded
    first, without waiting for more.
    """
    log.close(sock)
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        drained = 0
        while drained < _DRAIN_LIMIT:
            chunk = sock.recv(_DRAIN_LIMIT - drained)
            if not chunk:
                break
            drained += len(chunk)
    with contextlib.suppress(OSError):
        sock.close()


# ---------------------------------------------------------------- mix-ins


class _ProxyProtocolBase:
    """Shared by the mix-ins: the timed read and the hand-off."""

    #: Seconds allowed for the whole header, from the start of ``handle``;
    #: ``None`` waits forever. Postfix uses 5 s; the spec asks for >= 3 s.
    proxyproto_timeout: float | None = 5.0

    def _read_proxy_header(self, sock: Any) -> ProxyResult:
        """Read and parse this mix-in's header from *sock*."""
        raise NotImplementedError()

    def handle(self, sock: Any, addr: Any) -> None:
        """Read the PROXY header, then serve the connection as its client's.

        Calls the edge's ``handle(sock, source)`` with the header's source
        address, or with *addr* for a v1 ``UNKNOWN`` or v2 ``UNSPEC``
        header. A v2 ``LOCAL`` header (a health check) is logged and the
        connection closed. A malformed, missing or incomplete header, one not
        complete within :attr:`proxyproto_timeout`, or a socket error, is
        logged (``ppinvalid``) and the connection closed without a byte
        sent; the edge's ``handle`` is not called.

        :param sock: the accepted connection.
        :param addr: the connection's peer, normally the proxy.

        .. versionchanged:: 4.0
           Invalid headers close the connection instead of calling the edge
           with :data:`invalid_pp_source_address`.
        """
        result = self._read_header_in_time(sock)
        if result is None:
            return
        if result.local:
            log.proxyproto_local(sock)
            _close(sock)
            return
        source = result.source if result.source[0] is not None else addr
        log.proxyproto_success(sock, source)
        # The wrapped edge owns the socket from here (it may keep it open).
        cast(_Handler, super()).handle(sock, source)

    def _read_header_in_time(self, sock: Any) -> ProxyResult | None:
        """The header read within the timeout, or ``None`` once rejected and closed."""
        seconds = self.proxyproto_timeout
        timeout = gevent.Timeout(seconds)
        timeout.start()
        try:
            return self._read_proxy_header(sock)
        except (ProxyProtocolError, OSError) as exc:
            log.proxyproto_invalid(sock, exc)
            _close(sock)
            return None
        except gevent.Timeout as exc:
            _close(sock)
            if exc is not timeout:
                raise
            late = ProxyProtocolError(f"no complete PROXY header within {seconds} seconds")
            log.proxyproto_invalid(sock, late)
            return None
        except BaseException:
            _close(sock)
            raise
        finally:
            timeout.cancel()


class ProxyProtocolV1(_ProxyProtocolBase):
    """Mix-in: every connection starts with a v1 (text) PROXY header.

    Put it before the edge class: ``class MyEdge(ProxyProtocolV1,
    SmtpEdge)``. See :meth:`handle`.
    """

    @classmethod
    def parse_pp_line(cls, line: bytes) -> tuple[Address, Address]:
        """Parse a v1 header line.

        :param line: the header, ending in CRLF.
        :returns: ``(source, destination)``, each ``(ip, port)``; both
            :data:`unknown_pp_source_address` for ``UNKNOWN``.
        :raises ProxyProtocolError: see :func:`parse_v1`.

        .. versionchanged:: 4.0
           Raises :class:`ProxyProtocolError` (a :class:`ValueError`) rather
           than :class:`AssertionError`, and is strict about spacing, leading
           zeros and line endings.
        """
        result = parse_v1(line)
        return result.source, result.destination

    @classmethod
    def process_pp_v1(cls, sock: Any, initial: bytes) -> tuple[Address, Address]:
        """Read a v1 header from *sock* and parse it.

        Reads nothing past the header's CRLF. Has no timeout of its own.

        :param sock: the connection.
        :param initial: bytes of the header already read from *sock*.
        :returns: as :meth:`parse_pp_line`.
        :raises ProxyProtocolError: invalid header, or end of input first.
        :raises OSError: from the socket.
        """
        result = _read_v1_result(sock, initial)
        return result.source, result.destination

    def _read_proxy_header(self, sock: Any) -> ProxyResult:
        return _read_v1_result(sock, b"")


class ProxyProtocolV2(_ProxyProtocolBase):
    """Mix-in: every connection starts with a v2 (binary) PROXY header.

    Put it before the edge class: ``class MyEdge(ProxyProtocolV2,
    SmtpEdge)``. See :meth:`handle`.
    """

    @classmethod
    def process_pp_v2(cls, sock: Any, initial: bytes) -> tuple[Address, Address]:
        """Read a v2 header from *sock* and parse it.

        Reads the 16 fixed bytes, then exactly the length they give. Has no
        timeout of its own.

        :param sock: the connection.
        :param initial: bytes of the header already read from *sock*.
        :returns: ``(source, destination)``; ``(path, None)`` each for
            ``AF_UNIX``, :data:`unknown_pp_source_address` for ``UNSPEC``.
        :raises LocalConnection: the header's command is ``LOCAL``.
        :raises ProxyProtocolError: invalid header, or end of input first.
        :raises OSError: from the socket.

        .. versionchanged:: 4.0
           The length and ports are read in network byte order.
        """
        result = _read_v2_result(sock, initial)
        if result.local:
            raise LocalConnection()
        return result.source, result.destination

    def _read_proxy_header(self, sock: Any) -> ProxyResult:
        return _read_v2_result(sock, b"")


class ProxyProtocol(ProxyProtocolV1, ProxyProtocolV2):
    """Mix-in: every connection starts with a v1 or a v2 PROXY header.

    Peeks at the first bytes (up to 8) to tell the versions apart, then
    reads as :class:`ProxyProtocolV1` or :class:`ProxyProtocolV2` would.
    Put it before the edge class: ``class MyEdge(ProxyProtocol, SmtpEdge)``.
    """

    def _read_proxy_header(self, sock: Any) -> ProxyResult:
        return _read_any_result(sock)
