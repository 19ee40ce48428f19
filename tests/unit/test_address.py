"""MAIL/RCPT argument syntax: paths (RFC 5321 4.1.2, RFC 6531) and parameters."""

from __future__ import annotations

import pytest

from slimta.smtp._address import (
    ArgumentError,
    parse_mail_argument,
    parse_params,
    parse_rcpt_argument,
)

BAD_SENDER = (501, "5.1.7")
BAD_RECIPIENT = (501, "5.1.3")
BAD_ARGUMENTS = (501, "5.5.4")


def error_of(func: object, arg: str) -> tuple[int, str]:
    with pytest.raises(ArgumentError) as info:
        func(arg)  # type: ignore[operator]
    exc = info.value
    assert isinstance(exc, ValueError)
    assert str(exc) == f"{exc.code} {exc.message}"
    return exc.code, exc.message.split(" ", 1)[0]


# ------------------------------------------------------------------ valid
VALID_PATHS = [
    ("<a@example.com>", "a@example.com"),
    ("<A.B-c+tag@Sub.Example.COM>", "A.B-c+tag@Sub.Example.COM"),
    ("<a@example>", "a@example"),
    ("<!#$%&'*+/=?^_`{|}~-@example.com>", "!#$%&'*+/=?^_`{|}~-@example.com"),
    ("<a@x-y.example>", "a@x-y.example"),
    ("<a@123.example>", "a@123.example"),
    # quoted local parts
    ('<"john doe"@example.com>', '"john doe"@example.com'),
    ('<"a\\"b"@example.com>', '"a\\"b"@example.com'),
    ('<"a\\\\b"@example.com>', '"a\\\\b"@example.com'),
    ('<"a>b"@example.com>', '"a>b"@example.com'),
    ('<"a@b"@example.com>', '"a@b"@example.com'),
    ('<""@example.com>', '""@example.com'),
    # address literals
    ("<a@[192.0.2.1]>", "a@[192.0.2.1]"),
    ("<a@[255.255.255.255]>", "a@[255.255.255.255]"),
    ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
    ("<a@[IPv6:::1]>", "a@[IPv6:::1]"),
    ("<a@[IPv6:2001:db8:0:0:0:0:0:1]>", "a@[IPv6:2001:db8:0:0:0:0:0:1]"),
    ("<a@[IPv6:::ffff:192.0.2.1]>", "a@[IPv6:::ffff:192.0.2.1]"),
    # source routes are accepted and dropped (RFC 5321 4.1.1.3, appendix C)
    ("<@relay.example:a@example.com>", "a@example.com"),
    ("<@one.example,@two.example:a@example.com>", "a@example.com"),
    # UTF-8 (RFC 6531)
    ("<用户@例子.广告>", "用户@例子.广告"),
    ("<δοκιμή@παράδειγμα.δοκιμή>", "δοκιμή@παράδειγμα.δοκιμή"),
    ("<Pelé@example.com>", "Pelé@example.com"),
    ('<"Jöhn Dœ"@example.com>', '"Jöhn Dœ"@example.com'),
]


@pytest.mark.parametrize(("path", "address"), VALID_PATHS)
def test_valid_mail_path(path: str, address: str) -> None:
    assert parse_mail_argument("FROM:" + path) == (address, "")


@pytest.mark.parametrize(("path", "address"), VALID_PATHS)
def test_valid_rcpt_path(path: str, address: str) -> None:
    assert parse_rcpt_argument("TO:" + path) == (address, "")


@pytest.mark.parametrize("prefix", ["FROM:", "from:", "From:", "FROM: ", "FROM:   "])
def test_mail_prefix_any_case_and_spaces(prefix: str) -> None:
    assert parse_mail_argument(prefix + "<a@example.com>") == ("a@example.com", "")


@pytest.mark.parametrize("prefix", ["TO:", "to:", "To:", "TO: "])
def test_rcpt_prefix_any_case_and_spaces(prefix: str) -> None:
    assert parse_rcpt_argument(prefix + "<a@example.com>") == ("a@example.com", "")


def test_null_reverse_path() -> None:
    assert parse_mail_argument("FROM:<>") == ("", "")
    assert parse_mail_argument("FROM:<> SIZE=10") == ("", "SIZE=10")
    assert parse_mail_argument("FROM:<>   ") == ("", "")


@pytest.mark.parametrize("path", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_bare_postmaster_recipient(path: str) -> None:
    address, rest = parse_rcpt_argument("TO:" + path)
    assert address.lower() == "postmaster"
    assert rest == ""


def test_bare_postmaster_is_no_sender() -> None:
    assert error_of(parse_mail_argument, "FROM:<postmaster>") == BAD_SENDER


def test_parameter_text_is_returned() -> None:
    assert parse_mail_argument("FROM:<a@example.com> SIZE=10  BODY=8BITMIME ") == (
        "a@example.com",
        "SIZE=10  BODY=8BITMIME",
    )
    assert parse_rcpt_argument("TO:<postmaster> NOTIFY=NEVER") == ("postmaster", "NOTIFY=NEVER")


# ---------------------------------------------------------------- invalid
INVALID_PATHS = [
    "a@example.com",
    "<a@example.com",
    "a@example.com>",
    "<<a@example.com>>",
    "<a>",
    "<a@>",
    "<@example.com>",
    "<a@@example.com>",
    "<a..b@example.com>",
    "<.a@example.com>",
    "<a.@example.com>",
    "<a b@example.com>",
    "<a@exa mple.com>",
    "< a@example.com>",
    "<a@example.com >",
    "<a@-example.com>",
    "<a@example-.com>",
    "<a@example..com>",
    "<a@example.com.>",
    "<a@.example.com>",
    "<a@exam_ple.com>",
    "<a@[192.0.2.1>",
    "<a@192.0.2.1]>",
    "<a@[]>",
    '<"a@example.com>',
    '<"a"b"@example.com>',
    '<"\t"@example.com>',
    '<"a\\\x01"@example.com>',
    "<a(comment)@example.com>",
    "<a,b@example.com>",
    "<a;b@example.com>",
    "<@relay.example,a@example.com>",
    "<@relay.example a@example.com>",
    "<relay.example:a@example.com>",
    "",
    "<",
    ">",
]


@pytest.mark.parametrize("path", INVALID_PATHS)
def test_invalid_mail_path(path: str) -> None:
    assert error_of(parse_mail_argument, "FROM:" + path) == BAD_SENDER


@pytest.mark.parametrize("path", INVALID_PATHS)
def test_invalid_rcpt_path(path: str) -> None:
    assert error_of(parse_rcpt_argument, "TO:" + path) == BAD_RECIPIENT


@pytest.mark.parametrize(
    "literal",
    ["[hello]", "[1.2.3]", "[1.2.3.256]", "[1.2.3.4.5]", "[IPv6:zzz]", "[IPv6:1::2::3]"],
)
def test_malformed_address_literal(literal: str) -> None:
    # RFC 5321 4.1.3: an IPv4 literal, "IPv6:" and an IPv6 address, or
    # "tag:content"; anything else is not an address literal.
    assert error_of(parse_mail_argument, f"FROM:<a@{literal}>") == BAD_SENDER
    assert error_of(parse_rcpt_argument, f"TO:<a@{literal}>") == BAD_RECIPIENT


def test_null_forward_path_refused() -> None:
    assert error_of(parse_rcpt_argument, "TO:<>") == BAD_RECIPIENT


@pytest.mark.parametrize(
    "arg", ["", "FROM", "FROM<a@example.com>", "TO:<a@example.com>", " FROM:<a@b>"]
)
def test_bad_mail_prefix(arg: str) -> None:
    assert error_of(parse_mail_argument, arg) == BAD_ARGUMENTS


@pytest.mark.parametrize("arg", ["", "TO", "TO<a@example.com>", "FROM:<a@example.com>"])
def test_bad_rcpt_prefix(arg: str) -> None:
    assert error_of(parse_rcpt_argument, arg) == BAD_ARGUMENTS


@pytest.mark.parametrize("tail", ["junk", ">", "<b@example.com>", "\tSIZE=1", ",x"])
def test_trailing_junk_after_path(tail: str) -> None:
    assert error_of(parse_mail_argument, "FROM:<a@example.com>" + tail) == BAD_ARGUMENTS
    assert error_of(parse_mail_argument, "FROM:<>" + tail) == BAD_ARGUMENTS
    assert error_of(parse_rcpt_argument, "TO:<a@example.com>" + tail) == BAD_ARGUMENTS
    assert error_of(parse_rcpt_argument, "TO:<postmaster>" + tail) == BAD_ARGUMENTS


def test_space_separated_words_after_path_are_parameters() -> None:
    address, rest = parse_mail_argument("FROM:<a@example.com> junk")
    assert (address, rest) == ("a@example.com", "junk")
    assert parse_params(rest) == {b"JUNK": True}


# -------------------------------------------------------------- parameters
def test_params_empty() -> None:
    assert parse_params("") == {}
    assert parse_params("   ") == {}


def test_params_4_0_form() -> None:
    assert parse_params("SIZE=1000 body=8BITMIME SMTPUTF8 x-Custom=v") == {
        b"SIZE": b"1000",
        b"BODY": b"8BITMIME",
        b"SMTPUTF8": True,
        b"X-CUSTOM": b"v",
    }


def test_params_extra_spaces() -> None:
    assert parse_params("A=1    B") == {b"A": b"1", b"B": True}


def test_params_values_keep_case_and_utf8() -> None:
    assert parse_params("AUTH=Mixed+2BCase X=é") == {b"AUTH": b"Mixed+2BCase", b"X": "é".encode()}


def test_params_value_with_angle_brackets() -> None:
    assert parse_params("AUTH=<>") == {b"AUTH": b"<>"}


@pytest.mark.parametrize(
    "text",
    [
        "=1",
        "A=",
        "A==1",
        "A=b=c",
        "-A=1",
        "A_B=1",
        "A.B",
        "é=1",
        "A=\x7f",
        "A=\x01",
        "A\x00",
        "A=b\tc",
    ],
)
def test_params_malformed(text: str) -> None:
    assert error_of(parse_params, text) == BAD_ARGUMENTS


def test_params_duplicate_any_case() -> None:
    assert error_of(parse_params, "SIZE=1 size=2") == BAD_ARGUMENTS
    assert error_of(parse_params, "SMTPUTF8 SMTPUTF8") == BAD_ARGUMENTS
