"""Unit tests for :mod:`slimta.util.bytesformat`."""

from __future__ import annotations

import pytest

import slimta.util.bytesformat
from slimta.smtp.reply import Reply
from slimta.util.bytesformat import BytesFormat


def test_public_surface() -> None:
    assert slimta.util.bytesformat.__all__ == ["BytesFormat"]


def test_named_and_numbered_fields() -> None:
    fmt = BytesFormat(b"{0} and {name} and {1}")
    assert fmt.format(b"a", b"b", name=b"n") == b"a and n and b"


def test_same_field_twice() -> None:
    assert BytesFormat(b"{x}-{x}-{0}-{0}").format(b"p", x=b"k") == b"k-k-p-p"


def test_field_at_both_ends_and_adjacent() -> None:
    assert BytesFormat(b"{a}{b}mid{a}").format(a=b"1", b=b"2") == b"12mid1"


def test_template_attributes_and_repr() -> None:
    fmt = BytesFormat(bytearray(b"x{y}"), mode="remove")
    assert fmt.template == b"x{y}"
    assert type(fmt.template) is bytes
    assert fmt.mode == "remove"
    assert repr(fmt) == "BytesFormat(b'x{y}', mode='remove')"
    assert BytesFormat(b"").mode == "ignore"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"raw\xff", b"raw\xff"),
        (bytearray(b"arr"), b"arr"),
        (memoryview(b"view"), b"view"),
        ("text", b"text"),
        ("Grüße", "Grüße".encode()),
        ("\udcff", b"\xff"),
        (5, b"5"),
        (None, b"None"),
        (1.5, b"1.5"),
        (Reply("250", "2.0.0 Ok"), b"250 2.0.0 Ok"),
    ],
)
def test_value_conversion(value: object, expected: bytes) -> None:
    assert BytesFormat(b"<{v}>").format(v=value) == b"<" + expected + b">"
    assert BytesFormat(b"<{0}>").format(value) == b"<" + expected + b">"


def test_object_with_bytes_method() -> None:
    class Thing:
        def __bytes__(self) -> bytes:
            return b"thing-bytes"

        def __str__(self) -> str:
            return "thing-str"

    assert BytesFormat(b"{0}").format(Thing()) == b"thing-bytes"


@pytest.mark.parametrize(
    "template",
    [
        b"{}",
        b"{ x}",
        b"{x }",
        b"{x-y}",
        b"{x.y}",
        b"{x[0]}",
        b"{x:>10}",
        b"{x!r}",
        b"{",
        b"}",
        b"{\xc3\xa9}",
        b"no fields at all",
    ],
)
def test_only_word_character_fields(template: bytes) -> None:
    for mode in ("ignore", "remove", "strict"):
        assert BytesFormat(template, mode).format(x=b"X", y=b"Y") == template


def test_doubled_braces_are_not_escapes() -> None:
    assert BytesFormat(b"{{x}}").format(x=b"X") == b"{X}"


def test_unicode_word_characters_are_not_names() -> None:
    # \w on bytes is ASCII only: the bytes of "é" are not a field name.
    template = "{é}".encode()
    assert BytesFormat(template, "strict").format() == template


def test_ignore_mode_keeps_missing_fields() -> None:
    fmt = BytesFormat(b"{a} {0} {b} {3}")
    assert fmt.format(b"zero", a=b"A") == b"A zero {b} {3}"


def test_remove_mode_drops_missing_fields() -> None:
    fmt = BytesFormat(b"[{a}] [{0}] [{b}] [{3}]", mode="remove")
    assert fmt.format(b"zero", a=b"A") == b"[A] [zero] [] []"


def test_strict_mode_raises_key_error() -> None:
    fmt = BytesFormat(b"{a} {b}", mode="strict")
    assert fmt.format(a=1, b=2) == b"1 2"
    with pytest.raises(KeyError) as info:
        fmt.format(a=1)
    assert info.value.args == ("b",)


def test_strict_mode_raises_index_error() -> None:
    fmt = BytesFormat(b"{0} {2}", mode="strict")
    assert fmt.format(b"a", b"b", b"c") == b"a c"
    with pytest.raises(IndexError) as info:
        fmt.format(b"a", b"b")
    assert info.value.args == (2,)


def test_numbered_fields_ignore_keywords() -> None:
    # A digit-only name is positional, as in str.format.
    fmt = BytesFormat(b"{0}", mode="remove")
    assert fmt.format(**{"0": b"kw"}) == b""


def test_leading_zeros_name_a_position() -> None:
    assert BytesFormat(b"{00}{01}").format(b"a", b"b") == b"ab"


def test_keywords_with_digits_and_underscores() -> None:
    fmt = BytesFormat(b"{_x1} {x_2} {X}")
    assert fmt.format(_x1=b"a", x_2=b"b", X=b"c") == b"a b c"


def test_extra_values_are_ignored() -> None:
    assert BytesFormat(b"{a}").format(b"unused", a=b"A", b=b"B") == b"A"


def test_values_are_not_reformatted() -> None:
    assert BytesFormat(b"{a}{b}").format(a=b"{b}", b=b"x") == b"{b}x"


def test_invalid_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        BytesFormat(b"x", mode="loose")


def test_str_template_is_rejected() -> None:
    with pytest.raises(TypeError):
        BytesFormat("text")  # type: ignore[arg-type]


def test_unencodable_surrogate() -> None:
    with pytest.raises(UnicodeEncodeError):
        BytesFormat(b"{0}").format("\ud800")


def test_template_is_reusable() -> None:
    fmt = BytesFormat(b"Hello {name}!")
    assert [fmt.format(name=n) for n in (b"a", b"b")] == [b"Hello a!", b"Hello b!"]
