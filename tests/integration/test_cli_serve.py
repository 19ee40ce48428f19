"""The ``slimta`` command as a real process: ``python -m slimta serve``.

Each test starts the server on 127.0.0.1 port 0 (it logs the port it got),
talks to it with :mod:`smtplib`, and reads delivered mail with
:class:`mailbox.Maildir`. Waiting is done on the server's log lines, read
from its standard error with a deadline.
"""

from __future__ import annotations

import base64
import mailbox
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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from conftest import reply_is

from slimta.lookup.auth import hash_password

#: Seconds any one wait (a log line, the process's exit) may take.
DEADLINE = 30.0

RELAYING_DENIED = ("550", "5.7.1")
NO_SUCH_USER = ("550", "5.1.1")
AUTH_REQUIRED = ("530", "5.7.0")
TLS_REQUIRED_FOR_AUTH = ("538", "5.7.11")
BAD_CREDENTIALS = ("535", "5.7.8")
TOO_MANY_CONNECTIONS = ("421", "4.7.0")
TOO_MANY_MESSAGES = ("450", "4.7.1")
MAIL_OK = ("250", "2.1.0")
RCPT_OK = ("250", "2.1.5")

MESSAGE = b"From: sender@a.test\r\nSubject: hello\r\n\r\nHello there.\r\n"


class Slimta:
    """One ``slimta`` process and the lines it logged so far."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slimta", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._partial = b""
        self._seen = 0
        #: Listener name -> port, from the "listening on" lines.
        self.ports: dict[str, int] = {}

    def _read_more(self, until: float) -> bool:
        """Read what the process wrote; False at its end of output."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        left = until - time.monotonic()
        assert left > 0, "timed out; the server logged:\n" + "\n".join(self.lines)
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            return True
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        self.lines += [line.decode("utf-8", "replace") for line in complete]
        return True

    def wait_for(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        """The first line not waited for before that matches *pattern*."""
        until = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            while self._seen < len(self.lines):
                line = self.lines[self._seen]
                self._seen += 1
                match = regex.search(line)
                if match:
                    return match
            if not self._read_more(until):
                raise AssertionError(
                    f"the server ended before logging {pattern!r}:\n" + "\n".join(self.lines)
                )

    def ready(self, end: str = r"ready \(pid") -> Slimta:
        """Wait until the server serves (the line *end*); note its listeners' ports."""
        while True:
            match = self.wait_for(rf'listening on .*:(\d+) \(listener "([^"]+)"|{end}')
            if match.group(1) is None:
                return self
            self.ports[match.group(2)] = int(match.group(1))

    @property
    def port(self) -> int:
        (port,) = self.ports.values()
        return port

    def finish(self, timeout: float = DEADLINE) -> tuple[int, str]:
        """Wait for the exit: ``(status, everything logged)``."""
        until = time.monotonic() + timeout
        while self._read_more(until):
            pass
        status = self.proc.wait(timeout=max(0.1, until - time.monotonic()))
        return status, "\n".join(self.lines)

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(signum)
        return self.finish()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()


#: ``run(*args, cwd=tmp_path)`` starts ``python -m slimta *args``.
Run = Callable[..., Slimta]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    started: list[Slimta] = []

    def start(*args: str, cwd: Path = tmp_path) -> Slimta:
        process = Slimta(*args, cwd=cwd)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def maildir_messages(path: Path) -> list[mailbox.MaildirMessage]:
    return list(mailbox.Maildir(path, create=False))


def wait_delivered(server: Slimta, recipient: str) -> None:
    server.wait_for(rf"maildir:\S+:delivered .*recipient='{re.escape(recipient)}'")


def smtp(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE)
    client.ehlo("client.test")
    return client


# --- the embedded default -----------------------------------------------------------


def test_default_config_delivers_locally_and_never_relays(run: Run, tmp_path: Path) -> None:
    server = run("serve", "--listen", "127.0.0.1:0").ready()
    assert any("relaying: nobody may relay" in line for line in server.lines), (
        "the start-up lines say who may relay"
    )
    with smtp(server.port) as client:
        client.mail("sender@example.com")
        assert reply_is(client.rcpt("someone@example.com"), RELAYING_DENIED)
        assert reply_is(client.rcpt("alice@localhost"), RCPT_OK)
        code, _ = client.data(MESSAGE)
        assert code == 250
    wait_delivered(server, "alice@localhost")
    (message,) = maildir_messages(tmp_path / "slimta-data" / "mail" / "alice")
    assert message["Received"] is not None
    assert message["Date"] is not None
    assert message["Message-Id"] is not None
    assert message["Subject"] == "hello"
    status, log = server.stop()
    assert status == 0
    assert "Traceback" not in log


# --- relaying through a smarthost ----------------------------------------------------


def smarthost_config(tmp_path: Path, name: str, port: int = 0) -> Path:
    return write_config(
        tmp_path / f"{name}.toml",
        f"""
[server]
hostname = "{name}.test"
data_dir = "{name}-data"
[listeners.in]
address = "127.0.0.1:{port}"
[local]
domains = ["example.org"]
""",
    )


def sender_config(tmp_path: Path, smarthost_port: int) -> Path:
    return write_config(
        tmp_path / "sender.toml",
        f"""
[server]
hostname = "sender.test"
data_dir = "sender-data"
trusted_networks = ["127.0.0.0/8"]
[listeners.in]
address = "127.0.0.1:0"
[local]
domains = ["a.test"]
[relay]
default = "smarthost"
[relay.smarthost]
host = "127.0.0.1"
port = {smarthost_port}
[queue]
retry = [1]
""",
    )


def send(port: int, recipient: str) -> None:
    with smtp(port) as client:
        refused = client.sendmail("sender@a.test", [recipient], MESSAGE)
    assert refused == {}


def test_relay_through_a_second_slimta_as_smarthost(run: Run, tmp_path: Path) -> None:
    smarthost = run("serve", "--config", str(smarthost_config(tmp_path, "smarthost"))).ready()
    sender = run("serve", "--config", str(sender_config(tmp_path, smarthost.port))).ready()
    send(sender.port, "bob@example.org")
    wait_delivered(smarthost, "bob@example.org")
    (message,) = maildir_messages(tmp_path / "smarthost-data" / "mail" / "bob")
    received = message.get_all("Received") or []
    assert len(received) == 2
    assert "by smarthost.test" in received[0] and "by sender.test" in received[1]
    for process in (sender, smarthost):
        assert process.stop()[0] == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_queued_mail_survives_a_stop_and_is_delivered_after_restart(
    run: Run, tmp_path: Path, signum: int
) -> None:
    # The smarthost's port is held by a socket that does not listen:
    # connections to it are refused, so the message stays queued.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    config = sender_config(tmp_path, port)
    sender = run("serve", "--config", str(config)).ready()
    send(sender.port, "bob@example.org")
    sender.wait_for(r"to=<bob@example.org> .*status=deferred")
    status, log = sender.stop(signum)
    if signum == signal.SIGTERM:
        assert status == 0, log
        assert "1 message(s) left in the queue" in log
    else:
        assert status == -signal.SIGKILL
    assert len(list((tmp_path / "sender-data" / "queue" / "env").glob("*.env"))) == 1

    holder.close()
    smarthost = run("serve", "--config", str(smarthost_config(tmp_path, "smarthost", port)))
    smarthost.ready()
    restarted = run("serve", "--config", str(config)).ready()
    assert any("1 message(s) waiting" in line for line in restarted.lines)
    wait_delivered(smarthost, "bob@example.org")
    assert len(maildir_messages(tmp_path / "smarthost-data" / "mail" / "bob")) == 1
    assert restarted.stop()[0] == 0
    assert smarthost.stop()[0] == 0


# --- submission ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def passwd(password: str, address: str, cwd: Path) -> str:
    """The [users] line ``slimta passwd --stdin ADDRESS`` prints."""
    done = subprocess.run(
        [sys.executable, "-m", "slimta", "passwd", "--stdin", address],
        input=password + "\n",
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=DEADLINE,
        check=True,
    )
    return done.stdout.strip()


def submission_config(tmp_path: Path, ca: trustme.CA) -> Path:
    cert = ca.issue_cert("127.0.0.1", "mx.test")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    user_line = passwd("correct horse", "alice@a.test", tmp_path)
    assert user_line.startswith('"alice@a.test" = "$scrypt$')
    return write_config(
        tmp_path / "submission.toml",
        f"""
[server]
hostname = "mx.test"
[listeners.submission]
kind = "submission"
address = "127.0.0.1:0"
[tls]
cert = "cert.pem"
key = "key.pem"
[local]
domains = ["a.test"]
[users]
{user_line}
[relay]
default = "maildir"
[relay.maildir]
path = "outgoing"
""",
    )


def auth_plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_submission_needs_starttls_and_auth_then_relays(
    run: Run, tmp_path: Path, ca: trustme.CA
) -> None:
    server = run("serve", "--config", str(submission_config(tmp_path, ca))).ready()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtp(server.port) as client:
        assert reply_is(client.mail("alice@a.test"), AUTH_REQUIRED)
        assert reply_is(
            client.docmd("AUTH", "PLAIN " + auth_plain("alice@a.test", "correct horse")),
            TLS_REQUIRED_FOR_AUTH,
        )
        client.starttls(context=context)
        client.ehlo("client.test")
        assert reply_is(client.mail("alice@a.test"), AUTH_REQUIRED)
        assert reply_is(
            client.docmd("AUTH", "PLAIN " + auth_plain("alice@a.test", "wrong")),
            BAD_CREDENTIALS,
        )
        client.login("alice@a.test", "correct horse")
        refused = client.sendmail("alice@a.test", ["carol@remote.test"], MESSAGE)
        assert refused == {}
    wait_delivered(server, "carol@remote.test")
    (message,) = maildir_messages(tmp_path / "outgoing" / "carol")
    assert "ESMTPSA" in message["Received"]
    assert server.stop()[0] == 0


# --- limits -------------------------------------------------------------------------


def test_connection_and_message_rate_limits(run: Run, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "limits.toml",
        """
[server]
hostname = "mx.test"
[listeners.in]
address = "127.0.0.1:0"
[local]
domains = ["a.test"]
[limits]
max_connections_per_ip = 1
max_messages_per_minute_per_ip = 1
""",
    )
    server = run("serve", "--config", str(config)).ready()
    with smtp(server.port) as first:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", server.port, timeout=DEADLINE)
        assert reply_is((refused.value.smtp_code, refused.value.smtp_error), TOO_MANY_CONNECTIONS)
        assert reply_is(first.mail("x@b.test"), MAIL_OK)
        first.rset()
        assert reply_is(first.mail("x@b.test"), TOO_MANY_MESSAGES)
    assert server.stop()[0] == 0


# --- reload -------------------------------------------------------------------------


def domains_config(path: Path, domains: list[str], extra: str = "", listeners: str = "") -> Path:
    listed = ", ".join(f'"{domain}"' for domain in domains)
    return write_config(
        path,
        f"""
[server]
hostname = "mx.test"
{extra}
[listeners.in]
address = "127.0.0.1:0"
{listeners}
[local]
domains = [{listed}]
""",
    )


def rcpt_reply(port: int, recipient: str) -> tuple[int, bytes]:
    with smtp(port) as client:
        client.mail("sender@example.com")
        return client.rcpt(recipient)


def test_sighup_applies_a_good_file_and_refuses_a_bad_one(run: Run, tmp_path: Path) -> None:
    config = domains_config(tmp_path / "reload.toml", ["a.test"])
    server = run("serve", "--config", str(config)).ready()
    assert reply_is(rcpt_reply(server.port, "x@b.test"), RELAYING_DENIED)

    port = server.port
    domains_config(
        config, ["a.test", "b.test"], listeners="[listeners.extra]\naddress = '127.0.0.1:0'"
    )
    server.proc.send_signal(signal.SIGHUP)
    server.ready(end=r"reload: done")
    assert server.ports["in"] == port
    assert reply_is(rcpt_reply(port, "x@b.test"), RCPT_OK)
    assert reply_is(rcpt_reply(server.ports["extra"], "x@b.test"), RCPT_OK)

    domains_config(config, ["a.test"], extra="hostnme = 'typo'")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for(r"reload\.toml: server\.hostnme: unknown key; did you mean")
    server.wait_for(r"reload refused: .*still running the previous configuration")
    assert reply_is(rcpt_reply(port, "x@b.test"), RCPT_OK)
    status, log = server.stop()
    assert status == 0
    assert "Traceback" not in log


def test_users_restrict_local_mailboxes(run: Run, tmp_path: Path) -> None:
    hashed = hash_password("pw", ln=4, r=8, p=1)
    config = write_config(
        tmp_path / "users.toml",
        f"""
[server]
hostname = "mx.test"
[listeners.in]
address = "127.0.0.1:0"
[local]
domains = ["a.test"]
[users]
"alice@a.test" = "{hashed}"
""",
    )
    server = run("serve", "--config", str(config)).ready()
    with smtp(server.port) as client:
        client.mail("sender@example.com")
        assert reply_is(client.rcpt("Alice@A.test"), RCPT_OK)
        assert reply_is(client.rcpt("postmaster@a.test"), RCPT_OK)
        assert reply_is(client.rcpt("bob@a.test"), NO_SUCH_USER)
    assert server.stop()[0] == 0


# --- errors -------------------------------------------------------------------------


def test_invalid_config_exits_78_with_every_problem_and_no_traceback(
    run: Run, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "bad.toml",
        """
[server]
hostnme = "mx.test"
[listeners.in]
address = "127.0.0.1:99999"
[limits]
max_size = "big"
""",
    )
    for command in ("serve", "check-config"):
        args = ["serve", "--config", str(config)] if command == "serve" else [command, str(config)]
        status, log = run(*args).finish()
        assert status == 78, log
        assert f'{config}: server.hostnme: unknown key; did you mean "server.hostname"?' in log
        assert f"{config}: listeners.in.address: expected" in log
        assert (
            f'{config}: limits.max_size: expected an integer of at least 1024 (bytes), got "big"'
            in log
        )
        assert "Traceback" not in log


def test_unreadable_certificate_is_a_config_error(run: Run, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "tls.toml",
        '[listeners.s]\nkind = "smtps"\naddress = "127.0.0.1:0"\n'
        '[tls]\ncert = "missing.pem"\nkey = "missing-key.pem"\n',
    )
    status, log = run("serve", "--config", str(config)).finish()
    assert status == 78, log
    assert f"{config}: tls.cert: cannot read {tmp_path / 'missing.pem'}: No such file" in log
    assert "Traceback" not in log


def test_port_in_use_is_a_clear_error(run: Run, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        status, log = run("serve", "--listen", f"127.0.0.1:{port}").finish()
    assert status == 69, log
    assert f"slimta: cannot listen on 127.0.0.1:{port}" in log
    assert "already in use" in log
    assert "Traceback" not in log


def test_unusable_data_dir_is_a_clear_error(run: Run, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    config = write_config(
        tmp_path / "dir.toml",
        '[server]\ndata_dir = "file/data"\n[listeners.in]\naddress = "127.0.0.1:0"\n',
    )
    status, log = run("serve", "--config", str(config)).finish()
    assert status == 73, log
    assert (
        f"slimta: cannot create the data directory (server.data_dir) {tmp_path / 'file' / 'data'}"
        in log
    )
    assert "Traceback" not in log


def test_second_server_on_the_same_data_dir_is_refused(run: Run, tmp_path: Path) -> None:
    first = run("serve", "--listen", "127.0.0.1:0").ready()
    status, log = run("serve", "--listen", "127.0.0.1:0").finish()
    assert status == 69, log
    assert f"is using the data directory {tmp_path / 'slimta-data'}" in log
    assert first.stop()[0] == 0


def test_unknown_user_to_switch_to(run: Run, tmp_path: Path) -> None:
    status, log = run("serve", "--listen", "127.0.0.1:0", "--user", "no-such-user-xyz").finish()
    assert status == 67, log
    assert "slimta: unknown user 'no-such-user-xyz'" in log


def test_usage_errors_exit_64(run: Run) -> None:
    status, log = run("serve", "--listen", "localhost:http").finish()
    assert status == 64, log
    assert log.startswith("slimta: argument --listen: expected")
    status, log = run("frobnicate").finish()
    assert status == 64, log
