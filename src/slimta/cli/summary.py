"""What a configuration does, in words: the start-up lines of ``slimta
serve`` (also printed by ``slimta check-config``)."""

from __future__ import annotations

from slimta.cli.config import Config, ListenerConfig

__all__ = ["describe", "warnings"]

_RELAY_WORDS = {
    "mx": "the recipient domain's MX hosts (port 25)",
    "lmtp": "LMTP",
    "maildir": "Maildirs",
}


def _listener_line(listener: ListenerConfig, config: Config, auth: bool) -> str:
    if listener.kind == "submission":
        mode = "submission: STARTTLS and AUTH required before MAIL"
    elif listener.kind == "smtps":
        mode = "smtps: TLS from the first byte, AUTH required before MAIL"
    else:
        tls = "STARTTLS offered" if config.tls.enabled else "no TLS"
        mode = f"smtp: {tls}, " + ("AUTH offered after STARTTLS" if auth else "no AUTH")
    return f'listening on {listener.display_address} (listener "{listener.name}", {mode})'


def _relay_words(kind: str, config: Config) -> str:
    if kind == "smarthost":
        smart = config.smarthost
        login = f" as {smart.username}" if smart.username else ""
        return f"the smarthost {smart.host}:{smart.port} (TLS {smart.tls}){login}"
    if kind == "lmtp":
        return f"LMTP at {config.lmtp.host}:{config.lmtp.port}"
    if kind == "pipe":
        assert config.pipe.command is not None
        return "the program " + " ".join(config.pipe.command)
    if kind == "maildir":
        return f"Maildirs in {config.maildir.path}/<local part>"
    if kind == "http":
        return f"HTTP POST to {config.http.url}"
    if kind == "mx" and config.mx.mta_sts:
        return _RELAY_WORDS[kind] + ", applying their MTA-STS policies"
    return _RELAY_WORDS[kind]


def warnings(config: Config) -> list[str]:
    """What in *config* is probably a mistake: above all, an open relay."""
    found = []
    everyone = [str(net) for net in config.server.trusted_networks if net.prefixlen == 0]
    if everyone:
        found.append(
            f"OPEN RELAY: server.trusted_networks contains {', '.join(everyone)}, so ANYONE "
            "who can connect may send mail through this server to any domain"
        )
    needs_users = [listener.name for listener in config.listeners if listener.kind != "smtp"]
    if needs_users and not config.users:
        names = ", ".join(f'"{name}"' for name in needs_users)
        found.append(f"no [users]: nobody can log in on the listeners {names}, which require AUTH")
    return found


def describe(config: Config, auth_of: dict[str, bool]) -> list[str]:
    """The start-up lines.

    :param auth_of: listener name -> whether it offers AUTH.
    """
    lines = [
        _listener_line(listener, config, auth_of.get(listener.name, False))
        for listener in config.listeners
    ]
    domains = ", ".join(config.local.domains)
    if not config.users or config.local.catch_all:
        who = "every local part"
    else:
        count = len(config.users)
        who = f"the {count} user{'s' if count != 1 else ''} of [users] (and postmaster)"
    lines.append(
        f"local mail: {who} at {domains} goes to the Maildirs {config.local.mail_dir}/<local part>"
    )
    lines.append(f"other mail goes to {_relay_words(config.relay.default, config)}")
    for route in config.routes:
        lines.append(f"mail for {route.domain} goes to {_relay_words(route.relay, config)}")
    trusted = ", ".join(str(net) for net in config.server.trusted_networks)
    if trusted:
        lines.append(f"relaying: only for authenticated clients and clients in {trusted}")
    elif config.users:
        lines.append("relaying: only for authenticated clients (no trusted networks)")
    else:
        lines.append("relaying: nobody may relay (no [users] to authenticate, no trusted networks)")
    lines.append(f"queue: {config.server.data_dir / 'queue'}")
    return lines
