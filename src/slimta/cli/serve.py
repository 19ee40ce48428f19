"""``slimta serve``: run the MTA a configuration describes.

Start-up, in this order, so that each step can still fail with a clear
message and nothing half-started is left behind:

1. load and check the configuration, and build its objects (TLS context,
   relays, policies: :func:`slimta.cli.build.build`), while still able to
   read root-only key files;
2. open the listening sockets (privileged ports need root);
3. switch to ``server.user`` / ``server.group``
   (:func:`slimta.util.system.drop_privileges`);
4. create the data directories, lock the data directory (one server per
   queue) and open the disk queue;
5. start the queue and the listeners, and log in words what listens where,
   where mail goes and who may relay.

Signals: SIGTERM and SIGINT stop accepting connections, give open sessions
``server.shutdown_grace`` seconds, let deliveries under way finish within
the same time, and exit 0; the queue stays on disk for the next start.
SIGHUP reloads the configuration file: users, domains, trusted networks,
limits, policies, relays, routes, TLS certificates and listeners. A file
with problems is refused, its problems logged, and the running
configuration kept. ``server.data_dir``, ``server.user`` and
``server.group`` need a restart; after a switch of user, files only root
can read (a TLS key) cannot be reloaded.

Workers: with ``server.workers`` above 1 this process binds the listeners,
switches user, locks the data directory and then supervises that many
worker processes (:mod:`slimta.util.workers`), each a whole server as
above, sharing the listening ports, with its own queue directory
``data_dir/queue/worker-<n>``; queue directories of workers that are no
longer (and the single process's ``data_dir/queue``) are delivered by the
workers too, and a single process delivers what workers left. Each worker
reads the configuration's files (TLS and DKIM keys) as ``server.user``; the
listeners, like ``server.workers``, change at restart only. SIGTERM, SIGINT
and SIGHUP go to the supervisor, which passes them on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.lock

from slimta.cli.access import Counters, validators_for
from slimta.cli.build import AUTH_MECHANISMS, Built, build, listener_auth
from slimta.cli.config import Config, ListenerConfig, default_config, load_file
from slimta.cli.control import Control
from slimta.cli.errors import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_UNAVAILABLE,
    CliError,
    ConfigInvalid,
)
from slimta.cli.logsetup import configure_logging, set_format, set_level
from slimta.cli.routing import Router
from slimta.cli.summary import describe, warnings
from slimta.core import __version__
from slimta.diskstorage import DiskStorage
from slimta.edge.smtp import SmtpEdge
from slimta.queue import Queue, QueueError
from slimta.util.system import drop_privileges
from slimta.util.workers import (
    ListenError,
    SpoolBusy,
    SpoolLock,
    WorkerContext,
    Workers,
    find_spools,
    spool_is_empty,
)

__all__ = ["CountingEdge", "Overrides", "serve"]

log = logging.getLogger("slimta.serve")


@dataclass(frozen=True, slots=True)
class Overrides:
    """Command-line options that take precedence over the file."""

    #: ``--listen``: one smtp listener on each of these addresses instead.
    listen: tuple[tuple[str, int], ...] = ()
    user: str | None = None
    group: str | None = None
    log_level: str | None = None
    log_format: str | None = None
    #: ``--metrics``: serve Prometheus metrics on this address.
    metrics: tuple[str, int] | None = None

    def apply(self, config: Config) -> Config:
        server = config.server
        if self.user is not None or self.group is not None or self.log_level is not None:
            server = replace(
                server,
                user=self.user if self.user is not None else server.user,
                group=self.group if self.group is not None else server.group,
                log_level=self.log_level if self.log_level is not None else server.log_level,
            )
        if self.log_format is not None:
            server = replace(server, log_format=self.log_format)
        listeners = config.listeners
        if self.listen:
            listeners = tuple(
                ListenerConfig(f"listen[{index}]", "smtp", address)
                for index, address in enumerate(self.listen)
            )
        return replace(config, server=server, listeners=listeners)


def load(path: str | None, overrides: Overrides) -> Config:
    """The configuration of *path* (the embedded default for ``None``)
    with *overrides* applied."""
    config = default_config() if path is None else load_file(path)
    return overrides.apply(config)


class CountingEdge(SmtpEdge):
    """An :class:`SmtpEdge` that counts its open connections per client
    address in shared :class:`~slimta.cli.access.Counters`, for the
    connection limits the validators enforce at the banner.

    Sessions never park (``park_after=None``): :meth:`handle` then returns
    exactly when the connection is over.
    """

    def __init__(self, *args: Any, counters: Counters, **kwargs: Any) -> None:
        kwargs["park_after"] = None
        super().__init__(*args, **kwargs)
        self.counters = counters

    def handle(self, socket: Any, address: Any) -> None:
        ip = address[0] if isinstance(address, tuple) and address else "unknown"
        self.counters.opened(ip)
        try:
            super().handle(socket, address)
        finally:
            self.counters.closed(ip)


def _bind(listener: ListenerConfig) -> socket.socket:
    """The listening socket of *listener*.

    :raises CliError: the address is in use (``EX_UNAVAILABLE``), the port
        is privileged (``EX_NOPERM``), or the address cannot be used.
    """
    host, port = listener.address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise _listen_error(listener, exc) from None


def _listen_error(listener: ListenerConfig, exc: OSError) -> CliError:
    """What to tell the user when *listener* cannot be bound."""
    host = listener.address[0]
    where = f'cannot listen on {listener.display_address} (listener "{listener.name}")'
    if isinstance(exc, socket.gaierror):
        return CliError(f"{where}: unknown host {host}: {exc.strerror}", EX_UNAVAILABLE)
    if exc.errno == errno.EADDRINUSE:
        reason = "the address is already in use (is another server running?)"
        return CliError(f"{where}: {reason}", EX_UNAVAILABLE)
    if exc.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        return CliError(f"{where}: {reason}", EX_NOPERM)
    if exc.errno == errno.EADDRNOTAVAIL:
        return CliError(f"{where}: this host has no such address", EX_UNAVAILABLE)
    return CliError(f"{where}: {exc.strerror or exc}", EX_UNAVAILABLE)


def _bind_all(listeners: list[ListenerConfig]) -> list[socket.socket]:
    """Sockets for every listener; none stays open if one fails."""
    sockets: list[socket.socket] = []
    try:
        for listener in listeners:
            sockets.append(_bind(listener))
    except CliError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _drop_privileges(user: str | None, group: str | None) -> None:
    if user is None and group is None:
        return
    try:
        drop_privileges(user, group)
    except ValueError as exc:
        raise CliError(str(exc).removeprefix("drop_privileges: "), EX_NOUSER) from None
    except OSError as exc:
        who = " and ".join(
            f"{what} {name}" for what, name in (("user", user), ("group", group)) if name
        )
        raise CliError(f"cannot switch to {who}: {exc.strerror or exc}", EX_NOPERM) from None
    log.info("now running as user %d, group %d", os.getuid(), os.getgid())


def _make_dir(path: Path, what: str) -> None:
    """Create directory *path* if missing and check that it is writable.

    :raises CliError: ``EX_CANTCREAT``, naming *what* and *path*.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(
            f"cannot create the {what} {path}: {exc.strerror or exc}", EX_CANTCREAT
        ) from None
    if not path.is_dir():
        raise CliError(f"the {what} {path} is not a directory", EX_CANTCREAT)
    if not os.access(path, os.W_OK | os.X_OK):
        raise CliError(f"cannot write to the {what} {path}", EX_CANTCREAT)


def _make_mail_dirs(config: Config) -> None:
    _make_dir(config.local.mail_dir, "mail directory (local.mail_dir)")
    if "maildir" in config.relays_used():
        _make_dir(config.maildir.path, "Maildir relay directory (relay.maildir.path)")


def _lock(data_dir: Path) -> int:
    """Lock *data_dir* for this process: two servers must not share a queue.

    :returns: the lock file's descriptor, kept open while the server runs.
    :raises CliError: another process holds the lock.
    """
    path = data_dir / "serve.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CliError(f"cannot create {path}: {exc.strerror or exc}", EX_CANTCREAT) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise CliError(
            f"another slimta serve (pid {holder}) is using the data directory {data_dir}",
            EX_UNAVAILABLE,
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd


def _edge_key(listener: ListenerConfig) -> object:
    """What identifies a listener across reloads: its address, which a
    reload cannot bind twice; with port 0 (any free port), its name too."""
    if listener.address[1] == 0:
        return (listener.name, listener.address)
    return listener.address


class Mta:
    """One running server: its configuration, queue and listeners."""

    def __init__(
        self,
        path: str | None,
        overrides: Overrides,
        config: Config,
        *,
        worker: WorkerContext | None = None,
    ) -> None:
        self.path = path
        self.overrides = overrides
        self.config = config
        self.built: Built | None = None
        self.queue: Queue | None = None
        self.store: DiskStorage | None = None
        self.router: Router | None = None
        #: :func:`_edge_key` -> (the listener as bound, its edge).
        self.edges: dict[object, tuple[ListenerConfig, CountingEdge]] = {}
        self.stopping = gevent.event.Event()
        self._reloading = gevent.lock.Semaphore()
        self._lock_fd: int | None = None
        #: The control socket and local submission (slimta.cli.control).
        self.control: Control | None = None
        #: In a worker process (``server.workers`` > 1): its context.
        self.worker = worker
        #: Queues of other spools served too (adopted from workers no longer there).
        self.queues: list[Queue] = []
        self._spool_locks: list[SpoolLock] = []

    # -- start ---------------------------------------------------------------------

    def start(self) -> None:
        """Start everything (steps 1-5 of the module notes).

        :raises CliError: with the first step that failed.
        """
        config = self.config
        source = self.path or "the embedded default configuration"
        if self.worker is None:
            log.info("slimta %s starting with %s", __version__, source)
        else:
            log.info("worker %d starting (pid %d)", self.worker.index, os.getpid())
        built = self.built = build(config)
        if self.worker is not None:
            # The supervisor bound the sockets, switched user and locked.
            self._open_worker_queues(built, self.worker)
            sockets = list(self.worker.listeners)
        else:
            sockets = _bind_all(list(config.listeners))
            try:
                _drop_privileges(config.server.user, config.server.group)
                self._open_queue(built)
            except BaseException:
                for sock in sockets:
                    sock.close()
                raise
        for listener, sock in zip(config.listeners, sockets, strict=True):
            self._start_edge(listener, sock, built)
        if self.worker is None:
            self._log_summary(built.config)

    def _open_queue(self, built: Built) -> None:
        data_dir = built.config.server.data_dir
        _make_dir(data_dir, "data directory (server.data_dir)")
        self._lock_fd = _lock(data_dir)
        _make_mail_dirs(built.config)
        queue_dir = data_dir / "queue"
        _make_dir(queue_dir, "queue directory")
        self._lock_spool(queue_dir)
        try:
            store = DiskStorage(queue_dir / "env", queue_dir / "meta")
        except QueueError as exc:
            raise CliError(f"cannot open the queue in {queue_dir}: {exc}", EX_CANTCREAT) from None
        self.store = store
        self.router = Router(built.table)
        # The queue tools hold, release and flush messages through these.
        control = self.control = Control(store, data_dir)
        queue = self.queue = Queue(
            control.storage, control.relay(self.router), backoff=built.backoff
        )
        for policy in built.policies:
            queue.add_policy(policy)
        queue.start()
        control.start(queue, built)
        log.info("queue: %d message(s) waiting", store.get_info()["size"])
        self._adopt_spools(built, queue_dir)

    def _lock_spool(self, spool: Path) -> None:
        """Lock *spool* against a worker of an earlier server still draining it."""
        try:
            self._spool_locks.append(SpoolLock(spool))
        except SpoolBusy as exc:
            raise CliError(
                f"a worker of an earlier slimta serve still delivers from {exc}; "
                "start again once it has stopped",
                EX_UNAVAILABLE,
            ) from None
        except OSError as exc:
            raise CliError(f"cannot lock {spool}: {exc.strerror or exc}", EX_CANTCREAT) from None

    def _adopt_spools(self, built: Built, queue_dir: Path) -> None:
        """Deliver what workers left (``queue/worker-<n>``, from a time with
        ``server.workers`` > 1)."""
        for index, spool in sorted(find_spools(queue_dir).items()):
            if spool_is_empty(spool):
                continue
            try:
                self._spool_locks.append(SpoolLock(spool))
            except (SpoolBusy, OSError) as exc:
                log.warning("not delivering the mail of worker %d: %s", index, exc)
                continue
            log.info("delivering the mail worker %d left in %s", index, spool)
            self.queues.append(self._open_spool(built, spool))

    def _open_spool(self, built: Built, spool: Path) -> Queue:
        """A started queue on the (locked) disk spool *spool*."""
        assert self.router is not None
        try:
            store = DiskStorage(spool / "env", spool / "meta")
        except QueueError as exc:
            raise CliError(f"cannot open the queue in {spool}: {exc}", EX_CANTCREAT) from None
        queue = Queue(store, self.router, backoff=built.backoff)
        for policy in built.policies:
            queue.add_policy(policy)
        queue.start()
        log.info("queue %s: %d message(s) waiting", spool, store.get_info()["size"])
        return queue

    def _open_worker_queues(self, built: Built, worker: WorkerContext) -> None:
        """A worker's queues: on its own spool (new mail), and on those it adopted."""
        self.router = Router(built.table)
        own, *adopted = worker.spool_dirs
        self.queue = self._open_spool(built, own)
        self.store = self.queue.store if isinstance(self.queue.store, DiskStorage) else None
        for spool in adopted:
            self.queues.append(self._open_spool(built, spool))

    def _edge_settings(self, listener: ListenerConfig, built: Built) -> dict[str, Any]:
        config = built.config
        kind = listener.kind
        return {
            "max_size": config.limits.max_size,
            "validator_class": validators_for(built.runtime, requires_auth=kind != "smtp"),
            "auth": AUTH_MECHANISMS if listener_auth(listener, config) else False,
            # STARTTLS on every listener when [tls] is set; submission and
            # smtps cannot be configured without it.
            "context": built.context,
            "tls_immediately": kind == "smtps",
            "command_timeout": config.limits.command_timeout,
            "data_timeout": config.limits.data_timeout,
            "hostname": config.server.hostname,
            "max_recipients": config.limits.max_recipients,
        }

    def _start_edge(self, listener: ListenerConfig, sock: socket.socket, built: Built) -> None:
        assert self.queue is not None
        edge = CountingEdge(
            sock,
            self.queue,
            counters=built.runtime.counters,
            **self._edge_settings(listener, built),
        )
        host, port = sock.getsockname()[:2]
        bound = replace(listener, address=(host, port))
        self.edges[_edge_key(listener)] = (bound, edge)
        edge.start()

    def _log_summary(self, config: Config) -> None:
        _log_config(config, [bound for bound, _ in self.edges.values()])

    # -- run and stop ------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; :returns: the exit status."""
        gevent.signal_handler(signal.SIGTERM, self.stopping.set)
        gevent.signal_handler(signal.SIGINT, self.stopping.set)
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.reload))
        log.info("ready (pid %d)", os.getpid())
        self.stopping.wait()
        return self.stop()

    def stop(self) -> int:
        grace = self.config.server.shutdown_grace
        log.info("stopping: no new connections; open sessions get %g seconds", grace)
        edges = [edge for _, edge in self.edges.values()]
        gevent.joinall([gevent.spawn(edge.stop, grace) for edge in edges])
        if self.control is not None:
            self.control.stop(grace)
        queues = [queue for queue in (self.queue, *self.queues) if queue is not None]
        for queue in queues:
            queue.kill()
        # Deliveries under way may finish; the rest stays queued.
        gevent.joinall([gevent.spawn(queue.relay_pool.join, timeout=grace) for queue in queues])
        left = self.store.get_info()["size"] if self.store is not None else 0
        left += sum(queue.store.get_info()["size"] for queue in self.queues)
        log.info("stopped; %d message(s) left in the queue", left)
        return EX_OK

    # -- reload ------------------------------------------------------------------------

    def reload(self) -> None:
        """Apply the configuration file again (SIGHUP); see the module notes."""
        with self._reloading:
            if self.path is None:
                log.warning("reload: started without --config, nothing to reload")
                return
            log.info("reload: reading %s", self.path)
            try:
                self._reload()
            except ConfigInvalid as exc:
                for line in exc.lines():
                    log.error("reload: %s", line)
                log.error("reload refused: %s; still running the previous configuration", exc)
            except CliError as exc:
                log.error("reload refused: %s; still running the previous configuration", exc)

    def _reload(self) -> None:
        assert self.built is not None and self.queue is not None and self.router is not None
        old = self.config
        new = load(self.path, self.overrides)
        for key in ("data_dir", "user", "group", "workers"):
            if getattr(new.server, key) != getattr(old.server, key):
                log.warning(
                    "reload: server.%s changes only at restart; keeping %s",
                    key,
                    getattr(old.server, key),
                )
        new = replace(
            new,
            server=replace(
                new.server,
                data_dir=old.server.data_dir,
                user=old.server.user,
                group=old.server.group,
                workers=old.server.workers,
            ),
        )
        if self.worker is not None and new.listeners != old.listeners:
            log.warning("reload: with server.workers > 1, listeners change only at restart")
            new = replace(new, listeners=old.listeners)
        built = build(new, self.built.runtime, previous=self.built)
        _make_mail_dirs(new)
        added = [listener for listener in new.listeners if _edge_key(listener) not in self.edges]
        sockets = _bind_all(added)

        # Nothing can fail from here on: put the new configuration to work.
        self.config, self.built = new, built
        built.runtime.access = built.access
        self.router.table = built.table
        for queue in (self.queue, *self.queues):
            queue.queue_policies[:] = built.policies
            queue.backoff = built.backoff
        if self.control is not None:
            self.control.reload(built)
        set_level(new.server.log_level)
        set_format(new.server.log_format)
        kept = {_edge_key(listener) for listener in new.listeners}
        for old_key in list(self.edges):
            if old_key not in kept:
                bound, edge = self.edges.pop(old_key)
                log.info('reload: closing listener "%s" on %s', bound.name, bound.display_address)
                gevent.spawn(edge.stop, new.server.shutdown_grace)
        for listener in new.listeners:
            edge_key = _edge_key(listener)
            if edge_key in self.edges:
                bound, edge = self.edges[edge_key]
                for name, value in self._edge_settings(listener, built).items():
                    setattr(edge, name, value)
                self.edges[edge_key] = (replace(listener, address=bound.address), edge)
        for listener, sock in zip(added, sockets, strict=True):
            self._start_edge(listener, sock, built)
        if self.worker is None or self.worker.index == 0:  # once is enough
            self._log_summary(new)
        log.info("reload: done, now running %s", self.path)


def _log_config(config: Config, bound: list[ListenerConfig]) -> None:
    """Log in words what *config* does, with the listeners as *bound*."""
    shown = replace(config, listeners=tuple(bound))
    auth_of = {listener.name: listener_auth(listener, config) for listener in bound}
    for line in describe(shown, auth_of):
        log.info("%s", line)
    for warning in warnings(config):
        log.warning("%s", warning)


def serve(path: str | None, overrides: Overrides) -> int:
    """``slimta serve``: :returns: the exit status.

    :raises CliError: when the server cannot start.
    """
    config = load(path, overrides)
    configure_logging(config.server.log_level, config.server.log_format)
    if config.server.workers > 1:
        return _serve_workers(path, overrides, config)
    metrics = None
    if overrides.metrics is not None:
        from slimta.cli.metrics import start_metrics

        # Bound before start() may switch to an unprivileged user.
        metrics = start_metrics(overrides.metrics)
    mta = Mta(path, overrides, config)
    try:
        mta.start()
    except BaseException:
        with contextlib.suppress(Exception):
            for _, edge in mta.edges.values():
                edge.kill()
        if metrics is not None:
            metrics.close()
        raise
    if metrics is None or mta.queue is None:
        return mta.run()
    metrics.watch(mta.queue)
    try:
        return mta.run()
    finally:
        metrics.close()


# --- server.workers > 1 ---------------------------------------------------------------


def _holds_mail(queue_dir: Path) -> bool:
    """True when the single process's spool (``queue/env``, ``queue/meta``)
    has messages."""
    for name in ("env", "meta"):
        with contextlib.suppress(OSError), os.scandir(queue_dir / name) as entries:
            if any(True for _ in entries):
                return True
    return False


def _serve_workers(path: str | None, overrides: Overrides, config: Config) -> int:
    """``slimta serve`` with ``server.workers`` > 1: supervise the workers
    (see the module notes); :returns: the exit status."""
    server = config.server
    source = path or "the embedded default configuration"
    log.info("slimta %s starting with %s: %d worker processes", __version__, source, server.workers)
    if overrides.metrics is not None:
        log.warning("--metrics is not served with server.workers > 1")
    # The control socket serves one queue; workers have one each.
    log.warning(
        "with server.workers > 1 there is no control.sock or submit.sock: "
        "slimta queue and slimta sendmail cannot reach the server"
    )
    build(config)  # every problem now, before any worker starts
    data_dir = server.data_dir
    queue_dir = data_dir / "queue"
    workers = Workers(
        _run_worker,
        server.workers,
        spool_root=queue_dir,
        listeners=[listener.address for listener in config.listeners],
        # A worker stops like the single process: sessions, then deliveries.
        grace=2 * server.shutdown_grace + 5.0,
        args=(path, overrides, config),
    )
    try:
        workers.bind()
    except ListenError as exc:
        raise _listen_error(config.listeners[exc.index], exc.error) from None
    try:
        _drop_privileges(server.user, server.group)
        if server.user is not None or server.group is not None:
            try:
                build(config)
            except ConfigInvalid:
                log.error("each worker reads these files as user %s", server.user or os.getuid())
                raise
        _make_dir(data_dir, "data directory (server.data_dir)")
        lock_fd = _lock(data_dir)
    except BaseException:
        workers.close()
        raise
    try:
        _make_mail_dirs(config)
        _make_dir(queue_dir, "queue directory")
        if _holds_mail(queue_dir):
            workers.adopt.append(queue_dir)
        bound = [
            replace(listener, address=address)
            for listener, address in zip(config.listeners, workers.addresses, strict=True)
        ]
        _log_config(config, bound)

        def reload() -> bool:
            """SIGHUP: check the file (the workers reload it themselves);
            workers started later get it too."""
            if path is None:
                log.warning("reload: started without --config, nothing to reload")
                return False
            try:
                new = load(path, overrides)
                new = replace(
                    new,
                    server=replace(
                        new.server,
                        data_dir=server.data_dir,
                        user=server.user,
                        group=server.group,
                        workers=server.workers,
                    ),
                    listeners=config.listeners,
                )
                build(new)
            except ConfigInvalid as exc:
                for line in exc.lines():
                    log.error("reload: %s", line)
                log.error("reload refused: %s; still running the previous configuration", exc)
                return False
            except CliError as exc:
                log.error("reload refused: %s; still running the previous configuration", exc)
                return False
            workers.args = (path, overrides, new)
            return True

        status = workers.run(
            on_ready=lambda: log.info("ready (pid %d)", os.getpid()), on_reload=reload
        )
    except OSError as exc:
        raise CliError(f"cannot use the queue directory {queue_dir}: {exc}", EX_CANTCREAT) from None
    finally:
        workers.close()
        os.close(lock_fd)
    log.info("stopped")
    return status


def _run_worker(worker: WorkerContext) -> None:
    """One worker of ``slimta serve`` (:func:`_serve_workers`): an :class:`Mta`
    on the supervisor's sockets and the worker's spools."""
    path, overrides, config = worker.args
    configure_logging(config.server.log_level, config.server.log_format)
    mta = Mta(path, overrides, config, worker=worker)
    try:
        mta.start()
    except ConfigInvalid as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        print(f"slimta: worker {worker.index}: {exc.message}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    except CliError as exc:
        print(f"slimta: worker {worker.index}: {exc.message}", file=sys.stderr)
        raise SystemExit(exc.status) from None
    worker.on_stop(lambda grace: mta.stop())
    worker.on_reload(mta.reload)
