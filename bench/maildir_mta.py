#!/usr/bin/env python3
"""Benchmark MTA, this project's slimta: SmtpEdge -> Queue(DiskStorage) ->
MaildirRelay.

With --threadpool (an experiment) each delivery attempt runs in gevent's
threadpool instead of the hub. Every message is fsynced into the queue before the 250, then delivered into
``<--mail-dir>/<local part>/new/`` (fsync of the file and of ``new/``) and
removed from the queue. Run by bench/maildir_pipeline.py; the command line
and the driver protocol are in maildir_mta_common.py.

    .venv/bin/python bench/maildir_mta.py --port 2525 --mail-dir /tmp/m \
        --spool-dir /tmp/s --stats-file /tmp/stats.json
"""

import os
import sys

import maildir_mta_common as common  # monkey-patches; import it before slimta


def threadpool_relay(base):
    """The experiment --threadpool measures: each attempt in gevent's threadpool,
    so the hub keeps serving SMTP while a delivery waits for the disk."""
    import gevent

    from slimta.relay.maildir import MaildirRelay

    class ThreadpoolMaildirRelay(MaildirRelay):
        def attempt(self, envelope, attempts):
            pool = gevent.get_hub().threadpool
            return pool.apply(MaildirRelay.attempt, (self, envelope, attempts))

    return ThreadpoolMaildirRelay(base, hostname=common.EDGE_HOSTNAME)


def main(argv=None):
    threadpool = "--threadpool" in (argv if argv is not None else sys.argv[1:])
    if threadpool:
        argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--threadpool"]
    args = common.parse_args(__doc__.splitlines()[0], argv)
    print(f"PID {os.getpid()}", flush=True)
    if not args.spool_dir:
        print("--spool-dir is required", file=sys.stderr)
        return 2

    from slimta.diskstorage import DiskStorage
    from slimta.relay.maildir import MaildirRelay

    storage = DiskStorage(os.path.join(args.spool_dir, "env"), os.path.join(args.spool_dir, "meta"))
    counters = common.Counters("maildir", storage, "disk")
    if threadpool:
        relay = threadpool_relay(args.mail_dir)
    else:
        relay = MaildirRelay(args.mail_dir, hostname=common.EDGE_HOSTNAME)
    common.serve(args, relay, storage, counters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
