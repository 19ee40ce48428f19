"""slimta.policy.dkim: DKIM signing, checked with dkimpy's verifier.

The public keys are served by a dict here (dkimpy's ``dnsfunc``); the
integration test serves them from a real DNS server.
"""

from __future__ import annotations

import base64
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

dkim = pytest.importorskip("dkim")
pytest.importorskip("nacl.signing")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa  # noqa: E402

from slimta.envelope import Envelope  # noqa: E402
from slimta.policy.dkim import DEFAULT_SIGNED_HEADERS, DkimSign  # noqa: E402

SELECTOR = "sel"
DOMAIN = "example.test"
KEY_NAME = b"sel._domainkey.example.test."

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@other.test\r\n"
    b"Subject: hello there\r\n"
    b"Date: Sun, 06 Dec 2026 05:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"a line.\r\n"
)

ALGORITHMS = ["rsa-sha256", "ed25519-sha256"]


def _pem(
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, form: serialization.PrivateFormat
) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def keys(
    rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> dict[str, tuple[bytes, bytes]]:
    """``algorithm -> (private PEM, TXT record)``."""
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_public = ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return {
        # RFC 6376 3.6.1: p= is the base64 of the DER SubjectPublicKeyInfo.
        "rsa-sha256": (
            _pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL),
            b"v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_public),
        ),
        # RFC 8463 4.2: p= is the base64 of the raw 32-byte public key.
        "ed25519-sha256": (
            _pem(ed_key, serialization.PrivateFormat.PKCS8),
            b"v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_public),
        ),
    }


def verifier(record: bytes) -> Callable[[bytes], bool]:
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return record if name.lower() == KEY_NAME else None

    def verify(message: bytes) -> bool:
        return bool(dkim.verify(message, dnsfunc=dnsfunc))

    return verify


def envelope(data: bytes = MESSAGE) -> Envelope:
    env = Envelope("alice@example.test", ["bob@other.test"])
    env.parse(data)
    return env


def sent(env: Envelope) -> bytes:
    header_bytes, body = env.flatten()
    return header_bytes + body


def signed(
    keys: dict[str, tuple[bytes, bytes]], algorithm: str, data: bytes = MESSAGE, **options
) -> tuple[bytes, Callable[[bytes], bool]]:
    private, record = keys[algorithm]
    env = envelope(data)
    assert DkimSign(SELECTOR, DOMAIN, private, algorithm=algorithm, **options).apply(env) is None
    return sent(env), verifier(record)


def tags(message: bytes) -> dict[str, str]:
    """The tags of the first DKIM-Signature field of *message*."""
    match = re.match(rb"DKIM-Signature:(.*?)\r\n(?![ \t])", message, re.DOTALL)
    assert match is not None
    value = re.sub(r"\s+", "", match.group(1).decode("ascii"))
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


# Signing and verifying ---------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_signed_message_verifies(keys, algorithm: str) -> None:
    message, verify = signed(keys, algorithm)
    assert message.startswith(b"DKIM-Signature: ")
    assert message.count(b"DKIM-Signature:") == 1
    # Only the signature was added, in front.
    assert message.endswith(MESSAGE)
    assert verify(message)
    found = tags(message)
    assert found["a"] == algorithm
    assert found["c"] == "relaxed/relaxed"
    assert (found["d"], found["s"]) == (DOMAIN, SELECTOR)
    assert found["h"].split(":") == ["from", "subject", "date", "to", "message-id"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_changed_body_fails(keys, algorithm: str) -> None:
    message, verify = signed(keys, algorithm)
    assert not verify(message.replace(b"a line.", b"a lie."))
    assert not verify(message + b"more\r\n")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"Subject: hello there", b"Subject: hello here"),
        (b"From: Alice <alice@", b"From: Mallory <alice@"),
        (b"To: bob@other.test", b"To: eve@other.test"),
    ],
)
def test_changed_signed_header_fails(keys, algorithm: str, old: bytes, new: bytes) -> None:
    message, verify = signed(keys, algorithm)
    assert not verify(message.replace(old, new))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_added_unsigned_headers_do_not_matter(keys, algorithm: str) -> None:
    message, verify = signed(keys, algorithm)
    # A trace field in front (a later hop) and a new field among the others.
    changed = b"Received: from x by y; Sun, 06 Dec 2026 05:01:00 +0000\r\n" + message
    changed = changed.replace(b"Subject:", b"X-Scanned: yes\r\nSubject:")
    assert verify(changed)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_relaxed_header_canonicalization_survives_whitespace(keys, algorithm: str) -> None:
    message, verify = signed(keys, algorithm)
    refolded = message.replace(b"Subject: hello there", b"subject:\thello \r\n   there  ")
    assert verify(refolded)
    # The body is relaxed too: trailing white space and inner runs.
    assert verify(refolded.replace(b"a line.\r\n", b"a   line.  \r\n"))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_simple_canonicalization_is_exact(keys, algorithm: str) -> None:
    message, verify = signed(keys, algorithm, canonicalization="simple/simple")
    assert tags(message)["c"] == "simple/simple"
    # The prepended field is byte for byte what was signed.
    assert verify(message)
    assert not verify(message.replace(b"Subject: hello", b"Subject:  hello"))


def test_relaxed_alone_means_relaxed_simple(keys) -> None:
    message, verify = signed(keys, "rsa-sha256", canonicalization="relaxed")
    assert tags(message)["c"] == "relaxed/simple"
    assert verify(message)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_parsed_headers_are_signed_as_written(keys, algorithm: str) -> None:
    private, record = keys[algorithm]
    env = envelope()
    assert env.headers is not None  # parsed before the policy runs
    env.headers["X-Added"] = "by an earlier policy"
    DkimSign(SELECTOR, DOMAIN, private, algorithm=algorithm).apply(env)
    message = sent(env)
    assert b"X-Added: by an earlier policy\r\n" in message
    assert verifier(record)(message)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bare_line_endings_are_signed_as_sent(keys, algorithm: str) -> None:
    private, record = keys[algorithm]
    env = envelope(MESSAGE.replace(b"\r\n", b"\n"))
    assert env.message is not None and b"\r" not in env.message
    DkimSign(SELECTOR, DOMAIN, private, algorithm=algorithm).apply(env)
    message = sent(env)
    # What DataSender sends: CRLF everywhere; the stored body is that too.
    assert b"\n" not in message.replace(b"\r\n", b"")
    assert message.endswith(MESSAGE)
    assert verifier(record)(message)


def test_repeated_fields_are_all_signed(keys) -> None:
    data = MESSAGE.replace(b"To: bob@other.test\r\n", b"To: bob@other.test\r\nTo: c@other.test\r\n")
    message, verify = signed(keys, "rsa-sha256", data)
    assert tags(message)["h"].split(":").count("to") == 2
    assert verify(message)
    assert not verify(message.replace(b"To: bob@", b"To: eve@"))


def test_oversigning(keys) -> None:
    plain, verify = signed(keys, "rsa-sha256")
    over, _ = signed(keys, "rsa-sha256", oversign=True)
    assert tags(over)["h"].split(":") == [
        "from", "from", "subject", "subject", "date", "date", "to", "message-id",
    ]  # fmt: skip
    assert verify(over)

    def forge(message: bytes) -> bytes:
        return message.replace(b"From: Alice", b"Subject: forged\r\nFrom: Alice")

    # Without oversigning a second Subject above the first slips through.
    assert verify(forge(plain))
    assert not verify(forge(over))


def test_oversign_chosen_fields(keys) -> None:
    message, verify = signed(keys, "rsa-sha256", oversign=["Reply-To"])
    assert tags(message)["h"].split(":").count("reply-to") == 1  # absent: signed as absent
    assert verify(message)
    assert not verify(message.replace(b"Subject:", b"Reply-To: eve@evil.test\r\nSubject:"))


def test_signed_headers_option_always_has_from(keys) -> None:
    message, verify = signed(keys, "rsa-sha256", signed_headers=["Subject"])
    assert tags(message)["h"].split(":") == ["from", "subject"]
    assert verify(message)
    assert verify(message.replace(b"To: bob@", b"To: eve@"))


def test_default_signed_headers() -> None:
    names = {name.lower() for name in DEFAULT_SIGNED_HEADERS}
    assert names >= {"from", "reply-to", "subject", "date", "to", "cc", "message-id"}
    assert names >= {"resent-date", "resent-from", "resent-to", "resent-cc", "list-id"}
    # RFC 6376 5.4.1: SHOULD NOT be signed.
    assert not names & {"return-path", "received", "comments", "keywords"}


def test_identity(keys) -> None:
    message, verify = signed(keys, "rsa-sha256", identity="alice@mail.example.test")
    assert tags(message)["i"] == "alice@mail.example.test"
    assert verify(message)


# Which messages are signed ------------------------------------------------------


@pytest.mark.parametrize(
    ("from_field", "options", "expected"),
    [
        (b"alice@example.test", {}, True),
        (b"alice@EXAMPLE.Test", {}, True),
        (b"alice@mail.example.test", {}, True),
        (b"alice@other.test", {}, False),
        (b"alice@notexample.test", {}, False),
        (b"alice@example.test.other.test", {}, False),
        (b"alice@example.test, eve@other.test", {}, False),
        (b"alice@example.test, bob@sub.example.test", {}, True),
        (b"alice@other.test", {"from_domains": ["other.test"]}, True),
        (b"alice@example.test", {"from_domains": ["other.test"]}, False),
        (b'"Alice" <alice@example.test>', {}, True),
        (b"=?utf-8?q?Al=C3=AFce?=\r\n <alice@example.test>", {}, True),
    ],
)
def test_from_domain_decides(keys, from_field: bytes, options, expected: bool) -> None:
    data = MESSAGE.replace(b"Alice <alice@example.test>", from_field)
    message, verify = signed(keys, "rsa-sha256", data, **options)
    assert message.startswith(b"DKIM-Signature:") is expected
    if expected:
        assert verify(message)
    else:
        assert message == data


def test_should_sign_can_be_overridden(keys) -> None:
    seen = []

    class SignAll(DkimSign):
        def should_sign(self, envelope: Envelope, from_domains: list[str]) -> bool:
            seen.append(from_domains)
            return True

    env = envelope(MESSAGE.replace(b"alice@example.test>", b"alice@other.test>"))
    SignAll(SELECTOR, DOMAIN, keys["rsa-sha256"][0]).apply(env)
    assert seen == [["other.test"]]
    assert verifier(keys["rsa-sha256"][1])(sent(env))


@pytest.mark.parametrize(
    "data",
    [
        MESSAGE.replace(b"From: Alice <alice@example.test>\r\n", b""),
        MESSAGE.replace(b"From: Alice <alice@example.test>\r\n", b"From: undisclosed:;\r\n"),
        MESSAGE.replace(b"To:", b"From: eve@example.test\r\nTo:"),
        b"no header block at all\r\n",
    ],
    ids=["no-from", "no-address", "two-from", "no-headers"],
)
def test_unsignable_message_passes_unsigned_with_a_warning(
    keys, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    env = envelope(data)
    before = sent(env)
    DkimSign(SELECTOR, DOMAIN, keys["rsa-sha256"][0]).apply(env)
    assert sent(env) == before
    warnings = [r for r in caplog.records if r.name == "slimta.policy.dkim"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "not DKIM-signed" in warnings[0].getMessage()


def test_signing_error_passes_unsigned_with_a_warning(
    keys, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    policy = DkimSign(SELECTOR, DOMAIN, keys["rsa-sha256"][0])

    def broken(*args, **kwargs):
        raise dkim.KeyFormatError("broken key")

    monkeypatch.setattr(dkim, "sign", broken)
    env = envelope(MESSAGE.replace(b"\r\n", b"\n"))
    before = (env.flatten(), env.message)
    policy.apply(env)
    assert (env.flatten(), env.message) == before
    assert any("KeyFormatError: broken key" in r.getMessage() for r in caplog.records)


def test_other_domain_is_logged_at_debug_only(keys, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="slimta.policy.dkim")
    env = envelope(MESSAGE.replace(b"alice@example.test>", b"alice@other.test>"))
    DkimSign(SELECTOR, DOMAIN, keys["rsa-sha256"][0]).apply(env)
    assert [r.levelno for r in caplog.records if r.name == "slimta.policy.dkim"] == [logging.DEBUG]


# Keys and arguments -------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_key_from_a_file(keys, algorithm: str, tmp_path: Path) -> None:
    path = tmp_path / "dkim.pem"
    path.write_bytes(keys[algorithm][0])
    for key in (path, str(path)):
        env = envelope()
        DkimSign(SELECTOR, DOMAIN, key, algorithm=algorithm).apply(env)
        assert verifier(keys[algorithm][1])(sent(env))


def test_rsa_pkcs8_key(keys, rsa_key) -> None:
    env = envelope()
    DkimSign(SELECTOR, DOMAIN, _pem(rsa_key, serialization.PrivateFormat.PKCS8)).apply(env)
    assert verifier(keys["rsa-sha256"][1])(sent(env))


def test_ed25519_key_in_dkimpy_form(keys, ed_key) -> None:
    seed = ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    env = envelope()
    DkimSign(SELECTOR, DOMAIN, base64.b64encode(seed), algorithm="ed25519-sha256").apply(env)
    assert verifier(keys["ed25519-sha256"][1])(sent(env))


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nokey\.pem"):
        DkimSign(SELECTOR, DOMAIN, tmp_path / "nokey.pem")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a key",
        b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN CERTIFICATE-----\nbm90IGEga2V5\n-----END CERTIFICATE-----\n",
    ],
)
def test_malformed_key(algorithm: str, data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        DkimSign(SELECTOR, DOMAIN, path, algorithm=algorithm)
    with pytest.raises(ValueError, match="private key"):
        DkimSign(SELECTOR, DOMAIN, data, algorithm=algorithm)


def test_key_of_the_other_type(keys) -> None:
    with pytest.raises(ValueError, match="not an RSA private key"):
        DkimSign(SELECTOR, DOMAIN, keys["ed25519-sha256"][0])
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        DkimSign(SELECTOR, DOMAIN, keys["rsa-sha256"][0], algorithm="ed25519-sha256")


def _probable_prime(start: int) -> int:
    """The first number from *start* that passes Fermat tests (enough for a test key)."""
    n = start | 1
    while not all(pow(base, n - 1, n) == 1 for base in (2, 3, 5, 7, 11, 13)):
        n += 2
    return n


def test_rsa_key_of_fewer_than_1024_bits(keys) -> None:
    # RFC 8301 3.2. cryptography will not generate one: build it.
    p, q, e = _probable_prime(3 << 254), _probable_prime(5 << 253), 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    small = _pem(numbers.private_key(), serialization.PrivateFormat.TraditionalOpenSSL)
    with pytest.raises(ValueError, match="at least 1024"):
        DkimSign(SELECTOR, DOMAIN, small)
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    DkimSign(SELECTOR, DOMAIN, _pem(short, serialization.PrivateFormat.TraditionalOpenSSL))


@pytest.mark.parametrize(
    "options",
    [
        {"algorithm": "rsa-sha1"},
        {"algorithm": "ed25519"},
        {"canonicalization": "relaxed/loose"},
        {"canonicalization": "nofws"},
        {"identity": "alice@other.test"},
        {"identity": "alice@notexample.test"},
        {"identity": "no-at-sign"},
        {"signed_headers": ["From", "Bad Name"]},
        {"oversign": ["Subject:"]},
    ],
)
def test_bad_arguments(keys, options) -> None:
    with pytest.raises(ValueError):
        DkimSign(SELECTOR, DOMAIN, keys["rsa-sha256"][0], **options)


@pytest.mark.parametrize(
    ("selector", "domain"), [("", DOMAIN), ("bad selector", DOMAIN), (SELECTOR, "bad..domain")]
)
def test_bad_names(keys, selector: str, domain: str) -> None:
    with pytest.raises(ValueError):
        DkimSign(selector, domain, keys["rsa-sha256"][0])


def test_str_where_a_list_is_wanted(keys) -> None:
    with pytest.raises(TypeError):
        DkimSign(SELECTOR, DOMAIN, keys["rsa-sha256"][0], signed_headers="From")
    with pytest.raises(TypeError):
        DkimSign(SELECTOR, DOMAIN, keys["rsa-sha256"][0], oversign="From")


def test_without_dkimpy_construction_names_the_extra(keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dkim", None)  # import dkim -> ImportError
    with pytest.raises(ImportError, match=r"\[dkim\] extra"):
        DkimSign(SELECTOR, DOMAIN, keys["rsa-sha256"][0])


def test_without_pynacl_ed25519_says_so(keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nacl.signing", None)
    with pytest.raises(ImportError, match="PyNaCl"):
        DkimSign(SELECTOR, DOMAIN, keys["ed25519-sha256"][0], algorithm="ed25519-sha256")
    DkimSign(SELECTOR, DOMAIN, keys["rsa-sha256"][0])  # RSA does not need it


def test_a_broken_should_sign_does_not_lose_the_message(
    keys, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(DkimSign):
        def should_sign(self, envelope: Envelope, from_domains: list[str]) -> bool:
            raise RuntimeError("bug")

    env = envelope()
    Broken(SELECTOR, DOMAIN, keys["rsa-sha256"][0]).apply(env)
    assert sent(env) == MESSAGE
    assert any("RuntimeError: bug" in r.getMessage() for r in caplog.records)
