"""Ask SpamAssassin's ``spamd`` for a verdict and record it in the headers.

:class:`SpamAssassin` is a :class:`~slimta.policy.QueuePolicy`: it sends each
queued message to ``spamd`` and writes the answer into ``X-Spam-Status`` and
``X-Spam-Symbols``, so that a later hop (a mailbox filter, a relay policy) can
act on it.

The exchange
------------

One connection per message, in the spamc/spamd protocol (``spamd/PROTOCOL``
in the SpamAssassin sources), with the ``SYMBOLS`` command. The request is an
HTTP-like head and the message::

    SYMBOLS SPAMC/1.1\\r\\n
    Content-length: <size of the message in bytes>\\r\\n
    User: slimta\\r\\n
    \\r\\n
    <the message>

after which the write side of the socket is shut down. ``spamd`` answers and
closes the connection::

    SPAMD/1.1 0 EX_OK\\r\\n
    Spam: True ; 1004.3 / 5.0\\r\\n
    \\r\\n
    GTUBE,MISSING_DATE\\r\\n

The status line carries a ``sysexits.h`` code; anything but ``0 EX_OK`` is a
refusal with no verdict. Headers the protocol does not define are ignored, as
it asks; ``Spam:`` (``True`` or ``False``, the score and the threshold) is
required once, and ``Content-length``, when present, must match the body. The
body is the comma-separated names of the rules that hit; the protocol allows
any number of CRLF pairs after them.

The answer is read until EOF, and at most :attr:`SpamAssassin.MAX_RESPONSE_SIZE`
bytes of it are kept: a peer that sends more is broken (or not ``spamd``), and
is not allowed to fill memory. Every other part of the answer is checked as
strictly, because the rule names end up in a header of the stored message.

When there is no verdict
------------------------

``spamd`` may be down, may not answer within ``timeout``, or may answer with
an error or with something that is not a spamd answer. :meth:`SpamAssassin.scan`
raises :class:`SpamAssassinError` for all of these; :meth:`SpamAssassin.apply`
then logs a WARNING on this module's logger and, by default, lets the message
through without a verdict. See :class:`SpamAssassin` for why, and for the
``fail_closed`` option that defers the message instead.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable

import gevent
import gevent.socket

from slimta.envelope import Envelope
from slimta.policy import PolicyError, QueuePolicy

__all__ = ["SpamAssassin", "SpamAssassinError"]

_log = logging.getLogger(__name__)

#: The headers this policy writes. Copies that arrive with the message were
#: written by the sender or by an earlier hop, never by us, so they are removed.
_VERDICT_HEADERS = ("X-Spam-Status", "X-Spam-Symbols")

#: RFC 5322 section 2.1.1: lines SHOULD be at most 78 characters.
_FOLD_WIDTH = 78

#: ``SPAMD/<version> <sysexits code> <message>``.
_STATUS_LINE = re.compile(rb"SPAMD/([0-9]{1,3}\.[0-9]{1,3}) ([0-9]{1,3}) ([\x20-\x7e]*)")

#: ``Name: value``, both printable ASCII; the name has no colon or space.
_HEADER_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+): *([\x20-\x7e]*)")

_NUMBER = rb"-?[0-9]{1,9}(?:\.[0-9]{1,9})?"

#: The value of ``Spam:``: verdict, score and threshold.
_SPAM_VALUE = re.compile(rb"(True|False) ; " + _NUMBER + rb" / " + _NUMBER)

_CONTENT_LENGTH = re.compile(rb"[0-9]{1,10}")

#: A rule name. SpamAssassin's are word characters; the length cap keeps a
#: single name well inside the 998-character line limit of RFC 5322 (2.1.1),
#: since a name cannot be folded.
_SYMBOL = re.compile(rb"[A-Za-z0-9_]{1,200}")


class SpamAssassinError(PolicyError):
    """``spamd`` gave no verdict: it could not be reached, did not answer in
    time, refused the scan, or answered with something malformed."""


class _ScanTimeout(Exception):
    """The ``timeout`` of one :meth:`SpamAssassin.scan` ran out."""


class SpamAssassin(QueuePolicy):
    """Scan each queued message with ``spamd`` and record the verdict.

    Spam gets ``X-Spam-Status: YES`` and ``X-Spam-Symbols: RULE_A, RULE_B``
    (the rules that hit, folded at 78 characters); anything else gets
    ``X-Spam-Status: NO``. Copies of either header that came with the
    message are removed first, whatever the outcome.

    With no verdict (``spamd`` down, too slow, or answering garbage), by
    default the message is accepted as if this policy were not there: no
    ``X-Spam-*`` header is written, and a WARNING on the
    ``slimta.policy.spamassassin`` logger says why. A scanner outage then does
    not become a mail outage, and the log, not the message, records the
    failure. There is no ``X-Spam-Status: UNKNOWN``: 4.0 wrote only ``YES`` or
    ``NO``, so filters written for it already read an absent header as "no
    verdict", while a third value is one they were never written for, and it
    would stay in the stored message long after the outage is over. The
    incoming copies are removed even then, so that a sender who can make
    ``spamd`` fail (a message that keeps it past the timeout) cannot slip a
    forged ``X-Spam-Status: NO`` through.

    With ``fail_closed=True``, :meth:`apply` raises :class:`SpamAssassinError`
    instead and leaves the envelope alone. :meth:`slimta.queue.Queue.enqueue`
    does not catch policy errors, so nothing is stored and the exception
    reaches the edge, which logs it and answers ``451 4.3.0``: the client
    keeps the message and tries again later.

    :param address: ``(host, port)`` of ``spamd``; ``('127.0.0.1', 783)``
        when ``None``.
    :param timeout: seconds for the whole exchange with ``spamd`` (connect,
        send, read to EOF); ``None`` waits as long as ``spamd`` takes (it
        ends a scan itself after ``--timeout-child``, 300 s by default). Set
        it: the SMTP client waits for its reply while the scan runs.
    :param socket_creator: ``f((host, port)) -> socket``, called once per
        scan; defaults to :func:`gevent.socket.create_connection`. The
        socket it returns must cooperate with gevent (a gevent socket, or
        any socket after monkey-patching), or ``timeout`` cannot interrupt it.
    :param fail_closed: raise :class:`SpamAssassinError` from :meth:`apply`
        when there is no verdict, instead of accepting the message.

    .. versionchanged:: 4.0
       ``fail_closed`` is new. The response is read to at most
       :attr:`MAX_RESPONSE_SIZE` bytes and checked strictly, rule names
       included; an unreachable or silent ``spamd`` no longer raises out of
       :meth:`apply` by default; incoming ``X-Spam-Symbols`` headers are
       removed as well as ``X-Spam-Status``, and a long rule list is folded.
    """

    #: Sent in the ``User:`` header of each request.
    SPAMC_USER = b"slimta"

    #: Sent as the protocol version of each request (``SPAMC/1.1``).
    SPAMC_PROTOCOL_VER = b"1.1"

    #: The most bytes of ``spamd``'s answer read; a longer answer is an error.
    #: A list of every rule SpamAssassin ships is about a third of this.
    MAX_RESPONSE_SIZE = 65536

    def __init__(
        self,
        address: tuple[str, int] | None = None,
        timeout: float | None = None,
        socket_creator: Callable[[tuple[str, int]], socket.socket] | None = None,
        *,
        fail_closed: bool = False,
    ) -> None:
        super().__init__()
        #: ``(host, port)`` of ``spamd``.
        self.address = address if address is not None else ("127.0.0.1", 783)
        #: Seconds for one whole exchange, or ``None``.
        self.timeout = timeout
        #: Makes the connection to ``spamd``.
        self.socket_creator: Callable[[tuple[str, int]], socket.socket] = (
            socket_creator or gevent.socket.create_connection
        )
        #: Whether :meth:`apply` raises when there is no verdict.
        self.fail_closed = fail_closed

    def scan(self, message: Envelope | bytes) -> tuple[bool, list[str]]:
        """Ask ``spamd`` about one message.

        :param message: an :class:`~slimta.envelope.Envelope` (sent as
            :meth:`~slimta.envelope.Envelope.flatten` writes it) or the raw
            message bytes.
        :returns: ``(spammy, symbols)``: whether ``spamd`` calls it spam, and
            the names of the rules that hit, in ``spamd``'s order.
        :raises SpamAssassinError: no verdict: the connection failed, the
            ``timeout`` ran out, or the answer was a refusal, malformed, or
            longer than :attr:`MAX_RESPONSE_SIZE`.
        :raises TypeError: *message* is neither an envelope nor bytes.

        .. versionchanged:: 4.0
           Connection errors and timeouts raise :class:`SpamAssassinError`
           (with the original exception as its ``__cause__``).
        """
        parts: tuple[bytes, ...]
        if isinstance(message, Envelope):
            parts = message.flatten()
        elif isinstance(message, bytes | bytearray | memoryview):
            parts = (bytes(message),)
        else:
            raise TypeError(f"expected an Envelope or bytes, got {type(message).__name__}")
        size = sum(len(part) for part in parts)
        head = b"SYMBOLS SPAMC/%s\r\nContent-length: %d\r\nUser: %s\r\n\r\n" % (
            self.SPAMC_PROTOCOL_VER,
            size,
            self.SPAMC_USER,
        )
        # One buffer, one send: a small head sent on its own, then the
        # message, would wait out Nagle's algorithm against delayed ACKs.
        request = b"".join((head, *parts))
        expired = _ScanTimeout()
        try:
            with gevent.Timeout(self.timeout, expired):
                response = self._exchange(request)
        except _ScanTimeout as exc:
            if exc is not expired:
                raise
            raise SpamAssassinError(
                f"no answer from spamd at {self._where()} within {self.timeout} seconds"
            ) from None
        except OSError as exc:
            raise SpamAssassinError(f"spamd at {self._where()}: {exc}") from exc
        return _parse_response(response)

    def apply(self, envelope: Envelope) -> None:
        """Scan *envelope* and write the verdict into its headers.

        Existing ``X-Spam-Status`` and ``X-Spam-Symbols`` headers are removed,
        then ``X-Spam-Status: YES`` and ``X-Spam-Symbols`` (when ``spamd``
        named rules) or ``X-Spam-Status: NO`` are added at the top of the
        header block. Without a verdict, see :class:`SpamAssassin`.

        :param envelope: the message being queued.
        :raises SpamAssassinError: no verdict, and ``fail_closed`` is set;
            the envelope is then unchanged.
        """
        try:
            spammy, symbols = self.scan(envelope)
        except SpamAssassinError as exc:
            if self.fail_closed:
                _log.warning("spam scan failed, message deferred: %s", exc)
                raise
            _log.warning("spam scan failed, message accepted without a verdict: %s", exc)
            _remove_verdict(envelope)
            return
        _remove_verdict(envelope)
        # prepend_header puts each header first, so the last one added leads.
        if spammy and symbols:
            envelope.prepend_header("X-Spam-Symbols", _fold("X-Spam-Symbols", symbols))
        envelope.prepend_header("X-Spam-Status", "YES" if spammy else "NO")

    def _exchange(self, request: bytes) -> bytes:
        """Send *request*, half-close, and read the answer to EOF (bounded)."""
        sock = self.socket_creator(self.address)
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            limit = self.MAX_RESPONSE_SIZE
            chunks: list[bytes] = []
            size = 0
            while True:
                # Never ask for more than one byte past the limit.
                chunk = sock.recv(min(65536, limit + 1 - size))
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > limit:
                    raise SpamAssassinError(
                        f"spamd at {self._where()} sent more than {limit} bytes"
                    )
                chunks.append(chunk)
        finally:
            sock.close()

    def _where(self) -> str:
        host, port = self.address[:2]
        return f"{host}:{port}"


def _parse_response(data: bytes) -> tuple[bool, list[str]]:
    """Read ``(spammy, symbols)`` from a complete ``SYMBOLS`` answer.

    :raises SpamAssassinError: a refusal, or anything malformed.
    """
    status, found, rest = data.partition(b"\r\n")
    if not found:
        raise SpamAssassinError(f"no status line from spamd: {_excerpt(data)}")
    match = _STATUS_LINE.fullmatch(status)
    if match is None:
        raise SpamAssassinError(f"not a spamd status line: {_excerpt(status)}")
    code, text = match.group(2, 3)
    if code != b"0" or text != b"EX_OK":
        raise SpamAssassinError(f"spamd refused the scan: {_excerpt(code + b' ' + text)}")

    spam: re.Match[bytes] | None = None
    length: int | None = None
    pos = 0
    while True:
        end = rest.find(b"\r\n", pos)
        if end < 0:
            raise SpamAssassinError("spamd's headers do not end with an empty line")
        line = rest[pos:end]
        pos = end + 2
        if not line:
            break
        header = _HEADER_LINE.fullmatch(line)
        if header is None:
            raise SpamAssassinError(f"bad header line from spamd: {_excerpt(line)}")
        name, value = header.group(1).lower(), header.group(2)
        if name == b"spam":
            if spam is not None:
                raise SpamAssassinError("more than one Spam header from spamd")
            spam = _SPAM_VALUE.fullmatch(value)
            if spam is None:
                raise SpamAssassinError(f"bad Spam header from spamd: {_excerpt(value)}")
        elif name == b"content-length":
            if length is not None or _CONTENT_LENGTH.fullmatch(value) is None:
                raise SpamAssassinError(f"bad Content-length from spamd: {_excerpt(value)}")
            length = int(value)
        # The protocol asks clients to ignore headers it does not define.
    if spam is None:
        raise SpamAssassinError("no Spam header from spamd")

    body = rest[pos:]
    if length is not None and length != len(body):
        raise SpamAssassinError(f"spamd announced {length} bytes of symbols and sent {len(body)}")
    # spamd/PROTOCOL: any number of CRLF pairs may follow the symbol list.
    while body.endswith(b"\r\n"):
        body = body[:-2]
    symbols = body.split(b",") if body else []
    for symbol in symbols:
        if _SYMBOL.fullmatch(symbol) is None:
            raise SpamAssassinError(f"bad rule name from spamd: {_excerpt(symbol)}")
    return spam.group(1) == b"True", [symbol.decode("ascii") for symbol in symbols]


def _remove_verdict(envelope: Envelope) -> None:
    headers = envelope.headers
    if headers is None:
        return
    for name in _VERDICT_HEADERS:
        del headers[name]  # every copy, whatever its case


def _fold(name: str, symbols: list[str]) -> str:
    """``', '.join(symbols)``, with line breaks that keep each line (the
    first one starting with ``name: ``) within :data:`_FOLD_WIDTH` where the
    names allow; unfolding (RFC 5322 section 2.2.3) gives the joined form."""
    pieces: list[str] = []
    used = len(name) + 2
    last = len(symbols) - 1
    for i, symbol in enumerate(symbols):
        token = symbol if i == last else symbol + ","
        if not pieces:
            pieces.append(token)
            used += len(token)
        elif used + 1 + len(token) > _FOLD_WIDTH:
            pieces.append("\r\n " + token)
            used = 1 + len(token)
        else:
            pieces.append(" " + token)
            used += 1 + len(token)
    return "".join(pieces)


def _excerpt(data: bytes) -> str:
    """A short, printable form of untrusted bytes, for messages and logs."""
    if len(data) > 60:
        return repr(data[:60]) + "..."
    return repr(data)
