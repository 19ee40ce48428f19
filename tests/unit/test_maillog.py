"""The mail log (slimta.logging.maillog), its JSON formatter, and the metrics fed by it.

A real SmtpEdge in front of a real Queue over DictStorage, with a scripted
relay, talked to by a small SMTP client over gevent sockets (this directory
does not monkey-patch). Waiting is on the edge's and the queue's pools, with
timeouts, never on sleeps. TLS sessions are tested with the monkey-patched
integration tests (tests/integration/test_cli_observability.py).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gevent
import gevent.socket
import pytest

from slimta.cli import main
from slimta.cli.config import load_text
from slimta.cli.errors import EX_CONFIG, EX_USAGE, CliError, ConfigInvalid
from slimta.cli.logsetup import configure_logging, set_format
from slimta.cli.serve import Overrides
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.envelope import Envelope
from slimta.logging import maillog
from slimta.logging.jsonformat import JsonFormatter
from slimta.logging.maillog import MailLog, add_listener, remove_listener, render
from slimta.queue import Queue
from slimta.queue.dict import DictStorage
from slimta.relay import PermanentRelayError, Relay, TransientRelayError
from slimta.smtp.reply import Reply

#: Seconds any one wait may take before the test fails.
TIMEOUT = 5.0

MESSAGE = b"From: a@a.test\r\nSubject: hi\r\n\r\nHello.\r\n"


# --- helpers -------------------------------------------------------------------------


class ScriptedRelay(Relay):
    """Answers each attempt with the next outcome (default: 250 from mx.b.test:25)."""

    def __init__(self, *outcomes: Any) -> None:
        super().__init__()
        self.outcomes = list(outcomes)

    def attempt(self, envelope: Envelope, attempts: int) -> Any:
        outcome = self.outcomes.pop(0) if self.outcomes else ok_reply()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def ok_reply() -> Reply:
    return Reply("250", "2.0.0 Ok: queued as X", address=("mx.b.test", 25))


class Client:
    """Just enough SMTP over a gevent socket: commands and their replies."""

    def __init__(self, port: int) -> None:
        self.sock: Any = gevent.socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(4096)
                assert data, "connection closed"
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(text[4:] for text in lines)

    def command(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def send_message(self, sender: str, rcpts: list[str], body: bytes = MESSAGE) -> tuple[int, str]:
        assert self.command(f"MAIL FROM:<{sender}>")[0] == 250
        for rcpt in rcpts:
            self.command(f"RCPT TO:<{rcpt}>")
        code, text = self.command("DATA")
        if code != 354:
            return code, text
        self.sock.sendall(body + b".\r\n")
        return self.reply()

    def quit(self) -> None:
        self.command("QUIT")
        self.sock.close()


class Setup:
    """An SmtpEdge (no PTR lookups) in front of a Queue over DictStorage."""

    def __init__(self, relay: Relay | None, **edge_kwargs: Any) -> None:
        self.store = DictStorage()
        self.bounces: list[Envelope] = []
        self.queue = Queue(
            self.store,
            relay,
            backoff=edge_kwargs.pop("backoff", lambda envelope, attempts: 300.0),
            bounce_factory=self._bounce,
        )
        self.queue.start()
        edge_kwargs.setdefault("hostname", "mx.test")
        self.edge = SmtpEdge(("127.0.0.1", 0), self.queue, **edge_kwargs)
        self.edge.ptr_lookup = False
        self.edge.server.init_socket()
        self.edge.start()
        self.port: int = self.edge.server.server_port

    def _bounce(self, envelope: Envelope, reply: Reply) -> Envelope:
        bounce = Envelope("", [envelope.sender or ""])
        bounce.parse(b"Subject: failed\r\n\r\n" + str(reply).encode())
        self.bounces.append(bounce)
        return bounce

    def client(self) -> Client:
        client = Client(self.port)
        assert client.reply()[0] == 220
        assert client.command("EHLO client.test")[0] == 250
        return client

    def settle(self) -> None:
        """Wait until no session and no delivery attempt is running."""
        assert self.edge.pool.join(timeout=TIMEOUT), "sessions still open"
        assert self.queue.relay_pool.join(timeout=TIMEOUT), "attempts still running"

    def close(self) -> None:
        self.edge.kill()
        self.queue.kill(block=True, timeout=TIMEOUT)
        self.queue.relay_pool.kill(block=True, timeout=TIMEOUT)


@pytest.fixture
def setups() -> Iterator[Callable[..., Setup]]:
    made: list[Setup] = []

    def make(relay: Relay | None = None, **kwargs: Any) -> Setup:
        setup = Setup(relay if relay is not None else ScriptedRelay(), **kwargs)
        made.append(setup)
        return setup

    yield make
    for setup in made:
        setup.close()


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Callable[[str], list[logging.LogRecord]]:
    """``events(name)``: the mail-log records of event *name* so far."""
    caplog.set_level(logging.DEBUG, logger="slimta.maillog")

    def select(name: str) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name.startswith("slimta.maillog.") and getattr(r, "event", None) == name
        ]

    return select


def queued_id(text: str) -> str:
    match = re.search(r"queued as (\w+)", text)
    assert match, text
    return match.group(1)


# --- session events --------------------------------------------------------------------


def test_a_session_logs_connect_accepted_and_disconnect(
    setups: Callable[..., Setup], events: Callable[[str], list[logging.LogRecord]]
) -> None:
    setup = setups()
    client = setup.client()
    code, text = client.send_message("a@a.test", ["b@b.test", "c@b.test"])
    assert code == 250
    client.quit()
    setup.settle()
    id = queued_id(text)

    (connect,) = events("connect")
    port = connect.port
    assert connect.name == "slimta.maillog.edge"
    assert connect.getMessage() == f"connect from [127.0.0.1]:{port}"

    (accepted,) = events("accepted")
    assert accepted.levelno == logging.INFO
    assert accepted.getMessage() == (
        f"id={id} from=<a@a.test> size={len(MESSAGE)} nrcpt=2 client=127.0.0.1 "
        "proto=ESMTP helo=<client.test>"
    )
    assert (accepted.id, accepted.size, accepted.nrcpt) == (id, len(MESSAGE), 2)

    (disconnect,) = events("disconnect")
    assert disconnect.getMessage().startswith(
        f"disconnect from [127.0.0.1]:{port} tls=no messages=1 rejects=0 duration="
    )
    assert disconnect.tls == "no" and disconnect.tls_protocol is None


def test_refused_commands_are_logged_with_the_reply_sent(
    setups: Callable[..., Setup], events: Callable[[str], list[logging.LogRecord]]
) -> None:
    class Refuse(SmtpValidators):
        def handle_rcpt(self, reply: Reply, recipient: str, params: Any) -> None:
            if recipient.endswith("@elsewhere.test"):
                reply.code = "550"
                reply.message = "5.7.1 relaying denied"

    setup = setups(validator_class=Refuse, max_size=100)
    client = setup.client()
    assert client.command("MAIL FROM:<a@a.test>")[0] == 250
    assert client.command("RCPT TO:<x@elsewhere.test>")[0] == 550
    assert client.command("DATA")[0] == 503  # no valid recipient: the core answers
    assert client.command("RSET")[0] == 250
    code, _ = client.send_message("a@a.test", ["b@b.test"], b"x" * 200 + b"\r\n")
    assert code == 552
    client.quit()
    setup.settle()

    rejects = events("reject")
    # The core's own 503 (no valid recipients) never reaches the edge.
    assert [(r.command, r.code) for r in rejects] == [("RCPT", "550"), ("END-OF-MESSAGE", "552")]
    rcpt, size = rejects
    assert re.fullmatch(
        r"reject: RCPT from \[127\.0\.0\.1\]:\d+: 550 5\.7\.1 relaying denied; "
        r"from=<a@a\.test> to=<x@elsewhere\.test> helo=<client\.test>",
        rcpt.getMessage(),
    )
    assert rcpt.reply == "550 5.7.1 relaying denied"
    assert re.fullmatch(
        r"reject: END-OF-MESSAGE from \[127\.0\.0\.1\]:\d+: 552 5\.3\.4 [^;]*; "
        r"from=<a@a\.test> helo=<client\.test>",
        size.getMessage(),
    )
    (disconnect,) = events("disconnect")
    assert (disconnect.messages, disconnect.rejects) == (0, 2)


def test_a_refused_greeting_is_logged(
    setups: Callable[..., Setup], events: Callable[[str], list[logging.LogRecord]]
) -> None:
    class Busy(SmtpValidators):
        def handle_banner(self, reply: Reply, address: Any) -> None:
            reply.code = "421"
            reply.message = "4.7.0 too many connections from you"

    setup = setups(validator_class=Busy)
    client = Client(setup.port)
    assert client.reply()[0] == 421
    setup.settle()
    (reject,) = events("reject")
    assert reject.command == "CONNECT"
    assert reject.getMessage().endswith(": 421 4.7.0 too many connections from you")
    assert len(events("disconnect")) == 1


# --- queue events -----------------------------------------------------------------------


def test_a_delivery_names_relay_delay_and_status(
    setups: Callable[..., Setup], events: Callable[[str], list[logging.LogRecord]]
) -> None:
    setup = setups()
    client = setup.client()
    _, text = client.send_message("a@a.test", ["b@b.test"])
    client.quit()
    setup.settle()
    id = queued_id(text)

    (delivery,) = events("delivery")
    assert delivery.name == "slimta.maillog.queue"
    assert delivery.levelno == logging.INFO
    assert re.fullmatch(
        rf"id={id} to=<b@b\.test> relay=mx\.b\.test:25 delay=\d+\.\d\d attempt=1 "
        r"status=sent \(250 2\.0\.0 Ok: queued as X\)",
        delivery.getMessage(),
    )
    assert (delivery.status, delivery.relay, delivery.code) == ("sent", "mx.b.test:25", "250")
    assert 0.0 <= delivery.delay < TIMEOUT
    (removed,) = events("removed")
    assert removed.getMessage() == f"id={id} removed"
    assert removed.levelno == logging.DEBUG
    assert setup.store.get_info()["size"] == 0


def test_a_deferred_delivery_names_the_reason_and_the_retry(
    setups: Callable[..., Setup],
    events: Callable[[str], list[logging.LogRecord]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused = Reply("451", "4.3.0 Connection failed: [::1]:25: Connection refused")
    refused.address = ("::1", 25)
    setup = setups(ScriptedRelay(TransientRelayError("down", refused)))
    client = setup.client()
    _, text = client.send_message("a@a.test", ["b@b.test"])
    client.quit()
    setup.settle()
    id = queued_id(text)

    (delivery,) = events("delivery")
    assert delivery.levelno == logging.WARNING
    assert re.fullmatch(
        rf"id={id} to=<b@b\.test> relay=\[::1\]:25 delay=\d+\.\d\d attempt=1 retry=300 "
        r"status=deferred \(451 4\.3\.0 Connection failed: \[::1\]:25: Connection refused\)",
        delivery.getMessage(),
    )
    assert delivery.retry == 300.0
    assert not events("removed")
    # Logged once: the queue's own logger does not repeat the failure.
    assert not [r for r in caplog.records if r.name == "slimta.queue"]


def test_failures_without_relay_info_say_relay_none_and_bounce(
    events: Callable[[str], list[logging.LogRecord]],
) -> None:
    store = DictStorage()
    relay = ScriptedRelay(
        {
            "b@b.test": PermanentRelayError("no", Reply("550", "5.1.1 No such user")),
            "c@b.test": ok_reply(),
        }
    )
    bounce_ids: list[str] = []

    class Bounces:
        def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, Any]]:
            bounce_ids.append("bounce-1")
            return [(envelope, "bounce-1")]

    queue = Queue(store, relay, bounce_queue=Bounces())
    queue.start()
    try:
        envelope = Envelope("a@a.test", ["b@b.test", "c@b.test"])
        envelope.parse(MESSAGE)
        [(_, id)] = queue.enqueue(envelope)
        assert queue.relay_pool.join(timeout=TIMEOUT)
    finally:
        queue.kill(block=True, timeout=TIMEOUT)
    lines = [r.getMessage() for r in events("delivery")]
    assert len(lines) == 2
    assert re.fullmatch(rf"id={id} to=<c@b\.test> relay=mx\.b\.test:25 .* status=sent .*", lines[0])
    assert re.fullmatch(
        rf"id={id} to=<b@b\.test> relay=none delay=\S+ attempt=1 "
        r"status=bounced \(550 5\.1\.1 No such user\)",
        lines[1],
    )
    (bounce,) = events("bounce")
    assert bounce.getMessage() == f"id={id} bounce_id=bounce-1"
    assert bounce_ids == ["bounce-1"]
    assert [r.getMessage() for r in events("removed")] == [f"id={id} removed"]


def test_giving_up_is_logged_as_expired(events: Callable[[str], list[logging.LogRecord]]) -> None:
    store = DictStorage()
    relay = ScriptedRelay(TransientRelayError("down", Reply("451", "4.4.1 No answer")))
    queue = Queue(store, relay, backoff=lambda envelope, attempts: None, bounce_factory=_no_bounce)
    queue.start()
    try:
        envelope = Envelope("", ["b@b.test"])  # a null sender: no bounce
        envelope.parse(MESSAGE)
        envelope.timestamp = time.time() - 7200
        queue.enqueue(envelope)
        assert queue.relay_pool.join(timeout=TIMEOUT)
    finally:
        queue.kill(block=True, timeout=TIMEOUT)
    (delivery,) = events("delivery")
    assert delivery.status == "expired"
    assert delivery.delay >= 7200
    assert delivery.getMessage().endswith(
        "attempt=1 status=expired (451 4.4.1 No answer (Too many retries))"
    )
    assert not events("bounce")
    assert len(events("removed")) == 1


def _no_bounce(envelope: Envelope, reply: Reply) -> None:
    return None


# --- cost, listeners, text ------------------------------------------------------------------


def test_nothing_is_built_when_the_mail_log_is_off(
    setups: Callable[..., Setup], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="slimta.maillog")
    emitted: list[str] = []
    monkeypatch.setattr(MailLog, "emit", lambda self, level, event, fields: emitted.append(event))
    setup = setups()
    client = setup.client()
    assert client.send_message("a@a.test", ["b@b.test"])[0] == 250
    client.quit()
    setup.settle()
    # Sessions, acceptance and sent mail are INFO events: not even built.
    assert emitted == []


def test_listeners_get_every_event_whatever_the_level(
    setups: Callable[..., Setup], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="slimta.maillog")
    seen: list[tuple[str, dict[str, Any]]] = []

    def listener(event: str, fields: Mapping[str, Any]) -> None:
        seen.append((event, dict(fields)))

    def broken(event: str, fields: Mapping[str, Any]) -> None:
        raise RuntimeError("listener bug")

    add_listener(broken)
    add_listener(listener)
    try:
        setup = setups()
        client = setup.client()
        _, text = client.send_message("a@a.test", ["b@b.test"])
        client.quit()
        setup.settle()
    finally:
        remove_listener(listener)
        remove_listener(broken)
    remove_listener(broken)  # a second time: nothing happens
    names = [event for event, _ in seen]
    assert names[0] == "connect" and "disconnect" in names
    assert names.count("accepted") == names.count("delivery") == names.count("removed") == 1
    (accepted,) = [fields for event, fields in seen if event == "accepted"]
    assert accepted["id"] == queued_id(text)
    assert not [r for r in caplog.records if r.name.startswith("slimta.maillog.")]
    # The broken listener was reported, and did not stop the mail.
    assert any("exception:RuntimeError:unhandled" in r.getMessage() for r in caplog.records)


def test_peer_text_cannot_forge_lines() -> None:
    line = render(
        "delivery",
        {
            "id": "x",
            "to": "b@b.test>\nid=y status=sent",
            "relay": "none",
            "delay": 0.0,
            "attempt": 1,
            "status": "deferred",
            "reply": "451 4.0.0 no\r\nstatus=sent",
        },
    )
    assert "\n" not in line and "\r" not in line
    assert line.endswith("(451 4.0.0 no??status=sent)")
    assert render("custom", {"a": 1, "b": "two\x00"}) == "custom a=1 b=two?"
    assert render("removed", {"id": "x"}) == "id=x removed"


# --- the JSON formatter ------------------------------------------------------------------


def _record(msg: str, **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("slimta.test.json")
    return logger.makeRecord(logger.name, logging.INFO, __file__, 1, msg, (), None, extra=extra)


def test_json_lines_hold_time_level_logger_message_and_fields() -> None:
    record = _record(
        "id=x status=sent (250 ok)",
        event="delivery",
        id="x",
        delay=0.5,
        to="b@b.test",
        size=3,
        retry=None,
        bad=float("nan"),
        other=object(),
    )
    record.created = 1_700_000_000.25
    record.msecs = 250.0
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["time"] == "2023-11-14T22:13:20.250Z"
    assert (data["level"], data["logger"]) == ("INFO", "slimta.test.json")
    assert data["message"] == "id=x status=sent (250 ok)"
    assert (data["event"], data["id"], data["delay"], data["to"]) == (
        "delivery",
        "x",
        0.5,
        "b@b.test",
    )
    assert data["size"] == 3 and data["retry"] is None
    assert data["bad"] == "nan" and data["other"].startswith("<object object")
    assert list(data)[:4] == ["time", "level", "logger", "message"]
    for standard in ("args", "msg", "levelno", "pathname", "lineno", "thread", "process"):
        assert standard not in data


def test_json_lines_are_ascii_and_carry_exceptions() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = _record("caf\u00e9\nline two", client="\u00e9")
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert line.isascii() and "\n" not in line
    data = json.loads(line)
    assert data["message"] == "caf\u00e9\nline two"
    assert data["client"] == "\u00e9"
    assert "ValueError: bad" in data["exc_info"]


def test_maillog_records_through_the_json_formatter(
    setups: Callable[..., Setup], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="slimta.maillog")
    setup = setups()
    client = setup.client()
    _, text = client.send_message("a@a.test", ["b@b.test"])
    client.quit()
    setup.settle()
    formatter = JsonFormatter()
    objects = [
        json.loads(formatter.format(r))
        for r in caplog.records
        if r.name.startswith("slimta.maillog")
    ]
    by_event = {obj["event"]: obj for obj in objects}
    assert by_event["accepted"]["id"] == queued_id(text)
    assert by_event["accepted"]["from"] == "a@a.test"
    assert by_event["delivery"]["status"] == "sent"
    assert by_event["delivery"]["to"] == "b@b.test"
    assert by_event["delivery"]["logger"] == "slimta.maillog.queue"


# --- slimta serve: options, configuration, logging setup ---------------------------------


def test_log_format_in_the_configuration_and_on_the_command_line() -> None:
    assert load_text("", "t.toml").server.log_format == "text"
    config = load_text('[server]\nlog_format = "json"\n', "t.toml")
    assert config.server.log_format == "json"
    with pytest.raises(ConfigInvalid) as info:
        load_text('[server]\nlog_format = "xml"\n', "t.toml")
    assert "server.log_format" in "\n".join(info.value.lines())
    assert Overrides(log_format="json").apply(load_text("", "t.toml")).server.log_format == "json"
    assert Overrides().apply(config).server.log_format == "json"


def test_bad_log_format_or_metrics_option_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--log-format", "xml"]) == EX_USAGE
    assert main(["serve", "--metrics", "localhost:http"]) == EX_USAGE
    err = capsys.readouterr().err
    assert "--log-format" in err and "--metrics" in err


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_configure_logging_chooses_the_formatter(root_logging: logging.Logger) -> None:
    configure_logging("info", "json")
    (handler,) = root_logging.handlers
    assert isinstance(handler.formatter, JsonFormatter)
    set_format("text")
    assert not isinstance(handler.formatter, JsonFormatter)
    assert handler.formatter is not None
    line = handler.formatter.format(_record("hello"))
    assert line.endswith(" INFO slimta.test.json: hello")


# --- metrics (slimta serve --metrics) ------------------------------------------------------


@pytest.fixture
def metrics() -> Iterator[Any]:
    prometheus_client = pytest.importorskip("prometheus_client")
    from slimta.cli.metrics import Metrics

    made = Metrics(registry=prometheus_client.CollectorRegistry())
    add_listener(made.on_event)
    yield made
    remove_listener(made.on_event)


def sample(metrics: Any, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def test_metrics_count_sessions_messages_refusals_and_deliveries(
    setups: Callable[..., Setup], metrics: Any
) -> None:
    class Refuse(SmtpValidators):
        def handle_rcpt(self, reply: Reply, recipient: str, params: Any) -> None:
            if recipient.startswith("nobody@"):
                reply.code = "550"
                reply.message = "5.1.1 No such user"

    setup = setups(validator_class=Refuse)
    client = setup.client()
    assert sample(metrics, "slimta_smtp_sessions_open") == 1.0
    assert client.send_message("a@a.test", ["b@b.test", "nobody@b.test"])[0] == 250
    assert client.send_message("a@a.test", ["c@b.test"])[0] == 250
    client.quit()
    setup.settle()
    assert sample(metrics, "slimta_smtp_sessions_total") == 1.0
    assert sample(metrics, "slimta_smtp_sessions_open") == 0.0
    assert sample(metrics, "slimta_smtp_messages_accepted_total") == 2.0
    assert sample(metrics, "slimta_smtp_refused_total", command="RCPT", code="550") == 1.0
    assert sample(metrics, "slimta_deliveries_total", status="sent") == 2.0
    assert sample(metrics, "slimta_delivery_delay_seconds_count") == 2.0
    assert sample(metrics, "slimta_smtp_tls_sessions_total", protocol="TLSv1.3") == 0.0


def test_metrics_queue_gauges_are_computed_at_scrape(
    setups: Callable[..., Setup], metrics: Any
) -> None:
    from prometheus_client import CollectorRegistry

    from slimta.cli.metrics import Metrics

    relay = ScriptedRelay(TransientRelayError("down", Reply("451", "4.3.0 down")))
    setup = setups(relay)
    assert sample(metrics, "slimta_queue_messages") == 0.0  # no queue watched yet
    metrics.watch(setup.queue)
    envelope = Envelope("a@a.test", ["b@b.test"])
    envelope.parse(MESSAGE)
    envelope.timestamp = time.time() - 100.0
    setup.queue.enqueue(envelope)
    setup.settle()
    assert sample(metrics, "slimta_deliveries_total", status="deferred") == 1.0
    assert sample(metrics, "slimta_queue_messages") == 1.0
    assert 100.0 <= sample(metrics, "slimta_queue_oldest_age_seconds") < 100.0 + TIMEOUT

    # A server started with mail queued has seen no event about it: the
    # age is read from storage.
    fresh = Metrics(registry=CollectorRegistry())
    fresh.watch(setup.queue)
    assert 100.0 <= sample(fresh, "slimta_queue_oldest_age_seconds") < 100.0 + TIMEOUT


def test_metrics_without_prometheus_client_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from slimta.cli.metrics import Metrics

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(CliError) as info:
        Metrics()
    assert info.value.status == EX_CONFIG
    assert "prometheus_client" in info.value.message and "[metrics]" in info.value.message


def test_maillog_module_names() -> None:
    assert maillog.EDGE == "slimta.maillog.edge"
    assert maillog.QUEUE == "slimta.maillog.queue"
