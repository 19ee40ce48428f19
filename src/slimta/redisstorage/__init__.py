"""Queue storage in Redis, shared by any number of MTA processes: :class:`RedisStorage`.

Needs redis-py (``pip install 'python-slimta[redis]'``) and Redis 5 or later.
Redis Cluster is not supported: the scripts touch keys of many hash slots.

Keys
----

With the default *prefix* ``slimta:``:

* ``slimta:<id>`` -- a hash per message: ``envelope`` (the pickled
  :class:`~slimta.envelope.Envelope`), ``timestamp`` (next attempt, epoch
  seconds), ``attempts``, ``delivered_indexes`` (JSON list of positions in
  the recipient list as written), ``owner`` (the storage holding the message,
  while it is claimed) and ``nonce`` (recognises a retried write);
* ``slimta:scheduled`` -- sorted set of the messages nobody holds, scored by
  their next attempt time;
* ``slimta:claimed`` -- sorted set of the messages some storage holds,
  scored by the end of its lease (on the Redis server's clock);
* ``slimta:wake`` -- a pub/sub channel told whenever a message is scheduled,
  so that waiting processes look again;
* ``slimta:quarantine:<id>`` -- a message whose envelope does not unpickle,
  moved out of the queue by :meth:`RedisStorage.get` for an operator.

Every change is one Lua script (see :mod:`slimta.redisstorage._scripts`) or
one ``MULTI``/``EXEC`` transaction, so a message, its metadata and its place
in the sorted sets always change together.

Claims and leases
-----------------

A process delivers only the messages it *claimed*: a claim moves the id from
``scheduled`` to ``claimed`` with this storage's random owner token and a
lease of *lease* seconds, atomically, so two processes sharing one Redis
never deliver the same message at once. How :class:`~slimta.queue.Queue`
meets the claims, through the :class:`~slimta.queue.QueueStorage` interface
alone:

* :meth:`RedisStorage.write` stores a new message already claimed by the
  writer (*claim_on_write*), because the queue attempts a message it has
  just stored at once, without reading it back;
* :meth:`RedisStorage.get` claims the message it reads, or raises
  :class:`KeyError` when another process holds it (the queue then leaves
  the message to that process);
* :meth:`RedisStorage.wait` claims due messages -- and those whose lease ran
  out -- and hands them to the queue; it blocks on the wake-up channel until
  the next message is due or the next lease may run out;
* :meth:`RedisStorage.set_timestamp` schedules the message again and
  releases the claim, :meth:`RedisStorage.remove` deletes it;
* :meth:`RedisStorage.load`, at the queue's start, lists the scheduled
  messages, those this storage holds, and those whose lease ran out. When
  several processes start together, each queue schedules them all and the
  first :meth:`~RedisStorage.get` of each wins it; bound the queue's
  *relay_pool* so that one process does not claim them all.

While the storage holds claims, a greenlet renews their leases every third
of *lease*, so an attempt may take as long as it needs. The claims of a
process that dies are not renewed: when their leases run out, any process's
:meth:`~RedisStorage.wait` claims them and delivers them again. Delivery is
therefore at least once: a process killed after handing a message to the
next hop but before removing it causes one duplicate, never a loss.

A claim is no longer renewed, so that the message is delivered again later,
when an update of the message failed (the queue has then given up on it
until its next start), or when the message was not used for *max_hold*
seconds (a queue that stopped, or forgot a message, must not hold it for
ever).

Failures
--------

Every method raises :class:`~slimta.queue.QueueError` when Redis fails (down,
too slow, out of memory ...), so the edge answers ``451 4.3.0`` and nothing
that was not stored is acknowledged. redis-py reconnects on the next call;
a failed call is retried once at once on a fresh connection (after a restart
of Redis, the pooled ones are dead). :meth:`RedisStorage.wait` never raises
for a Redis failure: it logs it and tries again, backing off up to a few
seconds.

Durability
----------

A message is acknowledged once Redis has it. For no loss of acknowledged
mail when Redis or its machine crashes, run Redis with ``appendonly yes``
and ``appendfsync always``: it then writes and fsyncs its append-only file
before it answers a write. With ``everysec`` (the default once the
append-only file is on) a crash of the machine, though not of the Redis
process alone, may lose the last second of acknowledged mail; without the
append-only file (RDB snapshots only, Redis's default) a crash loses
everything since the last snapshot. Replicas do not replace this: their
copy is asynchronous.

The envelopes are pickled: whoever can write to the Redis database can run
code in the MTA, so keep it private to the MTA, as its spool directory would
be.

Recipient indexes follow :class:`~slimta.queue.QueueStorage`: positions in
the envelope of this storage's latest :meth:`~RedisStorage.get` (or
:meth:`~RedisStorage.write`); the storage translates them to positions in
the recipient list as written and :meth:`~RedisStorage.get` leaves those
recipients out.

The storage needs cooperative sockets: call ``gevent.monkey.patch_all()``
before importing redis-py (the ``slimta`` command does), or every Redis call
blocks the whole process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import gevent
import gevent.monkey
from gevent.event import Event

from slimta import logging as slogging
from slimta.envelope import Envelope
from slimta.logging import getQueueStorageLogger, logline
from slimta.queue import QueueError, QueueStorage
from slimta.redisstorage import _scripts
from slimta.util.ids import preferred_id, uuid4_hex

if TYPE_CHECKING:
    import redis as redis_py
    from redis.client import PubSub

__all__ = ["RedisStorage"]

_log = logging.getLogger(__name__)
_queue_log = getQueueStorageLogger(__name__)

#: Seconds each Redis call may take when *socket_timeout* is ``None``.
DEFAULT_TIMEOUT = 10.0
#: Longest pause, in seconds, between two tries of :meth:`RedisStorage.wait`
#: while Redis fails.
_WAIT_RETRY_MAX = 5.0
#: First pause, in seconds, after :meth:`RedisStorage.wait` saw Redis fail.
_WAIT_RETRY_MIN = 0.1
#: Shortest block of :meth:`RedisStorage.wait`, in seconds, so that a clock
#: disagreement cannot make it spin.
_MIN_BLOCK = 0.01
#: Ids per Redis call when renewing or releasing many claims, and messages
#: per page when :meth:`RedisStorage.load` lists them.
_BATCH = 1000


@dataclass(slots=True)
class _Claim:
    """A message this storage holds."""

    #: ``time.monotonic()`` of the latest use; renewal stops *max_hold* later.
    touched: float
    #: Original indexes delivered as of this storage's latest read (or write);
    #: ``None`` when unknown (claimed by :meth:`RedisStorage.wait`).
    view: list[int] | None
    #: Claimed by :meth:`RedisStorage.wait`, so counted against *claim_limit*.
    from_wait: bool


class RedisStorage(QueueStorage):
    """A :class:`~slimta.queue.QueueStorage` in Redis, safe to share between processes.

    See the module documentation for the keys, the claims and leases, failures
    and durability.

    :param host: the Redis server's host name.
    :param port: its port.
    :param db: the database number.
    :param password: the password to authenticate with, if any.
    :param socket_timeout: seconds each connect and each Redis call may take
        before it fails with :class:`~slimta.queue.QueueError`; ``None`` means
        10 seconds.
    :param prefix: prepended to every key, so that several queues can share
        one database.
    :param client: a ready ``redis.Redis`` client to use instead of building
        one from the parameters above (which are then ignored). It must not
        decode responses (``decode_responses=False``, the default).
    :param lease: seconds a claim lasts without renewal: how long the messages
        of a process that died wait before another one delivers them.
    :param claim_limit: the most messages :meth:`wait` holds for the queue at
        a time; it claims more as those are delivered or rescheduled. Keep it
        near the queue's *relay_pool* size, so that messages one process
        cannot attempt yet stay free for the others.
    :param claim_on_write: hold each message :meth:`write` stores, for the
        queue that attempts it at once. Pass ``False`` in a process whose
        queue has no relay (it stores for others to deliver): its messages
        are then scheduled for any process to claim.
    :param max_hold: seconds after its last use that a claim stops being
        renewed (see the module documentation).
    :param max_connections: the most connections to Redis at a time; a call
        that finds them all busy waits for one, up to *socket_timeout*.
        Ignored with *client*.
    :param clock: returns the current time in epoch seconds, the clock the
        queue's timestamps are on (give the queue's *clock*).
    :raises ImportError: redis-py is not installed.
    :raises ValueError: *client* decodes responses, or *lease* is not
        positive.

    .. versionchanged:: 4.0
       New layout (hash per message, two sorted sets) with claims and
       leases, so processes sharing Redis no longer deliver a message twice;
       *socket_timeout* ``None`` means 10 seconds rather than no limit; the
       keyword-only parameters are new.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        password: str | None = None,
        socket_timeout: float | None = None,
        prefix: str = "slimta:",
        *,
        client: redis_py.Redis | None = None,
        lease: float = 30.0,
        claim_limit: int = 100,
        claim_on_write: bool = True,
        max_hold: float = 3600.0,
        max_connections: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            import redis as redis_py
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise ImportError(
                "RedisStorage needs redis-py: pip install 'python-slimta[redis]'"
            ) from exc
        if lease <= 0:
            raise ValueError(f"lease must be positive, not {lease!r}")
        if not gevent.monkey.is_module_patched("socket"):
            warnings.warn(
                "RedisStorage without gevent.monkey.patch_all(): every Redis call "
                "blocks the whole process",
                RuntimeWarning,
                stacklevel=2,
            )
        self._errors: tuple[type[Exception], ...] = (redis_py.RedisError,)
        self._pool: redis_py.ConnectionPool | None = None
        if client is None:
            timeout = DEFAULT_TIMEOUT if socket_timeout is None else socket_timeout
            # Blocking: a greenlet that finds every connection busy waits
            # for one (up to the timeout) instead of failing at once.
            self._pool = redis_py.BlockingConnectionPool(  # type: ignore[no-untyped-call]
                max_connections=max_connections,
                timeout=timeout,
                host=host,
                port=port,
                db=db,
                password=password,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                # Once, at once, and only when the connection failed (a pooled
                # connection that a restart of Redis closed); a timeout is not
                # retried, so a slow server costs one timeout, not several.
                retry=Retry(NoBackoff(), 1, supported_errors=(redis_py.ConnectionError,)),
            )
            client = redis_py.Redis(connection_pool=self._pool)
        elif client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisStorage needs a client with decode_responses=False")
        #: The redis-py client.
        self.client: redis_py.Redis = client
        #: The key prefix.
        self.prefix = prefix
        #: Seconds a claim lasts without renewal.
        self.lease = float(lease)
        #: The most messages :meth:`wait` holds at a time.
        self.claim_limit = claim_limit
        #: Whether :meth:`write` holds the messages it stores.
        self.claim_on_write = claim_on_write
        #: Seconds after its last use that a claim stops being renewed.
        self.max_hold = float(max_hold)
        self._clock = clock
        #: This storage's owner token in the claims (random, new per instance).
        self.token = uuid4_hex()
        self._scheduled = prefix + "scheduled"
        self._claimed = prefix + "claimed"
        self._channel = prefix + "wake"
        register = client.register_script
        self._write = register(_scripts.WRITE)
        self._claim = register(_scripts.CLAIM)
        self._get = register(_scripts.GET)
        self._set_timestamp = register(_scripts.SET_TIMESTAMP)
        self._increment = register(_scripts.INCREMENT)
        self._delivered = register(_scripts.DELIVERED)
        self._remove = register(_scripts.REMOVE)
        self._renew = register(_scripts.RENEW)
        self._release = register(_scripts.RELEASE)
        self._held: dict[str, _Claim] = {}
        self._wait_claims = 0
        self._slot_freed = Event()
        self._renewer: gevent.Greenlet | None = None
        self._pubsub: PubSub | None = None
        # While wait() claims: the ids removed or released meanwhile. The
        # claim's reply may name one of them, and it must not be held again.
        self._dropped_while_claiming: set[str] | None = None
        self._closed = False

    # -- helpers -------------------------------------------------------------------

    def _fail(self, doing: str, id: str, exc: Exception) -> NoReturn:
        logline(_log.error, "queue", id, "error", doing=doing, error=str(exc))
        raise QueueError(f"Error {doing}: {type(exc).__name__}: {exc}") from exc

    def _hold(self, id: str, view: list[int] | None, from_wait: bool = False) -> None:
        old = self._held.get(id)
        if old is not None:
            from_wait = old.from_wait
            if view is None:
                view = old.view
        elif from_wait:
            self._wait_claims += 1
        self._held[id] = _Claim(time.monotonic(), view, from_wait)
        if self._renewer is None and not self._closed:
            self._renewer = gevent.spawn(self._renew_loop)

    def _touch(self, id: str) -> None:
        claim = self._held.get(id)
        if claim is not None:
            claim.touched = time.monotonic()

    def _drop(self, id: str) -> None:
        """Forget the claim on *id*: no more renewals, so its lease runs out."""
        if self._dropped_while_claiming is not None:
            self._dropped_while_claiming.add(id)
        claim = self._held.pop(id, None)
        if claim is not None and claim.from_wait:
            self._wait_claims -= 1
            self._slot_freed.set()

    def _key(self, id: str) -> str:
        return self.prefix + id

    # -- QueueStorage --------------------------------------------------------------

    def write(self, envelope: Envelope, timestamp: float) -> str:
        """Store a new message, in one atomic step; next attempt at *timestamp*.

        With *claim_on_write* the message is held by this storage, for the
        queue's immediate attempt; otherwise it is scheduled and the waiting
        processes are told.

        :returns: the new id, ``uuid4().hex``: ``envelope.queue_id`` when it
            is one and free.
        :raises QueueError: the envelope cannot be pickled, or Redis failed;
            the message is then not stored.
        """
        try:
            data = pickle.dumps(envelope, pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise QueueError(f"Cannot store message: {exc}") from exc
        when = repr(float(timestamp))
        nonce = uuid4_hex()
        claim = "1" if self.claim_on_write else "0"
        id = preferred_id(envelope.queue_id)
        while True:
            try:
                stored = self._write(
                    keys=[self._key(id), self._scheduled, self._claimed],
                    args=[id, data, when, nonce, self.token, self.lease, claim, self._channel],
                )
            except self._errors as exc:
                self._fail("storing message", id, exc)
            if stored:
                break
            id = uuid4_hex()  # taken (a split message's copy): another id
        if self.claim_on_write:
            self._hold(id, [])
        _queue_log.write(id, envelope)
        return id

    def set_timestamp(self, id: str, timestamp: float) -> None:
        """Schedule the next attempt at *timestamp* and release the claim.

        A message another process holds is left alone (logged).

        :raises KeyError: *id* is not stored.
        :raises QueueError: Redis failed.
        """
        when = repr(float(timestamp))
        try:
            outcome = self._set_timestamp(
                keys=[self._key(id), self._scheduled, self._claimed],
                args=[id, when, self.token, self._channel],
            )
        except self._errors as exc:
            self._drop(id)
            self._fail("updating message metadata", id, exc)
        self._drop(id)
        if outcome == 0:
            raise KeyError(id)
        if outcome == 2:
            logline(_log.warning, "queue", id, "claim_lost", doing="set_timestamp")
            return
        _queue_log.update_meta(id, timestamp=float(timestamp))

    def increment_attempts(self, id: str) -> int:
        """Count one more delivery attempt.

        :returns: the new count.
        :raises KeyError: *id* is not stored.
        :raises QueueError: Redis failed.
        """
        try:
            attempts = self._increment(keys=[self._key(id)])
        except self._errors as exc:
            self._drop(id)
            self._fail("updating message metadata", id, exc)
        if attempts is None:
            self._drop(id)
            raise KeyError(id)
        self._touch(id)
        _queue_log.update_meta(id, attempts=int(attempts))
        return int(attempts)

    def set_recipients_delivered(self, id: str, rcpt_indexes: Sequence[int]) -> None:
        """Mark recipients as delivered; later :meth:`get` calls omit them.

        :param rcpt_indexes: positions in the recipient list of the envelope
            from this storage's latest :meth:`get` (or :meth:`write`);
            negative ones are ignored.
        :raises KeyError: *id* is not stored.
        :raises QueueError: Redis failed.
        """
        claim = self._held.get(id)
        base = "" if claim is None or claim.view is None else json.dumps(claim.view)
        indexes = [int(i) for i in rcpt_indexes]
        try:
            done = self._delivered(keys=[self._key(id)], args=[json.dumps(indexes), base])
        except self._errors as exc:
            self._drop(id)
            self._fail("updating message metadata", id, exc)
        if not done:
            self._drop(id)
            raise KeyError(id)
        self._touch(id)
        _queue_log.update_meta(id, delivered_indexes=indexes)

    def load(self) -> list[tuple[float, str]]:
        """The messages this process may deliver, as ``(timestamp, id)``.

        Those scheduled (nobody holds them), those this storage holds, and
        those whose lease ran out. None is claimed here: :meth:`get` claims
        each when the queue attempts it. Messages that change place while
        the pages are read may be missed or listed twice; :meth:`wait`
        claims the missed ones when they are due.

        :raises QueueError: Redis failed.
        """
        try:
            found: dict[str, float] = {}
            start = 0
            while True:
                # redis-py types replies as the union of every shape a
                # command may return; these are bytes, as decode_responses
                # is off.
                page: Any = self.client.zrange(
                    self._scheduled, start, start + _BATCH - 1, withscores=True
                )
                for member, score in page:
                    found[member.decode()] = float(score)
                if len(page) < _BATCH:
                    break
                start += _BATCH
            seconds, micros = self.client.time()
            lapsed: Any = self.client.zrangebyscore(self._claimed, "-inf", seconds + micros / 1e6)
            others = [member.decode() for member in lapsed]
            others.extend(id for id in self._held if id not in found)
            for chunk in _chunks(others):
                pipe = self.client.pipeline(transaction=False)
                for id in chunk:
                    pipe.hget(self._key(id), "timestamp")
                for id, value in zip(chunk, pipe.execute(), strict=True):
                    if value is not None:
                        found[id] = float(value)
        except self._errors as exc:
            self._fail("loading the queue", "*", exc)
        return [(timestamp, id) for id, timestamp in found.items()]

    def get(self, id: str) -> tuple[Envelope, int]:
        """Read a message back, without the recipients already delivered,
        and claim it (or renew this storage's claim).

        A stored envelope that does not unpickle is moved to quarantine (see
        :meth:`_quarantine`), logged, and the message treated as gone.

        :returns: ``(envelope, attempts)``.
        :raises KeyError: *id* is not stored, or another process holds it.
        :raises QueueError: Redis failed.
        """
        try:
            found = self._get(
                keys=[self._key(id), self._scheduled, self._claimed],
                args=[id, self.token, self.lease],
            )
        except self._errors as exc:
            self._drop(id)
            self._fail("reading message", id, exc)
        if not found:
            self._drop(id)
            if found == 0:
                logline(_log.debug, "queue", id, "held_elsewhere")
            raise KeyError(id)
        data, attempts, delivered_json = found
        delivered = sorted(int(i) for i in json.loads(delivered_json))
        self._hold(id, delivered)
        try:
            envelope = pickle.loads(data)
        except Exception as exc:
            self._quarantine(id, f"envelope does not unpickle: {exc!r}")
            raise KeyError(id) from None
        if not isinstance(envelope, Envelope):
            self._quarantine(id, f"envelope is a {type(envelope).__name__}")
            raise KeyError(id)
        self._remove_delivered_rcpts(envelope, delivered)
        return envelope, int(attempts)

    def remove(self, id: str) -> None:
        """Delete a message, in one atomic step; unknown ids are ignored.

        :raises QueueError: Redis failed.
        """
        self._drop(id)
        try:
            self._remove(keys=[self._key(id), self._scheduled, self._claimed], args=[id])
        except self._errors as exc:
            self._fail("removing message", id, exc)
        _queue_log.remove(id)

    def wait(self) -> list[tuple[float, str]]:
        """Claim messages for the queue, blocking until there are some.

        Claims the messages whose lease ran out and those due now, at most
        *claim_limit* held at a time. When there are none it blocks on the
        wake-up channel, until the next scheduled message is due or the
        earliest lease may run out (at most *lease* seconds). While Redis
        fails it logs, waits and tries again: it never raises for that.

        :returns: ``(timestamp, id)`` of each message claimed, at least one.
        :raises NotImplementedError: once the storage is closed (which ends
            a queue's listener).
        """
        delay = _WAIT_RETRY_MIN
        failing = False
        while True:
            if self._closed:
                raise NotImplementedError("RedisStorage is closed")
            try:
                claimed = self._wait_once()
            except self._errors as exc:
                self._close_pubsub()
                if not failing:
                    logline(_log.warning, "queue", "*", "wait_failed", error=str(exc))
                    failing = True
                gevent.sleep(delay)
                delay = min(delay * 2, _WAIT_RETRY_MAX)
                continue
            except BaseException:
                # Killed (the queue stopped) in the middle of a read: the
                # subscription's connection is in an unknown state.
                self._close_pubsub()
                raise
            if failing:
                logline(_log.warning, "queue", "*", "wait_recovered")
                failing = False
                delay = _WAIT_RETRY_MIN
            if claimed:
                return claimed

    def _wait_once(self) -> list[tuple[float, str]]:
        """One claim, or one block until something may be claimable."""
        while self._wait_claims >= self.claim_limit and not self._closed:
            self._slot_freed.clear()
            self._slot_freed.wait()
        if self._closed:
            return []
        pubsub = self._pubsub
        if pubsub is None:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            self._pubsub = pubsub
            pubsub.subscribe(self._channel)
        # Notices so far are answered by the claim below; one that comes
        # after this point wakes the block at the end, even if it comes
        # before the claim runs, so nothing scheduled is missed.
        while pubsub.get_message(timeout=0) is not None:
            pass
        now = self._clock()
        dropped: set[str] = set()
        self._dropped_while_claiming = dropped
        try:
            out, next_due, next_lease_end = self._claim(
                keys=[self._scheduled, self._claimed],
                args=[self.token, self.lease, repr(now), self.claim_limit - self._wait_claims,
                      self.prefix],
            )  # fmt: skip
        finally:
            self._dropped_while_claiming = None
        claimed = []
        for i in range(0, len(out), 2):
            id = out[i].decode()
            if id in dropped:
                # This process removed or rescheduled it while the claim was
                # under way (the queue knows it); a claim it may still have
                # runs out unrenewed, or the queue's next get() renews it.
                continue
            self._hold(id, None, from_wait=True)
            claimed.append((float(out[i + 1]), id))
        if claimed:
            return claimed
        block = self.lease
        if next_due is not None:
            block = min(block, float(next_due) - self._clock())
        if next_lease_end is not None:
            block = min(block, float(next_lease_end))
        pubsub.get_message(timeout=max(block, _MIN_BLOCK))
        return []

    def get_info(self) -> dict[str, Any]:
        """Statistics: ``size`` (messages stored), ``scheduled`` and
        ``claimed`` (how many nobody holds and how many some process holds),
        and ``held`` (how many this storage holds).

        :raises QueueError: Redis failed.
        """
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.zcard(self._scheduled)
            pipe.zcard(self._claimed)
            scheduled, claimed = pipe.execute()
        except self._errors as exc:
            self._fail("reading queue statistics", "*", exc)
        return {
            "size": int(scheduled) + int(claimed),
            "scheduled": int(scheduled),
            "claimed": int(claimed),
            "held": len(self._held),
        }

    def _quarantine(self, id: str, reason: str) -> None:
        """Move a message that cannot be read out of the queue, keeping it.

        The hash is renamed ``<prefix>quarantine:<id>``, for an operator to
        look at; the message is no longer scheduled nor claimed.
        """
        self._drop(id)
        target = self.prefix + "quarantine:" + id
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(self._scheduled, id)
            pipe.zrem(self._claimed, id)
            pipe.rename(self._key(id), target)
            pipe.execute()
        except self._errors as exc:
            logline(_log.error, "queue", id, "quarantine_failed", reason=reason, error=str(exc))
            return
        logline(_log.error, "queue", id, "quarantine", moved_to=target, reason=reason)

    # -- claims ------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        """Renew the leases held, every third of *lease*, while there are any."""
        try:
            while self._held:
                gevent.sleep(self.lease / 3)
                try:
                    self._renew_held()
                except Exception:
                    # A bug, not Redis failing (that is logged and retried in
                    # there): logged, and the loop goes on.
                    slogging.log_exception(__name__)
        finally:
            self._renewer = None
            if self._held and not self._closed:
                # Claims taken while this greenlet was ending.
                self._renewer = gevent.spawn(self._renew_loop)

    def _renew_held(self) -> None:
        cutoff = time.monotonic() - self.max_hold
        for id in [id for id, claim in self._held.items() if claim.touched < cutoff]:
            logline(_log.warning, "queue", id, "claim_expired", idle_seconds=self.max_hold)
            self._drop(id)
        for chunk in _chunks(list(self._held)):
            try:
                lost = self._renew(
                    keys=[self._claimed], args=[self.token, self.lease, self.prefix, *chunk]
                )
            except self._errors as exc:
                logline(_log.warning, "queue", "*", "renew_failed", error=str(exc))
                return
            for member in lost:
                id = member.decode()
                if id in self._held:
                    logline(_log.warning, "queue", id, "claim_lost", doing="renew")
                    self._drop(id)

    def close(self) -> None:
        """Give back the claims this storage holds and close its connections.

        Call it once the queue is stopped and its attempts are over: a
        message released while an attempt runs may be delivered twice. The
        released messages are scheduled at their stored next attempt time,
        for any process. Failures are logged, not raised (the claims then
        run out after *lease* seconds).
        """
        self._closed = True
        if self._renewer is not None:
            self._renewer.kill()
            self._renewer = None
        held = list(self._held)
        self._held.clear()
        self._wait_claims = 0
        self._slot_freed.set()  # a wait() blocked on the claim limit ends
        try:
            for chunk in _chunks(held):
                self._release(
                    keys=[self._scheduled, self._claimed],
                    args=[self.token, self.prefix, self._channel, *chunk],
                )
        except self._errors as exc:
            logline(_log.warning, "queue", "*", "release_failed", error=str(exc))
        self._close_pubsub()
        if self._pool is not None:
            self.client.close()
            self._pool.disconnect()

    def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(*self._errors):
                pubsub.close()


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(ids), _BATCH):
        yield ids[start : start + _BATCH]
