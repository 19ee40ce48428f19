"""The sans-IO SMTP server: bytes in, events and reply bytes out.

Usage by an adapter::

    conn = ServerConnection(extensions, max_size=...)
    conn.greet(220, "mx.example.org ESMTP")
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            send(conn.data_to_send()); conn.receive_data(recv())
        elif isinstance(event, ConnectionClosed):
            send(conn.data_to_send()); break
        else:
            conn.respond(code, message)      # the decision about the event

The core answers everything that does not need a decision: syntax errors,
bad sequences, unsupported parameters and every limit (line length, message
size, recipients, errors). Replies are queued until :meth:`data_to_send`, so
an adapter that flushes on :class:`NeedData` batches pipelined replies
(RFC 2920).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType

import slimta.smtp._events as ev
from slimta.smtp._address import (
    SIMPLE_MAIL,
    SIMPLE_RCPT,
    ArgumentError,
    parse_mail_argument,
    parse_params,
    parse_rcpt_argument,
)
from slimta.smtp._buffer import LINE_TOO_LONG, ReceiveBuffer
from slimta.smtp._errors import LocalProtocolError
from slimta.smtp._extensions import Extensions
from slimta.smtp._reply import format_reply
from slimta.smtp._state import (
    ALLOWED,
    KNOWN_VERBS,
    MV_ANSWER,
    MV_AUTH_END,
    MV_CHALLENGE,
    MV_CHUNK,
    MV_CHUNK_END,
    MV_CLOSE,
    MV_CONTENT_END,
    MV_DATA,
    MV_GREET_OPEN,
    MV_GREET_REFUSE,
    MV_HELLO,
    MV_MAIL,
    MV_RCPT,
    MV_RSET,
    MV_TLS,
    MV_VERDICT,
    NEXT,
    RECEIVING_CONTENT,
    ST_AUTH,
    ST_BDAT,
    ST_CLOSED,
    ST_DATA,
    ST_GREETING,
    ST_HELLO,
    ST_MAIL,
    ST_RCPT,
    ST_READY,
    Move,
)

__all__ = ["ServerConnection"]

#: Command line limit for plain commands (RFC 5321 4.5.3.1.4), CRLF excluded.
COMMAND_LINE_LIMIT = 510
#: MAIL and RCPT lines may grow with extension parameters (RFC 1870, 4954, 3461).
PARAM_LINE_LIMIT = 2046
#: AUTH lines and SASL responses (RFC 4954 section 4: 12288 octets suffice).
AUTH_LINE_LIMIT = 12288
#: Text line limit in DATA content (RFC 5321 4.5.3.1.6), CRLF excluded.
DATA_LINE_LIMIT = 998

_VERB = re.compile(r"([A-Za-z]+)(?: (.*))?\Z", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PRINTABLE_COMMAND = re.compile(r"([A-Za-z]+)(?: ([\x20-\x7e]*))?\Z")
_BDAT = re.compile(r"(\d{1,20})(?: +(LAST))? *\Z", re.IGNORECASE)
_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+\Z")
_NOTIFY_WORDS = frozenset({b"SUCCESS", b"FAILURE", b"DELAY"})
_ADDR_TYPE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9\-]*")

_R_SYNTAX = (500, "5.5.2 Syntax error, command unrecognized")
_R_TOO_LONG = (500, "5.5.2 Line too long")
_R_BAD_CHARS = (500, "5.5.2 Invalid characters in command")
_R_BAD_UTF8 = (500, "5.5.2 Invalid UTF-8 in command")
_R_BARE_NEWLINE = (500, "5.5.2 Bare CR or LF not allowed")
_R_UNRECOGNIZED = (500, "5.5.1 Command unrecognized")
_R_NEED_ARG = (501, "5.5.4 Syntax error in parameters or arguments")
_R_NO_ARG = (501, "5.5.4 Command takes no argument")
_R_NEED_HELLO = (503, "5.5.1 Bad sequence of commands: send EHLO or HELO first")
_R_NESTED_MAIL = (503, "5.5.1 Bad sequence of commands: nested MAIL command")
_R_NEED_MAIL = (503, "5.5.1 Bad sequence of commands: need MAIL command")
_R_NEED_RCPT = (503, "5.5.1 Bad sequence of commands: need RCPT command")
_R_SEQUENCE = (503, "5.5.1 Bad sequence of commands")
_R_NOT_IMPLEMENTED = (502, "5.5.1 Command not implemented")
_R_TLS_ACTIVE = (503, "5.5.1 TLS already active")
_R_AUTHED = (503, "5.5.1 Already authenticated")
_R_AUTH_TOO_LONG = (500, "5.5.6 Authentication exchange line is too long")
_R_AUTH_BAD_LINE = (501, "5.5.2 Invalid authentication response")
_R_AUTH_SYNTAX = (501, "5.5.4 Syntax: AUTH mechanism [initial-response]")
_R_STARTTLS_SYNTAX = (501, "5.5.4 Syntax: STARTTLS")
_R_BDAT_SYNTAX = (521, "5.5.4 Syntax: BDAT count [LAST]; closing connection")
_R_DATA_AFTER_BDAT = (503, "5.5.1 Bad sequence of commands: DATA after BDAT")
_R_BINARY_DATA = (503, "5.5.1 Bad sequence of commands: BODY=BINARYMIME needs BDAT")
_R_TOO_MANY_RCPTS = (452, "4.5.3 Too many recipients")
_R_TOO_MANY_ERRORS = (421, "4.7.0 Too many errors, closing connection")
_R_UTF8_ADDRESS = (553, "5.6.7 Must declare SMTPUTF8 to send unicode address")
_R_SIZE_SYNTAX = (501, "5.5.4 Bad message size syntax")
_R_BODY = (501, "5.5.4 Unsupported BODY type")
_R_SMTPUTF8_VALUE = (501, "5.5.4 SMTPUTF8 takes no value")
_R_RET = (501, "5.5.4 Bad RET parameter syntax")
_R_ENVID = (501, "5.5.4 Bad ENVID parameter syntax")
_R_NOTIFY = (501, "5.5.4 Bad NOTIFY parameter syntax")
_R_ORCPT = (501, "5.5.4 Bad ORCPT parameter syntax")
_R_AUTH_PARAM = (501, "5.5.4 Bad AUTH parameter syntax")
#: REQUIRETLS (RFC 8689 2) takes no value and is only offered under TLS;
#: 530 is RFC 3207's "Must issue a STARTTLS command first", X.7.10
#: "Encryption needed" (RFC 5248).
_R_REQUIRETLS_VALUE = (501, "5.5.4 REQUIRETLS takes no value")
_R_REQUIRETLS_PLAIN = (530, "5.7.10 REQUIRETLS needs a TLS session")
#: A message over the SIZE limit, whether it came by DATA or BDAT.
_R_TOO_BIG = (552, "5.3.4 Message exceeded size limit")
_R_BARE_IN_DATA = (550, "5.5.2 Message contains bare CR or LF characters")
_R_LONG_DATA_LINE = (554, "5.6.0 Message contains a line longer than 998 octets")

#: Keywords advertised only on TLS sessions (RFC 8689 2: REQUIRETLS is
#: offered in the EHLO reply after STARTTLS, never before).
_TLS_ONLY_KEYWORDS = frozenset({"REQUIRETLS"})

#: Commands of RFC 5321 and its forerunners that this server does not
#: implement: 502, where any other unknown verb gets 500 (RFC 5321 4.2.4).
_NOT_IMPLEMENTED = frozenset({"EXPN", "HELP", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML"})

_NEED_DATA = ev.NeedData()
_CLOSED = ev.ConnectionClosed()
_RSET = ev.Rset()
_NOOP = ev.Noop()
_QUIT = ev.Quit()
_STARTTLS = ev.StartTls()
_DATA = ev.Data()
_DATA_CHUNKING = ev.Data(chunking=True)
_AUTH_ABORTED = ev.AuthAborted()
_NO_PARAMS: Mapping[bytes, bytes | bool] = MappingProxyType({})
_AUTH_EVENTS = (ev.Auth, ev.AuthResponse)


class ServerConnection:
    """One SMTP server session, without I/O.

    :param extensions: what EHLO advertises; the core reads it at the time of
        each command, so callers may change it during the session. Keywords
        the core acts on: SIZE, 8BITMIME, SMTPUTF8, CHUNKING, BINARYMIME,
        STARTTLS, AUTH, PIPELINING, DSN, REQUIRETLS. REQUIRETLS (RFC 8689)
        is advertised, and its MAIL parameter accepted, only while
        :attr:`encrypted`.
    :param max_recipients: accepted RCPTs per transaction; more get 452 4.5.3.
    :param max_errors: protocol errors per session before 421 4.7.0.
    :param data_line_limit: longest DATA text line, CRLF excluded.
    :param encrypted: the connection is already under TLS.

    Reply codes are ``int`` throughout. Misuse by the caller (a reply with
    no event waiting, a second greeting) raises
    :class:`~slimta.smtp._errors.LocalProtocolError`.
    """

    __slots__ = (
        "_bare",
        "_binary",
        "_buf",
        "_chunk_last",
        "_chunk_remaining",
        "_chunking",
        "_eof",
        "_failed",
        "_longest",
        "_max_size",
        "_out",
        "_parts",
        "_pending",
        "_rcpt_count",
        "_size",
        "_skip_reply",
        "_too_big",
        "_utf8",
        "authenticated",
        "data_line_limit",
        "encrypted",
        "errors",
        "extensions",
        "max_errors",
        "max_recipients",
        "state",
    )

    _rcpt_count: int
    _utf8: bool
    _binary: bool
    _chunking: bool
    _failed: bool
    _size: int
    _too_big: bool
    _bare: bool
    _longest: int
    _parts: list[bytes]
    _chunk_remaining: int
    _chunk_last: bool
    _skip_reply: tuple[int, str] | None

    def __init__(
        self,
        extensions: Extensions,
        *,
        max_recipients: int = 1000,
        max_errors: int = 20,
        data_line_limit: int = DATA_LINE_LIMIT,
        encrypted: bool = False,
    ) -> None:
        self.extensions = extensions
        self.max_recipients = max_recipients
        self.max_errors = max_errors
        self.data_line_limit = data_line_limit
        #: The session runs under TLS.
        self.encrypted = encrypted
        #: A SASL exchange ended with 235 in this session.
        self.authenticated = False
        #: Protocol errors counted so far.
        self.errors = 0
        #: Where the session is; only :meth:`_move` changes it, through
        #: :data:`slimta.smtp._state.TRANSITIONS`.
        self.state = ST_GREETING
        self._buf = ReceiveBuffer()
        self._out: list[bytes] = []
        self._eof = False
        self._pending: ev.Event | None = None
        self._max_size: int | None = None
        self._reset_transaction()

    # ------------------------------------------------------------------ I/O
    def receive_data(self, data: bytes) -> None:
        """Give the core bytes read from the peer; ``b''`` means end of input."""
        if data:
            self._buf.feed(data)
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """Take the reply bytes queued so far."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out) if len(out) > 1 else out[0]
        out.clear()
        return data

    @property
    def closed(self) -> bool:
        """True once the session is over; flush :meth:`data_to_send` and close."""
        return self.state is ST_CLOSED

    @property
    def receiving_content(self) -> bool:
        """True while message content (DATA or an accepted BDAT chunk) is read."""
        return self.state in RECEIVING_CONTENT

    # ------------------------------------------------------------ decisions
    def greet(self, code: int, message: str) -> None:
        """Send the greeting; only 220 opens the session (RFC 5321 3.1)."""
        if self.state is not ST_GREETING:
            raise LocalProtocolError(f"greet() in state {self.state.name}")
        _check_code(code)
        self._queue(code, message)
        if code == 220:
            self._move(MV_GREET_OPEN)
        elif code == 221 or code == 421:
            self._move(MV_CLOSE)
        else:
            self._move(MV_GREET_REFUSE)

    def respond(self, code: int, message: str, newline_first: bool = False) -> None:
        """Answer the event last returned by :meth:`next_event`.

        A 221 or 421 ends the session; what else the reply does depends on
        the command it answers and on its code (see :mod:`._state`).
        """
        event = self._pending
        if event is None:
            raise LocalProtocolError("respond() without an event waiting for a reply")
        if type(code) is not int or not 100 <= code <= 599:
            _check_code(code)
        self._pending = None
        if code == 221 or code == 421:
            self._queue(code, message, newline_first)
            self._move(MV_CLOSE)
            return
        _RESPONDERS[type(event)](self, event, code, message, newline_first)

    def challenge(self, text: str) -> None:
        """Send a ``334`` SASL challenge (base64 *text*) and await its answer.

        Valid only while an :class:`~slimta.smtp._events.Auth` or
        :class:`~slimta.smtp._events.AuthResponse` event waits.
        """
        event = self._pending
        if event.__class__ not in _AUTH_EVENTS:
            raise LocalProtocolError("challenge() outside an AUTH exchange")
        self._pending = None
        # RFC 4954 4: "334" SP [base64], the space even when the text is empty.
        self._out.append(b"334 " + text.encode("ascii") + b"\r\n")
        self._move(MV_CHALLENGE)

    def close(self, code: int, message: str, newline_first: bool = False) -> None:
        """Queue a last reply (timeout, shutdown, failure) and end the session.

        Does nothing once the session is over.
        """
        self._pending = None
        if self.state is not ST_CLOSED:
            self._queue(code, message, newline_first)
            self._move(MV_CLOSE)

    def count_error(self) -> None:
        """Count a failure decided by the caller (e.g. a refused AUTH)."""
        self._count_error()

    # --------------------------------------------------------------- events
    def next_event(self) -> ev.Event:
        """The next thing the client did, or :class:`NeedData`/:class:`ConnectionClosed`."""
        if self._pending is not None:
            raise LocalProtocolError(f"{self._pending!r} is still waiting for respond()")
        while True:
            state = self.state
            if state is ST_CLOSED:
                return _CLOSED
            if state is ST_GREETING:
                raise LocalProtocolError("greet() must come first")
            if self._skip_reply is not None:
                if self._skip_chunk():
                    continue
                event = None
            elif state is ST_DATA:
                event = self._next_data_event()
            elif state is ST_BDAT:
                event = self._next_bdat_event()
            else:
                line = self._buf.extract_line(AUTH_LINE_LIMIT)
                if line is None:
                    event = None
                elif line is LINE_TOO_LONG:
                    if state is ST_AUTH:
                        return self._end_auth(*_R_AUTH_TOO_LONG)
                    self._error(*_R_TOO_LONG)
                    continue
                else:
                    assert isinstance(line, bytes)
                    event = self._handle_line(line)
                    if event is None:
                        continue
            if event is not None:
                return event
            if self.state is not state:
                continue
            if self._eof:
                self._move(MV_CLOSE)
                return _CLOSED
            return _NEED_DATA

    # ------------------------------------------------------------- commands
    def _handle_line(self, raw: bytes) -> ev.Event | None:
        # Fast path: a printable-ASCII command, which is nearly every line.
        match: re.Match[str] | None = None
        if self.state is not ST_AUTH and raw.isascii():
            match = _PRINTABLE_COMMAND.match(raw.decode("ascii"))
        if match is None:
            checked = self._check_line(raw)
            if not isinstance(checked, re.Match):
                return checked
            match = checked
        verb = match.group(1).upper()
        arg = match.group(2)
        if arg is not None:
            arg = arg.strip(" \t")
        limit = _LINE_LIMITS.get(verb, COMMAND_LINE_LIMIT)
        if len(raw) > limit:
            if not self._refuse_bdat(raw):
                self._error(*_R_TOO_LONG)
            return None
        if verb == "BDAT":
            # The chunk octets follow whatever the verdict: parse first.
            return self._bdat_command(arg)
        if verb not in KNOWN_VERBS:
            code, message = _R_NOT_IMPLEMENTED if verb in _NOT_IMPLEMENTED else _R_UNRECOGNIZED
            return self._expect(ev.UnknownCommand(verb, arg or None, code, message))
        if self.state not in ALLOWED[verb]:
            self._sequence_error(verb)
            return None
        return _COMMANDS[verb](self, arg)

    def _check_line(self, raw: bytes) -> re.Match[str] | ev.Event | None:
        """The slow path of :meth:`_handle_line`: AUTH lines, UTF-8, junk."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            if self.state is ST_AUTH:
                return self._end_auth(*_R_AUTH_BAD_LINE)
            if not self._refuse_bdat(raw):
                self._error(*_R_BAD_UTF8)
            return None
        if self.state is ST_AUTH:
            return self._expect(ev.AuthResponse(line))
        if _CONTROL.search(line):
            if self._refuse_bdat(raw):
                return None
            if "\n" in line or "\r" in line:
                self._error(*_R_BARE_NEWLINE)
            else:
                self._error(*_R_BAD_CHARS)
            return None
        match = _VERB.match(line)
        if match is None:
            self._error(*_R_SYNTAX)
        return match

    def _expect(self, event: ev.Event) -> ev.Event:
        self._pending = event
        return event

    def _hello(self, arg: str | None, extended: bool) -> ev.Event | None:
        if not arg:
            self._error(*_R_NEED_ARG)
            return None
        return self._expect(ev.Ehlo(arg) if extended else ev.Helo(arg))

    def _ehlo(self, arg: str | None) -> ev.Event | None:
        return self._hello(arg, True)

    def _helo(self, arg: str | None) -> ev.Event | None:
        return self._hello(arg, False)

    def _mail(self, arg: str | None) -> ev.Event | None:
        simple = SIMPLE_MAIL.match(arg) if arg else None
        if simple is not None:
            event = self._pending = ev.MailFrom(simple.group(1), _NO_PARAMS)
            return event
        try:
            address, rest = parse_mail_argument(arg or "")
            params = parse_params(rest)
            self._check_mail_params(params)
            if not address.isascii() and b"SMTPUTF8" not in params:
                raise ArgumentError(*_R_UTF8_ADDRESS)
        except ArgumentError as exc:
            self._error(exc.code, exc.message)
            return None
        return self._expect(ev.MailFrom(address, MappingProxyType(params)))

    def _check_mail_params(self, params: dict[bytes, bytes | bool]) -> None:
        ext = self.extensions
        for key, value in params.items():
            if key == b"SIZE" and "SIZE" in ext:
                if value is True or not value.isdigit():  # type: ignore[union-attr]
                    raise ArgumentError(*_R_SIZE_SYNTAX)
                limit = ext.getparam("SIZE", int)
                if limit and int(value) > limit:
                    raise ArgumentError(552, f"5.3.4 Message size exceeds {limit} limit")
            elif key == b"BODY" and "8BITMIME" in ext:
                body = value.upper() if value is not True else b""  # type: ignore[union-attr]
                binary_ok = "CHUNKING" in ext and "BINARYMIME" in ext
                if body not in (b"7BIT", b"8BITMIME") and not (body == b"BINARYMIME" and binary_ok):
                    raise ArgumentError(*_R_BODY)
            elif key == b"SMTPUTF8" and "SMTPUTF8" in ext:
                if value is not True:
                    raise ArgumentError(*_R_SMTPUTF8_VALUE)
            elif key == b"RET" and "DSN" in ext:
                # RFC 3461 4.3
                if value is True or value.upper() not in (b"FULL", b"HDRS"):  # type: ignore[union-attr]
                    raise ArgumentError(*_R_RET)
            elif key == b"ENVID" and "DSN" in ext:
                # RFC 3461 4.4: xtext, at most 100 characters.
                if value is True or len(value) > 100 or not _XTEXT.match(value):  # type: ignore[arg-type]
                    raise ArgumentError(*_R_ENVID)
            elif key == b"REQUIRETLS" and "REQUIRETLS" in ext:
                # RFC 8689 2: no value, and only in a session under TLS.
                if not self.encrypted:
                    raise ArgumentError(*_R_REQUIRETLS_PLAIN)
                if value is not True:
                    raise ArgumentError(*_R_REQUIRETLS_VALUE)
            elif key == b"AUTH" and "AUTH" in ext:
                # RFC 4954 section 5: an xtext mailbox or <>; kept for the caller.
                if value is True or (value != b"<>" and not _XTEXT.match(value)):  # type: ignore[arg-type]
                    raise ArgumentError(*_R_AUTH_PARAM)
            else:
                name = key.decode("ascii")
                raise ArgumentError(555, f"5.5.4 Unsupported parameter: {name}")

    def _check_rcpt_params(self, params: dict[bytes, bytes | bool]) -> None:
        dsn = "DSN" in self.extensions
        for key, value in params.items():
            if key == b"NOTIFY" and dsn:
                # RFC 3461 4.1: NEVER alone, or some of SUCCESS, FAILURE, DELAY.
                words = value.upper().split(b",") if value is not True else []  # type: ignore[union-attr]
                if not words or len(set(words)) != len(words):
                    raise ArgumentError(*_R_NOTIFY)
                if words != [b"NEVER"] and not set(words) <= _NOTIFY_WORDS:
                    raise ArgumentError(*_R_NOTIFY)
            elif key == b"ORCPT" and dsn:
                # RFC 3461 4.2: addr-type ";" xtext
                if not isinstance(value, bytes) or len(value) > 500:
                    raise ArgumentError(*_R_ORCPT)
                addr_type, semi, xtext = value.partition(b";")
                if not semi or not _ADDR_TYPE.fullmatch(addr_type) or not _XTEXT.match(xtext):
                    raise ArgumentError(*_R_ORCPT)
            else:
                name = key.decode("ascii")
                raise ArgumentError(555, f"5.5.4 Unsupported parameter: {name}")

    def _rcpt(self, arg: str | None) -> ev.Event | None:
        simple = SIMPLE_RCPT.match(arg) if arg else None
        if simple is not None and self._rcpt_count < self.max_recipients:
            event = self._pending = ev.RcptTo(simple.group(1), _NO_PARAMS)
            return event
        try:
            address, rest = parse_rcpt_argument(arg or "")
            params = parse_params(rest)
            self._check_rcpt_params(params)
            if not address.isascii() and not self._utf8:
                raise ArgumentError(*_R_UTF8_ADDRESS)
        except ArgumentError as exc:
            self._error(exc.code, exc.message)
            return None
        if self._rcpt_count >= self.max_recipients:
            self._queue(*_R_TOO_MANY_RCPTS)
            return None
        return self._expect(ev.RcptTo(address, MappingProxyType(params)))

    def _data(self, arg: str | None) -> ev.Event | None:
        if arg:
            self._error(*_R_NO_ARG)
            return None
        if self._chunking:
            self._error(*_R_DATA_AFTER_BDAT)
            return None
        if self._binary:
            self._error(*_R_BINARY_DATA)
            return None
        return self._expect(_DATA)

    def _no_arg(self, arg: str | None, event: ev.Event) -> ev.Event | None:
        if arg:
            self._error(*_R_NO_ARG)
            return None
        return self._expect(event)

    def _rset(self, arg: str | None) -> ev.Event | None:
        return self._no_arg(arg, _RSET)

    def _quit(self, arg: str | None) -> ev.Event | None:
        return self._no_arg(arg, _QUIT)

    def _noop(self, arg: str | None) -> ev.Event | None:
        return self._expect(_NOOP)

    def _vrfy(self, arg: str | None) -> ev.Event | None:
        if not arg:
            self._error(*_R_NEED_ARG)
            return None
        return self._expect(ev.Vrfy(arg))

    def _starttls(self, arg: str | None) -> ev.Event | None:
        if self.encrypted:
            self._error(*_R_TLS_ACTIVE)
            return None
        if "STARTTLS" not in self.extensions:
            self._error(*_R_NOT_IMPLEMENTED)
            return None
        if arg:
            self._error(*_R_STARTTLS_SYNTAX)
            return None
        return self._expect(_STARTTLS)

    def _auth(self, arg: str | None) -> ev.Event | None:
        if "AUTH" not in self.extensions:
            self._error(*_R_NOT_IMPLEMENTED)
            return None
        if self.authenticated:
            self._error(*_R_AUTHED)
            return None
        if not arg:
            self._error(*_R_AUTH_SYNTAX)
            return None
        mechanism, _, initial = arg.partition(" ")
        initial = initial.strip(" ")
        if " " in initial:
            self._error(*_R_AUTH_SYNTAX)
            return None
        return self._expect(ev.Auth(mechanism.upper(), initial or None))

    def _end_auth(self, code: int, message: str) -> ev.Event:
        # RFC 4954 4: a response that cannot be used fails the AUTH command.
        self._move(MV_AUTH_END)
        self._error(code, message)
        return _AUTH_ABORTED

    def _refuse_bdat(self, raw: bytes) -> bool:
        """A BDAT line too broken to parse: its octets cannot be skipped, so hang up."""
        if raw[:5].upper() != b"BDAT ":
            return False
        self.close(*_R_BDAT_SYNTAX)
        return True

    # -------------------------------------------------------------- replies
    # One function per event class: what a reply of a given code does.
    def _answer(self, event: ev.Event, code: int, message: str, newline_first: bool) -> None:
        self._queue(code, message, newline_first)
        self._move(MV_ANSWER)

    def _answer_unknown(self, event: ev.Event, code: int, message: str, nl: bool) -> None:
        self._queue(code, message, nl)
        self._move(MV_ANSWER)
        if code >= 500:
            self._count_error()

    def _answer_hello(self, event: ev.Event, code: int, message: str, nl: bool) -> None:
        if not 199 < code < 400:
            self._answer(event, code, message, nl)
            return
        if code == 250 and event.__class__ is ev.Ehlo:
            omit = () if self.encrypted else _TLS_ONLY_KEYWORDS
            message = self.extensions.build_string(message, omit)
        self._queue(code, message, nl)
        self._reset_transaction()
        self._move(MV_HELLO)

    def _answer_mail(self, event: ev.Event, code: int, message: str, nl: bool) -> None:
        self._queue(code, message, nl)
        if not 199 < code < 400:
            self._move(MV_ANSWER)
            return
        params = event.params  # type: ignore[attr-defined]
        if params:
            self._utf8 = b"SMTPUTF8" in params
            body = params.get(b"BODY")
            self._binary = body is not None and body is not True and body.upper() == b"BINARYMIME"
        self._move(MV_MAIL)

    def _answer_rcpt(self, event: ev.Event, code: int, message: str, nl: bool) -> None:
        self._queue(code, message, nl)
        if not 199 < code < 400:
            self._move(MV_ANSWER)
            return
        self._rcpt_count += 1
        self._move(MV_RCPT)

    def _answer_data(self, event: ev.Event, code: int, message: str, nl: bool) -> None:
        self._max_size = self.extensions.getparam("SIZE", int)
        if event is _DATA_CHUNKING:
            # The first BDAT of a message: its reply comes after its octets.
            if 299 < code < 400:
                self._move(MV_CHUNK)
            else:
                self._failed = True
                self._skip_reply = (code, message)
            return
        self._queue(code, message, nl)
        if 199 < code < 400:
            self._buf.start_data()
            self._move(MV_DATA)
        else:
            self._move(MV_ANSWER)

    def _answer_message(self, event: ev.Event, code: int, message: str, nl: bool) -> None:
        # The verdict on a message: the transaction is over either way.
        self._queue(code, message, nl)
        self._reset_transaction()
        self._move(MV_VERDICT)

    def _answer_rset(self, event: ev.Event, code: int, message: str, nl: bool) -> None:
        self._queue(code, message, nl)
        if 199 < code < 400:
            self._reset_transaction()
            self._move(MV_RSET)
        else:
            self._move(MV_ANSWER)

    def _answer_starttls(self, event: ev.Event, code: int, message: str, nl: bool) -> None:
        self._queue(code, message, nl)
        if code != 220:
            self._move(MV_ANSWER)
            return
        # RFC 3207 4.2 and CVE-2011-0411: forget everything, including any
        # plaintext the client pipelined after STARTTLS.
        self._buf.clear()
        self._reset_transaction()
        self.extensions.drop("STARTTLS")
        self.encrypted = True
        self.authenticated = False
        self._move(MV_TLS)

    def _answer_auth(self, event: ev.Event, code: int, message: str, nl: bool) -> None:
        self._queue(code, message, nl)
        self._move(MV_AUTH_END)
        if code == 235:
            self.authenticated = True
        elif code >= 500:
            self._count_error()

    # ----------------------------------------------------------------- DATA
    def _take_content(self, data: bytes) -> None:
        """Keep message octets, or only count them once over the SIZE limit."""
        if self._too_big:
            return
        size = self._size + len(data)
        self._size = size
        max_size = self._max_size
        if max_size and size > max_size:
            self._too_big = True
            self._parts.clear()
        else:
            self._parts.append(data)

    def _next_data_event(self) -> ev.Event | None:
        buf = self._buf
        limit = self.data_line_limit
        while True:
            chunk = buf.extract_data(limit)
            if chunk is None:
                return None
            self._take_content(chunk.data)
            if chunk.bare_newline:
                self._bare = True
            if chunk.longest_line > self._longest:
                self._longest = chunk.longest_line
            if chunk.ended:
                self._move(MV_CONTENT_END)
                return self._message_event()

    def _message_event(self) -> ev.Event:
        if self._too_big:
            event: ev.Event = ev.MessageRefused(*_R_TOO_BIG, too_big=True)
        elif self._bare:
            event = ev.MessageRefused(*_R_BARE_IN_DATA, too_big=False)
        elif self._longest > self.data_line_limit and not self._binary:
            event = ev.MessageRefused(*_R_LONG_DATA_LINE, too_big=False)
        else:
            parts = self._parts
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            event = ev.MessageReceived(data)
        self._parts = []
        return self._expect(event)

    # ----------------------------------------------------------------- BDAT
    def _bdat_command(self, arg: str | None) -> ev.Event | None:
        match = _BDAT.match(arg or "")
        if match is None:
            # The stream can no longer be followed: answer and hang up.
            self.close(*_R_BDAT_SYNTAX)
            return None
        size = int(match.group(1))
        state = self.state
        reply: tuple[int, str] | None = None
        if "CHUNKING" not in self.extensions:
            reply = _R_NOT_IMPLEMENTED
        elif state not in ALLOWED["BDAT"]:
            reply = _BDAT_SEQUENCE.get(state, _R_SEQUENCE)
        elif self._failed:
            # The client pipelined more chunks of a refused message.
            self._skip(size, _R_SEQUENCE)
            return None
        if reply is not None:
            self._count_error()
            self._skip(size, reply)
            return None
        self._chunk_remaining = size
        self._chunk_last = match.group(2) is not None
        if not self._chunking:
            self._chunking = True
            return self._expect(_DATA_CHUNKING)
        self._move(MV_CHUNK)
        return None

    def _skip(self, size: int, reply: tuple[int, str]) -> None:
        """Read and drop the *size* octets of a refused chunk, then answer *reply*."""
        self._chunk_remaining = size
        self._skip_reply = reply

    def _skip_chunk(self) -> bool:
        """Drop octets of a refused chunk; ``True`` once all are gone and answered."""
        remaining = self._chunk_remaining
        if remaining:
            remaining -= len(self._buf.extract_exact(remaining))
            self._chunk_remaining = remaining
            if remaining:
                return False
        reply = self._skip_reply
        assert reply is not None
        self._skip_reply = None
        self._queue(*reply)
        return True

    def _next_bdat_event(self) -> ev.Event | None:
        remaining = self._chunk_remaining
        if remaining:
            data = self._buf.extract_exact(remaining)
            remaining -= len(data)
            self._chunk_remaining = remaining
            self._take_content(data)
            if remaining:
                return None
        self._move(MV_CHUNK_END)
        if self._too_big:
            self._failed = True
            self._parts.clear()
            self._queue(*_R_TOO_BIG)
            return None
        if not self._chunk_last:
            self._queue(250, f"2.0.0 {self._size} octets received")
            return None
        if not self._binary:
            data = b"".join(self._parts)
            crlf = data.count(b"\r\n")
            if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
                self._bare = True
            elif len(data) > self.data_line_limit:
                self._longest = max(map(len, data.split(b"\r\n")))
            self._parts = [data]
        return self._message_event()

    # -------------------------------------------------------------- helpers
    def _move(self, move: Move) -> None:
        """Apply *move*: the only place the state changes.

        :raises LocalProtocolError: the table has no such move here.
        """
        self.state = NEXT[self.state][move]

    def _reset_transaction(self) -> None:
        self._rcpt_count = 0
        self._utf8 = False
        self._binary = False
        self._chunking = False
        self._failed = False
        self._size = 0
        self._too_big = False
        self._bare = False
        self._longest = 0
        self._parts = []
        self._chunk_remaining = 0
        self._chunk_last = False
        self._skip_reply = None

    def _queue(self, code: int, message: str, newline_first: bool = False) -> None:
        self._out.append(format_reply(code, message, newline_first))

    def _count_error(self) -> None:
        self.errors += 1
        if self.errors >= self.max_errors and self.state is not ST_CLOSED:
            self._queue(*_R_TOO_MANY_ERRORS)
            self._move(MV_CLOSE)

    def _error(self, code: int, message: str) -> None:
        self._queue(code, message)
        self._count_error()

    def _sequence_error(self, verb: str) -> None:
        state = self.state
        if state is ST_HELLO and verb in ("MAIL", "RCPT", "DATA", "STARTTLS", "AUTH"):
            reply = _R_NEED_HELLO
        elif verb == "MAIL" and state in (ST_MAIL, ST_RCPT):
            reply = _R_NESTED_MAIL
        elif verb in ("RCPT", "DATA") and state is ST_READY:
            reply = _R_NEED_MAIL
        elif verb == "DATA" and state is ST_MAIL:
            reply = _R_NEED_RCPT
        else:
            reply = _R_SEQUENCE
        self._error(*reply)


def _check_code(code: int) -> None:
    if code.__class__ is not int or not 100 <= code <= 599:
        raise ValueError(f"invalid SMTP reply code {code!r}")


_LINE_LIMITS = {"MAIL": PARAM_LINE_LIMIT, "RCPT": PARAM_LINE_LIMIT, "AUTH": AUTH_LINE_LIMIT}

_BDAT_SEQUENCE = {ST_HELLO: _R_NEED_HELLO, ST_READY: _R_NEED_MAIL, ST_MAIL: _R_NEED_RCPT}

_COMMANDS = {
    "EHLO": ServerConnection._ehlo,
    "HELO": ServerConnection._helo,
    "MAIL": ServerConnection._mail,
    "RCPT": ServerConnection._rcpt,
    "DATA": ServerConnection._data,
    "RSET": ServerConnection._rset,
    "NOOP": ServerConnection._noop,
    "QUIT": ServerConnection._quit,
    "VRFY": ServerConnection._vrfy,
    "STARTTLS": ServerConnection._starttls,
    "AUTH": ServerConnection._auth,
}

#: What a reply does, by the class of the event it answers.
_RESPONDERS: dict[type, Callable[[ServerConnection, ev.Event, int, str, bool], None]] = {
    ev.Ehlo: ServerConnection._answer_hello,
    ev.Helo: ServerConnection._answer_hello,
    ev.MailFrom: ServerConnection._answer_mail,
    ev.RcptTo: ServerConnection._answer_rcpt,
    ev.Data: ServerConnection._answer_data,
    ev.MessageReceived: ServerConnection._answer_message,
    ev.MessageRefused: ServerConnection._answer_message,
    ev.Rset: ServerConnection._answer_rset,
    ev.StartTls: ServerConnection._answer_starttls,
    ev.Auth: ServerConnection._answer_auth,
    ev.AuthResponse: ServerConnection._answer_auth,
    ev.Noop: ServerConnection._answer,
    ev.Quit: ServerConnection._answer,
    ev.Vrfy: ServerConnection._answer,
    ev.UnknownCommand: ServerConnection._answer_unknown,
}
