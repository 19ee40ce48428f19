"""Where ``slimta serve`` logs: standard error, one line per event.

(``--log-format json`` will choose another formatter here.)
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOG_FORMAT", "configure_logging", "set_level"]

#: The plain-text line: time, level, logger, message.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Send every logger's lines of *level* (``debug`` ... ``error``) and
    above to standard error."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """Change the least important level logged (on reload, say)."""
    logging.getLogger().setLevel(level.upper())
