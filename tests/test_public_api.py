"""Pins the public surface against the 4.0 compatibility spec (spec/api.md).

Each public module must list at least the names the spec gives it in
``__all__``, and each of those names must be importable from it. Modules may
export more (compatible additions) but never less. The constructors 4.0
scripts call positionally keep their 4.0 positional parameters, in order and
with their defaults; options added since are keyword-only.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

#: Module -> the names the spec lists for its ``__all__`` (spec section in brackets).
SPEC_ALL: dict[str, set[str]] = {
    # [1]
    "slimta.core": {"SlimtaError"},
    # [2]
    "slimta.envelope": {"Envelope"},
    # [4.1]
    "slimta.smtp": {"SmtpError", "ConnectionLost", "MessageTooBig", "BadReply"},
    # [4.2]
    "slimta.smtp.reply": {
        "Reply",
        "unknown_command",
        "unknown_parameter",
        "bad_sequence",
        "bad_arguments",
        "unhandled_error",
        "tls_failure",
        "connection_failed",
        "timed_out",
        "invalid_credentials",
    },
    # [4.3]
    "slimta.smtp.extensions": {"Extensions"},
    # [4.4]
    "slimta.smtp.io": {"IO"},
    # [4.8]
    "slimta.smtp.server": {"Server"},
    # [5.1]
    "slimta.edge": {"Edge", "EdgeServer"},
    # [5.2]
    "slimta.edge.smtp": {"SmtpEdge", "SmtpValidators"},
    # [13.1]
    "slimta.logging": {
        "getSocketLogger",
        "getSubprocessLogger",
        "getQueueStorageLogger",
        "getHttpLogger",
        "log_exception",
        "logline",
        "parseline",
    },
    "slimta.logging.socket": {"SocketLogger", "socket_error_log_level"},
    "slimta.logging.subprocess": {"SubprocessLogger"},
    "slimta.logging.queuestorage": {"QueueStorageLogger"},
    "slimta.logging.http": {"HttpLogger"},
    # [9]
    "slimta.util": {"build_ipv4_socket_creator", "create_connection_ipv4"},
    # [10]
    "slimta.util.system": {"daemonize", "redirect_stdio", "drop_privileges", "PidFile"},
    # [12.2]
    "slimta.util.proxyproto": {
        "ProxyProtocol",
        "ProxyProtocolV1",
        "ProxyProtocolV2",
        "unknown_pp_source_address",
        "unknown_pp_dest_address",
        "invalid_pp_source_address",
        "invalid_pp_dest_address",
    },
    # [4.7]
    "slimta.smtp.auth": {"ServerAuthError", "AuthSession"},
    # [3]
    "slimta.bounce": {"Bounce"},
    # [6]
    "slimta.queue": {"Queue", "QueueStorage", "QueueError"},
    "slimta.queue.dict": {"DictStorage"},
    "slimta.queue.proxy": {"ProxyQueue"},
    # [4.6], [4.9]
    "slimta.smtp.datasender": {"DataSender"},
    "slimta.smtp.datareader": {"DataReader"},
    "slimta.smtp.client": {"Client", "LmtpClient"},
    # [7]
    "slimta.relay": {"PermanentRelayError", "TransientRelayError", "Relay"},
    "slimta.relay.pool": {"RelayPool", "RelayPoolClient"},
    "slimta.relay.smtp": {"SmtpRelayError", "SmtpTransientRelayError", "SmtpPermanentRelayError"},
    "slimta.relay.smtp.client": {"SmtpRelayClient"},
    "slimta.relay.smtp.lmtpclient": {"LmtpRelayClient"},
    "slimta.relay.smtp.static": {"StaticSmtpRelay", "StaticLmtpRelay"},
    "slimta.relay.smtp.mx": {"MxSmtpRelay", "NoDomainError"},
    "slimta.relay.blackhole": {"BlackholeRelay"},
    "slimta.relay.pipe": {"PipeRelay", "MaildropRelay", "DovecotLdaRelay"},
    "slimta.relay.http": {"HttpRelay"},
    # new in this rewrite
    "slimta.relay.maildir": {"MaildirRelay"},
    # [5.3]
    "slimta.edge.wsgi": {"WsgiEdge", "WsgiValidators", "WsgiResponse"},
    # [13.2]
    "slimta.http": {"HTTPConnection", "HTTPSConnection", "get_connection"},
    "slimta.http.wsgi": {"WsgiServer"},
    # [8]
    "slimta.policy": {"PolicyError", "QueuePolicy", "RelayPolicy"},
    "slimta.policy.headers": {"AddDateHeader", "AddMessageIdHeader", "AddReceivedHeader"},
    "slimta.policy.forward": {"Forward"},
    "slimta.policy.split": {"RecipientSplit", "RecipientDomainSplit"},
    "slimta.policy.spamassassin": {"SpamAssassin", "SpamAssassinError"},
    # an addition of this rewrite
    "slimta.policy.dkim": {"DkimSign", "DEFAULT_SIGNED_HEADERS"},
    "slimta.policy.authres": {"AddAuthenticationResults"},
    # python-slimta-lookup 0.3.1
    "slimta.lookup.drivers": {
        "LookupBase",
        "DictLookup",
        "RegexLookup",
        "RedisLookup",
        "DBAPI2Lookup",
        "SQLite3Lookup",
    },
    "slimta.lookup.policy": {"LookupPolicy"},
    "slimta.lookup.auth": {"LookupAuth"},
    # [14]
    "slimta.diskstorage": {"DiskStorage"},
    "slimta.redisstorage": {"RedisStorage"},
    "slimta.celeryqueue": {"CeleryQueue"},
    # [11], [12.1]
    "slimta.util.dns": {"DNSError", "DNSResolver"},
    "slimta.util.ptrlookup": {"PtrLookup"},
    # [12.5]
    "slimta.util.dnsbl": {"DnsBlocklist", "DnsBlocklistGroup", "check_dnsbl"},
    # python-slimta-spf 0.2.0, in the core since 5.0
    "slimta.util.spf": {"EnforceSpf"},
    "slimta.spf": {"EnforceSpf"},
    # [12.3]
    "slimta.util.bytesformat": {"BytesFormat"},
    # [12.4]
    "slimta.util.deque": {"BlockingDeque"},
    # [12.6]
    "slimta.util.pycompat": {"PY2", "PY3", "urlparse", "httplib", "reprlib"},
}


@pytest.mark.parametrize("module_name", sorted(SPEC_ALL))
def test_all_lists_spec_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module_name} has no __all__"
    missing = SPEC_ALL[module_name] - set(exported)
    assert not missing, f"{module_name}.__all__ lacks {sorted(missing)}"


@pytest.mark.parametrize("module_name", sorted(SPEC_ALL))
def test_all_names_importable(module_name: str) -> None:
    module = importlib.import_module(module_name)
    # ``from module import name`` is getattr() on the imported module.
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names missing objects {missing}"


def test_version_is_a_string() -> None:
    import slimta.core

    assert isinstance(slimta.core.__version__, str)
    assert slimta.core.__version__


def test_exception_tree() -> None:
    from slimta.core import SlimtaError
    from slimta.smtp import BadReply, ConnectionLost, MessageTooBig, SmtpError

    assert issubclass(SmtpError, SlimtaError)
    for cls in (ConnectionLost, MessageTooBig, BadReply):
        assert issubclass(cls, SmtpError)


_EMPTY = inspect.Parameter.empty

#: ``(module, qualified name) -> [(parameter, default), ...]``: the 4.0
#: positional parameters after ``self``, in order; ``_EMPTY`` when required.
SPEC_SIGNATURES: dict[tuple[str, str], list[tuple[str, Any]]] = {
    # [5.2]
    ("slimta.edge.smtp", "SmtpEdge.__init__"): [
        ("listener", _EMPTY),
        ("queue", _EMPTY),
        ("pool", None),
        ("max_size", None),
        ("validator_class", None),
        ("auth", False),
        ("context", None),
        ("tls_immediately", False),
        ("command_timeout", None),
        ("data_timeout", None),
        ("hostname", None),
    ],
    # [4.8]
    ("slimta.smtp.server", "Server.__init__"): [
        ("socket", _EMPTY),
        ("handlers", _EMPTY),
        ("auth", False),
        ("context", None),
        ("tls_immediately", False),
        ("command_timeout", None),
        ("data_timeout", None),
    ],
    # [2]
    ("slimta.envelope", "Envelope.__init__"): [
        ("sender", None),
        ("recipients", None),
        ("headers", None),
        ("message", None),
    ],
    # [5.1]
    ("slimta.edge", "Edge.__init__"): [("queue", _EMPTY), ("hostname", None)],
    ("slimta.edge", "EdgeServer.__init__"): [
        ("listener", _EMPTY),
        ("queue", _EMPTY),
        ("pool", None),
        ("hostname", None),
    ],
    # [4.2]
    ("slimta.smtp.reply", "Reply.__init__"): [
        ("code", None),
        ("message", None),
        ("command", None),
        ("address", None),
    ],
    # [4.4]
    ("slimta.smtp.io", "IO.__init__"): [("socket", _EMPTY), ("address", None)],
    # [7.5]
    ("slimta.relay.smtp.mx", "MxSmtpRelay.__init__"): [("context", None)],
    # [14]
    ("slimta.redisstorage", "RedisStorage.__init__"): [
        ("host", "localhost"),
        ("port", 6379),
        ("db", 0),
        ("password", None),
        ("socket_timeout", None),
        ("prefix", "slimta:"),
    ],
    ("slimta.celeryqueue", "CeleryQueue.__init__"): [
        ("celery", _EMPTY),
        ("relay", _EMPTY),
        ("suffix", None),
        ("backoff", None),
        ("bounce_factory", None),
    ],
    # [7.6]
    ("slimta.relay.pipe", "PipeRelay.__init__"): [("args", _EMPTY), ("timeout", None)],
    ("slimta.relay.pipe", "MaildropRelay.__init__"): [
        ("path", None),
        ("timeout", None),
        ("extra_args", None),
    ],
    ("slimta.relay.pipe", "DovecotLdaRelay.__init__"): [
        ("path", None),
        ("timeout", None),
        ("extra_args", None),
    ],
    # [7.7]
    ("slimta.relay.http", "HttpRelay.__init__"): [
        ("url", _EMPTY),
        ("pool_size", None),
        ("context", None),
        ("ehlo_as", None),
        ("timeout", None),
        ("idle_timeout", None),
    ],
    # [5.3]
    ("slimta.edge.wsgi", "WsgiEdge.__init__"): [
        ("queue", _EMPTY),
        ("hostname", None),
        ("validator_class", None),
        ("uri_pattern", None),
    ],
    ("slimta.edge.wsgi", "WsgiResponse.__init__"): [
        ("status", _EMPTY),
        ("headers", None),
        ("data", None),
    ],
    ("slimta.relay.smtp.mx", "MxSmtpRelay.force_mx"): [
        ("domain", _EMPTY),
        ("destination", _EMPTY),
        ("port", 25),
    ],
}


def _resolve(module_name: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(("module_name", "qualname"), sorted(SPEC_SIGNATURES))
def test_positional_parameters_kept(module_name: str, qualname: str) -> None:
    func = _resolve(module_name, qualname)
    params = list(inspect.signature(func).parameters.values())
    assert params and params[0].name == "self"
    positional = [
        (p.name, p.default)
        for p in params[1:]
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    # Exactly the 4.0 list: a new positional parameter, even appended at the
    # end, must be keyword-only instead.
    assert positional == SPEC_SIGNATURES[(module_name, qualname)]
    assert not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


#: Every name the package layout of python-slimta 4.0 lists (spec section 0),
#: by its 4.0 module path: a 4.0 script's ``from <module> import <name>``.
LAYOUT_4_0: dict[str, tuple[str, ...]] = {
    "slimta.core": ("SlimtaError", "__version__"),
    "slimta.envelope": ("Envelope",),
    "slimta.bounce": ("Bounce",),
    "slimta.edge": ("Edge", "EdgeServer"),
    "slimta.edge.smtp": ("SmtpEdge", "SmtpValidators"),
    "slimta.edge.wsgi": ("WsgiEdge", "WsgiValidators", "WsgiResponse"),
    "slimta.smtp": ("SmtpError", "ConnectionLost", "MessageTooBig", "BadReply"),
    "slimta.smtp.reply": ("Reply",),
    "slimta.smtp.server": ("Server",),
    "slimta.smtp.client": ("Client", "LmtpClient"),
    "slimta.smtp.auth": ("AuthSession", "ServerAuthError"),
    "slimta.smtp.extensions": ("Extensions",),
    "slimta.smtp.datareader": ("DataReader",),
    "slimta.smtp.datasender": ("DataSender",),
    "slimta.smtp.io": ("IO",),
    "slimta.queue": ("Queue", "QueueStorage", "QueueError"),
    "slimta.queue.dict": ("DictStorage",),
    "slimta.queue.proxy": ("ProxyQueue",),
    "slimta.relay": ("Relay", "RelayError", "PermanentRelayError", "TransientRelayError"),
    "slimta.relay.pool": ("RelayPool", "RelayPoolClient"),
    "slimta.relay.blackhole": ("BlackholeRelay",),
    "slimta.relay.pipe": ("PipeRelay", "MaildropRelay", "DovecotLdaRelay"),
    "slimta.relay.http": ("HttpRelay",),
    "slimta.relay.smtp": ("SmtpRelayError", "SmtpTransientRelayError", "SmtpPermanentRelayError"),
    "slimta.relay.smtp.client": ("SmtpRelayClient",),
    "slimta.relay.smtp.lmtpclient": ("LmtpRelayClient",),
    "slimta.relay.smtp.static": ("StaticSmtpRelay", "StaticLmtpRelay"),
    "slimta.relay.smtp.mx": ("MxSmtpRelay", "NoDomainError"),
    "slimta.policy": ("PolicyError", "QueuePolicy", "RelayPolicy"),
    "slimta.policy.headers": ("AddDateHeader", "AddMessageIdHeader", "AddReceivedHeader"),
    "slimta.policy.forward": ("Forward",),
    "slimta.policy.split": ("RecipientSplit", "RecipientDomainSplit"),
    "slimta.policy.spamassassin": ("SpamAssassin", "SpamAssassinError"),
    "slimta.http": ("HTTPConnection", "HTTPSConnection", "get_connection"),
    "slimta.http.wsgi": ("WsgiServer",),
    "slimta.logging": (
        "getSocketLogger",
        "getSubprocessLogger",
        "getQueueStorageLogger",
        "getHttpLogger",
        "log_exception",
        "logline",
        "parseline",
    ),
    "slimta.logging.socket": ("SocketLogger", "socket_error_log_level"),
    "slimta.logging.subprocess": ("SubprocessLogger",),
    "slimta.logging.queuestorage": ("QueueStorageLogger",),
    "slimta.logging.http": ("HttpLogger",),
    "slimta.util": ("build_ipv4_socket_creator", "create_connection_ipv4"),
    "slimta.util.system": ("daemonize", "redirect_stdio", "drop_privileges", "PidFile"),
    "slimta.util.dns": ("DNSResolver", "DNSError"),
    "slimta.util.dnsbl": ("DnsBlocklist", "DnsBlocklistGroup", "check_dnsbl"),
    "slimta.util.ptrlookup": ("PtrLookup",),
    "slimta.util.proxyproto": ("ProxyProtocol", "ProxyProtocolV1", "ProxyProtocolV2"),
    "slimta.util.bytesformat": ("BytesFormat",),
    "slimta.util.deque": ("BlockingDeque",),
    "slimta.util.pycompat": ("PY2", "PY3", "urlparse", "httplib", "reprlib"),
}


def test_layout_counts_every_name_once() -> None:
    names = [(module, name) for module, names in LAYOUT_4_0.items() for name in names]
    assert len(names) == len(set(names)) == 99


@pytest.mark.parametrize(
    ("module_name", "name"),
    [(module, name) for module, names in LAYOUT_4_0.items() for name in names],
)
def test_every_4_0_name_imports_from_its_4_0_path(module_name: str, name: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"from {module_name} import {name}", namespace)
    assert namespace[name] is not None
