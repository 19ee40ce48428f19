#!/usr/bin/env python
"""One worker against two: msg/s and CPU per message of slimta.util.workers.

For each repetition, load shape and worker count (1 and 2, in a shuffled
order), this starts a fresh supervisor (this file with ``--serve``: a
:class:`slimta.util.workers.Workers` of N worker processes sharing one port
on 127.0.0.1), sends an untimed warm-up, then times Postfix's
``smtp-source`` sending ``--messages`` 1 KiB messages (one recipient each,
``--sessions`` at a time) as the shared harness does:

  conn      one message per connection   (smtp-source -s 20 -m N -l 1024 ...)
  session   all over 20 long sessions    (the same with -d)

Each worker runs ``--pipeline``:

  edge-only  SmtpEdge -> a queue-like object that accepts at once (what the
             edge alone costs; PTR lookups off, as in edge_cost.py)
  disk       SmtpEdge -> Queue(DiskStorage of the worker's spool, fsync) ->
             BlackholeRelay (the queue drains after the load; the CPU of the
             drain is counted)

The workers share the port with SO_REUSEPORT (one socket each), or with
``--shared`` accept from one socket.

Reported per run: msg/s (messages / smtp-source's wall time: the rate of
250 replies), server CPU per message (utime+stime of the supervisor and its
workers over the load and, for disk, the drain), smtp-source's CPU per
message, and "foreign CPU": the host's busy time in the window not spent by
these processes, as a share of all cores (other jobs on the box; also kernel
work charged to no process, such as journal commits; and time the hypervisor
stole, also shown alone as "steal"). Then the same-run
ratio of msg/s, 2 workers / 1 worker, per repetition and shape, and its
median. The load generator shares the two cores with the workers, so two
workers cannot reach 2.0: CPU per message shows the cost apart from the
core count, and "CPU ceiling" is the ratio two workers would reach if they
and smtp-source kept every core busy at their measured CPU per message
(cores / (server + smtp-source CPU per message), over one worker's msg/s).

Usage (from the repository root; results also go to
``bench/bench-results/<UTC stamp>-workers/results.json``)::

    .venv/bin/python bench/workers_bench.py --reps 3
    .venv/bin/python bench/workers_bench.py --reps 3 --pipeline disk
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from slimta.util.workers import WorkerContext, Workers

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SHAPES = ("conn", "session")
PIPELINES = ("edge-only", "disk")
#: Seconds to wait for a server to start, a warm-up, or a drain.
WAIT = 120.0


# --- the server (--serve) ---------------------------------------------------------------


class InstantQueue:
    """What edge-only hands SmtpEdge: accepts every envelope at once."""

    def __init__(self) -> None:
        self.count = 0

    def enqueue(self, envelope: Any) -> list[tuple[Any, str]]:
        self.count += 1
        return [(envelope, f"bench-{self.count}")]


def bench_setup(worker: WorkerContext) -> None:
    """One worker: SmtpEdge on the shared port -> the pipeline's queue."""
    from slimta.edge.smtp import SmtpEdge

    (pipeline,) = worker.args
    queue: Any
    if pipeline == "edge-only":
        queue = InstantQueue()
    else:
        from slimta.diskstorage import DiskStorage
        from slimta.queue import Queue
        from slimta.relay.blackhole import BlackholeRelay

        relay = BlackholeRelay()
        queues = []
        for spool in worker.spool_dirs:
            queue = Queue(DiskStorage(spool / "env", spool / "meta"), relay)
            queue.start()
            worker.on_stop(lambda grace, queue=queue: queue.kill())
            queues.append(queue)
        queue = queues[0]
    edge = SmtpEdge(worker.listener(0), queue, hostname="bench")
    edge.ptr_lookup = False
    edge.start()
    worker.on_stop(edge.stop)


def serve(count: int, pipeline: str, spool: str, shared: bool) -> int:
    """The supervisor: prints ``PORT <port>``, then ``READY <pid> ...``."""
    workers = Workers(
        bench_setup,
        count,
        spool_root=spool,
        listeners=[("127.0.0.1", 0)],
        args=(pipeline,),
        reuse_port=False if shared else None,
    )
    workers.bind()
    print("PORT", workers.addresses[0][1], flush=True)
    return workers.run(on_ready=lambda: print("READY", *workers.pids, flush=True))


# --- the driver -----------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime+stime of a process in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def host_busy_s() -> tuple[float, float]:
    """Seconds of CPU the host spent busy since boot, all cores, and of
    those the seconds stolen by the hypervisor."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK, values[7] / CLK_TCK


class Server:
    """One supervisor with its workers, for one measured run."""

    def __init__(self, count: int, pipeline: str, logdir: Path, shared: bool) -> None:
        self.spool = Path(tempfile.mkdtemp(prefix="workers-bench-"))
        self.err = open(logdir / f"server-{count}w-{time.monotonic_ns()}.err", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                "--workers",
                str(count),
                "--pipeline",
                pipeline,
                "--spool",
                str(self.spool),
                *(["--shared"] if shared else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.err,
        )
        self.port = int(self._line("PORT")[0])
        self.pids = [self.proc.pid, *(int(pid) for pid in self._line("READY"))]

    def _line(self, word: str) -> list[str]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], deadline - time.monotonic())
            line = self.proc.stdout.readline().decode() if ready else ""
            if line.startswith(word + " "):
                return line.split()[1:]
            if ready and not line:
                break
        raise SystemExit(f"workers_bench: the server did not say {word}; see {self.err.name}")

    def cpu_s(self) -> float:
        return sum(proc_cpu_s(pid) for pid in self.pids)

    def queued(self) -> int:
        return sum(1 for _ in self.spool.glob("worker-*/env/*.env"))

    def wait_drained(self) -> None:
        deadline = time.monotonic() + WAIT
        while self.queued():
            if time.monotonic() > deadline:
                raise SystemExit(f"workers_bench: {self.queued()} messages stuck in {self.spool}")
            time.sleep(0.05)  # the workers deliver; look again

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=WAIT)
        finally:
            self.err.close()
            shutil.rmtree(self.spool, ignore_errors=True)


def smtp_source(
    source: str, port: int, shape: str, messages: int, sessions: int, size: int
) -> tuple[float, float]:
    """Run smtp-source; :returns: (wall seconds, its CPU seconds)."""
    command = [source, "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    command += ["-M", "localhost", "-f", "bench@localhost", "-t", "sink@localhost"]
    if shape == "session":
        command.append("-d")
    command.append(f"127.0.0.1:{port}")
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    # wait4 rather than wait: smtp-source's own CPU time comes with it.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stderr is not None
    error = proc.stderr.read().decode(errors="replace").strip()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"workers_bench: smtp-source rc={proc.returncode}: {error[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


def measure(args: argparse.Namespace, source: str, count: int, shape: str) -> dict[str, Any]:
    server = Server(count, args.pipeline, args.logdir, args.shared)
    try:
        smtp_source(source, server.port, shape, args.warmup, 5, args.size)
        server.wait_drained()
        cpu0, busy0, start = server.cpu_s(), host_busy_s(), time.perf_counter()
        wall, source_cpu = smtp_source(
            source, server.port, shape, args.messages, args.sessions, args.size
        )
        server.wait_drained()
        cpu1, busy1, window = server.cpu_s(), host_busy_s(), time.perf_counter() - start
    finally:
        server.stop()
    server_cpu = cpu1 - cpu0
    foreign = max(0.0, (busy1[0] - busy0[0]) - server_cpu - source_cpu)
    cores = len(os.sched_getaffinity(0))
    return {
        "workers": count,
        "shape": shape,
        "msgs_per_s": round(args.messages / wall, 1),
        "server_cpu_us_per_msg": round(1e6 * server_cpu / args.messages, 1),
        "source_cpu_us_per_msg": round(1e6 * source_cpu / args.messages, 1),
        "foreign_cpu_pct": round(100.0 * foreign / (cores * window), 1),
        "steal_pct": round(100.0 * (busy1[1] - busy0[1]) / (cores * window), 1),
    }


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def report(runs: list[dict[str, Any]], shapes: list[str], reps: int) -> list[str]:
    lines = [
        "| shape | workers | msg/s | server CPU us/msg | smtp-source CPU us/msg | foreign CPU % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for shape in shapes:
        for count in (1, 2):
            mine = [r for r in runs if r["shape"] == shape and r["workers"] == count]
            lines.append(
                f"| {shape} | {count} | {median([r['msgs_per_s'] for r in mine]):.0f} | "
                f"{median([r['server_cpu_us_per_msg'] for r in mine]):.0f} | "
                f"{median([r['source_cpu_us_per_msg'] for r in mine]):.0f} | "
                f"{median([r['foreign_cpu_pct'] for r in mine]):.1f} |"
            )
    lines += [
        "",
        "| shape | msg/s, 2 workers / 1 worker: median (per repetition) | CPU ceiling |",
        "|---|---|---:|",
    ]
    cores = len(os.sched_getaffinity(0))
    for shape in shapes:
        ratios = []
        for rep in range(reps):
            by_count = {
                r["workers"]: r["msgs_per_s"]
                for r in runs
                if r["rep"] == rep and r["shape"] == shape
            }
            ratios.append(by_count[2] / by_count[1])
        each = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        # What two workers could do if they and smtp-source kept every core
        # busy at their measured cost per message, over one worker's rate.
        two = [r for r in runs if r["shape"] == shape and r["workers"] == 2]
        one = [r["msgs_per_s"] for r in runs if r["shape"] == shape and r["workers"] == 1]
        cost = median([r["server_cpu_us_per_msg"] + r["source_cpu_us_per_msg"] for r in two])
        ceiling = cores * 1e6 / cost / median(one)
        lines.append(f"| {shape} | {median(ratios):.2f} ({each}) | {ceiling:.2f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--spool", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", choices=PIPELINES, default="edge-only")
    parser.add_argument(
        "--shared", action="store_true", help="one listening socket for all (no SO_REUSEPORT)"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s")
    parser.add_argument("--size", type=int, default=1024, help="smtp-source -l")
    parser.add_argument("--shapes", default="conn,session")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.serve:
        return serve(args.workers, args.pipeline, args.spool, args.shared)

    source = shutil.which("smtp-source") or shutil.which("smtp-source", path="/usr/sbin")
    if source is None:
        print("workers_bench: smtp-source not found (apt-get install postfix)", file=sys.stderr)
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    outdir = HERE / "bench-results" / f"{stamp}-workers"
    args.logdir = outdir / "logs"
    args.logdir.mkdir(parents=True)
    shapes = args.shapes.split(",")
    command = " ".join(["bench/workers_bench.py", *sys.argv[1:]])
    print(f"run {stamp}: {command}; {len(os.sched_getaffinity(0))} cores", flush=True)
    shuffle = random.Random(args.seed)
    runs = []
    for rep in range(args.reps):
        order = [(shape, count) for shape in shapes for count in (1, 2)]
        shuffle.shuffle(order)
        for shape, count in order:
            run = measure(args, source, count, shape)
            run["rep"] = rep
            runs.append(run)
            print(json.dumps(run), flush=True)
    lines = report(runs, shapes, args.reps)
    print("\n".join(lines))
    results = {
        "run": stamp,
        "command": command,
        "pipeline": args.pipeline,
        "messages": args.messages,
        "runs": runs,
        "summary": lines,
    }
    (outdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
