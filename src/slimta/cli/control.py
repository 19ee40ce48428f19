"""What ``slimta serve`` offers the queue tools and ``slimta sendmail``.

Two Unix sockets in the data directory, created when the server starts
(after it switched user, so they belong to the server's user) and removed
when it stops:

``control.sock`` (mode 0600)
    The queue tools (``slimta queue ...``, :mod:`slimta.cli.queuetool`) ask
    the running server to list, show, flush, remove, hold and release
    messages. Only the server's user and root can connect; on Linux the
    peer's credentials are checked as well.

``submit.sock`` (mode 0660)
    SMTP for local submission (``slimta sendmail``,
    :mod:`slimta.cli.sendmail`). The kernel tells the server which local
    user connected (``SO_PEERCRED``), and the session counts as
    authenticated as that user: it may relay, like a client that logged in
    with AUTH (``with ESMTPA`` in ``Received``, DKIM signing). Who may submit
    is decided by the socket's permissions: the server's user, its group and
    root, as Postfix's ``postdrop`` group decides who may use its
    ``sendmail``. Loopback TCP connections stay untrusted (unless
    ``server.trusted_networks`` says otherwise), so a local process that can
    only open TCP connections (a web application tricked into it, say)
    cannot relay.

The control protocol
--------------------

One request per connection. The client sends one line: a JSON object with
``"v": 1``, ``"op"`` and, for most operations, ``"id"`` (a queue id, 32
lower-case hex digits). The server answers one line, a JSON object, and
closes the connection::

    {"v": 1, "op": "list"}            -> {"ok": true, "messages": [INFO, ...]}
    {"v": 1, "op": "show", "id": ID}  -> {"ok": true, "message": INFO, "data": BASE64}
    {"v": 1, "op": "flush"}           -> {"ok": true, "flushed": COUNT}
    {"v": 1, "op": "flush", "id": ID} -> {"ok": true, "flushed": 1}
    {"v": 1, "op": "remove", "id": ID}  -> {"ok": true}
    {"v": 1, "op": "hold", "id": ID}    -> {"ok": true, "changed": BOOL}
    {"v": 1, "op": "release", "id": ID} -> {"ok": true, "changed": BOOL}

and on failure ``{"ok": false, "error": NAME, "message": WORDS}``, where
NAME is one of :data:`ERROR_STATUS`. ``INFO`` is :func:`message_info`'s
object; ``data`` is the whole message (headers and body) in base64.

Holding messages
----------------

A held message is stored with :data:`HELD_AT` (the year 3000) as its next
attempt time: nothing new on disk, so :class:`~slimta.diskstorage.DiskStorage`
keeps it across restarts as it is, and the tools can hold and release
messages in the spool files while the server is stopped. In the server,
:class:`ControlledStorage` stands between the queue and the disk storage:
it leaves held messages out of what the queue loads at start, never hands a
held message to an attempt (``get`` says it is gone, which the queue takes
as "removed meanwhile"), and keeps :data:`HELD_AT` when an attempt under way
as the message was held reschedules it. Released messages are due at once,
and are announced to the queue through :meth:`ControlledStorage.wait`, the
storage interface's way of telling a queue about messages it did not store.

Last errors
-----------

The queue keeps no record of why an attempt failed, and the disk format has
no place for it, so the server remembers the last failure of each message in
memory (:class:`RecordingRelay` sees every attempt's outcome). ``slimta
queue list`` shows it while the server runs; after a restart it is unknown
until the next attempt fails again, and the tools working on the spool
files (server stopped) cannot show it.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import json
import logging
import os
import pwd
import re
import socket
import stat
import struct
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gevent.queue
import gevent.socket
from gevent.server import StreamServer

from slimta.cli.access import Runtime, ServeValidators
from slimta.edge.smtp import SmtpEdge
from slimta.envelope import Envelope
from slimta.queue import Queue, QueueError, QueueStorage
from slimta.relay import Relay, RelayError
from slimta.smtp.reply import Reply

if TYPE_CHECKING:
    from slimta.cli.build import Built
    from slimta.relay import AttemptResult

__all__ = [
    "CONTROL_SOCKET",
    "ERROR_STATUS",
    "EX_IOERR",
    "EX_PROTOCOL",
    "EX_TEMPFAIL",
    "HELD_AT",
    "SUBMIT_SOCKET",
    "Control",
    "ControlledStorage",
    "LocalPeer",
    "RecordingRelay",
    "is_queue_id",
    "message_info",
]

log = logging.getLogger("slimta.control")

# sysexits.h values that slimta.cli.errors does not list (yet).
#: An input/output error (a queue file that cannot be written).
EX_IOERR = 74
#: A temporary failure: trying again later may work (the server is down).
EX_TEMPFAIL = 75
#: The other side said something that makes no sense.
EX_PROTOCOL = 76

#: The control socket's name in the data directory.
CONTROL_SOCKET = "control.sock"
#: The local submission socket's name in the data directory.
SUBMIT_SOCKET = "submit.sock"
#: The version in every request.
PROTOCOL_VERSION = 1
#: The longest request line accepted (bytes).
MAX_REQUEST = 4096
#: Seconds a control client may take to send its request.
REQUEST_TIMEOUT = 10.0
#: The next-attempt time that marks a held message: 3000-01-01T00:00:00Z.
HELD_AT = 32503680000.0

#: Error names of the protocol, and the exit status the tools give each.
ERROR_STATUS: dict[str, int] = {
    # sysexits.h: EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_NOPERM, EX_IOERR
    "bad-request": 64,
    "held": 65,
    "no-such-message": 66,
    "not-permitted": 77,
    "storage-error": EX_IOERR,
}

_QUEUE_ID = re.compile(r"[0-9a-f]{32}")


def is_queue_id(text: object) -> bool:
    """Whether *text* has the form of a queue id (32 lower-case hex digits)."""
    return isinstance(text, str) and _QUEUE_ID.fullmatch(text) is not None


def message_info(
    id: str,
    envelope: Envelope,
    attempts: int,
    next_attempt: float | None,
    state: str,
    last_error: str | None,
) -> dict[str, Any]:
    """The JSON object describing one queued message (``INFO`` above).

    :param state: ``active`` (an attempt is under way), ``held``,
        ``deferred`` (attempted before) or ``waiting`` (never attempted).
    """
    header, body = envelope.flatten()
    client = envelope.client or {}
    auth = client.get("auth")
    return {
        "id": id,
        "received": envelope.timestamp,
        "size": len(header) + len(body),
        "sender": envelope.sender,
        "recipients": list(envelope.recipients),
        "attempts": attempts,
        "state": state,
        "next_attempt": None if state in ("active", "held") else next_attempt,
        "last_error": last_error,
        "client": {
            "ip": client.get("ip"),
            "host": client.get("host"),
            "name": client.get("name"),
            "protocol": client.get("protocol"),
            "auth": auth[0] if isinstance(auth, tuple | list) and auth else None,
        },
    }


def state_of(*, held: bool, active: bool, attempts: int) -> str:
    """The ``state`` of :func:`message_info`."""
    if held:
        return "held"
    if active:
        return "active"
    return "deferred" if attempts else "waiting"


# --- between the queue and the disk ----------------------------------------------


class ControlledStorage(QueueStorage):
    """The queue's storage in ``slimta serve``: *store*, with held messages
    kept back (see "Holding messages" in the module notes) and the last error
    of each message remembered.

    :param store: the storage that keeps the messages.
    """

    def __init__(self, store: QueueStorage) -> None:
        #: The storage that keeps the messages.
        self.store = store
        #: Ids of the held messages.
        self.held: set[str] = set()
        #: Ids removed by an operator: updates an attempt under way makes
        #: afterwards are dropped.
        self.removed: set[str] = set()
        #: The last failure of each message, as text.
        self.last_errors: dict[str, str] = {}
        # The id each envelope being attempted was stored under: the queue
        # hands the relay the very object that write() or get() saw.
        self._ids: weakref.WeakKeyDictionary[Envelope, str] = weakref.WeakKeyDictionary()
        self._announced: gevent.queue.Queue[tuple[float, str]] = gevent.queue.Queue()

    def id_of(self, envelope: Envelope) -> str | None:
        """The id *envelope* was stored or read under, if known."""
        return self._ids.get(envelope)

    def announce(self, timestamp: float, id: str) -> None:
        """Have the queue attempt *id* at *timestamp* (see :meth:`wait`)."""
        self._announced.put((timestamp, id))

    # -- QueueStorage ----------------------------------------------------------

    def write(self, envelope: Envelope, timestamp: float) -> str:
        """Store a new message (never held)."""
        id = self.store.write(envelope, timestamp)
        self._ids[envelope] = id
        return id

    def set_timestamp(self, id: str, timestamp: float) -> None:
        """Store the next attempt time; a held message keeps :data:`HELD_AT`."""
        if id in self.removed:
            return
        self.store.set_timestamp(id, HELD_AT if id in self.held else timestamp)

    def increment_attempts(self, id: str) -> int:
        """Count one more attempt (of a message still stored)."""
        if id in self.removed:
            return 1  # not stored any more; the count goes nowhere
        return self.store.increment_attempts(id)

    def set_recipients_delivered(self, id: str, rcpt_indexes: Sequence[int]) -> None:
        """Mark recipients done (of a message still stored)."""
        if id not in self.removed:
            self.store.set_recipients_delivered(id, rcpt_indexes)

    def load(self) -> list[tuple[float, str]]:
        """The stored messages, without the held ones (noted as held)."""
        entries = []
        for timestamp, id in self.store.load():
            if timestamp >= HELD_AT:
                self.held.add(id)
            else:
                entries.append((timestamp, id))
        return entries

    def get(self, id: str) -> tuple[Envelope, int]:
        """The message for an attempt; a held message is not available.

        :raises KeyError: *id* is not stored, or held.
        """
        if id in self.held or id in self.removed:
            raise KeyError(id)
        envelope, attempts = self.store.get(id)
        self._ids[envelope] = id
        return envelope, attempts

    def remove(self, id: str) -> None:
        """Delete a message, and forget its hold and last error."""
        self.held.discard(id)
        self.last_errors.pop(id, None)
        self.store.remove(id)

    def wait(self) -> Iterator[tuple[float, str]]:
        """Yield the messages released or flushed by an operator that the
        queue is not waiting for already."""
        while True:
            yield self._announced.get()

    def get_info(self) -> dict[str, Any]:
        """The storage's statistics."""
        return self.store.get_info()


def _reply_text(reply: Reply) -> str:
    return " ".join(str(reply).split())


class RecordingRelay(Relay):
    """Delivers through *relay* and notes each message's last failure in
    :attr:`ControlledStorage.last_errors`.

    :param relay: the relay that delivers.
    :param storage: the storage the queue reads messages from.
    """

    def __init__(self, relay: Relay, storage: ControlledStorage) -> None:
        super().__init__()
        self.relay = relay
        self.storage = storage

    def _attempt(self, envelope: Envelope, attempts: int) -> AttemptResult:
        """Attempt through the wrapped relay; note what failed, if anything."""
        id = self.storage.id_of(envelope)
        recipients = list(envelope.recipients)
        try:
            result = self.relay._attempt(envelope, attempts)
        except RelayError as exc:
            self._note(id, _reply_text(exc.reply))
            raise
        except Exception as exc:
            self._note(id, "unhandled delivery error: " + " ".join(str(exc).split()))
            raise
        failures: list[str] = []
        if isinstance(result, Mapping):
            failures = [
                f"<{rcpt}>: {_reply_text(outcome.reply)}"
                for rcpt, outcome in result.items()
                if isinstance(outcome, RelayError)
            ]
        elif isinstance(result, list | tuple):
            failures = [
                f"<{rcpt}>: {_reply_text(outcome.reply)}"
                for rcpt, outcome in zip(recipients, result, strict=False)
                if isinstance(outcome, RelayError)
            ]
        if failures:
            self._note(id, "; ".join(failures))
        return result

    def attempt(self, envelope: Envelope, attempts: int) -> AttemptResult:
        """The same as :meth:`_attempt` (the wrapped relay runs its policies)."""
        return self._attempt(envelope, attempts)

    def _note(self, id: str | None, text: str) -> None:
        if id is not None and id not in self.storage.removed:
            self.storage.last_errors[id] = text

    def kill(self) -> None:
        """Release the wrapped relay's resources."""
        self.relay.kill()


# --- the control service --------------------------------------------------------------


class _Refused(Exception):
    """A request that cannot be carried out: its error name and words."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class ControlService:
    """Carries out the requests of the control protocol on a running queue.

    :param storage: the queue's storage.
    :param queue: the running queue.
    :param clock: epoch seconds.
    """

    def __init__(self, storage: ControlledStorage, queue: Queue, clock: Any = time.time) -> None:
        self.storage = storage
        self.queue = queue
        self.clock = clock

    def handle(self, request: object) -> dict[str, Any]:
        """The response to one decoded request."""
        try:
            if not isinstance(request, dict) or request.get("v") != PROTOCOL_VERSION:
                raise _Refused("bad-request", f"expected a version {PROTOCOL_VERSION} request")
            op = request.get("op")
            id = request.get("id")
            if id is not None and not is_queue_id(id):
                raise _Refused("bad-request", f"not a queue id: {id!r}")
            if op == "list":
                return {"ok": True, "messages": self.list()}
            if op == "flush" and id is None:
                return {"ok": True, "flushed": self.flush_all()}
            if op not in ("show", "flush", "remove", "hold", "release"):
                raise _Refused("bad-request", f"unknown operation {op!r}")
            if id is None:
                raise _Refused("bad-request", f'"{op}" needs an id')
            if op == "show":
                info, data = self.show(id)
                return {"ok": True, "message": info, "data": base64.b64encode(data).decode()}
            if op == "flush":
                self.flush(id)
                return {"ok": True, "flushed": 1}
            if op == "remove":
                self.remove(id)
                return {"ok": True}
            changed = self.hold(id) if op == "hold" else self.release(id)
            return {"ok": True, "changed": changed}
        except _Refused as exc:
            return {"ok": False, "error": exc.error, "message": exc.message}
        except QueueError as exc:
            return {"ok": False, "error": "storage-error", "message": str(exc)}

    # -- operations ------------------------------------------------------------

    def _read(self, id: str) -> tuple[Envelope, int]:
        if id in self.storage.removed:
            raise _Refused("no-such-message", f"no message {id} in the queue")
        try:
            return self.storage.store.get(id)
        except KeyError:
            raise _Refused("no-such-message", f"no message {id} in the queue") from None

    def _info(
        self, id: str, envelope: Envelope, attempts: int, timestamp: float | None
    ) -> dict[str, Any]:
        storage = self.storage
        state = state_of(
            held=id in storage.held, active=id in self.queue.active_ids, attempts=attempts
        )
        return message_info(id, envelope, attempts, timestamp, state, storage.last_errors.get(id))

    def list(self) -> list[dict[str, Any]]:
        """Every stored message, oldest first."""
        scheduled = {id: timestamp for timestamp, id in self.queue.queued}
        infos = []
        for timestamp, id in self.storage.store.load():
            if id in self.storage.removed:
                continue
            try:
                envelope, attempts = self.storage.store.get(id)
            except KeyError:
                continue  # delivered meanwhile
            except QueueError as exc:
                log.error("queue list: cannot read message %s: %s", id, exc)
                continue
            infos.append(self._info(id, envelope, attempts, scheduled.get(id, timestamp)))
        infos.sort(key=lambda info: (info["received"] or 0.0, info["id"]))
        return infos

    def show(self, id: str) -> tuple[dict[str, Any], bytes]:
        """One message's description and its whole text."""
        envelope, attempts = self._read(id)
        scheduled = {id: timestamp for timestamp, id in self.queue.queued}
        info = self._info(id, envelope, attempts, scheduled.get(id))
        header, body = envelope.flatten()
        return info, header + body

    def flush_all(self) -> int:
        """Make every waiting message due now; :returns: how many."""
        self.queue.flush()
        return len(self.queue.queued)

    def flush(self, id: str) -> None:
        """Make message *id* due now."""
        self._read(id)
        if id in self.storage.held:
            raise _Refused(
                "held", f"message {id} is on hold; release it first (slimta queue release {id})"
            )
        now = self.clock()
        self.storage.store.set_timestamp(id, now)
        self._make_due(id, now)

    def _unschedule(self, id: str) -> None:
        queue = self.queue
        if id in queue.queued_ids:
            queue.queued[:] = [entry for entry in queue.queued if entry[1] != id]
            queue.queued_ids.discard(id)

    def _make_due(self, id: str, now: float) -> None:
        queue = self.queue
        if id in queue.active_ids:
            return  # being attempted right now
        if id in queue.queued_ids:
            self._unschedule(id)
            bisect.insort(queue.queued, (now, id))
            queue.queued_ids.add(id)
            queue.wake.set()
        else:
            self.storage.announce(now, id)

    def remove(self, id: str) -> None:
        """Delete message *id*; an attempt under way may still deliver it."""
        self._read(id)
        self.storage.removed.add(id)
        self._unschedule(id)
        self.storage.remove(id)
        log.info("queue: message %s removed by an operator", id)

    def hold(self, id: str) -> bool:
        """Keep message *id* from being attempted; :returns: False when it
        was held already."""
        self._read(id)
        if id in self.storage.held:
            return False
        self.storage.held.add(id)
        self._unschedule(id)
        self.storage.store.set_timestamp(id, HELD_AT)
        log.info("queue: message %s put on hold by an operator", id)
        return True

    def release(self, id: str) -> bool:
        """Let message *id* be attempted again, now; :returns: False when it
        was not held."""
        self._read(id)
        if id not in self.storage.held:
            return False
        self.storage.held.discard(id)
        now = self.clock()
        self.storage.store.set_timestamp(id, now)
        self._make_due(id, now)
        log.info("queue: message %s released by an operator", id)
        return True


# --- sockets ----------------------------------------------------------------------------


class LocalPeer(NamedTuple):
    """The "address" of a local submission client: who connected."""

    #: Always ``None``: there is no IP address (what validators read first).
    ip: None
    #: The user id, ``None`` when the system cannot tell.
    uid: int | None
    #: The process id, ``None`` when the system cannot tell.
    pid: int | None
    #: The user's name (``uid 1234`` without a passwd entry, ``local``
    #: when unknown).
    user: str


def peer_credentials(sock: Any) -> tuple[int, int, int] | None:
    """``(pid, uid, gid)`` of the process at the other end of Unix socket
    *sock*, or ``None`` where the system cannot tell (not Linux)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def local_peer(sock: Any) -> LocalPeer:
    """The :class:`LocalPeer` of an accepted local connection."""
    credentials = peer_credentials(sock)
    if credentials is None:
        return LocalPeer(None, None, None, "local")
    pid, uid, _ = credentials
    return LocalPeer(None, uid, pid, _user_name(uid))


class LocalValidators(ServeValidators):
    """The rules of local submission: the session is authenticated as the
    local user who connected, and connection limits do not apply."""

    def __init__(self, session: Any) -> None:
        super().__init__(session)
        peer = session.address
        user = peer.user if isinstance(peer, LocalPeer) else "local"
        session.auth = (user, None)

    def handle_banner(self, reply: Reply, address: Any) -> None:
        """No limits: local submission must work when strangers fill the server."""


def local_validators(runtime: Runtime) -> type[LocalValidators]:
    """The validators class of local submission on *runtime*."""
    attrs: dict[str, Any] = {"runtime": runtime, "requires_auth": False}
    return type("LocalSubmissionValidators", (LocalValidators,), attrs)


class LocalSubmissionEdge(SmtpEdge):
    """SMTP on ``submit.sock``: each session is authenticated as the local
    user at the other end (see the module notes)."""

    ptr_lookup = False

    def handle(self, socket: Any, address: Any) -> None:
        super().handle(socket, local_peer(socket))


def _bind_unix(path: Path, mode: int) -> Any:
    """A listening Unix socket at *path* with permissions *mode*.

    A socket left at *path* by a server that did not stop cleanly is
    replaced (the caller holds the data directory's lock); anything else
    there is an error.
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket")
        path.unlink()
    # gevent's socket, whether or not the standard library is patched.
    sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Created with no more than *mode* from the start, then set exactly.
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def _read_request(sock: Any) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(MAX_REQUEST + 1)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise _Refused("bad-request", f"request longer than {MAX_REQUEST} bytes")
    return data.partition(b"\n")[0]


def _allowed(sock: Any) -> bool:
    """Root and the server's own user may use the control socket (its mode
    says so too; this holds where the system tells who connected)."""
    credentials = peer_credentials(sock)
    if credentials is None:
        return True
    uid = credentials[1]
    return uid in (0, os.getuid())


class Control:
    """The control socket and local submission of one ``slimta serve``.

    :param storage: the storage the queue keeps its messages in.
    :param data_dir: where the sockets go.
    """

    def __init__(self, storage: QueueStorage, data_dir: Path) -> None:
        #: The storage to give the queue.
        self.storage = ControlledStorage(storage)
        self.data_dir = data_dir
        self.service: ControlService | None = None
        self._control: StreamServer | None = None
        self._submit: LocalSubmissionEdge | None = None

    def relay(self, relay: Relay) -> Relay:
        """The relay to give the queue: *relay*, with failures noted."""
        return RecordingRelay(relay, self.storage)

    def start(self, queue: Queue, built: Built) -> None:
        """Open both sockets. A socket that cannot be made is logged, not
        fatal: the server works without it."""
        self.service = ControlService(self.storage, queue)
        path = self.data_dir / CONTROL_SOCKET
        try:
            sock = _bind_unix(path, 0o600)
        except OSError as exc:
            log.warning(
                "cannot create the control socket %s (%s): the queue tools "
                "will not reach this server",
                path,
                exc.strerror or exc,
            )
        else:
            self._control = StreamServer(sock, self._serve)
            self._control.start()
            log.info("queue tools (slimta queue): control socket %s", path)
        path = self.data_dir / SUBMIT_SOCKET
        try:
            sock = _bind_unix(path, 0o660)
        except OSError as exc:
            log.warning(
                "cannot create the local submission socket %s (%s): slimta sendmail "
                "will use the smtp listener, as an untrusted client",
                path,
                exc.strerror or exc,
            )
            return
        edge = self._submit = LocalSubmissionEdge(
            sock,
            queue,
            validator_class=local_validators(built.runtime),
            park_after=None,
            **self._settings(built),
        )
        edge.start()
        log.info(
            "local submission (slimta sendmail): %s, for the server's user, its group and root",
            path,
        )

    @staticmethod
    def _settings(built: Built) -> dict[str, Any]:
        config = built.config
        return {
            "max_size": config.limits.max_size,
            "command_timeout": config.limits.command_timeout,
            "data_timeout": config.limits.data_timeout,
            "hostname": config.server.hostname,
            "max_recipients": config.limits.max_recipients,
        }

    def reload(self, built: Built) -> None:
        """Apply a new configuration's limits to local submission."""
        if self._submit is not None:
            for name, value in self._settings(built).items():
                setattr(self._submit, name, value)

    def stop(self, grace: float) -> None:
        """Close both sockets; local sessions get *grace* seconds."""
        if self._control is not None:
            self._control.stop(timeout=1.0)
            self._control = None
            with contextlib.suppress(OSError):
                (self.data_dir / CONTROL_SOCKET).unlink()
        if self._submit is not None:
            self._submit.stop(grace)
            self._submit = None
            with contextlib.suppress(OSError):
                (self.data_dir / SUBMIT_SOCKET).unlink()

    def _serve(self, sock: Any, address: Any) -> None:
        """One control connection: one request, one response."""
        sock.settimeout(REQUEST_TIMEOUT)
        response: dict[str, Any]
        try:
            if not _allowed(sock):
                response = {
                    "ok": False,
                    "error": "not-permitted",
                    "message": "only root and the server's user may use the control socket",
                }
            else:
                line = _read_request(sock)
                try:
                    request = json.loads(line)
                except ValueError:
                    raise _Refused("bad-request", "the request is not JSON") from None
                assert self.service is not None
                response = self.service.handle(request)
        except _Refused as exc:
            response = {"ok": False, "error": exc.error, "message": exc.message}
        except OSError:
            return  # the client went away
        with contextlib.suppress(OSError):
            sock.sendall(json.dumps(response).encode("utf-8") + b"\n")
