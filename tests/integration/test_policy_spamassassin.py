"""SpamAssassin policy against a real spamd, and against fake ones that hang,
trickle, spew or answer garbage.

The ``spamd`` fixture starts the system's spamd once for this module (skipped
when spamd is not installed; Debian: ``apt-get install spamd``) on a free
127.0.0.1 port, with the rules of the package, network tests off (``--local``),
no per-user configuration, and a site configuration of our own that loads only
the plugin that runs rules (so startup takes well under a second), no Bayes.
As root it runs as ``nobody``, since spamd refuses to scan as root.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.server
import pytest

from slimta.envelope import Envelope
from slimta.policy.spamassassin import SpamAssassin, SpamAssassinError
from slimta.queue import Queue
from slimta.queue.dict import DictStorage

pytestmark = pytest.mark.timeout(30)

LOGGER = "slimta.policy.spamassassin"

#: Seconds spamd may take to load its rules before the fixture gives up.
STARTUP_DEADLINE = 30.0
#: The ``timeout`` given to the policy where a test expects it to run out.
SHORT_TIMEOUT = 0.5
#: Seconds a scan of a real spamd may take.
SCAN_TIMEOUT = 10.0

# Named replies: (code, enhanced status code).
QUEUED = ("250", "2.6.0")
QUEUE_FAILED = ("451", "4.3.0")

#: The Generic Test for Unsolicited Bulk Email: the GTUBE rule always hits it.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(body: bytes, extra_headers: bytes = b"") -> bytes:
    """A complete, ordinary message, so that only the body can make it spam."""
    return (
        b"Received: from client.example.test (client.example.test [192.0.2.1])\r\n"
        b"\tby mx.example.test with ESMTP; Sun, 06 Dec 2026 04:00:00 +0000\r\n"
        b"Date: Sun, 06 Dec 2026 04:00:00 +0000\r\n"
        b"From: Alice <alice@example.test>\r\n"
        b"To: Bob <bob@example.test>\r\n"
        b"Subject: lunch tomorrow\r\n"
        b"Message-ID: <20261206040000.1234@client.example.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n" + extra_headers + b"\r\n" + body
    )


CLEAN = message(b"Hi Bob,\r\n\r\nShall we meet at noon by the station?\r\n\r\nAlice\r\n")
SPAM = message(b"Hello,\r\n\r\n" + GTUBE + b"\r\n")
FORGED = b"X-Spam-Status: NO\r\nX-Spam-Symbols: ALL_CLEAR\r\nx-spam-status: No, score=-9\r\n"


def envelope(data: bytes) -> Envelope:
    env = Envelope("alice@example.test", ["bob@example.test"])
    env.parse(data)
    return env


def spam_headers(env: Envelope) -> dict[str, list[str]]:
    assert env.headers is not None
    return {name: env.headers.get_all(name) or [] for name in ("X-Spam-Status", "X-Spam-Symbols")}


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


class QueueFront:
    """Hands :meth:`enqueue` to a real :class:`Queue`.

    ``make_edge`` replaces a false ``queue=`` by its recording queue, and an
    unstarted ``Queue`` (a greenlet) is false.
    """

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, Any]]:
        return self.queue.enqueue(envelope)  # type: ignore[return-value]


# --- the real spamd ---------------------------------------------------------------


@dataclass
class Spamd:
    address: tuple[str, int]
    #: Seconds from start until spamd answered PING.
    startup: float
    log: Path


def find_spamd() -> str | None:
    found = shutil.which("spamd")
    if found is None and os.access("/usr/sbin/spamd", os.X_OK):
        found = "/usr/sbin/spamd"
    return found


def find_rules() -> Path | None:
    """The packaged rule directory, if it defines GTUBE."""
    candidates = ["/usr/share/spamassassin", "/usr/local/share/spamassassin"]
    candidates += sorted(glob.glob("/var/lib/spamassassin/*/updates_spamassassin_org"))
    for candidate in candidates:
        path = Path(candidate)
        if any(b"GTUBE" in cf.read_bytes() for cf in sorted(path.glob("*.cf"))):
            return path
    return None


def ping(address: tuple[str, int]) -> bool:
    """True when spamd answers PING (its port is open before rules load)."""
    try:
        with socket.create_connection(address, timeout=1.0) as sock:
            sock.settimeout(5.0)
            sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(100)
    except OSError:
        return False
    return answer.startswith(b"SPAMD/") and b" 0 PONG" in answer


def log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def spamd() -> Iterator[Spamd]:
    program = find_spamd()
    if program is None:
        pytest.skip("spamd is not installed (Debian package: spamd)")
    rules = find_rules()
    if rules is None:
        pytest.skip("no SpamAssassin rules with GTUBE found (Debian package: spamassassin)")

    # Not under pytest's tmp_path: its parent is private to root, and spamd
    # reads these as nobody.
    top = Path(tempfile.mkdtemp(prefix="slimta-spamd-"))
    site, home = top / "site", top / "home"
    site.mkdir()
    home.mkdir()
    (site / "init.pre").write_text("loadplugin Mail::SpamAssassin::Plugin::Check\n")
    (site / "local.cf").write_text("use_bayes 0\nbayes_auto_learn 0\nrequired_score 5.0\n")
    for path in (top, site, site / "init.pre", site / "local.cf"):
        path.chmod(0o755)
    home.chmod(0o777)
    log = top / "spamd.log"

    address = ("127.0.0.1", free_port())
    command = [
        program,
        "--local",
        "--nouser-config",
        "--max-children=1",
        f"--listen={address[0]}:{address[1]}",
        f"--configpath={rules}",
        f"--siteconfigpath={site}",
        f"--helper-home-dir={home}",
        "--syslog=stderr",
    ]
    if os.geteuid() == 0:
        command.append("--username=nobody")
    started = time.monotonic()
    with log.open("wb") as out:
        # A session of its own, so teardown can stop the children too.
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while not ping(address):
            if proc.poll() is not None:
                pytest.fail(f"spamd exited with {proc.returncode}:\n{log_tail(log)}")
            if time.monotonic() - started > STARTUP_DEADLINE:
                pytest.fail(f"spamd did not answer within {STARTUP_DEADLINE}s:\n{log_tail(log)}")
            gevent.sleep(0.05)
        yield Spamd(address, time.monotonic() - started, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(top, ignore_errors=True)


def test_spamd_started_quickly(spamd: Spamd) -> None:
    # Documents the startup cost of the fixture (about 0.4 s with the rules
    # of Debian 12's package); a regression here slows every CI run.
    assert spamd.startup < STARTUP_DEADLINE


def test_gtube_is_spam(spamd: Spamd) -> None:
    sa = SpamAssassin(spamd.address, timeout=SCAN_TIMEOUT)
    spammy, symbols = sa.scan(SPAM)
    assert spammy is True
    assert "GTUBE" in symbols
    env = envelope(SPAM)
    assert sa.apply(env) is None
    headers = spam_headers(env)
    assert headers["X-Spam-Status"] == ["YES"]
    [listed] = headers["X-Spam-Symbols"]
    assert "GTUBE" in listed.replace("\r\n", "").split(", ")


def test_clean_message_is_not_spam(spamd: Spamd) -> None:
    sa = SpamAssassin(spamd.address, timeout=SCAN_TIMEOUT)
    spammy, symbols = sa.scan(envelope(CLEAN))
    assert spammy is False
    assert "GTUBE" not in symbols
    env = envelope(CLEAN)
    sa.apply(env)
    assert spam_headers(env) == {"X-Spam-Status": ["NO"], "X-Spam-Symbols": []}
    assert env.message is not None and b"Shall we meet" in env.message


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(message(b"Hello,\r\n\r\n" + GTUBE + b"\r\n", FORGED), "YES", id="spam"),
        pytest.param(
            message(b"Hi Bob, noon?\r\n", b"X-Spam-Status: YES\r\nX-Spam-Symbols: GTUBE\r\n"),
            "NO",
            id="ham",
        ),
    ],
)
def test_forged_verdict_is_replaced(spamd: Spamd, data: bytes, status: str) -> None:
    sa = SpamAssassin(spamd.address, timeout=SCAN_TIMEOUT)
    env = envelope(data)
    sa.apply(env)
    headers = spam_headers(env)
    assert headers["X-Spam-Status"] == [status]
    assert all("ALL_CLEAR" not in value for value in headers["X-Spam-Symbols"])
    if status == "NO":
        assert headers["X-Spam-Symbols"] == []
    header_block, _ = env.flatten()
    assert header_block.lower().count(b"x-spam-status:") == 1


def test_through_edge_and_queue(
    spamd: Spamd,
    make_edge: Callable[..., tuple[Any, int, Any]],
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
) -> None:
    storage = DictStorage()
    queue = Queue(storage)
    queue.add_policy(SpamAssassin(spamd.address, timeout=SCAN_TIMEOUT))
    _, port, _ = make_edge(queue=QueueFront(queue))
    client = smtp(port)
    for data in (SPAM, CLEAN):
        assert client.sendmail("alice@example.test", ["bob@example.test"], data) == {}
    verdicts = {}
    for _, id in storage.load():
        env, _ = storage.get(id)
        assert env.message is not None
        verdicts[GTUBE in env.message] = spam_headers(env)["X-Spam-Status"]
    assert verdicts == {True: ["YES"], False: ["NO"]}


# --- no spamd ------------------------------------------------------------------------


def test_spamd_down_accepts_unchanged_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    sa = SpamAssassin(("127.0.0.1", free_port()), timeout=SCAN_TIMEOUT)
    env = envelope(message(b"Hello,\r\n\r\n" + GTUBE + b"\r\n", FORGED))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert sa.apply(env) is None
    assert spam_headers(env) == {"X-Spam-Status": [], "X-Spam-Symbols": []}
    assert env.message is not None and GTUBE in env.message
    [warning] = warnings_logged(caplog)
    assert "accepted" in warning and "127.0.0.1" in warning


def test_spamd_down_scan_raises() -> None:
    sa = SpamAssassin(("127.0.0.1", free_port()), timeout=SCAN_TIMEOUT)
    with pytest.raises(SpamAssassinError) as info:
        sa.scan(CLEAN)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_spamd_down_fail_closed_raises() -> None:
    sa = SpamAssassin(("127.0.0.1", free_port()), timeout=SCAN_TIMEOUT, fail_closed=True)
    env = envelope(message(b"hello\r\n", FORGED))
    before = env.flatten()
    with pytest.raises(SpamAssassinError):
        sa.apply(env)
    assert env.flatten() == before


@pytest.mark.parametrize(
    ("fail_closed", "expected"), [(False, QUEUED), (True, QUEUE_FAILED)], ids=["open", "closed"]
)
def test_spamd_down_through_edge_and_queue(
    make_edge: Callable[..., tuple[Any, int, Any]],
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
    fail_closed: bool,
    expected: tuple[str, str],
) -> None:
    # Fail closed: enqueue lets the SpamAssassinError out, the edge answers
    # 451 4.3.0, nothing is stored and the client keeps the message.
    storage = DictStorage()
    queue = Queue(storage)
    address = ("127.0.0.1", free_port())
    queue.add_policy(SpamAssassin(address, timeout=SCAN_TIMEOUT, fail_closed=fail_closed))
    _, port, _ = make_edge(queue=QueueFront(queue))
    client = smtp(port)
    client.ehlo("client.test")
    assert client.mail("alice@example.test")[0] == 250
    assert client.rcpt("bob@example.test")[0] == 250
    reply = client.data(message(b"hello\r\n", FORGED))
    assert reply_is(reply, expected), reply
    if fail_closed:
        assert storage.load() == []
    else:
        [(_, id)] = storage.load()
        env, _ = storage.get(id)
        assert spam_headers(env) == {"X-Spam-Status": [], "X-Spam-Symbols": []}


# --- fake spamd servers ----------------------------------------------------------------


@pytest.fixture
def fake_spamd() -> Iterator[Callable[[Callable[[socket.socket], None]], tuple[str, int]]]:
    """Factory: ``fake_spamd(handler) -> address`` of a server on 127.0.0.1
    that runs ``handler(sock)`` per connection; stopped at teardown."""
    servers: list[gevent.server.StreamServer] = []

    def start(handler: Callable[[socket.socket], None]) -> tuple[str, int]:
        def handle(sock: socket.socket, address: Any) -> None:
            # The client giving up mid-answer is what several tests expect.
            with contextlib.suppress(OSError):
                handler(sock)

        server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
        server.start()
        servers.append(server)
        return ("127.0.0.1", server.server_port)

    yield start
    for server in servers:
        server.stop(timeout=1)


def read_request(sock: socket.socket) -> bytes:
    """Read to EOF: returns only if the client shut down its write side."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def answer_with(answer: bytes) -> Callable[[socket.socket], None]:
    def handler(sock: socket.socket) -> None:
        read_request(sock)
        sock.sendall(answer)

    return handler


def test_fake_reads_request_to_eof_then_answers(
    fake_spamd: Callable[..., tuple[str, int]],
) -> None:
    requests: list[bytes] = []

    def handler(sock: socket.socket) -> None:
        requests.append(read_request(sock))
        for part in (b"SPAMD/1.1 0 EX_OK\r\n", b"Spam: True ; 9 / 5\r\n\r\n", b"A,B\r\n"):
            sock.sendall(part)
            gevent.sleep(0.01)

    sa = SpamAssassin(fake_spamd(handler), timeout=SHORT_TIMEOUT * 4)
    assert sa.scan(b"Subject: x\r\n\r\nbody\r\n") == (True, ["A", "B"])
    assert requests == [
        b"SYMBOLS SPAMC/1.1\r\nContent-length: 20\r\nUser: slimta\r\n\r\nSubject: x\r\n\r\nbody\r\n"
    ]


def never_answer(stop: gevent.event.Event) -> Callable[[socket.socket], None]:
    def handler(sock: socket.socket) -> None:
        read_request(sock)
        stop.wait()

    return handler


def trickle(sock: socket.socket) -> None:
    # Each byte arrives well within any per-read timeout; the answer never ends.
    read_request(sock)
    sock.sendall(b"SPAMD/1.1 0 EX_OK\r\n")
    while True:
        sock.sendall(b"X")
        gevent.sleep(0.05)


@pytest.mark.parametrize("kind", ["silent", "trickle"])
def test_timeout(
    fake_spamd: Callable[..., tuple[str, int]], caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    stop = gevent.event.Event()
    address = fake_spamd(never_answer(stop) if kind == "silent" else trickle)
    try:
        sa = SpamAssassin(address, timeout=SHORT_TIMEOUT)
        started = time.monotonic()
        with pytest.raises(SpamAssassinError, match="within"):
            sa.scan(CLEAN)
        assert SHORT_TIMEOUT * 0.8 < time.monotonic() - started < SHORT_TIMEOUT * 4

        env = envelope(message(b"hello\r\n", FORGED))
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            sa.apply(env)
        assert spam_headers(env) == {"X-Spam-Status": [], "X-Spam-Symbols": []}
        assert len(warnings_logged(caplog)) == 1

        closed = SpamAssassin(address, timeout=SHORT_TIMEOUT, fail_closed=True)
        with pytest.raises(SpamAssassinError):
            closed.apply(envelope(CLEAN))
    finally:
        stop.set()


def test_outer_timeout_is_not_swallowed(fake_spamd: Callable[..., tuple[str, int]]) -> None:
    # A gevent.Timeout started by the caller is the caller's: it must pass
    # through scan() and apply() untouched, not become "no verdict".
    stop = gevent.event.Event()
    sa = SpamAssassin(fake_spamd(never_answer(stop)), timeout=None)
    try:
        with pytest.raises(gevent.Timeout), gevent.Timeout(SHORT_TIMEOUT):
            sa.apply(envelope(CLEAN))
    finally:
        stop.set()


GARBAGE = [
    pytest.param(b"", id="closed-without-answer"),
    pytest.param(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", id="http"),
    pytest.param(b"SPAMD/1.0 76 Bad header line: SYMBOLS\r\n", id="refusal"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\nGTUBE\r\n", id="bad-spam-header"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\n\r\nGTUBE\r\n", id="no-spam-header"),
    pytest.param(
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 9 / 5\r\n\r\nGTUBE\r\nBcc: x@example.test\r\n",
        id="header-injection",
    ),
    pytest.param(bytes(range(256)) * 4, id="binary"),
]


@pytest.mark.parametrize("answer", GARBAGE)
def test_garbage_answer(
    fake_spamd: Callable[..., tuple[str, int]], caplog: pytest.LogCaptureFixture, answer: bytes
) -> None:
    address = fake_spamd(answer_with(answer))
    sa = SpamAssassin(address, timeout=SCAN_TIMEOUT)
    with pytest.raises(SpamAssassinError):
        sa.scan(CLEAN)
    env = envelope(message(b"hello\r\n", FORGED))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert sa.apply(env) is None
    assert spam_headers(env) == {"X-Spam-Status": [], "X-Spam-Symbols": []}
    assert b"Bcc" not in env.flatten()[0]
    assert len(warnings_logged(caplog)) == 1
    with pytest.raises(SpamAssassinError):
        SpamAssassin(address, timeout=SCAN_TIMEOUT, fail_closed=True).apply(envelope(CLEAN))


def endless(head: bytes, filler: bytes) -> Callable[[socket.socket], None]:
    def handler(sock: socket.socket) -> None:
        read_request(sock)
        sock.sendall(head)
        while True:
            sock.sendall(filler)

    return handler


@pytest.mark.parametrize(
    ("head", "filler"),
    [
        pytest.param(b"", b"\0" * 65536, id="zeros"),
        pytest.param(
            b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 9 / 5\r\n\r\n", b"RULE," * 2000, id="symbols"
        ),
        pytest.param(b"SPAMD/1.1 0 EX_OK\r\n", b"X-Pad: " + b"x" * 1000 + b"\r\n", id="headers"),
    ],
)
def test_endless_answer_is_cut_off(
    fake_spamd: Callable[..., tuple[str, int]], head: bytes, filler: bytes
) -> None:
    # No timeout: only the size bound can end this scan.
    sa = SpamAssassin(fake_spamd(endless(head, filler)))
    with pytest.raises(SpamAssassinError, match=f"more than {SpamAssassin.MAX_RESPONSE_SIZE}"):
        sa.scan(CLEAN)
    env = envelope(CLEAN)
    sa.apply(env)
    assert spam_headers(env) == {"X-Spam-Status": [], "X-Spam-Symbols": []}
