"""From a :class:`~slimta.cli.config.Config` to the objects that run it.

Only the public API is used. :func:`build` makes everything that does not
touch the data directory or the network: the TLS context, the
:class:`~slimta.cli.access.Access` rules, the relays and their
:class:`~slimta.cli.routing.RouteTable`, the queue policies and the retry
schedule. Files named by the configuration (certificate, DKIM key, the pipe
program) are read or looked for here, and each failure is a
:class:`~slimta.cli.errors.Problem` naming its key, so ``check-config``
reports them as it reports a wrong value. The queue's storage and the
listening sockets are made by :mod:`slimta.cli.serve`.
"""

from __future__ import annotations

import os
import shutil
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slimta.cli.access import Access, Runtime
from slimta.cli.config import Config, ListenerConfig, TlsConfig
from slimta.cli.errors import ConfigInvalid, Problem
from slimta.cli.routing import RouteTable, make_backoff
from slimta.policy import QueuePolicy
from slimta.policy.headers import AddDateHeader, AddMessageIdHeader, AddReceivedHeader
from slimta.policy.split import RecipientDomainSplit
from slimta.relay import PermanentRelayError, Relay
from slimta.relay.maildir import MaildirRelay
from slimta.smtp.reply import Reply

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["Built", "LocalMaildirRelay", "build", "listener_auth", "server_context"]

#: SASL mechanisms offered: the hashes only allow those that send the password.
AUTH_MECHANISMS = [b"PLAIN", b"LOGIN"]
#: Seconds a relay keeps a connection for the next message.
RELAY_IDLE_TIMEOUT = 10.0


@dataclass(slots=True)
class Built:
    """Everything :func:`build` made from one configuration."""

    config: Config
    #: The server's runtime; its ``access`` is replaced by :attr:`access`
    #: when this configuration is put to work.
    runtime: Runtime
    access: Access
    #: The server TLS context, or ``None`` without ``[tls]``.
    context: ssl.SSLContext | None
    #: The relays by a key of their configuration, so that a reload keeps
    #: those whose configuration did not change (and their connections).
    relays: dict[object, Relay]
    table: RouteTable
    policies: list[QueuePolicy]
    backoff: Callable[[Envelope, int], float | None]


class LocalMaildirRelay(MaildirRelay):
    """The users' Maildirs: ``mail_dir/<local part>`` for addresses that
    have a mailbox (see :meth:`Access.has_mailbox
    <slimta.cli.access.Access.has_mailbox>`, asked at delivery time, after
    any reload); others fail for good with ``550 5.1.1``."""

    def __init__(self, base_dir: str | os.PathLike[str], runtime: Runtime) -> None:
        super().__init__(base_dir)
        self.runtime = runtime

    def mailbox_path(self, recipient: str) -> str:
        if not self.runtime.access.has_mailbox(recipient):
            text = "No such user here"
            raise PermanentRelayError(text, Reply("550", f"5.1.1 {text}"))
        return super().mailbox_path(recipient)


class _ForClients(QueuePolicy):
    """Runs *policy* only on messages from privileged clients (authenticated
    or trusted), or only on the others: DKIM signs what our users send, and
    Authentication-Results describe what strangers send."""

    def __init__(self, policy: QueuePolicy, runtime: Runtime, privileged: bool) -> None:
        self.policy = policy
        self.runtime = runtime
        self.privileged = privileged

    def apply(self, envelope: Envelope) -> Any:
        client = envelope.client or {}
        privileged = bool(client.get("auth")) or self.runtime.access.is_trusted(client.get("ip"))
        if privileged == self.privileged:
            return self.policy.apply(envelope)
        return None


def server_context(tls: TlsConfig, problems: list[Problem]) -> ssl.SSLContext | None:
    """The server TLS context of ``[tls]``, or ``None`` without one."""
    if tls.cert is None or tls.key is None:
        return None
    for key, path in (("tls.cert", tls.cert), ("tls.key", tls.key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            problems.append(Problem(key, f"cannot read {path}: {exc.strerror or exc}"))
    if problems:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        problems.append(Problem("tls.cert", f"cannot use {tls.cert} with {tls.key}: {reason}"))
        return None
    return context


def listener_auth(listener: ListenerConfig, config: Config) -> bool:
    """True when *listener* offers AUTH: always for submission and smtps; for
    smtp when it can do STARTTLS and there are users."""
    if listener.kind != "smtp":
        return True
    return config.tls.enabled and bool(config.users)


def _client_context(verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not verify:
        # Opportunistic encryption without authentication, as most MTAs do
        # towards MX hosts (Postfix's "may"): a self-signed certificate
        # still encrypts.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _make_relay(kind: str, config: Config, problems: list[Problem]) -> Relay | None:
    hostname = config.server.hostname
    if kind == "mx":
        from slimta.relay.smtp.mx import MxSmtpRelay

        return MxSmtpRelay(
            _client_context(config.mx.tls_verify),
            local_hosts=[hostname],
            ehlo_as=hostname,
            idle_timeout=RELAY_IDLE_TIMEOUT,
            # Policies are cached in memory: a cache directory made here,
            # before the switch of user, would belong to root.
            mta_sts=config.mx.mta_sts,
        )
    if kind == "smarthost":
        from slimta.relay.smtp.static import StaticSmtpRelay

        smart = config.smarthost
        assert smart.host is not None
        credentials = None
        if smart.username is not None and smart.password is not None:
            credentials = (smart.username, smart.password)
        return StaticSmtpRelay(
            smart.host,
            smart.port,
            context=_client_context(smart.tls_verify),
            ehlo_as=hostname,
            tls_immediately=smart.tls == "implicit",
            tls_required=smart.tls == "required",
            credentials=credentials,
            idle_timeout=RELAY_IDLE_TIMEOUT,
        )
    if kind == "lmtp":
        from slimta.relay.smtp.static import StaticLmtpRelay

        return StaticLmtpRelay(config.lmtp.host, config.lmtp.port, ehlo_as=hostname)
    if kind == "pipe":
        from slimta.relay.pipe import PipeRelay

        command = config.pipe.command
        assert command is not None
        if shutil.which(command[0]) is None:
            problems.append(Problem("relay.pipe.command", f"program not found: {command[0]}"))
            return None
        try:
            return PipeRelay(list(command), timeout=config.pipe.timeout)
        except (TypeError, ValueError) as exc:
            problems.append(Problem("relay.pipe.command", str(exc.args[0] if exc.args else exc)))
            return None
    if kind == "maildir":
        return MaildirRelay(config.maildir.path)
    if kind == "http":
        from slimta.relay.http import HttpRelay

        assert config.http.url is not None
        try:
            return HttpRelay(config.http.url, timeout=config.http.timeout, ehlo_as=hostname)
        except ValueError as exc:
            problems.append(Problem("relay.http.url", str(exc.args[0] if exc.args else exc)))
            return None
    raise AssertionError(f"unknown relay kind {kind}")


def _relay_key(kind: str, config: Config) -> object:
    """What a relay of *kind* is made from: equal keys, same relay."""
    sections: dict[str, object] = {
        "mx": config.mx,
        "smarthost": config.smarthost,
        "lmtp": config.lmtp,
        "pipe": config.pipe,
        "maildir": config.maildir,
        "http": config.http,
    }
    return (kind, sections[kind], config.server.hostname)


def _policies(config: Config, runtime: Runtime, problems: list[Problem]) -> list[QueuePolicy]:
    policies_config = config.policies
    hostname = config.server.hostname
    policies: list[QueuePolicy] = []
    if policies_config.authentication_results:
        # First, on the message as the client sent it.
        from slimta.policy.authres import AddAuthenticationResults

        try:
            results = AddAuthenticationResults(hostname)
        except ValueError as exc:
            problems.append(Problem("server.hostname", str(exc)))
        else:
            policies.append(_ForClients(results, runtime, privileged=False))
    if policies_config.received:
        policies.append(AddReceivedHeader())
    if policies_config.date:
        policies.append(AddDateHeader())
    if policies_config.message_id:
        policies.append(AddMessageIdHeader(hostname))
    dkim = config.dkim
    if dkim is not None:
        # After Date and Message-Id, so that the signature covers them.
        from slimta.policy.dkim import DkimSign

        try:
            signer = DkimSign(dkim.selector, dkim.domain, dkim.key_file, algorithm=dkim.algorithm)
        except ImportError:
            problems.append(
                Problem("policies.dkim", "needs dkimpy: pip install 'python-slimta[dkim]'")
            )
        except OSError as exc:
            problems.append(
                Problem("policies.dkim.key_file", f"cannot read {dkim.key_file}: {exc.strerror}")
            )
        except ValueError as exc:
            problems.append(Problem("policies.dkim.key_file", str(exc)))
        else:
            policies.append(_ForClients(signer, runtime, privileged=True))
    # Last: one stored message per recipient domain, each headed as above.
    policies.append(RecipientDomainSplit())
    return policies


def _access(config: Config) -> Access:
    spf = None
    if config.policies.spf == "enforce":
        from slimta.util.spf import EnforceSpf

        spf = EnforceSpf()
    dnsbl = None
    if config.policies.dnsbl:
        from slimta.util.dnsbl import DnsBlocklistGroup

        dnsbl = DnsBlocklistGroup()
        for zone in config.policies.dnsbl:
            dnsbl.add_dnsbl(zone)
    return Access(
        config.local.domains,
        config.users,
        config.local.catch_all,
        config.server.trusted_networks,
        config.limits,
        spf=spf,
        dnsbl=dnsbl,
    )


def build(
    config: Config,
    runtime: Runtime | None = None,
    previous: Built | None = None,
) -> Built:
    """Make the objects of *config*.

    :param runtime: the server's runtime, whose :attr:`~Runtime.access` the
        local relay and the policies read; a new one when ``None``.
    :param previous: what the running configuration built: relays whose
        configuration did not change are kept.
    :raises ConfigInvalid: a file cannot be used, or an object refused its
        settings; every such problem is listed.
    """
    problems: list[Problem] = []
    access = _access(config)
    if runtime is None:
        runtime = Runtime(access)
    context = server_context(config.tls, problems)
    old = previous.relays if previous is not None else {}
    relays: dict[object, Relay] = {}
    local_key = ("local", config.local.mail_dir, config.server.hostname)
    local = old.get(local_key) or LocalMaildirRelay(config.local.mail_dir, runtime)
    relays[local_key] = local
    by_kind: dict[str, Relay] = {}
    for kind in config.relays_used():
        key = _relay_key(kind, config)
        relay = old.get(key) or _make_relay(kind, config, problems)
        if relay is not None:
            relays[key] = relays.get(key, relay)
            by_kind[kind] = relay
    policies = _policies(config, runtime, problems)
    if problems:
        raise ConfigInvalid(config.source, problems)
    table = RouteTable(
        is_local=lambda address: runtime.access.is_local(address),
        local=local,
        routes=tuple((route, by_kind[route.relay]) for route in config.routes),
        default=by_kind[config.relay.default],
    )
    backoff = make_backoff(config.queue.retry, config.queue.max_age)
    return Built(config, runtime, access, context, relays, table, policies, backoff)
