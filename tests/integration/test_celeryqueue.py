"""CeleryQueue against a real Redis broker and real ``celery worker`` processes.

The broker is a ``redis-server`` started on a free 127.0.0.1 port with its
data in a temporary directory (``tests/redisserver.py``). Workers are
``celery -A celery_app worker --pool=gevent`` (or prefork) subprocesses running the app of
``tests/celery_app.py``, whose relay records attempts and deliveries in
Redis lists (database 1); the tests wait on those lists with BLPOP and a
deadline. Database 2 holds tasks nobody consumes, for the tests that read
what the queue published.

Skipped when Celery (extra ``celery``), redis-py (extra ``redis``) or
``redis-server`` (Debian package) is missing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import celery_app
from redisserver import RedisServer, redis_binary
from slimta.celeryqueue import CeleryQueue
from slimta.envelope import Envelope
from slimta.policy.split import RecipientSplit
from slimta.queue import QueueError
from slimta.relay import PermanentRelayError, Relay, TransientRelayError

pytest.importorskip("celery", reason="Celery is not installed (extra 'celery')")
pytest.importorskip("redis", reason="redis-py is not installed (extra 'redis')")

pytestmark = pytest.mark.timeout(90)

QUEUED = ("250", "2.6.0")
QUEUE_TEMPFAIL = ("451", "4.3.0")
#: Seconds a worker may take to start consuming.
WORKER_START = 30.0
#: Seconds a worker may take to do what a test waits for.
WAIT = 20.0
TESTS_DIR = Path(__file__).resolve().parent.parent


def unique(local: str) -> str:
    """A fresh address whose local part starts with *local* (see celery_app)."""
    return f"{local}-{uuid.uuid4().hex[:12]}@example.test"


def message(subject: str) -> bytes:
    return f"From: a@example.test\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()


class Worker:
    """One ``celery worker`` process on the test app.

    :param pool: ``gevent`` or ``prefork``. Not ``solo``: it runs the task
        inside the event loop callback, so even an early acknowledgement is
        only sent after the task, and killing the worker could not tell late
        from early.
    :param visibility_timeout: of the Redis transport, in seconds.
    """

    def __init__(
        self,
        server: RedisServer,
        logfile: Path,
        pool: str = "gevent",
        visibility_timeout: float = celery_app.VISIBILITY_TIMEOUT,
    ) -> None:
        self.logfile = logfile
        env = dict(os.environ)
        env[celery_app.VISIBILITY_ENV] = str(visibility_timeout)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
        env[celery_app.BROKER_ENV] = f"redis://127.0.0.1:{server.port}/0"
        env[celery_app.RECORD_ENV] = f"redis://127.0.0.1:{server.port}/1"
        with open(logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", "celery_app", "worker",
                    f"--pool={pool}", "--concurrency=4", "--without-gossip", "--without-mingle",
                    "--without-heartbeat", "--loglevel=INFO",
                    "--hostname", f"w{uuid.uuid4().hex[:8]}@%h",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def log_tail(self) -> str:
        return self.logfile.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL the worker: nothing is acknowledged or restored on the way out."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), or SIGKILL if it takes too long."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class Records:
    """What the workers' RecordingRelay pushed to Redis database 1."""

    def __init__(self, server: RedisServer, log_tail: Callable[[], str]) -> None:
        self.client = server.client(db=1, socket_timeout=WAIT + WORKER_START + 10)
        self.log_tail = log_tail

    def until(
        self, key: str, wanted: Callable[[dict[str, Any]], bool], timeout: float = WAIT
    ) -> dict[str, Any]:
        """Pop records off *key* until one is *wanted*; fail after *timeout* seconds."""
        # Waiting on a foreign process: BLPOP blocks until it pushes, and the
        # deadline bounds the wait.
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            item = self.client.blpop([key], timeout=max(left, 0.01))
            if item is None:
                break
            record: dict[str, Any] = json.loads(item[1])
            if wanted(record):
                return record
        raise AssertionError(f"nothing wanted in {key!r} within {timeout} s\n{self.log_tail()}")

    def for_rcpt(self, key: str, rcpt: str, timeout: float = WAIT) -> dict[str, Any]:
        return self.until(key, lambda r: rcpt in r["recipients"], timeout)

    def wait_ready(self, worker: Worker) -> None:
        pid = str(worker.proc.pid)
        # The worker_ready signal pushes the pid of the main process.
        deadline = time.monotonic() + WORKER_START
        while (left := deadline - time.monotonic()) > 0:
            item = self.client.blpop(["ready"], timeout=max(left, 0.01))
            if item is None:
                break
            if item[1].decode() == pid:
                return
        raise AssertionError(f"worker {pid} not ready in {WORKER_START} s\n{worker.log_tail()}")

    def close(self) -> None:
        self.client.close()


class Stack:
    """A Redis broker, one worker, the records, and apps for the test process."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server = RedisServer(redis_binary(), workdir / "redis")
        self.worker: Worker | None = None
        self.records = Records(self.server, self.log_tail)
        self.apps: list[Any] = []

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.server.port}/0"

    def log_tail(self) -> str:
        return self.worker.log_tail() if self.worker is not None else ""

    def start_worker(self, pool: str = "gevent", **kwargs: Any) -> Worker:
        if self.worker is not None:
            self.worker.stop()
        self.worker = Worker(self.server, self.workdir / "worker.log", pool, **kwargs)
        self.records.wait_ready(self.worker)
        return self.worker

    def app(self, db: int = 0) -> Any:
        app = celery_app.make_app(f"redis://127.0.0.1:{self.server.port}/{db}")
        self.apps.append(app)
        return app

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        for app in self.apps:
            with contextlib.suppress(Exception):
                app.close()
        self.records.close()
        self.server.kill()


@contextlib.contextmanager
def stack_in(workdir: Path) -> Iterator[Stack]:
    stack = Stack(workdir)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One broker and one running worker for the tests that only need delivery."""
    with stack_in(tmp_path_factory.mktemp("celery")) as stack:
        stack.start_worker()
        yield stack


class NeverRelay(Relay):
    """The relay of a process that only enqueues."""

    def attempt(self, envelope: Envelope, attempts: int) -> Any:
        raise AssertionError("the enqueuing process relayed")


class ScriptedRelay(Relay):
    """Returns or raises *outcome* and records what it was given."""

    def __init__(self, outcome: Any = None) -> None:
        super().__init__()
        self.outcome = outcome
        self.seen: list[tuple[str | None, list[str], int]] = []

    def attempt(self, envelope: Envelope, attempts: int) -> Any:
        self.seen.append((envelope.sender, list(envelope.recipients), attempts))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class BounceRecorder:
    """A bounce queue that keeps what it is given; may refuse."""

    def __init__(self, refuse: bool = False) -> None:
        self.bounces: list[Envelope] = []
        self.refuse = refuse

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, Any]]:
        if self.refuse:
            return [(envelope, QueueError("refused"))]
        self.bounces.append(envelope)
        return [(envelope, "bounce-id")]


def published(stack: Stack, db: int) -> list[tuple[dict[str, Any], list[Any]]]:
    """The tasks waiting in Redis database *db*: ``(headers, args)``, oldest first.

    Reads kombu's Redis transport format: the queue ``celery`` is a list of
    JSON messages (newest first) whose body is base64 JSON ``[args, kwargs,
    embed]`` (Celery message protocol 2).
    """
    client = stack.server.client(db=db)
    try:
        raw = client.lrange("celery", 0, -1)
    finally:
        client.close()
    tasks = []
    for item in reversed(raw):
        msg = json.loads(item)
        args, _kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
        tasks.append((msg["headers"], args))
    return tasks


def send(smtp: Callable[..., smtplib.SMTP], port: int, sender: str, rcpts: list[str]) -> Any:
    """One message through the edge with smtplib; the DATA reply."""
    client = smtp(port)
    client.ehlo("client.test")
    assert client.mail(sender)[0] == 250
    for rcpt in rcpts:
        assert client.rcpt(rcpt)[0] == 250
    return client.data(message("test " + rcpts[0]))


# --- with a worker -----------------------------------------------------------------------


def test_message_from_smtp_edge_is_delivered_by_worker(
    shared: Stack, make_edge: Any, smtp: Any, reply_is: Any
) -> None:
    queue = celery_app.make_queue(shared.app(), NeverRelay())
    _, port, _ = make_edge(queue=queue)
    rcpt = unique("ok")

    reply = send(smtp, port, "sender@example.test", [rcpt])

    assert reply_is(reply, QUEUED), reply
    task_id = reply[1].decode().rsplit(" ", 1)[1]
    record = shared.records.for_rcpt("deliveries", rcpt)
    assert record["sender"] == "sender@example.test"
    assert record["recipients"] == [rcpt]
    assert record["attempts"] == 0
    assert f"Subject: test {rcpt}" in record["message"]
    assert "Hello." in record["message"]
    assert shared.worker is not None and record["pid"] == shared.worker.proc.pid
    # The id the client was given is the task's and the envelope's queue id.
    assert record["queue_id"] == task_id


def test_transient_failure_is_retried_after_the_countdown(shared: Stack) -> None:
    queue = celery_app.make_queue(shared.app(), NeverRelay())
    rcpt = unique("flaky")

    [(_, task_id)] = queue.enqueue(Envelope("sender@example.test", [rcpt], message=b"x"))

    assert isinstance(task_id, str)
    first = shared.records.for_rcpt("attempts", rcpt)
    second = shared.records.for_rcpt("attempts", rcpt)
    assert (first["attempts"], second["attempts"]) == (0, 1)
    assert second["time"] - first["time"] >= celery_app.RETRY_AFTER
    delivered = shared.records.for_rcpt("deliveries", rcpt)
    assert delivered["attempts"] == 1


def test_retry_carries_only_the_recipients_that_failed(shared: Stack) -> None:
    queue = celery_app.make_queue(shared.app(), NeverRelay())
    ok, flaky = unique("ok"), unique("flaky")

    queue.enqueue(Envelope("sender@example.test", [ok, flaky], message=b"x"))

    first = shared.records.for_rcpt("attempts", ok)
    assert first["recipients"] == [ok, flaky]
    retried = shared.records.for_rcpt("attempts", flaky)
    assert retried["recipients"] == [flaky]
    assert retried["attempts"] == 1
    assert shared.records.for_rcpt("deliveries", ok)["attempts"] == 0
    assert shared.records.for_rcpt("deliveries", flaky)["attempts"] == 1


def test_permanent_failure_is_bounced_through_the_queue(shared: Stack) -> None:
    queue = celery_app.make_queue(shared.app(), NeverRelay())
    sender, rcpt = unique("sender"), unique("reject")

    queue.enqueue(Envelope(sender, [rcpt], message=b"x"))

    bounce = shared.records.for_rcpt("deliveries", sender)
    assert bounce["sender"] == ""
    assert rcpt in bounce["message"]
    assert "rejected for good" in bounce["message"]
    assert "Too many retries" not in bounce["message"]


def test_giving_up_bounces_with_too_many_retries(shared: Stack) -> None:
    queue = celery_app.make_queue(shared.app(), NeverRelay())
    sender, rcpt = unique("sender"), unique("defer")

    queue.enqueue(Envelope(sender, [rcpt], message=b"x"))

    counts = [shared.records.for_rcpt("attempts", rcpt)["attempts"] for _ in range(3)]
    assert counts == [0, 1, 2]
    bounce = shared.records.for_rcpt("deliveries", sender)
    assert bounce["sender"] == ""
    assert "deferred: try again (Too many retries)" in bounce["message"]


def test_worker_killed_mid_delivery_loses_nothing(tmp_path: Path) -> None:
    # Prefork, not gevent: with the Redis broker, a worker of a green pool
    # never runs kombu's sweep that restores unacknowledged messages (celery
    # issue 4976), so only event-loop workers bring a dead worker's message
    # back (see the slimta.celeryqueue notes).
    with stack_in(tmp_path) as stack:
        first = stack.start_worker(pool="prefork")
        queue = celery_app.make_queue(stack.app(), NeverRelay())
        rcpt = unique("slow")
        queue.enqueue(Envelope("sender@example.test", [rcpt], message=b"x"))
        started = stack.records.for_rcpt("started", rcpt)

        first.kill()  # the whole worker, mid-delivery: the relay is blocked in the task
        assert stack.records.client.llen("deliveries") == 0
        stack.start_worker(pool="prefork")

        # The broker hands the unacknowledged message out again once the
        # visibility timeout has passed since the first worker took it.
        record = stack.records.for_rcpt(
            "deliveries", rcpt, timeout=WAIT + celery_app.VISIBILITY_TIMEOUT
        )
        assert record["pid"] != started["pid"]
        assert record["attempts"] == 0


def test_pool_process_lost_mid_delivery_is_requeued(tmp_path: Path) -> None:
    with stack_in(tmp_path) as stack:
        # A visibility timeout longer than the test: only the requeue on the
        # lost pool process can bring the message back in time.
        worker = stack.start_worker(pool="prefork", visibility_timeout=300)
        queue = celery_app.make_queue(stack.app(), NeverRelay())
        rcpt = unique("slow")
        queue.enqueue(Envelope("sender@example.test", [rcpt], message=b"x"))
        child = stack.records.for_rcpt("started", rcpt)["pid"]
        assert child != worker.proc.pid

        # A pool process of the worker we started, by its pid: the worker
        # sees it lost and (reject_on_worker_lost) requeues the message.
        os.kill(child, signal.SIGKILL)

        record = stack.records.for_rcpt("deliveries", rcpt)
        assert record["pid"] != child
        assert record["attempts"] == 0


# --- publishing, no worker -----------------------------------------------------------------


def test_broker_down_at_enqueue_gets_451_at_the_edge(
    tmp_path: Path, make_edge: Any, smtp: Any, reply_is: Any
) -> None:
    with stack_in(tmp_path) as stack:
        queue = celery_app.make_queue(stack.app(), NeverRelay())
        _, port, _ = make_edge(queue=queue)
        assert reply_is(send(smtp, port, "sender@example.test", [unique("ok")]), QUEUED)

        stack.server.kill()
        started = time.monotonic()
        reply = send(smtp, port, "sender@example.test", [unique("ok")])

        assert reply_is(reply, QUEUE_TEMPFAIL), reply
        assert time.monotonic() - started < 30
        [(_, outcome)] = queue.enqueue(Envelope("s@example.test", ["r@example.test"]))
        assert isinstance(outcome, QueueError)


def test_enqueue_publishes_one_late_acked_task_per_envelope(shared: Stack) -> None:
    idle = shared.server.client(db=2)
    idle.flushdb()
    queue = celery_app.make_queue(shared.app(db=2), NeverRelay())
    queue.add_policy(RecipientSplit())
    envelope = Envelope("sender@example.test", ["a@example.test", "b@example.test"], message=b"x")

    results = queue.enqueue(envelope)

    ids = [outcome for _, outcome in results]
    assert [env.recipients for env, _ in results] == [["a@example.test"], ["b@example.test"]]
    assert ids[0] == envelope.queue_id
    assert len(set(ids)) == 2
    tasks = published(shared, db=2)
    assert [headers["id"] for headers, _ in tasks] == ids
    assert {headers["task"] for headers, _ in tasks} == {"attempt_delivery_test"}
    assert [args[1] for _, args in tasks] == [0, 0]
    assert queue.attempt_task.acks_late is True
    assert queue.attempt_task.reject_on_worker_lost is True


def test_attempt_delivery_publishes_a_retry_with_the_failed_recipients(shared: Stack) -> None:
    shared.server.client(db=2).flushdb()
    results = {
        "ok@example.test": None,
        "later@example.test": TransientRelayError("later"),
        "gone@example.test": PermanentRelayError("gone"),
    }
    bounces = BounceRecorder()
    queue = celery_app.make_queue(shared.app(db=2), ScriptedRelay(results), bounce_queue=bounces)
    envelope = Envelope("sender@example.test", list(results), message=b"x")

    task_id = queue.attempt_delivery(envelope, 1)

    [(headers, args)] = published(shared, db=2)
    assert headers["id"] == task_id
    assert headers["eta"] is not None
    assert args[1] == 2
    [bounce] = bounces.bounces
    assert bounce.recipients == ["sender@example.test"]
    # The published payload is what a worker runs: it holds only the
    # recipient still to deliver.
    relay = ScriptedRelay()
    worker_queue = celery_app.make_queue(shared.app(db=3), relay)
    worker_queue.attempt_task.apply(args=args)
    assert relay.seen == [("sender@example.test", ["later@example.test"], 2)]


@pytest.mark.parametrize(
    ("sender", "notify"),
    [("", None), ("sender@example.test", ("NEVER",)), ("sender@example.test", ("DELAY",))],
    ids=["null-sender", "notify-never", "notify-without-failure"],
)
def test_no_bounce_when_none_is_wanted(
    shared: Stack, sender: str, notify: tuple[str, ...] | None
) -> None:
    bounces = BounceRecorder()
    queue = celery_app.make_queue(
        shared.app(db=2), ScriptedRelay(PermanentRelayError("gone")), bounce_queue=bounces
    )
    envelope = Envelope(sender, ["r@example.test"], message=b"x")
    if notify is not None:
        envelope.dsn_notify = {"r@example.test": notify}

    assert queue.attempt_delivery(envelope, 0) is None
    assert bounces.bounces == []


def test_unqueued_bounce_keeps_the_message(shared: Stack) -> None:
    shared.server.client(db=2).flushdb()
    queue = celery_app.make_queue(
        shared.app(db=2),
        ScriptedRelay(PermanentRelayError("gone")),
        bounce_queue=BounceRecorder(refuse=True),
    )

    task_id = queue.attempt_delivery(Envelope("s@example.test", ["r@example.test"]), 0)

    [(headers, args)] = published(shared, db=2)
    assert headers["id"] == task_id
    assert args[1] == 0


def test_payload_signed_with_another_key_is_dropped(shared: Stack) -> None:
    shared.server.client(db=2).flushdb()
    producer = celery_app.make_queue(shared.app(db=2), NeverRelay(), signing_key="other key")
    producer.enqueue(Envelope("s@example.test", ["r@example.test"], message=b"x"))
    [(_, args)] = published(shared, db=2)

    relay = ScriptedRelay()
    worker_queue = celery_app.make_queue(shared.app(db=3), relay, signing_key=b"our key")
    worker_queue.attempt_task.apply(args=args)
    assert relay.seen == []

    same_key = celery_app.make_queue(shared.app(db=4), relay, signing_key="other key")
    same_key.attempt_task.apply(args=args)
    assert relay.seen == [("s@example.test", ["r@example.test"], 0)]


def test_flush_is_not_supported(shared: Stack) -> None:
    queue = celery_app.make_queue(shared.app(db=2), NeverRelay())
    with pytest.raises(NotImplementedError):
        queue.flush()


def test_missing_celery_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "celery.exceptions", None)
    with pytest.raises(ImportError, match=r"python-slimta\[celery\]"):
        CeleryQueue(object(), NeverRelay())
