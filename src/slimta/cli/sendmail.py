"""``slimta sendmail``: the sendmail interface, for scripts and cron.

The message comes on standard input, the recipients as arguments (or, with
``-t``, from its ``To``, ``Cc`` and ``Bcc`` headers), and it is handed to the
running ``slimta serve`` of the configuration over SMTP; it is queued when
the command ends with status 0. Nothing is queued on the side: when the
server is down the command fails with status 75 (``EX_TEMPFAIL``) and the
caller keeps the message.

Where it connects
-----------------

First the server's local submission socket (``submit.sock`` in the data
directory, see :mod:`slimta.cli.control`), where the session is
authenticated as the local user who runs the command: it may send to any
address, and DKIM signing applies as for a user who logged in. That socket
is open to the server's user, its group and root. A user without access to
it connects, as an ordinary client, to the first ``smtp`` listener of the
configuration (``0.0.0.0`` and ``::`` as the loopback address): mail for
the local domains is accepted there, and other recipients only from a
``server.trusted_networks`` address.

The options (those of sendmail that scripts use)
------------------------------------------------

``-t``
    Recipients from the ``To``, ``Cc`` and ``Bcc`` headers (only from the
    ``Resent-`` ones when there are any), added to those given as
    arguments, as Postfix does; ``Bcc`` and ``Resent-Bcc`` are removed.
``-f SENDER``, ``-r SENDER``
    The envelope sender (``-f '<>'`` for none). Default: the user running
    the command.
``-F NAME``
    The full name for the ``From`` header added to a message without one.
``-i``, ``-oi``
    A line with a single dot does not end the message (it does otherwise).
``-B 8BITMIME``, ``-B 7BIT``
    The body type (``BODY=`` of MAIL, when the server supports it).
``-C FILE``, ``--config FILE``
    The configuration of the server (default: ``$SLIMTA_CONFIG``, else the
    embedded default, whose data directory is ``./slimta-data``).
``-bm`` (the default: send a message), ``-bp`` (list the queue, like ``mailq``).

Accepted and ignored: ``-o`` options other than ``-oi`` (``-oem``, ``-odi``
...), ``-O``, ``-L``, ``-h``, ``-n``, ``-U``, ``-v``, ``-G``, ``-m``. DSN
options (``-N``, ``-R``, ``-V``) and the other modes are refused (status
64) rather than silently ignored.

Addresses without a domain get the server's ``server.hostname``, one of its
local domains by default: ``sendmail root`` reaches the local user ``root``.

Symlinked as ``sendmail`` (``ln -s $(command -v slimta) /usr/sbin/sendmail``)
the ``slimta`` command behaves as this one; set ``SLIMTA_CONFIG`` for it, or
install a two-line script instead::

    #!/bin/sh
    exec /path/to/slimta sendmail --config /etc/slimta/slimta.toml "$@"

Exit statuses (``sysexits.h``): 0 queued; 64 a bad command line or no
recipient; 65 the server refused the sender or the message (too big, ...);
67 the server refused a recipient (the message went to the others); 69 no
listener to connect to; 75 the server is down or answered "try later"; 77
the server refused the sender for policy reasons.
"""

from __future__ import annotations

import email.utils
import getopt
import os
import pwd
import re
import smtplib
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from slimta.cli.config import Config, default_config, load_file
from slimta.cli.control import EX_TEMPFAIL, SUBMIT_SOCKET
from slimta.cli.errors import (
    EX_DATAERR,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_UNAVAILABLE,
    EX_USAGE,
    CliError,
)

__all__ = ["Options", "header_recipients", "parse_args", "read_message", "run_sendmail"]

#: Seconds to wait for each reply of the server.
TIMEOUT = 60.0
#: The name given with EHLO.
EHLO_AS = "localhost"

_SHORT_OPTIONS = "B:b:C:F:f:GiL:h:mN:nO:o:q:R:r:tUV:vX:"
_LONG_OPTIONS = ["config=", "help"]

USAGE = """\
usage: slimta sendmail [-t] [-i] [-f SENDER] [-F NAME] [-B TYPE] [--config FILE] [RECIPIENT ...]

Read a message from standard input and queue it on the running slimta serve.
  -t             recipients from the To, Cc and Bcc headers too (Bcc is removed)
  -f, -r SENDER  the envelope sender ('<>' for none; default: you)
  -F NAME        the full name for the From header added when there is none
  -i, -oi        a line with a single dot does not end the message
  -B TYPE        7BIT or 8BITMIME
  -C, --config FILE   the server's configuration (default: $SLIMTA_CONFIG)
  -bp            list the queue (as slimta queue list)
"""


@dataclass(slots=True)
class Options:
    """A sendmail command line."""

    recipients: list[str] = field(default_factory=list)
    #: ``None``: the user running the command; ``''``: the null sender.
    sender: str | None = None
    full_name: str | None = None
    #: ``-t``.
    from_headers: bool = False
    #: ``-i`` or ``-oi``.
    ignore_dots: bool = False
    #: ``-B``: ``7BIT`` or ``8BITMIME``.
    body_type: str | None = None
    config: str | None = None
    #: ``-bp``: list the queue instead.
    list_queue: bool = False
    help: bool = False


def _usage(message: str) -> CliError:
    return CliError(f"sendmail: {message} (see: slimta sendmail --help)", EX_USAGE)


def parse_args(args: Sequence[str]) -> Options:
    """Read a sendmail command line (getopt syntax: ``-oi``, ``-fme``,
    ``-f me``, ``-ti``, ``--``).

    :raises CliError: ``EX_USAGE`` for an unknown or unsupported option.
    """
    try:
        pairs, rest = getopt.getopt(list(args), _SHORT_OPTIONS, _LONG_OPTIONS)
    except getopt.GetoptError as exc:
        raise _usage(str(exc)) from None
    options = Options(recipients=list(rest))
    for option, value in pairs:
        if option in ("-f", "-r"):
            options.sender = "" if value.strip() in ("", "<>") else value.strip().strip("<>")
        elif option == "-F":
            options.full_name = value
        elif option == "-t":
            options.from_headers = True
        elif option == "-i":
            options.ignore_dots = True
        elif option == "-o":
            if value == "i":
                options.ignore_dots = True
        elif option == "-B":
            if value.upper() not in ("7BIT", "8BITMIME"):
                raise _usage(f"-B {value}: expected 7BIT or 8BITMIME")
            options.body_type = value.upper()
        elif option in ("-C", "--config"):
            options.config = value
        elif option == "-b":
            if value == "p":
                options.list_queue = True
            elif value != "m":
                raise _usage(f"-b{value} is not supported (only -bm and -bp)")
        elif option == "--help":
            options.help = True
        elif option in ("-N", "-R", "-V", "-X", "-q"):
            raise _usage(f"{option} is not supported")
        # -G -L -h -m -n -O -U -v: accepted and ignored (see the module notes).
    return options


def read_message(stream: BinaryIO, ignore_dots: bool) -> bytes:
    """The message on *stream*: up to its end, or without *ignore_dots* up
    to a line holding a single dot (not included)."""
    if ignore_dots:
        return stream.read()
    lines = []
    for line in stream:
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


#: The line break that ends the header block (an empty line follows it).
_HEADER_END = re.compile(rb"\r?\n(?=\r?\n)")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_RECIPIENT_FIELDS = (b"to", b"cc", b"bcc")
_RESENT_FIELDS = (b"resent-to", b"resent-cc", b"resent-bcc")
_REMOVED_FIELDS = (b"bcc", b"resent-bcc")


def _header_fields(header: bytes) -> list[tuple[bytes | None, bytes]]:
    """The header block cut into fields: ``(lower-case name, whole field
    with its continuation lines)``; a line that is no field has no name."""
    fields: list[tuple[bytes | None, bytes]] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, text = fields[-1]
            fields[-1] = (name, text + line)
            continue
        match = _FIELD.match(line)
        fields.append((match.group(1).lower() if match else None, line))
    return fields


def _split(message: bytes) -> tuple[bytes, bytes]:
    """The header block of *message* and the rest (from the empty line on)."""
    if message.startswith((b"\n", b"\r\n")):
        return b"", message
    end = _HEADER_END.search(message)
    if end is None:
        return message, b""
    return message[: end.end()], message[end.end() :]


def header_recipients(message: bytes) -> tuple[list[str], bytes]:
    """For ``-t``: the addresses of the ``To``, ``Cc`` and ``Bcc`` headers
    (the ``Resent-`` ones if any), and *message* without ``Bcc`` and
    ``Resent-Bcc``."""
    header, body = _split(message)
    fields = _header_fields(header)
    resent = any(name in _RESENT_FIELDS for name, _ in fields)
    wanted = _RESENT_FIELDS if resent else _RECIPIENT_FIELDS
    values = []
    for name, text in fields:
        if name in wanted:
            value = text.split(b":", 1)[1]
            values.append(re.sub(r"\r?\n", "", value.decode("utf-8", "surrogateescape")))
    addresses = [address for _, address in email.utils.getaddresses(values) if address]
    kept = b"".join(text for name, text in fields if name not in _REMOVED_FIELDS)
    return addresses, kept + body


def _has_field(message: bytes, wanted: bytes) -> bool:
    header, _ = _split(message)
    return any(name == wanted for name, _ in _header_fields(header))


def qualify(address: str, domain: str) -> str:
    """*address*, with ``@domain`` added when it has no domain."""
    if not address or "@" in address:
        return address
    return f"{address}@{domain}"


def _login() -> tuple[str, str | None]:
    """The name and full name of the user running the command."""
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return os.environ.get("USER") or f"uid{os.getuid()}", None
    gecos = entry.pw_gecos.split(",", 1)[0].strip()
    return entry.pw_name, gecos or None


def _ordered(addresses: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(addresses))


@dataclass(slots=True)
class Submission:
    """What goes to the server."""

    sender: str
    recipients: list[str]
    message: bytes


def prepare(options: Options, message: bytes, domain: str) -> Submission:
    """The envelope and message that *options* and *message* make.

    :raises CliError: ``EX_USAGE`` without any recipient.
    """
    recipients = list(options.recipients)
    if options.from_headers:
        found, message = header_recipients(message)
        recipients += found
    recipients = _ordered(qualify(r.strip().strip("<>"), domain) for r in recipients if r.strip())
    if not recipients:
        where = "in the arguments or the headers" if options.from_headers else "given"
        raise _usage(f"no recipient {where}")
    user, gecos = _login()
    sender = options.sender
    full_name = options.full_name
    if sender is None:
        sender = user
        full_name = full_name or gecos
    sender = qualify(sender, domain)
    if sender and not _has_field(message, b"from"):
        field = email.utils.formataddr((full_name or "", sender), "utf-8")
        message = f"From: {field}\n".encode() + message
    # SMTP wants CRLF line breaks (smtplib adds the dots, not the CRs).
    return Submission(sender, recipients, _LINE_BREAK.sub(b"\r\n", message))


# --- connecting ----------------------------------------------------------------------------


class _UnixSMTP(smtplib.SMTP):
    """SMTP over a Unix socket."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._path = path
        super().__init__(local_hostname=EHLO_AS, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(self._path))
        except BaseException:
            sock.close()
            raise
        return sock


def _tcp_address(config: Config) -> tuple[str, int] | None:
    for listener in config.listeners:
        # Port 0 is any free port: which one, only the running server knows.
        if listener.kind == "smtp" and listener.address[1] != 0:
            host, port = listener.address
            if host in ("", "0.0.0.0"):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
            return host, port
    return None


def _greeted(client: smtplib.SMTP, code: int, text: bytes, where: str) -> smtplib.SMTP:
    """*client*, when the server greeted it with 220."""
    if code == 220:
        return client
    client.close()
    raise CliError(
        f"sendmail: {where} answered {_reply(code, text)}; the message was not sent",
        EX_TEMPFAIL if code < 500 else EX_UNAVAILABLE,
    )


def connect(config: Config, err: TextIO) -> smtplib.SMTP:
    """A session with the server of *config* (see "Where it connects").

    :raises CliError: nobody answers (``EX_TEMPFAIL``).
    """
    path = config.server.data_dir / SUBMIT_SOCKET
    # What failing over TCP too means: the server is down, or ours to use.
    status = EX_TEMPFAIL
    local = _UnixSMTP(path, TIMEOUT)
    try:
        code, text = local.connect()
        return _greeted(local, code, text, str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        reason = f"nothing listens on {path}"
    except PermissionError:
        reason = f"no permission to use {path}"
        status = EX_NOPERM
        print(f"slimta: sendmail: {reason}: sending as an ordinary SMTP client", file=err)
    except (OSError, smtplib.SMTPException) as exc:
        reason = f"{path}: {exc}"
        status = EX_UNAVAILABLE
    address = _tcp_address(config)
    if address is None:
        hint = " (is slimta serve running?)" if status == EX_TEMPFAIL else ""
        raise CliError(
            f"sendmail: cannot reach the mail server: {reason}{hint}; the message was not sent",
            status,
        )
    host, port = address
    client = smtplib.SMTP(local_hostname=EHLO_AS, timeout=TIMEOUT)
    try:
        code, text = client.connect(host, port)
    except (OSError, smtplib.SMTPException) as exc:
        raise CliError(
            f"sendmail: cannot reach the mail server: {reason}; {host}:{port}: {exc} "
            "(is slimta serve running?); the message was not sent",
            EX_TEMPFAIL,
        ) from None
    return _greeted(client, code, text, f"{host}:{port}")


def _reply(code: int, text: bytes) -> str:
    return f"{code} {' '.join(text.decode('utf-8', 'replace').split())}"


def _status_of(code: int, text: bytes, permanent: int) -> int:
    if 400 <= code < 500:
        return EX_TEMPFAIL
    if permanent == EX_DATAERR and b"5.7." in text:
        return EX_NOPERM
    return permanent


def send(client: smtplib.SMTP, submission: Submission, body_type: str | None, err: TextIO) -> int:
    """Hand *submission* over on *client*; :returns: the exit status."""
    message = submission.message
    client.ehlo_or_helo_if_needed()
    options: list[str] = []
    if client.has_extn("size"):
        options.append(f"SIZE={len(message)}")
    eight_bit = body_type == "8BITMIME" or (body_type is None and not message.isascii())
    if eight_bit and client.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    addresses = [submission.sender, *submission.recipients]
    if not all(address.isascii() for address in addresses):
        if not client.has_extn("smtputf8"):
            raise CliError("sendmail: the server does not take non-ASCII addresses", EX_DATAERR)
        options.append("SMTPUTF8")
    code, text = client.mail(submission.sender, options)
    if code != 250:
        raise CliError(
            f"sendmail: the server refused the sender <{submission.sender}>: {_reply(code, text)}",
            _status_of(code, text, EX_DATAERR),
        )
    status = EX_OK
    accepted = []
    for recipient in submission.recipients:
        code, text = client.rcpt(recipient)
        if code in (250, 251):
            accepted.append(recipient)
            continue
        print(f"slimta: sendmail: <{recipient}>: {_reply(code, text)}", file=err)
        if status != EX_NOUSER:
            status = _status_of(code, text, EX_NOUSER)
    if not accepted:
        client.rset()
        raise CliError("sendmail: no recipient was accepted; the message was not sent", status)
    try:
        code, text = client.data(message)
    except smtplib.SMTPDataError as exc:
        error = exc.smtp_error
        code, text = exc.smtp_code, error if isinstance(error, bytes) else error.encode()
    if code != 250:
        raise CliError(
            f"sendmail: the server refused the message: {_reply(code, text)}",
            _status_of(code, text, EX_DATAERR),
        )
    if status != EX_OK:
        print("slimta: sendmail: sent to the other recipients", file=err)
    return status


def _config(path: str | None) -> Config:
    path = path or os.environ.get("SLIMTA_CONFIG") or None
    return default_config() if path is None else load_file(path)


def run_sendmail(args: Sequence[str], stdin: BinaryIO, out: TextIO, err: TextIO) -> int:
    """``slimta sendmail ARGS``; :returns: the exit status.

    :raises CliError: with the words and status of what failed.
    """
    options = parse_args(args)
    if options.help:
        out.write(USAGE)
        return EX_OK
    if options.list_queue:
        from slimta.cli.queuetool import run_queue

        return run_queue("list", options.config or os.environ.get("SLIMTA_CONFIG") or None)
    if not options.from_headers and not options.recipients:
        raise _usage("no recipient given")  # before waiting for the message
    config = _config(options.config)
    message = read_message(stdin, options.ignore_dots)
    submission = prepare(options, message, config.server.hostname)
    client = connect(config, err)
    try:
        return send(client, submission, options.body_type, err)
    except (OSError, smtplib.SMTPException) as exc:
        raise CliError(
            f"sendmail: lost the connection to the server ({exc}); the message was not sent",
            EX_TEMPFAIL,
        ) from None
    finally:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()
