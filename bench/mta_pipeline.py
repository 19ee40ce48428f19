#!/usr/bin/env python
"""Benchmark MTA for the shared harness, built from the public slimta API only.

This is the project's drop-in replacement for the harness's own
``mta_pipeline.py`` (bench/run.sh copies it over the harness copy). The
command line, the stdout lines, the signals and the stats JSON are the ones
the harness driver (run_bench.py) expects; the difference is that each mode
imports only the slimta modules it uses, so ``--edge-only`` works with a
slimta that provides nothing but ``slimta.edge.smtp.SmtpEdge``.

Modes:

  --edge-only         SmtpEdge -> in-process object whose enqueue() accepts
                      every envelope at once (Edge's queue duck typing)
  --relay blackhole   SmtpEdge -> Queue(storage) -> counting BlackholeRelay
  --relay smtp        SmtpEdge -> Queue(storage) -> StaticSmtpRelay to
                      --sink-host:--sink-port (the default mode)

Policies for the two Queue modes (--policies, default from the environment
variable SLIMTA_BENCH_POLICIES, else "none"): "headers" adds
AddDateHeader, AddMessageIdHeader and AddReceivedHeader
(slimta.policy.headers, in python-slimta 5.0.5 too) to the queue.

Storage for the two Queue modes (--storage, default from the environment
variable SLIMTA_BENCH_STORAGE, else "dict"):

  dict    slimta.queue.dict.DictStorage()
  disk    slimta.diskstorage.DiskStorage(env_dir, meta_dir) in a fresh
          temporary directory, removed again on exit

Driver protocol:

  stdout    "PID <pid>" first, then "READY <host> <port>" once the edge
            accepts connections
  SIGUSR1   write the stats JSON to --stats-file, keep running
  SIGTERM   write the stats JSON, exit 0 (SIGINT: the same)
  lifetime  after --max-lifetime seconds it writes the stats and exits 0

Exit status: 0 normal end, 2 bad arguments, 3 the edge could not listen or
stopped on its own.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

import gevent

EDGE_HOSTNAME = "bench.localhost"
STORAGE_ENV = "SLIMTA_BENCH_STORAGE"
STORAGE_CHOICES = ("dict", "disk")
POLICIES_ENV = "SLIMTA_BENCH_POLICIES"
POLICY_CHOICES = ("none", "headers")


class InstantQueue:
    """What --edge-only hands to SmtpEdge as its queue.

    Edge only ever calls ``enqueue(envelope)`` and expects a list of
    ``(envelope, queue_id)`` pairs back, so nothing else is needed.
    """

    def __init__(self):
        self.enqueued = 0

    def enqueue(self, envelope):
        self.enqueued += 1
        return [(envelope, f"bench-{self.enqueued}")]


def counting_blackhole_relay():
    """A BlackholeRelay whose attempt() also counts the messages it gets."""
    from slimta.relay.blackhole import BlackholeRelay

    class CountingBlackholeRelay(BlackholeRelay):
        def __init__(self):
            super().__init__()
            self.delivered = 0

        def attempt(self, envelope, attempts):
            self.delivered += 1
            return super().attempt(envelope, attempts)

    return CountingBlackholeRelay()


def static_smtp_relay(args):
    from slimta.relay.smtp.static import StaticSmtpRelay

    return StaticSmtpRelay(
        args.sink_host,
        args.sink_port,
        pool_size=args.relay_pool_size or None,
        ehlo_as=EDGE_HOSTNAME,
        idle_timeout=args.relay_idle_timeout or None,
        connect_timeout=10.0,
        command_timeout=args.command_timeout,
        data_timeout=args.data_timeout,
    )


def _sut_storage():
    """$SLIMTA_BENCH_SUT_STORAGE, honoured only by this project's slimta (4.x),
    so one harness run can put the rewrite on DiskStorage while python-slimta
    5.0.5 keeps its DictStorage."""
    wanted = os.environ.get("SLIMTA_BENCH_SUT_STORAGE")
    if not wanted:
        return None
    try:
        from slimta.core import __version__
    except ImportError:
        return None
    return wanted if __version__.startswith("4.") else None


def make_storage(kind):
    """Returns (storage, directory to remove on exit or None)."""
    if kind == "dict":
        from slimta.queue.dict import DictStorage

        return DictStorage(), None
    from slimta.diskstorage import DiskStorage

    base = tempfile.mkdtemp(prefix="slimta-bench-disk-")
    env_dir = os.path.join(base, "env")
    meta_dir = os.path.join(base, "meta")
    os.mkdir(env_dir)
    os.mkdir(meta_dir)
    return DiskStorage(env_dir, meta_dir), base


class Counters:
    """Everything the stats JSON reports."""

    def __init__(self, mode, storage_kind):
        self.mode = mode
        self.storage_kind = storage_kind
        self.policies = "none"
        self.t0 = time.time()
        self.bounced = 0
        self.failures = []
        self.instant_queue = None
        self.relay = None
        self.storage = None

    def bounce_factory(self, envelope, reply):
        # Queue calls this once per message that failed for good (with the
        # default backoff a transient relay failure ends up here as well).
        # Returning None suppresses the bounce message, so the relay sink
        # never sees anything but the original mail.
        self.bounced += 1
        if len(self.failures) < 10:
            self.failures.append(str(reply))
        return None

    def as_json(self):
        out = {
            "pid": os.getpid(),
            "mode": self.mode,
            "uptime_s": round(time.time() - self.t0, 3),
            "bounced": self.bounced,
            "failures": self.failures,
        }
        if self.instant_queue is not None:
            out["enqueued"] = self.instant_queue.enqueued
        if self.relay is not None and hasattr(self.relay, "delivered"):
            out["delivered"] = self.relay.delivered
        if self.storage is not None:
            out["storage"] = self.storage_kind
            out["policies"] = self.policies
            try:
                out["queue_size"] = self.storage.get_info().get("size")
            except Exception as exc:  # e.g. a backend without get_info()
                out["queue_size"] = None
                out["queue_size_error"] = repr(exc)
        return out


def write_stats(path, counters):
    if not path:
        return
    partial = f"{path}.tmp"
    with open(partial, "w") as fh:
        json.dump(counters.as_json(), fh)
    os.replace(partial, path)


def require_loopback(parser, value, option):
    try:
        ok = ipaddress.ip_address(value).is_loopback
    except ValueError:
        ok = False
    if not ok:
        parser.error(f"{option} must be a loopback IP address, got {value!r}")


def accepts_connections(host, port):
    try:
        conn = socket.create_connection((host, port), timeout=0.5)
    except OSError:
        return False
    conn.close()
    return True


def parse_args(argv):
    head, _, tail = __doc__.partition("\n")
    p = argparse.ArgumentParser(
        description=head, epilog=tail, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="loopback address to listen on (%(default)s)"
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--relay",
        choices=("smtp", "blackhole"),
        default="smtp",
        help="smtp: StaticSmtpRelay to --sink-host:--sink-port; "
        "blackhole: counting BlackholeRelay (%(default)s)",
    )
    p.add_argument(
        "--edge-only",
        action="store_true",
        help="no Queue and no relay: every message is accepted at once (wins over --relay)",
    )
    p.add_argument(
        "--storage",
        choices=STORAGE_CHOICES,
        default=os.environ.get(STORAGE_ENV) or _sut_storage() or "dict",
        help=f"queue storage for the Queue modes (default: ${STORAGE_ENV} "
        "or dict; ignored with --edge-only)",
    )
    p.add_argument(
        "--policies",
        choices=POLICY_CHOICES,
        default=os.environ.get(POLICIES_ENV) or "none",
        help=f"queue policies for the Queue modes (default: ${POLICIES_ENV} or none)",
    )
    p.add_argument("--sink-host", default="127.0.0.1")
    p.add_argument("--sink-port", type=int)
    p.add_argument(
        "--relay-pool-size",
        type=int,
        default=20,
        help="StaticSmtpRelay pool_size, 0 = no limit (%(default)s)",
    )
    p.add_argument(
        "--relay-idle-timeout",
        type=float,
        default=10.0,
        help="StaticSmtpRelay idle_timeout in seconds, 0 = one "
        "message per outbound connection (%(default)s)",
    )
    p.add_argument("--max-size", type=int, default=10 * 1024 * 1024)
    p.add_argument("--command-timeout", type=float, default=120.0)
    p.add_argument("--data-timeout", type=float, default=120.0)
    p.add_argument(
        "--stats-file",
        help="file the stats JSON is written to on SIGUSR1, "
        "SIGTERM, SIGINT and at the end of the lifetime",
    )
    p.add_argument(
        "--max-lifetime",
        type=float,
        default=1800.0,
        help="seconds after which the process exits by itself (%(default)s)",
    )
    args = p.parse_args(argv)
    if args.policies not in POLICY_CHOICES:  # a bad $SLIMTA_BENCH_POLICIES
        p.error(f"--policies must be one of {', '.join(POLICY_CHOICES)}, got {args.policies!r}")
    if args.storage not in STORAGE_CHOICES:  # a bad $SLIMTA_BENCH_STORAGE
        choices = ", ".join(STORAGE_CHOICES)
        p.error(f"--storage must be one of {choices}, got {args.storage!r}")
    require_loopback(p, args.host, "--host")
    if args.edge_only:
        args.mode = "edge-only"
    elif args.relay == "blackhole":
        args.mode = "blackhole"
    else:
        args.mode = "relay"
        if not args.sink_port:
            p.error("--relay smtp needs --sink-port")
        require_loopback(p, args.sink_host, "--sink-host")
    return args


def main(argv=None):
    args = parse_args(argv)
    print(f"PID {os.getpid()}", flush=True)

    counters = Counters(args.mode, args.storage)
    scratch = []
    if args.mode == "edge-only":
        queue = counters.instant_queue = InstantQueue()
    else:
        from slimta.queue import Queue

        if args.mode == "relay":
            counters.relay = static_smtp_relay(args)
        else:
            counters.relay = counting_blackhole_relay()
        counters.storage, tmp = make_storage(args.storage)
        if tmp:
            scratch.append(tmp)
        queue = Queue(counters.storage, counters.relay, bounce_factory=counters.bounce_factory)
        if args.policies == "headers":
            from slimta.policy.headers import (
                AddDateHeader,
                AddMessageIdHeader,
                AddReceivedHeader,
            )

            queue.add_policy(AddDateHeader())
            queue.add_policy(AddMessageIdHeader(EDGE_HOSTNAME))
            queue.add_policy(AddReceivedHeader())
            counters.policies = "headers"
        queue.start()

    from slimta.edge.smtp import SmtpEdge

    edge = SmtpEdge(
        (args.host, args.port),
        queue,
        max_size=args.max_size,
        command_timeout=args.command_timeout,
        data_timeout=args.data_timeout,
        hostname=EDGE_HOSTNAME,
    )
    edge.start()

    def on_usr1():
        write_stats(args.stats_file, counters)

    def finish():
        try:
            write_stats(args.stats_file, counters)
        finally:
            for path in scratch:
                shutil.rmtree(path, ignore_errors=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    gevent.signal_handler(signal.SIGUSR1, on_usr1)
    gevent.signal_handler(signal.SIGTERM, finish)
    gevent.signal_handler(signal.SIGINT, finish)
    gevent.spawn_later(args.max_lifetime, finish)

    give_up = time.monotonic() + 10.0
    while not accepts_connections(args.host, args.port):
        if getattr(edge, "dead", False) or time.monotonic() > give_up:
            error = getattr(edge, "exception", None)
            print(
                f"edge is not listening on {args.host}:{args.port} ({error!r})",
                file=sys.stderr,
                flush=True,
            )
            for path in scratch:
                shutil.rmtree(path, ignore_errors=True)
            return 3
        gevent.sleep(0.05)

    print(f"READY {args.host} {args.port}", flush=True)
    edge.join()
    print(f"edge stopped: {getattr(edge, 'exception', None)!r}", file=sys.stderr, flush=True)
    write_stats(args.stats_file, counters)
    for path in scratch:
        shutil.rmtree(path, ignore_errors=True)
    return 3


if __name__ == "__main__":
    sys.exit(main())
