"""Queues store accepted messages and deliver them through a relay.

:class:`QueueStorage` is the interface every storage backend implements
(:mod:`slimta.queue.dict` holds an in-memory one); :class:`Queue` keeps the
messages of one storage moving: it stores what edges give it, attempts each
message through a relay, retries transient failures on a schedule
(:func:`default_backoff`) and bounces permanent ones.

Each attempt's outcome per recipient, each bounce and each removal is a
line of the mail log (:mod:`slimta.logging.maillog`, logger
``slimta.maillog.queue``).
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

import gevent
from gevent.event import Event
from gevent.pool import Pool

from slimta import logging as slogging
from slimta.core import SlimtaError
from slimta.logging.maillog import QUEUE as _MAILLOG_QUEUE
from slimta.logging.maillog import MailLog, reply_text
from slimta.policy import QueuePolicy, apply_queue_policies
from slimta.relay import PermanentRelayError, RecipientResult, Relay, TransientRelayError
from slimta.smtp.reply import Reply
from slimta.util.ids import uuid4_hex

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["Queue", "QueueError", "QueueStorage", "default_backoff"]

_T = TypeVar("_T")

_log = logging.getLogger(__name__)
#: One line per delivery outcome, bounce and removal (slimta.logging.maillog).
_maillog = MailLog(_MAILLOG_QUEUE)


class QueueError(SlimtaError):
    """Storing or loading a message failed.

    :param msg: what went wrong.
    :param reply: the reply an edge sends instead of the default
        ``451 4.3.0 Error queuing message``; ``None`` for the default.
    """

    def __init__(self, msg: str = "Error queuing message", reply: Reply | None = None) -> None:
        super().__init__(msg)
        #: The reply for the client, or ``None`` for the edge's default.
        self.reply = reply


class QueueStorage:
    """Where a queue keeps its messages; every backend implements this.

    Recipient indexes given to :meth:`set_recipients_delivered` are positions
    in the recipient list of the envelope returned by the latest :meth:`get`
    (or written by :meth:`write` when there was no :meth:`get`); every
    backend removes those recipients from what later :meth:`get` calls
    return. Backends raise :class:`QueueError` when storage fails, and
    :meth:`write` returns only once the message is stored.
    """

    def write(self, envelope: Envelope, timestamp: float) -> str:
        """Store a new message, next attempt at *timestamp*, attempts 0.

        :returns: the new message's unique id.
        """
        raise NotImplementedError()

    def set_timestamp(self, id: str, timestamp: float) -> None:
        """Store the time of the next delivery attempt."""
        raise NotImplementedError()

    def increment_attempts(self, id: str) -> int:
        """Count one more delivery attempt; :returns: the new count."""
        raise NotImplementedError()

    def set_recipients_delivered(self, id: str, rcpt_indexes: Sequence[int]) -> None:
        """Mark recipients (indexes, see the class notes) as done."""
        raise NotImplementedError()

    def load(self) -> Iterable[tuple[float, str]]:
        """Every stored message as ``(timestamp, id)``; used at queue start."""
        raise NotImplementedError()

    def get(self, id: str) -> tuple[Envelope, int]:
        """The message and its attempt count.

        :raises KeyError: when *id* is not stored.
        """
        raise NotImplementedError()

    def remove(self, id: str) -> None:
        """Delete a message (delivered or failed for good); missing ids are ignored."""
        raise NotImplementedError()

    def wait(self) -> Iterable[tuple[float, str]]:
        """Block until other processes add messages, and yield them.

        :raises NotImplementedError: when the backend cannot (the default).
        """
        raise NotImplementedError()

    def get_info(self) -> dict[str, Any]:
        """Statistics; at least ``{'size': <number of messages>}``."""
        raise NotImplementedError()

    @staticmethod
    def _remove_delivered_rcpts(envelope: Envelope, rcpt_indexes: Iterable[int]) -> None:
        """Drop the recipients at *rcpt_indexes* from *envelope* in place."""
        drop = set(rcpt_indexes)
        envelope.recipients = [r for i, r in enumerate(envelope.recipients) if i not in drop]


# --- the queue ---------------------------------------------------------------

#: Postfix ``minimal_backoff_time``: the shortest wait before a retry (seconds).
MIN_BACKOFF = 300.0
#: Postfix ``maximal_backoff_time``: the longest wait before a retry (seconds).
MAX_BACKOFF = 4000.0
#: Postfix ``maximal_queue_lifetime``: give up on messages older than this
#: (seconds; 5 days). RFC 5321 section 4.5.4.1 asks for at least 4-5 days.
MAX_QUEUE_LIFETIME = 5 * 24 * 3600.0

#: Seconds to wait before asking ``store.get`` again for a message whose
#: read failed (Postfix ``queue_run_delay``).
_GET_RETRY_DELAY = 300.0
#: Seconds before a message whose bounce could not be queued is tried again.
_BOUNCE_RETRY_DELAY = 300.0

#: How many loaded entries are merged into :attr:`Queue.queued` at a time.
_LOAD_BATCH = 1000

_UNHANDLED = "4.0.0 Unhandled delivery error"
_NO_RESULT = "4.0.0 No delivery result for recipient"
_TOO_MANY_RETRIES = " (Too many retries)"

#: ``backoff(envelope, attempts) -> seconds | None``.
Backoff: TypeAlias = Callable[["Envelope", int], float | None]
#: ``bounce_factory(envelope, reply) -> Envelope | None``.
BounceFactory: TypeAlias = Callable[["Envelope", "Reply"], "Envelope | None"]


def _estimated_age(attempts: int) -> float:
    """A message's age at its failed attempt number *attempts*, had every
    earlier retry followed :func:`default_backoff`."""
    age = 0.0
    for _ in range(attempts - 1):
        age += min(max(age, MIN_BACKOFF), MAX_BACKOFF)
        if age > MAX_QUEUE_LIFETIME:
            break
    return age


def default_backoff(
    envelope: Envelope, attempts: int, *, clock: Callable[[], float] = time.time
) -> float | None:
    """Postfix's retry schedule: wait as long as the message has been queued.

    The wait is the message's age clamped to 300..4000 seconds (Postfix's
    ``minimal_backoff_time`` and ``maximal_backoff_time``), so retries come
    after about 5, 5, 10, 20, 40 minutes and then every 67 minutes. A message
    older than 5 days (``maximal_queue_lifetime``) is given up (RFC 5321
    section 4.5.4.1: retry for at least 4-5 days).

    The age is ``clock() - envelope.timestamp``. A :class:`Queue` built
    without a *backoff* uses this function with its own clock. When the
    envelope has no timestamp the age is estimated from *attempts*, as if
    every earlier retry had followed this schedule.

    :param envelope: the message that failed.
    :param attempts: how many attempts have failed, this one included.
    :param clock: returns the current time in epoch seconds.
    :returns: seconds to wait before the next attempt, or ``None`` to give up.

    .. versionadded:: 4.0
       New in the rewrite: python-slimta 4.0's default backoff never
       retried, so every transient failure bounced at once.
    """
    timestamp = envelope.timestamp
    age = _estimated_age(attempts) if timestamp is None else clock() - timestamp
    if age > MAX_QUEUE_LIFETIME:
        return None
    return min(max(age, MIN_BACKOFF), MAX_BACKOFF)


def _as_pool(pool: int | Pool | None) -> Pool | None:
    if pool is None or isinstance(pool, Pool):
        return pool
    return Pool(pool)


def _capture(func: Callable[..., _T], args: tuple[Any, ...]) -> tuple[bool, Any]:
    """Call *func* and return ``(True, value)`` or ``(False, exception)``.

    Run inside pool greenlets, so an expected storage error comes back to the
    caller instead of being reported by the hub as a crashed greenlet.
    """
    try:
        return True, func(*args)
    except Exception as exc:
        return False, exc


def _wants_failure_dsn(notify: tuple[str, ...] | None) -> bool:
    """Whether a recipient's RCPT ``NOTIFY`` asks for a report of failure.

    Without ``NOTIFY`` the MTA chooses, and failures are reported (RFC 3461
    section 4.1); ``NOTIFY=NEVER`` or a list without ``FAILURE`` asks for none.
    """
    if notify is None:
        return True
    upper = {word.upper() for word in notify}
    return "NEVER" not in upper and "FAILURE" in upper


def _reply_key(reply: Reply) -> tuple[str | None, str | None]:
    return reply.code, reply.message


def _given_up(reply: Reply) -> Reply:
    """A copy of *reply* saying that the queue stopped retrying."""
    given_up = Reply(reply.code, (reply.message or "") + _TOO_MANY_RETRIES)
    given_up.address = reply.address
    given_up.command = reply.command
    return given_up


def _relay_name(reply: Reply | None) -> str:
    """Where *reply* came from, for the mail log: its ``address`` as
    ``host:port`` (``[v6]:port``), or ``none`` when the relay did not say."""
    address = reply.address if reply is not None else None
    if address is None:
        return "none"
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


def _unhandled_reply(exc: BaseException) -> Reply:
    # The text may end up in a bounce or a log line: keep it on one line.
    text = " ".join(str(exc).split())
    return Reply("450", f"{_UNHANDLED}: {text}")


class _Outcomes:
    """One attempt's per-recipient results, sorted by what happens next."""

    def __init__(self) -> None:
        #: Indexes of recipients that need no further attempt.
        self.done: list[int] = []
        #: Failed for good: ``(recipient, reply)``.
        self.permanent: list[tuple[str, Reply]] = []
        #: Try again: ``(recipient, reply)``.
        self.transient: list[tuple[str, Reply]] = []
        #: Delivered: ``(recipient, reply or None)``.
        self.sent: list[tuple[str, Reply | None]] = []

    @classmethod
    def classify(
        cls,
        recipients: Sequence[str],
        names: Sequence[str],
        results: Mapping[str, RecipientResult] | Sequence[RecipientResult],
    ) -> _Outcomes:
        """Sort *results* out (looked up by address from *names*, or by position)."""
        outcomes = cls()
        missing = object()
        for index, rcpt in enumerate(recipients):
            result: object
            if isinstance(results, Mapping):
                result = results.get(names[index], missing)
            else:
                result = results[index] if index < len(results) else missing
            if isinstance(result, PermanentRelayError):
                outcomes.done.append(index)
                outcomes.permanent.append((rcpt, result.reply))
            elif isinstance(result, TransientRelayError):
                outcomes.transient.append((rcpt, result.reply))
            elif isinstance(result, BaseException):
                outcomes.transient.append((rcpt, _unhandled_reply(result)))
            elif result is missing:
                # Retrying risks a duplicate; not retrying risks losing mail.
                outcomes.transient.append((rcpt, Reply("450", _NO_RESULT)))
            else:
                outcomes.done.append(index)
                outcomes.sent.append((rcpt, result if isinstance(result, Reply) else None))
        return outcomes


class _QueueFront:
    """What every queue does before it stores a message: the queue policies,
    and the factory of the bounces it makes. :class:`Queue` and
    :class:`slimta.celeryqueue.CeleryQueue` share it."""

    queue_policies: list[QueuePolicy]
    _bounce_factory: BounceFactory | None

    @property
    def bounce_factory(self) -> BounceFactory:
        """``bounce_factory(envelope, reply)``; :class:`slimta.bounce.Bounce` by default."""
        if self._bounce_factory is None:
            # Imported here: the bounce module is only needed once mail fails.
            from slimta.bounce import Bounce

            return Bounce
        return self._bounce_factory

    @bounce_factory.setter
    def bounce_factory(self, factory: BounceFactory | None) -> None:
        self._bounce_factory = factory

    def add_policy(self, policy: QueuePolicy) -> None:
        """Run *policy* on every message :meth:`enqueue` gets, after earlier ones.

        :param policy: a :class:`~slimta.policy.QueuePolicy`.
        :raises TypeError: *policy* is not a ``QueuePolicy``.
        """
        if not isinstance(policy, QueuePolicy):
            raise TypeError("expected QueuePolicy", policy)
        self.queue_policies.append(policy)

    def _apply_policies(self, envelope: Envelope) -> list[Envelope]:
        return apply_queue_policies(self.queue_policies, envelope)


class Queue(_QueueFront, gevent.Greenlet):  # type: ignore[misc]
    """Stores messages and delivers them through a relay, retrying as needed.

    Start the greenlet with :meth:`start`: it loads the messages already in
    *store*, listens for messages other processes add (when the storage
    supports :meth:`QueueStorage.wait`), and attempts each message when its
    time comes. :meth:`enqueue` stores a new message and attempts it at once.

    Outcome of each attempt (``relay._attempt(envelope, attempts)``):

    * returns ``None`` or a :class:`~slimta.smtp.reply.Reply`: delivered,
      removed from storage;
    * raises :class:`~slimta.relay.TransientRelayError`: the attempt count
      goes up and *backoff* says when to try again; when it says ``None`` the
      message fails for good, with ``" (Too many retries)"`` added to the
      reply;
    * raises :class:`~slimta.relay.PermanentRelayError`: removed and bounced;
    * raises anything else: logged, then handled like a transient failure
      with ``450 4.0.0 Unhandled delivery error: <exception>``;
    * returns a dict ``{recipient: result}`` (or a list in recipient order):
      delivered recipients and those failed for good are recorded with
      :meth:`QueueStorage.set_recipients_delivered`, those failed for good
      are bounced (one bounce per distinct reply), and the message is
      retried for the rest as for a transient failure. A recipient missing
      from the results is retried.

    Bounces go through *bounce_factory* to *bounce_queue*. None is made for a
    message with a null (empty) sender, nor for a recipient whose RCPT
    ``NOTIFY`` was ``NEVER`` or did not include ``FAILURE`` (RFC 3461).

    :meth:`kill` stops the scheduler, the loader and the storage listener;
    attempts already running finish (they run in :attr:`relay_pool`).
    Messages stay in storage, so the next start picks them up.

    :param store: the :class:`QueueStorage` holding the messages.
    :param relay: the :class:`~slimta.relay.Relay` that delivers them; with
        ``None`` messages are stored but not delivered, and the greenlet ends
        as soon as it starts.
    :param backoff: ``backoff(envelope, attempts) -> seconds | None``, asked
        after each transient failure with the new attempt count; ``None``
        means give up. Default: :func:`default_backoff` (Postfix's schedule)
        on this queue's *clock*.
    :param bounce_factory: ``bounce_factory(envelope, reply) -> Envelope |
        None`` builds the bounce for the recipients of *envelope*; ``None``
        from it means no bounce. Default: :class:`slimta.bounce.Bounce`.
    :param bounce_queue: where bounces are enqueued (anything with
        ``enqueue``); default this queue.
    :param store_pool: an ``int`` (size of a new :class:`gevent.pool.Pool`) or
        a ``Pool`` bounding concurrent storage calls; default unbounded.
    :param relay_pool: the same for concurrent delivery attempts.
    :param clock: returns the current time in epoch seconds; every time the
        queue reads or stores comes from it.

    .. versionchanged:: 4.0
       Keyword-only *clock*. The default *backoff* retries like Postfix
       instead of never. An id is claimed by the delivery path before the
       attempt is spawned, and loaded or announced ids already claimed or
       waiting are skipped, so no message is relayed twice at once.
       Bounces honour the null sender and RCPT ``NOTIFY``.
    """

    def __init__(
        self,
        store: QueueStorage,
        relay: Relay | None = None,
        backoff: Backoff | None = None,
        bounce_factory: BounceFactory | None = None,
        bounce_queue: Any = None,
        store_pool: int | Pool | None = None,
        relay_pool: int | Pool | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        #: The :class:`QueueStorage`.
        self.store = store
        #: The :class:`~slimta.relay.Relay`, or ``None``.
        self.relay = relay
        #: Returns the current time in epoch seconds.
        self.clock = clock
        #: ``backoff(envelope, attempts) -> seconds | None``.
        self.backoff: Backoff = backoff or functools.partial(default_backoff, clock=clock)
        self._bounce_factory = bounce_factory
        #: Where bounces are enqueued.
        self.bounce_queue: Any = bounce_queue if bounce_queue is not None else self
        #: Pool bounding storage calls, or ``None`` for no bound.
        self.store_pool = _as_pool(store_pool)
        # "is None", not "or": an empty Pool is false.
        relay_pool = _as_pool(relay_pool)
        #: Pool the delivery attempts run in (unbounded unless given).
        self.relay_pool: Pool = relay_pool if relay_pool is not None else Pool()
        #: :class:`~slimta.policy.QueuePolicy` objects run by :meth:`enqueue`.
        self.queue_policies: list[QueuePolicy] = []
        #: Set to make the scheduler look at :attr:`queued` again.
        self.wake = Event()
        #: Messages waiting for their next attempt: sorted ``(timestamp, id)``.
        self.queued: list[tuple[float, str]] = []
        #: Ids of the messages in :attr:`queued`.
        self.queued_ids: set[str] = set()
        #: Ids of the messages being delivered now.
        self.active_ids: set[str] = set()
        # Writes in flight, for the fence in _await_writes: a sequence number
        # per write started, the numbers not finished, and an Event replaced
        # (after being set) whenever one finishes while someone waits.
        self._write_seq = 0
        self._writing: set[int] = set()
        self._write_waiters = 0
        self._write_done = Event()

    # --- public API -----------------------------------------------------------

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str | QueueError]]:
        """Queue a new message: run the policies, store, attempt delivery.

        The queue policies may replace *envelope* by several envelopes; each
        is stored (concurrently) with the current time as its next attempt,
        and, when there is a relay, each stored one is attempted at once.
        An envelope without a :attr:`~slimta.envelope.Envelope.timestamp` is
        stamped with the current time first, and one without a
        :attr:`~slimta.envelope.Envelope.queue_id` is given a new one, before
        the policies run (``AddReceivedHeader`` writes it).

        :param envelope: the message.
        :returns: ``[(envelope, id), ...]``, one per stored envelope, with a
            :class:`QueueError` instead of the id where storing failed.
        :raises Exception: anything other than ``QueueError`` that storage
            raised (after the other envelopes were stored and started).
        """
        now = self.clock()
        if envelope.timestamp is None:
            envelope.timestamp = now
        if envelope.queue_id is None:
            envelope.queue_id = uuid4_hex()
        envelopes = self._apply_policies(envelope)
        if len(envelopes) == 1 and self.store_pool is None:
            outcomes = [self._write(envelopes[0], now)]
        else:
            spawn = self.store_pool.spawn if self.store_pool is not None else gevent.spawn
            writers = [spawn(self._write, env, now) for env in envelopes]
            gevent.joinall(writers)
            outcomes = [writer.get() for writer in writers]
        results: list[tuple[Envelope, str | QueueError]] = []
        unexpected: Exception | None = None
        for env, (outcome, claimed) in zip(envelopes, outcomes, strict=True):
            if isinstance(outcome, QueueError):
                results.append((env, outcome))
            elif isinstance(outcome, Exception):
                unexpected = unexpected or outcome
            else:
                results.append((env, outcome))
                if claimed:
                    self._start_attempt(outcome, env, now)
        if unexpected is not None:
            raise unexpected
        return results

    def _start_attempt(self, id: str, envelope: Envelope, now: float) -> None:
        """Spawn attempt 0 of claimed message *id*, or leave it to the scheduler."""
        pool = self.relay_pool
        if pool.full() and gevent.getcurrent() in pool:
            # A bounce enqueued by an attempt: waiting for a free slot could
            # wait for the very slot this greenlet holds.
            self.active_ids.discard(id)
            self._add_queued(now, id)
            return
        pool.spawn(self._attempt, id, envelope, 0)

    def flush(self) -> None:
        """Make every waiting message due now and wake the scheduler."""
        now = self.clock()
        self.queued = sorted((now, id) for _, id in self.queued)
        self.wake.set()

    def kick(self) -> None:
        """Wake the scheduler to compare the clock with the waiting messages.

        Call it after moving an injected clock forward.
        """
        self.wake.set()

    # --- scheduler --------------------------------------------------------------

    def _run(self) -> None:
        if self.relay is None:
            return
        helpers = [gevent.spawn(self._load_all), gevent.spawn(self._wait_store)]
        try:
            while True:
                self.wake.clear()
                self._dispatch_due(self.clock())
                timeout = None
                if self.queued:
                    timeout = max(0.0, self.queued[0][0] - self.clock())
                self.wake.wait(timeout)
        finally:
            gevent.killall(helpers, block=False)

    def _dispatch_due(self, now: float) -> None:
        """Start an attempt for each waiting message whose time has come."""
        count = 0
        for timestamp, _ in self.queued:
            if timestamp > now:
                break
            count += 1
        if not count:
            return
        due = self.queued[:count]
        del self.queued[:count]
        claimed = []
        for _, id in due:
            self.queued_ids.discard(id)
            if id not in self.active_ids:
                # Claimed before spawning, so a load or wait racing with this
                # cannot queue the id again meanwhile.
                self.active_ids.add(id)
                claimed.append(id)
        fence = self._write_seq
        for id in claimed:
            self.relay_pool.spawn(self._attempt_stored, id, fence)

    def _add_queued(self, timestamp: float, id: str) -> None:
        """Wait for *id*'s attempt at *timestamp*, unless it is known already."""
        if id in self.queued_ids or id in self.active_ids:
            return
        bisect.insort(self.queued, (timestamp, id))
        self.queued_ids.add(id)
        self.wake.set()

    def _add_many(self, entries: Iterable[tuple[float, str]]) -> None:
        added = False
        for timestamp, id in entries:
            if id in self.queued_ids or id in self.active_ids:
                continue
            self.queued.append((timestamp, id))
            self.queued_ids.add(id)
            added = True
        if added:
            self.queued.sort()  # Timsort: cheap when merging a sorted run.
            self.wake.set()

    def _load_all(self) -> None:
        """Queue every message already stored (at start)."""
        try:
            batch: list[tuple[float, str]] = []
            for entry in self.store.load():
                batch.append(entry)
                if len(batch) >= _LOAD_BATCH:
                    self._add_many(batch)
                    batch = []
            self._add_many(batch)
        except Exception:
            slogging.log_exception(__name__)

    #: Seconds between calls to a ``store.wait()`` that failed.
    _wait_retry_delay = 5.0

    def _wait_store(self) -> None:
        """Queue the messages other processes store, as the storage reports them."""
        while True:
            try:
                for timestamp, id in self.store.wait():
                    self._add_queued(timestamp, id)
            except NotImplementedError:
                return
            except Exception:
                slogging.log_exception(__name__)
                gevent.sleep(self._wait_retry_delay)

    # --- enqueue helpers ----------------------------------------------------------

    def _write(self, envelope: Envelope, timestamp: float) -> tuple[str | Exception, bool]:
        """Store *envelope*; claim its id for delivery when there is a relay.

        :returns: ``(id or exception, claimed)``; the exception is returned,
            not raised, so a failed write does not crash a pool greenlet.
        """
        self._write_seq += 1
        seq = self._write_seq
        self._writing.add(seq)
        try:
            try:
                id = self.store.write(envelope, timestamp)
            except Exception as exc:
                return exc, False
            # Claimed in the greenlet that wrote, with no switch in between.
            # A load or wait may have seen the new id while it was being
            # written; then it is queued or being delivered already (see
            # _await_writes), and that path delivers it instead.
            if self.relay is None or id in self.active_ids or id in self.queued_ids:
                return id, False
            self.active_ids.add(id)
            return id, True
        finally:
            self._writing.discard(seq)
            if self._write_waiters:
                done, self._write_done = self._write_done, Event()
                done.set()

    def _await_writes(self, fence: int) -> None:
        """Wait until the writes numbered up to *fence* have claimed their ids.

        The scheduler claims a loaded id, then waits here before delivering
        it: if a write still in flight stored that very id, its claim then
        finds the id taken and :meth:`enqueue` starts no second attempt.
        Without the wait, a fast delivery could end (and release the id)
        before the write returned, and the message would go out twice.
        """
        while self._writing and min(self._writing) <= fence:
            self._write_waiters += 1
            try:
                self._write_done.wait()
            finally:
                self._write_waiters -= 1

    # --- delivery -------------------------------------------------------------

    def _store_call(self, func: Callable[..., _T], *args: Any) -> _T:
        if self.store_pool is None:
            return func(*args)
        ok, value = self.store_pool.apply(_capture, (func, args))
        if not ok:
            raise value
        return cast(_T, value)

    def _attempt_stored(self, id: str, fence: int) -> None:
        """Read message *id* (claimed by the scheduler) and attempt it."""
        self._await_writes(fence)
        try:
            envelope, attempts = self._store_call(self.store.get, id)
        except KeyError:
            self.active_ids.discard(id)  # delivered or removed meanwhile
            return
        except Exception:
            slogging.log_exception(__name__, id=id)
            self.active_ids.discard(id)
            self._add_queued(self.clock() + _GET_RETRY_DELAY, id)
            return
        self._attempt(id, envelope, attempts)

    def _attempt(self, id: str, envelope: Envelope, attempts: int) -> None:
        """Attempt claimed message *id* and act on the outcome; then release it."""
        retry_at = None
        try:
            retry_at = self._deliver(id, envelope, attempts)
        except Exception:
            # Storage failed while recording the outcome; the message stays
            # stored and is loaded again at the next start.
            slogging.log_exception(__name__, id=id)
        finally:
            self.active_ids.discard(id)
        if retry_at is not None:
            self._add_queued(retry_at, id)

    def _deliver(self, id: str, envelope: Envelope, attempts: int) -> float | None:
        """One attempt of message *id*.

        :returns: when to try again, or ``None`` when nothing is left to do.
        """
        assert self.relay is not None
        recipients = list(envelope.recipients)
        try:
            results = self.relay._attempt(envelope, attempts)
        except TransientRelayError as exc:
            return self._retry_later(id, envelope, [(r, exc.reply) for r in recipients])
        except PermanentRelayError as exc:
            failed = [(r, exc.reply) for r in recipients]
            self._log_delivery(id, envelope, attempts + 1, "bounced", failed)
            if not self._bounce(id, envelope, recipients, exc.reply):
                return self._bounce_later(id)
            self._remove(id)
            return None
        except Exception as exc:
            slogging.log_exception(__name__, id=id)
            reply = _unhandled_reply(exc)
            return self._retry_later(id, envelope, [(r, reply) for r in recipients])
        if not isinstance(results, Mapping | list | tuple):
            if _maillog.wanted():
                done = results if isinstance(results, Reply) else None
                sent = [(r, done) for r in recipients]
                self._log_delivery(id, envelope, attempts + 1, "sent", sent)
            self._remove(id)
            return None
        # Relay policies may have rewritten the addresses the results use.
        names = envelope.recipients if len(envelope.recipients) == len(recipients) else recipients
        outcomes = _Outcomes.classify(recipients, names, results)
        unbounced: list[tuple[str, Reply]] = []
        if outcomes.sent:
            self._log_delivery(id, envelope, attempts + 1, "sent", outcomes.sent)
        if outcomes.permanent:
            self._log_delivery(id, envelope, attempts + 1, "bounced", outcomes.permanent)
        for group, reply in self._group_by_reply(outcomes.permanent):
            if not self._bounce(id, envelope, group, reply):
                unbounced.extend((rcpt, reply) for rcpt in group)
        if unbounced:
            # Their bounce could not be queued: they are tried, and bounced,
            # again rather than forgotten.
            kept = {rcpt for rcpt, _ in unbounced}
            outcomes.done = [i for i in outcomes.done if recipients[i] not in kept]
            outcomes.transient.extend(unbounced)
        if not outcomes.transient:
            self._remove(id)
            return None
        if outcomes.done:
            self._store_call(self.store.set_recipients_delivered, id, outcomes.done)
        return self._retry_later(id, envelope, outcomes.transient)

    def _retry_later(
        self, id: str, envelope: Envelope, failed: list[tuple[str, Reply]]
    ) -> float | None:
        """Count a failed attempt for recipients *failed*, then reschedule or give up."""
        attempts = self._store_call(self.store.increment_attempts, id)
        wait = self.backoff(envelope, attempts)
        if wait is None:
            expired = [(rcpt, _given_up(reply)) for rcpt, reply in failed]
            self._log_delivery(id, envelope, attempts, "expired", expired)
            bounced = [
                self._bounce(id, envelope, group, reply)
                for group, reply in self._group_by_reply(expired)
            ]
            if not all(bounced):
                return self._bounce_later(id)
            self._remove(id)
            return None
        self._log_delivery(id, envelope, attempts, "deferred", failed, wait)
        when = self.clock() + wait
        self._store_call(self.store.set_timestamp, id, when)
        return when

    def _remove(self, id: str) -> None:
        """Delete message *id*, which needs nothing more, and log it."""
        self._store_call(self.store.remove, id)
        if _maillog.wanted(logging.DEBUG):
            _maillog.emit(logging.DEBUG, "removed", {"id": id})

    def _log_delivery(
        self,
        id: str,
        envelope: Envelope,
        attempt: int,
        status: str,
        outcomes: Sequence[tuple[str, Reply | None]],
        retry: float | None = None,
    ) -> None:
        """One mail-log line per recipient of attempt number *attempt*.

        :param status: ``sent`` (logged at INFO), ``deferred``, ``bounced``
            or ``expired`` (at WARNING).
        :param outcomes: ``(recipient, reply)``; the reply may be ``None``
            for a delivery.
        :param retry: seconds until the next attempt, for ``deferred``.
        """
        level = logging.INFO if status == "sent" else logging.WARNING
        if not _maillog.wanted(level):
            return
        timestamp = envelope.timestamp
        delay = None if timestamp is None else round(max(0.0, self.clock() - timestamp), 3)
        for rcpt, reply in outcomes:
            fields = {
                "id": id,
                "to": rcpt,
                "relay": _relay_name(reply),
                "delay": delay,
                "attempt": attempt,
                "status": status,
                "code": reply.code if reply is not None else None,
                "reply": reply_text(reply),
                "retry": retry,
            }
            _maillog.emit(level, "delivery", fields)

    @staticmethod
    def _group_by_reply(failed: list[tuple[str, Reply]]) -> list[tuple[list[str], Reply]]:
        groups: dict[tuple[str | None, str | None], tuple[list[str], Reply]] = {}
        for rcpt, reply in failed:
            groups.setdefault(_reply_key(reply), ([], reply))[0].append(rcpt)
        return list(groups.values())

    def _bounce_later(self, id: str) -> float:
        """Keep message *id* for another attempt: a bounce it owes was not queued."""
        when = self.clock() + _BOUNCE_RETRY_DELAY
        self._store_call(self.store.set_timestamp, id, when)
        return when

    def _bounce(self, id: str, envelope: Envelope, recipients: list[str], reply: Reply) -> bool:
        """Enqueue a bounce to the sender of message *id* (*envelope*) for *recipients*.

        :returns: ``False`` when a bounce is due but could not be queued; the
            caller then keeps the message, so that the report is not lost.
        """
        if not envelope.sender:
            return True  # RFC 5321 section 4.5.5: never report on null reverse-path mail.
        notify = envelope.dsn_notify or {}
        wanted = [rcpt for rcpt in recipients if _wants_failure_dsn(notify.get(rcpt))]
        if not wanted:
            return True
        failed = envelope if wanted == envelope.recipients else envelope.copy(wanted)
        try:
            bounce = self.bounce_factory(failed, reply)
            if bounce is None:
                return True
            results = self.bounce_queue.enqueue(bounce)
        except Exception:
            slogging.log_exception(__name__)
            return False
        queued = True
        for _, outcome in results:
            if isinstance(outcome, BaseException):
                _log.error("bounce to %r not queued: %r", envelope.sender, outcome)
                queued = False
            elif outcome is not None and _maillog.wanted():
                _maillog.emit(logging.INFO, "bounce", {"id": id, "bounce_id": str(outcome)})
        return queued
