"""The pooled client greenlet that delivers messages over SMTP.

One :class:`SmtpRelayClient` runs one connection (spec 7.5):

1. connect (``[CONNECT]``) and read the banner (``[BANNER]``), after the TLS
   handshake with *tls_immediately*;
2. EHLO, falling back to HELO when EHLO is answered with 500;
3. STARTTLS whenever advertised (or *tls_required*), then EHLO again;
4. AUTH with *credentials*;
5. per message: for a REQUIRETLS message (RFC 8689), a check that the
   session is under TLS that authenticated the server and that the server
   offers REQUIRETLS, else ``550 5.7.30`` before anything is sent;
   MAIL (with ``REQUIRETLS`` then), RCPT each recipient, DATA (pipelined when possible),
   the data; BDAT chunks instead of DATA for content that needs BINARYMIME
   and for messages over *bdat_threshold*, when the server offers CHUNKING;
   per-recipient results; RSET after a failure;
6. more messages over the same connection while they arrive within
   *idle_timeout*; a connection the server spoke on while idle is dropped
   and its request re-queued;
7. QUIT.

Every network step runs under a :class:`gevent.Timeout` started (and
caught) here, so no step can hang: a timeout becomes
``421 4.4.2 Connection timed out``, a socket error
``451 4.3.0 Connection failed: <host>:<port>: <error>``, a broken session (closed connection,
unparsable reply) the server's last 421 or ``421 4.3.0 <error>``.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.socket
from gevent.event import AsyncResult

from slimta import logging as slogging
from slimta.relay import RelayError
from slimta.relay.pool import RelayPoolClient
from slimta.relay.smtp import SmtpPermanentRelayError, SmtpRelayError, SmtpTransientRelayError
from slimta.relay.smtp.tlspolicy import (
    TlsRequirement,
    TlsResult,
    classify_tls_error,
    peer_chain,
    policy_failure,
    requiretls_failure,
    verifies,
)
from slimta.smtp import SmtpError
from slimta.smtp._client import (
    CONVERSION_NOT_ALLOWED,
    SMTPUTF8_REQUIRED,
    needs_binarymime,
    needs_smtputf8,
)
from slimta.smtp.client import Client
from slimta.smtp.reply import Reply, tls_failure
from slimta.util._connect import create_connection
from slimta.util._hostname import local_fqdn

if TYPE_CHECKING:
    from slimta.envelope import Envelope
    from slimta.util.deque import BlockingDeque

__all__ = ["BDAT_THRESHOLD", "SmtpRelayClient"]

#: Default ``bdat_threshold``: messages over 1 MiB go as BDAT chunks when
#: the server offers CHUNKING, which spares the dot-stuffing pass on both
#: sides and the round trip for 354.
BDAT_THRESHOLD = 1 << 20


class _StepTimeout(Exception):
    """A step's own deadline passed; never caught by anything else."""

    def __init__(self, command: bytes) -> None:
        super().__init__(command)
        self.command = command


#: Seconds a connection must have been idle before it is checked for an
#: unsolicited reply (a system call). Servers time out idle sessions after
#: seconds or minutes; one that closes within this time could as well close
#: just after the check, and the message is then retried like any other
#: transient failure.
_IDLE_CHECK_AFTER = 0.05

#: Steps that only read and write through :class:`Client`, so that the
#: client's own deadline bounds them; the others (connect, TLS handshakes,
#: AUTH) run under a :class:`gevent.Timeout`.
_CLIENT_STEPS = frozenset(
    {
        b"[BANNER]",
        b"EHLO",
        b"HELO",
        b"LHLO",
        b"MAIL",
        b"RCPT",
        b"DATA",
        b"[SEND_DATA]",
        b"RSET",
        b"QUIT",
    }
)


class _Deadline:
    """The deadline of one step of a session, as a reusable context manager.

    Steps that only talk through the client set :attr:`Client.deadline
    <slimta.smtp.client.Client.deadline>`: a clock reading, with a timer only
    when a read or write has to wait. The others restart one
    :class:`gevent.Timeout` per relay client. A step begun inside another
    (not done today) gets its own.
    """

    __slots__ = ("_command", "_error", "_owner", "_seconds", "_started", "_timeout")

    def __init__(self, owner: SmtpRelayClient) -> None:
        self._owner = owner
        self._seconds: float | None = None
        self._command = b""
        self._error = _StepTimeout(b"")
        self._timeout: gevent.Timeout | None = None
        self._started = False

    def arm(self, seconds: float | None, command: bytes) -> _Deadline:
        if self._timeout is not None and self._timeout.pending:
            return _Deadline(self._owner).arm(seconds, command)
        self._seconds = seconds
        self._command = command
        return self

    def __enter__(self) -> None:
        owner = self._owner
        owner._step = command = self._command
        seconds = self._seconds
        client = owner.client
        if client is not None:
            if command in _CLIENT_STEPS:
                client.deadline = None if seconds is None else time.monotonic() + seconds
                return
            client.deadline = None
        if seconds is None:
            return
        timeout = self._timeout
        if timeout is None or timeout.seconds != seconds:
            if timeout is not None:
                timeout.close()
            timeout = self._timeout = gevent.Timeout(seconds, self._error)
        error = self._error
        error.command = command
        error.args = (command,)
        # A reused exception keeps its last traceback, and with it the frames
        # of the step that timed out, until it is raised again.
        error.__traceback__ = None
        timeout.start()
        self._started = True

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if self._started:
            self._started = False
            if self._timeout is not None:
                self._timeout.cancel()
        if exc_type is TimeoutError:
            # The client's deadline passed (or the OS timed the socket out).
            raise _StepTimeout(self._owner._step) from None

    def close(self) -> None:
        if self._timeout is not None:
            self._timeout.close()
            self._timeout = None


class SmtpRelayClient(RelayPoolClient):
    """Delivers queued messages to one SMTP server, reusing the connection.

    :param address: ``(host, port)`` of the server; ``host`` is also the TLS
        server name.
    :param queue: the pool's request queue.
    :param socket_creator: ``f((host, port)) -> socket``; defaults to
        :func:`gevent.socket.create_connection`.
    :param ehlo_as: the EHLO name, or ``f((host, port)) -> str``; defaults to
        :func:`socket.getfqdn` (looked up once per process).
    :param context: the client :class:`ssl.SSLContext`;
        ``ssl.create_default_context()`` when ``None``.
    :param tls_immediately: TLS from the first byte (port 465).
    :param tls_required: no TLS means no delivery.
    :param connect_timeout: seconds to connect.
    :param command_timeout: seconds for each command's reply.
    :param data_timeout: seconds to send the data and read its reply;
        ``None`` uses *command_timeout*.
    :param idle_timeout: seconds to keep the connection for another message;
        ``None`` sends QUIT after one.
    :param credentials: ``(authcid, secret[, authzid[, mechanism]])`` or a
        callable returning it.
    :param binary_encoder: an :mod:`email.encoders` function for
        :meth:`~slimta.envelope.Envelope.encode_7bit`, used when the server
        lacks 8BITMIME.
    :param bdat_threshold: a message of more bytes than this goes as BDAT
        chunks (RFC 3030) when the server advertises CHUNKING; ``None``
        sends every message that BINARYMIME does not need with DATA.
        Content that needs BINARYMIME (NUL bytes, over-long lines) always
        goes as BDAT when the server offers CHUNKING and BINARYMIME.
    :param tls_requirement: a
        :class:`~slimta.relay.smtp.tlspolicy.TlsRequirement` (DANE or
        MTA-STS, set by :class:`~slimta.relay.smtp.mx.MxSmtpRelay`): TLS is
        negotiated with its context and its check applied to the server's
        certificates; when it is enforced, a missing or failed STARTTLS ends
        the session with ``451 4.7.5 <reason>`` before anything is sent.

    .. versionchanged:: 4.0
       *context* replaces ``tls``; STARTTLS is opportunistic; EHLO answered
       with 500 falls back to HELO; a failed STARTTLS handshake ends the
       attempt with a transient error.
    """

    #: The protocol client class.
    _client_class: type[Client] = Client
    #: Whether BDAT may replace DATA (LMTP's per-recipient replies to BDAT
    #: are not supported).
    _bdat_allowed = True
    #: Whether REQUIRETLS messages are relayed as RFC 8689 asks; LMTP is
    #: final delivery, which the RFC leaves out (4.4).
    _relays_requiretls = True

    def __init__(
        self,
        address: Any,
        queue: BlockingDeque[Any],
        socket_creator: Callable[[Any], Any] | None = None,
        ehlo_as: str | Callable[[Any], str] | None = None,
        context: ssl.SSLContext | None = None,
        tls_immediately: bool = False,
        tls_required: bool = False,
        connect_timeout: float | None = 10.0,
        command_timeout: float | None = 10.0,
        data_timeout: float | None = None,
        idle_timeout: float | None = None,
        credentials: Any = None,
        binary_encoder: Callable[[Any], None] | None = None,
        *,
        bdat_threshold: int | None = BDAT_THRESHOLD,
        tls_requirement: TlsRequirement | None = None,
    ) -> None:
        super().__init__(queue, idle_timeout)
        self.address = address
        self.socket_creator = socket_creator or create_connection
        self.ehlo_as = ehlo_as
        self.context = context
        self.tls_immediately = tls_immediately
        self.tls_required = tls_required
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout if data_timeout is not None else command_timeout
        self.credentials = credentials
        self.binary_encoder = binary_encoder
        self.bdat_threshold = bdat_threshold
        #: What TLS must achieve on this connection (DANE, MTA-STS), if anything.
        self.tls_requirement = tls_requirement
        #: The protocol client while connected.
        self.client: Client | None = None
        self._result: AsyncResult | None = None
        self._step = b"[CONNECT]"
        self._broken = False
        self._deadlines = _Deadline(self)

    # ---------------------------------------------------------------- helpers
    def _deadline(self, seconds: float | None, command: bytes) -> _Deadline:
        """A context manager bounding one step to *seconds* (``None``: no
        bound); when it passes, :class:`_StepTimeout` is raised in the step."""
        return self._deadlines.arm(seconds, command)

    def _require(self) -> Client:
        if self.client is None:
            raise RuntimeError("not connected")
        return self.client

    def _reply(self, code: str, message: str, command: bytes) -> Reply:
        return Reply(code, message, command=command, address=self.address)

    def _get_context(self) -> ssl.SSLContext:
        if self.context is None:
            self.context = ssl.create_default_context()
        return self.context

    def _get_ehlo_as(self) -> str:
        ehlo_as = self.ehlo_as
        if ehlo_as is None:
            return local_fqdn()
        if callable(ehlo_as):
            return ehlo_as(self.address)
        return ehlo_as

    def _fail(self, exc: BaseException) -> None:
        result = self._result
        self._result = None
        if result is not None and not result.ready():
            result.set_exception(exc)

    # ------------------------------------------------------------- connection
    def _connect(self) -> None:
        with self._deadline(self.connect_timeout, b"[CONNECT]"):
            sock = self.socket_creator(self.address)
        self.client = client = self._client_class(sock, self.address)
        if self.tls_immediately:
            requirement = self.tls_requirement
            context: Any = self._get_context()
            if requirement is not None:
                context = _ObservedContext(requirement.context)
            with self._deadline(self.command_timeout, b"[TLS]"):
                ok = client.encrypt(context)
            if not ok:
                self._broken = True
                if requirement is not None:
                    result, reason = classify_tls_error(context.error, requirement.host)
                    self._policy_failed(requirement, result, reason, b"[TLS]")
                reply = self._reply("421", "", b"[TLS]").copy(tls_failure)
                raise SmtpTransientRelayError(reply)
            if requirement is not None:
                self._check_peer(client, requirement, b"[TLS]")
        with self._deadline(self.command_timeout, b"[BANNER]"):
            banner = client.get_banner()
        if banner.is_error():
            raise SmtpRelayError.factory(banner)

    def _hello(self, client: Client) -> Reply:
        ehlo_as = self._get_ehlo_as()
        with self._deadline(self.command_timeout, b"EHLO"):
            reply = client.ehlo(ehlo_as)
            if reply.code == "500":
                # 4.0: a server that does not know EHLO gets HELO.
                self._step = b"HELO"
                reply = client.helo(ehlo_as)
        return reply

    def _policy_failed(
        self, requirement: TlsRequirement, result: TlsResult, reason: str, command: bytes
    ) -> None:
        """Report a TLS failure under *requirement*; when it is enforced,
        end the session with ``451 4.7.5 <reason>``."""
        requirement.outcome(result, reason)
        if requirement.enforce:
            reply = policy_failure(requirement.label, reason, command)
            reply.address = self.address
            raise SmtpTransientRelayError(reply)

    def _check_peer(self, client: Client, requirement: TlsRequirement, command: bytes) -> None:
        """Apply the requirement's certificate check right after the handshake,
        before anything else is said over the connection."""
        check = requirement.check
        if check is not None:
            failed = check(peer_chain(client.io.socket))
            if failed is not None:
                self._policy_failed(requirement, *failed, command)
                return
        requirement.outcome(TlsResult.SUCCESS)

    def _starttls_required(self, client: Client, requirement: TlsRequirement) -> None:
        """STARTTLS under a DANE or MTA-STS requirement.

        Enforced: no STARTTLS offered, STARTTLS refused, a failed handshake or
        a failed check each end the session with ``451 4.7.5``. Not enforced
        (MTA-STS testing): each is reported and the session goes on as it
        would without a policy.
        """
        host = requirement.host
        if "STARTTLS" not in client.extensions:
            # The stripping attacker removes this line from the EHLO reply.
            reason = f"{host} did not offer STARTTLS"
            self._policy_failed(requirement, TlsResult.STARTTLS_NOT_SUPPORTED, reason, b"STARTTLS")
            if not self.tls_required:
                return
        context: Any = _ObservedContext(requirement.context)
        with self._deadline(self.command_timeout, b"STARTTLS"):
            reply = client.starttls(context)
        if reply.code == "220":
            self._check_peer(client, requirement, b"STARTTLS")
            reply = self._hello(client)
            if reply.is_error():
                raise SmtpRelayError.factory(reply)
            return
        # 421 includes a handshake that failed after 220: the socket is closed.
        self._broken = reply.code == "421"
        if context.wrapped:
            result, reason = classify_tls_error(context.error, host)
        else:
            result = TlsResult.STARTTLS_NOT_SUPPORTED
            reason = f"{host} refused STARTTLS: {reply.code} {reply.message}"
        self._policy_failed(requirement, result, reason, b"STARTTLS")
        if reply.code == "421" or self.tls_required:
            raise SmtpRelayError.factory(reply)

    def _handshake(self) -> None:
        client = self._require()
        reply = self._hello(client)
        if reply.is_error():
            raise SmtpRelayError.factory(reply)
        requirement = self.tls_requirement
        if requirement is not None and not client.io.encrypted:
            self._starttls_required(client, requirement)
        elif not client.io.encrypted and (self.tls_required or "STARTTLS" in client.extensions):
            with self._deadline(self.command_timeout, b"STARTTLS"):
                reply = client.starttls(self._get_context())
            if reply.code == "220":
                reply = self._hello(client)
                if reply.is_error():
                    raise SmtpRelayError.factory(reply)
            elif reply.code == "421" or self.tls_required:
                # 421 includes a handshake that failed after 220: the
                # socket is closed, never go on in plaintext over it.
                self._broken = reply.code == "421"
                raise SmtpRelayError.factory(reply)
        if self.credentials is not None:
            creds = self.credentials() if callable(self.credentials) else self.credentials
            with self._deadline(self.command_timeout, b"AUTH"):
                reply = client.auth(*creds)
            if reply.is_error():
                raise SmtpRelayError.factory(reply)

    def _disconnect(self) -> None:
        client = self.client
        self.client = None
        if client is None:
            self._deadlines.close()
            return
        try:
            if not self._broken:
                with self._deadline(self.command_timeout, b"QUIT"):
                    client.quit()
        except (SmtpError, OSError, ValueError, _StepTimeout):
            pass
        finally:
            client.io.close()
            self._deadlines.close()

    # --------------------------------------------------------------- delivery
    def _prepare(self, client: Client, envelope: Envelope) -> tuple[bytes, bytes, str | None, bool]:
        """Headers, body, ``BODY=`` value and whether to use BDAT."""
        ext = client.extensions
        header, body = envelope.flatten()
        chunking = self._bdat_allowed and "CHUNKING" in ext
        if chunking and "BINARYMIME" in ext and needs_binarymime(header, body):
            return header, body, "BINARYMIME", True
        if header.isascii() and body.isascii():
            body_type = None
        elif "8BITMIME" in ext:
            body_type = "8BITMIME"
        else:
            try:
                envelope.encode_7bit(self.binary_encoder)
            except UnicodeError:
                code, text = CONVERSION_NOT_ALLOWED
                raise SmtpPermanentRelayError(self._reply(str(code), text, b"DATA")) from None
            header, body = envelope.flatten()
            body_type = None
        threshold = self.bdat_threshold
        large = threshold is not None and len(header) + len(body) > threshold
        return header, body, body_type, chunking and large

    def _send_message(
        self, client: Client, header: bytes, body: bytes, bdat: bool, body_type: str | None = None
    ) -> Any:
        with self._deadline(self.data_timeout, b"[SEND_DATA]"):
            if bdat:
                return client.send_bdat(header, body, binary=body_type == "BINARYMIME")
            return client.send_data(header, body)

    def _close_data(self, client: Client, data: Reply) -> None:
        # RFC 2920 3.1: DATA was answered 354 though nothing may be sent.
        if data.code == "354":
            with self._deadline(self.data_timeout, b"[SEND_DATA]"):
                client.send_empty_data()

    def _results(
        self, rcpts: list[tuple[str, Reply]], final: Any
    ) -> dict[str, Reply | RelayError | None]:
        results: dict[str, Reply | RelayError | None] = {}
        for rcpt, reply in rcpts:
            results[rcpt] = SmtpRelayError.factory(reply) if reply.is_error() else final
        return results

    def _transaction(
        self, client: Client, envelope: Envelope
    ) -> dict[str, Reply | RelayError | None]:
        sender = envelope.sender or ""
        recipients = list(envelope.recipients)
        utf8 = needs_smtputf8(sender, recipients)
        if utf8 and "SMTPUTF8" not in client.extensions:
            # RFC 6531 3.2: no downgrade; refuse without a round trip.
            code, text = SMTPUTF8_REQUIRED
            raise SmtpPermanentRelayError(self._reply(str(code), text, b"MAIL"))
        requiretls = envelope.requiretls and self._relays_requiretls
        if requiretls:
            self._check_requiretls(client)
        header, body, body_type, bdat = self._prepare(client, envelope)
        with self._deadline(self.command_timeout, b"MAIL"):
            mail = client.mailfrom(sender, smtputf8=utf8, body=body_type, requiretls=requiretls)
        if mail and mail.is_error():
            raise SmtpRelayError.factory(mail)
        rcpts: list[tuple[str, Reply]] = []
        for rcpt in recipients:
            with self._deadline(self.command_timeout, b"RCPT"):
                rcpts.append((rcpt, client.rcptto(rcpt)))
        if all(reply and reply.is_error() for _, reply in rcpts):
            # Every RCPT already refused (no pipelining): DATA is pointless.
            first = rcpts[0][1] if rcpts else self._reply("554", "5.5.1 No recipients", b"RCPT")
            raise SmtpRelayError.factory(first)
        with self._deadline(self.command_timeout, b"DATA"):
            data = client.data() if not bdat else Reply(command=b"DATA")
            client.flush_pipeline()
        if mail.is_error():
            self._close_data(client, data)
            raise SmtpRelayError.factory(mail)
        if not rcpts or all(reply.is_error() for _, reply in rcpts):
            self._close_data(client, data)
            first = rcpts[0][1] if rcpts else self._reply("554", "5.5.1 No recipients", b"RCPT")
            raise SmtpRelayError.factory(first)
        if data.is_error():
            raise SmtpRelayError.factory(data)
        final = self._send_message(client, header, body, bdat, body_type)
        return self._finish(client, rcpts, final)

    def _check_requiretls(self, client: Client) -> None:
        """Refuse a REQUIRETLS message (``550 5.7.30``) unless this session
        meets RFC 8689 4.2.1: TLS whose certificate was authenticated (by the
        requirement's DANE records or PKIX check, or without one by a
        verifying context) and REQUIRETLS in the EHLO reply after it."""
        address = self.address
        host = str(address[0]) if isinstance(address, tuple) and address else str(address)
        requirement = self.tls_requirement
        if not client.io.encrypted:
            reason = f"{host} did not negotiate TLS"
        elif not (requirement.authenticates if requirement else verifies(self._get_context())):
            reason = f"the certificate of {host} was not authenticated"
        elif "REQUIRETLS" not in client.extensions:
            reason = f"{host} does not offer REQUIRETLS"
        else:
            return
        reply = requiretls_failure(reason)
        reply.address = self.address
        raise SmtpPermanentRelayError(reply)

    def _finish(
        self, client: Client, rcpts: list[tuple[str, Reply]], final: Any
    ) -> dict[str, Reply | RelayError | None]:
        """The per-recipient results from the reply to the data."""
        if final.is_error():
            raise SmtpRelayError.factory(final)
        return self._results(rcpts, final)

    def _deliver(self, result: AsyncResult, envelope: Envelope) -> None:
        client = self._require()
        self._result = result
        try:
            results = self._transaction(client, envelope)
        except SmtpRelayError as exc:
            # RSET before the result is set: once it is, the next request may
            # come at once and should find this client idle.
            try:
                if exc.reply.code == "421":
                    self._broken = True
                else:
                    with self._deadline(self.command_timeout, b"RSET"):
                        client.rset()
                        client.flush_pipeline()
            except (SmtpError, OSError, _StepTimeout):
                self._broken = True
            finally:
                self._fail(exc)
            return
        self._result = None
        result.set(results)

    # -------------------------------------------------------------------- run
    def _idle_connection_gone(self) -> bool:
        client = self._require()
        return client.has_reply_waiting()

    def _run(self) -> None:
        result, envelope = self.poll()
        if result is None or envelope is None:
            return
        self._result = result
        try:
            self._connect()
            self._handshake()
            while result is not None and envelope is not None:
                self._deliver(result, envelope)
                if self.idle_timeout is None or self._broken:
                    break
                result, envelope = self.poll()
                if (
                    result is not None
                    and self.waited >= _IDLE_CHECK_AFTER
                    and self._idle_connection_gone()
                ):
                    # Step 8: the server spoke (timeout notice or close) while
                    # we were idle; someone else takes the message.
                    self.queue.appendleft((result, envelope))
                    self._broken = True
                    break
        except SmtpRelayError as exc:
            self._fail(exc)
        except _StepTimeout as exc:
            self._broken = True
            reply = self._reply("421", "4.4.2 Connection timed out", exc.command)
            self._fail(SmtpTransientRelayError(reply))
        except SmtpError as exc:
            self._broken = True
            last = self.client.last_error if self.client is not None else None
            if last is not None and last.code == "421":
                reply = last
            else:
                reply = self._reply("421", f"4.3.0 {exc}", self._step)
            self._fail(SmtpTransientRelayError(reply))
        except OSError as exc:
            self._broken = True
            # Operators read this in the log: say where and why.
            detail = f"4.3.0 Connection failed: {_peer(self.address)}: {exc.strerror or exc}"
            self._fail(SmtpTransientRelayError(self._reply("451", detail, self._step)))
        except Exception as exc:
            self._broken = True
            slogging.log_exception(__name__)
            self._fail(exc)
        finally:
            self._disconnect()


class _ObservedContext:
    """Wraps sockets with *context* and keeps the handshake's error, which
    :class:`~slimta.smtp.client.Client` only logs, for the reply's reason."""

    __slots__ = ("context", "error", "wrapped")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.error: BaseException | None = None
        self.wrapped = False

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        self.wrapped = True
        try:
            return self.context.wrap_socket(sock, *args, **kwargs)
        except BaseException as exc:
            self.error = exc
            raise


def _peer(address: object) -> str:
    """``host:port`` (``[v6]:port``) of a ``(host, port)`` address, else its text."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)
