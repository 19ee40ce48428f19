#!/usr/bin/env python3
"""A submission server: your users log in (STARTTLS, then AUTH) and send mail anywhere.

Make a certificate and a users file, then run it from the repository root
after ``pip install -e .``::

    .venv/bin/slimta passwd alice@example.org >> users.toml
    .venv/bin/python examples/slimta-submission.py --cert cert.pem --key key.pem \\
        --users users.toml [--smarthost smtp.example.net:587]

Mail clients connect to ``127.0.0.1:1587`` (the submission port, 587, in
real life; ``--smtps`` for TLS from the first byte, port 465), encrypt the
session with STARTTLS and log in with PLAIN or LOGIN:

* ``--users`` is a TOML file of ``"address" = "password hash"`` lines, the
  hashes made by ``slimta passwd``; :class:`~slimta.lookup.auth.LookupAuth`
  checks them (salted scrypt, in constant time);
* AUTH is refused until the session is encrypted (``538 5.7.11``), and MAIL
  until the client has logged in (``530 5.7.0``), so nobody relays without
  an account; ``--open-relay`` lifts the second rule, for tests only;
* a user may send only as their own address (``553 5.7.1`` otherwise),
  unless ``--any-sender``;
* accepted mail is queued on disk (``--spool``) with ``Received:``,
  ``Date:`` and ``Message-Id:``, split per recipient domain, and delivered
  to each domain's MX hosts, or to ``--smarthost``.

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
import ssl
import tomllib

import gevent

from slimta.diskstorage import DiskStorage
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.lookup.auth import LookupAuth
from slimta.lookup.drivers import DictLookup
from slimta.policy.headers import AddDateHeader, AddMessageIdHeader, AddReceivedHeader
from slimta.policy.split import RecipientDomainSplit
from slimta.queue import Queue
from slimta.relay.smtp.mx import MxSmtpRelay
from slimta.relay.smtp.static import StaticSmtpRelay

log = logging.getLogger("slimta-submission")
#: What each log line on standard error looks like.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Validators(SmtpValidators):
    """The rules of one submission session."""

    #: Checks AUTH against the users file (set by main()).
    users: LookupAuth
    #: MAIL without AUTH is accepted (--open-relay).
    open_relay = False
    #: Users may send as any address (--any-sender).
    any_sender = False

    def handle_auth(self, reply, creds):
        # Leaves 235 for the right password, sets 535 5.7.8 otherwise.
        self.users.handle_auth(reply, creds)

    def handle_mail(self, reply, sender, params):
        login = self.session.auth
        if login is None:
            if self.open_relay:
                return
            reply.code = "530"
            if self.session.security is None:
                reply.message = "5.7.0 Must issue a STARTTLS command first"  # RFC 3207 4
            else:
                reply.message = "5.7.0 Authentication required"  # RFC 4954 6
            return
        authcid = login[0]
        if not self.any_sender and sender.lower() != authcid.lower():
            reply.code = "553"
            reply.message = f"5.7.1 Sender <{sender}> is not yours, {authcid}"


def listen_address(text):
    """``HOST:PORT`` for argparse."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:1587, got {text!r}")
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


class Users(dict):
    """``{address: {"password": hash}}``, looked up in any letter case."""

    def __getitem__(self, address):
        return super().__getitem__(address.lower())


def load_users(path):
    """The :class:`Users` of a TOML file of ``"address" = "hash"`` lines."""
    with open(path, "rb") as file:
        table = tomllib.load(file)
    users = Users()
    for address, hashed in table.items():
        if not isinstance(hashed, str) or not hashed.startswith("$scrypt$"):
            raise ValueError(f"{address}: expected a hash made by slimta passwd")
        users[address.lower()] = {"password": hashed}
    if not users:
        raise ValueError("no users")
    return users


def parse_args():
    parser = argparse.ArgumentParser(
        description="A submission server: users log in (STARTTLS, then AUTH) and send mail "
        "anywhere.",
    )
    parser.add_argument(
        "--listen",
        type=listen_address,
        default=("127.0.0.1", 1587),
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:1587; port 0 picks a free one)",
    )
    parser.add_argument("--smtps", action="store_true", help="TLS from the first byte (port 465)")
    parser.add_argument("--cert", required=True, metavar="FILE", help="the certificate chain (PEM)")
    parser.add_argument("--key", required=True, metavar="FILE", help="its private key (PEM)")
    parser.add_argument(
        "--users",
        required=True,
        metavar="FILE",
        help='the users: a TOML file of "address" = "hash" lines (slimta passwd ADDRESS)',
    )
    parser.add_argument(
        "--smarthost",
        type=server_address,
        metavar="HOST[:PORT]",
        help="deliver everything to this server (default: the recipients' MX hosts)",
    )
    parser.add_argument("--hostname", help="the name in the greeting (default: this host's FQDN)")
    parser.add_argument(
        "--spool", default="spool", metavar="DIR", help="the disk queue's directory (./spool)"
    )
    parser.add_argument("--any-sender", action="store_true", help="users may send as any address")
    parser.add_argument(
        "--open-relay",
        action="store_true",
        help="accept MAIL without AUTH (for tests; never on the Internet)",
    )
    args = parser.parse_args()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        parser.error(f"argument --cert/--key: cannot load the certificate and key: {exc}")
    args.context = context
    try:
        args.users = load_users(args.users)
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        parser.error(f"argument --users: {exc}")
    return args


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    Validators.users = LookupAuth(DictLookup(args.users, "{address}"))
    Validators.any_sender = args.any_sender
    Validators.open_relay = args.open_relay
    if args.open_relay:
        log.warning("--open-relay: anyone may send mail anywhere through this server")

    if args.smarthost:
        relay = StaticSmtpRelay(*args.smarthost, pool_size=10, idle_timeout=10.0)
        destination = "smarthost {}:{}".format(*args.smarthost)
    else:
        relay = MxSmtpRelay(idle_timeout=10.0)
        destination = "the recipients' MX hosts"

    spool = os.path.abspath(args.spool)
    storage = DiskStorage(os.path.join(spool, "env"), os.path.join(spool, "meta"))
    queue = Queue(storage, relay)
    queue.add_policy(AddReceivedHeader())
    queue.add_policy(AddDateHeader())
    queue.add_policy(AddMessageIdHeader(args.hostname))
    # An MX relay sends each message to the exchangers of its first
    # recipient's domain: one copy per domain.
    queue.add_policy(RecipientDomainSplit())
    queue.start()

    listener = socket.create_server(args.listen)
    edge = SmtpEdge(
        listener,
        queue,
        max_size=26214400,
        validator_class=Validators,
        # PLAIN and LOGIN only: CRAM-MD5 needs the plain passwords.
        auth=[b"PLAIN", b"LOGIN"],
        context=args.context,
        tls_immediately=args.smtps,
        command_timeout=300.0,
        data_timeout=600.0,
        hostname=args.hostname,
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, edge.stop, 10.0)
    edge.start()
    host, port = listener.getsockname()[:2]
    tls = "TLS from the first byte" if args.smtps else "STARTTLS"
    log.info("listening on %s:%d as %s (%s, AUTH)", host, port, edge.hostname, tls)
    log.info("%d user(s); mail goes to %s", len(args.users), destination)
    edge.join()
    queue.kill()
    log.info("stopped")


if __name__ == "__main__":
    main()
