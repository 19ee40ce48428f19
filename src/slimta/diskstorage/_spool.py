"""The file operations of :class:`~slimta.diskstorage.DiskStorage`.

Everything here blocks (writes, fsyncs, renames, directory listings) and runs
in a native thread, never in the gevent hub. One :class:`Spool` belongs to
one storage; its mutating methods are only ever called from that storage's
single committer thread, so they never race each other. Reads of envelope
files (:func:`read_framed`) may run in any thread: a final file is complete
from the moment its name appears, because it is fsynced under a temporary
name first and then renamed.

Nothing here logs: under gevent's monkey patching the :mod:`logging` locks
are gevent locks, which are not safe to take from a native thread. Every
method returns what happened instead, and the storage logs it in the hub.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from slimta.diskstorage._format import (
    ENVELOPE,
    HEADER_SIZE,
    META,
    CorruptFile,
    Meta,
    decode_envelope,
    decode_meta,
    encode_meta,
    header,
    parse_header,
    verify,
)
from slimta.util._durable import fsync_dir, write_all

__all__ = [
    "ID_PATTERN",
    "NewMessage",
    "PutMeta",
    "Quarantine",
    "QuarantineResult",
    "Remove",
    "Scan",
    "ScanResult",
    "Spool",
    "read_framed",
]

#: A message id: ``uuid4().hex``. Names that do not match are never touched.
ID_PATTERN = re.compile(r"[0-9a-f]{32}")

_ENV_SUFFIX = ".env"
_META_SUFFIX = ".meta"
_ENV_NAME = re.compile(r"([0-9a-f]{32})\.env")
_META_NAME = re.compile(r"([0-9a-f]{32})\.meta")

#: Flags for a new temporary file: it must not exist yet.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
#: Flags for reusing a spare file.
_REUSE = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
#: Suffix of spare files (see :class:`Spool`).
_SPARE_SUFFIX = ".spare"
#: Most spare files kept; removals beyond it unlink their files.
MAX_SPARES = 512
#: Default :attr:`Spool.syncfs_threshold`: below it, plain fsyncs are cheaper.
DEFAULT_SYNCFS_THRESHOLD = 3


@dataclass(slots=True)
class NewMessage:
    """Store a new message: its envelope file (which holds its first-attempt
    time, see :func:`~slimta.diskstorage._format.encode_envelope`)."""

    id: str
    envelope: bytes


@dataclass(slots=True)
class PutMeta:
    """Replace a message's metadata file."""

    id: str
    meta: Meta


@dataclass(slots=True)
class Remove:
    """Delete a message's files (envelope first); missing files are fine.

    The directories are not fsynced afterwards: a removal lost in a crash
    brings a delivered message back, to be delivered again (at least once),
    which costs less than a journal commit per batch of deliveries.
    """

    id: str


@dataclass(slots=True)
class Quarantine:
    """Move a message's files to the quarantine directory."""

    id: str
    #: Why, for the log.
    reason: str


@dataclass(slots=True)
class Scan:
    """Recover the spool and list it; see :meth:`Spool.scan`."""

    #: Ids the storage already knows and trusts: only their presence is checked.
    known: frozenset[str]
    #: The next-attempt time given to messages recovered without metadata.
    now: float


@dataclass(slots=True)
class QuarantineResult:
    """Files moved to quarantine, and files that could not be moved."""

    #: ``(id, path, moved_to, reason)`` for each file moved.
    moved: list[tuple[str, str, str, str]] = field(default_factory=list)
    #: ``(id, path, error, reason)`` for each file left where it was.
    stuck: list[tuple[str, str, str, str]] = field(default_factory=list)


@dataclass(slots=True)
class ScanResult:
    """What :meth:`Spool.scan` found and repaired."""

    #: Every complete message: its metadata, or ``None`` for a known id.
    metas: dict[str, Meta | None] = field(default_factory=dict)
    #: Names of leftover temporary files removed.
    temps_removed: list[str] = field(default_factory=list)
    #: Corrupt or unreadable files.
    quarantine: QuarantineResult = field(default_factory=QuarantineResult)
    #: ``(id, reason)`` for each message given fresh metadata.
    recovered: list[tuple[str, str]] = field(default_factory=list)
    #: Ids whose metadata had no envelope and was removed.
    orphans: list[str] = field(default_factory=list)
    #: Repairs that failed, as ``(id, what, error)``.
    errors: list[tuple[str, str, str]] = field(default_factory=list)


#: Anything the committer thread can be asked to do.
Op = NewMessage | PutMeta | Remove | Quarantine | Scan


def read_framed(path: str, kind: bytes) -> bytes:
    """Read and validate one stored file; return its payload.

    :raises CorruptFile: when the file is torn, foreign or damaged.
    :raises OSError: when it cannot be read (``FileNotFoundError`` if gone).
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        head = file.read(HEADER_SIZE)
        length = parse_header(kind, head)
        # Check the size before reading: a damaged length must not make us
        # allocate gigabytes, and a short file is a torn write.
        if size != HEADER_SIZE + length:
            raise CorruptFile(f"size {size} but the header says {HEADER_SIZE + length}")
        payload = file.read(length)
    if len(payload) != length:
        raise CorruptFile("file shrank while it was read")
    verify(head, payload)
    return payload


@dataclass(slots=True)
class _File:
    """One file being stored: written under *tmp*, renamed to *final*."""

    tmp: str
    final: str
    fd: int = -1
    renamed: bool = False
    #: *tmp* is a spare file, to be overwritten.
    spare: bool = False


class Spool:
    """The directories of one storage, and the blocking work done in them.

    Files are recycled: creating and deleting an inode costs a filesystem
    more than renaming and overwriting one (on ext4, about three times the
    CPU and latency for a small file). So a removed message's files are
    renamed into ``tmp_dir`` as *spare* files (up to :data:`MAX_SPARES`), and
    the next files stored are written over spares rather than created.
    A spare is an ordinary temporary file: it is never read, only
    overwritten (and cut to its new length) under its temporary name before
    being renamed into place, so the durability steps are unchanged.

    :param env_dir: where ``<id>.env`` files live.
    :param meta_dir: where ``<id>.meta`` files live.
    :param tmp_dir: where files are written before being renamed into place;
        on the same filesystem as the other two.
    :param quarantine_dir: where damaged files are moved.
    :param syncfs_threshold: see the attribute.
    """

    def __init__(
        self,
        env_dir: str,
        meta_dir: str,
        tmp_dir: str,
        quarantine_dir: str,
        syncfs_threshold: int | None = DEFAULT_SYNCFS_THRESHOLD,
    ) -> None:
        #: A batch writing at least this many files flushes them with one
        #: ``syncfs`` before their fsyncs (``None``: never). On ext4 each
        #: fsync of a new file is a journal commit of its own, so 20 files
        #: cost 20 commits; after a ``syncfs`` they cost one. The price: the
        #: ``syncfs`` also writes back other processes' dirty data on the
        #: same filesystem, which can make a batch slower on a busy one.
        self.syncfs_threshold = syncfs_threshold
        self.env_dir = env_dir
        self.meta_dir = meta_dir
        self.tmp_dir = tmp_dir
        self.quarantine_dir = quarantine_dir
        # Temporary names start with a tag derived from env_dir, so that two
        # storages sharing one tmp_dir never remove each other's files.
        tag = hashlib.blake2b(env_dir.encode("utf-8", "surrogateescape"), digest_size=4)
        self._tmp_prefix = tag.hexdigest() + "-"
        self._serial = itertools.count()
        # Paths of spare files, used only by the committer thread.
        self._spares: list[str] = []

    # -- paths -------------------------------------------------------------

    def env_path(self, id: str) -> str:
        """The envelope file of message *id*."""
        return os.path.join(self.env_dir, id + _ENV_SUFFIX)

    def meta_path(self, id: str) -> str:
        """The metadata file of message *id*."""
        return os.path.join(self.meta_dir, id + _META_SUFFIX)

    def _tmp_path(self, id: str, what: str) -> str:
        # The serial keeps two updates of one id in a batch apart.
        return os.path.join(self.tmp_dir, f"{self._tmp_prefix}{id}.{what}.{next(self._serial)}.tmp")

    # -- setup ---------------------------------------------------------------

    def prepare(self) -> list[str]:
        """Create the directories, check them, remove leftover temporary files.

        :returns: the names of the temporary files removed.
        :raises OSError: when a directory cannot be created, or ``EXDEV`` when
            ``tmp_dir`` is on another filesystem than ``env_dir`` or
            ``meta_dir`` (a rename between them would not be atomic).
        """
        for path in (self.env_dir, self.meta_dir, self.tmp_dir, self.quarantine_dir):
            os.makedirs(path, exist_ok=True)
        device = os.stat(self.tmp_dir).st_dev
        for path in (self.env_dir, self.meta_dir):
            if os.stat(path).st_dev != device:
                raise OSError(
                    errno.EXDEV,
                    f"{self.tmp_dir} and {path} are on different filesystems, "
                    "so renaming a file between them is not atomic",
                )
        self._collect_spares()
        return self._remove_temps()

    def _spare_path(self) -> str:
        return os.path.join(self.tmp_dir, f"{self._tmp_prefix}{next(self._serial)}{_SPARE_SUFFIX}")

    def _collect_spares(self) -> None:
        """Adopt the spare files a previous run left (their names are
        renewed: the serial restarts); unlink what exceeds the limit."""
        for name in os.listdir(self.tmp_dir):
            if not (name.startswith(self._tmp_prefix) and name.endswith(_SPARE_SUFFIX)):
                continue
            with contextlib.suppress(OSError):
                self._retire(os.path.join(self.tmp_dir, name))

    def _retire(self, path: str) -> None:
        """Take away a removed message's file: make it a spare, or unlink it.

        :raises FileNotFoundError: when there is no such file.
        """
        if len(self._spares) < MAX_SPARES:
            spare = self._spare_path()
            os.rename(path, spare)
            self._spares.append(spare)
        else:
            os.unlink(path)

    def _open(self, file: _File) -> None:
        """Open *file*'s temporary file for writing: a spare if there is one."""
        while self._spares:
            file.tmp = self._spares.pop()
            try:
                file.fd = os.open(file.tmp, _REUSE)
            except OSError:
                # Gone or unusable (another owner?): drop it, try the next.
                with contextlib.suppress(OSError):
                    os.unlink(file.tmp)
                continue
            file.spare = True
            return
        file.fd = os.open(file.tmp, _CREATE, 0o600)

    def _remove_temps(self) -> list[str]:
        # Called only between batches: every temporary file is a leftover of
        # a crash (or of an error whose clean-up failed).
        removed = []
        for name in os.listdir(self.tmp_dir):
            if name.startswith(self._tmp_prefix) and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self.tmp_dir, name))
                except FileNotFoundError:
                    continue
                removed.append(name)
        return removed

    # -- the committer ---------------------------------------------------------

    def commit(self, ops: Sequence[Op]) -> list[object]:
        """Carry out *ops* in order; one result per op.

        Runs of :class:`NewMessage`, :class:`PutMeta` and :class:`Remove` are
        group-committed (see :meth:`_group_commit`); a :class:`Scan` or
        :class:`Quarantine` runs alone at its place in the order. A result is
        ``None`` (done), an :class:`OSError` (that op failed and left no
        final file behind), a :class:`ScanResult` or a
        :class:`QuarantineResult`.
        """
        results: list[object] = [None] * len(ops)
        run: list[int] = []
        for index, op in enumerate(ops):
            if isinstance(op, NewMessage | PutMeta | Remove):
                run.append(index)
                continue
            self._group_commit(ops, run, results)
            run = []
            try:
                if isinstance(op, Scan):
                    results[index] = self.scan(op.known, op.now)
                else:
                    results[index] = self.quarantine(op.id, op.reason)
            except OSError as exc:
                results[index] = exc
        self._group_commit(ops, run, results)
        return results

    def _file(self, op: NewMessage | PutMeta) -> tuple[_File, bytes, bytes]:
        """The file *op* stores, with its header and payload."""
        if isinstance(op, NewMessage):
            file = _File(self._tmp_path(op.id, "env"), self.env_path(op.id))
            return file, header(ENVELOPE, op.envelope), op.envelope
        payload = encode_meta(op.meta)
        file = _File(self._tmp_path(op.id, "meta"), self.meta_path(op.id))
        return file, header(META, payload), payload

    def _group_commit(self, ops: Sequence[Op], run: Sequence[int], results: list[object]) -> None:
        """Store and remove files for every op in *run*, sharing the fsyncs.

        1. write every temporary file;
        2. make them all durable: one ``syncfs`` for the whole filesystem
           when the batch is large enough (see :attr:`syncfs_threshold`),
           then an fsync of each file, which is then quick and still reports
           each file's write errors;
        3. rename them into place and unlink removed messages, in op order;
        4. fsync each directory that received a file in step 3, once.

        However many ops the run holds, it costs at most one journal commit
        for the data and one per directory. An op that fails at any step
        gets its :class:`OSError` as its result and loses its file; the
        other ops go on.

        ``tmp_dir`` itself is not fsynced before the renames: only the final
        names have to survive a crash, and a temporary file lost in one
        belonged to an op whose caller had not been answered yet. Removals
        are not fsynced at all (see :class:`Remove`).
        """
        if not run:
            return
        staged: dict[int, _File] = {}
        try:
            for index in run:
                op = ops[index]
                if isinstance(op, NewMessage | PutMeta):
                    file, head, payload = self._file(op)
                    staged[index] = file
                    try:
                        self._open(file)
                        data = head + payload
                        write_all(file.fd, (data,))
                        if file.spare:
                            os.ftruncate(file.fd, len(data))
                    except OSError as exc:
                        results[index] = exc
            if self.syncfs_threshold is not None and len(staged) >= self.syncfs_threshold:
                for file in staged.values():
                    if file.fd >= 0:
                        # Its outcome does not matter: the fsyncs below
                        # report every file's errors.
                        _syncfs(file.fd)
                        break
            for index, file in staged.items():
                if results[index] is None:
                    try:
                        os.fsync(file.fd)
                    except OSError as exc:
                        results[index] = exc
        finally:
            for file in staged.values():
                if file.fd >= 0:
                    _close_quietly(file.fd)
                    file.fd = -1
            for index, file in staged.items():
                if results[index] is not None:
                    _undo(file, keep_final=False)

        touched: dict[str, list[int]] = {}
        for index in run:
            if results[index] is not None:
                continue
            op = ops[index]
            try:
                if isinstance(op, Remove):
                    # Envelope first: metadata left alone is cleaned up at the
                    # next scan, an envelope left alone would be delivered again.
                    for path in (self.env_path(op.id), self.meta_path(op.id)):
                        with contextlib.suppress(FileNotFoundError):
                            self._retire(path)
                else:
                    file = staged[index]
                    os.replace(file.tmp, file.final)
                    file.renamed = True
                    touched.setdefault(os.path.dirname(file.final), []).append(index)
            except OSError as exc:
                results[index] = exc
                if index in staged:
                    _undo(staged[index], keep_final=isinstance(op, PutMeta))

        for directory, users in touched.items():
            try:
                fsync_dir(directory)
            except OSError as exc:
                for index in users:
                    if results[index] is None:
                        results[index] = exc
                        # A new message the caller is told failed must not be
                        # delivered later; replaced metadata cannot be undone.
                        if isinstance(ops[index], NewMessage):
                            _undo(staged[index], keep_final=False)

    # -- recovery ----------------------------------------------------------------

    def quarantine(
        self, id: str, reason: str, result: QuarantineResult | None = None
    ) -> QuarantineResult:
        """Move every file of message *id* to the quarantine directory.

        A file that cannot be moved stays where it is (and is reported):
        damaged mail is set aside for a human, never deleted.
        """
        if result is None:
            result = QuarantineResult()
        dirty = set()
        for path in (self.env_path(id), self.meta_path(id)):
            if self._quarantine_file(id, path, reason, result):
                dirty.add(os.path.dirname(path))
        if dirty:
            for directory in (self.quarantine_dir, *dirty):
                fsync_dir(directory)
        return result

    def _quarantine_file(self, id: str, path: str, reason: str, result: QuarantineResult) -> bool:
        """Move one file to quarantine; :returns: whether it was moved."""
        if not os.path.lexists(path):
            return False
        name = os.path.basename(path)
        target = os.path.join(self.quarantine_dir, name)
        for copy in itertools.count(1):
            if not os.path.lexists(target):
                break
            target = os.path.join(self.quarantine_dir, f"{name}.{copy}")
        try:
            try:
                os.rename(path, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # The quarantine is on another filesystem: copy, make the
                # copy durable, and only then remove the original.
                shutil.copy2(path, target)
                with open(target, "rb") as copied:
                    os.fsync(copied.fileno())
                fsync_dir(self.quarantine_dir)
                os.unlink(path)
        except OSError as exc:
            result.stuck.append((id, path, str(exc), reason))
            return False
        result.moved.append((id, path, target, reason))
        return True

    def scan(self, known: frozenset[str], now: float) -> ScanResult:
        """Repair the spool after a crash and list every complete message.

        * leftover temporary files are removed;
        * a message whose envelope is damaged or unreadable is moved to the
          quarantine directory, metadata included;
        * an envelope without metadata is a message never updated: attempts
          0, due at the first-attempt time its envelope file holds;
        * damaged or unreadable metadata is quarantined and the message
          recovered with fresh metadata (attempts 0, due at *now*);
        * metadata without an envelope is removed: there is nothing to
          deliver, and the envelope is always renamed into place before its
          metadata and removed before it.

        Files of ids in *known* are not read again, only looked for.
        """
        result = ScanResult(temps_removed=self._remove_temps())
        envs = _ids_in(self.env_dir, _ENV_NAME)
        metas = _ids_in(self.meta_dir, _META_NAME)
        orphans_removed = False
        for id in sorted(envs | metas):
            if id not in envs:
                try:
                    os.unlink(self.meta_path(id))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    result.errors.append((id, "remove metadata without envelope", str(exc)))
                    continue
                result.orphans.append(id)
                orphans_removed = True
                continue
            if id in known:
                result.metas[id] = None
                continue
            try:
                first_attempt, _ = decode_envelope(read_framed(self.env_path(id), ENVELOPE))
            except (CorruptFile, OSError) as exc:
                self.quarantine(id, f"envelope: {_describe(exc)}", result.quarantine)
                continue
            if id not in metas:
                result.metas[id] = Meta(first_attempt, 0, frozenset())
                continue
            try:
                result.metas[id] = decode_meta(read_framed(self.meta_path(id), META))
                continue
            except (CorruptFile, OSError) as exc:
                reason = f"metadata: {_describe(exc)}"
            # Left in place if it cannot be moved: the next update replaces it.
            self._quarantine_file(id, self.meta_path(id), reason, result.quarantine)
            result.metas[id] = Meta(now, 0, frozenset())
            result.recovered.append((id, reason))
        dirty = set()
        if orphans_removed:
            dirty.add(self.meta_dir)
        if result.temps_removed:
            dirty.add(self.tmp_dir)
        if result.quarantine.moved:
            dirty.update((self.quarantine_dir, self.env_dir, self.meta_dir))
        for directory in dirty:
            fsync_dir(directory)
        return result


def _ids_in(directory: str, pattern: re.Pattern[str]) -> set[str]:
    ids = set()
    for name in os.listdir(directory):
        match = pattern.fullmatch(name)
        if match is not None:
            ids.add(match.group(1))
    return ids


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _close_quietly(fd: int) -> None:
    # The data was fsynced (or the op already failed), so a close error
    # cannot change the outcome.
    with contextlib.suppress(OSError):
        os.close(fd)


def _undo(file: _File, *, keep_final: bool) -> None:
    """Remove what a failed op left: its temporary file, or its final file
    unless *keep_final*. Best effort: the op has failed already."""
    if file.renamed and keep_final:
        return
    with contextlib.suppress(OSError):
        os.unlink(file.final if file.renamed else file.tmp)
    file.renamed = False


def _find_syncfs() -> Callable[[int], object] | None:
    """libc's ``syncfs(fd)`` (Linux), or ``None`` where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    # ctypes releases the GIL around the call: other threads run meanwhile.
    return cast(Callable[[int], object], function)


#: ``syncfs(fd)``: writes back every dirty page and inode of the filesystem
#: of *fd* in one journal commit.
_syncfs_function = _find_syncfs()


def _syncfs(fd: int) -> None:
    if _syncfs_function is not None:
        _syncfs_function(fd)
