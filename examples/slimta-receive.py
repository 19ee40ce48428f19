#!/usr/bin/env python3
"""A receiving MTA: mail for your domains, checked, queued on disk, delivered to Maildirs.

Run it from the repository root after ``pip install -e .``::

    .venv/bin/python examples/slimta-receive.py --domain example.org

and send it a message, e.g. with
``swaks --server 127.0.0.1:2525 --to alice@example.org``.

What it does, in the order a message meets it:

* :class:`Validators` decide at each SMTP command: clients listed on a DNS
  blocklist (``--dnsbl``) are refused at the greeting, recipients outside
  the ``--domain`` list get ``550 5.7.1`` (this server relays nothing), a
  local part not among ``--mailbox`` (when given) gets ``550 5.1.1``, and a
  message without a ``From:`` field gets ``550 5.6.0``;
* the :class:`~slimta.queue.Queue` stores the message durably with
  :class:`~slimta.diskstorage.DiskStorage` under ``--spool`` before the
  ``250`` reply, adding ``Received:``, and ``Date:`` and ``Message-Id:``
  when missing;
* :class:`~slimta.relay.maildir.MaildirRelay` delivers one copy per
  recipient into the Maildir ``<--maildir>/<local part>``; a failure that
  may pass (a full disk) is retried later, and one that will not is
  bounced to the sender.

SIGINT (Ctrl-C) and SIGTERM stop it gracefully; messages still queued are
delivered after the next start. ``--open-relay`` accepts every domain (and
delivers them all into the same Maildirs): for tests only.
"""

# gevent must patch the standard library before anything else imports it.
from gevent import monkey

monkey.patch_all()

import argparse
import logging
import os
import re
import signal
import socket

import gevent

from slimta.diskstorage import DiskStorage
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.policy.headers import AddDateHeader, AddMessageIdHeader, AddReceivedHeader
from slimta.queue import Queue
from slimta.relay.maildir import MaildirRelay
from slimta.util.dns import DNSResolver
from slimta.util.dnsbl import DnsBlocklistGroup, check_dnsbl

log = logging.getLogger("slimta-receive")
#: What each log line on standard error looks like.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The DNS blocklists of --dnsbl; empty, it lists nobody.
BLOCKLISTS = DnsBlocklistGroup()

#: Local parts that are safe as a directory name under --maildir.
SAFE_LOCAL_PART = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}")


class Validators(SmtpValidators):
    """The checks of one SMTP session. Each hook gets the reply the server
    is about to send and refuses by changing it."""

    #: Domains delivered here (lower case); ``None`` accepts every domain.
    domains: frozenset[str] | None = frozenset({"localhost"})
    #: Local parts that have a mailbox (lower case); ``None``: all of them.
    mailboxes: frozenset[str] | None = None

    @check_dnsbl(BLOCKLISTS, match_code="554", match_message="5.7.1 Listed on a DNS blocklist")
    def handle_banner(self, reply, address):
        pass

    def handle_rcpt(self, reply, recipient, params):
        local, at, domain = recipient.rpartition("@")
        if not at:
            # A bare <postmaster> must be accepted (RFC 5321 4.5.1).
            return
        if self.domains is not None and domain.lower() not in self.domains:
            reply.code = "550"
            reply.message = f"5.7.1 Relaying denied for <{recipient}>"
        elif not SAFE_LOCAL_PART.fullmatch(local.lower()) or (
            self.mailboxes is not None and local.lower() not in self.mailboxes | {"postmaster"}
        ):
            reply.code = "550"
            reply.message = f"5.1.1 No mailbox for <{recipient}>"

    def handle_have_data(self, reply, data):
        # RFC 5322 3.6: every message has a From: field. The header block
        # ends at the first empty line.
        header = data.split(b"\r\n\r\n", 1)[0]
        if not any(line[:5].lower() == b"from:" for line in header.split(b"\r\n")):
            reply.code = "550"
            reply.message = "5.6.0 A message needs a From: header field"


def local_mailbox(domains):
    """``mailbox_for`` of MaildirRelay: the Maildir of a local recipient, or
    ``None`` (no mailbox: ``550 5.1.1``) for a recipient of another domain
    (a bounce to a remote sender, say) and for a local part that is not
    safe as a directory name (``"../x"@example.org`` is a valid address)."""

    def mailbox_for(recipient):
        local, at, domain = recipient.rpartition("@")
        if not at:
            local = recipient  # <postmaster>
        elif domains is not None and domain.lower() not in domains:
            return None
        local = local.lower()
        return local if SAFE_LOCAL_PART.fullmatch(local) else None

    return mailbox_for


def listen_address(text):
    """``HOST:PORT`` for argparse."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:2525, got {text!r}")
    return host.strip("[]"), int(port)


def parse_args():
    parser = argparse.ArgumentParser(
        description="A receiving MTA: mail for your domains, checked, queued on disk and "
        "delivered into Maildirs.",
    )
    parser.add_argument(
        "--listen",
        type=listen_address,
        default=("127.0.0.1", 2525),
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:2525; port 0 picks a free one)",
    )
    parser.add_argument("--hostname", help="the name in the greeting (default: this host's FQDN)")
    parser.add_argument(
        "--domain",
        action="append",
        metavar="DOMAIN",
        help="a domain to accept mail for; repeat for more (default: localhost)",
    )
    parser.add_argument(
        "--mailbox",
        action="append",
        metavar="LOCALPART",
        help="a local part that has a mailbox; repeat for more (default: every local part)",
    )
    parser.add_argument(
        "--maildir", default="mail", metavar="DIR", help="the Maildirs' directory (./mail)"
    )
    parser.add_argument(
        "--spool", default="spool", metavar="DIR", help="the disk queue's directory (./spool)"
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=10485760,
        metavar="BYTES",
        help="the largest message accepted (default 10 MiB)",
    )
    parser.add_argument(
        "--dnsbl",
        action="append",
        default=[],
        metavar="ZONE",
        help="refuse clients listed on this DNS blocklist, e.g. zen.spamhaus.org",
    )
    parser.add_argument(
        "--dns-server",
        metavar="IP[:PORT]",
        help="ask this DNS server instead of /etc/resolv.conf's",
    )
    parser.add_argument(
        "--open-relay",
        action="store_true",
        help="accept mail for every domain (for tests; never on the Internet)",
    )
    args = parser.parse_args()
    if args.max_size < 1024:
        parser.error("argument --max-size: expected at least 1024 bytes")
    return args


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.dns_server:
        DNSResolver.configure(servers=[args.dns_server])
    for zone in args.dnsbl:
        BLOCKLISTS.add_dnsbl(zone)

    domains = frozenset(domain.lower() for domain in args.domain or ["localhost"])
    Validators.domains = None if args.open_relay else domains
    if args.mailbox:
        Validators.mailboxes = frozenset(local.lower() for local in args.mailbox)
    if args.open_relay:
        log.warning("--open-relay: mail for every domain is accepted, from every client")

    # MaildirRelay never creates its base directory (mail waits in the queue
    # while it is missing, say an unmounted disk), so make it here once.
    maildir = os.path.abspath(args.maildir)
    os.makedirs(maildir, exist_ok=True)
    relay = MaildirRelay(
        maildir, mailbox_for=local_mailbox(Validators.domains), hostname=args.hostname
    )

    spool = os.path.abspath(args.spool)
    storage = DiskStorage(os.path.join(spool, "env"), os.path.join(spool, "meta"))
    queue = Queue(storage, relay)
    queue.add_policy(AddReceivedHeader())
    queue.add_policy(AddDateHeader())
    queue.add_policy(AddMessageIdHeader(args.hostname))
    queue.start()

    # Bound here, so that a port in use fails at once and port 0 is logged
    # as the port the system chose.
    listener = socket.create_server(args.listen)
    edge = SmtpEdge(
        listener,
        queue,
        max_size=args.max_size,
        validator_class=Validators,
        command_timeout=300.0,  # RFC 5321 4.5.3.2.7
        data_timeout=600.0,  # RFC 5321 4.5.3.2.6
        hostname=args.hostname,
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        # No new connections; open sessions get 10 seconds to finish.
        gevent.signal_handler(signum, edge.stop, 10.0)
    edge.start()
    host, port = listener.getsockname()[:2]
    log.info("listening on %s:%d as %s", host, port, edge.hostname)
    accepted = "every domain" if args.open_relay else ", ".join(sorted(domains))
    log.info("mail for %s goes to %s/<local part>", accepted, maildir)
    edge.join()
    queue.kill()
    log.info("stopped; the queue in %s keeps what was not delivered", spool)


if __name__ == "__main__":
    main()
