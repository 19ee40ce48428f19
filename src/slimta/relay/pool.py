"""A relay that hands messages to a pool of client greenlets.

:class:`RelayPool` keeps a :class:`~slimta.util.deque.BlockingDeque` of
``(AsyncResult, envelope)`` requests; each :class:`RelayPoolClient` greenlet
takes requests from it (usually delivering several over one connection) and
sets each result. :meth:`RelayPool.attempt` blocks until its result is set.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeAlias

import gevent
from gevent.event import AsyncResult

from slimta.relay import AttemptResult, Relay
from slimta.util.deque import BlockingDeque

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["RelayPool", "RelayPoolClient"]

#: One delivery request: where to put the outcome, and the message.
Request: TypeAlias = "tuple[AsyncResult, Envelope]"


class RelayPoolClient(gevent.Greenlet):  # type: ignore[misc]
    """A greenlet delivering requests taken from its pool's queue.

    Subclasses implement ``_run()``, calling :meth:`poll` for each request.

    :param queue: the pool's request queue.
    :param idle_timeout: seconds :meth:`poll` waits for a request before
        giving up; ``None`` waits for ever.
    """

    def __init__(self, queue: BlockingDeque[Any], idle_timeout: float | None = None) -> None:
        super().__init__()
        self.queue = queue
        self.idle_timeout = idle_timeout
        #: True while waiting in :meth:`poll`.
        self.idle = False
        #: Seconds the last :meth:`poll` waited for its request (0.0 when
        #: one was waiting already).
        self.waited = 0.0
        self._idle_timer: gevent.Timeout | None = None

    def poll(self) -> tuple[AsyncResult | None, Envelope | None]:
        """The next request, or ``(None, None)`` after :attr:`idle_timeout`."""
        queue = self.queue
        if queue:
            # Taken at once: no timer to arm, and the client was never idle.
            self.waited = 0.0
            result, envelope = queue.popleft()
            return result, envelope
        began = time.monotonic()
        timeout = self._idle_timer
        if timeout is None or timeout.seconds != self.idle_timeout:
            if timeout is not None:
                timeout.close()
            # One timer per client, restarted by every poll that waits.
            timeout = self._idle_timer = gevent.Timeout(self.idle_timeout)
        timeout.__traceback__ = None
        self.idle = True
        timeout.start()
        try:
            result, envelope = queue.popleft()
        except gevent.Timeout as exc:
            if exc is not timeout:
                raise
            return None, None
        finally:
            timeout.cancel()
            self.idle = False
            self.waited = time.monotonic() - began
        return result, envelope

    def _run(self) -> None:
        raise NotImplementedError()


class RelayPool(Relay):
    """Base class of relays that deliver through pooled client greenlets.

    :param pool_size: most clients at once; ``None`` is unbounded.
    """

    def __init__(self, pool_size: int | None = None) -> None:
        super().__init__()
        self.pool_size = pool_size
        #: The clients alive.
        self.pool: set[RelayPoolClient] = set()
        #: Requests waiting for a client.
        self.queue: BlockingDeque[Any] = BlockingDeque()

    def add_client(self) -> RelayPoolClient:
        """A new, unstarted client on :attr:`queue`; subclasses implement it."""
        raise NotImplementedError()

    def _idle_clients(self) -> int:
        return sum(1 for client in self.pool if client.idle)

    def _start_clients(self) -> None:
        # One client per waiting request that no idle client will take. A new
        # client counts as idle from the start: it polls before anything else.
        # The size test comes first: a full pool (the usual case under load)
        # needs no count of its idle clients.
        while (self.pool_size is None or len(self.pool) < self.pool_size) and len(
            self.queue
        ) > self._idle_clients():
            client = self.add_client()
            client.idle = True
            client.link(self._client_ended)
            self.pool.add(client)
            client.start()

    def _client_ended(self, client: RelayPoolClient) -> None:
        self.pool.discard(client)
        # A client may end with requests left (e.g. it re-queued one when
        # its connection went stale): make sure someone takes them.
        if self.queue:
            self._start_clients()

    def attempt(self, envelope: Envelope, attempts: int) -> AttemptResult:
        """Queue *envelope* for a client and wait for the outcome.

        :raises RelayError: as the client that delivered it reports.
        """
        result = AsyncResult()
        self.queue.append((result, envelope))
        self._start_clients()
        outcome: AttemptResult = result.get()
        return outcome

    def kill(self) -> None:
        """Kill every client."""
        for client in list(self.pool):
            client.kill()
