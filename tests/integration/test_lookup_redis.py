"""RedisLookup against a real redis-server, and lookups behind a real SmtpEdge.

The server is started by the fixture below on a free 127.0.0.1 port, with no
persistence, and killed at teardown; the tests that need it are skipped when
``redis-server`` is not installed (Debian package ``redis-server``).
"""

from __future__ import annotations

import base64
import json
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from slimta.edge.smtp import SmtpValidators
from slimta.lookup import LookupFailed
from slimta.lookup.auth import LookupAuth, hash_password
from slimta.lookup.drivers import RedisLookup
from slimta.lookup.policy import LookupPolicy
from slimta.queue import Queue
from slimta.queue.dict import DictStorage

redis = pytest.importorskip("redis", reason="redis-py is not installed (extra 'redis')")

pytestmark = pytest.mark.timeout(30)

FAST = {"ln": 4, "r": 8, "p": 1}
AUTH_OK = ("235", "2.7.0")
AUTH_INVALID = ("535", "5.7.8")
AUTH_TEMPFAIL = ("454", "4.7.0")
QUEUED = ("250", "2.6.0")
QUEUE_TEMPFAIL = ("451", "4.3.0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(workdir),
                "--daemonize", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.client = redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client.ping():
                    return
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
            gevent.sleep(0.05)  # polling a foreign process: no event to wait on

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    server = RedisServer(binary, tmp_path)
    yield server
    server.stop()


# --- the driver ---------------------------------------------------------------------


def test_json_records(redis_server: RedisServer) -> None:
    redis_server.client.set("alias:user@example.com", json.dumps({"alias": "x@example.org"}))
    lookup = RedisLookup("alias:{address}", port=redis_server.port, socket_timeout=2)
    assert lookup.lookup_address("user@example.com") == {"alias": "x@example.org"}
    assert lookup.lookup_address("other@example.com") is None
    assert lookup.lookup(nothing="x") is None


def test_hash_records(redis_server: RedisServer) -> None:
    redis_server.client.hset("h:example.com", mapping={"alias": "a@b", "verp": "1"})
    lookup = RedisLookup("h:{domain}", port=redis_server.port, use_hash=True)
    assert lookup.lookup_address("u@example.com") == {"alias": "a@b", "verp": "1"}
    assert lookup.lookup_address("u@example.org") is None


def test_db_and_password(redis_server: RedisServer) -> None:
    redis_server.client.config_set("requirepass", "pw")
    admin = redis.Redis(port=redis_server.port, password="pw", db=3)
    admin.set("k:a", json.dumps({"x": 1}))
    assert RedisLookup("k:{address}", port=redis_server.port, db=3, password="pw").lookup(
        address="a"
    ) == {"x": 1}
    with pytest.raises(LookupFailed):
        RedisLookup("k:{address}", port=redis_server.port, db=3).lookup(address="a")
    admin.close()


def test_template_injection(redis_server: RedisServer) -> None:
    redis_server.client.set("user:secret", json.dumps({"password": "x"}))
    redis_server.client.set("user:{domain}", json.dumps({"hit": "literal"}))
    lookup = RedisLookup("user:{localpart}", port=redis_server.port)
    assert lookup.lookup_address("{domain}@secret") == {"hit": "literal"}
    assert lookup.lookup_address("{address}@secret") is None
    assert lookup.lookup_address("{0}@secret") is None


@pytest.mark.parametrize("value", ["not json", '["a list"]', '"a string"', "null"])
def test_malformed_json_is_a_failure(redis_server: RedisServer, value: str) -> None:
    redis_server.client.set("bad", value)
    with pytest.raises(LookupFailed):
        RedisLookup("bad", port=redis_server.port).lookup()


def test_wrong_type_is_a_failure(redis_server: RedisServer) -> None:
    redis_server.client.rpush("list", "a")
    with pytest.raises(LookupFailed):
        RedisLookup("list", port=redis_server.port).lookup()


def test_server_killed_is_a_failure(redis_server: RedisServer) -> None:
    redis_server.client.set("k", json.dumps({"x": 1}))
    lookup = RedisLookup("k", port=redis_server.port, socket_timeout=2)
    assert lookup.lookup() == {"x": 1}
    redis_server.stop()
    start = time.monotonic()
    with pytest.raises(LookupFailed) as info:
        lookup.lookup()
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert time.monotonic() - start < 2


def test_nothing_listening_is_a_prompt_failure() -> None:
    lookup = RedisLookup("k", port=free_port(), socket_timeout=2)
    start = time.monotonic()
    with pytest.raises(LookupFailed) as info:
        lookup.lookup()
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert time.monotonic() - start < 2


def test_silent_server_times_out() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            accepted.append(listener.accept()[0])

    acceptor = gevent.spawn(accept)
    try:
        lookup = RedisLookup("k", port=listener.getsockname()[1], socket_timeout=0.2)
        with pytest.raises(LookupFailed) as info:
            lookup.lookup()
        assert isinstance(info.value.__cause__, redis.TimeoutError)
    finally:
        acceptor.kill()
        for sock in accepted:
            sock.close()
        listener.close()


# --- behind a real SmtpEdge -----------------------------------------------------------


def reply_of(client: smtplib.SMTP, line: str) -> tuple[str, str | None]:
    code, text = client.docmd(line)
    esc = text.decode().split(" ", 1)[0]
    return str(code), esc


@pytest.fixture
def auth_edge(
    make_edge: Callable[..., Any], server_context: ssl.SSLContext
) -> Callable[[LookupAuth], int]:
    def factory(users: LookupAuth) -> int:
        class Validators(SmtpValidators):
            def handle_auth(self, reply: Any, creds: Any) -> None:
                users.handle_auth(reply, creds)

        _, port, _ = make_edge(
            auth=[b"PLAIN", b"LOGIN"], context=server_context, validator_class=Validators
        )
        return int(port)

    return factory


def auth_plain(
    smtp: Callable[..., smtplib.SMTP], port: int, context: ssl.SSLContext, user: str, pw: str
) -> tuple[str, str | None]:
    client = smtp(port)
    client.starttls(context=context)
    client.ehlo()
    data = base64.b64encode(f"\0{user}\0{pw}".encode()).decode()
    return reply_of(client, f"AUTH PLAIN {data}")


def test_edge_auth_with_redis_records(
    redis_server: RedisServer,
    auth_edge: Callable[[LookupAuth], int],
    smtp: Callable[..., smtplib.SMTP],
    client_context: ssl.SSLContext,
) -> None:
    redis_server.client.set(
        "user:alice@example.com", json.dumps({"password": hash_password("s3cret", **FAST)})
    )
    redis_server.client.set("user:plain@example.com", json.dumps({"password": "s3cret"}))
    port = auth_edge(LookupAuth(RedisLookup("user:{address}", port=redis_server.port)))
    assert auth_plain(smtp, port, client_context, "alice@example.com", "s3cret") == AUTH_OK
    assert auth_plain(smtp, port, client_context, "alice@example.com", "nope") == AUTH_INVALID
    assert auth_plain(smtp, port, client_context, "bob@example.com", "s3cret") == AUTH_INVALID
    assert auth_plain(smtp, port, client_context, "plain@example.com", "s3cret") == AUTH_INVALID


def test_edge_auth_with_redis_down(
    auth_edge: Callable[[LookupAuth], int],
    smtp: Callable[..., smtplib.SMTP],
    client_context: ssl.SSLContext,
) -> None:
    port = auth_edge(LookupAuth(RedisLookup("user:{address}", port=free_port())))
    assert auth_plain(smtp, port, client_context, "alice@example.com", "s3cret") == AUTH_TEMPFAIL


def send(client: smtplib.SMTP, rcpt: str) -> tuple[str, str | None]:
    client.ehlo()
    assert reply_of(client, "MAIL FROM:<s@example.com>")[0] == "250"
    assert reply_of(client, f"RCPT TO:<{rcpt}>")[0] == "250"
    assert reply_of(client, "DATA")[0] == "354"
    client.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
    code, text = client.getreply()
    return str(code), text.decode().split(" ", 1)[0]


class QueueFront:
    """Hands messages to a Queue. (make_edge takes ``queue or RecordingQueue()``,
    and a Queue greenlet that is not running is false.)"""

    def __init__(self, queue: Queue) -> None:
        self.enqueue = queue.enqueue


def test_edge_queue_policy_with_redis(
    redis_server: RedisServer,
    make_edge: Callable[..., Any],
    smtp: Callable[..., smtplib.SMTP],
) -> None:
    redis_server.client.set("a:u@example.com", json.dumps({"alias": "v@example.org"}))
    store = DictStorage()
    queue = Queue(store)
    queue.add_policy(LookupPolicy(RedisLookup("a:{address}", port=redis_server.port)))
    _, port, _ = make_edge(queue=QueueFront(queue))
    assert send(smtp(port), "u@example.com") == QUEUED
    [(_, id)] = list(store.load())
    assert store.get(id)[0].recipients == ["v@example.org"]

    # Redis goes away: the client is told to try again, nothing is stored.
    redis_server.stop()
    assert send(smtp(port), "u@example.com") == QUEUE_TEMPFAIL
    assert len(list(store.load())) == 1
