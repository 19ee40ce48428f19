"""SmtpEdge in front of a real Queue over DictStorage, driven by smtplib."""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.queue
import pytest

from slimta.envelope import Envelope
from slimta.queue import Queue, QueueError
from slimta.queue.dict import DictStorage
from slimta.relay import Relay
from slimta.smtp.reply import Reply

pytestmark = pytest.mark.timeout(20)

#: Seconds a test waits for the queue before failing.
WAIT = 5.0

# Named replies: (code, enhanced status code).
QUEUED = ("250", "2.6.0")
QUEUE_FAILED = ("451", "4.3.0")
QUOTA = ("452", "4.2.2")

MESSAGE = b"From: a@example.test\r\nSubject: queued\r\n\r\nbody line\r\n"


class RecordingRelay(Relay):
    """Puts every envelope it is given on :attr:`delivered`."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered: gevent.queue.Queue[Envelope] = gevent.queue.Queue()

    def attempt(self, envelope: Envelope, attempts: int) -> Reply:
        self.delivered.put(envelope)
        return Reply("250", "2.0.0 Ok")


class RecordingStorage(DictStorage):
    """DictStorage that remembers every id it handed out, and can fail."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.error: QueueError | None = None

    def write(self, envelope: Envelope, timestamp: float) -> str:
        if self.error is not None:
            raise self.error
        id = super().write(envelope, timestamp)
        self.ids.append(id)
        return id


def no_bounce(envelope: Envelope, reply: Reply) -> None:
    raise AssertionError(f"unexpected bounce: {reply}")


@pytest.fixture
def queued_edge(
    make_edge: Callable[..., tuple[Any, int, Any]],
) -> Iterator[tuple[int, Queue, RecordingStorage, RecordingRelay]]:
    storage = RecordingStorage()
    relay = RecordingRelay()
    queue = Queue(storage, relay, bounce_factory=no_bounce)
    queue.start()
    _, port, _ = make_edge(queue=queue)
    yield port, queue, storage, relay
    queue.kill(block=True, timeout=WAIT)
    queue.relay_pool.join(timeout=WAIT)


def send(client: smtplib.SMTP, message: bytes = MESSAGE) -> tuple[int, bytes]:
    client.ehlo("client.test")
    assert client.mail("sender@example.test")[0] == 250
    assert client.rcpt("rcpt@example.test")[0] == 250
    return client.data(message)


def test_message_reaches_relay_and_reply_names_queue_id(
    queued_edge: tuple[int, Queue, RecordingStorage, RecordingRelay],
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
) -> None:
    port, queue, storage, relay = queued_edge
    reply = send(smtp(port))
    assert reply_is(reply, QUEUED), reply
    envelope = relay.delivered.get(timeout=WAIT)
    [id] = storage.ids
    assert reply[1].decode().endswith(f"queued as {id}")
    assert envelope.sender == "sender@example.test"
    assert envelope.recipients == ["rcpt@example.test"]
    assert envelope.headers is not None and envelope.headers["Subject"] == "queued"
    assert envelope.receiver == "mx.test"
    assert envelope.timestamp is not None
    assert queue.relay_pool.join(timeout=WAIT)
    assert storage.get_info()["size"] == 0


def test_storage_queue_error_gives_451(
    queued_edge: tuple[int, Queue, RecordingStorage, RecordingRelay],
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
) -> None:
    port, _, storage, relay = queued_edge
    storage.error = QueueError()
    reply = send(smtp(port))
    assert reply_is(reply, QUEUE_FAILED), reply
    assert relay.delivered.empty()


def test_storage_queue_error_reply_is_sent(
    queued_edge: tuple[int, Queue, RecordingStorage, RecordingRelay],
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
) -> None:
    port, _, storage, _ = queued_edge
    storage.error = QueueError("quota", Reply("452", "4.2.2 Queue full"))
    reply = send(smtp(port))
    assert reply_is(reply, QUOTA), reply


def test_several_messages_on_one_session(
    queued_edge: tuple[int, Queue, RecordingStorage, RecordingRelay],
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
) -> None:
    port, queue, storage, relay = queued_edge
    client = smtp(port)
    for _ in range(3):
        assert reply_is(send(client), QUEUED)
    subjects = [relay.delivered.get(timeout=WAIT).headers["Subject"] for _ in range(3)]
    assert subjects == ["queued"] * 3
    assert len(set(storage.ids)) == 3
    assert queue.relay_pool.join(timeout=WAIT)
    assert storage.get_info()["size"] == 0
