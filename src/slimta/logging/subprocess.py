"""Log lines about child processes, such as those run by pipe relays.

Every line has type ``pid`` and the process id as its id, e.g.
``pid:4242:exit returncode=0``.
"""

from __future__ import annotations

import logging
from typing import Protocol

from slimta.logging import logline

__all__ = ["SubprocessLogger"]


class _Process(Protocol):
    """What the logger reads from a :class:`subprocess.Popen`."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...


class SubprocessLogger:
    """Writes ``pid`` lines about child processes to a :class:`logging.Logger`.

    All lines are at DEBUG; nothing is formatted when DEBUG is disabled.

    :param log: Where the lines go, usually ``logging.getLogger(__name__)``.
    """

    def __init__(self, log: logging.Logger) -> None:
        #: The underlying logger.
        self.log = log

    def popen(self, p: _Process, args: object) -> None:
        """Log that process *p* was started with *args*.

        :param p: The started process.
        :param args: Its command line.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "pid", p.pid, "popen", args=args)

    def stdio(self, p: _Process, stdin: object, stdout: object, stderr: object) -> None:
        """Log what was written to and read from process *p*.

        :param p: The process.
        :param stdin: The data sent to its standard input.
        :param stdout: The data read from its standard output.
        :param stderr: The data read from its standard error.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(
                self.log.debug, "pid", p.pid, "stdio", stdin=stdin, stdout=stdout, stderr=stderr
            )

    def exit(self, p: _Process) -> None:
        """Log that process *p* finished, with its ``returncode``.

        :param p: The finished process.
        """
        if self.log.isEnabledFor(logging.DEBUG):
            logline(self.log.debug, "pid", p.pid, "exit", returncode=p.returncode)
