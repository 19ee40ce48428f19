"""Unit tests for :mod:`slimta.envelope`."""

from __future__ import annotations

import email
import email.policy
import pickle
import re
from email.encoders import encode_base64, encode_quopri
from email.message import Message
from email.mime.text import MIMEText
from email.parser import BytesHeaderParser
from typing import Any

import pytest

import slimta.envelope
from slimta.envelope import Envelope

SPEC_MESSAGE = b"From: x\r\nSubject: hi\r\n\r\nbody\r\n"
SPEC_FLATTENED = (b"From: x\r\nSubject: hi\r\n\r\n", b"body\r\n")
NOT_HEADERS = b"not a header\r\nmore\r\n\r\nbody"


@pytest.fixture
def header_parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every header block slimta.envelope hands to the stdlib parser."""
    calls: list[bytes] = []

    class RecordingParser(BytesHeaderParser):
        def parsebytes(self, text: bytes | bytearray, headersonly: bool = True) -> Message:
            calls.append(bytes(text))
            return super().parsebytes(text, headersonly)

    monkeypatch.setattr(slimta.envelope, "BytesHeaderParser", RecordingParser)
    return calls


def parsed(data: bytes) -> Envelope:
    env = Envelope()
    env.parse(data)
    return env


def flatten_both_ways(data: bytes) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """Flatten ``data`` without and with reading ``headers`` first."""
    lazy = parsed(data).flatten()
    env = parsed(data)
    assert env.headers is not None
    return lazy, env.flatten()


def test_public_surface() -> None:
    assert slimta.envelope.__all__ == ["Envelope"]


# --- construction and attributes -------------------------------------------


def test_defaults() -> None:
    env = Envelope()
    assert env.sender is None
    assert env.recipients == []
    assert env.headers is None
    assert env.message is None
    assert env.client == {}
    assert env.receiver is None
    assert env.timestamp is None


def test_constructor_arguments() -> None:
    headers = Message()
    headers["Subject"] = "hi"
    rcpts = ["b@example.com"]
    env = Envelope("a@example.com", rcpts, headers, b"body\r\n")
    assert env.sender == "a@example.com"
    assert env.recipients is rcpts
    assert env.headers is headers
    assert env.message == b"body\r\n"


@pytest.mark.parametrize("falsy", [None, [], (), ""])
def test_falsy_recipients_become_empty_list(falsy: Any) -> None:
    assert Envelope("a@example.com", falsy).recipients == []


def test_attributes_are_assignable() -> None:
    env = Envelope()
    env.sender = ""
    env.recipients = ["x@example.com"]
    env.message = b"m"
    env.client = {"ip": "127.0.0.1", "name": "client.example.com"}
    env.receiver = "mx.example.com"
    env.timestamp = 1234.5
    env.anything_else = 1  # type: ignore[attr-defined]
    assert (env.sender, env.recipients, env.message) == ("", ["x@example.com"], b"m")
    assert env.client["ip"] == "127.0.0.1"
    assert (env.receiver, env.timestamp) == ("mx.example.com", 1234.5)


def test_headers_setter_replaces_parsed_block() -> None:
    env = parsed(SPEC_MESSAGE)
    new = Message()
    new["X-New"] = "yes"
    env.headers = new
    assert env.headers is new
    assert env.flatten() == (b"X-New: yes\r\n\r\n", b"body\r\n")
    env.headers = None
    assert env.headers is None


@pytest.mark.parametrize(
    ("sender", "shown"), [("a@example.com", "'a@example.com'"), ("", "''"), (None, "None")]
)
def test_repr(sender: str | None, shown: str) -> None:
    env = Envelope(sender)
    assert re.fullmatch(r"<Envelope at 0x[0-9a-f]+, sender=(.*)>", repr(env))
    assert repr(env) == f"<Envelope at {hex(id(env))}, sender={shown}>"


# --- parse / flatten ---------------------------------------------------------


def test_spec_example_lazy(header_parses: list[bytes]) -> None:
    env = parsed(SPEC_MESSAGE)
    assert env.flatten() == SPEC_FLATTENED
    assert env.message == b"body\r\n"
    assert header_parses == []


def test_spec_example_after_reading_headers(header_parses: list[bytes]) -> None:
    env = parsed(SPEC_MESSAGE)
    headers = env.headers
    assert headers is not None
    assert headers["From"] == "x"
    assert headers["Subject"] == "hi"
    assert env.headers is headers  # parsed once, then kept
    assert len(header_parses) == 1
    assert env.flatten() == SPEC_FLATTENED


def test_spec_example_not_a_header() -> None:
    env = parsed(NOT_HEADERS)
    assert env.headers is not None
    assert list(env.headers.items()) == []
    assert env.message == NOT_HEADERS
    assert env.flatten() == (b"\r\n", NOT_HEADERS)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(SPEC_MESSAGE, SPEC_FLATTENED, id="crlf"),
        pytest.param(
            b"From: x\nSubject: hi\n\nbody\nmore\n",
            (b"From: x\r\nSubject: hi\r\n\r\n", b"body\nmore\n"),
            id="lf-body-unchanged",
        ),
        pytest.param(
            b"From: x\nSubject: hi\r\n\r\nbody",
            (b"From: x\r\nSubject: hi\r\n\r\n", b"body"),
            id="mixed-line-endings",
        ),
        pytest.param(
            b"Subject: a\r\n  folded\r\n\tagain\r\nTo: y\r\n\r\nb",
            (b"Subject: a\r\n  folded\r\n\tagain\r\nTo: y\r\n\r\n", b"b"),
            id="continuation-lines",
        ),
        pytest.param(
            b"Subject: a\n folded\n\nb",
            (b"Subject: a\r\n folded\r\n\r\n", b"b"),
            id="continuation-lines-lf",
        ),
        pytest.param(
            b"From: x\r\nSubject: hi", (b"From: x\r\nSubject: hi\r\n\r\n", b""), id="no-empty-line"
        ),
        pytest.param(b"From: x\r\n", (b"From: x\r\n\r\n", b""), id="no-empty-line-eol"),
        pytest.param(b"", (b"\r\n", b""), id="empty"),
        pytest.param(b"\r\nbody\r\n", (b"\r\n", b"body\r\n"), id="starts-with-empty-line"),
        pytest.param(b"\r\n\r\nbody", (b"\r\n", b"\r\nbody"), id="two-empty-lines"),
        pytest.param(
            b"From: x\r\n \t \r\nbody", (b"From: x\r\n\r\n", b"body"), id="whitespace-empty-line"
        ),
        pytest.param(
            b"From: x\r\n\r\nSubject: not a header\r\n\r\nbody",
            (b"From: x\r\n\r\n", b"Subject: not a header\r\n\r\nbody"),
            id="first-empty-line-splits",
        ),
        pytest.param(
            b"Subject: caf\xc3\xa9 \xff\r\n\r\n\xfe\xff body",
            (b"Subject: caf\xc3\xa9 \xff\r\n\r\n", b"\xfe\xff body"),
            id="8bit",
        ),
        pytest.param(
            b"Subject: trailing space  \r\nX-Empty-Ish: .\r\n\r\n",
            (b"Subject: trailing space  \r\nX-Empty-Ish: .\r\n\r\n", b""),
            id="trailing-whitespace-kept",
        ),
    ],
)
def test_parse_then_flatten(data: bytes, expected: tuple[bytes, bytes]) -> None:
    lazy, eager = flatten_both_ways(data)
    assert lazy == expected
    assert eager == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            b"Subject:hi\r\nTo:   y\r\n\r\nbody",
            (b"Subject: hi\r\nTo: y\r\n\r\n", b"body"),
            id="spacing-normalised",
        ),
        pytest.param(b"X-Empty:\r\n\r\nbody", (b"X-Empty: \r\n\r\n", b"body"), id="empty-value"),
        pytest.param(
            b"From: x\r\nnot a header\r\n\r\nbody",
            (b"From: x\r\n\r\n", b"not a header\r\n\r\nbody"),
            id="non-header-line-goes-to-body",
        ),
        pytest.param(
            b" leading continuation\r\nFrom: x\r\n\r\nbody",
            (b"\r\n", b" leading continuation\r\nFrom: x\r\n\r\nbody"),
            id="leading-continuation",
        ),
        pytest.param(
            b"From sender@example.com Mon Nov 23 2026\r\nTo: y\r\n\r\nbody",
            (b"\r\n", b"From sender@example.com Mon Nov 23 2026\r\nTo: y\r\n\r\nbody"),
            id="mbox-from-line",
        ),
        pytest.param(
            b"To: y\r\n: no name\r\n\r\nbody",
            (b"To: y\r\n\r\n", b": no name\r\n\r\nbody"),
            id="empty-field-name",
        ),
        pytest.param(
            b"Subject : spaced name\r\n\r\nbody",
            (b"\r\n", b"Subject : spaced name\r\n\r\nbody"),
            id="space-before-colon",
        ),
        pytest.param(
            b"A: 1\rB: 2\r\rbody\r\n\r\nrest",
            (b"A: 1\r\nB: 2\r\n\r\n", b"body\r\n\r\nrest"),
            id="lone-cr-line-endings",
        ),
    ],
)
def test_parse_irregular_input(data: bytes, expected: tuple[bytes, bytes]) -> None:
    lazy, eager = flatten_both_ways(data)
    assert lazy == expected
    assert eager == expected


def test_irregular_input_is_parsed_at_once(header_parses: list[bytes]) -> None:
    env = parsed(b"Subject:hi\r\n\r\nbody")
    assert len(header_parses) == 1
    assert env.headers is not None
    assert env.headers["Subject"] == "hi"
    assert len(header_parses) == 1


def test_long_header_lines_are_not_refolded() -> None:
    long_value = " ".join(["word"] * 100)
    data = b"Subject: " + long_value.encode() + b"\r\nX-Long: " + b"z" * 1200 + b"\r\n\r\nbody"
    lazy, eager = flatten_both_ways(data)
    assert lazy == eager == (data[: data.index(b"\r\n\r\n") + 4], b"body")
    env = parsed(data)
    assert env.headers is not None
    env.headers["X-Added"] = "1"
    header_bytes, _ = env.flatten()
    assert header_bytes.startswith(data[: data.index(b"\r\n\r\n") + 2])


def test_flatten_reflects_changes_to_headers() -> None:
    env = parsed(b"From: x\r\nSubject: hi\r\nTo: y\r\n\r\nbody")
    assert env.headers is not None
    del env.headers["Subject"]
    env.headers["Subject"] = "changed"
    assert env.flatten() == (b"From: x\r\nTo: y\r\nSubject: changed\r\n\r\n", b"body")


def test_parse_replaces_previous_content() -> None:
    env = parsed(b"From: x\r\n\r\nold")
    assert env.headers is not None
    env.parse(b"To: y\r\n\r\nnew")
    assert env.flatten() == (b"To: y\r\n\r\n", b"new")
    env.parse(b"Bad:header\r\n\r\nnewer")
    env.parse(b"To: z\r\n\r\nnewest")
    assert env.flatten() == (b"To: z\r\n\r\n", b"newest")


def test_headers_given_to_constructor() -> None:
    headers = Message(policy=email.policy.SMTP)
    headers["From"] = "x"
    headers["Subject"] = "hi"
    env = Envelope("a@example.com", ["b@example.com"], headers, b"body\r\n")
    assert env.flatten() == SPEC_FLATTENED


def test_flatten_compat32_message_uses_crlf() -> None:
    headers = email.message_from_bytes(b"From: x\nSubject: hi\n\n")
    env = Envelope(headers=headers, message=b"body\r\n")
    assert env.flatten() == SPEC_FLATTENED


def test_flatten_without_headers() -> None:
    assert Envelope().flatten() == (b"", b"")
    assert Envelope(message=b"whole message\r\n").flatten() == (b"", b"whole message\r\n")


def test_flatten_does_not_turn_form_feed_into_a_header_line() -> None:
    env = parsed(b"Subject: a\x0cBcc: victim@example.com\r\n\r\nbody")
    header_bytes, body = env.flatten()
    assert header_bytes == b"Subject: a Bcc: victim@example.com\r\n\r\n"
    assert body == b"body"


# --- prepend_header ----------------------------------------------------------


def test_prepend_header_lazy(header_parses: list[bytes]) -> None:
    env = parsed(SPEC_MESSAGE)
    env.prepend_header("Received", "from a by b; Mon, 23 Nov 2026 10:00:00 +0000")
    env.prepend_header("X-Second", "2")
    assert env.flatten() == (
        b"X-Second: 2\r\n"
        b"Received: from a by b; Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        b"From: x\r\nSubject: hi\r\n\r\n",
        b"body\r\n",
    )
    assert header_parses == []
    assert env.headers is not None
    assert env.headers.keys() == ["X-Second", "Received", "From", "Subject"]


def test_prepend_header_parsed() -> None:
    env = parsed(SPEC_MESSAGE)
    assert env.headers is not None
    env.prepend_header("Received", "from a by b")
    env.prepend_header("X-Second", "2")
    assert env.headers.keys() == ["X-Second", "Received", "From", "Subject"]
    assert env.headers["Received"] == "from a by b"
    assert env.flatten() == (
        b"X-Second: 2\r\nReceived: from a by b\r\nFrom: x\r\nSubject: hi\r\n\r\n",
        b"body\r\n",
    )


def test_prepend_header_keeps_repeated_headers_in_order() -> None:
    data = b"Received: one\r\nX: a\r\nReceived: two\r\nx: b\r\n\r\n"
    env = parsed(data)
    assert env.headers is not None
    env.prepend_header("Received", "zero")
    assert env.flatten()[0] == b"Received: zero\r\n" + data


def test_prepend_header_without_headers() -> None:
    env = Envelope(message=b"body")
    env.prepend_header("Received", "from a")
    assert env.flatten() == (b"Received: from a\r\n\r\n", b"body")
    assert env.headers is not None
    assert env.headers["Received"] == "from a"


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("from a by b", b"Received: from a by b\r\n"),
        ("  leading space", b"Received: leading space\r\n"),
        ("x" * 200, b"Received: " + b"x" * 200 + b"\r\n"),
        ("from a\r\n\tby b", b"Received: from a\r\n\tby b\r\n"),
        ("from a\n by b", b"Received: from a\r\n by b\r\n"),
        ("h\u00e9llo \u2028", b"Received: h\xc3\xa9llo \xe2\x80\xa8\r\n"),
        ("", b"Received: \r\n"),
    ],
)
def test_prepend_header_value_lazy_and_parsed_agree(value: str, line: bytes) -> None:
    lazy = parsed(SPEC_MESSAGE)
    lazy.prepend_header("Received", value)
    eager = parsed(SPEC_MESSAGE)
    assert eager.headers is not None
    eager.prepend_header("Received", value)
    expected = (line + SPEC_FLATTENED[0], SPEC_FLATTENED[1])
    assert lazy.flatten() == expected
    assert eager.flatten() == expected
    assert lazy.headers is not None
    assert lazy.flatten() == expected


# --- append_header -----------------------------------------------------------


def test_append_header_lazy(header_parses: list[bytes]) -> None:
    env = parsed(SPEC_MESSAGE)
    env.append_header("Date", "Sun, 06 Dec 2026 05:00:00 +0000")
    env.append_header("Message-Id", "<a@b>")
    assert env.flatten() == (
        b"From: x\r\nSubject: hi\r\n"
        b"Date: Sun, 06 Dec 2026 05:00:00 +0000\r\nMessage-Id: <a@b>\r\n\r\n",
        b"body\r\n",
    )
    assert header_parses == []
    assert env.headers is not None
    assert env.headers.keys() == ["From", "Subject", "Date", "Message-Id"]


@pytest.mark.parametrize("value", ["<a@b>", "h\u00e9llo", "a\r\n\tb"])
def test_append_header_lazy_and_parsed_agree(value: str) -> None:
    lazy = parsed(SPEC_MESSAGE)
    lazy.append_header("X-Added", value)
    eager = parsed(SPEC_MESSAGE)
    assert eager.headers is not None
    eager.append_header("X-Added", value)
    assert lazy.flatten() == eager.flatten()
    assert lazy.flatten()[0].startswith(b"From: x\r\nSubject: hi\r\nX-Added: ")


def test_append_header_without_headers() -> None:
    env = Envelope(message=b"body")
    env.append_header("Date", "now")
    assert env.flatten() == (b"Date: now\r\n\r\n", b"body")


@pytest.mark.parametrize("value", ["a\r\nBcc: x", "a\nBcc: x", "a\rb", "a\x0cb"])
def test_append_header_rejects_line_breaks(value: str) -> None:
    for env in (parsed(SPEC_MESSAGE), Envelope()):
        with pytest.raises(ValueError):
            env.append_header("X-Added", value)
    with pytest.raises(ValueError):
        parsed(SPEC_MESSAGE).append_header("Bad Name", "v")


@pytest.mark.parametrize("name", ["", "Bad Name", "Bad:Name", "Caf\u00e9", "Tab\t"])
def test_prepend_header_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        parsed(SPEC_MESSAGE).prepend_header(name, "v")


@pytest.mark.parametrize(
    "value", ["a\r\nBcc: x", "a\nBcc: x", "a\rb", "a\r\n", "a\n \r\nb", "a\x0cb", "a\x1eb"]
)
def test_prepend_header_rejects_line_breaks(value: str) -> None:
    for env in (parsed(SPEC_MESSAGE), Envelope()):
        with pytest.raises(ValueError):
            env.prepend_header("Received", value)
    assert parsed(SPEC_MESSAGE).flatten() == SPEC_FLATTENED


# --- copy --------------------------------------------------------------------


def _full_envelope() -> Envelope:
    env = Envelope("a@example.com", ["b@example.com", "c@example.com"])
    env.parse(SPEC_MESSAGE)
    env.client = {"ip": "127.0.0.1", "auth": {"user": "u"}}
    env.receiver = "mx.example.com"
    env.timestamp = 1234.5
    return env


@pytest.mark.parametrize("read_headers", [False, True])
def test_copy_is_deep(read_headers: bool) -> None:
    env = _full_envelope()
    if read_headers:
        assert env.headers is not None
    new = env.copy()
    assert new is not env
    assert new.flatten() == env.flatten()
    assert (new.sender, new.recipients) == (env.sender, env.recipients)
    assert (new.receiver, new.timestamp) == (env.receiver, env.timestamp)
    assert new.client == env.client

    new.recipients.append("d@example.com")
    new.client["auth"]["user"] = "other"
    assert new.headers is not None
    new.headers["X-Copy"] = "1"
    new.prepend_header("Received", "copy")
    assert env.recipients == ["b@example.com", "c@example.com"]
    assert env.client == {"ip": "127.0.0.1", "auth": {"user": "u"}}
    assert env.flatten() == SPEC_FLATTENED


def test_copy_of_parsed_headers_is_independent() -> None:
    env = _full_envelope()
    assert env.headers is not None
    new = env.copy()
    assert new.headers is not None
    assert new.headers is not env.headers
    del new.headers["Subject"]
    assert env.headers["Subject"] == "hi"
    assert new.flatten() == (b"From: x\r\n\r\n", b"body\r\n")


def test_copy_new_rcpts() -> None:
    env = _full_envelope()
    new = env.copy(["z@example.com"])
    assert new.recipients == ["z@example.com"]
    assert env.recipients == ["b@example.com", "c@example.com"]
    assert env.copy([]).recipients == env.recipients


def test_copy_keeps_subclass() -> None:
    class Sub(Envelope):
        pass

    new = Sub("a@example.com").copy()
    assert type(new) is Sub
    assert repr(new).startswith("<Sub at 0x")


# --- pickle ------------------------------------------------------------------


def test_pickle_lazy_does_not_parse(header_parses: list[bytes]) -> None:
    env = _full_envelope()
    env.prepend_header("Received", "from a by b")
    data = pickle.dumps(env)
    new = pickle.loads(data)
    assert header_parses == []
    assert new.flatten() == env.flatten()
    assert (new.sender, new.recipients, new.client) == (env.sender, env.recipients, env.client)
    assert (new.receiver, new.timestamp) == (env.receiver, env.timestamp)
    assert header_parses == []
    assert new.headers["Received"] == "from a by b"


def test_pickle_parsed_keeps_changes() -> None:
    env = _full_envelope()
    assert env.headers is not None
    env.headers["X-Changed"] = "yes"
    new = pickle.loads(pickle.dumps(env))
    assert new.headers is not None
    assert new.headers["X-Changed"] == "yes"
    assert new.flatten() == (b"From: x\r\nSubject: hi\r\nX-Changed: yes\r\n\r\n", b"body\r\n")
    new.prepend_header("Received", "after unpickling")
    assert new.flatten()[0].startswith(b"Received: after unpickling\r\nFrom: x\r\n")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_protocols(protocol: int) -> None:
    env = _full_envelope()
    assert pickle.loads(pickle.dumps(env, protocol)).flatten() == SPEC_FLATTENED


def test_pickle_keeps_extra_attributes() -> None:
    env = _full_envelope()
    env.custom = {"a": 1}  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(env)).custom == {"a": 1}


def test_unpickle_python_slimta_4_state() -> None:
    # A 4.0 pickle stores the attributes under their public names.
    headers = email.message_from_bytes(b"From: x\nSubject: hi\n\n")
    state = {
        "sender": "a@example.com",
        "recipients": ["b@example.com"],
        "headers": headers,
        "message": b"body\r\n",
        "client": {"ip": "127.0.0.1"},
        "receiver": "mx.example.com",
        "timestamp": 1.0,
    }
    env = Envelope.__new__(Envelope)
    env.__setstate__(state)
    assert env.headers is headers
    assert env.flatten() == SPEC_FLATTENED
    assert env.client == {"ip": "127.0.0.1"}


# --- parse_msg ---------------------------------------------------------------


def test_parse_msg_compat32_message() -> None:
    msg = MIMEText("line one\nline two\n")
    msg["From"] = "x"
    msg["Subject"] = "hi"
    env = Envelope()
    env.parse_msg(msg)
    header_bytes, body = env.flatten()
    assert header_bytes.endswith(b"From: x\r\nSubject: hi\r\n\r\n")
    assert header_bytes.startswith(b'Content-Type: text/plain; charset="us-ascii"\r\n')
    assert body == b"line one\r\nline two\r\n"
    assert env.headers is not None
    assert env.headers["Subject"] == "hi"


def test_parse_msg_does_not_mangle_from_lines() -> None:
    msg = email.message_from_bytes(b"Subject: hi\n\nFrom the start\n")
    env = Envelope()
    env.parse_msg(msg)
    assert env.flatten() == (b"Subject: hi\r\n\r\n", b"From the start\r\n")


def test_parse_msg_round_trip() -> None:
    env = parsed(SPEC_MESSAGE)
    assert env.headers is not None
    other = Envelope()
    msg = email.message_from_bytes(b"".join(env.flatten()), policy=email.policy.SMTP)
    other.parse_msg(msg)
    assert other.flatten() == SPEC_FLATTENED


# --- encode_7bit -------------------------------------------------------------

MULTIPART = (
    b"From: a@example.com\r\n"
    b"Subject: test\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XYZ"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--XYZ\r\n"
    b'Content-Type: text/plain; charset="us-ascii"\r\n'
    b"\r\n"
    b"plain ascii part\r\n"
    b"--XYZ\r\n"
    b'Content-Type: text/plain; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"caf\xc3\xa9 na\xc3\xafve\r\n"
    b"--XYZ--\r\n"
)


def test_encode_7bit_ascii_is_noop(header_parses: list[bytes]) -> None:
    env = parsed(SPEC_MESSAGE)
    env.encode_7bit()
    env.encode_7bit(encode_base64)
    assert env.flatten() == SPEC_FLATTENED
    assert header_parses == []


def test_encode_7bit_without_encoder_raises() -> None:
    env = parsed(MULTIPART)
    with pytest.raises(UnicodeDecodeError):
        env.encode_7bit()
    assert b"".join(env.flatten()) == MULTIPART


@pytest.mark.parametrize(
    ("encoder", "cte", "encoded"),
    [
        (encode_base64, "base64", b"Y2Fmw6kgbmHDr3Zl"),
        (encode_quopri, "quoted-printable", b"caf=C3=A9=20na=C3=AFve"),
    ],
)
def test_encode_7bit_multipart(encoder: Any, cte: str, encoded: bytes) -> None:
    env = parsed(MULTIPART)
    env.encode_7bit(encoder)
    header_bytes, body = env.flatten()
    assert body.isascii()
    assert encoded in body
    assert header_bytes.startswith(b"From: a@example.com\r\nSubject: test\r\n")
    assert b"8bit" not in header_bytes + body

    msg = email.message_from_bytes(header_bytes + body, policy=email.policy.SMTP)
    parts = msg.get_payload()
    assert isinstance(parts, list)
    ascii_part, utf8_part = parts
    assert isinstance(ascii_part, Message)
    assert isinstance(utf8_part, Message)
    assert ascii_part["Content-Transfer-Encoding"] is None
    assert ascii_part.get_payload() == "plain ascii part"
    assert utf8_part["Content-Transfer-Encoding"] == cte
    decoded = utf8_part.get_payload(decode=True)
    assert isinstance(decoded, bytes)
    assert decoded.rstrip(b"\r\n") == b"caf\xc3\xa9 na\xc3\xafve"
    assert utf8_part.get_content_charset() == "utf-8"


def test_encode_7bit_single_part() -> None:
    env = parsed(
        b"Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nd\xc3\xa9j\xc3\xa0\r\n"
    )
    env.encode_7bit(encode_base64)
    header_bytes, body = env.flatten()
    assert header_bytes == (
        b"Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
    )
    assert body.isascii()
    msg = email.message_from_bytes(header_bytes + body)
    assert msg.get_payload(decode=True) == b"d\xc3\xa9j\xc3\xa0\r\n"
