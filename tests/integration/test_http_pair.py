"""HttpRelay delivering to WsgiEdge over 127.0.0.1, with and without TLS.

The two halves of slimta's HTTP transport against each other: what the relay
sends must arrive as the same envelope, and what the edge (its validators,
its limits, its queue) answers must come back as the right relay outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.queue
import pytest
from conftest import HOSTNAME, RecordingQueue

from slimta.edge.wsgi import WsgiEdge, WsgiResponse, WsgiValidators
from slimta.envelope import Envelope
from slimta.queue import Queue
from slimta.queue.dict import DictStorage
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.http import HttpRelay
from slimta.relay.smtp import SmtpPermanentRelayError, SmtpTransientRelayError
from slimta.smtp.reply import Reply

pytestmark = pytest.mark.timeout(30)

#: Seconds a test waits for anything before failing.
WAIT = 5.0

MESSAGE = b"From: sender@example.com\r\nSubject: over http\r\n\r\nline one\r\nline two\r\n"

# Named replies: (code, enhanced status code).
QUEUED = ("250", "2.6.0")
NOT_ALLOWED = ("550", "5.7.1")
NO_RECIPIENTS = ("554", "5.5.1")
TOO_BIG = ("552", "5.3.4")
QUOTA = ("452", "4.2.2")
REFUSED = ("554", "5.7.1")
HTTP_PERMANENT = ("550", "5.0.0")
HTTP_TRANSIENT = ("450", "4.0.0")

EdgeFactory = Callable[..., tuple[WsgiEdge, int, Any]]


def is_(reply: Reply | None, named: tuple[str, str]) -> bool:
    assert reply is not None
    return reply.code == named[0] and reply.enhanced_status_code == named[1]


def message(sender: str = "sender@example.com", rcpts: list[str] | None = None) -> Envelope:
    env = Envelope(sender, rcpts if rcpts is not None else ["rcpt@example.com"])
    env.parse(MESSAGE)
    return env


class Validators(WsgiValidators):
    """Refuses senders and recipients by their local part; records the
    client port of each request (one per connection)."""

    ports: list[str] = []

    def validate_sender(self, sender: str) -> None:
        type(self).ports.append(self.environ["REMOTE_PORT"])
        if sender.startswith("spammer@"):
            reply = '550; message="5.7.1 Sender not allowed"; command="MAIL"'
            raise WsgiResponse("403 Forbidden", [("X-Smtp-Reply", reply)])
        if sender.startswith("blocked@"):
            raise WsgiResponse("403 Forbidden")
        if sender.startswith("later@"):
            raise WsgiResponse("503 Service Unavailable")

    def validate_recipient(self, recipient: str) -> None:
        if recipient.startswith("full@"):
            reply = '452; message="4.2.2 Mailbox full"; command="RCPT"'
            raise WsgiResponse("503 Service Unavailable", [("X-Smtp-Reply", reply)])


@pytest.fixture
def validators() -> type[Validators]:
    class Fresh(Validators):
        ports: list[str] = []

    return Fresh


@pytest.fixture(autouse=True)
def _no_wsgi_ptr_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PTR queries to the machine's resolver."""
    monkeypatch.setattr(WsgiEdge, "ptr_lookup", False)


@pytest.fixture
def make_edge() -> Iterator[EdgeFactory]:
    """``make_edge(**WsgiEdge kwargs) -> (edge, port, queue)``: a started edge
    on 127.0.0.1 with a :class:`RecordingQueue` unless ``queue=`` is given."""
    edges: list[WsgiEdge] = []

    def factory(**kwargs: Any) -> tuple[WsgiEdge, int, Any]:
        queue = kwargs.pop("queue", None) or RecordingQueue()
        kwargs.setdefault("hostname", HOSTNAME)
        edge = WsgiEdge(queue, listener=("127.0.0.1", 0), **kwargs)
        edge.server.init_socket()
        edge.start()
        edges.append(edge)
        return edge, edge.server.server_port, queue

    yield factory
    for edge in edges:
        with gevent.Timeout(10, AssertionError("edge.kill() did not return")):
            edge.kill()


@pytest.fixture
def relays() -> Iterator[Callable[..., HttpRelay]]:
    made: list[HttpRelay] = []

    def factory(url: str, **kwargs: Any) -> HttpRelay:
        kwargs.setdefault("ehlo_as", "relay.test")
        kwargs.setdefault("timeout", WAIT)
        relay = HttpRelay(url, **kwargs)
        made.append(relay)
        return relay

    yield factory
    for relay in made:
        relay.kill()


# ----------------------------------------------------------------- delivery
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_message_arrives_as_sent(
    make_edge: EdgeFactory,
    relays: Any,
    validators: type[Validators],
    tls: bool,
    server_context: Any,
    client_context: Any,
) -> None:
    kwargs = {"context": server_context} if tls else {}
    _, port, queue = make_edge(validator_class=validators, **kwargs)
    scheme = "https" if tls else "http"
    relay = relays(
        f"{scheme}://127.0.0.1:{port}/",
        context=client_context if tls else None,
        idle_timeout=WAIT,
    )
    rcpts = ["a@example.com", "b\u00e9@\u00e9xample.com", "c@example.com"]
    reply = relay.attempt(message("s\u00e9nder@example.com", rcpts), 0)
    assert isinstance(reply, Reply) and is_(reply, QUEUED)
    assert (reply.message or "").startswith("2.6.0 Message accepted for delivery")
    (env,) = queue.envelopes
    assert env.sender == "s\u00e9nder@example.com"
    assert env.recipients == rcpts
    assert env.headers["Subject"] == "over http"
    assert env.message == b"line one\r\nline two\r\n"
    assert env.receiver == HOSTNAME
    assert env.client["name"] == "relay.test"
    assert env.client["ip"] == "127.0.0.1"
    assert env.client["protocol"] == ("HTTPS" if tls else "HTTP")

    # More messages reuse the connection.
    for _ in range(2):
        assert is_(relay.attempt(message(), 0), QUEUED)
    assert len(queue.envelopes) == 3
    assert len(set(validators.ports)) == 1


def test_null_sender_and_callable_ehlo(make_edge: EdgeFactory, relays: Any) -> None:
    _, port, queue = make_edge()
    relay = relays(f"http://127.0.0.1:{port}/", ehlo_as=lambda: "called.test")
    assert is_(relay.attempt(message(""), 0), QUEUED)
    (env,) = queue.envelopes
    assert env.sender == ""
    assert env.client["name"] == "called.test"


def test_through_real_queues(make_edge: EdgeFactory, relays: Any) -> None:
    """Queue -> HttpRelay -> WsgiEdge -> Queue -> the final relay."""

    class Final:
        def __init__(self) -> None:
            self.delivered: gevent.queue.Queue[Envelope] = gevent.queue.Queue()

        def _attempt(self, envelope: Envelope, attempts: int) -> Reply:
            self.delivered.put(envelope)
            return Reply("250", "2.0.0 Ok")

    def no_bounce(envelope: Envelope, reply: Reply) -> None:
        raise AssertionError(f"unexpected bounce: {reply}")

    final = Final()
    inbound = Queue(DictStorage(), final, bounce_factory=no_bounce)  # type: ignore[arg-type]
    inbound.start()
    _, port, _ = make_edge(queue=inbound)
    outbound = Queue(DictStorage(), relays(f"http://127.0.0.1:{port}/"), bounce_factory=no_bounce)
    outbound.start()
    try:
        outbound.enqueue(message(rcpts=["x@example.com", "y@example.com"]))
        env = final.delivered.get(timeout=WAIT)
        assert env.sender == "sender@example.com"
        assert env.recipients == ["x@example.com", "y@example.com"]
        assert env.client["name"] == "relay.test"
    finally:
        for queue in (outbound, inbound):
            queue.kill(block=True, timeout=WAIT)
            queue.relay_pool.join(timeout=WAIT)


# ----------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("sender", "rcpts", "error", "named"),
    [
        ("spammer@example.com", None, SmtpPermanentRelayError, NOT_ALLOWED),
        ("sender@example.com", ["full@example.com"], SmtpTransientRelayError, QUOTA),
        # Validator responses without an SMTP reply: the HTTP status decides.
        ("blocked@example.com", None, PermanentRelayError, HTTP_PERMANENT),
        ("later@example.com", None, TransientRelayError, HTTP_TRANSIENT),
        # The edge's own checks.
        ("sender@example.com", [], SmtpPermanentRelayError, NO_RECIPIENTS),
    ],
)
def test_validator_refusals(
    make_edge: EdgeFactory,
    relays: Any,
    validators: type[Validators],
    sender: str,
    rcpts: list[str] | None,
    error: type[Exception],
    named: tuple[str, str],
) -> None:
    _, port, queue = make_edge(validator_class=validators)
    relay = relays(f"http://127.0.0.1:{port}/", idle_timeout=WAIT)
    with pytest.raises(error) as info:
        relay.attempt(message(sender, rcpts), 0)
    assert type(info.value) is error
    assert is_(info.value.reply, named)
    assert queue.envelopes == []
    # The connection is still good for the next message.
    assert is_(relay.attempt(message(), 0), QUEUED)


def test_refusal_names_the_command(
    make_edge: EdgeFactory, relays: Any, validators: type[Validators]
) -> None:
    _, port, _ = make_edge(validator_class=validators)
    with pytest.raises(SmtpPermanentRelayError) as info:
        relays(f"http://127.0.0.1:{port}/").attempt(message("spammer@example.com"), 0)
    assert info.value.reply.command == "MAIL"
    assert str(info.value) == "Permanent failure on MAIL: 550 5.7.1 Sender not allowed"


def test_message_too_big(make_edge: EdgeFactory, relays: Any) -> None:
    _, port, queue = make_edge(max_size=1000)
    env = Envelope("sender@example.com", ["rcpt@example.com"])
    env.parse(b"Subject: big\r\n\r\n" + b"x" * 5000)
    relay = relays(f"http://127.0.0.1:{port}/", idle_timeout=WAIT)
    with pytest.raises(SmtpPermanentRelayError) as info:
        relay.attempt(env, 0)
    assert is_(info.value.reply, TOO_BIG)
    assert queue.envelopes == []
    # The edge closed that connection; the next message gets a new one.
    assert is_(relay.attempt(message(), 0), QUEUED)


@pytest.mark.parametrize(
    ("reply", "error", "named"),
    [
        (Reply("452", "4.2.2 Over quota"), SmtpTransientRelayError, QUOTA),
        (Reply("554", "5.7.1 Refused"), SmtpPermanentRelayError, REFUSED),
    ],
)
def test_queue_refusals(
    make_edge: EdgeFactory,
    relays: Any,
    reply: Reply,
    error: type[Exception],
    named: tuple[str, str],
) -> None:
    _, port, queue = make_edge()
    queue.fail_with(reply)
    with pytest.raises(error) as info:
        relays(f"http://127.0.0.1:{port}/").attempt(message(), 0)
    assert is_(info.value.reply, named)


def test_wrong_path(make_edge: EdgeFactory, relays: Any) -> None:
    _, port, _ = make_edge(uri_pattern="/deliver")
    with pytest.raises(PermanentRelayError) as info:
        relays(f"http://127.0.0.1:{port}/elsewhere").attempt(message(), 0)
    assert is_(info.value.reply, HTTP_PERMANENT)
    assert is_(relays(f"http://127.0.0.1:{port}/deliver").attempt(message(), 0), QUEUED)


def test_tls_name_mismatch_is_transient(
    make_edge: EdgeFactory, relays: Any, server_context: Any, client_context: Any
) -> None:
    _, port, queue = make_edge(context=server_context)
    # The certificate names mx.test and 127.0.0.1, not localhost.
    relay = relays(f"https://localhost:{port}/", context=client_context)
    with pytest.raises(TransientRelayError) as info:
        relay.attempt(message(), 0)
    assert is_(info.value.reply, ("451", "4.7.0"))
    assert queue.envelopes == []
