"""``slimta queue``: list, show, flush, remove, hold and release queued mail.

Like Postfix's ``postqueue`` and ``postsuper``, the tools work while the
server runs: they ask it over its control socket (``control.sock`` in the
data directory, see :mod:`slimta.cli.control`), so it learns of every change
at once. The data directory is the one of ``--config FILE`` (default: the
embedded default's, ``./slimta-data``).

When no server runs on that data directory, the tools read and change the
queue files themselves:

* ``list`` and ``show`` only read them (last errors are only known to a
  running server);
* ``remove``, ``hold`` and ``release`` lock the data directory as the
  server does, so that no server starts meanwhile, and change the files;
  the server sees the changes when it starts;
* ``flush`` needs the server (exit status 69, ``EX_UNAVAILABLE``): there is
  no one to attempt the mail. Everything queued is attempted when the
  server starts anyway.

Run as root while the queue belongs to another user, the tools working on
the files switch to that user first, so that files they write stay the
server's; and messages are read with an unpickler that only builds
envelopes, never anything a queue file could ask for.

Exit statuses (``sysexits.h``): 0 done; 64 a bad command line or queue id;
65 ``flush`` of a held message; 66 no such message (or no queue); 69
``flush`` without a running server; 74 a queue file could not be written;
75 the server holds the data directory but does not answer; 76 the server
answered nonsense; 77 permission denied (the control socket or the queue
files belong to another user: run as that user or root).
"""

from __future__ import annotations

import base64
import datetime
import errno
import fcntl
import json
import os
import pickle
import re
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from slimta.cli.config import default_config, load_file
from slimta.cli.control import (
    CONTROL_SOCKET,
    ERROR_STATUS,
    EX_IOERR,
    EX_PROTOCOL,
    EX_TEMPFAIL,
    HELD_AT,
    PROTOCOL_VERSION,
    is_queue_id,
    message_info,
    state_of,
)
from slimta.cli.errors import (
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_OK,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    EX_USAGE,
    CliError,
)
from slimta.envelope import Envelope

__all__ = ["ACTIONS", "QueueTool", "format_table", "run_queue"]

#: The subcommands of ``slimta queue``.
ACTIONS = ("list", "show", "flush", "remove", "hold", "release")
#: Seconds to wait for the server's answer (listing a large queue reads it all).
ANSWER_TIMEOUT = 300.0

_ENV_NAME = re.compile(r"([0-9a-f]{32})\.env")


def _data_dir(config_path: str | None) -> Path:
    config = default_config() if config_path is None else load_file(config_path)
    return config.server.data_dir


# --- talking to the server ------------------------------------------------------------


def call(path: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """Send *request* over the control socket *path*; :returns: the answer,
    or ``None`` when no server listens there.

    :raises CliError: the socket cannot be used, or the answer is not one.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except PermissionError:
            raise CliError(
                f"cannot use the control socket {path}: permission denied "
                "(run as the server's user or root)",
                EX_NOPERM,
            ) from None
        except OSError as exc:
            raise CliError(
                f"cannot use the control socket {path}: {exc.strerror or exc}", EX_UNAVAILABLE
            ) from None
        line = json.dumps({"v": PROTOCOL_VERSION, **request}).encode("utf-8") + b"\n"
        chunks: list[bytes] = []
        try:
            sock.sendall(line)
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
        except TimeoutError:
            raise CliError(
                f"the server did not answer in {ANSWER_TIMEOUT:g} s", EX_TEMPFAIL
            ) from None
        except OSError as exc:
            raise CliError(
                f"lost the connection to the server: {exc.strerror or exc}", EX_TEMPFAIL
            ) from None
    finally:
        sock.close()
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise CliError("the server's answer makes no sense (is it another version?)", EX_PROTOCOL)
    if not answer["ok"]:
        message = str(answer.get("message") or answer.get("error"))
        raise CliError(message, ERROR_STATUS.get(str(answer.get("error")), EX_SOFTWARE))
    return answer


# --- the queue files, without the server -------------------------------------------------


class _EnvelopeUnpickler(pickle.Unpickler):
    """Builds envelopes and the :mod:`email` objects in them, and nothing
    else: a queue file must not make the tool (maybe run by root) call
    anything."""

    _ALLOWED = frozenset(
        {
            ("slimta.envelope", "Envelope"),
            ("copyreg", "_reconstructor"),
            ("builtins", "object"),
            ("builtins", "set"),
            ("builtins", "frozenset"),
            ("builtins", "bytearray"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if (module == "email" or module.startswith("email.")) and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__.startswith("email"):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a queued message")


def load_envelope(pickled: bytes | memoryview) -> Envelope:
    """The envelope in a queue file's pickle, built safely.

    :raises ValueError: it is not one.
    """
    try:
        envelope = _EnvelopeUnpickler(_BytesReader(pickled)).load()
    except Exception as exc:
        raise ValueError(f"not an envelope: {exc}") from None
    if not isinstance(envelope, Envelope):
        raise ValueError(f"not an envelope: a {type(envelope).__name__}")
    return envelope


class _BytesReader:
    """The file interface :class:`pickle.Unpickler` reads from."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        chunk = bytes(self._data[self._pos : end])
        self._pos += len(chunk)
        return chunk

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def readline(self) -> bytes:
        rest = bytes(self._data[self._pos :])
        line = rest[: rest.find(b"\n") + 1 or len(rest)]
        self._pos += len(line)
        return line


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message as its files say."""

    id: str
    envelope: Envelope
    attempts: int
    #: Epoch seconds of the next attempt (:data:`~slimta.cli.control.HELD_AT` when held).
    next_attempt: float

    @property
    def held(self) -> bool:
        return self.next_attempt >= HELD_AT


class SpoolReader:
    """Reads the files of a :class:`~slimta.diskstorage.DiskStorage` queue
    without changing anything (no repair, no quarantine: the server does
    that when it starts).

    :param queue_dir: the ``queue`` directory of the data directory.
    :param warn: called with a line for each message that cannot be read.
    """

    def __init__(self, queue_dir: Path, warn: Any = None) -> None:
        self.queue_dir = queue_dir
        self.warn = warn or (lambda line: None)

    def ids(self) -> list[str]:
        """The ids of the envelope files, sorted."""
        names = os.listdir(self.queue_dir / "env")
        return sorted(m.group(1) for m in map(_ENV_NAME.fullmatch, names) if m is not None)

    def read(self, id: str) -> StoredMessage:
        """Message *id*.

        :raises FileNotFoundError: there is none.
        :raises ValueError: its files are damaged.
        :raises OSError: they cannot be read.
        """
        # Imported here: the file format is the disk storage's own business,
        # read only by the tools (and only while the server is stopped).
        from slimta.diskstorage._format import (
            ENVELOPE,
            META,
            CorruptFile,
            decode_envelope,
            decode_meta,
        )
        from slimta.diskstorage._spool import read_framed

        try:
            first_attempt, pickled = decode_envelope(
                read_framed(os.fspath(self.queue_dir / "env" / f"{id}.env"), ENVELOPE)
            )
            envelope = load_envelope(pickled)
            try:
                meta = decode_meta(
                    read_framed(os.fspath(self.queue_dir / "meta" / f"{id}.meta"), META)
                )
            except FileNotFoundError:
                return StoredMessage(id, envelope, 0, first_attempt)
        except CorruptFile as exc:
            raise ValueError(f"damaged: {exc}") from None
        recipients = envelope.recipients
        envelope.recipients = [r for i, r in enumerate(recipients) if i not in meta.delivered]
        return StoredMessage(id, envelope, meta.attempts, meta.timestamp)

    def messages(self) -> Iterator[StoredMessage]:
        """Every readable message; the others are reported to *warn*."""
        for id in self.ids():
            try:
                yield self.read(id)
            except FileNotFoundError:
                continue  # removed meanwhile
            except ValueError as exc:
                self.warn(f"message {id} cannot be read ({exc}); the server quarantines it")
            except PermissionError:
                raise
            except OSError as exc:
                self.warn(f"message {id} cannot be read: {exc.strerror or exc}")


def _info(message: StoredMessage) -> dict[str, Any]:
    state = state_of(held=message.held, active=False, attempts=message.attempts)
    return message_info(
        message.id, message.envelope, message.attempts, message.next_attempt, state, None
    )


# --- output ------------------------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _size(size: int) -> str:
    if size < 1024:
        return str(size)
    for unit in ("K", "M", "G"):
        size_in = size / 1024
        if size_in < 1024 or unit == "G":
            return f"{size_in:.1f}{unit}"
        size = int(size_in)
    raise AssertionError("not reached")


def _path(address: object) -> str:
    return f"<{address}>" if address is not None else "-"


def format_table(infos: list[dict[str, Any]], now: float) -> str:
    """``slimta queue list`` without ``--json``: one line per message, and a
    second one with its last error when known."""
    if not infos:
        return "the queue is empty\n"
    lines = [f"{'ID':<32}  {'AGE':>5}  {'SIZE':>6}  {'TRIES':>5}  {'STATE':<8}  FROM -> TO"]
    total = 0
    for info in infos:
        received = info.get("received")
        age = _age(now - received) if isinstance(received, int | float) else "-"
        recipients = ", ".join(_path(r) for r in info["recipients"])
        lines.append(
            f"{info['id']:<32}  {age:>5}  {_size(info['size']):>6}  {info['attempts']:>5}  "
            f"{info['state']:<8}  {_path(info['sender'])} -> {recipients}"
        )
        if info.get("last_error"):
            lines.append(f"{'':<34}last error: {info['last_error']}")
        total += info["size"]
    count = len(infos)
    lines.append(f"-- {count} message{'' if count == 1 else 's'}, {_size(total)} bytes")
    return "\n".join(lines) + "\n"


def _when(timestamp: object) -> str:
    if not isinstance(timestamp, int | float):
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def format_envelope(info: dict[str, Any], now: float) -> str:
    """The envelope part of ``slimta queue show``."""
    received = info.get("received")
    age = f" ({_age(now - received)} ago)" if isinstance(received, int | float) else ""
    state = info["state"]
    if state in ("waiting", "deferred") and isinstance(info.get("next_attempt"), int | float):
        wait = info["next_attempt"] - now
        state += f", next attempt {'now' if wait <= 0 else 'in ' + _age(wait)}"
    client = info.get("client") or {}
    described = [
        f"{key}={client[key]}"
        for key in ("ip", "host", "name", "protocol", "auth")
        if client.get(key)
    ]
    lines = [
        f"id: {info['id']}",
        f"state: {state}",
        f"received: {_when(received)}{age}",
        f"size: {info['size']} bytes",
        f"sender: {_path(info['sender'])}",
        f"recipients: {', '.join(_path(r) for r in info['recipients'])}",
        f"attempts: {info['attempts']}",
        f"last error: {info.get('last_error') or '-'}",
        f"client: {' '.join(described) or '-'}",
    ]
    return "\n".join(lines) + "\n"


# --- the tool ------------------------------------------------------------------------------


class QueueTool:
    """One run of ``slimta queue ACTION``.

    :param data_dir: the server's data directory.
    :param out: where the output goes (bytes: ``show`` prints the message as stored).
    :param err: where notes go.
    :param clock: epoch seconds.
    """

    def __init__(self, data_dir: Path, out: BinaryIO, err: TextIO, clock: Any = time.time) -> None:
        self.data_dir = data_dir
        self.queue_dir = data_dir / "queue"
        self.out = out
        self.err = err
        self.clock = clock

    def _write(self, text: str) -> None:
        self.out.write(text.encode("utf-8", "surrogateescape"))

    def _note(self, text: str) -> None:
        print(f"slimta: {text}", file=self.err)

    def run(self, action: str, id: str | None, as_json: bool, headers_only: bool) -> int:
        """Carry out *action*; :returns: the exit status."""
        if id is not None and not is_queue_id(id):
            raise CliError(f"not a queue id: {id!r} (expected 32 lower-case hex digits)", EX_USAGE)
        request: dict[str, Any] = {"op": action}
        if id is not None:
            request["id"] = id
        answer = call(self.data_dir / CONTROL_SOCKET, request)
        if answer is None:
            return self._offline(action, id, as_json, headers_only)
        now = self.clock()
        if action == "list":
            self._list(answer["messages"], as_json, now)
        elif action == "show":
            data = base64.b64decode(answer["data"])
            self._show(answer["message"], data, headers_only, now)
        elif action == "flush":
            if id is None:
                count = answer["flushed"]
                self._write(f"{count} message{'' if count == 1 else 's'} will be attempted now\n")
            else:
                self._write(f"{id}: will be attempted now\n")
        elif action == "remove":
            self._write(f"{id}: removed\n")
        elif action == "hold":
            self._write(f"{id}: {'on hold' if answer['changed'] else 'was on hold already'}\n")
        else:
            self._write(f"{id}: {'released' if answer['changed'] else 'was not on hold'}\n")
        return EX_OK

    def _list(self, infos: list[dict[str, Any]], as_json: bool, now: float) -> None:
        if as_json:
            self._write(json.dumps(infos, indent=2) + "\n")
        else:
            self._write(format_table(infos, now))

    def _show(self, info: dict[str, Any], data: bytes, headers_only: bool, now: float) -> None:
        self._write(format_envelope(info, now) + "\n")
        if headers_only:
            end = re.search(rb"\r?\n\r?\n", data)
            data = data[: end.start()] + b"\n" if end else data
        self.out.write(data.replace(b"\r\n", b"\n"))

    # -- without the server ------------------------------------------------------------

    def _offline(self, action: str, id: str | None, as_json: bool, headers_only: bool) -> int:
        if action == "flush":
            raise CliError(
                f"no server is running on {self.data_dir}: flush needs it "
                "(queued mail is attempted when the server starts)",
                EX_UNAVAILABLE,
            )
        if not (self.queue_dir / "env").is_dir():
            raise CliError(
                f"there is no queue in {self.queue_dir} (has slimta serve run with "
                "this configuration?)",
                EX_NOINPUT,
            )
        self._become_owner()
        if action in ("list", "show"):
            self._note(
                f"no server is running on {self.data_dir}: this is the queue as stored "
                "(last errors are only known to a running server)"
            )
            reader = SpoolReader(self.queue_dir, self._note)
            now = self.clock()
            try:
                if action == "list":
                    self._list([_info(m) for m in reader.messages()], as_json, now)
                    return EX_OK
                assert id is not None
                message = self._read(reader, id)
            except PermissionError as exc:
                raise self._denied(exc) from None
            header, body = message.envelope.flatten()
            self._show(_info(message), header + body, headers_only, now)
            return EX_OK
        assert id is not None
        return self._change(action, id)

    def _read(self, reader: SpoolReader, id: str) -> StoredMessage:
        try:
            return reader.read(id)
        except FileNotFoundError:
            raise CliError(f"no message {id} in the queue", EX_NOINPUT) from None
        except ValueError as exc:
            raise CliError(f"message {id} cannot be read: {exc}", EX_DATAERR) from None

    def _denied(self, exc: OSError) -> CliError:
        return CliError(
            f"cannot read the queue in {self.queue_dir}: {exc.strerror or exc} "
            "(run as the server's user or root)",
            EX_NOPERM,
        )

    def _become_owner(self) -> None:
        """As root, become the queue's owner (see the module notes)."""
        if os.geteuid() != 0:
            return
        owner = self.queue_dir.stat()
        if owner.st_uid == 0:
            return
        from slimta.util.system import drop_privileges

        drop_privileges(owner.st_uid, owner.st_gid)

    def _lock(self) -> int:
        """Lock the data directory as ``slimta serve`` does, so that no server
        starts while the files change; :returns: the lock's descriptor."""
        path = self.data_dir / "serve.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError as exc:
            raise self._denied(exc) from None
        except OSError as exc:
            raise CliError(f"cannot open {path}: {exc.strerror or exc}", EX_IOERR) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CliError(f"cannot lock {path}: {exc.strerror or exc}", EX_IOERR) from None
            raise CliError(
                f"a server holds {self.data_dir} but its control socket does not answer "
                "(starting or stopping?); try again",
                EX_TEMPFAIL,
            ) from None
        return fd

    def _change(self, action: str, id: str) -> int:
        """remove, hold or release, in the files (the server is stopped),
        under the locks a server takes: of the data directory, and of the
        spool (which a worker of an earlier server may still hold)."""
        fd = self._lock()
        try:
            # Imported here: only this path needs the storage (and gevent).
            from slimta.diskstorage import DiskStorage
            from slimta.queue import QueueError
            from slimta.util.workers import SpoolBusy, SpoolLock

            try:
                # A worker of an earlier server (server.workers > 1) may
                # still deliver from the spool after the server stopped.
                spool_lock = SpoolLock(self.queue_dir)
            except SpoolBusy as exc:
                raise CliError(f"{exc}; try again once it has stopped", EX_TEMPFAIL) from None
            except PermissionError as exc:
                raise self._denied(exc) from None
            try:
                store = DiskStorage(self.queue_dir / "env", self.queue_dir / "meta")
                stored = {stored_id: ts for ts, stored_id in store.load()}
                if id not in stored:
                    raise CliError(f"no message {id} in the queue", EX_NOINPUT)
                held = stored[id] >= HELD_AT
                if action == "remove":
                    store.remove(id)
                    self._write(f"{id}: removed\n")
                elif action == "hold":
                    if not held:
                        store.set_timestamp(id, HELD_AT)
                    self._write(f"{id}: {'was on hold already' if held else 'on hold'}\n")
                else:
                    if held:
                        store.set_timestamp(id, self.clock())
                    self._write(f"{id}: {'released' if held else 'was not on hold'}\n")
            except QueueError as exc:
                if isinstance(exc.__cause__, PermissionError):
                    raise CliError(
                        f"cannot change the queue in {self.queue_dir}: {exc} "
                        "(run as the server's user or root)",
                        EX_NOPERM,
                    ) from None
                raise CliError(
                    f"cannot change the queue in {self.queue_dir}: {exc}", EX_IOERR
                ) from None
            finally:
                spool_lock.release()
        finally:
            os.close(fd)
        self._note(f"no server is running on {self.data_dir}: changed the queue files")
        return EX_OK


def run_queue(
    action: str,
    config_path: str | None,
    id: str | None = None,
    as_json: bool = False,
    headers_only: bool = False,
) -> int:
    """``slimta queue ACTION [ID]``; :returns: the exit status.

    :raises CliError: with the words and status of what failed.
    """
    tool = QueueTool(_data_dir(config_path), sys.stdout.buffer, sys.stderr)
    try:
        return tool.run(action, id, as_json, headers_only)
    finally:
        sys.stdout.buffer.flush()
