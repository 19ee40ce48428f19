"""LookupAuth: scrypt password hashes found by a lookup, for the edge's AUTH."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from pysasl.creds.external import ExternalCredentials
from pysasl.creds.plain import PlainCredentials
from pysasl.mechanism.crammd5 import CramMD5Result

from slimta.lookup import LookupFailed
from slimta.lookup.auth import LookupAuth, hash_password
from slimta.lookup.drivers import DictLookup, LookupBase
from slimta.smtp.auth import Credentials
from slimta.smtp.reply import Reply

#: Cheap scrypt settings, so that the tests are fast.
FAST = {"ln": 4, "r": 8, "p": 1}


def creds(user: str, password: str, authzid: str = "") -> Credentials:
    return Credentials(PlainCredentials(user, password, authzid), b"PLAIN")


@pytest.fixture
def table() -> dict[str, dict[str, Any]]:
    return {
        "alice@example.com": {"password": hash_password("s3cret", **FAST)},
        "bob": {"password": hash_password("hunter2", **FAST)},
        "plain@example.com": {"password": "s3cret"},
        "nohash@example.com": {"alias": "x@example.com"},
        "weird@example.com": {
            "password": "$scrypt$ln=99,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA"
        },
        # 4 GiB of scrypt memory: refused unhashed-for (the cap is 128 MiB).
        "huge@example.com": {"password": "$scrypt$ln=20,r=32,p=1$" + "A" * 22 + "$" + "A" * 43},
    }


@pytest.fixture
def auth(table: dict[str, dict[str, Any]]) -> LookupAuth:
    return LookupAuth(DictLookup(table, "{address}"))


def test_hash_format() -> None:
    text = hash_password("pw", ln=5, r=4, p=2)
    scheme, params, salt, key = text.split("$")[1:]
    assert (scheme, params) == ("scrypt", "ln=5,r=4,p=2")
    raw_salt = base64.b64decode(salt + "=" * (-len(salt) % 4))
    raw_key = base64.b64decode(key + "=" * (-len(key) % 4))
    assert len(raw_salt) == 16
    assert raw_key == hashlib.scrypt(b"pw", salt=raw_salt, n=2**5, r=4, p=2, dklen=32)
    assert "=" not in salt + key
    assert "pw" not in text.split("$", 3)[3]


def test_hash_is_salted() -> None:
    assert hash_password("pw", **FAST) != hash_password("pw", **FAST)


@pytest.mark.parametrize(
    "bad", [{"ln": 0}, {"ln": 21}, {"r": 0}, {"r": 33}, {"p": 17}, {"ln": 18, "r": 8}]
)
def test_hash_parameters_are_bounded(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        hash_password("pw", **{**FAST, **bad})


def test_right_password(auth: LookupAuth) -> None:
    assert auth.verify(creds("alice@example.com", "s3cret"))
    assert auth.verify(creds("bob", "hunter2"))
    assert auth.verify(creds("alice@example.com", "s3cret", "alice@example.com"))


def test_wrong_password(auth: LookupAuth) -> None:
    assert not auth.verify(creds("alice@example.com", "S3cret"))
    assert not auth.verify(creds("alice@example.com", ""))
    assert not auth.verify(creds("bob", "s3cret"))


def test_unknown_user(auth: LookupAuth) -> None:
    assert not auth.verify(creds("carol@example.com", "s3cret"))


def test_stored_plain_password_is_refused(
    auth: LookupAuth, caplog: pytest.LogCaptureFixture
) -> None:
    assert not auth.verify(creds("plain@example.com", "s3cret"))
    assert "s3cret" not in caplog.text
    assert "plain@example.com" in caplog.text


@pytest.mark.parametrize("user", ["nohash@example.com", "weird@example.com", "huge@example.com"])
def test_records_without_a_valid_hash_are_refused(auth: LookupAuth, user: str) -> None:
    assert not auth.verify(creds(user, "s3cret"))


def test_other_authzid_is_refused(auth: LookupAuth) -> None:
    assert not auth.verify(creds("alice@example.com", "s3cret", "bob"))


def test_saslprep_is_applied_to_both_sides() -> None:
    # U+00A0 (no-break space) maps to a space under SASLprep (RFC 4013).
    lookup = DictLookup({"u": {"password": hash_password("a\u00a0b", **FAST)}}, "{address}")
    assert LookupAuth(lookup).verify(creds("u", "a b"))


def test_cram_md5_cannot_be_checked(auth: LookupAuth) -> None:
    result = CramMD5Result("alice@example.com", b"<1.2@x>", b"0" * 32)
    assert not auth.verify(Credentials(result, b"CRAM-MD5"))


def test_external_is_not_checked(auth: LookupAuth) -> None:
    assert not auth.verify(Credentials(ExternalCredentials(""), b"EXTERNAL"))
    assert not auth.verify(Credentials(ExternalCredentials("alice@example.com"), b"EXTERNAL"))


def test_template_injection_in_the_user_name(auth: LookupAuth) -> None:
    lookup = DictLookup(
        {"alice@example.com": {"password": hash_password("s3cret", **FAST)}},
        "{localpart}@example.com",
    )
    auth = LookupAuth(lookup)
    assert auth.verify(creds("alice@whatever", "s3cret"))
    assert not auth.verify(creds("{localpart}@example.com", "s3cret"))
    assert not auth.verify(creds("{address}", "s3cret"))


class Counting:
    """Records each scrypt call's cost parameters."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, int, int]] = []
        real = hashlib.scrypt

        def scrypt(password: bytes, **kwargs: Any) -> bytes:
            self.calls.append((kwargs["n"], kwargs["r"], kwargs["p"]))
            return real(password, **kwargs)

        monkeypatch.setattr(hashlib, "scrypt", scrypt)


def test_unknown_user_and_wrong_password_cost_the_same(
    auth: LookupAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = Counting(monkeypatch)
    cases = [
        ("alice@example.com", "wrong"),
        ("alice@example.com", "s3cret"),
        ("carol@example.com", "wrong"),
        ("plain@example.com", "s3cret"),
        ("nohash@example.com", "s3cret"),
    ]
    for user, password in cases:
        auth.verify(creds(user, password))
    # One key derivation each, all with the parameters of the real hashes.
    assert counter.calls == [(2**4, 8, 1)] * len(cases)


def test_unknown_user_before_any_known_one_costs_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counter = Counting(monkeypatch)
    assert not LookupAuth(DictLookup({}, "{address}")).verify(creds("nobody", "pw"))
    assert counter.calls == [(2**14, 8, 5)]


class Failing(LookupBase):
    def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        raise LookupFailed("redis down")


def test_lookup_failure_is_raised_not_a_wrong_password() -> None:
    with pytest.raises(LookupFailed):
        LookupAuth(Failing()).verify(creds("alice@example.com", "s3cret"))


def test_handle_auth_replies(auth: LookupAuth) -> None:
    ok = Reply("235", "2.7.0 Authentication successful")
    auth.handle_auth(ok, creds("alice@example.com", "s3cret"))
    assert (ok.code, ok.enhanced_status_code) == ("235", "2.7.0")

    for bad in (creds("alice@example.com", "nope"), creds("carol", "s3cret")):
        reply = Reply("235", "2.7.0 Authentication successful")
        auth.handle_auth(reply, bad)
        assert (reply.code, reply.enhanced_status_code) == ("535", "5.7.8")

    reply = Reply("235", "2.7.0 Authentication successful")
    LookupAuth(Failing()).handle_auth(reply, creds("alice@example.com", "s3cret"))
    assert (reply.code, reply.enhanced_status_code) == ("454", "4.7.0")


def test_get_identity_never_gives_a_clear_secret(auth: LookupAuth) -> None:
    assert auth.get_identity("alice@example.com").get_clear_secret() is None
    assert auth.get_identity("plain@example.com").get_clear_secret() is None
