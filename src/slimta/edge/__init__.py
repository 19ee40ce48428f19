"""Edges receive messages from outside and hand them to a queue.

:class:`Edge` stamps and hands off envelopes; :class:`EdgeServer` adds a
listening socket served by greenlets.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer

from slimta import logging as slogging
from slimta.queue import QueueError
from slimta.relay import RelayError
from slimta.smtp.reply import Reply, _unchecked_reply
from slimta.util._hostname import local_fqdn

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["Edge", "EdgeServer", "Handoff"]


class QueueLike(Protocol):
    """What an edge needs of a queue: anything with ``enqueue()``."""

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, Any]]: ...


class Handoff(NamedTuple):
    """What the queue made of one message, decided once for every edge.

    Built by :meth:`Edge.handoff_result` from the ``(envelope, id_or_error)``
    list of ``enqueue()`` (or from an exception it raised).

    .. versionadded:: 4.0
    """

    #: The queue's results as it returned them; empty when it raised.
    results: list[tuple[Envelope, Any]]
    #: The id of the first envelope when the queue took the message, else ``None``.
    queued_as: str | None
    #: The answer for the client: ``250 2.6.0`` with the id, or the refusal.
    reply: Reply

    @property
    def accepted(self) -> bool:
        """True when the queue took the message."""
        return self.queued_as is not None

    @classmethod
    def from_results(cls, results: list[tuple[Envelope, Any]]) -> Handoff:
        """Classify ``enqueue()`` results by their first entry (spec 5.2)."""
        outcome = results[0][1] if results else None
        if type(outcome) is not str:  # the usual case, an id, skips the checks
            if isinstance(outcome, _REFUSALS):
                # A QueueError may leave the reply to the edge; a RelayError
                # (from ProxyQueue) always carries the remote server's.
                if outcome.reply is not None and outcome.reply.code:
                    return cls(results, None, Reply().copy(outcome.reply))
                return cls(results, None, _queue_failed())
            if outcome is None or isinstance(outcome, BaseException):
                return cls(results, None, _queue_failed())
            outcome = str(outcome)
        text = f"Message accepted for delivery; queued as {outcome}"
        return cls(results, outcome, _unchecked_reply("250", "2.6.0", text))


#: Errors in ``enqueue()`` results that carry the reply for the client.
_REFUSALS = (QueueError, RelayError)


def _queue_failed() -> Reply:
    return Reply("451", "4.3.0 Error queuing message")


class Edge:
    """Base class for anything that receives messages.

    :param queue: a :class:`~slimta.queue.Queue`, or any object with an
        ``enqueue(envelope)`` method returning ``[(envelope, id_or_error)]``.
    :param hostname: this server's name, stamped into
        :attr:`Envelope.receiver <slimta.envelope.Envelope.receiver>`;
        defaults to the host's FQDN.
    """

    def __init__(self, queue: QueueLike, hostname: str | None = None) -> None:
        self.queue = queue
        self.hostname = hostname or local_fqdn()

    def handoff(self, envelope: Envelope) -> list[tuple[Envelope, Any]]:
        """Stamp *envelope* and give it to the queue.

        :returns: the queue's ``[(envelope, id_or_error), ...]``; edges answer
            from the first entry.
        """
        envelope.receiver = self.hostname
        envelope.timestamp = time.time()
        try:
            return self.queue.enqueue(envelope)
        except Exception:
            slogging.log_exception(__name__)
            raise

    def handoff_result(self, envelope: Envelope) -> Handoff:
        """:meth:`handoff`, its outcome classified: what edges answer from.

        An exception from the queue (logged by :meth:`handoff`) becomes a
        ``451 4.3.0`` refusal, so that the client is told to try again.

        .. versionadded:: 4.0
        """
        try:
            results = self.handoff(envelope)
        except Exception:
            return Handoff([], None, _queue_failed())
        return Handoff.from_results(results)

    def kill(self) -> None:
        """Stop the edge's services (nothing to stop in the base class)."""


class EdgeServer(Edge, gevent.Greenlet):  # type: ignore[misc]
    """An edge that listens on a socket and serves each connection in a greenlet.

    :param listener: ``(ip, port)`` or a listening socket.
    :param queue: see :class:`Edge`.
    :param pool: a :class:`gevent.pool.Pool` bounding concurrent connections;
        when full, the server stops accepting until a slot frees.
    :param hostname: see :class:`Edge`.
    """

    def __init__(
        self,
        listener: Any,
        queue: QueueLike,
        pool: Pool | None = None,
        hostname: str | None = None,
    ) -> None:
        Edge.__init__(self, queue, hostname)
        gevent.Greenlet.__init__(self)
        # A pool, even unbounded, lets stop() find the live sessions.
        self.pool = pool if pool is not None else Pool()
        #: The :class:`gevent.server.StreamServer` accepting connections.
        self.server = _StreamServer(listener, self._handle, spawn=self.pool)
        self.server.close_sockets = not self._handler_closes_socket

    #: Subclasses that keep a connection open after :meth:`handle` returns
    #: (and close it themselves) set this.
    _handler_closes_socket = False

    def _run(self) -> None:
        self.server.start()
        self.server.serve_forever()

    def _handle(self, sock: Any, address: Any) -> None:
        try:
            self.handle(sock, address)
        except Exception:
            slogging.log_exception(__name__)
            raise

    def handle(self, socket: Any, address: Any) -> None:
        """Serve one connection; the socket is closed when this returns."""
        raise NotImplementedError()

    def stop(self, grace: float | None = 10.0) -> None:
        """Stop accepting, give open sessions *grace* seconds, then end them.

        Sessions still open after the grace time are told ``421 4.3.2`` and
        closed.
        """
        self.server.close()
        self.pool.join(timeout=grace)
        self.pool.kill(block=True, timeout=5.0)
        self._end_idle_sessions()
        gevent.Greenlet.kill(self, block=False)

    def _end_idle_sessions(self) -> None:
        """Close sessions that wait outside any greenlet (see SmtpEdge)."""

    def kill(self, *args: Any, **kwargs: Any) -> None:
        """Stop the server at once and end the greenlet."""
        self.server.stop(timeout=0)
        self._end_idle_sessions()
        gevent.Greenlet.kill(self, *args, **kwargs)


class _StreamServer(StreamServer):  # type: ignore[misc]
    """A StreamServer that can leave closing each socket to the handler."""

    close_sockets = True

    def do_close(self, sock: Any, *args: Any) -> None:
        if self.close_sockets:
            super().do_close(sock, *args)
