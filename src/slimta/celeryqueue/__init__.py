"""A queue whose messages are Celery tasks, delivered by ``celery worker`` processes.

:class:`CeleryQueue` takes the place of :class:`slimta.queue.Queue` when
delivery is shared by several machines: the broker is the storage. The edge
process publishes one task per message; any worker that consumes the task
makes the delivery attempt through the relay, schedules the next attempt with
Celery's own retry (``countdown`` from the backoff), and enqueues bounces.
Build the same :class:`CeleryQueue` (same app configuration, same *suffix*)
in the edge process and in the module the workers load with ``celery -A``.

Delivery guarantees
-------------------
The task is declared ``acks_late=True`` and ``reject_on_worker_lost=True``:
the broker message is acknowledged only once the attempt is over and its
outcome (the retry task, the bounce) has been published. A worker killed
mid-attempt leaves the message unacknowledged and the broker hands it to
another worker; a retry that cannot be published sends the message back to
the broker. Delivery is therefore at least once: such a message may reach a
recipient twice, but is not lost. A message whose relay kills the worker
process every time is redelivered every time (``reject_on_worker_lost``).

With the Redis broker an unacknowledged message comes back once the
transport's ``visibility_timeout`` has passed (default one hour). Retries
wait in the worker that received them, unacknowledged, so that timeout must
exceed the longest backoff and the longest attempt, or the message is handed
out again while it waits and goes out twice (the caveat Celery documents for
``countdown`` and ``eta``). :func:`~slimta.queue.default_backoff` waits up to
4000 seconds: configure e.g.
``broker_transport_options={"visibility_timeout": 7200}``.

Serialization and security
--------------------------
The task's arguments are ``(payload, attempts)``: *payload* is the JSON
object ``{"v": 1, "envelope": "<base64 pickle>", "mac": "<hex>"}``, so the
app keeps Celery's JSON serializer and need not accept pickles for its other
tasks. The envelope is pickled by this package (protocol 5, so that Python
versions can mix), which makes a message about 1.8 times its size on a Redis
broker (base64 twice). Unpickling runs code, so whoever can publish to the
broker can run code in the workers: use a trusted, authenticated broker, and
give every process the same *signing_key* (HMAC-SHA256, the ``mac`` field) to
make workers refuse payloads nobody with the key made.

Worker pools
------------
The relays of this package are gevent code, which runs without monkey
patching in a prefork or solo pool process (one attempt per process at a
time) as well as in a ``--pool=gevent`` worker. With the Redis broker,
prefer ``--pool=prefork`` (``--concurrency`` attempts at a time): kombu
sweeps for messages left by a dead worker only in workers that run Celery's
event loop, which a ``--pool=gevent`` worker does not (celery issue 4976,
observed with kombu 5.7), so a fleet of gevent-pool workers never brings such
a message back. With RabbitMQ a dead worker's messages come back as soon as
its connection drops, whatever the pool.

The edge process must be gevent-monkey-patched (as the ``slimta`` command
is) so that publishing to the broker does not block other sessions. How long
a publish may take when the broker is down is Celery's configuration
(``broker_connection_timeout``, ``task_publish_retry_policy``).

.. versionadded:: 4.0
   Formerly the python-slimta-celeryqueue distribution; now in the package,
   with the ``[celery]`` extra.
"""

from __future__ import annotations

import functools
import importlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from slimta import logging as slogging
from slimta.celeryqueue._payload import EnvelopeCodec, PayloadError
from slimta.policy import QueuePolicy
from slimta.queue import Backoff, BounceFactory, QueueError, _QueueFront, default_backoff
from slimta.relay import PermanentRelayError, Relay, TransientRelayError
from slimta.smtp.reply import Reply
from slimta.util.ids import preferred_id, uuid4_hex

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["CeleryQueue"]

_log = logging.getLogger(__name__)

#: Name of the registered task, before ``_<suffix>``.
TASK_NAME = "attempt_delivery"

_UNHANDLED = "4.0.0 Unhandled delivery error"
_NO_RESULT = "4.0.0 No delivery result for recipient"
_TOO_MANY_RETRIES = " (Too many retries)"


def _celery_exceptions() -> ModuleType:
    """:mod:`celery.exceptions`, imported on first use."""
    try:
        return importlib.import_module("celery.exceptions")
    except ImportError as exc:
        raise ImportError("slimta.celeryqueue needs Celery: install python-slimta[celery]") from exc


@dataclass(frozen=True, slots=True)
class _Retry:
    """Another attempt is needed."""

    #: Indexes (in the attempted envelope's recipients) that need no more attempt.
    done: tuple[int, ...]
    #: Failed attempts so far, passed to the next one.
    attempts: int
    #: Seconds until the next attempt.
    countdown: float


def _wants_failure_dsn(notify: tuple[str, ...] | None) -> bool:
    # RFC 3461 section 4.1: no NOTIFY leaves it to us (we report failures);
    # NEVER, or a list without FAILURE, asks for no report.
    if notify is None:
        return True
    words = {word.upper() for word in notify}
    return "FAILURE" in words and "NEVER" not in words


def _unhandled_reply(exc: BaseException) -> Reply:
    # The text may go into a bounce or a log line: one line only.
    return Reply("450", f"{_UNHANDLED}: {' '.join(str(exc).split())}")


def _given_up(reply: Reply) -> Reply:
    given_up = Reply(reply.code, (reply.message or "") + _TOO_MANY_RETRIES)
    given_up.address = reply.address
    given_up.command = reply.command
    return given_up


def _group_by_reply(failed: list[tuple[str, Reply]]) -> list[tuple[list[str], Reply]]:
    """Recipients sharing a reply, so that each reply makes one bounce."""
    groups: dict[tuple[str | None, str | None], tuple[list[str], Reply]] = {}
    for rcpt, reply in failed:
        groups.setdefault((reply.code, reply.message), ([], reply))[0].append(rcpt)
    return list(groups.values())


def _log_failures(id: str, failed: list[tuple[str, Reply]], what: str) -> None:
    for rcpt, reply in failed:
        _log.warning("message %s to <%s> %s: %s", id, rcpt, what, reply)


class CeleryQueue(_QueueFront):
    """Publishes each message as a Celery task; workers deliver it.

    On construction a task named ``attempt_delivery`` (``attempt_delivery_``
    + *suffix* with a suffix) is registered on *celery*, the app; route it
    with Celery's ``task_routes`` if it needs a queue of its own. One queue
    per app and suffix: a second one with the same name would share the
    first one's task.

    Outcome of each attempt (``relay._attempt(envelope, attempts)``), as in
    :class:`slimta.queue.Queue`:

    * returns ``None`` or a :class:`~slimta.smtp.reply.Reply`: delivered;
    * raises :class:`~slimta.relay.TransientRelayError`, or anything that
      is not a :class:`~slimta.relay.RelayError` (then the reply is
      ``450 4.0.0 Unhandled delivery error: <exception>``): *backoff* gets
      the new attempt count and says how long to wait; the task is retried
      with that ``countdown``, or, on ``None``, the message fails for good
      with ``" (Too many retries)"`` added to the reply;
    * raises :class:`~slimta.relay.PermanentRelayError`: bounced;
    * returns a dict ``{recipient: result}`` (or a list in recipient order):
      recipients failed for good are bounced (one bounce per distinct reply),
      and the retry carries only the recipients that failed for now (or had
      no result), with the message as it was before the relay policies ran.

    Bounces go through *bounce_factory* to *bounce_queue*; none is made for
    a message from the null sender nor for a recipient whose RCPT ``NOTIFY``
    excludes ``FAILURE`` (RFC 3461). When a bounce cannot be enqueued the
    message is attempted again after :attr:`bounce_retry_delay`, so that the
    report is not lost.

    :param celery: the :class:`celery.Celery` app to register the task on
        and publish through.
    :param relay: the :class:`~slimta.relay.Relay` the workers deliver
        with (a process that only enqueues never calls it).
    :param suffix: added to the task name as ``_<suffix>``, to tell several
        queues of one app apart.
    :param backoff: ``backoff(envelope, attempts) -> seconds | None``, asked
        after each transient failure with the new attempt count; ``None``
        means give up. Default: :func:`slimta.queue.default_backoff`.
    :param bounce_factory: ``bounce_factory(envelope, reply) -> Envelope |
        None``; ``None`` from it means no bounce. Default:
        :class:`slimta.bounce.Bounce`.
    :param bounce_queue: where bounces are enqueued (anything with
        ``enqueue``); default this queue.
    :param signing_key: when set, payloads are signed with HMAC-SHA256 under
        this key, and payloads not signed with it are dropped unread (logged
        at ERROR). Give every process of the queue the same key.
    :param clock: returns the current time in epoch seconds; stamps
        envelopes without a timestamp and drives the default backoff.
    :raises ImportError: Celery is not installed (the ``[celery]`` extra).

    .. versionchanged:: 4.0
       Keyword-only *bounce_queue*, *signing_key* and *clock*. The envelope
       travels as a JSON argument instead of requiring the pickle
       serializer. Retries use Celery's retry (the task id stays the same)
       and carry only the recipients left to deliver; per-recipient results,
       ``NOTIFY`` and the null sender are honoured as by
       :class:`~slimta.queue.Queue`. :meth:`enqueue` returns a
       :class:`~slimta.queue.QueueError` when the broker does not take the
       message, instead of raising.
    """

    #: Seconds before a message is attempted again when a bounce it owes
    #: could not be enqueued, or its outcome could not be worked out.
    bounce_retry_delay = 300.0

    def __init__(
        self,
        celery: Any,
        relay: Relay,
        suffix: str | None = None,
        backoff: Backoff | None = None,
        bounce_factory: BounceFactory | None = None,
        *,
        bounce_queue: Any = None,
        signing_key: bytes | str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._exceptions = _celery_exceptions()
        #: The Celery app.
        self.celery = celery
        #: The :class:`~slimta.relay.Relay`.
        self.relay = relay
        #: Returns the current time in epoch seconds.
        self.clock = clock
        #: ``backoff(envelope, attempts) -> seconds | None``.
        self.backoff: Backoff = backoff or functools.partial(default_backoff, clock=clock)
        self._bounce_factory = bounce_factory
        #: Where bounces are enqueued.
        self.bounce_queue: Any = bounce_queue if bounce_queue is not None else self
        #: :class:`~slimta.policy.QueuePolicy` objects run by :meth:`enqueue`.
        self.queue_policies: list[QueuePolicy] = []
        if isinstance(signing_key, str):
            signing_key = signing_key.encode("utf-8")
        self._codec = EnvelopeCodec(signing_key)
        #: The task's name on the app.
        self.task_name = f"{TASK_NAME}_{suffix}" if suffix else TASK_NAME

        def attempt_delivery(task: Any, payload: Any, attempts: Any) -> None:
            self._run_task(task, payload, attempts)

        #: The registered Celery task; its arguments are a payload and the
        #: number of failed attempts so far.
        self.attempt_task: Any = celery.task(
            attempt_delivery,
            bind=True,
            name=self.task_name,
            # Acknowledge once the outcome is published, not on receipt.
            acks_late=True,
            # A worker process that died mid-attempt: hand the message out again.
            reject_on_worker_lost=True,
            # The backoff decides when to give up, not a retry count.
            max_retries=None,
            ignore_result=True,
            # Not added to apps created later, as a shared task would be.
            shared=False,
        )

    # --- the Queue interface ------------------------------------------------------

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str | QueueError]]:
        """Queue a new message: run the policies, publish one task per envelope.

        An envelope without a :attr:`~slimta.envelope.Envelope.timestamp` is
        stamped with the current time, and one without a
        :attr:`~slimta.envelope.Envelope.queue_id` is given a new one, before
        the policies run. That new id is the id of the (first) task, so the
        ``Received`` header names the task; other tasks get fresh ids.

        :param envelope: the message.
        :returns: ``[(envelope, task_id), ...]``, one per envelope the
            policies made, with a :class:`~slimta.queue.QueueError` instead of
            the id where the broker did not take the task (the edge then
            answers ``451 4.3.0``).
        """
        if envelope.timestamp is None:
            envelope.timestamp = self.clock()
        proposed = None
        if envelope.queue_id is None:
            envelope.queue_id = proposed = uuid4_hex()
        results: list[tuple[Envelope, str | QueueError]] = []
        used: set[str] = set()
        for env in self._apply_policies(envelope):
            # Only an id given out just now is known to be free.
            task_id = preferred_id(proposed, used)
            used.add(task_id)
            results.append((env, self._publish(env, task_id)))
        return results

    def start(self) -> None:
        """Nothing to start: the workers deliver."""

    def kill(self) -> None:
        """Nothing to stop."""

    def flush(self) -> None:
        """Not supported: waiting retries are held by the broker and workers.

        :raises NotImplementedError: always.
        """
        raise NotImplementedError()

    def attempt_delivery(self, envelope: Envelope, attempts: int) -> str | None:
        """Make one delivery attempt of *envelope* in this process.

        The outcome is handled as by the task (see the class notes), except
        that a retry is published as a new task.

        :param envelope: the message.
        :param attempts: how many attempts failed before this one.
        :returns: the id of the task that makes the next attempt, or ``None``
            when nothing is left to do.
        :raises QueueError: the retry could not be published.
        """
        # Taken before the relay policies change the envelope: the next
        # attempt starts from the message as it was queued.
        payload = self._codec.encode(envelope)
        retry = self._deliver(envelope.queue_id or "-", envelope, attempts)
        if retry is None:
            return None
        task_id = uuid4_hex()
        payload = self._remaining(payload, retry.done)
        try:
            self.attempt_task.apply_async(
                args=(payload, retry.attempts), task_id=task_id, countdown=retry.countdown
            )
        except Exception as exc:
            raise QueueError(f"Retry not published: {exc!r}") from exc
        return task_id

    # --- publishing ------------------------------------------------------------------

    def _publish(self, envelope: Envelope, task_id: str) -> str | QueueError:
        """Publish attempt 0 of *envelope*; a failure is returned, not raised."""
        try:
            payload = self._codec.encode(envelope)
            self.attempt_task.apply_async(args=(payload, 0), task_id=task_id)
        except Exception as exc:
            # Broker down or refusing: the client is told to try again later.
            slogging.log_exception(__name__, id=task_id)
            return QueueError(f"Celery did not take the message: {exc!r}")
        return task_id

    def _remaining(self, payload: dict[str, Any], done: Sequence[int]) -> dict[str, Any]:
        """*payload* without the recipients at indexes *done*."""
        if not done:
            return payload
        envelope = self._codec.decode(payload)
        drop = set(done)
        envelope.recipients = [r for i, r in enumerate(envelope.recipients) if i not in drop]
        return self._codec.encode(envelope)

    # --- the worker side ---------------------------------------------------------------

    def _run_task(self, task: Any, payload: Any, attempts: Any) -> None:
        """The body of :attr:`attempt_task`."""
        id = str(task.request.id)
        try:
            if type(attempts) is not int or attempts < 0:
                raise PayloadError(f"bad attempt count {attempts!r}")
            envelope = self._codec.decode(payload)
        except PayloadError as exc:
            # Forged, corrupt or from a differently configured producer;
            # requeueing would only bring it back.
            _log.error("task %s dropped: %s", id, exc)
            return
        try:
            retry = self._deliver(id, envelope, attempts)
        except Exception:
            # The outcome could not be worked out (e.g. the backoff raised):
            # keep the message rather than lose it.
            slogging.log_exception(__name__, id=id)
            retry = _Retry((), attempts, self.bounce_retry_delay)
        if retry is None:
            return
        exceptions = self._exceptions
        try:
            task.retry(
                args=(self._remaining(payload, retry.done), retry.attempts),
                countdown=retry.countdown,
            )
        except exceptions.Retry:
            raise  # published: the worker acknowledges this message
        except Exception as exc:
            # Celery turns a failed publish into Reject(requeue=False), which
            # would drop the message; put it back on the broker instead.
            _log.error("task %s: retry not published (%r), message requeued", id, exc)
            raise exceptions.Reject(exc, requeue=True) from exc

    def _deliver(self, id: str, envelope: Envelope, attempts: int) -> _Retry | None:
        """One attempt of *envelope*; :returns: the retry needed, if any."""
        recipients = list(envelope.recipients)
        try:
            results = self.relay._attempt(envelope, attempts)
        except TransientRelayError as exc:
            return self._retry_later(id, envelope, attempts, [(r, exc.reply) for r in recipients])
        except PermanentRelayError as exc:
            _log_failures(id, [(r, exc.reply) for r in recipients], "failed")
            if not self._bounce(envelope, recipients, exc.reply):
                return _Retry((), attempts, self.bounce_retry_delay)
            return None
        except Exception as exc:
            slogging.log_exception(__name__, id=id)
            reply = _unhandled_reply(exc)
            return self._retry_later(id, envelope, attempts, [(r, reply) for r in recipients])
        if not isinstance(results, Mapping | list | tuple):
            return None
        # Relay policies may have rewritten the addresses the results use.
        names = envelope.recipients if len(envelope.recipients) == len(recipients) else recipients
        done: list[int] = []
        permanent: list[tuple[str, Reply]] = []
        transient: list[tuple[str, Reply]] = []
        missing = object()
        for index, rcpt in enumerate(recipients):
            result: object
            if isinstance(results, Mapping):
                result = results.get(names[index], missing)
            else:
                result = results[index] if index < len(results) else missing
            if isinstance(result, PermanentRelayError):
                done.append(index)
                permanent.append((rcpt, result.reply))
            elif isinstance(result, TransientRelayError):
                transient.append((rcpt, result.reply))
            elif isinstance(result, BaseException):
                transient.append((rcpt, _unhandled_reply(result)))
            elif result is missing:
                # Retrying risks a duplicate; not retrying risks losing mail.
                transient.append((rcpt, Reply("450", _NO_RESULT)))
            else:
                done.append(index)
        if permanent:
            _log_failures(id, permanent, "failed")
        for group, reply in _group_by_reply(permanent):
            if not self._bounce(envelope, group, reply):
                # The bounce was not queued: the recipients are tried (and
                # bounced) again rather than forgotten.
                kept = set(group)
                done = [i for i in done if recipients[i] not in kept]
                transient.extend((rcpt, reply) for rcpt in group)
        if not transient:
            return None
        return self._retry_later(id, envelope, attempts, transient, done)

    def _retry_later(
        self,
        id: str,
        envelope: Envelope,
        attempts: int,
        failed: list[tuple[str, Reply]],
        done: Sequence[int] = (),
    ) -> _Retry | None:
        """Count a failed attempt for *failed*; retry after the backoff, or give up."""
        attempts += 1
        wait = self.backoff(envelope, attempts)
        if wait is None:
            _log_failures(id, failed, f"gave up after {attempts} attempts")
            bounced = [
                self._bounce(envelope, group, _given_up(reply))
                for group, reply in _group_by_reply(failed)
            ]
            if not all(bounced):
                return _Retry(tuple(done), attempts, self.bounce_retry_delay)
            return None
        _log_failures(id, failed, f"deferred (attempt {attempts}, next in {wait:.1f} s)")
        return _Retry(tuple(done), attempts, wait)

    def _bounce(self, envelope: Envelope, recipients: list[str], reply: Reply) -> bool:
        """Enqueue a bounce to the sender of *envelope* for *recipients*.

        :returns: ``False`` when a bounce is due but was not queued.
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
        return queued
