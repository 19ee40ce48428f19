"""Extensions (spec 4.3): the ESMTP keyword map of EHLO."""

from __future__ import annotations

import pytest

from slimta.smtp.extensions import Extensions


class NoMechanisms:
    """Like an AuthSession with no usable mechanism: its str() fails."""

    def __str__(self) -> str:
        raise ValueError("no mechanisms")


class Mechanisms:
    def __str__(self) -> str:
        return "PLAIN LOGIN"


def test_empty() -> None:
    ext = Extensions()
    assert ext.extensions == {}
    assert len(ext) == 0
    assert list(ext) == []
    assert "SIZE" not in ext


def test_add_and_contains_ignore_case() -> None:
    ext = Extensions()
    ext.add("size", 100)
    ext.add("Pipelining")
    assert "SIZE" in ext
    assert "size" in ext
    assert "PIPELINING" in ext
    assert "pipelining" in ext
    assert ext.extensions == {"SIZE": 100, "PIPELINING": None}


def test_contains_non_string_is_false() -> None:
    ext = Extensions()
    ext.add("SIZE")
    assert 1 not in ext
    assert None not in ext


def test_add_replaces_in_place() -> None:
    ext = Extensions()
    ext.add("SIZE", 100)
    ext.add("8BITMIME")
    ext.add("size", 200)
    assert list(ext) == ["SIZE", "8BITMIME"]
    assert ext.getparam("SIZE") == 200


def test_iteration_follows_insertion_order() -> None:
    ext = Extensions()
    for keyword in ("8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8", "SIZE"):
        ext.add(keyword)
    assert list(ext) == ["8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8", "SIZE"]
    assert len(ext) == 5


def test_drop() -> None:
    ext = Extensions()
    ext.add("STARTTLS")
    assert ext.drop("starttls") is True
    assert "STARTTLS" not in ext
    assert ext.drop("STARTTLS") is False


def test_drop_extension_with_none_param_reports_true() -> None:
    ext = Extensions()
    ext.add("PIPELINING", None)
    assert ext.drop("PIPELINING") is True


def test_reset() -> None:
    ext = Extensions()
    ext.add("SIZE", 10)
    ext.add("AUTH", "PLAIN")
    ext.reset()
    assert len(ext) == 0
    assert ext.extensions == {}


def test_getparam() -> None:
    ext = Extensions()
    ext.add("SIZE", "1000")
    ext.add("PIPELINING")
    ext.add("AUTH", "PLAIN LOGIN")
    assert ext.getparam("SIZE") == "1000"
    assert ext.getparam("size", int) == 1000
    assert ext.getparam("PIPELINING") is None
    assert ext.getparam("PIPELINING", int) is None
    assert ext.getparam("MISSING") is None
    assert ext.getparam("MISSING", int) is None
    assert ext.getparam("AUTH", str.split) == ["PLAIN", "LOGIN"]


def test_getparam_filter_value_error_gives_none() -> None:
    ext = Extensions()
    ext.add("SIZE", "lots")
    assert ext.getparam("SIZE", int) is None
    assert ext.getparam("SIZE") == "lots"


def test_build_string() -> None:
    ext = Extensions()
    ext.add("8BITMIME")
    ext.add("AUTH", Mechanisms())
    ext.add("SIZE", 1000)
    assert ext.build_string("mx.example Hello c") == (
        "mx.example Hello c\r\n8BITMIME\r\nAUTH PLAIN LOGIN\r\nSIZE 1000"
    )


def test_build_string_without_extensions() -> None:
    assert Extensions().build_string("mx Hello") == "mx Hello"


def test_build_string_omits_param_whose_str_raises_value_error() -> None:
    ext = Extensions()
    ext.add("PIPELINING")
    ext.add("AUTH", NoMechanisms())
    ext.add("SIZE", 10)
    assert ext.build_string("hi") == "hi\r\nPIPELINING\r\nSIZE 10"
    assert "AUTH" in ext


@pytest.mark.parametrize("sep", ["\r\n", "\n"])
def test_parse_string(sep: str) -> None:
    ext = Extensions()
    text = sep.join(["mx.example ESMTP hello", "8BITMIME", "size 1000", "AUTH PLAIN LOGIN", ""])
    assert ext.parse_string(text) == "mx.example ESMTP hello"
    assert list(ext) == ["8BITMIME", "SIZE", "AUTH"]
    assert ext.getparam("8BITMIME") is None
    assert ext.getparam("SIZE", int) == 1000
    assert ext.getparam("AUTH") == "PLAIN LOGIN"


def test_parse_string_greeting_only() -> None:
    ext = Extensions()
    assert ext.parse_string("mx.example") == "mx.example"
    assert len(ext) == 0


def test_parse_string_adds_to_existing() -> None:
    ext = Extensions()
    ext.add("STARTTLS")
    ext.parse_string("mx\r\nPIPELINING")
    assert list(ext) == ["STARTTLS", "PIPELINING"]


def test_build_then_parse_round_trip() -> None:
    ext = Extensions()
    ext.add("8BITMIME")
    ext.add("SIZE", 5000)
    ext.add("AUTH", "PLAIN LOGIN")
    parsed = Extensions()
    assert parsed.parse_string(ext.build_string("greeting")) == "greeting"
    assert list(parsed) == list(ext)
    assert parsed.getparam("SIZE", int) == 5000
    assert parsed.getparam("AUTH") == "PLAIN LOGIN"
