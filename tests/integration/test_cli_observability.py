"""Logs and metrics of ``slimta serve``, run as a real process.

The server runs with ``--log-format json`` (or the default text) and
``--metrics 127.0.0.1:0`` (a port the system chooses, which the server logs),
receives mail from :mod:`smtplib` and relays it to a second ``slimta serve``
acting as smarthost (or to a port that refuses connections). The tests read
the server's standard error line by line with a deadline, and scrape the
metrics with :mod:`urllib`.

The TLS lines and the TLS counter are tested in-process, on an
:class:`~slimta.edge.smtp.SmtpEdge` in front of a real queue.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slimta.envelope import Envelope
from slimta.logging.maillog import add_listener, remove_listener
from slimta.lookup.auth import hash_password
from slimta.queue import Queue
from slimta.queue.dict import DictStorage
from slimta.relay import Relay
from slimta.smtp.reply import Reply

#: Seconds any one wait (a log line, a process's exit) may take.
DEADLINE = 30.0

MESSAGE = b"From: sender@a.test\r\nSubject: hello\r\n\r\nHello there.\r\n"


class Server:
    """One ``python -m slimta serve`` process and the lines it logged so far."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slimta", "serve", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._partial = b""
        self._seen = 0

    def _read_more(self, until: float) -> bool:
        """Read what the process wrote so far, waiting at most until *until*;
        False at the end of its output."""
        assert self.proc.stderr is not None
        left = until - time.monotonic()
        assert left > 0, "timed out; the server logged:\n" + "\n".join(self.lines)
        # The server is another process: poll its output, bounded by the deadline.
        readable, _, _ = select.select([self.proc.stderr.fileno()], [], [], left)
        if not readable:
            return True
        chunk = os.read(self.proc.stderr.fileno(), 65536)
        if not chunk:
            return False
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        self.lines += [line.decode("utf-8", "replace") for line in complete]
        return True

    def next_line(self, accept: Callable[[str], Any], timeout: float = DEADLINE) -> Any:
        """The first result of *accept* that is true, over the lines not
        looked at yet (waiting for more, up to *timeout* seconds)."""
        until = time.monotonic() + timeout
        while True:
            while self._seen < len(self.lines):
                line = self.lines[self._seen]
                self._seen += 1
                result = accept(line)
                if result:
                    return result
            if not self._read_more(until):
                raise AssertionError("the server ended early; it logged:\n" + "\n".join(self.lines))

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The next line matching the regular expression *pattern*."""
        regex = re.compile(pattern)
        match: re.Match[str] = self.next_line(regex.search)
        return match

    def wait_for_event(self, event: str, **fields: Any) -> dict[str, Any]:
        """The first JSON line logged (now or later) of mail-log *event*
        with these *fields*: events of different greenlets may come in any
        order, so each search starts from the first line."""
        until = time.monotonic() + DEADLINE
        checked = 0
        while True:
            for line in self.lines[checked:]:
                data: dict[str, Any] = json.loads(line)
                if data.get("event") == event and all(
                    data.get(key) == value for key, value in fields.items()
                ):
                    return data
            checked = len(self.lines)
            if not self._read_more(until):
                raise AssertionError(f"the server ended before logging {event} {fields}")

    def finish(self, timeout: float = DEADLINE) -> tuple[int, str]:
        """Wait for the exit: ``(status, everything logged)``."""
        until = time.monotonic() + timeout
        while self._read_more(until):
            pass
        status = self.proc.wait(timeout=max(0.1, until - time.monotonic()))
        return status, "\n".join(self.lines)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        return self.finish()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Server:
        server = Server(*args, cwd=tmp_path, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def smarthost_config(tmp_path: Path) -> Path:
    path = tmp_path / "smarthost.toml"
    path.write_text(
        '[server]\nhostname = "smarthost.test"\ndata_dir = "smarthost-data"\n'
        '[listeners.in]\naddress = "127.0.0.1:0"\n'
        '[local]\ndomains = ["example.org"]\n'
    )
    return path


def sender_config(tmp_path: Path, smarthost_port: int) -> Path:
    """A server relaying for 127.0.0.0/8 through the smarthost, with one
    local user (alice@a.test): other local parts of a.test are refused."""
    path = tmp_path / "sender.toml"
    path.write_text(
        '[server]\nhostname = "sender.test"\ndata_dir = "sender-data"\n'
        'trusted_networks = ["127.0.0.0/8"]\n'
        '[listeners.in]\naddress = "127.0.0.1:0"\n'
        '[local]\ndomains = ["a.test"]\n'
        f'[users]\n"alice@a.test" = "{hash_password("secret")}"\n'
        '[relay]\ndefault = "smarthost"\n'
        f'[relay.smarthost]\nhost = "127.0.0.1"\nport = {smarthost_port}\n'
        "[queue]\nretry = [3600]\n"
    )
    return path


def ready(server: Server) -> tuple[int, str | None]:
    """Wait until *server* (logging text or JSON) is ready:
    ``(smtp port, metrics url or None)``."""
    port: int | None = None
    url: str | None = None
    while True:
        line = server.next_line(lambda line: line)
        message = json.loads(line)["message"] if line.startswith("{") else line
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", message):
            port = int(match.group(1))
        if match := re.search(r"Prometheus text format on (http://\S+)", message):
            url = match.group(1)
        if re.search(r"ready \(pid \d+\)", message):
            assert port is not None, server.lines
            return port, url


def scrape(url: str) -> dict[str, float]:
    """The metrics at *url*: ``{'name{labels}': value}``."""
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def send(port: int, recipients: list[str]) -> tuple[int, str]:
    """Send one message; :returns: the reply to the data."""
    with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
        client.ehlo("client.test")
        client.mail("sender@a.test")
        for rcpt in recipients:
            client.rcpt(rcpt)
        code, text = client.data(MESSAGE)
    return code, text.decode()


def queued_id(text: str) -> str:
    match = re.search(r"queued as (\w+)", text)
    assert match, text
    return match.group(1)


# --- the real command --------------------------------------------------------------------


def test_json_log_and_metrics_follow_a_message_to_the_smarthost(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    smarthost = serve("--config", str(smarthost_config(tmp_path)))
    smarthost_port, _ = ready(smarthost)
    config = sender_config(tmp_path, smarthost_port)
    sender = serve("--config", str(config), "--log-format", "json", "--metrics", "127.0.0.1:0")
    port, url = ready(sender)
    assert url is not None

    before = scrape(url)
    assert before["slimta_smtp_messages_accepted_total"] == 0.0
    assert before["slimta_queue_messages"] == 0.0

    with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
        client.ehlo("client.test")
        # Refused: the sender's domain is local and has no such user.
        assert client.mail("sender@a.test")[0] == 250
        assert client.rcpt("nobody@a.test")[0] == 550
        assert client.rcpt("bob@example.org")[0] == 250
        code, reply = client.data(MESSAGE)
    assert code == 250
    id = queued_id(reply.decode())

    connect = sender.wait_for_event("connect")
    reject = sender.wait_for_event("reject", command="RCPT")
    assert (reject["code"], reject["to"], reject["client"]) == ("550", "nobody@a.test", "127.0.0.1")
    assert reject["logger"] == "slimta.maillog.edge"
    accepted = sender.wait_for_event("accepted", id=id)
    assert (accepted["from"], accepted["nrcpt"], accepted["client"]) == (
        "sender@a.test",
        1,
        "127.0.0.1",
    )
    assert accepted["size"] == len(MESSAGE)  # as received, before the policies
    assert accepted["message"].startswith(f"id={id} from=<sender@a.test> size=")
    delivery = sender.wait_for_event("delivery", id=id)
    assert (delivery["status"], delivery["to"]) == ("sent", "bob@example.org")
    assert delivery["relay"] == f"127.0.0.1:{smarthost_port}"
    assert delivery["code"] == "250" and delivery["delay"] >= 0
    assert delivery["level"] == "INFO"
    disconnect = sender.wait_for_event("disconnect", port=connect["port"])
    assert (disconnect["tls"], disconnect["messages"], disconnect["rejects"]) == ("no", 1, 1)

    after = scrape(url)
    assert after["slimta_smtp_sessions_total"] == before["slimta_smtp_sessions_total"] + 1
    assert after["slimta_smtp_messages_accepted_total"] == 1.0
    assert after['slimta_smtp_refused_total{code="550",command="RCPT"}'] == 1.0
    assert after['slimta_deliveries_total{status="sent"}'] == 1.0
    assert after["slimta_delivery_delay_seconds_count"] == 1.0
    assert after["slimta_smtp_sessions_open"] == 0.0
    assert after["slimta_queue_messages"] == 0.0

    status, log = sender.stop()
    assert status == 0, log
    for line in log.splitlines():
        json.loads(line)  # every line is JSON, to the last
    assert smarthost.stop()[0] == 0


def test_smarthost_down_is_a_deferred_line_naming_the_reason(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    # The smarthost's port is held by a socket that does not listen:
    # connections to it are refused.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    down = holder.getsockname()[1]
    try:
        sender = serve("--config", str(sender_config(tmp_path, down)), "--metrics", "127.0.0.1:0")
        port, url = ready(sender)
        assert url is not None
        code, reply = send(port, ["bob@example.org"])
        assert code == 250
        id = queued_id(reply)
        match = sender.wait_for(
            rf"WARNING slimta\.maillog\.queue: id={id} to=<bob@example\.org> "
            rf"relay=127\.0\.0\.1:{down} delay=\S+ attempt=1 retry=3600 "
            r"status=deferred \((.*)\)$"
        )
        assert match.group(1).startswith(f"451 4.3.0 Connection failed: 127.0.0.1:{down}: ")
        assert "refused" in match.group(1).lower()
        samples = scrape(url)
        assert samples['slimta_deliveries_total{status="deferred"}'] == 1.0
        assert samples["slimta_queue_messages"] == 1.0
        assert samples["slimta_queue_oldest_age_seconds"] >= 0.0
        status, log = sender.stop()
        assert status == 0, log
        assert "Traceback" not in log
        # Said once, by the mail log; not repeated by another logger.
        assert log.count(f"id={id} to=<bob@example.org>") == 1
    finally:
        holder.close()


def test_metrics_without_prometheus_client_exit_78(tmp_path: Path) -> None:
    hide = (
        "import sys; sys.modules['prometheus_client'] = None; "
        "from slimta.cli import main; "
        "sys.exit(main(['serve', '--listen', '127.0.0.1:0', '--metrics', '127.0.0.1:0']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 78, result.stderr
    lines = result.stderr.decode().splitlines()
    assert lines[-1].startswith("slimta: --metrics needs the prometheus_client package")
    assert "[metrics]" in lines[-1]
    assert "Traceback" not in result.stderr.decode()


# --- TLS, in-process ------------------------------------------------------------------------


class OkRelay(Relay):
    def attempt(self, envelope: Envelope, attempts: int) -> Reply:
        return Reply("250", "2.0.0 Ok", address=("mx.example.org", 25))


def test_starttls_sessions_are_logged_and_counted(
    make_edge: Callable[..., tuple[Any, int, Any]],
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from slimta.cli.metrics import Metrics

    metrics = Metrics(registry=prometheus_client.CollectorRegistry())
    caplog.set_level(logging.INFO, logger="slimta.maillog")
    queue = Queue(DictStorage(), OkRelay())
    queue.start()
    edge, port, _ = make_edge(queue=queue, context=server_context)
    add_listener(metrics.on_event)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
            client.starttls(context=client_context)
            client.ehlo("client.test")
            assert client.sendmail("a@a.test", ["b@example.org"], MESSAGE) == {}
            sock: Any = client.sock
            protocol, cipher = sock.version(), sock.cipher()[0]
        assert edge.session_ended.wait(DEADLINE)
        assert queue.relay_pool.join(timeout=DEADLINE)
    finally:
        remove_listener(metrics.on_event)
        queue.kill(block=True, timeout=DEADLINE)

    by_event = {getattr(r, "event", None): r for r in caplog.records}
    tls = by_event["tls"]
    assert (tls.tls_protocol, tls.tls_cipher) == (protocol, cipher)
    assert re.fullmatch(
        rf"tls from \[127\.0\.0\.1\]:\d+ protocol={protocol} cipher={cipher}", tls.getMessage()
    )
    assert by_event["accepted"].proto == "ESMTPS"
    assert f"tls=yes protocol={protocol} cipher={cipher} messages=1" in (
        by_event["disconnect"].getMessage()
    )
    assert by_event["delivery"].relay == "mx.example.org:25"
    count = metrics.registry.get_sample_value(
        "slimta_smtp_tls_sessions_total", {"protocol": protocol}
    )
    assert count == 1.0
