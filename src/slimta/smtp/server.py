"""One SMTP server session over a gevent socket: the adapter over the core.

:class:`Server` reads from the socket, feeds :class:`~slimta.smtp._server.ServerConnection`,
calls the 4.0 handler callbacks (``EHLO``, ``MAIL``, ``HAVE_DATA``, ...) with a
mutable :class:`~slimta.smtp.reply.Reply`, and writes the reply bytes. It owns
timeouts and TLS wrapping; every SMTP rule lives in the core.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import socket as _socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import Timeout

from slimta import logging as slogging
from slimta.logging import getSocketLogger
from slimta.smtp import ConnectionLost, MessageTooBig, RemoteProtocolError
from slimta.smtp import _events as ev
from slimta.smtp._server import ServerConnection
from slimta.smtp._sockio import RECV_SIZE, LoopWait, SocketIO
from slimta.smtp._state import BANNERED, HAVE_MAIL, HAVE_RCPT, RECEIVING_CONTENT
from slimta.smtp.auth import AuthSession, ServerAuthError, build_sasl, mask_auth_line
from slimta.smtp.extensions import Extensions
from slimta.smtp.io import IO
from slimta.smtp.reply import Reply
from slimta.smtp.reply import _unchecked_reply as _reply
from slimta.util._hostname import local_fqdn

__all__ = ["Server"]

log = getSocketLogger(__name__)

#: Seconds a TLS handshake may take before the session is dropped.
TLS_HANDSHAKE_TIMEOUT = 30.0
#: Verbs the handlers object may never be asked to serve as custom commands.
_RESERVED = frozenset({"CLOSE", "TLSHANDSHAKE", "TLSHANDSHAKE2"})
#: Seconds a last reply (timeout, shutdown) may take to go out.
_FINAL_REPLY_TIMEOUT = 5.0


def _mask_sasl(data: bytes, in_sasl: bool) -> bytes:
    """*data* as it may be logged: the SASL data of AUTH lines and of
    responses to challenges replaced by ``********``. Once an AUTH line is
    seen, the rest of *data* is treated as responses."""
    lines = data.split(b"\n")
    for index, line in enumerate(lines):
        if not line.strip(b"\r"):
            continue
        if in_sasl:
            lines[index] = mask_auth_line(line)
        elif line[:5].upper() == b"AUTH ":
            lines[index] = mask_auth_line(line)
            in_sasl = True
    return b"\n".join(lines)


class _AuthAborted(Exception):
    """The SASL exchange was ended by the core while the adapter waited in it."""


class Server:
    """Runs one SMTP server session on an accepted socket.

    :param socket: the connected socket.
    :param handlers: any object; the methods named in the 4.0 documentation
        (``BANNER_``, ``EHLO``, ``HELO``, ``STARTTLS``, ``TLSHANDSHAKE``,
        ``AUTH``, ``MAIL``, ``RCPT``, ``DATA``, ``HAVE_DATA``, ``RSET``,
        ``NOOP``, ``QUIT``, ``VRFY``, custom verbs, ``CLOSE``) are called when
        present, each with a :class:`Reply` it may change.
    :param auth: ``False``, ``True`` or a list of SASL mechanism names.
    :param context: a server :class:`ssl.SSLContext`; enables STARTTLS, or
        implicit TLS with *tls_immediately*.
    :param tls_immediately: wrap the socket before the banner (port 465).
    :param command_timeout: seconds to wait for each command.
    :param data_timeout: seconds for the whole message content; defaults to
        *command_timeout*.
    :param hostname: the server name used in the default greeting and EHLO
        reply (RFC 5321 4.1.1.1, 4.3.1); defaults to the host's FQDN.
    :param max_recipients: accepted RCPTs per message; beyond, 452 4.5.3.
    :param max_errors: protocol errors per session before 421 4.7.0.
    :param tls_handshake_timeout: seconds a TLS handshake may take.

    .. versionchanged:: 4.0
       *context* replaces the ``tls`` dict; keyword-only *hostname*,
       *max_recipients*, *max_errors* and *tls_handshake_timeout* are new.
    """

    def __init__(
        self,
        socket: Any,
        handlers: Any,
        auth: bool | list[bytes] | list[str] = False,
        context: ssl.SSLContext | None = None,
        tls_immediately: bool = False,
        command_timeout: float | None = None,
        data_timeout: float | None = None,
        *,
        hostname: str | None = None,
        address: Any = None,
        max_recipients: int = 1000,
        max_errors: int = 20,
        tls_handshake_timeout: float | None = TLS_HANDSHAKE_TIMEOUT,
    ) -> None:
        self.handlers = handlers
        self.io = IO(socket, address)
        self.context = context
        self.tls_immediately = tls_immediately
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout if data_timeout is not None else command_timeout
        self.tls_handshake_timeout = tls_handshake_timeout
        self.hostname = hostname or local_fqdn()
        self.auth = auth
        #: The ESMTP extensions EHLO advertises; change before :meth:`handle`.
        self.extensions = ext = Extensions()
        ext.extensions.update(_DEFAULT_EXTENSIONS)
        if context is not None and not tls_immediately:
            ext.add("STARTTLS")
        sasl = build_sasl(auth)
        self._auth = AuthSession(sasl, self.io, lambda: self._conn.encrypted) if sasl else None
        # Whether the next bytes read answer a SASL challenge (for the log).
        self._in_sasl = False
        if self._auth is not None:
            ext.add("AUTH", self._auth)
        self._sockio = SocketIO(socket)
        self._direct = False
        # Per-read debug logging is decided once per session: it is hot.
        self._log_io = log.log.isEnabledFor(logging.DEBUG)
        self._started = False
        self._park_remaining: float | None = None
        self._park: LoopWait | None = None
        self._park_expired = False
        self._data_deadline: float | None = None
        self._command_deadline: float | None = None
        self._ehlo_as: str | None = None
        self._conn = ServerConnection(
            ext, max_recipients=max_recipients, max_errors=max_errors, encrypted=False
        )

    # -------------------------------------------------------------- 4.0 state
    @property
    def encrypted(self) -> bool:
        """True when the session runs under TLS."""
        return self._conn.encrypted

    @property
    def bannered(self) -> bool:
        """True once a 220 greeting was sent."""
        return self._conn.state in BANNERED

    @property
    def ehlo_as(self) -> str | None:
        """The name given with the last accepted EHLO/HELO."""
        return self._ehlo_as

    @property
    def have_mailfrom(self) -> bool:
        """True while a MAIL command is accepted."""
        return self._conn.state in HAVE_MAIL

    @property
    def have_rcptto(self) -> bool:
        """True once a recipient is accepted in the current transaction."""
        return self._conn.state in HAVE_RCPT

    @property
    def authed(self) -> bool:
        """True after a successful AUTH."""
        return self._conn.authenticated

    # ----------------------------------------------------------------- public
    def handle(self) -> None:
        """Run the session until QUIT, a 221/421 reply, or disconnect.

        :raises ConnectionLost: when the peer disconnects or times out.
        """
        self.serve()

    def serve(self, park_after: float | None = None) -> bool:
        """Run the session: the first call starts it (implicit TLS, then the
        greeting), later calls go on where it stopped.

        :param park_after: seconds a plain-text session may wait for the
            client's next command before this returns ``True``, leaving
            everything open; the caller then calls :meth:`park` so that the
            idle connection holds no greenlet. ``None`` never returns early.
        :returns: ``False`` once the session is over (the caller closes the
            socket), ``True`` when it went idle.
        :raises ConnectionLost: the client left, or its time ran out (the
            ``421 4.4.2`` timeout reply has been sent).

        .. versionadded:: 4.0
        """
        if not self._started:
            self._started = True
            self._start()
        elif self._park_expired:
            self._park_expired = False
            self._send_timeout()
        try:
            return self._loop(self._conn, park_after)
        except TimeoutError:
            self._send_timeout()
        except gevent.GreenletExit:
            self._final_reply(421, "4.3.2 Service shutting down")
            raise
        return False

    def park(self, on_wake: Callable[[], None]) -> None:
        """Wait for the client's next bytes in the event loop, not in a greenlet.

        Call it after :meth:`serve` returned ``True``. *on_wake* runs once,
        in the hub, when the client sends something or closes, or when the
        command timeout runs out; it should then call :meth:`serve` again in
        a greenlet of its own, which answers the command or sends the
        timeout reply.

        .. versionadded:: 4.0
        """

        def wake(timed_out: bool) -> None:
            self._park = None
            self._park_expired = timed_out
            on_wake()

        self._park = LoopWait(self.io.socket.fileno(), self._park_remaining, wake)

    @property
    def parked(self) -> bool:
        """True while the session waits in the event loop (see :meth:`park`)."""
        return self._park is not None

    def stop(self, code: str = "421", message: str = "4.3.2 Service shutting down") -> None:
        """End the session now with a last reply, parked or not.

        The reply is sent as well as the connection allows, without
        waiting long; the socket stays open for the caller to close.

        .. versionadded:: 4.0
        """
        self._stop_park()
        self._final_reply(int(code), message)

    # ------------------------------------------------------------- internals
    def _start(self) -> None:
        """Implicit TLS if configured, then the greeting."""
        if self.tls_immediately:
            if self.context is None:
                raise ValueError("tls_immediately needs a context")
            if not self._encrypt():
                raise ConnectionLost()
        self._greet()
        self._use_socket()

    def _stop_park(self) -> None:
        park = self._park
        self._park = None
        if park is not None:
            park.cancel()

    def _loop(self, conn: ServerConnection, park_after: float | None) -> bool:
        handlers = self.handlers
        dispatch = _DISPATCH
        need_data = ev.NeedData
        sockio = self._sockio
        served = 0
        while True:
            event = conn.next_event()
            cls = event.__class__
            if cls is need_data:
                out = conn.data_to_send()
                if out:
                    sockio.send(out, self.command_timeout)
                    if self._log_io:
                        log.send(sockio.sock, out)
                if served >= _FAIR_SHARE:
                    # A client that never makes us wait must not starve the
                    # other sessions.
                    served = 0
                    gevent.sleep(0)
                # The next command is often here already, and then no timer
                # needs arming. Not right after a reply: the client's answer
                # to it cannot be here yet.
                data = None if out else sockio.recv_nowait()
                if data is None:
                    served = 0
                    data = self._recv(conn, park_after, wait_first=not out)
                    if data is None:
                        return True
                elif self._log_io:
                    self._log_recv(data)
                conn.receive_data(data)
                if len(data) == RECV_SIZE:
                    # A flood of input must not starve the other sessions.
                    gevent.sleep(0)
                continue
            served += 1
            if cls is ev.ConnectionClosed:
                out = conn.data_to_send()
                if out:
                    self._send(out)
                close = getattr(handlers, "CLOSE", None)
                if close is not None:
                    close()
                return False
            self._command_deadline = None
            try:
                dispatch[cls](self, conn, event)
            except _AuthAborted:
                # The core ended the exchange and has already answered.
                continue

    # --------------------------------------------------------------- helpers
    def _use_socket(self) -> None:
        sock = self.io.socket
        sockio = self._sockio
        if sockio.sock is not sock:
            sockio.use(sock)
        self._direct = sockio.direct
        if self._direct:
            # Waits are bounded by the session's own timers, not the socket's.
            sock.settimeout(None)

    def _send(self, data: bytes, timeout: float | None = None) -> None:
        self._sockio.send(data, timeout if timeout is not None else self.command_timeout)
        if self._log_io:
            log.send(self.io.socket, data)

    def _recv(
        self, conn: ServerConnection, park_after: float | None, wait_first: bool = False
    ) -> bytes | None:
        """Read the next bytes, waiting under the session's timeouts; ``None``
        when *park_after* passed first."""
        timeout: float | None
        parking = False
        # The core's receiving_content, without a property call per read.
        content = conn.state in RECEIVING_CONTENT
        if content and self.data_timeout is not None:
            # data_timeout bounds the whole transfer, not each read.
            now = time.monotonic()
            deadline = self._data_deadline
            if deadline is None:
                deadline = self._data_deadline = now + self.data_timeout
            timeout = deadline - now
            if timeout <= 0:
                raise TimeoutError()
        else:
            self._data_deadline = None
            timeout = self.command_timeout
            if timeout is not None:
                # command_timeout bounds a whole command line, however slowly
                # its bytes trickle in.
                now = time.monotonic()
                deadline = self._command_deadline
                if deadline is None:
                    deadline = self._command_deadline = now + timeout
                timeout = deadline - now
                if timeout <= 0:
                    raise TimeoutError()
            if (
                park_after is not None
                and self._direct
                and not content
                and (timeout is None or park_after < timeout)
            ):
                parking = True
                timeout = park_after
        try:
            data = self._sockio.recv(timeout, wait_first)
        except TimeoutError:
            if not parking:
                raise
            deadline = self._command_deadline
            self._park_remaining = (
                None if deadline is None else max(0.0, deadline - time.monotonic())
            )
            return None
        if self._log_io:
            self._log_recv(data)
        return data

    def _send_timeout(self) -> None:
        self._final_reply(421, "4.4.2 Connection timed out", newline_first=True)
        raise ConnectionLost("Connection timed out")

    def _final_reply(self, code: int, message: str, newline_first: bool = False) -> None:
        conn = self._conn
        conn.close(code, message, newline_first)
        with contextlib.suppress(OSError, ConnectionLost):
            self._send(conn.data_to_send(), _FINAL_REPLY_TIMEOUT)

    def _greet(self) -> None:
        reply = _reply("220", False, f"{self.hostname} ESMTP slimta")
        self._call("BANNER_", reply)
        self._conn.greet(int(reply.code or 421), reply.wire_text())

    def _call(self, name: str, reply: Reply, *args: Any) -> None:
        method = getattr(self.handlers, name, None)
        if method is None:
            return
        try:
            method(reply, *args)
        except (ConnectionLost, Timeout, gevent.GreenletExit):
            raise
        except Exception:
            slogging.log_exception(__name__)
            reply.code = "451"
            reply.message = "4.3.0 Unhandled system error"

    def _respond(self, conn: ServerConnection, reply: Reply) -> None:
        code = reply._code
        if code is None:
            conn.respond(451, "4.3.0 Reply without a code", reply.newline_first)
            return
        try:
            value = _CODE_VALUE[code]
        except KeyError:
            value = int(code)
        conn.respond(value, reply.wire_text(), reply.newline_first)

    def _on_hello(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("250", False, f"{self.hostname} Hello {event.name}")
        self._call("EHLO" if event.__class__ is ev.Ehlo else "HELO", reply, event.name)
        if reply.code == "250":
            self._ehlo_as = event.name
        self._respond(conn, reply)

    def _on_mail(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("250", "2.1.0", f"Sender <{event.address}> Ok")
        params = event.params
        self._call("MAIL", reply, event.address, dict(params) if params else {})
        self._respond(conn, reply)

    def _on_rcpt(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("250", "2.1.5", f"Recipient <{event.address}> Ok")
        params = event.params
        self._call("RCPT", reply, event.address, dict(params) if params else {})
        self._respond(conn, reply)

    def _on_data(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("354", False, "Start mail input; end with <CRLF>.<CRLF>")
        self._call("DATA", reply)
        self._respond(conn, reply)
        if self.data_timeout is not None and conn.receiving_content:
            # The whole content must arrive within data_timeout from now.
            self._data_deadline = time.monotonic() + self.data_timeout

    def _on_message(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("250", "2.6.0", "Message accepted for delivery")
        self._call("HAVE_DATA", reply, event.data, None)
        self._respond(conn, reply)

    def _on_refused(self, conn: ServerConnection, event: Any) -> None:
        reply = Reply(str(event.code), event.message)
        err: Exception = MessageTooBig() if event.too_big else RemoteProtocolError(reply)
        self._call("HAVE_DATA", reply, None, err)
        self._respond(conn, reply)

    def _on_rset(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("250", "2.0.0", "Ok")
        self._call("RSET", reply)
        self._respond(conn, reply)

    def _on_noop(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("250", "2.0.0", "Ok")
        self._call("NOOP", reply)
        self._respond(conn, reply)

    def _on_quit(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("221", "2.0.0", "Bye")
        self._call("QUIT", reply)
        self._respond(conn, reply)

    def _on_vrfy(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply(
            "252", "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"
        )
        self._call("VRFY", reply, event.argument, self)
        self._respond(conn, reply)

    def _on_unknown(self, conn: ServerConnection, event: Any) -> None:
        # The core suggests 502 or 500 (RFC 5321 4.2.4); a handler may
        # implement the verb instead.
        reply = Reply(str(event.code), event.message)
        if event.verb not in _RESERVED:
            self._call(event.verb, reply, event.argument, self)
        self._respond(conn, reply)

    def _on_starttls(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("220", "2.0.0", "Ready to start TLS")
        self._call("STARTTLS", reply, self.extensions)
        self._respond(conn, reply)
        if reply.code != "220" or conn.closed:
            return
        # The core has already dropped any plaintext pipelined after STARTTLS.
        self._send(conn.data_to_send())
        if not self._encrypt():
            raise ConnectionLost("TLS handshake failed")
        self._ehlo_as = None
        self._use_socket()

    def _on_auth(self, conn: ServerConnection, event: Any) -> None:
        auth = self._auth
        if auth is None:
            self._respond(conn, _reply("502", "5.5.1", "Command not implemented"))
            return

        def challenge(data: bytes) -> str:
            conn.challenge(base64.b64encode(data).decode("ascii"))
            return self._next_auth_line(conn)

        try:
            creds = auth.server_attempt(event.mechanism, event.initial_response, challenge)
        except ServerAuthError as exc:
            self._respond(conn, exc.reply)
            return
        reply = _reply("235", "2.7.0", "Authentication successful")
        self._call("AUTH", reply, creds)
        self._respond(conn, reply)

    def _on_auth_aborted(self, conn: ServerConnection, event: Any) -> None:
        """Nothing to do: the core answered already."""

    def _log_recv(self, data: bytes) -> None:
        """Log received bytes, with SASL data masked when AUTH is offered."""
        if self._auth is not None:
            data = _mask_sasl(data, self._in_sasl)
        log.recv(self.io.socket, data)

    def _next_auth_line(self, conn: ServerConnection) -> str:
        """Read the client's answer to a 334 challenge."""
        self._in_sasl = True
        try:
            return self._read_auth_line(conn)
        finally:
            self._in_sasl = False

    def _read_auth_line(self, conn: ServerConnection) -> str:
        while True:
            event = conn.next_event()
            cls = event.__class__
            if cls is ev.AuthResponse:
                return event.line  # type: ignore[attr-defined, no-any-return]
            if cls is ev.NeedData:
                out = conn.data_to_send()
                if out:
                    self._send(out)
                data = self._recv(conn, None, wait_first=bool(out))
                assert data is not None
                conn.receive_data(data)
                continue
            if cls is ev.AuthAborted:
                raise _AuthAborted()
            # Only the end of input can come here otherwise.
            raise ConnectionLost()

    def _encrypt(self) -> bool:
        context = self.context
        assert context is not None
        io = self.io
        try:
            # TLS 1.3 servers send session tickets after the handshake; with
            # Nagle on, the next small reply would wait for their ACK, which
            # the client delays: a 40 ms stall per session.
            with contextlib.suppress(OSError):
                io.socket.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            with Timeout(self.tls_handshake_timeout, False):
                io.socket.settimeout(None)
                if io.encrypt_socket_server(context):
                    self._conn.encrypted = True
                    method = getattr(self.handlers, "TLSHANDSHAKE", None)
                    if method is not None:
                        method()
                    return True
                return False
        except OSError as exc:
            log.error(io.socket, exc, io.address)
        return False


_DISPATCH: dict[type, Callable[[Server, ServerConnection, Any], None]] = {
    ev.Ehlo: Server._on_hello,
    ev.Helo: Server._on_hello,
    ev.MailFrom: Server._on_mail,
    ev.RcptTo: Server._on_rcpt,
    ev.Data: Server._on_data,
    ev.MessageReceived: Server._on_message,
    ev.MessageRefused: Server._on_refused,
    ev.Rset: Server._on_rset,
    ev.Noop: Server._on_noop,
    ev.Quit: Server._on_quit,
    ev.Vrfy: Server._on_vrfy,
    ev.UnknownCommand: Server._on_unknown,
    ev.StartTls: Server._on_starttls,
    ev.Auth: Server._on_auth,
    ev.AuthAborted: Server._on_auth_aborted,
}

#: Extensions every session advertises, in order (RFC 6531 wants 8BITMIME
#: beside SMTPUTF8; BINARYMIME needs CHUNKING).
_DEFAULT_EXTENSIONS = dict.fromkeys(
    (
        "8BITMIME",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
        "BINARYMIME",
        "DSN",
    )
)
#: The value of each reply code's text: a lookup costs less than int().
_CODE_VALUE = {str(code): code for code in range(100, 600)}
#: Commands a session may serve in a row without giving other sessions a turn.
_FAIR_SHARE = 32
