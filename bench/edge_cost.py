#!/usr/bin/env python
"""What receiving one message costs in the SMTP edge, without queue or relay work.

Starts ``SmtpEdge(("127.0.0.1", port), queue, hostname="bench")`` in this
process, with the PTR lookup of each client turned off (no DNS) and a
queue-like object whose ``enqueue(envelope)`` accepts every message at once.
The load comes from Postfix's ``smtp-source`` in a separate process (one
1 KiB message, one recipient each, ``--sessions`` sessions at a time), so
that the measurements below count the server alone:

  --shape conn      one message per connection (connect, banner, EHLO, MAIL,
                    RCPT, DATA, QUIT)
  --shape session   many messages per connection (smtp-source -d)

A warm-up of 200 messages comes first. Over the measured ``--messages``
(from starting smtp-source until every message is queued and smtp-source
has exited) it prints msg/s and this process's CPU time per message.

Instructions per message, which CPU speed and load hardly move: run it under
callgrind twice and divide the difference by the difference in messages
(callgrind does not follow smtp-source unless asked to)::

    taskset -c 1 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/edge_cost.py --shape conn --messages 300
    taskset -c 1 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/edge_cost.py --shape conn --messages 1300

(``Collected`` in valgrind's summary; (second - first) / 1000.) Unlike the
relay's, the edge's count depends on how soon smtp-source's next bytes
arrive: a read that finds nothing yet costs an EAGAIN and a trip through the
hub. ``taskset`` puts the server and smtp-source (which inherits the
affinity) on one CPU, which makes that race repeatable: pairs of runs then
agree within about 1.5%, against 4% (conn) to 17% (session) unpinned.
Compare only figures taken the same way, and repeat each pair a few times.
Another checkout's code can be measured with ``PYTHONPATH=<its src>`` or
with an interpreter that has it installed.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import resource
import shutil
import socket
import subprocess
import sys
import time

import gevent
from gevent.event import Event
from smtpsink import free_port

from slimta.edge.smtp import SmtpEdge
from slimta.envelope import Envelope

WARM_UP = 200


class CountingQueue:
    """Accepts every envelope at once and counts them.

    :meth:`expect` returns an event that is set when the count reaches the
    given total.
    """

    def __init__(self) -> None:
        self.count = 0
        self._target = 0
        self._reached = Event()

    def expect(self, total: int) -> Event:
        self._target = total
        self._reached = Event()
        if self.count >= total:
            self._reached.set()
        return self._reached

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str]]:
        self.count += 1
        if self.count == self._target:
            self._reached.set()
        return [(envelope, f"bench-{self.count}")]


def wait_until_listening(port: int, timeout: float = 30.0) -> None:
    """Wait until the edge greets on *port*; the probe session says QUIT."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                reader = sock.makefile("rb")
                banner = reader.readline()
                sock.sendall(b"QUIT\r\n")
                reader.readline()
                reader.close()
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise SystemExit(f"edge_cost: the edge did not listen on port {port}") from None
            gevent.sleep(0.01)
            continue
        if not banner.startswith(b"220"):
            raise SystemExit(f"edge_cost: unexpected banner {banner!r}")
        return


def send(
    source: str,
    port: int,
    shape: str,
    messages: int,
    sessions: int,
    size: int,
    timeout: float,
    queue: CountingQueue,
) -> None:
    """Send *messages* with smtp-source and wait until all are queued and it exited."""
    target = queue.count + messages
    reached = queue.expect(target)
    cmd = [
        source,
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-M",
        "localhost",
        "-f",
        "a@example.com",
        "-t",
        "b@example.com",
    ]
    if shape == "session":
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{port}")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    finished = gevent.spawn(proc.communicate)
    gevent.wait([reached, finished], timeout=timeout, count=1)
    if not reached.is_set():
        if not finished.ready():
            proc.kill()
            finished.join()
        stderr = (finished.value or (b"", b""))[1] or b""
        raise SystemExit(
            f"edge_cost: {queue.count} messages queued, {target} expected; "
            f"smtp-source rc={proc.returncode}: {stderr.decode(errors='replace').strip()[-500:]}"
        )
    finished.join(timeout=timeout)
    if not finished.ready():
        proc.kill()
        finished.join()
        raise SystemExit(f"edge_cost: smtp-source did not exit within {timeout}s")
    if proc.returncode != 0:
        stderr = finished.value[1] or b""
        raise SystemExit(
            f"edge_cost: smtp-source rc={proc.returncode}: "
            f"{stderr.decode(errors='replace').strip()[-500:]}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--shape", choices=("conn", "session"), default="conn")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s")
    parser.add_argument("--size", type=int, default=1024, help="smtp-source -l")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="limit for each smtp-source run (seconds)"
    )
    args = parser.parse_args()
    source = shutil.which("smtp-source") or shutil.which("smtp-source", path="/usr/sbin")
    if source is None:
        print(
            "edge_cost: smtp-source not found; install Debian's postfix "
            "(apt-get install -y postfix, or bench/harness/install_tools.sh)",
            file=sys.stderr,
        )
        return 2
    if not hasattr(SmtpEdge, "ptr_lookup"):
        print("edge_cost: warning: SmtpEdge has no ptr_lookup attribute", file=sys.stderr)

    port = free_port()
    queue = CountingQueue()
    edge = SmtpEdge(("127.0.0.1", port), queue, hostname="bench")
    edge.ptr_lookup = False
    edge.start()
    try:
        wait_until_listening(port)
        send(source, port, args.shape, WARM_UP, args.sessions, args.size, args.timeout, queue)
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        send(source, port, args.shape, args.messages, args.sessions, args.size, args.timeout, queue)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        edge.kill()
    expected = WARM_UP + args.messages
    if queue.count != expected:
        print(f"edge_cost: {queue.count} messages queued, {expected} expected", file=sys.stderr)
        return 1
    user = after.ru_utime - before.ru_utime
    system = after.ru_stime - before.ru_stime
    per_message = 1e6 / args.messages
    print(
        f"{args.shape}: {args.messages / elapsed:.0f} msg/s, "
        f"CPU {(user + system) * per_message:.0f} us/msg "
        f"(user {user * per_message:.0f}, system {system * per_message:.0f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
