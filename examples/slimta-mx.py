#!/usr/bin/env python3
"""An outbound MTA: mail from your own machines, delivered to each recipient domain's MX hosts.

Run it from the repository root after ``pip install -e .``::

    .venv/bin/python examples/slimta-mx.py --allow 192.0.2.0/24

* :class:`Validators` refuse every recipient (``550 5.7.1``) of a client
  outside the ``--allow`` networks (default ``127.0.0.0/8`` and ``::1``),
  so the relay is not open; ``--open-relay`` allows everyone, for tests;
* the :class:`~slimta.queue.Queue` keeps each message on disk (``--spool``)
  and splits it into one copy per recipient domain
  (:class:`~slimta.policy.split.RecipientDomainSplit`);
* :class:`~slimta.relay.smtp.mx.MxSmtpRelay` looks up the MX records of the
  domain (cached for their TTL), tries the exchangers in preference order,
  and keeps connections per exchanger for reuse. A domain that does not
  exist or has a null MX fails at once and is bounced; a DNS failure or an
  exchanger that cannot be reached is retried later.

TLS: STARTTLS is used whenever an exchanger offers it. Many exchangers have
self-signed certificates, so by default the certificate is not checked
(encryption against eavesdropping only, as most MTAs do); ``--tls-verify``
checks it and defers mail to exchangers whose certificate is not valid.

``--dns-server`` and ``--mx-port`` point the script at a test DNS server
(for the MX records; exchanger names are resolved by the system) and a
test port instead of the real ones.
"""

# gevent must patch the standard library before anything else imports it.
from gevent import monkey

monkey.patch_all()

import argparse
import ipaddress
import logging
import os
import signal
import socket
import ssl

import gevent

from slimta.diskstorage import DiskStorage
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.policy.headers import AddDateHeader, AddMessageIdHeader, AddReceivedHeader
from slimta.policy.split import RecipientDomainSplit
from slimta.queue import Queue
from slimta.relay.smtp.mx import MxSmtpRelay
from slimta.util.dns import DNSResolver

log = logging.getLogger("slimta-mx")
#: What each log line on standard error looks like.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Validators(SmtpValidators):
    """Only clients of the allowed networks may relay."""

    #: The networks whose clients may relay; ``None``: everyone (--open-relay).
    allowed = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

    def client_allowed(self):
        if self.allowed is None:
            return True
        address = ipaddress.ip_address(self.session.address[0].partition("%")[0])
        if getattr(address, "ipv4_mapped", None):
            address = address.ipv4_mapped  # ::ffff:192.0.2.1 on a dual-stack socket
        return any(address in network for network in self.allowed)

    def handle_rcpt(self, reply, recipient, params):
        if not self.client_allowed():
            reply.code = "550"
            reply.message = f"5.7.1 Relaying denied for [{self.session.address[0]}]"
        elif "@" not in recipient:
            # A bare <postmaster> has no domain to look up.
            reply.code = "550"
            reply.message = "5.1.3 A recipient needs a domain here"


def listen_address(text):
    """``HOST:PORT`` for argparse."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:2527, got {text!r}")
    return host.strip("[]"), int(port)


def network(text):
    """A network (``192.0.2.0/24``) or one address, for argparse."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a network such as 192.0.2.0/24, got {text!r}"
        ) from None


def port_number(text):
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return int(text)


def parse_args():
    parser = argparse.ArgumentParser(
        description="An outbound MTA: mail from your own machines, delivered to each recipient "
        "domain's MX hosts.",
    )
    parser.add_argument(
        "--listen",
        type=listen_address,
        default=("127.0.0.1", 2527),
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:2527; port 0 picks a free one)",
    )
    parser.add_argument(
        "--allow",
        type=network,
        action="append",
        metavar="NETWORK",
        help="clients that may relay; repeat for more (default: 127.0.0.0/8 and ::1)",
    )
    parser.add_argument(
        "--tls-verify",
        action="store_true",
        help="check the exchangers' certificates (default: encrypt without checking)",
    )
    parser.add_argument("--hostname", help="the name in the greeting and EHLO (default: FQDN)")
    parser.add_argument(
        "--spool", default="spool", metavar="DIR", help="the disk queue's directory (./spool)"
    )
    parser.add_argument(
        "--dns-server",
        metavar="IP[:PORT]",
        help="ask this DNS server for MX records instead of /etc/resolv.conf's",
    )
    parser.add_argument(
        "--mx-port",
        type=port_number,
        default=25,
        help="the exchangers' port (25; another only for tests)",
    )
    parser.add_argument(
        "--open-relay",
        action="store_true",
        help="let every client relay (for tests; never on the Internet)",
    )
    return parser.parse_args()


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.dns_server:
        DNSResolver.configure(servers=[args.dns_server])
    if args.open_relay:
        Validators.allowed = None
        log.warning("--open-relay: every client may relay through this server")
    elif args.allow:
        Validators.allowed = tuple(args.allow)

    context = ssl.create_default_context()
    if not args.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    relay = MxSmtpRelay(
        context,
        port=args.mx_port,
        ehlo_as=args.hostname,
        connect_timeout=30.0,
        command_timeout=300.0,  # RFC 5321 4.5.3.2 suggests 5 minutes per reply
        data_timeout=600.0,
        idle_timeout=10.0,
    )

    spool = os.path.abspath(args.spool)
    storage = DiskStorage(os.path.join(spool, "env"), os.path.join(spool, "meta"))
    queue = Queue(storage, relay)
    queue.add_policy(AddReceivedHeader())
    queue.add_policy(AddDateHeader())
    queue.add_policy(AddMessageIdHeader(args.hostname))
    # MxSmtpRelay delivers a message to the exchangers of its first
    # recipient's domain: one copy per domain.
    queue.add_policy(RecipientDomainSplit())
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
    verify = "verified" if args.tls_verify else "not verified"
    log.info("mail goes to the MX hosts, port %d (certificates %s)", args.mx_port, verify)
    edge.join()
    queue.kill()
    log.info("stopped")


if __name__ == "__main__":
    main()
