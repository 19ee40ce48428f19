"""Log lines about sockets: what was sent, received, accepted and closed.

Every line has type ``fd`` and the socket's ``fileno()`` as its id, e.g.
``fd:9:recv data=b'QUIT\\r\\n'``. A socket whose ``fileno()`` fails or is
negative (it is closed) is logged with id ``none``.

.. warning::

   :meth:`SocketLogger.send` and :meth:`SocketLogger.recv` log the bytes as
   given. Callers must mask secrets first: AUTH commands and every reply to
   an AUTH challenge carry credentials (base64 is not encryption).

"""

from __future__ import annotations

import logging
import socket

from slimta.logging import logline

__all__ = ["SocketLogger", "socket_error_log_level"]

#: Level of :meth:`SocketLogger.error` lines, read at every call. Network
#: errors are routine on a busy MTA; lower this (e.g. to ``logging.WARNING``)
#: to quiet them.
#:
#: .. versionadded:: 4.0
socket_error_log_level: int = logging.ERROR

#: How :meth:`SocketLogger.shutdown` names the ``how`` argument.
_SHUTDOWN_NAMES = {
    socket.SHUT_RD: "read",
    socket.SHUT_WR: "write",
    socket.SHUT_RDWR: "both",
}


def _fd(sock: object) -> int | str:
    """The id of *sock* in a line: its file descriptor, or ``'none'``."""
    fileno = getattr(sock, "fileno", None)
    if not callable(fileno):
        return "none"
    try:
        value = fileno()
    except Exception:  # a closed or odd socket must not break its caller
        return "none"
    if isinstance(value, int) and value >= 0:
        return value
    return "none"


class SocketLogger:
    """Writes ``fd`` lines about socket activity to a :class:`logging.Logger`.

    Every method returns at once, without touching its arguments, when the
    logger is not enabled for the method's level, so it is cheap to call on
    every read and write.

    :param logger: Where the lines go, usually ``logging.getLogger(__name__)``.
    """

    def __init__(self, logger: logging.Logger) -> None:
        #: The underlying logger.
        self.log = logger

    def send(self, sock: object, data: bytes) -> None:
        """Log *data* written to *sock* (mask secrets first).

        :param sock: The socket written to.
        :param data: The bytes written.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "fd", _fd(sock), "send", data=data)

    def recv(self, sock: object, data: bytes) -> None:
        """Log *data* read from *sock* (mask secrets first).

        :param sock: The socket read from.
        :param data: The bytes read.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "fd", _fd(sock), "recv", data=data)

    def accept(self, server: object, client: object, address: object = None) -> None:
        """Log a connection accepted on a listening socket.

        :param server: The listening socket.
        :param client: The new connection's socket (logged as ``clientfd``).
        :param address: The peer's address (logged as ``peer``).
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "fd", _fd(server), "accept", clientfd=_fd(client), peer=address)

    def connect(self, sock: object, address: object = None) -> None:
        """Log an outgoing connection.

        :param sock: The connected socket.
        :param address: The address connected to (logged as ``peer``).
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "fd", _fd(sock), "connect", peer=address)

    def encrypt(self, sock: object, context: object = None) -> None:
        """Log that TLS was started on *sock*.

        :param sock: The socket, before or after wrapping.
        :param context: The :class:`ssl.SSLContext` used; if it has
            ``session_stats()``, its result is logged as ``session_stats``.

        .. versionadded:: 4.0
        """
        if not self.log.isEnabledFor(logging.DEBUG):
            return
        session_stats = getattr(context, "session_stats", None)
        if callable(session_stats):
            logline(self.log.debug, "fd", _fd(sock), "encrypt", session_stats=session_stats())
        else:
            logline(self.log.debug, "fd", _fd(sock), "encrypt")

    def shutdown(self, sock: object, how: int) -> None:
        """Log a half or full shutdown of *sock*.

        :param sock: The socket shut down.
        :param how: ``socket.SHUT_RD``, ``SHUT_WR`` or ``SHUT_RDWR``, logged as
            ``read``, ``write`` or ``both``.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            name = _SHUTDOWN_NAMES.get(how, how)
            logline(self.log.debug, "fd", _fd(sock), "shutdown", how=name)

    def close(self, sock: object) -> None:
        """Log that *sock* is being closed (call it before closing).

        :param sock: The socket.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "fd", _fd(sock), "close")

    def error(self, sock: object, exc: BaseException, address: object = None) -> None:
        """Log a socket error at :data:`socket_error_log_level`.

        :param sock: The socket, or ``None`` (logged with id ``none``).
        :param exc: The error; its ``str()`` is logged as ``message`` and its
            ``args`` as ``args``.
        :param address: The peer's address, if known.
        """
        level = socket_error_log_level  # read each call: applications change it
        if not self.log.isEnabledFor(level):
            return

        def log_func(line: str) -> None:
            self.log.log(level, line)

        logline(
            log_func, "fd", _fd(sock), "error", message=str(exc), args=exc.args, address=address
        )

    def proxyproto_success(self, sock: object, src_addr: object) -> None:
        """Log a PROXY protocol header that gave the real source address.

        :param sock: The connection's socket.
        :param src_addr: The source address from the header.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "fd", _fd(sock), "ppsuccess", src_addr=src_addr)

    def proxyproto_invalid(self, sock: object, exc: BaseException) -> None:
        """Log a PROXY protocol header that could not be read.

        :param sock: The connection's socket.
        :param exc: Why; its ``str()`` is logged as ``message``.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "fd", _fd(sock), "ppinvalid", message=str(exc))

    def proxyproto_local(self, sock: object) -> None:
        """Log a PROXY protocol v2 ``LOCAL`` connection (a health check).

        :param sock: The connection's socket.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "fd", _fd(sock), "pplocal")
