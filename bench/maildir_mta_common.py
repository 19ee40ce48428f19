"""What the two local-delivery benchmark MTAs share: command line, stats and
the driver protocol of the shared harness (see bench/maildir_pipeline.py).

Imported first by ``maildir_mta.py`` (this project's slimta) and
``maildir_mta_anchor.py`` (python-slimta 5.0.5), so it monkey-patches like
every slimta script. It uses only what both slimtas have:
``slimta.edge.smtp.SmtpEdge`` and ``slimta.queue.Queue``.

Driver protocol (the harness's):

  stdout    "PID <pid>" first, then "READY <host> <port>" once the edge
            accepts connections
  SIGUSR1   write the stats JSON to --stats-file, keep running
  SIGTERM   write the stats JSON, exit 0 (SIGINT: the same)
  lifetime  after --max-lifetime seconds it writes the stats and exits 0

``delivered`` in the stats counts messages removed from the queue storage,
i.e. delivered to every recipient and forgotten by the queue.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import ipaddress
import json
import os
import signal
import socket
import sys
import time

import gevent

EDGE_HOSTNAME = "bench.localhost"


def parse_args(description, argv=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mail-dir", required=True, help="where delivered messages go (must exist)")
    p.add_argument(
        "--spool-dir",
        help="queue storage directory (DiskStorage; this project's slimta only)",
    )
    p.add_argument(
        "--relay-pool-size",
        type=int,
        default=20,
        help="most delivery attempts at once (Queue relay_pool, %(default)s)",
    )
    p.add_argument("--stats-file", required=True)
    p.add_argument("--max-lifetime", type=float, default=900.0)
    args = p.parse_args(argv)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        p.error(f"--host must be a loopback IP address, got {args.host!r}")
    if not os.path.isdir(args.mail_dir):
        p.error(f"--mail-dir {args.mail_dir!r} is not a directory")
    return args


class Counters:
    """What the stats JSON reports."""

    def __init__(self, mode, storage, storage_kind):
        self.mode = mode
        self.storage = storage
        self.storage_kind = storage_kind
        self.t0 = time.time()
        self.delivered = 0
        self.bounced = 0
        self.failures = []
        remove = storage.remove

        def counting_remove(id):
            remove(id)
            self.delivered += 1

        storage.remove = counting_remove

    def bounce_factory(self, envelope, reply):
        # Called once per message that failed for good; no bounce is made, so
        # the delivered count only ever covers the original messages.
        self.bounced += 1
        if len(self.failures) < 10:
            self.failures.append(str(reply))
        return None

    def as_json(self):
        try:
            size = self.storage.get_info().get("size")
        except Exception:
            size = None
        return {
            "pid": os.getpid(),
            "mode": self.mode,
            "storage": self.storage_kind,
            "uptime_s": round(time.time() - self.t0, 3),
            "delivered": self.delivered,
            "bounced": self.bounced,
            "failures": self.failures,
            "queue_size": size,
        }


def write_stats(path, counters):
    partial = f"{path}.tmp"
    with open(partial, "w") as fh:
        json.dump(counters.as_json(), fh)
    os.replace(partial, path)


def _accepts_connections(host, port):
    try:
        conn = socket.create_connection((host, port), timeout=0.5)
    except OSError:
        return False
    conn.close()
    return True


def serve(args, relay, storage, counters):
    """Run SmtpEdge -> Queue(storage) -> relay until told to stop."""
    from slimta.edge.smtp import SmtpEdge
    from slimta.queue import Queue

    queue = Queue(
        storage,
        relay,
        bounce_factory=counters.bounce_factory,
        relay_pool=args.relay_pool_size or None,
    )
    queue.start()
    edge = SmtpEdge((args.host, args.port), queue, hostname=EDGE_HOSTNAME)
    edge.start()

    def finish():
        try:
            write_stats(args.stats_file, counters)
        finally:
            os._exit(0)

    gevent.signal_handler(signal.SIGUSR1, write_stats, args.stats_file, counters)
    gevent.signal_handler(signal.SIGTERM, finish)
    gevent.signal_handler(signal.SIGINT, finish)
    gevent.spawn_later(args.max_lifetime, finish)

    give_up = time.monotonic() + 10.0
    while not _accepts_connections(args.host, args.port):
        if getattr(edge, "dead", False) or time.monotonic() > give_up:
            print(f"edge is not listening ({getattr(edge, 'exception', None)!r})", file=sys.stderr)
            sys.exit(3)
        gevent.sleep(0.02)
    print(f"READY {args.host} {args.port}", flush=True)
    edge.join()
    print(f"edge stopped: {getattr(edge, 'exception', None)!r}", file=sys.stderr, flush=True)
    write_stats(args.stats_file, counters)
    sys.exit(3)
