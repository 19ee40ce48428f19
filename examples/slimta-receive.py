#!/usr/bin/env python3
"""A receiving MTA: accept mail over SMTP and spool each message to a file.

Run it from the repository root after ``pip install -e .``::

    .venv/bin/python examples/slimta-receive.py [--host 127.0.0.1] [--port 2525]
        [--spool ./spool] [--hostname mx.example.org] [--domain example.org ...]

then send it a message, e.g. with ``swaks --server 127.0.0.1:2525 --to you@example.org``.
Each accepted message becomes ``<spool>/<id>.eml``, where ``<id>`` is the queue
id named in the ``250`` reply. SIGINT (Ctrl-C) or SIGTERM stops it gracefully.

This stands in for the ``slimta`` command until that exists. It uses the 4.0
API as 4.0 scripts do; ``SpoolQueue`` plays the part of
:class:`slimta.queue.Queue`, which arrives in a later release.
"""

# gevent must patch the standard library before anything else imports it.
from gevent import monkey

monkey.patch_all()

import argparse
import logging
import os
import signal
import socket
import tempfile
import uuid

import gevent

from slimta.core import SlimtaError
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.envelope import Envelope
from slimta.smtp.reply import Reply

log = logging.getLogger("slimta-receive")


class SpoolError(SlimtaError):
    """Enqueueing failed; the edge sends :attr:`reply` to the client."""

    def __init__(self) -> None:
        super().__init__("Error queuing message")
        self.reply = Reply("451", "4.3.0 Error queuing message")


class SpoolQueue:
    """A queue-like object: anything with ``enqueue(envelope)`` can serve an edge.

    Each message is written durably before the client is told ``250``: to a
    temporary file in the spool directory, flushed and fsynced, renamed to
    ``<id>.eml`` (atomic within one file system), then the directory is
    fsynced so that the rename survives a crash.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str | SpoolError]]:
        """Spool *envelope*; return ``[(envelope, id)]``, or an error in place of the id."""
        queue_id = uuid.uuid4().hex
        trace = f"Return-Path: <{envelope.sender}>\r\n"
        trace += f"X-Envelope-To: {', '.join(envelope.recipients)}\r\n"
        data = trace.encode("utf-8") + b"".join(envelope.flatten())
        try:
            # fsync blocks; run it in gevent's thread pool so that the other
            # sessions go on meanwhile.
            gevent.get_hub().threadpool.apply(self._write, (queue_id, data))
        except OSError:
            log.exception("could not spool a message from <%s>", envelope.sender)
            # The edge answers with the error's reply instead of 250; the
            # client keeps the message and tries again later.
            return [(envelope, SpoolError())]
        log.info(
            "queued %s from <%s> for %d recipient(s)",
            queue_id,
            envelope.sender,
            len(envelope.recipients),
        )
        return [(envelope, queue_id)]

    def _write(self, queue_id: str, data: bytes) -> None:
        fd, tmp_path = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.rename(tmp_path, os.path.join(self.directory, queue_id + ".eml"))
        except BaseException:
            os.unlink(tmp_path)
            raise
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=2525, help="port to listen on (0: any)")
    parser.add_argument("--spool", default="spool", help="directory for received messages")
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
    queue = SpoolQueue(args.spool)
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
    log.info("listening on %s:%d as %s, spooling to %s", host, port, edge.hostname, queue.directory)
    edge.join()
    log.info("stopped")


if __name__ == "__main__":
    main()
