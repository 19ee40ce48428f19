"""Property tests for :class:`slimta.envelope.Envelope` parsing and flattening."""

from __future__ import annotations

import pickle

from hypothesis import example, given
from hypothesis import strategies as st

from slimta.envelope import Envelope

# A field name: printable ASCII except the colon (RFC 5322 section 3.6.8).
names = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
    min_size=1,
    max_size=20,
).map(str.encode)

# Field-body bytes: anything but line breaks and the control characters that
# str.splitlines() also treats as line breaks; 8-bit bytes included.
_BREAKS = b"\r\n\x0b\x0c\x1c\x1d\x1e"
text_bytes = st.sampled_from([bytes([b]) for b in range(256) if b not in _BREAKS])
visible_bytes = st.sampled_from([bytes([b]) for b in range(256) if b not in _BREAKS + b" \t"])
texts = st.lists(text_bytes, max_size=40).map(b"".join)
folds = st.sampled_from([b" ", b"\t", b"  ", b" \t"])

continuations = st.builds(
    lambda fold, first, rest: fold + first + rest, folds, visible_bytes, texts
)


@st.composite
def header_fields(draw: st.DrawFn) -> list[bytes]:
    """One header field as a list of lines without their line endings."""
    first = draw(names) + b": " + draw(visible_bytes) + draw(texts)
    return [first, *draw(st.lists(continuations, max_size=3))]


header_blocks = st.lists(header_fields(), max_size=8)
bodies = st.binary(max_size=200)


def build(fields: list[list[bytes]], body: bytes, eol: bytes = b"\r\n") -> bytes:
    return b"".join(line + eol for field in fields for line in field) + eol + body


# Arbitrary input biased towards the pieces that matter to the header parser.
tricky_bytes = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"\r\n",
                b"\n",
                b"\r",
                b" ",
                b"\t",
                b":",
                b": ",
                b"Subject",
                b"From ",
                b"X-H: v",
                b"\x0c",
                b"\x1e",
                b"\xc3\xa9",
                b"\xff",
            ]
        ),
        st.binary(max_size=4),
    ),
    max_size=40,
).map(b"".join)


def parsed(data: bytes) -> Envelope:
    env = Envelope()
    env.parse(data)
    return env


@given(header_blocks, bodies)
@example([], b"")
@example([[b"From: x"], [b"Subject: hi"]], b"body\r\n")
def test_well_formed_crlf_round_trips(fields: list[list[bytes]], body: bytes) -> None:
    data = build(fields, body)
    env = parsed(data)
    header_bytes, body_bytes = env.flatten()
    assert header_bytes + body_bytes == data
    assert body_bytes == body


@given(header_blocks, bodies)
def test_lazy_flatten_equals_parsed_flatten(fields: list[list[bytes]], body: bytes) -> None:
    data = build(fields, body)
    lazy = parsed(data).flatten()
    env = parsed(data)
    assert env.headers is not None
    assert len(env.headers) == len(fields)
    assert env.flatten() == lazy


@given(header_blocks, bodies)
def test_lf_input_flattens_like_crlf_input(fields: list[list[bytes]], body: bytes) -> None:
    lf = parsed(build(fields, body, b"\n"))
    crlf = parsed(build(fields, body))
    assert lf.flatten() == crlf.flatten()
    assert lf.headers is not None
    assert lf.flatten() == crlf.flatten()


@given(st.one_of(st.binary(), tricky_bytes))
def test_parse_never_raises_and_keeps_the_body(data: bytes) -> None:
    env = parsed(data)
    header_bytes, body = env.flatten()
    assert header_bytes.endswith(b"\r\n")
    # The body is always a tail of the input: nothing after the header block
    # is lost or changed.
    assert data.endswith(body)


@given(st.one_of(st.binary(), tricky_bytes))
def test_lazy_and_eager_paths_agree(data: bytes) -> None:
    lazy = parsed(data)
    eager = Envelope()
    eager._parse_now(data)  # the path taken for input the raw path rejects
    assert lazy.flatten() == eager.flatten()
    assert lazy.headers is not None
    assert lazy.flatten() == eager.flatten()


@given(st.one_of(st.binary(), tricky_bytes), st.booleans())
def test_pickle_and_copy_preserve_flatten(data: bytes, read_headers: bool) -> None:
    env = parsed(data)
    if read_headers:
        assert env.headers is not None
    expected = env.flatten()
    assert pickle.loads(pickle.dumps(env)).flatten() == expected
    assert env.copy().flatten() == expected


prepend_values = st.lists(
    st.one_of(
        st.text(
            st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\x0b\x0c\x1c\x1d\x1e"),
            max_size=30,
        ),
        st.sampled_from(["\r\n\tfolded", "\n  folded"]),
    ),
    min_size=1,
    max_size=3,
).map("".join)


@given(header_blocks, prepend_values)
def test_prepend_header_lazy_and_parsed_agree(fields: list[list[bytes]], value: str) -> None:
    data = build(fields, b"body")
    lazy = parsed(data)
    eager = parsed(data)
    assert eager.headers is not None
    try:
        lazy.prepend_header("Received", value)
    except ValueError:
        return  # e.g. a value ending in a fold
    eager.prepend_header("Received", value)
    assert lazy.flatten() == eager.flatten()
    assert lazy.flatten()[0].startswith(b"Received: ")
    assert lazy.headers is not None
    assert lazy.flatten() == eager.flatten()
    assert lazy.headers.keys()[0] == "Received"
