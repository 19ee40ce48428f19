"""The SMTP edge: receive mail over SMTP and hand it to a queue.

:class:`SmtpEdge` listens, runs a :class:`~slimta.smtp.server.Server` per
connection with an internal :class:`SmtpSession` as its handlers, and calls
the hooks of a user's :class:`SmtpValidators` subclass, which decide on each
reply.

Each session logs its connection, TLS, refused commands, accepted messages
(with their queue ids) and disconnection to the mail log
(:mod:`slimta.logging.maillog`, logger ``slimta.maillog.edge``).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from gevent.pool import Pool

from slimta import logging as slogging
from slimta.edge import EdgeServer, Handoff, QueueLike
from slimta.envelope import Envelope
from slimta.logging import getSocketLogger
from slimta.logging.maillog import EDGE, MailLog, reply_text
from slimta.smtp import ConnectionLost
from slimta.smtp._address import decode_xtext
from slimta.smtp.reply import Reply
from slimta.smtp.server import Server
from slimta.util.ptrlookup import PtrLookup

__all__ = ["SmtpEdge", "SmtpValidators"]

log = getSocketLogger(__name__)

#: The mail log of sessions (:mod:`slimta.logging.maillog`).
_maillog = MailLog(EDGE)
_INFO = logging.INFO


class SmtpValidators:
    """Base class for the hooks that validate an SMTP session.

    Subclass it and define any of ``handle_banner(reply, address)``,
    ``handle_ehlo(reply, ehlo_as)``, ``handle_helo(reply, helo_as)``,
    ``handle_tls()``, ``handle_auth(reply, creds)``,
    ``handle_mail(reply, sender, params)``,
    ``handle_rcpt(reply, recipient, params)``, ``handle_data(reply)``,
    ``handle_have_data(reply, data)``, ``handle_queued(reply, results)`` and
    ``handle_rset(reply)``. Each receives the :class:`~slimta.smtp.reply.Reply`
    about to be sent and may change it; a code of ``421`` or ``221`` closes the
    connection after sending.

    :param session: the session; read ``address``, ``ehlo_as``,
        ``extended_smtp``, ``security``, ``auth``, ``envelope``,
        ``reverse_address`` and ``protocol`` from it.
    """

    def __init__(self, session: SmtpSession) -> None:
        self.session = session


class SmtpSession:
    """The handlers object behind one :class:`SmtpEdge` connection.

    Attributes read by validators: :attr:`address`, :attr:`extended_smtp`,
    :attr:`security`, :attr:`ehlo_as`, :attr:`auth`, :attr:`envelope`,
    :attr:`reverse_address`, :attr:`protocol`.
    """

    __slots__ = (
        "_io",
        "_messages",
        "_opened",
        "_ptr_lookup",
        "_ptr_runtime",
        "_rejects",
        "_tls",
        "address",
        "auth",
        "ehlo_as",
        "envelope",
        "extended_smtp",
        "handoff",
        "reverse_address",
        "security",
        "submitter",
        "utf8",
        "validators",
    )

    def __init__(
        self,
        address: Any,
        validator_class: type[SmtpValidators] | None,
        handoff: Callable[[Envelope], Handoff],
    ) -> None:
        #: The client's ``(ip, port)``.
        self.address = address
        #: Gives a received message to the queue: :meth:`Edge.handoff_result`.
        self.handoff = handoff
        #: True after EHLO (rather than HELO).
        self.extended_smtp = False
        #: ``None``, or ``'TLS'`` once the session is encrypted.
        self.security: str | None = None
        #: The name the client gave with EHLO or HELO.
        self.ehlo_as: str | None = None
        #: ``None``, or ``(authcid, authzid)`` after a successful AUTH.
        self.auth: tuple[str, str | None] | None = None
        #: The message being received.
        self.envelope: Envelope | None = None
        #: The client's PTR name when looked up; ``None`` otherwise.
        self.reverse_address: str | None = None
        self.utf8 = False
        #: The ``AUTH=`` mailbox of MAIL (RFC 4954 5), kept when authenticated.
        self.submitter: str | None = None
        self.validators = validator_class(self) if validator_class is not None else None
        self._ptr_lookup: PtrLookup | None = None
        self._ptr_runtime = 0.0
        # For the mail log: the connection's IO (set by SmtpEdge.handle), the
        # TLS (protocol, cipher), messages accepted and commands refused,
        # and when the session started (None once its end is logged).
        self._io: Any = None
        self._tls: tuple[str | None, str | None] | None = None
        self._messages = 0
        self._rejects = 0
        self._opened: float | None = None

    def _start_ptr_lookup(self, runtime: float) -> None:
        """Look the client's address up; the first message waits for the
        answer until *runtime* seconds after this call at most."""
        ip = self.address[0] if self.address else None
        if not ip:
            return
        known, hostname = PtrLookup.cached(ip)
        if known:
            # A repeated client: no greenlet, no wait.
            self.reverse_address = hostname
            return
        lookup = self._ptr_lookup = PtrLookup(ip)
        self._ptr_runtime = runtime
        lookup.rawlink(self._ptr_found)
        lookup.start()

    def _ptr_found(self, lookup: PtrLookup) -> None:
        # As soon as the name is known validators see it too; the finished
        # greenlet is let go rather than kept for the session's lifetime.
        if lookup is self._ptr_lookup:
            self._ptr_lookup = None
            self.reverse_address = lookup.finish()

    def _end_ptr_lookup(self, runtime: float | None) -> None:
        lookup = self._ptr_lookup
        if lookup is not None:
            self._ptr_lookup = None
            self.reverse_address = lookup.finish(runtime)

    @property
    def protocol(self) -> str:
        """The ``with`` protocol of RFC 3848 / RFC 6531, e.g. ``'ESMTPSA'``."""
        # RFC 6531 3.7.3 names SMTPUTF8 sessions UTF8SMTP.
        proto = "UTF8SMTP" if self.utf8 else "ESMTP" if self.extended_smtp else "SMTP"
        if self.security == "TLS":
            proto += "S"
        if self.auth:
            proto += "A"
        return proto

    def _hook(self, name: str, *args: Any) -> None:
        validators = self.validators
        if validators is not None and name in _hooks_of(type(validators)):
            getattr(validators, name)(*args)

    # Mail log (slimta.logging.maillog) -------------------------------------
    def _peer_fields(self) -> dict[str, Any]:
        address = self.address
        if isinstance(address, tuple) and len(address) >= 2:
            return {"client": address[0], "port": address[1]}
        return {"client": address or None, "port": None}

    def _log_connect(self) -> None:
        self._opened = time.monotonic()
        if _maillog.wanted():
            _maillog.emit(_INFO, "connect", self._peer_fields())

    def _log_disconnect(self) -> None:
        opened = self._opened
        if opened is None:
            return  # never logged as connected, or logged already
        self._opened = None
        if not _maillog.wanted():
            return
        fields = self._peer_fields()
        tls = self._tls
        fields["tls"] = "yes" if self.security == "TLS" else "no"
        fields["tls_protocol"] = tls[0] if tls else None
        fields["tls_cipher"] = tls[1] if tls else None
        fields["messages"] = self._messages
        fields["rejects"] = self._rejects
        fields["duration"] = round(time.monotonic() - opened, 3)
        _maillog.emit(_INFO, "disconnect", fields)

    def _log_tls(self) -> None:
        sock: Any = self._io.socket if self._io is not None else None
        protocol = cipher = None
        # ssl.SSLSocket, or gevent's, which does not derive from it.
        if sock is not None and callable(getattr(sock, "cipher", None)):
            protocol = sock.version()
            described = sock.cipher()
            cipher = described[0] if described else None
        self._tls = (protocol, cipher)
        fields = self._peer_fields()
        fields["tls_protocol"], fields["tls_cipher"] = self._tls
        _maillog.emit(_INFO, "tls", fields)

    def _reject(
        self, command: str, reply: Reply, sender: str | None = None, rcpt: str | None = None
    ) -> None:
        """Count, and log, a command refused with *reply*."""
        self._rejects += 1
        if not _maillog.wanted():
            return
        fields = self._peer_fields()
        fields["command"] = command
        fields["code"] = reply.code
        fields["reply"] = reply_text(reply)
        fields["from"] = sender
        fields["to"] = rcpt
        fields["helo"] = self.ehlo_as
        _maillog.emit(_INFO, "reject", fields)

    def _log_accepted(self, results: list[tuple[Envelope, Any]], size: int) -> None:
        """Log each message the queue stored: one line per queue id."""
        ip = self.address[0] if isinstance(self.address, tuple) and self.address else None
        auth = self.auth[0] if self.auth else None
        for envelope, outcome in results:
            if outcome is None or isinstance(outcome, BaseException):
                continue
            fields = {
                "id": str(outcome),
                "from": envelope.sender,
                "size": size,
                "nrcpt": len(envelope.recipients),
                "client": ip,
                "proto": self.protocol,
                "helo": self.ehlo_as,
                "auth": auth,
            }
            _maillog.emit(_INFO, "accepted", fields)

    # Server callbacks ------------------------------------------------------
    def BANNER_(self, reply: Reply) -> None:
        self._hook("handle_banner", reply, self.address)
        if reply.is_error():
            self._reject("CONNECT", reply)

    def EHLO(self, reply: Reply, ehlo_as: str) -> None:
        self._hook("handle_ehlo", reply, ehlo_as)
        if reply.code == "250":
            self.extended_smtp = True
            self.ehlo_as = ehlo_as
            self.envelope = None
        elif reply.is_error():
            self._reject("EHLO", reply)

    def HELO(self, reply: Reply, helo_as: str) -> None:
        self._hook("handle_helo", reply, helo_as)
        if reply.code == "250":
            self.extended_smtp = False
            self.ehlo_as = helo_as
            self.envelope = None
        elif reply.is_error():
            self._reject("HELO", reply)

    def TLSHANDSHAKE(self) -> None:
        # RFC 3207 4.2: the client must greet again; forget what came before.
        self.security = "TLS"
        self.ehlo_as = None
        self.envelope = None
        self.auth = None
        if _maillog.wanted():
            self._log_tls()
        self._hook("handle_tls")

    def AUTH(self, reply: Reply, creds: Any) -> None:
        self._hook("handle_auth", reply, creds)
        if reply.code == "235":
            self.auth = (creds.authcid, creds.authzid)
        elif reply.is_error():
            self._reject("AUTH", reply)

    def MAIL(self, reply: Reply, address: str, params: dict[bytes, Any]) -> None:
        self._hook("handle_mail", reply, address, params)
        if reply.code == "250":
            self.envelope = Envelope(sender=address)
            self.utf8 = b"SMTPUTF8" in params
            ret = params.get(b"RET")
            if isinstance(ret, bytes):
                self.envelope.dsn_ret = ret.upper().decode("ascii")
            envid = params.get(b"ENVID")
            if isinstance(envid, bytes):
                self.envelope.dsn_envid = decode_xtext(envid)
            # RFC 8689: the core accepts it only under TLS, when offered.
            if params.get(b"REQUIRETLS") is True:
                self.envelope.requiretls = True
            submitter = params.get(b"AUTH")
            # RFC 4954 5: only an authenticated client may name a submitter.
            if isinstance(submitter, bytes) and submitter != b"<>" and self.auth:
                self.submitter = decode_xtext(submitter)
            else:
                self.submitter = None
        elif reply.is_error():
            self._reject("MAIL", reply, address)

    def RCPT(self, reply: Reply, address: str, params: dict[bytes, Any]) -> None:
        self._hook("handle_rcpt", reply, address, params)
        envelope = self.envelope
        if reply.code == "250" and envelope is not None:
            envelope.recipients.append(address)
            if params:
                self._keep_dsn_params(envelope, address, params)
        elif reply.is_error():
            self._reject("RCPT", reply, envelope.sender if envelope else None, address)

    @staticmethod
    def _keep_dsn_params(envelope: Envelope, address: str, params: dict[bytes, Any]) -> None:
        notify = params.get(b"NOTIFY")
        if isinstance(notify, bytes):
            if envelope.dsn_notify is None:
                envelope.dsn_notify = {}
            words = notify.upper().decode("ascii").split(",")
            envelope.dsn_notify[address] = tuple(words)
        orcpt = params.get(b"ORCPT")
        if isinstance(orcpt, bytes):
            if envelope.dsn_orcpt is None:
                envelope.dsn_orcpt = {}
            addr_type, _, xtext = orcpt.partition(b";")
            envelope.dsn_orcpt[address] = f"{addr_type.decode('ascii')};{decode_xtext(xtext)}"

    def DATA(self, reply: Reply) -> None:
        self._hook("handle_data", reply)
        if reply.is_error():
            envelope = self.envelope
            self._reject("DATA", reply, envelope.sender if envelope else None)

    def RSET(self, reply: Reply) -> None:
        self.envelope = None
        self._hook("handle_rset", reply)

    def HAVE_DATA(self, reply: Reply, data: bytes | None, err: Exception | None) -> None:
        envelope = self.envelope
        self.envelope = None
        sender = envelope.sender if envelope is not None else None
        if err is not None:
            # The core refused the content and chose the reply (552 5.3.4
            # for a message over SIZE).
            self._reject("END-OF-MESSAGE", reply, sender)
            return
        assert data is not None and envelope is not None
        self._hook("handle_have_data", reply, data)
        if reply.code != "250":
            if reply.is_error():
                self._reject("END-OF-MESSAGE", reply, sender)
            return
        # Spec 16: 4.0 never stored the PTR result; wait for it, bounded.
        self._end_ptr_lookup(self._ptr_runtime)
        envelope.client = {
            "ip": self.address[0] if self.address else None,
            "host": self.reverse_address,
            "name": self.ehlo_as,
            "protocol": self.protocol,
            "auth": self.auth,
            "submitter": self.submitter,
        }
        envelope.parse(data)
        handoff = self.handoff(envelope)
        reply.copy(handoff.reply)
        self._hook("handle_queued", reply, handoff.results)
        if handoff.accepted:
            self._messages += 1
            if _maillog.wanted():
                self._log_accepted(handoff.results, len(data))
        if reply.is_error():
            self._reject("END-OF-MESSAGE", reply, sender)


_HOOK_NAMES = (
    "handle_banner",
    "handle_ehlo",
    "handle_helo",
    "handle_tls",
    "handle_auth",
    "handle_mail",
    "handle_rcpt",
    "handle_data",
    "handle_have_data",
    "handle_queued",
    "handle_rset",
)
_HOOKS: dict[type, frozenset[str]] = {}


def _hooks_of(cls: type) -> frozenset[str]:
    """The validator hooks a class defines, looked up once per class."""
    hooks = _HOOKS.get(cls)
    if hooks is None:
        hooks = _HOOKS[cls] = frozenset(n for n in _HOOK_NAMES if callable(getattr(cls, n, None)))
    return hooks


class SmtpEdge(EdgeServer):
    """Receives mail over SMTP and hands each message to *queue*.

    :param listener: ``(ip, port)`` or a listening socket.
    :param queue: a queue, or any object with ``enqueue(envelope)``.
    :param pool: a :class:`gevent.pool.Pool` bounding concurrent sessions.
    :param max_size: advertise ``SIZE max_size`` and refuse bigger messages
        (552 5.3.4); ``None`` advertises no limit.
    :param validator_class: a :class:`SmtpValidators` subclass, instantiated
        per connection.
    :param auth: ``False``, ``True``, or a list of SASL mechanism names.
    :param context: a server :class:`ssl.SSLContext`: STARTTLS, or implicit
        TLS with *tls_immediately*.
    :param tls_immediately: TLS from the first byte (port 465, RFC 8314).
    :param command_timeout: seconds to wait for each command.
    :param data_timeout: seconds for a whole message's content.
    :param hostname: the server name, in greetings and ``Envelope.receiver``.
    :param max_recipients: accepted RCPTs per message (then 452 4.5.3).
    :param max_errors: protocol errors per session (then 421 4.7.0).
    :param park_after: seconds an idle plain-text session keeps its greenlet
        before waiting in the event loop instead, so that idle connections
        cost little memory; ``None`` disables this. Only used with an
        unbounded *pool*.

    .. versionchanged:: 4.0
       *context* replaces the ``tls`` dict of file names.
    """

    _handler_closes_socket = True

    #: Look up each client's PTR name in the background when its session
    #: starts, for ``session.reverse_address`` and ``envelope.client['host']``.
    #: Set to ``False`` (on the class or an instance) to skip the lookups.
    ptr_lookup = True
    #: Seconds after a connection opens until which its first message waits
    #: for a PTR answer still outstanding, before being queued without it.
    ptr_lookup_timeout = 5.0
    #: Offer REQUIRETLS (RFC 8689) in the EHLO reply of TLS sessions and
    #: accept ``MAIL FROM:<...> REQUIRETLS`` there, which sets
    #: :attr:`Envelope.requiretls <slimta.envelope.Envelope.requiretls>`.
    #: Set to ``False`` when the queue's relays cannot honour it.
    requiretls = True

    def __init__(
        self,
        listener: Any,
        queue: QueueLike,
        pool: Pool | None = None,
        max_size: int | None = None,
        validator_class: type[SmtpValidators] | None = None,
        auth: bool | list[bytes] | list[str] = False,
        context: ssl.SSLContext | None = None,
        tls_immediately: bool = False,
        command_timeout: float | None = None,
        data_timeout: float | None = None,
        hostname: str | None = None,
        *,
        max_recipients: int = 1000,
        max_errors: int = 20,
        park_after: float | None = 1.0,
    ) -> None:
        super().__init__(listener, queue, pool, hostname)
        self.max_size = max_size
        self.validator_class = validator_class
        self.auth = auth
        self.context = context
        self.tls_immediately = tls_immediately
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.max_recipients = max_recipients
        self.max_errors = max_errors
        #: Seconds a session may wait for a command inside its greenlet
        #: before it parks in the event loop; ``None`` never parks.
        self.park_after: float | None = park_after
        self._parked: set[Server] = set()

    def handle(self, socket: Any, address: Any) -> None:
        """Serve one SMTP session on an accepted connection."""
        log.accept(self.server, socket, address)
        session = SmtpSession(address, self.validator_class, self.handoff_result)
        server = Server(
            socket,
            session,
            auth=self.auth,
            context=self.context,
            tls_immediately=self.tls_immediately,
            command_timeout=self.command_timeout,
            data_timeout=self.data_timeout,
            hostname=self.hostname,
            address=address,
            max_recipients=self.max_recipients,
            max_errors=self.max_errors,
        )
        if self.max_size:
            server.extensions.add("SIZE", self.max_size)
        if self.requiretls and self.context is not None:
            # The core leaves it out of the EHLO reply until TLS is on.
            server.extensions.add("REQUIRETLS")
        if self.ptr_lookup:
            session._start_ptr_lookup(self.ptr_lookup_timeout)
        session._io = server.io
        session._log_connect()
        self._serve(server)

    @property
    def parked_sessions(self) -> int:
        """How many idle sessions wait in the event loop, holding no greenlet."""
        return len(self._parked)

    def _serve(self, server: Server) -> None:
        # Idle sessions park outside any greenlet, which keeps an idle
        # connection small; only with an unbounded pool, since a parked
        # session gives its pool slot back.
        park_after = self.park_after if self.pool.size is None else None
        parked = False
        try:
            parked = server.serve(park_after)
        except ConnectionLost:
            pass
        except OSError as exc:
            log.error(server.io.socket, exc, server.io.address)
        finally:
            if parked:
                self._parked.add(server)
                server.park(lambda: self._wake(server))
            else:
                self._close(server)

    def _wake(self, server: Server) -> None:
        self._parked.discard(server)
        self.pool.spawn(self._serve_woken, server)

    def _serve_woken(self, server: Server) -> None:
        try:
            self._serve(server)
        except Exception:
            slogging.log_exception(__name__)
            raise

    @staticmethod
    def _close(server: Server) -> None:
        server.handlers._log_disconnect()
        server.io.close()
        server.handlers._end_ptr_lookup(None)

    def _end_idle_sessions(self) -> None:
        parked, self._parked = self._parked, set()
        for server in parked:
            server.stop()
            self._close(server)
