#!/usr/bin/env python3
"""Mail over HTTP: each POST request carries one message, delivered into Maildirs.

The receiving end of :class:`~slimta.relay.http.HttpRelay`, or of any web
application that sends mail without speaking SMTP. Run it from the
repository root after ``pip install -e .``::

    .venv/bin/python examples/slimta-http.py --domain example.org --api-key-file keys.txt

and post a message: the envelope travels in headers, each address base64
encoded (UTF-8)::

    curl -i http://127.0.0.1:8025/message -H 'Content-Type: message/rfc822' \\
        -H "X-Api-Key: $(head -1 keys.txt)" \\
        -H "X-Envelope-Sender: $(printf me@example.com | base64)" \\
        -H "X-Envelope-Recipient: $(printf alice@example.org | base64)" \\
        --data-binary @message.eml

An accepted message gets ``204 No Content`` with ``X-Smtp-Reply: 250; ...``
and its ``X-Queue-Id``:

* :class:`Validators` check the ``X-Api-Key`` header against the keys of
  ``--api-key-file`` (``401``), and accept only recipients in the
  ``--domain`` list (``403``, ``550 5.7.1``); ``--open-relay`` accepts
  every domain, for tests;
* :class:`~slimta.edge.wsgi.WsgiEdge` itself refuses what is malformed, too
  big (``--max-size``, ``413``) or sent to another path than ``/message``;
* the :class:`~slimta.queue.Queue` stores the message on disk (``--spool``)
  before answering, adds ``Received:``, ``Date:`` and ``Message-Id:``, and
  :class:`~slimta.relay.maildir.MaildirRelay` delivers it into the Maildir
  ``<--maildir>/<local part>``.

``--cert`` and ``--key`` make it HTTPS. SIGINT (Ctrl-C) and SIGTERM stop it
gracefully.
"""

# gevent must patch the standard library before anything else imports it.
from gevent import monkey

monkey.patch_all()

import argparse
import hmac
import logging
import os
import re
import signal
import socket
import ssl

import gevent

from slimta.diskstorage import DiskStorage
from slimta.edge.wsgi import WsgiEdge, WsgiResponse, WsgiValidators
from slimta.policy.headers import AddDateHeader, AddMessageIdHeader, AddReceivedHeader
from slimta.queue import Queue
from slimta.relay.maildir import MaildirRelay

log = logging.getLogger("slimta-http")
#: What each log line on standard error looks like.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def refuse(status, code, message):
    """A :class:`WsgiResponse` carrying an SMTP reply, as WsgiEdge's own do."""
    quoted = message.replace("\\", "\\\\").replace('"', '\\"')  # an RFC 9110 quoted-string
    headers = [("X-Smtp-Reply", f'{code}; message="{quoted}"'), ("Content-Type", "text/plain")]
    return WsgiResponse(status, headers, [message.encode("utf-8") + b"\n"])


class Validators(WsgiValidators):
    """The checks of one request, before its body is read."""

    custom_headers = ["X-Api-Key"]
    #: The accepted keys, as bytes; ``None``: no key needed.
    api_keys: list[bytes] | None = None
    #: Domains delivered here (lower case); ``None``: every domain.
    domains: frozenset[str] | None = frozenset({"localhost"})

    def validate_custom(self, name, value):
        if name == "X-Api-Key" and self.api_keys is not None:
            given = (value or "").encode("utf-8")
            # Every key compared, in constant time each, so the answer's
            # timing says nothing about which key came close.
            if not any([hmac.compare_digest(given, key) for key in self.api_keys]):
                raise refuse("401 Unauthorized", "535", "5.7.8 A valid X-Api-Key is required")

    def validate_recipient(self, recipient):
        _, at, domain = recipient.rpartition("@")
        if at and self.domains is not None and domain.lower() not in self.domains:
            raise refuse("403 Forbidden", "550", f"5.7.1 Relaying denied for <{recipient}>")


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
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:8025, got {text!r}")
    return host.strip("[]"), int(port)


def parse_args():
    parser = argparse.ArgumentParser(
        description="Mail over HTTP: each POST request carries one message, delivered into "
        "Maildirs.",
    )
    parser.add_argument(
        "--listen",
        type=listen_address,
        default=("127.0.0.1", 8025),
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:8025; port 0 picks a free one)",
    )
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="requests need an X-Api-Key header holding one of this file's lines",
    )
    parser.add_argument(
        "--domain",
        action="append",
        metavar="DOMAIN",
        help="a domain to accept mail for; repeat for more (default: localhost)",
    )
    parser.add_argument("--cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--key", metavar="FILE", help="and this private key (PEM)")
    parser.add_argument(
        "--max-size",
        type=int,
        default=10485760,
        metavar="BYTES",
        help="the largest message accepted (default 10 MiB)",
    )
    parser.add_argument("--hostname", help="this server's name (default: this host's FQDN)")
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
    if args.max_size < 1024:
        parser.error("argument --max-size: expected at least 1024 bytes")

    args.api_keys = None
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as file:
                keys = [line.strip().encode("utf-8") for line in file if line.strip()]
        except OSError as exc:
            parser.error(f"argument --api-key-file: {exc}")
        if not keys:
            parser.error(f"argument --api-key-file: no key in {args.api_key_file}")
        args.api_keys = keys

    args.context = None
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(args.cert, args.key)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"argument --cert/--key: cannot load the certificate and key: {exc}")
        args.context = context
    return args


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    domains = frozenset(domain.lower() for domain in args.domain or ["localhost"])
    Validators.domains = None if args.open_relay else domains
    Validators.api_keys = args.api_keys
    if args.open_relay:
        log.warning("--open-relay: mail for every domain is accepted")
    if args.api_keys is None:
        log.warning(
            "no --api-key-file: any client may post mail for %s", ", ".join(sorted(domains))
        )

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

    listener = socket.create_server(args.listen)
    edge = WsgiEdge(
        queue,
        args.hostname,
        Validators,
        r"/message$",
        listener=listener,
        context=args.context,
        max_size=args.max_size,
        timeout=60.0,
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, edge.stop, 10.0)
    edge.start()
    host, port = listener.getsockname()[:2]
    scheme = "https" if args.context else "http"
    log.info("listening on %s:%d, POST %s://%s:%d/message", host, port, scheme, host, port)
    edge.join()
    queue.kill()
    log.info("stopped")


if __name__ == "__main__":
    main()
