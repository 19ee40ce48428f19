"""Buffered line I/O over a gevent socket, shared by SMTP servers and clients.

The framing rules live in the sans-IO cores; this class only moves bytes,
keeps one receive buffer that it can drop at a TLS upgrade, and wraps the
socket in TLS.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from typing import Any

from slimta.logging import getSocketLogger
from slimta.smtp import BadReply
from slimta.smtp._reply import ReplyParser, ReplySyntaxError, format_reply
from slimta.smtp._sockio import recv_or_lost, send_or_lost

__all__ = ["IO"]

log = getSocketLogger(__name__)

_COMMAND = re.compile(rb"([A-Za-z]+)(?:[ \t]+(.*))?\Z", re.DOTALL)
#: Seconds to wait for the peer's TLS close_notify when closing.
_UNWRAP_TIMEOUT = 1.0


class IO:
    """Buffered I/O over a connected socket.

    :param socket: a connected (gevent) socket.
    :param address: the peer address, if known; else ``getpeername()``.
    """

    def __init__(self, socket: Any, address: Any = None) -> None:
        self.socket = socket
        self._address = address
        #: Pending output, written by :meth:`flush_send`.
        self.send_buffer: list[bytes] = []
        #: Received bytes not yet consumed.
        self.recv_buffer = b""
        self._replies = ReplyParser()

    @property
    def address(self) -> Any:
        """The peer address."""
        if self._address is None:
            try:
                self._address = self.socket.getpeername()
            except OSError:
                return None
        return self._address

    @property
    def encrypted(self) -> bool:
        """True when the socket is wrapped in TLS."""
        return isinstance(self.socket, ssl.SSLSocket)

    def close(self) -> None:
        """Close the socket, unwrapping TLS politely when possible."""
        log.close(self.socket)
        sock = self.socket
        if self.encrypted:
            with contextlib.suppress(OSError, ValueError):
                # Send close_notify, but never wait long for the peer's.
                sock.settimeout(_UNWRAP_TIMEOUT)
                sock = sock.unwrap()
        with contextlib.suppress(OSError):
            sock.close()

    # ------------------------------------------------------------------ send
    def raw_send(self, data: bytes) -> None:
        """Send all of *data* now.

        :raises ConnectionLost: when the peer reset or closed the connection.
        """
        send_or_lost(self.socket, data)
        log.send(self.socket, data)

    def buffered_send(self, data: bytes) -> None:
        """Queue *data* for the next :meth:`flush_send`."""
        self.send_buffer.append(data)

    def flush_send(self) -> None:
        """Send everything queued."""
        if self.send_buffer:
            data = b"".join(self.send_buffer)
            self.send_buffer.clear()
            self.raw_send(data)

    def send_reply(self, reply: Any) -> None:
        """Queue a :class:`~slimta.smtp.reply.Reply` (multi-line text allowed)."""
        self.buffered_send(format_reply(int(reply.code), reply.message or "", reply.newline_first))

    def send_command(self, command: bytes) -> None:
        """Queue a command line; CRLF is appended."""
        self.buffered_send(command + b"\r\n")

    # ------------------------------------------------------------------ recv
    def raw_recv(self) -> bytes:
        """Read what the socket has, up to :data:`RECV_SIZE` bytes.

        :raises ConnectionLost: on end of stream or a reset.
        """
        data = recv_or_lost(self.socket)
        log.recv(self.socket, data)
        return data

    def buffered_recv(self) -> None:
        """Read once and append to :attr:`recv_buffer`."""
        self.recv_buffer += self.raw_recv()

    def recv_line(self) -> bytes:
        """Read one CRLF-terminated line, returned without its CRLF."""
        while True:
            end = self.recv_buffer.find(b"\r\n")
            if end >= 0:
                line = self.recv_buffer[:end]
                self.recv_buffer = self.recv_buffer[end + 2 :]
                return line
            self.buffered_recv()

    def recv_command(self) -> tuple[bytes | None, bytes | None]:
        """Read a command line: ``(VERB, argument)``, or ``(None, None)``."""
        match = _COMMAND.match(self.recv_line())
        if match is None:
            return None, None
        arg = match.group(2)
        return match.group(1).upper(), (arg.rstrip() if arg is not None else None)

    def recv_reply(self) -> tuple[str, str]:
        """Read one (possibly multi-line) reply: ``(code, message)``.

        :raises BadReply: when the bytes are not a valid reply.
        """
        parser = self._replies
        while True:
            if self.recv_buffer:
                parser.feed(self.recv_buffer)
                self.recv_buffer = b""
            try:
                reply = parser.next_reply()
            except ReplySyntaxError as exc:
                raise BadReply(exc.data) from None
            if reply is not None:
                self.recv_buffer = parser.take_buffered()
                return str(reply.code), reply.message
            self.buffered_recv()

    # ------------------------------------------------------------------- TLS
    def encrypt_socket_server(self, context: ssl.SSLContext) -> bool:
        """Wrap the socket for the server side; buffered plaintext is dropped.

        :returns: ``False`` (after logging) when the handshake fails.
        """
        self.recv_buffer = b""
        try:
            self.socket = context.wrap_socket(self.socket, server_side=True)
        except (OSError, ValueError) as exc:
            log.error(self.socket, exc, self.address)
            return False
        log.encrypt(self.socket, context)
        return True

    def encrypt_socket_client(self, context: ssl.SSLContext | None = None) -> bool:
        """Wrap the socket for the client side, checking the server name.

        Any reply bytes buffered before the upgrade are dropped (CVE-2021-38371).

        :returns: ``False`` (after logging) when the handshake fails.
        """
        self.recv_buffer = b""
        self._replies.take_buffered()
        if context is None:
            context = ssl.create_default_context()
        address = self.address
        hostname = address[0] if isinstance(address, tuple) else None
        try:
            self.socket = context.wrap_socket(self.socket, server_hostname=hostname)
        except (OSError, ValueError) as exc:
            log.error(self.socket, exc, address)
            return False
        log.encrypt(self.socket, context)
        return True
