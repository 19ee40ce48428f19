#!/usr/bin/env python
"""What relaying one message costs, without the edge or the queue.

Starts Postfix's ``smtp-sink`` on 127.0.0.1 and delivers ``--messages``
one-recipient messages (about 1.1 KB each) through
``StaticSmtpRelay(pool_size=20, idle_timeout=10)``, ``--concurrency`` at a
time, each attempt in its own greenlet as the Queue does it. Prints msg/s
and the process's CPU time per message over the measured messages (a
warm-up of 200 comes first).

Instructions per message, which machine noise does not move: run it under
callgrind twice and divide the difference by the difference in messages::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/relay_cost.py --messages 300
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/relay_cost.py --messages 1300

(``Collected`` in valgrind's summary; (second - first) / 1000.)
Another checkout's code can be measured with ``PYTHONPATH=<its src>``.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import resource
import sys
import time

from gevent.pool import Pool
from smtpsink import free_port, start_sink

from slimta.envelope import Envelope
from slimta.relay.smtp.static import StaticSmtpRelay

BODY = b"Subject: bench\r\nFrom: <a@example.com>\r\n\r\n" + (
    b"hello world, this is a line of text.\r\n" * 27
)
WARM_UP = 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    port = free_port()
    sink = start_sink(port)
    relay = StaticSmtpRelay("127.0.0.1", port, pool_size=20, idle_timeout=10, ehlo_as="bench")

    def deliver(_: int) -> None:
        envelope = Envelope("a@example.com", ["b@example.com"])
        envelope.parse(BODY)
        relay._attempt(envelope, 0)

    try:
        pool = Pool(args.concurrency)
        pool.map(deliver, range(WARM_UP))
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        pool.map(deliver, range(args.messages))
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        relay.kill()
        sink.kill()
        sink.wait()
    user = after.ru_utime - before.ru_utime
    system = after.ru_stime - before.ru_stime
    per_message = 1e6 / args.messages
    print(
        f"{args.messages / elapsed:.0f} msg/s, CPU {(user + system) * per_message:.0f} us/msg "
        f"(user {user * per_message:.0f}, system {system * per_message:.0f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
