"""The sans-IO SMTP client: commands out as bytes, replies in as bytes.

Usage by an adapter::

    conn = ClientConnection()
    conn.expect(b"[BANNER]")                 # a reply with no command
    conn.send_command(b"EHLO", b"client.example")
    send(conn.data_to_send())
    while (got := conn.next_reply()) is None:
        conn.receive_data(recv())
    command, reply = got

Every command (or block of message data) queued with :meth:`send_command`,
:meth:`send_data` or :meth:`expect` waits for its reply(ies) in order; each
reply received is matched with the oldest command still waiting, so
pipelined groups (RFC 2920) need no bookkeeping by the adapter. Whether a
command may wait in a group or must end it is :meth:`ends_group`.

Each send and each reply also moves the session's
:attr:`~ClientConnection.state`, through the one table of
:mod:`slimta.smtp._client_state`: a send that would corrupt the session
(a command while the message data is due, anything between the 220 to
STARTTLS and :meth:`~ClientConnection.start_tls`, anything after a 221 or
421) raises :class:`~slimta.smtp._errors.LocalProtocolError` and queues
nothing.

The module also holds the rules a client applies to what it sends:

* message data: line endings normalised to CRLF, then dot-stuffing, then
  ``CRLF . CRLF`` (RFC 5321 4.5.2, 2.3.8; SMTP smuggling, see
  :class:`DotStuffer`);
* BDAT framing (RFC 3030, :func:`bdat_frames`);
* which envelopes need SMTPUTF8 (RFC 6531) or 8BITMIME (RFC 6152);
* the choice of a SASL mechanism among those advertised, never a cleartext
  one without TLS, and the framing of the AUTH exchange (RFC 4954); the
  mechanisms themselves run in the adapter, through pysasl.

Nothing here does I/O, keeps time or logs.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

from slimta.smtp._client_state import (
    BDAT_LAST,
    REPLY_CLASS,
    SENT,
    ST_CLOSED,
    ST_CONNECTED,
    ST_TLS,
    START_TLS,
    TRANSITIONS,
    UNSOLICITED,
    State,
    next_state,
)
from slimta.smtp._extensions import Extensions
from slimta.smtp._reply import ParsedReply, ReplyParser

__all__ = [
    "CLEARTEXT_MECHANISMS",
    "CLIENT_MECHANISMS",
    "CONVERSION_NOT_ALLOWED",
    "SASL_CANCEL",
    "SMTPUTF8_REQUIRED",
    "ClientConnection",
    "DotStuffer",
    "auth_argument",
    "bdat_frames",
    "choose_mechanism",
    "decode_challenge",
    "dot_stuff",
    "encode_response",
    "is_ascii",
    "mail_argument",
    "needs_binarymime",
    "needs_smtputf8",
    "normalize_line_endings",
    "rcpt_argument",
]

#: Local refusal of a non-ASCII address to a server without SMTPUTF8
#: (RFC 6531 3.2; Postfix uses the same code and wording).
SMTPUTF8_REQUIRED = (553, "5.6.7 Must declare SMTPUTF8 to send unicode address")
#: Local refusal of 8-bit content that cannot be made 7-bit (RFC 3463 5.6.3).
CONVERSION_NOT_ALLOWED = (554, "5.6.3 Conversion not allowed")

#: Commands that must end a pipelined group (RFC 2920 3.1); BDAT chunks may
#: be pipelined (RFC 3030 4) and are not listed here.
_GROUP_MEMBERS = frozenset({b"MAIL", b"RCPT", b"RSET"})
#: Upper-case verbs the clients send, known valid without the regex.
_KNOWN_VERBS = frozenset(
    {b"EHLO", b"HELO", b"LHLO", b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"QUIT", b"NOOP"}
    | {b"STARTTLS", b"AUTH", b"VRFY", b"EXPN", b"HELP"}
)
#: Command verbs: letters only, or a bracketed pseudo-command name.
_VERB = re.compile(rb"[A-Za-z]+\Z")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
#: Longest line of text content (RFC 5321 4.5.3.1.6), CRLF excluded.
_TEXT_LINE_LIMIT = 998
#: Default BDAT chunk size: large enough to be cheap, small enough to stream.
BDAT_CHUNK_SIZE = 1 << 20


def is_ascii(text: str) -> bool:
    """True when *text* has only ASCII characters."""
    return text.isascii()


def needs_smtputf8(sender: str | None, recipients: Iterable[str]) -> bool:
    """True when the envelope has a non-ASCII address (RFC 6531 3.4)."""
    if sender and not sender.isascii():
        return True
    return any(not rcpt.isascii() for rcpt in recipients)


def needs_binarymime(*parts: bytes) -> bool:
    """True when the content cannot travel as text: NUL or over-long lines.

    Such content needs ``BODY=BINARYMIME`` and BDAT (RFC 3030 3).
    """
    for part in parts:
        if part.find(b"\x00") != -1:
            return True
        if len(part) <= _TEXT_LINE_LIMIT:
            continue
        # Splitting at LF alone is quick, and only overestimates a line's
        # length (by its CR, or by CR-only breaks inside it).
        if max(map(len, part.split(b"\n"))) <= _TEXT_LINE_LIMIT:
            continue
        if any(len(line) > _TEXT_LINE_LIMIT for line in _LINE_BREAK.split(part)):
            return True
    return False


def _check_arg(value: bytes) -> bytes:
    # A CR or LF in an argument would let a caller's data inject a command.
    # find(), not "in": bytes.__contains__ first tries the needle as an int,
    # and building that TypeError costs more than the search.
    if value.find(b"\r") != -1 or value.find(b"\n") != -1 or value.find(b"\x00") != -1:
        raise ValueError("line break or NUL in a command argument", value)
    return value


def _encode_address(address: str, utf8: bool) -> bytes:
    return address.encode("utf-8" if utf8 else "ascii")


def mail_argument(
    address: str,
    *,
    size: int | None = None,
    smtputf8: bool = False,
    body: str | None = None,
    requiretls: bool = False,
) -> bytes:
    """The argument of ``MAIL``: ``FROM:<address>`` and its parameters.

    :param address: the reverse-path without ``<>``; ``''`` is the null sender.
    :param size: the ``SIZE=`` parameter (RFC 1870).
    :param smtputf8: add ``SMTPUTF8`` and encode the address as UTF-8.
    :param body: the ``BODY=`` value: ``'8BITMIME'`` or ``'BINARYMIME'``.
    :param requiretls: add ``REQUIRETLS`` (RFC 8689 2).
    :raises UnicodeEncodeError: a non-ASCII address without *smtputf8*.
    :raises ValueError: a line break or NUL in the address.
    """
    arg = b"FROM:<" + _encode_address(address, smtputf8) + b">"
    if size is not None:
        arg += b" SIZE=%d" % size
    if body is not None:
        arg += b" BODY=" + body.encode("ascii")
    if smtputf8:
        arg += b" SMTPUTF8"
    if requiretls:
        arg += b" REQUIRETLS"
    return _check_arg(arg)


def rcpt_argument(address: str, *, smtputf8: bool = False) -> bytes:
    """The argument of ``RCPT``: ``TO:<address>``.

    :raises UnicodeEncodeError: a non-ASCII address without *smtputf8*.
    :raises ValueError: a line break or NUL in the address.
    """
    return _check_arg(b"TO:<" + _encode_address(address, smtputf8) + b">")


# ---------------------------------------------------------------- message data
def normalize_line_endings(data: bytes) -> bytes:
    """Turn every CRLF, bare CR and bare LF into CRLF (RFC 5321 2.3.8)."""
    # Every CR and LF is part of a CRLF pair: the usual case, nothing to
    # change, found in two passes at C speed.
    if len(data) - len(data.translate(None, b"\r\n")) == 2 * data.count(b"\r\n"):
        return data
    return _LINE_BREAK.sub(b"\r\n", data)


class DotStuffer:
    """Encodes message data for DATA, one part at a time.

    Line endings are normalised to CRLF *before* dot-stuffing, so that no
    sequence in the content (``LF . LF``, ``CR . CR`` and the like) can reach
    the server as, or be read by a lenient one as, the end of data: the only
    ``CRLF . CRLF`` on the wire is the one :meth:`end` adds. A CR ending one
    part and an LF starting the next form one line break, as they would in
    the joined data.
    """

    __slots__ = ("_cr_pending", "_line_start")

    def __init__(self) -> None:
        self._cr_pending = False
        self._line_start = True

    def feed(self, part: bytes) -> bytes:
        """Encode the next part of the message; returns the bytes to send."""
        if not part:
            return b""
        if self._cr_pending and part.startswith(b"\n"):
            part = part[1:]
        self._cr_pending = part.endswith(b"\r")
        if not part:
            return b""
        out = normalize_line_endings(part)
        # RFC 5321 4.5.2: double a dot at the start of every line.
        out = out.replace(b"\r\n.", b"\r\n..")
        if self._line_start and out.startswith(b"."):
            out = b"." + out
        self._line_start = out.endswith(b"\r\n")
        return out

    @property
    def end_marker(self) -> bytes:
        """What ends the data now: ``.CRLF`` after a line break, else ``CRLF.CRLF``."""
        return b".\r\n" if self._line_start else b"\r\n.\r\n"

    def end(self) -> bytes:
        """The end-of-data marker; feed nothing afterwards."""
        return self.end_marker


def dot_stuff(*parts: bytes) -> list[bytes]:
    """Every chunk to send for message data *parts*, the end marker last."""
    stuffer = DotStuffer()
    chunks = [chunk for chunk in (stuffer.feed(part) for part in parts) if chunk]
    chunks.append(stuffer.end())
    return chunks


def bdat_frames(
    parts: Sequence[bytes], *, binary: bool = False, chunk_size: int = BDAT_CHUNK_SIZE
) -> Iterator[bytes]:
    """Frame message data as BDAT chunks (RFC 3030 2), one bytes per chunk.

    Each item is ``BDAT <n>[ LAST]\\r\\n`` followed by exactly *n* bytes; the
    last has ``LAST`` (``BDAT 0 LAST`` for empty data). Unless *binary*
    (``BODY=BINARYMIME``), the content is still normalised to CRLF, as text
    in BDAT must be canonical (RFC 3030 3); it is never dot-stuffed.

    :raises ValueError: *chunk_size* is not positive.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive", chunk_size)
    data = b"".join(parts)
    if not binary:
        data = normalize_line_endings(data)
    total = len(data)
    start = 0
    while True:
        chunk = data[start : start + chunk_size]
        start += len(chunk)
        if start >= total:
            yield b"BDAT %d LAST\r\n" % len(chunk) + chunk
            return
        yield b"BDAT %d\r\n" % len(chunk) + chunk


# ------------------------------------------------------------------------ SASL
#: Mechanisms a client may choose, best first (RFC 4954). Under TLS, PLAIN
#: costs one round trip and lets the server store only hashes; CRAM-MD5 is
#: the one that keeps the secret off the wire without TLS. The adapter runs
#: them (through pysasl); the core only chooses and frames.
CLIENT_MECHANISMS = (b"PLAIN", b"LOGIN", b"CRAM-MD5")
#: Mechanisms that send the secret in the clear (RFC 4954 4, 14).
CLEARTEXT_MECHANISMS = frozenset({b"PLAIN", b"LOGIN"})
#: The response line that cancels an exchange (RFC 4954 4).
SASL_CANCEL = b"*"
#: A SASL mechanism name (RFC 4422 3.1).
_MECHANISM_NAME = re.compile(rb"[A-Z0-9_-]{1,20}\Z")


def choose_mechanism(
    advertised: str | None, encrypted: bool, requested: bytes | str | None = None
) -> bytes | tuple[int, str]:
    """Pick a SASL mechanism among those the server advertised.

    :param advertised: the parameter of the EHLO ``AUTH`` keyword.
    :param encrypted: the session runs under TLS.
    :param requested: a mechanism the caller insists on.
    :returns: the mechanism name, or a local ``(code, message)`` refusal when
        none fits: ``504 5.5.4`` when not advertised (or not supported here),
        ``538 5.7.11`` for a cleartext mechanism without TLS.

    .. versionchanged:: 4.0
       4.0 used PLAIN whatever the server advertised, even without TLS.
    """
    offered = {name.upper().encode("ascii", "replace") for name in (advertised or "").split()}
    if requested is not None:
        name = requested.encode("ascii") if isinstance(requested, str) else requested
        name = name.upper()
        if name not in offered or name not in CLIENT_MECHANISMS:
            return (504, "5.5.4 Authentication mechanism not advertised or not supported")
        if name in CLEARTEXT_MECHANISMS and not encrypted:
            return (538, "5.7.11 Encryption required for requested authentication mechanism")
        return name
    for name in CLIENT_MECHANISMS:
        if name in offered and (encrypted or name not in CLEARTEXT_MECHANISMS):
            return name
    return (504, "5.5.4 No usable authentication mechanism advertised")


def auth_argument(mechanism: bytes, initial_response: bytes | None = None) -> bytes:
    """The argument of ``AUTH``: the mechanism and any initial response.

    An empty initial response is sent as ``=`` (RFC 4954 4).

    :raises ValueError: *mechanism* is not a SASL mechanism name.
    """
    if _MECHANISM_NAME.match(mechanism) is None:
        raise ValueError("invalid SASL mechanism name", mechanism)
    if initial_response is None:
        return mechanism
    return mechanism + b" " + (base64.b64encode(initial_response) or b"=")


def decode_challenge(text: str) -> bytes | None:
    """The data of a ``334`` reply, or ``None`` when it is not base64.

    A client answers an undecodable challenge with :data:`SASL_CANCEL`.
    """
    try:
        return base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def encode_response(data: bytes) -> bytes:
    """The line answering a challenge: *data* in base64 (empty stays empty)."""
    return base64.b64encode(data)


# ------------------------------------------------------------------ connection
class ClientConnection:
    """One SMTP client session, without I/O.

    :param extensions: the server's extensions; replaced after each EHLO by
        the adapter (the core reads it when deciding on pipelining).
    """

    __slots__ = ("_out", "_parser", "_pending", "_state", "extensions")

    def __init__(self, extensions: Extensions | None = None) -> None:
        #: What the server advertised in its last EHLO (or LHLO) reply.
        self.extensions = extensions if extensions is not None else Extensions()
        self._parser = ReplyParser()
        self._pending: deque[bytes] = deque()
        self._out: list[bytes] = []
        self._state = ST_CONNECTED

    @property
    def state(self) -> State:
        """Where the session is (:mod:`slimta.smtp._client_state`)."""
        return self._state

    @property
    def closed(self) -> bool:
        """True once the server said 221 or 421, or answered QUIT: nothing
        more may be sent."""
        return self._state is ST_CLOSED

    # ----------------------------------------------------------- outgoing
    @property
    def pipelining(self) -> bool:
        """True when the server advertised PIPELINING (RFC 2920)."""
        return "PIPELINING" in self.extensions.extensions

    def ends_group(self, command: bytes) -> bool:
        """Whether the adapter must flush and read replies after *command*.

        Without PIPELINING every command ends its group. With it, MAIL, RCPT
        and RSET may wait for a later command; EHLO, DATA, AUTH, STARTTLS,
        QUIT and any unknown command end the group (RFC 2920 3.1).
        """
        if command not in _KNOWN_VERBS:
            command = command.upper()
        return not (command in _GROUP_MEMBERS and self.pipelining)

    def send_command(self, command: bytes, arg: bytes | None = None) -> None:
        """Queue a command line; one reply is expected for it.

        :raises ValueError: an invalid verb, or a line break in *arg*.
        :raises LocalProtocolError: no command may be sent in this state.
        """
        if command not in _KNOWN_VERBS:
            if _VERB.match(command) is None:
                raise ValueError("invalid SMTP command verb", command)
            command_key = command.upper()
        else:
            command_key = command
        # next_state()'s lookup, inlined on the per-command path: the call
        # would cost as much again. A miss goes to next_state() itself.
        try:
            state = TRANSITIONS[self._state, command_key, SENT]
        except KeyError:
            state = next_state(self._state, command_key, SENT)
        if arg is None:
            self._out.append(command + b"\r\n")
        else:
            self._out.append(command + b" " + _check_arg(arg) + b"\r\n")
        self._pending.append(command_key)
        self._state = state

    def send_line(self, line: bytes, command: bytes) -> None:
        """Queue an SASL line (the AUTH command, or a response to a ``334``
        challenge); one reply (``334`` or final) follows.

        :raises ValueError: a line break in *line*.
        :raises LocalProtocolError: *command* may not be sent in this state.
        """
        state = next_state(self._state, command, SENT)
        self._out.append(_check_arg(line) + b"\r\n")
        self._pending.append(command)
        self._state = state

    def send_data(self, data: bytes, command: bytes = b"[SEND_DATA]", replies: int = 1) -> None:
        """Queue already-encoded data (dot-stuffed, or a BDAT frame).

        The reply to a ``BDAT <n> LAST`` frame is matched with ``b'BDAT LAST'``.

        :param replies: how many replies it draws (LMTP: one per recipient).
        :raises LocalProtocolError: the data may not be sent in this state
            (dot-stuffed data goes only after DATA was answered).
        """
        if command == b"BDAT" and _is_last_chunk(data):
            command = BDAT_LAST
        try:
            state = TRANSITIONS[self._state, command, SENT]
        except KeyError:
            state = next_state(self._state, command, SENT)
        self._out.append(data)
        self._pending.extend([command] * replies)
        self._state = state

    def expect(self, command: bytes) -> None:
        """Wait for a reply nothing was sent for (banner, unsolicited reply).

        :raises LocalProtocolError: no reply may be awaited in this state,
            or the banner is awaited after anything else.
        """
        self._state = next_state(self._state, command, SENT)
        self._pending.append(command)

    def data_to_send(self) -> bytes:
        """Take the bytes queued so far."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def waiting(self) -> int:
        """How many replies are still expected."""
        return len(self._pending)

    # ----------------------------------------------------------- incoming
    def receive_data(self, data: bytes) -> None:
        """Give the core bytes read from the server."""
        self._parser.feed(data)

    @property
    def has_buffered(self) -> bool:
        """True when received bytes are waiting to be parsed."""
        return self._parser.has_buffered

    def next_reply(self) -> tuple[bytes, ParsedReply] | None:
        """The next complete reply and the command it answers, or ``None``.

        A reply with no command waiting is matched with ``b'[UNSOLICITED]'``.

        Between the ``220`` to STARTTLS and :meth:`start_tls` it is always
        ``None``: bytes received then may have been injected, and are kept
        for :meth:`start_tls` to drop, never parsed.

        :raises ReplySyntaxError: the bytes are not a valid reply.
        """
        state = self._state
        if state is ST_TLS:
            return None
        reply = self._parser.next_reply()
        if reply is None:
            return None
        command = self._pending.popleft() if self._pending else UNSOLICITED
        event = REPLY_CLASS[reply.code]
        try:
            self._state = TRANSITIONS[state, command, event]
        except KeyError:
            self._state = next_state(state, command, event)
        return command, reply

    def start_tls(self) -> bytes:
        """Forget all state that must not survive a TLS upgrade.

        Call it after the ``220`` to STARTTLS, or before anything else for
        implicit TLS (RFC 8314). Bytes received after the ``220`` came in
        plaintext and may have been injected (CVE-2021-38371): they are
        dropped and returned. The extensions are cleared too; the client
        must EHLO again (RFC 3207 4.2).

        :raises LocalProtocolError: at any other time.
        """
        self._state = next_state(self._state, START_TLS, SENT)
        self._pending.clear()
        self._out.clear()
        # A new registry of the caller's class (the public subclass, say).
        self.extensions = type(self.extensions)()
        return self._parser.take_buffered()


def _is_last_chunk(frame: bytes) -> bool:
    # "BDAT <n> LAST" (RFC 3030 2); the keyword is case-insensitive.
    end = frame.find(b"\r\n", 0, 64)
    return end != -1 and frame[:end].upper().endswith(b" LAST")
