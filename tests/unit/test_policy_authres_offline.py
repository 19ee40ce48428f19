"""slimta.policy.authres without DNS: field syntax, folding, forged fields, no dkimpy.

Only checks that need no lookup run here (SPF and DMARC off, messages
without signatures); tests/integration/test_policy_authres.py has the rest.
"""

from __future__ import annotations

import logging
import re
import sys

import pytest

import slimta.policy.authres as authres
from slimta.envelope import Envelope
from slimta.policy.authres import AddAuthenticationResults

MESSAGE = b"From: a@example.test\r\nSubject: hi\r\n\r\nbody\r\n"


def _apply(data: bytes = MESSAGE, authserv_id: str = "mx.test", **options: bool) -> bytes:
    env = Envelope("a@example.test", ["b@example.test"])
    env.parse(data)
    options.setdefault("spf", False)
    options.setdefault("dmarc", False)
    AddAuthenticationResults(authserv_id, **options).apply(env)  # type: ignore[arg-type]
    header_bytes, body = env.flatten()
    assert body == b"body\r\n"
    return header_bytes


@pytest.mark.parametrize(
    "bad", ["", "mx.test;", "mx test", "mx.test\r\nX: y", "mx\x00", '"mx"', "mx(c)", "m\u00e9"]
)
def test_authserv_id_must_be_a_token(bad: str) -> None:
    with pytest.raises(ValueError):
        AddAuthenticationResults(bad)


def test_keyword_only_options() -> None:
    with pytest.raises(TypeError):
        AddAuthenticationResults("mx.test", False)  # type: ignore[misc]


def test_no_signature_gives_dkim_none() -> None:
    pytest.importorskip("dkim")
    assert _apply().startswith(b"Authentication-Results: mx.test; dkim=none\r\nFrom:")


def test_nothing_checked_gives_none() -> None:
    assert _apply(dkim=False).startswith(b"Authentication-Results: mx.test; none\r\n")


def test_without_dkimpy_the_clause_is_left_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "dkim", None)  # import dkim raises ImportError
    monkeypatch.setattr(AddAuthenticationResults, "_warned_no_dkimpy", False)
    with caplog.at_level(logging.WARNING, logger="slimta.policy.authres"):
        first = _apply()
        second = _apply()
    assert first.startswith(b"Authentication-Results: mx.test; none\r\n")
    assert second == first
    assert [record.message for record in caplog.records].count(
        "dkimpy is not installed: DKIM signatures are not verified"
    ) == 1


def test_forged_fields_with_our_id_removed() -> None:
    pytest.importorskip("dkim")
    data = (
        b"Authentication-Results: MX.TEST; dkim=pass header.d=bank.test\r\n"
        b"Received: from x\r\n"
        b'authentication-results: "mx.test"; spf=pass\r\n'
        b"Authentication-Results: (c (nested)) mx.test\r\n\t; dmarc=pass\r\n"
        b"Authentication-Results: mx.test.evil; spf=pass\r\n"
        b"Authentication-Results: other.test; dkim=pass\r\n" + MESSAGE
    )
    header_bytes = _apply(data)
    assert header_bytes == (
        b"Authentication-Results: mx.test; dkim=none\r\n"
        b"Received: from x\r\n"
        b"Authentication-Results: mx.test.evil; spf=pass\r\n"
        b"Authentication-Results: other.test; dkim=pass\r\n" + MESSAGE.split(b"body")[0]
    )


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("a.b@example.test", "a.b@example.test"),
        ("a;b@example.test", '"a;b"@example.test'),
        ('a"\\b@example.test', '"a\\"\\\\b"@example.test'),
        ("a\r\nX: y@example.test", None),
        ("a\x00@example.test", None),
        ("a@exa;mple.test", None),
        ("a@example.test\r\n", None),
        ("\u00e9@example.test", None),
        ("no-at-sign", None),
    ],
)
def test_quote_address(address: str, expected: str | None) -> None:
    assert authres._quote_address(address) == expected


def test_fold_at_78() -> None:
    words = ["mx.test;"] + [f"dkim=fail header.d=d{i}.example.test header.s=sel;" for i in range(6)]
    words = " ".join(words).split(" ")
    value = authres._fold(words)
    lines = f"Authentication-Results: {value}".split("\n")
    assert len(lines) > 1
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith("\t") for line in lines[1:])
    assert re.sub(r"\n\t", " ", value) == " ".join(words)


@pytest.mark.parametrize(
    ("record", "tags"),
    [
        (b"v=DMARC1; p=reject", {"v": "DMARC1", "p": "reject"}),
        (b"v=DMARC1;p=None;SP=quarantine;adkim=S;", {"p": "none", "sp": "quarantine"}),
    ],
)
def test_dmarc_tags(record: bytes, tags: dict[str, str]) -> None:
    parsed = authres._dmarc_tags(record)
    assert tags.items() <= parsed.items()


@pytest.mark.parametrize(
    "record",
    [b"v=DMARC1", b"v=DMARC1; p=maybe", b"v=DMARC1; p=none; aspf=x", b"v=DMARC1; p", b"\xff"],
)
def test_dmarc_tags_malformed(record: bytes) -> None:
    with pytest.raises(authres._PermError):
        authres._dmarc_tags(record)
