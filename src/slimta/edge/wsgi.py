"""The HTTP edge: receive one message per HTTP request and hand it to a queue.

:class:`WsgiEdge` is a WSGI application (and, given a listener, a server)
that takes a message from each ``POST`` request, the mirror image of
:class:`~slimta.relay.http.HttpRelay`. The envelope travels in headers, each
address the base64 encoding of its UTF-8 text::

    POST / HTTP/1.1
    Content-Type: message/rfc822
    Content-Length: 1234
    X-Ehlo: client.example.com
    X-Envelope-Sender: c2VuZGVyQGV4YW1wbGUuY29t
    X-Envelope-Recipient: cmNwdDFAZXhhbXBsZS5uZXQ=, cmNwdDJAZXhhbXBsZS5uZXQ=

    <the message>

A recipient header may list several addresses separated by ``,`` or ``;``,
and may be repeated. The answer carries the SMTP reply the message would have
had, in ``X-Smtp-Reply: <code>; message="<text>"``, and the queue ids in
``X-Queue-Id``.

What a request gets, checked in this order:

========================================  =====================================
request                                   answer (``X-Smtp-Reply``)
========================================  =====================================
path not matching *uri_pattern*           ``404 Not Found``
method other than ``POST``                ``405 Method Not Allowed``, ``Allow``
``Content-Type`` not ``message/rfc822``   ``415 Unsupported Media Type``
invalid ``Content-Length``                ``400 Bad Request``
neither ``Content-Length`` nor chunked    ``411 Length Required``
body over *max_size*                      ``413 Payload Too Large`` (552 5.3.4)
sender not base64 / UTF-8 / an address    ``400 Bad Request`` (501 5.1.7)
a recipient likewise                      ``400 Bad Request`` (501 5.1.3)
no recipient                              ``400 Bad Request`` (554 5.5.1)
more than *max_recipients*                ``400 Bad Request`` (552 5.5.3)
``X-Ehlo`` not one printable word         ``400 Bad Request`` (501 5.5.4)
a validator's :class:`WsgiResponse`       that response
body shorter than ``Content-Length``      ``400 Bad Request``
queued                                    ``204 No Content`` (250 2.6.0)
refused by the queue, 4xx reply           ``503 Service Unavailable``
refused, 535 reply                        ``401 Unauthorized``
refused, other 5xx reply                  ``500 Internal Server Error``
any unexpected error (logged)             ``500 Internal Server Error`` (451)
========================================  =====================================

Every error answer has a ``text/plain`` body (bytes) saying what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import ssl
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

import gevent
from gevent.pool import Pool

from slimta import logging as slogging
from slimta.edge import Edge, EdgeServer, Handoff, QueueLike
from slimta.envelope import Envelope
from slimta.http.wsgi import Environ, StartResponse, WsgiServer
from slimta.smtp.reply import Reply
from slimta.util.ptrlookup import PtrLookup

__all__ = ["WsgiEdge", "WsgiResponse", "WsgiValidators"]

#: Default *max_size* of :class:`WsgiEdge`: 10 MiB of message per request.
DEFAULT_MAX_SIZE = 10 * 1024 * 1024

#: Bytes asked of ``wsgi.input`` per read.
_READ_CHUNK = 65536

#: RFC 5321 4.5.3.1.3: a path is at most 256 octets with its angle brackets.
_MAX_ADDRESS = 254

#: RFC 5321 4.5.3.1.2: a domain name is at most 255 octets.
_MAX_EHLO = 255

#: Characters of reply text put in ``X-Smtp-Reply`` at most.
_MAX_REPLY_TEXT = 1000

_DIGITS = re.compile(r"[0-9]{1,18}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EHLO_WORD = re.compile(r"[\x21-\x7e]+")
_HEADER_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,15}")

#: ``552 5.3.4``: the message is over *max_size*.
_TOO_BIG = Reply("552", "5.3.4 Message exceeded size limit")
#: ``501 5.1.7``: the sender header does not hold an address.
_BAD_SENDER = Reply("501", "5.1.7 Invalid sender address")
#: ``501 5.1.3``: a recipient header item does not hold an address.
_BAD_RECIPIENT = Reply("501", "5.1.3 Invalid recipient address")
#: ``554 5.5.1``: no recipient at all.
_NO_RECIPIENTS = Reply("554", "5.5.1 No valid recipients")
#: ``552 5.5.3``: over *max_recipients*.
_TOO_MANY_RECIPIENTS = Reply("552", "5.5.3 Too many recipients")
#: ``501 5.5.4``: the EHLO header is not a name.
_BAD_EHLO = Reply("501", "5.5.4 Invalid EHLO name")
#: ``451 4.3.0``: our own failure; the client should try again later.
_INTERNAL = Reply("451", "4.3.0 Internal server error")


class WsgiResponse(Exception):
    """Raised by a :class:`WsgiValidators` hook to answer the request at once.

    :param status: the HTTP status line, e.g. ``'403 Forbidden'``.
    :param headers: the response headers, ``(name, value)`` pairs.
    :param data: the body, an iterable of bytes (``str`` items are sent
        UTF-8 encoded).
    """

    def __init__(
        self,
        status: str,
        headers: list[tuple[str, str]] | None = None,
        data: Iterable[bytes] | None = None,
    ) -> None:
        super().__init__(status)
        #: The HTTP status line.
        self.status = status
        #: The response headers.
        self.headers: list[tuple[str, str]] = headers if headers is not None else []
        #: The response body.
        self.data: Iterable[bytes] = data if data is not None else []


class WsgiValidators:
    """Base class for the hooks that check a request before it is queued.

    Subclass it, override any hook, and raise :class:`WsgiResponse` from a
    hook to refuse the request with that response. The hooks run in this
    order, after the headers are decoded and before the body is read:
    :meth:`validate_ehlo`, :meth:`validate_sender`, :meth:`validate_recipient`
    for each recipient, then :meth:`validate_custom` for each name in
    :attr:`custom_headers`.

    :param environ: the request's WSGI environ.
    """

    #: Header names given to :meth:`validate_custom`, e.g. ``['X-Api-Key']``.
    custom_headers: list[str] = []

    def __init__(self, environ: Environ) -> None:
        #: The request's WSGI environ.
        self.environ = environ

    def validate_ehlo(self, ehlo: str) -> None:
        """Check the client's name: ``X-Ehlo``, or ``[ip]`` when absent."""

    def validate_sender(self, sender: str) -> None:
        """Check the decoded sender address (``''`` for the null sender)."""

    def validate_recipient(self, recipient: str) -> None:
        """Check one decoded recipient address."""

    def validate_custom(self, name: str, value: str | None) -> None:
        """Check a header of :attr:`custom_headers`.

        :param name: the header name, as listed.
        :param value: its value as the server gave it, ``None`` when absent.
        """


class WsgiEdge(EdgeServer, WsgiServer):
    """Receives messages as HTTP requests and hands each to *queue*.

    Use it as a WSGI application, serve it with :meth:`build_server`, or
    give it a *listener* and :meth:`start` it like any other edge.

    :param queue: a queue, or any object with ``enqueue(envelope)``.
    :param hostname: this server's name, stamped into ``Envelope.receiver``.
    :param validator_class: a :class:`WsgiValidators` subclass, instantiated
        per request.
    :param uri_pattern: a regex (text or compiled); requests whose path does
        not match it from the start get ``404``. ``None`` accepts any path.
    :param listener: ``(ip, port)`` or a listening socket, making the edge a
        server started with :meth:`start`; ``None`` for none.
    :param pool: a :class:`gevent.pool.Pool` bounding concurrent connections
        of that server.
    :param context: a server :class:`ssl.SSLContext`: that server speaks
        HTTPS.
    :param max_size: the largest message body accepted, in bytes; bigger
        ones get ``413``. ``None`` or ``0`` accept any size (each body is held
        in memory).
    :param max_recipients: the most recipients one request may name.
    :param timeout: seconds each read or write of a connection may wait when
        served by :meth:`build_server` or the *listener*, so that a stalled
        client cannot hold a connection for ever; ``None`` waits for ever.

    .. versionchanged:: 4.0
       The keyword-only *listener*, *pool* and *context* (as in 5.0), and
       *max_size*, *max_recipients* and *timeout*. Error bodies are bytes, and
       requests are logged like every :class:`~slimta.http.wsgi.WsgiServer`'s.
    """

    #: The one method that delivers a message.
    http_verb = "POST"
    #: The header holding the base64 sender.
    sender_header = "X-Envelope-Sender"
    #: The header(s) holding base64 recipients.
    rcpt_header = "X-Envelope-Recipient"
    #: The header holding the client's name.
    ehlo_header = "X-Ehlo"
    #: Separates several recipients in one header value.
    split_pattern = re.compile(r"\s*[,;]\s*")

    #: Look the client's PTR name up for ``envelope.client['host']``. Set to
    #: ``False`` (on the class or an instance) to skip the lookups.
    ptr_lookup = True
    #: Seconds a request waits at most, from its start, for a PTR answer
    #: still outstanding once its body is read.
    ptr_lookup_timeout = 5.0

    def __init__(
        self,
        queue: QueueLike,
        hostname: str | None = None,
        validator_class: type[WsgiValidators] | None = None,
        uri_pattern: str | re.Pattern[str] | None = None,
        *,
        listener: Any = None,
        pool: Pool | None = None,
        context: ssl.SSLContext | None = None,
        max_size: int | None = DEFAULT_MAX_SIZE,
        max_recipients: int = 1000,
        timeout: float | None = 60.0,
    ) -> None:
        # Not EdgeServer.__init__: the server here is an HTTP one, and optional.
        Edge.__init__(self, queue, hostname)
        gevent.Greenlet.__init__(self)
        self.validator_class = validator_class
        if isinstance(uri_pattern, str):
            uri_pattern = re.compile(uri_pattern)
        self.uri_pattern: re.Pattern[str] | None = uri_pattern
        self.max_size: int | None = max_size or None
        self.max_recipients = max_recipients
        self.timeout = timeout
        self.context = context
        self.pool = pool if pool is not None else Pool()
        #: The :class:`gevent.pywsgi.WSGIServer` of *listener*, or ``None``.
        self.server: Any = None
        if listener is not None:
            ssl_args = {"ssl_context": context} if context is not None else None
            self.server = self.build_server(listener, self.pool, ssl_args)

    # Serving ----------------------------------------------------------------
    def start(self) -> None:
        """Serve *listener* in this greenlet.

        :raises ValueError: the edge was made without a *listener*; serve it
            with :meth:`build_server` instead.
        """
        if self.server is None:
            raise ValueError("WsgiEdge has no listener; serve it with build_server()")
        super().start()

    def stop(self, grace: float | None = 10.0) -> None:
        """Stop accepting, give open requests *grace* seconds, then end them."""
        if self.server is None:
            gevent.Greenlet.kill(self, block=False)
        else:
            super().stop(grace)

    def kill(self, *args: Any, **kwargs: Any) -> None:
        """Stop the server (if any) at once and end the greenlet."""
        if self.server is None:
            gevent.Greenlet.kill(self, *args, **kwargs)
        else:
            super().kill(*args, **kwargs)

    # Requests ---------------------------------------------------------------
    # The WSGI handle() of WsgiServer, not EdgeServer's per-socket one: the
    # server here calls the application, never handle(socket, address).
    def handle(  # type: ignore[override]
        self, environ: Environ, start_response: StartResponse
    ) -> Iterable[bytes]:
        """Answer one request: queue its message, or say why not.

        Never raises: an unexpected error is logged and answered ``500``.
        """
        try:
            response = self._answer(environ)
        except WsgiResponse as refusal:
            response = refusal
        except Exception:
            slogging.log_exception(__name__)
            response = _internal_error()
        try:
            body = _body_bytes(response.data)
            start_response(response.status, list(response.headers))
        except Exception:
            # A validator's response the server refused (say, a header with
            # a line break) or whose body is not bytes.
            slogging.log_exception(__name__)
            response = _internal_error()
            start_response(response.status, response.headers, sys.exc_info())
            return _body_bytes(response.data)
        return body

    def _answer(self, environ: Environ) -> WsgiResponse:
        """The response to a request; refusals are raised as WsgiResponse."""
        if self.uri_pattern is not None:
            path = environ.get("PATH_INFO", "")
            if not isinstance(path, str) or self.uri_pattern.match(path) is None:
                _refuse("404 Not Found", "Not found")
        if environ.get("REQUEST_METHOD") != self.http_verb:
            _refuse(
                "405 Method Not Allowed",
                f"Only {self.http_verb} is allowed",
                headers=[("Allow", self.http_verb)],
            )
        if not _is_message(environ.get("CONTENT_TYPE")):
            _refuse("415 Unsupported Media Type", "Content-Type must be message/rfc822")
        length = self._content_length(environ)
        ip = _client_ip(environ)
        ehlo = self._ehlo(environ, ip)
        sender = self._sender(environ)
        recipients = self._recipients(environ)
        host, lookup = self._start_ptr_lookup(ip)
        try:
            if self.validator_class is not None:
                self._validate(environ, ehlo, sender, recipients)
            data = self._read_body(environ, length)
            if lookup is not None:
                host = lookup.finish(self.ptr_lookup_timeout)
        finally:
            if lookup is not None and not lookup.ready():
                lookup.kill(block=False)
        envelope = Envelope(sender, recipients)
        envelope.client = {
            "ip": ip,
            "host": host,
            "name": ehlo,
            "protocol": _protocol(environ),
            "auth": None,
        }
        envelope.parse(data)
        return _handoff_response(self.handoff_result(envelope))

    def _content_length(self, environ: Environ) -> int | None:
        """The declared body length; ``None`` for a chunked body."""
        raw = environ.get("CONTENT_LENGTH")
        if raw:
            text = str(raw).strip()
            if _DIGITS.fullmatch(text) is None:
                _refuse("400 Bad Request", "Invalid Content-Length")
            length = int(text)
            if self.max_size is not None and length > self.max_size:
                _too_big(self.max_size)
            return length
        chunked = str(environ.get("HTTP_TRANSFER_ENCODING", "")).strip().lower() == "chunked"
        # Only a server that decodes chunked input marks it terminated (a
        # de facto standard: gevent, mod_wsgi); from any other, reading until
        # EOF would see the raw chunk framing.
        if chunked and environ.get("wsgi.input_terminated"):
            return None
        _refuse("411 Length Required", "Content-Length is required")

    def _ehlo(self, environ: Environ, ip: str | None) -> str:
        value = environ.get(_environ_key(self.ehlo_header))
        if value is not None:
            ehlo = str(value).strip()
            if ehlo:
                # It ends up in Received: headers; one printable word only.
                if len(ehlo) > _MAX_EHLO or _EHLO_WORD.fullmatch(ehlo) is None:
                    _refuse("400 Bad Request", f"Invalid {self.ehlo_header} header", _BAD_EHLO)
                return ehlo
        return _address_literal(ip)

    def _sender(self, environ: Environ) -> str:
        value = environ.get(_environ_key(self.sender_header))
        if value is None:
            return ""
        return _decode_address(str(value).strip(), self.sender_header, _BAD_SENDER)

    def _recipients(self, environ: Environ) -> list[str]:
        value = environ.get(_environ_key(self.rcpt_header))
        # Servers join repeated headers with ',' (PEP 3333), which the split
        # pattern separates like several addresses in one header.
        items = [item for item in self.split_pattern.split(str(value or "").strip()) if item]
        if not items:
            _refuse("400 Bad Request", f"No {self.rcpt_header} header", _NO_RECIPIENTS)
        if len(items) > self.max_recipients:
            _refuse("400 Bad Request", "Too many recipients", _TOO_MANY_RECIPIENTS)
        return [_decode_address(item, self.rcpt_header, _BAD_RECIPIENT) for item in items]

    def _validate(self, environ: Environ, ehlo: str, sender: str, recipients: list[str]) -> None:
        assert self.validator_class is not None
        validators = self.validator_class(environ)
        validators.validate_ehlo(ehlo)
        validators.validate_sender(sender)
        for recipient in recipients:
            validators.validate_recipient(recipient)
        for name in validators.custom_headers:
            validators.validate_custom(name, environ.get(_environ_key(name)))

    def _start_ptr_lookup(self, ip: str | None) -> tuple[str | None, PtrLookup | None]:
        """``(hostname, None)`` when known at once, else ``(None, lookup)``."""
        if not self.ptr_lookup or not ip:
            return None, None
        known, hostname = PtrLookup.cached(ip)
        if known:
            return hostname, None
        lookup = PtrLookup(ip)
        lookup.start()
        return None, lookup

    def _read_body(self, environ: Environ, length: int | None) -> bytes:
        """Read *length* bytes, or a chunked body up to *max_size*."""
        stream = environ.get("wsgi.input")
        # A chunked body is read one byte past max_size, to see it is over.
        limit: int | None = length
        if length is None and self.max_size is not None:
            limit = self.max_size + 1
        chunks: list[bytes] = []
        total = 0
        try:
            while limit is None or total < limit:
                want = _READ_CHUNK if limit is None else min(_READ_CHUNK, limit - total)
                chunk = stream.read(want) if stream is not None else b""
                if not chunk:
                    break
                chunks.append(bytes(chunk))
                total += len(chunk)
        except (OSError, ValueError):
            # A reset, a timeout, a short body (gevent raises on early EOF),
            # or broken chunk framing.
            _incomplete()
        if length is not None and total < length:
            _incomplete()
        if self.max_size is not None and total > self.max_size:
            _too_big(self.max_size)
        return b"".join(chunks)


# Helpers ----------------------------------------------------------------------
def _refuse(
    status: str,
    text: str,
    reply: Reply | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> NoReturn:
    raise _error(status, text, reply, headers)


def _error(
    status: str,
    text: str,
    reply: Reply | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> WsgiResponse:
    """A ``text/plain`` response whose body is *text*."""
    body = (text + "\n").encode("utf-8")
    response_headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
    ]
    if reply is not None:
        response_headers.append(("X-Smtp-Reply", _reply_header(reply)))
    response_headers.extend(headers)
    return WsgiResponse(status, response_headers, [body])


def _internal_error() -> WsgiResponse:
    # The details are in the log, not in the answer to an untrusted client.
    return _error("500 Internal Server Error", "Internal server error", _INTERNAL)


def _too_big(max_size: int) -> NoReturn:
    # Closing keeps the client from sending another request after a body
    # nobody read (gevent reads and discards it first).
    _refuse(
        "413 Payload Too Large",
        f"Message exceeds {max_size} bytes",
        _TOO_BIG,
        [("Connection", "close")],
    )


def _incomplete() -> NoReturn:
    # The stream is out of step with the framing: end the connection.
    _refuse("400 Bad Request", "Incomplete request body", headers=[("Connection", "close")])


def _body_bytes(data: Iterable[Any] | bytes | str) -> list[bytes]:
    """A response body as a list of bytes (4.0 could send ``str``)."""
    if isinstance(data, bytes | bytearray | memoryview):
        return [bytes(data)]
    if isinstance(data, str):
        return [data.encode("utf-8")]
    body: list[bytes] = []
    for item in data:
        if isinstance(item, str):
            body.append(item.encode("utf-8"))
        elif isinstance(item, bytes | bytearray | memoryview):
            body.append(bytes(item))
        else:
            raise TypeError(f"response body item is not bytes: {type(item).__name__}")
    return body


def _environ_key(header: str) -> str:
    """Where a WSGI environ keeps the header *header* (PEP 3333)."""
    key = header.upper().replace("-", "_")
    if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        return key
    return "HTTP_" + key


def _is_message(content_type: object) -> bool:
    """True for ``message/rfc822`` (parameters and case aside) or none."""
    if not content_type:
        return True
    media_type = str(content_type).split(";", 1)[0].strip().lower()
    return media_type == "message/rfc822"


def _decode_address(value: str, header: str, reply: Reply) -> str:
    """The address in one base64 item of *header*, or a 400 refusal."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII text
        _refuse("400 Bad Request", f"{header} is not valid base64", reply)
    try:
        address = raw.decode("utf-8")
    except UnicodeDecodeError:
        _refuse("400 Bad Request", f"{header} is not valid UTF-8", reply)
    if _CONTROL.search(address) is not None:
        # CR or LF would forge lines wherever the address is written.
        _refuse("400 Bad Request", f"{header} contains control characters", reply)
    if len(raw) > _MAX_ADDRESS:
        _refuse("400 Bad Request", f"{header} is too long", reply)
    return address


def _client_ip(environ: Environ) -> str | None:
    """``REMOTE_ADDR`` when it is an IP address, else ``None``.

    Only an address is kept: a middleware may fill ``REMOTE_ADDR`` from a
    client's header, and the value ends up in ``Received:`` lines.
    """
    value = environ.get("REMOTE_ADDR")
    if not value:
        return None
    text = str(value)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return None
    return text


def _address_literal(ip: str | None) -> str:
    """The EHLO a client without ``X-Ehlo`` gets: ``[ip]`` (RFC 5321 4.1.3)."""
    if ip is None:
        return "[unknown]"
    address = ipaddress.ip_address(ip)
    if address.version == 6:
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"


def _protocol(environ: Environ) -> str:
    """``HTTP`` or ``HTTPS`` (the URL scheme, upper-cased)."""
    scheme = str(environ.get("wsgi.url_scheme") or "http")
    return scheme.upper() if _SCHEME.fullmatch(scheme) else "HTTP"


def _header_text(text: str) -> str:
    """*text* safe inside a header value: control characters become spaces,
    and non-ASCII text its UTF-8 bytes, as Latin-1 characters (PEP 3333)."""
    text = _HEADER_CONTROLS.sub(" ", text)
    if text.isascii():
        return text
    return text.encode("utf-8", "replace").decode("latin-1")


def _quoted(text: str) -> str:
    """An RFC 9110 quoted-string holding *text* (made header-safe)."""
    escaped = _header_text(text[:_MAX_REPLY_TEXT]).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _reply_header(reply: Reply) -> str:
    """``X-Smtp-Reply``: ``<code>; message="<text>"[; command="<cmd>"]``."""
    value = f"{reply.code}; message={_quoted(reply.message or '')}"
    command = reply.command
    if command:
        if isinstance(command, bytes):
            command = command.decode("utf-8", "replace")
        value += f"; command={_quoted(command)}"
    return value


def _status_of(reply: Reply) -> str:
    code = reply.code or "451"
    if code[0] == "2":
        return "204 No Content"
    if code == "535":
        return "401 Unauthorized"
    if code[0] == "4":
        return "503 Service Unavailable"
    return "500 Internal Server Error"


def _handoff_response(handoff: Handoff) -> WsgiResponse:
    """The answer for what the queue made of the message."""
    reply = handoff.reply
    status = _status_of(reply)
    if status[0] == "2":
        headers = [("X-Smtp-Reply", _reply_header(reply))]
        ids = [
            str(outcome)
            for _, outcome in handoff.results
            if outcome is not None and not isinstance(outcome, BaseException)
        ]
        if ids:
            headers.append(("X-Queue-Id", _header_text(", ".join(ids))))
        return WsgiResponse(status, headers, [])
    return _error(status, str(reply), reply)
