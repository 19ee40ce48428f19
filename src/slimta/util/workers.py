"""One MTA on every core: the same setup run in several worker processes.

A gevent process uses one core. :func:`run_workers` runs *count* copies of
an MTA, each in its own process, sharing the listening ports and each with
its own disk queue, under a supervisor process that restarts a worker that
dies and passes signals on::

    from pathlib import Path

    from slimta.diskstorage import DiskStorage
    from slimta.edge.smtp import SmtpEdge
    from slimta.queue import Queue
    from slimta.relay.smtp.mx import MxSmtpRelay
    from slimta.util.workers import WorkerContext, run_workers


    def setup(worker: WorkerContext) -> None:
        relay = MxSmtpRelay()
        queues = []
        for spool in worker.spool_dirs:  # its own spool first, then adopted ones
            queue = Queue(DiskStorage(spool / "env", spool / "meta"), relay)
            queue.start()
            worker.on_stop(lambda grace, queue=queue: queue.kill())
            queues.append(queue)
        edge = SmtpEdge(worker.listener(0), queues[0])
        edge.start()
        worker.on_stop(edge.stop)  # stop hooks run last-registered first


    if __name__ == "__main__":
        raise SystemExit(
            run_workers(setup, 2, spool_root=Path("/var/spool/slimta"), listeners=[("0.0.0.0", 25)])
        )

Processes
---------

The supervisor (the process that calls :func:`run_workers` or
:meth:`Workers.run`) binds the listening sockets, then starts each worker
as a fresh Python interpreter (``sys.executable``) that is handed its
sockets by file descriptor. A worker patches the standard library with
``gevent.monkey.patch_all()``, imports the module of *setup*, calls
``setup(worker)`` with a :class:`WorkerContext`, tells the supervisor it is
ready, and serves until it is told to stop.

Workers are spawned, not forked. A fork of a gevent process inherits its
event loop: every greenlet, timer and signal watcher of the parent lives on
in the child and runs at its next switch (a supervisor's greenlet waiting
for children would wake up in every worker), and the native threads of the
parent (gevent's thread pool, a DiskStorage committer, a resolver) are gone
while the locks they held stay held; ``gevent.reinit()`` repairs the loop,
not the rest. A fresh interpreter inherits nothing but the sockets, however
the calling program got to :func:`run_workers`, and a worker restarted an
hour later starts as clean as the first one. The price: *setup* must be
importable by name (a function at the top level of a module, as with
:mod:`multiprocessing`'s spawn; a script that defines it must start the
supervisor under ``if __name__ == "__main__":``), *args* must pickle, and a
worker takes a fraction of a second of imports to start.

Listening sockets
-----------------

Where the kernel balances ``SO_REUSEPORT`` sockets (Linux), each worker has
its own listening socket per listener, all bound to the same address: the
kernel spreads new connections over them, and a worker never wakes up for a
connection another one takes. The supervisor binds them all at the start
(before dropping privileges, so port 25 is no problem) and keeps them for
its whole life, so a restarted worker gets its sockets back without
privileges. While a worker is down its sockets stop listening (Linux
``shutdown(SHUT_RD)`` on a listening socket), so the kernel gives its share
of new connections to the others; the connections it had queued for the
worker are reset, never answered. Elsewhere, or with ``reuse_port=False``,
each listener is one socket that every worker accepts from. A listener may
also be given as a listening socket (from systemd, say): it is shared the
same way.

When a worker stops gracefully it stops accepting, but the kernel may go on
queueing connections on its sockets until it exits: those are reset then,
as at the end of any server.

Spools and adoption
-------------------

Worker *k* (from 0) owns the directory ``<spool_root>/worker-<k>``, its
*spool*, where *setup* keeps its queue (typically
``DiskStorage(spool / "env", spool / "meta")``). At the start every spool
under the root is served, so that mail queued by a worker that no longer
exists (the count was lowered, or a crash) is still delivered: the
*orphans* -- the directories of *adopt*, then each ``worker-<j>`` with
``j >= count`` in the order of *j* -- are dealt out round-robin to the
workers (:func:`assign_orphans`), after their own spool
(:attr:`WorkerContext.spool_dirs`). Orphans without any file left are
removed instead.

A worker locks each spool before *setup* sees it (an exclusive ``flock`` on
``<spool>/spool.lock``, :class:`SpoolLock`), so two live processes never
open one spool, even with a worker of an earlier supervisor still draining:
a worker whose own spool is locked exits with status 75 (``EX_TEMPFAIL``)
and is started again later; a locked orphan is left to its holder. The
supervisor locks ``<spool_root>/workers.lock``: one supervisor per root.

Signals and restarts
--------------------

SIGTERM or SIGINT to the supervisor stops every worker gracefully: each
gets SIGTERM and runs its stop hooks (:meth:`WorkerContext.on_stop`: the
edges stop accepting and finish their sessions, the queues stop), within
*grace* seconds; a worker still running then is killed. The supervisor
returns once every worker has exited. SIGHUP is passed on to every worker,
which runs its reload hooks (:meth:`WorkerContext.on_reload`). A worker
also stops when its supervisor is gone (it notices the end of the pipe
between them).

A worker that dies otherwise is started again, after 0.25 s, doubling for
each further death up to 30 s, and back to 0.25 s once a worker has run
for 30 s. A worker that fails before it is ready, before all the workers
were ready once, is a setup that cannot work (a configuration error, say):
the supervisor then stops the others and returns the failed worker's exit
status.

.. versionadded:: 4.0
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import logging
import os
import pickle
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import gevent
import gevent.event
import gevent.lock
import gevent.socket
import gevent.subprocess

__all__ = [
    "ListenError",
    "SpoolBusy",
    "SpoolLock",
    "WorkerContext",
    "Workers",
    "assign_orphans",
    "find_spools",
    "plan_spools",
    "run_workers",
    "spool_is_empty",
    "spool_name",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: A spool's name under the root: ``worker-<index>``.
_SPOOL_NAME = re.compile(r"worker-(0|[1-9][0-9]*)")
#: The lock file in each spool (:class:`SpoolLock`).
LOCK_NAME = "spool.lock"
#: The supervisor's lock file in the spool root.
SUPERVISOR_LOCK_NAME = "workers.lock"
#: A spool's directory of disposable files (DiskStorage's ``tmp_dir``).
_TMP_NAME = "tmp"

#: Exit status of a worker whose own spool is locked by another process.
EX_TEMPFAIL = 75
#: Exit status of a worker whose setup raised.
EX_SOFTWARE = 70

#: Seconds before the first restart of a worker that died; doubled for each
#: further death, up to :data:`_RESTART_DELAY_MAX`.
_RESTART_DELAY = 0.25
_RESTART_DELAY_MAX = 30.0
#: A worker that ran this long since it was ready resets its backoff.
_STABLE_SECONDS = 30.0
#: Seconds past the grace time before the supervisor kills a worker.
_KILL_MARGIN = 5.0

#: What a worker interpreter runs, after taking the supervisor's
#: ``sys.path`` (%r): gevent patches the standard library before anything
#: else is imported (the worker's code comes after).
_BOOT = (
    "import sys; sys.path[:] = %r; "
    "from gevent import monkey; monkey.patch_all(); "
    "from slimta.util._workerproc import main; main()"
)


# --- spools -------------------------------------------------------------------------


def spool_name(index: int) -> str:
    """The directory name of worker *index*'s spool: ``worker-<index>``."""
    return f"worker-{index}"


def find_spools(root: str | os.PathLike[str]) -> dict[int, Path]:
    """The spools under *root*: ``{index: path}`` of each ``worker-<index>``
    directory (``worker-01`` and other names are not spools).

    :returns: empty when *root* does not exist.
    """
    found: dict[int, Path] = {}
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return found
    for entry in entries:
        match = _SPOOL_NAME.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            found[int(match.group(1))] = Path(entry.path)
    return found


def spool_is_empty(path: str | os.PathLike[str]) -> bool:
    """True when no file is left under *path* but its lock and ``tmp/``.

    Directories do not count, nor files in ``<path>/tmp`` (where a
    :class:`~slimta.diskstorage.DiskStorage` made with the spool's
    ``env`` and ``meta`` writes its temporary and spare files), so a spool
    whose queue delivered everything is empty; a file in quarantine is not.
    """
    top = os.path.abspath(path)
    for directory, subdirs, files in os.walk(top):
        if directory == top:
            subdirs[:] = [name for name in subdirs if name != _TMP_NAME]
            files = [name for name in files if name != LOCK_NAME]
        if files:
            return False
    return True


def assign_orphans(count: int, orphans: Sequence[_T]) -> list[list[_T]]:
    """Deal *orphans* out to *count* workers, round-robin, in order.

    The ``i``-th orphan goes to worker ``i % count``, so no worker gets more
    than one more than another.

    :returns: one list per worker.
    :raises ValueError: *count* is less than 1.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    shares: list[list[_T]] = [[] for _ in range(count)]
    for position, orphan in enumerate(orphans):
        shares[position % count].append(orphan)
    return shares


def plan_spools(
    root: str | os.PathLike[str],
    count: int,
    adopt: Iterable[str | os.PathLike[str]] = (),
) -> list[tuple[Path, ...]]:
    """The spools each of *count* workers serves: its own, then its orphans.

    Worker *k* owns ``root/worker-<k>`` (whether or not it exists yet); the
    orphans are the directories of *adopt*, then every existing
    ``root/worker-<j>`` with ``j >= count`` by *j*, dealt out with
    :func:`assign_orphans`. Nothing is created or removed.

    :returns: one tuple per worker, its own spool first.
    """
    base = Path(root)
    found = find_spools(base)
    orphans = [Path(path) for path in adopt]
    orphans += [found[index] for index in sorted(found) if index >= count]
    shares = assign_orphans(count, orphans)
    return [(base / spool_name(k), *shares[k]) for k in range(count)]


class SpoolBusy(Exception):
    """Another process holds the lock of a spool.

    :param path: the spool directory.
    :param pid: the holder's process id as it wrote it, or ``None``.
    """

    def __init__(self, path: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"{path} is in use by {holder}")
        self.path = path
        self.pid = pid


class SpoolLock:
    """An exclusive lock on a spool directory, held until :meth:`release`.

    ``flock`` on ``<directory>/spool.lock``, which holds the holder's pid;
    the kernel drops the lock when the holder exits, however it exits. The
    descriptor is not inherited by programs the holder runs.

    :param directory: the spool; it must exist.
    :raises SpoolBusy: another process (or another :class:`SpoolLock` of
        this one) holds it.
    :raises OSError: the lock file cannot be opened.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        #: The spool directory.
        self.directory = Path(directory)
        #: The lock file.
        self.path = self.directory / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SpoolBusy(self.directory, holder) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        """True until :meth:`release`."""
        return self._fd is not None

    def release(self) -> None:
        """Let go of the lock (the file stays); a second call does nothing."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> SpoolLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _remove_empty_spool(path: Path) -> bool:
    """Remove the empty spool *path* (see :func:`spool_is_empty`); False
    when it is not empty, locked, or cannot be removed."""
    try:
        with SpoolLock(path) as lock:
            if not spool_is_empty(path):
                return False
            lock.path.unlink()
            # Bottom-up; the only files left are disposable ones in tmp/.
            for directory, _, files in sorted(os.walk(path), key=lambda w: -len(w[0])):
                for name in files:
                    os.unlink(os.path.join(directory, name))
                os.rmdir(directory)
    except SpoolBusy:
        return False
    except OSError as exc:
        log.warning("cannot remove the empty spool %s: %s", path, exc.strerror or exc)
        return False
    return True


# --- the worker's side ------------------------------------------------------------------


class WorkerContext:
    """What *setup* gets in each worker process.

    Built by the worker before it calls ``setup(worker)``; *setup* builds
    and starts the MTA from it (edges on :meth:`listener`, queues in
    :attr:`spool_dirs`) and registers how to stop it (:meth:`on_stop`) and,
    if it can, how to reload (:meth:`on_reload`). It returns once
    everything is started; the worker then serves until it is told to stop.
    """

    def __init__(
        self,
        index: int,
        count: int,
        listeners: Sequence[socket.socket],
        spool_dirs: Sequence[Path],
        args: tuple[Any, ...],
        grace: float,
    ) -> None:
        #: This worker's number, from 0 to :attr:`count` - 1.
        self.index = index
        #: How many workers there are.
        self.count = count
        #: One listening socket per listener, in the order given to the supervisor.
        self.listeners: tuple[socket.socket, ...] = tuple(listeners)
        #: The spools this worker serves, each locked by it: its own
        #: (``<spool_root>/worker-<index>``), then the orphans it adopted.
        self.spool_dirs: tuple[Path, ...] = tuple(spool_dirs)
        #: The *args* given to the supervisor (as they were when this worker started).
        self.args = args
        #: Seconds the worker has to stop, once told to.
        self.grace = grace
        self._stop_hooks: list[Callable[[float], object]] = []
        self._reload_hooks: list[Callable[[], object]] = []

    @property
    def spool_dir(self) -> Path:
        """This worker's own spool, where new mail goes."""
        return self.spool_dirs[0]

    @property
    def adopted(self) -> tuple[Path, ...]:
        """The orphan spools this worker serves too: deliver what they hold."""
        return self.spool_dirs[1:]

    def listener(self, index: int) -> socket.socket:
        """The listening socket of listener *index* (a gevent socket).

        Pass it to an edge (``SmtpEdge(worker.listener(0), queue)``).
        """
        return self.listeners[index]

    def on_stop(self, callback: Callable[[float], object]) -> None:
        """Call ``callback(grace)`` when the worker is told to stop.

        Hooks run one after the other, the last registered first (as
        :class:`contextlib.ExitStack` does), so register a queue before the
        edge that feeds it: the edge stops accepting and drains first. Each
        gets the seconds left of the worker's grace time; an exception is
        logged and the next hook runs. Without hooks, the worker exits at
        once.
        """
        self._stop_hooks.append(callback)

    def on_reload(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` on SIGHUP, in a new greenlet (one reload at a
        time), hooks in the order registered."""
        self._reload_hooks.append(callback)


def _setup_reference(setup: Callable[..., object]) -> tuple[str, str, str | None, bool]:
    """How a worker imports *setup*: ``(module, qualified name, main script
    or None, defined in the main program)``.

    :raises TypeError: *setup* is not reachable by its module and name.
    """
    module_name = getattr(setup, "__module__", None)
    qualname = getattr(setup, "__qualname__", None)
    problem = (
        "setup must be a function defined at the top level of a module, so "
        f"that each worker process can import it; got {setup!r}"
    )
    if not isinstance(module_name, str) or not isinstance(qualname, str) or "<" in qualname:
        raise TypeError(problem)
    main_path = None
    from_main = module_name == "__main__"
    module: Any
    if from_main:
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name != "__main__":
            module_name = spec.name  # run with python -m: workers import it by name
        else:
            main_file = getattr(main, "__file__", None)
            if main_file is None:
                raise TypeError(problem + " (the main program has no file)")
            main_path = os.path.abspath(main_file)
        module = main
    else:
        module = importlib.import_module(module_name)
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not setup:
        raise TypeError(problem)
    return module_name, qualname, main_path, from_main


# --- the supervisor's side --------------------------------------------------------------


class ListenError(OSError):
    """A listener could not be bound.

    Carries the ``errno`` and ``strerror`` of the :class:`OSError` it wraps.

    :param index: the listener's position in *listeners*.
    :param address: the ``(host, port)`` it was to listen on.
    :param error: what binding raised (a :class:`socket.gaierror` for an
        unknown host name).
    """

    def __init__(self, index: int, address: tuple[str, int], error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.index = index
        self.address = address
        self.error = error

    def __str__(self) -> str:
        host, port = self.address
        return f"cannot listen on {host}:{port}: {self.strerror}"


def _reuse_port_balances() -> bool:
    """True where SO_REUSEPORT spreads connections over the sockets (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _new_listener(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As socket.create_server: a restart does not wait for TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _unlisten(sock: socket.socket) -> None:
    """Stop *sock* listening, keeping its address (Linux: the connections it
    queued are reset and the other sockets of the port take the new ones);
    elsewhere it goes on listening."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"


class _Slot:
    """One worker position: its sockets and spools, and the process in it."""

    def __init__(self, index: int, sockets: list[socket.socket]) -> None:
        self.index = index
        self.sockets = sockets
        self.spools: tuple[Path, ...] = ()
        self.proc: Any = None
        self.pid = 0
        self.ready_at: float | None = None
        self.ever_ready = False
        self.deaths = 0
        self.restart: gevent.Greenlet | None = None


class Workers:
    """A supervisor of *count* worker processes; :func:`run_workers` in steps.

    Use it instead of :func:`run_workers` to do something between binding
    the sockets and starting the workers (switch user, check the
    configuration, log the ports bound)::

        workers = Workers(setup, 4, spool_root=root, listeners=[("0.0.0.0", 25)])
        workers.bind()
        drop_privileges("slimta")
        return workers.run()

    :param setup: ``setup(worker)``, called in each worker with its
        :class:`WorkerContext`; a function at the top level of a module
        (see the module notes).
    :param count: the number of workers, at least 1.
    :param spool_root: the directory of the spools (created if missing).
    :param listeners: for each listener, ``(host, port)`` (port 0: any
        free port, the same for every worker) or a listening socket.
    :param grace: seconds a worker has to stop after SIGTERM; one still
        running 5 seconds after that is killed.
    :param args: handed to each worker as :attr:`WorkerContext.args`; must
        pickle. :attr:`args` may be changed later (for workers started
        after).
    :param adopt: directories served as orphans too (see the module notes),
        e.g. the spool of a single-process set-up; may be changed until
        :meth:`run`.
    :param reuse_port: one socket per worker and listener with
        ``SO_REUSEPORT`` (True), or one socket per listener shared by all
        (False); default: True on Linux.
    :param backlog: the listen queue length of each socket.
    :raises TypeError: *setup* cannot be imported by name, or *args* do
        not pickle.
    :raises ValueError: *count* is less than 1.
    """

    def __init__(
        self,
        setup: Callable[[WorkerContext], object],
        count: int,
        *,
        spool_root: str | os.PathLike[str],
        listeners: Sequence[tuple[str, int] | socket.socket] = (),
        grace: float = 10.0,
        args: tuple[Any, ...] = (),
        adopt: Iterable[str | os.PathLike[str]] = (),
        reuse_port: bool | None = None,
        backlog: int = 128,
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        self._setup_ref = _setup_reference(setup)
        #: The number of workers.
        self.count = count
        #: The directory of the spools.
        self.spool_root = Path(spool_root).absolute()
        #: Directories served as orphans too.
        self.adopt = [Path(path) for path in adopt]
        #: Seconds a worker has to stop.
        self.grace = grace
        #: One socket per worker and listener (``SO_REUSEPORT``), or shared.
        self.reuse_port = _reuse_port_balances() if reuse_port is None else reuse_port
        #: The listen queue length of each socket.
        self.backlog = backlog
        self._listener_specs = list(listeners)
        self._args_blob = b""
        self._args: tuple[Any, ...] = ()
        self.args = args
        #: One row per listener: its socket per worker (the same one in
        #: every column when shared); empty until :meth:`bind`.
        self._sockets: list[list[socket.socket]] = []
        #: The sockets :meth:`bind` made (not those given), for :meth:`close`.
        self._owned: list[socket.socket] = []
        self._bound = False
        self._slots: list[_Slot] = []
        self._stopping = False
        self._all_ready = False
        self._status = 0
        self._done = gevent.event.Event()
        self._killer: gevent.Greenlet | None = None
        self._on_ready: Callable[[], object] | None = None
        self._reloading = gevent.lock.Semaphore()

    @property
    def args(self) -> tuple[Any, ...]:
        """What workers started from now on get as :attr:`WorkerContext.args`.

        :raises TypeError: when set to something that does not pickle.
        """
        return self._args

    @args.setter
    def args(self, value: tuple[Any, ...]) -> None:
        try:
            blob = pickle.dumps(tuple(value), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(f"the workers' args must pickle: {exc}") from exc
        self._args, self._args_blob = tuple(value), blob

    # -- sockets ---------------------------------------------------------------------

    def bind(self) -> None:
        """Bind every listener (a second call does nothing).

        :raises ListenError: a listener cannot be bound; none stays bound.
        """
        if self._bound:
            return
        rows: list[list[socket.socket]] = []
        owned: list[socket.socket] = []
        try:
            for index, spec in enumerate(self._listener_specs):
                if isinstance(spec, socket.socket):
                    rows.append([spec] * self.count)
                    continue
                try:
                    row = self._bind_one(*spec)
                except OSError as exc:
                    raise ListenError(index, spec, exc) from None
                rows.append(row)
                owned += list(dict.fromkeys(row))
        except BaseException:
            for sock in owned:
                sock.close()
            raise
        self._sockets, self._owned = rows, owned
        self._bound = True

    def _bind_one(self, host: str, port: int) -> list[socket.socket]:
        if not self.reuse_port:
            sock = _new_listener(host, port, False)
            sock.listen(self.backlog)
            return [sock] * self.count
        holder = None
        if port != 0:
            # Any socket of the same user with SO_REUSEPORT may join the port:
            # a second server started by mistake would quietly take a share of
            # the connections. Bound without it, a socket finds the port taken,
            # as a single process would.
            _new_listener(host, port, False).close()
        else:
            # Bound to port 0, a socket gives its port up when it stops
            # listening; bound to the port by number, it keeps it. So the
            # port is found with a socket that never listens, then bound by
            # number. (A bound socket that does not listen gets no connections.)
            holder = _new_listener(host, 0, True)
            port = holder.getsockname()[1]
        sockets: list[socket.socket] = []
        try:
            for _ in range(self.count):
                sock = _new_listener(host, port, True)
                sockets.append(sock)
                sock.listen(self.backlog)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        finally:
            if holder is not None:
                holder.close()
        return sockets

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` each listener is bound to (after :meth:`bind`)."""
        bound = []
        for row in self._sockets:
            host, port = row[0].getsockname()[:2]
            bound.append((str(host), int(port)))
        return bound

    def close(self) -> None:
        """Close the sockets :meth:`bind` made (for a caller that gives up
        before :meth:`run`; :meth:`run` closes them itself)."""
        for sock in self._owned:
            sock.close()
        self._sockets, self._owned = [], []
        self._bound = False

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        return [slot.pid for slot in self._slots if slot.proc is not None]

    # -- running -----------------------------------------------------------------------

    def run(
        self,
        *,
        on_ready: Callable[[], object] | None = None,
        on_reload: Callable[[], bool] | None = None,
    ) -> int:
        """Start the workers and supervise them until they have stopped.

        Binds the listeners if :meth:`bind` was not called, creates the
        spool root and each worker's spool, locks the root, removes empty
        orphans, and starts the workers; then restarts those that die and
        passes SIGTERM, SIGINT and SIGHUP on (see the module notes).

        :param on_ready: called once, when every worker has been ready.
        :param on_reload: called on SIGHUP before the workers are told;
            it may set :attr:`args`. Returning False (or raising, which is
            logged) refuses the reload: the workers are not told.
        :returns: 0 once stopped by a signal or :meth:`stop`; the exit
            status of a worker whose first start failed.
        :raises OSError: the spool root cannot be created or locked.
        """
        self.bind()
        self._on_ready = on_ready
        handlers = []
        try:
            lock = self._prepare_spools()
            try:
                handlers = [
                    gevent.signal_handler(signal.SIGTERM, self.stop),
                    gevent.signal_handler(signal.SIGINT, self.stop),
                    gevent.signal_handler(signal.SIGHUP, gevent.spawn, self._reload, on_reload),
                ]
                for slot in self._slots:
                    self._start(slot)
                self._done.wait()
            finally:
                self._abandon()
                os.close(lock)
        finally:
            for handler in handlers:
                handler.cancel()
            self.close()
        return self._status

    def stop(self) -> None:
        """Stop every worker gracefully (what SIGTERM does); :meth:`run` then returns."""
        if self._stopping:
            return
        self._stopping = True
        live = [slot for slot in self._slots if slot.proc is not None]
        log.info("stopping %d worker(s); they have %g seconds", len(live), self.grace)
        for slot in self._slots:
            if slot.restart is not None:
                slot.restart.kill(block=False)
                slot.restart = None
        for slot in live:
            with contextlib.suppress(OSError):
                slot.proc.send_signal(signal.SIGTERM)
        if live:
            self._killer = gevent.spawn_later(self.grace + _KILL_MARGIN, self._kill_stragglers)
        else:
            self._done.set()

    def _prepare_spools(self) -> int:
        """Create and lock the root, prune empty orphans, plan the spools.

        :returns: the root lock's descriptor.
        """
        root = self.spool_root
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / SUPERVISOR_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                who = f"pid {holder}" if holder is not None else "another process"
                raise OSError(exc.errno, f"{root} is supervised by {who}") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            for index, path in sorted(find_spools(root).items()):
                if index >= self.count and spool_is_empty(path) and _remove_empty_spool(path):
                    log.info("removed the empty spool %s", path)
            plan = plan_spools(root, self.count, self.adopt)
            for slot_index, spools in enumerate(plan):
                spools[0].mkdir(exist_ok=True)
                column = [row[slot_index] for row in self._sockets]
                slot = _Slot(slot_index, column)
                slot.spools = spools
                self._slots.append(slot)
                if len(spools) > 1:
                    names = ", ".join(str(path) for path in spools[1:])
                    log.info("worker %d adopts %s", slot_index, names)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _spec(self, slot: _Slot) -> bytes:
        spec = {
            "index": slot.index,
            "count": self.count,
            "listener_fds": [sock.fileno() for sock in slot.sockets],
            "spool_dirs": [str(path) for path in slot.spools],
            "setup": self._setup_ref,
            "args": self._args_blob,
            "grace": self.grace,
        }
        blob = pickle.dumps(spec, pickle.HIGHEST_PROTOCOL)
        return struct.pack("!I", len(blob)) + blob

    def _start(self, slot: _Slot) -> None:
        slot.restart = None
        slot.ready_at = None
        if self._stopping:
            return
        for sock in slot.sockets:
            sock.listen(self.backlog)  # again, if it was stopped while the slot was empty
        ours, theirs = gevent.socket.socketpair()
        fds = [theirs.fileno(), *(sock.fileno() for sock in slot.sockets)]
        try:
            proc = gevent.subprocess.Popen(
                [sys.executable, "-c", _BOOT % (list(sys.path),), str(theirs.fileno())],
                stdin=gevent.subprocess.DEVNULL,
                pass_fds=fds,
                close_fds=True,
                # Its own session: a Ctrl-C at the terminal reaches the
                # supervisor alone, which stops the workers in order.
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            log.error("worker %d: cannot start a process: %s", slot.index, exc)
            self._died(slot, None, 1)
            return
        finally:
            theirs.close()
        slot.proc, slot.pid = proc, proc.pid
        log.info("worker %d started (pid %d)", slot.index, proc.pid)
        gevent.spawn(self._converse, slot, proc, ours)
        gevent.spawn(self._await_exit, slot, proc)

    def _converse(self, slot: _Slot, proc: Any, channel: Any) -> None:
        """Send the worker its spec, then read what it says until it closes."""
        try:
            channel.sendall(self._spec(slot))
            with channel.makefile("rb") as reader:
                for line in reader:
                    if line == b"ready\n" and slot.proc is proc:
                        self._ready(slot)
        except OSError:
            pass  # the worker died; _await_exit reports it
        finally:
            channel.close()

    def _ready(self, slot: _Slot) -> None:
        slot.ready_at = time.monotonic()
        slot.ever_ready = True
        log.info("worker %d ready (pid %d)", slot.index, slot.pid)
        if not self._all_ready and all(s.ever_ready for s in self._slots):
            self._all_ready = True
            log.info("all %d workers ready", self.count)
            if self._on_ready is not None and not self._stopping:
                self._on_ready()

    def _await_exit(self, slot: _Slot, proc: Any) -> None:
        status = proc.wait()
        self._died(slot, proc, status)

    def _died(self, slot: _Slot, proc: Any, status: int) -> None:
        pid = proc.pid if proc is not None else 0
        ran = time.monotonic() - slot.ready_at if slot.ready_at is not None else 0.0
        slot.proc = None
        for sock in slot.sockets:
            # Shared by a worker still running: it takes the connections.
            if not any(other.proc is not None and sock in other.sockets for other in self._slots):
                _unlisten(sock)
        what = _describe_status(status)
        if self._stopping:
            log.info("worker %d (pid %d) %s", slot.index, pid, what)
            if all(other.proc is None for other in self._slots):
                if self._killer is not None:
                    self._killer.kill(block=False)
                self._done.set()
            return
        if not slot.ever_ready and not self._all_ready:
            log.error("worker %d (pid %d) %s before it was ready; stopping", slot.index, pid, what)
            self._status = status if status > 0 else 1
            self.stop()
            return
        if ran >= _STABLE_SECONDS:
            slot.deaths = 0
        delay = min(_RESTART_DELAY_MAX, _RESTART_DELAY * 2**slot.deaths)
        slot.deaths += 1
        log.error("worker %d (pid %d) %s; restarting it in %g s", slot.index, pid, what, delay)
        slot.restart = gevent.spawn_later(delay, self._start, slot)

    def _kill_stragglers(self) -> None:
        for slot in self._slots:
            if slot.proc is not None:
                log.warning(
                    "worker %d (pid %d) still running %g seconds after SIGTERM; killing it",
                    slot.index,
                    slot.pid,
                    self.grace + _KILL_MARGIN,
                )
                with contextlib.suppress(OSError):
                    slot.proc.send_signal(signal.SIGKILL)

    def _reload(self, on_reload: Callable[[], bool] | None) -> None:
        with self._reloading:
            self._reload_once(on_reload)

    def _reload_once(self, on_reload: Callable[[], bool] | None) -> None:
        if self._stopping:
            return
        if on_reload is not None:
            try:
                accepted = on_reload()
            except Exception:
                log.exception("reload refused")
                return
            if not accepted:
                return
        live = [slot for slot in self._slots if slot.proc is not None]
        for slot in live:
            with contextlib.suppress(OSError):
                slot.proc.send_signal(signal.SIGHUP)
        log.info("reload: SIGHUP sent to %d worker(s)", len(live))

    def _abandon(self) -> None:
        """Leaving :meth:`run` early (an error): end the workers."""
        for slot in self._slots:
            if slot.restart is not None:
                slot.restart.kill(block=False)
            if slot.proc is not None:
                with contextlib.suppress(OSError):
                    slot.proc.send_signal(signal.SIGKILL)


def run_workers(
    setup: Callable[[WorkerContext], object],
    count: int,
    *,
    spool_root: str | os.PathLike[str],
    listeners: Sequence[tuple[str, int] | socket.socket] = (),
    grace: float = 10.0,
    args: tuple[Any, ...] = (),
    user: int | str | None = None,
    group: int | str | None = None,
    reuse_port: bool | None = None,
) -> int:
    """Run ``setup(worker)`` in *count* worker processes until SIGTERM.

    Binds the listeners, switches to *user* and *group* (if given), then
    supervises the workers (:meth:`Workers.run`; see the module notes and
    :class:`Workers` for the parameters).

    :returns: 0 after a stop by SIGTERM or SIGINT; a worker's exit status
        when it failed at the start.
    :raises ListenError: a listener cannot be bound.
    :raises TypeError: *setup* is not importable by name, or *args* do not
        pickle.
    """
    workers = Workers(
        setup,
        count,
        spool_root=spool_root,
        listeners=listeners,
        grace=grace,
        args=args,
        reuse_port=reuse_port,
    )
    workers.bind()
    try:
        if user is not None or group is not None:
            from slimta.util.system import drop_privileges

            drop_privileges(user, group)
    except BaseException:
        workers.close()
        raise
    return workers.run()
