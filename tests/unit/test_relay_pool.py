"""RelayPool and RelayPoolClient with a client that delivers in memory."""

from __future__ import annotations

from typing import Any

import gevent
import gevent.event
import pytest

from slimta.envelope import Envelope
from slimta.relay.pool import RelayPool, RelayPoolClient
from slimta.smtp.reply import Reply

pytestmark = pytest.mark.timeout(10)


class EchoClient(RelayPoolClient):
    """Answers every request with a reply naming this client."""

    def __init__(self, queue: Any, idle_timeout: float | None, log: list[Any]) -> None:
        super().__init__(queue, idle_timeout)
        self.log = log
        self.hold: gevent.event.Event | None = None

    def _run(self) -> None:
        while True:
            result, _ = self.poll()
            if result is None:
                self.log.append(("idle-end", self))
                return
            self.log.append(("took", self, self.waited))
            if self.hold is not None:
                self.hold.wait()
            result.set(Reply("250", f"2.0.0 by {id(self)}"))


class EchoPool(RelayPool):
    def __init__(self, pool_size: int | None, idle_timeout: float | None = 5.0) -> None:
        super().__init__(pool_size)
        self.idle_timeout = idle_timeout
        self.log: list[Any] = []
        self.made: list[EchoClient] = []

    def add_client(self) -> RelayPoolClient:
        client = EchoClient(self.queue, self.idle_timeout, self.log)
        self.made.append(client)
        return client


def message() -> Envelope:
    return Envelope("a@example.com", ["b@example.com"])


def test_attempt_returns_the_clients_outcome() -> None:
    pool = EchoPool(pool_size=2)
    try:
        reply = pool.attempt(message(), 0)
        assert isinstance(reply, Reply) and reply.code == "250"
        assert len(pool.made) == 1
    finally:
        pool.kill()


def test_an_idle_client_is_reused() -> None:
    pool = EchoPool(pool_size=5)
    try:
        first = pool.attempt(message(), 0)
        second = pool.attempt(message(), 0)
        assert first.message == second.message  # the same client
        assert len(pool.made) == 1
    finally:
        pool.kill()


def test_waited_is_zero_for_a_request_already_queued() -> None:
    pool = EchoPool(pool_size=1)
    try:
        # After its first delivery the client goes on to poll() and waits
        # there before this greenlet runs again.
        pool.attempt(message(), 0)
        pool.attempt(message(), 0)
        took = [entry for entry in pool.log if entry[0] == "took"]
        # The first request was queued before the client started polling.
        assert took[0][2] == 0.0
        assert took[1][2] > 0.0
    finally:
        pool.kill()


def test_pool_size_bounds_the_clients() -> None:
    pool = EchoPool(pool_size=2)
    hold = gevent.event.Event()
    try:
        pool.add_client = _holding(pool, hold)  # type: ignore[method-assign]
        waiting = [gevent.spawn(pool.attempt, message(), 0) for _ in range(5)]
        gevent.idle()
        assert len(pool.pool) == 2
        hold.set()
        gevent.joinall(waiting, timeout=5, raise_error=True)
        assert all(g.value.code == "250" for g in waiting)
        assert len(pool.made) == 2
    finally:
        pool.kill()


def test_idle_timeout_ends_the_client() -> None:
    pool = EchoPool(pool_size=1, idle_timeout=0.05)
    try:
        pool.attempt(message(), 0)
        client = pool.made[0]
        client.join(timeout=5)
        assert client.dead and ("idle-end", client) in pool.log
        assert not pool.pool
        # The next request starts a new client.
        pool.attempt(message(), 0)
        assert len(pool.made) == 2
    finally:
        pool.kill()


def _holding(pool: EchoPool, hold: gevent.event.Event) -> Any:
    def add_client() -> RelayPoolClient:
        client = EchoClient(pool.queue, pool.idle_timeout, pool.log)
        client.hold = hold
        pool.made.append(client)
        return client

    return add_client
