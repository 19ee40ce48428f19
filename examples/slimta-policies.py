#!/usr/bin/env python3
"""Queue policies at work: split, a policy of your own, forwarding, trace headers and DKIM.

A receiving MTA for your domains (as ``slimta-receive.py``) whose queue
changes each message before storing it. Run it from the repository root
after ``pip install -e .``::

    .venv/bin/python examples/slimta-policies.py --domain example.org \\
        --forward '^(postmaster|abuse)@' 'alice@' \\
        --dkim-domain example.org --dkim-selector mail --dkim-key dkim.pem

Queue policies run once per message, in the order they were added, before
the message is stored; each may change the envelope or split it:

1. :class:`~slimta.policy.split.RecipientSplit` makes one copy per
   recipient, so that the next policy can write each copy's own header;
2. :class:`AddOriginalTo`, written here, records the address the copy was
   sent to in ``X-Original-To:``, before forwarding rewrites it;
3. :class:`~slimta.policy.forward.Forward` rewrites recipients with the
   ``--forward PATTERN REPLACEMENT`` regular expressions (the first that
   matches wins);
4. :mod:`slimta.policy.headers` add ``Received:``, and ``Date:`` and
   ``Message-Id:`` when missing;
5. :class:`~slimta.policy.dkim.DkimSign` signs mail whose ``From:`` is in
   ``--dkim-domain`` (needs the ``dkim`` extra: ``pip install -e
   '.[dkim]'``). It comes last: the signature covers the final headers.

Delivery is into the Maildirs ``<--maildir>/<local part>``; a message
forwarded to another domain bounces here (``550 5.1.1``), since this
script delivers locally only (see ``slimta-mx.py`` for a relay that goes
further). In a real MTA, signing belongs on the queue of the outgoing
server (``slimta-submission.py``); here the result is easy to look at.
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
from slimta.policy import QueuePolicy
from slimta.policy.forward import Forward
from slimta.policy.headers import AddDateHeader, AddMessageIdHeader, AddReceivedHeader
from slimta.policy.split import RecipientSplit
from slimta.queue import Queue
from slimta.relay.maildir import MaildirRelay

log = logging.getLogger("slimta-policies")
#: What each log line on standard error looks like.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class AddOriginalTo(QueuePolicy):
    """Prepends ``X-Original-To: <recipient>`` to a message with one recipient.

    A queue policy is any :class:`~slimta.policy.QueuePolicy` whose
    ``apply(envelope)`` changes the envelope in place (and returns
    ``None``), or returns the envelopes to queue instead of it.
    """

    def apply(self, envelope):
        if len(envelope.recipients) == 1:
            envelope.prepend_header("X-Original-To", envelope.recipients[0])


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


#: Local parts that are safe as a directory name under --maildir.
SAFE_LOCAL_PART = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}")


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
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:2529, got {text!r}")
    return host.strip("[]"), int(port)


def parse_args():
    parser = argparse.ArgumentParser(
        description="Queue policies at work: split, a policy of your own, forwarding, trace "
        "headers and DKIM signing, before delivery into Maildirs.",
    )
    parser.add_argument(
        "--listen",
        type=listen_address,
        default=("127.0.0.1", 2529),
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:2529; port 0 picks a free one)",
    )
    parser.add_argument(
        "--domain",
        action="append",
        metavar="DOMAIN",
        help="a domain to accept mail for; repeat for more (default: localhost)",
    )
    parser.add_argument(
        "--forward",
        nargs=2,
        action="append",
        default=[],
        metavar=("PATTERN", "REPLACEMENT"),
        help="rewrite recipients matching this regular expression (re.sub); repeat for more",
    )
    dkim = parser.add_argument_group("DKIM signing (all three, or none)")
    dkim.add_argument("--dkim-domain", metavar="DOMAIN", help="the signing domain (d=)")
    dkim.add_argument("--dkim-selector", metavar="SELECTOR", help="the selector (s=)")
    dkim.add_argument("--dkim-key", metavar="FILE", help="the private key (PEM)")
    dkim.add_argument(
        "--dkim-algorithm",
        choices=("rsa-sha256", "ed25519-sha256"),
        default="rsa-sha256",
        help="the signing algorithm (default rsa-sha256)",
    )
    parser.add_argument("--hostname", help="the name in the greeting (default: this host's FQDN)")
    parser.add_argument(
        "--maildir", default="mail", metavar="DIR", help="the Maildirs' directory (./mail)"
    )
    parser.add_argument(
        "--spool", default="spool", metavar="DIR", help="the disk queue's directory (./spool)"
    )
    parser.add_argument(
        "--open-relay",
        action="store_true",
        help="accept mail for every domain (for tests; never on the Internet)",
    )
    args = parser.parse_args()

    args.forward_mappings = []
    for pattern, replacement in args.forward:
        try:
            args.forward_mappings.append((re.compile(pattern), replacement))
        except re.error as exc:
            parser.error(f"argument --forward: {pattern!r} is not a regular expression: {exc}")

    args.dkim = None
    given = [args.dkim_domain, args.dkim_selector, args.dkim_key]
    if any(given) and not all(given):
        parser.error("--dkim-domain, --dkim-selector and --dkim-key go together")
    if all(given):
        try:
            from slimta.policy.dkim import DkimSign

            args.dkim = DkimSign(
                args.dkim_selector, args.dkim_domain, args.dkim_key, algorithm=args.dkim_algorithm
            )
        except ImportError as exc:
            parser.error(f"DKIM needs the dkim extra (pip install -e '.[dkim]'): {exc}")
        except (OSError, ValueError) as exc:
            parser.error(f"argument --dkim-key: {exc}")
    return args


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    domains = frozenset(domain.lower() for domain in args.domain or ["localhost"])
    Validators.domains = None if args.open_relay else domains
    if args.open_relay:
        log.warning("--open-relay: mail for every domain is accepted, from every client")

    maildir = os.path.abspath(args.maildir)
    os.makedirs(maildir, exist_ok=True)
    relay = MaildirRelay(
        maildir, mailbox_for=local_mailbox(Validators.domains), hostname=args.hostname
    )

    spool = os.path.abspath(args.spool)
    storage = DiskStorage(os.path.join(spool, "env"), os.path.join(spool, "meta"))
    queue = Queue(storage, relay)
    queue.add_policy(RecipientSplit())
    queue.add_policy(AddOriginalTo())
    if args.forward_mappings:
        forward = Forward()
        for pattern, replacement in args.forward_mappings:
            forward.add_mapping(pattern, replacement)
        queue.add_policy(forward)
    queue.add_policy(AddReceivedHeader())
    queue.add_policy(AddDateHeader())
    queue.add_policy(AddMessageIdHeader(args.hostname))
    if args.dkim is not None:
        queue.add_policy(args.dkim)
    queue.start()

    listener = socket.create_server(args.listen)
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
        gevent.signal_handler(signum, edge.stop, 10.0)
    edge.start()
    host, port = listener.getsockname()[:2]
    log.info("listening on %s:%d as %s", host, port, edge.hostname)
    signing = f"signed for {args.dkim_domain}" if args.dkim else "not signed"
    log.info("%d forward rule(s); mail is %s", len(args.forward_mappings), signing)
    edge.join()
    queue.kill()
    log.info("stopped")


if __name__ == "__main__":
    main()
