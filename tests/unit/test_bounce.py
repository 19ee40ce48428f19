"""Unit tests for :mod:`slimta.bounce`: the bounce is parsed back with the stdlib."""

from __future__ import annotations

import email
import email.policy
import pickle
import re
import time
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

import slimta.bounce
from slimta.bounce import Bounce
from slimta.envelope import Envelope
from slimta.smtp.reply import Reply
from slimta.util.bytesformat import BytesFormat

ORIGINAL_HEADERS = (
    b"From: Sender <sender@example.com>\r\n"
    b"To: rcpt1@example.net, rcpt2@example.net\r\n"
    b"Subject: Hello\r\n"
    b"Message-Id: <orig@example.com>\r\n"
    b"\r\n"
)
ORIGINAL_BODY = b"Line one.\r\nLine two.\r\n"
ARRIVAL = 1_700_000_000.5

#: ``550 5.1.1 ...`` from a remote server, as the SMTP client records it.
NO_SUCH_USER = Reply("550", "5.1.1 No such user here", address=("198.51.100.7", 25))

#: A DSN date: RFC 5322 date-time with a numeric zone.
DATE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}"
)


def make_envelope(
    sender: str = "sender@example.com",
    recipients: list[str] | None = None,
    data: bytes = ORIGINAL_HEADERS + ORIGINAL_BODY,
    **attrs: Any,
) -> Envelope:
    """A received envelope, as the SMTP edge hands it to the queue."""
    env = Envelope(sender, recipients or ["rcpt1@example.net", "rcpt2@example.net"])
    env.parse(data)
    env.client = {
        "ip": "192.0.2.10",
        "host": "client.example.com",
        "name": "helo.example.com",
        "protocol": "ESMTP",
    }
    env.receiver = "mx.example.org"
    env.timestamp = ARRIVAL
    for name, value in attrs.items():
        setattr(env, name, value)
    return env


def raw(bounce: Envelope) -> bytes:
    return b"".join(bounce.flatten())


def parse(bounce: Envelope) -> EmailMessage:
    msg = email.message_from_bytes(raw(bounce), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(bounce: Envelope) -> list[EmailMessage]:
    return list(parse(bounce).iter_parts())  # type: ignore[arg-type]


def raw_parts(bounce: Envelope) -> list[tuple[bytes, bytes]]:
    """Each body part's ``(header block, content)``, split by its boundary."""
    data = raw(bounce)
    boundary = parse(bounce).get_boundary()
    assert boundary is not None
    delimiter = b"\r\n--" + boundary.encode("ascii")
    chunks = data.split(delimiter)
    assert chunks[-1] == b"--\r\n"
    out = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        out.append((head + b"\r\n", content))
    return out


def text_of(bounce: Envelope) -> str:
    """The content of the text/plain part, with LF line endings."""
    content = parts(bounce)[0].get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def status_blocks(bounce: Envelope) -> list[EmailMessage]:
    """The field blocks of the delivery status part, parsed one by one.

    Read from the raw part so ``message/global-delivery-status`` (which the
    stdlib parses as one message) is read the same way.
    """
    _, content = raw_parts(bounce)[1]
    assert content.endswith(b"\r\n")
    assert b"\r\n\r\n\r\n" not in content
    parser = BytesHeaderParser(policy=email.policy.default)
    blocks = [parser.parsebytes(block + b"\r\n") for block in content[:-2].split(b"\r\n\r\n")]
    for block in blocks:
        assert block.defects == []
    return blocks


def fields(block: Any) -> dict[str, str]:
    items = [(name, str(value)) for name, value in block.items()]
    assert len({name.lower() for name, _ in items}) == len(items)
    return dict(items)


# --- the resulting envelope -------------------------------------------------


def test_public_surface() -> None:
    assert slimta.bounce.__all__ == ["Bounce"]
    assert issubclass(Bounce, Envelope)


def test_class_attributes() -> None:
    assert Bounce.sender == ""
    assert Bounce.client == {"name": "postmaster", "ip": "127.0.0.1", "host": "localhost"}
    assert Bounce.receiver is None
    assert Bounce.recipient_join == "\r\n- "
    assert isinstance(Bounce.header_template, BytesFormat)
    assert isinstance(Bounce.footer_template, BytesFormat)


def test_envelope_of_the_bounce() -> None:
    before = time.time()
    bounce = Bounce(make_envelope(), NO_SUCH_USER)
    after = time.time()
    assert bounce.sender == ""
    assert bounce.recipients == ["sender@example.com"]
    assert before <= (bounce.timestamp or 0) <= after
    assert bounce.client == Bounce.client
    assert bounce.client is not Bounce.client
    assert bounce.receiver == "mx.example.org"
    assert isinstance(bounce.headers, Message)
    assert isinstance(bounce.message, bytes)
    assert Bounce.sender == ""


def test_receiver_class_attribute_wins() -> None:
    class MyBounce(Bounce):
        receiver = "bounces.example.org"

    bounce = MyBounce(make_envelope(), NO_SUCH_USER)
    assert bounce.receiver == "bounces.example.org"
    msg = parse(bounce)
    assert msg["From"] == "MAILER-DAEMON@bounces.example.org"
    assert fields(status_blocks(bounce)[0])["Reporting-MTA"] == "dns; bounces.example.org"


def test_custom_sender_and_client() -> None:
    class MyBounce(Bounce):
        sender = "postmaster@example.org"
        client = {"name": "bouncer", "ip": "::1"}

    bounce = MyBounce(make_envelope(), NO_SUCH_USER)
    assert bounce.sender == "postmaster@example.org"
    assert bounce.client == {"name": "bouncer", "ip": "::1"}


def test_copy_and_pickle() -> None:
    bounce = Bounce(make_envelope(), NO_SUCH_USER)
    assert bounce.copy().flatten() == bounce.flatten()
    loaded = pickle.loads(pickle.dumps(bounce))
    assert isinstance(loaded, Bounce)
    assert loaded.flatten() == bounce.flatten()
    assert loaded.recipients == ["sender@example.com"]


@pytest.mark.parametrize("sender", ["", None])
def test_null_sender_is_never_bounced(sender: str | None) -> None:
    env = make_envelope()
    env.sender = sender
    with pytest.raises(ValueError, match="null sender"):
        Bounce(env, NO_SUCH_USER)


def test_no_recipients_to_report() -> None:
    with pytest.raises(ValueError, match="recipients"):
        Bounce(make_envelope(), NO_SUCH_USER, failed_recipients=[])
    env = make_envelope()
    env.recipients = []
    with pytest.raises(ValueError, match="recipients"):
        Bounce(env, NO_SUCH_USER)


# --- header block -----------------------------------------------------------


def test_headers() -> None:
    bounce = Bounce(make_envelope(), NO_SUCH_USER)
    msg = parse(bounce)
    assert msg["From"] == "MAILER-DAEMON@mx.example.org"
    assert msg["To"] == "sender@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert DATE.fullmatch(str(msg["Date"]))
    assert int(parsedate_to_datetime(str(msg["Date"])).timestamp()) == int(bounce.timestamp or 0)
    assert re.fullmatch(r"<[0-9a-f]{32}@mx\.example\.org>", str(msg["Message-Id"]))
    assert msg.defects == []
    assert all(part.defects == [] for part in msg.walk())


def test_headers_without_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slimta.bounce, "local_fqdn", lambda: "host.example.test")
    bounce = Bounce(make_envelope(receiver=None), NO_SUCH_USER)
    assert bounce.receiver is None
    msg = parse(bounce)
    assert msg["From"] == "MAILER-DAEMON"
    assert str(msg["Message-Id"]).endswith("@host.example.test>")
    assert fields(status_blocks(bounce)[0])["Reporting-MTA"] == "dns; host.example.test"


def test_headers_are_an_email_message() -> None:
    bounce = Bounce(make_envelope(), NO_SUCH_USER)
    headers = bounce.headers
    assert isinstance(headers, Message)
    assert headers["Auto-Submitted"] == "auto-replied"
    assert headers.get_content_type() == "multipart/report"
    assert (bounce.message or b"").startswith(b"This is a MIME-encapsulated")


def test_report_structure() -> None:
    msg = parse(Bounce(make_envelope(), NO_SUCH_USER))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in msg.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]


def test_boundary_is_fresh_each_time() -> None:
    env = make_envelope()
    boundaries = {parse(Bounce(env, NO_SUCH_USER)).get_boundary() for _ in range(5)}
    assert len(boundaries) == 5
    for boundary in boundaries:
        assert boundary is not None
        assert re.fullmatch(r"boundary_=[0-9a-f]{32}", boundary)


def test_message_ids_are_unique() -> None:
    env = make_envelope()
    ids = {parse(Bounce(env, NO_SUCH_USER))["Message-Id"] for _ in range(5)}
    assert len(ids) == 5


def test_crlf_line_endings_only() -> None:
    env = make_envelope(data=b"Subject: lf\nX-A: b\n\nbare\nlines\rhere\n")
    reply = Reply("550", "5.0.0 first line\nsecond line")
    data = raw(Bounce(env, reply))
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None
    assert b"bare\r\nlines\r\nhere\r\n" in data


# --- human-readable part ------------------------------------------------------


def test_text_part_names_recipients_and_reply() -> None:
    bounce = Bounce(make_envelope(), NO_SUCH_USER)
    assert parts(bounce)[0].get_content_charset() == "utf-8"
    content = text_of(bounce)
    assert "mx.example.org" in content
    assert "- rcpt1@example.net\n- rcpt2@example.net\n" in content
    assert "550 5.1.1 No such user here" in content


def test_text_part_multiline_reply() -> None:
    reply = Reply("550", "5.7.1 Rejected\r\nsee https://example.net/why")
    content = text_of(Bounce(make_envelope(), reply))
    assert "550 5.7.1 Rejected\nsee https://example.net/why\n" in content


# --- message/delivery-status: per-message fields --------------------------------


def test_stdlib_reads_the_status_blocks() -> None:
    bounce = Bounce(make_envelope(), NO_SUCH_USER)
    blocks = parts(bounce)[1].get_payload()
    assert isinstance(blocks, list)
    assert [fields(block) for block in blocks] == [fields(b) for b in status_blocks(bounce)]
    assert len(blocks) == 3


def test_per_message_fields() -> None:
    bounce = Bounce(make_envelope(dsn_envid="QQ314159"), NO_SUCH_USER)
    per_message = status_blocks(bounce)[0]
    assert list(per_message.keys()) == [
        "Original-Envelope-Id",
        "Reporting-MTA",
        "Received-From-MTA",
        "Arrival-Date",
    ]
    got = fields(per_message)
    assert got["Original-Envelope-Id"] == "QQ314159"
    assert got["Reporting-MTA"] == "dns; mx.example.org"
    assert got["Received-From-MTA"] == "dns; helo.example.com (192.0.2.10)"
    assert DATE.fullmatch(got["Arrival-Date"])
    assert parsedate_to_datetime(got["Arrival-Date"]).timestamp() == int(ARRIVAL)


def test_optional_per_message_fields_absent() -> None:
    env = make_envelope(timestamp=None)
    env.client = {}
    assert list(status_blocks(Bounce(env, NO_SUCH_USER))[0].keys()) == ["Reporting-MTA"]


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ({"name": "helo.example.com", "ip": "192.0.2.10"}, "dns; helo.example.com (192.0.2.10)"),
        ({"name": "helo.example.com"}, "dns; helo.example.com"),
        ({"ip": "192.0.2.10", "name": None}, "dns; [192.0.2.10]"),
        ({"host": "ptr.example.com", "protocol": "SMTP"}, None),
    ],
)
def test_received_from_mta(client: dict[str, Any], expected: str | None) -> None:
    env = make_envelope()
    env.client = client
    assert fields(status_blocks(Bounce(env, NO_SUCH_USER))[0]).get("Received-From-MTA") == expected


def test_field_values_cannot_inject_lines() -> None:
    env = make_envelope(dsn_envid="id\r\nAction: delivered")
    env.client = {"name": "evil\r\n\r\nFinal-Recipient: rfc822;x@y", "ip": "192.0.2.1"}
    env.dsn_orcpt = {"rcpt1@example.net": "rfc822;a@b\nStatus: 2.0.0"}
    bounce = Bounce(env, NO_SUCH_USER)
    blocks = status_blocks(bounce)
    assert len(blocks) == 3
    assert fields(blocks[0])["Original-Envelope-Id"] == "id Action: delivered"
    assert "Action" not in blocks[0]
    assert fields(blocks[1])["Status"] == "5.1.1"
    assert fields(blocks[1])["Original-Recipient"] == "rfc822;a@b Status: 2.0.0"


# --- message/delivery-status: per-recipient fields ------------------------------


def test_per_recipient_fields() -> None:
    bounce = Bounce(make_envelope(), NO_SUCH_USER)
    blocks = status_blocks(bounce)
    assert len(blocks) == 3
    for block, rcpt in zip(blocks[1:], ["rcpt1@example.net", "rcpt2@example.net"], strict=True):
        assert list(block.keys()) == [
            "Final-Recipient",
            "Action",
            "Status",
            "Remote-MTA",
            "Diagnostic-Code",
            "Last-Attempt-Date",
        ]
        got = fields(block)
        assert got["Final-Recipient"] == f"rfc822;{rcpt}"
        assert got["Action"] == "failed"
        assert got["Status"] == "5.1.1"
        assert got["Remote-MTA"] == "dns; 198.51.100.7"
        assert got["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user here"
        assert DATE.fullmatch(got["Last-Attempt-Date"])
        last = parsedate_to_datetime(got["Last-Attempt-Date"]).timestamp()
        assert last == int(bounce.timestamp or 0)


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (Reply("550", "5.1.1 No such user"), "5.1.1"),
        (Reply("552", "5.2.2 Mailbox full"), "5.2.2"),
        (Reply("554", "5.7.1 Relay denied"), "5.7.1"),
        (Reply("450", "4.2.1 Try later"), "4.2.1"),
        (Reply("550", "No enhanced code"), "5.0.0"),
        (Reply("554"), "5.0.0"),
        (Reply("451", "Local problem"), "4.0.0"),
        (Reply("421"), "4.0.0"),
        (Reply("250", "2.0.0 Ok"), "5.0.0"),
        (Reply(), "5.0.0"),
    ],
)
def test_status_from_reply(reply: Reply, status: str) -> None:
    got = fields(status_blocks(Bounce(make_envelope(), reply))[1])
    assert got["Status"] == status


def test_status_when_enhanced_code_is_disabled() -> None:
    reply = Reply("550", "5.1.1 No such user")
    reply.enhanced_status_code = False
    got = fields(status_blocks(Bounce(make_envelope(), reply))[1])
    assert got["Status"] == "5.0.0"
    assert got["Diagnostic-Code"] == "smtp; 550 No such user"


@pytest.mark.parametrize(
    ("reply", "diagnostic"),
    [
        (Reply("550", "5.1.1 No such user"), "smtp; 550 5.1.1 No such user"),
        (Reply("550", "No such user"), "smtp; 550 5.0.0 No such user"),
        (Reply("451", "4.3.0 line one\r\nline two"), "smtp; 451 4.3.0 line one line two"),
        (Reply("554"), "smtp; 554 5.0.0"),
        (Reply(), None),
    ],
)
def test_diagnostic_code(reply: Reply, diagnostic: str | None) -> None:
    got = fields(status_blocks(Bounce(make_envelope(), reply))[1])
    assert got.get("Diagnostic-Code") == diagnostic


def test_long_diagnostic_code_is_folded() -> None:
    text = "5.7.1 " + " ".join(f"word{n}" for n in range(60))
    bounce = Bounce(make_envelope(), Reply("554", text))
    _, content = raw_parts(bounce)[1]
    assert all(len(line) <= 78 for line in content.split(b"\r\n"))
    assert fields(status_blocks(bounce)[1])["Diagnostic-Code"] == f"smtp; 554 {text}"


@pytest.mark.parametrize(
    ("address", "remote_mta"),
    [
        (("198.51.100.7", 25), "dns; 198.51.100.7"),
        (("mx1.example.net", 25), "dns; mx1.example.net"),
        ("mx2.example.net", "dns; mx2.example.net"),
        (None, None),
        ((), None),
    ],
)
def test_remote_mta(address: Any, remote_mta: str | None) -> None:
    reply = Reply("550", "5.1.1 No such user", address=address)
    assert fields(status_blocks(Bounce(make_envelope(), reply))[1]).get("Remote-MTA") == remote_mta


def test_original_recipient_from_orcpt() -> None:
    env = make_envelope(
        dsn_orcpt={"rcpt1@example.net": "rfc822;Alias@example.com", "rcpt2@example.net": "a@b.c"}
    )
    blocks = status_blocks(Bounce(env, NO_SUCH_USER))
    assert list(blocks[1].keys())[:2] == ["Original-Recipient", "Final-Recipient"]
    assert fields(blocks[1])["Original-Recipient"] == "rfc822;Alias@example.com"
    assert fields(blocks[2])["Original-Recipient"] == "rfc822;a@b.c"


def test_original_recipient_only_where_given() -> None:
    env = make_envelope(dsn_orcpt={"rcpt2@example.net": "rfc822;rcpt2@example.net"})
    blocks = status_blocks(Bounce(env, NO_SUCH_USER))
    assert "Original-Recipient" not in blocks[1]
    assert fields(blocks[2])["Original-Recipient"] == "rfc822;rcpt2@example.net"


def test_several_failed_recipients_in_one_report() -> None:
    rcpts = [f"user{n}@example.net" for n in range(5)]
    bounce = Bounce(make_envelope(recipients=rcpts), NO_SUCH_USER)
    blocks = status_blocks(bounce)
    assert [fields(block)["Final-Recipient"] for block in blocks[1:]] == [
        f"rfc822;{rcpt}" for rcpt in rcpts
    ]
    assert bounce.recipients == ["sender@example.com"]
    text = text_of(bounce)
    assert all(f"- {rcpt}\n" in text for rcpt in rcpts)


def test_failed_recipients_subset() -> None:
    env = make_envelope(recipients=["a@example.net", "b@example.net", "c@example.net"])
    bounce = Bounce(env, NO_SUCH_USER, failed_recipients=["b@example.net"])
    blocks = status_blocks(bounce)
    assert [fields(block)["Final-Recipient"] for block in blocks[1:]] == ["rfc822;b@example.net"]
    text = text_of(bounce)
    assert "a@example.net" not in text
    assert "- b@example.net\n" in text


# --- the original message ------------------------------------------------------


def test_full_original_message() -> None:
    bounce = Bounce(make_envelope(), NO_SUCH_USER)
    head, content = raw_parts(bounce)[2]
    assert head == b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n"
    assert content == ORIGINAL_HEADERS + ORIGINAL_BODY
    inner = parts(bounce)[2].get_payload(0)
    assert isinstance(inner, Message)
    assert inner["Subject"] == "Hello"
    assert inner["Message-Id"] == "<orig@example.com>"


@pytest.mark.parametrize(
    ("headers_only", "ret"),
    [(True, None), (False, "HDRS"), (False, "hdrs"), (True, "FULL")],
)
def test_headers_only(headers_only: bool, ret: str | None) -> None:
    bounce = Bounce(make_envelope(dsn_ret=ret), NO_SUCH_USER, headers_only)
    assert parts(bounce)[2].get_content_type() == "text/rfc822-headers"
    head, content = raw_parts(bounce)[2]
    assert head == b"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 7bit\r\n"
    assert content == ORIGINAL_HEADERS
    assert b"Line one." not in raw(bounce)


def test_ret_full_attaches_everything() -> None:
    bounce = Bounce(make_envelope(dsn_ret="FULL"), NO_SUCH_USER)
    assert parts(bounce)[2].get_content_type() == "message/rfc822"
    assert raw_parts(bounce)[2][1] == ORIGINAL_HEADERS + ORIGINAL_BODY


def test_original_body_without_final_line_break() -> None:
    bounce = Bounce(make_envelope(data=b"Subject: x\r\n\r\nno newline"), NO_SUCH_USER)
    assert raw_parts(bounce)[2][1] == b"Subject: x\r\n\r\nno newline"


def test_eight_bit_original_is_kept() -> None:
    body = "Grüße aus Köln\r\n".encode()
    bounce = Bounce(make_envelope(data=ORIGINAL_HEADERS + body), NO_SUCH_USER)
    msg = parse(bounce)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert msg.get_param("report-type") == "delivery-status"
    head, content = raw_parts(bounce)[2]
    assert head == b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n"
    assert content == ORIGINAL_HEADERS + body


def test_eight_bit_body_not_attached_stays_seven_bit() -> None:
    body = "Grüße\r\n".encode()
    bounce = Bounce(make_envelope(data=ORIGINAL_HEADERS + body), NO_SUCH_USER, True)
    assert raw(bounce).isascii()
    assert parse(bounce)["Content-Transfer-Encoding"] == "7bit"


def test_seven_bit_bounce_is_ascii() -> None:
    assert raw(Bounce(make_envelope(), NO_SUCH_USER)).isascii()


# --- SMTPUTF8 (RFC 6533) ---------------------------------------------------------


def test_utf8_recipient_uses_global_types() -> None:
    env = make_envelope(recipients=["rcpt1@example.net", "用户@例え.jp"])
    bounce = Bounce(env, NO_SUCH_USER)
    msg = parse(bounce)
    assert msg.get_param("report-type") == "global-delivery-status"
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert [part.get_content_type() for part in msg.iter_parts()] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global",
    ]
    blocks = status_blocks(bounce)
    assert fields(blocks[1])["Final-Recipient"] == "rfc822;rcpt1@example.net"
    assert fields(blocks[2])["Final-Recipient"] == "utf-8;用户@例え.jp"
    assert "- 用户@例え.jp\n" in text_of(bounce)


def test_utf8_headers_only_uses_global_headers() -> None:
    env = make_envelope(recipients=["josé@example.net"], dsn_ret="HDRS")
    bounce = Bounce(env, NO_SUCH_USER)
    assert [part.get_content_type() for part in parse(bounce).iter_parts()][1:] == [
        "message/global-delivery-status",
        "message/global-headers",
    ]
    assert raw_parts(bounce)[2][1] == ORIGINAL_HEADERS


def test_utf8_sender() -> None:
    bounce = Bounce(make_envelope(sender="jürgen@example.org"), NO_SUCH_USER)
    assert bounce.recipients == ["jürgen@example.org"]
    msg = parse(bounce)
    assert msg["To"] == "jürgen@example.org"
    assert msg.get_param("report-type") == "global-delivery-status"


def test_utf8_original_headers() -> None:
    data = "Subject: Grüße\r\n\r\nbody\r\n".encode()
    bounce = Bounce(make_envelope(data=data), NO_SUCH_USER)
    assert parts(bounce)[2].get_content_type() == "message/global"
    assert raw_parts(bounce)[2][1] == data


def test_utf8_orcpt() -> None:
    env = make_envelope(dsn_orcpt={"rcpt1@example.net": "utf-8;josé@example.net"})
    bounce = Bounce(env, NO_SUCH_USER)
    assert parts(bounce)[1].get_content_type() == "message/global-delivery-status"
    assert fields(status_blocks(bounce)[1])["Original-Recipient"] == "utf-8;josé@example.net"


# --- customisation ------------------------------------------------------------


def test_subclass_header_template_str() -> None:
    class MyBounce(Bounce):
        header_template = (
            "From: postmaster@example.org\n"
            "To: {sender}\n"
            "Subject: Failed: {recipients}\n"
            "X-Code: {code}\n"
            "X-Client: {client_name} {client_ip} {protocol}\n"
            "X-Unknown: [{no_such_key}]\n"
            "MIME-Version: 1.0\n"
            'Content-Type: multipart/report; report-type={report_type}; boundary="{boundary}"\n'
            "\n"
            "--{boundary}\n"
            "Content-Type: text/plain\n"
            "\n"
            "{message}\n"
            "--{boundary}\n"
            "Content-Type: {delivery_status_type}\n"
            "\n"
            "{delivery_info}\n"
            "--{boundary}\n"
            "Content-Type: {content_type}\n"
            "\n"
        )
        recipient_join = ", "

    bounce = MyBounce(make_envelope(), NO_SUCH_USER)
    data = raw(bounce)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None
    msg = parse(bounce)
    assert msg["From"] == "postmaster@example.org"
    assert msg["Subject"] == "Failed: rcpt1@example.net, rcpt2@example.net"
    assert msg["X-Code"] == "550"
    assert msg["X-Client"] == "helo.example.com 192.0.2.10 ESMTP"
    assert msg["X-Unknown"] == "[]"
    assert [part.get_content_type() for part in msg.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    assert text_of(bounce) == "5.1.1 No such user here"
    assert fields(status_blocks(bounce)[2])["Final-Recipient"] == "rfc822;rcpt2@example.net"


def test_subclass_templates_bytes_and_bytesformat() -> None:
    class MyBounce(Bounce):
        header_template = BytesFormat(
            b"Subject: bounce\r\n"
            b'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
            b"\r\n"
            b"--{boundary}\r\n"
            b"Content-Type: {content_type}\r\n"
            b"\r\n"
        )
        footer_template = b"\n--{boundary}--\nThe end {nothing}.\n"

    bounce = MyBounce(make_envelope(), NO_SUCH_USER)
    data = raw(bounce)
    assert data.endswith(b"--\r\nThe end .\r\n")
    msg = parse(bounce)
    assert msg["Subject"] == "bounce"
    assert [part.get_content_type() for part in msg.iter_parts()] == ["message/rfc822"]


def test_assigned_template_on_subclass_does_not_touch_bounce() -> None:
    class MyBounce(Bounce):
        pass

    MyBounce.footer_template = "\r\n--{boundary}--\r\nsigned\r\n"
    assert raw(MyBounce(make_envelope(), NO_SUCH_USER)).endswith(b"--\r\nsigned\r\n")
    assert raw(Bounce(make_envelope(), NO_SUCH_USER)).endswith(b"--\r\n")


def test_non_ascii_template_text_is_eight_bit() -> None:
    class MyBounce(Bounce):
        header_template = (
            "Subject: Unzustellbar\n"
            "MIME-Version: 1.0\n"
            'Content-Type: multipart/report; report-type={report_type}; boundary="{boundary}"\n'
            "Content-Transfer-Encoding: {transfer_encoding}\n"
            "\n"
            "--{boundary}\n"
            "Content-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: {transfer_encoding}\n"
            "\n"
            "Zustellung fehlgeschlagen für {recipients}.\n"
            "--{boundary}\n"
            "Content-Type: {delivery_status_type}\n"
            "\n"
            "{delivery_info}\n"
            "--{boundary}\n"
            "Content-Type: {content_type}\n"
            "\n"
        )

    bounce = MyBounce(make_envelope(), NO_SUCH_USER)
    msg = parse(bounce)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert text_of(bounce) == (
        "Zustellung fehlgeschlagen für rcpt1@example.net\n- rcpt2@example.net."
    )


# --- factory -------------------------------------------------------------------


def test_class_is_a_four_oh_factory() -> None:
    def queue_bounces(factory: Any, env: Envelope, reply: Reply) -> Envelope | None:
        result: Envelope | None = factory(env, reply)
        return result

    bounce = queue_bounces(Bounce, make_envelope(), NO_SUCH_USER)
    assert isinstance(bounce, Bounce)


def test_factory_builds_bounce() -> None:
    bounce = Bounce.factory(make_envelope(), NO_SUCH_USER)
    assert isinstance(bounce, Bounce)
    assert len(status_blocks(bounce)) == 3


@pytest.mark.parametrize("sender", ["", None])
def test_factory_null_sender(sender: str | None) -> None:
    env = make_envelope()
    env.sender = sender
    assert Bounce.factory(env, NO_SUCH_USER) is None


def test_factory_honours_notify() -> None:
    env = make_envelope(
        recipients=["a@example.net", "b@example.net", "c@example.net", "d@example.net"],
        dsn_notify={
            "a@example.net": ("NEVER",),
            "b@example.net": ("SUCCESS", "DELAY"),
            "c@example.net": ("failure",),
        },
    )
    bounce = Bounce.factory(env, NO_SUCH_USER)
    assert bounce is not None
    assert [fields(block)["Final-Recipient"] for block in status_blocks(bounce)[1:]] == [
        "rfc822;c@example.net",
        "rfc822;d@example.net",
    ]


def test_factory_nothing_to_report() -> None:
    env = make_envelope(recipients=["a@example.net"], dsn_notify={"a@example.net": ("NEVER",)})
    assert Bounce.factory(env, NO_SUCH_USER) is None
    assert Bounce.factory(make_envelope(), NO_SUCH_USER, failed_recipients=[]) is None


def test_factory_options_and_subclass() -> None:
    class MyBounce(Bounce):
        pass

    env = make_envelope()
    bounce = MyBounce.factory(
        env, NO_SUCH_USER, failed_recipients=["rcpt2@example.net"], headers_only=True
    )
    assert type(bounce) is MyBounce
    assert parts(bounce)[2].get_content_type() == "text/rfc822-headers"
    assert len(status_blocks(bounce)) == 2


def test_original_envelope_is_unchanged() -> None:
    env = make_envelope(dsn_ret="HDRS")
    before = (env.sender, list(env.recipients), env.flatten(), dict(env.client), env.receiver)
    Bounce(env, NO_SUCH_USER)
    assert (env.sender, env.recipients, env.flatten(), env.client, env.receiver) == before
