#!/usr/bin/env python3
"""MX relay to a TLS sink with MTA-STS and DANE on and off, in the same run.

    .venv/bin/python bench/mx_tls_bench.py --messages 3000 --reps 3

Everything is local:

* DNS: the test suite's DNS server (tests/dnsserver.py) serving
  ``bench.test MX 10 mx.bench.test``, its A record, the MTA-STS TXT record,
  and ``_25._tcp.mx.bench.test TLSA 3 1 1 <key>`` with the AD bit set;
* the MTA-STS policy host: a gevent.pywsgi HTTPS server in this process
  (``enforce``, ``mx: mx.bench.test``);
* the sink: an ``SmtpEdge`` with STARTTLS (a trustme certificate for
  ``mx.bench.test``) in a child process of the same interpreter, accepting
  every message.

Each rep delivers ``--messages`` 1 KiB messages through a fresh
:class:`~slimta.relay.smtp.mx.MxSmtpRelay` per variant, ``--concurrency`` at
a time over kept-alive connections: ``off`` (opportunistic TLS, verifying
context), ``sts`` (MTA-STS enforce), ``dane`` (DANE), ``both``. Policies are
fetched during a warm-up, so the reps measure the cached path. Variants
alternate within each rep; the table gives the median msg/s and its ratio
to ``off``, and the relay process's CPU time per message (the sink runs
in another process) with ``off``'s divided by the variant's, which a busy
machine disturbs less than the rate. ``cold fetch`` is the time of one policy lookup with nothing
cached (TXT query, address query, HTTPS fetch, parse), the median of
``--cold`` tries.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all(os=False, signal=False, subprocess=False)

import argparse
import hashlib
import json
import os
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

DOMAIN = "bench.test"
MX = "mx.bench.test"
POLICY = f"version: STSv1\nmode: enforce\nmx: {MX}\nmax_age: 86400\n"
BODY = b"Subject: mx tls bench\r\nFrom: a@origin.test\r\n\r\n" + b"x" * 1000 + b"\r\n"
VARIANTS = ("off", "sts", "dane", "both")


def sink(port: int, cert: str, key: str) -> None:
    """The child process: a TLS-capable SmtpEdge that accepts everything."""
    import gevent

    from slimta.edge.smtp import SmtpEdge

    class Counter:
        count = 0

        def enqueue(self, envelope: Any) -> list[tuple[Any, str]]:
            Counter.count += 1
            return [(envelope, str(Counter.count))]

    class Edge(SmtpEdge):
        ptr_lookup = False

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    edge = Edge(("127.0.0.1", port), Counter(), context=ctx, hostname=MX)
    edge.start()
    print("READY", flush=True)
    done = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, done.set)
    done.wait()
    print(json.dumps({"count": Counter.count}), flush=True)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--cold", type=int, default=20, help="cold policy fetches to time")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sink", nargs=3, metavar=("PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        sink(int(args.sink[0]), args.sink[1], args.sink[2])
        return

    import gevent
    import trustme
    from gevent.pool import Pool
    from gevent.pywsgi import WSGIServer

    from dnsserver import DnsServer
    from slimta.envelope import Envelope
    from slimta.relay.smtp.dane import Dane, spki_der
    from slimta.relay.smtp.mtasts import HttpsPolicyFetcher, MtaSts
    from slimta.relay.smtp.mx import MxSmtpRelay
    from slimta.util.dns import DNSResolver, TrustedResolver

    ca = trustme.CA()
    leaf = ca.issue_cert(MX)
    web = ca.issue_cert(f"mta-sts.{DOMAIN}")
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    spki = hashlib.sha256(spki_der(der)).hexdigest()

    tmp = tempfile.TemporaryDirectory()
    cert_path = os.path.join(tmp.name, "cert.pem")
    key_path = os.path.join(tmp.name, "key.pem")
    leaf.cert_chain_pems[0].write_to_path(cert_path)
    leaf.private_key_pem.write_to_path(key_path)

    smtp_port = free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, "--sink", str(smtp_port), cert_path, key_path],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "READY":
        raise SystemExit("the sink did not start")

    web_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    web.configure_cert(web_ctx)

    def policy_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [POLICY.encode()]

    web_server = WSGIServer(("127.0.0.1", 0), policy_app, ssl_context=web_ctx, log=None)
    web_server.start()

    zone = {
        DOMAIN: {"MX": [(300, f"10 {MX}.")]},
        MX: {"A": [(300, "127.0.0.1")]},
        f"mta-sts.{DOMAIN}": {"A": [(300, "127.0.0.1")]},
        f"_mta-sts.{DOMAIN}": {"TXT": [(300, "v=STSv1; id=1")]},
        f"_25._tcp.{MX}": {"TLSA": [(300, f"3 1 1 {spki}")]},
    }

    def connect(address: tuple[str, int], timeout: float | None = None) -> socket.socket:
        return socket.create_connection(("127.0.0.1", address[1]), timeout)

    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_us: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cold: list[float] = []
    try:
        with DnsServer(zone) as dns, dns.slimta_resolver(timeout=2.0):
            dns.authenticate(MX, f"_25._tcp.{MX}")
            fetcher = HttpsPolicyFetcher(client_ctx, port=web_server.server_port)

            def relay_for(variant: str) -> MxSmtpRelay:
                kw: dict[str, Any] = {}
                if variant in ("sts", "both"):
                    kw["mta_sts"] = MtaSts(fetcher=fetcher)
                if variant in ("dane", "both"):
                    kw["dane"] = Dane(TrustedResolver([f"127.0.0.1:{dns.port}"]))
                return MxSmtpRelay(
                    client_ctx,
                    port=smtp_port,
                    pool_size=args.concurrency,
                    idle_timeout=10.0,
                    socket_creator=connect,
                    **kw,
                )

            def run(relay: MxSmtpRelay, count: int) -> tuple[float, float]:
                failures = []

                def deliver(n: int) -> None:
                    envelope = Envelope("a@origin.test", [f"u{n}@{DOMAIN}"])
                    envelope.parse(BODY)
                    try:
                        relay._attempt(envelope, 0)
                    except Exception as exc:
                        failures.append(exc)

                start, cpu = time.perf_counter(), _cpu()
                Pool(args.concurrency).map(deliver, range(count))
                elapsed, cpu = time.perf_counter() - start, _cpu() - cpu
                if failures:
                    raise SystemExit(f"{len(failures)} failed, e.g. {failures[0]!r}")
                return count / elapsed, cpu / count * 1e6

            for rep in range(args.reps):
                order = VARIANTS if rep % 2 == 0 else tuple(reversed(VARIANTS))
                for variant in order:
                    relay = relay_for(variant)
                    run(relay, 200)  # warm-up: connections, policy fetch, DNS
                    rate, cpu_per_msg = run(relay, args.messages)
                    rates[variant].append(rate)
                    cpu_us[variant].append(cpu_per_msg)
                    relay.kill()

            for _ in range(args.cold):
                DNSResolver.cache.clear()
                sts = MtaSts(fetcher=fetcher)
                start = time.perf_counter()
                assert sts.policy(DOMAIN) is not None
                cold.append(time.perf_counter() - start)
    finally:
        web_server.stop()
        child.send_signal(signal.SIGTERM)
        child.wait(10)
        tmp.cleanup()
        gevent.get_hub()  # keep the import used

    medians = {v: statistics.median(r) for v, r in rates.items()}
    cpu_medians = {v: statistics.median(c) for v, c in cpu_us.items()}
    result = {
        "messages": args.messages,
        "reps": args.reps,
        "concurrency": args.concurrency,
        "msg_per_s": rates,
        "median_msg_per_s": medians,
        "ratio_to_off": {v: medians[v] / medians["off"] for v in VARIANTS},
        "relay_cpu_us_per_msg": cpu_us,
        "median_relay_cpu_us_per_msg": cpu_medians,
        "cpu_ratio_off_over_variant": {v: cpu_medians["off"] / cpu_medians[v] for v in VARIANTS},
        "cold_fetch_ms_median": statistics.median(cold) * 1000 if cold else None,
        "cold_fetch_ms_max": max(cold) * 1000 if cold else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{'variant':8} {'msg/s':>7} {'ratio':>6} {'cpu us/msg':>11} {'ratio':>6}   msg/s per rep"
    )
    for v in VARIANTS:
        reps = " ".join(f"{r:.0f}" for r in rates[v])
        print(
            f"{v:8} {medians[v]:7.0f} {result['ratio_to_off'][v]:6.3f} "
            f"{cpu_medians[v]:11.0f} {result['cpu_ratio_off_over_variant'][v]:6.3f}   {reps}"
        )
    if cold:
        print(
            f"cold policy fetch: median {result['cold_fetch_ms_median']:.1f} ms, "
            f"max {result['cold_fetch_ms_max']:.1f} ms ({len(cold)} tries)"
        )


if __name__ == "__main__":
    main()
