"""Structured, machine-parseable log lines on top of stdlib :mod:`logging`.

Every line logged through these helpers has the shape::

    <type>:<id>:<operation>[ key=value ...]

for example ``fd:7:recv data=b'EHLO there\\r\\n'``. Keys are sorted, and each
value is the :func:`repr` of the Python object, cut to at most 100 characters
per string so that one huge message body cannot flood the log. A truncated
string or bytes value keeps its head and tail around ``...`` and is still a
valid literal, so :func:`parseline` can read every line back.

Loggers are named after the modules that use them (``slimta.edge.smtp``,
``slimta.queue`` ...), so the usual :mod:`logging` configuration applies.

The mail log is apart from these lines: one Postfix-like line per session
and delivery event, with the queue id, on the loggers ``slimta.maillog.edge``
and ``slimta.maillog.queue`` (:mod:`slimta.logging.maillog`), and
:class:`~slimta.logging.jsonformat.JsonFormatter` writes any record as a
JSON line.

.. warning::

   These helpers log what they are given. Callers must mask secrets (AUTH
   credentials, passwords, tokens) before passing data in; see
   :class:`~slimta.logging.socket.SocketLogger`.

"""

from __future__ import annotations

import ast
import logging
import re
import reprlib
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimta.logging.http import HttpLogger
    from slimta.logging.queuestorage import QueueStorageLogger
    from slimta.logging.socket import SocketLogger
    from slimta.logging.subprocess import SubprocessLogger

__all__ = [
    "getHttpLogger",
    "getQueueStorageLogger",
    "getSocketLogger",
    "getSubprocessLogger",
    "log_exception",
    "logline",
    "parseline",
]

#: Longest repr of one string (or bytes, int, or other object) in a line.
_MAX_VALUE_CHARS = 100

#: Characters of a shortened repr that are not the value's: ``b''`` and ``...``.
_REPR_OVERHEAD = 6

#: Longest repr of the ``traceback`` list logged by :func:`log_exception`.
_MAX_TRACEBACK_CHARS = 10_000

#: Longest repr of one line of that traceback.
_MAX_TRACEBACK_LINE_CHARS = 1_000

#: Level of each :class:`logging.Logger` method that :func:`logline` may be
#: handed, so it can skip all formatting when the level is disabled.
_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _shorten(value: str | bytes, limit: int) -> str:
    """Repr of *value* in at most *limit* characters that is still a literal.

    Cutting the repr text itself (as :mod:`reprlib` does) can split an escape
    sequence such as ``\\x00``; cutting the value and then taking its repr
    never does.
    """
    # A repr is at least two characters longer than its value, so a long value
    # (a whole message body, say) is never repr'd in full.
    if len(value) + 2 <= limit:
        text = repr(value)
        if len(text) <= limit:
            return text
    keep = min(limit, len(value)) // 2
    while True:
        # Only the value's two ends are copied, so huge values stay cheap.
        if isinstance(value, bytes):
            text = repr(value[:keep] + b"..." + value[len(value) - keep :])
        else:
            text = repr(value[:keep] + "..." + value[len(value) - keep :])
        if len(text) <= limit or keep == 0:
            return text
        # Scale by how far over the limit the repr is (escapes such as \\x00
        # cost four characters each); shrinking by at least one always ends.
        room = limit - _REPR_OVERHEAD
        keep = max(0, min(keep - 1, keep * room // (len(text) - _REPR_OVERHEAD)))


class _LogRepr(reprlib.Repr):
    """A :class:`reprlib.Repr` whose output :func:`ast.literal_eval` accepts.

    Strings and bytes are shortened safely (see :func:`_shorten`), dicts mark
    omitted items with ``...: ...``, and reprs of other objects never contain
    a raw line break (which would let a peer forge log lines).
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxstring = limit
        self.maxother = limit
        self.maxlong = limit
        self.maxlist = 16
        self.maxtuple = 16
        self.maxset = 16
        self.maxfrozenset = 16
        self.maxdeque = 16
        self.maxdict = 16

    def repr_str(self, x: str, level: int) -> str:
        return _shorten(x, self.maxstring)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return _shorten(x, self.maxstring)

    def repr_dict(self, x: dict[Any, Any], level: int) -> str:
        if not x:
            return "{}"
        if level <= 0:
            return "{...: ...}"
        pieces = []
        for count, (key, value) in enumerate(x.items()):
            if count == self.maxdict:
                pieces.append("...: ...")
                break
            pieces.append(f"{self.repr1(key, level - 1)}: {self.repr1(value, level - 1)}")
        return "{" + ", ".join(pieces) + "}"

    def repr_instance(self, x: object, level: int) -> str:
        if isinstance(x, str | bytes):  # subclasses, which repr1 does not dispatch
            return _shorten(x, self.maxstring)
        try:
            text = repr(x)
        except Exception:
            return f"<{type(x).__name__} instance at {id(x):#x}>"
        text = text.replace("\r", "\\r").replace("\n", "\\n")
        if len(text) > self.maxother:
            head = (self.maxother - 3) // 2
            tail = self.maxother - 3 - head
            text = text[:head] + "..." + text[len(text) - tail :]
        return text


_log_repr = _LogRepr(_MAX_VALUE_CHARS)
_traceback_line_repr = _LogRepr(_MAX_TRACEBACK_LINE_CHARS)


def _format_line(type: str, typeid: object, operation: str, values: dict[str, str]) -> str:
    """Join a line from already-repr'd *values*, keys sorted."""
    head = f"{type}:{typeid}:{operation}"
    if not values:
        return head
    pairs = " ".join(f"{key}={values[key]}" for key in sorted(values))
    return f"{head} {pairs}"


def _is_disabled(log_func: Callable[..., object]) -> bool:
    """True if *log_func* is a bound logger method whose level is disabled."""
    owner = getattr(log_func, "__self__", None)
    if not isinstance(owner, logging.Logger | logging.LoggerAdapter):
        return False
    level = _METHOD_LEVELS.get(getattr(log_func, "__name__", ""))
    return level is not None and not owner.isEnabledFor(level)


def logline(
    log_func: Callable[[str], object],
    type: str,
    typeid: object,
    operation: str,
    /,
    **data: object,
) -> None:
    """Log one structured line through *log_func*.

    The line is ``<type>:<typeid>:<operation>`` followed by `` key=value``
    for each item of *data*, sorted by key, each value shown by a
    :mod:`reprlib` repr of at most 100 characters per string.

    When *log_func* is a method of a :class:`logging.Logger` (such as
    ``log.debug``) whose level is disabled, nothing is formatted at all.

    :param log_func: Called with the finished line, e.g. ``log.debug``.
    :param type: What the line is about, e.g. ``'fd'`` or ``'queue'``.
    :param typeid: Which one, e.g. a file descriptor or a message id.
    :param operation: What happened, e.g. ``'recv'``.
    :param data: Details; keys must be identifiers. Never pass secrets.

    .. versionchanged:: 4.0
       The four leading parameters are positional-only, so a detail may be
       called ``type`` or ``operation``.
    """
    if _is_disabled(log_func):
        return
    values = {key: _log_repr.repr(value) for key, value in data.items()}
    log_func(_format_line(type, typeid, operation, values))


_LINE_PATTERN = re.compile(r"(\w+):(\S*):(\w+)(?: (.*))?", re.DOTALL)
_KEY_PATTERN = re.compile(r"(\w+)=")
_BOUNDARY_PATTERN = re.compile(r" (?=\w+=)")


def _literal(text: str) -> tuple[bool, object]:
    try:
        return True, ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _parse_data(text: str) -> dict[str, object]:
    data: dict[str, object] = {}
    pos = 0
    while pos < len(text):
        match = _KEY_PATTERN.match(text, pos)
        if match is None:
            raise ValueError(f"expected key=value at {text[pos:]!r}")
        start = match.end()
        # A value ends at a " key=" that is not inside it, or at the end of the
        # line; the first candidate that is a complete literal is the value.
        ends = [boundary.start() for boundary in _BOUNDARY_PATTERN.finditer(text, start)]
        ends.append(len(text))
        for end in ends:
            ok, value = _literal(text[start:end])
            if ok:
                break
        else:
            end = ends[0]
            value = text[start:end]
        data[match.group(1)] = value
        pos = end + 1
    return data


def parseline(line: str) -> tuple[str, str, str, dict[str, object]]:
    """Read back a line written by :func:`logline`.

    Values are recovered with :func:`ast.literal_eval`, so strings, bytes,
    numbers, ``None``, tuples, lists, sets and dicts come back as objects
    (truncated strings keep their ``...``). A value that is not a literal,
    such as the repr of an arbitrary object, comes back as its text, up to
    the next `` key=``.

    :param line: One log message (without any formatter prefix).
    :returns: ``(type, id, operation, data)``; the id is a string.
    :raises ValueError: The line does not have the ``type:id:operation``
        shape, or its details are not ``key=value`` pairs.
    """
    match = _LINE_PATTERN.fullmatch(line)
    if match is None:
        raise ValueError(f"not a slimta log line: {line!r}")
    type, typeid, operation, rest = match.groups()
    data = _parse_data(rest) if rest else {}
    return type, typeid, operation, data


def _traceback_repr(lines: Iterable[str]) -> str:
    """Repr of a list of traceback lines in at most 10,000 characters.

    The most recent frames matter most, so the oldest ones are dropped first.
    """
    pieces = [_traceback_line_repr.repr(line) for line in lines]
    marker = repr("...")
    budget = _MAX_TRACEBACK_CHARS - len("[]") - len(marker) - len(", ")
    kept: list[str] = []
    for piece in reversed(pieces):
        cost = len(piece) + len(", ")
        if cost > budget:
            break
        kept.append(piece)
        budget -= cost
    kept.reverse()
    if len(kept) < len(pieces):
        kept.insert(0, marker)
    return "[" + ", ".join(kept) + "]"


def log_exception(name: str, /, **kwargs: object) -> None:
    """Log the exception being handled, with its traceback, at ERROR.

    The line is ``exception:<ExcType>:unhandled`` with ``args``, ``message``,
    ``traceback`` (a list of lines, newest frames kept when over 10,000
    characters) and the given *kwargs*. Outside an ``except`` block this
    does nothing.

    slimta calls this as ``slimta.logging.log_exception(...)``, looking the
    name up at call time, so an application may assign its own function to
    ``slimta.logging.log_exception`` (for example one that reports to an error
    tracker).

    :param name: Name of the logger to use, usually ``__name__``.
    :param kwargs: Extra details for the line. Never pass secrets.
    """
    exc = sys.exc_info()[1]
    if exc is None:
        return
    log = logging.getLogger(name)
    if not log.isEnabledFor(logging.ERROR):
        return
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {type(exc).__name__}>"
    values = {key: _log_repr.repr(value) for key, value in kwargs.items()}
    values["args"] = _log_repr.repr(exc.args)
    values["message"] = _log_repr.repr(message)
    values["traceback"] = _traceback_repr(traceback.format_exception(exc))
    log.error(_format_line("exception", type(exc).__name__, "unhandled", values))


def getSocketLogger(name: str) -> SocketLogger:
    """Return a :class:`~slimta.logging.socket.SocketLogger` for logger *name*.

    :param name: Logger name, usually ``__name__``.
    """
    from slimta.logging.socket import SocketLogger

    return SocketLogger(logging.getLogger(name))


def getSubprocessLogger(name: str) -> SubprocessLogger:
    """Return a :class:`~slimta.logging.subprocess.SubprocessLogger` for *name*.

    :param name: Logger name, usually ``__name__``.
    """
    from slimta.logging.subprocess import SubprocessLogger

    return SubprocessLogger(logging.getLogger(name))


def getQueueStorageLogger(name: str) -> QueueStorageLogger:
    """Return a :class:`~slimta.logging.queuestorage.QueueStorageLogger`.

    :param name: Logger name, usually ``__name__``.
    """
    from slimta.logging.queuestorage import QueueStorageLogger

    return QueueStorageLogger(logging.getLogger(name))


def getHttpLogger(name: str) -> HttpLogger:
    """Return a :class:`~slimta.logging.http.HttpLogger` for logger *name*.

    :param name: Logger name, usually ``__name__``.
    """
    from slimta.logging.http import HttpLogger

    return HttpLogger(logging.getLogger(name))
