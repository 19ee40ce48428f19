"""A worker process of :mod:`slimta.util.workers` (started by its supervisor).

The supervisor runs ``python -c <boot> <fd>``: the boot line takes the
supervisor's ``sys.path`` (so the worker imports what the supervisor
would), patches the standard library with gevent, then calls
:func:`main`. *fd* is the worker's end of a socket pair with the
supervisor, which first sends the worker's spec (a length-prefixed pickle:
its index, the descriptors of its listening sockets, its spools, how to
import the setup function, the pickled args) and then nothing: the end of
the stream means the supervisor is gone. The worker writes ``ready`` on it
once the setup has returned.

A worker, in order: reads its spec; makes its descriptors non-inheritable,
so that programs it runs (a pipe relay) do not hold the listening sockets
or the pair; imports the setup function (a main script is run again as
``__mp_main__``, as :mod:`multiprocessing` does, so its
``if __name__ == "__main__":`` part does not run); locks its spools; installs
its signal handlers; calls ``setup(worker)``; says ``ready``; waits for
SIGTERM, SIGINT or the supervisor's end; runs the stop hooks; exits 0.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import gevent
import gevent.event
import gevent.lock

from slimta.util.workers import EX_SOFTWARE, EX_TEMPFAIL, SpoolBusy, SpoolLock, WorkerContext

__all__ = ["main"]

log = logging.getLogger("slimta.util.workers")


def main() -> NoReturn:
    """The worker's program: ``sys.argv[1]`` is the descriptor of its pair."""
    channel_fd = int(sys.argv[1])
    del sys.argv[1:]
    sys.exit(_Worker(channel_fd).run())


def _receive_exactly(channel: socket.socket, size: int) -> bytes | None:
    chunks: list[bytes] = []
    while size:
        chunk = channel.recv(min(size, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive_spec(channel: socket.socket) -> dict[str, Any] | None:
    header = _receive_exactly(channel, 4)
    if header is None:
        return None
    body = _receive_exactly(channel, struct.unpack("!I", header)[0])
    if body is None:
        return None
    spec: dict[str, Any] = pickle.loads(body)
    return spec


def _run_main_script(path: str) -> types.ModuleType:
    """Run the supervisor's main script as module ``__mp_main__``, which is
    ``__main__`` too, so that pickles naming ``__main__`` find its classes."""
    module = types.ModuleType("__mp_main__")
    module.__file__ = path
    sys.modules["__mp_main__"] = sys.modules["__main__"] = module
    code = compile(Path(path).read_bytes(), path, "exec")
    exec(code, module.__dict__)  # the program's own script, as multiprocessing runs it
    return module


def _load_setup(
    module_name: str, qualname: str, main_path: str | None, from_main: bool
) -> Callable[[WorkerContext], object]:
    if main_path is not None:
        module = _run_main_script(main_path)
    else:
        module = importlib.import_module(module_name)
        if from_main:  # the supervisor ran it with python -m
            sys.modules["__main__"] = module
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part)
    setup: Callable[[WorkerContext], object] = found
    return setup


def _exit_status(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    # What the interpreter does with SystemExit("message"): the worker's
    # stderr is the supervisor's, where the operator reads it.
    sys.stderr.write(f"{code}\n")
    return 1


class _Worker:
    def __init__(self, channel_fd: int) -> None:
        os.set_inheritable(channel_fd, False)
        self.channel = socket.socket(fileno=channel_fd)
        self.stopping = gevent.event.Event()
        self.reloading = gevent.lock.Semaphore()
        self.locks: list[SpoolLock] = []
        self.context: WorkerContext | None = None

    def run(self) -> int:
        spec = _receive_spec(self.channel)
        if spec is None:
            return 1  # the supervisor went away before saying anything
        index = spec["index"]
        for fd in spec["listener_fds"]:
            os.set_inheritable(fd, False)
        listeners = [socket.socket(fileno=fd) for fd in spec["listener_fds"]]
        try:
            setup = _load_setup(*spec["setup"])
            args = pickle.loads(spec["args"])
        except SystemExit as exc:
            return _exit_status(exc)
        except BaseException:
            log.exception("worker %d: cannot load the setup function", index)
            return EX_SOFTWARE
        spools = self._lock_spools(index, [Path(path) for path in spec["spool_dirs"]])
        if spools is None:
            return EX_TEMPFAIL
        context = self.context = WorkerContext(
            index, spec["count"], listeners, spools, args, spec["grace"]
        )
        handlers = [
            gevent.signal_handler(signal.SIGTERM, self.stopping.set),
            gevent.signal_handler(signal.SIGINT, self.stopping.set),
            gevent.signal_handler(signal.SIGHUP, gevent.spawn, self.reload),
        ]
        lifeline = gevent.spawn(self.watch_supervisor)
        try:
            try:
                setup(context)
            except SystemExit as exc:
                return _exit_status(exc)
            except BaseException:
                log.exception("worker %d: setup failed", index)
                return EX_SOFTWARE
            if not self.stopping.is_set():
                with contextlib.suppress(OSError):  # gone: the lifeline says so
                    self.channel.sendall(b"ready\n")
            self.stopping.wait()
            self.stop(context)
        finally:
            lifeline.kill(block=False)
            for handler in handlers:
                handler.cancel()
            for lock in self.locks:
                lock.release()
        return 0

    def _lock_spools(self, index: int, spools: list[Path]) -> list[Path] | None:
        """Lock every spool that can be; ``None`` when its own cannot."""
        locked: list[Path] = []
        for position, path in enumerate(spools):
            try:
                self.locks.append(SpoolLock(path))
            except SpoolBusy as exc:
                if position == 0:
                    log.error("worker %d: its spool %s; trying again later", index, exc)
                    return None
                log.warning("worker %d: not adopting %s", index, exc)
                continue
            except OSError as exc:
                if position == 0:
                    log.error("worker %d: cannot lock %s: %s", index, path, exc.strerror or exc)
                    return None
                log.warning("worker %d: not adopting %s: %s", index, path, exc.strerror or exc)
                continue
            locked.append(path)
        return locked

    def watch_supervisor(self) -> None:
        """Stop when the supervisor's end of the pair closes (it died)."""
        with contextlib.suppress(OSError):
            while self.channel.recv(4096):
                pass
        if not self.stopping.is_set():
            log.warning("worker: the supervisor is gone; stopping")
            self.stopping.set()

    def reload(self) -> None:
        context = self.context
        if context is None:
            return
        with self.reloading:
            for hook in list(context._reload_hooks):
                try:
                    hook()
                except Exception:
                    log.exception("worker %d: a reload hook failed", context.index)

    def stop(self, context: WorkerContext) -> None:
        deadline = time.monotonic() + context.grace
        for hook in reversed(context._stop_hooks):
            try:
                hook(max(0.0, deadline - time.monotonic()))
            except Exception:
                log.exception("worker %d: a stop hook failed", context.index)
