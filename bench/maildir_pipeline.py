#!/usr/bin/env python3
"""Local delivery benchmark: SMTP in, durable queue, delivery to disk.

Drives Postfix's smtp-source against, in one interleaved run:

  smtp-sink                      the C sink: what one SMTP exchange costs here
  python-slimta-5.0.5:pipe-cat   maildir_mta_anchor.py in the anchor venv:
                                 SmtpEdge -> Queue(DictStorage) -> PipeRelay
                                 running `sh -c 'exec cat > DIR/N'` per message
  slimta-rewrite:maildir         maildir_mta.py in this checkout's venv:
                                 SmtpEdge -> Queue(DiskStorage) -> MaildirRelay
  slimta-rewrite:maildir-threads (--threadpool-variant) the same, but each
                                 attempt runs in gevent's threadpool

with both load shapes of the shared harness (conn: one message per
connection; session: 20 long sessions), every target and shape in a shuffled
order in every repetition. It reuses the harness's process, load and CPU
helpers (run_bench.py from $SHARED_BENCH, <repo>/../shared/bench or
bench/harness/) and measures like its relay mode:

  msg/s       messages / wall time of the measured smtp-source (acceptance)
  e2e msg/s   messages / (load start -> the last message removed from the
              queue after delivery): the figure to quote for delivery
  CPU us/msg  utime+stime of the server over load and drain, per message,
              including its reaped children (the anchor's sh/cat processes)

Checks per run (a failed check lists the run under "Anomalies"): smtp-source
exit status, every message delivered and removed from the queue, the queue
empty, no bounce, and as many files on disk as messages (Maildir: in new/,
with tmp/ empty). Everything written goes to a temp dir under /tmp, removed
after each run, and to bench/bench-results/maildir-<UTC stamp>/.

    bench/run.sh --quick --modes edge-only   # once: tools and the anchor venv
    python3 bench/maildir_pipeline.py --reps 3
    python3 bench/maildir_pipeline.py --quick     # smoke test, not for quoting
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the shared harness may be read-only

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SUT_SCRIPT = HERE / "maildir_mta.py"
ANCHOR_SCRIPT = HERE / "maildir_mta_anchor.py"
SHAPES = ("conn", "session")


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
    def __init__(self, name, kind, python=None, script=None, extra=()):
        self.name = name
        self.kind = kind  # 'sink' | 'anchor' | 'sut'
        self.python = python
        self.script = script
        self.extra = list(extra)

    def as_dict(self):
        return {"name": self.name, "kind": self.kind, "python": self.python, "extra": self.extra}


def proc_cpu_with_children_s(pid):
    """utime+stime+cutime+cstime of a process (seconds), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / rb.CLK_TCK


def count_delivered_files(target, mail_dir):
    """(files delivered, files left in tmp/)."""
    if target.kind == "anchor":
        return len(os.listdir(mail_dir)), 0
    box = Path(mail_dir) / "sink"
    new = len(os.listdir(box / "new")) if (box / "new").is_dir() else 0
    tmp = len(os.listdir(box / "tmp")) if (box / "tmp").is_dir() else 0
    return new, tmp


def wait_delivered(server, expected, timeout):
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        stats = server.stats() or {}
        got = stats.get("delivered")
        if got is not None and got >= expected:
            return got, time.perf_counter()
        time.sleep(0.02)
    return got, None


def start_server(target, cfg, logdir, stats_file, scratch):
    port = rb.free_port()
    mail_dir = os.path.join(scratch, "mail")
    os.mkdir(mail_dir)
    cmd = [target.python, target.script, "--port", port, "--mail-dir", mail_dir]
    cmd += ["--stats-file", stats_file, "--max-lifetime", cfg.max_server_life]
    cmd += ["--relay-pool-size", cfg.relay_pool_size]
    if target.kind == "sut":
        spool = os.path.join(scratch, "spool")
        os.mkdir(spool)
        cmd += ["--spool-dir", spool]
    cmd += target.extra
    server = rb.Server("server", cmd, logdir, stats_file=stats_file)
    server.port = port
    return server, mail_dir


def measure(target, shape, rep, cfg, outdir):
    tag = f"r{rep}-{target.name.replace(':', '_')}-{shape}"
    logdir = outdir / "logs" / tag
    logdir.mkdir(parents=True, exist_ok=True)
    record = {"target": target.name, "shape": shape, "rep": rep, "messages": cfg.messages}
    record.update(size=cfg.size, warmup=cfg.warmup, problems=[], logdir=str(logdir))
    problems = record["problems"]
    if target.kind == "sink":
        return measure_sink(target, shape, record, cfg, logdir)
    scratch = tempfile.mkdtemp(prefix="slimta-maildir-bench-")
    server = None
    try:
        server, mail_dir = start_server(target, cfg, logdir, str(logdir / "stats.json"), scratch)
        record["server_cmd"] = " ".join(server.cmd)
        if not server.wait_ready():
            problems.append("server did not become ready")
            return record
        warm = rb.smtp_source(
            server.port, shape, cfg.warmup, 5, cfg.size, logdir, "warmup", cfg.run_timeout
        )
        if warm["rc"] != 0:
            problems.append(f"warm-up smtp-source rc={warm['rc']}")
        got, _ = wait_delivered(server, cfg.warmup, cfg.drain_timeout)
        if got != cfg.warmup:
            problems.append(f"warm-up: {got} of {cfg.warmup} delivered")
        cpu0 = proc_cpu_with_children_s(server.pid)
        own0 = rb.proc_cpu_s(server.pid)
        host0 = rb.host_cpu()
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
        record["smtp_source"] = src
        if src["timed_out"] or src["rc"] != 0:
            problems.append(f"smtp-source rc={src['rc']} timed_out={src['timed_out']}")
        record["msgs_per_s"] = round(cfg.messages / src["wall_s"], 1)
        expected = cfg.warmup + cfg.messages
        got, t_done = wait_delivered(server, expected, cfg.drain_timeout)
        record["delivered"] = got
        if got != expected or t_done is None:
            problems.append(f"delivered {got} of {expected} (incl. warm-up)")
        else:
            record["e2e_s"] = round(t_done - t_start, 4)
            record["e2e_msgs_per_s"] = round(cfg.messages / (t_done - t_start), 1)
        cpu1 = proc_cpu_with_children_s(server.pid)
        own1 = rb.proc_cpu_s(server.pid)
        host1 = rb.host_cpu()
        t_end = time.perf_counter()
        if None not in (cpu0, cpu1, own0, own1):
            record["server_cpu_us_per_msg"] = round(1e6 * (cpu1 - cpu0) / cfg.messages, 1)
            record["server_own_cpu_us_per_msg"] = round(1e6 * (own1 - own0) / cfg.messages, 1)
            busy = (
                (host1["total"] - host0["total"]) - (host1["idle"] - host0["idle"])
            ) / rb.CLK_TCK
            ncpu = len(os.sched_getaffinity(0)) or 1
            foreign = max(0.0, busy - (cpu1 - cpu0) - src["cpu_s"])
            record["foreign_cpu_pct"] = round(100.0 * foreign / (ncpu * (t_end - t_start)), 1)
        stats = server.stats() or {}
        if stats.get("queue_size"):
            problems.append(f"{stats['queue_size']} messages left in the queue")
        files, left = count_delivered_files(target, mail_dir)
        record["files"], record["tmp_files_left"] = files, left
        if files != expected or left:
            problems.append(f"{files} files delivered for {expected} messages, {left} in tmp/")
    except Exception as exc:  # one broken run is data too
        problems.append(f"driver error: {exc!r}")
    finally:
        final = server.stop() if server else None
        if final and final.get("bounced"):
            problems.append(f"{final['bounced']} bounced: {final.get('failures')}")
        if server and server.exit_problem():
            problems.append(server.exit_problem())
        if problems and server:
            record["server_stderr"] = server.stderr_tail()
        shutil.rmtree(scratch, ignore_errors=True)
    record["ok"] = not problems
    return record


def measure_sink(target, shape, record, cfg, logdir):
    port = rb.free_port()
    sink = rb.Sink("server", port, logdir, cfg.max_server_life)
    try:
        if not sink.wait_ready():
            record["problems"].append("smtp-sink did not start")
        else:
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
            if src["rc"] != 0:
                record["problems"].append(f"smtp-source rc={src['rc']}")
            record["msgs_per_s"] = round(cfg.messages / src["wall_s"], 1)
    finally:
        sink.stop()
    record["ok"] = not record["problems"]
    return record


def _median(values, digits=1):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


METRICS = (
    ("msg/s", "msgs_per_s"),
    ("e2e msg/s", "e2e_msgs_per_s"),
    ("CPU us/msg", "server_cpu_us_per_msg"),
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
            for _, field in (
                *METRICS,
                ("own CPU", "server_own_cpu_us_per_msg"),
                ("foreign", "foreign_cpu_pct"),
            ):
                row[field] = _median([r.get(field) for r in good])
            rows.append(row)
    ratios = []
    for sut in sut_names:
        for shape in SHAPES:
            for metric, field in METRICS:
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
                            "median": _median(per_rep, 2),
                        }
                    )
    return {"throughput": rows, "ratios": ratios}


def render(result):
    out = [f"# Local delivery benchmark, run {result['stamp']}", ""]
    out.append(f"Command: `{' '.join(result['argv'])}`")
    cfg = result["config"]
    out.append(
        f"{cfg['messages']} messages of {cfg['size']} bytes per run after {cfg['warmup']} "
        f"untimed, {cfg['reps']} repetitions, seed {cfg['seed']}."
    )
    out += [
        "",
        "| target | shape | ok runs | msg/s | e2e msg/s | CPU us/msg (with children) | own CPU us/msg | foreign CPU % |",
    ]
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in result["summary"]["throughput"]:
        out.append(
            f"| {r['target']} | {r['shape']} | {r['ok_runs']} | {r['msgs_per_s']} | "
            f"{r['e2e_msgs_per_s'] or '-'} | {r['server_cpu_us_per_msg'] or '-'} | "
            f"{r['server_own_cpu_us_per_msg'] or '-'} | {r['foreign_cpu_pct'] if r['foreign_cpu_pct'] is not None else '-'} |"
        )
    out += ["", "Same-run ratios (per repetition; median):", ""]
    out += ["| target / reference | shape | metric | median | per rep |", "|---|---|---|---:|---|"]
    for r in result["summary"]["ratios"]:
        each = ", ".join(f"{x:.2f}" for x in r["per_rep"])
        out.append(
            f"| {r['sut']} / {r['reference']} | {r['shape']} | {r['metric']} | {r['median']:.2f} | {each} |"
        )
    bad = [r for r in result["runs"] if not r.get("ok")]
    if bad:
        out += ["", "## Anomalies", ""]
        out += [
            f"- rep {r['rep']} {r['target']} {r['shape']}: {'; '.join(r['problems'])}" for r in bad
        ]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sut-python", default=str(REPO / ".venv" / "bin" / "python"))
    p.add_argument("--anchor-python", default=rb.DEFAULT_ANCHOR)
    p.add_argument(
        "--threadpool-variant",
        action="store_true",
        help="also run MaildirRelay attempts in gevent's threadpool",
    )
    p.add_argument("--no-sink", action="store_true", help="leave out the smtp-sink reference")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--relay-pool-size", type=int, default=20)
    p.add_argument("--run-timeout", type=float, default=300.0)
    p.add_argument("--drain-timeout", type=float, default=180.0)
    p.add_argument("--max-server-life", type=float, default=900.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--quick", action="store_true", help="1 rep of 1000 messages: a smoke test")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.reps, cfg.messages, cfg.warmup = 1, 1000, 100
    if cfg.seed is None:
        cfg.seed = random.randrange(1 << 30)
    shapes = [s for s in cfg.shapes.split(",") if s]
    for tool in ("smtp-source", "smtp-sink"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: run bench/run.sh once (it installs postfix)")
    for python in (cfg.sut_python, cfg.anchor_python):
        if not os.access(python, os.X_OK):
            raise SystemExit(
                f"{python} not found: run bench/run.sh once (it builds the anchor venv)"
            )

    anchor = Target("python-slimta-5.0.5:pipe-cat", "anchor", cfg.anchor_python, ANCHOR_SCRIPT)
    suts = [Target("slimta-rewrite:maildir", "sut", cfg.sut_python, SUT_SCRIPT)]
    if cfg.threadpool_variant:
        suts.append(
            Target(
                "slimta-rewrite:maildir-threads",
                "sut",
                cfg.sut_python,
                SUT_SCRIPT,
                ["--threadpool"],
            )
        )
    targets = ([] if cfg.no_sink else [Target("smtp-sink", "sink")]) + [anchor, *suts]

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    outdir = HERE / "bench-results" / f"maildir-{stamp}"
    outdir.mkdir(parents=True)
    result = {
        "stamp": stamp,
        "argv": ["python3", "bench/maildir_pipeline.py", *(argv or sys.argv[1:])],
        "config": vars(cfg),
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
    for rep in range(1, cfg.reps + 1):
        plan = [(t, s) for t in targets for s in shapes]
        random.Random(cfg.seed + rep).shuffle(plan)
        result["order"].append([f"{t.name}/{s}" for t, s in plan])
        for target, shape in plan:
            record = measure(target, shape, rep, cfg, outdir)
            result["runs"].append(record)
            print(
                f"rep {rep} {target.name:32} {shape:8} {record.get('msgs_per_s')!s:>8} msg/s "
                f"e2e {record.get('e2e_msgs_per_s')!s:>8} msg/s cpu {record.get('server_cpu_us_per_msg')!s:>8} us/msg "
                + ("ok" if record["ok"] else "PROBLEMS: " + "; ".join(record["problems"])),
                flush=True,
            )
            save()
    save()
    print(render(result))
    return 0 if all(r["ok"] for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
