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
from slimta.smtp._state import ST_BDAT, ST_DATA, ST_READY
from slimta.smtp.auth import AuthSession, ServerAuthError, build_sasl, mask_auth_line
from slimta.smtp.extensions import Extensions
from slimta.smtp.io import IO, RECV_SIZE, BoundedWait, inner_socket
from slimta.smtp.reply import Reply
from slimta.smtp.reply import _unchecked_reply as _reply

__all__ = ["Server"]

log = getSocketLogger(__name__)

#: Seconds a TLS handshake may take before the session is dropped.
TLS_HANDSHAKE_TIMEOUT = 30.0
#: Verbs the handlers object may never be asked to serve as custom commands.
_RESERVED = frozenset({"CLOSE", "TLSHANDSHAKE", "TLSHANDSHAKE2"})
_NOT_IMPLEMENTED = frozenset({"EXPN", "HELP", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML"})


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
        self.hostname = hostname or _default_hostname()
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
        self._raw_sock: Any = None
        self._wait_readable: Callable[[], None] | None = None
        self._bounded = BoundedWait()
        # Per-read debug logging is decided once per session: it is hot.
        self._log_io = log.log.isEnabledFor(logging.DEBUG)
        self._park_remaining: float | None = None
        self._park_watchers: tuple[Any, Any] | None = None
        self._timeout: float | None = None
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
        return self._conn.state.name not in ("GREETING", "NO_SERVICE")

    @property
    def ehlo_as(self) -> str | None:
        """The name given with the last accepted EHLO/HELO."""
        return self._ehlo_as

    @property
    def have_mailfrom(self) -> bool:
        """True while a MAIL command is accepted."""
        return self._conn.state.name in ("MAIL", "RCPT", "DATA", "BDAT")

    @property
    def have_rcptto(self) -> bool:
        """True once a recipient is accepted in the current transaction."""
        return self._conn.state.name in ("RCPT", "DATA", "BDAT")

    @property
    def authed(self) -> bool:
        """True after a successful AUTH."""
        return self._conn.authenticated

    # ----------------------------------------------------------------- public
    def handle(self) -> None:
        """Run the session until QUIT, a 221/421 reply, or disconnect.

        :raises ConnectionLost: when the peer disconnects or times out.
        """
        self._start()
        self._run(None)

    # ------------------------------------------------- session driving (edge)
    def _start(self) -> None:
        """Implicit TLS if configured, then the greeting."""
        if self.tls_immediately:
            if self.context is None:
                raise ValueError("tls_immediately needs a context")
            if not self._encrypt():
                raise ConnectionLost()
        self._greet()
        self._use_socket()

    def _run(self, park_after: float | None) -> bool:
        """Serve commands until the session ends, or until it parks.

        With *park_after*, a plain-text session that waits that long for its
        next command returns ``True`` without closing anything: the caller
        then :meth:`_park` s it so that an idle connection holds no greenlet.
        """
        conn = self._conn
        try:
            return self._loop(conn, park_after)
        except TimeoutError:
            self._send_timeout(conn)
        except gevent.GreenletExit:
            self._final_reply(conn, "421", "4.3.2 Service shutting down")
            raise
        return False

    def _park(self, on_wake: Callable[[bool], None]) -> None:
        """Wait for the next command in the event loop, not in a greenlet.

        *on_wake* runs in the hub once, with ``True`` if the command timeout
        expired first; the caller then continues with :meth:`_resume`.
        """
        loop = gevent.get_hub().loop
        watcher = loop.io(self.io.socket.fileno(), 1)
        remaining = self._park_remaining
        timer = loop.timer(remaining) if remaining is not None else None
        self._park_watchers = (watcher, timer)

        def wake(timed_out: bool) -> None:
            self._stop_park()
            on_wake(timed_out)

        watcher.start(wake, False)
        if timer is not None:
            timer.start(wake, True)

    def _stop_park(self) -> None:
        """Stop waiting in the event loop (woken, or shut down while parked)."""
        watchers = self._park_watchers
        self._park_watchers = None
        if watchers is not None:
            for watcher in watchers:
                if watcher is not None:
                    watcher.stop()
                    watcher.close()

    def _resume(self, timed_out: bool, park_after: float | None) -> bool:
        """Continue a parked session in a new greenlet; see :meth:`_run`."""
        if timed_out:
            self._send_timeout(self._conn)
        return self._run(park_after)

    def _loop(self, conn: ServerConnection, park_after: float | None) -> bool:
        handlers = self.handlers
        dispatch = _DISPATCH
        need_data = ev.NeedData
        served = 0
        while True:
            event = conn.next_event()
            cls = event.__class__
            if cls is need_data:
                out = conn.data_to_send()
                if out:
                    self._send(out)
                if served >= _FAIR_SHARE:
                    # A client that never makes us wait must not starve the
                    # other sessions.
                    served = 0
                    gevent.sleep(0)
                data = None
                raw = self._raw_sock
                if raw is not None and not out:
                    # Fast path: the next command is often here already, and
                    # then no timeout needs arming. Not right after a reply:
                    # what comes next is the client's answer to it, which
                    # cannot be here yet, and a read would only fail.
                    try:
                        data = raw.recv(RECV_SIZE)
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        raise ConnectionLost() from exc
                    else:
                        if not data:
                            raise ConnectionLost()
                        if self._log_io:
                            self._log_recv(raw, data)
                if data is None:
                    served = 0
                    data = self._recv(conn, park_after, raw is not None and not out)
                    if data is None:
                        return True
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
        raw = inner_socket(sock)
        # A plain gevent socket is read and written through its inner socket
        # and waited on with the session's own timers, which costs far less
        # per command than gevent's per-wait Timeout objects. Anything else
        # (TLS, a foreign socket) goes through its own methods.
        if raw is not None:
            wait, read_event = sock._wait, sock._read_event
            self._raw_sock = raw
            self._wait_readable = lambda: wait(read_event)
            sock.settimeout(None)
            self._timeout = None
        else:
            self._raw_sock = None
            self._wait_readable = None
            self._timeout = self.command_timeout
            sock.settimeout(self._timeout)

    def _send(self, data: bytes) -> None:
        raw = self._raw_sock
        if raw is not None:
            # Fast path: one non-blocking send() usually takes a whole reply;
            # gevent's sendall() costs a getsockopt() and more per call.
            try:
                sent = raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise ConnectionLost() from exc
            if sent == len(data):
                if self._log_io:
                    log.send(raw, data)
                return
            data = data[sent:]
        self.io.raw_send(data)

    def _recv(
        self, conn: ServerConnection, park_after: float | None, tried: bool = False
    ) -> bytes | None:
        """Read the next bytes, waiting under the session's timeouts.

        *tried* says the caller's non-blocking read just found nothing.
        """
        sock = self.io.socket
        state = conn.state
        timeout: float | None
        parking = False
        if (state is ST_DATA or state is ST_BDAT) and self.data_timeout is not None:
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
                and self._raw_sock is not None
                and state is not ST_DATA
                and state is not ST_BDAT
                and (timeout is None or park_after < timeout)
            ):
                parking = True
                timeout = park_after
        try:
            wait_readable = self._wait_readable
            if wait_readable is not None:
                data = self._recv_raw(wait_readable, timeout, tried)
            else:
                if timeout != self._timeout:
                    sock.settimeout(timeout)
                    self._timeout = timeout
                data = sock.recv(RECV_SIZE)
        except TimeoutError:
            if not parking:
                raise
            deadline = self._command_deadline
            self._park_remaining = (
                None if deadline is None else max(0.0, deadline - time.monotonic())
            )
            return None
        except OSError as exc:
            raise ConnectionLost() from exc
        if not data:
            raise ConnectionLost()
        if self._log_io:
            self._log_recv(sock, data)
        return data

    def _recv_raw(
        self, wait_readable: Callable[[], None], timeout: float | None, tried: bool
    ) -> bytes:
        """Read the plain socket, waiting at most *timeout* seconds for data."""
        raw = self._raw_sock
        while True:
            if not tried:
                try:
                    data: bytes = raw.recv(RECV_SIZE)
                except BlockingIOError:
                    pass
                else:
                    return data
            tried = False
            self._bounded.wait(timeout, wait_readable)

    def _send_timeout(self, conn: ServerConnection) -> None:
        self._final_reply(conn, "421", "4.4.2 Connection timed out", newline_first=True)
        raise ConnectionLost("Connection timed out")

    def _final_reply(
        self, conn: ServerConnection, code: str, message: str, newline_first: bool = False
    ) -> None:
        conn.close(code, message, newline_first)
        try:
            self.io.socket.settimeout(5.0)
            self.io.raw_send(conn.data_to_send())
        except (OSError, ConnectionLost):
            pass

    def _greet(self) -> None:
        reply = _reply("220", False, f"{self.hostname} ESMTP slimta")
        self._call("BANNER_", reply)
        self._conn.greet(reply.code or "421", reply.wire_text())

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
            conn.respond("451", "4.3.0 Reply without a code", reply.newline_first)
            return
        conn.respond(code, reply.wire_text(), reply.newline_first)

    def _on_ehlo(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("250", False, f"{self.hostname} Hello {event.name}")
        self._call("EHLO", reply, event.name)
        if reply.code == "250":
            self._ehlo_as = event.name
        self._respond(conn, reply)

    def _on_helo(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("250", False, f"{self.hostname} Hello {event.name}")
        self._call("HELO", reply, event.name)
        if reply.code == "250":
            self._ehlo_as = event.name
        self._respond(conn, reply)

    def _on_mail(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("250", "2.1.0", f"Sender <{event.address}> Ok")
        self._call("MAIL", reply, event.address, event.params)
        self._respond(conn, reply)

    def _on_rcpt(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("250", "2.1.5", f"Recipient <{event.address}> Ok")
        self._call("RCPT", reply, event.address, event.params)
        self._respond(conn, reply)

    def _on_data(self, conn: ServerConnection, event: Any) -> None:
        reply = _reply("354", False, "Start mail input; end with <CRLF>.<CRLF>")
        self._call("DATA", reply)
        self._respond(conn, reply)
        if self.data_timeout is not None and conn.state is not ST_READY:
            # The whole content must arrive within data_timeout from now.
            self._data_deadline = time.monotonic() + self.data_timeout

    def _on_message(self, conn: ServerConnection, event: Any) -> None:
        self._data_deadline = None
        reply = _reply("250", "2.6.0", "Message accepted for delivery")
        self._call("HAVE_DATA", reply, event.data, None)
        self._respond(conn, reply)

    def _on_refused(self, conn: ServerConnection, event: Any) -> None:
        self._data_deadline = None
        reply = Reply(event.code, event.message)
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
        if event.verb in _NOT_IMPLEMENTED:
            reply = _reply("502", "5.5.1", "Command not implemented")
        else:
            reply = _reply("500", "5.5.1", "Command unrecognized")
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
        self.io.raw_send(conn.data_to_send())
        if not self._encrypt():
            raise ConnectionLost("TLS handshake failed")
        self._ehlo_as = None
        self._use_socket()

    def _on_auth(self, conn: ServerConnection, event: Any) -> None:
        auth = self._auth
        if auth is None:
            self._respond(conn, Reply("502", "5.5.1 Command not implemented"))
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

    def _log_recv(self, sock: Any, data: bytes) -> None:
        """Log received bytes, with SASL data masked when AUTH is offered."""
        if self._auth is not None:
            data = _mask_sasl(data, self._in_sasl)
        log.recv(sock, data)

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
                self._send(conn.data_to_send())
                data = self._recv(conn, None)
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
    ev.Ehlo: Server._on_ehlo,
    ev.Helo: Server._on_helo,
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

_FQDN: str | None = None
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
#: Commands a session may serve in a row without giving other sessions a turn.
_FAIR_SHARE = 32


def _default_hostname() -> str:
    # getfqdn() can cost a DNS lookup: do it once per process.
    global _FQDN
    if _FQDN is None:
        _FQDN = _socket.getfqdn()
    return _FQDN
