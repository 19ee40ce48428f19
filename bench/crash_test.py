#!/usr/bin/env python
"""Crash test of DiskStorage: SIGKILL a real MTA while mail flows, restart it,
and check that every message acknowledged with 250 is delivered.

Three roles, all in this file:

driver (the default)
    Starts the client and the MTA, then for each round waits until a random
    number of further messages has been acknowledged, waits a random few
    milliseconds more, and kills the MTA with SIGKILL; the next round
    restarts it on the same directories. After the last round the client
    stops, the MTA is started once more without traffic and drains the queue.
    Then every acknowledged Message-Id must appear in the delivery log for
    each of its recipients.

``--role mta``
    ``SmtpEdge(('127.0.0.1', port), Queue(DiskStorage(...), relay))``. The
    relay appends ``<Message-Id> <recipient>`` lines to the delivery log and
    fsyncs it before reporting success; it fails some recipients
    transiently at random, so partial deliveries, retries and metadata
    updates happen too.

``--role client``
    Threads sending messages with :mod:`smtplib`, each with a unique
    Message-Id, reconnecting whenever the MTA is gone. A Message-Id is
    written to the acknowledgement log only after the server said 250 to
    the message's DATA.

Delivery lines also carry the MTA's pid, so duplicates that no crash
explains (the same recipient delivered twice by one process) are counted
apart.

Usage::

    .venv/bin/python bench/crash_test.py [--rounds 20] [--clients 4] [--seed N]
        [--workdir DIR] [--json FILE]

It prints rounds, acknowledged, delivered, lost and duplicates (recipient
deliveries beyond the first: at-least-once delivery allows them), and exits 1
if anything acknowledged was lost or quarantined.

SIGKILL crashes the process, not the machine: what the kernel has accepted
survives it even without fsync. This test checks the protocol (nothing is
acknowledged before it is stored; recovery after a crash at any point; no
loss across restarts), not the fsync calls themselves, which the unit tests
check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The domain of every address and Message-Id used.
DOMAIN = "crash.test"
#: Recipients of every message; each must be delivered.
RECIPIENTS = (f"a@{DOMAIN}", f"b@{DOMAIN}")


# --- the MTA --------------------------------------------------------------------------


def run_mta(args: argparse.Namespace) -> int:
    # gevent first, before anything imports socket or threading.
    from gevent import monkey

    monkey.patch_all()

    import logging

    import gevent

    from slimta.diskstorage import DiskStorage
    from slimta.edge.smtp import SmtpEdge
    from slimta.envelope import Envelope
    from slimta.queue import Queue
    from slimta.relay import RecipientResult, Relay, TransientRelayError

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    class RecordingRelay(Relay):
        """Delivers by appending (and fsyncing) one line per recipient."""

        def __init__(self, path: str, fail_rate: float) -> None:
            super().__init__()
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self.fail_rate = fail_rate
            self.random = random.Random()

        def _record(self, data: bytes) -> None:
            os.write(self.fd, data)
            os.fsync(self.fd)

        def attempt(self, envelope: Envelope, attempts: int) -> dict[str, RecipientResult]:
            assert envelope.headers is not None
            msgid = envelope.headers["Message-Id"]
            results: dict[str, RecipientResult] = {}
            lines = []
            for rcpt in envelope.recipients:
                if self.random.random() < self.fail_rate:
                    results[rcpt] = TransientRelayError("not now")
                else:
                    results[rcpt] = None
                    lines.append(f"{msgid} {rcpt} {os.getpid()}\n")
            if lines:
                # Durable before success is reported, off the hub.
                gevent.get_hub().threadpool.apply(self._record, ("".join(lines).encode(),))
            return results

    spool = Path(args.workdir) / "spool"
    storage = DiskStorage(spool / "env", spool / "meta")
    relay = RecordingRelay(str(Path(args.workdir) / "delivered.log"), args.fail_rate)
    queue = Queue(
        storage,
        relay,
        backoff=lambda envelope, attempts: 0.05 if attempts < 10_000 else None,
        bounce_factory=lambda envelope, reply: None,
    )
    edge = SmtpEdge(("127.0.0.1", args.port), queue, hostname="mx." + DOMAIN)
    edge.server.init_socket()  # listening from here on
    queue.start()
    edge.start()
    ready = Path(args.workdir) / "ready"
    (Path(args.workdir) / "ready.tmp").write_text(str(os.getpid()))
    os.replace(Path(args.workdir) / "ready.tmp", ready)

    done = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, done.set)
    done.wait()
    edge.stop(grace=1.0)
    queue.kill()
    return 0


# --- the client -------------------------------------------------------------------------


def run_client(args: argparse.Namespace) -> int:
    import smtplib
    import threading

    stop = Path(args.workdir) / "stop"
    lock = threading.Lock()
    acked = open(Path(args.workdir) / "acked.log", "a")  # noqa: SIM115
    sent = 0

    def worker(number: int) -> None:
        nonlocal sent
        conn: smtplib.SMTP | None = None
        serial = 0
        while not stop.exists():
            if conn is None:
                try:
                    conn = smtplib.SMTP("127.0.0.1", args.port, timeout=10)
                except OSError:
                    time.sleep(0.01)  # the MTA is restarting
                    continue
            msgid = f"<{os.getpid()}.{number}.{serial}@{DOMAIN}>"
            serial += 1
            message = (
                f"From: sender@{DOMAIN}\r\n"
                f"To: {', '.join(RECIPIENTS)}\r\n"
                f"Message-Id: {msgid}\r\n"
                f"Subject: crash test {serial}\r\n"
                "\r\n" + "body line\r\n" * random.randint(1, 200)
            )
            try:
                conn.sendmail(f"sender@{DOMAIN}", list(RECIPIENTS), message)
            except smtplib.SMTPResponseException:
                # A 4xx/5xx (451 when storing failed): not acknowledged.
                continue
            except (OSError, smtplib.SMTPException):
                with contextlib.suppress(OSError):
                    conn.close()
                conn = None
                continue
            with lock:
                acked.write(msgid + "\n")
                acked.flush()
                sent += 1
        if conn is not None:
            try:
                conn.quit()
            except (OSError, smtplib.SMTPException):
                conn.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    acked.close()
    return 0


# --- the driver -----------------------------------------------------------------------------


class Failure(Exception):
    """The test could not run as planned (not a lost message)."""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as file:
            return file.read().count(b"\n")
    except FileNotFoundError:
        return 0


def poll(condition: Any, timeout: float, what: str, interval: float = 0.005) -> None:
    """Wait until *condition()* is true, at most *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def run_driver(args: argparse.Namespace) -> int:
    import subprocess

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="slimta-crash-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    rng = random.Random(args.seed)
    me = os.path.abspath(__file__)
    common = ["--workdir", str(workdir), "--port", str(port)]
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, extra: list[str]) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, me, *extra, *common], stdout=log, stderr=subprocess.STDOUT
            )
        processes.append(proc)
        return proc

    starts = 0

    def start_mta() -> subprocess.Popen[bytes]:
        nonlocal starts
        starts += 1
        (workdir / "ready").unlink(missing_ok=True)
        mta = spawn(f"mta-{starts}", ["--role", "mta", "--fail-rate", str(args.fail_rate)])
        poll(
            lambda: (workdir / "ready").exists() or mta.poll() is not None,
            args.timeout,
            "the MTA to listen",
        )
        if mta.poll() is not None:
            raise Failure(f"the MTA exited with {mta.returncode}; see {logs}")
        return mta

    acked_log = workdir / "acked.log"
    kills: list[int] = []
    try:
        client = spawn("client", ["--role", "client", "--clients", str(args.clients)])
        for _ in range(args.rounds):
            mta = start_mta()
            target = count_lines(acked_log) + rng.randint(args.min_acks, args.max_acks)
            poll(
                lambda target=target: count_lines(acked_log) >= target,
                args.timeout,
                "acknowledgements",
            )
            time.sleep(rng.uniform(0, args.jitter))  # the random moment
            mta.send_signal(signal.SIGKILL)
            mta.wait()
            kills.append(count_lines(acked_log))
        (workdir / "stop").touch()
        client.wait(timeout=args.timeout)
        mta = start_mta()
        poll(
            lambda: not any((workdir / "spool" / "env").iterdir()),
            args.timeout,
            "the queue to drain",
            interval=0.02,
        )
        mta.send_signal(signal.SIGTERM)
        mta.wait(timeout=args.timeout)
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    result = verdict(workdir, args.rounds, kills)
    result["seconds"] = round(time.monotonic() - started, 2)
    result["workdir"] = str(workdir)
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 and result["quarantined"] == 0 else 1


#: Log lines of DiskStorage's recovery, as written by slimta.logging.
_RECOVERY = re.compile(r"queue:[0-9a-f*-]+:(tmp_removed|recover|orphan_meta_removed|quarantine)\b")


def verdict(workdir: Path, rounds: int, kills: list[int]) -> dict[str, Any]:
    """Compare the acknowledgement log with the delivery log."""
    acked = (workdir / "acked.log").read_text().split()
    deliveries: dict[tuple[str, str], int] = {}
    # Duplicates within one MTA process were not caused by a crash.
    same_process: dict[tuple[str, str, str], int] = {}
    for line in (workdir / "delivered.log").read_text().splitlines():
        msgid, rcpt, pid = line.split(" ")
        deliveries[(msgid, rcpt)] = deliveries.get((msgid, rcpt), 0) + 1
        same_process[(msgid, rcpt, pid)] = same_process.get((msgid, rcpt, pid), 0) + 1
    lost = [m for m in acked if any((m, r) not in deliveries for r in RECIPIENTS)]
    delivered_ids = {m for m, _ in deliveries}
    recovery: dict[str, int] = {}
    for log in (workdir / "logs").glob("mta-*.log"):
        for match in _RECOVERY.finditer(log.read_text(errors="replace")):
            recovery[match.group(1)] = recovery.get(match.group(1), 0) + 1
    quarantine = workdir / "spool" / "quarantine"
    return {
        "rounds": rounds,
        "acknowledged": len(acked),
        "delivered": sum(1 for m in acked if m in delivered_ids and m not in lost),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "duplicates": sum(count - 1 for count in deliveries.values()),
        "duplicate_messages": len({m for (m, _), count in deliveries.items() if count > 1}),
        "duplicates_without_crash": sum(count - 1 for count in same_process.values()),
        "delivered_unacknowledged": len(delivered_ids - set(acked)),
        "quarantined": len(list(quarantine.iterdir())) if quarantine.exists() else 0,
        "acknowledged_at_kills": kills,
        "recovery_log": recovery,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("driver", "mta", "client"), default="driver")
    parser.add_argument("--rounds", type=int, default=20, help="SIGKILLs (default 20)")
    parser.add_argument("--clients", type=int, default=4, help="client connections (default 4)")
    parser.add_argument("--min-acks", type=int, default=5, help="fewest acks per round")
    parser.add_argument("--max-acks", type=int, default=60, help="most acks per round")
    parser.add_argument("--jitter", type=float, default=0.03, help="max extra s before a kill")
    parser.add_argument("--fail-rate", type=float, default=0.2, help="transient failures")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per wait")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the driver")
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "mta":
        return run_mta(args)
    if args.role == "client":
        return run_client(args)
    try:
        return run_driver(args)
    except Failure as exc:
        print(f"crash test failed to run: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
