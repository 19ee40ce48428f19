#!/usr/bin/env python3
"""`slimta serve` relaying to a smarthost, against python-slimta 5.0.5's pipeline.

Drives Postfix's smtp-source against, in one interleaved run:

  smtp-sink                         the C sink: what one SMTP exchange costs
                                    here (a reference, no relaying)
  python-slimta-5.0.5:relay-headers bench/mta_pipeline.py in the anchor venv:
                                    SmtpEdge -> Queue(DictStorage) with
                                    AddDateHeader, AddMessageIdHeader and
                                    AddReceivedHeader -> StaticSmtpRelay
                                    (pool_size=20, idle_timeout=10) -> smtp-sink
  slimta-serve                      `slimta serve --config <tmp>/slimta.toml`
                                    from this checkout's venv: its default
                                    policies (Received, Date, Message-Id, one
                                    message per recipient domain), the durable
                                    disk queue (fsync) and the smarthost relay
                                    -> smtp-sink; log level "info" (the
                                    default: one mail-log line per connect,
                                    disconnect, accepted message and delivery)

and, with --pipelines dict,disk, diagnostic targets that run the same
library without the command: bench/mta_pipeline.py --relay smtp --policies
headers in this checkout's venv on DictStorage or DiskStorage
(slimta-rewrite:relay-headers-<storage>, StaticSmtpRelay pool_size=20);

with both load shapes of the shared harness (conn: `smtp-source -s 20`, one
message per connection; session: `smtp-source -d -s 20`, 20 long sessions;
1 KiB messages to sink@localhost), every target and shape in a shuffled
order in every repetition. It reuses the harness's helpers (run_bench.py
from $SHARED_BENCH, <repo>/../shared/bench or bench/harness/): process
start (each child dies with this driver), smtp-source load, smtp-sink with
its -c counters, CPU and host readings.

The serve configuration is CONFIG_TEMPLATE below, written for every run
into a fresh temp dir (which also holds the queue and is removed after the
run; a copy of the file goes to the run's log dir). Only what benchmarking
needs differs from `slimta example-config`: 127.0.0.0/8 is a trusted
network (smtp-source relays from 127.0.0.1), the local domain is one
smtp-source never uses (so sink@localhost goes to the smarthost, not to a
Maildir), the smarthost is a second smtp-sink on a free port, the listener
is on a free port, the connection and rate limits are far above the load,
the hostname is the anchor's (bench.localhost), shutdown_grace is 5 s.

Measured per run (after an untimed warm-up of --warmup messages, -s 5):

  msg/s       messages / wall time of the measured smtp-source (acceptance)
  e2e msg/s   messages / (load start -> the smarthost smtp-sink has counted
              warm-up + messages): delivered messages per second, the
              figure the goal is about
  CPU us/msg  utime+stime of the server process (all its threads) from load
              start to the end of the drain, per message
  foreign %   host CPU busy time over the same window minus the CPU of the
              server, smtp-source and the smarthost sink, as a share of all
              CPUs: other work on the box (plus kernel work not charged to a
              process, such as journal commits for fsync)
  loadavg     /proc/loadavg (1 min) right before the load

Checks per run (a failed check lists the run under "Anomalies" and leaves
it out of the medians): smtp-source exit status; the sink counted exactly
warm-up + messages; the queue empty after the drain (anchor: its stats
JSON; serve: no *.env file left in data_dir/queue/env); no bounce; for
serve at log level info, one "status=sent" mail-log line per message and
no WARNING/ERROR line or traceback; the anchor ran with DictStorage and
the header policies (its stats JSON says so).

Results: bench/bench-results/serve-<UTC stamp>/results.json, results.md and
logs/<run>/ (stdout/stderr of every process; serve's log is gzipped).

    bench/run.sh --quick --modes edge-only   # once: tools and the anchor venv
    python3 bench/serve_bench.py --reps 3
    python3 bench/serve_bench.py --quick     # smoke test, not for quoting
    python3 bench/serve_bench.py --reps 1 --py-spy /path/to/py-spy --no-sink
                                             # profile serve (slows it: not for quoting)
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the shared harness may be read-only

import argparse
import collections
import datetime
import gzip
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ANCHOR_SCRIPT = HERE / "mta_pipeline.py"
SHAPES = ("conn", "session")
SERVE_READY = re.compile(r"\bready \(pid \d+\)")

CONFIG_TEMPLATE = """\
# slimta serve configuration written by bench/serve_bench.py for one run.
# Everything not set here is slimta serve's default (see slimta example-config).

[server]
hostname = "bench.localhost"
data_dir = {data_dir}
log_level = {log_level}
# smtp-source relays from 127.0.0.1 without AUTH.
trusted_networks = ["127.0.0.0/8"]
shutdown_grace = 5.0
workers = 1

[listeners.smtp]
kind = "smtp"
address = "127.0.0.1:{port}"

# Not localhost: smtp-source's sink@localhost must go to the smarthost.
[local]
domains = ["serve-bench.invalid"]

[relay]
default = "smarthost"

[relay.smarthost]
host = "127.0.0.1"
port = {sink_port}

# The defaults, spelled out.
[policies]
received = true
date = true
message_id = true

# Far above the load, so no limit ever refuses it.
[limits]
max_connections = 100000
max_connections_per_ip = 100000
max_messages_per_minute_per_ip = 100000000
"""


def _import_harness():
    candidates = [
        os.environ.get("SHARED_BENCH"),
        REPO.parent / "shared" / "bench",
        HERE / "harness",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "run_bench.py").is_file():
            sys.path.insert(0, str(candidate))
            import run_bench

            return run_bench
    raise SystemExit("run_bench.py not found: set SHARED_BENCH")


rb = _import_harness()


class Target:
    def __init__(self, name, kind, program=None, extra=(), log_level="info", storage="dict"):
        self.name = name
        # 'sink' | 'anchor' | 'sut' (slimta serve) | 'pipeline' (mta_pipeline.py
        # in this checkout's venv, a diagnostic: the library without the command)
        self.kind = kind
        self.program = program  # a python for mta_pipeline.py, or the slimta command
        self.extra = list(extra)
        self.log_level = log_level  # serve only
        self.storage = storage  # mta_pipeline.py only

    @property
    def runs_pipeline(self):
        return self.kind in ("anchor", "pipeline")

    def as_dict(self):
        return {
            "name": self.name,
            "kind": self.kind,
            "program": self.program,
            "extra": self.extra,
            "log_level": self.log_level if self.kind == "sut" else None,
            "storage": self.storage
            if self.runs_pipeline
            else "disk"
            if self.kind == "sut"
            else None,
        }


class ServeProcess(rb.Server):
    """`slimta serve`: ready once its log says "ready (pid N)" (an INFO line);
    above log level info, once its listener answers with a 220 banner."""

    log_level = "info"

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.log_level in ("debug", "info"):
                try:
                    with open(self.stderr_path, errors="replace") as fh:
                        if SERVE_READY.search(fh.read(65536)):
                            return True
                except OSError:
                    pass
            elif banner(self.port):
                return True
            time.sleep(0.02)
        return False


def banner(port):
    """True when an SMTP server on *port* greets with 220 (then QUIT)."""
    try:
        with socket.create_connection((rb.HOST, port), timeout=2.0) as conn:
            if not conn.recv(512).startswith(b"220"):
                return False
            conn.sendall(b"QUIT\r\n")
            conn.recv(512)
            return True
    except OSError:
        return False


def toml_string(text):
    return json.dumps(str(text))  # a TOML basic string for plain paths and words


def write_config(scratch, port, sink_port, log_level):
    data_dir = Path(scratch) / "data"
    path = Path(scratch) / "slimta.toml"
    path.write_text(
        CONFIG_TEMPLATE.format(
            data_dir=toml_string(data_dir),
            log_level=toml_string(log_level),
            port=port,
            sink_port=sink_port,
        )
    )
    return path, data_dir


def start_server(target, cfg, logdir, scratch, sink_port):
    """Starts the server of *target*; returns (server, serve data dir or None)."""
    port = rb.free_port()
    if target.runs_pipeline:
        stats_file = str(logdir / "server-stats.json")
        cmd = [target.program, ANCHOR_SCRIPT, "--port", port, "--relay", "smtp"]
        cmd += ["--sink-port", sink_port, "--relay-pool-size", cfg.relay_pool_size]
        cmd += ["--relay-idle-timeout", cfg.relay_idle_timeout]
        cmd += ["--storage", target.storage, "--policies", "headers"]
        cmd += ["--stats-file", stats_file, "--max-lifetime", cfg.max_server_life]
        server = rb.Server("server", cmd + target.extra, logdir, stats_file=stats_file)
        data_dir = None
    else:
        conf, data_dir = write_config(scratch, port, sink_port, target.log_level)
        shutil.copy(conf, logdir / "slimta.toml")
        cmd = [target.program, "serve", "--config", conf, *target.extra]
        server = ServeProcess("server", cmd, logdir)
        server.log_level = target.log_level
    server.port = port
    return server, data_dir


def wait_count(sink, expected, timeout):
    """(count, perf_counter when it reached *expected*, or None)."""
    deadline = time.monotonic() + timeout
    while True:
        got = sink.count()
        if got >= expected:
            return got, time.perf_counter()
        if time.monotonic() > deadline:
            return got, None
        time.sleep(0.005)


def spool_size(data_dir):
    try:
        return sum(1 for name in os.listdir(data_dir / "queue" / "env") if name.endswith(".env"))
    except OSError:
        return None


def wait_spool_empty(data_dir, timeout):
    deadline = time.monotonic() + timeout
    size = None
    while time.monotonic() < deadline:
        size = spool_size(data_dir)
        if size == 0:
            return 0
        time.sleep(0.05)
    return size


def wait_pipeline_queue_empty(server, timeout):
    deadline = time.monotonic() + timeout
    size = None
    while time.monotonic() < deadline:
        size = (server.stats() or {}).get("queue_size")
        if size == 0:
            return 0
        time.sleep(0.05)
    return size


LOG_LINE = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): ")


def read_serve_log(path):
    """What serve's log (its stderr) says: mail-log statuses, levels, tracebacks."""
    out = {
        "lines": 0,
        "levels": collections.Counter(),
        "loggers": collections.Counter(),
        "status": collections.Counter(),
        "tracebacks": 0,
        "stopped_left": None,
        "first_problems": [],
    }
    if not os.path.isfile(path):
        return out
    with open(path, errors="replace") as fh:
        for line in fh:
            out["lines"] += 1
            found = LOG_LINE.match(line)
            if found:
                level, logger = found.groups()
                out["levels"][level] += 1
                out["loggers"][logger] += 1
                if level in ("WARNING", "ERROR", "CRITICAL") and len(out["first_problems"]) < 5:
                    out["first_problems"].append(line.strip()[:300])
            status = re.search(r" status=(\w+)", line)
            if status:
                out["status"][status.group(1)] += 1
            if line.startswith("Traceback"):
                out["tracebacks"] += 1
                if len(out["first_problems"]) < 5:
                    out["first_problems"].append(line.strip())
            left = re.search(r"stopped; (\d+) message\(s\) left in the queue", line)
            if left:
                out["stopped_left"] = int(left.group(1))
    for key in ("levels", "loggers", "status"):
        out[key] = dict(out[key])
    return out


def gzip_file(path):
    try:
        with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        os.unlink(path)
    except OSError:
        pass


class PySpy:
    """py-spy recording one server process during the measured load."""

    def __init__(self, binary, pid, logdir, rate, gil=False):
        self.path = logdir / "py-spy.txt"
        cmd = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking"]
        if gil:
            cmd.append("--gil")  # only the thread holding the GIL: Python's CPU
        cmd += ["--format", "raw", "--output", str(self.path)]
        with open(logdir / "py-spy.err", "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return summarize_collapsed(self.path)


def summarize_collapsed(path, top=25):
    """Self and inclusive sample shares of the frames in a py-spy raw file."""
    own = collections.Counter()
    incl = collections.Counter()
    total = 0
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    if not total:
        return None

    def share(counter):
        return [[frame, round(100.0 * n / total, 1)] for frame, n in counter.most_common(top)]

    return {"samples": total, "self_pct": share(own), "inclusive_pct": share(incl)}


def measure(target, shape, rep, cfg, outdir):
    tag = f"r{rep}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', target.name)}-{shape}"
    logdir = outdir / "logs" / tag
    logdir.mkdir(parents=True, exist_ok=True)
    record = {"target": target.name, "shape": shape, "rep": rep, "messages": cfg.messages}
    record.update(size=cfg.size, warmup=cfg.warmup, sessions=cfg.sessions)
    record.update(problems=[], logdir=str(logdir.relative_to(outdir)))
    problems = record["problems"]
    if target.kind == "sink":
        return measure_sink(shape, record, cfg, logdir)
    scratch = tempfile.mkdtemp(prefix="slimta-serve-bench-")
    server = sink = data_dir = profiler = None
    try:
        sink_port = rb.free_port()
        sink = rb.Sink("relay-sink", sink_port, logdir, cfg.max_server_life)
        record["relay_sink_cmd"] = " ".join(sink.cmd)
        if not sink.wait_ready():
            problems.append("relay smtp-sink did not start")
            return record
        server, data_dir = start_server(target, cfg, logdir, scratch, sink_port)
        record["server_cmd"] = " ".join(server.cmd)
        if not server.wait_ready():
            problems.append("server did not become ready")
            return record
        warm = rb.smtp_source(
            server.port, shape, cfg.warmup, min(cfg.sessions, 5), cfg.size, logdir, "warmup", 120
        )
        if warm["rc"] != 0:
            problems.append(f"warm-up smtp-source rc={warm['rc']}: {warm['stderr_tail']}")
        got, _ = wait_count(sink, cfg.warmup, cfg.drain_timeout)
        if got != cfg.warmup:
            problems.append(f"warm-up: the sink counted {got} of {cfg.warmup}")
        if cfg.py_spy and target.kind == "sut":
            profiler = PySpy(cfg.py_spy, server.pid, logdir, cfg.py_spy_rate, cfg.py_spy_gil)
            time.sleep(0.5)  # let it attach
        cpu0 = rb.proc_cpu_s(server.pid)
        sink_cpu0 = rb.proc_cpu_s(sink.pid)
        host0 = rb.host_cpu()
        record["loadavg_before"] = rb.loadavg()
        t_start = time.perf_counter()
        src = rb.smtp_source(
            server.port,
            shape,
            cfg.messages,
            cfg.sessions,
            cfg.size,
            logdir,
            "measured",
            cfg.run_timeout,
        )
        host1 = rb.host_cpu()
        record["smtp_source"] = src
        if src["timed_out"] or src["rc"] != 0:
            problems.append(
                f"smtp-source rc={src['rc']} timed_out={src['timed_out']}: {src['stderr_tail']}"
            )
        record["wall_s"] = round(src["wall_s"], 4)
        record["msgs_per_s"] = round(cfg.messages / src["wall_s"], 1)
        record["host_cpu_during_load"] = rb.host_cpu_delta(host0, host1)
        expected = cfg.warmup + cfg.messages
        got, t_done = wait_count(sink, expected, cfg.drain_timeout)
        record["delivered"] = got - cfg.warmup
        if got != expected or t_done is None:
            problems.append(f"the sink counted {got} of {expected} (incl. warm-up)")
        else:
            record["e2e_s"] = round(t_done - t_start, 4)
            record["e2e_msgs_per_s"] = round(cfg.messages / (t_done - t_start), 1)
        cpu1 = rb.proc_cpu_s(server.pid)
        sink_cpu1 = rb.proc_cpu_s(sink.pid)
        host2 = rb.host_cpu()
        t_end = time.perf_counter()
        record["loadavg_after"] = rb.loadavg()
        if profiler:
            record["py_spy"] = profiler.stop()
            profiler = None
        if None not in (cpu0, cpu1):
            record["server_cpu_s"] = round(cpu1 - cpu0, 3)
            record["server_cpu_us_per_msg"] = round(1e6 * (cpu1 - cpu0) / cfg.messages, 1)
        if None not in (sink_cpu0, sink_cpu1):
            record["relay_sink_cpu_s"] = round(sink_cpu1 - sink_cpu0, 3)
        own = (
            (record.get("server_cpu_s") or 0) + src["cpu_s"] + (record.get("relay_sink_cpu_s") or 0)
        )
        busy = ((host2["total"] - host0["total"]) - (host2["idle"] - host0["idle"])) / rb.CLK_TCK
        ncpu = len(os.sched_getaffinity(0)) or 1
        record["window_s"] = round(t_end - t_start, 3)
        record["client_cpu_s"] = round(src["cpu_s"], 3)
        record["foreign_cpu_pct"] = round(
            100.0 * max(0.0, busy - own) / (ncpu * (t_end - t_start)), 1
        )
        record.update(server.memory_record())
        # The sink counts a message at its final "."; the queue removes it a
        # moment later. Not part of any timing.
        if target.runs_pipeline:
            left = wait_pipeline_queue_empty(server, cfg.drain_timeout)
        else:
            left = wait_spool_empty(data_dir, cfg.drain_timeout)
        record["queue_size_after_drain"] = left
        if left != 0:
            problems.append(f"{left} messages still queued after the drain")
    except Exception as exc:  # one broken run is data too
        problems.append(f"driver error: {exc!r}")
    finally:
        if profiler:
            profiler.stop()
        final = server.stop() if server else None
        if sink:
            sink.stop()
        if server and server.exit_problem():
            problems.append(server.exit_problem())
        if target.runs_pipeline and final is not None:
            record["server_stats"] = final
            if final.get("bounced"):
                problems.append(f"{final['bounced']} bounced: {final.get('failures')}")
            if (final.get("storage"), final.get("policies")) != (target.storage, "headers"):
                problems.append(
                    f"mta_pipeline.py ran with storage={final.get('storage')} "
                    f"policies={final.get('policies')}"
                )
        elif target.runs_pipeline and server:
            problems.append("no final stats from mta_pipeline.py")
        if target.kind == "sut" and server:
            check_serve_log(record, server, cfg, target)
        if problems and server:
            record["server_stderr"] = server.stderr_tail()
        if target.kind == "sut" and server:
            gzip_file(server.stderr_path)
        shutil.rmtree(scratch, ignore_errors=True)
        record["ok"] = not problems  # here: the early returns above pass through
    return record


def check_serve_log(record, server, cfg, target):
    problems = record["problems"]
    log = record["serve_log"] = read_serve_log(server.stderr_path)
    if log["tracebacks"] or log["levels"].get("ERROR") or log["levels"].get("CRITICAL"):
        problems.append(f"serve logged errors: {log['first_problems']}")
    elif log["levels"].get("WARNING"):
        problems.append(f"serve logged warnings: {log['first_problems']}")
    for status in ("deferred", "bounced"):
        if log["status"].get(status):
            problems.append(f"{log['status'][status]} deliveries {status}")
    if target.log_level in ("debug", "info") and "delivered" in record:
        sent = log["status"].get("sent", 0)
        if sent != cfg.warmup + cfg.messages:
            problems.append(f"{sent} status=sent lines for {cfg.warmup + cfg.messages} messages")
    if log["stopped_left"]:
        problems.append(f"serve stopped with {log['stopped_left']} messages in the queue")


def measure_sink(shape, record, cfg, logdir):
    port = rb.free_port()
    sink = rb.Sink("server", port, logdir, cfg.max_server_life)
    try:
        if not sink.wait_ready():
            record["problems"].append("smtp-sink did not start")
        else:
            cpu0 = rb.proc_cpu_s(sink.pid)
            record["loadavg_before"] = rb.loadavg()
            src = rb.smtp_source(
                port,
                shape,
                cfg.messages,
                cfg.sessions,
                cfg.size,
                logdir,
                "measured",
                cfg.run_timeout,
            )
            cpu1 = rb.proc_cpu_s(sink.pid)
            record["smtp_source"] = src
            if src["rc"] != 0 or src["timed_out"]:
                record["problems"].append(f"smtp-source rc={src['rc']}")
            record["msgs_per_s"] = round(cfg.messages / src["wall_s"], 1)
            if None not in (cpu0, cpu1):
                record["server_cpu_us_per_msg"] = round(1e6 * (cpu1 - cpu0) / cfg.messages, 1)
    finally:
        sink.stop()
    record["ok"] = not record["problems"]
    return record


def _median(values, digits=1):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


RATIO_METRICS = (
    ("e2e msg/s", "e2e_msgs_per_s"),
    ("msg/s (accepted)", "msgs_per_s"),
    ("CPU us/msg", "server_cpu_us_per_msg"),
)
ROW_FIELDS = (
    "msgs_per_s",
    "e2e_msgs_per_s",
    "server_cpu_us_per_msg",
    "server_peak_rss_kb",
    "foreign_cpu_pct",
)


def summarize(runs, targets, sut_names, anchor_name):
    ok = {(r["target"], r["shape"], r["rep"]): r for r in runs if r.get("ok")}
    reps = sorted({r["rep"] for r in runs})
    rows = []
    for target in targets:
        for shape in SHAPES:
            good = [r for (t, s, _), r in sorted(ok.items()) if t == target.name and s == shape]
            if not good:
                continue
            row = {"target": target.name, "shape": shape, "ok_runs": len(good)}
            for field in ROW_FIELDS:
                row[field] = _median([r.get(field) for r in good])
            loads = [float(r["loadavg_before"][0]) for r in good if r.get("loadavg_before")]
            row["loadavg_1m"] = [min(loads), max(loads)] if loads else None
            rows.append(row)
    ratios = []
    for sut in sut_names:
        for shape in SHAPES:
            for metric, field in RATIO_METRICS:
                per_rep = []
                for rep in reps:
                    a, b = ok.get((sut, shape, rep)), ok.get((anchor_name, shape, rep))
                    if a and b and a.get(field) and b.get(field):
                        per_rep.append(round(a[field] / b[field], 3))
                if per_rep:
                    ratios.append(
                        {
                            "sut": sut,
                            "reference": anchor_name,
                            "shape": shape,
                            "metric": metric,
                            "per_rep": per_rep,
                            "median": _median(per_rep, 3),
                        }
                    )
    return {"throughput": rows, "ratios": ratios}


def _fmt(value):
    return "-" if value is None else f"{value:g}"


def render(result):
    cfg = result["config"]
    out = [f"# `slimta serve` to a smarthost, run {result['stamp']}", ""]
    out.append(f"Command: `{' '.join(result['argv'])}`")
    out.append(
        f"{cfg['messages']} messages of {cfg['size']} bytes per run after {cfg['warmup']} "
        f"untimed, {cfg['reps']} repetition(s), seed {cfg['seed']}; code: {result['code']}; "
        f"load average at start {' '.join(result['machine']['loadavg_start'])}, "
        f"at end {' '.join(result.get('loadavg_end') or ['?'])} "
        f"({result['machine']['nproc']} CPUs); queue on {result['spool_fs']}."
    )
    if cfg.get("py_spy"):
        out += ["", "**Profiled with py-spy: the serve figures are slowed, do not quote them.**"]
    out += [
        "",
        "| target | shape | ok runs | msg/s | e2e msg/s | CPU us/msg | peak RSS KiB | foreign CPU % | loadavg 1m (min-max) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["summary"]["throughput"]:
        load = r["loadavg_1m"]
        out.append(
            f"| {r['target']} | {r['shape']} | {r['ok_runs']} | {_fmt(r['msgs_per_s'])} | "
            f"{_fmt(r['e2e_msgs_per_s'])} | {_fmt(r['server_cpu_us_per_msg'])} | "
            f"{_fmt(r['server_peak_rss_kb'])} | {_fmt(r['foreign_cpu_pct'])} | "
            f"{'-' if not load else f'{load[0]:.2f}-{load[1]:.2f}'} |"
        )
    out += ["", "Same-run ratios (per repetition; median of those):", ""]
    out += ["| target / reference | shape | metric | median | per rep |", "|---|---|---|---:|---|"]
    for r in result["summary"]["ratios"]:
        each = ", ".join(f"{x:.2f}" for x in r["per_rep"])
        out.append(
            f"| {r['sut']} / {r['reference']} | {r['shape']} | {r['metric']} | {r['median']:.2f} | {each} |"
        )
    goal = [r for r in result["summary"]["ratios"] if r["metric"] == "e2e msg/s"]
    if goal:
        out += [""]
        for r in goal:
            verdict = "met" if r["median"] >= 1.0 else "NOT met"
            out.append(
                f"- goal e2e msg/s >= 1.0x, {r['sut']}, {r['shape']}: {verdict} "
                f"(median {r['median']:.2f}; {sum(x >= 1.0 for x in r['per_rep'])} of "
                f"{len(r['per_rep'])} repetitions at or above 1.0)"
            )
    profiles = [r for r in result["runs"] if r.get("py_spy")]
    for r in profiles:
        prof = r["py_spy"]
        how = "GIL holder only" if cfg.get("py_spy_gil") else "all non-idle threads"
        out += [
            "",
            f"### py-spy, rep {r['rep']} {r['target']} {r['shape']} "
            f"({prof['samples']} samples, {how})",
        ]
        out += ["", "| self % | frame |", "|---:|---|"]
        out += [f"| {pct} | `{frame}` |" for frame, pct in prof["self_pct"][:15]]
        out += ["", "| inclusive % | frame |", "|---:|---|"]
        out += [f"| {pct} | `{frame}` |" for frame, pct in prof["inclusive_pct"][:25]]
    bad = [r for r in result["runs"] if not r.get("ok")]
    if bad:
        out += ["", "## Anomalies", ""]
        out += [
            f"- rep {r['rep']} {r['target']} {r['shape']}: {'; '.join(r['problems'])}" for r in bad
        ]
    return "\n".join(out) + "\n"


def fs_type(path):
    """The filesystem type of *path* (from /proc/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                fields = line.split()
                if (
                    len(fields) > 2
                    and (path + "/").startswith(fields[1].rstrip("/") + "/")
                    and len(fields[1]) >= len(best)
                ):
                    best, kind = fields[1], fields[2]
    except OSError:
        pass
    return f"{kind} ({best or '?'})"


def code_version():
    def git(*args):
        res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return res.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "src")
    changed = len(dirty.splitlines()) if dirty else 0
    return f"{head}" + (f" + {changed} uncommitted file(s) under src/" if changed else "")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--slimta",
        default=str(REPO / ".venv" / "bin" / "slimta"),
        help="the slimta command under test (%(default)s)",
    )
    p.add_argument("--anchor-python", default=rb.DEFAULT_ANCHOR)
    p.add_argument(
        "--log-levels",
        default="info",
        help="serve targets, one per log level (comma-separated; info is the default "
        "configuration, e.g. info,warning adds a target without the mail log)",
    )
    p.add_argument(
        "--pipelines",
        default="",
        help="diagnostic targets: bench/mta_pipeline.py --relay smtp --policies headers in "
        "this checkout's venv, one per storage (comma-separated: dict, disk); the same "
        "library as serve without the command around it",
    )
    p.add_argument("--no-sink", action="store_true", help="leave out the smtp-sink reference")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument(
        "--relay-pool-size", type=int, default=20, help="the anchor's StaticSmtpRelay pool_size"
    )
    p.add_argument(
        "--relay-idle-timeout",
        type=float,
        default=10.0,
        help="the anchor's StaticSmtpRelay idle_timeout (serve's is 10 s)",
    )
    p.add_argument("--run-timeout", type=float, default=300.0)
    p.add_argument("--drain-timeout", type=float, default=180.0)
    p.add_argument("--max-server-life", type=float, default=900.0)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--py-spy",
        metavar="PATH",
        help="record serve with this py-spy binary during each measured load "
        "(the profile goes to results.md; the serve figures are then slowed)",
    )
    p.add_argument("--py-spy-rate", type=int, default=200, help="samples per second")
    p.add_argument(
        "--py-spy-gil",
        action="store_true",
        help="sample only the thread holding the GIL (where Python spends CPU), not "
        "every thread that is not idle (which counts the queue's fsync waits)",
    )
    p.add_argument("--quick", action="store_true", help="1 rep of 2000 messages: a smoke test")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.reps, cfg.messages, cfg.warmup = 1, 2000, 200
    if cfg.seed is None:
        cfg.seed = random.randrange(1 << 30)
    shapes = [s for s in cfg.shapes.split(",") if s]
    if not shapes or set(shapes) - set(SHAPES):
        p.error(f"--shapes: some of {', '.join(SHAPES)}")
    levels = [x for x in cfg.log_levels.split(",") if x]
    if not levels or set(levels) - {"debug", "info", "warning", "error"}:
        p.error("--log-levels: some of debug, info, warning, error")
    for tool in ("smtp-source", "smtp-sink"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: run bench/run.sh once (it installs postfix)")
    storages = [x for x in cfg.pipelines.split(",") if x]
    if set(storages) - {"dict", "disk"}:
        p.error("--pipelines: some of dict, disk")
    sut_python = str(Path(cfg.slimta).parent / "python")
    for program in (cfg.slimta, cfg.anchor_python, cfg.py_spy, storages and sut_python):
        if program and not os.access(program, os.X_OK):
            raise SystemExit(f"{program} not found (bench/run.sh builds the anchor venv)")

    anchor = Target("python-slimta-5.0.5:relay-headers", "anchor", cfg.anchor_python)
    suts = [
        Target(
            "slimta-serve" if level == "info" else f"slimta-serve:log-{level}",
            "sut",
            cfg.slimta,
            log_level=level,
        )
        for level in levels
    ]
    suts += [
        Target(f"slimta-rewrite:relay-headers-{kind}", "pipeline", sut_python, storage=kind)
        for kind in storages
    ]
    targets = ([] if cfg.no_sink else [Target("smtp-sink", "sink")]) + [anchor, *suts]

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    outdir = HERE / "bench-results" / f"serve-{stamp}"
    outdir.mkdir(parents=True)
    result = {
        "stamp": stamp,
        "argv": ["python3", "bench/serve_bench.py", *(sys.argv[1:] if argv is None else argv)],
        "config": vars(cfg),
        "code": code_version(),
        "config_template": CONFIG_TEMPLATE,
        "spool_fs": fs_type(tempfile.gettempdir()),
        "targets": [t.as_dict() for t in targets],
        "machine": rb.machine_meta(),
        "runs": [],
        "order": [],
    }

    def save():
        result["summary"] = summarize(result["runs"], targets, [t.name for t in suts], anchor.name)
        (outdir / "results.json").write_text(
            json.dumps(result, indent=1, sort_keys=True, default=str)
        )
        (outdir / "results.md").write_text(render(result))

    print(f"results in {outdir}", flush=True)
    print(f"load average at start: {' '.join(result['machine']['loadavg_start'])}", flush=True)
    for rep in range(1, cfg.reps + 1):
        plan = [(t, s) for t in targets for s in shapes]
        random.Random(cfg.seed + rep).shuffle(plan)
        result["order"].append([f"{t.name}/{s}" for t, s in plan])
        for target, shape in plan:
            record = measure(target, shape, rep, cfg, outdir)
            result["runs"].append(record)
            print(
                f"rep {rep} {target.name:34} {shape:8} {record.get('msgs_per_s')!s:>8} msg/s "
                f"e2e {record.get('e2e_msgs_per_s')!s:>8} msg/s "
                f"cpu {record.get('server_cpu_us_per_msg')!s:>7} us/msg "
                f"load {(record.get('loadavg_before') or ['?'])[0]} "
                + ("ok" if record["ok"] else "PROBLEMS: " + "; ".join(record["problems"])),
                flush=True,
            )
            save()
    result["loadavg_end"] = rb.loadavg()
    save()
    print(render(result))
    return 0 if all(r["ok"] for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
