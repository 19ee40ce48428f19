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
    # Colleagues: --log-format json and --metrics HOST:PORT go here.
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


# --- the command ------------------------------------------------------------------

#: The subcommands, in the order of ``slimta --help``.
#: Colleagues: sendmail, queue (list, show, flush, remove, hold, release) and
#: setup (systemd) are added here, each as one _add_* function.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[_Parser]], None]] = [
    _add_serve,
    _add_check_config,
    _add_example_config,
    _add_passwd,
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

    :param argv: the arguments (default ``sys.argv[1:]``).
    :returns: the exit status (``sysexits.h``).
    """
    try:
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
