#!/usr/bin/env python3
"""A smarthost relay: mail from your own machines, queued and passed on to one SMTP server.

The machines of your network (by default this one only) hand their mail to
it, and it delivers everything to your provider's server, logging in there
if it asks for credentials. Run it from the repository root after
``pip install -e .``::

    .venv/bin/python examples/slimta-smarthost.py smtp.example.net:587 \\
        --tls required --username me@example.net --password-file password.txt

* :class:`Validators` refuse every recipient (``550 5.7.1``) of a client
  outside the ``--allow`` networks (default ``127.0.0.0/8`` and ``::1``),
  so the relay is not open; ``--open-relay`` allows everyone, for tests;
* the :class:`~slimta.queue.Queue` keeps each message on disk (``--spool``)
  until the smarthost took it, retrying with backoff and bouncing what it
  refuses for good;
* :class:`~slimta.relay.smtp.static.StaticSmtpRelay` keeps up to ten
  connections to the smarthost open and reuses them. It uses STARTTLS
  whenever the server offers it and checks the certificate (``--cafile``
  for a private authority); ``--tls required`` refuses to send in clear,
  ``--tls implicit`` speaks TLS from the first byte (port 465). Credentials
  are sent only inside TLS.

SIGINT (Ctrl-C) and SIGTERM stop it gracefully.
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
from slimta.queue import Queue
from slimta.relay.smtp.static import StaticSmtpRelay

log = logging.getLogger("slimta-smarthost")
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


def listen_address(text):
    """``HOST:PORT`` for argparse."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:2526, got {text!r}")
    return host.strip("[]"), int(port)


def server_address(text):
    """``HOST[:PORT]`` for argparse; the port defaults to 25."""
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = text, "25"
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST[:PORT] such as smtp.example.net:587, got {text!r}"
        )
    return host.strip("[]"), int(port)


def network(text):
    """A network (``192.0.2.0/24``) or one address, for argparse."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a network such as 192.0.2.0/24, got {text!r}"
        ) from None


def parse_args():
    parser = argparse.ArgumentParser(
        description="A smarthost relay: mail from your own machines, queued and passed on "
        "to one SMTP server.",
    )
    parser.add_argument(
        "smarthost",
        type=server_address,
        metavar="HOST[:PORT]",
        help="the server all mail goes to (port 25 unless given)",
    )
    parser.add_argument(
        "--listen",
        type=listen_address,
        default=("127.0.0.1", 2526),
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:2526; port 0 picks a free one)",
    )
    parser.add_argument(
        "--allow",
        type=network,
        action="append",
        metavar="NETWORK",
        help="clients that may relay; repeat for more (default: 127.0.0.0/8 and ::1)",
    )
    parser.add_argument("--username", help="log in to the smarthost as this user")
    parser.add_argument(
        "--password-file",
        metavar="FILE",
        help="the smarthost password, on the first line of this file",
    )
    parser.add_argument(
        "--tls",
        choices=("opportunistic", "required", "implicit"),
        default="opportunistic",
        help="STARTTLS when offered (default), STARTTLS or no delivery, or TLS from the first byte",
    )
    parser.add_argument("--cafile", metavar="FILE", help="trust the authorities in this file (PEM)")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="encrypt without checking the smarthost's certificate",
    )
    parser.add_argument("--hostname", help="the name in the greeting (default: this host's FQDN)")
    parser.add_argument(
        "--spool", default="spool", metavar="DIR", help="the disk queue's directory (./spool)"
    )
    parser.add_argument(
        "--open-relay",
        action="store_true",
        help="let every client relay (for tests; never on the Internet)",
    )
    args = parser.parse_args()

    if (args.username is None) != (args.password_file is None):
        parser.error("--username and --password-file go together")
    args.credentials = None
    if args.username is not None:
        try:
            with open(args.password_file, encoding="utf-8") as file:
                password = file.readline().rstrip("\r\n")
        except OSError as exc:
            parser.error(f"argument --password-file: {exc}")
        args.credentials = (args.username, password)

    context = ssl.create_default_context()
    if args.cafile:
        try:
            context.load_verify_locations(args.cafile)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"argument --cafile: {exc}")
    if args.no_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    args.context = context
    return args


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.open_relay:
        Validators.allowed = None
        log.warning("--open-relay: every client may relay through this server")
    elif args.allow:
        Validators.allowed = tuple(args.allow)

    host, port = args.smarthost
    relay = StaticSmtpRelay(
        host,
        port,
        pool_size=10,
        context=args.context,
        tls_required=args.tls == "required",
        tls_immediately=args.tls == "implicit",
        credentials=args.credentials,
        ehlo_as=args.hostname,
        idle_timeout=10.0,
    )

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
    listen_host, listen_port = listener.getsockname()[:2]
    log.info("listening on %s:%d as %s", listen_host, listen_port, edge.hostname)
    login = f", as {args.username}" if args.credentials else ""
    log.info("mail goes to %s:%d (TLS %s%s)", host, port, args.tls, login)
    edge.join()
    queue.kill()
    log.info("stopped")


if __name__ == "__main__":
    main()
