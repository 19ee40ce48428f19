"""Durable queue storage in plain files: :class:`DiskStorage`.

Layout
------

Each message is one or two files, named after its id (``uuid4().hex``: 32
lowercase hex digits, random, so ids never repeat across restarts or
processes):

* ``<env_dir>/<id>.env`` -- the time of the first delivery attempt and the
  pickled :class:`~slimta.envelope.Envelope`, written once and never
  changed;
* ``<meta_dir>/<id>.meta`` -- JSON metadata: next-attempt time, attempt
  count and the recipients already delivered. It is created by the
  message's first update and replaced by every later one; a message
  delivered at its first attempt never has one.

Both carry a header with a format version, the payload length and a
BLAKE2b checksum (see :mod:`slimta.diskstorage._format`), so a torn or
damaged file is detected when it is read.

Durability
----------

:meth:`DiskStorage.write` returns only when the message survives a crash of
the process or of the machine: each file is written under a temporary name
in ``tmp_dir``, fsynced, renamed into place, and then the directory is
fsynced, which is what makes a rename durable on Linux. Only then does the
queue hand the id back and the SMTP edge answer ``250``. Metadata updates go
the same way, so a metadata file is always either the old or the new one.

Removals are not fsynced: a removal lost in a crash of the machine brings a
delivered message back and it is delivered again. Delivery is at least
once, as with any MTA that crashes between handing a message on and
forgetting it.

Group commit
------------

Every fsync is a journal commit, and a directory fsync is needed after
every rename. So all disk changes go through one committer thread per
storage: greenlets queue their operations and wait; one committer greenlet
takes every operation queued so far as a batch and hands it to the thread,
which writes all the temporary files, makes them durable, renames them all,
and fsyncs each directory once. While it works, new operations pile up for
the next batch. A batch of three files or more is first flushed with one
``syncfs`` of the filesystem (Linux), after which each file's own fsync
finds nothing left to write but still reports that file's errors; so N
concurrent writes cost about two journal commits instead of 2N, and
throughput grows with concurrency (see *syncfs_threshold*).

The gevent hub never blocks on the disk: file writes, fsyncs, renames,
directory listings and envelope reads all run in native threads (the
committer is a one-thread :class:`gevent.threadpool.ThreadPool`; reads use
the hub's threadpool). Results come back through ``ThreadPool.apply``, which
hands them to the waiting greenlet through the hub safely; gevent events are
only ever set in the hub's thread.

Recovery
--------

At construction and in :meth:`DiskStorage.load`:

* temporary files left by a crash are removed;
* a message whose envelope file is damaged, unreadable or not an envelope
  is moved, with its metadata, to ``quarantine_dir`` and logged -- never
  deleted, and never fatal;
* an envelope without metadata is a message never updated: attempts 0, due
  at the first-attempt time stored in its envelope file;
* damaged metadata is quarantined, and the message recovered with fresh
  metadata (attempts 0, due now): mail is never lost, though recipients
  delivered before may get it again;
* metadata without an envelope is removed (nothing to deliver) and logged.

Files whose names are not ``<id>.env`` / ``<id>.meta`` are left alone.

Recipient indexes
-----------------

As :class:`~slimta.queue.QueueStorage` requires, the indexes given to
:meth:`DiskStorage.set_recipients_delivered` are positions in the envelope
returned by the latest :meth:`DiskStorage.get` (or written by
:meth:`DiskStorage.write` when there was none since). The storage translates
them into indexes of the recipient list as originally written, adds them to
the ``delivered`` set in the metadata, and :meth:`DiskStorage.get` leaves
those recipients out. (After a restart, before any ``get``, indexes refer to
the recipients not yet delivered.)

One process only: two processes must not share the directories, and
:meth:`DiskStorage.wait` is not supported.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import gevent
from gevent.event import AsyncResult
from gevent.threadpool import ThreadPool

from slimta.diskstorage._format import (
    ENVELOPE,
    CorruptFile,
    Meta,
    decode_envelope,
    encode_envelope,
)
from slimta.diskstorage._spool import (
    DEFAULT_SYNCFS_THRESHOLD,
    ID_PATTERN,
    NewMessage,
    Op,
    PutMeta,
    Quarantine,
    QuarantineResult,
    Remove,
    Scan,
    ScanResult,
    Spool,
    read_framed,
)
from slimta.envelope import Envelope
from slimta.logging import getQueueStorageLogger, logline
from slimta.queue import QueueError, QueueStorage
from slimta.util.ids import preferred_id

__all__ = ["DiskStorage"]

_log = logging.getLogger(__name__)
_queue_log = getQueueStorageLogger(__name__)

#: No recipients delivered (shared, so every fresh message costs nothing).
_NONE_DELIVERED: frozenset[int] = frozenset()

#: Seconds the idle committer thread lingers before it exits; the next
#: batch starts a new one.
_COMMITTER_IDLE_SECONDS = 10.0

#: The message id inside a temporary file's name, for the log.
_TMP_ID = re.compile(r"-([0-9a-f]{32})\.")


def _describe(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return f"{text} ({exc.filename})" if exc.filename else text


def _nth_remaining(excluded: Sequence[int], n: int) -> int:
    """The *n*-th (from 0) non-negative integer missing from sorted *excluded*."""
    for index in excluded:
        if index > n:
            break
        n += 1
    return n


class DiskStorage(QueueStorage):
    """A :class:`~slimta.queue.QueueStorage` that keeps messages in files.

    See the module documentation for the layout, durability, group commit and
    recovery. Construction creates missing directories, removes temporary
    files left by a crash, and checks and repairs every stored message (see
    :meth:`load`); it waits for the disk in a native thread, like every other
    method.

    :param env_dir: directory of the envelope files.
    :param meta_dir: directory of the metadata files.
    :param tmp_dir: where files are written before being renamed into place;
        it must be on the same filesystem as *env_dir* and *meta_dir*.
        Default: ``tmp`` beside *env_dir*.
    :param quarantine_dir: where damaged files are moved. Default:
        ``quarantine`` beside *env_dir*.
    :param syncfs_threshold: a batch writing at least this many files is
        flushed with one ``syncfs`` before the files' own fsyncs; ``None``
        turns that off. ``syncfs`` also writes back other programs' dirty
        data on the same filesystem, so on a filesystem busy with large
        writes a separate spool filesystem, or ``None``, may be better.
    :raises QueueError: when the directories cannot be created, listed or
        used (for instance *tmp_dir* on another filesystem).

    .. versionchanged:: 4.0
       *tmp_dir* defaults to a directory beside *env_dir* rather than the
       system's temporary directory (which may be another filesystem, where
       the rename is not atomic); files are fsynced and self-validating;
       *quarantine_dir* and *syncfs_threshold* are new.
    """

    def __init__(
        self,
        env_dir: str | os.PathLike[str],
        meta_dir: str | os.PathLike[str],
        tmp_dir: str | os.PathLike[str] | None = None,
        *,
        quarantine_dir: str | os.PathLike[str] | None = None,
        syncfs_threshold: int | None = DEFAULT_SYNCFS_THRESHOLD,
    ) -> None:
        #: Absolute path of the envelope directory.
        self.env_dir = os.path.abspath(env_dir)
        #: Absolute path of the metadata directory.
        self.meta_dir = os.path.abspath(meta_dir)
        beside = os.path.dirname(self.env_dir)
        #: Absolute path of the directory of temporary files.
        self.tmp_dir = os.path.abspath(
            tmp_dir if tmp_dir is not None else os.path.join(beside, "tmp")
        )
        #: Absolute path of the quarantine directory.
        self.quarantine_dir = os.path.abspath(
            quarantine_dir if quarantine_dir is not None else os.path.join(beside, "quarantine")
        )
        self._spool = Spool(
            self.env_dir,
            self.meta_dir,
            self.tmp_dir,
            self.quarantine_dir,
            syncfs_threshold=syncfs_threshold,
        )
        # One thread: the committer's batches must not overlap.
        self._committer = ThreadPool(1, idle_task_timeout=_COMMITTER_IDLE_SECONDS)
        # Every stored message's metadata. Authoritative: updates are made
        # here first (so concurrent greenlets never lose one), then written.
        self._meta: dict[str, Meta] = {}
        self._writing: set[str] = set()
        # Per message, the delivered set as of the latest get() or write():
        # what set_recipients_delivered() indexes are relative to.
        self._views: dict[str, frozenset[int]] = {}
        self._pending: list[tuple[Op, AsyncResult]] = []
        self._committing = False
        self._scans = 0
        self._removed_while_scanning: set[str] = set()
        try:
            removed = self._committer.apply(self._spool.prepare)
        except OSError as exc:
            raise QueueError(f"Cannot use the queue directories: {_describe(exc)}") from exc
        self._log_temps_removed(removed)
        self._scan()

    # -- the committer ---------------------------------------------------------

    def _commit(self, op: Op) -> object:
        """Queue *op* for the committer thread and wait for its outcome."""
        outcome = AsyncResult()
        self._pending.append((op, outcome))
        if not self._committing:
            self._committing = True
            # Spawned rather than run here, so that it starts after every
            # greenlet already runnable has queued its own op: they share
            # the batch (and its fsyncs).
            gevent.spawn(self._commit_loop)
        return outcome.get()

    def _commit_loop(self) -> None:
        """Hand batches of queued ops to the committer thread until none are left."""
        batch: list[tuple[Op, AsyncResult]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    outcomes = self._committer.apply(self._spool.commit, ([op for op, _ in batch],))
                except Exception as exc:
                    # A bug, not a disk error (those are outcomes): every
                    # waiter of the batch sees it.
                    for _, waiter in batch:
                        waiter.set_exception(exc)
                    continue
                for (_, waiter), outcome in zip(batch, outcomes, strict=True):
                    waiter.set(outcome)
                batch = []
        except BaseException:
            # Killed while the thread works: the outcome is unknown, so the
            # waiters must not be told their ops succeeded.
            for _, waiter in batch + self._pending:
                if not waiter.ready():
                    waiter.set_exception(QueueError("Queue storage was stopped"))
            self._pending = []
            raise
        finally:
            self._committing = False

    def _check(self, outcome: object, doing: str, id: str) -> None:
        """Raise :class:`QueueError` if *outcome* is a disk error."""
        if isinstance(outcome, OSError):
            logline(_log.error, "queue", id, "error", doing=doing, error=str(outcome))
            raise QueueError(f"Error {doing}: {_describe(outcome)}") from outcome

    def _update(self, id: str, meta: Meta) -> None:
        """Make *meta* the metadata of *id*, in memory at once and then on disk."""
        self._meta[id] = meta
        self._check(self._commit(PutMeta(id, meta)), "updating message metadata", id)

    # -- QueueStorage ----------------------------------------------------------

    def write(self, envelope: Envelope, timestamp: float) -> str:
        """Store a new message durably; next attempt at *timestamp*, attempts 0.

        Returns only once the envelope file (which holds *timestamp*) is
        fsynced and renamed into place, and its directory fsynced.

        :param envelope: the message.
        :param timestamp: epoch seconds of the first delivery attempt.
        :returns: the new id, ``uuid4().hex``: ``envelope.queue_id`` when it is
            one and free.
        :raises QueueError: when the message could not be stored (disk
            full, permissions ...); no file of it is left behind.
        """
        timestamp = float(timestamp)
        payload = encode_envelope(timestamp, pickle.dumps(envelope, pickle.HIGHEST_PROTOCOL))
        id = preferred_id(envelope.queue_id, self._meta, self._writing)
        meta = Meta(timestamp, 0, _NONE_DELIVERED)
        # Held while the commit yields, so that no concurrent write of a copy
        # of this envelope (a split message) can pick the same id.
        self._writing.add(id)
        try:
            self._check(self._commit(NewMessage(id, payload)), "storing message", id)
        finally:
            self._writing.discard(id)
        self._meta[id] = meta
        self._views[id] = _NONE_DELIVERED
        _queue_log.write(id, envelope)
        return id

    def set_timestamp(self, id: str, timestamp: float) -> None:
        """Store the time of the next delivery attempt, durably.

        :raises KeyError: when *id* is not stored.
        :raises QueueError: when the metadata could not be written.
        """
        meta = self._meta[id]
        _queue_log.update_meta(id, timestamp=timestamp)
        self._update(id, replace(meta, timestamp=float(timestamp)))

    def increment_attempts(self, id: str) -> int:
        """Count one more delivery attempt, durably.

        :returns: the new count.
        :raises KeyError: when *id* is not stored.
        :raises QueueError: when the metadata could not be written.
        """
        meta = self._meta[id]
        attempts = meta.attempts + 1
        _queue_log.update_meta(id, attempts=attempts)
        self._update(id, replace(meta, attempts=attempts))
        return attempts

    def set_recipients_delivered(self, id: str, rcpt_indexes: Sequence[int]) -> None:
        """Mark recipients as delivered, durably; later :meth:`get` calls omit them.

        :param rcpt_indexes: positions in the recipient list of the envelope
            from the latest :meth:`get` (or :meth:`write`); negative ones are
            ignored.
        :raises KeyError: when *id* is not stored.
        :raises QueueError: when the metadata could not be written.
        """
        meta = self._meta[id]
        base = sorted(self._views.get(id, meta.delivered))
        delivered = set(meta.delivered)
        delivered.update(_nth_remaining(base, n) for n in rcpt_indexes if n >= 0)
        _queue_log.update_meta(id, delivered=sorted(delivered))
        self._update(id, replace(meta, delivered=frozenset(delivered)))

    def load(self) -> list[tuple[float, str]]:
        """Repair the spool (see the module notes) and list every message.

        Messages this storage already knows are only looked for, not read
        again; new files are validated in full.

        :returns: ``(timestamp, id)`` for every complete message.
        :raises QueueError: when the directories cannot be listed.
        """
        self._scan()
        return [(meta.timestamp, id) for id, meta in self._meta.items()]

    def get(self, id: str) -> tuple[Envelope, int]:
        """Read a message back, without the recipients already delivered.

        A damaged envelope file is moved to quarantine (and logged) and the
        message treated as gone.

        :returns: ``(envelope, attempts)``.
        :raises KeyError: when *id* is not stored.
        :raises QueueError: when the file cannot be read.
        """
        if id not in self._meta:
            raise KeyError(id)
        path = self._spool.env_path(id)
        try:
            payload = gevent.get_hub().threadpool.apply(read_framed, (path, ENVELOPE))
        except FileNotFoundError:
            # Removed meanwhile, or by someone else.
            self._forget(id)
            raise KeyError(id) from None
        except CorruptFile as exc:
            self._quarantine(id, f"envelope: {exc}")
            raise KeyError(id) from None
        except OSError as exc:
            self._check(exc, "reading message", id)
            raise  # not reached: _check raised
        try:
            envelope = pickle.loads(decode_envelope(payload)[1])
        except Exception as exc:
            self._quarantine(id, f"envelope does not unpickle: {exc!r}")
            raise KeyError(id) from None
        if not isinstance(envelope, Envelope):
            self._quarantine(id, f"envelope file holds a {type(envelope).__name__}")
            raise KeyError(id)
        meta = self._meta.get(id)
        if meta is None:  # removed while we read
            raise KeyError(id)
        self._remove_delivered_rcpts(envelope, meta.delivered)
        self._views[id] = meta.delivered
        return envelope, meta.attempts

    def remove(self, id: str) -> None:
        """Delete a message's files; unknown ids are ignored.

        Not fsynced: see "Durability" in the module notes.

        :raises QueueError: when a file exists but cannot be removed.
        """
        if ID_PATTERN.fullmatch(id) is None:
            return
        self._forget(id)
        if self._scans:
            self._removed_while_scanning.add(id)
        self._check(self._commit(Remove(id)), "removing message", id)
        _queue_log.remove(id)

    def wait(self) -> Iterable[tuple[float, str]]:
        """Not supported: only this process adds messages to the directories.

        :raises NotImplementedError: always.
        """
        raise NotImplementedError("DiskStorage is used by a single process")

    def get_info(self) -> dict[str, Any]:
        """Statistics: ``size`` (messages stored) and the directories."""
        return {
            "size": len(self._meta),
            "env_dir": self.env_dir,
            "meta_dir": self.meta_dir,
            "tmp_dir": self.tmp_dir,
            "quarantine_dir": self.quarantine_dir,
        }

    # -- recovery --------------------------------------------------------------

    def _forget(self, id: str) -> None:
        self._meta.pop(id, None)
        self._views.pop(id, None)

    def _quarantine(self, id: str, reason: str) -> None:
        """Move a message found damaged by :meth:`get` to quarantine."""
        self._forget(id)
        outcome = self._commit(Quarantine(id, reason))
        if isinstance(outcome, QuarantineResult):
            self._log_quarantine(outcome)
        elif isinstance(outcome, OSError):
            logline(_log.error, "queue", id, "quarantine_failed", reason=reason, error=str(outcome))

    def _scan(self) -> None:
        """Run :meth:`Spool.scan <slimta.diskstorage._spool.Spool.scan>` and
        merge what it found into memory."""
        known = frozenset(self._meta)
        self._scans += 1
        try:
            outcome = self._commit(Scan(known, time.time()))
        finally:
            self._scans -= 1
            removed = self._removed_while_scanning
            if not self._scans:
                self._removed_while_scanning = set()
        self._check(outcome, "scanning the queue", "*")
        if not isinstance(outcome, ScanResult):
            raise TypeError(f"scan returned {outcome!r}")
        self._log_scan(outcome)
        # What memory knows wins: it may be ahead of the disk (an update in
        # flight, or one whose write failed and will be retried by the next).
        for id, meta in outcome.metas.items():
            if meta is not None and id not in self._meta and id not in removed:
                self._meta[id] = meta
        for id in known.difference(outcome.metas):
            self._forget(id)

    # -- logging (always in the hub: logging's locks may be gevent locks) --------

    @staticmethod
    def _log_temps_removed(names: Iterable[str]) -> None:
        for name in names:
            match = _TMP_ID.search(name)
            id = match.group(1) if match else "-"
            logline(_log.warning, "queue", id, "tmp_removed", file=name)

    @staticmethod
    def _log_quarantine(result: QuarantineResult) -> None:
        # File names rather than paths: logline cuts values at 100 characters,
        # and the directories are in the configuration anyway.
        for id, path, target, reason in result.moved:
            logline(
                _log.error,
                "queue",
                id,
                "quarantine",
                file=os.path.basename(path),
                moved_to=os.path.basename(target),
                reason=reason,
            )
        for id, path, error, reason in result.stuck:
            logline(
                _log.error,
                "queue",
                id,
                "quarantine_failed",
                file=os.path.basename(path),
                error=error,
                reason=reason,
            )

    def _log_scan(self, result: ScanResult) -> None:
        self._log_temps_removed(result.temps_removed)
        self._log_quarantine(result.quarantine)
        for id, reason in result.recovered:
            logline(_log.warning, "queue", id, "recover", reason=reason, attempts=0)
        for id in result.orphans:
            logline(_log.warning, "queue", id, "orphan_meta_removed")
        for id, what, error in result.errors:
            logline(_log.error, "queue", id, "repair_failed", what=what, error=error)
