#!/usr/bin/env python3
"""Benchmark MTA, python-slimta 5.0.5: SmtpEdge -> Queue(DictStorage) ->
PipeRelay running ``cat > <--mail-dir>/<n>`` for each recipient.

python-slimta has no Maildir relay; local delivery there is a program run by
its PipeRelay, here the smallest one: a shell that execs ``cat`` into a new
file. Nothing is fsynced (its DiskStorage needs pyaio, which the anchor venv
lacks, so the queue is in memory too). Run by bench/maildir_pipeline.py; the
command line and the driver protocol are in maildir_mta_common.py.

    ~/.cache/slimta-bench/anchor-venv/bin/python bench/maildir_mta_anchor.py \
        --port 2525 --mail-dir /tmp/m --stats-file /tmp/stats.json
"""

import itertools
import os
import sys

import maildir_mta_common as common  # monkey-patches; import it before slimta

#: The delivery program: $0 is the directory, $1 a number unique in this
#: process (so no two deliveries share a file, whatever the PIDs do).
DELIVER = 'exec cat > "$0/$1"'


def cat_relay(directory):
    from slimta.relay.pipe import PipeRelay

    class CatRelay(PipeRelay):
        """PipeRelay whose last argument is a fresh serial number."""

        def __init__(self):
            super().__init__(["/bin/sh", "-c", DELIVER, directory])
            self.serial = itertools.count(1)

        def _process_args(self, env, rcpt):
            return [*super()._process_args(env, rcpt), str(next(self.serial))]

    return CatRelay()


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    print(f"PID {os.getpid()}", flush=True)

    from slimta.queue.dict import DictStorage

    storage = DictStorage()
    counters = common.Counters("pipe-cat", storage, "dict")
    common.serve(args, cat_relay(args.mail_dir), storage, counters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
