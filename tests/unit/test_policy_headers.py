"""slimta.policy.headers: Date, Message-Id and Received (RFC 5321 4.4).

Every produced header block is read back with the stdlib parser and must
have no defects; client values that try to add a header or break the
``Received:`` structure must not get through.
"""

from __future__ import annotations

import email.policy
import email.utils
import os
import re
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import slimta.policy.headers as headers_module
from slimta.core import __version__
from slimta.envelope import Envelope
from slimta.policy.headers import AddDateHeader, AddMessageIdHeader, AddReceivedHeader
from slimta.policy.split import RecipientSplit
from slimta.queue import Queue
from slimta.queue.dict import DictStorage

#: 2001-09-09 01:46:40 UTC.
T = 1_000_000_000.0
T_DATE = "Sun, 09 Sep 2001 01:46:40 +0000"
QUEUE_ID = "0123456789ab4def8123456789abcdef"
BODY = b"Subject: hi\r\nFrom: <s@example.com>\r\n\r\nbody\r\n"
CLIENT = {
    "ip": "192.0.2.1",
    "host": "mail.example.com",
    "name": "client.example.com",
    "protocol": "ESMTPS",
}
#: A date-time as RFC 5322 3.3 writes it, with a numeric zone.
RFC5322_DATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d [+-]\d{4}"
)


def make(
    client: dict[str, Any] | None = None,
    recipients: list[str] | None = None,
    data: bytes = BODY,
    receiver: str | None = "mx.example.org",
    timestamp: float | None = T,
) -> Envelope:
    envelope = Envelope("s@example.com", ["r@example.org"] if recipients is None else recipients)
    envelope.parse(data)
    envelope.client = dict(CLIENT if client is None else client)
    envelope.receiver = receiver
    envelope.timestamp = timestamp
    return envelope


def parse(envelope: Envelope, utf8: bool = False) -> EmailMessage:
    """Read the header block back; it must be well formed and without defects."""
    header_bytes, body = envelope.flatten()
    assert header_bytes.endswith(b"\r\n\r\n")
    for line in header_bytes[:-4].split(b"\r\n"):
        # RFC 5322 2.1.1: 998 octets at most; no bare CR, LF or NUL anywhere.
        assert len(line) <= 998
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line
    policy = email.policy.SMTPUTF8 if utf8 else email.policy.SMTP
    msg = BytesParser(policy=policy).parsebytes(header_bytes + body)
    assert isinstance(msg, EmailMessage)
    assert msg.defects == []
    for name in set(msg):
        for value in msg.get_all(name, []):
            assert value.defects == (), (name, value, value.defects)
    return msg


def received(
    envelope: Envelope, policy: AddReceivedHeader | None = None, utf8: bool = False
) -> str:
    """Apply *policy* and return the new Received field, unfolded."""
    (policy or AddReceivedHeader()).apply(envelope)
    msg = parse(envelope, utf8)
    first_name, first_value = next(iter(msg.raw_items()))
    assert first_name == "Received"
    assert len(msg.get_all("Received", [])) == 1 + BODY.count(b"Received:")
    # The parser keeps 8-bit octets as surrogates; the field is UTF-8.
    text = first_value.encode("ascii", "surrogateescape").decode("utf-8")
    return re.sub(r"\r\n[ \t]", " ", text)


def header_lines(envelope: Envelope) -> list[bytes]:
    return envelope.flatten()[0].split(b"\r\n")


def still_raw(envelope: Envelope) -> bool:
    # White box: the header block was not parsed (see slimta.envelope).
    return envelope._raw_headers is not None


@pytest.fixture
def local_timezone() -> Iterator[None]:
    """Local time is one hour ahead of UTC, in a zone named XYZ."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "XYZ-01"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_public_names() -> None:
    assert headers_module.__all__ == ["AddDateHeader", "AddMessageIdHeader", "AddReceivedHeader"]


# --- Date ---------------------------------------------------------------------


def test_date_added_from_the_timestamp() -> None:
    envelope = make()
    AddDateHeader().apply(envelope)
    msg = parse(envelope)
    date = msg["Date"]
    assert RFC5322_DATE.fullmatch(str(date))
    assert email.utils.parsedate_to_datetime(str(date)).timestamp() == T
    # Appended: the header block keeps its order.
    assert [name for name, _ in msg.raw_items()] == ["Subject", "From", "Date"]


@pytest.mark.usefixtures("local_timezone")
def test_date_has_a_numeric_zone_not_a_name() -> None:
    envelope = make()
    AddDateHeader().apply(envelope)
    date = str(parse(envelope)["Date"])
    # Spec 16: 4.0 wrote the zone name (%Z).
    assert date == "Sun, 09 Sep 2001 02:46:40 +0100"
    assert "XYZ" not in date


def test_date_defaults_to_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: T + 60)
    envelope = make(timestamp=None)
    AddDateHeader().apply(envelope)
    date = str(parse(envelope)["Date"])
    assert email.utils.parsedate_to_datetime(date).timestamp() == T + 60


@pytest.mark.parametrize("name", ["Date", "DATE", "date", "dAtE"])
def test_date_kept_in_any_letter_case(name: str) -> None:
    data = f"Subject: hi\r\n{name}: Mon, 01 Jan 2001 00:00:00 +0000\r\n\r\nbody\r\n".encode()
    envelope = make(data=data)
    AddDateHeader().apply(envelope)
    assert envelope.flatten() == (data[: data.index(b"body")], b"body\r\n")
    # Nothing was added, so the headers were never parsed.
    assert still_raw(envelope)


@pytest.mark.parametrize("name", ["Resent-Date", "X-Date", "Dates"])
def test_date_other_fields_do_not_count(name: str) -> None:
    envelope = make(data=f"{name}: {T_DATE}\r\n\r\nbody\r\n".encode())
    AddDateHeader().apply(envelope)
    assert parse(envelope).get_all("Date") is not None


def test_date_in_a_continuation_line_does_not_count() -> None:
    envelope = make(data=b"Subject: a\r\n date: b\r\n\r\nbody\r\n")
    AddDateHeader().apply(envelope)
    assert len(parse(envelope).get_all("Date", [])) == 1


def test_date_build_date_can_be_overridden() -> None:
    class MyDate(AddDateHeader):
        def build_date(self, timestamp: float) -> str:
            return email.utils.formatdate(timestamp + 3600)

    envelope = make()
    MyDate().apply(envelope)
    assert email.utils.parsedate_to_datetime(str(parse(envelope)["Date"])).timestamp() == T + 3600


def test_date_on_an_envelope_without_headers() -> None:
    envelope = Envelope("s@example.com", ["r@example.org"])
    envelope.timestamp = T
    AddDateHeader().apply(envelope)
    assert envelope.flatten()[0] == f"Date: {T_DATE}\r\n\r\n".encode()


def test_date_on_parsed_headers_is_appended() -> None:
    envelope = make()
    assert envelope.headers is not None
    AddDateHeader().apply(envelope)
    assert header_lines(envelope)[-3].startswith(b"Date: ")


def test_date_is_not_put_above_trace_fields() -> None:
    data = b"Received: from a by b; " + T_DATE.encode() + b"\r\nSubject: x\r\n\r\n"
    envelope = make(data=data)
    AddDateHeader().apply(envelope)
    AddReceivedHeader().apply(envelope)
    names = [name for name, _ in parse(envelope).raw_items()]
    assert names == ["Received", "Received", "Subject", "Date"]


# --- Message-Id ---------------------------------------------------------------


def test_message_id_added() -> None:
    envelope = make()
    AddMessageIdHeader("host.example.org").apply(envelope)
    msg = parse(envelope)
    assert re.fullmatch(r"<[0-9a-f]{32}\.1000000000@host\.example\.org>", str(msg["Message-Id"]))
    assert [name for name, _ in msg.raw_items()] == ["Subject", "From", "Message-Id"]


def test_message_id_is_unique() -> None:
    policy = AddMessageIdHeader("host.example.org")
    ids = set()
    for _ in range(50):
        envelope = make()
        policy.apply(envelope)
        ids.add(str(parse(envelope)["Message-Id"]))
    assert len(ids) == 50


def test_message_id_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headers_module, "local_fqdn", lambda: "fqdn.example.net")
    monkeypatch.setattr(time, "time", lambda: 1234.9)
    policy = AddMessageIdHeader()
    assert policy.hostname == "fqdn.example.net"
    envelope = make(timestamp=None)
    policy.apply(envelope)
    assert str(parse(envelope)["Message-Id"]).endswith(".1234@fqdn.example.net>")


@pytest.mark.parametrize("name", ["Message-Id", "MESSAGE-ID", "message-id", "Message-ID"])
def test_message_id_kept_in_any_letter_case(name: str) -> None:
    data = f"Subject: hi\r\n{name}: <a@b.example>\r\n\r\nbody\r\n".encode()
    envelope = make(data=data)
    AddMessageIdHeader("host.example.org").apply(envelope)
    assert envelope.flatten()[0] == data[: data.index(b"body")]
    assert still_raw(envelope)


def test_message_id_non_ascii_hostname_as_a_labels() -> None:
    assert AddMessageIdHeader("bücher.example").hostname == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    "hostname", ["two words", "a@b", "x\r\nX-Injected: 1", "a>b", "[192.0.2.1]", "a..b", "é é"]
)
def test_message_id_bad_hostname_refused(hostname: str) -> None:
    with pytest.raises(ValueError):
        AddMessageIdHeader(hostname)


# --- Received -------------------------------------------------------------------


def test_received_full() -> None:
    envelope = make()
    assert received(envelope) == (
        "from client.example.com (mail.example.com [192.0.2.1])"
        f" by mx.example.org (slimta {__version__}) with ESMTPS for <r@example.org>; {T_DATE}"
    )
    # Prepending does not parse the rest of the block.
    envelope = make()
    AddReceivedHeader().apply(envelope)
    assert still_raw(envelope)


def test_received_id_is_the_queue_id() -> None:
    envelope = make()
    envelope.queue_id = QUEUE_ID
    assert received(envelope) == (
        "from client.example.com (mail.example.com [192.0.2.1])"
        f" by mx.example.org (slimta {__version__}) with ESMTPS id {QUEUE_ID}"
        f" for <r@example.org>; {T_DATE}"
    )


@pytest.mark.parametrize("queue_id", [None, "", "abc", QUEUE_ID.upper(), "x\r\nBcc: <e@x>", "a b"])
def test_received_id_left_out_unless_a_queue_id(queue_id: str | None) -> None:
    envelope = make()
    envelope.queue_id = queue_id
    value = received(envelope)
    assert " id " not in value
    assert value.startswith("from client.example.com")


def test_received_is_always_prepended() -> None:
    data = b"Received: from a by b; " + T_DATE.encode() + b"\r\nSubject: x\r\n\r\n"
    envelope = make(data=data)
    AddReceivedHeader().apply(envelope)
    AddReceivedHeader().apply(envelope)
    lines = header_lines(envelope)
    assert lines[0].startswith(b"Received: from client.example.com")
    assert b"Received: from a by b; " + T_DATE.encode() in lines
    assert len(parse(envelope).get_all("Received", [])) == 3


def test_received_folded_at_78() -> None:
    envelope = make()
    AddReceivedHeader().apply(envelope)
    lines = header_lines(envelope)
    assert lines[:3] == [
        b"Received: from client.example.com (mail.example.com [192.0.2.1])",
        f" by mx.example.org (slimta {__version__}) with ESMTPS for <r@example.org>;".encode(),
        b" " + T_DATE.encode(),
    ]


@pytest.mark.parametrize(
    ("ip", "literal"),
    [
        ("192.0.2.1", "[192.0.2.1]"),
        ("2001:db8::1", "[IPv6:2001:db8::1]"),
        ("2001:0db8:0000::0001", "[IPv6:2001:db8::1]"),
        ("::ffff:192.0.2.7", "[192.0.2.7]"),
        ("fe80::1%eth0", "[IPv6:fe80::1]"),
    ],
)
def test_received_address_literal(ip: str, literal: str) -> None:
    envelope = make(client={**CLIENT, "ip": ip})
    assert received(envelope).startswith(f"from client.example.com (mail.example.com {literal}) by")


@pytest.mark.parametrize("ip", [None, "", "not an ip", "192.0.2.1]\r\nX-Injected: 1", 7])
def test_received_unknown_address_drops_tcp_info(ip: object) -> None:
    envelope = make(client={**CLIENT, "ip": ip})
    assert received(envelope).startswith("from client.example.com by mx.example.org ")


@pytest.mark.parametrize("host", [None, "", "bad host", "a(b)", "x;y", "h\r\nX-Injected: 1"])
def test_received_unknown_or_bad_reverse_name_left_out(host: str | None) -> None:
    # RFC 5321 4.4 TCP-info is an address literal alone when there is no name;
    # 4.0 wrote "unknown".
    envelope = make(client={**CLIENT, "host": host})
    value = received(envelope)
    assert value.startswith("from client.example.com ([192.0.2.1]) by ")
    assert "unknown" not in value


def test_received_without_ehlo_name_uses_the_literal() -> None:
    envelope = make(client={**CLIENT, "name": None})
    assert received(envelope).startswith("from [192.0.2.1] (mail.example.com [192.0.2.1]) by ")


def test_received_without_name_or_address_has_no_from() -> None:
    envelope = make(client={"protocol": "HTTP"})
    assert received(envelope) == (
        f"by mx.example.org (slimta {__version__}) with HTTP for <r@example.org>; {T_DATE}"
    )


def test_received_without_any_client_data() -> None:
    envelope = make(client={})
    assert received(envelope) == (
        f"by mx.example.org (slimta {__version__}) for <r@example.org>; {T_DATE}"
    )


def test_received_ehlo_address_literal() -> None:
    for name in ["[192.0.2.9]", "[IPv6:2001:db8::9]", "[x-tag:abc]"]:
        envelope = make(client={**CLIENT, "name": name})
        assert received(envelope).startswith(f"from {name} (mail.example.com [192.0.2.1]) by ")


@pytest.mark.parametrize(
    "name",
    [
        "evil\r\nX-Injected: 1",
        "evil\nX-Injected: 1",
        "evil\rX-Injected: 1",
        "evil\r\n X-Injected: 1",
        "evil\x00",
        "evil\x0bX-Injected: 1",
        "evil\x0cX-Injected: 1",
        "evil\x1cX-Injected: 1",
        "evil\x85X-Injected: 1",
        "evil\u2028X-Injected: 1",
        "two words",
        "paren(",
        "paren)",
        "semi;colon",
        "[192.0.2.1",
        "[IPv6:nonsense]",
        "[IPv6:fe80::1%eth0]",
        "a..b",
        "-leading.example",
        "a" * 64 + ".example",
        ("a" * 63 + ".") * 4 + "com",
        "bü cher.example",
        "",
    ],
)
def test_received_bad_ehlo_name_replaced_by_the_literal(name: str) -> None:
    envelope = make(client={**CLIENT, "name": name})
    value = received(envelope)
    assert value.startswith("from [192.0.2.1] (mail.example.com [192.0.2.1]) by ")
    msg = parse(envelope)
    assert msg["X-Injected"] is None
    assert "evil" not in value


def test_received_long_valid_ehlo_name_is_kept_on_its_own_line() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 octets
    envelope = make(client={**CLIENT, "name": name})
    assert received(envelope).startswith(f"from {name} (mail.example.com [192.0.2.1])")
    lines = header_lines(envelope)
    assert lines[0] == b"Received: from " + name.encode()
    assert all(len(line) <= 78 for line in lines[1:4])


def test_received_eight_bit_ehlo_name_as_a_labels_outside_smtputf8() -> None:
    envelope = make(client={**CLIENT, "name": "bücher.example"})
    value = received(envelope)
    assert value.startswith("from xn--bcher-kva.example (mail.example.com [192.0.2.1]) by ")
    assert envelope.flatten()[0].isascii()


def test_received_eight_bit_ehlo_name_as_u_labels_in_smtputf8() -> None:
    envelope = make(client={**CLIENT, "name": "Bücher.example", "protocol": "UTF8SMTPS"})
    value = received(envelope, utf8=True)
    assert value.startswith("from bücher.example (mail.example.com [192.0.2.1]) by ")
    assert "with UTF8SMTPS" in value


def test_received_a_label_name_is_written_as_given() -> None:
    envelope = make(client={**CLIENT, "name": "xn--bcher-kva.example", "protocol": "UTF8SMTP"})
    assert received(envelope, utf8=True).startswith("from xn--bcher-kva.example (")


@pytest.mark.parametrize(
    "protocol",
    [
        "SMTP",
        "ESMTP",
        "ESMTPA",
        "ESMTPS",
        "ESMTPSA",
        "LMTP",
        "LMTPA",
        "LMTPS",
        "LMTPSA",
        "UTF8SMTP",
        "UTF8SMTPA",
        "UTF8SMTPS",
        "UTF8SMTPSA",
        "UTF8LMTP",
        "UTF8LMTPSA",
        "HTTP",
    ],
)
def test_received_with_protocol(protocol: str) -> None:
    envelope = make(client={**CLIENT, "protocol": protocol})
    value = received(envelope, utf8=protocol.startswith("UTF8"))
    assert f") with {protocol} for <r@example.org>;" in value


@pytest.mark.parametrize("protocol", [None, "", "E SMTP", "ESMTP\r\nX-Injected: 1", "(x)", 3])
def test_received_unknown_protocol_has_no_with(protocol: object) -> None:
    envelope = make(client={**CLIENT, "protocol": protocol})
    value = received(envelope)
    assert " with " not in value
    assert f"(slimta {__version__}) for <r@example.org>;" in value


def test_received_for_only_with_exactly_one_recipient() -> None:
    assert " for <only@example.org>;" in received(make(recipients=["only@example.org"]))
    # RFC 5321 4.4: one path at most; 4.0 listed every recipient, Bcc included.
    value = received(make(recipients=["to@example.org", "bcc@example.net"]))
    assert " for " not in value
    assert "example.net" not in value and "to@" not in value
    assert " for " not in received(make(recipients=[]))


@pytest.mark.parametrize(
    "rcpt",
    [
        "Postmaster",
        '"john smith"@example.org',
        '"a;b(c)"@example.org',
        '"q\\"uote"@example.org',
        "user+tag@[192.0.2.1]",
        "user@[IPv6:2001:db8::1]",
        "o'brien@example.org",
    ],
)
def test_received_for_well_formed_addresses(rcpt: str) -> None:
    value = received(make(recipients=[rcpt]))
    assert value.endswith(f" for <{rcpt}>; {T_DATE}")


@pytest.mark.parametrize(
    "rcpt",
    [
        "a@b.example\r\nX-Injected: 1",
        "a@b.example\nX-Injected: 1",
        "a\x00@b.example",
        '"a\r\nX-Injected: 1"@b.example',
        "a@b.example\u2028X-Injected: 1",
        "two words@b.example",
        "a@b.example>, <c@d.example",
        "a@bad domain",
        "a@",
        "@b.example",
        "nobody",
        "",
        "ü@bücher.example",
        "a@bücher.example",
        "a" * 250 + "@example.org",
    ],
)
def test_received_for_bad_addresses_left_out(rcpt: str) -> None:
    envelope = make(recipients=[rcpt])
    value = received(envelope)
    assert " for " not in value
    assert parse(envelope)["X-Injected"] is None


def test_received_for_eight_bit_address_in_smtputf8() -> None:
    envelope = make(recipients=["ü@bücher.example"], client={**CLIENT, "protocol": "UTF8SMTP"})
    assert received(envelope, utf8=True).endswith(f" for <ü@bücher.example>; {T_DATE}")


def test_received_by_defaults_to_the_local_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headers_module, "local_fqdn", lambda: "fqdn.example.net")
    assert " by fqdn.example.net (slimta " in received(make(receiver=None))
    assert " by fqdn.example.net (slimta " in received(make(receiver="bad\r\nX-Injected: 1"))
    monkeypatch.setattr(headers_module, "local_fqdn", lambda: "not valid")
    assert " by localhost (slimta " in received(make(receiver=None))


def test_received_date_defaults_to_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: T + 1)
    value = received(make(timestamp=None))
    date = value.rpartition("; ")[2]
    assert RFC5322_DATE.fullmatch(date)
    assert email.utils.parsedate_to_datetime(date).timestamp() == T + 1


@pytest.mark.usefixtures("local_timezone")
def test_received_date_is_utc_with_numeric_zone() -> None:
    assert received(make()).endswith(f"; {T_DATE}")


def test_received_custom_date_format() -> None:
    policy = AddReceivedHeader(date_format="%d %b %Y %H:%M:%S +0000")
    assert received(make(), policy).endswith("; 09 Sep 2001 01:46:40 +0000")
    assert policy.date_format == "%d %b %Y %H:%M:%S +0000"


name_text = st.text(st.characters(codec="utf-8"), max_size=80) | st.sampled_from(
    ["client.example.com", "[192.0.2.1]", "bücher.example", "x\r\ny", "a(b);c"]
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.none() | name_text,
    host=st.none() | name_text,
    ip=st.none() | st.ip_addresses().map(str) | name_text,
    protocol=st.none() | st.sampled_from(["ESMTP", "UTF8SMTPSA", "LMTP"]) | name_text,
    receiver=st.none() | name_text,
    rcpts=st.lists(name_text | st.emails(), max_size=2),
)
def test_received_any_client_data_gives_one_well_formed_field(
    name: str | None,
    host: str | None,
    ip: str | None,
    protocol: str | None,
    receiver: str | None,
    rcpts: list[str],
) -> None:
    client = {"name": name, "host": host, "ip": ip, "protocol": protocol}
    envelope = make(client=client, recipients=rcpts, receiver=receiver)
    utf8 = isinstance(protocol, str) and protocol.upper().startswith("UTF8")
    value = received(envelope, utf8=utf8)
    assert value.isprintable()
    assert RFC5322_DATE.fullmatch(value.rpartition("; ")[2])
    assert [name for name, _ in parse(envelope, utf8).raw_items()] == [
        "Received",
        "Subject",
        "From",
    ]
    if not utf8:
        assert envelope.flatten()[0].isascii()


# --- through a queue --------------------------------------------------------------


def test_queue_stores_the_headers_in_order() -> None:
    store = DictStorage()
    queue = Queue(store, clock=lambda: T)
    queue.add_policy(AddDateHeader())
    queue.add_policy(AddMessageIdHeader("mx.example.org"))
    queue.add_policy(AddReceivedHeader())
    envelope = make(timestamp=None)
    [(_, id)] = queue.enqueue(envelope)
    assert isinstance(id, str)
    stored, attempts = store.get(id)
    assert attempts == 0
    msg = parse(stored)
    assert [name for name, _ in msg.raw_items()] == [
        "Received",
        "Subject",
        "From",
        "Date",
        "Message-Id",
    ]
    assert str(msg["Received"]).endswith(f"id {id} for <r@example.org>; {T_DATE}")
    assert str(msg["Date"]) == T_DATE  # the queue stamped the envelope
    assert re.fullmatch(r"<[0-9a-f]{32}\.1000000000@mx\.example\.org>", str(msg["Message-Id"]))
    assert stored.flatten()[1] == b"body\r\n"


def test_queue_split_message_keeps_its_received_id_on_the_first_part() -> None:
    store = DictStorage()
    queue = Queue(store, clock=lambda: T)
    queue.add_policy(AddReceivedHeader())
    queue.add_policy(RecipientSplit())
    envelope = make(recipients=["a@example.org", "b@example.org"])
    results = queue.enqueue(envelope)
    ids = [id for _, id in results]
    assert len(set(ids)) == 2
    stamped = {str(parse(store.get(id)[0])["Received"]) for id in ids}
    # Both parts carry the one Received field written on arrival; its id is
    # the message's queue id, which the first part is stored under.
    [value] = stamped
    assert f" id {ids[0]};" in " ".join(value.split())
