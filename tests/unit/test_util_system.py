"""Tests for slimta.util.system.

Everything that changes the process (stdio, session, user) runs in a child
Python process, which reports back as JSON through a pipe, so the test
process itself is never changed.
"""

from __future__ import annotations

import json
import os
import pwd
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import slimta.util.system
from slimta.util.system import PidFile

TIMEOUT = 20.0


def _read_until_eof(fd: int, deadline: float) -> bytes:
    """Read *fd* until every writer has closed it, or fail at *deadline*."""
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail("child did not report in time")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def run_child(
    script: str, stdin: bytes | None = None
) -> tuple[Any, subprocess.CompletedProcess[bytes]]:
    """Run *script* in a new interpreter; it calls ``report(obj)`` to answer.

    The report pipe is read until EOF, so the result arrives even when it
    comes from a grandchild (a daemon) after the child itself has exited.
    """
    read_fd, write_fd = os.pipe()
    prelude = textwrap.dedent(
        f"""
        import json, os, sys
        def report(obj):
            with os.fdopen({write_fd}, "w") as pipe:
                json.dump(obj, pipe)
        """
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", prelude + textwrap.dedent(script)],
            input=stdin or b"",
            capture_output=True,
            pass_fds=(write_fd,),
            timeout=TIMEOUT,
            check=False,
        )
        os.close(write_fd)
        write_fd = -1
        data = _read_until_eof(read_fd, time.monotonic() + TIMEOUT)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(data) if data else None, proc


def test_public_names() -> None:
    assert sorted(slimta.util.system.__all__) == [
        "PidFile",
        "daemonize",
        "drop_privileges",
        "redirect_stdio",
    ]


# --- redirect_stdio ----------------------------------------------------------


def test_redirect_stdio_to_files(tmp_path: Path) -> None:
    out, err, inp = tmp_path / "out.log", tmp_path / "err.log", tmp_path / "in.txt"
    out.write_text("earlier\n")
    inp.write_text("from the file\n")
    result, proc = run_child(
        f"""
        from slimta.util.system import redirect_stdio
        print("before", flush=False)  # buffered: must still go to the old stdout
        redirect_stdio({str(out)!r}, {str(err)!r}, {str(inp)!r})
        print("to stdout")
        print("to stderr", file=sys.stderr)
        os.write(1, b"raw fd 1\\n")
        report(sys.stdin.readline())
        """,
        stdin=b"from the pipe\n",
    )
    assert result == "from the file\n"
    assert proc.stdout == b"before\n"
    assert out.read_text() == "earlier\nto stdout\nraw fd 1\n"
    assert err.read_text() == "to stderr\n"
    assert (err.stat().st_mode & 0o777) == 0o640


def test_redirect_stdio_defaults_to_devnull() -> None:
    result, proc = run_child(
        """
        from slimta.util.system import redirect_stdio
        redirect_stdio()
        print("lost")
        report([os.readlink(f"/proc/self/fd/{fd}") for fd in (0, 1, 2)] + [sys.stdin.read()])
        """,
        stdin=b"unread",
    )
    assert result == [os.devnull, os.devnull, os.devnull, ""]
    assert proc.stdout == b""
    assert proc.stderr == b""


# --- daemonize ---------------------------------------------------------------


def test_daemonize(tmp_path: Path) -> None:
    pid_path = tmp_path / "daemon.pid"
    result, _ = run_child(
        f"""
        from slimta.util.system import PidFile, daemonize, redirect_stdio
        original = os.getpid()
        redirect_stdio()
        pid = daemonize()
        with PidFile({str(pid_path)!r}):
            with open({str(pid_path)!r}) as f:
                written = f.read()
            umask = os.umask(0o22)
        report(dict(
            original=original, pid=pid, getpid=os.getpid(), ppid=os.getppid(),
            sid=os.getsid(0), pgid=os.getpgid(0), cwd=os.getcwd(), umask=umask,
            written=written, removed=not os.path.exists({str(pid_path)!r}),
        ))
        """
    )
    # Only the daemon reports; the original process exited with status 0.
    assert result["pid"] == result["getpid"]
    assert result["written"] == f"{result['pid']}\n"
    assert result["original"] != result["pid"]
    assert result["ppid"] != result["original"]
    # A new session whose leader (the first child) has exited: no terminal
    # can be acquired again.
    assert result["sid"] not in (result["pid"], result["original"])
    assert result["pgid"] == result["sid"]
    assert result["cwd"] == "/"
    assert result["umask"] == 0
    assert result["removed"]  # when the daemon left the block


def test_daemonize_returns_none_when_fork_fails() -> None:
    result, _ = run_child(
        """
        import slimta.util.system as system
        def failing_fork():
            raise OSError(11, "Resource temporarily unavailable")
        system.fork_gevent = failing_fork
        report([system.daemonize(), os.getcwd() != "/"])
        """
    )
    assert result == [None, True]


# --- drop_privileges ---------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")


IDS = "report([os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()])"


@needs_root
def test_drop_privileges_by_name() -> None:
    nobody = _nobody()
    result, _ = run_child(
        f"""
        import grp
        from slimta.util.system import drop_privileges
        os.setgroups([0, 1])
        drop_privileges("nobody", grp.getgrgid({nobody.pw_gid}).gr_name)
        {IDS}
        """
    )
    uid, gid = nobody.pw_uid, nobody.pw_gid
    assert result == [uid, uid, gid, gid, []]


@needs_root
def test_drop_privileges_by_number() -> None:
    result, _ = run_child(
        f"""
        from slimta.util.system import drop_privileges
        drop_privileges("4321", 1234)
        {IDS}
        """
    )
    assert result == [4321, 4321, 1234, 1234, []]


@needs_root
def test_drop_privileges_user_alone_takes_primary_group() -> None:
    nobody = _nobody()
    result, _ = run_child(
        f"""
        from slimta.util.system import drop_privileges
        drop_privileges({nobody.pw_uid})
        {IDS}
        """
    )
    uid, gid = nobody.pw_uid, nobody.pw_gid
    assert result == [uid, uid, gid, gid, []]


@needs_root
def test_drop_privileges_group_alone() -> None:
    result, _ = run_child(
        f"""
        from slimta.util.system import drop_privileges
        drop_privileges(group=4242)
        {IDS}
        """
    )
    assert result == [0, 0, 4242, 4242, []]


def test_drop_privileges_nothing_to_do() -> None:
    result, _ = run_child(
        f"""
        from slimta.util.system import drop_privileges
        drop_privileges()
        {IDS}
        """
    )
    assert result == [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"user": "no-such-user-slimta"}, "unknown user 'no-such-user-slimta'"),
        ({"user": 0, "group": "no-such-group-slimta"}, "unknown group 'no-such-group-slimta'"),
    ],
)
def test_drop_privileges_unknown_names(kwargs: dict[str, object], message: str) -> None:
    result, _ = run_child(
        f"""
        from slimta.util.system import drop_privileges
        before = [os.getuid(), os.getgid(), os.getgroups()]
        try:
            drop_privileges(**{kwargs!r})
        except ValueError as exc:
            report([str(exc), before == [os.getuid(), os.getgid(), os.getgroups()]])
        """
    )
    assert result == [f"drop_privileges: {message}", True]


# --- PidFile -----------------------------------------------------------------


def test_pidfile_writes_and_removes(tmp_path: Path) -> None:
    path = tmp_path / "slimta.pid"
    with PidFile(str(path)) as filename:
        assert filename == str(path)
        assert path.read_text() == f"{os.getpid()}\n"
    assert not path.exists()


def test_pidfile_path_is_absolute_from_creation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    pid_file = PidFile("relative.pid")
    monkeypatch.chdir("/")
    with pid_file as filename:
        assert filename == str(tmp_path / "relative.pid")
        assert (tmp_path / "relative.pid").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / "relative.pid").exists()


@pytest.mark.parametrize("filename", [None, ""])
def test_pidfile_without_filename(filename: str | None, tmp_path: Path) -> None:
    with PidFile(filename) as result:
        assert result is None


def test_pidfile_ignores_missing_file_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "slimta.pid"
    with PidFile(path):
        path.unlink()
    assert not path.exists()


def test_pidfile_left_alone_by_forked_child(tmp_path: Path) -> None:
    path = tmp_path / "slimta.pid"
    result, _ = run_child(
        f"""
        from slimta.util.system import PidFile
        with PidFile({str(path)!r}):
            pid = os.fork()
            if pid:
                os.waitpid(pid, 0)  # the child has left the block and exited
                after_child = os.path.exists({str(path)!r})
        if pid == 0:
            os._exit(0)
        report([after_child, os.path.exists({str(path)!r})])
        """
    )
    assert result == [True, False]
