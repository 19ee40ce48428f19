"""The lookup drivers: Dict, Regex, SQLite3, DBAPI2 (with sqlite3), templates.

Redis is tested against a real server in tests/integration/test_lookup_redis.py.
"""

from __future__ import annotations

import contextlib
import inspect
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import slimta.lookup
import slimta.lookup.drivers
from slimta.core import SlimtaError
from slimta.lookup import LookupFailed
from slimta.lookup.drivers import (
    DBAPI2Lookup,
    DictLookup,
    LookupBase,
    RedisLookup,
    RegexLookup,
    SQLite3Lookup,
)
from slimta.lookup.drivers._template import KeyTemplate

# --- public surface ---------------------------------------------------------------


def test_drivers_package_exports_the_spec_names() -> None:
    expected = {
        "LookupBase",
        "DictLookup",
        "RegexLookup",
        "RedisLookup",
        "DBAPI2Lookup",
        "SQLite3Lookup",
    }
    assert set(slimta.lookup.drivers.__all__) == expected
    for name in expected:
        assert hasattr(slimta.lookup.drivers, name)
    assert slimta.lookup.__all__ == ["LookupFailed"]


@pytest.mark.parametrize(
    ("cls", "params"),
    [
        (DictLookup, ["backend", "key_template"]),
        (RegexLookup, ["str_template"]),
        (
            RedisLookup,
            ["key_template", "host", "port", "db", "password", "socket_timeout", "use_hash"],
        ),
        (
            DBAPI2Lookup,
            ["conn_ctxmgr", "query", "query_param_order", "result_order", "conn"],
        ),
        (SQLite3Lookup, ["database", "query"]),
    ],
)
def test_positional_signatures_of_4_0(cls: type, params: list[str]) -> None:
    sig = inspect.signature(cls)
    positional = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    assert positional == params


def test_redis_defaults_of_4_0() -> None:
    defaults = {name: p.default for name, p in inspect.signature(RedisLookup).parameters.items()}
    assert defaults["host"] == "localhost"
    assert defaults["port"] == 6379
    assert defaults["db"] == 0
    assert defaults["password"] is None
    assert defaults["socket_timeout"] is None
    assert defaults["use_hash"] is False


def test_lookup_failed_is_a_transient_slimta_error() -> None:
    exc = LookupFailed("x")
    assert isinstance(exc, SlimtaError)
    # Not the builtin LookupError: "except LookupError" around a dict
    # access must not swallow a failed lookup.
    assert not isinstance(exc, LookupError)
    assert (exc.reply.code, exc.reply.enhanced_status_code) == ("451", "4.3.0")


# --- LookupBase -------------------------------------------------------------------


class Recorder(LookupBase):
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        self.calls.append(kwargs)
        return None


def test_base_lookup_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        LookupBase().lookup(address="a@b")


@pytest.mark.parametrize(
    ("address", "localpart", "domain"),
    [
        ("user@example.com", "user", "example.com"),
        ('"a@b"@example.com', '"a@b"', "example.com"),
        ("postmaster", "postmaster", ""),
        ("", "", ""),
    ],
)
def test_lookup_address_splits(address: str, localpart: str, domain: str) -> None:
    rec = Recorder()
    rec.lookup_address(address, extra=1)
    assert rec.calls == [{"address": address, "localpart": localpart, "domain": domain, "extra": 1}]


# --- templates ----------------------------------------------------------------------


def test_template_renders_names_and_escaped_braces() -> None:
    t = KeyTemplate("{{x}}:{domain}:{localpart}")
    assert t.render({"domain": "d", "localpart": "l"}) == "{x}:d:l"
    assert t.fields == {"domain", "localpart"}


@pytest.mark.parametrize(
    "template",
    ["{}", "{0}", "{address.__class__}", "{address[0]}", "{address!r}", "{address:>9}", "{", "}"],
)
def test_template_refuses_anything_but_bare_names(template: str) -> None:
    with pytest.raises(ValueError):
        KeyTemplate(template)


def test_template_values_are_not_parsed_again() -> None:
    t = KeyTemplate("user:{localpart}")
    assert t.render({"localpart": "{domain}", "domain": "secret"}) == "user:{domain}"


# --- DictLookup -----------------------------------------------------------------------

TABLE = {
    "user@example.com": {"alias": "other@example.com"},
    "example.com": {"verp": True},
    "{domain}": {"leak": "template field as a key"},
    "secret@example.com": {"password": "hash"},
}


def test_dict_lookup_found_and_not_found() -> None:
    lookup = DictLookup(TABLE, "{address}")
    assert lookup.lookup_address("user@example.com") == {"alias": "other@example.com"}
    assert lookup.lookup_address("nobody@example.com") is None
    assert DictLookup(TABLE, "{domain}").lookup_address("x@example.com") == {"verp": True}


def test_dict_lookup_returns_a_copy() -> None:
    lookup = DictLookup(TABLE, "{address}")
    rec = lookup.lookup(address="user@example.com")
    assert rec is not None
    rec["alias"] = "changed"
    assert TABLE["user@example.com"]["alias"] == "other@example.com"


def test_dict_lookup_missing_template_key_is_not_found() -> None:
    assert DictLookup(TABLE, "{user}").lookup(address="user@example.com") is None


@pytest.mark.parametrize(
    "address",
    [
        "{domain}@example.com",
        "{address}",
        "{0}@x",
        "{address.__class__}@x",
    ],
)
def test_dict_lookup_template_injection(address: str) -> None:
    # Braces in the address are text: "{domain}" as local part must not
    # become the value of the domain key, nor reach another record.
    lookup = DictLookup(TABLE, "{localpart}@example.com")
    assert lookup.lookup_address(address) is None
    lookup2 = DictLookup(TABLE, "{address}")
    assert lookup2.lookup_address(address) is None


def test_dict_lookup_injection_reaches_only_the_literal_key() -> None:
    # The only record a "{domain}" local part can reach is one whose key
    # is literally "{domain}".
    lookup = DictLookup(TABLE, "{localpart}")
    assert lookup.lookup_address("{domain}@example.com") == {"leak": "template field as a key"}
    assert lookup.lookup_address("secret@example.com") is None


def test_dict_lookup_backend_errors_are_failures() -> None:
    class Broken(dict[str, Any]):
        def __getitem__(self, key: str) -> Any:
            raise OSError("disk gone")

    with pytest.raises(LookupFailed) as info:
        DictLookup(Broken(), "{address}").lookup(address="a")
    assert isinstance(info.value.__cause__, OSError)


def test_dict_lookup_value_not_a_mapping_is_a_failure() -> None:
    with pytest.raises(LookupFailed):
        DictLookup({"a": "not a record"}, "{address}").lookup(address="a")


# --- RegexLookup ----------------------------------------------------------------------


def test_regex_lookup_first_match_wins() -> None:
    lookup = RegexLookup("{address}")
    lookup.add_regex(r"admin@", {"who": "admin"})
    lookup.add_regex(r".*@example\.com$", {"who": "local"})
    lookup.add_regex(r".*", {"who": "anyone"})
    assert lookup.lookup_address("admin@example.com") == {"who": "admin"}
    assert lookup.lookup_address("bob@example.com") == {"who": "local"}
    assert lookup.lookup_address("bob@example.org") == {"who": "anyone"}


def test_regex_lookup_match_is_anchored_at_the_start() -> None:
    lookup = RegexLookup("{domain}")
    lookup.add_regex("example", {"x": 1})
    assert lookup.lookup_address("a@example.com") == {"x": 1}
    assert lookup.lookup_address("a@www.example.com") is None


def test_regex_lookup_no_match_and_missing_key() -> None:
    lookup = RegexLookup("{address}")
    lookup.add_regex(r"x$", {"x": 1})
    assert lookup.lookup(address="abc") is None
    assert lookup.lookup(other="x") is None


def test_regex_lookup_braces_in_address_are_text() -> None:
    lookup = RegexLookup("{localpart}")
    lookup.add_regex(r"example\.com$", {"hit": True})
    assert lookup.lookup_address("{domain}@example.com") is None


# --- SQLite3Lookup ----------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "lookup.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (address TEXT, alias TEXT, domain TEXT)")
    conn.executemany(
        "INSERT INTO users VALUES (?, ?, ?)",
        [
            ("user@example.com", "other@example.com", "example.com"),
            ("x' OR '1'='1", "injected", "example.com"),
        ],
    )
    conn.commit()
    conn.close()
    return path


QUERY = "SELECT alias, domain FROM users WHERE address = :address"


def test_sqlite3_found_and_not_found(db: Path) -> None:
    lookup = SQLite3Lookup(str(db), QUERY)
    assert lookup.lookup_address("user@example.com") == {
        "alias": "other@example.com",
        "domain": "example.com",
    }
    assert lookup.lookup_address("nobody@example.com") is None


def test_sqlite3_sql_injection_is_a_parameter(db: Path) -> None:
    lookup = SQLite3Lookup(db, QUERY)
    assert lookup.lookup(address="' OR '1'='1") is None
    assert lookup.lookup(address="nobody' OR 1=1 --") is None
    # The row whose key is literally that text is the only one it reaches.
    assert lookup.lookup(address="x' OR '1'='1") == {"alias": "injected", "domain": "example.com"}


def test_sqlite3_missing_file_is_a_failure_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    lookup = SQLite3Lookup(str(path), QUERY)
    with pytest.raises(LookupFailed) as info:
        lookup.lookup_address("user@example.com")
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert not path.exists()


def test_sqlite3_not_a_database_is_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LookupFailed):
        SQLite3Lookup(str(path), QUERY).lookup_address("user@example.com")


def test_sqlite3_bad_query_is_a_failure(db: Path) -> None:
    with pytest.raises(LookupFailed):
        SQLite3Lookup(str(db), "SELECT * FROM nowhere WHERE a = :address").lookup(address="a")


def test_sqlite3_locked_database_is_a_failure(db: Path) -> None:
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        lookup = SQLite3Lookup(str(db), QUERY, busy_timeout=0.05)
        with pytest.raises(LookupFailed) as info:
            lookup.lookup_address("user@example.com")
        assert "locked" in str(info.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_sqlite3_waits_for_a_lock_released_in_time(db: Path) -> None:
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.1, lambda: holder.execute("ROLLBACK"))
    release.start()
    try:
        lookup = SQLite3Lookup(str(db), QUERY, busy_timeout=5.0)
        assert lookup.lookup_address("user@example.com") is not None
    finally:
        release.join()
        holder.close()


def test_sqlite3_is_read_only(db: Path) -> None:
    lookup = SQLite3Lookup(str(db), "DELETE FROM users WHERE address = :address")
    with pytest.raises(LookupFailed):
        lookup.lookup(address="user@example.com")
    assert SQLite3Lookup(str(db), QUERY).lookup(address="user@example.com") is not None


def test_sqlite3_path_with_uri_characters(tmp_path: Path) -> None:
    odd = tmp_path / "a?mode=rwc#x%20"
    odd.mkdir()
    path = odd / "db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (address TEXT, alias TEXT, domain TEXT)")
    conn.execute("INSERT INTO users VALUES ('a', 'b', 'c')")
    conn.commit()
    conn.close()
    assert SQLite3Lookup(str(path), QUERY).lookup(address="a") == {"alias": "b", "domain": "c"}
    with pytest.raises(LookupFailed):
        SQLite3Lookup(str(odd / "missing"), QUERY).lookup(address="a")
    assert not (odd / "missing").exists()


# --- DBAPI2Lookup, with sqlite3 as the DB-API module --------------------------------------


def test_dbapi2_named_params_with_a_context_manager(db: Path) -> None:
    opened: list[sqlite3.Connection] = []

    @contextlib.contextmanager
    def connect() -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(db)
        opened.append(conn)
        try:
            yield conn
        finally:
            conn.close()

    lookup = DBAPI2Lookup(connect, QUERY)
    assert lookup.lookup_address("user@example.com") == {
        "alias": "other@example.com",
        "domain": "example.com",
    }
    assert lookup.lookup_address("nobody@example.com") is None
    assert len(opened) == 2


def test_dbapi2_positional_params_and_result_order(db: Path) -> None:
    conn = sqlite3.connect(db)
    lookup = DBAPI2Lookup(
        None,
        "SELECT alias, domain FROM users WHERE address = ? AND domain = ?",
        query_param_order=["address", "domain"],
        result_order=["new_address", "zone"],
        conn=conn,
    )
    assert lookup.lookup_address("user@example.com") == {
        "new_address": "other@example.com",
        "zone": "example.com",
    }
    assert lookup.lookup_address("user@example.org") is None
    # A keyword the query needs but was not given: no record.
    assert lookup.lookup(address="user@example.com") is None
    assert lookup.lookup(address="x' OR '1'='1", domain="example.com") == {
        "new_address": "injected",
        "zone": "example.com",
    }
    assert not conn.in_transaction
    conn.close()


def test_dbapi2_mapping_rows(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    lookup = DBAPI2Lookup(None, QUERY, conn=conn)
    assert lookup.lookup(address="user@example.com") == {
        "alias": "other@example.com",
        "domain": "example.com",
    }
    conn.close()


def test_dbapi2_needs_a_connection() -> None:
    with pytest.raises(ValueError):
        DBAPI2Lookup(None, QUERY)


def test_dbapi2_errors_are_failures(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.close()
    with pytest.raises(LookupFailed) as info:
        DBAPI2Lookup(None, QUERY, conn=conn).lookup(address="a")
    assert isinstance(info.value.__cause__, sqlite3.ProgrammingError)

    @contextlib.contextmanager
    def refuse() -> Iterator[Any]:
        raise ConnectionRefusedError("database down")
        yield  # pragma: no cover

    with pytest.raises(LookupFailed) as info:
        DBAPI2Lookup(refuse, QUERY).lookup(address="a")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_dbapi2_query_is_never_formatted_and_ends_the_transaction() -> None:
    # A query holding braces is passed to the database as written, with
    # the keywords as its parameters.
    seen: list[tuple[str, Any]] = []

    class Cursor:
        description = (("a", None, None, None, None, None, None),)

        def execute(self, query: str, params: Any) -> None:
            seen.append((query, params))

        def fetchone(self) -> tuple[str]:
            return ("x",)

        def close(self) -> None:
            pass

    class Conn:
        def cursor(self) -> Cursor:
            return Cursor()

        def rollback(self) -> None:
            # Ends the read transaction (no "idle in transaction").
            seen.append(("rollback", None))

    query = "SELECT a FROM t WHERE k = %(address)s AND j = '{domain}'"
    lookup = DBAPI2Lookup(None, query, conn=Conn())
    assert lookup.lookup_address("{domain}@d") == {"a": "x"}
    assert seen == [
        (query, {"address": "{domain}@d", "localpart": "{domain}", "domain": "d"}),
        ("rollback", None),
    ]
