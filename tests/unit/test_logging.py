"""Tests for slimta.logging: line format, parsing, and the logger classes."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import slimta.logging
import slimta.logging.socket as socket_logging
from slimta.logging import (
    getHttpLogger,
    getQueueStorageLogger,
    getSocketLogger,
    getSubprocessLogger,
    log_exception,
    logline,
    parseline,
)
from slimta.logging.http import HttpLogger
from slimta.logging.queuestorage import QueueStorageLogger
from slimta.logging.socket import SocketLogger
from slimta.logging.subprocess import SubprocessLogger

NAME = "slimta.test.logging"


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=NAME)
    return caplog


@pytest.fixture
def sock_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


class Exploding:
    """Counts repr() calls; used to prove nothing is formatted."""

    calls = 0

    def __repr__(self) -> str:
        type(self).calls += 1
        return "Exploding()"

    def fileno(self) -> int:
        type(self).calls += 1
        return 3


# --- logline / parseline ---------------------------------------------------


def test_logline_without_data() -> None:
    lines: list[str] = []
    logline(lines.append, "fd", 7, "close")
    assert lines == ["fd:7:close"]


def test_logline_sorts_keys_and_reprs_values() -> None:
    lines: list[str] = []
    logline(lines.append, "queue", "abc", "write", zeta=None, alpha=b"x", mid="y z", num=3)
    assert lines == ["queue:abc:write alpha=b'x' mid='y z' num=3 zeta=None"]


def test_logline_keys_may_be_called_type_or_operation() -> None:
    lines: list[str] = []
    logline(lines.append, "t", 1, "op", type="a", operation="b", typeid=2)
    assert lines == ["t:1:op operation='b' type='a' typeid=2"]


def test_logline_truncates_long_strings_to_valid_literals() -> None:
    lines: list[str] = []
    logline(lines.append, "fd", 1, "recv", data=b"\x00" * 10_000, text="\u00e9" * 500)
    _, _, _, data = parseline(lines[0])
    for key in ("data", "text"):
        value_repr = lines[0].split(f"{key}=", 1)[1].split(" ", 1)[0]
        assert len(value_repr) <= 100
    assert isinstance(data["data"], bytes)
    assert data["data"].startswith(b"\x00") and b"..." in data["data"]
    assert isinstance(data["text"], str)
    assert data["text"].startswith("\u00e9") and "..." in data["text"]


def test_logline_escapes_line_breaks_in_object_reprs() -> None:
    class Sneaky:
        def __repr__(self) -> str:
            return "x\nfd:1:close"

    lines: list[str] = []
    logline(lines.append, "fd", 1, "send", obj=Sneaky())
    assert "\n" not in lines[0]
    assert lines == ["fd:1:send obj=x\\nfd:1:close"]


def test_logline_skips_formatting_for_disabled_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    Exploding.calls = 0
    logline(logging.getLogger(NAME).debug, "fd", 1, "send", data=Exploding())
    assert Exploding.calls == 0
    assert caplog.records == []


def test_logline_goes_through_logger(caplog_debug: pytest.LogCaptureFixture) -> None:
    logline(logging.getLogger(NAME).info, "fd", 1, "send", data=b"hi")
    assert [(r.levelno, r.getMessage()) for r in caplog_debug.records] == [
        (logging.INFO, "fd:1:send data=b'hi'")
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("fd:7:close", ("fd", "7", "close", {})),
        ("fd:none:error args=()", ("fd", "none", "error", {"args": ()})),
        (
            "fd:7:recv data=b'MAIL FROM:<a@b> SIZE=10\\r\\n' peer=('1.2.3.4', 25)",
            (
                "fd",
                "7",
                "recv",
                {"data": b"MAIL FROM:<a@b> SIZE=10\r\n", "peer": ("1.2.3.4", 25)},
            ),
        ),
        ("queue:ab:cd:write n=1", ("queue", "ab:cd", "write", {"n": 1})),
        ("x:1:y v='a b=c d' w=[1, 2]", ("x", "1", "y", {"v": "a b=c d", "w": [1, 2]})),
        ("x:1:y o=<Foo> n=2", ("x", "1", "y", {"o": "<Foo>", "n": 2})),
        ("x:1:y d={'a': 1, ...: ...}", ("x", "1", "y", {"d": {"a": 1, ...: ...}})),
    ],
)
def test_parseline(line: str, expected: tuple[str, str, str, dict[str, object]]) -> None:
    assert parseline(line) == expected


@pytest.mark.parametrize("line", ["", "hello world", "fd:7", "fd:7:close extra", "fd:7:close =1"])
def test_parseline_rejects_other_lines(line: str) -> None:
    with pytest.raises(ValueError):
        parseline(line)


keys = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
values = st.one_of(
    st.text(),
    st.integers(),
    st.binary(),
    st.none(),
    st.text(min_size=40, max_size=400),  # some past the 100-character limit
    st.binary(min_size=40, max_size=400),
)


@given(
    kind=st.from_regex(r"[a-z]{1,8}", fullmatch=True),
    typeid=st.one_of(st.integers(min_value=0), st.from_regex(r"[0-9a-f]{1,32}", fullmatch=True)),
    operation=st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    data=st.dictionaries(keys, values, max_size=6),
)
def test_logline_parseline_round_trip(
    kind: str, typeid: int | str, operation: str, data: dict[str, object]
) -> None:
    lines: list[str] = []
    logline(lines.append, kind, typeid, operation, **data)
    assert len(lines) == 1 and "\n" not in lines[0]
    got_type, got_id, got_operation, got_data = parseline(lines[0])
    assert (got_type, got_id, got_operation) == (kind, str(typeid), operation)
    assert got_data.keys() == data.keys()
    for key, value in data.items():
        if len(repr(value)) <= 100:
            assert got_data[key] == value
        else:  # shortened, but still the same type, with the same ends
            got = got_data[key]
            assert isinstance(value, str | bytes)
            assert isinstance(got, type(value))
            assert got[:1] == value[:1]
            assert got[-1:] == value[-1:] or len(got) <= 3


# --- log_exception ---------------------------------------------------------


def test_log_exception_inside_except(caplog_debug: pytest.LogCaptureFixture) -> None:
    try:
        raise KeyError("missing", 2)
    except KeyError:
        log_exception(NAME, msgid="abc")
    [record] = caplog_debug.records
    assert record.levelno == logging.ERROR
    assert record.name == NAME
    type_, id_, operation, data = parseline(record.getMessage())
    assert (type_, id_, operation) == ("exception", "KeyError", "unhandled")
    assert sorted(data) == ["args", "message", "msgid", "traceback"]
    assert data["args"] == ("missing", 2)
    assert data["message"] == "('missing', 2)"
    assert data["msgid"] == "abc"
    traceback = data["traceback"]
    assert isinstance(traceback, list)
    assert traceback[0] == "Traceback (most recent call last):\n"
    assert traceback[-1] == "KeyError: ('missing', 2)\n"
    assert any("test_log_exception_inside_except" in line for line in traceback)


def test_log_exception_outside_except_does_nothing(
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    log_exception(NAME)
    assert caplog_debug.records == []


def test_log_exception_limits_traceback(caplog_debug: pytest.LogCaptureFixture) -> None:
    def chain(depth: int) -> None:
        # Each level adds a long, distinct message and a chaining banner.
        try:
            if depth:
                chain(depth - 1)
            else:
                raise RuntimeError("x" * 5000)
        except RuntimeError as exc:
            raise RuntimeError(f"level {depth} " + "y" * 5000) from exc

    try:
        chain(20)
    except RuntimeError:
        log_exception(NAME)
    line = caplog_debug.records[0].getMessage()
    traceback_repr = line.split(" traceback=", 1)[1]
    assert len(traceback_repr) <= 10_000
    traceback = parseline(line)[3]["traceback"]
    assert isinstance(traceback, list)
    assert traceback[0] == "..."
    assert traceback[-1].startswith("RuntimeError: level 20 yyy")
    assert all(len(repr(line)) <= 1000 for line in traceback)


def test_log_exception_is_replaceable(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def replacement(name: str, /, **kwargs: object) -> None:
        seen.append(name)

    monkeypatch.setattr(slimta.logging, "log_exception", replacement)
    try:
        raise ValueError
    except ValueError:
        slimta.logging.log_exception("app")  # how slimta's own modules call it
    assert seen == ["app"]


# --- factories -------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "cls"),
    [
        (getSocketLogger, SocketLogger),
        (getSubprocessLogger, SubprocessLogger),
        (getQueueStorageLogger, QueueStorageLogger),
        (getHttpLogger, HttpLogger),
    ],
)
def test_factories(factory: Callable[[str], Any], cls: type[Any]) -> None:
    logger = factory(NAME)
    assert isinstance(logger, cls)
    assert logger.log is logging.getLogger(NAME)


def test_public_names() -> None:
    assert sorted(slimta.logging.__all__) == [
        "getHttpLogger",
        "getQueueStorageLogger",
        "getSocketLogger",
        "getSubprocessLogger",
        "log_exception",
        "logline",
        "parseline",
    ]
    assert sorted(socket_logging.__all__) == ["SocketLogger", "socket_error_log_level"]


# --- SocketLogger ----------------------------------------------------------


def test_socket_send_recv(
    caplog_debug: pytest.LogCaptureFixture, sock_pair: tuple[socket.socket, socket.socket]
) -> None:
    left, right = sock_pair
    log = getSocketLogger(NAME)
    log.send(left, b"EHLO x\r\n")
    log.recv(right, b"250 ok\r\n")
    assert caplog_debug.messages == [
        f"fd:{left.fileno()}:send data=b'EHLO x\\r\\n'",
        f"fd:{right.fileno()}:recv data=b'250 ok\\r\\n'",
    ]
    assert all(record.levelno == logging.DEBUG for record in caplog_debug.records)
    assert parseline(caplog_debug.messages[0])[3] == {"data": b"EHLO x\r\n"}


def test_socket_accept_connect_shutdown_close(
    caplog_debug: pytest.LogCaptureFixture, sock_pair: tuple[socket.socket, socket.socket]
) -> None:
    left, right = sock_pair
    fd, client_fd = left.fileno(), right.fileno()
    log = getSocketLogger(NAME)
    log.accept(left, right, ("127.0.0.1", 4321))
    log.connect(left, ("127.0.0.1", 25))
    log.connect(left)
    log.shutdown(left, socket.SHUT_RD)
    log.shutdown(left, socket.SHUT_WR)
    log.shutdown(left, socket.SHUT_RDWR)
    log.close(left)
    assert caplog_debug.messages == [
        f"fd:{fd}:accept clientfd={client_fd} peer=('127.0.0.1', 4321)",
        f"fd:{fd}:connect peer=('127.0.0.1', 25)",
        f"fd:{fd}:connect peer=None",
        f"fd:{fd}:shutdown how='read'",
        f"fd:{fd}:shutdown how='write'",
        f"fd:{fd}:shutdown how='both'",
        f"fd:{fd}:close",
    ]


def test_socket_closed_or_fake_sockets_log_none(caplog_debug: pytest.LogCaptureFixture) -> None:
    class Broken:
        def fileno(self) -> int:
            raise OSError("closed")

    closed = socket.socket()
    closed.close()
    log = getSocketLogger(NAME)
    log.close(closed)
    log.close(Broken())
    log.close(object())
    log.close(None)
    assert caplog_debug.messages == ["fd:none:close"] * 4


def test_socket_encrypt_logs_session_stats(
    caplog_debug: pytest.LogCaptureFixture, sock_pair: tuple[socket.socket, socket.socket]
) -> None:
    left, _ = sock_pair
    context = ssl.create_default_context()
    log = getSocketLogger(NAME)
    log.encrypt(left, context)
    log.encrypt(left, object())
    first, second = caplog_debug.messages
    assert parseline(first) == (
        "fd",
        str(left.fileno()),
        "encrypt",
        {"session_stats": context.session_stats()},
    )
    assert second == f"fd:{left.fileno()}:encrypt"


def test_socket_error_level_is_read_each_call(
    caplog_debug: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    sock_pair: tuple[socket.socket, socket.socket],
) -> None:
    left, _ = sock_pair
    log = getSocketLogger(NAME)
    exc = ConnectionResetError(104, "Connection reset by peer")
    log.error(left, exc, ("10.0.0.1", 25))
    monkeypatch.setattr(socket_logging, "socket_error_log_level", logging.WARNING)
    log.error(None, exc)
    first, second = caplog_debug.records
    assert first.levelno == logging.ERROR
    assert first.getMessage() == (
        f"fd:{left.fileno()}:error address=('10.0.0.1', 25) "
        "args=(104, 'Connection reset by peer') message='[Errno 104] Connection reset by peer'"
    )
    assert second.levelno == logging.WARNING
    assert second.getMessage().startswith("fd:none:error address=None args=(104, ")


def test_socket_error_level_below_logger_level_is_silent(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.ERROR, logger=NAME)
    monkeypatch.setattr(socket_logging, "socket_error_log_level", logging.INFO)
    getSocketLogger(NAME).error(None, OSError("x"))
    assert caplog.records == []


def test_socket_proxyproto(
    caplog_debug: pytest.LogCaptureFixture, sock_pair: tuple[socket.socket, socket.socket]
) -> None:
    left, _ = sock_pair
    fd = left.fileno()
    log = getSocketLogger(NAME)
    log.proxyproto_success(left, ("192.0.2.1", 5555))
    log.proxyproto_invalid(left, ValueError("bad header"))
    log.proxyproto_local(left)
    assert caplog_debug.messages == [
        f"fd:{fd}:ppsuccess src_addr=('192.0.2.1', 5555)",
        f"fd:{fd}:ppinvalid message='bad header'",
        f"fd:{fd}:pplocal",
    ]


def test_socket_logger_does_no_work_when_disabled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    log = getSocketLogger(NAME)
    Exploding.calls = 0
    thing = Exploding()
    log.send(thing, thing)  # type: ignore[arg-type]
    log.recv(thing, thing)  # type: ignore[arg-type]
    log.accept(thing, thing, thing)
    log.connect(thing, thing)
    log.encrypt(thing, thing)
    log.shutdown(thing, socket.SHUT_RDWR)
    log.close(thing)
    log.proxyproto_success(thing, thing)
    log.proxyproto_local(thing)
    assert Exploding.calls == 0
    assert caplog.records == []


# --- SubprocessLogger, QueueStorageLogger, HttpLogger ----------------------


def test_subprocess_logger(caplog_debug: pytest.LogCaptureFixture) -> None:
    log = getSubprocessLogger(NAME)
    args = ["true"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    log.popen(proc, args)
    stdout, stderr = proc.communicate(b"in")
    log.stdio(proc, b"in", stdout, stderr)
    log.exit(proc)
    assert caplog_debug.messages == [
        f"pid:{proc.pid}:popen args=['true']",
        f"pid:{proc.pid}:stdio stderr=None stdin=b'in' stdout=b''",
        f"pid:{proc.pid}:exit returncode=0",
    ]


@dataclass
class FakeEnvelope:
    sender: str = "sender@example.com"
    recipients: list[str] = field(default_factory=lambda: ["a@example.com", "b@example.com"])


def test_queue_storage_logger(caplog_debug: pytest.LogCaptureFixture) -> None:
    log = getQueueStorageLogger(NAME)
    log.write("1234abcd", FakeEnvelope())
    log.update_meta("1234abcd", attempts=2, delivered_indexes=[0])
    log.remove("1234abcd")
    assert caplog_debug.messages == [
        "queue:1234abcd:write recipients=['a@example.com', 'b@example.com'] "
        "sender='sender@example.com'",
        "queue:1234abcd:meta attempts=2 delivered_indexes=[0]",
        "queue:1234abcd:remove",
    ]


def test_http_logger_client(caplog_debug: pytest.LogCaptureFixture) -> None:
    log = getHttpLogger(NAME)
    conn = object()
    headers = {"X-Ehlo": "there", "Authorization": "Basic dXNlcjpwYXNz"}
    log.request(conn, "POST", "/msg", headers)
    log.response(conn, 200, [("Content-Length", "0")])
    assert caplog_debug.messages == [
        f"http:{id(conn)}:client_request headers={{'X-Ehlo': 'there', "
        f"'Authorization': 'Basic ********'}} method='POST' path='/msg'",
        f"http:{id(conn)}:client_response headers=[('Content-Length', '0')] status=200",
    ]
    assert headers["Authorization"] == "Basic dXNlcjpwYXNz"  # the caller's copy is untouched


def test_http_logger_masks_cookies(caplog_debug: pytest.LogCaptureFixture) -> None:
    log = getHttpLogger(NAME)
    conn = object()
    log.response(conn, "200 OK", [("Set-Cookie", "session=abc; Path=/")], is_client=False)
    assert caplog_debug.messages == [
        f"http:{id(conn)}:server_response headers=[('Set-Cookie', '********')] status='200 OK'"
    ]


def test_http_logger_wsgi(caplog_debug: pytest.LogCaptureFixture) -> None:
    log = getHttpLogger(NAME)
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/enqueue",
        "CONTENT_TYPE": "message/rfc822",
        "HTTP_X_ENVELOPE_SENDER": "YUBiLmM=",
        "HTTP_PROXY_AUTHORIZATION": "Bearer secret-token",
        "wsgi.input": object(),
    }
    log.wsgi_request(environ)
    log.wsgi_response(environ, "200 OK", [("Content-Length", "0")])
    requests = caplog_debug.messages
    assert parseline(requests[0]) == (
        "http",
        str(id(environ)),
        "server_request",
        {
            "headers": [
                ("Content-Type", "message/rfc822"),
                ("X-Envelope-Sender", "YUBiLmM="),
                ("Proxy-Authorization", "Bearer ********"),
            ],
            "method": "POST",
            "path": "/enqueue",
        },
    )
    assert requests[1] == (
        f"http:{id(environ)}:server_response headers=[('Content-Length', '0')] status='200 OK'"
    )


def test_other_loggers_do_no_work_when_disabled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    Exploding.calls = 0
    thing = Exploding()

    class Proc:
        pid = 1
        returncode = 0

    getSubprocessLogger(NAME).popen(Proc(), thing)
    getSubprocessLogger(NAME).stdio(Proc(), thing, thing, thing)
    getQueueStorageLogger(NAME).update_meta("x", thing=thing)
    getHttpLogger(NAME).request(thing, "GET", "/", [("X", thing)])
    getHttpLogger(NAME).wsgi_request({"PATH_INFO": thing})
    assert Exploding.calls == 0
    assert caplog.records == []
