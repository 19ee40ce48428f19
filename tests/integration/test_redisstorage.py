"""RedisStorage against a real redis-server: the storage contract, claims and
leases between storages sharing one Redis, the Queue on top of it, and
Redis going away, slowing down and coming back.

The server is started on a free 127.0.0.1 port with its data in a temporary
directory (``tests/redisserver.py``); these tests are skipped when
``redis-server`` or redis-py is missing. Claims between processes are in
``test_redisstorage_processes.py``; here two storages in one process stand
for two processes (each has its own owner token).
"""

from __future__ import annotations

import pickle
import signal
import smtplib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.monkey
import pytest

# tests/ is on sys.path (pyproject: pythonpath = ["tests"]).
from redisserver import RedisServer, free_port, redis_binary, redis_py
from slimta.envelope import Envelope
from slimta.queue import Queue, QueueError, QueueStorage
from slimta.relay import Relay, TransientRelayError
from slimta.smtp.reply import Reply
from storage_contract import StorageContract, make_envelope

redis_py()  # skips the module without redis-py
from slimta.redisstorage import RedisStorage  # noqa: E402

pytestmark = pytest.mark.timeout(60)

QUEUED = ("250", "2.6.0")
QUEUE_TEMPFAIL = ("451", "4.3.0")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the module; each test empties its database."""
    srv = RedisServer(redis_binary(), tmp_path_factory.mktemp("redis"))
    yield srv
    srv.kill()


@pytest.fixture
def make_storage(server: RedisServer) -> Iterator[Callable[..., RedisStorage]]:
    """Factory of storages on an empty database; all closed at teardown."""
    if not server.running:
        server.start()  # a test before this one stopped it
    admin = server.client()
    admin.flushdb()
    admin.close()
    made: list[RedisStorage] = []

    def factory(**kwargs: Any) -> RedisStorage:
        kwargs.setdefault("port", server.port)
        kwargs.setdefault("host", "127.0.0.1")
        storage = RedisStorage(**kwargs)
        made.append(storage)
        return storage

    yield factory
    for storage in made:
        storage.close()


@pytest.fixture
def admin(server: RedisServer) -> Iterator[Any]:
    client = server.client()
    yield client
    client.close()


def claimed_by(admin: Any, id: str, prefix: str = "slimta:") -> bytes | None:
    """The owner token holding *id*, or ``None`` when it is scheduled."""
    if admin.zscore(prefix + "claimed", id) is None:
        return None
    owner: bytes | None = admin.hget(prefix + id, "owner")
    return owner


# --- the shared contract ---------------------------------------------------------


class TestRedisStorageContract(StorageContract):
    @pytest.fixture
    def storage(self, make_storage: Callable[..., RedisStorage]) -> QueueStorage:
        return make_storage()

    @pytest.fixture
    def reopen(
        self, make_storage: Callable[..., RedisStorage]
    ) -> Callable[[QueueStorage], QueueStorage]:
        def reopen(old: QueueStorage) -> QueueStorage:
            assert isinstance(old, RedisStorage)
            old.close()
            return make_storage()

        return reopen


# --- construction ---------------------------------------------------------------------


def test_ready_client(server: RedisServer, admin: Any) -> None:
    client = server.client()
    storage = RedisStorage(client=client, prefix="mine:")
    id = storage.write(make_envelope(), 100.0)
    assert admin.exists(f"mine:{id}")
    assert storage.client is client
    storage.close()
    assert client.ping()  # not ours to close
    client.close()


def test_client_that_decodes_is_refused(server: RedisServer) -> None:
    client = server.client(decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStorage(client=client)
    client.close()


def test_missing_redis_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r"python-slimta\[redis\]"):
        RedisStorage()


def test_default_timeout(make_storage: Callable[..., RedisStorage]) -> None:
    kwargs = make_storage().client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 10.0


def test_warns_without_monkey_patching(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gevent.monkey, "is_module_patched", lambda name: False)
    with pytest.warns(RuntimeWarning, match="patch_all"):
        RedisStorage(port=server.port).close()


def test_positional_parameters_of_the_extension() -> None:
    import inspect

    params = inspect.signature(RedisStorage).parameters
    positional = [
        (p.name, p.default)
        for p in params.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    assert positional == [
        ("host", "localhost"),
        ("port", 6379),
        ("db", 0),
        ("password", None),
        ("socket_timeout", None),
        ("prefix", "slimta:"),
    ]


def test_db_password_and_prefix(server: RedisServer, admin: Any) -> None:
    admin.config_set("requirepass", "pw")
    try:
        storage = RedisStorage("127.0.0.1", server.port, 3, "pw", 2.0, "q1:")
        id = storage.write(make_envelope(), 100.0)
        other = server.client(password="pw", db=3)
        assert other.exists(f"q1:{id}")
        assert other.zscore("q1:claimed", id) is not None
        storage.close()
        assert other.zscore("q1:scheduled", id) == 100.0
        other.flushdb()
        other.close()
        unauthenticated = RedisStorage(port=server.port, db=3)
        with pytest.raises(QueueError):
            unauthenticated.write(make_envelope(), 100.0)
        unauthenticated.close()
    finally:
        admin.config_set("requirepass", "")


# --- layout and atomic writes ------------------------------------------------------------


def test_written_message_is_one_hash_and_claimed(
    make_storage: Callable[..., RedisStorage], admin: Any
) -> None:
    storage = make_storage()
    id = storage.write(make_envelope(), 100.0)
    fields = admin.hgetall(f"slimta:{id}")
    assert pickle.loads(fields[b"envelope"]).sender == "sender@example.com"
    assert fields[b"timestamp"] == b"100.0"
    assert fields[b"attempts"] == b"0"
    assert fields[b"delivered_indexes"] == b"[]"
    assert claimed_by(admin, id) == storage.token.encode()
    assert admin.zcard("slimta:scheduled") == 0


def test_write_without_claim_schedules(
    make_storage: Callable[..., RedisStorage], admin: Any
) -> None:
    storage = make_storage(claim_on_write=False)
    id = storage.write(make_envelope(), 123.5)
    assert admin.zscore("slimta:scheduled", id) == 123.5
    assert claimed_by(admin, id) is None
    assert storage.get_info()["held"] == 0


def test_retried_write_is_stored_once(
    make_storage: Callable[..., RedisStorage], admin: Any
) -> None:
    # redis-py retries a call whose connection failed; if the first call was
    # executed and only its reply lost, the retry must not store a copy.
    storage = make_storage()
    keys = ["slimta:" + "a" * 32, "slimta:scheduled", "slimta:claimed"]
    args = ["a" * 32, b"data", "1.0", "nonce-1", storage.token, 30, "1", "slimta:wake"]
    assert storage._write(keys=keys, args=args) == 1
    assert storage._write(keys=keys, args=args) == 1
    assert storage._write(keys=keys, args=[*args[:3], "nonce-2", *args[4:]]) == 0
    assert admin.zcard("slimta:claimed") == 1


def test_unpicklable_envelope(make_storage: Callable[..., RedisStorage], admin: Any) -> None:
    envelope = make_envelope()
    envelope.client = {"socket": gevent.event.Event()}  # not picklable
    with pytest.raises(QueueError):
        make_storage().write(envelope, 100.0)
    assert admin.dbsize() == 0


def test_damaged_envelope_is_quarantined(
    make_storage: Callable[..., RedisStorage], admin: Any
) -> None:
    storage = make_storage()
    id = storage.write(make_envelope(), 100.0)
    admin.hset(f"slimta:{id}", "envelope", b"not a pickle")
    with pytest.raises(KeyError):
        storage.get(id)
    assert admin.exists(f"slimta:quarantine:{id}")
    assert not admin.exists(f"slimta:{id}")
    assert storage.get_info()["size"] == 0
    assert storage.load() == []


# --- claims between storages -------------------------------------------------------------


def test_held_message_is_not_read_elsewhere(
    make_storage: Callable[..., RedisStorage], admin: Any
) -> None:
    first, second = make_storage(), make_storage()
    id = first.write(make_envelope(), 100.0)
    with pytest.raises(KeyError):
        second.get(id)
    assert second.load() == []
    assert first.load() == [(100.0, id)]
    # Its reschedule by someone else changes nothing.
    second.set_timestamp(id, 50.0)
    assert claimed_by(admin, id) == first.token.encode()
    assert admin.hget(f"slimta:{id}", "timestamp") == b"100.0"


def test_rescheduled_message_is_claimed_by_one_reader(
    make_storage: Callable[..., RedisStorage], admin: Any
) -> None:
    first, second = make_storage(), make_storage()
    id = first.write(make_envelope(), 100.0)
    first.set_timestamp(id, 200.0)
    assert claimed_by(admin, id) is None
    assert sorted([first.load(), second.load()]) == [[(200.0, id)], [(200.0, id)]]
    envelope, _ = second.get(id)
    assert envelope.sender == "sender@example.com"
    assert claimed_by(admin, id) == second.token.encode()
    with pytest.raises(KeyError):
        first.get(id)


def test_wait_claims_due_messages_once(make_storage: Callable[..., RedisStorage]) -> None:
    writer = make_storage(claim_on_write=False)
    first, second = make_storage(claim_limit=6), make_storage(claim_limit=6)
    now = time.time()
    ids = {writer.write(make_envelope(), now - 1) for _ in range(10)}
    later = writer.write(make_envelope(), now + 3600)
    got_first, got_second = first.wait(), second.wait()
    assert (len(got_first), len(got_second)) == (6, 4)
    claimed = [id for _, id in got_first + got_second]
    assert sorted(claimed) == sorted(ids)
    assert later not in claimed
    assert all(ts <= now for ts, _ in got_first + got_second)


def test_wait_wakes_when_a_message_is_scheduled(
    make_storage: Callable[..., RedisStorage],
) -> None:
    waiter = make_storage(lease=60.0)
    writer = make_storage(claim_on_write=False)
    result = gevent.spawn(waiter.wait)
    gevent.sleep(0)
    # However the write and the waiter interleave, the waiter must return at
    # once: a lost wake-up would cost it the lease (60 s).
    start = time.monotonic()
    id = writer.write(make_envelope(), time.time())
    with gevent.Timeout(5):
        got = result.get()
    assert [i for _, i in got] == [id]
    assert time.monotonic() - start < 5


def test_wait_wakes_when_a_message_becomes_due(
    make_storage: Callable[..., RedisStorage],
) -> None:
    waiter = make_storage(lease=60.0)
    writer = make_storage(claim_on_write=False)
    due = time.time() + 0.3
    id = writer.write(make_envelope(), due)
    with gevent.Timeout(5):
        got = waiter.wait()
    assert time.time() >= due
    assert got == [(due, id)]


def test_wait_holds_at_most_claim_limit(make_storage: Callable[..., RedisStorage]) -> None:
    writer = make_storage(claim_on_write=False)
    waiter = make_storage(claim_limit=2)
    for _ in range(5):
        writer.write(make_envelope(), 1.0)
    first = waiter.wait()
    assert len(first) == 2
    blocked = gevent.spawn(waiter.wait)
    gevent.sleep(0)
    assert not blocked.ready()
    waiter.remove(first[0][1])  # delivered: one slot free
    with gevent.Timeout(5):
        assert len(blocked.get()) == 1
    waiter.set_timestamp(first[1][1], 1.0)  # rescheduled: free too
    with gevent.Timeout(5):
        assert len(waiter.wait()) == 1


def test_claims_are_renewed_while_held(make_storage: Callable[..., RedisStorage]) -> None:
    holder = make_storage(lease=0.3)
    other = make_storage(lease=0.3)
    id = holder.write(make_envelope(), 1.0)
    # Ten leases long, nothing may be claimed elsewhere.
    with gevent.Timeout(3, False):
        other.wait()
        pytest.fail("a renewed claim was taken")
    assert holder.get(id)[1] == 0


def test_dead_holders_claims_run_out(make_storage: Callable[..., RedisStorage]) -> None:
    # max_hold=0: the claims are never renewed, as if the process had died.
    dead = make_storage(lease=0.5, max_hold=0.0)
    other = make_storage(lease=0.5)
    id = dead.write(make_envelope(), 1.0)
    start = time.monotonic()
    with gevent.Timeout(5):
        got = other.wait()
    assert [i for _, i in got] == [id]
    assert time.monotonic() - start >= 0.3
    assert got[0][0] <= time.time()  # due at once
    assert other.load() == [(1.0, id)]
    with pytest.raises(KeyError):
        dead.get(id)


def test_claim_of_a_failed_update_runs_out(
    make_storage: Callable[..., RedisStorage], admin: Any
) -> None:
    # The queue gives a message up until its next start when recording an
    # outcome fails; the storage stops renewing it, so another process
    # delivers it once the lease runs out.
    storage = make_storage(lease=0.5)
    other = make_storage(lease=0.5)
    id = storage.write(make_envelope(), 1.0)
    admin.config_set("maxmemory", "1")  # every write refused: OOM
    try:
        with pytest.raises(QueueError):
            storage.set_timestamp(id, 2.0)
    finally:
        admin.config_set("maxmemory", "0")
    assert storage.get_info()["held"] == 0
    with gevent.Timeout(5):
        assert [i for _, i in other.wait()] == [id]


def test_close_releases_claims(make_storage: Callable[..., RedisStorage], admin: Any) -> None:
    storage = make_storage()
    id = storage.write(make_envelope(), 42.0)
    storage.close()
    assert admin.zscore("slimta:scheduled", id) == 42.0
    assert claimed_by(admin, id) is None


def test_close_ends_a_blocked_wait(make_storage: Callable[..., RedisStorage]) -> None:
    writer = make_storage(claim_on_write=False)
    waiter = make_storage(claim_limit=1)
    writer.write(make_envelope(), 1.0)
    assert len(waiter.wait()) == 1
    blocked = gevent.spawn(waiter.wait)  # at its claim limit
    gevent.sleep(0)
    waiter.close()
    with gevent.Timeout(5), pytest.raises(NotImplementedError):
        blocked.get()


def test_recipients_delivered_by_two_readers(
    make_storage: Callable[..., RedisStorage],
) -> None:
    first, second = make_storage(), make_storage()
    rcpts = ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
    id = first.write(make_envelope(rcpts), 1.0)
    first.set_recipients_delivered(id, [1])
    first.set_timestamp(id, 2.0)
    got, _ = second.get(id)
    assert got.recipients == ["a@x.test", "c@x.test", "d@x.test"]
    second.set_recipients_delivered(id, [2])  # d
    second.set_timestamp(id, 3.0)
    got, _ = first.get(id)
    assert got.recipients == ["a@x.test", "c@x.test"]


# --- the queue on top ----------------------------------------------------------------------


class Deliveries:
    """What the relays of a test delivered, in order; set :attr:`event` on each."""

    def __init__(self) -> None:
        self.senders: list[str] = []
        self.event = gevent.event.Event()

    def add(self, sender: str) -> None:
        self.senders.append(sender)
        self.event.set()

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        with gevent.Timeout(timeout, AssertionError(f"{len(self.senders)} of {count}")):
            while len(self.senders) < count:
                self.event.clear()
                self.event.wait()


class RecordingRelay(Relay):
    """Records each delivery; fails the first attempt of chosen senders."""

    def __init__(
        self, deliveries: Deliveries | None = None, fail_first: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        self.all = deliveries if deliveries is not None else Deliveries()
        self.fail_first = fail_first
        #: What this relay delivered.
        self.delivered: list[str] = []

    def attempt(self, envelope: Envelope, attempts: int) -> Reply:
        if envelope.sender in self.fail_first and attempts == 0:
            raise TransientRelayError("try later", Reply("450", "4.0.0 try later"))
        self.delivered.append(envelope.sender)
        self.all.add(envelope.sender)
        return Reply("250", "2.0.0 Ok")

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        self.all.wait_for(count, timeout)


def watch_removals(storage: RedisStorage) -> Deliveries:
    """Record each id *storage* removed, once the removal returned."""
    removed = Deliveries()
    remove = storage.remove

    def recording_remove(id: str) -> None:
        remove(id)
        removed.add(id)

    storage.remove = recording_remove  # type: ignore[method-assign]
    return removed


def message(sender: str) -> Envelope:
    envelope = Envelope(sender, ["rcpt@example.net"])
    envelope.parse(b"Subject: t\r\n\r\nbody\r\n")
    return envelope


@pytest.fixture
def queues() -> Iterator[list[Queue]]:
    running: list[Queue] = []
    yield running
    for queue in running:
        queue.kill()


def test_queue_delivers_enqueued_and_retried_messages(
    make_storage: Callable[..., RedisStorage], queues: list[Queue]
) -> None:
    storage = make_storage()
    removed = watch_removals(storage)
    relay = RecordingRelay(fail_first=frozenset({"s1@x.test"}))
    queue = Queue(storage, relay, backoff=lambda envelope, attempts: 0.2)
    queue.start()
    queues.append(queue)
    results = [queue.enqueue(message(f"s{n}@x.test")) for n in range(5)]
    assert all(isinstance(id, str) for [(_, id)] in results)
    removed.wait_for(5)
    assert sorted(relay.delivered) == sorted(f"s{n}@x.test" for n in range(5))
    assert storage.get_info() == {"size": 0, "scheduled": 0, "claimed": 0, "held": 0}


def test_two_queues_deliver_each_message_once(
    make_storage: Callable[..., RedisStorage], queues: list[Queue]
) -> None:
    writer = make_storage(claim_on_write=False)
    deliveries = Deliveries()
    fail_first = frozenset({"s3@x.test", "s7@x.test"})
    relays = [RecordingRelay(deliveries, fail_first) for _ in range(2)]
    for relay in relays:
        queue = Queue(make_storage(claim_limit=5), relay, backoff=lambda e, a: 0.05)
        queue.start()
        queues.append(queue)
        # Each queue also enqueues some of its own.
        for n in range(10):
            queue.enqueue(message(f"own{len(queues)}-{n}@x.test"))
    for n in range(100):
        writer.write(message(f"s{n}@x.test"), time.time())
    deliveries.wait_for(120)
    assert len(deliveries.senders) == len(set(deliveries.senders)) == 120
    assert relays[0].delivered and relays[1].delivered


def test_queue_picks_up_claims_of_a_dead_queue(
    make_storage: Callable[..., RedisStorage], queues: list[Queue]
) -> None:
    # The first storage holds three messages and never renews (a process
    # that died before attempting them); the queue delivers them later.
    dead = make_storage(lease=0.5, max_hold=0.0)
    for n in range(3):
        dead.write(message(f"d{n}@x.test"), time.time())
    relay = RecordingRelay()
    queue = Queue(make_storage(lease=0.5), relay)
    queue.start()
    queues.append(queue)
    relay.wait_for(3)
    assert sorted(relay.delivered) == ["d0@x.test", "d1@x.test", "d2@x.test"]


# --- Redis down, slow, back ---------------------------------------------------------------


def test_redis_down_then_back(
    make_storage: Callable[..., RedisStorage], server: RedisServer
) -> None:
    storage = make_storage(socket_timeout=2.0)
    kept = storage.write(make_envelope(), 1.0)
    server.kill()
    start = time.monotonic()
    for call in (
        lambda: storage.write(make_envelope(), 1.0),
        lambda: storage.get(kept),
        lambda: storage.load(),
        lambda: storage.get_info(),
        lambda: storage.increment_attempts(kept),
        lambda: storage.remove(kept),
    ):
        with pytest.raises(QueueError):
            call()
    assert time.monotonic() - start < 2  # refused at once, not timed out
    server.start()  # without persistence: empty
    id = storage.write(make_envelope(), 1.0)  # reconnected by itself
    assert storage.load() == [(1.0, id)]


def test_nothing_listening() -> None:
    storage = RedisStorage(port=free_port(), socket_timeout=1.0)
    with pytest.raises(QueueError):
        storage.write(make_envelope(), 1.0)
    storage.close()


def test_hung_redis_times_out(
    make_storage: Callable[..., RedisStorage], server: RedisServer
) -> None:
    storage = make_storage(socket_timeout=0.3)
    storage.write(make_envelope(), 1.0)  # connected
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)  # alive, silent
    try:
        start = time.monotonic()
        with pytest.raises(QueueError):
            storage.write(make_envelope(), 1.0)
        assert time.monotonic() - start < 1.5
    finally:
        server.proc.send_signal(signal.SIGCONT)
    storage.write(make_envelope(), 1.0)


def test_wait_survives_redis_restart(
    make_storage: Callable[..., RedisStorage],
    server: RedisServer,
    admin: Any,
    queues: list[Queue],
) -> None:
    relay = RecordingRelay()
    queue = Queue(make_storage(lease=5.0), relay)
    queue.start()
    queues.append(queue)
    # Polls Redis (another process) until the queue's wait() has subscribed.
    with gevent.Timeout(5):
        while admin.pubsub_numsub("slimta:wake")[0][1] < 1:
            gevent.sleep(0.01)
    server.restart()
    writer = make_storage(claim_on_write=False)
    writer.write(message("after@x.test"), time.time())
    relay.wait_for(1)
    assert relay.delivered == ["after@x.test"]


def test_edge_answers_451_while_redis_is_down(
    make_storage: Callable[..., RedisStorage],
    server: RedisServer,
    make_edge: Callable[..., Any],
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
    queues: list[Queue],
) -> None:
    relay = RecordingRelay()
    storage = make_storage(socket_timeout=2.0)
    queue = Queue(storage, relay)
    queue.start()
    queues.append(queue)
    _, port, _ = make_edge(queue=queue)

    def send(sender: str) -> tuple[int, bytes]:
        client = smtp(port)
        client.ehlo("client.test")
        client.mail(sender)
        client.rcpt("rcpt@example.net")
        return client.data(b"Subject: t\r\n\r\nbody\r\n")

    assert reply_is(send("before@x.test"), QUEUED)
    relay.wait_for(1)
    server.kill()
    assert reply_is(send("down@x.test"), QUEUE_TEMPFAIL)
    server.start()
    assert reply_is(send("after@x.test"), QUEUED)
    relay.wait_for(2)
    assert relay.delivered == ["before@x.test", "after@x.test"]
