"""``slimta queue``, ``slimta sendmail`` and ``slimta setup systemd`` as real processes.

The servers are ``python -m slimta serve`` processes (the helpers of
``test_cli_serve.py``); a second one on the smarthost's port plays the
smarthost, and until it starts that port is held by a socket that does not
listen, so connections to it are refused and mail is deferred. The tools
run as ``python -m slimta queue ...`` / ``sendmail ...``, as an operator or
a cron job would.

Waiting on another process is done by asking again (the queue listing, a
Maildir) until a deadline, with a short pause between questions; never by
sleeping for a guessed time.
"""

from __future__ import annotations

import configparser
import json
import mailbox
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from test_cli_serve import (  # the helpers of the serve tests
    DEADLINE,
    MESSAGE,
    Run,
    Slimta,
    maildir_messages,
    run,
    smarthost_config,
    smtp,
    write_config,
)

from slimta.lookup.auth import hash_password

__all__ = ["run"]  # the fixture, imported

_T = TypeVar("_T")

#: Seconds between two questions to another process.
POLL_PAUSE = 0.05


def poll(ask: Callable[[], _T | None], what: str) -> _T:
    """The first true answer of *ask*, asked again until :data:`DEADLINE`.

    The server is another process that tells nobody when it is done; its
    state is asked for again after a short pause.
    """
    until = time.monotonic() + DEADLINE
    while True:
        answer = ask()
        if answer:
            return answer
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(POLL_PAUSE)


def slimta(*args: str, cwd: Path, stdin: bytes = b"", env: dict[str, str] | None = None) -> Any:
    """Run ``python -m slimta ARGS`` to its end: ``(status, stdout, stderr)``."""
    done = subprocess.run(
        [sys.executable, "-m", "slimta", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        timeout=DEADLINE,
        env=env,
    )
    return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode()


def queued(config: Path, cwd: Path) -> dict[str, dict[str, Any]]:
    """``slimta queue list --json``, by id."""
    status, out, err = slimta("queue", "list", "--config", str(config), "--json", cwd=cwd)
    assert status == 0, err
    return {info["id"]: info for info in json.loads(out)}


def queued_if(
    config: Path, cwd: Path, count: int, attempts: int | None = None
) -> dict[str, dict[str, Any]] | None:
    """:func:`queued`, when it has *count* messages (each tried *attempts*
    times, if given); else ``None``."""
    infos = queued(config, cwd)
    if len(infos) != count:
        return None
    if attempts is not None and any(i["attempts"] != attempts for i in infos.values()):
        return None
    return infos


def sender_config(tmp_path: Path, smarthost_port: int) -> Path:
    """A server that relays everything to the smarthost, retrying only after
    an hour: only the tools make it try again within a test."""
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
retry = [3600]
""",
    )


def send(server: Slimta, recipient: str, subject: str) -> None:
    message = MESSAGE.replace(b"Subject: hello", f"Subject: {subject}".encode())
    with smtp(server.port) as client:
        assert client.sendmail("sender@a.test", [recipient], message) == {}


def refused_port() -> tuple[socket.socket, int]:
    """A port where connections are refused until the socket is closed."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    return holder, holder.getsockname()[1]


def by_subject(infos: dict[str, dict[str, Any]], config: Path, cwd: Path) -> dict[str, str]:
    """Queue ids by the Subject of their message (``slimta queue show --headers``)."""
    ids = {}
    for id in infos:
        status, out, err = slimta(
            "queue", "show", "--headers", "--config", str(config), id, cwd=cwd
        )
        assert status == 0, err
        subject = next(line for line in out.splitlines() if line.startswith("Subject: "))
        ids[subject.removeprefix("Subject: ")] = id
    return ids


def test_queue_tools_against_a_running_server(run: Run, tmp_path: Path) -> None:
    holder, port = refused_port()
    config = sender_config(tmp_path, port)
    sender = run("serve", "--config", str(config)).ready()
    send(sender, "bob@example.org", "first")
    send(sender, "carol@example.org", "second")
    infos = poll(lambda: queued_if(config, tmp_path, 2, attempts=1), "two deferred messages")
    ids = by_subject(infos, config, tmp_path)
    first, second = ids["first"], ids["second"]
    info = infos[first]
    assert info["state"] == "deferred"
    assert info["sender"] == "sender@a.test"
    assert info["recipients"] == ["bob@example.org"]
    assert "refused" in info["last_error"].lower()
    assert info["size"] > len(MESSAGE)

    status, table, _ = slimta("queue", "list", "--config", str(config), cwd=tmp_path)
    assert status == 0
    assert f"{first} " in table and "deferred  <sender@a.test> -> <bob@example.org>" in table
    assert "last error: " in table
    status, shown, _ = slimta("queue", "show", "--config", str(config), first, cwd=tmp_path)
    assert status == 0
    assert "attempts: 1" in shown and "Subject: first" in shown and "Hello there." in shown

    status, out, _ = slimta("queue", "remove", "--config", str(config), second, cwd=tmp_path)
    assert (status, out) == (0, f"{second}: removed\n")
    assert list(queued(config, tmp_path)) == [first]

    status, out, _ = slimta("queue", "hold", "--config", str(config), first, cwd=tmp_path)
    assert (status, out) == (0, f"{first}: on hold\n")
    assert queued(config, tmp_path)[first]["state"] == "held"
    status, _, err = slimta("queue", "flush", "--config", str(config), first, cwd=tmp_path)
    assert status == 65 and "is on hold" in err

    # Released, it is attempted at once (and fails again).
    status, out, _ = slimta("queue", "release", "--config", str(config), first, cwd=tmp_path)
    assert (status, out) == (0, f"{first}: released\n")
    poll(lambda: queued(config, tmp_path)[first]["attempts"] == 2, "a second attempt")

    holder.close()
    smarthost = run("serve", "--config", str(smarthost_config(tmp_path, "smarthost", port)))
    smarthost.ready()
    status, out, _ = slimta("queue", "flush", "--config", str(config), first, cwd=tmp_path)
    assert (status, out) == (0, f"{first}: will be attempted now\n")
    bob = tmp_path / "smarthost-data" / "mail" / "bob"
    (message,) = poll(lambda: bob.is_dir() and maildir_messages(bob), "delivery to bob")
    assert message["Subject"] == "first"
    poll(lambda: queued(config, tmp_path) == {}, "an empty queue")
    status, out, _ = slimta("queue", "list", "--config", str(config), cwd=tmp_path)
    assert (status, out) == (0, "the queue is empty\n")

    for args, expected in [
        (("show", "0" * 32), 66),
        (("remove", "0" * 32), 66),
        (("hold", "not-an-id"), 64),
    ]:
        status, _, err = slimta("queue", args[0], "--config", str(config), args[1], cwd=tmp_path)
        assert status == expected, err
        assert "Traceback" not in err
    for process in (sender, smarthost):
        assert process.stop()[0] == 0


def test_queue_tools_with_the_server_stopped(run: Run, tmp_path: Path) -> None:
    holder, port = refused_port()
    config = sender_config(tmp_path, port)
    sender = run("serve", "--config", str(config)).ready()
    for subject in ("held", "other", "removed"):
        send(sender, f"{subject}@example.org", subject)
    poll(lambda: queued_if(config, tmp_path, 3, attempts=1), "three deferred messages")
    assert sender.stop()[0] == 0
    assert not (tmp_path / "sender-data" / "control.sock").exists()

    status, table, err = slimta("queue", "list", "--config", str(config), cwd=tmp_path)
    assert status == 0 and "no server is running" in err
    ids = by_subject(queued(config, tmp_path), config, tmp_path)
    assert ids.keys() == {"held", "other", "removed"}
    assert all(ids[subject] in table for subject in ids)

    status, _, err = slimta("queue", "flush", "--config", str(config), cwd=tmp_path)
    assert status == 69 and "flush needs it" in err
    held = ids["held"]
    assert slimta("queue", "hold", "--config", str(config), held, cwd=tmp_path)[0] == 0
    assert slimta("queue", "remove", "--config", str(config), ids["removed"], cwd=tmp_path)[0] == 0
    infos = queued(config, tmp_path)
    assert (infos[held]["state"], infos[ids["other"]]["state"]) == ("held", "deferred")
    assert ids["removed"] not in infos

    # Restarted with the smarthost up, everything is flushed: all but the
    # held message goes.
    holder.close()
    smarthost = run("serve", "--config", str(smarthost_config(tmp_path, "smarthost", port)))
    smarthost.ready()
    sender = run("serve", "--config", str(config)).ready()
    status, out, _ = slimta("queue", "flush", "--config", str(config), cwd=tmp_path)
    assert (status, out) == (0, "1 message will be attempted now\n")
    other = tmp_path / "smarthost-data" / "mail" / "other"
    poll(lambda: other.is_dir() and maildir_messages(other), "delivery of the other message")
    infos = poll(lambda: queued_if(config, tmp_path, 1), "the other message gone")
    assert infos[held]["state"] == "held" and infos[held]["attempts"] == 1
    assert not (tmp_path / "smarthost-data" / "mail" / "held").exists()

    assert slimta("queue", "release", "--config", str(config), held, cwd=tmp_path)[0] == 0
    mailbox_dir = tmp_path / "smarthost-data" / "mail" / "held"
    poll(lambda: mailbox_dir.is_dir() and maildir_messages(mailbox_dir), "the released message")
    for process in (sender, smarthost):
        assert process.stop()[0] == 0


# --- sendmail ----------------------------------------------------------------------------


def local_config(tmp_path: Path) -> Path:
    hashed = hash_password("pw", ln=4, r=8, p=1)
    names = ("alice@a.test", "bob@a.test", "carol@a.test", "alice@mx.test")
    users = "\n".join(f'"{name}" = "{hashed}"' for name in names)
    return write_config(
        tmp_path / "local.toml",
        f"""
[server]
hostname = "mx.test"
data_dir = "data"
[listeners.in]
address = "127.0.0.1:0"
[local]
domains = ["a.test", "mx.test"]
catch_all = false
[users]
{users}
[relay]
default = "maildir"
[relay.maildir]
path = "outgoing"
""",
    )


def delivered(directory: Path, count: int = 1) -> list[mailbox.MaildirMessage]:
    found = poll(
        lambda: directory.is_dir() and len(maildir_messages(directory)) >= count and True,
        f"delivery to {directory.name}",
    )
    assert found
    return maildir_messages(directory)


def test_sendmail_hands_mail_to_the_running_server(run: Run, tmp_path: Path) -> None:
    config = local_config(tmp_path)
    server = run("serve", "--config", str(config)).ready()
    mail = tmp_path / "data" / "mail"

    # -t: To, Cc and Bcc; Bcc removed; -f sets the sender; local submission
    # may relay (to remote.test, through the maildir relay "outgoing").
    message = (
        b"From: Sender <sender@a.test>\n"
        b"To: alice@a.test\n"
        b"Cc: bob@a.test\n"
        b"Bcc: carol@a.test,\n  far@remote.test\n"
        b"Subject: -t\n"
        b"\n"
        b"Hello.\n"
    )
    status, _, err = slimta(
        "sendmail",
        "--config",
        str(config),
        "-t",
        "-f",
        "sender@a.test",
        cwd=tmp_path,
        stdin=message,
    )
    assert status == 0, err
    for where in (mail / "alice", mail / "bob", mail / "carol", tmp_path / "outgoing" / "far"):
        (received,) = delivered(where)
        assert received["Subject"] == "-t"
        assert received["Bcc"] is None
        assert received["Return-Path"] == "<sender@a.test>"
        assert received["To"] == "alice@a.test"

    # Without -i a lone dot ends the message; with -i (or -oi) it does not.
    # "alice" is alice@mx.test (server.hostname), the same Maildir.
    text = b"Subject: dots\n\nbefore\n.\nafter\n"
    for option, subject in (("-oi", "with -oi"), ("-F", "without")):
        extra = ["-F", "Cron Daemon"] if option == "-F" else [option]
        body = text.replace(b"dots", subject.encode())
        status, _, err = slimta(
            "sendmail", "--config", str(config), *extra, "alice", cwd=tmp_path, stdin=body
        )
        assert status == 0, err
    got = {m["Subject"]: m for m in delivered(mail / "alice", 3)}
    assert got["with -oi"].get_payload() == "before\n.\nafter\n"
    assert got["without"].get_payload() == "before\n"
    name, address = got["without"]["From"].rsplit(" ", 1)
    assert name == "Cron Daemon" and address.endswith("@mx.test>")

    # A refused recipient: the others get the message, the status says 67.
    status, _, err = slimta(
        "sendmail", "--config", str(config), "nobody@a.test", "bob@a.test",
        cwd=tmp_path, stdin=b"Subject: partly\n\nhi\n",
    )  # fmt: skip
    assert status == 67, err
    assert "<nobody@a.test>: 550 5.1.1" in err
    assert {m["Subject"] for m in delivered(mail / "bob", 2)} == {"-t", "partly"}

    status, _, err = slimta("sendmail", "--config", str(config), "-t", cwd=tmp_path, stdin=b"\nx\n")
    assert status == 64 and "no recipient" in err

    # A sendmail symlink, with SLIMTA_CONFIG: what cron and mail(1) call.
    script = Path(sys.executable).with_name("slimta")
    if script.exists():
        link = tmp_path / "sendmail"
        link.symlink_to(script)
        done = subprocess.run(
            [str(link), "-oi", "carol@a.test"],
            cwd=tmp_path,
            input=b"Subject: symlink\n\nhi\n",
            capture_output=True,
            timeout=DEADLINE,
            env={**os.environ, "SLIMTA_CONFIG": str(config)},
        )
        assert done.returncode == 0, done.stderr
        assert "symlink" in {m["Subject"] for m in delivered(mail / "carol", 2)}

    status, log = server.stop()
    assert status == 0 and "Traceback" not in log
    status, _, err = slimta(
        "sendmail", "--config", str(config), "alice", cwd=tmp_path, stdin=b"Subject: x\n\nx\n"
    )
    assert status == 75, err
    assert "the message was not sent" in err


def test_sendmail_when_no_server_ever_ran(tmp_path: Path) -> None:
    # The embedded default: nothing listens, neither socket nor port.
    status, _, err = slimta("sendmail", "root", cwd=tmp_path, stdin=b"x\n")
    assert status == 75, err
    assert "is slimta serve running?" in err and "Traceback" not in err


# --- setup systemd -------------------------------------------------------------------------


def test_setup_systemd_prints_a_unit_that_runs_this_program(tmp_path: Path) -> None:
    config = write_config(tmp_path / "unit.toml", '[server]\ndata_dir = "/var/lib/slimta"\n')
    args = ("setup", "systemd", "--config", str(config), "--user", "mail")
    status, out, err = slimta(*args, cwd=tmp_path)
    assert status == 0, err
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(out)
    service = unit["Service"]
    assert service["ExecStart"].split() == [
        os.path.abspath(sys.executable),
        *("-m", "slimta", "serve", "--config", str(config), "--user", "mail"),
    ]
    assert (service["Type"], service["ReadWritePaths"]) == ("simple", "/var/lib/slimta")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"

    (tmp_path / "bad.toml").write_text("[server]\nhostnme = 1\n")
    status, out, err = slimta("setup", "systemd", "--config", "bad.toml", cwd=tmp_path)
    assert (status, out) == (78, "")
    assert "bad.toml: server.hostnme: unknown key" in err
