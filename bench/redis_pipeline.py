#!/usr/bin/env python3
"""Queue storage benchmark: SMTP in, Redis (or disk) queue, blackhole relay.

Drives Postfix's smtp-source against, in one interleaved run:

  slimta-rewrite:redis          this checkout: SmtpEdge -> Queue(RedisStorage)
                                -> counting BlackholeRelay
  slimta-rewrite:disk           the same on DiskStorage (fsync on)
  python-slimta-5.0.5:redis     the anchor venv's own slimta.redisstorage
                                (needs `pip install redis` in the anchor venv)

with both load shapes of the shared harness (conn: one message per
connection; session: 20 long sessions), every target and shape in a shuffled
order in every repetition. Each Redis run gets a fresh redis-server on a free
port with its data in a temporary directory, configured by --appendfsync:
"always" (the default: an acknowledged message survives a crash of Redis and
of the machine, the setting RedisStorage documents), "everysec", or "no" (no
append-only file at all).

Metrics, as in the harness's relay mode:

  msg/s         messages / wall time of the measured smtp-source
  e2e msg/s     messages / (load start -> the last message delivered)
  CPU us/msg    utime+stime of the MTA process over load and drain, per message
  redis us/msg  the same for redis-server (its share of the work)

Checks per run (a failed check lists the run under "Anomalies"): smtp-source
exit status, every message delivered, the queue empty afterwards, nothing
bounced. Results go to bench/bench-results/redis-<UTC stamp>/.

    bench/run.sh --quick --modes edge-only   # once: tools and the anchor venv
    python3 bench/redis_pipeline.py --reps 3
    python3 bench/redis_pipeline.py --quick     # smoke test, not for quoting

The MTA side is this same file run as `redis_pipeline.py serve ...` by each
target's interpreter; it speaks the harness's server protocol ("PID n",
"READY host port", stats JSON on SIGUSR1/SIGTERM).
"""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "serve":
    from gevent import monkey

    monkey.patch_all()

sys.dont_write_bytecode = True  # the shared harness may be read-only

import argparse
import datetime
import json
import os
import random
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
SHAPES = ("conn", "session")
EDGE_HOSTNAME = "bench.localhost"


# --- the MTA (serve mode) ------------------------------------------------------------


def serve(argv):
    import gevent

    p = argparse.ArgumentParser(prog="redis_pipeline.py serve")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--storage", choices=("redis", "disk"), required=True)
    p.add_argument("--redis-port", type=int)
    p.add_argument("--spool-dir")
    p.add_argument("--stats-file", required=True)
    p.add_argument("--max-lifetime", type=float, default=900.0)
    args = p.parse_args(argv)
    print(f"PID {os.getpid()}", flush=True)

    from slimta.edge.smtp import SmtpEdge
    from slimta.queue import Queue
    from slimta.relay.blackhole import BlackholeRelay

    class CountingRelay(BlackholeRelay):
        delivered = 0

        def attempt(self, envelope, attempts):
            CountingRelay.delivered += 1
            return super().attempt(envelope, attempts)

    bounced = []

    def bounce_factory(envelope, reply):
        bounced.append(str(reply))
        return None

    if args.storage == "redis":
        from slimta.redisstorage import RedisStorage

        storage = RedisStorage("127.0.0.1", args.redis_port, socket_timeout=10)
    else:
        from slimta.diskstorage import DiskStorage

        storage = DiskStorage(
            os.path.join(args.spool_dir, "env"), os.path.join(args.spool_dir, "meta")
        )
    relay = CountingRelay()
    queue = Queue(storage, relay, bounce_factory=bounce_factory)
    queue.start()
    edge = SmtpEdge(("127.0.0.1", args.port), queue, hostname=EDGE_HOSTNAME)
    edge.start()

    def write_stats():
        out = {"pid": os.getpid(), "delivered": CountingRelay.delivered, "bounced": len(bounced)}
        out["failures"] = bounced[:5]
        try:
            out["queue_size"] = storage.get_info().get("size")
        except Exception as exc:
            out["queue_size_error"] = repr(exc)
        partial = args.stats_file + ".tmp"
        with open(partial, "w") as fh:
            json.dump(out, fh)
        os.replace(partial, args.stats_file)

    def finish():
        try:
            write_stats()
        finally:
            sys.stdout.flush()
            os._exit(0)

    gevent.signal_handler(signal.SIGUSR1, write_stats)
    gevent.signal_handler(signal.SIGTERM, finish)
    gevent.spawn_later(args.max_lifetime, finish)
    print(f"READY 127.0.0.1 {args.port}", flush=True)
    edge.join()
    return 3


# --- the driver ---------------------------------------------------------------------------


def _import_harness():
    for candidate in (
        os.environ.get("SHARED_BENCH"),
        REPO.parent / "shared" / "bench",
        HERE / "harness",
    ):
        if candidate and (Path(candidate) / "run_bench.py").is_file():
            sys.path.insert(0, str(candidate))
            import run_bench

            return run_bench
    raise SystemExit("run_bench.py not found: set SHARED_BENCH")


class Target:
    def __init__(self, name, python, storage):
        self.name = name
        self.python = python
        self.storage = storage


class RedisProcess:
    """A throw-away redis-server on a free port, data in *workdir*."""

    def __init__(self, workdir, appendfsync, logdir):
        self.port = _free_port()
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--dir", str(workdir), "--daemonize", "no"]
        if appendfsync == "no":
            cmd += ["--appendonly", "no"]
        else:
            cmd += ["--appendonly", "yes", "--appendfsync", appendfsync]
        cmd += ["--logfile", str(logdir / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def wait_ready(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)  # a foreign process starting: poll with a deadline
        return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_delivered(server, expected, timeout):
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        stats = server.stats() or {}
        got = stats.get("delivered")
        if got is not None and got >= expected:
            return got, time.perf_counter()
        time.sleep(0.02)  # the server's progress, polled with a deadline
    return got, None


def measure(rb, target, shape, rep, cfg, outdir):
    tag = f"r{rep}-{target.name.replace(':', '_')}-{shape}"
    logdir = outdir / "logs" / tag
    logdir.mkdir(parents=True, exist_ok=True)
    record = {"target": target.name, "shape": shape, "rep": rep, "messages": cfg.messages}
    record["problems"] = problems = []
    scratch = tempfile.mkdtemp(prefix="slimta-redis-bench-")
    server = redis = None
    try:
        cmd = [target.python, str(Path(__file__).resolve()), "serve", "--storage", target.storage]
        port = rb.free_port()
        cmd += ["--port", port, "--stats-file", logdir / "stats.json"]
        cmd += ["--max-lifetime", cfg.max_server_life]
        if target.storage == "redis":
            redis = RedisProcess(scratch, cfg.appendfsync, logdir)
            if not redis.wait_ready():
                problems.append("redis-server did not start")
                return record
            cmd += ["--redis-port", redis.port]
        else:
            cmd += ["--spool-dir", scratch]
        server = rb.Server("server", cmd, logdir, stats_file=str(logdir / "stats.json"))
        record["server_cmd"] = " ".join(server.cmd)
        if not server.wait_ready():
            problems.append("server did not become ready")
            return record
        warm = rb.smtp_source(port, shape, cfg.warmup, 5, cfg.size, logdir, "warmup", 120)
        if warm["rc"] != 0:
            problems.append(f"warm-up smtp-source rc={warm['rc']}")
        got, _ = wait_delivered(server, cfg.warmup, cfg.drain_timeout)
        if got is None or got < cfg.warmup:
            problems.append(f"warm-up: {got} of {cfg.warmup} delivered")
        cpu0 = rb.proc_cpu_s(server.pid)
        rcpu0 = rb.proc_cpu_s(redis.pid) if redis else None
        t_start = time.perf_counter()
        src = rb.smtp_source(
            port, shape, cfg.messages, cfg.sessions, cfg.size, logdir, "measured", cfg.run_timeout
        )
        record["smtp_source"] = src
        if src["timed_out"] or src["rc"] != 0:
            problems.append(f"smtp-source rc={src['rc']} timed_out={src['timed_out']}")
        record["msgs_per_s"] = round(cfg.messages / src["wall_s"], 1)
        expected = cfg.warmup + cfg.messages
        got, t_done = wait_delivered(server, expected, cfg.drain_timeout)
        record["delivered"] = got
        if got is None or got < expected or t_done is None:
            problems.append(f"delivered {got} of {expected} (incl. warm-up)")
        else:
            record["e2e_msgs_per_s"] = round(cfg.messages / (t_done - t_start), 1)
        cpu1 = rb.proc_cpu_s(server.pid)
        if None not in (cpu0, cpu1):
            record["server_cpu_us_per_msg"] = round(1e6 * (cpu1 - cpu0) / cfg.messages, 1)
        if redis:
            rcpu1 = rb.proc_cpu_s(redis.pid)
            if None not in (rcpu0, rcpu1):
                record["redis_cpu_us_per_msg"] = round(1e6 * (rcpu1 - rcpu0) / cfg.messages, 1)
        # The removal follows the delivery: poll until the queue is empty.
        deadline = time.monotonic() + 10
        stats = server.stats() or {}
        while stats.get("queue_size") and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = server.stats() or {}
        if stats.get("queue_size"):
            problems.append(f"{stats['queue_size']} messages left in the queue")
        # Deliveries beyond one per message: duplicates. python-slimta 5.0.5's
        # RedisStorage makes some even in one process (its wait() hands the
        # queue the ids the queue itself just wrote), so they are counted,
        # not treated as a failed run; its e2e figure then counts them too.
        record["extra_deliveries"] = (stats.get("delivered") or 0) - expected
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
        if redis:
            redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    record["ok"] = not problems
    return record


def _median(values, digits=1):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


METRICS = (
    ("msg/s", "msgs_per_s"),
    ("e2e msg/s", "e2e_msgs_per_s"),
    ("CPU us/msg", "server_cpu_us_per_msg"),
)


def summarize(runs, targets, pairs):
    ok = {(r["target"], r["shape"], r["rep"]): r for r in runs if r.get("ok")}
    reps = sorted({r["rep"] for r in runs})
    rows = []
    for target in targets:
        for shape in SHAPES:
            good = [r for (t, s, _), r in sorted(ok.items()) if t == target.name and s == shape]
            if good:
                row = {"target": target.name, "shape": shape, "ok_runs": len(good)}
                fields = ("msgs_per_s", "e2e_msgs_per_s", "server_cpu_us_per_msg")
                fields += ("redis_cpu_us_per_msg", "extra_deliveries")
                for field in fields:
                    row[field] = _median([r.get(field) for r in good])
                rows.append(row)
    ratios = []
    for sut, ref in pairs:
        for shape in SHAPES:
            for metric, field in METRICS:
                per_rep = []
                for rep in reps:
                    a, b = ok.get((sut, shape, rep)), ok.get((ref, shape, rep))
                    if a and b and a.get(field) and b.get(field):
                        per_rep.append(round(a[field] / b[field], 3))
                if per_rep:
                    ratios.append(
                        {"sut": sut, "reference": ref, "shape": shape, "metric": metric,
                         "per_rep": per_rep, "median": _median(per_rep, 2)}
                    )  # fmt: skip
    return {"throughput": rows, "ratios": ratios}


def render(result):
    cfg = result["config"]
    out = [f"# Redis queue storage benchmark, run {result['stamp']}", ""]
    out.append(f"Command: `{' '.join(result['argv'])}`")
    out.append(
        f"{cfg['messages']} messages of {cfg['size']} bytes per run after {cfg['warmup']} "
        f"untimed, {cfg['reps']} repetitions, seed {cfg['seed']}, redis-server "
        f"appendfsync={cfg['appendfsync']}."
    )
    out += [
        "",
        "| target | shape | ok runs | msg/s | e2e msg/s | MTA CPU us/msg | redis CPU us/msg | duplicates |",
    ]
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in result["summary"]["throughput"]:
        out.append(
            f"| {r['target']} | {r['shape']} | {r['ok_runs']} | {r['msgs_per_s']} | "
            f"{r['e2e_msgs_per_s'] or '-'} | {r['server_cpu_us_per_msg'] or '-'} | "
            f"{r['redis_cpu_us_per_msg'] or '-'} | {r['extra_deliveries']} |"
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
    rb = _import_harness()
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sut-python", default=str(REPO / ".venv" / "bin" / "python"))
    p.add_argument("--anchor-python", default=rb.DEFAULT_ANCHOR, help="'' to leave it out")
    p.add_argument("--no-disk", action="store_true", help="leave out the DiskStorage target")
    p.add_argument("--appendfsync", choices=("always", "everysec", "no"), default="always")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=1024)
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
    for tool in ("smtp-source", "redis-server"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (bench/run.sh installs postfix; apt redis-server)")

    ours = Target("slimta-rewrite:redis", cfg.sut_python, "redis")
    targets = [ours]
    pairs = []
    if not cfg.no_disk:
        targets.append(Target("slimta-rewrite:disk", cfg.sut_python, "disk"))
        pairs.append((ours.name, "slimta-rewrite:disk"))
    if cfg.anchor_python:
        check = subprocess.run(
            [cfg.anchor_python, "-c", "import redis, slimta.redisstorage"], capture_output=True
        )
        if check.returncode != 0:
            raise SystemExit(
                f"{cfg.anchor_python} cannot import slimta.redisstorage: "
                f"{cfg.anchor_python} -m pip install redis"
            )
        targets.append(Target("python-slimta-5.0.5:redis", cfg.anchor_python, "redis"))
        pairs.insert(0, (ours.name, "python-slimta-5.0.5:redis"))

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    outdir = HERE / "bench-results" / f"redis-{stamp}"
    outdir.mkdir(parents=True)
    result = {
        "stamp": stamp,
        "argv": ["python3", "bench/redis_pipeline.py", *(argv or sys.argv[1:])],
        "config": vars(cfg),
        "machine": rb.machine_meta(),
        "runs": [],
    }

    def save():
        result["summary"] = summarize(result["runs"], targets, pairs)
        (outdir / "results.json").write_text(json.dumps(result, indent=1, default=str))
        (outdir / "results.md").write_text(render(result))

    print(f"results in {outdir}", flush=True)
    for rep in range(1, cfg.reps + 1):
        plan = [(t, s) for t in targets for s in shapes]
        random.Random(cfg.seed + rep).shuffle(plan)
        for target, shape in plan:
            record = measure(rb, target, shape, rep, cfg, outdir)
            result["runs"].append(record)
            print(
                f"rep {rep} {target.name:28} {shape:8} {record.get('msgs_per_s')!s:>8} msg/s "
                f"e2e {record.get('e2e_msgs_per_s')!s:>8} cpu {record.get('server_cpu_us_per_msg')!s:>7} "
                f"redis {record.get('redis_cpu_us_per_msg')!s:>7} us/msg "
                + ("ok" if record["ok"] else "PROBLEMS: " + "; ".join(record["problems"])),
                flush=True,
            )
            save()
    print(render(result))
    return 0 if all(r["ok"] for r in result["runs"]) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.exit(serve(sys.argv[2:]))
    sys.exit(main())
