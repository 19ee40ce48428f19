"""MTA-STS parsing: policy files, TXT records and MX patterns (RFC 8461 3.1, 3.2, 4.1).

The fetching and caching around them are tested against real DNS and HTTPS
servers in tests/integration/test_mx_tls_policy.py.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from slimta.relay.smtp.mtasts import (
    MAX_AGE_LIMIT,
    PolicyError,
    StsPolicy,
    mx_pattern_matches,
    parse_policy,
    parse_txt_record,
    policy_id_from_txt,
)

BASIC = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmax_age: 86400\n"


# ------------------------------------------------------------ valid policies
@pytest.mark.parametrize(
    ("text", "mode", "max_age", "mx"),
    [
        (BASIC, "enforce", 86400, ("mail.example.com",)),
        # CRLF line ends, no final line end
        (
            "version: STSv1\r\nmode: testing\r\nmx: a.example.com\r\nmax_age: 60",
            "testing",
            60,
            ("a.example.com",),
        ),
        # fields in any order, several mx, a wildcard, case folded
        (
            "mx: MAIL.Example.COM\nmax_age: 604800\nmx: *.backup.example.com\n"
            "mode: enforce\nversion: STSv1\n",
            "enforce",
            604800,
            ("mail.example.com", "*.backup.example.com"),
        ),
        # none needs no mx
        ("version: STSv1\nmode: none\nmax_age: 0\n", "none", 0, ()),
        # no space after the colon, trailing spaces and tabs
        (
            "version:STSv1 \nmode:\tenforce\t\nmx:   mx.example.net  \nmax_age: 1\n",
            "enforce",
            1,
            ("mx.example.net",),
        ),
        # unknown fields are ignored, UTF-8 included
        (
            BASIC + "comment: hello world\nx_note.v2: caf\u00e9 \u2713\n",
            "enforce",
            86400,
            ("mail.example.com",),
        ),
        # the largest max_age, with leading zeros (10 digits)
        (
            BASIC.replace("86400", "0031557600"),
            "enforce",
            MAX_AGE_LIMIT,
            ("mail.example.com",),
        ),
        # repeated mx patterns are one pattern
        (
            BASIC + "mx: mail.example.com\nmx: Mail.Example.Com\n",
            "enforce",
            86400,
            ("mail.example.com",),
        ),
        # blank lines are skipped
        (
            "\nversion: STSv1\n\nmode: enforce\n  \nmx: m.test\nmax_age: 5\n\n\n",
            "enforce",
            5,
            ("m.test",),
        ),
        # a one-label MX name is a Domain in RFC 5321's grammar
        ("version: STSv1\nmode: testing\nmx: localhost\nmax_age: 5", "testing", 5, ("localhost",)),
    ],
)
def test_valid_policies(text: str, mode: str, max_age: int, mx: tuple[str, ...]) -> None:
    policy = parse_policy(text)
    assert (policy.mode, policy.max_age, policy.mx, policy.version) == (mode, max_age, mx, "STSv1")
    assert parse_policy(text.encode("utf-8")) == policy
    assert policy.text == text


def test_policy_modes() -> None:
    policy = parse_policy(BASIC)
    assert policy.enforce and not policy.testing
    testing = parse_policy(BASIC.replace("enforce", "testing"))
    assert testing.testing and not testing.enforce


# ---------------------------------------------------------- invalid policies
@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no version"),
        ("mode: enforce\nmx: a.test\nmax_age: 5\n", "no version"),
        ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 5\n", "unknown version"),
        ("version: stsv1\nmode: enforce\nmx: a.test\nmax_age: 5\n", "unknown version"),
        # field names are case-sensitive: "Version" is an unknown field
        ("Version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 5\n", "no version"),
        ("version: STSv1\nmx: a.test\nmax_age: 5\n", "no mode"),
        ("version: STSv1\nmode: Enforce\nmx: a.test\nmax_age: 5\n", "unknown mode"),
        ("version: STSv1\nmode: report\nmx: a.test\nmax_age: 5\n", "unknown mode"),
        ("version: STSv1\nmode: enforce\nmx: a.test\n", "no max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n", "over"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n", "invalid max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "invalid max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1e5\n", "invalid max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 86 400\n", "invalid max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 5\n", "no mx field"),
        ("version: STSv1\nmode: testing\nmax_age: 5\n", "no mx field"),
        (BASIC + "mode: testing\n", "mode repeated"),
        (BASIC + "version: STSv1\n", "version repeated"),
        (BASIC + "max_age: 86400\n", "max_age repeated"),
        (BASIC + "mx:\n", "empty value"),
        (BASIC + "mx: \t \n", "empty value"),
        (BASIC + "no colon here\n", "not a 'name: value'"),
        (BASIC + " mx: b.example.com\n", "not a 'name: value'"),
        (BASIC + "mode : enforce\n", "not a 'name: value'"),
        (BASIC + "_x: y\n", "not a 'name: value'"),
        (BASIC + "a" * 33 + ": y\n", "not a 'name: value'"),
        (BASIC + "note: bell\x07\n", "control character"),
        (BASIC + "note: a\rb\n", "control character"),
        (BASIC + "note: a\x0bb\n", "control character"),
    ],
)
def test_invalid_policies(text: str, reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        parse_policy(text)


@pytest.mark.parametrize(
    "pattern",
    [
        "*",
        "*.",
        "a..example.com",
        "-mail.example.com",
        "mail-.example.com",
        "mail.example.com.",
        "*.*.example.com",
        "mail.*.example.com",
        "ma*l.example.com",
        "mail.example.com:25",
        "mail_1.example.com",
        "[192.0.2.1]",
        "m\u00e4il.example.com",
        "a" * 64 + ".example.com",
        ".".join(["a" * 60] * 5),
    ],
)
def test_invalid_mx_patterns(pattern: str) -> None:
    with pytest.raises(PolicyError, match="invalid mx pattern"):
        parse_policy(f"version: STSv1\nmode: enforce\nmx: {pattern}\nmax_age: 5\n")


def test_policy_bytes_must_be_utf8() -> None:
    with pytest.raises(PolicyError, match="not UTF-8"):
        parse_policy(BASIC.encode() + b"note: \xff\n")


# ------------------------------------------------------------- MX patterns
@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.com", True),
        ("mail.example.com", "mail.example.com.", True),
        ("mail.example.com", "mail2.example.com", False),
        ("mail.example.com", "example.com", False),
        ("example.com", "mail.example.com", False),
        ("*.example.com", "mail.example.com", True),
        ("*.example.com", "MX-1.EXAMPLE.COM.", True),
        # the wildcard is one whole label: not zero, not two
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "mail.example.com.evil.test", False),
        ("*.example.com", "mailexample.com", False),
        ("*.mail.example.com", "mail.example.com", False),
    ],
)
def test_mx_pattern_matching(pattern: str, host: str, matches: bool) -> None:
    assert mx_pattern_matches(pattern, host) is matches
    policy = StsPolicy("enforce", 60, (pattern,))
    assert policy.matches(host) is matches


def test_policy_matches_any_pattern() -> None:
    policy = parse_policy(BASIC + "mx: *.backup.example.com\n")
    assert policy.matches("mail.example.com")
    assert policy.matches("b1.backup.example.com")
    assert not policy.matches("evil.example.com")


# -------------------------------------------------------------- TXT records
@pytest.mark.parametrize(
    ("text", "policy_id"),
    [
        ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
        ("v=STSv1; id=20160831085700Z", "20160831085700Z"),
        ("v=STSv1;id=abc", "abc"),
        ("v=STSv1 ;\tid=1 ; ", "1"),
        ("v=STSv1; id=1; ext=val!ue", "1"),
        ("v=STSv1; x.y-z_1=2; id=" + "A1" * 16, "A1" * 16),
    ],
)
def test_valid_txt_records(text: str, policy_id: str) -> None:
    assert parse_txt_record(text) == policy_id
    assert policy_id_from_txt([text]) == policy_id


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v=STSv1",
        "v=STSv1;",
        "v=STSv1; id=",
        "v=STSv1; id=a-b",
        "v=STSv1; id=" + "a" * 33,
        "v=STSv1; id=1; id=2",
        "v=STSv1; ; id=1",
        "v=STSv1; id=1;;",
        "v=STSv2; id=1",
        " v=STSv1; id=1",
        "v=stsv1; id=1",
        "v=STSv1; ID=1",
        "v=STSv1; id=1; foo",
        "v=STSv1; id=1; ext=a b",
        "v=STSv1; id=1; ext=a=b",
        "v=STSv1; id=1; ext=",
        "id=1; v=STSv1",
    ],
)
def test_invalid_txt_records(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_txt_record(text)
    assert policy_id_from_txt([text]) is None


@pytest.mark.parametrize(
    ("texts", "policy_id"),
    [
        ([], None),
        (["v=spf1 -all"], None),
        (["v=spf1 -all", "v=STSv1; id=7"], "7"),
        # records not starting with v=STSv1 are dropped before counting
        (["v=STSv10; id=1", "v=STSv1; id=2"], "2"),
        (["hello", "v=STSv1;id=3", "world"], "3"),
        # more than one: no policy
        (["v=STSv1; id=1", "v=STSv1; id=2"], None),
        (["v=STSv1; id=1", "v=STSv1; id=1"], None),
        # the one left is invalid: no policy
        (["v=STSv1; id=bad-id", "v=spf1 -all"], None),
    ],
)
def test_policy_id_from_txt_records(texts: list[str], policy_id: str | None) -> None:
    assert policy_id_from_txt(texts) == policy_id


# ---------------------------------------------------------------- properties
_FIELD_NAMES = st.sampled_from(["version", "mode", "mx", "max_age", "note", "Mode", "x"])
_VALUES = st.one_of(
    st.sampled_from(["STSv1", "enforce", "testing", "none", "86400", "*.a.test", "a.test"]),
    st.text(max_size=12),
)
_LINES = st.one_of(
    st.builds(
        lambda n, sep, v: f"{n}{sep}{v}",
        _FIELD_NAMES,
        st.sampled_from([":", ": ", ":\t", " :"]),
        _VALUES,
    ),
    st.text(max_size=20),
)


@given(st.lists(_LINES, max_size=8), st.sampled_from(["\n", "\r\n", "\r"]))
@example(["version: STSv1", "mode: enforce", "mx: a.test", "max_age: 5"], "\n")
def test_policy_parser_raises_only_policy_error(lines: list[str], end: str) -> None:
    text = end.join(lines)
    for data in (text, text.encode("utf-8", "surrogatepass")):
        try:
            policy = parse_policy(data)
        except PolicyError:
            continue
        assert policy.mode in ("enforce", "testing", "none")
        assert 0 <= policy.max_age <= MAX_AGE_LIMIT
        assert policy.mx or policy.mode == "none"


@given(st.binary(max_size=200))
def test_policy_parser_on_any_bytes(data: bytes) -> None:
    with contextlib.suppress(PolicyError):
        parse_policy(data)


@given(st.text(max_size=80))
@example("v=STSv1; id=1")
def test_txt_parser_raises_only_policy_error(text: str) -> None:
    try:
        policy_id = parse_txt_record(text)
    except PolicyError:
        return
    assert 1 <= len(policy_id) <= 32 and policy_id.isalnum() and policy_id.isascii()


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(
    st.sampled_from(["enforce", "testing"]),
    st.integers(0, MAX_AGE_LIMIT),
    st.lists(st.lists(_LABEL, min_size=1, max_size=4).map(".".join), min_size=1, max_size=4),
    st.booleans(),
)
def test_written_policies_parse_back(mode: str, max_age: int, hosts: list[str], crlf: bool) -> None:
    end = "\r\n" if crlf else "\n"
    lines = ["version: STSv1", f"mode: {mode}", f"max_age: {max_age}"]
    lines += [f"mx: {host}" for host in hosts]
    policy = parse_policy(end.join(lines) + end)
    assert (policy.mode, policy.max_age) == (mode, max_age)
    assert policy.mx == tuple(dict.fromkeys(hosts))
    assert all(policy.matches(host) for host in hosts)
