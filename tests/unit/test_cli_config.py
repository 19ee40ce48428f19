"""The ``slimta`` command's configuration: schema, loader, example, passwords,
and the rules and routes built from it (no sockets, no processes)."""

from __future__ import annotations

import dataclasses
import io
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pysasl.creds.plain import PlainCredentials

from slimta.cli import main
from slimta.cli.access import Access, Counters, Runtime, validators_for
from slimta.cli.build import build
from slimta.cli.config import (
    DEFAULT_SOURCE,
    SECTION_CLASSES,
    Config,
    default_config,
    load_file,
    load_text,
)
from slimta.cli.errors import EX_CONFIG, EX_DATAERR, EX_NOINPUT, EX_USAGE, CliError, ConfigInvalid
from slimta.cli.example import render_example
from slimta.cli.passwd import make_hash, read_password, run_passwd
from slimta.cli.routing import Router, RouteTable, make_backoff
from slimta.cli.schema import SECTIONS, Shape
from slimta.cli.summary import describe, warnings
from slimta.envelope import Envelope
from slimta.lookup.auth import hash_password
from slimta.relay import PermanentRelayError, Relay, TransientRelayError
from slimta.smtp.auth import Credentials
from slimta.smtp.reply import Reply

#: Cheap scrypt settings, so that the tests are fast.
FAST = {"ln": 4, "r": 8, "p": 1}
HASH = hash_password("s3cret", **FAST)

SOURCE = "test.toml"


def problems(text: str) -> list[str]:
    """Every problem line the loader reports for *text*."""
    with pytest.raises(ConfigInvalid) as caught:
        load_text(text, SOURCE, Path("/base"))
    return caught.value.lines()


def load(text: str) -> Config:
    return load_text(text, SOURCE, Path("/base"))


def only_problem(text: str) -> str:
    (line,) = problems(text)
    return line


# --- every error names the file and the key -----------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys and sections, with "did you mean"
        (
            "[server]\nhostnme = 'a'",
            'test.toml: server.hostnme: unknown key; did you mean "server.hostname"?',
        ),
        ("[server]\nzzz = 1", "test.toml: server.zzz: unknown key"),
        ("[srever]\nx = 1", 'test.toml: srever: unknown section; did you mean "server"?'),
        (
            "hostname = 'a'",
            'test.toml: hostname: unknown key; did you mean "server.hostname"?',
        ),
        (
            "[relay.smarthots]\nhost = 'a'",
            'test.toml: relay.smarthots: unknown section; did you mean "relay.smarthost"?',
        ),
        # a value of the wrong type or out of range, one per kind
        ("[server]\ndata_dir = 5", "test.toml: server.data_dir: expected a path"),
        ("[server]\nhostname = 'not a name!'", "test.toml: server.hostname: expected a host name"),
        (
            "[server]\nlog_level = 'loud'",
            'test.toml: server.log_level: expected one of "debug", "info", "warning", "error", '
            'got "loud"',
        ),
        ("[server]\nuser = ''", 'test.toml: server.user: expected a non-empty string, got ""'),
        (
            "[server]\nshutdown_grace = -1",
            "test.toml: server.shutdown_grace: expected a number of seconds of at least 0, got -1",
        ),
        (
            "[server]\ntrusted_networks = ['10.0.0.0/8', 'nope']",
            'test.toml: server.trusted_networks[1]: expected a network such as "192.0.2.0/24"',
        ),
        (
            "[server]\ntrusted_networks = '10.0.0.0/8'",
            "test.toml: server.trusted_networks: expected a list",
        ),
        (
            "[local]\ncatch_all = 'yes'",
            'test.toml: local.catch_all: expected true or false, got "yes"',
        ),
        ("[local]\ndomains = ['a.test', 7]", "test.toml: local.domains[1]: expected a domain"),
        (
            "[limits]\nmax_size = true",
            "test.toml: limits.max_size: expected an integer of at least 1024 (bytes), got true",
        ),
        (
            "[limits]\nmax_recipients = 0",
            "test.toml: limits.max_recipients: expected an integer from 1 to 100000, got 0",
        ),
        ("[queue]\nretry = [60, 'x']", "test.toml: queue.retry[1]: expected an integer from 1"),
        (
            "[listeners.main]\naddress = '127.0.0.1:99999'",
            'test.toml: listeners.main.address: expected "HOST:PORT" with a port from 0 to 65535 '
            '(99999 is not one), got "127.0.0.1:99999"',
        ),
        ("[listeners.main]\naddress = '::1:25'", "test.toml: listeners.main.address: expected"),
        ("[listeners.main]\naddress = '127.0.0.1'", "test.toml: listeners.main.address: expected"),
        ("[[listener]]\nkind = 'lmtp'", 'test.toml: listener[0].kind: expected one of "smtp"'),
        ("[listeners]\nmain = 3", "test.toml: listeners.main: expected a table, got 3"),
        ("listener = 3", "test.toml: listener: expected [[listener]] tables, got 3"),
        ("[server]\n[server.x]\ny = 1", "test.toml: server.x: unknown section"),
        ("server = 3", "test.toml: server: expected a table, got 3"),
        (
            "[users]\nbob = '" + HASH + "'",
            'test.toml: users.bob: expected the key to be an address such as "alice@example.com"',
        ),
        (
            "[users]\n'bob@a.test' = 'plain-text'",
            'test.toml: users."bob@a.test": expected a password hash made by "slimta passwd"',
        ),
        (
            "[relay.http]\nurl = 'ftp://x'\n[relay]\ndefault = 'http'",
            "test.toml: relay.http.url: expected an http:// or https:// URL",
        ),
        (
            "[[route]]\ndomain = '*.x.test'\nrelay = 'carrier-pigeon'",
            "test.toml: route[0].relay: expected one of",
        ),
        (
            "[[route]]\ndomain = '**.x'\nrelay = 'mx'",
            "test.toml: route[0].domain: expected a domain",
        ),
        (
            "[relay.pipe]\ncommand = []\n[relay]\ndefault='pipe'",
            "test.toml: relay.pipe.command: expected a non-empty list",
        ),
        # required keys
        (
            "[policies.dkim]\nselector = 's'\ndomain = 'a.test'",
            "test.toml: policies.dkim.key_file: missing",
        ),
        ("[tls]\ncert = 'c.pem'", "test.toml: tls.key: missing; expected a path"),
        ("[[route]]\nrelay = 'mx'", "test.toml: route[0].domain: missing"),
        # checks across keys
        (
            "[listeners.sub]\nkind = 'submission'",
            'test.toml: listeners.sub.kind: "submission" needs a certificate: '
            "set tls.cert and tls.key",
        ),
        (
            "[relay]\ndefault = 'smarthost'",
            'test.toml: relay.smarthost.host: missing; relay.default uses the "smarthost" relay',
        ),
        (
            "[[route]]\ndomain = 'x.test'\nrelay = 'http'",
            'test.toml: relay.http.url: missing; a [[route]] uses the "http" relay',
        ),
        (
            "[relay.smarthost]\nhost = 'h.test'\nusername = 'me'",
            "test.toml: relay.smarthost.password: missing; username and password go together",
        ),
        (
            "[listeners.a]\naddress = '127.0.0.1:25'\n[listeners.b]\naddress = '127.0.0.1:25'",
            "test.toml: listeners.b.address: 127.0.0.1:25 is also the address of listener a",
        ),
        (
            "[users]\n'Bob@a.test' = '" + HASH + "'\n'bob@A.test' = '" + HASH + "'",
            'test.toml: users."bob@A.test": this user is listed twice',
        ),
        # the file itself
        ("[server\nx = 1", "test.toml: not valid TOML: "),
    ],
)
def test_each_problem_names_the_file_and_the_key(text: str, expected: str) -> None:
    lines = problems(text)
    assert any(line.startswith(expected) for line in lines), lines


def test_every_problem_is_reported_at_once() -> None:
    lines = problems("[server]\nhostnme = 'a'\nlog_level = 3\n[limits]\nmax_size = 'big'\n[foo]\n")
    assert len(lines) == 4
    assert all(line.startswith("test.toml: ") for line in lines)


def test_a_bad_value_is_reported_once_not_again_by_cross_checks() -> None:
    lines = problems("[tls]\ncert = 5\nkey = 'k.pem'\n[listeners.s]\nkind = 'smtps'")
    assert sum("tls.cert" in line for line in lines) == 1


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(CliError) as caught:
        load_file(tmp_path / "missing.toml")
    assert caught.value.status == EX_NOINPUT
    assert (
        caught.value.message
        == f"cannot read {tmp_path / 'missing.toml'}: No such file or directory"
    )
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"[server]\nhostname = '\xe9'\n")
    with pytest.raises(ConfigInvalid) as invalid:
        load_file(latin)
    (line,) = invalid.value.lines()
    assert line.startswith(f"{latin}: not UTF-8 text")


# --- values and defaults ---------------------------------------------------------


def test_the_embedded_default_is_the_empty_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    config = default_config()
    assert config.source == DEFAULT_SOURCE
    assert config.server.data_dir == tmp_path / "slimta-data"
    assert config.local.mail_dir == tmp_path / "slimta-data" / "mail"
    assert config.local.domains[0] == "localhost"
    assert config.local.domains[-1] == config.server.hostname
    ((listener),) = config.listeners
    assert (listener.kind, listener.address) == ("smtp", ("127.0.0.1", 2525))
    # Not an open relay: nothing trusted, no users to authenticate.
    assert config.server.trusted_networks == ()
    assert config.users == ()
    assert config.policies.received and config.policies.date and config.policies.message_id


def test_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "slimta.toml"
    path.parent.mkdir()
    path.write_text("[server]\ndata_dir = 'data'\n[relay.maildir]\npath = '/abs/out'\n")
    config = load_file(path)
    assert config.server.data_dir == tmp_path / "etc" / "data"
    assert config.local.mail_dir == tmp_path / "etc" / "data" / "mail"
    assert config.maildir.path == Path("/abs/out")


def test_listener_forms_and_default_addresses() -> None:
    config = load(
        "[[listener]]\naddress = '[::1]:25'\n"
        "[listeners.sub]\nkind = 'submission'\n[listeners.tls]\nkind = 'smtps'\n"
        "[tls]\ncert = 'c.pem'\nkey = 'k.pem'\n"
    )
    assert [(lst.name, lst.kind, lst.address) for lst in config.listeners] == [
        ("listener[0]", "smtp", ("::1", 25)),
        ("sub", "submission", ("127.0.0.1", 587)),
        ("tls", "smtps", ("127.0.0.1", 465)),
    ]
    assert config.listeners[0].display_address == "[::1]:25"
    assert config.tls.cert == Path("/base/c.pem")


def test_users_are_lower_case_and_routes_match_domains() -> None:
    config = load(
        f"[users]\n'Alice@Example.COM' = '{HASH}'\n"
        "[[route]]\ndomain = '*.Sub.test'\nrelay = 'lmtp'\n"
        "[[route]]\ndomain = 'x.test'\nrelay = 'mx'\n"
    )
    assert config.users == (("alice@example.com", HASH),)
    wildcard, exact = config.routes
    assert wildcard.matches("a.sub.test") and not wildcard.matches("sub.test")
    assert exact.matches("x.test") and not exact.matches("y.x.test")
    assert config.relays_used() == ["mx", "lmtp"]


def test_smarthost_password_never_in_repr() -> None:
    config = load("[relay.smarthost]\nhost = 'h.test'\nusername = 'me'\npassword = 'hunter2'")
    assert "hunter2" not in repr(config)


# --- schema, example and dataclasses stay together ------------------------------------


def test_dataclass_fields_are_the_schema_keys() -> None:
    for sec in SECTIONS:
        if sec.shape is Shape.MAPPING:
            continue
        fields = [f.name for f in dataclasses.fields(SECTION_CLASSES[sec.name])]
        fields = [name for name in fields if name != "name"]  # a listener's table name
        assert fields == list(sec.key_names), sec.name


def test_example_config_passes_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = tmp_path / "slimta.toml"
    example.write_text(render_example())
    config = load_file(example)
    build(config)
    assert main(["check-config", str(example)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{example}: ok\n")
    assert "relaying: nobody may relay" in out


def test_example_config_with_everything_uncommented_is_valid() -> None:
    # "#key = value" lines are settings; "# " lines are prose.
    text = re.sub(r"(?m)^#(?=[^ #\n])", "", render_example())
    config = load_text(text, "uncommented.toml", Path("/base"))
    assert config.dkim is not None and config.tls.enabled and config.users
    assert {lst.kind for lst in config.listeners} == {"smtp", "submission"}


def test_every_schema_key_appears_in_the_example() -> None:
    text = render_example()
    for sec in SECTIONS:
        header = f"[{sec.name}" if sec.shape is not Shape.ARRAY else f"[[{sec.name}]]"
        assert header in text, sec.name
        if sec.shape is Shape.MAPPING:
            continue
        for key in sec.keys:
            assert re.search(rf"(?m)^#?{key.name} = ", text), f"{sec.name}.{key.name}"
            assert key.doc.split()[0] in text


def test_example_config_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["example-config"]) == 0
    out = capsys.readouterr().out
    assert out == render_example()
    tomllib.loads(out)


# --- resources: files the configuration names ------------------------------------------


def test_build_reports_unusable_files_by_key(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigInvalid) as caught:
        build(
            load(
                f"[tls]\ncert = '{tmp_path}/bad.pem'\nkey = '{tmp_path}/bad.pem'\n"
                "[policies.dkim]\nselector = 's'\ndomain = 'a.test'\n"
                f"key_file = '{tmp_path}/nope'\n"
                "[relay]\ndefault = 'pipe'\n[relay.pipe]\ncommand = ['/no/such/program']\n"
            )
        )
    lines = caught.value.lines()
    assert lines[0].startswith(f"test.toml: tls.cert: cannot use {tmp_path}/bad.pem")
    assert any(
        line.startswith("test.toml: relay.pipe.command: program not found: /no/such/program")
        for line in lines
    )
    assert any(line.startswith("test.toml: policies.dkim.key_file: cannot read") for line in lines)


def test_check_config_command_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nhostnme = 'x'\n")
    assert main(["check-config", str(bad)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f'{bad}: server.hostnme: unknown key; did you mean "server.hostname"?',
        f"slimta: {bad}: 1 problem in the configuration",
    ]
    assert main(["check-config", str(tmp_path / "none.toml")]) == EX_NOINPUT
    assert main(["check-config"]) == EX_USAGE
    assert capsys.readouterr().err.splitlines()[-1].startswith("slimta: the following arguments")


# --- passwords ---------------------------------------------------------------------


class _Creds:
    """What ``handle_auth`` receives for ``AUTH PLAIN``."""

    def __new__(cls, user: str, password: str) -> Any:
        return Credentials(PlainCredentials(user, password, ""), b"PLAIN")


def test_passwd_hash_verifies_and_only_with_the_right_password() -> None:
    hashed = make_hash("correct horse")
    assert hashed.startswith("$scrypt$") and "correct" not in hashed
    assert make_hash("correct horse") != hashed  # salted
    config = load(f"[users]\n'alice@a.test' = '{hashed}'\n")
    access = build(config).access
    assert access.auth is not None
    assert access.auth.verify(_Creds("alice@a.test", "correct horse"))
    assert access.auth.verify(_Creds("ALICE@a.test", "correct horse"))
    assert not access.auth.verify(_Creds("alice@a.test", "wrong"))
    assert not access.auth.verify(_Creds("bob@a.test", "correct horse"))


def test_passwd_reads_twice_and_refuses_mismatches(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    with pytest.raises(CliError) as caught:
        read_password(from_stdin=False)
    assert (caught.value.message, caught.value.status) == ("the passwords do not match", EX_DATAERR)
    assert read_password(True, io.StringIO("pw\n")) == "pw"
    with pytest.raises(CliError):
        read_password(True, io.StringIO(""))
    with pytest.raises(CliError) as empty:
        make_hash("")
    assert empty.value.status == EX_DATAERR


def test_passwd_prints_a_users_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    out = io.StringIO()
    run_passwd("Bob@Example.com", True, out)
    line = out.getvalue().strip()
    assert line.startswith('"bob@example.com" = "$scrypt$')
    assert load(f"[users]\n{line}\n").users[0][0] == "bob@example.com"
    with pytest.raises(CliError):
        run_passwd("not an address", True, io.StringIO())


# --- the access rules ---------------------------------------------------------------


def access_for(text: str) -> Access:
    return build(load(text)).access


class _Session:
    def __init__(self, ip: str, auth: Any = None, security: str | None = None) -> None:
        self.address = (ip, 12345)
        self.auth = auth
        self.security = security
        self.ehlo_as = "client.test"


def reply_after(
    hook: str, session: _Session, runtime: Runtime, *args: Any, auth_required: bool = False
) -> str:
    validators = validators_for(runtime, auth_required)(session)
    reply = Reply("250", "2.0.0 Ok")
    getattr(validators, hook)(reply, *args)
    return f"{reply.code} {reply.message}"


def test_trust_and_mailboxes() -> None:
    access = access_for(
        "[server]\ntrusted_networks = ['192.0.2.0/24', '2001:db8::/32']\n"
        f"[local]\ndomains = ['a.test']\n[users]\n'alice@a.test' = '{HASH}'\n"
    )
    assert access.is_trusted("192.0.2.7") and access.is_trusted("::ffff:192.0.2.7")
    assert access.is_trusted("2001:db8::1")
    assert not access.is_trusted("198.51.100.1") and not access.is_trusted(None)
    assert access.is_local("x@A.TEST") and access.is_local("postmaster")
    assert not access.is_local("x@b.test") and not access.is_local("someone")
    assert access.has_mailbox("Alice@a.test") and access.has_mailbox("postmaster@a.test")
    assert not access.has_mailbox("bob@a.test")
    assert access_for("[local]\ndomains = ['a.test']").has_mailbox("anyone@a.test")


def test_relaying_rules_at_rcpt() -> None:
    runtime = Runtime(
        access_for("[server]\ntrusted_networks = ['10.0.0.0/8']\n[local]\ndomains = ['a.test']")
    )
    stranger, trusted = _Session("192.0.2.1"), _Session("10.1.2.3")
    authenticated = _Session("192.0.2.1", auth=("alice@a.test", None))
    assert (
        reply_after("handle_rcpt", stranger, runtime, "x@b.test", {}) == "550 5.7.1 Relaying denied"
    )
    assert reply_after("handle_rcpt", stranger, runtime, "x@a.test", {}).startswith("250")
    assert reply_after("handle_rcpt", trusted, runtime, "x@b.test", {}).startswith("250")
    assert reply_after("handle_rcpt", authenticated, runtime, "x@b.test", {}).startswith("250")


def test_submission_needs_tls_then_auth_before_mail() -> None:
    runtime = Runtime(access_for(""))
    plain, tls = _Session("192.0.2.1"), _Session("192.0.2.1", security="TLS")
    done = _Session("192.0.2.1", auth=("alice@a.test", None), security="TLS")

    def mail(session: _Session) -> str:
        return reply_after("handle_mail", session, runtime, "a@a.test", {}, auth_required=True)

    assert mail(plain) == "530 5.7.0 Must issue a STARTTLS command first"
    assert mail(tls) == "530 5.7.0 Authentication required"
    assert mail(done).startswith("250")


def test_connection_limits_at_the_banner() -> None:
    runtime = Runtime(
        access_for(
            "[server]\ntrusted_networks = ['10.0.0.0/8']\n"
            "[limits]\nmax_connections = 3\nmax_connections_per_ip = 1"
        )
    )
    counters = runtime.counters
    counters.opened("192.0.2.1")
    assert reply_after("handle_banner", _Session("192.0.2.1"), runtime, None).startswith("250")
    counters.opened("192.0.2.1")
    assert reply_after("handle_banner", _Session("192.0.2.1"), runtime, None).startswith(
        "421 4.7.0"
    )
    counters.opened("10.0.0.1")
    counters.opened("10.0.0.1")  # the trusted may open more, up to the total
    assert reply_after("handle_banner", _Session("10.0.0.1"), runtime, None) == (
        "421 4.7.0 Too many connections, try again later"
    )
    for ip in ("192.0.2.1", "192.0.2.1", "10.0.0.1", "10.0.0.1"):
        counters.closed(ip)
    assert counters.total == 0 and counters.connections("192.0.2.1") == 0


def test_message_rate_per_ip_over_a_minute() -> None:
    now = [1000.0]
    counters = Counters(clock=lambda: now[0])
    assert counters.allow_message("192.0.2.1", 2)
    assert counters.allow_message("192.0.2.1", 2)
    assert not counters.allow_message("192.0.2.1", 2)
    assert counters.allow_message("192.0.2.2", 2)
    now[0] += 60.0
    assert counters.allow_message("192.0.2.1", 2)


def test_rate_limit_spares_privileged_clients() -> None:
    runtime = Runtime(
        access_for(
            "[server]\ntrusted_networks = ['10.0.0.0/8']\n"
            "[limits]\nmax_messages_per_minute_per_ip = 1"
        )
    )
    for _ in range(3):
        assert reply_after("handle_mail", _Session("10.0.0.1"), runtime, "a@b.test", {}).startswith(
            "250"
        )
    assert reply_after("handle_mail", _Session("192.0.2.1"), runtime, "a@b.test", {}).startswith(
        "250"
    )
    assert reply_after("handle_mail", _Session("192.0.2.1"), runtime, "a@b.test", {}) == (
        "450 4.7.1 Too many messages from your address, try again later"
    )


def test_auth_without_users_always_fails() -> None:
    runtime = Runtime(access_for(""))
    assert reply_after(
        "handle_auth", _Session("192.0.2.1"), runtime, _Creds("a@b.test", "x")
    ).startswith("535")


# --- routes and retries ---------------------------------------------------------------


class _FakeRelay(Relay):
    def __init__(self, outcome: Any = None) -> None:
        super().__init__()
        self.outcome = outcome
        self.seen: list[list[str]] = []

    def attempt(self, envelope: Envelope, attempts: int) -> Any:
        self.seen.append(list(envelope.recipients))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_router_sends_each_recipient_through_its_relay() -> None:
    config = load(
        "[local]\ndomains = ['a.test']\n[[route]]\ndomain = '*.corp.test'\nrelay = 'lmtp'\n"
    )
    local, lmtp, default = (
        _FakeRelay(),
        _FakeRelay(Reply("250", "2.0.0 Ok")),
        _FakeRelay(TransientRelayError("down")),
    )
    access = build(config).access
    table = RouteTable(access.is_local, local, ((config.routes[0], lmtp),), default)
    assert table.relay_for("x@A.test") is local and table.relay_for("postmaster") is local
    assert table.relay_for("x@hq.corp.test") is lmtp and table.relay_for("x@b.test") is default
    router = Router(table)
    single = Envelope("s@a.test", ["x@hq.corp.test"])
    assert router.attempt(single, 0) == lmtp.outcome
    mixed = Envelope("s@a.test", ["x@a.test", "y@hq.corp.test", "z@b.test"])
    results = router.attempt(mixed, 0)
    assert isinstance(results, dict)
    assert results["x@a.test"] is None and results["y@hq.corp.test"] == lmtp.outcome
    assert isinstance(results["z@b.test"], TransientRelayError)
    assert local.seen == [["x@a.test"]] and default.seen == [["z@b.test"]]


def test_backoff_follows_the_retry_list_until_max_age() -> None:
    now = [10000.0]
    backoff = make_backoff([60, 300], 3600.0, clock=lambda: now[0])
    envelope = Envelope("s@a.test", ["r@b.test"])
    envelope.timestamp = now[0]
    assert [backoff(envelope, n) for n in (1, 2, 3, 9)] == [60.0, 300.0, 300.0, 300.0]
    now[0] += 3601.0
    assert backoff(envelope, 10) is None
    postfix = make_backoff([], 10 * 86400.0, clock=lambda: now[0])
    envelope.timestamp = now[0] - 6 * 86400.0  # older than Postfix's 5 days, within max_age
    assert postfix(envelope, 50) == 4000.0


# --- words --------------------------------------------------------------------------


def test_startup_lines_and_open_relay_warning() -> None:
    config = load("[server]\ntrusted_networks = ['0.0.0.0/0']\n[local]\ndomains = ['a.test']")
    lines = describe(config, {"smtp": False})
    assert lines[0] == 'listening on 127.0.0.1:2525 (listener "smtp", smtp: no TLS, no AUTH)'
    assert "relaying: only for authenticated clients and clients in 0.0.0.0/0" in lines
    (warning,) = warnings(config)
    assert warning.startswith("OPEN RELAY: server.trusted_networks contains 0.0.0.0/0")
    assert warnings(load("")) == []


def test_permanent_local_refusal_after_users_change() -> None:
    # A recipient accepted before a reload removed its user bounces with 5.1.1.
    built = build(load(f"[local]\ndomains = ['a.test']\n[users]\n'alice@a.test' = '{HASH}'"))
    local = built.table.local
    with pytest.raises(PermanentRelayError) as caught:
        local.mailbox_path("bob@a.test")  # type: ignore[attr-defined]
    assert caught.value.reply.code == "550" and "5.1.1" in str(caught.value.reply.message)


def test_each_relay_kind_is_built_from_its_section() -> None:
    from slimta.relay.http import HttpRelay
    from slimta.relay.maildir import MaildirRelay
    from slimta.relay.pipe import PipeRelay
    from slimta.relay.smtp.mx import MxSmtpRelay
    from slimta.relay.smtp.static import StaticLmtpRelay, StaticSmtpRelay

    config = load(
        "[relay]\ndefault = 'smarthost'\n"
        "[relay.smarthost]\nhost = 'smtp.example.net'\nport = 587\nusername = 'me'\n"
        "password = 'pw'\ntls = 'required'\n"
        "[relay.pipe]\ncommand = ['cat']\n[relay.http]\nurl = 'https://h.test/in'\n"
        + "".join(
            f"[[route]]\ndomain = '{kind}.test'\nrelay = '{kind}'\n"
            for kind in ("mx", "lmtp", "pipe", "maildir", "http")
        )
    )
    table = build(config).table
    smarthost = table.default
    assert isinstance(smarthost, StaticSmtpRelay) and not isinstance(smarthost, StaticLmtpRelay)
    assert (smarthost.host, smarthost.port) == ("smtp.example.net", 587)
    assert smarthost.client_kwargs["credentials"] == ("me", "pw")
    assert smarthost.client_kwargs["tls_required"] is True
    kinds = {route.relay: type(relay) for route, relay in table.routes}
    assert kinds == {
        "mx": MxSmtpRelay,
        "lmtp": StaticLmtpRelay,
        "pipe": PipeRelay,
        "maildir": MaildirRelay,
        "http": HttpRelay,
    }


def test_a_reload_keeps_relays_whose_section_did_not_change() -> None:
    first = build(load("[relay]\ndefault = 'lmtp'"))
    same = build(load("[relay]\ndefault = 'lmtp'\n[local]\ncatch_all = true"), previous=first)
    assert same.table.default is first.table.default
    assert same.table.local is first.table.local
    moved = build(load("[relay]\ndefault = 'lmtp'\n[relay.lmtp]\nport = 2424"), previous=first)
    assert moved.table.default is not first.table.default


class _Listed:
    """A DNS blocklist group that lists 192.0.2.66 on one zone."""

    def get(self, ip: str, timeout: float | None = None) -> set[str]:
        return {"bl.example"} if ip == "192.0.2.66" else set()


class _Spf:
    """SPF answers by client address."""

    results = {"192.0.2.1": ("fail", "not allowed"), "192.0.2.2": ("temperror", "DNS timeout")}

    def query(self, sender: str, ip: str, ehlo_as: str | None) -> tuple[str, str]:
        return self.results.get(ip, ("pass", "ok"))


def test_dnsbl_and_spf_refuse_strangers_at_mail() -> None:
    access = access_for("[local]\ndomains = ['a.test']")
    access.spf, access.dnsbl = _Spf(), _Listed()  # type: ignore[assignment]
    runtime = Runtime(access)

    def mail(session: _Session) -> str:
        return reply_after("handle_mail", session, runtime, "s@b.test", {})

    assert mail(_Session("192.0.2.66")) == (
        "554 5.7.1 Service unavailable; [192.0.2.66] is listed on bl.example"
    )
    assert mail(_Session("192.0.2.1")) == "550 5.7.23 SPF validation failed: not allowed"
    assert mail(_Session("192.0.2.2")) == "451 4.7.24 SPF validation error: DNS timeout"
    assert mail(_Session("192.0.2.3")).startswith("250")
    # Authenticated and trusted clients are not checked.
    assert mail(_Session("192.0.2.66", auth=("alice@a.test", None))).startswith("250")
    runtime.access.spf = runtime.access.dnsbl = None
    assert mail(_Session("192.0.2.66")).startswith("250")
