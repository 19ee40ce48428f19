"""``slimta passwd``: make the password hash a ``[users]`` entry holds.

The hash is :func:`slimta.lookup.auth.hash_password`'s salted scrypt string
(``$scrypt$ln=14,r=8,p=5$<salt>$<key>``), the one the server's AUTH checks
with :class:`slimta.lookup.auth.LookupAuth` (a constant-time comparison,
and as slow for an unknown user as for a known one).
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import TextIO

from slimta.cli.errors import EX_DATAERR, EX_NOINPUT, CliError
from slimta.cli.schema import MailAddress, Mismatch, toml_value
from slimta.lookup.auth import hash_password

__all__ = ["make_hash", "read_password", "run_passwd"]


def make_hash(password: str) -> str:
    """The ``[users]`` value for *password*.

    :raises CliError: the password is empty or SASLprep refuses it.
    """
    if not password:
        raise CliError("the password is empty", EX_DATAERR)
    try:
        return hash_password(password)
    except ValueError as exc:
        raise CliError(f"this password cannot be used: {exc}", EX_DATAERR) from None


def read_password(from_stdin: bool, stdin: TextIO | None = None) -> str:
    """The new password: one line of standard input, or asked twice on the
    terminal (without echo).

    :raises CliError: nothing was read, or the two entries differ.
    """
    if from_stdin:
        line = (stdin or sys.stdin).readline()
        if not line:
            raise CliError("no password on standard input", EX_NOINPUT)
        return line.rstrip("\r\n")
    try:
        first = getpass.getpass("New password: ")
        second = getpass.getpass("Repeat it: ")
    except (EOFError, KeyboardInterrupt):
        raise CliError("no password entered", EX_NOINPUT) from None
    if first != second:
        raise CliError("the passwords do not match", EX_DATAERR)
    return first


def run_passwd(address: str | None, from_stdin: bool, out: TextIO) -> None:
    """Print the hash, or with *address* a whole ``[users]`` line.

    :raises CliError: see :func:`read_password` and :func:`make_hash`; a
        malformed *address*.
    """
    if address is not None:
        try:
            address = str(MailAddress().parse(address, Path()))
        except Mismatch:
            raise CliError(
                f"{address!r} is not an address such as alice@example.com", EX_DATAERR
            ) from None
    hashed = make_hash(read_password(from_stdin))
    if address is None:
        print(hashed, file=out)
    else:
        print(f"{toml_value(address)} = {toml_value(hashed)}", file=out)
