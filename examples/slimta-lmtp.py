#!/usr/bin/env python3
"""An MX for your domains that hands each message to a mailbox server over LMTP.

The mailbox server (Dovecot, Cyrus) owns the mailboxes; this MTA receives
the mail from the Internet, queues it, and delivers it with LMTP (RFC 2033),
which answers for each recipient separately. Run it from the repository
root after ``pip install -e .``::

    .venv/bin/python examples/slimta-lmtp.py --domain example.org --lmtp 127.0.0.1:24

* :class:`Validators` accept only recipients in the ``--domain`` list
  (``550 5.7.1`` otherwise: this server relays nothing); ``--open-relay``
  accepts every domain, for tests;
* the :class:`~slimta.queue.Queue` stores each message on disk
  (``--spool``) before the ``250`` and adds ``Received:``, ``Date:`` and
  ``Message-Id:``;
* :class:`~slimta.relay.smtp.static.StaticLmtpRelay` keeps connections to
  the mailbox server and sends each message once for all its recipients.
  A recipient the server refuses for good (an unknown user) is bounced
  alone; one refused for now (over quota) is retried alone.

SIGINT (Ctrl-C) and SIGTERM stop it gracefully.
"""

# gevent must patch the standard library before anything else imports it.
from gevent import monkey

monkey.patch_all()

import argparse
import logging
import os
import signal
import socket

import gevent

from slimta.diskstorage import DiskStorage
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.policy.headers import AddDateHeader, AddMessageIdHeader, AddReceivedHeader
from slimta.queue import Queue
from slimta.relay.smtp.static import StaticLmtpRelay

log = logging.getLogger("slimta-lmtp")
#: What each log line on standard error looks like.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Validators(SmtpValidators):
    """Mail is accepted for the local domains only."""

    #: Domains delivered here (lower case); ``None``: every domain.
    domains: frozenset[str] | None = frozenset({"localhost"})

    def handle_rcpt(self, reply, recipient, params):
        _, at, domain = recipient.rpartition("@")
        # A bare <postmaster> must be accepted (RFC 5321 4.5.1).
        if at and self.domains is not None and domain.lower() not in self.domains:
            reply.code = "550"
            reply.message = f"5.7.1 Relaying denied for <{recipient}>"


def listen_address(text):
    """``HOST:PORT`` for argparse."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:2528, got {text!r}")
    return host.strip("[]"), int(port)


def lmtp_address(text):
    """``HOST[:PORT]`` for argparse; the port defaults to 24 (RFC 2033 5)."""
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = text, "24"
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST[:PORT] such as 127.0.0.1:24, got {text!r}")
    return host.strip("[]"), int(port)


def parse_args():
    parser = argparse.ArgumentParser(
        description="An MX for your domains that hands each message to a mailbox server over LMTP.",
    )
    parser.add_argument(
        "--listen",
        type=listen_address,
        default=("127.0.0.1", 2528),
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:2528; port 0 picks a free one)",
    )
    parser.add_argument(
        "--lmtp",
        type=lmtp_address,
        default=("127.0.0.1", 24),
        metavar="HOST[:PORT]",
        help="the mailbox server's LMTP service (default 127.0.0.1:24)",
    )
    parser.add_argument(
        "--domain",
        action="append",
        metavar="DOMAIN",
        help="a domain to accept mail for; repeat for more (default: localhost)",
    )
    parser.add_argument("--hostname", help="the name in the greeting (default: this host's FQDN)")
    parser.add_argument(
        "--spool", default="spool", metavar="DIR", help="the disk queue's directory (./spool)"
    )
    parser.add_argument(
        "--open-relay",
        action="store_true",
        help="accept mail for every domain (for tests; never on the Internet)",
    )
    return parser.parse_args()


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    domains = frozenset(domain.lower() for domain in args.domain or ["localhost"])
    Validators.domains = None if args.open_relay else domains
    if args.open_relay:
        log.warning("--open-relay: mail for every domain is accepted, from every client")

    lmtp_host, lmtp_port = args.lmtp
    relay = StaticLmtpRelay(lmtp_host, lmtp_port, pool_size=10, idle_timeout=10.0)

    spool = os.path.abspath(args.spool)
    storage = DiskStorage(os.path.join(spool, "env"), os.path.join(spool, "meta"))
    queue = Queue(storage, relay)
    queue.add_policy(AddReceivedHeader())
    queue.add_policy(AddDateHeader())
    queue.add_policy(AddMessageIdHeader(args.hostname))
    queue.start()

    listener = socket.create_server(args.listen)
    edge = SmtpEdge(
        listener,
        queue,
        max_size=26214400,
        validator_class=Validators,
        command_timeout=300.0,
        data_timeout=600.0,
        hostname=args.hostname,
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, edge.stop, 10.0)
    edge.start()
    host, port = listener.getsockname()[:2]
    log.info("listening on %s:%d as %s", host, port, edge.hostname)
    accepted = "every domain" if args.open_relay else ", ".join(sorted(domains))
    log.info("mail for %s goes to LMTP at %s:%d", accepted, lmtp_host, lmtp_port)
    edge.join()
    queue.kill()
    log.info("stopped")


if __name__ == "__main__":
    main()
