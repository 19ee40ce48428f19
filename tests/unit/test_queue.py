"""Queue: enqueue, scheduling, delivery outcomes, bounces and backoff; ProxyQueue.

Time is a fake clock the tests move by hand; after moving it they call
``queue.kick()``. Waiting is on gevent queues and pool joins with timeouts,
never on sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.queue
import pytest

from slimta.envelope import Envelope
from slimta.policy import QueuePolicy, RelayPolicy
from slimta.queue import MAX_QUEUE_LIFETIME, Queue, QueueError, QueueStorage, default_backoff
from slimta.queue.dict import DictStorage
from slimta.queue.proxy import ProxyQueue
from slimta.relay import PermanentRelayError, Relay, RelayError, TransientRelayError
from slimta.smtp.reply import Reply

#: Seconds any wait in these tests may take before the test fails.
TIMEOUT = 5.0
START = 1_000_000.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRelay(Relay):
    """Answers each attempt with the next scripted outcome (default success).

    An outcome is a value to return, an exception to raise, or a callable
    ``(envelope, attempts) -> value`` (which may block or raise). Every call
    is put on :attr:`calls` as ``(recipients, attempts, sender)``.
    """

    def __init__(self, *outcomes: Any) -> None:
        super().__init__()
        self.outcomes = list(outcomes)
        self.calls: gevent.queue.Queue[tuple[list[str], int, str | None]] = gevent.queue.Queue()
        self.count = 0

    def attempt(self, envelope: Envelope, attempts: int) -> Any:
        self.count += 1
        self.calls.put((list(envelope.recipients), attempts, envelope.sender))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if callable(outcome) and not isinstance(outcome, type):
            outcome = outcome(envelope, attempts)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def next_call(self) -> tuple[list[str], int, str | None]:
        return self.calls.get(timeout=TIMEOUT)


class BounceQueue:
    """A queue-like object that records the bounces it is given."""

    def __init__(self) -> None:
        self.bounces: list[Envelope] = []

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, Any]]:
        self.bounces.append(envelope)
        return [(envelope, "bounce-id")]


class BounceRecorder:
    """A bounce factory that records ``(recipients, str(reply))``."""

    def __init__(self) -> None:
        self.made: list[tuple[list[str], str]] = []

    def __call__(self, envelope: Envelope, reply: Reply) -> Envelope:
        self.made.append((list(envelope.recipients), str(reply)))
        bounce = Envelope("", [envelope.sender or ""])
        bounce.parse(b"Subject: bounce\r\n\r\n" + str(reply).encode())
        return bounce


def make_envelope(sender: str = "sender@x.test", rcpts: Iterable[str] = ("a@x.test",)) -> Envelope:
    envelope = Envelope(sender, list(rcpts))
    envelope.parse(b"Subject: test\r\n\r\nbody\r\n")
    envelope.timestamp = START
    return envelope


class Harness:
    """A queue over DictStorage with a fake clock, relay and bounce recorder."""

    def __init__(self, relay: Relay | None, **kwargs: Any) -> None:
        self.clock = FakeClock()
        self.store: QueueStorage = kwargs.pop("store", None) or DictStorage()
        self.bounces = BounceRecorder()
        self.bounce_queue = BounceQueue()
        kwargs.setdefault("bounce_factory", self.bounces)
        kwargs.setdefault("bounce_queue", self.bounce_queue)
        self.queue = Queue(self.store, relay, clock=self.clock, **kwargs)

    def settle(self) -> None:
        """Wait until no delivery attempt is running."""
        assert self.queue.relay_pool.join(timeout=TIMEOUT), "attempts still running"

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.queue.kick()

    def size(self) -> int:
        size: int = self.store.get_info()["size"]
        return size


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for harness in made:
        harness.queue.kill(block=True, timeout=TIMEOUT)
        harness.queue.relay_pool.kill(block=True, timeout=TIMEOUT)


@pytest.fixture
def make(harnesses: list[Harness]) -> Callable[..., Harness]:
    def factory(relay: Relay | None = None, **kwargs: Any) -> Harness:
        harness = Harness(relay, **kwargs)
        harnesses.append(harness)
        return harness

    return factory


# --- enqueue ---------------------------------------------------------------------


def test_enqueue_stores_and_delivers_at_once(make: Callable[..., Harness]) -> None:
    relay = FakeRelay(Reply("250", "2.0.0 Ok"))
    h = make(relay)
    [(_, id)] = h.queue.enqueue(make_envelope())
    assert isinstance(id, str)
    assert relay.next_call() == (["a@x.test"], 0, "sender@x.test")
    h.settle()
    assert h.size() == 0
    assert h.queue.active_ids == set()
    assert h.bounces.made == []


def test_enqueue_without_relay_only_stores(make: Callable[..., Harness]) -> None:
    h = make(None)
    [(_, id)] = h.queue.enqueue(make_envelope())
    assert isinstance(id, str)
    assert h.store.load() == [(START, id)]
    assert h.queue.active_ids == set()
    h.queue.start()
    h.queue.join(timeout=TIMEOUT)
    assert h.queue.dead  # no relay: the greenlet ends at once


def test_enqueue_stamps_missing_timestamp(make: Callable[..., Harness]) -> None:
    h = make(None)
    envelope = make_envelope()
    envelope.timestamp = None
    h.queue.enqueue(envelope)
    assert envelope.timestamp == START


class SplitPolicy(QueuePolicy):
    """One envelope per recipient."""

    def apply(self, envelope: Envelope) -> list[Envelope]:
        return [envelope.copy([rcpt]) for rcpt in envelope.recipients]


class TagPolicy(QueuePolicy):
    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def apply(self, envelope: Envelope) -> None:
        self.seen.append(list(envelope.recipients))
        envelope.prepend_header("X-Tag", "yes")


class EmptyGeneratorPolicy(QueuePolicy):
    def apply(self, envelope: Envelope) -> Iterator[Envelope]:
        yield from ()


def test_policies_split_and_later_ones_run_on_each(make: Callable[..., Harness]) -> None:
    relay = FakeRelay()
    h = make(relay)
    tag = TagPolicy()
    h.queue.add_policy(SplitPolicy())
    h.queue.add_policy(EmptyGeneratorPolicy())  # empty result keeps the envelope
    h.queue.add_policy(tag)
    results = h.queue.enqueue(make_envelope(rcpts=["a@x.test", "b@x.test"]))
    assert [env.recipients for env, _ in results] == [["a@x.test"], ["b@x.test"]]
    assert tag.seen == [["a@x.test"], ["b@x.test"]]
    assert all(env.headers is not None and env.headers["X-Tag"] == "yes" for env, _ in results)
    assert len({id for _, id in results}) == 2
    assert sorted(c[0] for c in (relay.next_call(), relay.next_call())) == [
        ["a@x.test"],
        ["b@x.test"],
    ]
    h.settle()
    assert h.size() == 0


def test_add_policy_type_checked(make: Callable[..., Harness]) -> None:
    h = make()
    with pytest.raises(TypeError):
        h.queue.add_policy(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        h.queue.add_policy(RelayPolicy())  # type: ignore[arg-type]


class FailingStore(DictStorage):
    """DictStorage whose writes fail for recipients in :attr:`fail`."""

    def __init__(self, fail: dict[str, Exception]) -> None:
        super().__init__()
        self.fail = fail

    def write(self, envelope: Envelope, timestamp: float) -> str:
        error = self.fail.get(envelope.recipients[0])
        if error is not None:
            raise error
        return super().write(envelope, timestamp)


def test_store_queue_error_is_returned(make: Callable[..., Harness]) -> None:
    relay = FakeRelay()
    error = QueueError()
    h = make(relay, store=FailingStore({"a@x.test": error}))
    [(_, outcome)] = h.queue.enqueue(make_envelope())
    assert outcome is error
    h.settle()
    assert relay.count == 0


def test_store_queue_error_with_split(make: Callable[..., Harness]) -> None:
    relay = FakeRelay()
    error = QueueError()
    h = make(relay, store=FailingStore({"b@x.test": error}), store_pool=2)
    h.queue.add_policy(SplitPolicy())
    results = h.queue.enqueue(make_envelope(rcpts=["a@x.test", "b@x.test"]))
    assert isinstance(results[0][1], str)
    assert results[1][1] is error
    assert relay.next_call()[0] == ["a@x.test"]
    h.settle()


def test_store_other_error_is_raised_after_starting_the_rest(make: Callable[..., Harness]) -> None:
    relay = FakeRelay()
    h = make(relay, store=FailingStore({"a@x.test": OSError("disk full")}))
    h.queue.add_policy(SplitPolicy())
    with pytest.raises(OSError, match="disk full"):
        h.queue.enqueue(make_envelope(rcpts=["a@x.test", "b@x.test"]))
    assert relay.next_call()[0] == ["b@x.test"]
    h.settle()


# --- outcomes of an attempt ------------------------------------------------------


def test_transient_failure_retries_after_backoff(make: Callable[..., Harness]) -> None:
    relay = FakeRelay(TransientRelayError("try later"), None)
    backoffs: list[tuple[list[str], int]] = []

    def backoff(envelope: Envelope, attempts: int) -> float:
        backoffs.append((list(envelope.recipients), attempts))
        return 60.0

    h = make(relay, backoff=backoff)
    h.queue.start()
    [(_, id)] = h.queue.enqueue(make_envelope())
    relay.next_call()
    h.settle()
    assert backoffs == [(["a@x.test"], 1)]
    assert h.store.load() == [(START + 60.0, id)]
    assert h.queue.queued == [(START + 60.0, id)]
    assert h.queue.queued_ids == {id}
    h.advance(59.0)
    assert relay.calls.empty()
    h.advance(1.0)
    assert relay.next_call() == (["a@x.test"], 1, "sender@x.test")
    h.settle()
    assert h.size() == 0
    assert h.queue.queued == []
    assert h.bounces.made == []


def test_transient_failure_gives_up_and_bounces(make: Callable[..., Harness]) -> None:
    relay = FakeRelay(TransientRelayError("mailbox busy", Reply("451", "4.2.0 Busy")))
    h = make(relay, backoff=lambda envelope, attempts: None)
    h.queue.enqueue(make_envelope())
    h.settle()
    assert h.size() == 0
    assert h.bounces.made == [(["a@x.test"], "451 4.2.0 Busy (Too many retries)")]
    assert [b.recipients for b in h.bounce_queue.bounces] == [["sender@x.test"]]


def test_permanent_failure_removes_and_bounces(make: Callable[..., Harness]) -> None:
    relay = FakeRelay(PermanentRelayError("no such user"))
    h = make(relay)
    h.queue.enqueue(make_envelope(rcpts=["a@x.test", "b@x.test"]))
    h.settle()
    assert h.size() == 0
    assert h.bounces.made == [(["a@x.test", "b@x.test"], "550 5.0.0 no such user")]


def test_unhandled_error_is_logged_and_retried(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    relay = FakeRelay(ValueError("boom"), ValueError("boom"))
    attempts_seen: list[int] = []

    def backoff(envelope: Envelope, attempts: int) -> float | None:
        attempts_seen.append(attempts)
        return 10.0 if attempts < 2 else None

    h = make(relay, backoff=backoff)
    h.queue.start()
    with caplog.at_level(logging.ERROR, logger="slimta.queue"):
        [(_, id)] = h.queue.enqueue(make_envelope())
        h.settle()
        assert h.store.get(id)[1] == 1
        h.advance(10.0)
        relay.next_call()
        relay.next_call()
        h.settle()
    assert attempts_seen == [1, 2]
    assert sum("exception:ValueError:unhandled" in r.getMessage() for r in caplog.records) == 2
    assert h.size() == 0
    assert h.bounces.made == [
        (["a@x.test"], "450 4.0.0 Unhandled delivery error: boom (Too many retries)")
    ]


def test_success_reply_or_none_removes(make: Callable[..., Harness]) -> None:
    relay = FakeRelay(None, Reply("250", "2.0.0 Ok"))
    h = make(relay)
    h.queue.enqueue(make_envelope())
    h.queue.enqueue(make_envelope())
    h.settle()
    assert relay.count == 2
    assert h.size() == 0


# --- per-recipient results ---------------------------------------------------------


def test_partial_delivery_retries_only_failed_recipients(make: Callable[..., Harness]) -> None:
    rcpts = ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
    relay = FakeRelay(
        {
            "a@x.test": Reply("250", "2.1.5 Ok"),
            "b@x.test": TransientRelayError("later"),
            "c@x.test": PermanentRelayError("no such user"),
            "d@x.test": None,
        },
        {"b@x.test": None},
    )
    h = make(relay, backoff=lambda envelope, attempts: 30.0)
    h.queue.start()
    [(_, id)] = h.queue.enqueue(make_envelope(rcpts=rcpts))
    relay.next_call()
    h.settle()
    assert h.bounces.made == [(["c@x.test"], "550 5.0.0 no such user")]
    envelope, attempts = h.store.get(id)
    assert envelope.recipients == ["b@x.test"]
    assert attempts == 1
    h.advance(30.0)
    assert relay.next_call() == (["b@x.test"], 1, "sender@x.test")
    h.settle()
    assert h.size() == 0


def test_partial_delivery_twice_uses_latest_indexes(make: Callable[..., Harness]) -> None:
    rcpts = ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
    later = TransientRelayError("later")
    relay = FakeRelay(
        [later, None, later, later],  # list results, in recipient order
        {"a@x.test": None, "c@x.test": later, "d@x.test": later},
        {"c@x.test": None, "d@x.test": None},
    )
    h = make(relay, backoff=lambda envelope, attempts: 30.0)
    h.queue.start()
    [(_, id)] = h.queue.enqueue(make_envelope(rcpts=rcpts))
    relay.next_call()
    h.settle()
    assert h.store.get(id)[0].recipients == ["a@x.test", "c@x.test", "d@x.test"]
    h.advance(30.0)
    assert relay.next_call()[0] == ["a@x.test", "c@x.test", "d@x.test"]
    h.settle()
    assert h.store.get(id)[0].recipients == ["c@x.test", "d@x.test"]
    h.advance(30.0)
    assert relay.next_call()[0] == ["c@x.test", "d@x.test"]
    h.settle()
    assert h.size() == 0


def test_permanent_recipient_failures_grouped_by_reply(make: Callable[..., Harness]) -> None:
    rcpts = ["a@x.test", "b@x.test", "c@x.test"]
    relay = FakeRelay(
        {
            "a@x.test": PermanentRelayError("x", Reply("550", "5.1.1 No such user")),
            "b@x.test": PermanentRelayError("y", Reply("552", "5.2.2 Mailbox full")),
            "c@x.test": PermanentRelayError("z", Reply("550", "5.1.1 No such user")),
        }
    )
    h = make(relay)
    h.queue.enqueue(make_envelope(rcpts=rcpts))
    h.settle()
    assert h.size() == 0
    assert sorted(h.bounces.made) == [
        (["a@x.test", "c@x.test"], "550 5.1.1 No such user"),
        (["b@x.test"], "552 5.2.2 Mailbox full"),
    ]


def test_partial_give_up_bounces_remaining(make: Callable[..., Harness]) -> None:
    relay = FakeRelay({"a@x.test": None, "b@x.test": TransientRelayError("later")})
    h = make(relay, backoff=lambda envelope, attempts: None)
    h.queue.enqueue(make_envelope(rcpts=["a@x.test", "b@x.test"]))
    h.settle()
    assert h.size() == 0
    assert h.bounces.made == [(["b@x.test"], "450 4.0.0 later (Too many retries)")]


def test_recipient_missing_from_results_is_retried(make: Callable[..., Harness]) -> None:
    relay = FakeRelay({"a@x.test": None})
    h = make(relay, backoff=lambda envelope, attempts: 5.0)
    [(_, id)] = h.queue.enqueue(make_envelope(rcpts=["a@x.test", "b@x.test"]))
    h.settle()
    assert h.store.get(id)[0].recipients == ["b@x.test"]


# --- bounce rules ----------------------------------------------------------------------


def test_null_sender_is_never_bounced(make: Callable[..., Harness]) -> None:
    relay = FakeRelay(
        PermanentRelayError("no"),
        TransientRelayError("later"),
        {"a@x.test": PermanentRelayError("no")},
    )
    h = make(relay, backoff=lambda envelope, attempts: None)
    for _ in range(3):
        h.queue.enqueue(make_envelope(sender=""))
    h.settle()
    assert relay.count == 3
    assert h.size() == 0
    assert h.bounces.made == []


def test_notify_never_and_without_failure_are_honoured(make: Callable[..., Harness]) -> None:
    rcpts = ["never@x.test", "delay@x.test", "fail@x.test", "plain@x.test"]
    envelope = make_envelope(rcpts=rcpts)
    envelope.dsn_notify = {
        "never@x.test": ("NEVER",),
        "delay@x.test": ("DELAY",),
        "fail@x.test": ("FAILURE", "DELAY"),
    }
    relay = FakeRelay(PermanentRelayError("no"))
    h = make(relay)
    h.queue.enqueue(envelope)
    h.settle()
    assert h.bounces.made == [(["fail@x.test", "plain@x.test"], "550 5.0.0 no")]


def test_notify_never_for_all_means_no_bounce(make: Callable[..., Harness]) -> None:
    envelope = make_envelope()
    envelope.dsn_notify = {"a@x.test": ("NEVER",)}
    relay = FakeRelay(PermanentRelayError("no"))
    h = make(relay)
    h.queue.enqueue(envelope)
    h.settle()
    assert h.size() == 0
    assert h.bounces.made == []


def test_bounce_factory_returning_none(make: Callable[..., Harness]) -> None:
    relay = FakeRelay(PermanentRelayError("no"))
    h = make(relay, bounce_factory=lambda envelope, reply: None)
    h.queue.enqueue(make_envelope())
    h.settle()
    assert h.size() == 0
    assert h.bounce_queue.bounces == []


def test_bounces_go_to_the_queue_itself_by_default(make: Callable[..., Harness]) -> None:
    relay = FakeRelay(PermanentRelayError("no"), None)
    h = make(relay, bounce_queue=None)
    h.queue.enqueue(make_envelope())
    assert relay.next_call()[2] == "sender@x.test"
    assert relay.next_call() == (["sender@x.test"], 0, "")  # the bounce itself
    h.settle()
    assert h.size() == 0


def test_bounce_from_a_full_relay_pool_does_not_deadlock(make: Callable[..., Harness]) -> None:
    relay = FakeRelay(PermanentRelayError("no"), None)
    h = make(relay, bounce_queue=None, relay_pool=1)
    h.queue.start()
    h.queue.enqueue(make_envelope())
    assert relay.next_call()[2] == "sender@x.test"
    assert relay.next_call()[2] == ""  # the bounce, started by the scheduler
    h.settle()
    assert h.size() == 0


def test_default_bounce_factory(make: Callable[..., Harness]) -> None:
    bounce = pytest.importorskip("slimta.bounce")
    relay = FakeRelay(PermanentRelayError("no such user"))
    h = make(relay, bounce_factory=None)
    assert h.queue.bounce_factory is bounce.Bounce
    h.queue.enqueue(make_envelope())
    h.settle()
    [made] = h.bounce_queue.bounces
    assert isinstance(made, bounce.Bounce)
    assert made.sender == ""
    assert made.recipients == ["sender@x.test"]


# --- scheduler, load, wait --------------------------------------------------------------


def test_load_on_start_delivers_stored_messages(make: Callable[..., Harness]) -> None:
    store = DictStorage()
    due = store.write(make_envelope(rcpts=["due@x.test"]), START - 10)
    later = store.write(make_envelope(rcpts=["later@x.test"]), START + 100)
    store.increment_attempts(due)
    relay = FakeRelay()
    h = make(relay, store=store)
    h.queue.start()
    assert relay.next_call() == (["due@x.test"], 1, "sender@x.test")
    h.settle()
    assert h.queue.queued == [(START + 100, later)]
    h.advance(100)
    assert relay.next_call()[0] == ["later@x.test"]
    h.settle()
    assert h.size() == 0


def test_flush_makes_everything_due(make: Callable[..., Harness]) -> None:
    store = DictStorage()
    for offset in (1000, 50, 99999):
        store.write(make_envelope(), START + offset)
    relay = FakeRelay()
    h = make(relay, store=store)
    h.queue.start()
    gevent.idle()  # let the loader and scheduler run
    assert len(h.queue.queued) == 3
    assert relay.calls.empty()
    h.queue.flush()
    for _ in range(3):
        relay.next_call()
    h.settle()
    assert h.size() == 0


def test_message_removed_meanwhile_is_skipped(make: Callable[..., Harness]) -> None:
    store = DictStorage()
    store.write(make_envelope(), START + 5)
    relay = FakeRelay()
    h = make(relay, store=store)
    h.queue.start()
    gevent.idle()
    [(_, id)] = h.queue.queued
    store.remove(id)
    h.advance(5)
    gevent.idle()
    h.settle()
    assert relay.count == 0
    assert h.queue.active_ids == set()


class WaitingStore(DictStorage):
    """DictStorage whose ``wait()`` yields what the test puts on :attr:`news`."""

    def __init__(self) -> None:
        super().__init__()
        self.news: gevent.queue.Queue[tuple[float, str]] = gevent.queue.Queue()

    def wait(self) -> Iterator[tuple[float, str]]:
        yield self.news.get()


def test_wait_listener_adds_messages(make: Callable[..., Harness]) -> None:
    store = WaitingStore()
    relay = FakeRelay()
    h = make(relay, store=store)
    h.queue.start()
    gevent.idle()
    id = store.write(make_envelope(rcpts=["other@x.test"]), START)  # "another process"
    store.news.put((START, id))
    assert relay.next_call()[0] == ["other@x.test"]
    h.settle()
    assert h.size() == 0


def test_no_double_relay_when_load_sees_message_in_flight(make: Callable[..., Harness]) -> None:
    release = gevent.event.Event()
    store = WaitingStore()
    relay = FakeRelay(lambda envelope, attempts: release.wait(TIMEOUT) and None)
    h = make(relay, store=store)
    [(_, id)] = h.queue.enqueue(make_envelope())  # attempt 0 blocks in the relay
    relay.next_call()
    h.queue.start()  # load() now lists the message being delivered
    store.news.put((START, id))  # and so does wait()
    gevent.idle()
    assert h.queue.queued == []
    release.set()
    h.settle()
    h.queue.flush()
    gevent.idle()
    h.settle()
    assert relay.count == 1
    assert h.size() == 0


class SlowWriteStore(DictStorage):
    """Its write yields after storing, so a load can see the new id first."""

    def __init__(self) -> None:
        super().__init__()
        self.written = gevent.event.Event()
        self.release = gevent.event.Event()

    def write(self, envelope: Envelope, timestamp: float) -> str:
        id = super().write(envelope, timestamp)
        self.written.set()
        self.release.wait(TIMEOUT)
        return id

    def load(self) -> list[tuple[float, str]]:
        self.written.wait(TIMEOUT)
        return super().load()


def test_no_double_relay_when_load_wins_the_race(make: Callable[..., Harness]) -> None:
    # 4.0's race: load queued the id while enqueue was still writing, then
    # enqueue started its own attempt, and the message went out twice.
    store = SlowWriteStore()
    relay = FakeRelay()
    h = make(relay, store=store)
    h.queue.start()
    writer = gevent.spawn(h.queue.enqueue, make_envelope())
    assert store.written.wait(TIMEOUT)
    gevent.idle()
    # The loader queued the new id and the scheduler claimed it, but holds
    # the delivery until the write in flight has returned.
    [claimed] = h.queue.active_ids
    assert h.queue.queued == []
    assert relay.calls.empty()
    store.release.set()
    [(_, id)] = writer.get(timeout=TIMEOUT)
    assert id == claimed
    assert relay.next_call()[1] == 0
    h.settle()
    assert relay.count == 1
    assert h.size() == 0
    assert id not in h.queue.active_ids


def test_relay_pool_bounds_concurrent_attempts(make: Callable[..., Harness]) -> None:
    release = gevent.event.Event()
    running: list[int] = []
    peak: list[int] = [0]

    def slow(envelope: Envelope, attempts: int) -> None:
        running.append(1)
        peak[0] = max(peak[0], len(running))
        release.wait(TIMEOUT)
        running.pop()

    relay = FakeRelay(slow, slow, slow)
    h = make(relay, relay_pool=2)
    enqueuer = gevent.spawn(lambda: [h.queue.enqueue(make_envelope()) for _ in range(3)])
    relay.next_call()
    relay.next_call()
    gevent.idle()
    assert relay.count == 2
    release.set()
    enqueuer.join(timeout=TIMEOUT)
    relay.next_call()
    h.settle()
    assert peak[0] == 2
    assert h.size() == 0


def test_storage_failure_while_recording_outcome_is_logged(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenRemove(DictStorage):
        def remove(self, id: str) -> None:
            raise QueueError("cannot remove")

    relay = FakeRelay()
    h = make(relay, store=BrokenRemove(), store_pool=1)
    with caplog.at_level(logging.ERROR, logger="slimta.queue"):
        h.queue.enqueue(make_envelope())
        h.settle()
    assert any("exception:QueueError:unhandled" in r.getMessage() for r in caplog.records)
    assert h.queue.active_ids == set()


# --- default backoff -----------------------------------------------------------------------


def _aged(seconds: float) -> Envelope:
    envelope = make_envelope()
    envelope.timestamp = START - seconds
    return envelope


def test_default_backoff_postfix_schedule() -> None:
    clock = FakeClock()
    assert default_backoff(_aged(0), 1, clock=clock) == 300.0
    assert default_backoff(_aged(299), 2, clock=clock) == 300.0
    assert default_backoff(_aged(1200), 3, clock=clock) == 1200.0
    assert default_backoff(_aged(3999), 4, clock=clock) == 3999.0
    assert default_backoff(_aged(4000), 5, clock=clock) == 4000.0
    assert default_backoff(_aged(86400), 30, clock=clock) == 4000.0
    assert default_backoff(_aged(MAX_QUEUE_LIFETIME), 100, clock=clock) == 4000.0
    assert default_backoff(_aged(MAX_QUEUE_LIFETIME + 1), 100, clock=clock) is None
    assert MAX_QUEUE_LIFETIME == 5 * 86400


def test_default_backoff_without_timestamp_counts_attempts() -> None:
    envelope = make_envelope()
    envelope.timestamp = None
    waits = [default_backoff(envelope, attempts) for attempts in range(1, 8)]
    assert waits == [300.0, 300.0, 600.0, 1200.0, 2400.0, 4000.0, 4000.0]
    assert default_backoff(envelope, 120) is None


def test_queue_default_backoff_uses_queue_clock(make: Callable[..., Harness]) -> None:
    relay = FakeRelay(TransientRelayError("later"))
    h = make(relay)
    [(_, id)] = h.queue.enqueue(_aged(600))
    h.settle()
    assert h.store.load() == [(START + 600, id)]


def test_queue_default_backoff_gives_up_after_five_days(make: Callable[..., Harness]) -> None:
    relay = FakeRelay(TransientRelayError("later"))
    h = make(relay)
    h.queue.enqueue(_aged(MAX_QUEUE_LIFETIME + 60))
    h.settle()
    assert h.size() == 0
    assert h.bounces.made == [(["a@x.test"], "450 4.0.0 later (Too many retries)")]


# --- ProxyQueue ---------------------------------------------------------------------------


def test_proxy_queue_success() -> None:
    relay = FakeRelay(Reply("250", "2.0.0 Ok"))
    envelope = make_envelope()
    [(env, id)] = ProxyQueue(relay).enqueue(envelope)
    assert env is envelope
    assert isinstance(id, str) and len(id) == 32
    assert relay.next_call()[1] == 0


def test_proxy_queue_relay_error_returned() -> None:
    error = TransientRelayError("later", Reply("421", "4.4.2 Try later"))
    [(_, outcome)] = ProxyQueue(FakeRelay(error)).enqueue(make_envelope())
    assert outcome is error


def test_proxy_queue_runs_relay_policies() -> None:
    class Deny(RelayPolicy):
        def apply(self, envelope: Envelope) -> None:
            raise PermanentRelayError("denied")

    relay = FakeRelay()
    relay.add_policy(Deny())
    [(_, outcome)] = ProxyQueue(relay).enqueue(make_envelope())
    assert isinstance(outcome, PermanentRelayError)
    assert relay.count == 0


def test_proxy_queue_per_recipient_results() -> None:
    later = TransientRelayError("later")
    never = PermanentRelayError("never")
    rcpts = ["a@x.test", "b@x.test"]
    relay = FakeRelay({"a@x.test": never, "b@x.test": later}, {"a@x.test": None, "b@x.test": never})
    queue = ProxyQueue(relay)
    assert queue.enqueue(make_envelope(rcpts=rcpts))[0][1] is later
    assert isinstance(queue.enqueue(make_envelope(rcpts=rcpts))[0][1], str)


def test_proxy_queue_no_ops() -> None:
    queue = ProxyQueue(FakeRelay())
    queue.start()
    queue.flush()
    queue.kill()
    with pytest.raises(NotImplementedError):
        queue.add_policy(QueuePolicy())


def test_proxy_queue_other_exceptions_propagate() -> None:
    with pytest.raises(ValueError):
        ProxyQueue(FakeRelay(ValueError("bug"))).enqueue(make_envelope())
    assert issubclass(PermanentRelayError, RelayError)


# --- public names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("slimta.queue", {"Queue", "QueueStorage", "QueueError", "default_backoff"}),
        ("slimta.queue.dict", {"DictStorage"}),
        ("slimta.queue.proxy", {"ProxyQueue"}),
    ],
)
def test_public_names(module: str, names: set[str]) -> None:
    imported = __import__(module, fromlist=["__all__"])
    assert set(imported.__all__) == names
    for name in names:
        assert hasattr(imported, name)


# --- bounces that cannot be queued keep their message ------------------------


class BrokenBounceQueue:
    """A bounce queue that fails (raising, or returning an error) until fixed."""

    def __init__(self, raising: bool) -> None:
        self.raising = raising
        self.broken = True
        self.bounces: list[Envelope] = []

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, Any]]:
        if self.broken:
            if self.raising:
                raise OSError("bounce storage is full")
            return [(envelope, QueueError("bounce storage is full"))]
        self.bounces.append(envelope)
        return [(envelope, "bounce-id")]


@pytest.mark.parametrize("raising", [True, False])
def test_permanent_failure_kept_until_its_bounce_is_queued(
    make: Callable[..., Harness], raising: bool
) -> None:
    bounce_queue = BrokenBounceQueue(raising)
    relay = FakeRelay(PermanentRelayError("no such user"), PermanentRelayError("no such user"))
    h = make(relay, bounce_queue=bounce_queue)
    h.queue.start()
    [(_, id)] = h.queue.enqueue(make_envelope())
    relay.next_call()
    h.settle()
    assert h.store.load() == [(START + 300.0, id)]
    assert bounce_queue.bounces == []
    bounce_queue.broken = False
    h.advance(300.0)
    relay.next_call()
    h.settle()
    assert h.size() == 0
    assert [b.recipients for b in bounce_queue.bounces] == [["sender@x.test"]]


def test_recipient_failure_kept_until_its_bounce_is_queued(make: Callable[..., Harness]) -> None:
    bounce_queue = BrokenBounceQueue(raising=False)
    relay = FakeRelay(
        {"a@x.test": None, "b@x.test": PermanentRelayError("no such user")},
        {"b@x.test": PermanentRelayError("no such user")},
    )
    h = make(relay, bounce_queue=bounce_queue, backoff=lambda envelope, attempts: 60.0)
    h.queue.start()
    h.queue.enqueue(make_envelope(rcpts=["a@x.test", "b@x.test"]))
    relay.next_call()
    h.settle()
    assert h.size() == 1
    bounce_queue.broken = False
    h.advance(60.0)
    # Only the recipient whose bounce is owed is tried again.
    assert relay.next_call() == (["b@x.test"], 1, "sender@x.test")
    h.settle()
    assert h.size() == 0
    assert len(bounce_queue.bounces) == 1


def test_give_up_kept_until_its_bounce_is_queued(make: Callable[..., Harness]) -> None:
    bounce_queue = BrokenBounceQueue(raising=True)
    relay = FakeRelay(TransientRelayError("later"), TransientRelayError("later"))
    h = make(relay, bounce_queue=bounce_queue, backoff=lambda envelope, attempts: None)
    h.queue.start()
    [(_, id)] = h.queue.enqueue(make_envelope())
    relay.next_call()
    h.settle()
    assert h.store.load() == [(START + 300.0, id)]
    bounce_queue.broken = False
    h.advance(300.0)
    relay.next_call()
    h.settle()
    assert h.size() == 0
    assert len(bounce_queue.bounces) == 1


# --- failed attempts are logged for the operator -------------------------------


def test_failures_are_logged_with_their_reply(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    relay = FakeRelay(
        TransientRelayError("x", Reply("451", "4.4.1 Connection refused")),
        {"a@x.test": PermanentRelayError("y", Reply("550", "5.1.1 No such user"))},
    )
    h = make(relay, backoff=lambda envelope, attempts: 60.0)
    h.queue.start()
    with caplog.at_level(logging.WARNING, logger="slimta.maillog.queue"):
        [(_, id)] = h.queue.enqueue(make_envelope())
        relay.next_call()
        h.settle()
        h.advance(60.0)
        relay.next_call()
        h.settle()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("slimta.")]
    assert lines == [
        f"id={id} to=<a@x.test> relay=none delay=0.00 attempt=1 retry=60 "
        "status=deferred (451 4.4.1 Connection refused)",
        f"id={id} to=<a@x.test> relay=none delay=60.00 attempt=2 "
        "status=bounced (550 5.1.1 No such user)",
    ]
