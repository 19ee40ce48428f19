"""Buffered line I/O over a gevent socket, shared by SMTP servers and clients.

The framing rules live in the sans-IO cores; this class only moves bytes,
keeps one receive buffer that it can drop at a TLS upgrade, and wraps the
socket in TLS.
"""

from __future__ import annotations

import contextlib
import errno
import re
import ssl
from collections.abc import Callable
from typing import Any

import gevent

from slimta.logging import getSocketLogger
from slimta.smtp import BadReply, ConnectionLost
from slimta.smtp._reply import ReplyParser, ReplySyntaxError, format_reply

__all__ = ["IO"]

log = getSocketLogger(__name__)

#: Bytes asked of the socket per read.
RECV_SIZE = 65536
_COMMAND = re.compile(rb"([A-Za-z]+)(?:[ \t]+(.*))?\Z", re.DOTALL)
#: Seconds to wait for the peer's TLS close_notify when closing.
_UNWRAP_TIMEOUT = 1.0
_RESET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)


class _WaitExpired(Exception):
    """Thrown into a greenlet when the timer bounding its wait fires."""


def _expire(glet: Any) -> None:
    glet.throw(_WaitExpired)


def recv_or_lost(sock: Any) -> bytes:
    """One ``recv`` of up to :data:`RECV_SIZE` bytes from *sock*.

    :raises ConnectionLost: on end of stream or a reset.
    :raises BlockingIOError: from a non-blocking socket with nothing to read.
    """
    try:
        data: bytes = sock.recv(RECV_SIZE)
    except OSError as exc:
        if exc.errno in _RESET_ERRNOS:
            raise ConnectionLost() from exc
        raise
    if not data:
        raise ConnectionLost()
    return data


class BoundedWait:
    """Runs a blocking wait (such as a gevent socket's ``_wait`` on one of
    its io watchers) for at most a given time.

    A libev timer throws into the waiting greenlet, which is cheaper than a
    :class:`gevent.Timeout` and leaves the socket's own timeout alone. The
    timer is kept while the bound stays the same (an edge session parks
    after the same idle time again and again).
    """

    __slots__ = ("_after", "_timer")

    def __init__(self) -> None:
        self._timer: Any = None
        self._after: float | None = None

    def wait(self, timeout: float | None, block: Callable[..., None], *args: Any) -> None:
        """Call ``block(*args)``, giving up after *timeout* seconds (``None``:
        no bound).

        :raises TimeoutError: the time ran out.
        """
        if timeout is None:
            block(*args)
            return
        if timeout <= 0:
            raise TimeoutError("timed out")
        timer = self._timer
        if timer is None or self._after != timeout:
            if timer is not None:
                timer.close()
            timer = self._timer = gevent.get_hub().loop.timer(timeout)
            self._after = timeout
        timer.start(_expire, gevent.getcurrent())
        try:
            block(*args)
        except _WaitExpired:
            raise TimeoutError("timed out") from None
        finally:
            timer.stop()


def inner_socket(sock: Any) -> Any:
    """The non-blocking socket inside a plain gevent socket, else ``None``.

    Reading and writing it directly, and waiting through gevent only when it
    would block, saves gevent's per-call costs (a ``getsockopt`` per
    ``sendall``, a wait object per ``recv``). TLS and foreign sockets have
    none: they go through their own methods.
    """
    raw = getattr(sock, "_sock", None)
    if raw is None or not hasattr(sock, "_wait") or isinstance(sock, ssl.SSLSocket):
        return None
    return raw


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
        try:
            self.socket.sendall(data)
        except OSError as exc:
            if exc.errno in _RESET_ERRNOS:
                raise ConnectionLost() from exc
            raise
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
        self.buffered_send(format_reply(reply.code, reply.message or "", reply.newline_first))

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
                return reply.code, reply.message
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
