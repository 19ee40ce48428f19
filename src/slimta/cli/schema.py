"""The one description of every configuration key of ``slimta serve``.

The loader (:mod:`slimta.cli.config`), ``slimta check-config`` and
``slimta example-config`` (:mod:`slimta.cli.example`) are all driven by
:data:`SECTIONS`, so a key cannot be accepted without being documented, or
documented without being accepted. Each :class:`Key` has a name, a
:class:`Kind` (which parses and checks a TOML value), a default, a one-line
doc and, where the default is computed or absent, an example value.

A :class:`Kind` parses one TOML value and raises :class:`Mismatch` when the
value does not fit; the loader turns that into
``FILE: key.path: expected <what>, got <value>``.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "SECTIONS",
    "Key",
    "Kind",
    "Mismatch",
    "Section",
    "Shape",
    "section",
    "toml_value",
]


class Mismatch(Exception):
    """A value does not fit its key.

    :param what: what was expected, when more precise than the kind's
        :attr:`Kind.what` (e.g. ``a port from 0 to 65535``).
    """

    def __init__(self, what: str | None = None) -> None:
        super().__init__(what)
        self.what = what


def toml_value(value: object) -> str:
    """*value* written as TOML, for error messages and the example file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        escaped = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", escaped)
        return f'"{escaped}"'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


# --- kinds ---------------------------------------------------------------------


class Kind:
    """How a key's TOML value is checked and converted. Subclasses override
    :meth:`parse`; :attr:`what` completes "expected ..."."""

    #: What the value must be, e.g. ``true or false``.
    what = "a value"

    def parse(self, value: object, base: Path) -> object:
        """The value converted, or :class:`Mismatch`.

        :param value: the TOML value (str, int, float, bool, list, dict).
        :param base: the directory relative paths are relative to.
        """
        return value


class Bool(Kind):
    what = "true or false"

    def parse(self, value: object, base: Path) -> object:
        if not isinstance(value, bool):
            raise Mismatch()
        return value


class Int(Kind):
    """An integer in ``[low, high]`` (*high* ``None``: no upper bound)."""

    def __init__(self, low: int, high: int | None = None, unit: str = "") -> None:
        self.low, self.high, self.unit = low, high, unit
        unit = f" ({unit})" if unit else ""
        if high is None:
            self.what = f"an integer of at least {low}{unit}"
        else:
            self.what = f"an integer from {low} to {high}{unit}"

    def parse(self, value: object, base: Path) -> object:
        # bool is an int subclass in Python; TOML keeps them apart.
        if isinstance(value, bool) or not isinstance(value, int):
            raise Mismatch()
        if value < self.low or (self.high is not None and value > self.high):
            raise Mismatch()
        return value


class Seconds(Kind):
    """A duration: an integer or float number of seconds, at least *low*."""

    def __init__(self, low: float = 0.0) -> None:
        self.low = low
        self.what = f"a number of seconds of at least {low:g}"

    def parse(self, value: object, base: Path) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Mismatch()
        if not math.isfinite(value) or value < self.low:
            raise Mismatch()
        return float(value)


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the
    system has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class WorkerCount(Kind):
    """A number of worker processes, or ``"auto"``: one per usable core."""

    what = 'an integer from 1 to 256, or "auto" (one per CPU core)'

    def parse(self, value: object, base: Path) -> object:
        if value == "auto":
            return usable_cpus()
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
            raise Mismatch()
        return value


class Text(Kind):
    what = "a non-empty string"

    def parse(self, value: object, base: Path) -> object:
        if not isinstance(value, str) or not value or "\x00" in value:
            raise Mismatch()
        return value


class Choice(Kind):
    """One of a fixed set of strings."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.what = "one of " + ", ".join(f'"{choice}"' for choice in choices)

    def parse(self, value: object, base: Path) -> object:
        if value not in self.choices:
            raise Mismatch()
        return value


class FilePath(Kind):
    """A file or directory name; a relative one is taken relative to *base*
    (the configuration file's directory)."""

    what = "a path (a non-empty string)"

    def parse(self, value: object, base: Path) -> object:
        if not isinstance(value, str) or not value or "\x00" in value:
            raise Mismatch()
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path


_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def is_hostname(text: str) -> bool:
    """True for a DNS name such as ``mail.example.com`` (or ``localhost``)."""
    return len(text) <= 253 and _HOSTNAME.fullmatch(text) is not None


class Hostname(Kind):
    what = 'a host name such as "mail.example.com"'

    def parse(self, value: object, base: Path) -> object:
        if not isinstance(value, str) or not is_hostname(value):
            raise Mismatch()
        return value.rstrip(".").lower()


class Domain(Kind):
    """A mail domain; with *wildcard*, ``*.example.com`` too (its subdomains)."""

    def __init__(self, wildcard: bool = False) -> None:
        self.wildcard = wildcard
        self.what = 'a domain such as "example.com"'
        if wildcard:
            self.what += ' or "*.example.com"'

    def parse(self, value: object, base: Path) -> object:
        if not isinstance(value, str):
            raise Mismatch()
        name = value[2:] if self.wildcard and value.startswith("*.") else value
        if not is_hostname(name):
            raise Mismatch()
        return value.rstrip(".").lower()


class Address(Kind):
    """``HOST:PORT`` to listen on; IPv6 addresses in brackets."""

    what = '"HOST:PORT" such as "127.0.0.1:2525" or "[::1]:2525"'

    def parse(self, value: object, base: Path) -> object:
        if not isinstance(value, str):
            raise Mismatch()
        host, colon, port = value.rpartition(":")
        if not colon or not port.isascii() or not port.isdigit():
            raise Mismatch()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise Mismatch() from None
        elif not host or ":" in host or not is_hostname(host):
            raise Mismatch()
        number = int(port)
        if number > 65535:
            raise Mismatch(f'"HOST:PORT" with a port from 0 to 65535 ({port} is not one)')
        return (host, number)


class Network(Kind):
    what = 'a network such as "192.0.2.0/24", "127.0.0.1" or "2001:db8::/32"'

    def parse(self, value: object, base: Path) -> object:
        if not isinstance(value, str):
            raise Mismatch()
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise Mismatch() from None


class Url(Kind):
    what = 'an http:// or https:// URL such as "https://mail.example.com/incoming"'

    def parse(self, value: object, base: Path) -> object:
        if not isinstance(value, str):
            raise Mismatch()
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 -- raises ValueError for a bad port
        except ValueError:
            raise Mismatch() from None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
            raise Mismatch()
        return value


#: The shape of a password hash made by ``slimta passwd``
#: (:func:`slimta.lookup.auth.hash_password`).
PASSWORD_HASH = re.compile(
    r"\$scrypt\$ln=\d{1,2},r=\d{1,2},p=\d{1,2}\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{22,}"
)


class PasswordHash(Kind):
    what = 'a password hash made by "slimta passwd" ("$scrypt$ln=...")'

    def parse(self, value: object, base: Path) -> object:
        if not isinstance(value, str) or PASSWORD_HASH.fullmatch(value) is None:
            raise Mismatch()
        return value


class MailAddress(Kind):
    what = 'an address such as "alice@example.com"'

    def parse(self, value: object, base: Path) -> object:
        if not isinstance(value, str):
            raise Mismatch()
        local, at, domain = value.rpartition("@")
        if not at or not local or not is_hostname(domain) or re.search(r"[\s<>]", local):
            raise Mismatch()
        return f"{local}@{domain.rstrip('.')}".lower()


class ListOf(Kind):
    """A TOML array of *item*; items are checked one by one (each error names
    its index)."""

    def __init__(self, item: Kind, *, nonempty: bool = False, what: str | None = None) -> None:
        self.item = item
        self.nonempty = nonempty
        self.what = what or f"a list of {_plural(item.what)}"
        if nonempty:
            self.what = "a non-empty " + self.what.removeprefix("a ")

    def parse(self, value: object, base: Path) -> object:
        if not isinstance(value, list) or (self.nonempty and not value):
            raise Mismatch()
        # Items are parsed by the loader, which knows their paths.
        return value


def _plural(what: str) -> str:
    """``a host name such as ...`` -> ``host names (each such as ...)``."""
    words = what.split(" ", 1)
    if words[0] in ("a", "an") and len(words) == 2:
        noun, _, rest = words[1].partition(" such as ")
        noun = noun + "s" if not noun.endswith("s") else noun
        return f"{noun} (each such as {rest})" if rest else noun
    return what


# --- keys and sections -----------------------------------------------------------------


class Shape(enum.Enum):
    """How a section appears in the file."""

    #: ``[name]``: one table.
    TABLE = "table"
    #: ``[[name]]`` entries: an array of tables (routes).
    ARRAY = "array"
    #: ``[[listener]]`` entries or ``[listeners.<name>]`` tables.
    NAMED = "named"
    #: ``[name]`` whose keys are free (``[users]``: address = hash).
    MAPPING = "mapping"


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key.

    :param name: the key as written in the file.
    :param kind: how its value is checked.
    :param default: the value when absent; ``None`` when there is none or it
        is computed (see *default_doc*).
    :param doc: one line for the example file and the docs.
    :param example: a value to show in the example file when *default* is
        ``None``.
    :param default_doc: the default in words, when computed.
    :param required: the section needs this key (once the section is there).
    """

    name: str
    kind: Kind
    default: object
    doc: str
    example: object = None
    default_doc: str | None = None
    required: bool = False


@dataclass(frozen=True, slots=True)
class Section:
    """One table (or kind of table) of the file.

    :param name: dotted, as in the file: ``server``, ``relay.smarthost``.
    :param doc: what the section is for, one or more sentences.
    :param keys: its keys; for a :attr:`Shape.MAPPING`, the single
        :class:`Key` describing every value (its *name* describes the keys).
    :param shape: how it appears in the file.
    :param example_active: written as real settings in the example file
        (every key has a usable default); otherwise commented out.
    :param key_kind: for a mapping, how each key is checked.
    """

    name: str
    doc: str
    keys: tuple[Key, ...]
    shape: Shape = Shape.TABLE
    example_active: bool = True
    key_kind: Kind | None = None
    aliases: tuple[str, ...] = field(default=())

    def key(self, name: str) -> Key | None:
        """The key called *name*, if the section has one."""
        for key in self.keys:
            if key.name == name:
                return key
        return None

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.keys)


#: The relay kinds, for ``relay.default`` and each route.
RELAY_KINDS = ("mx", "smarthost", "lmtp", "pipe", "maildir", "http")

#: The listener kinds.
LISTENER_KINDS = ("smtp", "submission", "smtps")

#: Default listening address per listener kind.
DEFAULT_ADDRESSES = {
    "smtp": ("127.0.0.1", 2525),
    "submission": ("127.0.0.1", 587),
    "smtps": ("127.0.0.1", 465),
}

_DAY = 86400

SECTIONS: tuple[Section, ...] = (
    Section(
        "server",
        "The server as a whole.",
        (
            Key(
                "hostname",
                Hostname(),
                None,
                "The name in the greeting and in the Received: and Message-Id: fields.",
                example="mail.example.com",
                default_doc="this host's fully qualified name",
            ),
            Key(
                "data_dir",
                FilePath(),
                "./slimta-data",
                "Where the queue (data_dir/queue) and, by default, the mailboxes "
                "(data_dir/mail) live; relative to this file's directory.",
            ),
            Key(
                "log_level",
                Choice("debug", "info", "warning", "error"),
                "info",
                "The least important log lines written (to standard error).",
            ),
            Key(
                "log_format",
                Choice("text", "json"),
                "text",
                'How log lines are written: "text" (time, level, logger, message) or '
                '"json" (one JSON object per line, the mail log\'s fields as keys).',
            ),
            Key(
                "user",
                Text(),
                None,
                "Switch to this user after opening the listening sockets (as root).",
                example="slimta",
                default_doc="stay the user that started the server",
            ),
            Key(
                "group",
                Text(),
                None,
                "Switch to this group after opening the listening sockets (as root).",
                example="slimta",
                default_doc="the user's own group",
            ),
            Key(
                "trusted_networks",
                ListOf(Network()),
                [],
                "Clients in these networks may relay mail to any domain without "
                "AUTH. Empty by default: not even 127.0.0.1 is trusted.",
                example=["127.0.0.0/8", "::1"],
            ),
            Key(
                "shutdown_grace",
                Seconds(0.0),
                10.0,
                "On SIGTERM or SIGINT, seconds open sessions get to finish.",
            ),
            Key(
                "workers",
                WorkerCount(),
                1,
                "Processes that share the listeners, each with its own queue "
                '(data_dir/queue/worker-<n>); "auto": one per CPU core. Changes at restart.',
            ),
        ),
    ),
    Section(
        "listeners",
        "Where SMTP clients connect: [listeners.<name>] tables, or [[listener]] "
        "entries. Without any, one smtp listener on 127.0.0.1:2525. kind = "
        '"smtp": plain SMTP, STARTTLS when [tls] is set (port 25); "submission": '
        "STARTTLS and AUTH required before MAIL (port 587); "
        '"smtps": TLS from the first byte, AUTH required (port 465).',
        (
            Key(
                "kind",
                Choice(*LISTENER_KINDS),
                "smtp",
                "What the listener is for (see above).",
            ),
            Key(
                "address",
                Address(),
                None,
                "Where to listen; port 0 picks any free port (it is logged).",
                example="127.0.0.1:2525",
                default_doc='"127.0.0.1:2525" for smtp, "127.0.0.1:587" for submission, '
                '"127.0.0.1:465" for smtps',
            ),
        ),
        shape=Shape.NAMED,
        aliases=("listener",),
    ),
    Section(
        "tls",
        "The server's certificate, for STARTTLS and smtps (TLS 1.2 or later).",
        (
            Key(
                "cert",
                FilePath(),
                None,
                "The certificate chain file (PEM), leaf first.",
                example="/etc/slimta/cert.pem",
                required=True,
            ),
            Key(
                "key",
                FilePath(),
                None,
                "The private key file (PEM).",
                example="/etc/slimta/key.pem",
                required=True,
            ),
            Key(
                "min_version",
                Choice("1.2", "1.3"),
                "1.2",
                "The oldest TLS version accepted.",
            ),
        ),
        example_active=False,
    ),
    Section(
        "local",
        "Mail for the local domains is delivered here, into Maildirs: "
        "mail_dir/<local part>, one mailbox per local part for all local domains.",
        (
            Key(
                "domains",
                ListOf(Domain()),
                None,
                "The domains this server delivers itself.",
                example=["example.com", "localhost"],
                default_doc='["localhost", <this host\'s fully qualified name>]',
            ),
            Key(
                "mail_dir",
                FilePath(),
                None,
                "The directory of the Maildirs.",
                example="./slimta-data/mail",
                default_doc="<data_dir>/mail",
            ),
            Key(
                "catch_all",
                Bool(),
                False,
                "Accept every local part even when [users] lists users (without "
                "users, every local part is accepted anyway).",
            ),
        ),
    ),
    Section(
        "users",
        'Users: "address" = "password hash" (make one with "slimta passwd"). They '
        "may AUTH, and once any is listed only they have mailboxes in the local "
        "domains (other local recipients get 550 5.1.1, unless local.catch_all).",
        (
            Key(
                "<address>",
                PasswordHash(),
                None,
                "The user's password hash.",
                example="$scrypt$ln=14,r=8,p=5$c2FsdHNhbHRzYWx0c2FsdA"
                "$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2U",
            ),
        ),
        shape=Shape.MAPPING,
        example_active=False,
        key_kind=MailAddress(),
    ),
    Section(
        "relay",
        "How mail for other domains leaves (when the client may relay).",
        (
            Key(
                "default",
                Choice(*RELAY_KINDS),
                "mx",
                "The relay for domains no [[route]] names: the recipient "
                "domain's MX hosts, a smarthost, LMTP, a program, Maildirs or HTTP.",
            ),
        ),
    ),
    Section(
        "relay.mx",
        "Delivery to each recipient domain's MX hosts on port 25.",
        (
            Key(
                "tls_verify",
                Bool(),
                False,
                "Check MX hosts' certificates (many are self-signed); STARTTLS is "
                "used whenever offered either way.",
            ),
            Key(
                "mta_sts",
                Bool(),
                True,
                "Apply the MTA-STS policies that recipient domains publish (RFC 8461): "
                "for an enforce policy, only its MX hosts, only over verified TLS.",
            ),
        ),
    ),
    Section(
        "relay.smarthost",
        "One SMTP server that takes all the mail (your provider's, say).",
        (
            Key(
                "host",
                Hostname(),
                None,
                "Its host name or address.",
                example="smtp.example.net",
                required=True,
            ),
            Key(
                "port", Int(1, 65535), 25, "Its port (587 for submission, 465 for tls = implicit)."
            ),
            Key(
                "username",
                Text(),
                None,
                "Log in with AUTH as this user (over TLS only).",
                example="me@example.net",
                default_doc="no AUTH",
            ),
            Key(
                "password",
                Text(),
                None,
                "The AUTH password.",
                example="secret",
                default_doc="none",
            ),
            Key(
                "tls",
                Choice("opportunistic", "required", "implicit"),
                "opportunistic",
                "STARTTLS when offered; STARTTLS or no delivery; TLS from the first byte.",
            ),
            Key("tls_verify", Bool(), True, "Check its certificate and name."),
        ),
        example_active=False,
    ),
    Section(
        "relay.lmtp",
        "An LMTP server (Dovecot, Cyrus) that takes all the mail.",
        (
            Key("host", Hostname(), "localhost", "Its host name or address."),
            Key("port", Int(1, 65535), 24, "Its port."),
        ),
        example_active=False,
    ),
    Section(
        "relay.pipe",
        "A program run for each recipient with the message on its standard "
        "input; {sender} and {recipient} in its arguments are replaced.",
        (
            Key(
                "command",
                ListOf(Text(), nonempty=True, what="a list of strings (program, arguments)"),
                None,
                "The program and its arguments, no shell.",
                example=["/usr/bin/procmail", "-f", "{sender}", "-a", "{recipient}"],
                required=True,
            ),
            Key("timeout", Seconds(1.0), 60.0, "Seconds one run may take."),
        ),
        example_active=False,
    ),
    Section(
        "relay.maildir",
        "Deliver other domains' mail into Maildirs too (a test or archive setup).",
        (
            Key(
                "path",
                FilePath(),
                None,
                "The directory of the Maildirs (one per local part).",
                example="./slimta-data/outgoing",
                default_doc="local.mail_dir",
            ),
        ),
        example_active=False,
    ),
    Section(
        "relay.http",
        "POST each message to a URL (see slimta.relay.http).",
        (
            Key(
                "url",
                Url(),
                None,
                "Where to send.",
                example="https://mail.example.com/incoming",
                required=True,
            ),
            Key("timeout", Seconds(1.0), 60.0, "Seconds one request may take."),
        ),
        example_active=False,
    ),
    Section(
        "route",
        "[[route]] entries send some domains through another relay than "
        "relay.default; the first matching route wins.",
        (
            Key(
                "domain",
                Domain(wildcard=True),
                None,
                'The recipient domain; "*.example.com" matches its subdomains.',
                example="example.org",
                required=True,
            ),
            Key(
                "relay",
                Choice(*RELAY_KINDS),
                None,
                "The relay for it (configured in its [relay.<kind>] section).",
                example="smarthost",
                required=True,
            ),
        ),
        shape=Shape.ARRAY,
        example_active=False,
    ),
    Section(
        "policies",
        "What is done to each accepted message, and checks on clients that are "
        "neither authenticated nor trusted.",
        (
            Key("received", Bool(), True, "Add a Received: trace field."),
            Key("date", Bool(), True, "Add Date: when missing."),
            Key("message_id", Bool(), True, "Add Message-Id: when missing."),
            Key(
                "authentication_results",
                Bool(),
                False,
                "Add Authentication-Results: (SPF, DKIM, DMARC) to incoming mail.",
            ),
            Key(
                "spf",
                Choice("off", "enforce"),
                "off",
                'SPF: "enforce" refuses MAIL when the sender\'s SPF record fails (550 5.7.23).',
            ),
            Key(
                "dnsbl",
                ListOf(Hostname(), what="a list of DNS blocklist zones"),
                [],
                "Refuse MAIL from clients listed on any of these DNS blocklists (554 5.7.1).",
                example=["zen.spamhaus.org"],
            ),
        ),
    ),
    Section(
        "policies.dkim",
        "Sign mail from authenticated or trusted clients with DKIM (needs the "
        "dkim extra: pip install 'python-slimta[dkim]').",
        (
            Key(
                "selector",
                Hostname(),
                None,
                "The selector: the key is published at <selector>._domainkey.<domain>.",
                example="mail",
                required=True,
            ),
            Key(
                "domain",
                Domain(),
                None,
                "The signing domain; mail whose From: is in it is signed.",
                example="example.com",
                required=True,
            ),
            Key(
                "key_file",
                FilePath(),
                None,
                "The private key (PEM).",
                example="/etc/slimta/dkim.pem",
                required=True,
            ),
            Key(
                "algorithm",
                Choice("rsa-sha256", "ed25519-sha256"),
                "rsa-sha256",
                "The signing algorithm.",
            ),
        ),
        example_active=False,
    ),
    Section(
        "limits",
        "Limits on what one client may do; 0 turns a connection or rate limit off. "
        "Trusted and authenticated clients have no rate limit.",
        (
            Key("max_size", Int(1024, unit="bytes"), 10485760, "Largest message accepted."),
            Key("max_recipients", Int(1, 100000), 100, "Recipients per message."),
            Key(
                "max_connections",
                Int(0),
                500,
                "Connections at once, from everyone (421 4.7.0 beyond).",
            ),
            Key(
                "max_connections_per_ip",
                Int(0),
                20,
                "Connections at once from one IP address (421 4.7.0 beyond; not "
                "for trusted networks).",
            ),
            Key(
                "max_messages_per_minute_per_ip",
                Int(0),
                60,
                "Messages (MAIL commands) one IP address may start per minute (450 4.7.1 beyond).",
            ),
            Key("command_timeout", Seconds(1.0), 300.0, "Seconds to wait for each command."),
            Key("data_timeout", Seconds(1.0), 600.0, "Seconds to wait for a message's content."),
        ),
    ),
    Section(
        "queue",
        "Retrying deliveries that failed for now.",
        (
            Key(
                "retry",
                ListOf(Int(1, 7 * _DAY, unit="seconds"), what="a list of seconds"),
                [],
                "Seconds to wait before each retry, the last repeated; empty: "
                "as Postfix (the message's age, from 5 minutes to 67 minutes).",
                example=[60, 300, 900, 3600],
            ),
            Key(
                "max_age",
                Seconds(60.0),
                5.0 * _DAY,
                "Seconds after which a message that still fails is bounced.",
            ),
        ),
    ),
)

_BY_NAME = {sec.name: sec for sec in SECTIONS}


def section(name: str) -> Section:
    """The section called *name* (``relay.smarthost``)."""
    return _BY_NAME[name]


def child_sections(parent: str) -> Sequence[Section]:
    """Sections nested right under *parent* (``""`` for the top level)."""
    depth = parent.count(".") + 1 if parent else 0
    prefix = parent + "." if parent else ""
    return [sec for sec in SECTIONS if sec.name.startswith(prefix) and sec.name.count(".") == depth]
