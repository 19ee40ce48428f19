#!/usr/bin/env python
"""Messages per second from ``HttpRelay`` to ``WsgiEdge``, ours against python-slimta's.

Each system runs as two processes of the interpreter that has it installed:

* the edge: ``WsgiEdge(queue)`` served by ``edge.build_server(listener)``
  (the 4.0 way, which both have), its queue-like object accepting every
  message at once;
* the relay: ``HttpRelay("http://127.0.0.1:PORT/", pool_size=N,
  idle_timeout=T)`` delivering ``--messages`` 1 KiB messages, ``N`` at a
  time, after a warm-up of 200. The default ``T`` is ``None``, one
  connection per message: python-slimta 5.0.5's relay fails with
  ``http.client.ResponseNotReady`` on reused connections under concurrent
  load, so only that shape compares the two; ``--idle-timeout 10`` measures
  ours with keep-alive.

It prints msg/s of the relay and the CPU time per message of both processes.
``--compare`` runs ours (this interpreter) and the anchor (``--anchor``,
default python-slimta 5.0.5's venv made by ``../shared/bench``) alternately,
``--reps`` times each, and prints the ratio of the medians::

    .venv/bin/python bench/http_pair.py --compare --reps 5

Both edges are served by the same ``gevent.pywsgi`` server and both relays
use ``http.client`` on gevent sockets, so the difference is the slimta code
on each side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

WARM_UP = 200
ANCHOR = Path.home() / ".cache" / "slimta-bench" / "anchor-venv" / "bin" / "python"
BODY = b"From: <bench@example.com>\r\nSubject: bench\r\n\r\n" + b"x" * 974 + b"\r\n"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve(port: int) -> None:
    """The edge process: prints ``READY``, then the message count and CPU at EOF on stdin."""
    from gevent import monkey

    monkey.patch_all()
    import gevent

    from slimta.edge.wsgi import WsgiEdge

    class Queue:
        count = 0

        def enqueue(self, envelope: object) -> list[tuple[object, str]]:
            Queue.count += 1
            return [(envelope, "id")]

    edge = WsgiEdge(Queue())
    server = edge.build_server(("127.0.0.1", port))
    server.start()
    print("READY", flush=True)
    cpu = _cpu()
    gevent.get_hub().threadpool.spawn(sys.stdin.read).get()
    print(json.dumps({"count": Queue.count, "cpu": _cpu() - cpu}), flush=True)


def drive(port: int, messages: int, pool_size: int, idle_timeout: float | None) -> None:
    """The relay process: prints a JSON line with the timings."""
    from gevent import monkey

    monkey.patch_all()
    import gevent.pool

    from slimta.envelope import Envelope
    from slimta.relay.http import HttpRelay

    url = f"http://127.0.0.1:{port}/"
    relay = HttpRelay(url, pool_size=pool_size, idle_timeout=idle_timeout)

    def one(n: int) -> None:
        envelope = Envelope("bench@example.com", [f"rcpt{n}@example.org"])
        envelope.parse(BODY)
        relay.attempt(envelope, 0)

    def run(count: int) -> None:
        pool = gevent.pool.Pool(pool_size)
        for n in range(count):
            pool.spawn(one, n)
        pool.join(raise_error=True)

    run(WARM_UP)
    cpu, start = _cpu(), time.perf_counter()
    run(messages)
    elapsed = time.perf_counter() - start
    print(json.dumps({"seconds": elapsed, "cpu": _cpu() - cpu}), flush=True)
    relay.kill()


def measure(
    python: str, messages: int, pool_size: int, idle_timeout: float | None
) -> dict[str, float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    me = os.path.abspath(__file__)
    edge = subprocess.Popen(
        [python, me, "--serve", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert edge.stdout is not None and edge.stdin is not None
    assert edge.stdout.readline().strip() == b"READY"
    # python-slimta's edge writes an access-log line per request to stdout:
    # drain it all the time, keeping the last line (the counts).
    lines: list[bytes] = []
    drain = threading.Thread(target=lambda: lines.extend(edge.stdout), daemon=True)  # type: ignore[arg-type]
    drain.start()
    drive_args = [python, me, "--drive", str(port), "--messages", str(messages)]
    if idle_timeout is not None:
        drive_args += ["--idle-timeout", str(idle_timeout)]
    out = subprocess.run(
        [*drive_args, "--pool-size", str(pool_size)],
        check=True,
        capture_output=True,
        env=env,
    ).stdout
    relay = json.loads(out.splitlines()[-1])
    edge.stdin.close()
    edge.wait()
    drain.join()
    served = json.loads(lines[-1])
    assert served["count"] == messages + WARM_UP, served
    return {
        "msg_per_s": messages / relay["seconds"],
        "relay_cpu_us": relay["cpu"] / messages * 1e6,
        "edge_cpu_us": served["cpu"] / (messages + WARM_UP) * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--drive", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="keep connections alive this long (default: one connection per message)",
    )
    parser.add_argument("--compare", action="store_true", help="ours against --anchor")
    parser.add_argument(
        "--keep-alive-too",
        action="store_true",
        help="also ours with --idle-timeout 10 (python-slimta's keep-alive fails under load)",
    )
    parser.add_argument("--anchor", default=str(ANCHOR), help="python-slimta's interpreter")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if args.drive:
        drive(args.drive, args.messages, args.pool_size, args.idle_timeout)
        return 0
    # name -> (interpreter, idle_timeout)
    systems = {"slimta": (sys.executable, args.idle_timeout)}
    if args.keep_alive_too:
        systems["slimta keep-alive"] = (sys.executable, 10.0)
    if args.compare:
        systems["python-slimta-5.0.5"] = (args.anchor, args.idle_timeout)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for rep in range(args.reps):
        for name, (python, idle_timeout) in systems.items():
            result = measure(python, args.messages, args.pool_size, idle_timeout)
            results[name].append(result)
            print(
                f"rep {rep + 1} {name}: " + json.dumps({k: round(v, 1) for k, v in result.items()})
            )
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    for name, median in medians.items():
        print(f"median {name}: " + json.dumps({k: round(v, 1) for k, v in median.items()}))
    if args.compare:
        theirs = medians["python-slimta-5.0.5"]["msg_per_s"]
        for name in systems:
            if name != "python-slimta-5.0.5":
                ratio = medians[name]["msg_per_s"] / theirs
                print(f"ratio msg/s ({name} / python-slimta): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
