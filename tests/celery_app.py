"""The Celery app of the CeleryQueue tests, for the test process and for
the ``celery worker`` processes the tests start.

The worker loads it with ``celery -A celery_app worker`` (``tests/`` on
``PYTHONPATH``); the module attribute ``app`` is built on first access
(PEP 562) from the environment, so importing this module has no side
effects:

* ``SLIMTA_TEST_BROKER``: the broker URL, a ``redis://`` URL;
* ``SLIMTA_TEST_RECORD``: the ``redis://`` URL where :class:`RecordingRelay`
  records what it does;
* ``SLIMTA_TEST_VISIBILITY_TIMEOUT``: optional, the Redis transport's
  ``visibility_timeout`` in seconds (default :data:`VISIBILITY_TIMEOUT`).

The relay decides each recipient's fate from its local part:

* ``flaky-*``: a transient failure at the first attempt, then delivered;
* ``defer-*``: a transient failure at every attempt;
* ``reject-*``: a permanent failure;
* ``slow-*``: at the first attempt, pushes a record to ``started`` and
  blocks on the ``release`` list for up to a minute (the tests kill the
  worker meanwhile); delivered at later attempts;
* anything else: delivered.

Every attempt is pushed as JSON to the Redis list ``attempts``, and every
delivered recipient group to ``deliveries`` (with the whole message); a
worker pushes its pid to ``ready`` once it consumes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from slimta.celeryqueue import CeleryQueue
from slimta.envelope import Envelope
from slimta.relay import PermanentRelayError, RecipientResult, Relay, TransientRelayError

__all__ = [
    "BROKER_ENV",
    "RECORD_ENV",
    "SUFFIX",
    "VISIBILITY_ENV",
    "VISIBILITY_TIMEOUT",
    "RecordingRelay",
    "backoff",
    "make_app",
    "make_queue",
]

BROKER_ENV = "SLIMTA_TEST_BROKER"
RECORD_ENV = "SLIMTA_TEST_RECORD"
#: The queue's task is ``attempt_delivery_<SUFFIX>``.
SUFFIX = "test"
#: Overrides :data:`VISIBILITY_TIMEOUT` (seconds) in the worker.
VISIBILITY_ENV = "SLIMTA_TEST_VISIBILITY_TIMEOUT"
#: Seconds before Redis hands an unacknowledged message out again (the
#: default is an hour): short, so that the SIGKILL test does not wait long;
#: longer than any retry countdown, and than a prefork worker takes to start
#: a task it received (else it would restore its own running task).
VISIBILITY_TIMEOUT = 5
#: The test backoff's countdown, in seconds.
RETRY_AFTER = 0.1
#: Attempts after which the test backoff gives up.
MAX_ATTEMPTS = 3


def backoff(envelope: Envelope, attempts: int) -> float | None:
    """Retry after :data:`RETRY_AFTER` seconds; give up after :data:`MAX_ATTEMPTS`."""
    return RETRY_AFTER if attempts < MAX_ATTEMPTS else None


def make_app(broker_url: str, visibility_timeout: float = VISIBILITY_TIMEOUT) -> Any:
    """A Celery app on *broker_url*, configured for quick tests."""
    from celery import Celery

    app = Celery("slimta_celeryqueue_tests", broker=broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            # Look for unacknowledged messages to restore every second.
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
    )
    return app


def make_queue(app: Any, relay: Relay, **kwargs: Any) -> CeleryQueue:
    """The queue every process of a test builds, on *app*."""
    kwargs.setdefault("backoff", backoff)
    return CeleryQueue(app, relay, SUFFIX, **kwargs)


class RecordingRelay(Relay):
    """Delivers by recording into Redis; fails as the recipients ask."""

    def __init__(self, record_url: str) -> None:
        super().__init__()
        import redis

        self.redis = redis.Redis.from_url(record_url, socket_timeout=90)

    def _push(self, key: str, **fields: Any) -> None:
        fields.update(time=time.time(), pid=os.getpid())
        self.redis.rpush(key, json.dumps(fields))

    def _fate(self, rcpt: str) -> RecipientResult:
        local = rcpt.partition("@")[0]
        tries = int(self.redis.incr(f"tries:{rcpt}"))
        if local.startswith("flaky-") and tries == 1:
            return TransientRelayError("flaky: try again")
        if local.startswith("defer-"):
            return TransientRelayError("deferred: try again")
        if local.startswith("reject-"):
            return PermanentRelayError("rejected for good")
        if local.startswith("slow-") and tries == 1:
            self._push("started", recipients=[rcpt])
            self.redis.blpop(["release"], timeout=60)
        return None

    def attempt(self, envelope: Envelope, attempts: int) -> Any:
        self._push(
            "attempts",
            sender=envelope.sender,
            recipients=envelope.recipients,
            attempts=attempts,
        )
        fates = {rcpt: self._fate(rcpt) for rcpt in envelope.recipients}
        delivered = [rcpt for rcpt, fate in fates.items() if fate is None]
        if delivered:
            header, body = envelope.flatten()
            self._push(
                "deliveries",
                sender=envelope.sender,
                recipients=delivered,
                attempts=attempts,
                queue_id=envelope.queue_id,
                message=(header + body).decode("utf-8", "replace"),
            )
        if len(fates) == 1:
            # One recipient: report the whole message's outcome.
            (fate,) = fates.values()
            if isinstance(fate, Exception):
                raise fate
            return None
        return fates


_app: Any = None


def __getattr__(name: str) -> Any:
    # ``celery -A celery_app`` reads ``app``: build it (and the queue, which
    # registers the task) only then, from the environment.
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        from celery.signals import worker_ready

        relay = RecordingRelay(os.environ[RECORD_ENV])
        visibility = float(os.environ.get(VISIBILITY_ENV, VISIBILITY_TIMEOUT))
        _app = make_app(os.environ[BROKER_ENV], visibility)
        make_queue(_app, relay)

        def ready(**_: Any) -> None:
            # The tests wait for this before they count on the worker.
            relay.redis.rpush("ready", os.getpid())

        worker_ready.connect(ready, weak=False)
    return _app
