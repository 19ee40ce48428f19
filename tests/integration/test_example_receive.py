"""examples/slimta-receive.py as a real process:
a message sent over SMTP is queued on disk and delivered into a Maildir.

Its validators, DNS blocklist and options are tested with the other
examples in test_examples.py."""

from __future__ import annotations

import os
import re
import select
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "slimta-receive.py"
DEADLINE = 20.0


def _read_line(stream: object, until: float) -> str:
    fd = stream.fileno()  # type: ignore[attr-defined]
    line = b""
    while not line.endswith(b"\n"):
        left = until - time.monotonic()
        assert left > 0, f"no complete line from the example, got {line!r}"
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 1)
            assert chunk, f"the example exited; last output {line!r}"
            line += chunk
    return line.decode()


def test_example_queues_on_disk_and_delivers_to_the_maildir(tmp_path: Path) -> None:
    spool, maildir = tmp_path / "spool", tmp_path / "mail"
    command = [sys.executable, str(EXAMPLE), "--listen", "127.0.0.1:0", "--hostname", "mx.test"]
    proc = subprocess.Popen(
        [*command, "--domain", "example.org", "--spool", str(spool), "--maildir", str(maildir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        until = time.monotonic() + DEADLINE
        while True:
            line = _read_line(proc.stderr, until)
            match = re.search(r"listening on ([\d.]+):(\d+)", line)
            if match:
                break
        with smtplib.SMTP(match.group(1), int(match.group(2)), timeout=DEADLINE) as client:
            client.ehlo("client.test")
            client.mail("sender@example.com")
            # A valid address, but no name for a directory under the Maildirs.
            code, text = client.rcpt('"../rcpt"@example.org')
            assert (code, text[:5]) == (550, b"5.1.1")
            client.rset()
            refused = client.sendmail(
                "sender@example.com",
                ["rcpt@example.org"],
                b"From: sender@example.com\r\nSubject: hi\r\n\r\nhello\r\n",
            )
        assert refused == {}
        while ":delivered " not in (line := _read_line(proc.stderr, until)):
            pass
        # The Maildir of the local part: the file is in new/ once delivered.
        (delivered,) = (maildir / "rcpt" / "new").iterdir()
        data = delivered.read_bytes()
        assert data.startswith(b"Return-Path: <sender@example.com>\r\n")
        assert b"Delivered-To: rcpt@example.org\r\n" in data
        assert data.endswith(b"\r\n\r\nhello\r\n")
        # The disk queue lives under --spool (its removal of the delivered
        # message races with this test, so only its place is checked).
        assert (spool / "env").is_dir() and (spool / "meta").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=DEADLINE) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()  # type: ignore[union-attr]
