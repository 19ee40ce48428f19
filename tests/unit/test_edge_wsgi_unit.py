"""WsgiEdge and WsgiServer called as WSGI applications with crafted environs.

No sockets: each test builds an environ (``wsgiref.util.setup_testing_defaults``
plus the request), calls the application, and looks at what it answered and
what it queued. Most calls go through :func:`wsgiref.validate.validator`, which
fails the test on any WSGI violation (a ``str`` body, a bad header).
"""

from __future__ import annotations

import base64
import io
import logging
import re
import sys
from collections.abc import Iterable
from typing import Any
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest

from slimta.edge import Edge
from slimta.edge import wsgi as edge_wsgi
from slimta.edge.wsgi import DEFAULT_MAX_SIZE, WsgiEdge, WsgiResponse, WsgiValidators
from slimta.envelope import Envelope
from slimta.http.wsgi import WsgiServer
from slimta.logging import parseline
from slimta.queue import QueueError
from slimta.smtp.reply import Reply

MESSAGE = b"From: a@example.test\r\nSubject: unit\r\n\r\nbody\r\n"
SENDER = "sender@example.test"
RCPT = "rcpt@example.test"


def enc(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class Queue:
    """Records envelopes; answers each with ``results`` if set."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.results: list[Any] | None = None

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, Any]]:
        self.envelopes.append(envelope)
        if self.results is not None:
            return [(envelope, result) for result in self.results]
        return [(envelope, f"id-{len(self.envelopes)}")]


class Unreadable(io.RawIOBase):
    """A ``wsgi.input`` that fails the test if read, or raises *error*."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            raise self.error
        raise AssertionError("the body was read")


def environ_for(body: bytes = MESSAGE, **changes: Any) -> dict[str, Any]:
    """A POST of *body* with the default envelope; *changes* replace keys,
    and a value of ``None`` removes one."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "REMOTE_ADDR": "192.0.2.1",
        "CONTENT_TYPE": "message/rfc822",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_X_ENVELOPE_SENDER": enc(SENDER),
        "HTTP_X_ENVELOPE_RECIPIENT": enc(RCPT),
        "QUERY_STRING": "",
        "wsgi.input": io.BytesIO(body),
    }
    setup_testing_defaults(environ)
    for key, value in changes.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return environ


class StartResponse:
    """Records the call; checks headers as gevent does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]], Any]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        for _name, value in headers:
            if "\r" in value or "\n" in value:
                raise ValueError("carriage return or newline in header value", value)
            value.encode("latin-1")
        self.calls.append((status, headers, exc_info))
        return lambda data: None


class Answer:
    """What the application answered."""

    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.code = int(status.split()[0])
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def smtp(self) -> tuple[str, str] | None:
        value = self.header("X-Smtp-Reply")
        if value is None:
            return None
        match = re.fullmatch(r'(\d{3}); message="((?:[^"\\]|\\.)*)"', value)
        assert match is not None, value
        return match.group(1), re.sub(r"\\(.)", r"\1", match.group(2))


def call(app: Any, environ: dict[str, Any], *, validate: bool = True) -> Answer:
    start_response = StartResponse()
    wrapped = validator(app) if validate else app
    result = wrapped(environ, start_response)
    try:
        chunks = list(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    assert all(isinstance(chunk, bytes) for chunk in chunks)
    status, headers, _ = start_response.calls[-1]
    return Answer(status, headers, b"".join(chunks))


@pytest.fixture(autouse=True)
def _no_ptr_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WsgiEdge, "ptr_lookup", False)


@pytest.fixture
def queue() -> Queue:
    return Queue()


@pytest.fixture
def edge(queue: Queue) -> WsgiEdge:
    return WsgiEdge(queue, "mx.test")


# Accepted -----------------------------------------------------------------------
def test_accepted_message(edge: WsgiEdge, queue: Queue) -> None:
    answer = call(edge, environ_for(HTTP_X_EHLO="client.test"))
    assert answer.code == 204
    assert answer.body == b""
    assert answer.smtp == ("250", "2.6.0 Message accepted for delivery; queued as id-1")
    assert answer.header("X-Queue-Id") == "id-1"
    [envelope] = queue.envelopes
    assert (envelope.sender, envelope.recipients) == (SENDER, [RCPT])
    assert envelope.receiver == "mx.test"
    assert envelope.client == {
        "ip": "192.0.2.1",
        "host": None,
        "name": "client.test",
        "protocol": "HTTP",
        "auth": None,
    }
    assert b"".join(envelope.flatten()) == MESSAGE


def test_every_queue_id_is_listed(edge: WsgiEdge, queue: Queue) -> None:
    queue.results = ["id-a", QueueError(), "id-b"]
    answer = call(edge, environ_for())
    assert answer.code == 204
    assert answer.header("X-Queue-Id") == "id-a, id-b"


def test_wsgi_edge_is_an_edge_and_a_wsgi_server(edge: WsgiEdge) -> None:
    assert isinstance(edge, Edge)
    assert isinstance(edge, WsgiServer)
    assert edge.server is None
    assert edge.max_size == DEFAULT_MAX_SIZE == 10 * 1024 * 1024
    assert edge.timeout == 60.0
    assert (edge.http_verb, edge.sender_header, edge.rcpt_header, edge.ehlo_header) == (
        "POST",
        "X-Envelope-Sender",
        "X-Envelope-Recipient",
        "X-Ehlo",
    )


def test_positional_4_0_signature(queue: Queue) -> None:
    edge = WsgiEdge(queue, "h.test", WsgiValidators, "/in")
    assert edge.hostname == "h.test"
    assert edge.validator_class is WsgiValidators
    assert edge.uri_pattern is not None and edge.uri_pattern.pattern == "/in"


@pytest.mark.parametrize(
    ("remote_addr", "ehlo", "ip"),
    [
        ("192.0.2.7", "[192.0.2.7]", "192.0.2.7"),
        ("2001:db8:0:0::1", "[IPv6:2001:db8::1]", "2001:db8:0:0::1"),
        ("fe80::1%eth0", "[IPv6:fe80::1%eth0]", "fe80::1%eth0"),
        ("not-an-ip", "[unknown]", None),
        ("192.0.2.1\r\nX-Forged: 1", "[unknown]", None),
        (None, "[unknown]", None),
    ],
)
def test_default_ehlo(
    edge: WsgiEdge, queue: Queue, remote_addr: str | None, ehlo: str, ip: str | None
) -> None:
    assert call(edge, environ_for(REMOTE_ADDR=remote_addr)).code == 204
    assert queue.envelopes[0].client["name"] == ehlo
    assert queue.envelopes[0].client["ip"] == ip


@pytest.mark.parametrize(
    ("scheme", "protocol"), [("http", "HTTP"), ("https", "HTTPS"), ("x y\r\n", "HTTP")]
)
def test_protocol_is_the_url_scheme(
    edge: WsgiEdge, queue: Queue, scheme: str, protocol: str
) -> None:
    environ = environ_for()
    environ["wsgi.url_scheme"] = scheme
    assert call(edge, environ, validate=False).code == 204
    assert queue.envelopes[0].client["protocol"] == protocol


def test_several_recipient_separators(edge: WsgiEdge, queue: Queue) -> None:
    value = f" {enc('a@x')} ,{enc('b@x')};{enc('c@x')} ; ,{enc('d@x')}, "
    assert call(edge, environ_for(HTTP_X_ENVELOPE_RECIPIENT=value)).code == 204
    assert queue.envelopes[0].recipients == ["a@x", "b@x", "c@x", "d@x"]


def test_empty_sender_header_is_the_null_sender(edge: WsgiEdge, queue: Queue) -> None:
    assert call(edge, environ_for(HTTP_X_ENVELOPE_SENDER="")).code == 204
    assert queue.envelopes[0].sender == ""


def test_empty_body(edge: WsgiEdge, queue: Queue) -> None:
    assert call(edge, environ_for(b"")).code == 204
    assert len(queue.envelopes) == 1


def test_subclass_header_names(queue: Queue) -> None:
    class Renamed(WsgiEdge):
        sender_header = "X-From"
        rcpt_header = "X-To"
        ehlo_header = "X-Helo"
        http_verb = "PUT"

    environ = environ_for(
        REQUEST_METHOD="PUT",
        HTTP_X_FROM=enc("f@x"),
        HTTP_X_TO=enc("t@x"),
        HTTP_X_HELO="renamed.test",
    )
    assert call(Renamed(queue), environ).code == 204
    envelope = queue.envelopes[0]
    assert (envelope.sender, envelope.recipients) == ("f@x", ["t@x"])
    assert envelope.client["name"] == "renamed.test"
    answer = call(Renamed(queue), environ_for())
    assert (answer.code, answer.header("Allow")) == (405, "PUT")


# Refused ------------------------------------------------------------------------
TOO_BIG = ("552", "5.3.4 Message exceeded size limit")
BAD_SENDER = ("501", "5.1.7 Invalid sender address")
BAD_RECIPIENT = ("501", "5.1.3 Invalid recipient address")
NO_RECIPIENTS = ("554", "5.5.1 No valid recipients")
BAD_EHLO = ("501", "5.5.4 Invalid EHLO name")

REFUSALS: list[tuple[str, dict[str, Any], int, tuple[str, str] | None]] = [
    ("GET", {"REQUEST_METHOD": "GET"}, 405, None),
    ("HEAD", {"REQUEST_METHOD": "HEAD"}, 405, None),
    ("lower-case post", {"REQUEST_METHOD": "post"}, 405, None),
    ("text/plain", {"CONTENT_TYPE": "text/plain"}, 415, None),
    ("rfc822 prefix", {"CONTENT_TYPE": "message/rfc822x"}, 415, None),
    ("length not a number", {"CONTENT_LENGTH": "abc"}, 400, None),
    ("negative length", {"CONTENT_LENGTH": "-1"}, 400, None),
    ("length with underscore", {"CONTENT_LENGTH": "1_0"}, 400, None),
    ("length with plus", {"CONTENT_LENGTH": "+5"}, 400, None),
    ("unicode digits", {"CONTENT_LENGTH": "\u0665"}, 400, None),
    ("huge length", {"CONTENT_LENGTH": "9" * 40}, 400, None),
    ("no length", {"CONTENT_LENGTH": None}, 411, None),
    ("empty length", {"CONTENT_LENGTH": ""}, 411, None),
    (
        "chunked, not decoded",
        {"CONTENT_LENGTH": None, "HTTP_TRANSFER_ENCODING": "chunked"},
        411,
        None,
    ),
    ("length over max_size", {"CONTENT_LENGTH": str(DEFAULT_MAX_SIZE + 1)}, 413, TOO_BIG),
    ("body shorter than length", {"CONTENT_LENGTH": str(len(MESSAGE) + 1)}, 400, None),
    ("sender not base64", {"HTTP_X_ENVELOPE_SENDER": "@@@"}, 400, BAD_SENDER),
    ("sender non-ASCII", {"HTTP_X_ENVELOPE_SENDER": "YWJj\xe9"}, 400, BAD_SENDER),
    ("sender unpadded", {"HTTP_X_ENVELOPE_SENDER": "YQ"}, 400, BAD_SENDER),
    ("sender latin-1", {"HTTP_X_ENVELOPE_SENDER": "6UB4"}, 400, BAD_SENDER),  # b"\xe9@x"
    ("sender CRLF", {"HTTP_X_ENVELOPE_SENDER": enc("a@x\r\nb")}, 400, BAD_SENDER),
    ("sender NUL", {"HTTP_X_ENVELOPE_SENDER": enc("a\x00@x")}, 400, BAD_SENDER),
    ("sender DEL", {"HTTP_X_ENVELOPE_SENDER": enc("a\x7f@x")}, 400, BAD_SENDER),
    ("sender too long", {"HTTP_X_ENVELOPE_SENDER": enc("é" * 128)}, 400, BAD_SENDER),
    ("recipient missing", {"HTTP_X_ENVELOPE_RECIPIENT": None}, 400, NO_RECIPIENTS),
    ("recipient blank", {"HTTP_X_ENVELOPE_RECIPIENT": " \t"}, 400, NO_RECIPIENTS),
    ("recipient separators only", {"HTTP_X_ENVELOPE_RECIPIENT": ",;"}, 400, NO_RECIPIENTS),
    ("recipient empty address", {"HTTP_X_ENVELOPE_RECIPIENT": "=" * 4}, 400, BAD_RECIPIENT),
    ("recipient decodes empty", {"HTTP_X_ENVELOPE_RECIPIENT": enc("")}, 400, NO_RECIPIENTS),
    ("recipient tab", {"HTTP_X_ENVELOPE_RECIPIENT": enc("a\t@x")}, 400, BAD_RECIPIENT),
    ("ehlo with space", {"HTTP_X_EHLO": "a b"}, 400, BAD_EHLO),
    ("ehlo control", {"HTTP_X_EHLO": "a\x01b"}, 400, BAD_EHLO),
    ("ehlo too long", {"HTTP_X_EHLO": "a" * 256}, 400, BAD_EHLO),
]


@pytest.mark.parametrize(
    ("changes", "code", "smtp"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_refusals(
    edge: WsgiEdge,
    queue: Queue,
    changes: dict[str, Any],
    code: int,
    smtp: tuple[str, str] | None,
) -> None:
    length = changes.get("CONTENT_LENGTH")
    # wsgiref's validator itself objects to a malformed length or method.
    validate = (not length or length.isdigit()) and changes.get("REQUEST_METHOD") != "post"
    answer = call(edge, environ_for(**changes), validate=validate)
    assert answer.code == code
    assert answer.smtp == smtp
    assert answer.header("Content-Type") == "text/plain; charset=utf-8"
    assert answer.body.endswith(b"\n") and len(answer.body) > 1
    assert answer.header("Content-Length") == str(len(answer.body))
    assert not queue.envelopes


def test_405_names_the_allowed_method(edge: WsgiEdge) -> None:
    assert call(edge, environ_for(REQUEST_METHOD="GET")).header("Allow") == "POST"


def test_ehlo_header_is_stripped(edge: WsgiEdge, queue: Queue) -> None:
    assert call(edge, environ_for(HTTP_X_EHLO="  client.test ")).code == 204
    assert queue.envelopes[0].client["name"] == "client.test"


def test_blank_ehlo_header_gives_the_default(edge: WsgiEdge, queue: Queue) -> None:
    assert call(edge, environ_for(HTTP_X_EHLO="  ")).code == 204
    assert queue.envelopes[0].client["name"] == "[192.0.2.1]"


def test_uri_pattern_matches_from_the_start(queue: Queue) -> None:
    edge = WsgiEdge(queue, uri_pattern=r"/mail")
    assert call(edge, environ_for(PATH_INFO="/x/mail")).code == 404
    assert call(edge, environ_for(PATH_INFO="/mail/x")).code == 204


def test_declared_oversize_is_refused_unread(edge: WsgiEdge) -> None:
    environ = environ_for(CONTENT_LENGTH=str(DEFAULT_MAX_SIZE + 1))
    environ["wsgi.input"] = Unreadable()
    answer = call(edge, environ, validate=False)
    assert answer.code == 413
    assert answer.header("Connection") == "close"


@pytest.mark.parametrize("max_size", [None, 0])
def test_no_size_limit(queue: Queue, max_size: int | None) -> None:
    edge = WsgiEdge(queue, max_size=max_size)
    body = MESSAGE + b"x" * 100_000
    assert edge.max_size is None
    assert call(edge, environ_for(body)).code == 204
    assert b"".join(queue.envelopes[0].flatten()) == body


@pytest.mark.parametrize("size", [99, 100, 101])
def test_max_size_boundary(queue: Queue, size: int) -> None:
    edge = WsgiEdge(queue, max_size=100)
    assert call(edge, environ_for(b"x" * size)).code == (204 if size <= 100 else 413)


@pytest.mark.parametrize(("size", "code"), [(100, 204), (101, 413)])
def test_chunked_input_is_bounded(queue: Queue, size: int, code: int) -> None:
    edge = WsgiEdge(queue, max_size=100)
    environ = environ_for(b"x" * size, CONTENT_LENGTH=None, HTTP_TRANSFER_ENCODING="Chunked")
    environ["wsgi.input_terminated"] = True
    assert call(edge, environ, validate=False).code == code


@pytest.mark.parametrize("error", [OSError("reset"), TimeoutError(), ValueError("bad chunk")])
def test_input_errors_get_400(edge: WsgiEdge, queue: Queue, error: Exception) -> None:
    environ = environ_for()
    environ["wsgi.input"] = Unreadable(error)
    answer = call(edge, environ, validate=False)
    assert (answer.code, answer.body) == (400, b"Incomplete request body\n")
    assert answer.header("Connection") == "close"
    assert not queue.envelopes


def test_too_many_recipients(queue: Queue) -> None:
    edge = WsgiEdge(queue, max_recipients=2)
    three = ",".join(enc(f"r{i}@x") for i in range(3))
    answer = call(edge, environ_for(HTTP_X_ENVELOPE_RECIPIENT=three))
    assert (answer.code, answer.smtp) == (400, ("552", "5.5.3 Too many recipients"))


# Queue outcomes -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("result", "code", "smtp"),
    [
        (QueueError(), 503, ("451", "4.3.0 Error queuing message")),
        (QueueError("x", Reply("421", "4.4.5 Busy")), 503, ("421", "4.4.5 Busy")),
        (QueueError("x", Reply("535", "5.7.8 No")), 401, ("535", "5.7.8 No")),
        (QueueError("x", Reply("550", "5.1.1 Unknown")), 500, ("550", "5.1.1 Unknown")),
        (None, 503, ("451", "4.3.0 Error queuing message")),
    ],
)
def test_queue_refusals(
    edge: WsgiEdge, queue: Queue, result: Any, code: int, smtp: tuple[str, str]
) -> None:
    queue.results = [result]
    answer = call(edge, environ_for())
    assert (answer.code, answer.smtp) == (code, smtp)
    assert answer.body == f"{smtp[0]} {smtp[1]}\n".encode()
    assert answer.header("X-Queue-Id") is None


def test_reply_header_is_quoted_and_header_safe() -> None:
    reply = Reply("550", '5.7.1 Say "no" \\ now\r\nX-Evil: 1 \u00e9\u4e2d')
    reply.command = b"RCPT"
    value = edge_wsgi._reply_header(reply)
    # Non-ASCII travels as UTF-8 bytes in Latin-1 characters (PEP 3333).
    assert value.encode("latin-1").decode("utf-8") == (
        '550; message="5.7.1 Say \\"no\\" \\\\ now  X-Evil: 1 \u00e9\u4e2d"; command="RCPT"'
    )


def test_reply_header_text_is_bounded() -> None:
    value = edge_wsgi._reply_header(Reply("451", "4.0.0 " + "x" * 5000))
    assert len(value) < 1100


# Validators ---------------------------------------------------------------------
def test_validators_base_class_does_nothing() -> None:
    validators = WsgiValidators({"a": 1})
    assert validators.environ == {"a": 1}
    assert WsgiValidators.custom_headers == []
    validators.validate_ehlo("x")
    validators.validate_sender("x")
    validators.validate_recipient("x")
    validators.validate_custom("X-A", None)


def test_wsgi_response_defaults() -> None:
    response = WsgiResponse("403 Forbidden")
    assert (response.status, response.headers, list(response.data)) == ("403 Forbidden", [], [])
    assert isinstance(response, Exception)


class Refusing(WsgiValidators):
    custom_headers = ["X-Token"]
    response: WsgiResponse | BaseException | None = None
    hook = "validate_sender"

    def _maybe(self, hook: str) -> None:
        if hook == self.hook and self.response is not None:
            raise self.response

    def validate_ehlo(self, ehlo: str) -> None:
        self._maybe("validate_ehlo")

    def validate_sender(self, sender: str) -> None:
        self._maybe("validate_sender")

    def validate_recipient(self, recipient: str) -> None:
        self._maybe("validate_recipient")

    def validate_custom(self, name: str, value: str | None) -> None:
        assert (name, value) == ("X-Token", self.environ.get("HTTP_X_TOKEN"))
        self._maybe("validate_custom")


@pytest.fixture
def refusing(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> WsgiEdge:
    monkeypatch.setattr(Refusing, "response", None)
    monkeypatch.setattr(Refusing, "hook", "validate_sender")
    return WsgiEdge(queue, validator_class=Refusing)


@pytest.mark.parametrize(
    "hook", ["validate_ehlo", "validate_sender", "validate_recipient", "validate_custom"]
)
def test_each_hook_can_refuse(refusing: WsgiEdge, queue: Queue, hook: str) -> None:
    Refusing.hook = hook
    Refusing.response = WsgiResponse(
        "403 Forbidden", [("Content-Type", "text/plain")], [b"no ", b"way"]
    )
    environ = environ_for(HTTP_X_TOKEN="t")
    environ["wsgi.input"] = Unreadable()  # a refused body is never read
    answer = call(refusing, environ, validate=False)
    assert (answer.status, answer.body) == ("403 Forbidden", b"no way")
    assert not queue.envelopes


@pytest.mark.parametrize(
    ("data", "body"),
    [(["text"], b"text"), ("whole text", b"whole text"), (b"bytes", b"bytes"), ([], b"")],
)
def test_validator_bodies_become_bytes(refusing: WsgiEdge, data: Any, body: bytes) -> None:
    Refusing.response = WsgiResponse("403 Forbidden", [("Content-Type", "text/plain")], data)
    assert call(refusing, environ_for()).body == body


@pytest.mark.parametrize(
    "response",
    [
        WsgiResponse("403 Forbidden", [("X-Bad", "a\r\nb")]),
        WsgiResponse("403 Forbidden", [], [42]),  # type: ignore[list-item]
        RuntimeError("validator bug"),
        KeyError("missing"),
    ],
)
def test_validator_errors_get_500(
    refusing: WsgiEdge,
    queue: Queue,
    response: BaseException,
    caplog: pytest.LogCaptureFixture,
) -> None:
    Refusing.response = response
    caplog.set_level(logging.ERROR, logger="slimta.edge.wsgi")
    answer = call(refusing, environ_for(), validate=False)
    assert answer.code == 500
    assert answer.body == b"Internal server error\n"
    assert answer.smtp == ("451", "4.3.0 Internal server error")
    assert not queue.envelopes
    [record] = caplog.records
    assert record.getMessage().startswith("exception:")


def test_refused_start_response_is_retried_with_exc_info(refusing: WsgiEdge) -> None:
    Refusing.response = WsgiResponse("403 Forbidden", [("X-Bad", "a\nb")])
    start_response = StartResponse()
    body = b"".join(refusing(environ_for(), start_response))
    [(status, _, exc_info)] = start_response.calls
    assert status == "500 Internal Server Error"
    assert exc_info is not None and exc_info[0] is ValueError
    assert body == b"Internal server error\n"


def test_parse_failure_gets_500(
    edge: WsgiEdge, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Envelope, data: bytes) -> None:
        raise MemoryError("simulated")

    monkeypatch.setattr(Envelope, "parse", broken)
    caplog.set_level(logging.ERROR, logger="slimta.edge.wsgi")
    answer = call(edge, environ_for())
    assert answer.code == 500
    assert "exception:MemoryError:unhandled" in caplog.text


# PTR lookups --------------------------------------------------------------------
class FakeLookup:
    """Stands in for PtrLookup: answers *name* on finish()."""

    cache: tuple[bool, str | None] = (False, None)
    name: str | None = "ptr.example.test"
    made: list[FakeLookup] = []

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.started = False
        self.finished_with: list[float | None] = []
        self.killed = False
        FakeLookup.made.append(self)

    @classmethod
    def cached(cls, ip: str) -> tuple[bool, str | None]:
        return cls.cache

    def start(self) -> None:
        self.started = True

    def ready(self) -> bool:
        return bool(self.finished_with)

    def finish(self, runtime: float | None = None) -> str | None:
        self.finished_with.append(runtime)
        return self.name

    def kill(self, block: bool = True) -> None:
        self.killed = True


@pytest.fixture
def fake_lookup(monkeypatch: pytest.MonkeyPatch) -> type[FakeLookup]:
    monkeypatch.setattr(WsgiEdge, "ptr_lookup", True)
    monkeypatch.setattr(edge_wsgi, "PtrLookup", FakeLookup)
    monkeypatch.setattr(FakeLookup, "made", [])
    monkeypatch.setattr(FakeLookup, "cache", (False, None))
    return FakeLookup


def test_ptr_name_becomes_client_host(
    edge: WsgiEdge, queue: Queue, fake_lookup: type[FakeLookup]
) -> None:
    assert call(edge, environ_for()).code == 204
    assert queue.envelopes[0].client["host"] == "ptr.example.test"
    [lookup] = fake_lookup.made
    assert lookup.ip == "192.0.2.1" and lookup.started
    assert lookup.finished_with == [edge.ptr_lookup_timeout]


def test_cached_ptr_name_needs_no_lookup(
    edge: WsgiEdge, queue: Queue, fake_lookup: type[FakeLookup]
) -> None:
    fake_lookup.cache = (True, "cached.example.test")
    assert call(edge, environ_for()).code == 204
    assert queue.envelopes[0].client["host"] == "cached.example.test"
    assert fake_lookup.made == []


def test_refused_request_kills_its_lookup(
    refusing: WsgiEdge, fake_lookup: type[FakeLookup]
) -> None:
    Refusing.response = WsgiResponse("403 Forbidden", [("Content-Type", "text/plain")])
    assert call(refusing, environ_for()).code == 403
    [lookup] = fake_lookup.made
    assert lookup.killed


def test_no_lookup_without_address_or_when_disabled(
    edge: WsgiEdge, fake_lookup: type[FakeLookup]
) -> None:
    assert call(edge, environ_for(REMOTE_ADDR=None)).code == 204
    edge.ptr_lookup = False
    assert call(edge, environ_for()).code == 204
    assert fake_lookup.made == []


# WsgiServer ---------------------------------------------------------------------
class Hello(WsgiServer):
    def handle(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/fail":
            try:
                raise RuntimeError("x")
            except RuntimeError:
                start_response("500 Oops", [("Content-Type", "text/plain")], sys.exc_info())
            return [b"oops"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]


def test_wsgi_server_handle_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        WsgiServer().handle({}, StartResponse())


def test_wsgi_server_logs_request_and_response(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="slimta.http.wsgi")
    environ = environ_for(PATH_INFO="/hi", HTTP_AUTHORIZATION="Basic c2VjcmV0")
    answer = call(Hello(), environ)
    assert (answer.status, answer.body) == ("200 OK", b"hello")
    lines = [parseline(r.getMessage()) for r in caplog.records]
    [(_, req_id, req_op, req), (_, resp_id, resp_op, resp)] = lines
    assert (req_op, resp_op) == ("server_request", "server_response")
    assert req_id == resp_id == str(id(environ))
    assert (req["method"], req["path"]) == ("POST", "/hi")
    assert ("Authorization", "Basic ********") in req["headers"]
    assert resp["status"] == "200 OK"


def test_wsgi_server_passes_exc_info_on() -> None:
    start_response = StartResponse()
    assert list(Hello()(environ_for(PATH_INFO="/fail"), start_response)) == [b"oops"]
    [(status, _, exc_info)] = start_response.calls
    assert status == "500 Oops"
    assert exc_info[0] is RuntimeError


def test_edge_requests_are_logged(edge: WsgiEdge, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="slimta.http.wsgi")
    call(edge, environ_for(REQUEST_METHOD="GET"))
    ops = [parseline(r.getMessage())[2:] for r in caplog.records]
    assert [op for op, _ in ops] == ["server_request", "server_response"]
    assert ops[1][1]["status"] == "405 Method Not Allowed"


def test_start_without_listener(edge: WsgiEdge) -> None:
    with pytest.raises(ValueError, match="no listener"):
        edge.start()
    edge.stop()
    edge.kill()


def test_public_names() -> None:
    assert set(edge_wsgi.__all__) == {"WsgiEdge", "WsgiResponse", "WsgiValidators"}
    from slimta.http import wsgi as http_wsgi

    assert http_wsgi.__all__ == ["WsgiServer"]
