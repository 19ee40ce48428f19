"""A base class for WSGI applications that slimta serves with gevent.

:class:`WsgiServer` logs every request and response through
:class:`~slimta.logging.http.HttpLogger` (lines ``http:<id>:server_request``
and ``http:<id>:server_response``, at DEBUG, sharing the id of the request's
``environ``) and leaves the answer to :meth:`WsgiServer.handle`.
:meth:`WsgiServer.build_server` serves the application with
:class:`gevent.pywsgi.WSGIServer`::

    server = MyApp().build_server(("0.0.0.0", 8025), ssl_args={"ssl_context": ctx})
    server.serve_forever()
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from slimta.logging import getHttpLogger, getSocketLogger

__all__ = ["WsgiServer"]

#: A WSGI ``environ``.
Environ: TypeAlias = dict[str, Any]
#: The ``write`` callable that ``start_response`` returns.
Write: TypeAlias = Callable[[bytes], object]
#: A WSGI ``start_response(status, headers, exc_info=None)``.
StartResponse: TypeAlias = Callable[..., Write]

log = getHttpLogger(__name__)
_socket_log = getSocketLogger(__name__)


class WsgiServer:
    """Base class for WSGI applications: logs each exchange, then :meth:`handle`.

    An instance is the WSGI application itself; subclasses implement
    :meth:`handle` and are served by any WSGI server, or by the gevent one
    that :meth:`build_server` makes.
    """

    #: Seconds each read or write of a connection served by
    #: :meth:`build_server` (the TLS handshake included) may wait before the
    #: connection is given up; ``None`` waits for ever.
    #:
    #: .. versionadded:: 4.0
    timeout: float | None = None

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """Log the request, run :meth:`handle`, log its response.

        .. versionchanged:: 4.0
           Subclasses override :meth:`handle`, never this method, so that
           every request is logged (4.0's ``WsgiEdge`` skipped the logging).
        """
        log.wsgi_request(environ)

        def logged_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Write:
            log.wsgi_response(environ, status, headers)
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        return self.handle(environ, logged_start_response)

    def handle(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """Answer one request, as a WSGI application does.

        :param environ: the WSGI environ.
        :param start_response: the WSGI ``start_response`` callable.
        :returns: the response body, an iterable of bytes.
        """
        raise NotImplementedError()

    def build_server(
        self,
        listener: Any,
        pool: Pool | None = None,
        ssl_args: dict[str, Any] | None = None,
    ) -> WSGIServer:
        """A :class:`gevent.pywsgi.WSGIServer` serving this application.

        The server is returned unstarted. Its access log is off (requests are
        logged at DEBUG by :meth:`__call__`) and its error log goes to the
        ``slimta.http.wsgi`` logger; ``log`` or ``error_log`` keys in
        *ssl_args* override either.

        :param listener: ``(ip, port)`` or a listening socket.
        :param pool: a :class:`gevent.pool.Pool` bounding concurrent
            connections; ``None`` for no bound.
        :param ssl_args: more :class:`~gevent.pywsgi.WSGIServer` keyword
            arguments, usually for TLS, e.g. ``{'ssl_context': context}``.
        :returns: the server; call ``start()`` or ``serve_forever()`` on it.
        """
        kwargs: dict[str, Any] = {"log": None, "error_log": logging.getLogger(__name__)}
        kwargs.update(ssl_args or {})
        spawn: Any = pool if pool is not None else "default"
        return _WSGIServer(listener, self, spawn=spawn, timeout=self.timeout, **kwargs)


class _WSGIServer(WSGIServer):  # type: ignore[misc]
    """A WSGIServer whose connections time out, handshake included.

    A TLS handshake that fails (a port scanner, a plain-text client) is
    logged at :data:`~slimta.logging.socket.socket_error_log_level` rather
    than killing its greenlet with a traceback.
    """

    def __init__(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection_timeout = timeout

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
        client_socket.settimeout(self.connection_timeout)
        try:
            tls_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except OSError as exc:  # ssl.SSLError, timeouts and resets alike
            _socket_log.error(client_socket, exc, address)
            client_socket.close()
            return None
        try:
            return self.handle(tls_socket, address)
        finally:
            tls_socket.close()

    def handle(self, sock: socket.socket, address: Any) -> Any:
        sock.settimeout(self.connection_timeout)
        return super().handle(sock, address)
