"""Where ``slimta serve`` logs: standard error, one line per event.

``server.log_format`` (``--log-format``) chooses the line: ``text``
(:data:`LOG_FORMAT`) or ``json`` (one object per line:
:class:`slimta.logging.jsonformat.JsonFormatter`).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOG_FORMAT", "LOG_FORMATS", "configure_logging", "set_format", "set_level"]

#: The plain-text line: time, level, logger, message.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The values of ``server.log_format``.
LOG_FORMATS = ("text", "json")


def _formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        from slimta.logging.jsonformat import JsonFormatter

        return JsonFormatter()
    return logging.Formatter(LOG_FORMAT)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Send every logger's lines of *level* (``debug`` ... ``error``) and
    above to standard error, as *log_format* (``text`` or ``json``) lines."""
    # Neither line format shows them, and under gevent the thread name
    # costs a dummy Thread object for every greenlet's first line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """Change the least important level logged (on reload, say)."""
    logging.getLogger().setLevel(level.upper())


def set_format(log_format: str) -> None:
    """Change how lines are written (on reload, say)."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_formatter(log_format))
