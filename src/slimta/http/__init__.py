"""HTTP helpers on gevent sockets.

:class:`HTTPConnection` and :class:`HTTPSConnection` are the standard
:mod:`http.client` connections, opening their sockets with
:func:`gevent.socket.create_connection` so that a request blocks only its own
greenlet. :func:`get_connection` picks one for a URL::

    conn = get_connection("https://mail.example.com:8443/deliver")
    conn.request("POST", "/deliver", body, headers)
    response = conn.getresponse()

The server side (a WSGI base class) is in :mod:`slimta.http.wsgi`.

TLS goes through ``context.wrap_socket()``: use a context made after
``gevent.monkey.patch_all()`` (or from :mod:`gevent.ssl`), as for the rest of
slimta, so that the handshake and the encrypted reads and writes cooperate
too.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
from typing import Any
from urllib.parse import ParseResult, ParseResultBytes, SplitResult, SplitResultBytes, urlsplit

from slimta.util._connect import create_connection

__all__ = ["HTTPConnection", "HTTPSConnection", "get_connection"]

#: Seconds :meth:`HTTPSConnection.close` waits for the server's TLS
#: ``close_notify`` after sending its own.
_UNWRAP_TIMEOUT = 1.0

#: What :func:`get_connection` accepts as a URL.
Url = str | bytes | SplitResult | SplitResultBytes | ParseResult | ParseResultBytes


class _OneWrite(http.client.HTTPConnection):
    """Sends the request head and a bytes body in one write.

    :mod:`http.client` writes them separately: two system calls, and with
    Nagle off two TCP segments, the second waiting on the peer's delayed
    ACK when the first was small.
    """

    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        if not isinstance(message_body, bytes) or encode_chunked:
            super()._send_output(message_body, encode_chunked)  # type: ignore[misc]
            return
        buffer: list[bytes] = self._buffer  # type: ignore[attr-defined]
        buffer.extend((b"", message_body))
        request = b"\r\n".join(buffer)
        del buffer[:]
        self.send(request)


class HTTPConnection(_OneWrite, http.client.HTTPConnection):
    """An :class:`http.client.HTTPConnection` whose socket is a gevent socket.

    :param host: the server, ``'host'``, ``'host:port'`` or ``'[v6]:port'``.
    :param port: the port, when not in *host*; default 80.
    :param timeout: seconds each socket operation may block; default the
        global socket default (none).
    :param source_address: ``(host, port)`` to bind the socket to first.
    :param blocksize: bytes per ``send`` of a file-like body.
    """

    def __init__(
        self,
        host: str,
        port: int | None = None,
        timeout: float | None = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
        source_address: tuple[str, int] | None = None,
        blocksize: int = 8192,
    ) -> None:
        super().__init__(
            host, port, timeout=timeout, source_address=source_address, blocksize=blocksize
        )
        # http.client opens its socket through this attribute (proxy tunnel
        # and TCP_NODELAY included); only the socket module changes.
        self._create_connection = create_connection


class HTTPSConnection(_OneWrite, http.client.HTTPSConnection):
    """An :class:`http.client.HTTPSConnection` whose socket is a gevent socket.

    The server's certificate is checked against *host* (or the proxy
    tunnel's host) as *context* says. :meth:`close` ends TLS with a
    ``close_notify`` before closing the socket.

    :param host: the server, ``'host'``, ``'host:port'`` or ``'[v6]:port'``;
        also the name its certificate must hold.
    :param port: the port, when not in *host*; default 443.
    :param timeout: seconds each socket operation may block; default the
        global socket default (none).
    :param source_address: ``(host, port)`` to bind the socket to first.
    :param context: the client :class:`ssl.SSLContext`;
        ``ssl.create_default_context()`` when ``None``, which verifies the
        certificate and the host name.
    :param blocksize: bytes per ``send`` of a file-like body.

    .. versionchanged:: 4.0
       *context* replaces the ``tls`` dict of keyword arguments.
    """

    def __init__(
        self,
        host: str,
        port: int | None = None,
        timeout: float | None = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
        source_address: tuple[str, int] | None = None,
        *,
        context: ssl.SSLContext | None = None,
        blocksize: int = 8192,
    ) -> None:
        if context is None:
            context = ssl.create_default_context()
        super().__init__(
            host,
            port,
            timeout=timeout,
            source_address=source_address,
            context=context,
            blocksize=blocksize,
        )
        self._create_connection = create_connection
        self._tls_context = context

    def connect(self) -> None:
        """Connect, then negotiate TLS, checking the certificate's name.

        The TLS socket is :attr:`sock` before its handshake begins, so that
        :meth:`close` closes it even when the handshake is cut short (by a
        :class:`gevent.Timeout`, say); ``ssl.SSLError`` (a subclass of
        ``OSError``) when the handshake fails.
        """
        http.client.HTTPConnection.connect(self)
        # The proxy tunnel's target, when there is one, is the server.
        server_hostname = getattr(self, "_tunnel_host", None) or self.host
        sock = self._tls_context.wrap_socket(
            self.sock, server_hostname=server_hostname, do_handshake_on_connect=False
        )
        self.sock = sock
        sock.do_handshake()

    def close(self) -> None:
        """Close the connection, sending TLS ``close_notify`` first.

        Waits at most a second for the server's ``close_notify``. When a
        response still reads from the socket (the server asked to close the
        connection, so :meth:`getresponse` handed the socket over to it), the
        socket closes with that response, without ``close_notify``.
        """
        sock: Any = self.sock
        try:
            # _io_refs counts the makefile() streams open on a socket (stdlib
            # and gevent alike); a response reading the body holds one.
            if sock is not None and hasattr(sock, "unwrap") and not getattr(sock, "_io_refs", 0):
                with contextlib.suppress(OSError, ValueError):
                    sock.settimeout(_UNWRAP_TIMEOUT)
                    plain = sock.unwrap()
                    if plain is not None and plain is not sock:
                        sock.close()
                        self.sock = plain
        finally:
            # Even when killed while waiting for the server's close_notify.
            super().close()


def _split(url: Url) -> SplitResult | ParseResult:
    if isinstance(url, bytes):
        url = url.decode("utf-8")
    if isinstance(url, str):
        return urlsplit(url, "http")
    if isinstance(url, SplitResultBytes):
        return SplitResult(*(part.decode("utf-8") for part in url))
    if isinstance(url, ParseResultBytes):
        return ParseResult(*(part.decode("utf-8") for part in url))
    return url


def get_connection(
    url: Url, context: ssl.SSLContext | None = None
) -> HTTPConnection | HTTPSConnection:
    """A new, unconnected connection to the server of *url*.

    :param url: the URL, as ``str``, ``bytes`` or a parsed result from
        :func:`urllib.parse.urlsplit` (or ``urlparse``); a string without a
        scheme is taken as ``http``.
    :param context: the :class:`ssl.SSLContext` for an ``https`` URL;
        ``None`` uses ``ssl.create_default_context()`` (certificates verified).
    :returns: an :class:`HTTPSConnection` for an ``https`` URL, else an
        :class:`HTTPConnection`, to the URL's host and port (``localhost``
        when it names no host). User information (``user:password@``) in the
        URL is not part of the host and is left out.
    :raises http.client.InvalidURL: the URL's port is not a number.

    .. versionchanged:: 4.0
       *context* replaces the ``tls`` dict; *url* may be ``bytes``.
    """
    parts = _split(url)
    netloc = parts.netloc.rpartition("@")[2] or "localhost"
    if parts.scheme.lower() == "https":
        return HTTPSConnection(netloc, context=context)
    return HTTPConnection(netloc)
