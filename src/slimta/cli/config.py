"""Reading a TOML configuration file into frozen dataclasses.

:func:`load_file` and :func:`load_text` check every key against
:data:`slimta.cli.schema.SECTIONS` and collect *every* problem before
raising :class:`~slimta.cli.errors.ConfigInvalid`, each problem naming the
key: ``FILE: key.path: expected <what>, got <value>``. Unknown keys are
problems too, with a "did you mean" when a known key is close.

The embedded default, what ``slimta serve`` runs without ``--config``, is
the empty file: :func:`default_config`.

Relative paths are taken relative to the configuration file's directory
(the current directory for the embedded default), so a file means the same
wherever the server is started from.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from slimta.cli.errors import EX_NOINPUT, CliError, ConfigInvalid, Problem
from slimta.cli.schema import (
    DEFAULT_ADDRESSES,
    SECTIONS,
    Key,
    ListOf,
    Mismatch,
    Section,
    Shape,
    child_sections,
    section,
    toml_value,
)

__all__ = [
    "DEFAULT_SOURCE",
    "Config",
    "DkimConfig",
    "HttpConfig",
    "LimitsConfig",
    "ListenerConfig",
    "LmtpConfig",
    "LocalConfig",
    "MaildirConfig",
    "MxConfig",
    "PipeConfig",
    "PoliciesConfig",
    "QueueConfig",
    "RelayConfig",
    "RouteConfig",
    "ServerConfig",
    "SmarthostConfig",
    "TlsConfig",
    "default_config",
    "load_file",
    "load_text",
]

#: What error lines call the embedded default.
DEFAULT_SOURCE = "<embedded default>"

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- the configuration ---------------------------------------------------------
# Field names are the schema's key names (a unit test holds them together).


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str
    data_dir: Path
    log_level: str
    log_format: str
    user: str | None
    group: str | None
    trusted_networks: tuple[IPNetwork, ...]
    shutdown_grace: float
    #: Worker processes (``"auto"`` is resolved when the file is read).
    workers: int


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    #: ``main`` for ``[listeners.main]``, ``listener[0]`` for the first ``[[listener]]``.
    name: str
    kind: str
    address: tuple[str, int]

    @property
    def display_address(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path | None
    key: Path | None
    min_version: str

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True, slots=True)
class LocalConfig:
    domains: tuple[str, ...]
    mail_dir: Path
    catch_all: bool


@dataclass(frozen=True, slots=True)
class RelayConfig:
    default: str


@dataclass(frozen=True, slots=True)
class MxConfig:
    tls_verify: bool
    mta_sts: bool


@dataclass(frozen=True, slots=True)
class SmarthostConfig:
    host: str | None
    port: int
    username: str | None
    password: str | None = None
    tls: str = "opportunistic"
    tls_verify: bool = True

    def __repr__(self) -> str:
        # Never show the password, should the object reach a log.
        hidden = "None" if self.password is None else "'***'"
        return (
            f"SmarthostConfig(host={self.host!r}, port={self.port}, "
            f"username={self.username!r}, password={hidden}, tls={self.tls!r}, "
            f"tls_verify={self.tls_verify})"
        )


@dataclass(frozen=True, slots=True)
class LmtpConfig:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class PipeConfig:
    command: tuple[str, ...] | None
    timeout: float


@dataclass(frozen=True, slots=True)
class MaildirConfig:
    path: Path


@dataclass(frozen=True, slots=True)
class HttpConfig:
    url: str | None
    timeout: float


@dataclass(frozen=True, slots=True)
class RouteConfig:
    domain: str
    relay: str

    def matches(self, domain: str) -> bool:
        """True when this route is for *domain* (lower case)."""
        if self.domain.startswith("*."):
            return domain.endswith(self.domain[1:])
        return domain == self.domain


@dataclass(frozen=True, slots=True)
class PoliciesConfig:
    received: bool
    date: bool
    message_id: bool
    authentication_results: bool
    spf: str
    dnsbl: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DkimConfig:
    selector: str
    domain: str
    key_file: Path
    algorithm: str


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    max_messages_per_minute_per_ip: int
    command_timeout: float
    data_timeout: float


@dataclass(frozen=True, slots=True)
class QueueConfig:
    retry: tuple[int, ...]
    max_age: float


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, checked configuration."""

    #: The file it came from, as given, or :data:`DEFAULT_SOURCE`.
    source: str
    server: ServerConfig
    listeners: tuple[ListenerConfig, ...]
    tls: TlsConfig
    local: LocalConfig
    #: ``(address, hash)`` pairs, addresses in lower case, sorted.
    users: tuple[tuple[str, str], ...]
    relay: RelayConfig
    mx: MxConfig
    smarthost: SmarthostConfig
    lmtp: LmtpConfig
    pipe: PipeConfig
    maildir: MaildirConfig
    http: HttpConfig
    routes: tuple[RouteConfig, ...]
    policies: PoliciesConfig
    #: ``None`` when ``[policies.dkim]`` is absent.
    dkim: DkimConfig | None
    limits: LimitsConfig
    queue: QueueConfig

    def relays_used(self) -> list[str]:
        """The relay kinds the default and the routes name, default first."""
        kinds = [self.relay.default]
        for route in self.routes:
            if route.relay not in kinds:
                kinds.append(route.relay)
        return kinds


#: Section name -> its dataclass, for the test that holds them to the schema.
SECTION_CLASSES: dict[str, type] = {
    "server": ServerConfig,
    "listeners": ListenerConfig,
    "tls": TlsConfig,
    "local": LocalConfig,
    "relay": RelayConfig,
    "relay.mx": MxConfig,
    "relay.smarthost": SmarthostConfig,
    "relay.lmtp": LmtpConfig,
    "relay.pipe": PipeConfig,
    "relay.maildir": MaildirConfig,
    "relay.http": HttpConfig,
    "route": RouteConfig,
    "policies": PoliciesConfig,
    "policies.dkim": DkimConfig,
    "limits": LimitsConfig,
    "queue": QueueConfig,
}


# --- loading ------------------------------------------------------------------------


def load_file(path: str | os.PathLike[str]) -> Config:
    """Read and check the configuration file *path*.

    :raises CliError: the file cannot be read (``EX_NOINPUT``).
    :raises ConfigInvalid: it is not valid (``EX_CONFIG``), with every problem.
    """
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}", EX_NOINPUT) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigInvalid(name, [Problem("", f"not UTF-8 text ({exc.reason})")]) from None
    return load_text(text, name, Path(name).resolve().parent)


def load_text(text: str, source: str, base: Path | None = None) -> Config:
    """Check the TOML *text*; *source* names it in problems, *base* is the
    directory relative paths start from (default: the current directory).

    :raises ConfigInvalid: with every problem found.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigInvalid(source, [Problem("", f"not valid TOML: {exc}")]) from None
    loader = _Loader(base if base is not None else Path.cwd())
    config = loader.load(document, source)
    if loader.problems:
        raise ConfigInvalid(source, loader.problems)
    return config


def default_config() -> Config:
    """The embedded default: the empty file, paths relative to the current directory."""
    return load_text("", DEFAULT_SOURCE)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: str, name: str) -> str:
    """*path* extended by the key *name*, quoted as TOML would need it."""
    part = name if _BARE_KEY.fullmatch(name) else toml_value(name)
    return f"{path}.{part}" if path else part


def _got(value: object) -> str:
    text = toml_value(value)
    if isinstance(value, dict):
        text = "a table"
    return text if len(text) <= 60 else text[:57] + "..."


class _Loader:
    """One loading: the problems found so far, and the base directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.problems: list[Problem] = []

    def problem(self, path: str, message: str) -> None:
        # One problem per key: a value that did not parse is replaced by its
        # default, and checks across keys must not complain about that again.
        if all(known.path != path for known in self.problems):
            self.problems.append(Problem(path, message))

    def expected(self, path: str, what: str, value: object) -> None:
        self.problem(path, f"expected {what}, got {_got(value)}")

    # -- generic ---------------------------------------------------------------

    def unknown(self, path: str, name: str, known: list[str], table: bool = False) -> None:
        where = _join(path, name)
        what = "unknown section" if table else "unknown key"
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if not close:
            # A key put in the wrong section: name the section it belongs to.
            homes = [
                sec.name
                for sec in SECTIONS
                if sec.shape is not Shape.MAPPING and name in sec.key_names
            ]
            if homes:
                self.problem(where, f'{what}; did you mean "{homes[0]}.{name}"?')
                return
            self.problem(where, what)
            return
        self.problem(where, f'{what}; did you mean "{_join(path, close[0])}"?')

    def table(self, value: object, path: str) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.expected(path, "a table", value)
            return None
        return value

    def values(
        self, sec: Section, data: Mapping[str, Any], path: str, present: bool = True
    ) -> dict[str, Any]:
        """Every key of *sec* parsed from *data*, defaults filled in; unknown
        keys (other than nested sections) reported, and missing required keys
        when the section is *present*."""
        nested = {child.name.rpartition(".")[2] for child in child_sections(sec.name)}
        out: dict[str, Any] = {}
        for name, value in data.items():
            key = sec.key(name)
            if key is None:
                if name not in nested:
                    self.unknown(path, name, [*sec.key_names, *nested], isinstance(value, dict))
                continue
            parsed = self.parse(key, value, _join(path, name))
            if parsed is not _INVALID:
                out[name] = parsed
        for key in sec.keys:
            if key.name not in out:
                if key.required and present and key.name not in data:
                    self.problem(_join(path, key.name), f"missing; expected {key.kind.what}")
                # Defaults go through the kind too: a relative default path
                # becomes absolute like any other.
                default = key.default
                if default is not None:
                    default = self.parse(key, default, _join(path, key.name))
                out[key.name] = default
        return out

    def parse(self, key: Key, value: object, path: str) -> object:
        kind = key.kind
        try:
            parsed = kind.parse(value, self.base)
        except Mismatch as exc:
            self.expected(path, exc.what or kind.what, value)
            return _INVALID
        if isinstance(kind, ListOf):
            assert isinstance(parsed, list)
            items = []
            for index, item in enumerate(parsed):
                try:
                    items.append(kind.item.parse(item, self.base))
                except Mismatch as exc:
                    self.expected(f"{path}[{index}]", exc.what or kind.item.what, item)
            if len(items) != len(parsed):
                return _INVALID
            return tuple(items)
        return parsed

    # -- the document ------------------------------------------------------------

    def load(self, doc: dict[str, Any], source: str) -> Config:
        roots = sorted(
            {sec.name.partition(".")[0] for sec in SECTIONS}
            | {alias for sec in SECTIONS for alias in sec.aliases}
        )
        for name in doc:
            if name not in roots:
                self.unknown("", name, roots, isinstance(doc[name], dict))

        def single(name: str) -> dict[str, Any]:
            sec = section(name)
            head, _, tail = name.partition(".")
            data = self.table(doc.get(head), head)
            present = head in doc
            if data is not None and tail:
                present = tail in data
                data = self.table(data.get(tail), name)
            return self.values(sec, data or {}, name, present)

        server = single("server")
        data_dir = server["data_dir"]
        if server["hostname"] is None:
            server["hostname"] = _fqdn()
        tls = single("tls")
        local = single("local")
        if local["domains"] is None:
            local["domains"] = tuple(dict.fromkeys(["localhost", server["hostname"]]))
        if local["mail_dir"] is None:
            local["mail_dir"] = data_dir / "mail"
        maildir = single("relay.maildir")
        if maildir["path"] is None:
            maildir["path"] = local["mail_dir"]
        dkim = single("policies.dkim")
        listeners = self.listeners(doc)
        users = self.users(doc.get("users"))
        routes = self.routes(doc.get("route"))

        config = Config(
            source=source,
            server=ServerConfig(**server),
            listeners=listeners,
            tls=TlsConfig(**tls),
            local=LocalConfig(**local),
            users=users,
            relay=RelayConfig(**single("relay")),
            mx=MxConfig(**single("relay.mx")),
            smarthost=SmarthostConfig(**single("relay.smarthost")),
            lmtp=LmtpConfig(**single("relay.lmtp")),
            pipe=PipeConfig(**single("relay.pipe")),
            maildir=MaildirConfig(**maildir),
            http=HttpConfig(**single("relay.http")),
            routes=routes,
            policies=PoliciesConfig(**single("policies")),
            dkim=DkimConfig(**dkim) if None not in dkim.values() else None,
            limits=LimitsConfig(**single("limits")),
            queue=QueueConfig(**single("queue")),
        )
        self.cross_check(config, doc)
        return config

    def listeners(self, doc: dict[str, Any]) -> tuple[ListenerConfig, ...]:
        sec = section("listeners")
        entries: list[tuple[str, str, dict[str, Any]]] = []
        array = doc.get("listener")
        if array is not None:
            if not isinstance(array, list) or not all(isinstance(e, dict) for e in array):
                self.expected("listener", "[[listener]] tables", array)
            else:
                entries += [(f"listener[{i}]", f"listener[{i}]", e) for i, e in enumerate(array)]
        named = self.table(doc.get("listeners"), "listeners")
        for name, entry in (named or {}).items():
            path = _join("listeners", name)
            data = self.table(entry, path)
            if data is not None:
                entries.append((name, path, data))
        out = []
        for name, path, data in entries:
            values = self.values(sec, data, path)
            if values["address"] is None:
                values["address"] = DEFAULT_ADDRESSES.get(values["kind"], DEFAULT_ADDRESSES["smtp"])
            out.append(ListenerConfig(name=name, **values))
        if not out:
            out.append(ListenerConfig("smtp", "smtp", DEFAULT_ADDRESSES["smtp"]))
        return tuple(out)

    def users(self, value: object) -> tuple[tuple[str, str], ...]:
        sec = section("users")
        data = self.table(value, "users")
        assert sec.key_kind is not None
        found: dict[str, str] = {}
        for name, hashed in (data or {}).items():
            path = _join("users", name)
            try:
                address = sec.key_kind.parse(name, self.base)
            except Mismatch:
                self.problem(path, f"expected the key to be {sec.key_kind.what}")
                continue
            parsed = self.parse(sec.keys[0], hashed, path)
            if parsed is _INVALID:
                continue
            assert isinstance(address, str) and isinstance(parsed, str)
            if address in found:
                self.problem(path, "this user is listed twice (addresses ignore case)")
            found[address] = parsed
        return tuple(sorted(found.items()))

    def routes(self, value: object) -> tuple[RouteConfig, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
            self.expected("route", "[[route]] tables", value)
            return ()
        sec = section("route")
        out = []
        for index, entry in enumerate(value):
            values = self.values(sec, entry, f"route[{index}]")
            if None not in values.values():
                out.append(RouteConfig(**values))
        return tuple(out)

    # -- what single keys cannot say ---------------------------------------------

    def cross_check(self, config: Config, doc: dict[str, Any]) -> None:
        tls = config.tls
        # A [tls] key with a wrong value is reported already.
        tls_reported = any(problem.path.startswith("tls.") for problem in self.problems)
        seen: dict[tuple[str, int], str] = {}
        for listener in config.listeners:
            path = _listener_path(listener)
            if listener.kind != "smtp" and not tls.enabled and not tls_reported:
                self.problem(
                    f"{path}.kind",
                    f'"{listener.kind}" needs a certificate: set tls.cert and tls.key',
                )
            other = seen.get(listener.address)
            if other is not None and listener.address[1] != 0:
                self.problem(
                    f"{path}.address",
                    f"{listener.display_address} is also the address of listener {other}",
                )
            seen[listener.address] = listener.name
        for kind in config.relays_used():
            self.check_relay(config, kind, doc)
        smarthost = config.smarthost
        if (smarthost.username is None) != (smarthost.password is None):
            missing = "username" if smarthost.username is None else "password"
            self.problem(f"relay.smarthost.{missing}", "missing; username and password go together")

    def check_relay(self, config: Config, kind: str, doc: dict[str, Any]) -> None:
        relay = doc.get("relay")
        present = isinstance(relay, dict) and kind in relay
        needs = {"smarthost": "host", "pipe": "command", "http": "url"}
        key = needs.get(kind)
        if key is not None and not present:
            users = "relay.default" if config.relay.default == kind else "a [[route]]"
            self.problem(
                f"relay.{kind}.{key}",
                f'missing; {users} uses the "{kind}" relay, which needs [relay.{kind}] {key}',
            )


def _listener_path(listener: ListenerConfig) -> str:
    if listener.name.startswith("listener["):
        return listener.name
    return _join("listeners", listener.name)


class _Invalid:
    """Marks a value that did not parse (its problem is recorded)."""


_INVALID = _Invalid()


_fqdn_cache: list[str] = []


def _fqdn() -> str:
    """This host's fully qualified name, looked up once."""
    if not _fqdn_cache:
        name = socket.getfqdn().rstrip(".").lower()
        _fqdn_cache.append(name or "localhost")
    return _fqdn_cache[0]
