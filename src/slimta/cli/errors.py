"""How the ``slimta`` command fails: one line of words and a ``sysexits.h`` status.

Every error a user can cause is raised as :class:`CliError` (or, for a
configuration file, :class:`ConfigInvalid`, which holds every problem found)
and :func:`slimta.cli.main` prints it as ``slimta: <what>`` and returns its
status. Tracebacks are for bugs only.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EX_CANTCREAT",
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_NOINPUT",
    "EX_NOPERM",
    "EX_NOUSER",
    "EX_OK",
    "EX_OSERR",
    "EX_SOFTWARE",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "CliError",
    "ConfigInvalid",
    "Problem",
]

# sysexits.h, written out: os.EX_* exists only on Unix, and these values are
# the same everywhere they exist.
#: Success.
EX_OK = 0
#: The command line was wrong.
EX_USAGE = 64
#: Input data was wrong (a password that does not match its repetition).
EX_DATAERR = 65
#: An input file could not be opened or read.
EX_NOINPUT = 66
#: A user named on the command line or in the configuration does not exist.
EX_NOUSER = 67
#: A service is unavailable (an address already in use).
EX_UNAVAILABLE = 69
#: An internal error (a bug).
EX_SOFTWARE = 70
#: An operating system error.
EX_OSERR = 71
#: A file or directory could not be created or written.
EX_CANTCREAT = 73
#: Not permitted (a privileged port, or switching user, as a normal user).
EX_NOPERM = 77
#: The configuration is invalid.
EX_CONFIG = 78


class CliError(Exception):
    """A user error: :attr:`message` is printed after ``slimta:``.

    :param message: what went wrong, in words, on one line.
    :param status: the process exit status (a ``sysexits.h`` value).
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a configuration file.

    :param path: the key, dotted as in the file (``server.hostname``,
        ``listeners.main.address``, ``users."bob@example.com"``); empty for
        the file as a whole.
    :param message: what is wrong, usually ``expected <what>, got <value>``.
    """

    path: str
    message: str

    def render(self, source: str) -> str:
        """The line printed for this problem in the file *source*."""
        if self.path:
            return f"{source}: {self.path}: {self.message}"
        return f"{source}: {self.message}"


class ConfigInvalid(CliError):
    """A configuration file with one or more problems.

    :param source: the file's name as the user gave it.
    :param problems: every problem found, in file order where known.
    """

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        count = len(problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"{source}: {count} {noun} in the configuration", EX_CONFIG)

    def lines(self) -> list[str]:
        """One line per problem, each naming the file and the key."""
        return [problem.render(self.source) for problem in self.problems]
