"""The :class:`Envelope`: one message plus its SMTP envelope.

Lazy header parsing
-------------------

The SMTP edge calls :meth:`Envelope.parse` once per received message, and the
stdlib header parser costs far more than the rest of an SMTP transaction. So
``parse`` only *splits* the message: it finds the first empty line, checks the
lines before it with a compiled regex (:data:`_PLAIN_HEADER_BLOCK`), and
keeps that raw header block as bytes. The :attr:`Envelope.headers` property
parses the block into an :class:`email.message.Message` on first access, and
:meth:`Envelope.flatten` returns the block unchanged as long as nobody looked.

An envelope is therefore in one of three header states:

* *raw*: ``_raw_headers`` holds the header block (CRLF line endings, ending
  with the empty line) and ``_headers`` is ``None``;
* *parsed*: ``_headers`` holds a ``Message`` and ``_raw_headers`` is ``None``;
* *none*: both are ``None`` (``Envelope()`` before anything is parsed).

The raw state is taken only for blocks the stdlib parser reproduces byte for
byte (``Name: value`` fields and continuation lines, see
:data:`_PLAIN_HEADER_BLOCK`), so for that input both states flatten to the same
bytes. Anything else is parsed at once by :meth:`Envelope._parse_now`, which
never drops data: lines that are not header fields go back in front of the
body.
"""

from __future__ import annotations

import copy as _copy
import email.policy
import re
from collections.abc import Callable
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from io import BytesIO
from typing import Any, Self

__all__ = ["Envelope"]

#: Policy for every header block we parse or write: the stdlib SMTP policy
#: (CRLF line endings) that never refolds headers taken from the source, so a
#: received header is written back exactly as it arrived.
_POLICY = email.policy.SMTP.clone(refold_source="none")

#: Stdlib policies are immutable, so :meth:`Envelope.copy` shares them instead
#: of deep-copying one per ``Message`` (keyed by ``id`` as ``deepcopy``'s memo).
_SHARED_POLICIES: dict[int, Any] = {
    id(policy): policy
    for policy in (
        _POLICY,
        email.policy.compat32,
        email.policy.default,
        email.policy.SMTP,
        email.policy.SMTPUTF8,
        email.policy.HTTP,
        email.policy.strict,
    )
}

#: The empty line that ends the header block: a line break, optional
#: whitespace, a line break. Searching from the ``\n`` lets the regex engine
#: skip ahead with a literal prefix scan.
_EMPTY_LINE = re.compile(rb"\n[ \t]*\r?\n")

# Field-body characters accepted on the raw path. str.splitlines(), which the
# stdlib uses when it writes a header back, also breaks lines at VT, FF and
# FS/GS/RS, so those are left to the parsed path.
_TEXT = rb"[^\r\n\x0b\x0c\x1c-\x1e]"
_VISIBLE = rb"[^ \t\r\n\x0b\x0c\x1c-\x1e]"
_NAME = rb"[\x21-\x39\x3b-\x7e]+"


def _plain_header_block(eol: bytes) -> re.Pattern[bytes]:
    # Fields written "Name: value" (exactly one space after the colon, as the
    # stdlib writes them) and continuation lines with something visible on
    # them. The lines are unambiguous, so matching is linear in the input.
    field = _NAME + b": " + _VISIBLE + _TEXT + b"*" + eol
    continuation = b"[ \t]+" + _VISIBLE + _TEXT + b"*" + eol
    return re.compile(b"(?:" + field + b"(?:" + continuation + b")*)*")


#: A header block that the stdlib parses and writes back unchanged, with CRLF
#: line endings: what SMTP delivers, so it is tried first (and is cheaper).
_PLAIN_HEADER_BLOCK = _plain_header_block(rb"\r\n")

#: The same with CRLF or LF line endings; the block is then normalised to CRLF.
_PLAIN_HEADER_BLOCK_ANY_EOL = _plain_header_block(rb"\r?\n")

#: The longest run of header lines at the start of a message, as the stdlib
#: feed parser splits lines (CRLF, LF or a lone CR). A field line is a name and
#: a colon; a continuation line starts with whitespace and is not blank.
_HEADER_LINES = re.compile(
    rb"(?:" + _NAME + rb":[^\r\n]*(?:\r\n|\r|\n|\Z)"
    rb"(?:[ \t]+[^ \t\r\n][^\r\n]*(?:\r\n|\r|\n|\Z))*)*"
)

#: A blank line (only spaces and tabs) right after the header lines: the
#: separator, which is not part of the body.
_BLANK_LINE = re.compile(rb"[ \t]*(?:\r\n|\r|\n)")

#: A field name for :meth:`Envelope.prepend_header` (RFC 5322 section 3.6.8).
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")

#: In a header value: a control character that str.splitlines() treats as a
#: line break, a CR not part of CRLF, or a line break that does not start a
#: continuation line with something visible on it.
_BAD_VALUE = re.compile(r"[\x0b\x0c\x1c-\x1e]|\r(?!\n)|\n(?![ \t]+[^ \t\r\n])")

#: Characters that str.splitlines() breaks at but RFC 5322 does not; in a raw
#: header value the stdlib would write them out as CRLF (a new header line).
_SPLITLINES_ONLY = re.compile("[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")

#: A ``TLS-Required: No`` field (RFC 8689 3) in a raw header block, which
#: holds ``Name: value`` lines with CRLF endings; the value must end there,
#: not go on in a continuation line.
_TLS_REQUIRED_NO = re.compile(rb"(?:\A|\n)TLS-Required: No[ \t]*\r\n(?![ \t])", re.IGNORECASE)

#: Content-Transfer-Encodings that ``Message.get_payload(decode=True)``
#: decodes; for any other value it returns the raw payload bytes.
_DECODED_CTES = frozenset(("quoted-printable", "base64", "x-uuencode", "uuencode", "uue", "x-uue"))


def _header_field(name: str, value: str) -> tuple[bytes, str]:
    """A header field to add: its line for a raw block, and its value as the
    parser stores received ones (8-bit bytes as surrogates), so that a parsed
    block writes it back unchanged.

    :raises ValueError: an invalid field name, or a line break that would
        end the field.
    """
    if _FIELD_NAME.fullmatch(name) is None:
        raise ValueError(f"Invalid header name: {name!r}")
    value = value.replace("\r\n", "\n").lstrip(" \t")
    if _BAD_VALUE.search(value) is not None:
        raise ValueError(f"Invalid header value for {name}: {value!r}")
    encoded = value.encode("utf-8", "surrogateescape")
    line = b"%s: %s\r\n" % (name.encode("ascii"), encoded.replace(b"\n", b"\r\n"))
    stored = value if value.isascii() else encoded.decode("ascii", "surrogateescape")
    return line, stored


class Envelope:
    """One message and the SMTP envelope it travels in.

    Every attribute is public and may be assigned freely.

    :param sender: The reverse-path (``MAIL FROM`` address, without ``<>``);
        ``''`` is the null sender.
    :param recipients: The forward-paths (``RCPT TO`` addresses, without
        ``<>``); ``[]`` when a false value is given.
    :param headers: The parsed header block, if already known.
    :param message: The message body: everything after the header block.

    .. versionchanged:: 4.0
       :attr:`headers` is a property: after :meth:`parse` the header block is
       kept as raw bytes and parsed only when :attr:`headers` is first read.
    """

    #: The reverse-path, without ``<>``; ``''`` is the null sender.
    sender: str | None
    #: The forward-paths, without ``<>``.
    recipients: list[str]
    #: The message body: everything after the header block.
    message: bytes | None
    #: Facts about the submitting client: ``ip``, ``host``, ``name``,
    #: ``protocol``, ``auth``.
    client: dict[str, Any]
    #: Hostname of the receiving server, set by ``Edge.handoff``.
    receiver: str | None
    #: Epoch seconds when the message was received, set by ``Edge.handoff``.
    timestamp: float | None

    # Delivery status notification requests (RFC 3461), set by the SMTP edge
    # when the client gave them; class-level ``None`` defaults keep older
    # pickles loadable.
    #: ``RET`` of MAIL: ``'FULL'`` or ``'HDRS'``.
    dsn_ret: str | None = None
    #: ``ENVID`` of MAIL, xtext-decoded.
    dsn_envid: str | None = None
    #: The id the queue gave the message when it accepted it, before any
    #: queue policy ran (32 lowercase hex digits); ``None`` until then. It is
    #: the ``id`` clause of the ``Received`` header, and the storages of this
    #: package store the message under it while it is free: always, unless a
    #: policy split the message, when each further part gets an id of its own.
    queue_id: str | None = None
    #: ``NOTIFY`` of each RCPT, by recipient address: ``('NEVER',)`` or some
    #: of ``'SUCCESS'``, ``'FAILURE'``, ``'DELAY'``.
    dsn_notify: dict[str, tuple[str, ...]] | None = None
    #: ``ORCPT`` of each RCPT, by recipient address: ``'rfc822;user@host'``
    #: with the address xtext-decoded.
    dsn_orcpt: dict[str, str] | None = None
    #: The message asks for REQUIRETLS (RFC 8689): the SMTP edge sets it when
    #: MAIL carried the ``REQUIRETLS`` parameter (only accepted under TLS).
    #: SMTP relays then deliver it only over TLS that a policy (MTA-STS,
    #: DANE) or the relay's verifying context authenticates, to a server
    #: that offers REQUIRETLS itself, or fail it for good (``550 5.7.30``);
    #: its bounce carries only the header block. The class-level default
    #: keeps older pickles loadable.
    requiretls: bool = False

    def __init__(
        self,
        sender: str | None = None,
        recipients: list[str] | None = None,
        headers: Message | None = None,
        message: bytes | None = None,
    ) -> None:
        self.sender = sender
        self.recipients = recipients or []
        self._headers: Message | None = headers
        self._raw_headers: bytes | None = None
        self.message = message
        self.client = {}
        self.receiver = None
        self.timestamp = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} at {hex(id(self))}, sender={self.sender!r}>"

    @property
    def headers(self) -> Message | None:
        """The header block as an :class:`email.message.Message`.

        Parsed on first access from the raw block :meth:`parse` stored; from
        then on :meth:`flatten` writes out this object, so changes to it are
        kept. Assigning replaces it. ``None`` when there is no header block.
        """
        raw = self._raw_headers
        if raw is not None:
            self._headers = BytesHeaderParser(policy=_POLICY).parsebytes(raw)
            self._raw_headers = None
        return self._headers

    @headers.setter
    def headers(self, headers: Message | None) -> None:
        self._headers = headers
        self._raw_headers = None

    @property
    def tls_optional(self) -> bool:
        """True when the sender asked for delivery whatever TLS the relay
        can get: a ``TLS-Required: No`` header field (RFC 8689 3) and no
        :attr:`requiretls`, which wins over the header (RFC 8689 4.1).

        :class:`~slimta.relay.smtp.mx.MxSmtpRelay` then delivers without
        applying MTA-STS or DANE. A raw header block is searched as bytes,
        without being parsed.

        .. versionadded:: 4.0
        """
        if self.requiretls:
            return False
        raw = self._raw_headers
        if raw is not None:
            # Asked of every message a relay with policies sends: a plain
            # search first, the regular expression only for a likely block.
            if raw.lower().find(b"tls-required:") == -1:
                return False
            return _TLS_REQUIRED_NO.search(raw) is not None
        headers = self._headers
        if headers is None:
            return False
        values = headers.get_all("TLS-Required") or ()
        # ABNF strings are case-insensitive; folding whitespace may surround it.
        return any(str(value).lower().split() == ["no"] for value in values)

    def prepend_header(self, name: str, value: str) -> None:
        """Insert a header before all existing ones (e.g. ``Received:``).

        The value is written as given, not refolded: a line break in it must
        start a continuation line (whitespace, then text). Non-ASCII text is
        written as UTF-8. Adding a header does not parse the header block.

        :param name: The field name, e.g. ``'Received'``.
        :param value: The field body.
        :raises ValueError: The name is not a valid field name, or the value
            holds a line break that would end the header.
        """
        line, stored = _header_field(name, value)
        raw = self._raw_headers
        if raw is None and self._headers is None:
            raw = b"\r\n"
        if raw is not None:
            self._raw_headers = line + raw
            return
        msg = self._headers
        assert msg is not None
        existing = list(msg.raw_items())
        for key in {key.lower() for key, _ in existing}:
            del msg[key]
        msg.set_raw(name, stored)
        for key, item in existing:
            msg.set_raw(key, item)

    def append_header(self, name: str, value: str) -> None:
        """Add a header after all existing ones (e.g. a missing ``Date:``).

        The same rules as :meth:`prepend_header`; adding a header does not
        parse the header block.

        .. versionadded:: 4.0
        """
        line, stored = _header_field(name, value)
        raw = self._raw_headers
        if raw is None and self._headers is None:
            raw = b"\r\n"
        if raw is not None:
            # The block ends with the empty line: the new field goes before it.
            self._raw_headers = raw[:-2] + line + b"\r\n"
            return
        msg = self._headers
        assert msg is not None
        msg.set_raw(name, stored)

    def copy(self, new_rcpts: list[str] | None = None) -> Self:
        """Return a deep copy of the envelope: headers, client dict, all.

        :param new_rcpts: If true, the copy's :attr:`recipients`.
        :returns: The new envelope.
        """
        new: Self = _copy.deepcopy(self, dict(_SHARED_POLICIES))
        if new_rcpts:
            new.recipients = new_rcpts
        return new

    def flatten(self) -> tuple[bytes, bytes]:
        """Serialise the message.

        The header bytes end with the empty line that separates them from the
        body, so ``header_bytes + body_bytes`` is the complete message. They
        use CRLF line endings; the body is returned unchanged. With no header
        block at all (:attr:`headers` is ``None``) the header bytes are empty.

        :returns: ``(header_bytes, body_bytes)``.
        """
        body = self.message if self.message is not None else b""
        raw = self._raw_headers
        if raw is not None:
            return raw, body
        if self._headers is None:
            return b"", body
        return _write_headers(self._headers), body

    def parse(self, data: bytes) -> None:
        """Fill :attr:`headers` and :attr:`message` from a raw message.

        The header block ends at the first empty line (a line break, optional
        whitespace, a line break); without one the whole input is headers and
        the body is ``b''``. Lines that are not header fields end the block
        early and are kept at the front of the body, so no data is lost: input
        whose first line is not a header has no headers and its whole text as
        body. The headers themselves are parsed only when first read.

        :param data: The message, with CRLF or LF line endings.
        """
        match = _EMPTY_LINE.search(data)
        if match is None:
            block, body = data, b""
            if block and not block.endswith(b"\n"):
                block += b"\r\n"
        else:
            block, body = data[: match.start() + 1], data[match.end() :]
        if _PLAIN_HEADER_BLOCK.fullmatch(block) is None:
            if _PLAIN_HEADER_BLOCK_ANY_EOL.fullmatch(block) is None:
                self._parse_now(data)
                return
            block = block.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self._headers = None
        self._raw_headers = block + b"\r\n"
        self.message = body

    def _parse_now(self, data: bytes) -> None:
        # The slow path for header blocks the raw path does not take: any
        # line endings, odd spacing, non-header lines. The header lines are
        # found here rather than left to the stdlib, which silently drops some
        # lines (a leading continuation line, a ":value" line, "From " lines).
        end = _HEADER_LINES.match(data)
        assert end is not None  # the pattern matches the empty string
        rest = data[end.end() :]
        blank = _BLANK_LINE.match(rest)
        if blank is not None:
            rest = rest[blank.end() :]
        self._headers = BytesHeaderParser(policy=_POLICY).parsebytes(data[: end.end()])
        self._raw_headers = None
        self.message = rest

    def parse_msg(self, msg: Message) -> None:
        """Serialise ``msg`` with CRLF line endings and :meth:`parse` it.

        :param msg: A complete message, e.g. built with :mod:`email.mime`.
        """
        policy = msg.policy
        if policy.linesep != "\r\n":
            policy = policy.clone(linesep="\r\n")
        out = BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=policy).flatten(msg)
        self.parse(out.getvalue())

    def encode_7bit(self, encoder: Callable[[Message], None] | None = None) -> None:
        """Make the message safe for servers without ``8BITMIME``.

        Nothing happens if the body is ASCII. Otherwise the whole message is
        parsed as MIME, and each non-multipart part whose payload is not ASCII
        loses its ``Content-Transfer-Encoding`` header and is passed to
        ``encoder``; then :attr:`headers` and :attr:`message` are filled from
        the result.

        :param encoder: A function from :mod:`email.encoders`, such as
            :func:`~email.encoders.encode_base64` or
            :func:`~email.encoders.encode_quopri`.
        :raises UnicodeDecodeError: The body is not ASCII and no ``encoder``
            was given.
        """
        body = self.message if self.message is not None else b""
        try:
            body.decode("ascii")
        except UnicodeDecodeError:
            if encoder is None:
                raise
        else:
            return
        header_bytes, body = self.flatten()
        msg = BytesParser(policy=_POLICY).parsebytes(header_bytes + body)
        for part in msg.walk():
            if _payload_is_8bit(part):
                del part["Content-Transfer-Encoding"]
                encoder(part)
        self.parse_msg(msg)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickles hold the raw header block while nobody has read the headers,
        # so storing an envelope never forces a parse. A python-slimta 4.0
        # pickle has a plain "headers" entry instead.
        state = dict(state)
        legacy = "headers" in state
        headers = state.pop("headers", None)
        self.__dict__.update(state)
        if legacy:
            self._headers = headers
            self._raw_headers = None
        else:
            self.__dict__.setdefault("_headers", None)
            self.__dict__.setdefault("_raw_headers", None)


def _write_headers(msg: Message) -> bytes:
    """Serialise the header block of ``msg`` with CRLF line endings.

    Does what :class:`email.generator.BytesGenerator` does for headers,
    without writing the payload.
    """
    policy = msg.policy
    if policy.linesep != "\r\n":
        policy = policy.clone(linesep="\r\n")
    lines = []
    for name, value in msg.raw_items():
        if isinstance(value, str) and _SPLITLINES_ONLY.search(value) is not None:
            # Otherwise the stdlib would turn e.g. a form feed into CRLF, which
            # ends the header: a way to inject header lines when relaying.
            value = _SPLITLINES_ONLY.sub(" ", value)
        lines.append(policy.fold_binary(name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


def _payload_is_8bit(part: Message) -> bool:
    """Return whether a non-multipart ``part`` has a payload that is not ASCII."""
    if part.is_multipart():
        return False
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte in _DECODED_CTES:
        # An encoded payload is ASCII text unless it is malformed; the text
        # view replaces any 8-bit bytes with non-ASCII characters.
        text = part.get_payload()
        return isinstance(text, str) and not text.isascii()
    raw = part.get_payload(decode=True)
    return isinstance(raw, bytes) and not raw.isascii()
