"""PipeRelay, MaildropRelay and DovecotLdaRelay driving small real programs.

Each program is a Python script written to ``tmp_path`` (``#!`` the test's
interpreter); the recording one appends its arguments and the bytes it read
on stdin to ``calls.jsonl``. MaildropRelay and DovecotLdaRelay are pointed at
such scripts through *path*, so their argument lists are checked without the
real programs (``tests/integration/test_relay_pipe_programs.py`` runs those).

Nothing here sleeps: the relay waits for its programs; the few programs that
must outlive their timeout sleep themselves and are killed by the relay.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gevent
import gevent.os
import gevent.queue
import pytest

from slimta.envelope import Envelope
from slimta.queue import Queue
from slimta.queue.dict import DictStorage
from slimta.relay import PermanentRelayError, RelayError, TransientRelayError
from slimta.relay.pipe import _OUTPUT_LIMIT, DovecotLdaRelay, MaildropRelay, PipeRelay
from slimta.smtp.reply import Reply

pytestmark = pytest.mark.timeout(30)

#: Seconds any wait in these tests may take before the test fails.
TIMEOUT = 10.0

# Named replies: (code, enhanced status code).
DELIVERY_TIMED_OUT = ("450", "4.4.2")
CANNOT_RUN = ("550", "5.3.5")
BAD_RECIPIENT = ("550", "5.1.3")
BAD_SENDER = ("550", "5.1.7")
TRANSIENT = ("450", "4.0.0")
PERMANENT = ("550", "5.0.0")

#: ``sysexits.h`` statuses and the detail of the enhanced status code each
#: maps to (RFC 3463): e.g. EX_NOUSER -> X.1.1 "bad destination mailbox".
SYSEXITS = {
    64: "3.5",  # EX_USAGE
    65: "6.0",  # EX_DATAERR
    66: "3.0",  # EX_NOINPUT
    67: "1.1",  # EX_NOUSER
    68: "1.2",  # EX_NOHOST
    69: "3.0",  # EX_UNAVAILABLE
    70: "3.0",  # EX_SOFTWARE
    71: "3.0",  # EX_OSERR
    72: "3.5",  # EX_OSFILE
    73: "2.0",  # EX_CANTCREAT
    74: "3.0",  # EX_IOERR
    75: "3.0",  # EX_TEMPFAIL
    76: "5.0",  # EX_PROTOCOL
    77: "7.0",  # EX_NOPERM
    78: "3.5",  # EX_CONFIG
}

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: caf\xc3\xa9 \xff\r\n"
    b"Message-Id: <20261206.1234@example.test>\r\n"
    b"\r\n"
    b"8-bit body: \xe9\xff\x00\x80 and a lone . line\r\n.\r\nend\r\n"
)

#: Appends ``{"argv": [...], "stdin": hex}`` to LOG.
RECORD = """
data = sys.stdin.buffer.read()
with open(LOG, "a") as log:
    log.write(json.dumps({"argv": sys.argv[1:], "stdin": data.hex()}) + "\\n")
"""


def reply_is(error: RelayError, named: tuple[str, str]) -> bool:
    code, esc = named
    return error.reply.code == code and error.reply.enhanced_status_code == esc


def envelope(
    sender: str = "alice@example.test",
    rcpts: tuple[str, ...] = ("bob@example.test",),
    data: bytes = MESSAGE,
) -> Envelope:
    env = Envelope(sender, list(rcpts))
    env.parse(data)
    return env


class Programs:
    """Writes executable Python scripts into a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log = directory / "calls.jsonl"
        self.count = 0

    def __call__(self, body: str) -> str:
        self.count += 1
        path = self.directory / f"prog{self.count}"
        path.write_text(
            f"#!{sys.executable}\n"
            "import json, os, signal, subprocess, sys, time\n"
            f"LOG = {str(self.log)!r}\n"
            f"DIR = {str(self.directory)!r}\n" + textwrap.dedent(body)
        )
        path.chmod(0o755)
        return str(path)

    def calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines]

    def argvs(self) -> list[list[str]]:
        return [call["argv"] for call in self.calls()]


@pytest.fixture
def programs(tmp_path: Path) -> Programs:
    return Programs(tmp_path)


def ends(pid: int, timeout: float = TIMEOUT) -> bool:
    """Wait until *pid*, not our child, has ended (at most *timeout* seconds).

    A kill is delivered asynchronously, so a process may still be exiting
    right after ``kill()``; a pidfd becomes readable when it has exited.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def single(result: Any) -> RelayError:
    """The one recipient's error in a per-recipient result."""
    assert isinstance(result, Mapping)
    [value] = result.values()
    assert isinstance(value, RelayError), value
    return value


def outcome(relay: PipeRelay, env: Envelope) -> RelayError:
    """The error of a one-recipient attempt, raised or returned."""
    try:
        result = relay.attempt(env, 0)
    except RelayError as exc:
        assert not relay.per_recipient
        return exc
    assert relay.per_recipient
    return single(result)


# --- arguments ------------------------------------------------------------------


def test_each_template_is_one_argument_and_values_are_not_reformatted(
    programs: Programs,
) -> None:
    prog = programs(RECORD)
    relay = PipeRelay([prog, "-f", "{sender}", "--to={recipient}", "{message_id}.eml", "{{x}}"])
    sender = "we{ird}{recipient}{0}@example.test"
    rcpts = (
        "a b$(touch pwned)`id`;|&>out'\"@example.test",
        "-oQ/tmp/evil@example.test",
        "line\nbreak\r\n@example.test",
        "{sender}{message_id}@example.test",
        "caf\u00e9@example.test",
    )
    result = relay.attempt(envelope(sender, rcpts), 0)
    assert result == dict.fromkeys(rcpts)
    assert programs.argvs() == [
        ["-f", sender, f"--to={rcpt}", "<20261206.1234@example.test>.eml", "{x}"] for rcpt in rcpts
    ]
    assert not (programs.directory / "pwned").exists()


def test_message_is_passed_verbatim_with_8bit_bytes(programs: Programs) -> None:
    relay = PipeRelay([programs(RECORD)])
    env = envelope()
    header, body = env.flatten()
    assert relay.attempt(env, 0) == {"bob@example.test": None}
    [call] = programs.calls()
    assert bytes.fromhex(call["stdin"]) == header + body == MESSAGE


def test_python_c_program_with_escaped_braces(programs: Programs) -> None:
    # Users running "python -c" escape the braces of their code as {{ }}.
    code = "import sys; d = {'argv': sys.argv[1:]}; sys.stdout.write(repr(d)); sys.exit(1)"
    escaped = code.replace("{", "{{").replace("}", "}}")
    relay = PipeRelay([sys.executable, "-c", escaped, "{recipient}"], timeout=TIMEOUT)
    error = single(relay.attempt(envelope(), 0))
    assert error.reply.message == "4.0.0 {'argv': ['bob@example.test']}"


def test_client_fields_and_defaults(programs: Programs) -> None:
    relay = PipeRelay(
        [
            programs(RECORD),
            "{client_ip}",
            "{client_host}",
            "{client_ehlo}",
            "{client_protocol}",
            "{client_auth}",
            "{message_id}",
        ]
    )
    env = envelope()
    env.client = {
        "ip": "192.0.2.1",
        "host": "client.example.test",
        "name": "helo.example.test",
        "protocol": "ESMTPSA",
        "auth": ("alice", None),
    }
    relay.attempt(env, 0)
    bare = Envelope("", ["bob@example.test"], message=b"no headers\r\n")
    relay.attempt(bare, 0)
    assert programs.argvs() == [
        [
            "192.0.2.1",
            "client.example.test",
            "helo.example.test",
            "ESMTPSA",
            "alice",
            "<20261206.1234@example.test>",
        ],
        ["", "", "", "", "", ""],
    ]


def test_folded_message_id_is_unfolded(programs: Programs) -> None:
    relay = PipeRelay([programs(RECORD), "{message_id}"])
    relay.attempt(envelope(data=b"Message-Id:\r\n <folded@example.test>\r\n\r\nbody\r\n"), 0)
    assert programs.argvs() == [["<folded@example.test>"]]


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        (["prog", "{sender"], {}, ValueError),
        (["prog", "{unknown}"], {}, ValueError),
        (["prog", "{0}"], {}, ValueError),
        (["prog", "{}"], {}, ValueError),
        (["prog", "{sender.__class__}"], {}, ValueError),
        (["prog", "{sender[0]}"], {}, ValueError),
        (["prog", "{sender:{recipient}}"], {}, ValueError),
        ([], {}, ValueError),
        ("prog {sender}", {}, TypeError),
        (["prog", b"{sender}"], {}, TypeError),
        (["prog"], {"shell": True}, ValueError),
        (["prog"], {"stdout": None}, TypeError),
        (["prog"], {"stdin": None}, TypeError),
        (["prog"], {"text": True}, TypeError),
        (["prog"], {"bufsize": 1}, TypeError),
    ],
)
def test_bad_arguments_refused_at_construction(
    args: Any, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        PipeRelay(args, **kwargs)


def test_shell_false_and_popen_kwargs_are_passed(programs: Programs, tmp_path: Path) -> None:
    prog = programs(
        """
        with open(LOG, "a") as log:
            log.write(json.dumps({"argv": [os.getcwd(), os.environ.get("PIPE_TEST", "")]}) + "\\n")
        """
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    relay = PipeRelay([prog], shell=False, cwd=str(workdir), env={"PIPE_TEST": "yes"})
    relay.attempt(envelope(), 0)
    assert programs.argvs() == [[str(workdir), "yes"]]


# --- exit statuses and output ------------------------------------------------------


def exiting(programs: Programs, status: int, stdout: str = "", stderr: str = "") -> str:
    return programs(
        f"""
        sys.stdin.buffer.read()
        sys.stdout.write({stdout!r})
        sys.stderr.write({stderr!r})
        sys.exit({status})
        """
    )


@pytest.mark.parametrize("status", sorted(SYSEXITS))
def test_pipe_relay_sysexits_without_message_are_transient(programs: Programs, status: int) -> None:
    relay = PipeRelay([exiting(programs, status)])
    error = single(relay.attempt(envelope(), 0))
    assert isinstance(error, TransientRelayError)
    assert reply_is(error, ("450", "4." + SYSEXITS[status]))
    assert error.reply.raw_message == "Delivery failed"


@pytest.mark.parametrize("status", sorted(SYSEXITS))
def test_pipe_relay_enhanced_code_decides_except_tempfail(programs: Programs, status: int) -> None:
    relay = PipeRelay([exiting(programs, status, stdout="5.1.1 No such user\n")])
    error = single(relay.attempt(envelope(), 0))
    if status == 75:
        assert isinstance(error, TransientRelayError)
        assert reply_is(error, ("450", "4.1.1"))
    else:
        assert isinstance(error, PermanentRelayError)
        assert reply_is(error, ("550", "5.1.1"))
    assert error.reply.raw_message == "No such user"


@pytest.mark.parametrize("cls", [MaildropRelay, DovecotLdaRelay])
@pytest.mark.parametrize("status", sorted(SYSEXITS))
def test_lda_sysexits(programs: Programs, cls: type[PipeRelay], status: int) -> None:
    error = outcome(cls(path=exiting(programs, status)), envelope())  # type: ignore[call-arg]
    expected_type = TransientRelayError if status == 75 else PermanentRelayError
    code = "450" if status == 75 else "550"
    assert isinstance(error, expected_type)
    assert reply_is(error, (code, f"{code[0]}.{SYSEXITS[status]}"))
    default = "Delivery failed" if cls is MaildropRelay else "LDA delivery failed"
    assert error.reply.raw_message == default


def test_pipe_relay_output_messages(programs: Programs) -> None:
    cases: list[tuple[str, tuple[int, str, str], type[RelayError], tuple[str, str], str]] = [
        ("stdout wins", (1, "4.2.2 Mailbox full\n", "5.0.0 ignored"), TransientRelayError,
         ("450", "4.2.2"), "Mailbox full"),
        ("stderr", (1, "", "\n  5.7.1 Rejected by policy  \nmore"), PermanentRelayError,
         ("550", "5.7.1"), "Rejected by policy"),
        ("plain text", (2, "something broke\n", ""), TransientRelayError, TRANSIENT,
         "something broke"),
        ("no text after code", (1, "5.2.1\n", ""), PermanentRelayError, ("550", "5.2.1"), ""),
        ("2xx code", (1, "2.0.0 odd\n", ""), TransientRelayError, ("450", "4.0.0"), "odd"),
        ("not a code", (1, "5.1.1x nope\n", ""), TransientRelayError, TRANSIENT,
         "5.1.1x nope"),
        ("controls", (1, "5.1.1 bad\tuser\x1b[31m\x00!\n", ""), PermanentRelayError,
         ("550", "5.1.1"), "bad user [31m !"),
        ("nothing", (1, "", " \n\t\n"), TransientRelayError, TRANSIENT, "Delivery failed"),
    ]  # fmt: skip
    for name, (status, out, err), cls, named, text in cases:
        relay = PipeRelay([exiting(programs, status, out, err)])
        error = single(relay.attempt(envelope(), 0))
        assert isinstance(error, cls), name
        assert reply_is(error, named), (name, str(error.reply))
        assert error.reply.raw_message == text, name
        assert "\n" not in str(error.reply) and "\r" not in str(error.reply)


def test_undecodable_and_long_output(programs: Programs) -> None:
    prog = programs(
        """
        sys.stdout.buffer.write(b"5.1.1 \\xff\\xfe caf\\xc3\\xa9 " + b"x" * 5000 + b"\\n")
        sys.exit(1)
        """
    )
    error = single(PipeRelay([prog]).attempt(envelope(), 0))
    assert isinstance(error, PermanentRelayError)
    assert error.reply.raw_message is not None
    assert error.reply.raw_message.startswith("\ufffd\ufffd caf\u00e9 xxx")
    assert len(error.reply.raw_message) <= 500


class Recording(PipeRelay):
    seen: list[tuple[int, Any, Any]]

    def raise_error(self, status: int, stdout: str, stderr: str) -> None:
        self.seen.append((status, stdout, stderr))
        super().raise_error(status, stdout, stderr)


def test_raise_error_gets_decoded_bounded_output(programs: Programs) -> None:
    # Megabytes on both streams, written before stdin is read: the relay
    # must read while it writes, and keep only the start of each stream.
    prog = programs(
        """
        sys.stdout.buffer.write(b"4.3.0 lots\\n" + b"o" * (4 << 20))
        sys.stdout.flush()
        sys.stderr.buffer.write(b"\\xff" + b"e" * (4 << 20))
        sys.stderr.flush()
        data = sys.stdin.buffer.read()
        sys.exit(3 if len(data) == int(sys.argv[1]) else 4)
        """
    )
    big = envelope(data=MESSAGE + b"y" * (3 << 20))
    header, body = big.flatten()
    relay = Recording([prog, str(len(header + body))], timeout=TIMEOUT)
    relay.seen = []
    error = single(relay.attempt(big, 0))
    [(status, stdout, stderr)] = relay.seen
    assert status == 3
    assert isinstance(stdout, str) and isinstance(stderr, str)
    assert stdout.startswith("4.3.0 lots\no")
    assert len(stdout.encode()) == _OUTPUT_LIMIT
    assert stderr.startswith("\ufffdeee")
    assert len(stderr) == _OUTPUT_LIMIT
    assert reply_is(error, ("450", "4.3.0"))


def test_permanent_error_pattern_both_names() -> None:
    assert PipeRelay.permanent_error_pattern is PipeRelay._permanent_error_pattern

    class Old(PipeRelay):
        permanent_error_pattern = re.compile(r"FATAL\b")

    class New(PipeRelay):
        _permanent_error_pattern = re.compile(r"FATAL\b")

    for cls in (Old, New):
        assert cls._permanent_error_pattern.pattern == r"FATAL\b"
        assert cls.permanent_error_pattern.pattern == r"FATAL\b"
        relay = cls(["prog"])
        with pytest.raises(PermanentRelayError) as info:
            relay.raise_error(1, "FATAL: no such user", "")
        assert reply_is(info.value, PERMANENT)
        with pytest.raises(TransientRelayError):
            relay.raise_error(1, "5.1.1 not matched by this pattern", "")


def test_raise_error_may_accept_a_status(programs: Programs) -> None:
    class Lenient(PipeRelay):
        def raise_error(self, status: int, stdout: str, stderr: str) -> None:
            if status != 1:
                super().raise_error(status, stdout, stderr)

    relay = Lenient([exiting(programs, 1)])
    assert relay.attempt(envelope(), 0) == {"bob@example.test": None}


@pytest.mark.parametrize("cls", [PipeRelay, MaildropRelay, DovecotLdaRelay])
def test_killed_by_signal_is_transient(programs: Programs, cls: type[PipeRelay]) -> None:
    prog = programs("os.kill(os.getpid(), signal.SIGKILL)\n")
    relay = PipeRelay([prog]) if cls is PipeRelay else cls(path=prog)  # type: ignore[call-arg]
    error = outcome(relay, envelope())
    assert isinstance(error, TransientRelayError)
    assert reply_is(error, TRANSIENT)
    assert error.reply.raw_message == "Delivery program killed by SIGKILL"


def test_exit_without_reading_stdin(programs: Programs) -> None:
    big = envelope(data=MESSAGE + b"z" * (8 << 20))
    ok = PipeRelay([programs("sys.exit(0)\n")], timeout=TIMEOUT)
    assert ok.attempt(big, 0) == {"bob@example.test": None}
    closes = programs("os.close(0)\nsys.exit(75)\n")
    error = single(PipeRelay([closes], timeout=TIMEOUT).attempt(big, 0))
    assert isinstance(error, TransientRelayError)
    assert reply_is(error, ("450", "4.3.0"))


# --- timeouts and processes ----------------------------------------------------------


def test_timeout_kills_and_reaps_the_program_and_its_children(programs: Programs) -> None:
    prog = programs(
        """
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.path.join(DIR, "pids"), "w") as f:
            f.write(f"{os.getpid()} {child.pid}")
        time.sleep(600)
        """
    )
    relay = PipeRelay([prog], timeout=2.0)
    with gevent.Timeout(TIMEOUT):
        error = single(relay.attempt(envelope(), 0))
    assert isinstance(error, TransientRelayError)
    assert reply_is(error, DELIVERY_TIMED_OUT)
    assert error.reply.raw_message == "Delivery timed out"
    pid, child = map(int, (programs.directory / "pids").read_text().split())
    with pytest.raises(ProcessLookupError):  # killed and reaped: not even a zombie
        os.kill(pid, 0)
    assert ends(child)


def test_killing_the_attempt_kills_the_program(programs: Programs) -> None:
    # The program reports its pid on a pipe, then waits; the attempt's
    # greenlet is killed (as a queue's relay pool kill does).
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    prog = programs("os.write(int(sys.argv[1]), str(os.getpid()).encode())\ntime.sleep(600)\n")
    relay = PipeRelay([prog, str(write_end)], pass_fds=(write_end,))
    try:
        attempt = gevent.spawn(relay.attempt, envelope(), 0)
        with gevent.Timeout(TIMEOUT):
            pid = int(gevent.os.nb_read(read_end, 100))
        attempt.kill(block=True, timeout=TIMEOUT)
        assert attempt.dead
        with pytest.raises(ProcessLookupError):  # killed and reaped
            os.kill(pid, 0)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_timeout_of_a_program_that_reads_nothing(programs: Programs) -> None:
    # The writer is blocked on a full pipe when the timeout strikes.
    relay = MaildropRelay(path=programs("time.sleep(600)\n"), timeout=1.0)
    big = envelope(data=MESSAGE + b"w" * (4 << 20))
    with gevent.Timeout(TIMEOUT), pytest.raises(TransientRelayError) as info:
        relay.attempt(big, 0)
    assert reply_is(info.value, DELIVERY_TIMED_OUT)


def test_other_greenlets_run_while_the_program_runs(programs: Programs) -> None:
    # The program waits for a byte that another greenlet writes only once the
    # attempt has started and yielded: a relay blocking the hub never ends.
    read_end, write_end = os.pipe()
    prog = programs("sys.exit(0 if os.read(int(sys.argv[1]), 1) == b'!' else 1)\n")
    relay = PipeRelay([prog, str(read_end)], timeout=TIMEOUT, pass_fds=(read_end,))
    try:
        attempt = gevent.spawn(relay.attempt, envelope(), 0)
        writer = gevent.spawn(os.write, write_end, b"!")
        assert attempt.get(timeout=TIMEOUT) == {"bob@example.test": None}
        assert writer.get(timeout=TIMEOUT) == 1
    finally:
        os.close(read_end)
        os.close(write_end)


def test_background_child_holding_output_does_not_hang_success(programs: Programs) -> None:
    class QuickDrain(PipeRelay):
        _drain_timeout = 0.2

    prog = programs(
        """
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.path.join(DIR, "pids"), "w") as f:
            f.write(str(child.pid))
        print("4.0.0 done but child holds stdout", flush=True)
        """
    )
    relay = QuickDrain([prog])
    try:
        with gevent.Timeout(TIMEOUT):
            assert relay.attempt(envelope(), 0) == {"bob@example.test": None}
    finally:
        child = int((programs.directory / "pids").read_text())
        os.kill(child, signal.SIGKILL)


def test_missing_and_unrunnable_programs(programs: Programs, tmp_path: Path) -> None:
    not_executable = tmp_path / "not-executable"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    for path in ("/nonexistent/deliver-prog", str(not_executable), str(tmp_path)):
        error = single(PipeRelay([path, "{recipient}"]).attempt(envelope(), 0))
        assert isinstance(error, PermanentRelayError)
        assert reply_is(error, CANNOT_RUN)
        assert path in str(error.reply)
    with pytest.raises(PermanentRelayError) as info:
        MaildropRelay(path="/nonexistent/maildrop").attempt(envelope(), 0)
    assert reply_is(info.value, CANNOT_RUN)
    assert "/nonexistent/maildrop" in str(info.value.reply)
    error = single(PipeRelay(["no-such-program-here-xyz"]).attempt(envelope(), 0))
    assert "no-such-program-here-xyz" in str(error.reply)


def test_subprocess_log_lines(programs: Programs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="slimta.relay.pipe")
    relay = PipeRelay([exiting(programs, 0, stdout="hello")])
    relay.attempt(envelope(), 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "slimta.relay.pipe"]
    assert len(lines) == 3, lines
    popen, stdio, exit_ = lines
    assert re.match(r"pid:\d+:popen args=\[", popen)
    assert re.match(r"pid:\d+:stdio ", stdio) and "stdout=b'hello'" in stdio
    assert re.match(r"pid:\d+:exit returncode=0$", exit_)


# --- addresses for maildrop and dovecot-lda ------------------------------------------


def test_maildrop_arguments_and_single_run(programs: Programs) -> None:
    prog = programs(RECORD)
    relay = MaildropRelay(path=prog, extra_args=["-d", "{recipient}", "/etc/filter"])
    env = envelope("", ("first@example.test", "second@example.test"))
    assert relay.attempt(env, 0) is None
    [call] = programs.calls()
    assert call["argv"] == ["-f", "", "-d", "first@example.test", "/etc/filter"]
    assert bytes.fromhex(call["stdin"]) == MESSAGE


def test_maildrop_message_from_prefixed_line(programs: Programs) -> None:
    prog = exiting(
        programs, 77, stdout="noise\n", stderr="junk\nmaildrop: Unable to open mailbox.\n"
    )
    with pytest.raises(PermanentRelayError) as info:
        MaildropRelay(path=prog).attempt(envelope(), 0)
    assert reply_is(info.value, ("550", "5.7.0"))
    assert info.value.reply.raw_message == "maildrop: Unable to open mailbox."
    # maildrop names itself as it was run, e.g. "/usr/bin/maildrop: ".
    named = programs(
        'sys.stderr.write(sys.argv[0] + ": Unable to open filter file.\\n")\nsys.exit(75)\n'
    )
    with pytest.raises(TransientRelayError) as info:
        MaildropRelay(path=named).attempt(envelope(), 0)
    assert info.value.reply.raw_message == "maildrop: Unable to open filter file."


def test_dovecot_lda_arguments_and_per_recipient(programs: Programs) -> None:
    prog = programs(RECORD)
    relay = DovecotLdaRelay(path=prog, extra_args=["-c", "/tmp/conf", "-e"])
    rcpts = ("a@example.test", "b@example.test", "a@example.test")
    assert relay.attempt(envelope("s@example.test", rcpts), 0) == {
        "a@example.test": None,
        "b@example.test": None,
    }
    assert programs.argvs() == [
        ["-f", "s@example.test", "-d", rcpt, "-c", "/tmp/conf", "-e"]
        for rcpt in ("a@example.test", "b@example.test")
    ]


def test_dovecot_lda_message(programs: Programs) -> None:
    log = "Dec 06 06:09:23 lda(x@example.test)<32172><ECzON>: Info: msgid=<1>: save failed\n"
    cases = [
        # With -e the reason is a line of its own, among log lines.
        (log + "Quota exceeded (mailbox for user is full)\n" + log, "Quota exceeded"),
        # Only log lines: the last error.
        (
            log
            + "Dec 06 06:08:54 lda(x)<1><>: Error: auth-master: userdb lookup failed\n"
            + "Dec 06 06:08:54 lda(1): Fatal: Internal error occurred.\n"
            + log,
            "Internal error occurred.",
        ),
        # Only Info lines: the last one, without its msgid.
        (log, "save failed"),
        ("Dec 06 06:09:23 lda(x)<1><>: Debug: nothing\n", "LDA delivery failed"),
        ("", "LDA delivery failed"),
    ]
    for stderr, text in cases:
        error = single(DovecotLdaRelay(path=exiting(programs, 77, stderr=stderr)).attempt(
            envelope(), 0
        ))  # fmt: skip
        assert error.reply.raw_message is not None
        assert error.reply.raw_message.startswith(text)
    error = single(DovecotLdaRelay(path=exiting(programs, 67, "User doesn't exist: x\n")).attempt(
        envelope(), 0
    ))  # fmt: skip
    assert reply_is(error, ("550", "5.1.1"))
    assert error.reply.raw_message == "User doesn't exist: x"


UNSAFE = [
    ("-oQ/tmp/evil@example.test", "begins with '-'"),
    ("--help", "begins with '-'"),
    ("bob@example.test\nX-Injected: yes", "line break"),
    ("bob@example.test\r", "line break"),
    ("bob\x00@example.test", "NUL"),
]


@pytest.mark.parametrize(("address", "reason"), UNSAFE)
def test_lda_refuses_unsafe_recipient(programs: Programs, address: str, reason: str) -> None:
    relay = DovecotLdaRelay(path=programs(RECORD))
    rcpts = ("ok@example.test", address)
    result = relay.attempt(envelope(rcpts=rcpts), 0)
    assert isinstance(result, Mapping)
    assert result["ok@example.test"] is None
    error = result[address]
    assert isinstance(error, PermanentRelayError)
    assert reply_is(error, BAD_RECIPIENT)
    assert reason in str(error.reply)
    assert "\n" not in str(error.reply) and "\x00" not in str(error.reply)
    assert programs.argvs() == [["-f", "alice@example.test", "-d", "ok@example.test"]]


@pytest.mark.parametrize(("address", "reason"), UNSAFE)
@pytest.mark.parametrize("cls", [MaildropRelay, DovecotLdaRelay])
def test_lda_refuses_unsafe_sender(
    programs: Programs, cls: type[PipeRelay], address: str, reason: str
) -> None:
    error = outcome(cls(path=programs(RECORD)), envelope(address))  # type: ignore[call-arg]
    assert isinstance(error, PermanentRelayError)
    assert reply_is(error, BAD_SENDER)
    assert reason in str(error.reply)
    assert "\n" not in str(error.reply) and "\x00" not in str(error.reply)
    assert programs.calls() == []


def test_maildrop_checks_recipient_only_when_used(programs: Programs) -> None:
    prog = programs(RECORD)
    env = envelope(rcpts=("-first@example.test",))
    assert MaildropRelay(path=prog).attempt(env, 0) is None
    with pytest.raises(PermanentRelayError) as info:
        MaildropRelay(path=prog, extra_args=["-d", "{recipient}"]).attempt(env, 0)
    assert reply_is(info.value, BAD_RECIPIENT)
    assert programs.argvs() == [["-f", "alice@example.test"]]


def test_pipe_relay_refuses_nul_but_passes_dashes(programs: Programs) -> None:
    relay = PipeRelay([programs(RECORD), "{recipient}"])
    result = relay.attempt(envelope(rcpts=("-x@example.test", "n\x00@example.test")), 0)
    assert isinstance(result, Mapping)
    assert result["-x@example.test"] is None
    error = result["n\x00@example.test"]
    assert isinstance(error, PermanentRelayError)
    assert reply_is(error, BAD_RECIPIENT)
    assert programs.argvs() == [["-x@example.test"]]


def test_dovecot_default_path() -> None:
    relay = DovecotLdaRelay()
    assert os.path.basename(relay.args[0]) == "dovecot-lda"
    assert relay.args[1:] == ["-f", "{sender}", "-d", "{recipient}"]
    assert MaildropRelay().args == ["maildrop", "-f", "{sender}"]


# --- per-recipient outcomes --------------------------------------------------------


def test_per_recipient_results(programs: Programs) -> None:
    prog = programs(
        RECORD
        + textwrap.dedent(
            """
        rcpt = sys.argv[1]
        if rcpt.startswith("gone"):
            print("5.1.1 No such user")
            sys.exit(67)
        if rcpt.startswith("full"):
            print("4.2.2 Mailbox full")
            sys.exit(75)
        """
        )
    )
    relay = PipeRelay([prog, "{recipient}"])
    rcpts = ("ok@example.test", "gone@example.test", "full@example.test")
    result = relay.attempt(envelope(rcpts=rcpts), 0)
    assert isinstance(result, Mapping)
    assert result["ok@example.test"] is None
    gone, full = result["gone@example.test"], result["full@example.test"]
    assert isinstance(gone, PermanentRelayError) and reply_is(gone, ("550", "5.1.1"))
    assert isinstance(full, TransientRelayError) and reply_is(full, ("450", "4.2.2"))
    assert [argv[0] for argv in programs.argvs()] == list(rcpts)


def test_whole_message_mode(programs: Programs) -> None:
    class Once(PipeRelay):
        per_recipient = False

    ok = Once([programs(RECORD), "{recipient}"])
    assert ok.attempt(envelope(rcpts=("a@example.test", "b@example.test")), 0) is None
    assert programs.argvs() == [["a@example.test"]]
    instance = PipeRelay([programs(RECORD), "{recipient}"])
    instance.per_recipient = False
    assert instance.attempt(envelope(rcpts=("c@example.test", "d@example.test")), 0) is None
    assert programs.argvs()[-1] == ["c@example.test"]
    with pytest.raises(PermanentRelayError) as info:
        Once([exiting(programs, 1, "5.3.0 no")]).attempt(envelope(), 0)
    assert reply_is(info.value, ("550", "5.3.0"))


def test_unexpected_error_for_one_recipient_keeps_the_others(programs: Programs) -> None:
    class Buggy(PipeRelay):
        def raise_error(self, status: int, stdout: str, stderr: str) -> None:
            raise ValueError("bug\nin hook")

    prog = programs(RECORD + "sys.exit(0 if sys.argv[1].startswith('ok') else 1)\n")
    result = Buggy([prog, "{recipient}"]).attempt(
        envelope(rcpts=("ok@example.test", "bad@example.test")), 0
    )
    assert isinstance(result, Mapping)
    assert result["ok@example.test"] is None
    error = result["bad@example.test"]
    assert isinstance(error, TransientRelayError)
    assert str(error.reply) == "450 4.0.0 Unhandled delivery error: bug in hook"


# --- through a real queue ----------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def queue_factory() -> Iterator[Callable[..., tuple[Queue, DictStorage, FakeClock]]]:
    made: list[Queue] = []

    def factory(relay: PipeRelay) -> tuple[Queue, DictStorage, FakeClock]:
        clock = FakeClock()
        store = DictStorage()
        bounces: list[tuple[list[str], Reply]] = []

        def bounce(env: Envelope, reply: Reply) -> None:
            bounces.append((list(env.recipients), reply))

        queue = Queue(store, relay, backoff=lambda env, n: 60.0, bounce_factory=bounce, clock=clock)
        queue.bounces = bounces  # type: ignore[attr-defined]
        made.append(queue)
        return queue, store, clock

    yield factory
    for queue in made:
        queue.kill(block=True, timeout=TIMEOUT)
        queue.relay_pool.kill(block=True, timeout=TIMEOUT)


class Announcing(PipeRelay):
    """Puts the recipients of each attempt on :attr:`attempts` as it starts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: gevent.queue.Queue[list[str]] = gevent.queue.Queue()

    def attempt(self, envelope: Envelope, attempts: int) -> Any:
        self.attempts.put(list(envelope.recipients))
        return super().attempt(envelope, attempts)


def test_queue_retries_only_the_failed_recipient(
    programs: Programs, queue_factory: Callable[..., tuple[Queue, DictStorage, FakeClock]]
) -> None:
    # full@ fails once with EX_TEMPFAIL, then works; gone@ fails for good.
    prog = programs(
        """
        rcpt = sys.argv[1]
        data = sys.stdin.buffer.read()
        if rcpt.startswith("gone"):
            print("5.1.1 No such user")
            sys.exit(67)
        marker = os.path.join(DIR, "full-failed-once")
        if rcpt.startswith("full") and not os.path.exists(marker):
            open(marker, "w").close()
            print("4.2.2 Mailbox full, try later")
            sys.exit(75)
        with open(LOG, "a") as log:
            log.write(json.dumps({"argv": [rcpt], "stdin": data.hex()}) + "\\n")
        """
    )
    relay = Announcing([prog, "{recipient}"], timeout=TIMEOUT)
    queue, store, clock = queue_factory(relay)
    queue.start()
    rcpts = ["ok@example.test", "full@example.test", "gone@example.test"]
    [(_, id)] = queue.enqueue(envelope(rcpts=tuple(rcpts)))
    assert relay.attempts.get(timeout=TIMEOUT) == rcpts
    assert queue.relay_pool.join(timeout=TIMEOUT)
    assert programs.argvs() == [["ok@example.test"]]
    stored, attempts = store.get(id)
    assert stored.recipients == ["full@example.test"]
    assert attempts == 1
    [(bounced, reply)] = queue.bounces  # type: ignore[attr-defined]
    assert bounced == ["gone@example.test"]
    assert str(reply) == "550 5.1.1 No such user"

    clock.now += 60.0
    queue.kick()
    assert relay.attempts.get(timeout=TIMEOUT) == ["full@example.test"]
    assert queue.relay_pool.join(timeout=TIMEOUT)
    assert programs.argvs() == [["ok@example.test"], ["full@example.test"]]
    assert all(bytes.fromhex(call["stdin"]) == MESSAGE for call in programs.calls())
    assert store.get_info()["size"] == 0
