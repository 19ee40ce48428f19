"""Moving bytes over one connected socket: the only I/O path of the SMTP adapters.

:class:`SocketIO` is used by the server adapter (:mod:`slimta.smtp.server`)
and the client adapter (:mod:`slimta.smtp.client`) for every read and write
of a session; :class:`~slimta.smtp.io.IO` uses :func:`recv_or_lost` and
:func:`send_or_lost`. One rule maps errors, here and nowhere else: the end of
the stream and a reset, broken pipe or abort by the peer raise
:class:`~slimta.smtp.ConnectionLost` (the normal end of a session a peer
walked away from); a timeout raises :class:`TimeoutError`; any other
:class:`OSError` is a real fault and propagates for the caller to log.

gevent internals, and what they buy
-----------------------------------
On a plain gevent socket, :class:`SocketIO` reads and writes the inner
non-blocking socket (``sock._sock``) itself and, only when that would block,
waits on the socket's own io watchers (``sock._wait(sock._read_event)``)
under a raw libev timer (:class:`BoundedWait`) rather than a
:class:`gevent.Timeout`. gevent's ``recv``/``sendall`` cost a ``getsockopt``
per ``sendall`` and a Timeout object per wait. TLS sockets and anything
that is not a plain gevent socket go through their own blocking methods
with a socket timeout.

Measured with ``bench/edge_cost.py --shape session`` under callgrind (two
runs pinned to one CPU, 2026-12-06): the edge spent about 450,000
instructions per message with every read and write through gevent's socket
methods (``inner_socket`` forced to ``None``) and about 363,000 with this
path, a fifth less.
"""

from __future__ import annotations

import errno
import ssl
import time
from collections.abc import Callable
from typing import Any

import gevent

from slimta.smtp import ConnectionLost

__all__ = [
    "RECV_SIZE",
    "BoundedWait",
    "LoopWait",
    "SocketIO",
    "inner_socket",
    "recv_or_lost",
    "send_or_lost",
]

#: Bytes asked of the socket per read.
RECV_SIZE = 65536
#: Errors by which the peer ended the connection.
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


def _raise_if_reset(exc: OSError) -> None:
    """Raise :class:`ConnectionLost` for a reset; the caller re-raises the rest."""
    if exc.errno in _RESET_ERRNOS:
        raise ConnectionLost() from exc


def recv_or_lost(sock: Any) -> bytes:
    """One ``recv`` of up to :data:`RECV_SIZE` bytes from *sock*.

    :raises ConnectionLost: on end of stream or a reset.
    :raises BlockingIOError: from a non-blocking socket with nothing to read.
    """
    try:
        data: bytes = sock.recv(RECV_SIZE)
    except OSError as exc:
        _raise_if_reset(exc)
        raise
    if not data:
        raise ConnectionLost()
    return data


def send_or_lost(sock: Any, data: bytes) -> None:
    """``sendall`` *data* on *sock*.

    :raises ConnectionLost: when the peer reset or closed the connection.
    """
    try:
        sock.sendall(data)
    except OSError as exc:
        _raise_if_reset(exc)
        raise


def _positive(timeout: float | None) -> float | None:
    """*timeout* for ``settimeout()``; :class:`TimeoutError` once it ran out."""
    if timeout is not None and timeout <= 0:
        raise TimeoutError("timed out")
    return timeout


class _WaitExpired(Exception):
    """Thrown into a greenlet when the timer bounding its wait fires."""


def _expire(glet: Any) -> None:
    glet.throw(_WaitExpired)


class BoundedWait:
    """Runs a blocking wait (such as a gevent socket's ``_wait`` on one of
    its io watchers) for at most a given time.

    A libev timer throws into the waiting greenlet, which is cheaper than a
    :class:`gevent.Timeout` and leaves the socket's own timeout alone. The
    timer is kept while the bound stays the same (an edge session parks
    after the same idle time again and again).
    """

    __slots__ = ("_after", "_timer")

    def __init__(self) -> None:
        self._timer: Any = None
        self._after: float | None = None

    def wait(self, timeout: float | None, block: Callable[..., None], *args: Any) -> None:
        """Call ``block(*args)``, giving up after *timeout* seconds (``None``:
        no bound).

        :raises TimeoutError: the time ran out.
        """
        if timeout is None:
            block(*args)
            return
        if timeout <= 0:
            raise TimeoutError("timed out")
        timer = self._timer
        if timer is None or self._after != timeout:
            if timer is not None:
                timer.close()
            timer = self._timer = gevent.get_hub().loop.timer(timeout)
            self._after = timeout
        timer.start(_expire, gevent.getcurrent())
        try:
            block(*args)
        except _WaitExpired:
            raise TimeoutError("timed out") from None
        finally:
            timer.stop()


class LoopWait:
    """Waits in the event loop, not in a greenlet, for a socket to become
    readable or for a time to pass; then calls back once, in the hub.

    This is how an idle SMTP session is parked: two raw libev watchers cost
    far less memory than a greenlet blocked in ``recv`` (bench/README.md,
    idle connections held).

    :param fileno: the socket's file descriptor.
    :param timeout: seconds until ``callback(True)``; ``None`` for no limit.
    :param callback: called with ``False`` when the socket is readable (or
        closed), ``True`` when the time ran out.
    """

    __slots__ = ("_callback", "_io", "_timer")

    def __init__(
        self, fileno: int, timeout: float | None, callback: Callable[[bool], None]
    ) -> None:
        loop = gevent.get_hub().loop
        self._callback: Callable[[bool], None] | None = callback
        self._io: Any = loop.io(fileno, 1)
        self._timer: Any = loop.timer(timeout) if timeout is not None else None
        self._io.start(self._fire, False)
        if self._timer is not None:
            self._timer.start(self._fire, True)

    def _fire(self, timed_out: bool) -> None:
        callback = self._callback
        self.cancel()
        if callback is not None:
            callback(timed_out)

    def cancel(self) -> None:
        """Stop waiting; the callback will not run. Safe to call again."""
        self._callback = None
        for watcher in (self._io, self._timer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self._io = self._timer = None


def inner_socket(sock: Any) -> Any:
    """The non-blocking socket inside a plain gevent socket, else ``None``."""
    raw = getattr(sock, "_sock", None)
    if raw is None or not hasattr(sock, "_wait") or isinstance(sock, ssl.SSLSocket):
        return None
    return raw


class SocketIO:
    """Reads and writes one connected socket, each call bounded by a timeout.

    :param sock: a connected socket; :meth:`use` replaces it (after a TLS
        handshake).
    """

    __slots__ = ("_bounded", "_raw", "_read_event", "_wait", "_write_event", "sock")

    def __init__(self, sock: Any) -> None:
        self._bounded = BoundedWait()
        self.use(sock)

    def use(self, sock: Any) -> None:
        """Read and write *sock* from now on."""
        self.sock = sock
        raw = self._raw = inner_socket(sock)
        if raw is not None:
            self._wait = sock._wait
            self._read_event = sock._read_event
            self._write_event = sock._write_event

    @property
    def direct(self) -> bool:
        """True when reads and writes bypass gevent's socket methods."""
        return self._raw is not None

    def recv_nowait(self) -> bytes | None:
        """What a plain socket has to read now, or ``None`` without waiting
        (always ``None`` on a TLS or foreign socket)."""
        raw = self._raw
        if raw is None:
            return None
        try:
            return recv_or_lost(raw)
        except BlockingIOError:
            return None

    def recv(self, timeout: float | None, wait_first: bool = False) -> bytes:
        """Read what arrives, waiting at most *timeout* seconds for it.

        :param wait_first: nothing can be there yet (the caller just tried,
            or just sent what the peer must answer): wait before reading.
        :raises TimeoutError: nothing arrived in time.
        :raises ConnectionLost: end of stream or a reset.
        """
        raw = self._raw
        if raw is None:
            sock = self.sock
            sock.settimeout(_positive(timeout))
            return recv_or_lost(sock)
        deadline: float | None = None
        while True:
            if not wait_first:
                # recv_or_lost() inline: this read is on every command's path.
                try:
                    data: bytes = raw.recv(RECV_SIZE)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    _raise_if_reset(exc)
                    raise
                else:
                    if not data:
                        raise ConnectionLost()
                    return data
                if timeout is not None:
                    # A wakeup without data: the rest of the time, not all of it.
                    if deadline is None:
                        deadline = time.monotonic() + timeout
                    else:
                        timeout = deadline - time.monotonic()
            wait_first = False
            self._bounded.wait(timeout, self._wait, self._read_event)

    def send(self, data: bytes, timeout: float | None) -> None:
        """Send all of *data*, waiting at most *timeout* seconds in all.

        :raises TimeoutError: the peer did not take it in time.
        :raises ConnectionLost: the peer reset or closed the connection.
        """
        raw = self._raw
        if raw is None:
            sock = self.sock
            sock.settimeout(_positive(timeout))
            send_or_lost(sock, data)
            return
        view: bytes | memoryview = data
        deadline: float | None = None
        while True:
            try:
                sent = raw.send(view)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                _raise_if_reset(exc)
                raise
            if sent == len(view):
                return
            if not isinstance(view, memoryview):
                view = memoryview(view)
            view = view[sent:]
            if timeout is not None:
                if deadline is None:
                    deadline = time.monotonic() + timeout
                else:
                    timeout = deadline - time.monotonic()
            self._bounded.wait(timeout, self._wait, self._write_event)
