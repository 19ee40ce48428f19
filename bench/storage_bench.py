#!/usr/bin/env python3
"""Throughput of a queue storage alone: N greenlets each store and remove
messages in a loop, the way a queue with an instant relay uses it.

    .venv/bin/python bench/storage_bench.py --storage disk --workers 20 --seconds 5

Prints messages per second and the process CPU time per message. Use it to
compare storage changes on one machine; the end-to-end figures come from
bench/run.sh.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import gevent

from slimta.envelope import Envelope


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sys() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", choices=("dict", "disk"), default="disk")
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--dir", default=None, help="spool parent (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        if args.storage == "disk":
            from slimta.diskstorage import DiskStorage

            store = DiskStorage(os.path.join(root, "env"), os.path.join(root, "meta"))
        else:
            from slimta.queue.dict import DictStorage

            store = DictStorage()
        body = b"Subject: bench\r\n\r\n" + b"x" * args.size
        done = 0
        deadline = 0.0

        def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                env = Envelope("sender@example.com", ["rcpt@example.com"])
                env.parse(body)
                id = store.write(env, time.time())
                store.remove(id)
                done += 1

        deadline = time.monotonic() + args.seconds
        cpu0, sys0, t0 = _cpu(), _sys(), time.monotonic()
        gevent.joinall([gevent.spawn(worker) for _ in range(args.workers)])
        wall, cpu, sys_ = time.monotonic() - t0, _cpu() - cpu0, _sys() - sys0
    print(
        f"{args.storage}: {done / wall:.0f} msg/s, {cpu / done * 1e6:.0f} us CPU/msg ({sys_ / done * 1e6:.0f} system), "
        f"{args.workers} workers, {done} messages in {wall:.1f} s"
    )


if __name__ == "__main__":
    main()
