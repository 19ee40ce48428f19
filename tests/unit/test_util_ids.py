"""slimta.util.ids: uuid4_hex() makes what uuid.uuid4().hex makes."""

from __future__ import annotations

import uuid

from slimta.util.ids import uuid4_hex


def test_uuid4_hex_is_a_version_4_uuid() -> None:
    for _ in range(2000):
        text = uuid4_hex()
        assert len(text) == 32
        assert text == text.lower()
        parsed = uuid.UUID(hex=text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == text


def test_uuid4_hex_is_random() -> None:
    seen = {uuid4_hex() for _ in range(10000)}
    assert len(seen) == 10000
    # Every random hex position takes many values (the fixed ones do not).
    for position in range(32):
        values = {text[position] for text in seen}
        if position == 12:
            assert values == {"4"}
        elif position == 16:
            assert values <= set("89ab") and len(values) == 4
        else:
            assert len(values) == 16
