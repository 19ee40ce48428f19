#!/usr/bin/env python
"""A TLS submission edge for the TLS benchmark, written against the 4.0 API.

Runs under the interpreter being measured (this project or python-slimta
5.0.5): ``SmtpEdge(..., context=ctx, auth=True)`` with a validator that
accepts every message, and a queue-like object that counts. Prints
``READY <port>``; SIGUSR1 prints ``COUNT <n>``; SIGTERM exits.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import signal
import ssl
import sys

import gevent

from slimta.edge.smtp import SmtpEdge, SmtpValidators


class Counter:
    def __init__(self):
        self.count = 0

    def enqueue(self, envelope):
        self.count += 1
        return [(envelope, "tls-%d" % self.count)]


class Validators(SmtpValidators):
    def handle_mail(self, reply, sender, params):
        # Submission: only authenticated clients may send.
        if not self.session.auth:
            reply.code = "530"
            reply.message = "5.7.0 Authentication required"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    queue = Counter()
    edge = SmtpEdge(
        ("127.0.0.1", args.port),
        queue,
        context=ctx,
        auth=True,
        validator_class=Validators,
        command_timeout=60.0,
        data_timeout=60.0,
        hostname="bench.localhost",
    )
    edge.start()
    gevent.signal_handler(signal.SIGUSR1, lambda: print("COUNT %d" % queue.count, flush=True))
    gevent.signal_handler(signal.SIGTERM, lambda: sys.exit(0))
    gevent.sleep(0.2)
    print("READY %d" % args.port, flush=True)
    edge.join()


if __name__ == "__main__":
    main()
