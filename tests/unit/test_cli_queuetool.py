"""The queue tools, ``slimta sendmail`` and ``slimta setup systemd``, in process.

* the server side of the queue tools (:mod:`slimta.cli.control`): a
  :class:`~slimta.queue.Queue` over :class:`ControlledStorage`, driven by a
  :class:`ControlService` as the control socket would, with a fake clock
  and a scripted relay; the control socket itself, over a real Unix socket;
* the tools working on the queue files while no server runs
  (:mod:`slimta.cli.queuetool`), on a real :class:`DiskStorage` spool;
* the sendmail option parser, input reading and ``-t`` header handling;
* the systemd unit, parsed back as an INI file.

Waiting is on gevent queues and pool joins with timeouts, never on sleeps.
The tools as real processes against a real server are in
``tests/integration/test_cli_queue_sendmail.py``.
"""

from __future__ import annotations

import base64
import configparser
import fcntl
import io
import os
import pickle
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.queue
import pytest
from gevent.server import StreamServer

from slimta.cli import main
from slimta.cli.config import load_text
from slimta.cli.control import (
    HELD_AT,
    Control,
    ControlledStorage,
    ControlService,
    RecordingRelay,
    _bind_unix,
)
from slimta.cli.errors import CliError
from slimta.cli.queuetool import QueueTool, SpoolReader, call, format_table, load_envelope
from slimta.cli.sendmail import (
    Options,
    _tcp_address,
    header_recipients,
    parse_args,
    prepare,
    read_message,
)
from slimta.cli.systemd import command_line, render_unit, systemd_quote
from slimta.diskstorage import DiskStorage
from slimta.envelope import Envelope
from slimta.queue import Queue
from slimta.queue.dict import DictStorage
from slimta.relay import PermanentRelayError, Relay, TransientRelayError
from slimta.smtp.reply import Reply
from slimta.util.workers import SpoolLock

#: Seconds any wait may take before the test fails.
TIMEOUT = 5.0
START = 1_000_000.0
#: The scheduler's retry wait in these tests.
RETRY = 600.0

REFUSED = TransientRelayError("down", Reply("451", "4.4.0 Connection refused"))


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class ScriptedRelay(Relay):
    """Answers each attempt with the next outcome (default: delivered); an
    outcome may be a callable, which may block. Each attempt's recipients
    are put on :attr:`calls`."""

    def __init__(self, *outcomes: Any) -> None:
        super().__init__()
        self.outcomes = list(outcomes)
        self.calls: gevent.queue.Queue[list[str]] = gevent.queue.Queue()

    def attempt(self, envelope: Envelope, attempts: int) -> Any:
        self.calls.put(list(envelope.recipients))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if callable(outcome):
            outcome = outcome()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def next_call(self) -> list[str]:
        recipients: list[str] = self.calls.get(timeout=TIMEOUT)
        return recipients


def envelope(*recipients: str, sender: str = "sender@a.test") -> Envelope:
    made = Envelope(sender, list(recipients) or ["bob@b.test"])
    made.parse(b"Subject: test\r\nTo: bob@b.test\r\n\r\nbody\r\n")
    made.timestamp = START
    return made


class Server:
    """A queue as ``slimta serve`` builds it, and the control service."""

    def __init__(self, relay: Relay, store: DictStorage | None = None) -> None:
        self.clock = FakeClock()
        self.store = store if store is not None else DictStorage()
        self.storage = ControlledStorage(self.store)
        self.queue = Queue(
            self.storage,
            RecordingRelay(relay, self.storage),
            backoff=lambda envelope, attempts: RETRY,
            clock=self.clock,
        )
        self.service = ControlService(self.storage, self.queue, clock=self.clock)

    def settle(self) -> None:
        assert self.queue.relay_pool.join(timeout=TIMEOUT), "attempts still running"

    def ask(self, op: str, id: str | None = None) -> dict[str, Any]:
        request: dict[str, Any] = {"v": 1, "op": op}
        if id is not None:
            request["id"] = id
        return self.service.handle(request)

    def listed(self) -> dict[str, dict[str, Any]]:
        answer = self.ask("list")
        assert answer["ok"], answer
        return {info["id"]: info for info in answer["messages"]}


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.queue.kill(block=True, timeout=TIMEOUT)
        server.queue.relay_pool.kill(block=True, timeout=TIMEOUT)


def started(servers: list[Server], relay: Relay, store: DictStorage | None = None) -> Server:
    server = Server(relay, store)
    servers.append(server)
    server.queue.start()
    return server


def enqueued(server: Server, message: Envelope) -> str:
    [(_, id)] = server.queue.enqueue(message)
    assert isinstance(id, str)
    return id


def deferred_message(server: Server, relay: ScriptedRelay) -> str:
    id = enqueued(server, envelope())
    relay.next_call()
    server.settle()
    return id


# --- the server side ------------------------------------------------------------------


def test_list_shows_attempts_state_and_the_last_error(servers: list[Server]) -> None:
    relay = ScriptedRelay(REFUSED)
    server = started(servers, relay)
    id = deferred_message(server, relay)
    info = server.listed()[id]
    assert info["attempts"] == 1
    assert info["state"] == "deferred"
    assert info["next_attempt"] == START + RETRY
    assert info["last_error"] == "451 4.4.0 Connection refused"
    assert info["sender"] == "sender@a.test"
    assert info["recipients"] == ["bob@b.test"]
    assert info["size"] == len(b"Subject: test\r\nTo: bob@b.test\r\n\r\nbody\r\n")


def test_last_error_of_a_partial_failure_names_the_recipients(servers: list[Server]) -> None:
    refused = PermanentRelayError("no", Reply("550", "5.1.1 No such user"))
    relay = ScriptedRelay({"a@b.test": None, "c@b.test": REFUSED, "d@b.test": refused})
    server = started(servers, relay)
    id = enqueued(server, envelope("a@b.test", "c@b.test", "d@b.test"))
    relay.next_call()
    server.settle()
    info = server.listed()[id]
    assert info["recipients"] == ["c@b.test"]
    assert info["last_error"] == (
        "<c@b.test>: 451 4.4.0 Connection refused; <d@b.test>: 550 5.1.1 No such user"
    )


def test_show_gives_the_whole_message(servers: list[Server]) -> None:
    relay = ScriptedRelay(REFUSED)
    server = started(servers, relay)
    id = deferred_message(server, relay)
    answer = server.ask("show", id)
    assert answer["ok"]
    assert base64.b64decode(answer["data"]).endswith(b"\r\n\r\nbody\r\n")
    assert answer["message"]["id"] == id


def test_unknown_and_malformed_ids_and_bad_requests(servers: list[Server]) -> None:
    server = started(servers, ScriptedRelay())
    for op in ("show", "flush", "remove", "hold", "release"):
        answer = server.ask(op, "0" * 32)
        assert answer == {
            "ok": False,
            "error": "no-such-message",
            "message": f"no message {'0' * 32} in the queue",
        }
    assert server.ask("show", "../../etc/passwd")["error"] == "bad-request"
    assert server.ask("frobnicate")["error"] == "bad-request"
    assert server.ask("hold")["error"] == "bad-request"
    assert server.service.handle({"op": "list"})["error"] == "bad-request"  # no version
    assert server.service.handle([1, 2])["error"] == "bad-request"


def test_flush_of_one_message_attempts_it_now(servers: list[Server]) -> None:
    relay = ScriptedRelay(REFUSED)
    server = started(servers, relay)
    id = deferred_message(server, relay)
    assert server.ask("flush", id) == {"ok": True, "flushed": 1}
    assert relay.next_call() == ["bob@b.test"]
    server.settle()
    assert id not in server.listed()


def test_flush_of_all_attempts_every_waiting_message(servers: list[Server]) -> None:
    relay = ScriptedRelay(REFUSED, REFUSED)
    server = started(servers, relay)
    first = deferred_message(server, relay)
    second = deferred_message(server, relay)
    assert server.ask("flush") == {"ok": True, "flushed": 2}
    relay.next_call()
    relay.next_call()
    server.settle()
    assert first not in server.listed() and second not in server.listed()


def test_held_message_is_never_attempted_until_released(servers: list[Server]) -> None:
    relay = ScriptedRelay(REFUSED)
    server = started(servers, relay)
    held = deferred_message(server, relay)
    assert server.ask("hold", held) == {"ok": True, "changed": True}
    assert server.ask("hold", held) == {"ok": True, "changed": False}
    assert server.store.meta_db[held]["timestamp"] == HELD_AT
    assert server.listed()[held]["state"] == "held"
    assert server.ask("flush", held)["error"] == "held"

    # Everything due now: the other message goes, the held one does not.
    enqueued(server, envelope("carol@b.test"))
    assert relay.next_call() == ["carol@b.test"]
    server.ask("flush")
    server.clock.now += 10 * RETRY
    server.queue.kick()
    server.settle()
    gevent.sleep(0)
    assert relay.calls.empty()
    assert list(server.listed()) == [held]

    assert server.ask("release", held) == {"ok": True, "changed": True}
    assert server.ask("release", held) == {"ok": True, "changed": False}
    assert relay.next_call() == ["bob@b.test"]
    server.settle()
    assert server.listed() == {}


def test_hold_during_an_attempt_outlasts_its_retry(servers: list[Server]) -> None:
    go = gevent.event.Event()

    def slow() -> TransientRelayError:
        go.wait(TIMEOUT)
        return REFUSED

    relay = ScriptedRelay(slow)
    server = started(servers, relay)
    id = enqueued(server, envelope())
    relay.next_call()
    assert server.listed()[id]["state"] == "active"
    assert server.ask("hold", id)["changed"]
    go.set()
    server.settle()
    # The attempt's retry kept the hold, on disk and in the scheduler.
    assert server.store.meta_db[id]["timestamp"] == HELD_AT
    server.clock.now += 10 * RETRY
    server.queue.kick()
    gevent.sleep(0)
    server.settle()
    assert relay.calls.empty()
    assert server.listed()[id]["state"] == "held"


def test_hold_survives_a_restart(servers: list[Server]) -> None:
    relay = ScriptedRelay(REFUSED)
    first = started(servers, relay)
    id = deferred_message(first, relay)
    first.ask("hold", id)
    first.queue.kill(block=True, timeout=TIMEOUT)

    # A new server on the same storage, with a relay that would deliver.
    relay = ScriptedRelay()
    second = started(servers, relay, first.store)
    enqueued(second, envelope("carol@b.test"))
    assert relay.next_call() == ["carol@b.test"]
    second.settle()
    assert second.ask("flush") == {"ok": True, "flushed": 0}
    gevent.sleep(0)
    assert relay.calls.empty()
    assert second.listed()[id]["state"] == "held"
    assert second.ask("release", id)["changed"]
    assert relay.next_call() == ["bob@b.test"]


def test_remove_deletes_and_an_attempt_under_way_cannot_bring_it_back(
    servers: list[Server],
) -> None:
    go = gevent.event.Event()

    def slow() -> TransientRelayError:
        go.wait(TIMEOUT)
        return REFUSED

    relay = ScriptedRelay(REFUSED, slow)
    server = started(servers, relay)
    waiting = deferred_message(server, relay)
    assert server.ask("remove", waiting) == {"ok": True}
    assert waiting not in server.store.meta_db
    assert waiting not in server.queue.queued_ids

    active = enqueued(server, envelope())
    relay.next_call()
    assert server.ask("remove", active) == {"ok": True}
    go.set()
    server.settle()
    assert server.store.meta_db == {}
    assert server.listed() == {}
    assert server.ask("show", active)["error"] == "no-such-message"


# --- the control socket --------------------------------------------------------------


def test_control_socket_is_private_and_answers_the_tools(
    servers: list[Server], tmp_path: Path
) -> None:
    relay = ScriptedRelay(REFUSED)
    server = started(servers, relay)
    id = deferred_message(server, relay)
    control = Control(server.store, tmp_path)
    control.service = server.service
    path = tmp_path / "control.sock"
    path.touch()
    with pytest.raises(OSError, match="not a socket"):
        _bind_unix(path, 0o600)
    path.unlink()
    listener = StreamServer(_bind_unix(path, 0o600), control._serve)
    listener.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # The tool blocks on its socket: run it in a thread, the hub serves.
        answer = gevent.get_hub().threadpool.apply(call, (path, {"op": "list"}))
        assert answer is not None
        assert [info["id"] for info in answer["messages"]] == [id]
        with pytest.raises(CliError) as refused:
            gevent.get_hub().threadpool.apply(call, (path, {"op": "show", "id": "f" * 32}))
        assert refused.value.status == 66
    finally:
        listener.stop()
    assert call(tmp_path / "nothing.sock", {"op": "list"}) is None


# --- the queue files, without a server ---------------------------------------------------


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[tuple[Path, DiskStorage]]:
    queue_dir = tmp_path / "queue"
    store = DiskStorage(queue_dir / "env", queue_dir / "meta")
    yield tmp_path, store


def tool(data_dir: Path) -> tuple[QueueTool, io.BytesIO, io.StringIO]:
    out, err = io.BytesIO(), io.StringIO()
    return QueueTool(data_dir, out, err, clock=lambda: START + 90), out, err


def test_spool_reader_reads_what_disk_storage_wrote(spool: tuple[Path, DiskStorage]) -> None:
    data_dir, store = spool
    id = store.write(envelope("a@b.test", "c@b.test"), START + 60)
    store.get(id)
    store.set_recipients_delivered(id, [0])
    store.increment_attempts(id)
    store.set_timestamp(id, START + 600)
    fresh = store.write(envelope(), START)
    reader = SpoolReader(data_dir / "queue")
    read = {message.id: message for message in reader.messages()}
    assert read[id].envelope.recipients == ["c@b.test"]
    assert (read[id].attempts, read[id].next_attempt) == (1, START + 600)
    assert (read[fresh].attempts, read[fresh].next_attempt) == (0, START)


def test_offline_list_show_hold_release_remove(spool: tuple[Path, DiskStorage]) -> None:
    data_dir, store = spool
    id = store.write(envelope(), START)
    run, out, err = tool(data_dir)
    assert run.run("list", None, as_json=False, headers_only=False) == 0
    assert f"{id}     1m" in out.getvalue().decode()
    assert "no server is running" in err.getvalue()

    assert run.run("hold", id, False, False) == 0
    assert DiskStorage(data_dir / "queue" / "env", data_dir / "queue" / "meta").load() == [
        (HELD_AT, id)
    ]
    run, out, _ = tool(data_dir)
    run.run("show", id, False, headers_only=True)
    shown = out.getvalue().decode()
    assert "state: held" in shown and "Subject: test" in shown and "body" not in shown

    assert run.run("release", id, False, False) == 0
    assert SpoolReader(data_dir / "queue").read(id).next_attempt == START + 90
    assert run.run("remove", id, False, False) == 0
    assert list(SpoolReader(data_dir / "queue").messages()) == []


def test_offline_errors_have_their_exit_statuses(spool: tuple[Path, DiskStorage]) -> None:
    data_dir, _ = spool
    run, _, _ = tool(data_dir)
    for action, id, status in [
        ("flush", None, 69),
        ("show", "0" * 32, 66),
        ("hold", "0" * 32, 66),
        ("remove", "xyz", 64),
    ]:
        with pytest.raises(CliError) as error:
            run.run(action, id, False, False)
        assert error.value.status == status, (action, error.value.message)
    with pytest.raises(CliError) as error:
        tool(data_dir / "elsewhere")[0].run("list", None, False, False)
    assert error.value.status == 66


def test_offline_changes_wait_for_the_locks_a_server_takes(
    spool: tuple[Path, DiskStorage],
) -> None:
    data_dir, store = spool
    id = store.write(envelope(), START)
    run, _, _ = tool(data_dir)
    # A server starting (it holds serve.lock before its control socket
    # exists), then a worker of an earlier server still delivering.
    for lock in (lambda: _ServeLock(data_dir), lambda: SpoolLock(data_dir / "queue")):
        held = lock()
        try:
            with pytest.raises(CliError) as error:
                run.run("hold", id, False, False)
            assert error.value.status == 75
        finally:
            held.release()
    assert run.run("hold", id, False, False) == 0


class _ServeLock:
    """serve.lock held as ``slimta serve`` holds it."""

    def __init__(self, data_dir: Path) -> None:
        self.fd = os.open(data_dir / "serve.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        os.close(self.fd)


def test_queue_files_never_make_the_tool_call_anything() -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("echo pwned",))

    with pytest.raises(ValueError, match="has no place in a queued message"):
        load_envelope(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="not an envelope"):
        load_envelope(pickle.dumps({"a": 1}))
    parsed = envelope()
    assert parsed.headers is not None  # parsed: email objects in the pickle
    loaded = load_envelope(pickle.dumps(parsed, pickle.HIGHEST_PROTOCOL))
    assert loaded.flatten() == parsed.flatten()


def test_table_shows_last_errors_and_totals() -> None:
    info = {
        "id": "a" * 32,
        "received": START - 7200,
        "size": 2048,
        "sender": "s@a.test",
        "recipients": ["r@b.test", "q@b.test"],
        "attempts": 3,
        "state": "deferred",
        "last_error": "451 4.4.0 Connection refused",
    }
    table = format_table([info], START)
    assert table.splitlines()[1].split() == [
        "a" * 32,
        "2h",
        "2.0K",
        "3",
        "deferred",
        "<s@a.test>",
        "->",
        "<r@b.test>,",
        "<q@b.test>",
    ]
    assert "last error: 451 4.4.0 Connection refused" in table
    assert table.endswith("-- 1 message, 2.0K bytes\n")
    assert format_table([], START) == "the queue is empty\n"


# --- sendmail --------------------------------------------------------------------------


def test_sendmail_options() -> None:
    options = parse_args(["-oi", "-FCron Daemon", "-f", "me@a.test", "-B8BITMIME", "-oem", "x"])
    assert options.ignore_dots and options.full_name == "Cron Daemon"
    assert (options.sender, options.body_type, options.recipients) == (
        "me@a.test",
        "8BITMIME",
        ["x"],
    )
    options = parse_args(["-ti", "-f<>", "--", "-weird"])
    assert options.from_headers and options.ignore_dots
    assert (options.sender, options.recipients) == ("", ["-weird"])
    assert parse_args(["-bp"]).list_queue
    for bad in (["-bs"], ["-N", "never"], ["-Z"], ["-B", "binary"]):
        with pytest.raises(CliError) as error:
            parse_args(bad)
        assert error.value.status == 64


def test_a_lone_dot_ends_the_message_unless_i() -> None:
    text = b"Subject: x\n\nfirst\n.\nafter\n"
    assert read_message(io.BytesIO(text), ignore_dots=False) == b"Subject: x\n\nfirst\n"
    assert read_message(io.BytesIO(text), ignore_dots=True) == text
    assert read_message(io.BytesIO(b"a\r\n.\r\nb"), ignore_dots=False) == b"a\r\n"


def test_t_takes_to_cc_bcc_and_removes_bcc() -> None:
    message = (
        b"From: me@a.test\n"
        b"To: Bob <bob@b.test>,\n"
        b"  carol@b.test\n"
        b"Cc: undisclosed-recipients:;\n"
        b"Bcc: hidden@b.test,\n"
        b"\tother@b.test\n"
        b"Subject: Bcc: not a field\n"
        b"\n"
        b"Bcc: in the body stays\n"
    )
    recipients, kept = header_recipients(message)
    assert recipients == ["bob@b.test", "carol@b.test", "hidden@b.test", "other@b.test"]
    assert kept == (
        b"From: me@a.test\nTo: Bob <bob@b.test>,\n  carol@b.test\nCc: undisclosed-recipients:;\n"
        b"Subject: Bcc: not a field\n\nBcc: in the body stays\n"
    )
    resent = b"To: old@b.test\r\nResent-To: new@b.test\r\nResent-Bcc: x@b.test\r\n\r\nhi\r\n"
    recipients, kept = header_recipients(resent)
    assert recipients == ["new@b.test", "x@b.test"]
    assert kept == b"To: old@b.test\r\nResent-To: new@b.test\r\n\r\nhi\r\n"


def test_prepare_qualifies_adds_from_and_makes_crlf() -> None:
    options = Options(recipients=["root", "bob@b.test"], sender="me", full_name="Me Myself")
    submission = prepare(options, b"Subject: x\n\nhi\n", "mx.test")
    assert submission.sender == "me@mx.test"
    assert submission.recipients == ["root@mx.test", "bob@b.test"]
    assert submission.message == b"From: Me Myself <me@mx.test>\r\nSubject: x\r\n\r\nhi\r\n"
    kept = prepare(Options(recipients=["a@b.test"], sender=""), b"From: x@y\n\nhi", "mx.test")
    assert kept.sender == "" and kept.message == b"From: x@y\r\n\r\nhi"
    with pytest.raises(CliError) as error:
        prepare(Options(from_headers=True), b"Subject: none\n\nhi\n", "mx.test")
    assert error.value.status == 64


def test_sendmail_falls_back_to_the_first_smtp_listener_on_loopback() -> None:
    config = load_text(
        '[listeners.sub]\nkind = "submission"\naddress = "127.0.0.1:587"\n'
        '[listeners.any]\naddress = "0.0.0.0:25"\n[tls]\ncert = "c"\nkey = "k"\n',
        "x",
    )
    assert _tcp_address(config) == ("127.0.0.1", 25)
    assert _tcp_address(load_text('[listeners.v6]\naddress = "[::]:2525"\n', "x")) == ("::1", 2525)
    assert _tcp_address(load_text('[listeners.free]\naddress = "127.0.0.1:0"\n', "x")) is None


def test_sendmail_entry_points(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    assert main(["sendmail", "--help"]) == 0
    assert "usage: slimta sendmail" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["/usr/sbin/sendmail", "--help"])
    assert main() == 0
    assert "usage: slimta sendmail" in capsys.readouterr().out
    assert main(["sendmail", "-bs"]) == 64
    assert main(["queue", "show", "xyz"]) == 64


# --- systemd ---------------------------------------------------------------------------


def unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_systemd_unit_runs_this_program_with_the_config(tmp_path: Path) -> None:
    config_path = tmp_path / "my conf%.toml"
    config_path.write_text('[server]\ndata_dir = "/var/lib/slimta"\nshutdown_grace = 20\n')
    config = load_text(config_path.read_text(), str(config_path), tmp_path)
    program = ["/opt/slimta/bin/python", "-m", "slimta"]
    parsed = unit(render_unit(config, str(config_path), "mail", program, Path("/")))
    service = parsed["Service"]
    assert service["Type"] == "simple"
    assert service["ExecStart"] == (
        f'/opt/slimta/bin/python -m slimta serve --config "{tmp_path}/my conf%%.toml" --user mail'
    )
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 2 * 20
    assert service["ReadWritePaths"] == "/var/lib/slimta"
    for hardening in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables"):
        assert service[hardening] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_of_the_embedded_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default data directory is relative to the current one: keep it out
    # of /tmp (where the checkout may be), which would keep the shared /tmp.
    monkeypatch.chdir("/")
    config = load_text('[relay]\ndefault = "maildir"\n[relay.maildir]\npath = "/srv/out"\n', "x")
    parsed = unit(render_unit(config, None, None, ["/usr/bin/slimta"], tmp_path))
    service = parsed["Service"]
    assert service["ExecStart"] == "/usr/bin/slimta serve"
    assert service["WorkingDirectory"] == str(tmp_path)
    assert service["ReadWritePaths"].split() == [str(config.server.data_dir), "/srv/out"]
    assert service["PrivateTmp"] == "yes"


def test_systemd_unit_keeps_the_shared_tmp_for_a_data_dir_there() -> None:
    config = load_text('[server]\ndata_dir = "/tmp/slimta"\n', "x")
    parsed = unit(render_unit(config, "/etc/slimta.toml", None, ["/usr/bin/slimta"], Path("/")))
    assert parsed["Service"]["PrivateTmp"] == "no"


def test_systemd_program_and_quoting(tmp_path: Path) -> None:
    script = tmp_path / "slimta"
    script.touch()
    assert command_line(str(script), "/usr/bin/python3") == [str(script)]
    assert command_line("-c", "/usr/bin/python3") == ["/usr/bin/python3", "-m", "slimta"]
    assert systemd_quote("/plain/path") == "/plain/path"
    assert systemd_quote('a "b" \\c') == '"a \\"b\\" \\\\c"'
