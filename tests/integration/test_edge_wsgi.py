"""WsgiEdge served by gevent.pywsgi on 127.0.0.1, driven by http.client and raw sockets."""

from __future__ import annotations

import base64
import http.client
import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.queue
import pytest
from conftest import HOSTNAME, IO_TIMEOUT, RecordingQueue, reply_is

from slimta.edge.wsgi import WsgiEdge, WsgiResponse, WsgiValidators
from slimta.envelope import Envelope
from slimta.logging import parseline
from slimta.policy.headers import AddReceivedHeader
from slimta.queue import Queue
from slimta.queue.dict import DictStorage
from slimta.relay import Relay
from slimta.smtp.reply import Reply

pytestmark = pytest.mark.timeout(20)

MESSAGE = b"From: a@example.test\r\nSubject: over http\r\n\r\nbody line\r\n"
SENDER = "sender@example.test"
RCPT = "rcpt@example.test"

# Named replies: (code, enhanced status code).
QUEUED = ("250", "2.6.0")
QUEUE_FAILED = ("451", "4.3.0")
INTERNAL = ("451", "4.3.0")
TOO_BIG = ("552", "5.3.4")
BAD_SENDER = ("501", "5.1.7")
BAD_RECIPIENT = ("501", "5.1.3")
NO_RECIPIENTS = ("554", "5.5.1")
BAD_EHLO = ("501", "5.5.4")

Response = tuple[int, http.client.HTTPMessage, bytes]
EdgeFactory = Callable[..., tuple[WsgiEdge, int, Any]]


def enc(text: str) -> str:
    """Base64 of the UTF-8 of *text*, as the envelope headers carry it."""
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def smtp_reply(headers: http.client.HTTPMessage) -> tuple[str, str]:
    """``(code, message)`` of the response's ``X-Smtp-Reply`` header."""
    value = headers["X-Smtp-Reply"]
    assert value is not None, "no X-Smtp-Reply header"
    match = re.fullmatch(r'(\d{3}); message="((?:[^"\\]|\\.)*)"', value)
    assert match is not None, value
    return match.group(1), re.sub(r"\\(.)", r"\1", match.group(2))


def has_reply(headers: http.client.HTTPMessage, named: tuple[str, str | None]) -> bool:
    return reply_is(smtp_reply(headers), named)


@pytest.fixture(autouse=True)
def _no_wsgi_ptr_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PTR queries to the machine's resolver (the unit tests cover them)."""
    monkeypatch.setattr(WsgiEdge, "ptr_lookup", False)


@pytest.fixture
def hub_errors(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[BaseException]]:
    """Exceptions that reached the gevent hub: greenlets that died, and
    application errors pywsgi reports. The test fails at teardown if any."""
    errors: list[BaseException] = []
    hub = gevent.get_hub()
    report_error = hub.handle_error

    def record_error(context: Any, kind: Any, value: Any, tb: Any) -> None:
        errors.append(value if value is not None else kind)
        report_error(context, kind, value, tb)

    monkeypatch.setattr(hub, "handle_error", record_error, raising=False)
    yield errors
    assert not errors, f"unexpected exceptions in greenlets: {errors!r}"


@pytest.fixture
def make_edge(hub_errors: list[BaseException]) -> Iterator[EdgeFactory]:
    """Factory: ``make_edge(**WsgiEdge kwargs) -> (edge, port, queue)``.

    The edge owns a listener on 127.0.0.1 (ephemeral port) and is started;
    the queue is a :class:`RecordingQueue` unless ``queue=`` is given.
    """
    edges: list[WsgiEdge] = []

    def factory(**kwargs: Any) -> tuple[WsgiEdge, int, Any]:
        queue = kwargs.pop("queue", None) or RecordingQueue()
        kwargs.setdefault("hostname", HOSTNAME)
        edge = WsgiEdge(queue, listener=("127.0.0.1", 0), **kwargs)
        edge.server.init_socket()  # bind now, so that the port is known
        edge.start()
        edges.append(edge)
        return edge, edge.server.server_port, queue

    yield factory
    for edge in edges:
        with gevent.Timeout(10, AssertionError("edge.kill() did not return")):
            edge.kill()


@pytest.fixture
def edge(make_edge: EdgeFactory) -> tuple[WsgiEdge, int, Any]:
    return make_edge()


def post(
    port: int,
    body: bytes = MESSAGE,
    *,
    sender: str | None = SENDER,
    recipients: tuple[str, ...] = (RCPT,),
    headers: dict[str, str | None] | None = None,
    path: str = "/",
    method: str = "POST",
    context: ssl.SSLContext | None = None,
) -> Response:
    """One request by http.client; ``None`` in *headers* leaves one out."""
    all_headers: dict[str, str | None] = {"Content-Type": "message/rfc822"}
    if sender is not None:
        all_headers["X-Envelope-Sender"] = enc(sender)
    if recipients:
        all_headers["X-Envelope-Recipient"] = ", ".join(enc(r) for r in recipients)
    all_headers.update(headers or {})
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=IO_TIMEOUT, context=context)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in all_headers.items():
            if value is not None:
                conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


class RawHttp:
    """A raw-socket HTTP client: sends any bytes, parses the response."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> Response:
        response = http.client.HTTPResponse(self.sock)
        response.begin()
        return response.status, response.headers, response.read()

    def at_eof(self) -> bool:
        """True when the server closed the connection."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw() -> Iterator[Callable[[int], RawHttp]]:
    clients: list[RawHttp] = []

    def factory(port: int) -> RawHttp:
        client = RawHttp(port)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


def request_bytes(
    body: bytes = MESSAGE,
    *,
    headers: list[tuple[str, str]] | None = None,
    content_length: int | None = -1,
) -> bytes:
    """A POST request with the default envelope headers plus *headers*.

    *content_length* ``-1`` is the body's true length; ``None`` leaves the
    header out.
    """
    lines = [
        "POST / HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: message/rfc822",
        f"X-Envelope-Sender: {enc(SENDER)}",
        f"X-Envelope-Recipient: {enc(RCPT)}",
    ]
    if content_length == -1:
        content_length = len(body)
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


# Delivery ----------------------------------------------------------------------
def test_message_is_queued_with_its_envelope(edge: tuple[WsgiEdge, int, RecordingQueue]) -> None:
    _, port, queue = edge
    status, headers, body = post(port, headers={"X-Ehlo": "client.test"})
    assert status == 204
    assert body == b""
    assert has_reply(headers, QUEUED)
    assert headers["X-Queue-Id"] == "queue-id-1"
    [envelope] = queue.envelopes
    assert envelope.sender == SENDER
    assert envelope.recipients == [RCPT]
    assert envelope.receiver == HOSTNAME
    assert envelope.timestamp is not None
    assert envelope.client == {
        "ip": "127.0.0.1",
        "host": None,
        "name": "client.test",
        "protocol": "HTTP",
        "auth": None,
    }
    assert b"".join(envelope.flatten()) == MESSAGE


def test_default_ehlo_is_the_address_literal(edge: tuple[WsgiEdge, int, RecordingQueue]) -> None:
    _, port, queue = edge
    assert post(port)[0] == 204
    assert queue.envelopes[0].client["name"] == "[127.0.0.1]"


def test_recipients_split_and_repeated_headers(edge: tuple[WsgiEdge, int, RecordingQueue]) -> None:
    _, port, queue = edge
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    try:
        client.putrequest("POST", "/")
        client.putheader("Content-Type", "message/rfc822")
        client.putheader("X-Envelope-Recipient", f"{enc('a@x.test')}, {enc('b@x.test')}")
        client.putheader("X-Envelope-Recipient", f"{enc('c@x.test')};{enc('d@x.test')}")
        client.putheader("Content-Length", str(len(MESSAGE)))
        client.endheaders(MESSAGE)
        response = client.getresponse()
        response.read()
    finally:
        client.close()
    assert response.status == 204
    [envelope] = queue.envelopes
    assert envelope.recipients == ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
    assert envelope.sender == ""  # no sender header: the null reverse-path


def test_utf8_addresses(edge: tuple[WsgiEdge, int, RecordingQueue]) -> None:
    _, port, queue = edge
    status, _, _ = post(port, sender="pelé@exämple.test", recipients=("δοκιμή@παράδειγμα.test",))
    assert status == 204
    assert queue.envelopes[0].sender == "pelé@exämple.test"
    assert queue.envelopes[0].recipients == ["δοκιμή@παράδειγμα.test"]


def test_keep_alive_serves_several_messages(edge: tuple[WsgiEdge, int, RecordingQueue]) -> None:
    _, port, queue = edge
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    headers = {"Content-Type": "message/rfc822", "X-Envelope-Recipient": enc(RCPT)}
    try:
        for _ in range(3):
            client.request("POST", "/", body=MESSAGE, headers=headers)
            response = client.getresponse()
            response.read()
            assert response.status == 204
    finally:
        client.close()
    assert response.headers["X-Queue-Id"] == "queue-id-3"
    assert len(queue.envelopes) == 3


def test_real_queue_over_dict_storage(make_edge: EdgeFactory) -> None:
    class RecordingRelay(Relay):
        def __init__(self) -> None:
            super().__init__()
            self.delivered: gevent.queue.Queue[Envelope] = gevent.queue.Queue()

        def attempt(self, envelope: Envelope, attempts: int) -> Reply:
            self.delivered.put(envelope)
            return Reply("250", "2.0.0 Ok")

    storage = DictStorage()
    relay = RecordingRelay()
    queue = Queue(storage, relay)
    queue.add_policy(AddReceivedHeader())
    queue.start()
    try:
        _, port, _ = make_edge(queue=queue)
        status, headers, _ = post(port, headers={"X-Ehlo": "client.test"})
        assert status == 204
        assert has_reply(headers, QUEUED)
        queue_id = headers["X-Queue-Id"]
        assert queue_id and queue_id in smtp_reply(headers)[1]
        delivered = relay.delivered.get(timeout=IO_TIMEOUT)
        assert delivered.sender == SENDER
        assert delivered.recipients == [RCPT]
        received = str(delivered.headers["Received"])
        assert "from client.test" in received
        assert "with HTTP" in received
    finally:
        queue.kill(block=True, timeout=IO_TIMEOUT)
        queue.relay_pool.join(timeout=IO_TIMEOUT)


# Routing, method, media type ----------------------------------------------------
@pytest.mark.parametrize("pattern", ["/mail/", re.compile(r"/mail/")])
def test_uri_pattern(make_edge: EdgeFactory, pattern: Any) -> None:
    _, port, queue = make_edge(uri_pattern=pattern)
    status, _, body = post(port, path="/other")
    assert status == 404
    assert isinstance(body, bytes) and body
    assert not queue.envelopes
    assert post(port, path="/mail/inbox")[0] == 204


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_get_405(edge: tuple[WsgiEdge, int, RecordingQueue], method: str) -> None:
    _, port, queue = edge
    status, headers, _ = post(port, method=method)
    assert status == 405
    assert headers["Allow"] == "POST"
    assert not queue.envelopes


def test_wrong_content_type_gets_415(edge: tuple[WsgiEdge, int, RecordingQueue]) -> None:
    _, port, queue = edge
    status, _, _ = post(port, headers={"Content-Type": "text/plain"})
    assert status == 415
    assert not queue.envelopes


@pytest.mark.parametrize("content_type", [None, "Message/RFC822; charset=utf-8"])
def test_accepted_content_types(
    edge: tuple[WsgiEdge, int, RecordingQueue], content_type: str | None
) -> None:
    _, port, queue = edge
    assert post(port, headers={"Content-Type": content_type})[0] == 204
    assert len(queue.envelopes) == 1


# Bad envelopes ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "value", "named", "text"),
    [
        ("X-Envelope-Sender", "not base64!", BAD_SENDER, b"not valid base64"),
        ("X-Envelope-Sender", "YWJj\x7f", BAD_SENDER, b"not valid base64"),
        ("X-Envelope-Sender", "YWJjZA", BAD_SENDER, b"not valid base64"),  # no padding
        ("X-Envelope-Sender", enc("a@b") + " " + enc("c"), BAD_SENDER, b"not valid base64"),
        (
            "X-Envelope-Sender",
            base64.b64encode(b"\xff\xfe@example.test").decode(),
            BAD_SENDER,
            b"not valid UTF-8",
        ),
        (
            "X-Envelope-Sender",
            enc("a@b.test\r\nX-Injected: yes"),
            BAD_SENDER,
            b"control characters",
        ),
        ("X-Envelope-Sender", enc("a@b.test\x00"), BAD_SENDER, b"control characters"),
        ("X-Envelope-Sender", enc("a" * 250 + "@b.test"), BAD_SENDER, b"too long"),
        ("X-Envelope-Recipient", enc("ok@x.test") + ",%%%", BAD_RECIPIENT, b"not valid base64"),
        ("X-Envelope-Recipient", enc("a@b\nc"), BAD_RECIPIENT, b"control characters"),
        ("X-Envelope-Recipient", "", NO_RECIPIENTS, b"No X-Envelope-Recipient"),
        ("X-Envelope-Recipient", " , ;", NO_RECIPIENTS, b"No X-Envelope-Recipient"),
        ("X-Ehlo", "two words", BAD_EHLO, b"Invalid X-Ehlo"),
        ("X-Ehlo", "caf\xe9.test", BAD_EHLO, b"Invalid X-Ehlo"),
        ("X-Ehlo", "a" * 256, BAD_EHLO, b"Invalid X-Ehlo"),
    ],
)
def test_bad_envelope_headers_get_400(
    edge: tuple[WsgiEdge, int, RecordingQueue],
    raw: Callable[[int], RawHttp],
    header: str,
    value: str,
    named: tuple[str, str],
    text: bytes,
) -> None:
    _, port, queue = edge
    client = raw(port)
    data = request_bytes().replace(f"{header}: ".encode(), b"X-Old-" + header.encode() + b": ")
    head, _, body = data.partition(b"\r\n\r\n")
    client.send(head + f"\r\n{header}: {value}\r\n\r\n".encode("latin-1") + body)
    status, headers, response_body = client.response()
    assert status == 400
    assert headers["Content-Type"].startswith("text/plain")
    assert text in response_body
    assert has_reply(headers, named)
    assert not queue.envelopes
    assert queue.calls == 0


def test_no_recipient_header_gets_400(edge: tuple[WsgiEdge, int, RecordingQueue]) -> None:
    _, port, queue = edge
    status, headers, _ = post(port, recipients=())
    assert status == 400
    assert has_reply(headers, NO_RECIPIENTS)
    assert queue.calls == 0


def test_too_many_recipients(make_edge: EdgeFactory) -> None:
    _, port, _ = make_edge(max_recipients=3)
    many = tuple(f"r{i}@x.test" for i in range(4))
    status, headers, _ = post(port, recipients=many)
    assert status == 400
    assert has_reply(headers, ("552", "5.5.3"))
    assert post(port, recipients=many[:3])[0] == 204


# Malformed HTTP -----------------------------------------------------------------
@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"\x00\xff\xfe\r\n\r\n",
        b"POST / HTTP/9.9\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: lots\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
    ],
)
def test_garbage_requests_get_400_and_the_server_goes_on(
    edge: tuple[WsgiEdge, int, RecordingQueue], raw: Callable[[int], RawHttp], garbage: bytes
) -> None:
    _, port, queue = edge
    client = raw(port)
    client.send(garbage)
    status, _, _ = client.response()
    assert status == 400
    assert queue.calls == 0
    assert post(port)[0] == 204


def test_request_line_too_long(
    edge: tuple[WsgiEdge, int, RecordingQueue], raw: Callable[[int], RawHttp]
) -> None:
    _, port, _ = edge
    client = raw(port)
    client.send(b"POST /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")
    assert client.response()[0] == 414
    assert post(port)[0] == 204


def test_huge_header_gets_400(
    edge: tuple[WsgiEdge, int, RecordingQueue], raw: Callable[[int], RawHttp]
) -> None:
    _, port, queue = edge
    client = raw(port)
    client.send(request_bytes(headers=[("X-Huge", "h" * 70000)]))
    assert client.response()[0] == 400
    assert queue.calls == 0
    assert post(port)[0] == 204


def test_missing_content_length_gets_411(
    edge: tuple[WsgiEdge, int, RecordingQueue], raw: Callable[[int], RawHttp]
) -> None:
    _, port, queue = edge
    client = raw(port)
    client.send(request_bytes(b"", content_length=None))
    status, _, body = client.response()
    assert status == 411
    assert body == b"Content-Length is required\n"
    assert queue.calls == 0


def test_short_body_then_close_gets_400(
    edge: tuple[WsgiEdge, int, RecordingQueue], raw: Callable[[int], RawHttp]
) -> None:
    _, port, queue = edge
    client = raw(port)
    client.send(request_bytes(MESSAGE, content_length=len(MESSAGE) + 100))
    client.sock.shutdown(socket.SHUT_WR)
    status, headers, body = client.response()
    assert status == 400
    assert body == b"Incomplete request body\n"
    assert headers["Connection"] == "close"
    assert queue.calls == 0


def test_client_gone_before_the_body(
    edge: tuple[WsgiEdge, int, RecordingQueue], raw: Callable[[int], RawHttp]
) -> None:
    server, port, queue = edge
    client = raw(port)
    client.send(request_bytes(b"", content_length=1000)[:-4])  # not even the blank line
    client.close()
    client = raw(port)
    client.send(request_bytes(b"Subject: x\r\n", content_length=1000))
    client.close()
    # Both connections' greenlets end, having queued nothing.
    assert server.pool.join(timeout=IO_TIMEOUT)
    assert queue.calls == 0
    assert post(port)[0] == 204


def test_stalled_body_times_out(make_edge: EdgeFactory, raw: Callable[[int], RawHttp]) -> None:
    _, port, queue = make_edge(timeout=0.2)
    client = raw(port)
    client.send(request_bytes(MESSAGE, content_length=len(MESSAGE) + 1))
    status, _, _ = client.response()
    assert status == 400
    assert queue.calls == 0


def test_idle_connection_times_out(make_edge: EdgeFactory, raw: Callable[[int], RawHttp]) -> None:
    _, port, _ = make_edge(timeout=0.2)
    client = raw(port)
    assert client.at_eof()


def test_oversized_body_by_content_length_gets_413(
    make_edge: EdgeFactory, raw: Callable[[int], RawHttp]
) -> None:
    _, port, queue = make_edge(max_size=1000)
    client = raw(port)
    # The headers promise more than max_size; the answer comes before any body.
    client.send(request_bytes(b"", content_length=5000))
    status, headers, body = client.response()
    assert status == 413
    assert has_reply(headers, TOO_BIG)
    assert headers["Connection"] == "close"
    assert body == b"Message exceeds 1000 bytes\n"
    assert queue.calls == 0


def test_oversized_body_sent_whole_gets_413(make_edge: EdgeFactory) -> None:
    _, port, queue = make_edge(max_size=1000)
    status, headers, _ = post(port, MESSAGE + b"x" * 2000)
    assert status == 413
    assert has_reply(headers, TOO_BIG)
    assert queue.calls == 0
    assert post(port, b"x" * 1000)[0] == 204  # exactly max_size is fine


def test_chunked_body(make_edge: EdgeFactory, raw: Callable[[int], RawHttp]) -> None:
    _, port, queue = make_edge(max_size=1000)
    client = raw(port)
    body = chunked(MESSAGE[:10], MESSAGE[10:])
    client.send(
        request_bytes(body, content_length=None, headers=[("Transfer-Encoding", "chunked")])
    )
    assert client.response()[0] == 204
    assert b"".join(queue.envelopes[0].flatten()) == MESSAGE


def test_chunked_body_over_max_size_gets_413(
    make_edge: EdgeFactory, raw: Callable[[int], RawHttp]
) -> None:
    _, port, queue = make_edge(max_size=1000)
    client = raw(port)
    body = chunked(b"x" * 600, b"y" * 600)
    client.send(
        request_bytes(body, content_length=None, headers=[("Transfer-Encoding", "chunked")])
    )
    status, headers, _ = client.response()
    assert status == 413
    assert has_reply(headers, TOO_BIG)
    assert queue.calls == 0


def test_broken_chunk_framing_gets_400(
    edge: tuple[WsgiEdge, int, RecordingQueue], raw: Callable[[int], RawHttp]
) -> None:
    _, port, queue = edge
    client = raw(port)
    client.send(
        request_bytes(
            b"zz\r\nnot hex\r\n", content_length=None, headers=[("Transfer-Encoding", "chunked")]
        )
    )
    assert client.response()[0] == 400
    assert queue.calls == 0


# Validators ---------------------------------------------------------------------
class RecordingValidators(WsgiValidators):
    custom_headers = ["X-Api-Key", "X-Absent"]
    seen: list[tuple[str, Any]] = []

    def validate_ehlo(self, ehlo: str) -> None:
        self.seen.append(("ehlo", ehlo))

    def validate_sender(self, sender: str) -> None:
        self.seen.append(("sender", sender))
        if sender == "spammer@example.test":
            raise WsgiResponse("403 Forbidden", [("X-Reason", "denied")], [b"go away\n"])

    def validate_recipient(self, recipient: str) -> None:
        self.seen.append(("rcpt", recipient))
        if recipient == "crash@x.test":
            raise RuntimeError("validator bug")
        if recipient == "str-body@x.test":
            raise WsgiResponse("451 Try Later", [], ["text, not bytes"])  # type: ignore[list-item]
        if recipient == "bad-header@x.test":
            raise WsgiResponse("403 Forbidden", [("X-Bad", "line\r\nbreak")])

    def validate_custom(self, name: str, value: str | None) -> None:
        self.seen.append((name, value))
        if name == "X-Api-Key" and value != "secret":
            raise WsgiResponse("401 Unauthorized", [("WWW-Authenticate", "ApiKey")])


@pytest.fixture
def validated(make_edge: EdgeFactory) -> tuple[WsgiEdge, int, Any]:
    RecordingValidators.seen = []
    return make_edge(validator_class=RecordingValidators)


def test_validators_see_the_decoded_envelope(validated: tuple[WsgiEdge, int, Any]) -> None:
    _, port, queue = validated
    status, _, _ = post(port, recipients=("a@x.test", "b@x.test"), headers={"X-Api-Key": "secret"})
    assert status == 204
    assert RecordingValidators.seen == [
        ("ehlo", "[127.0.0.1]"),
        ("sender", SENDER),
        ("rcpt", "a@x.test"),
        ("rcpt", "b@x.test"),
        ("X-Api-Key", "secret"),
        ("X-Absent", None),
    ]
    assert len(queue.envelopes) == 1


def test_validator_response_ends_the_request(validated: tuple[WsgiEdge, int, Any]) -> None:
    _, port, queue = validated
    status, headers, body = post(port, sender="spammer@example.test")
    assert (status, headers["X-Reason"], body) == (403, "denied", b"go away\n")
    status, headers, _ = post(port, headers={"X-Api-Key": "wrong"})
    assert (status, headers["WWW-Authenticate"]) == (401, "ApiKey")
    assert queue.calls == 0


def test_validator_str_body_is_sent_as_bytes(validated: tuple[WsgiEdge, int, Any]) -> None:
    _, port, queue = validated
    status, _, body = post(port, recipients=("str-body@x.test",), headers={"X-Api-Key": "secret"})
    assert (status, body) == (451, b"text, not bytes")
    assert queue.calls == 0


def test_validator_exception_gets_500(
    validated: tuple[WsgiEdge, int, Any], caplog: pytest.LogCaptureFixture
) -> None:
    _, port, queue = validated
    caplog.set_level(logging.ERROR, logger="slimta.edge.wsgi")
    status, headers, body = post(port, recipients=("crash@x.test",))
    assert status == 500
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert body == b"Internal server error\n"
    assert has_reply(headers, INTERNAL)
    assert any(
        r.getMessage().startswith("exception:RuntimeError:unhandled") for r in caplog.records
    )
    assert queue.calls == 0
    # The server goes on.
    assert post(port, headers={"X-Api-Key": "secret"})[0] == 204


def test_validator_response_the_server_refuses_gets_500(
    validated: tuple[WsgiEdge, int, Any],
) -> None:
    _, port, queue = validated
    status, _, body = post(port, recipients=("bad-header@x.test",), headers={"X-Api-Key": "secret"})
    assert (status, body) == (500, b"Internal server error\n")
    assert queue.calls == 0


# Queue outcomes -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "status", "named"),
    [
        (None, 503, QUEUE_FAILED),
        (Reply("452", "4.2.2 Mailbox full"), 503, ("452", "4.2.2")),
        (Reply("550", "5.7.1 Rejected"), 500, ("550", "5.7.1")),
        (Reply("554", '5.6.0 Say "no" \\ please'), 500, ("554", "5.6.0")),
        (Reply("535", "5.7.8 Authentication credentials invalid"), 401, ("535", "5.7.8")),
    ],
)
def test_queue_refusals(
    edge: tuple[WsgiEdge, int, RecordingQueue],
    reply: Reply | None,
    status: int,
    named: tuple[str, str],
) -> None:
    _, port, queue = edge
    queue.fail_with(reply)
    got_status, headers, body = post(port)
    assert got_status == status
    assert has_reply(headers, named)
    if reply is not None:
        assert smtp_reply(headers)[1] == reply.message
    assert headers["X-Queue-Id"] is None
    assert isinstance(body, bytes) and body.startswith(named[0].encode())


def test_queue_exception_gets_503(edge: tuple[WsgiEdge, int, RecordingQueue]) -> None:
    _, port, queue = edge
    queue.exception = RuntimeError("storage on fire")
    status, headers, _ = post(port)
    assert status == 503
    assert has_reply(headers, QUEUE_FAILED)
    assert smtp_reply(headers)[1] == "4.3.0 Error queuing message"


# TLS ----------------------------------------------------------------------------
def test_https_with_context(
    make_edge: EdgeFactory, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    _, port, queue = make_edge(context=server_context)
    status, headers, _ = post(port, context=client_context)
    assert status == 204
    assert has_reply(headers, QUEUED)
    assert queue.envelopes[0].client["protocol"] == "HTTPS"


def test_plain_text_to_tls_port_is_dropped(
    make_edge: EdgeFactory,
    raw: Callable[[int], RawHttp],
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="slimta.http.wsgi")
    _, port, queue = make_edge(context=server_context)
    client = raw(port)
    client.send(request_bytes())
    assert client.at_eof()
    assert queue.calls == 0
    assert any(":error " in r.getMessage() for r in caplog.records)
    assert post(port, context=client_context)[0] == 204


def test_stalled_tls_handshake_times_out(
    make_edge: EdgeFactory, raw: Callable[[int], RawHttp], server_context: ssl.SSLContext
) -> None:
    _, port, _ = make_edge(context=server_context, timeout=0.2)
    assert raw(port).at_eof()


# The 4.0 ways of serving --------------------------------------------------------
def test_build_server(
    hub_errors: list[BaseException],
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    queue = RecordingQueue()
    edge = WsgiEdge(queue, HOSTNAME)
    assert edge.server is None
    plain = edge.build_server(("127.0.0.1", 0))
    tls = edge.build_server(("127.0.0.1", 0), ssl_args={"ssl_context": server_context})
    plain.start()
    tls.start()
    try:
        assert post(plain.server_port)[0] == 204
        assert post(tls.server_port, context=client_context)[0] == 204
    finally:
        plain.stop()
        tls.stop()
    assert [e.client["protocol"] for e in queue.envelopes] == ["HTTP", "HTTPS"]


def test_start_without_listener_raises() -> None:
    edge = WsgiEdge(RecordingQueue())
    with pytest.raises(ValueError, match="no listener"):
        edge.start()
    edge.kill()


def test_stop_closes_the_listener(make_edge: EdgeFactory) -> None:
    edge, port, _ = make_edge()
    assert post(port)[0] == 204
    edge.stop(grace=1.0)
    with pytest.raises(OSError):
        post(port)


# Logging ------------------------------------------------------------------------
def test_requests_and_responses_are_logged(
    validated: tuple[WsgiEdge, int, Any], caplog: pytest.LogCaptureFixture
) -> None:
    _, port, _ = validated
    caplog.set_level(logging.DEBUG, logger="slimta.http.wsgi")
    assert post(port, headers={"X-Api-Key": "secret"})[0] == 204
    assert post(port, recipients=("crash@x.test",))[0] == 500
    lines = [
        parseline(r.getMessage())
        for r in caplog.records
        if r.name == "slimta.http.wsgi" and r.getMessage().startswith("http:")
    ]
    operations = [(op, data.get("status")) for _, _, op, data in lines]
    assert operations == [
        ("server_request", None),
        ("server_response", "204 No Content"),
        ("server_request", None),
        ("server_response", "500 Internal Server Error"),
    ]
    # A request and its response share the id.
    assert lines[0][1] == lines[1][1]
    assert lines[2][1] == lines[3][1]
    assert lines[0][3]["method"] == "POST"
    assert ("X-Envelope-Recipient", enc(RCPT)) in lines[0][3]["headers"]
