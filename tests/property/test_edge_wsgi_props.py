"""Property tests for WsgiEdge: whatever the request headers, never a 500.

A request is answered 2xx (queued) or 4xx (refused); an exception or a 5xx
would mean some header value reached code that did not expect it. Header
values are what a WSGI server may hand over: any latin-1 text (PEP 3333),
sometimes built from valid base64 items so that the decoding paths past the
base64 check are reached too.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from slimta.edge.wsgi import WsgiEdge
from slimta.envelope import Envelope

#: Any text a WSGI server may put in an environ header value.
latin1 = st.text(st.characters(max_codepoint=0xFF), max_size=40)

#: Base64 of text that makes a plausible address (no control characters).
valid_b64 = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=20).map(
    lambda t: base64.b64encode(t.encode("utf-8")).decode("ascii")
)

#: One base64 item: of arbitrary bytes, of arbitrary text, or raw text.
b64_items = st.one_of(
    st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode("ascii")),
    st.text(max_size=20).map(lambda t: base64.b64encode(t.encode("utf-8")).decode("ascii")),
    latin1,
)
separators = st.sampled_from([",", ";", ", ", " ; ", ",,", ""])


@st.composite
def address_lists(draw: st.DrawFn) -> str:
    items = draw(st.lists(st.one_of(valid_b64, valid_b64, b64_items), max_size=4))
    out = ""
    for item in items:
        out += item + draw(separators)
    return out


optional = lambda strategy: st.one_of(st.none(), strategy)  # noqa: E731

#: ``"exact"`` stands for the body's true length.
content_lengths = st.one_of(
    st.just("exact"),
    st.just("exact"),
    st.none(),
    st.integers(min_value=0, max_value=200).map(str),
    latin1,
)


class Queue:
    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, Any]]:
        self.envelopes.append(envelope)
        return [(envelope, "id")]


EDGE = WsgiEdge(Queue(), "mx.test", max_size=100)
EDGE.ptr_lookup = False


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["POST"] * 8 + ["GET", "post", ""]),
    content_type=st.one_of(st.none(), st.just("message/rfc822"), latin1),
    content_length=content_lengths,
    transfer_encoding=optional(st.sampled_from(["chunked", "gzip", "Chunked "])),
    sender=st.one_of(st.none(), valid_b64, b64_items),
    recipients=optional(address_lists()),
    ehlo=st.one_of(st.none(), st.just("client.test"), latin1),
    remote_addr=optional(latin1),
    scheme=latin1,
    path=latin1,
    body=st.binary(max_size=150),
    terminated=st.booleans(),
)
def test_any_headers_get_2xx_or_4xx(
    method: str,
    content_type: str | None,
    content_length: str | None,
    transfer_encoding: str | None,
    sender: str | None,
    recipients: str | None,
    ehlo: str | None,
    remote_addr: str | None,
    scheme: str,
    path: str,
    body: bytes,
    terminated: bool,
) -> None:
    if content_length == "exact":
        content_length = str(len(body))
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "wsgi.url_scheme": scheme,
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": terminated,
    }
    optional_keys = {
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": content_length,
        "HTTP_TRANSFER_ENCODING": transfer_encoding,
        "HTTP_X_ENVELOPE_SENDER": sender,
        "HTTP_X_ENVELOPE_RECIPIENT": recipients,
        "HTTP_X_EHLO": ehlo,
        "REMOTE_ADDR": remote_addr,
    }
    environ.update({key: value for key, value in optional_keys.items() if value is not None})
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        for name, value in headers:
            assert isinstance(name, str) and isinstance(value, str)
            assert "\r" not in value and "\n" not in value
            value.encode("latin-1")
        statuses.append(status)
        return lambda data: None

    chunks = list(EDGE(environ, start_response))
    assert all(isinstance(chunk, bytes) for chunk in chunks)
    [status] = statuses
    assert status[0] in "24", status


def _call(environ: dict[str, Any]) -> tuple[str, list[bytes]]:
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        for _name, value in headers:
            assert "\r" not in value and "\n" not in value
            value.encode("latin-1")
        statuses.append(status)
        return lambda data: None

    chunks = list(EDGE(environ, start_response))
    [status] = statuses
    return status, chunks


ODD_KEYS = [
    "HTTP_X_ENVELOPE_SENDER",
    "HTTP_X_ENVELOPE_RECIPIENT",
    "HTTP_X_EHLO",
    "REMOTE_ADDR",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "wsgi.url_scheme",
]


@settings(max_examples=300)
@example(key="REMOTE_ADDR", value="192.0.2.1\r\nX-Forged: 1", body=b"")
@example(key="REMOTE_ADDR", value="unix socket path", body=b"")
@given(
    key=st.sampled_from(ODD_KEYS),
    value=st.one_of(latin1, b64_items, address_lists()),
    body=st.binary(max_size=60),
)
def test_one_odd_header_in_a_good_request(key: str, value: str, body: bytes) -> None:
    """A valid request with one header replaced: answered 2xx or 4xx, and
    whatever is queued has clean addresses and a clean EHLO name."""
    queue = EDGE.queue
    assert isinstance(queue, Queue)
    before = len(queue.envelopes)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/",
        "REMOTE_ADDR": "192.0.2.1",
        "CONTENT_TYPE": "message/rfc822",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_X_ENVELOPE_SENDER": base64.b64encode(b"s@example.test").decode(),
        "HTTP_X_ENVELOPE_RECIPIENT": base64.b64encode(b"r@example.test").decode(),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
    }
    environ[key] = value
    status, chunks = _call(environ)
    assert all(isinstance(chunk, bytes) for chunk in chunks)
    assert status[0] in "24", status
    if status[0] == "2":
        envelope = queue.envelopes[before]
        for address in [envelope.sender, *envelope.recipients]:
            assert address is not None
            assert not any(ord(c) < 0x20 or c == "\x7f" for c in address)
        assert envelope.recipients
        name = envelope.client["name"]
        assert not any(c in name for c in " \t\r\n\x00")
