#!/usr/bin/env python3
"""A small MTA: accept mail over SMTP, queue it on disk, deliver it.

Run it from the repository root after ``pip install -e .``::

    .venv/bin/python examples/slimta-receive.py [--host 127.0.0.1] [--port 2525]
        [--spool ./spool] [--mailbox ./mail | --smarthost HOST[:PORT] | --mx]
        [--hostname mx.example.org] [--domain example.org ...]

then send it a message, e.g. with ``swaks --server 127.0.0.1:2525 --to you@example.org``.

Every accepted message is first stored durably in the disk queue
(:class:`slimta.diskstorage.DiskStorage` under ``--spool``): the ``250``
reply, which names the queue id, is sent only once it is on disk, with a
``Received:`` header on top and ``Date:`` and ``Message-Id:`` added when the
client sent none (:mod:`slimta.policy.headers`). The queue then delivers
it, retrying with backoff and bouncing what fails for good:

* by default, into ``--mailbox``: one ``<id>.eml`` file per delivered
  message, with ``Return-Path`` and ``Delivered-To`` headers (a local
  mailbox, handy for trying things out);
* with ``--smarthost``, to that SMTP server (opportunistic STARTTLS);
* with ``--mx``, straight to each recipient domain's MX hosts on port 25.

Messages still queued when it stops are delivered after the next start.
SIGINT (Ctrl-C) or SIGTERM stops it gracefully.

This stands in for the ``slimta`` command until that exists. It uses the 4.0
API the way 4.0 scripts do.
"""

# gevent must patch the standard library before anything else imports it.
from gevent import monkey

monkey.patch_all()

import argparse
import logging
import os
import signal
import socket
import uuid

import gevent

from slimta.diskstorage import DiskStorage
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.envelope import Envelope
from slimta.policy.headers import AddDateHeader, AddMessageIdHeader, AddReceivedHeader
from slimta.queue import Queue
from slimta.relay import Relay, TransientRelayError
from slimta.relay.smtp.mx import MxSmtpRelay
from slimta.relay.smtp.static import StaticSmtpRelay
from slimta.smtp.reply import Reply

log = logging.getLogger("slimta-receive")


class MailboxRelay(Relay):
    """Delivers each message into a directory, one ``<id>.eml`` file each.

    The file is fsynced and renamed into place before the queue is told the
    message is delivered, so a crash never loses it.
    """

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)

    def attempt(self, envelope: Envelope, attempts: int) -> Reply:
        name = uuid.uuid4().hex
        trace = f"Return-Path: <{envelope.sender}>\r\n"
        trace += "".join(f"Delivered-To: {rcpt}\r\n" for rcpt in envelope.recipients)
        data = trace.encode("utf-8") + b"".join(envelope.flatten())
        try:
            # The writes block: gevent's thread pool keeps the sessions going.
            gevent.get_hub().threadpool.apply(self._write, (name, data))
        except OSError as exc:
            # Transient: the queue keeps the message and tries again later.
            raise TransientRelayError(
                f"Cannot write to the mailbox: {exc}", Reply("450", "4.3.0 Mailbox unavailable")
            ) from exc
        log.info("delivered to %s", os.path.join(self.directory, name + ".eml"))
        return Reply("250", f"2.0.0 Delivered as {name}")

    def _write(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self.directory, f".{name}.tmp")
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.rename(tmp, os.path.join(self.directory, name + ".eml"))
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class Validators(SmtpValidators):
    """Per-session checks: each hook may change the reply it is given."""

    #: Domains mail is accepted for (lower case); empty accepts every domain.
    domains: frozenset[str] = frozenset()

    def handle_rcpt(self, reply: Reply, recipient: str, params: dict[bytes, bytes | bool]) -> None:
        _, at, domain = recipient.rpartition("@")
        # <postmaster> alone has no domain and must be accepted (RFC 5321 4.5.1).
        if at and self.domains and domain.lower() not in self.domains:
            reply.code = "550"
            reply.message = f"5.7.1 Recipient <{recipient}> Not allowed"


def build_relay(args: argparse.Namespace) -> tuple[Relay, str]:
    """The relay the options ask for, and a description for the log."""
    if args.smarthost:
        host, colon, port = args.smarthost.rpartition(":")
        if not colon:
            host, port = args.smarthost, "25"
        relay = StaticSmtpRelay(host, int(port), pool_size=20, idle_timeout=10.0)
        return relay, f"smarthost {host}:{port}"
    if args.mx:
        return MxSmtpRelay(idle_timeout=10.0), "MX hosts (port 25)"
    return MailboxRelay(args.mailbox), f"mailbox {os.path.abspath(args.mailbox)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=2525, help="port to listen on (0: any)")
    parser.add_argument("--spool", default="spool", help="directory of the disk queue")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--mailbox", default="mail", help="deliver into this directory (default)")
    where.add_argument("--smarthost", help="deliver to this SMTP server, HOST[:PORT]")
    where.add_argument("--mx", action="store_true", help="deliver to the recipients' MX hosts")
    parser.add_argument("--hostname", help="name in the greeting (default: this host's FQDN)")
    parser.add_argument(
        "--domain",
        action="append",
        default=[],
        help="accept mail only for this domain (repeat for more; default: any)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    Validators.domains = frozenset(domain.lower() for domain in args.domain)
    spool = os.path.abspath(args.spool)
    store = DiskStorage(os.path.join(spool, "env"), os.path.join(spool, "meta"))
    relay, destination = build_relay(args)
    queue = Queue(store, relay)
    queue.add_policy(AddDateHeader())
    queue.add_policy(AddMessageIdHeader(args.hostname))
    queue.add_policy(AddReceivedHeader())
    queue.start()
    # Bind here rather than passing (host, port), so that an address in use
    # fails at once and the log shows the real port when --port is 0.
    listener = socket.create_server((args.host, args.port))
    edge = SmtpEdge(
        listener,
        queue,
        max_size=10485760,
        validator_class=Validators,
        command_timeout=300.0,
        data_timeout=600.0,
        hostname=args.hostname,
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Stop accepting, give open sessions 10 seconds, then close them.
        gevent.signal_handler(signum, edge.stop, 10.0)
    edge.start()
    host, port = listener.getsockname()[:2]
    log.info(
        "listening on %s:%d as %s, queue in %s, delivering to %s",
        host,
        port,
        edge.hostname,
        spool,
        destination,
    )
    edge.join()
    queue.kill()
    log.info("stopped")


if __name__ == "__main__":
    main()
