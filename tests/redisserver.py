"""A real ``redis-server`` for tests: started on a free 127.0.0.1 port with its
data in a temporary directory, killed (or crashed on purpose) by the test.

Import-safe (no side effects); tests/ is on ``sys.path``, so test modules do::

    from redisserver import RedisServer, redis_binary

:func:`redis_binary` skips the calling test when the Debian package
``redis-server`` is not installed, and :func:`redis_py` when redis-py (the
``redis`` extra) is not.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

__all__ = ["RedisServer", "free_port", "redis_binary", "redis_py"]

#: Seconds a server may take to answer PING after it was started (an AOF
#: replay included).
START_TIMEOUT = 15.0


def redis_py() -> ModuleType:
    """The redis-py module, or skip the test."""
    return pytest.importorskip("redis", reason="redis-py is not installed (extra 'redis')")


def redis_binary() -> str:
    """The path of ``redis-server``, or skip the test."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    return binary


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, restartable on the same port.

    :param binary: path of ``redis-server``.
    :param workdir: its data directory (the AOF lives there).
    :param appendfsync: ``None`` for no persistence at all, else turn the
        append-only file on with this ``appendfsync`` policy (``"always"``
        for no loss of acknowledged writes).
    """

    def __init__(self, binary: str, workdir: Path, appendfsync: str | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.appendfsync = appendfsync
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.start()

    def command(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        if self.appendfsync is None:
            args += ["--appendonly", "no"]
        else:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        return args

    def start(self) -> None:
        """Start the server and return once it answers PING."""
        redis = redis_py()
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    log = self.workdir / "redis.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise RuntimeError(f"redis-server did not answer on {self.port}:\n{tail}")
                # Polling a foreign process's readiness: there is no event to
                # wait on (with a deadline, above).
                time.sleep(0.02)
        finally:
            client.close()

    def client(self, **kwargs: Any) -> Any:
        """A new redis-py client of this server (bytes replies by default)."""
        kwargs.setdefault("socket_timeout", 5)
        return redis_py().Redis(host="127.0.0.1", port=self.port, **kwargs)

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing is flushed) and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        """Crash the server, then start it again on the same port and data."""
        self.kill()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
