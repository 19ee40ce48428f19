"""JSON lines: one object per log record, for log collectors.

:class:`JsonFormatter` is a :class:`logging.Formatter` that writes each
record as one line of JSON::

    {"time": "2024-05-01T12:00:00.123Z", "level": "INFO",
     "logger": "slimta.maillog.queue", "message": "id=... status=sent (250 ...)",
     "event": "delivery", "id": "...", "to": "b@b.test", "status": "sent", ...}

(on one line). ``time`` is UTC, ISO 8601 with milliseconds. Every attribute
a record was given with ``extra=`` follows the four fixed keys, so the
fields of the mail log (:mod:`slimta.logging.maillog`) come out as keys of
their own. An exception or stack logged with the record is added as
``exc_info`` or ``stack_info`` text. The output is ASCII: anything else is
escaped, so a peer's bytes cannot break a line.

.. versionadded:: 4.0
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

__all__ = ["JsonFormatter"]

#: Attributes every :class:`logging.LogRecord` has; the others came with ``extra=``.
_STANDARD = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def _plain(value: Any) -> Any:
    """*value* if JSON holds it as it is, else its text."""
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object on one line (see the module notes)."""

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        millis = int(record.msecs)
        out: dict[str, Any] = {
            "time": f"{stamp}.{millis:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = _plain(value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)
