"""SpamAssassin policy against a scripted in-memory socket: the spamc request
it writes, how strictly it reads spamd's answer, and what it does to headers.

The socket is handed in through ``socket_creator``, so no network is used;
the real spamd is exercised in ``tests/integration/test_policy_spamassassin.py``.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

from slimta.envelope import Envelope
from slimta.policy import PolicyError, QueuePolicy
from slimta.policy.spamassassin import SpamAssassin, SpamAssassinError

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
MESSAGE = b"From: a@example.test\r\nSubject: hi\r\n\r\nbody\r\n"

SPAM = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1004.3 / 5.0\r\n\r\nGTUBE,MISSING_DATE\r\n"
HAM = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.1 / 5.0\r\n\r\nNO_RECEIVED\r\n"


class FakeSocket:
    """Records what is sent; answers with *chunks*, at most one per ``recv``
    (split when ``recv`` asks for less)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.sent = b""
        self.calls: list[str] = []
        self.asked: list[int] = []
        self.served = 0

    def sendall(self, data: bytes) -> None:
        assert "shutdown" not in self.calls, "sent after the write side was shut"
        self.calls.append("sendall")
        self.sent += data

    def shutdown(self, how: int) -> None:
        self.calls.append("shutdown")
        assert how == socket.SHUT_WR

    def recv(self, size: int) -> bytes:
        assert "shutdown" in self.calls, "read before the write side was shut"
        self.calls.append("recv")
        self.asked.append(size)
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > size:
            chunk, rest = chunk[:size], chunk[size:]
            self.chunks.insert(0, rest)
        self.served += len(chunk)
        return chunk

    def close(self) -> None:
        self.calls.append("close")


class Creator:
    """A ``socket_creator`` that hands out one :class:`FakeSocket`."""

    def __init__(self, *chunks: bytes) -> None:
        self.sock = FakeSocket(list(chunks))
        self.addresses: list[Any] = []

    def __call__(self, address: Any) -> FakeSocket:
        self.addresses.append(address)
        return self.sock


def envelope(data: bytes = MESSAGE) -> Envelope:
    env = Envelope("a@example.test", ["b@example.test"])
    env.parse(data)
    return env


def policy(*chunks: bytes, **kwargs: Any) -> tuple[SpamAssassin, Creator]:
    creator = Creator(*chunks)
    return SpamAssassin(("spamd.test", 7830), socket_creator=creator, **kwargs), creator


def split_bytes(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --- construction -------------------------------------------------------------


def test_defaults() -> None:
    sa = SpamAssassin()
    assert isinstance(sa, QueuePolicy)
    assert issubclass(SpamAssassinError, PolicyError)
    assert sa.address == ("127.0.0.1", 783)
    assert sa.timeout is None
    assert sa.fail_closed is False
    assert callable(sa.socket_creator)
    assert SpamAssassin.SPAMC_USER == b"slimta"
    assert SpamAssassin.SPAMC_PROTOCOL_VER == b"1.1"


def test_fail_closed_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        SpamAssassin(None, None, None, True)  # type: ignore[misc]


# --- the request ----------------------------------------------------------------


def test_request_for_raw_bytes() -> None:
    sa, creator = policy(HAM)
    sa.scan(MESSAGE)
    head = b"SYMBOLS SPAMC/1.1\r\nContent-length: %d\r\nUser: slimta\r\n\r\n" % len(MESSAGE)
    assert creator.sock.sent == head + MESSAGE
    assert creator.addresses == [("spamd.test", 7830)]
    assert creator.sock.calls[:2] == ["sendall", "shutdown"]
    assert creator.sock.calls[-1] == "close"


def test_request_for_envelope_is_its_flattened_form() -> None:
    env = envelope()
    assert env.headers is not None  # parsed: flatten() now serialises the Message
    header, body = env.flatten()
    sa, creator = policy(HAM)
    sa.scan(env)
    _, _, sent = creator.sock.sent.partition(b"\r\n\r\n")
    assert sent == header + body
    assert b"Content-length: %d\r\n" % len(header + body) in creator.sock.sent


def test_request_uses_class_attributes() -> None:
    class Custom(SpamAssassin):
        SPAMC_USER = b"mailer"
        SPAMC_PROTOCOL_VER = b"1.5"

    creator = Creator(HAM)
    Custom(socket_creator=creator).scan(b"x")
    assert creator.sock.sent.startswith(b"SYMBOLS SPAMC/1.5\r\n")
    assert b"\r\nUser: mailer\r\n" in creator.sock.sent


def test_scan_rejects_str() -> None:
    sa, _ = policy(HAM)
    with pytest.raises(TypeError):
        sa.scan("text")  # type: ignore[arg-type]


# --- reading the answer -------------------------------------------------------------

GOOD = [
    pytest.param(SPAM, (True, ["GTUBE", "MISSING_DATE"]), id="spam"),
    pytest.param(HAM, (False, ["NO_RECEIVED"]), id="ham"),
    pytest.param(
        b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -2.5 / 5.0\r\n\r\n", (False, []), id="no-symbols"
    ),
    pytest.param(
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\nA,B", (True, ["A", "B"]), id="no-crlf"
    ),
    pytest.param(
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\nA\r\n\r\n\r\n",
        (True, ["A"]),
        id="many-crlf",
    ),
    pytest.param(
        b"SPAMD/1.5 0 EX_OK\r\nContent-length: 3\r\nSpam: True ; 7.0 / 5.0\r\n\r\nA,B",
        (True, ["A", "B"]),
        id="content-length",
    ),
    pytest.param(
        b"SPAMD/1.1 0 EX_OK\r\nX-Future: whatever\r\nspam:  False ; 1 / 5\r\n\r\nA",
        (False, ["A"]),
        id="unknown-header-ignored",
    ),
]


@pytest.mark.parametrize(("answer", "expected"), GOOD)
def test_answer_parsed(answer: bytes, expected: tuple[bool, list[str]]) -> None:
    sa, _ = policy(answer)
    assert sa.scan(MESSAGE) == expected


@pytest.mark.parametrize(("answer", "expected"), GOOD)
def test_answer_parsed_one_byte_at_a_time(answer: bytes, expected: tuple[bool, list[str]]) -> None:
    sa, _ = policy(*split_bytes(answer))
    assert sa.scan(MESSAGE) == expected


BAD = [
    pytest.param(b"", id="empty"),
    pytest.param(b"SPAMD/1.1 0 EX_OK", id="unterminated-status"),
    pytest.param(b"SPAMD/1.0 76 Bad header line: BOGUS\r\n", id="refusal"),
    pytest.param(b"SPAMD/1.1 0 PONG\r\nSpam: True ; 7 / 5\r\n\r\nA", id="not-ex-ok"),
    pytest.param(b"SPAMD/1.1 76 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\nA", id="nonzero-code"),
    pytest.param(b"SPAMC/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\nA", id="wrong-name"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-length: 0\r\n\r\n", id="http"),
    pytest.param(b"SPAMD/1.1  0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\nA", id="double-space"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\nSpam: True ; 7 / 5\n\nA", id="bare-lf"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n", id="no-empty-line"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\n\r\nA", id="no-spam-header"),
    pytest.param(
        b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1 / 5\r\nSpam: True ; 7 / 5\r\n\r\nA",
        id="two-spam-headers",
    ),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: Yes ; 7 / 5\r\n\r\nA", id="spam-yes"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: True\r\n\r\nA", id="spam-no-score"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: True;7/5\r\n\r\nA", id="spam-spacing"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5x\r\n\r\nA", id="spam-trailing"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nno colon here\r\n\r\nA", id="bad-header-line"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\nX: \xff\r\n\r\nA", id="8bit-header"),
    pytest.param(
        b"SPAMD/1.5 0 EX_OK\r\nContent-length: 5\r\nSpam: True ; 7 / 5\r\n\r\nA,B",
        id="content-length-mismatch",
    ),
    pytest.param(
        b"SPAMD/1.5 0 EX_OK\r\nContent-length: -3\r\nSpam: True ; 7 / 5\r\n\r\nA,B",
        id="content-length-negative",
    ),
    pytest.param(
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\nA\r\nX-Injected: yes", id="injection"
    ),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\nA, B", id="space"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\nA,,B", id="empty-symbol"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\nA,", id="trailing-comma"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\nA\n", id="bare-lf-after"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\n" + b"A" * 201, id="long-name"),
]


@pytest.mark.parametrize("answer", BAD)
def test_malformed_answer_raises(answer: bytes) -> None:
    sa, _ = policy(answer)
    with pytest.raises(SpamAssassinError):
        sa.scan(MESSAGE)


def test_answer_at_the_size_limit_is_read() -> None:
    head = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\n"
    names = b",".join([b"R%05d" % i for i in range(8000)])
    pad = SpamAssassin.MAX_RESPONSE_SIZE - len(head) - len(names)
    if pad % 2:
        names = b"X" + names
        pad -= 1
    answer = head + names + b"\r\n" * (pad // 2)
    assert len(answer) == SpamAssassin.MAX_RESPONSE_SIZE
    sa, _ = policy(*[answer[i : i + 4096] for i in range(0, len(answer), 4096)])
    spammy, symbols = sa.scan(MESSAGE)
    assert spammy and len(symbols) > 5000


def test_answer_over_the_size_limit_raises_without_reading_on() -> None:
    head = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\n"
    limit = SpamAssassin.MAX_RESPONSE_SIZE
    sa, creator = policy(head + b"A" * (3 * limit), b"never read")
    with pytest.raises(SpamAssassinError, match="more than"):
        sa.scan(MESSAGE)
    assert creator.sock.served == limit + 1
    assert creator.sock.chunks[-1] == b"never read"
    assert creator.sock.calls[-1] == "close"


def test_connection_error_becomes_spamassassin_error() -> None:
    def refuse(address: Any) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")

    sa = SpamAssassin(("spamd.test", 7830), socket_creator=refuse)
    with pytest.raises(SpamAssassinError, match=r"spamd\.test:7830") as info:
        sa.scan(MESSAGE)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_reset_while_reading_becomes_spamassassin_error() -> None:
    class Resetting(FakeSocket):
        def recv(self, size: int) -> bytes:
            raise ConnectionResetError(104, "Connection reset by peer")

    sock = Resetting([])
    sa = SpamAssassin(socket_creator=lambda address: sock)
    with pytest.raises(SpamAssassinError):
        sa.scan(MESSAGE)
    assert sock.calls[-1] == "close"


# --- apply ----------------------------------------------------------------------------


def test_spam_gets_yes_and_symbols_at_the_top() -> None:
    env = envelope()
    sa, _ = policy(SPAM)
    assert sa.apply(env) is None
    header, body = env.flatten()
    assert header.startswith(
        b"X-Spam-Status: YES\r\nX-Spam-Symbols: GTUBE, MISSING_DATE\r\nFrom: a@example.test\r\n"
    )
    assert body == b"body\r\n"


def test_ham_gets_no_and_no_symbols() -> None:
    env = envelope()
    sa, _ = policy(HAM)
    sa.apply(env)
    assert env.headers is not None
    assert env.headers.get_all("X-Spam-Status") == ["NO"]
    assert env.headers.get_all("X-Spam-Symbols") is None


def test_spam_without_symbols_gets_no_symbols_header() -> None:
    env = envelope()
    sa, _ = policy(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7 / 5\r\n\r\n")
    sa.apply(env)
    assert env.headers is not None
    assert env.headers.get_all("X-Spam-Status") == ["YES"]
    assert env.headers.get_all("X-Spam-Symbols") is None


FORGED = (
    b"X-Spam-Status: NO\r\nFrom: a@example.test\r\nx-spam-STATUS: no\r\n"
    b"X-Spam-Symbols: ALL_CLEAR\r\nSubject: hi\r\n\r\nbody\r\n"
)


@pytest.mark.parametrize(("answer", "status"), [(SPAM, "YES"), (HAM, "NO")])
def test_forged_headers_replaced(answer: bytes, status: str) -> None:
    env = envelope(FORGED)
    sa, _ = policy(answer)
    sa.apply(env)
    assert env.headers is not None
    assert env.headers.get_all("X-Spam-Status") == [status]
    assert "ALL_CLEAR" not in (env.headers.get_all("X-Spam-Symbols") or [])
    assert b"ALL_CLEAR" not in env.flatten()[0]
    assert env.headers["Subject"] == "hi"


def test_long_symbol_list_is_folded() -> None:
    names = [f"RULE_NUMBER_{i:03d}" for i in range(60)]
    answer = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 99 / 5\r\n\r\n" + ",".join(names).encode()
    env = envelope()
    sa, _ = policy(answer)
    sa.apply(env)
    header, _ = env.flatten()
    start = header.index(b"X-Spam-Symbols:")
    end = header.index(b"\r\nFrom:")
    field = header[start:end]
    lines = field.split(b"\r\n")
    assert len(lines) > 1
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    assert field.replace(b"\r\n", b"") == b"X-Spam-Symbols: " + ", ".join(names).encode()
    reparsed = envelope(b"".join(env.flatten()))
    assert reparsed.headers is not None
    assert reparsed.headers["X-Spam-Symbols"].replace("\r\n", "") == ", ".join(names)


def test_envelope_without_headers() -> None:
    env = Envelope("a@example.test", ["b@example.test"], message=b"body\r\n")
    sa, _ = policy(SPAM)
    sa.apply(env)
    header, body = env.flatten()
    assert header == b"X-Spam-Status: YES\r\nX-Spam-Symbols: GTUBE, MISSING_DATE\r\n\r\n"
    assert body == b"body\r\n"


FAILURES = [
    pytest.param(b"garbage\r\n", id="garbage"),
    pytest.param(b"SPAMD/1.0 76 Bad header line\r\n", id="refusal"),
]


@pytest.mark.parametrize("answer", FAILURES)
def test_no_verdict_accepts_without_headers_and_warns(
    answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    env = envelope(FORGED)
    sa, _ = policy(answer)
    with caplog.at_level(logging.WARNING, logger="slimta.policy.spamassassin"):
        assert sa.apply(env) is None
    assert env.headers is not None
    assert env.headers.get_all("X-Spam-Status") is None
    assert env.headers.get_all("X-Spam-Symbols") is None
    assert env.headers["Subject"] == "hi"
    assert env.message == b"body\r\n"
    [record] = [r for r in caplog.records if r.name == "slimta.policy.spamassassin"]
    assert record.levelno == logging.WARNING
    assert "accepted" in record.getMessage()


@pytest.mark.parametrize("answer", FAILURES)
def test_no_verdict_fail_closed_raises_and_leaves_envelope(
    answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    env = envelope(FORGED)
    before = env.flatten()
    sa, _ = policy(answer, fail_closed=True)
    with (
        caplog.at_level(logging.WARNING, logger="slimta.policy.spamassassin"),
        pytest.raises(SpamAssassinError),
    ):
        sa.apply(env)
    assert env.flatten() == before
    assert any("deferred" in r.getMessage() for r in caplog.records)


def test_garbage_is_not_logged_raw(caplog: pytest.LogCaptureFixture) -> None:
    sa, _ = policy(b"\x1b[2J" + b"Z" * 5000 + b"\r\n")
    with caplog.at_level(logging.WARNING, logger="slimta.policy.spamassassin"):
        sa.apply(envelope())
    text = caplog.records[-1].getMessage()
    assert "\x1b" not in text
    assert len(text) < 300
