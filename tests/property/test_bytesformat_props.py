"""Property tests for :class:`slimta.util.bytesformat.BytesFormat`."""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st

from slimta.util.bytesformat import BytesFormat

#: A field as the spec defines it, written independently of the module.
FIELD = re.compile(rb"\{([A-Za-z0-9_]+)\}")

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True)
numbers = st.integers(min_value=0, max_value=4).map(str)

# Template pieces rich in braces and field-like text, so fields (valid and
# almost valid) are common, mixed with arbitrary bytes.
pieces = st.one_of(
    st.binary(max_size=8),
    st.sampled_from([b"{", b"}", b"{}", b"{{", b"}}", b"{ x}", b"{x.y}", b"{0:>3}", b"\r\n"]),
    names.map(lambda n: b"{" + n.encode() + b"}"),
    numbers.map(lambda n: b"{" + n.encode() + b"}"),
)
templates = st.one_of(st.binary(max_size=100), st.lists(pieces, max_size=12).map(b"".join))

# Values of every kind format() converts; text without lone surrogates.
values = st.one_of(
    st.binary(max_size=10),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=10),
    st.integers(),
    st.none(),
)
positional = st.lists(values, max_size=4)
keywords = st.dictionaries(names, values, max_size=6)

#: Templates with no field in them.
plain_templates = templates.filter(lambda t: FIELD.search(t) is None)


def convert(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def model(template: bytes, mode: str, args: list[object], kwargs: dict[str, object]) -> bytes:
    """What format() should return, via re.sub."""

    def replace(match: re.Match[bytes]) -> bytes:
        name = match.group(1).decode("ascii")
        if name.isdigit():
            if int(name) < len(args):
                return convert(args[int(name)])
        elif name in kwargs:
            return convert(kwargs[name])
        return match.group(0) if mode == "ignore" else b""

    return FIELD.sub(replace, template)


@given(templates, st.sampled_from(["ignore", "remove"]), positional, keywords)
@example(b"{0}{1}{x}", "ignore", [], {})
@example(b"{}{{0}}}", "remove", [b"a"], {})
def test_lenient_modes_never_raise(
    template: bytes, mode: str, args: list[object], kwargs: dict[str, object]
) -> None:
    result = BytesFormat(template, mode).format(*args, **kwargs)
    assert result == model(template, mode, args, kwargs)


@given(plain_templates, st.sampled_from(["ignore", "remove", "strict"]), positional, keywords)
@example(b"{{}} { x } {x-y} {\xc3\xa9}", "strict", [b"a"], {"x": b"X"})
def test_templates_without_fields_round_trip(
    template: bytes, mode: str, args: list[object], kwargs: dict[str, object]
) -> None:
    assert BytesFormat(template, mode).format(*args, **kwargs) == template


@given(templates)
def test_ignore_without_values_is_identity(template: bytes) -> None:
    assert BytesFormat(template).format() == template


@given(templates)
def test_remove_without_values_drops_fields(template: bytes) -> None:
    result = BytesFormat(template, "remove").format()
    assert result == FIELD.sub(b"", template)


@given(templates, positional, keywords)
def test_strict_agrees_when_every_field_has_a_value(
    template: bytes, args: list[object], kwargs: dict[str, object]
) -> None:
    # Give every field in the template a value, then all modes agree.
    kwargs = dict(kwargs)
    args = list(args)
    for match in FIELD.finditer(template):
        name = match.group(1).decode("ascii")
        if name.isdigit():
            while len(args) <= int(name):
                args.append(b"#")
        else:
            kwargs.setdefault(name, b"!")
    results = {
        BytesFormat(template, mode).format(*args, **kwargs)
        for mode in ("ignore", "remove", "strict")
    }
    assert results == {model(template, "strict", args, kwargs)}


@given(templates, st.binary(max_size=10))
def test_value_bytes_are_inserted_verbatim(template: bytes, value: bytes) -> None:
    # A value is never itself scanned for fields.
    fmt = BytesFormat(template, "remove")
    names_in = {m.group(1).decode("ascii") for m in FIELD.finditer(template)}
    kwargs = {name: value for name in names_in if not name.isdigit()}
    args = [value] * (max((int(name) for name in names_in if name.isdigit()), default=-1) + 1)
    assert fmt.format(*args, **kwargs) == FIELD.sub(lambda _: value, template)
