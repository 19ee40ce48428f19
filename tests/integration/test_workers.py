"""slimta.util.workers with real processes on 127.0.0.1.

The MTA under test is this file run as a script (``python test_workers.py
--spool DIR --maildir DIR ...``): a supervisor (:func:`app_main`) of worker
processes, each running :func:`app_setup`: ``SmtpEdge`` -> ``Queue`` on a
``DiskStorage`` per spool -> ``MaildirRelay`` into one Maildir shared by the
workers, the counting sink. Each test message carries ``X-Test-Id: <n>``, so
the Maildir tells which messages were delivered and how many times. Workers
name themselves in their banner (``w0.test``, ``w1.test``).

The tests read the supervisor's standard error (the workers write there too)
and wait for its lines with a deadline; waiting for the Maildir and the
spools, which other processes change, is a poll with a deadline.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import re
import select
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.subprocess
import pytest

from slimta.util.workers import WorkerContext, Workers

#: Seconds any one wait (a log line, an exit, a delivery) may take.
DEADLINE = 30.0
#: Seconds between two looks at files other processes write.
POLL = 0.05

TEST_ID = re.compile(rb"^X-Test-Id: (\d+)\r?$", re.MULTILINE)


# --- the application under test (runs in the supervisor and the workers) -------------


def app_setup(worker: WorkerContext) -> None:
    """One worker: an SMTP edge on listener 0 feeding the queue of its own
    spool; a queue per adopted spool delivers what it holds."""
    from slimta.diskstorage import DiskStorage
    from slimta.edge.smtp import SmtpEdge
    from slimta.queue import Queue
    from slimta.relay.maildir import MaildirRelay

    options: dict[str, Any] = worker.args[0]
    logging.basicConfig(format=f"worker {worker.index}: %(name)s: %(message)s")
    # Not the mail log's lines of every message: what the tests wait for.
    for name in ("app", "slimta.util.workers"):
        logging.getLogger(name).setLevel(logging.INFO)
    log = logging.getLogger("app")
    if options["fail"]:
        raise SystemExit(78)

    class SlowMaildirRelay(MaildirRelay):
        """Delivers after a pause, so that accepted mail waits in the spool."""

        def attempt(self, envelope: Any, attempts: int) -> Any:
            gevent.sleep(options["relay_delay"])
            return super().attempt(envelope, attempts)

    relay = None if options["hold"] else SlowMaildirRelay(options["maildir"])
    queues = []
    for spool in worker.spool_dirs:
        store = DiskStorage(spool / "env", spool / "meta")
        log.info("spool %s: %d message(s) waiting", spool.name, store.get_info()["size"])
        queue = Queue(store, relay)
        queue.start()
        worker.on_stop(lambda grace, queue=queue: stop_queue(queue, grace))
        queues.append(queue)
    edge = SmtpEdge(worker.listener(0), queues[0], hostname=f"w{worker.index}.test")
    edge.ptr_lookup = False
    edge.start()
    worker.on_stop(edge.stop)  # runs first: stop accepting, finish the sessions


def stop_queue(queue: Any, grace: float) -> None:
    queue.kill()
    queue.relay_pool.join(timeout=grace)


def app_main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--hold", action="store_true", help="queue without delivering")
    parser.add_argument("--fail", action="store_true", help="every setup exits 78")
    parser.add_argument("--shared", action="store_true", help="one socket, no SO_REUSEPORT")
    parser.add_argument("--relay-delay", type=float, default=0.0)
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="supervisor: %(name)s: %(message)s")
    workers = Workers(
        app_setup,
        options.workers,
        spool_root=options.spool,
        listeners=[("127.0.0.1", 0)],
        grace=5.0,
        args=(vars(options),),
        reuse_port=False if options.shared else None,
    )
    workers.bind()
    logging.getLogger("app").info("port %d", workers.addresses[0][1])
    return workers.run()


# --- processes -----------------------------------------------------------------------------


class Process:
    """A process under test and the lines written to its standard error
    (by it and by the workers, which share that pipe).

    A greenlet reads the pipe all the time: a full pipe would block the
    writers' logging, and with it their whole event loop.
    """

    def __init__(self, command: list[str], cwd: Path) -> None:
        # gevent's Popen: once anything in this test process has used
        # gevent.subprocess (the pipe relay's tests do), gevent's child
        # watcher reaps every child, and the stdlib's wait() then reads
        # ECHILD as an exit status of 0.
        self.proc = gevent.subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._seen = 0
        self._news = gevent.event.Event()
        self._reader = gevent.spawn(self._read_all)

    def _read_all(self) -> None:
        """Collect lines until every writer has exited (the pipe's end)."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        partial = b""
        while True:
            select.select([fd], [], [])  # cooperative: gevent's select
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            *complete, partial = (partial + chunk).split(b"\n")
            self.lines += [line.decode("utf-8", "replace") for line in complete]
            self._news.set()
        if partial:
            self.lines.append(partial.decode("utf-8", "replace"))
        self._news.set()

    def wait_for(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        """The first line not waited for before that matches *pattern*."""
        until = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            while self._seen < len(self.lines):
                line = self.lines[self._seen]
                self._seen += 1
                match = regex.search(line)
                if match:
                    return match
            if self._reader.ready():
                raise AssertionError(f"no line {pattern!r} before the end:\n" + self.log)
            self._news.clear()
            left = until - time.monotonic()
            assert left > 0 and self._news.wait(left), f"no line {pattern!r}:\n" + self.log

    def wait_count(self, pattern: str, count: int, timeout: float = DEADLINE) -> None:
        """Wait until *count* lines so far match *pattern* (whatever the order
        in which several processes wrote them)."""
        until = time.monotonic() + timeout
        regex = re.compile(pattern)
        while sum(1 for line in self.lines if regex.search(line)) < count:
            assert not self._reader.ready(), f"not {count} lines {pattern!r}:\n" + self.log
            self._news.clear()
            left = until - time.monotonic()
            assert left > 0 and self._news.wait(left), f"not {count} {pattern!r}:\n" + self.log

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def finish(self, timeout: float = DEADLINE) -> tuple[int, str]:
        """Wait until the process and its workers are gone: ``(status, log)``."""
        until = time.monotonic() + timeout
        self._reader.join(timeout)
        assert self._reader.ready(), "still running:\n" + self.log
        status = self.proc.wait(timeout=max(0.1, until - time.monotonic()))
        return status, self.log

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(signum)
        return self.finish()

    def worker_pids(self) -> set[int]:
        return {int(m) for m in re.findall(r"started \(pid (\d+)\)", self.log)}

    def close(self) -> None:
        """Leave nothing running, whatever the test did."""
        for pid in self.worker_pids() | {self.proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(DEADLINE)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


class App(Process):
    """This file as a supervisor of workers."""

    def __init__(self, tmp_path: Path, *options: str) -> None:
        command = [sys.executable, __file__, "--spool", "spool", "--maildir", "mail", *options]
        super().__init__(command, tmp_path)
        self.spool = tmp_path / "spool"
        self.maildir = tmp_path / "mail"

    def ready(self, count: int = 2) -> App:
        self.port = int(self.wait_for(r"app: port (\d+)").group(1))
        self.wait_for(rf"all {count} workers ready")
        return self

    def ready_pid(self, index: int) -> int:
        """The pid of the next worker *index* to be ready."""
        return int(self.wait_for(rf"worker {index} ready \(pid (\d+)\)").group(1))

    def pids_ready(self, index: int) -> list[int]:
        """The pids of every worker *index* ready so far, oldest first."""
        return [int(pid) for pid in re.findall(rf"worker {index} ready \(pid (\d+)\)", self.log)]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., App]]:
    (tmp_path / "mail").mkdir()
    started: list[Process] = []

    def start_app(*options: str) -> App:
        app = App(tmp_path, *options)
        started.append(app)
        return app

    yield start_app
    for process in started:
        process.close()


# --- clients and the sink ----------------------------------------------------------------------


def message(number: int) -> bytes:
    return (
        f"From: <sender@example.test>\r\nTo: <sink@example.test>\r\n"
        f"Subject: message {number}\r\nX-Test-Id: {number}\r\n\r\nBody of {number}.\r\n"
    ).encode()


class Clients:
    """Sends numbered messages from many concurrent connections, one
    connection per message, and remembers which got their 250."""

    def __init__(self, port: int) -> None:
        self.port = port
        #: Ids whose DATA got 250, in the order of the replies.
        self.acked: list[int] = []
        self.failed: list[tuple[int, str]] = []
        #: Banner host name -> connections it greeted.
        self.greeted: collections.Counter[str] = collections.Counter()

    def send_one(self, number: int) -> None:
        client = smtplib.SMTP(timeout=DEADLINE)
        try:
            _, banner = client.connect("127.0.0.1", self.port)
            self.greeted[banner.split()[0].decode()] += 1
            client.sendmail("sender@example.test", ["sink@example.test"], message(number))
            self.acked.append(number)
            client.quit()
        except (OSError, smtplib.SMTPException) as exc:
            self.failed.append((number, repr(exc)))
        finally:
            client.close()

    def send(self, numbers: Iterable[int], concurrency: int) -> None:
        pool = gevent.pool.Pool(concurrency)
        for number in numbers:
            pool.spawn(self.send_one, number)
        pool.join()


def delivered(maildir: Path) -> collections.Counter[int]:
    """How many times each test id is in the sink's Maildir."""
    found: collections.Counter[int] = collections.Counter()
    new = maildir / "sink" / "new"
    if new.is_dir():
        for path in new.iterdir():
            match = TEST_ID.search(path.read_bytes())
            assert match, f"{path} has no X-Test-Id"
            found[int(match.group(1))] += 1
    return found


def queued(spool_root: Path) -> int:
    """Messages stored in all the spools under *spool_root*."""
    return sum(1 for _ in spool_root.glob("worker-*/env/*.env"))


def wait_drained(app: App, wanted: Iterable[int]) -> collections.Counter[int]:
    """Poll, with a deadline, until every id of *wanted* is in the Maildir
    and the spools are empty (then nothing more can arrive); :returns: the
    Maildir's count per id."""
    wanted = set(wanted)
    until = time.monotonic() + DEADLINE
    while True:
        counts = delivered(app.maildir)
        if wanted <= set(counts) and queued(app.spool) == 0:
            return counts
        missing = sorted(wanted - set(counts))
        assert time.monotonic() < until, (
            f"{len(missing)} not delivered (first: {missing[:10]}), "
            f"{queued(app.spool)} still queued:\n{app.log}"
        )
        gevent.sleep(POLL)  # other processes deliver; look again


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sockets", ["reuseport", "shared"])
def test_two_workers_deliver_500_messages_each_exactly_once(
    start: Callable[..., App], sockets: str
) -> None:
    app = start(*(["--shared"] if sockets == "shared" else [])).ready()
    clients = Clients(app.port)
    clients.send(range(500), concurrency=25)
    assert not clients.failed, clients.failed[:5]
    assert sorted(clients.acked) == list(range(500))
    # Both processes served the one port.
    assert set(clients.greeted) == {"w0.test", "w1.test"}, clients.greeted
    counts = wait_drained(app, range(500))
    assert set(counts) == set(range(500))
    twice = {number: n for number, n in counts.items() if n != 1}
    assert not twice, f"delivered more than once: {twice}"
    status, log = app.stop()
    assert status == 0, log
    assert "worker 0 (pid" in log and "worker 1 (pid" in log
    assert "Traceback" not in log


@pytest.mark.timeout(120)
def test_a_killed_worker_is_restarted_and_nothing_acknowledged_is_lost(
    start: Callable[..., App],
) -> None:
    # Deliveries lag 0.3 s behind, so that at the kill worker 1 holds mail
    # it acknowledged and has not delivered yet.
    app = start("--relay-delay", "0.3").ready()
    first = {index: app.pids_ready(index)[0] for index in (0, 1)}
    clients = Clients(app.port)
    acked_at_kill: list[int] = []

    def kill_worker_1_mid_run() -> None:
        while len(clients.acked) < 150:
            gevent.sleep(POLL)  # our own greenlets send; look again
        acked_at_kill.append(len(clients.acked))
        os.kill(first[1], signal.SIGKILL)

    killer = gevent.spawn(kill_worker_1_mid_run)
    clients.send(range(500), concurrency=10)
    killer.get(timeout=DEADLINE)
    app.wait_for(rf"worker 1 \(pid {first[1]}\) was killed by SIGKILL; restarting it")
    # The new worker 1 found what its predecessor had accepted but not delivered.
    waiting = int(app.wait_for(r"worker 1: app: spool worker-1: (\d+) message").group(1))
    restarted = app.ready_pid(1)
    assert restarted not in first.values()
    assert waiting > 0, "the kill came when worker 1 held nothing: the test proves nothing"
    assert len(clients.acked) > acked_at_kill[0], "no message was accepted after the kill"

    counts = wait_drained(app, clients.acked)
    lost = set(clients.acked) - set(counts)
    assert not lost
    # At least once: a message delivered just before the kill but not yet
    # removed from the spool is delivered again; nothing else is.
    assert sum(counts.values()) - len(counts) <= waiting
    status, log = app.stop()
    assert status == 0, log
    assert app.worker_pids() == {*first.values(), restarted}


@pytest.mark.timeout(120)
def test_one_worker_delivers_what_two_left_then_their_spool_is_removed(
    start: Callable[..., App],
) -> None:
    held = start("--hold").ready()
    clients = Clients(held.port)
    clients.send(range(100), concurrency=20)
    assert sorted(clients.acked) == list(range(100))
    status, log = held.stop()
    assert status == 0, log
    left = {n: len(list(held.spool.glob(f"worker-{n}/env/*.env"))) for n in (0, 1)}
    assert left[0] + left[1] == 100 and left[0] and left[1], left

    one = start("--workers", "1").ready(count=1)
    assert re.search(r"worker 0 adopts \S+/worker-1\n", one.log + "\n"), one.log
    counts = wait_drained(one, range(100))
    assert sorted(counts) == list(range(100)) and set(counts.values()) == {1}
    assert one.stop()[0] == 0

    # Drained, worker-1 is gone at the next start; worker-0 stays.
    again = start("--workers", "1").ready(count=1)
    assert any(re.search(r"removed the empty spool \S+/worker-1$", line) for line in again.lines)
    assert not (again.spool / "worker-1").exists()
    assert (again.spool / "worker-0").is_dir()
    assert again.stop()[0] == 0


def test_sigterm_lets_an_open_session_finish_within_the_grace_time(
    start: Callable[..., App],
) -> None:
    app = start().ready()
    client = smtplib.SMTP(timeout=DEADLINE)
    _, banner = client.connect("127.0.0.1", app.port)
    mine = int(banner.split()[0].decode()[1])  # b"w1.test ..." -> 1
    client.ehlo("client.test")
    client.mail("sender@example.test")
    client.rcpt("sink@example.test")
    code, _ = client.docmd("DATA")
    assert code == 354
    app.proc.send_signal(signal.SIGTERM)
    # The other worker has nothing to finish; ours waits for the session.
    app.wait_for(rf"worker {1 - mine} \(pid \d+\) exited with status 0")
    assert f"worker {mine} (pid" not in app.log
    client.send(message(7) + b".\r\n")
    code, text = client.getreply()
    assert code == 250, text
    client.quit()
    status, log = app.finish()
    assert status == 0, log
    assert delivered(app.maildir) == {7: 1}


def test_a_setup_that_fails_at_the_start_stops_the_supervisor_with_its_status(
    start: Callable[..., App],
) -> None:
    app = start("--fail")
    status, log = app.finish()
    assert status == 78, log
    assert "before it was ready; stopping" in log
    assert "restarting" not in log


def test_workers_stop_when_the_supervisor_is_killed(start: Callable[..., App]) -> None:
    app = start().ready()
    # finish() returns once every process writing to the pipe has exited.
    status, log = app.stop(signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert log.count("the supervisor is gone; stopping") == 2, log


# --- slimta serve with server.workers ------------------------------------------------------------


def serve(tmp_path: Path, config: Path) -> Process:
    return Process([sys.executable, "-m", "slimta", "serve", "--config", str(config)], tmp_path)


def sender_config(path: Path, workers: int, smarthost_port: int) -> Path:
    path.write_text(
        f"""
[server]
hostname = "sender.test"
data_dir = "sender-data"
trusted_networks = ["127.0.0.0/8"]
workers = {workers}
shutdown_grace = 2
[listeners.in]
address = "127.0.0.1:0"
[relay]
default = "smarthost"
[relay.smarthost]
host = "127.0.0.1"
port = {smarthost_port}
[queue]
retry = [1]
"""
    )
    return path


@pytest.mark.parametrize("reuse_port", [False, True])
def test_serve_with_workers_on_a_port_in_use_is_a_clear_error(
    tmp_path: Path, reuse_port: bool
) -> None:
    # Even a listener with SO_REUSEPORT, which the workers' sockets could join.
    taken = socket.create_server(("127.0.0.1", 0), reuse_port=reuse_port)
    config = tmp_path / "taken.toml"
    config.write_text(
        f"""
[server]
data_dir = "data"
workers = 2
[listeners.in]
address = "127.0.0.1:{taken.getsockname()[1]}"
"""
    )
    process = serve(tmp_path, config)
    try:
        status, log = process.finish()
    finally:
        taken.close()
        process.close()
    assert status == 69, log  # EX_UNAVAILABLE
    assert 'listener "in"): the address is already in use' in log
    assert "Traceback" not in log


@pytest.mark.timeout(120)
def test_serve_with_two_workers_then_one_delivers_everything(tmp_path: Path) -> None:
    # The smarthost's port is held by a socket that does not listen, so the
    # mail stays queued in the workers' spools until the smarthost starts.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    smarthost_port = holder.getsockname()[1]
    config = tmp_path / "sender.toml"
    processes: list[Process] = []
    try:
        sender = serve(tmp_path, sender_config(config, 2, smarthost_port))
        processes.append(sender)
        port = int(sender.wait_for(r"listening on 127.0.0.1:(\d+)").group(1))
        sender.wait_for(r"ready \(pid")
        clients = Clients(port)
        clients.send(range(40), concurrency=8)
        assert sorted(clients.acked) == list(range(40)), clients.failed[:3]
        assert set(clients.greeted) == {"sender.test"}
        sender.proc.send_signal(signal.SIGHUP)
        sender.wait_for(r"reload: SIGHUP sent to 2 worker")
        sender.wait_count(r"reload: done", 2)
        status, log = sender.stop()
        assert status == 0, log
        spool = tmp_path / "sender-data" / "queue"
        left = [len(list(spool.glob(f"worker-{n}/env/*.env"))) for n in (0, 1)]
        assert sum(left) == 40 and all(left), left

        holder.close()
        smarthost_config = tmp_path / "smarthost.toml"
        smarthost_config.write_text(
            f"""
[server]
hostname = "smarthost.test"
data_dir = "smarthost-data"
[listeners.in]
address = "127.0.0.1:{smarthost_port}"
[local]
domains = ["example.test"]
"""
        )
        smarthost = serve(tmp_path, smarthost_config)
        processes.append(smarthost)
        smarthost.wait_for(r"ready \(pid")
        single = serve(tmp_path, sender_config(config, 1, smarthost_port))
        processes.append(single)
        single.wait_for(r"ready \(pid")
        for n in (0, 1):
            assert f"delivering the mail worker {n} left" in single.log
        until = time.monotonic() + DEADLINE
        maildir = tmp_path / "smarthost-data" / "mail"
        while len(delivered(maildir)) < 40:
            assert time.monotonic() < until, single.log
            gevent.sleep(POLL)  # the other processes deliver; look again
        assert set(delivered(maildir).values()) == {1}
        assert single.stop()[0] == 0
        assert smarthost.stop()[0] == 0
    finally:
        holder.close()
        for process in processes:
            process.close()


if __name__ == "__main__":
    sys.exit(app_main())
