"""Queue processes sharing one real Redis through RedisStorage.

Each worker is a separate Python process (this module, run by
:func:`start_worker`) with ``Queue(RedisStorage(...))`` and a relay that
appends one line per delivery to its own file. The tests then count the
lines:

* two workers deliver each of 1,000 messages exactly once, some written by
  this process for any worker, some enqueued by the workers themselves,
  some failing their first attempt and retried by whichever worker claims
  them;
* a worker SIGKILLed mid-run loses nothing: the other delivers what the
  dead one held once its leases run out (duplicates only among what the
  dead one had in flight);
* Redis SIGKILLed and restarted mid-run, with ``appendfsync always``, loses
  nothing that was acknowledged.

The tests wait for a foreign process's progress (lines in files, keys in
Redis) by polling with a deadline: there is no event to wait on across
processes. Each poll is commented.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest

from redisserver import RedisServer, redis_binary, redis_py
from slimta.envelope import Envelope
from slimta.queue import QueueError

redis_py()
from slimta.redisstorage import RedisStorage  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TESTS_DIR = Path(__file__).resolve().parents[1]
#: Polling interval when waiting for another process's progress.
POLL = 0.05


def message(tag: str) -> Envelope:
    """A message whose sender names it: the relay records the tag."""
    envelope = Envelope(f"{tag}@x.test", ["rcpt@example.net"])
    envelope.parse(b"Subject: process test\r\n\r\nbody\r\n")
    return envelope


# --- the worker process ------------------------------------------------------------


def worker_main(argv: list[str]) -> None:
    """A queue process: ``Queue(RedisStorage)`` delivering to a log file.

    Prints its storage's owner token on the first line of stdout; stops
    cleanly (exit status 0) on SIGTERM.
    """
    from slimta import queue as queue_module
    from slimta.queue import Queue
    from slimta.relay import Relay, TransientRelayError
    from slimta.smtp.reply import Reply

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--claim-limit", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per delivery")
    parser.add_argument("--enqueue", type=int, default=0, help="messages to enqueue itself")
    parser.add_argument("--name", default="w")
    args = parser.parse_args(argv)

    # A read that fails (Redis down) is retried by the queue after 300 s
    # (Postfix's queue_run_delay); a run of this test is seconds long.
    queue_module._GET_RETRY_DELAY = 0.5

    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()

    class FileRelay(Relay):
        def attempt(self, envelope: Envelope, attempts: int) -> Reply:
            tag = (envelope.sender or "").split("@")[0]
            if tag.endswith("-retry") and attempts == 0:
                raise TransientRelayError("later", Reply("450", "4.0.0 later"))
            if args.delay:
                gevent.sleep(args.delay)  # the time a real delivery takes
            # One write(2) per line with O_APPEND: whole lines, even when the
            # process is killed right after.
            os.write(fd, f"{tag} {pid}\n".encode())
            return Reply("250", "2.0.0 Ok")

    storage = RedisStorage(
        "127.0.0.1", args.port, lease=args.lease, claim_limit=args.claim_limit, socket_timeout=2
    )
    # Attempts at a time as many as wait() may hold: what the worker has in
    # flight when it is killed is bounded by both.
    queue = Queue(
        storage,
        FileRelay(),
        backoff=lambda envelope, attempts: 0.05,
        relay_pool=args.claim_limit,
    )
    queue.start()
    print(storage.token, flush=True)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    for n in range(args.enqueue):
        [(_, outcome)] = queue.enqueue(message(f"{args.name}-{n}"))
        if isinstance(outcome, QueueError):
            raise outcome
    stop.wait()
    queue.kill()
    queue.relay_pool.join(timeout=10)
    storage.close()
    os.close(fd)


# --- the harness -------------------------------------------------------------------------


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    log: Path
    token: str

    def lines(self) -> list[tuple[str, int]]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            tag, pid = line.split(" ")
            out.append((tag, int(pid)))
        return out

    def stop(self) -> int:
        """SIGTERM the worker and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(port: int, name: str, **options: Any) -> Worker:
        log = tmp_path / f"{name}.deliveries"
        argv = ["--port", str(port), "--log", str(log), "--name", name]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        code = (
            "from gevent import monkey; monkey.patch_all()\n"
            "import sys\n"
            f"sys.path[:0] = [{str(TESTS_DIR)!r}, {str(Path(__file__).parent)!r}]\n"
            "import test_redisstorage_processes as worker\n"
            "worker.worker_main(sys.argv[1:])\n"
        )
        stderr = (tmp_path / f"{name}.stderr").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *argv],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=tmp_path,
        )
        stderr.close()
        assert proc.stdout is not None
        token = proc.stdout.readline().strip()  # printed once its queue runs
        assert token, (tmp_path / f"{name}.stderr").read_text()
        worker = Worker(proc, log, token)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait(10)
        if worker.proc.stdout is not None:
            worker.proc.stdout.close()


def stderr_of(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(tmp_path.glob("*.stderr"))
    )


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll *condition* (another process's progress) until true or *timeout*."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        gevent.sleep(POLL)  # polling a foreign process, with the deadline above


def queue_size(storage: RedisStorage) -> int:
    size: int = storage.get_info()["size"]
    return size


def all_lines(workers: list[Worker]) -> list[tuple[str, int]]:
    return [line for worker in workers for line in worker.lines()]


# --- the tests ----------------------------------------------------------------------------


def test_two_processes_deliver_each_message_once(
    tmp_path: Path, start_worker: Callable[..., Worker]
) -> None:
    server = RedisServer(redis_binary(), tmp_path / "redis")
    try:
        producer = RedisStorage("127.0.0.1", server.port, claim_on_write=False)
        # 600 written here for any worker (every tenth fails its first attempt
        # and is retried by whichever worker claims it then) ...
        tags = [f"m{n}-retry" if n % 10 == 0 else f"m{n}" for n in range(600)]
        for tag in tags[:300]:
            producer.write(message(tag), time.time())
        # ... and 200 enqueued by each worker itself, while the rest arrive.
        workers = [start_worker(server.port, name, enqueue=200) for name in ("a", "b")]
        for tag in tags[300:]:
            producer.write(message(tag), time.time())
        tags += [f"{name}-{n}" for name in ("a", "b") for n in range(200)]
        assert len(tags) == 1000

        # Polls the workers' progress through Redis (see wait_until).
        wait_until(
            lambda: len(all_lines(workers)) >= 1000 and queue_size(producer) == 0,
            60,
            "1000 deliveries",
        )
        statuses = [worker.stop() for worker in workers]
        lines = all_lines(workers)
        counts = Counter(tag for tag, _ in lines)
        duplicates = {tag: n for tag, n in counts.items() if n > 1}
        print(f"deliveries={len(lines)} unique={len(counts)} duplicates={len(duplicates)}")
        assert statuses == [0, 0], stderr_of(tmp_path)
        assert duplicates == {}
        assert sorted(counts) == sorted(tags)
        # Both shared the messages written here, retries included.
        for worker in workers:
            pid = worker.proc.pid
            shared = [tag for tag, p in lines if p == pid and tag.startswith("m")]
            assert len(shared) > 30, f"worker {pid} delivered {len(shared)} of 600"
        assert queue_size(producer) == 0
        producer.close()
    finally:
        server.kill()


def test_sigkilled_process_loses_nothing(
    tmp_path: Path, start_worker: Callable[..., Worker]
) -> None:
    server = RedisServer(redis_binary(), tmp_path / "redis")
    admin = server.client()
    try:
        # 25 attempts at a time of 50 ms each: about 500 messages a second
        # per worker, so the kill comes well before the end.
        options = {"lease": 1.0, "claim_limit": 25, "delay": 0.05}
        doomed = start_worker(server.port, "doomed", **options)
        survivor = start_worker(server.port, "survivor", **options)
        workers = [doomed, survivor]
        producer = RedisStorage("127.0.0.1", server.port, claim_on_write=False)
        tags = [f"m{n}" for n in range(1000)]
        for tag in tags:
            producer.write(message(tag), time.time())

        # Polls the doomed worker's log until it is well into the run.
        wait_until(lambda: len(doomed.lines()) >= 150, 30, "150 deliveries by the first worker")
        doomed.proc.kill()
        doomed.proc.wait(10)
        # What it held when it died: in Redis under its owner token.
        orphans = []
        for member in admin.zrange("slimta:claimed", 0, -1):
            fields = admin.hmget(b"slimta:" + member, ["owner", "envelope"])
            if fields[0] == doomed.token.encode():
                orphans.append(pickle.loads(fields[1]).sender.split("@")[0])
        assert orphans, "the worker held nothing when killed"
        delivered_before = Counter(tag for tag, _ in doomed.lines())

        # Polls the survivor's progress through Redis.
        wait_until(lambda: queue_size(producer) == 0, 60, "the survivor to drain the queue")
        assert survivor.stop() == 0, stderr_of(tmp_path)
        lines = all_lines(workers)
        counts = Counter(tag for tag, _ in lines)
        lost = [tag for tag in tags if tag not in counts]
        duplicates = {tag: n for tag, n in counts.items() if n > 1}
        print(
            f"deliveries={len(lines)} lost={len(lost)} duplicates={len(duplicates)} "
            f"held_at_kill={len(orphans)}"
        )
        assert lost == []
        # Every orphan went out, through the survivor unless the dead worker
        # had delivered it before dying.
        survivor_tags = {tag for tag, _ in survivor.lines()}
        assert all(tag in survivor_tags or tag in delivered_before for tag in orphans)
        # A duplicate is a message the dead worker delivered but had not yet
        # removed: at most what it had in flight (its relay pool's size).
        assert len(duplicates) <= options["claim_limit"]
        assert all(n == 2 for n in duplicates.values())
        assert all(tag in delivered_before and tag in survivor_tags for tag in duplicates)
        producer.close()
    finally:
        admin.close()
        server.kill()


def test_redis_restart_with_aof_loses_nothing_acknowledged(
    tmp_path: Path, start_worker: Callable[..., Worker]
) -> None:
    server = RedisServer(redis_binary(), tmp_path / "redis", appendfsync="always")
    try:
        options = {"lease": 2.0, "claim_limit": 20, "delay": 0.002}
        workers = [start_worker(server.port, name, **options) for name in ("a", "b")]
        producer = RedisStorage("127.0.0.1", server.port, claim_on_write=False, socket_timeout=2)
        acked: list[str] = []
        refused: list[str] = []
        halfway = gevent.event.Event()

        def produce() -> None:
            for n in range(1000):
                tag = f"m{n}"
                while True:
                    try:
                        producer.write(message(tag), time.time())
                    except QueueError:
                        # Not acknowledged: the client tries again, as an
                        # SMTP client does after a 451.
                        refused.append(tag)
                        gevent.sleep(0.05)  # the client's retry interval
                        continue
                    acked.append(tag)
                    break
                if n == 400:
                    halfway.set()

        writer = gevent.spawn(produce)
        with gevent.Timeout(30):
            halfway.wait()
        server.restart()  # SIGKILL, then start on the same AOF
        with gevent.Timeout(60):
            writer.get()
        # Polls the workers' progress through Redis.
        wait_until(lambda: queue_size(producer) == 0, 60, "the workers to drain the queue")
        alive = [worker.proc.poll() is None for worker in workers]
        statuses = [worker.stop() for worker in workers]
        lines = all_lines(workers)
        counts = Counter(tag for tag, _ in lines)
        lost = [tag for tag in acked if tag not in counts]
        duplicates = {tag: n for tag, n in counts.items() if n > 1}
        print(
            f"acknowledged={len(acked)} refused_writes={len(refused)} deliveries={len(lines)} "
            f"lost={len(lost)} duplicates={len(duplicates)}"
        )
        assert alive == [True, True], stderr_of(tmp_path)
        assert statuses == [0, 0], stderr_of(tmp_path)
        assert len(acked) == 1000
        assert lost == []
        producer.close()
    finally:
        server.kill()
