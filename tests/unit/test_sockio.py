"""slimta.smtp._sockio: the one I/O path of the SMTP adapters, on real sockets.

One rule for errors: the end of the stream and a reset are ConnectionLost,
a timeout is TimeoutError, anything else propagates as it is.
"""

from __future__ import annotations

import errno
import socket as stdlib_socket
import struct
from collections.abc import Iterator

import gevent
import gevent.event
import pytest
from gevent import socket

from slimta.smtp import ConnectionLost
from slimta.smtp._sockio import LoopWait, SocketIO, recv_or_lost, send_or_lost

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on 127.0.0.1: (ours, the peer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    ours = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    yield ours, peer
    ours.close()
    peer.close()


def reset(sock: socket.socket) -> None:
    """Close *sock* with a RST instead of a FIN."""
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_direct_on_plain_gevent_sockets(pair: tuple[socket.socket, socket.socket]) -> None:
    assert SocketIO(pair[0]).direct


def test_recv_returns_what_arrives(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    io = SocketIO(ours)
    assert io.recv_nowait() is None
    gevent.spawn_later(0.01, peer.sendall, b"220 hi\r\n")
    assert io.recv(5.0, wait_first=True) == b"220 hi\r\n"


def test_end_of_stream_is_connection_lost(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.close()
    with pytest.raises(ConnectionLost):
        SocketIO(ours).recv(5.0)


def test_reset_is_connection_lost(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    reset(peer)
    with pytest.raises(ConnectionLost) as info:
        SocketIO(ours).recv(5.0)
    assert isinstance(info.value.__cause__, ConnectionResetError)


def test_send_to_a_reset_peer_is_connection_lost(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    reset(peer)
    io = SocketIO(ours)
    with pytest.raises(ConnectionLost):
        for _ in range(100):
            io.send(b"x" * 65536, 5.0)


def test_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(TimeoutError):
        SocketIO(pair[0]).recv(0.05)


def test_send_timeout_when_the_peer_never_reads(pair: tuple[socket.socket, socket.socket]) -> None:
    io = SocketIO(pair[0])
    with pytest.raises(TimeoutError):
        for _ in range(1000):
            io.send(b"x" * 65536, 0.2)


class FailingSocket:
    """A socket whose every call fails with one errno."""

    def __init__(self, code: int) -> None:
        self.code = code

    def recv(self, size: int) -> bytes:
        raise OSError(self.code, errno.errorcode[self.code])

    def sendall(self, data: bytes) -> None:
        raise OSError(self.code, errno.errorcode[self.code])


@pytest.mark.parametrize("code", [errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED])
def test_resets_map_to_connection_lost(code: int) -> None:
    with pytest.raises(ConnectionLost):
        recv_or_lost(FailingSocket(code))
    with pytest.raises(ConnectionLost):
        send_or_lost(FailingSocket(code), b"x")


@pytest.mark.parametrize("code", [errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.EBADF])
def test_other_errors_propagate(code: int) -> None:
    with pytest.raises(OSError) as info:
        recv_or_lost(FailingSocket(code))
    assert not isinstance(info.value, ConnectionLost)
    assert info.value.errno == code
    with pytest.raises(OSError) as info:
        send_or_lost(FailingSocket(code), b"x")
    assert info.value.errno == code


# ------------------------------------------------------------------ LoopWait
def test_loop_wait_fires_when_readable(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    fired = gevent.event.AsyncResult()
    LoopWait(ours.fileno(), 5.0, fired.set)
    peer.sendall(b"NOOP\r\n")
    assert fired.get(timeout=5) is False


def test_loop_wait_fires_when_time_runs_out(pair: tuple[socket.socket, socket.socket]) -> None:
    fired = gevent.event.AsyncResult()
    LoopWait(pair[0].fileno(), 0.05, fired.set)
    assert fired.get(timeout=5) is True


def test_loop_wait_cancelled_never_fires(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    calls: list[bool] = []
    wait = LoopWait(ours.fileno(), 0.05, calls.append)
    wait.cancel()
    wait.cancel()
    peer.sendall(b"NOOP\r\n")
    gevent.sleep(0.1)  # longer than the timer: the behaviour under test
    assert calls == []
