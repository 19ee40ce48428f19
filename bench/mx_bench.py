#!/usr/bin/env python3
"""MX relay shape: how many DNS queries each message costs.

    .venv/bin/python bench/mx_bench.py --messages 5000 --domains 50

Starts the test suite's DNS server (tests/dnsserver.py, a real dnspython
server on 127.0.0.1) serving ``MX 10 localhost.`` for ``d0.test`` ...
``d<N-1>.test`` and Postfix's smtp-sink as the mail server, then delivers
the messages through :class:`~slimta.relay.smtp.mx.MxSmtpRelay` (20 at a
time, one recipient each, domains in random order). The DNS server counts
every query it receives, so the figure includes everything slimta asked.

Prints messages per second, the DNS queries received and the queries per
message; ``--json`` prints the same as JSON.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all(os=False, signal=False, subprocess=False)

import argparse
import json
import os
import random
import sys
import time

from gevent.pool import Pool

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from smtpsink import free_port, start_sink

from dnsserver import DnsServer
from slimta.envelope import Envelope
from slimta.relay.smtp.mx import MxSmtpRelay
from slimta.util import build_ipv4_socket_creator
from slimta.util.dns import DNSResolver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--domains", type=int, default=50)
    parser.add_argument("--ttl", type=int, default=300, help="TTL of the MX records")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    zone = {f"d{i}.test": {"MX": [(args.ttl, "10 localhost.")]} for i in range(args.domains)}
    port = free_port()
    sink = start_sink(port)
    rng = random.Random(args.seed)
    failures = 0
    try:
        with DnsServer(zone) as server, server.slimta_resolver(timeout=2.0):
            relay = MxSmtpRelay(
                port=port,
                pool_size=args.concurrency,
                idle_timeout=10.0,
                socket_creator=build_ipv4_socket_creator(),
            )
            body = b"Subject: mx bench\r\nFrom: a@bench.test\r\n\r\n" + b"x" * 1000 + b"\r\n"

            def deliver(n: int) -> None:
                nonlocal failures
                envelope = Envelope("a@bench.test", [f"u{n}@d{rng.randrange(args.domains)}.test"])
                envelope.parse(body)
                try:
                    relay._attempt(envelope, 0)
                except Exception:
                    failures += 1

            start = time.monotonic()
            Pool(args.concurrency).map(deliver, range(args.messages))
            elapsed = time.monotonic() - start
            queries = server.total_queries
            cache = DNSResolver.cache
            relay.kill()
    finally:
        sink.kill()
        sink.wait()
    result = {
        "messages": args.messages,
        "domains": args.domains,
        "mx_ttl": args.ttl,
        "failures": failures,
        "msg_per_s": round(args.messages / elapsed, 1),
        "dns_queries": queries,
        "dns_queries_per_message": round(queries / args.messages, 4),
        "cache_lookups": cache.lookups,
        "cache_hits": cache.hits,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
