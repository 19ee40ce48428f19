"""SMTP and LMTP clients over a connected gevent socket.

:class:`Client` is a thin adapter over the sans-IO
:class:`~slimta.smtp._client.ClientConnection`: it writes the bytes the core
produces, reads until the core has the replies it waits for, and does the
TLS wrapping. Reads and writes are bounded by :attr:`Client.deadline` when
it is set; otherwise callers bound each call with a :class:`gevent.Timeout`
of their own.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any, cast

import gevent.monkey

from slimta.logging import getSocketLogger
from slimta.smtp import BadReply, ConnectionLost
from slimta.smtp._client import (
    SMTPUTF8_REQUIRED,
    ClientConnection,
    bdat_frames,
    choose_mechanism,
    dot_stuff,
    mail_argument,
    rcpt_argument,
)
from slimta.smtp._errors import LocalProtocolError
from slimta.smtp._reply import ParsedReply, ReplySyntaxError
from slimta.smtp._sockio import SocketIO
from slimta.smtp.auth import AuthSession, client_sasl, mask_auth_line
from slimta.smtp.extensions import Extensions
from slimta.smtp.io import IO
from slimta.smtp.reply import Reply, _unchecked_reply, tls_failure

__all__ = ["Client", "LmtpClient"]

log = getSocketLogger("slimta.smtp.io")

#: The real select(): a zero-timeout poll needs no trip through the hub.
_select = gevent.monkey.get_original("select", "select")
#: The text of each reply code, by index: no str() per reply.
_CODE_TEXT = tuple(map(str, range(600)))
#: Replies that carry no enhanced status code (RFC 2034 3).
_NO_ESC = frozenset({b"[BANNER]", b"EHLO", b"HELO", b"LHLO"})


def _awaited(command: bytes) -> Reply:
    """An empty :class:`Reply` for *command*, filled when its reply is read."""
    return _unchecked_reply(None, None, None, command)


def _to_bytes(value: str | bytes) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else value


class Client:
    """An SMTP client session on a connected socket, with PIPELINING support.

    Pipelinable commands (MAIL, RCPT, RSET when the server advertised
    PIPELINING) return a :class:`~slimta.smtp.reply.Reply` that stays empty
    (false) until a later command that ends the group, such as DATA, sends
    the whole group and reads every reply. Without PIPELINING every reply is
    read at once.

    :param socket: a connected (gevent) socket.
    :param address: the server's ``(host, port)``; ``host`` is the TLS
        server name. Defaults to ``socket.getpeername()``.
    """

    def __init__(self, socket: Any, address: Any = None) -> None:
        #: The buffered socket I/O.
        self.io = IO(socket, address)
        self._conn = ClientConnection(Extensions())
        #: Replies still waiting to be read, oldest first.
        self.reply_queue: list[Reply] = []
        #: The last 4xx/5xx reply read.
        self.last_error: Reply | None = None
        # Reads and writes io.socket, which STARTTLS replaces.
        self._sockio = SocketIO(socket)
        self._log_io = log.log.isEnabledFor(logging.DEBUG)
        #: A :func:`time.monotonic` time by which every read and write must
        #: be done, else it raises :class:`TimeoutError`; ``None`` for no
        #: bound (a caller's :class:`gevent.Timeout` may bound it instead).
        #: Set it before each command, as the SMTP relay does.
        self.deadline: float | None = None
        # Something was just sent: its reply cannot be here yet.
        self._sent = False

    # ------------------------------------------------------------ attributes
    @property
    def extensions(self) -> Extensions:
        """The ESMTP extensions of the last successful EHLO."""
        # The core makes each new registry of the class it was given: ours.
        return cast(Extensions, self._conn.extensions)

    @extensions.setter
    def extensions(self, value: Extensions) -> None:
        self._conn.extensions = value

    # ------------------------------------------------------------------ core
    def _fill(self, reply: Reply, parsed: ParsedReply) -> None:
        # The parser checked the code's three digits: set it past the check.
        reply._code = _CODE_TEXT[parsed.code]
        if reply.command in _NO_ESC:
            reply.enhanced_status_code = False
            reply.raw_message = parsed.message
        else:
            reply.message = parsed.message
        reply.address = self.io.address
        if parsed.code >= 400:
            self.last_error = reply

    def _read_one(self) -> ParsedReply:
        conn = self._conn
        while True:
            try:
                got = conn.next_reply()
            except ReplySyntaxError as exc:
                raise BadReply(exc.data) from None
            if got is not None:
                return got[1]
            conn.receive_data(self._recv())

    def _recv(self) -> bytes:
        sockio = self._sockio
        if sockio.sock is not self.io.socket:
            sockio.use(self.io.socket)  # STARTTLS replaced it
        deadline = self.deadline
        wait_first = self._sent
        self._sent = False
        data = sockio.recv(None if deadline is None else deadline - time.monotonic(), wait_first)
        if self._log_io:
            log.recv(sockio.sock, data)
        return data

    def flush_pipeline(self) -> None:
        """Send every queued command, then read every reply waiting.

        .. versionadded:: 4.0
        """
        self._flush_pipeline()

    def _flush_pipeline(self) -> None:
        data = self._conn.data_to_send()
        io = self.io
        if io.send_buffer:
            if data:
                io.buffered_send(data)
            data = b"".join(io.send_buffer)
            io.send_buffer.clear()
        if data:
            self._send_now(data)
        while self.reply_queue:
            reply = self.reply_queue.pop(0)
            self._fill(reply, self._read_one())

    def _command(self, command: bytes, arg: bytes | None = None, *, flush: bool = False) -> Reply:
        conn = self._conn
        reply = _awaited(command)
        try:
            conn.send_command(command, arg)
        except LocalProtocolError:
            self._check_open()
            raise
        self.reply_queue.append(reply)
        if flush or conn.ends_group(command):
            self._flush_pipeline()
        return reply

    def _check_open(self) -> None:
        # Called when the core refused a send. After a 221 or 421 the server
        # closes the connection: raise what sending would have met there.
        if self._conn.closed:
            raise ConnectionLost() from None

    def _local(self, command: bytes, code: int, message: str) -> Reply:
        # A refusal decided here: nothing went on the wire.
        reply = Reply(str(code), message, command=command, address=self.io.address)
        self.last_error = reply
        return reply

    def _send_now(self, data: bytes, *, secret: bool = False) -> None:
        sockio = self._sockio
        if sockio.sock is not self.io.socket:
            sockio.use(self.io.socket)  # STARTTLS replaced it
        deadline = self.deadline
        sockio.send(data, None if deadline is None else deadline - time.monotonic())
        if secret:
            # SASL data never reaches the log in the clear.
            log.send(sockio.sock, b"".join(map(mask_auth_line, data.splitlines(keepends=True))))
        elif self._log_io:
            log.send(sockio.sock, data)
        self._sent = True

    # ----------------------------------------------------------- unsolicited
    def has_reply_waiting(self) -> bool:
        """Whether the server sent something unasked (e.g. a timeout notice).

        Does not wait: it looks whether the socket is readable now. A closed
        connection counts as a reply waiting.
        """
        if self._conn.has_buffered:
            return True
        sock = self.io.socket
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _, _ = _select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def get_reply(self, command: bytes = b"[TIMEOUT]") -> Reply:
        """Read one reply nothing was sent for."""
        self._flush_pipeline()
        reply = Reply(command=command)
        try:
            self._conn.expect(command)
        except LocalProtocolError:
            self._check_open()
            raise
        self._fill(reply, self._read_one())
        return reply

    def get_banner(self) -> Reply:
        """Read the server's greeting (command ``[BANNER]``)."""
        return self.get_reply(b"[BANNER]")

    def custom_command(self, command: bytes, arg: bytes | None = None) -> Reply:
        """Send any command and wait for its reply."""
        return self._command(command, arg, flush=True)

    # ------------------------------------------------------------- greetings
    def _hello(self, verb: bytes, name: str | bytes) -> Reply:
        reply = self._command(verb, _to_bytes(name), flush=True)
        if reply.code == "250":
            ext = Extensions()
            if verb != b"HELO":
                reply.raw_message = ext.parse_string(reply.raw_message or "")
            self.extensions = ext
        return reply

    def ehlo(self, ehlo_as: str | bytes) -> Reply:
        """Send EHLO; on 250 :attr:`extensions` is filled from the reply.

        :returns: the reply, its message being only the greeting line.
        """
        return self._hello(b"EHLO", ehlo_as)

    def helo(self, helo_as: str | bytes) -> Reply:
        """Send HELO; on 250 :attr:`extensions` is emptied."""
        return self._hello(b"HELO", helo_as)

    # -------------------------------------------------------------------- TLS
    def encrypt(self, context: ssl.SSLContext | None = None) -> bool:
        """Wrap the socket in TLS now (implicit TLS, RFC 8314).

        :returns: ``False`` when the handshake failed; the connection is
            then closed, as nothing more can be sent on it.
        """
        self._conn.start_tls()
        if self.io.encrypt_socket_client(context):
            return True
        self.io.close()
        return False

    def starttls(self, context: ssl.SSLContext | None = None) -> Reply:
        """Send STARTTLS and, on 220, wrap the socket with *context*.

        Reply bytes the server sent after the 220 are dropped (response
        injection, CVE-2021-38371); :attr:`extensions` are cleared, so EHLO
        must be sent again (RFC 3207 4.2).

        :param context: the client context; ``ssl.create_default_context()``
            when ``None``. The server name checked is the address's host.
        :returns: the server's reply, or ``421 4.7.0 TLS negotiation failed``
            when the handshake failed after a 220. The connection is then
            closed: never carry on over the broken socket.

        .. versionchanged:: 4.0
           A failed handshake is reported instead of continuing in plaintext.
        """
        reply = self._command(b"STARTTLS", flush=True)
        if reply.code != "220":
            return reply
        if self.encrypt(context):
            return reply
        failure = Reply(command=b"STARTTLS", address=self.io.address).copy(tls_failure)
        failure.newline_first = False
        self.last_error = failure
        return failure

    # ------------------------------------------------------------------- AUTH
    def auth(
        self,
        authcid: str,
        secret: str,
        authzid: str | None = None,
        mechanism: bytes | str | None = None,
    ) -> Reply:
        """Authenticate with a mechanism the server advertised (RFC 4954).

        The exchange runs through pysasl's client mechanisms
        (:meth:`AuthSession.client_attempt
        <slimta.smtp.auth.AuthSession.client_attempt>`). Without
        *mechanism*, PLAIN (then LOGIN, then CRAM-MD5) is used under TLS, and
        only CRAM-MD5 without it. A mechanism not advertised, or a cleartext
        one without TLS, is refused here (``504 5.5.4`` or ``538 5.7.11``)
        without sending anything. The secret is never logged.

        :param authcid: the authentication identity (user name).
        :param secret: the password.
        :param authzid: the identity to act as, if not *authcid*.
        :param mechanism: a mechanism to use instead of the best advertised.
        :returns: the final reply (235 on success).

        .. versionchanged:: 4.0
           4.0 sent PLAIN whatever the server advertised, even without TLS.
        """
        self._flush_pipeline()
        choice = choose_mechanism(self.extensions.getparam("AUTH"), self.io.encrypted, mechanism)
        if isinstance(choice, tuple):
            return self._local(b"AUTH", *choice)
        session = AuthSession(client_sasl(), self.io)
        reply = session.client_attempt(authcid, secret, authzid, choice, exchange=self._sasl_step)
        reply.address = self.io.address
        if reply.is_error():
            self.last_error = reply
        return reply

    def _sasl_step(self, line: bytes) -> tuple[str, str]:
        # One line of an AUTH exchange and the reply to it; logged masked.
        try:
            self._conn.send_line(line, b"AUTH")
        except LocalProtocolError:
            self._check_open()
            raise
        self._send_now(self._conn.data_to_send(), secret=True)
        parsed = self._read_one()
        return str(parsed.code), parsed.message

    # ------------------------------------------------------------ transaction
    def mailfrom(
        self,
        address: str,
        data_size: int | None = None,
        *,
        smtputf8: bool = False,
        body: str | None = None,
        requiretls: bool = False,
    ) -> Reply:
        """Send ``MAIL FROM:<address>`` (pipelined when possible).

        :param data_size: sent as ``SIZE=`` when the server advertised SIZE.
        :param smtputf8: ask for ``SMTPUTF8`` even for an ASCII sender (a
            recipient needs it).
        :param body: ``BODY=`` value, e.g. ``'8BITMIME'``.
        :param requiretls: send the ``REQUIRETLS`` parameter (RFC 8689); the
            caller checks first that the session is under TLS and that the
            server advertised REQUIRETLS.
        :returns: the reply; ``553 5.6.7`` without any round trip when a
            non-ASCII address needs SMTPUTF8 and the server lacks it.
        """
        needs_utf8 = smtputf8 or not address.isascii()
        if needs_utf8 and "SMTPUTF8" not in self.extensions:
            return self._local(b"MAIL", *SMTPUTF8_REQUIRED)
        size = data_size if data_size is not None and "SIZE" in self.extensions else None
        try:
            arg = mail_argument(
                address, size=size, smtputf8=needs_utf8, body=body, requiretls=requiretls
            )
        except ValueError:
            return self._local(b"MAIL", 501, "5.1.7 Invalid sender address")
        return self._command(b"MAIL", arg)

    def rcptto(self, address: str) -> Reply:
        """Send ``RCPT TO:<address>`` (pipelined when possible).

        :returns: the reply; ``553 5.6.7`` without any round trip for a
            non-ASCII address when the server lacks SMTPUTF8.
        """
        # An ASCII address reads the same in UTF-8: no need to look.
        utf8 = not address.isascii()
        if utf8 and "SMTPUTF8" not in self.extensions:
            return self._local(b"RCPT", *SMTPUTF8_REQUIRED)
        try:
            arg = rcpt_argument(address, smtputf8=utf8)
        except ValueError:
            return self._local(b"RCPT", 501, "5.1.3 Invalid recipient address")
        return self._command(b"RCPT", arg)

    def data(self) -> Reply:
        """Send DATA, ending any pipelined group; 354 is expected."""
        return self._command(b"DATA", flush=True)

    def _queue_data(self, chunks: list[bytes], replies: int) -> list[Reply]:
        try:
            self._conn.send_data(b"".join(chunks), replies=replies)
        except LocalProtocolError:
            self._check_open()
            raise
        out = [_awaited(b"[SEND_DATA]") for _ in range(replies)]
        self.reply_queue.extend(out)
        self._flush_pipeline()
        return out

    def send_data(self, *data: bytes) -> Any:
        """Send the message data, dot-stuffed, and the end marker.

        :returns: the reply (command ``[SEND_DATA]``).
        """
        return self._queue_data(dot_stuff(*data), 1)[0]

    def send_empty_data(self) -> Any:
        """Send just the end marker, to close a data phase with no message."""
        return self._queue_data([b".\r\n"], 1)[0]

    def send_bdat(self, *data: bytes, binary: bool = False, chunk_size: int = 1 << 20) -> Reply:
        """Send the message data as BDAT chunks (RFC 3030), instead of DATA.

        Chunks are pipelined when the server allows; otherwise each reply is
        read before the next chunk, and sending stops at the first error.

        :param binary: the content is ``BODY=BINARYMIME``: sent unchanged.
        :returns: the first error reply, else the reply to the LAST chunk.
        """
        self._flush_pipeline()
        replies: list[Reply] = []
        pipelining = self._conn.pipelining
        for frame in bdat_frames(data, binary=binary, chunk_size=chunk_size):
            reply = Reply(command=b"BDAT")
            try:
                self._conn.send_data(frame, b"BDAT")
            except LocalProtocolError:
                self._check_open()
                raise
            self.reply_queue.append(reply)
            replies.append(reply)
            if not pipelining:
                self._flush_pipeline()
                if reply.is_error():
                    return reply
        self._flush_pipeline()
        for reply in replies:
            if reply.is_error():
                return reply
        return replies[-1]

    def rset(self) -> Reply:
        """Send RSET (pipelined when possible)."""
        return self._command(b"RSET")

    def quit(self) -> Reply:
        """Send QUIT and read the reply."""
        return self._command(b"QUIT", flush=True)


class LmtpClient(Client):
    """An LMTP client (RFC 2033): LHLO, and one data reply per recipient."""

    def __init__(self, socket: Any, address: Any = None) -> None:
        super().__init__(socket, address)
        #: ``(address, reply)`` of each RCPT of the current transaction.
        self.rcpttos: list[tuple[str, Reply]] = []

    def ehlo(self, ehlo_as: str | bytes) -> Reply:
        """Not available in LMTP: use :meth:`lhlo`."""
        raise NotImplementedError("LMTP uses LHLO")

    def helo(self, helo_as: str | bytes) -> Reply:
        """Not available in LMTP: use :meth:`lhlo`."""
        raise NotImplementedError("LMTP uses LHLO")

    def lhlo(self, lhlo_as: str | bytes) -> Reply:
        """Send LHLO; on 250 :attr:`extensions` is filled from the reply."""
        return self._hello(b"LHLO", lhlo_as)

    def rcptto(self, address: str) -> Reply:
        """Send RCPT and remember ``(address, reply)`` in :attr:`rcpttos`."""
        reply = super().rcptto(address)
        self.rcpttos.append((address, reply))
        return reply

    def _accepted(self) -> list[str]:
        self._flush_pipeline()
        return [addr for addr, reply in self.rcpttos if (reply.code or "").startswith("2")]

    def send_data(self, *data: bytes) -> list[tuple[str, Reply]]:
        """Send the message data.

        :returns: ``(address, reply)`` per recipient whose RCPT was accepted,
            in RCPT order (RFC 2033 4.2).
        """
        accepted = self._accepted()
        replies = self._queue_data(dot_stuff(*data), len(accepted))
        return list(zip(accepted, replies, strict=True))

    def send_empty_data(self) -> list[tuple[str, Reply]]:
        """Send just the end marker; one reply per accepted recipient."""
        accepted = self._accepted()
        replies = self._queue_data([b".\r\n"], len(accepted))
        return list(zip(accepted, replies, strict=True))

    def rset(self) -> Reply:
        """Send RSET and forget :attr:`rcpttos`."""
        self.rcpttos = []
        return super().rset()
