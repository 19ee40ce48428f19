"""The ``slimta`` command: a ready-to-run MTA built on the library's public API.

``slimta serve`` runs the server (the embedded default, or ``--config
FILE``); ``slimta check-config FILE`` reports every problem of a file;
``slimta example-config`` prints a commented file covering every key;
``slimta passwd`` makes a password hash for ``[users]``.

Each subcommand is one function that adds its parser (the ``_add_*``
functions below, listed in :data:`_SUBCOMMANDS`) and one that runs it; the
modules behind them are imported only when they run, so that ``serve`` can
let gevent patch the standard library before anything imports :mod:`ssl`.

Every user error ends as one line ``slimta: <what>`` on standard error and a
``sysexits.h`` status (:mod:`slimta.cli.errors`), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from slimta.cli.errors import EX_CONFIG, EX_OK, EX_USAGE, CliError, ConfigInvalid

__all__ = ["main"]

_LOG_LEVELS = ("debug", "info", "warning", "error")


class _Usage(Exception):
    """A command-line mistake found by argparse."""


class _Parser(argparse.ArgumentParser):
    """argparse, with ``EX_USAGE`` (64) rather than 2 for a bad command line."""

    def error(self, message: str) -> NoReturn:
        raise _Usage(f"{message} (see: {self.prog} --help)")


# --- serve -----------------------------------------------------------------------


def _listen_address(text: str) -> tuple[str, int]:
    from slimta.cli.schema import Address, Mismatch

    try:
        address = Address().parse(text, Path())
    except Mismatch as exc:
        raise argparse.ArgumentTypeError(
            f"expected {exc.what or Address.what}, got {text!r}"
        ) from None
    assert isinstance(address, tuple)
    return address


def _add_serve(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "serve",
        help="run the mail server",
        description="Run the mail server: the embedded default configuration "
        "(SMTP on 127.0.0.1:2525, queue and mailboxes under ./slimta-data), or --config FILE.",
    )
    parser.add_argument("--config", metavar="FILE", help="the TOML configuration file")
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        type=_listen_address,
        help="listen for plain SMTP here instead of the configured listeners (repeatable)",
    )
    parser.add_argument("--log-level", choices=_LOG_LEVELS, help="overrides server.log_level")
    parser.add_argument("--user", help="switch to this user after binding (overrides server.user)")
    parser.add_argument("--group", help="switch to this group (overrides server.group)")
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="overrides server.log_format"
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_listen_address,
        help="serve Prometheus metrics at http://HOST:PORT/metrics "
        "(needs the prometheus_client package)",
    )
    parser.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    # gevent must patch the standard library before ssl and socket are used.
    from gevent import monkey

    monkey.patch_all()
    from slimta.cli.serve import Overrides, serve

    overrides = Overrides(
        listen=tuple(args.listen or ()),
        user=args.user,
        group=args.group,
        log_level=args.log_level,
        log_format=args.log_format,
        metrics=args.metrics,
    )
    return serve(args.config, overrides)


# --- check-config, example-config -------------------------------------------------


def _add_check_config(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "check-config",
        help="check a configuration file",
        description="Check a configuration file: every key, value and file it names. "
        "Prints each problem as FILE: KEY: WHAT, or what the server would do.",
    )
    parser.add_argument("file", metavar="FILE")
    parser.set_defaults(run=_run_check_config)


def _run_check_config(args: argparse.Namespace) -> int:
    from slimta.cli.build import build, listener_auth
    from slimta.cli.config import load_file
    from slimta.cli.summary import describe, warnings

    config = load_file(args.file)
    build(config)
    print(f"{args.file}: ok")
    auth_of = {listener.name: listener_auth(listener, config) for listener in config.listeners}
    for line in describe(config, auth_of):
        print(f"  {line}")
    for warning in warnings(config):
        print(f"  WARNING: {warning}")
    return EX_OK


def _add_example_config(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "example-config",
        help="print a commented configuration file",
        description="Print a commented configuration file covering every key.",
    )
    parser.set_defaults(run=_run_example_config)


def _run_example_config(args: argparse.Namespace) -> int:
    from slimta.cli.example import render_example

    sys.stdout.write(render_example())
    return EX_OK


# --- passwd ---------------------------------------------------------------------


def _add_passwd(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "passwd",
        help="make a password hash for [users]",
        description="Read a password (twice, from the terminal) and print its salted "
        'hash; with ADDRESS, the whole [users] line ("ADDRESS" = "HASH").',
    )
    parser.add_argument("address", metavar="ADDRESS", nargs="?")
    parser.add_argument(
        "--stdin", action="store_true", help="read the password, once, from standard input"
    )
    parser.set_defaults(run=_run_passwd)


def _run_passwd(args: argparse.Namespace) -> int:
    from slimta.cli.passwd import run_passwd

    run_passwd(args.address, args.stdin, sys.stdout)
    return EX_OK


# --- queue, sendmail, setup ------------------------------------------------------------

_CONFIG_HELP = "the server's configuration file (default: the embedded default, ./slimta-data)"


def _add_queue(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "queue",
        help="list, show, flush, remove, hold or release queued mail",
        description="Look at and change the queue, while the server runs (through its "
        "control socket) or not (in the queue files; flush needs the server).",
    )
    actions = parser.add_subparsers(
        title="actions", metavar="ACTION", required=True, parser_class=_Parser
    )
    described = {
        "list": "list the queued messages: id, age, size, attempts, state, sender, "
        "recipients and last error",
        "show": "show a message: its envelope, headers and body",
        "flush": "attempt a message (or every message) now",
        "remove": "delete a message",
        "hold": "keep a message from being attempted until released (kept across restarts)",
        "release": "let a held message be attempted again, now",
    }
    for name, text in described.items():
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        action.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
        if name == "list":
            action.add_argument("--json", action="store_true", help="print JSON")
        elif name == "flush":
            action.add_argument("id", metavar="ID", nargs="?", help="the queue id (default: all)")
        else:
            action.add_argument("id", metavar="ID", help="the queue id")
        if name == "show":
            action.add_argument("--headers", action="store_true", help="without the body")
        action.set_defaults(run=_run_queue, action=name)


def _run_queue(args: argparse.Namespace) -> int:
    from slimta.cli.queuetool import run_queue

    return run_queue(
        args.action,
        args.config,
        getattr(args, "id", None),
        as_json=getattr(args, "json", False),
        headers_only=getattr(args, "headers", False),
    )


def _add_sendmail(commands: argparse._SubParsersAction[_Parser]) -> None:
    # Only for --help: main() hands "slimta sendmail ..." to the sendmail
    # option parser (-oi, -fSENDER), which argparse cannot read.
    commands.add_parser(
        "sendmail",
        help="queue a message from standard input (sendmail options: -t -f -i -F; "
        "see: slimta sendmail --help)",
        add_help=False,
    )


def _run_sendmail(args: argparse.Namespace) -> int:
    from slimta.cli.sendmail import run_sendmail

    return run_sendmail(args.sendmail_args, sys.stdin.buffer, sys.stdout, sys.stderr)


def _add_setup(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "setup",
        help="print the files that install slimta as a service",
        description="Print the files that install slimta as a service.",
    )
    kinds = parser.add_subparsers(
        title="kinds", metavar="KIND", required=True, parser_class=_Parser
    )
    systemd = kinds.add_parser(
        "systemd",
        help="print a systemd unit file",
        description="Print a systemd unit file for slimta serve (save it as "
        "/etc/systemd/system/slimta.service).",
    )
    systemd.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    systemd.add_argument("--user", metavar="USER", help="the user the server switches to")
    systemd.set_defaults(run=_run_setup_systemd)


def _run_setup_systemd(args: argparse.Namespace) -> int:
    from slimta.cli.systemd import run_setup_systemd

    sys.stdout.write(run_setup_systemd(args.config, args.user))
    return EX_OK


# --- the command ------------------------------------------------------------------

#: The subcommands, in the order of ``slimta --help``.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[_Parser]], None]] = [
    _add_serve,
    _add_check_config,
    _add_example_config,
    _add_passwd,
    _add_queue,
    _add_sendmail,
    _add_setup,
]


def _parser() -> _Parser:
    parser = _Parser(
        prog="slimta",
        description="slimta: a mail server (SMTP, a disk queue, Maildir and relay delivery).",
    )
    commands = parser.add_subparsers(
        title="commands", metavar="COMMAND", required=True, parser_class=_Parser
    )
    for add in _SUBCOMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``slimta`` command.

    Run as ``sendmail`` (a symlink of that name), it is ``slimta sendmail``.

    :param argv: the arguments (default ``sys.argv[1:]``).
    :returns: the exit status (``sysexits.h``).
    """
    if argv is None:
        argv = sys.argv[1:]
        if Path(sys.argv[0]).name == "sendmail":
            argv = ["sendmail", *argv]
    try:
        if list(argv[:1]) == ["sendmail"]:
            # sendmail's own option syntax; see _add_sendmail.
            args = argparse.Namespace(run=_run_sendmail, sendmail_args=list(argv[1:]))
        else:
            args = _parser().parse_args(argv)
    except _Usage as exc:
        print(f"slimta: {exc}", file=sys.stderr)
        return EX_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except ConfigInvalid as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        print(f"slimta: {exc.message}", file=sys.stderr)
        return EX_CONFIG
    except CliError as exc:
        print(f"slimta: {exc.message}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
