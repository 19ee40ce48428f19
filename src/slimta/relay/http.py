"""A relay that delivers each message as one HTTP request.

:class:`HttpRelay` is the mirror image of :class:`~slimta.edge.wsgi.WsgiEdge`:
the message is the body of a ``POST`` and its envelope travels in headers,
each address as the base64 of its UTF-8 text::

    POST /path HTTP/1.1
    Host: mail.example.com
    Content-Length: 1234
    Content-Type: message/rfc822
    X-Ehlo: relay.example.com
    X-Envelope-Sender: c2VuZGVyQGV4YW1wbGUuY29t
    X-Envelope-Recipient: cmNwdDFAZXhhbXBsZS5uZXQ=
    X-Envelope-Recipient: cmNwdDJAZXhhbXBsZS5uZXQ=

    <the message>

The server answers with the SMTP reply the message would have had, in
``X-Smtp-Reply: <code>; message="<text>"[; command="<command>"]`` (the
values RFC 9110 quoted strings; 4.0 servers, which do not escape ``"`` in the
text, are understood too). What the response means:

==================================  ==========================================
response                            outcome
==================================  ==========================================
2xx                                 delivered; the ``X-Smtp-Reply`` reply (or
                                    ``None``) is returned
other, with a 4xx/5xx X-Smtp-Reply  that reply, as
                                    :meth:`SmtpRelayError.factory
                                    <slimta.relay.smtp.SmtpRelayError.factory>`
                                    makes it (5xx permanent, 4xx transient)
other 4xx                           :class:`~slimta.relay.PermanentRelayError`
                                    with the reason phrase (408, 425 and 429,
                                    temporary by definition, are transient)
anything else                       :class:`~slimta.relay.TransientRelayError`
                                    with the reason phrase
==================================  ==========================================

An ``X-Smtp-Reply`` that does not parse, or contradicts the status (an error
reply on a 2xx, a success reply on an error), is logged and ignored.

Connections are kept alive: each pool client holds one and sends its
messages over it while they come within *idle_timeout*. A kept-alive
connection that the server closed is replaced before the request when that
shows, and otherwise the request is sent again, once, on a new connection when
it failed before a single byte of response arrived (the server closed the
idle connection as the request went out). Nothing is ever sent twice once the
server began to answer. A response the server sends before it has read the
whole request (refusing its size, say) counts like any other. Response bodies
are read, up to 64 KiB, and thrown away; a longer one costs the connection.

Failures to talk to the server are transient, with a reply naming the server
for the operator reading the log:

==========================================  =========================================
what happened                               reply
==========================================  =========================================
connect failed (refused, DNS, unreachable)  ``451 4.4.0 Connection to <host:port>
                                            failed: <error>``
TLS handshake failed (certificate, name)    ``451 4.7.0 TLS negotiation with
                                            <host:port> failed: <error>``
connection lost during the request          ``451 4.4.2 Connection to <host:port>
                                            failed: <error>``
the response is not HTTP                    ``451 4.5.0 Invalid HTTP response from
                                            <host:port>: <error>``
*timeout* passed                            ``451 4.4.2 Connection to <host:port>
                                            timed out after <n> s``
==========================================  =========================================

Requests and responses are logged at DEBUG through
:class:`~slimta.logging.http.HttpLogger`, network errors at
:data:`~slimta.logging.socket.socket_error_log_level`.
"""

from __future__ import annotations

import base64
import http.client
import re
import select
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urlsplit

import gevent
import gevent.monkey

from slimta import logging as slogging
from slimta.http import HTTPConnection, HTTPSConnection, get_connection
from slimta.logging import getHttpLogger, getSocketLogger, logline
from slimta.relay import PermanentRelayError, RelayError, TransientRelayError
from slimta.relay.pool import RelayPool, RelayPoolClient
from slimta.relay.smtp import SmtpRelayError
from slimta.smtp.reply import Reply
from slimta.util._hostname import local_fqdn

if TYPE_CHECKING:
    from gevent.event import AsyncResult

    from slimta.envelope import Envelope

__all__ = ["HttpRelay"]

log = getHttpLogger(__name__)
_socket_log = getSocketLogger(__name__)

#: Largest message body sent in the same write as the request head (bytes);
#: a larger one is sent on its own rather than copied.
_ONE_SEND = 65536

#: Bytes of a response body read (and thrown away) at most; a longer body
#: costs the connection instead.
_MAX_BODY = 65536

#: Characters of ``X-Smtp-Reply`` parsed at most; a longer one is ignored.
_MAX_REPLY_HEADER = 2048

#: Characters of a reason phrase kept in an error reply.
_MAX_REASON = 200

#: 4xx statuses that mean "not now" rather than "never" (RFC 9110 15.5.9,
#: RFC 8470 5.2, RFC 6585 4).
_TRANSIENT_4XX = frozenset({408, 425, 429})

_poll = gevent.monkey.get_original("select", "poll")

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_EHLO_WORD = re.compile(r"[\x21-\x7e]{1,255}")

_OWS = r"[ \t]*"
_CODE = r"([1-5][0-9][0-9])"
#: RFC 9110 5.6.4 quoted-string, its quoted-pairs undone by _unquote.
_QUOTED = r'"((?:[^"\\]|\\.)*)"'
_REPLY = re.compile(
    rf"{_OWS}{_CODE}{_OWS};{_OWS}message{_OWS}={_OWS}{_QUOTED}{_OWS}"
    rf"(?:;{_OWS}command{_OWS}={_OWS}{_QUOTED}{_OWS})?",
    re.IGNORECASE,
)
#: 4.0's WsgiEdge writes the text between quotes as it is, ``"`` included;
#: tried when _REPLY does not match, with a command first.
_LEGACY_REPLIES = (
    re.compile(
        rf'{_OWS}{_CODE}{_OWS};{_OWS}message{_OWS}={_OWS}"(.*)"{_OWS}'
        rf';{_OWS}command{_OWS}={_OWS}"([^"\\]*)"{_OWS}',
        re.IGNORECASE,
    ),
    re.compile(rf'{_OWS}{_CODE}{_OWS};{_OWS}message{_OWS}={_OWS}"(.*)()"{_OWS}', re.IGNORECASE),
)
#: In a legacy text, what looks like the end of it and another parameter.
_PARAMETER = re.compile(rf'"{_OWS};{_OWS}[A-Za-z0-9!#$%&\'*+.^_`|~-]+{_OWS}=')
_QUOTED_PAIR = re.compile(r"\\(.)")


def _unquote(text: str) -> str:
    return _QUOTED_PAIR.sub(r"\1", text)


def _header_text(value: str) -> str:
    """*value* as the server meant it: http.client decodes headers as
    Latin-1, so UTF-8 text arrives as mojibake."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _parse_smtp_reply(value: str, address: Any = None) -> Reply | None:
    """The :class:`~slimta.smtp.reply.Reply` in an ``X-Smtp-Reply`` value.

    :param value: ``<code>; message="<text>"[; command="<command>"]``.
    :param address: the server, for the reply's ``address``.
    :returns: the reply, or ``None`` when *value* is not of that form, holds
        control characters or is too long.
    """
    value = _header_text(value)
    if len(value) > _MAX_REPLY_HEADER or _CONTROL.search(value):
        return None
    match = _REPLY.fullmatch(value)
    if match is not None:
        code, message, command = match.group(1, 2, 3)
        message = _unquote(message)
        command = _unquote(command) if command is not None else None
    else:
        for pattern in _LEGACY_REPLIES:
            match = pattern.fullmatch(value)
            if match is not None:
                break
        else:
            return None
        code, message, command = match.group(1, 2, 3)
        if _PARAMETER.search(message):
            return None
    return Reply(code, message, command=command or None, address=address)


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _clean_reason(reason: str, status: int) -> str:
    reason = _CONTROL.sub(" ", reason).strip()[:_MAX_REASON]
    return reason or f"HTTP {status}"


def _readable_now(sock: Any) -> bool:
    """Whether *sock* has something to read (data, EOF or an error), without
    waiting; an idle kept-alive connection with anything to read is unusable."""
    pending = getattr(sock, "pending", None)
    if pending is not None and pending():
        return True
    try:
        poller = _poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class _ConnectFailed(Exception):
    """Opening a connection failed; carries the relay error to report."""

    def __init__(self, error: TransientRelayError) -> None:
        super().__init__(error)
        self.error = error


class _SendFailed(Exception):
    """Sending a request failed and no response came; carries the error."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class HttpRelayClient(RelayPoolClient):
    """A pool client of :class:`HttpRelay`: delivers its requests over one
    kept-alive connection, opened when needed.

    :param relay: the relay whose queue, settings and header names it uses.
    """

    def __init__(self, relay: HttpRelay) -> None:
        super().__init__(relay.queue, relay.idle_timeout)
        self.relay = relay
        #: The connection, ``None`` when there is none open.
        self.conn: HTTPConnection | HTTPSConnection | None = None
        #: The response whose body is being read, or ``None``.
        self._response: http.client.HTTPResponse | None = None

    # ------------------------------------------------------------- connection
    def _connect(self) -> HTTPConnection | HTTPSConnection:
        relay = self.relay
        conn = get_connection(relay.url, relay.context)
        try:
            conn.connect()
        except OSError as exc:
            _socket_log.error(conn.sock, exc, relay.address)
            _abort(conn)
            if isinstance(exc, ssl.SSLError):
                text = f"TLS negotiation with {relay.where} failed: {_describe(exc)}"
                error = TransientRelayError(text, Reply("451", "4.7.0 " + text))
            else:
                text = f"Connection to {relay.where} failed: {_describe(exc)}"
                error = TransientRelayError(text, Reply("451", "4.4.0 " + text))
            raise _ConnectFailed(error) from None
        except BaseException:
            # A timeout or a kill, maybe mid-handshake: the socket is no one's.
            _abort(conn)
            raise
        self.conn = conn
        return conn

    def _abort(self) -> None:
        """Drop the connection (and any response on it) without ceremony."""
        conn, self.conn = self.conn, None
        response, self._response = self._response, None
        if response is not None:
            response.close()
        if conn is not None:
            _abort(conn)

    def _close(self) -> None:
        """Close an idle connection politely (TLS ``close_notify``)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError as exc:
                _socket_log.error(None, exc, self.relay.address)

    # ---------------------------------------------------------------- request
    def _ehlo(self) -> str:
        ehlo_as = self.relay.ehlo_as
        if ehlo_as is None:
            ehlo = local_fqdn()
        elif callable(ehlo_as):
            ehlo = ehlo_as()
        else:
            ehlo = ehlo_as
        if not isinstance(ehlo, str) or _EHLO_WORD.fullmatch(ehlo) is None:
            raise ValueError("ehlo_as must give one word of printable ASCII", ehlo)
        return ehlo

    def _headers(self, envelope: Envelope, length: int) -> list[tuple[str, str]]:
        relay = self.relay
        headers = [
            ("Content-Length", str(length)),
            ("Content-Type", "message/rfc822"),
            (relay.ehlo_header, self._ehlo()),
            (relay.sender_header, _b64(envelope.sender or "")),
        ]
        headers.extend((relay.recipient_header, _b64(rcpt)) for rcpt in envelope.recipients)
        return headers

    def _send(
        self,
        conn: HTTPConnection | HTTPSConnection,
        headers: list[tuple[str, str]],
        header: bytes,
        body: bytes,
    ) -> http.client.HTTPResponse:
        """Send the request; the response, its head read.

        A failure while sending is not the last word: a server refusing the
        request may have answered and closed before reading it all, so the
        response is read all the same.

        :raises _SendFailed: sending failed and no response came.
        """
        relay = self.relay
        log.request(conn, relay.http_verb, relay.path, headers)
        try:
            conn.putrequest(relay.http_verb, relay.path)
            for name, value in headers:
                conn.putheader(name, value)
            if len(body) <= _ONE_SEND:
                # One send for the request head and a small message, which
                # saves a system call and a delayed-ACK wait on the peer.
                conn.endheaders(header + body)
            else:
                conn.endheaders(header)
                conn.send(body)
        except OSError as send_error:
            try:
                return conn.getresponse()
            except http.client.RemoteDisconnected:
                raise _SendFailed(send_error) from None
        return conn.getresponse()

    def _exchange(self, envelope: Envelope) -> http.client.HTTPResponse:
        """Send *envelope* and read the response head, on the kept-alive
        connection (or a new one), once more on a new connection when the
        kept-alive one turns out closed before any response."""
        header, body = envelope.flatten()
        headers = self._headers(envelope, len(header) + len(body))
        conn = self.conn
        if conn is not None and (conn.sock is None or _readable_now(conn.sock)):
            # The server closed it (or said something unasked) while idle.
            self._abort()
            conn = None
        reused = conn is not None
        if conn is None:
            conn = self._connect()
        failure: OSError
        try:
            return self._send(conn, headers, header, body)
        except _SendFailed as exc:
            # Cut off before the server had all of the request.
            self._abort()
            if not reused:
                raise exc.error from None
            failure = exc.error
        except http.client.RemoteDisconnected as exc:
            # EOF before the first byte of a response.
            self._abort()
            if not reused:
                raise
            failure = exc
        except (OSError, http.client.HTTPException):
            self._abort()
            raise
        _socket_log.error(None, failure, self.relay.address)
        logline(log.log.debug, "http", id(conn), "retry", reason=_describe(failure))
        conn = self._connect()
        try:
            return self._send(conn, headers, header, body)
        except _SendFailed as exc:
            self._abort()
            raise exc.error from None
        except (OSError, http.client.HTTPException):
            self._abort()
            raise

    def _outcome(self, response: http.client.HTTPResponse) -> Reply | RelayError | None:
        """What *response* says about the message."""
        relay = self.relay
        status = response.status
        reply = None
        values = response.headers.get_all("X-Smtp-Reply") or []
        if values:
            reply = _parse_smtp_reply(values[0], relay.address) if len(values) == 1 else None
            success = 200 <= status < 300
            if reply is not None and (reply.code or "")[0] not in ("2" if success else "45"):
                reply = None
            if reply is None:
                logline(
                    log.log.warning,
                    "http",
                    id(self.conn),
                    "bad_smtp_reply",
                    status=status,
                    value=values,
                )
        if 200 <= status < 300:
            return reply
        if reply is not None:
            return SmtpRelayError.factory(reply)
        reason = _clean_reason(response.reason, status)
        if 400 <= status < 500 and status not in _TRANSIENT_4XX:
            return PermanentRelayError(reason)
        return TransientRelayError(reason)

    def _finish(self, response: http.client.HTTPResponse) -> None:
        """Read what the response body holds, so that the connection can
        carry the next request; drop the connection when it cannot."""
        self._response = response
        response.read(_MAX_BODY)
        # A body cut short by EOF leaves length above zero; one longer than
        # _MAX_BODY leaves the response open.
        complete = response.isclosed() and not response.length
        if not complete or response.will_close or response.status < 200:
            self._abort()
        self._response = None

    def _network_error(self, exc: BaseException) -> TransientRelayError:
        where = self.relay.where
        if isinstance(exc, http.client.HTTPException) and not isinstance(exc, OSError):
            text = f"Invalid HTTP response from {where}: {_describe(exc)}"
            return TransientRelayError(text, Reply("451", "4.5.0 " + text))
        text = f"Connection to {where} failed: {_describe(exc)}"
        return TransientRelayError(text, Reply("451", "4.4.2 " + text))

    def _deliver(self, result: AsyncResult, envelope: Envelope) -> bool:
        """Deliver one message and set *result*.

        :returns: whether this client may take another request.
        """
        relay = self.relay
        timer = gevent.Timeout(relay.timeout)
        timer.start()
        try:
            try:
                response = self._exchange(envelope)
            except _ConnectFailed as exc:
                result.set_exception(exc.error)
                return True
            except (OSError, http.client.HTTPException) as exc:
                _socket_log.error(None, exc, relay.address)
                result.set_exception(self._network_error(exc))
                return True
            log.response(self.conn, response.status, response.getheaders())
            outcome = self._outcome(response)
            if isinstance(outcome, RelayError):
                result.set_exception(outcome)
            else:
                result.set(outcome)
            # The outcome stands whatever the body does.
            try:
                self._finish(response)
            except (OSError, http.client.HTTPException) as exc:
                _socket_log.error(None, exc, relay.address)
                self._abort()
            return True
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self._abort()
            text = f"Connection to {relay.where} timed out after {relay.timeout:g} s"
            if not result.ready():
                _socket_log.error(None, TimeoutError(text), relay.address)
                result.set_exception(TransientRelayError(text, Reply("451", "4.4.2 " + text)))
            return True
        except Exception as exc:
            slogging.log_exception(__name__)
            self._abort()
            if not result.ready():
                result.set_exception(exc)
            return False
        finally:
            timer.close()
            if not result.ready():
                # Killed mid-request: the queue tries again later.
                self._abort()
                text = f"Delivery to {relay.where} interrupted"
                result.set_exception(TransientRelayError(text, Reply("451", "4.3.0 " + text)))

    # -------------------------------------------------------------------- run
    def _run(self) -> None:
        try:
            result, envelope = self.poll()
            while result is not None and envelope is not None:
                if not self._deliver(result, envelope) or self.idle_timeout is None:
                    break
                result, envelope = self.poll()
        finally:
            self._close()


def _abort(conn: HTTPConnection | HTTPSConnection) -> None:
    """Close *conn*'s socket at once: no TLS ``close_notify`` to wait on."""
    sock, conn.sock = conn.sock, None
    conn.close()
    if sock is not None:
        try:
            sock.close()
        except OSError as exc:
            _socket_log.error(sock, exc)


def _b64(text: str) -> str:
    # surrogateescape: an address holding undecodable bytes travels as those
    # bytes, for the server to judge.
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii")


class HttpRelay(RelayPool):
    """Delivers each message with an HTTP (or HTTPS) request, reusing
    connections; the mirror image of :class:`~slimta.edge.wsgi.WsgiEdge`.

    :param url: where to send, e.g. ``'https://mail.example.com:8443/deliver'``
        (``http`` when no scheme is given); the path and query make the
        request target.
    :param pool_size: most connections at once; ``None`` is unbounded.
    :param context: the client :class:`ssl.SSLContext` for an ``https`` URL;
        ``ssl.create_default_context()`` when ``None``, so the certificate
        and host name are verified.
    :param ehlo_as: the ``X-Ehlo`` name, or a zero-argument callable giving
        it for each request; defaults to :func:`socket.getfqdn`.
    :param timeout: seconds each request may take in all (connecting,
        sending, the response and its body); ``None`` for no limit.
    :param idle_timeout: seconds a connection is kept open for the next
        message; ``None`` closes it after each message.
    :raises ValueError: the URL is not ``http`` or ``https``, has a bad port,
        or holds user information (credentials are not sent).

    .. versionchanged:: 4.0
       *context* replaces the ``tls`` dict; *ehlo_as* added. A connection the
       server closed while idle is replaced, and a request it cut off before
       any response is sent again once. Connection failures are transient
       errors naming the server; 408, 425 and 429 responses are transient.
    """

    #: The request method.
    http_verb = "POST"
    #: The header holding the base64 sender.
    sender_header = "X-Envelope-Sender"
    #: The header holding one base64 recipient; repeated for each.
    recipient_header = "X-Envelope-Recipient"
    #: The header holding the EHLO name.
    ehlo_header = "X-Ehlo"

    def __init__(
        self,
        url: str,
        pool_size: int | None = None,
        context: ssl.SSLContext | None = None,
        ehlo_as: str | Callable[[], str] | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        super().__init__(pool_size)
        parts = urlsplit(url, "http")
        if parts.scheme not in ("http", "https"):
            raise ValueError("HttpRelay needs an http or https URL", url)
        if parts.username is not None:
            raise ValueError("HttpRelay does not send credentials from the URL", parts.hostname)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or "localhost"
        #: The URL, split.
        self.url: SplitResult = parts
        #: The request target: the URL's path and query.
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        #: ``(host, port)`` of the server.
        self.address = (host, port)
        #: ``host:port``, as error replies name the server.
        self.where = _where(host, port)
        if context is None and parts.scheme == "https":
            context = ssl.create_default_context()
        #: The client TLS context (``https`` only).
        self.context = context
        self.ehlo_as = ehlo_as
        self.timeout = timeout
        self.idle_timeout = idle_timeout

    def add_client(self) -> RelayPoolClient:
        """A new client on this relay's queue."""
        return HttpRelayClient(self)
