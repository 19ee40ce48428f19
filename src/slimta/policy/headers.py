"""Queue policies that add the headers every stored message should carry.

:class:`AddDateHeader` and :class:`AddMessageIdHeader` fill in the
``Date:`` and ``Message-Id:`` fields a submitted message may lack (RFC 6409
section 8); :class:`AddReceivedHeader` prepends the ``Received:`` trace field
of RFC 5321 section 4.4. Add them to a :class:`~slimta.queue.Queue` with
``add_policy``.

Headers stay unparsed
---------------------

:meth:`Envelope.parse <slimta.envelope.Envelope.parse>` keeps the header
block as raw bytes until someone reads :attr:`Envelope.headers
<slimta.envelope.Envelope.headers>`, because the stdlib parser costs more
than the rest of an SMTP transaction. So these policies look for an existing
``Date:`` or ``Message-Id:`` field in the flattened bytes, and prepend
``Received:`` with :meth:`~slimta.envelope.Envelope.prepend_header`: a message
that already has its ``Date`` and ``Message-Id`` is never parsed. Only a
missing field is appended through the parsed headers.

What the client said
--------------------

Everything in a ``Received:`` field that comes from the client (the EHLO
name, the PTR name of its address, the recipient) is checked against the
RFC 5321 syntax before it is written, and left out when it does not match,
so that no value can end the field, add one, or break its structure
(comments, the ``;`` before the date). Names with 8-bit characters are
written as U-labels only in SMTPUTF8 sessions (``with UTF8SMTP...``, RFC 6531
section 3.7.3), elsewhere as A-labels (IDNA); a recipient address with 8-bit
characters is left out unless the session was SMTPUTF8.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import ipaddress
import re
import time
from typing import TYPE_CHECKING, Any

from slimta.core import __version__
from slimta.policy import QueuePolicy
from slimta.util._hostname import local_fqdn
from slimta.util.ids import is_uuid4_hex, uuid4_hex

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["AddDateHeader", "AddMessageIdHeader", "AddReceivedHeader"]

#: The 4.0 default ``date_format`` of :class:`AddReceivedHeader`: UTC.
_DEFAULT_RECEIVED_DATE = "%a, %d %b %Y %H:%M:%S +0000"

# A field of that name at the start of a header line. Envelope.parse only
# takes "name:" with no space before the colon as a field, so this finds
# exactly the fields the stdlib parser would find.
_DATE_FIELD = re.compile(rb"(?:\A|\n)date:", re.IGNORECASE)
_MESSAGE_ID_FIELD = re.compile(rb"(?:\A|\n)message-id:", re.IGNORECASE)

#: RFC 5321 4.1.2 sub-domain (Let-dig [Ldh-str]), with "_" also allowed:
#: Windows host names have it, and it has no meaning in a header.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_ASCII_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

#: RFC 5321 4.1.3 General-address-literal (Standardized-tag ":" 1*dcontent).
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")

#: RFC 5322 3.2.3 atext, for the id-right of a Message-Id (dot-atom-text).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_TEXT = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
#: RFC 6531 3.3: atext plus UTF8-non-ascii, as one class (no nested repeats,
#: so a failed match costs linear time).
_ATEXT_UTF8 = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"

#: RFC 5321 4.1.2 Local-part: Dot-string or Quoted-string, ASCII form.
_LOCAL_PART = re.compile(
    rf'{_ATEXT}(?:\.{_ATEXT})*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
)
#: The same with RFC 6531 3.3 UTF8-non-ascii in atext and qtextSMTP.
_LOCAL_PART_UTF8 = re.compile(
    rf"{_ATEXT_UTF8}(?:\.{_ATEXT_UTF8})*"
    r'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"'
)

#: A ``with`` protocol: an Atom; the registered ones (RFC 3848, RFC 6531
#: section 4.3: ESMTPSA, LMTP, UTF8SMTPS ...) are letters and digits.
_PROTOCOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")

#: RFC 5321 4.5.3.1.2: at most 255 octets in a domain name.
_MAX_DOMAIN = 255
#: RFC 5321 4.5.3.1.3: at most 256 octets in a path, "<" and ">" included.
_MAX_PATH = 256
#: RFC 5322 2.1.1: lines SHOULD be at most 78 characters.
_FOLD_AT = 78


class AddDateHeader(QueuePolicy):
    """Adds a ``Date:`` header to messages that have none.

    The date is that of :attr:`Envelope.timestamp
    <slimta.envelope.Envelope.timestamp>` (now, when it is ``None``), as
    :meth:`build_date` writes it.

    .. versionchanged:: 4.0
       The date has a numeric zone (``+0100``) as RFC 5322 section 3.3
       requires, not a zone name; day and month names do not depend on the
       locale.
    """

    _last_second: int | None = None
    _last_text = ""

    def build_date(self, timestamp: float) -> str:
        """Write *timestamp* as an RFC 5322 date-time in local time.

        Override it for another format.

        :param timestamp: epoch seconds.
        :returns: e.g. ``'Sun, 06 Dec 2026 05:10:00 +0100'``.
        """
        second = int(timestamp)
        if second != self._last_second:
            # Messages queued in the same second share the text.
            utc = datetime.datetime.fromtimestamp(second, datetime.UTC)
            self._last_text = email.utils.format_datetime(utc.astimezone())
            self._last_second = second
        return self._last_text

    def apply(self, envelope: Envelope) -> None:
        """Add ``Date:`` to *envelope* unless it has one (in any letter case)."""
        if _has_field(envelope, _DATE_FIELD):
            return
        timestamp = envelope.timestamp
        if timestamp is None:
            timestamp = time.time()
        _add_field(envelope, "Date", self.build_date(timestamp))


class AddMessageIdHeader(QueuePolicy):
    """Adds a ``Message-Id:`` header to messages that have none.

    The id is ``<uuid4hex.timestamp@hostname>``: a random UUID, the integer
    :attr:`Envelope.timestamp <slimta.envelope.Envelope.timestamp>` (now,
    when it is ``None``) and *hostname*.

    :param hostname: the right side of the id; default this host's FQDN. A
        non-ASCII name is written as A-labels (IDNA).
    :raises ValueError: *hostname* cannot be the right side of a
        ``msg-id`` (RFC 5322 section 3.6.4).
    """

    def __init__(self, hostname: str | None = None) -> None:
        name = hostname or local_fqdn()
        checked = _message_id_domain(name)
        if checked is None:
            raise ValueError(f"Not usable in a Message-Id: {name!r}")
        #: The right side of each id (after ``@``).
        self.hostname = checked

    def apply(self, envelope: Envelope) -> None:
        """Add ``Message-Id:`` to *envelope* unless it has one (in any letter case)."""
        if _has_field(envelope, _MESSAGE_ID_FIELD):
            return
        timestamp = envelope.timestamp
        if timestamp is None:
            timestamp = time.time()
        _add_field(envelope, "Message-Id", f"<{uuid4_hex()}.{int(timestamp)}@{self.hostname}>")


class AddReceivedHeader(QueuePolicy):
    """Prepends a ``Received:`` trace header (RFC 5321 section 4.4).

    The field reads, folded at 78 characters::

        Received: from <EHLO name> (<PTR name> [<client IP>])
         by <receiver> (slimta <version>) with <protocol> id <queue id>
         for <recipient>; <date>

    from ``envelope.client`` (``name``, ``host``, ``ip``, ``protocol``),
    :attr:`~slimta.envelope.Envelope.receiver` (default this host's FQDN)
    and :attr:`~slimta.envelope.Envelope.timestamp` (default now):

    * the address is an RFC 5321 address literal: ``[192.0.2.1]``,
      ``[IPv6:2001:db8::1]`` (an IPv4-mapped IPv6 address is written as
      IPv4);
    * an unknown or malformed PTR name is left out: ``([192.0.2.1])``; an
      unknown address leaves out the whole parenthesis;
    * an unknown or malformed EHLO name is replaced by the address literal;
      with no address either, the ``from`` clause is left out;
    * ``with`` is left out when the protocol is unknown or not an atom;
    * ``for`` is written only when the message has exactly one recipient
      (RFC 5321 section 4.4: one path at most, so that Bcc recipients are not
      disclosed), and only for a well-formed address;
    * ``id`` is :attr:`~slimta.envelope.Envelope.queue_id`, the id the
      queue gave the message on arrival and stores it under (left out when
      there is none);

    :param date_format: a :func:`time.strftime` format for the date, applied
        to UTC; the default gives an RFC 5322 date with day and month names
        in English whatever the locale.

    .. versionchanged:: 4.0
       ``for`` names the recipient only when there is exactly one, and
       unknown values are left out instead of written as ``unknown``; client
       values that do not fit the RFC 5321 syntax are left out; long fields
       are folded.
    """

    def __init__(self, date_format: str = _DEFAULT_RECEIVED_DATE) -> None:
        #: The :func:`time.strftime` format of the date, in UTC.
        self.date_format = date_format

    _last_date: tuple[int, str, str] | None = None

    def _date(self, timestamp: float) -> str:
        second = int(timestamp)
        last = self._last_date
        if last is not None and last[0] == second and last[1] == self.date_format:
            return last[2]  # messages queued in the same second share the text
        if self.date_format == _DEFAULT_RECEIVED_DATE:
            # strftime's %a and %b follow the locale; RFC 5322 wants English.
            utc = datetime.datetime.fromtimestamp(second, datetime.UTC)
            text = email.utils.format_datetime(utc)
        else:
            text = time.strftime(self.date_format, time.gmtime(second))
        self._last_date = (second, self.date_format, text)
        return text

    def apply(self, envelope: Envelope) -> None:
        """Prepend ``Received:`` to *envelope*."""
        client: dict[str, Any] = envelope.client or {}
        protocol = client.get("protocol")
        if not isinstance(protocol, str) or _PROTOCOL.fullmatch(protocol) is None:
            protocol = None
        # RFC 6531 3.7.3: U-labels in trace fields of SMTPUTF8 messages only.
        utf8 = protocol is not None and protocol.upper().startswith("UTF8")

        # Each word is a clause or part of a comment: folding goes between.
        words: list[str] = []
        literal = _address_literal(client.get("ip"))
        name = _domain(client.get("name"), utf8, literals=True) or literal
        if name is not None:
            words.append(f"from {name}")
            if literal is not None:
                # TCP-info: what the connection says, not the client.
                host = _domain(client.get("host"), utf8, literals=False)
                words += [f"({host}", f"{literal})"] if host else [f"({literal})"]
        receiver = _domain(envelope.receiver, utf8, literals=True)
        if receiver is None:
            receiver = _domain(local_fqdn(), utf8, literals=False) or "localhost"
        words += [f"by {receiver}", f"(slimta {__version__})"]
        if protocol is not None:
            words.append(f"with {protocol}")
        if is_uuid4_hex(envelope.queue_id):
            words.append(f"id {envelope.queue_id}")
        if len(envelope.recipients) == 1:
            path = _path(envelope.recipients[0], utf8)
            if path is not None:
                words.append(f"for {path}")
        words[-1] += ";"
        timestamp = envelope.timestamp
        if timestamp is None:
            timestamp = time.time()
        words.append(self._date(timestamp))
        envelope.prepend_header("Received", _fold(words, len("Received: ")))


def _has_field(envelope: Envelope, field: re.Pattern[bytes]) -> bool:
    """Whether *envelope* has a header field that *field* finds.

    Searches the flattened header block, so raw headers are not parsed.
    """
    header_bytes, _ = envelope.flatten()
    return field.search(header_bytes) is not None


def _add_field(envelope: Envelope, name: str, value: str) -> None:
    """Append a header to *envelope*, without parsing its header block.

    Appended, not prepended: above the first field it would split the block
    of trace fields (RFC 5322 3.6.7).
    """
    envelope.append_header(name, value)


def _fold(words: list[str], start: int) -> str:
    """Join *words* with spaces, folding before a word that would pass column 78.

    A word is never split, so a line is longer only when one word is; the
    checks on each word keep every line well under 998 octets.
    """
    lines: list[str] = []
    line = ""
    column = start
    for word in words:
        width = len(word.encode("utf-8"))
        if line and column + 1 + width > _FOLD_AT:
            # RFC 5322 2.2.3: folding is a CRLF before white space.
            lines.append(line)
            line, column = word, 1 + width
        elif line:
            line += " " + word
            column += 1 + width
        else:
            line, column = word, column + width
    lines.append(line)
    return "\r\n ".join(lines)


def _address_literal(ip: object) -> str | None:
    """The RFC 5321 4.1.3 address literal of *ip*, or ``None`` if it is not one."""
    if not isinstance(ip, str):
        return None
    return _literal_of(ip)


@functools.lru_cache(maxsize=4096)
def _literal_of(ip: str) -> str | None:
    # Clients come back: parse each address once.
    try:
        # A zone index (fe80::1%eth0) means nothing beyond this host.
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is None:
            return f"[IPv6:{address.compressed}]"
        address = mapped
    return f"[{address}]"


def _literal_ok(text: str) -> bool:
    """Whether *text* is an RFC 5321 4.1.3 address literal, brackets included."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        return False
    inner = text[1:-1]
    if inner[:5].upper() == "IPV6:":
        if "%" in inner:
            return False  # a zone index (RFC 4007) is not part of IPv6-addr
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        return _GENERAL_LITERAL.fullmatch(inner) is not None and inner.isascii()
    return True


def _ascii_domain_ok(name: str) -> bool:
    return name.isascii() and len(name) <= _MAX_DOMAIN and _ASCII_DOMAIN.fullmatch(name) is not None


def _domain(name: object, utf8: bool, *, literals: bool) -> str | None:
    """*name* as a domain to write in a ``Received:`` field, or ``None``.

    An ASCII name must have the RFC 5321 syntax. A non-ASCII one must be a
    valid IDN: written as U-labels when *utf8*, else as A-labels. With
    *literals*, an address literal is accepted too.
    """
    if not isinstance(name, str) or not name:
        return None
    return _checked_domain(name, utf8, literals)


@functools.lru_cache(maxsize=4096)
def _checked_domain(name: str, utf8: bool, literals: bool) -> str | None:
    # Client and server names come back: check each once.
    if name.isascii():
        if _ascii_domain_ok(name) or (literals and _literal_ok(name)):
            return name
        return None
    if not name.isprintable():
        return None  # controls, line separators, unassigned code points
    try:
        # The codec's nameprep refuses spaces and controls, but not every
        # ASCII character, hence the check of the result.
        a_labels = name.encode("idna").decode("ascii")
        u_labels = a_labels.encode("ascii").decode("idna")
    except UnicodeError:
        return None
    if not _ascii_domain_ok(a_labels):
        return None
    return u_labels if utf8 else a_labels


def _message_id_domain(name: str) -> str | None:
    """*name* as the id-right of a Message-Id (ASCII dot-atom-text), or ``None``."""
    if not name.isascii():
        name = _domain(name, False, literals=False) or ""
    if name and _DOT_ATOM_TEXT.fullmatch(name) is not None:
        return name
    return None


def _path(address: object, utf8: bool) -> str | None:
    """``<address>`` for a ``for`` clause, or ``None`` if it is not well formed.

    The address is written as received, never rewritten: a recipient that
    does not fit RFC 5321 4.1.2 (RFC 6531 3.3 in SMTPUTF8 sessions) is left
    out rather than shown altered.
    """
    if not isinstance(address, str) or not address.isprintable():
        return None
    if not utf8 and not address.isascii():
        return None
    if len(address.encode("utf-8")) + 2 > _MAX_PATH:
        return None
    local, at, domain = address.rpartition("@")
    if not at:
        # RFC 5321 4.1.1.3: <Postmaster> alone is a valid recipient.
        return f"<{address}>" if address.lower() == "postmaster" else None
    local_part = _LOCAL_PART_UTF8 if utf8 else _LOCAL_PART
    if local_part.fullmatch(local) is None:
        return None
    if _domain(domain, utf8, literals=True) is None:
        return None
    return f"<{address}>"
