"""Log lines about HTTP requests and responses, client or server side.

Every line has type ``http`` and ``id()`` of the connection (or, for WSGI, of
the request's ``environ``) as its id, so a request and its response share
it, e.g. ``http:140291:server_response headers=[] status='200 OK'``.

Credentials in ``Authorization``, ``Proxy-Authorization``, ``Cookie`` and
``Set-Cookie`` headers are replaced by ``********`` (the auth scheme is kept).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from slimta.logging import logline

__all__ = ["HttpLogger"]

#: Headers whose values are credentials, lower-cased.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})

#: Headers that keep their first word (the auth scheme) when masked.
_SCHEME_HEADERS = frozenset({"authorization", "proxy-authorization"})

_MASK = "********"

#: Headers a WSGI server keeps in ``environ`` without the ``HTTP_`` prefix.
_CGI_HEADERS = {"CONTENT_TYPE": "Content-Type", "CONTENT_LENGTH": "Content-Length"}

_Headers = Mapping[str, object] | Iterable[tuple[str, object]]


def _masked_value(name: str, value: object) -> object:
    if name.lower() not in _SECRET_HEADERS:
        return value
    if name.lower() in _SCHEME_HEADERS:
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(value, str) and " " in value.strip():
            return f"{value.split(None, 1)[0]} {_MASK}"
    return _MASK


def _masked(headers: _Headers) -> object:
    """A copy of *headers*, same shape (dict or list), with secrets masked."""
    if isinstance(headers, Mapping):
        return {name: _masked_value(str(name), value) for name, value in headers.items()}
    return [(name, _masked_value(str(name), value)) for name, value in headers]


def _environ_headers(environ: Mapping[str, object]) -> list[tuple[str, object]]:
    """The request headers of a WSGI *environ*, as ``(Name, value)`` pairs."""
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = "-".join(part.capitalize() for part in key[5:].split("_"))
        elif key in _CGI_HEADERS:
            name = _CGI_HEADERS[key]
        else:
            continue
        headers.append((name, value))
    return headers


class HttpLogger:
    """Writes ``http`` lines about requests and responses to a logger.

    All lines are at DEBUG; nothing is formatted when DEBUG is disabled.

    :param log: Where the lines go, usually ``logging.getLogger(__name__)``.
    """

    def __init__(self, log: logging.Logger) -> None:
        #: The underlying logger.
        self.log = log

    def request(
        self,
        conn: object,
        method: str,
        path: str,
        headers: _Headers,
        is_client: bool = True,
    ) -> None:
        """Log a request sent (``client_request``) or received (``server_request``).

        :param conn: The connection; ``id(conn)`` is the line's id.
        :param method: The request method, e.g. ``'POST'``.
        :param path: The request path.
        :param headers: The request headers, a mapping or ``(name, value)``
            pairs; credentials are masked.
        :param is_client: Whether this side sent the request.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            operation = "client_request" if is_client else "server_request"
            logline(
                self.log.debug,
                "http",
                id(conn),
                operation,
                method=method,
                path=path,
                headers=_masked(headers),
            )

    def response(
        self,
        conn: object,
        status: object,
        headers: _Headers,
        is_client: bool = True,
    ) -> None:
        """Log a response received (``client_response``) or sent (``server_response``).

        :param conn: The connection; ``id(conn)`` is the line's id.
        :param status: The status, e.g. ``200`` or ``'200 OK'``.
        :param headers: The response headers, a mapping or ``(name, value)``
            pairs; credentials are masked.
        :param is_client: Whether this side sent the request.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            operation = "client_response" if is_client else "server_response"
            logline(
                self.log.debug,
                "http",
                id(conn),
                operation,
                status=status,
                headers=_masked(headers),
            )

    def wsgi_request(self, environ: Mapping[str, object]) -> None:
        """Log the request of a WSGI *environ* as a ``server_request``.

        :param environ: The WSGI environ; ``id(environ)`` is the line's id.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            method = environ.get("REQUEST_METHOD")
            path = environ.get("PATH_INFO")
            self.request(
                environ,
                str(method),
                str(path),
                _environ_headers(environ),
                is_client=False,
            )

    def wsgi_response(self, environ: Mapping[str, object], status: str, headers: _Headers) -> None:
        """Log the response to a WSGI request as a ``server_response``.

        :param environ: The request's environ, as given to :meth:`wsgi_request`.
        :param status: The status line, e.g. ``'200 OK'``.
        :param headers: The response headers.
        """
        self.response(environ, status, headers, is_client=False)
