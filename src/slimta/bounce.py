"""The :class:`Bounce`: a delivery status notification for failed recipients.

A bounce is an :class:`~slimta.envelope.Envelope` of its own, sent from the
null sender back to the sender of the failed message. Its message is a
delivery status notification (RFC 3464) in a ``multipart/report`` (RFC 6522)::

    multipart/report; report-type=delivery-status
    +-- text/plain                 what failed, for a human, quoting the reply
    +-- message/delivery-status    per-message fields, a blank line, then one
    |                              block of fields per failed recipient
    +-- message/rfc822             the original message, or only its header
        (text/rfc822-headers)      block when asked for (RET=HDRS)

A message that needs SMTPUTF8 (non-ASCII addresses or header fields) is
reported with the RFC 6533 types instead: ``message/global-delivery-status``
(with ``utf-8`` address types for non-ASCII addresses), ``message/global``
and ``message/global-headers``.

The message is built from two templates, :attr:`Bounce.header_template`
(the bounce's header block and everything up to the original message) and
:attr:`Bounce.footer_template` (the closing boundary), rendered with
:class:`~slimta.util.bytesformat.BytesFormat`; subclasses change the wording
by overriding them. The result always has CRLF line endings. It is 7-bit
unless the original message, the reply text or an address is not ASCII:
then ``Content-Transfer-Encoding: 8bit`` is declared and the original is
attached unchanged (``message/*`` parts may not be base64 or
quoted-printable encoded, RFC 2046 section 5.2.1), so relaying the bounce
needs ``8BITMIME``.

The bounce of a message sent with REQUIRETLS (RFC 8689,
:attr:`Envelope.requiretls <slimta.envelope.Envelope.requiretls>`) carries
only the original header block, whatever ``RET`` asked, and is itself
flagged :attr:`~slimta.envelope.Envelope.requiretls`, so that it travels back
under the same protection (RFC 8689 5).

No bounce may be sent for a message from the null sender (RFC 5321 section
4.5.5, RFC 3461 section 6.2): the queue checks this before it calls its bounce
factory, and :class:`Bounce` raises :exc:`ValueError` if asked anyway.
:meth:`Bounce.factory` does both checks the queue needs (null sender, and the
``NOTIFY`` parameters of the recipients) and returns ``None`` when no bounce
is due.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Sequence
from email.utils import formatdate
from typing import Any, Self

from slimta.envelope import Envelope
from slimta.smtp.reply import Reply
from slimta.util._hostname import local_fqdn
from slimta.util.bytesformat import BytesFormat

__all__ = ["Bounce"]

#: A CR or LF that is not part of a CRLF pair.
_LONE_EOL = re.compile(rb"\r(?!\n)|(?<!\r)\n")

#: Characters that may not appear inside a header or DSN field value: C0
#: controls, DEL, and what :meth:`str.splitlines` also takes for a line break.
_CONTROLS = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]+")

#: Any line break, for putting a multi-line reply on one field line.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

#: Fields are folded at spaces to keep lines this short where possible
#: (RFC 5322 section 2.1.1).
_FOLD_AT = 78

_HEADER_TEMPLATE = (
    b"From: {mailer_daemon}\r\n"
    b"To: {sender}\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"Date: {date}\r\n"
    b"Message-Id: {message_id}\r\n"
    b"Auto-Submitted: auto-replied\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/report; report-type={report_type};\r\n"
    b' boundary="{boundary}"\r\n'
    b"Content-Transfer-Encoding: {transfer_encoding}\r\n"
    b"\r\n"
    b"This is a MIME-encapsulated delivery status notification.\r\n"
    b"\r\n"
    b"--{boundary}\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: {transfer_encoding}\r\n"
    b"\r\n"
    b"This is the mail system at {reporting_mta}.\r\n"
    b"\r\n"
    b"Your message could not be delivered to the following recipients:\r\n"
    b"\r\n"
    b"- {recipients}\r\n"
    b"\r\n"
    b"The mail system reported:\r\n"
    b"\r\n"
    b"{code} {message}\r\n"
    b"\r\n"
    b"--{boundary}\r\n"
    b"Content-Type: {delivery_status_type}\r\n"
    b"Content-Transfer-Encoding: {transfer_encoding}\r\n"
    b"\r\n"
    b"{delivery_info}"
    b"\r\n"
    b"--{boundary}\r\n"
    b"Content-Type: {content_type}\r\n"
    b"Content-Transfer-Encoding: {transfer_encoding}\r\n"
    b"\r\n"
)

_FOOTER_TEMPLATE = b"\r\n--{boundary}--\r\n"


class Bounce(Envelope):
    """A delivery status notification (RFC 3464) for a failed ``envelope``.

    The bounce is addressed from :attr:`sender` (the null sender) to the
    original sender, has :attr:`client` for its client facts, now for its
    :attr:`~slimta.envelope.Envelope.timestamp`, and :attr:`receiver` (or
    else the original envelope's receiver) for its receiver. Its
    :attr:`~slimta.envelope.Envelope.headers` and
    :attr:`~slimta.envelope.Envelope.message` come from parsing the rendered
    templates; see the module documentation for the layout.

    The class itself is a bounce factory for :class:`slimta.queue.Queue`:
    ``Bounce(envelope, reply)``. The queue must not call it for a message
    from the null sender; :meth:`factory` does that check and the ``NOTIFY``
    filtering for it.

    Template keys, for :attr:`header_template` and :attr:`footer_template`:

    ``boundary``, ``sender`` (the original sender), ``recipients`` (the failed
    ones, joined with :attr:`recipient_join`), ``client_name``, ``client_ip``,
    ``protocol`` (the original client's), ``code``, ``message`` (of
    ``reply``), ``delivery_info`` (the whole body of the delivery status part,
    ending with a line break), ``content_type`` (of the original message's
    part), and since 4.0 ``report_type``, ``delivery_status_type``,
    ``transfer_encoding`` (``7bit`` or ``8bit``), ``reporting_mta``,
    ``mailer_daemon`` (the ``From`` address), ``date`` and ``message_id``.

    :param envelope: The message that could not be delivered.
    :param reply: The reply that made delivery fail; gives ``Status``,
        ``Diagnostic-Code`` and, from its ``address``, ``Remote-MTA``.
    :param headers_only: Attach only the original header block, not the whole
        message. An envelope whose ``dsn_ret`` is ``'HDRS'`` gets the same,
        and so does one with ``requiretls`` (RFC 8689), whose bounce is then
        flagged ``requiretls`` too.
    :param failed_recipients: The recipients this bounce reports, each with
        the same ``reply``; by default all of ``envelope.recipients``.
    :raises ValueError: ``envelope`` has the null (or no) sender, or there is
        no recipient to report.

    .. versionchanged:: 4.0
       The message is a complete RFC 3464 report: ``Reporting-MTA``,
       ``Original-Envelope-Id``, ``Arrival-Date``, and per recipient
       ``Original-Recipient``, ``Final-Recipient``, ``Action``, ``Status``
       and ``Last-Attempt-Date`` fields; ``Date`` and ``Message-Id`` headers;
       ``RET=HDRS`` honoured; RFC 6533 types for SMTPUTF8 messages. Added
       ``failed_recipients`` and :meth:`factory`. The null sender now raises
       :exc:`ValueError`.
    """

    #: The bounce's envelope sender: the null sender.
    sender = ""

    #: The bounce's client facts (each bounce gets a copy).
    client = {"name": "postmaster", "ip": "127.0.0.1", "host": "localhost"}

    #: The bounce's receiver; ``None`` takes the original envelope's.
    receiver = None

    #: Rendered before the original message. A :class:`str` or :class:`bytes`
    #: value is turned into a ``BytesFormat`` in ``'remove'`` mode, with line
    #: endings normalised to CRLF.
    header_template: BytesFormat | str | bytes = BytesFormat(_HEADER_TEMPLATE, mode="remove")

    #: Rendered after the original message: closes the MIME structure.
    footer_template: BytesFormat | str | bytes = BytesFormat(_FOOTER_TEMPLATE, mode="remove")

    #: Joins the failed recipients for the ``recipients`` key.
    recipient_join = "\r\n- "

    def __init__(
        self,
        envelope: Envelope,
        reply: Reply,
        headers_only: bool = False,
        *,
        failed_recipients: Sequence[str] | None = None,
    ) -> None:
        cls = type(self)
        original_sender = envelope.sender
        if not original_sender:
            # RFC 5321 section 4.5.5: never bounce a bounce.
            raise ValueError("Cannot bounce a message from the null sender")
        failed = list(envelope.recipients if failed_recipients is None else failed_recipients)
        if not failed:
            raise ValueError("No failed recipients to report")
        now = time.time()
        super().__init__(cls.sender, [original_sender])
        self.timestamp = now
        self.client = dict(cls.client)
        self.receiver = cls.receiver if cls.receiver is not None else envelope.receiver
        reporting_mta = _clean(self.receiver or local_fqdn())

        header_bytes, body = envelope.flatten()
        # RFC 3461 section 4.3: RET=HDRS asks for the headers only. RFC 8689
        # 5: the report on a REQUIRETLS message keeps its content out of it
        # and asks for REQUIRETLS on the way back.
        headers_only = headers_only or (envelope.dsn_ret or "").upper() == "HDRS"
        if envelope.requiretls:
            headers_only = True
            self.requiretls = True
        original = header_bytes if headers_only else header_bytes + body
        original = _LONE_EOL.sub(b"\r\n", original)

        delivery_info = _delivery_status(envelope, reply, failed, reporting_mta, now)
        # RFC 6533: a message that needs SMTPUTF8 is reported with the global
        # types, whose fields and headers may hold UTF-8.
        utf8 = not (
            original_sender.isascii() and delivery_info.isascii() and header_bytes.isascii()
        )
        if utf8:
            report_type = "global-delivery-status"
            content_type = "message/global-headers" if headers_only else "message/global"
        else:
            report_type = "delivery-status"
            content_type = "text/rfc822-headers" if headers_only else "message/rfc822"
        client = envelope.client
        values: dict[str, str] = {
            "boundary": "boundary_=" + uuid.uuid4().hex,
            "sender": _clean(original_sender),
            "recipients": cls.recipient_join.join(_clean(rcpt) for rcpt in failed),
            "client_name": _clean(_text(client.get("name"))),
            "client_ip": _clean(_text(client.get("ip"))),
            "protocol": _clean(_text(client.get("protocol"))),
            "code": reply.code or "",
            "message": reply.message or "",
            "delivery_info": delivery_info,
            "content_type": content_type,
            "report_type": report_type,
            "delivery_status_type": "message/" + report_type,
            "reporting_mta": reporting_mta,
            "mailer_daemon": f"MAILER-DAEMON@{reporting_mta}" if self.receiver else "MAILER-DAEMON",
            "date": formatdate(now, localtime=True),
            "message_id": f"<{uuid.uuid4().hex}@{reporting_mta}>",
        }
        header = _as_format(cls.header_template)
        footer = _as_format(cls.footer_template)
        seven_bit = (
            original.isascii()
            and header.template.isascii()
            and footer.template.isascii()
            and all(value.isascii() for value in values.values())
        )
        values["transfer_encoding"] = "7bit" if seven_bit else "8bit"
        self.parse(
            _LONE_EOL.sub(b"\r\n", header.format(**values))
            + original
            + _LONE_EOL.sub(b"\r\n", footer.format(**values))
        )

    @classmethod
    def factory(
        cls,
        envelope: Envelope,
        reply: Reply,
        *,
        failed_recipients: Sequence[str] | None = None,
        headers_only: bool = False,
    ) -> Self | None:
        """Build a bounce if one is due, as a queue's bounce factory should.

        No bounce is due for a message from the null sender, nor for
        recipients whose ``NOTIFY`` parameter (``envelope.dsn_notify``, RFC
        3461 section 4.1) was given without ``FAILURE``; recipients without
        one get the default, a failure notice.

        :param envelope: The message that could not be delivered.
        :param reply: The reply that made delivery fail.
        :param failed_recipients: The failed recipients; by default all of
            ``envelope.recipients``.
        :param headers_only: Attach only the original header block.
        :returns: The bounce, or ``None`` when none is due.

        .. versionadded:: 4.0
        """
        if not envelope.sender:
            return None
        failed = envelope.recipients if failed_recipients is None else failed_recipients
        notify = envelope.dsn_notify or {}
        wanted = [rcpt for rcpt in failed if _wants_failure_notice(notify.get(rcpt))]
        if not wanted:
            return None
        return cls(envelope, reply, headers_only, failed_recipients=wanted)


def _delivery_status(
    envelope: Envelope,
    reply: Reply,
    failed: Iterable[str],
    reporting_mta: str,
    now: float,
) -> str:
    """The body of the delivery status part (RFC 3464 section 2.1).

    Per-message fields, then for each recipient a blank line and its fields,
    in the order of the RFC's grammar; every line ends with CRLF.
    """
    # RFC 3464 section 2.2: per-message fields.
    lines: list[str] = []
    if envelope.dsn_envid:
        lines.append(_field("Original-Envelope-Id", envelope.dsn_envid))
    lines.append(_field("Reporting-MTA", "dns; " + reporting_mta))
    received_from = _received_from(envelope.client)
    if received_from is not None:
        lines.append(_field("Received-From-MTA", received_from))
    if envelope.timestamp is not None:
        lines.append(_field("Arrival-Date", formatdate(envelope.timestamp, localtime=True)))

    # RFC 3464 section 2.3: per-recipient fields, the same reply for each.
    status = _status(reply)
    remote_mta = _remote_mta(reply.address)
    diagnostic = None
    if reply.code:
        text = " ".join(_LINE_BREAK.split(reply.message or "")).strip()
        diagnostic = f"smtp; {reply.code} {text}".rstrip()
    last_attempt = formatdate(now, localtime=True)
    orcpts = envelope.dsn_orcpt or {}
    for rcpt in failed:
        lines.append("\r\n")
        orcpt = orcpts.get(rcpt)
        if orcpt:
            if ";" not in orcpt:
                orcpt = "rfc822;" + orcpt
            lines.append(_field("Original-Recipient", orcpt))
        # RFC 6533 section 3: non-ASCII addresses have the utf-8 type.
        addr_type = "rfc822" if rcpt.isascii() else "utf-8"
        lines.append(_field("Final-Recipient", f"{addr_type};{rcpt}"))
        lines.append(_field("Action", "failed"))
        lines.append(_field("Status", status))
        if remote_mta is not None:
            lines.append(_field("Remote-MTA", "dns; " + remote_mta))
        if diagnostic is not None:
            lines.append(_field("Diagnostic-Code", diagnostic))
        lines.append(_field("Last-Attempt-Date", last_attempt))
    return "".join(lines)


def _status(reply: Reply) -> str:
    """The ``Status`` of a failed recipient (RFC 3463 code) for ``reply``.

    The reply's enhanced status code when it has one for a failure, else
    ``4.0.0`` for a 4xx reply and ``5.0.0`` for anything else.
    """
    esc = reply.enhanced_status_code
    if esc is not None and esc[0] in "45":
        return esc
    code = reply.code
    return "4.0.0" if code is not None and code[0] == "4" else "5.0.0"


def _remote_mta(address: Any) -> str | None:
    """The host of a reply's ``address``: a tuple's first element, or itself."""
    if isinstance(address, tuple | list):
        address = address[0] if address else None
    if address is None:
        return None
    host = _clean(str(address))
    return host or None


def _received_from(client: dict[str, Any]) -> str | None:
    """The ``Received-From-MTA`` value for the original client, if known."""
    name = _clean(_text(client.get("name")))
    ip = _clean(_text(client.get("ip")))
    if name and ip:
        return f"dns; {name} ({ip})"
    if name:
        return "dns; " + name
    if ip:
        return f"dns; [{ip}]"
    return None


def _wants_failure_notice(notify: Sequence[str] | None) -> bool:
    """Whether a recipient's ``NOTIFY`` asks for failure notices (the default)."""
    if notify is None:
        return True
    return any(keyword.upper() == "FAILURE" for keyword in notify)


def _field(name: str, value: str) -> str:
    """A ``Name: value`` line, CRLF-terminated, folded at spaces when long."""
    words = _clean(value).split(" ")
    lines: list[str] = []
    line = f"{name}: {words[0]}"
    for word in words[1:]:
        # Fold only before a word, so a continuation line is never blank.
        if word and len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _clean(value: str) -> str:
    """``value`` without line breaks or control characters, for one field line."""
    return _CONTROLS.sub(" ", value).strip(" ")


def _text(value: Any) -> str:
    """A client fact as text; ``''`` when it is unknown."""
    return "" if value is None else str(value)


def _as_format(template: BytesFormat | str | bytes) -> BytesFormat:
    """A template attribute as a :class:`BytesFormat` (str/bytes converted)."""
    if isinstance(template, BytesFormat):
        return template
    if isinstance(template, str):
        template = template.encode("utf-8")
    return BytesFormat(_LONE_EOL.sub(b"\r\n", template), mode="remove")
