"""Crash test: SIGKILL a real MTA (SmtpEdge -> Queue(DiskStorage) -> relay)
while smtplib clients send mail, restart it on the same directories, and
check that every message acknowledged with 250 was delivered.

The processes and the kill schedule are those of ``bench/crash_test.py``
(three rounds here; the benchmark defaults to twenty). This test runs the
script, then reads its acknowledgement and delivery logs itself rather than
trusting the script's verdict.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "crash_test.py"
RECIPIENTS = ("a@crash.test", "b@crash.test")


@pytest.mark.timeout(90)
def test_acknowledged_mail_survives_sigkill(tmp_path: Path) -> None:
    workdir = tmp_path / "crash"
    result_file = tmp_path / "result.json"
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--rounds",
            "3",
            "--min-acks",
            "10",
            "--max-acks",
            "40",
            "--timeout",
            "15",
            "--workdir",
            str(workdir),
            "--json",
            str(result_file),
        ],
        capture_output=True,
        text=True,
        timeout=75,
        check=False,
    )
    assert run.returncode in (0, 1), f"the crash test did not run:\n{run.stdout}\n{run.stderr}"
    result = json.loads(result_file.read_text())
    print(run.stdout)  # rounds, acknowledged, delivered, lost, duplicates (pytest -s)

    # Our own reading of the logs.
    acked = (workdir / "acked.log").read_text().split()
    delivered: dict[tuple[str, str], int] = {}
    for line in (workdir / "delivered.log").read_text().splitlines():
        msgid, rcpt, _pid = line.split(" ")
        delivered[(msgid, rcpt)] = delivered.get((msgid, rcpt), 0) + 1
    lost = [m for m in acked if any((m, r) not in delivered for r in RECIPIENTS)]

    assert result["rounds"] == 3
    assert len(acked) == result["acknowledged"] >= 30
    # Mail was flowing when each kill came.
    kills = result["acknowledged_at_kills"]
    assert len(kills) == 3
    assert kills == sorted(kills)
    assert kills[0] > 0
    assert lost == [], f"{len(lost)} acknowledged messages were never delivered"
    assert result["lost"] == 0
    assert result["quarantined"] == 0
    assert result["duplicates_without_crash"] == 0
    # The queue drained: nothing left behind in the spool.
    assert not any((workdir / "spool" / "env").iterdir())
    assert not any((workdir / "spool" / "meta").iterdir())
    # Only spare (recycled) files may stay; no half-written temporary file.
    assert not [p for p in (workdir / "spool" / "tmp").iterdir() if p.suffix != ".spare"]
