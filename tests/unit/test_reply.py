"""Reply (spec 4.2), format_reply and ReplyParser."""

from __future__ import annotations

import pytest

from slimta.smtp import reply as reply_module
from slimta.smtp._reply import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    ParsedReply,
    ReplyParser,
    ReplySyntaxError,
    format_reply,
)
from slimta.smtp.reply import Reply


# ------------------------------------------------------------------- Reply
def test_empty_reply() -> None:
    reply = Reply()
    assert not reply
    assert reply.code is None
    assert reply.message is None
    assert reply.enhanced_status_code is None


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        ("250", "Ok", "250 2.0.0 Ok"),
        ("221", "Bye", "221 2.0.0 Bye"),
        ("550", "5.1.1 bad", "550 5.1.1 bad"),
        ("451", "4.3.0 try later", "451 4.3.0 try later"),
        ("354", "Start", "354 Start"),
        ("334", "VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
        ("220", "mx ESMTP", "220 2.0.0 mx ESMTP"),
        ("550", "5.10.100 odd", "550 5.10.100 odd"),
        ("250", "2.1.5\tOk", "250 2.1.5 Ok"),
    ],
)
def test_str(code: str, message: str, expected: str) -> None:
    reply = Reply(code, message)
    assert str(reply) == expected
    assert bytes(reply) == expected.encode()


def test_bytes_is_utf8() -> None:
    assert bytes(Reply("550", "5.1.1 café")) == "550 5.1.1 café".encode()


def test_repr() -> None:
    assert repr(Reply("250", "Ok")) == "<Reply code='250' message='2.0.0 Ok'>"
    assert repr(Reply()) == "<Reply code=None message=None>"


def test_esc_is_split_from_message() -> None:
    reply = Reply("550", "5.1.1 No such user")
    assert reply.enhanced_status_code == "5.1.1"
    assert reply.raw_message == "No such user"
    assert reply.message == "5.1.1 No such user"


@pytest.mark.parametrize("text", ["5.1 short", "6.1.1 bad class", "5.1234.1 long", "5.1.1x", "x"])
def test_text_without_esc_keeps_default(text: str) -> None:
    reply = Reply("550", text)
    assert reply.raw_message == text
    assert reply.enhanced_status_code == "5.0.0"
    assert reply.message == f"5.0.0 {text}"


def test_class_digit_follows_code() -> None:
    reply = Reply("550", "5.1.1 bad")
    reply.code = "450"
    assert reply.enhanced_status_code == "4.1.1"
    assert str(reply) == "450 4.1.1 bad"
    reply.code = "250"
    assert reply.message == "2.1.1 bad"


def test_esc_given_with_other_class_takes_the_code_class() -> None:
    reply = Reply("450", "5.7.1 later")
    assert reply.enhanced_status_code == "4.7.1"
    assert str(reply) == "450 4.7.1 later"


def test_no_esc_for_1xx_and_3xx() -> None:
    reply = Reply("354", "3.0.0 x")  # 3 is no ESC class: stays text
    assert reply.enhanced_status_code is None
    assert reply.message == "3.0.0 x"
    reply = Reply("550", "5.1.1 bad")
    reply.code = "354"
    assert reply.enhanced_status_code is None
    assert reply.message == "bad"


def test_esc_false_suppresses() -> None:
    reply = Reply("220", "mx.example ESMTP")
    reply.enhanced_status_code = False
    assert reply.enhanced_status_code is None
    assert str(reply) == "220 mx.example ESMTP"
    # As in 4.0, new text without an ESC keeps it suppressed...
    reply.message = "other banner"
    assert str(reply) == "220 other banner"
    # ...and a code change too.
    reply.code = "554"
    assert str(reply) == "554 other banner"


def test_esc_none_restores_default() -> None:
    reply = Reply("250", "2.1.0 Ok")
    reply.enhanced_status_code = None
    assert reply.message == "2.0.0 Ok"


def test_esc_setter() -> None:
    reply = Reply("550", "bad")
    reply.enhanced_status_code = "5.7.1"
    assert str(reply) == "550 5.7.1 bad"
    assert reply.raw_message == "bad"


def test_new_text_without_esc_clears_stored_esc() -> None:
    reply = Reply("550", "5.1.1 bad")
    reply.message = "plain"
    assert reply.message == "5.0.0 plain"


@pytest.mark.parametrize("value", ["5.1", "6.1.1", "5.1.1 ", "x", "5.1.1000", "5.1.1.1"])
def test_invalid_esc_raises(value: str) -> None:
    reply = Reply("550", "bad")
    with pytest.raises(ValueError):
        reply.enhanced_status_code = value
    assert reply.message == "5.0.0 bad"


@pytest.mark.parametrize("code", ["600", "099", "25", "2500", "abc", "25a", " 250", "250 "])
def test_invalid_code_raises(code: str) -> None:
    with pytest.raises(ValueError) as info:
        Reply(code, "x")
    assert info.value.args == ("Invalid SMTP reply code", code)
    reply = Reply("250", "Ok")
    with pytest.raises(ValueError):
        reply.code = code
    assert reply.code == "250"


@pytest.mark.parametrize("code", ["250\n", "2\u0665\u0660", "\u0662\u0665\u0660"])
def test_code_must_be_three_ascii_digits(code: str) -> None:
    # "$" matches before a trailing newline and "\d" matches any Unicode digit:
    # either would put a broken code on the wire.
    with pytest.raises(ValueError):
        Reply(code, "x")


@pytest.mark.parametrize("esc", ["5.1.1\n", "5.\u0661.1"])
def test_esc_must_be_ascii_digits(esc: str) -> None:
    reply = Reply("550", "bad")
    with pytest.raises(ValueError):
        reply.enhanced_status_code = esc


def test_code_may_be_cleared() -> None:
    reply = Reply("250", "Ok")
    reply.code = None
    assert not reply
    assert reply.enhanced_status_code is None


def test_bool() -> None:
    assert Reply("250", "Ok")
    assert Reply("250")
    assert not Reply(None, "text")


def test_eq_compares_code_and_message_only() -> None:
    assert Reply("250", "Ok") == Reply("250", "2.0.0 Ok")
    assert Reply("250", "Ok", command=b"MAIL") == Reply("250", "Ok", command=b"RCPT")
    assert Reply("250", "Ok") != Reply("251", "Ok")
    assert Reply("250", "Ok") != Reply("250", "Fine")
    assert Reply() == Reply()


def test_contains() -> None:
    reply = Reply("550", "5.1.1 No such user")
    assert "No such" in reply
    assert "550 5.1.1" in reply
    assert b"5.1.1 No" in reply
    assert "4.1.1" not in reply
    assert b"nope" not in reply


def test_copy() -> None:
    source = Reply("550", "5.7.1 Denied", command=b"RCPT", address=("1.2.3.4", 25))
    target = Reply(command=b"MAIL", address="other")
    assert target.copy(source) is target
    assert target == source
    assert target.enhanced_status_code == "5.7.1"
    assert target.raw_message == "Denied"
    assert target.command == b"MAIL"
    assert target.address == "other"
    # Independent afterwards.
    target.code = "450"
    assert source.code == "550"


def test_copy_keeps_suppressed_esc() -> None:
    source = Reply("220", "banner")
    source.enhanced_status_code = False
    assert str(Reply().copy(source)) == "220 banner"


def test_is_error() -> None:
    assert Reply("450", "x").is_error()
    assert Reply("550", "x").is_error()
    assert not Reply("250", "x").is_error()
    assert not Reply("354", "x").is_error()


def test_command_and_address() -> None:
    reply = Reply("250", "Ok", b"MAIL", ("192.0.2.1", 25))
    assert reply.command == b"MAIL"
    assert reply.address == ("192.0.2.1", 25)
    assert reply.newline_first is False


def test_esc_only_message_has_no_trailing_space() -> None:
    text = str(Reply("550", "5.1.1"))
    assert text == text.rstrip()
    assert text.endswith("5.1.1")


def test_to_bytes() -> None:
    assert Reply("250", "Ok").to_bytes() == b"250 2.0.0 Ok\r\n"
    reply = Reply("421", "4.4.2 Connection timed out")
    reply.newline_first = True
    assert reply.to_bytes() == b"\r\n421 4.4.2 Connection timed out\r\n"
    assert Reply("250", "2.0.0 one\ntwo").to_bytes() == b"250-2.0.0 one\r\n250 two\r\n"


PREDEFINED = [
    ("unknown_command", "500", "5.5.2", "Syntax error, command unrecognized"),
    ("unknown_parameter", "504", "5.5.4", "Command parameter not implemented"),
    ("bad_sequence", "503", "5.5.1", "Bad sequence of commands"),
    ("bad_arguments", "501", "5.5.4", "Syntax error in parameters or arguments"),
    ("unhandled_error", "421", "4.3.0", "Unhandled system error"),
    ("tls_failure", "421", "4.7.0", "TLS negotiation failed"),
    ("connection_failed", "451", "4.3.0", "Connection failed"),
    ("timed_out", "421", "4.4.2", "Connection timed out"),
    ("invalid_credentials", "535", "5.7.8", "Authentication credentials invalid"),
]


@pytest.mark.parametrize(("name", "code", "esc", "text"), PREDEFINED)
def test_predefined_replies(name: str, code: str, esc: str, text: str) -> None:
    reply = getattr(reply_module, name)
    assert reply.code == code
    assert reply.enhanced_status_code == esc
    assert reply.raw_message == text
    assert reply.newline_first is (name == "timed_out")
    copied = Reply().copy(reply)
    assert copied == reply


def test_reply_all() -> None:
    assert sorted(reply_module.__all__) == sorted(["Reply"] + [row[0] for row in PREDEFINED])


# ------------------------------------------------------------- format_reply
def test_format_single_line() -> None:
    assert format_reply(250, "2.0.0 Ok") == b"250 2.0.0 Ok\r\n"


def test_format_empty_text() -> None:
    assert format_reply(354, "") == b"354\r\n"


def test_format_newline_first() -> None:
    assert format_reply(421, "bye", True) == b"\r\n421 bye\r\n"


def test_format_multi_line() -> None:
    out = format_reply(250, "mx Hello\r\nPIPELINING\r\nSIZE 1000")
    assert out == b"250-mx Hello\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"


@pytest.mark.parametrize(
    "text",
    [
        "a\nb",
        "a\rb",
        "a\r\n\r\nb",
        "ok\r\n221 2.0.0 Bye",
        "ok\n.\r\nMAIL FROM:<x@y>",
        "trailing\r\n",
        "\r\nleading",
    ],
)
def test_format_cannot_inject_a_reply(text: str) -> None:
    out = format_reply(250, text)
    assert out.endswith(b"\r\n")
    lines = out[:-2].split(b"\r\n")
    assert b"\n" not in out.replace(b"\r\n", b"")
    assert b"\r" not in out.replace(b"\r\n", b"")
    for line in lines[:-1]:
        assert line.startswith(b"250-")
    assert lines[-1].startswith(b"250 ") or lines[-1] == b"250"
    parser = ReplyParser()
    parser.feed(out)
    parsed = parser.next_reply()
    assert parsed is not None
    assert parsed.code == 250
    assert parser.next_reply() is None
    assert not parser.has_buffered


def test_format_utf8() -> None:
    assert format_reply(250, "héllo") == "250 héllo\r\n".encode()


# -------------------------------------------------------------- ReplyParser
def parse_all(data: bytes) -> list[ParsedReply]:
    parser = ReplyParser()
    parser.feed(data)
    out = []
    while (reply := parser.next_reply()) is not None:
        out.append(reply)
    return out


def test_parse_single() -> None:
    assert parse_all(b"250 2.0.0 Ok\r\n") == [ParsedReply(250, "2.0.0 Ok", ("2.0.0 Ok",))]


def test_parse_code_only() -> None:
    assert parse_all(b"250\r\n") == [ParsedReply(250, "", ("",))]


def test_parse_multi_line() -> None:
    data = b"250-mx Hello\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    assert parse_all(data) == [
        ParsedReply(
            250, "mx Hello\r\nPIPELINING\r\nSIZE 1000", ("mx Hello", "PIPELINING", "SIZE 1000")
        )
    ]


def test_parse_several_replies() -> None:
    replies = parse_all(b"250 2.1.0 Ok\r\n550 5.1.1 No\r\n354 Go\r\n")
    assert [r.code for r in replies] == [250, 550, 354]


def test_parse_incremental_byte_by_byte() -> None:
    data = b"250-first\r\n250-second\r\n250 last\r\n221 2.0.0 Bye\r\n"
    parser = ReplyParser()
    got = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        while (reply := parser.next_reply()) is not None:
            got.append((i, reply))
    assert [(i, r.code, r.lines) for i, r in got] == [
        (data.index(b"250 last\r\n") + 9, 250, ("first", "second", "last")),
        (len(data) - 1, 221, ("2.0.0 Bye",)),
    ]


def test_parse_waits_for_crlf() -> None:
    parser = ReplyParser()
    parser.feed(b"250 ok\n")
    assert parser.next_reply() is None
    parser.feed(b"\r")
    assert parser.next_reply() is None
    assert parser.has_buffered


@pytest.mark.parametrize(
    "data",
    [
        b"250-a\r\n251 b\r\n",
        b"250-a\r\n550 b\r\n",
        b"hello\r\n",
        b"25 ok\r\n",
        b"2500 ok\r\n",
        b"250x ok\r\n",
        b"600 ok\r\n",
        b"160 ok\r\n",
        b"270 ok\r\n",
        b"\r\n",
        b"250 \xff\xfe\r\n",
        b" 250 ok\r\n",
    ],
)
def test_parse_junk_raises(data: bytes) -> None:
    parser = ReplyParser()
    parser.feed(data)
    with pytest.raises(ReplySyntaxError) as info:
        while parser.next_reply() is not None:
            pass
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value.data, bytes)


def test_parse_line_too_long() -> None:
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * (MAX_REPLY_LINE + 10))
    with pytest.raises(ReplySyntaxError):
        parser.next_reply()


def test_parse_long_line_with_crlf_too_long() -> None:
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * (MAX_REPLY_LINE + 10) + b"\r\n")
    with pytest.raises(ReplySyntaxError):
        parser.next_reply()


def test_parse_too_many_lines() -> None:
    parser = ReplyParser()
    parser.feed(b"250-x\r\n" * (MAX_REPLY_LINES + 1) + b"250 end\r\n")
    with pytest.raises(ReplySyntaxError):
        parser.next_reply()


def test_parse_most_lines_allowed() -> None:
    replies = parse_all(b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 end\r\n")
    assert len(replies[0].lines) == MAX_REPLY_LINES


def test_take_buffered() -> None:
    parser = ReplyParser()
    parser.feed(b"220 2.0.0 Ready\r\n250 injected\r\n")
    assert parser.next_reply() == ParsedReply(220, "2.0.0 Ready", ("2.0.0 Ready",))
    assert parser.has_buffered
    assert parser.take_buffered() == b"250 injected\r\n"
    assert not parser.has_buffered
    assert parser.next_reply() is None


def test_format_then_parse_round_trip() -> None:
    text = "mx Hello\r\n8BITMIME\r\nSIZE 10"
    assert parse_all(format_reply(250, text)) == [
        ParsedReply(250, text, ("mx Hello", "8BITMIME", "SIZE 10"))
    ]
