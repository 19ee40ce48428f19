"""The mail log: one line per event in a message's life, like Postfix's maillog.

Two loggers carry the lines, so that they can be routed or filtered by name
apart from the ``fd:``/``queue:`` lines of the other :mod:`slimta.logging`
modules (whose formats do not change):

``slimta.maillog.edge`` (:data:`EDGE`), from :class:`~slimta.edge.smtp.SmtpEdge`::

    connect from [192.0.2.7]:40512
    tls from [192.0.2.7]:40512 protocol=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384
    reject: RCPT from [192.0.2.7]:40512: 550 5.7.1 relaying denied; from=<a@a.test>
        to=<b@b.test> helo=<client.test>
    id=5f0c... from=<a@a.test> size=1234 nrcpt=1 client=192.0.2.7 proto=ESMTPS
        helo=<client.test>
    disconnect from [192.0.2.7]:40512 tls=yes protocol=TLSv1.3
        cipher=TLS_AES_256_GCM_SHA384 messages=1 rejects=1 duration=0.050

(each on one line). ``reject`` names the command refused (``CONNECT`` for a
refused greeting, ``EHLO``, ``HELO``, ``AUTH``, ``MAIL``, ``RCPT``, ``DATA``,
``END-OF-MESSAGE`` for the message itself) and the reply sent; the
``accepted`` line (the one beginning ``id=``) comes once per queue id the
message was stored as.

``slimta.maillog.queue`` (:data:`QUEUE`), from :class:`~slimta.queue.Queue`,
one ``delivery`` line per recipient and attempt::

    id=5f0c... to=<b@b.test> relay=mx.b.test:25 delay=0.12 attempt=1 status=sent (250 2.0.0 Ok)
    id=5f0c... to=<b@b.test> relay=mx.b.test:25 delay=0.12 attempt=1 retry=300
        status=deferred (451 4.3.0 ...)
    id=5f0c... to=<b@b.test> relay=none delay=0.12 attempt=1 status=bounced (550 5.1.1 ...)
    id=5f0c... to=<b@b.test> relay=none delay=432000.00 attempt=42
        status=expired (451 ... (Too many retries))
    id=5f0c... bounce_id=9a3e...
    id=5f0c... removed

(each on one line). ``expired`` is a recipient given up after transient
failures (the queue's *backoff* said no more); ``bounced`` one refused for
good.

``relay`` is where the reply came from (the ``address`` of the
:class:`~slimta.smtp.reply.Reply`, ``host:port`` for SMTP relays), ``none``
when the relay does not say; ``delay`` is the seconds since the message was
received; ``retry`` the seconds until the next attempt.

Lines are logged at INFO, except ``deferred``, ``bounced`` and ``expired``
deliveries at WARNING, and ``removed`` at DEBUG (the delivery lines already
say when a message is done; one line fewer per message). Every record also
carries the line's fields as attributes (passed with ``extra=``): ``event``
(``connect``, ``tls``, ``reject``, ``accepted``, ``disconnect``,
``delivery``, ``bounce``, ``removed``) and the ``key=value`` items of the
line, with ``reply`` and ``code`` for the reply in parentheses. A formatter
that writes a record's extra attributes, such as
:class:`slimta.logging.jsonformat.JsonFormatter`, writes them too. The
records do not name a source line (``lineno`` 0): finding it would cost
more than the rest of the record.

Values a peer chose (addresses, EHLO names, remote replies) have their
control characters replaced by ``?`` in the text, so that they cannot forge
lines; the fields keep them as they were.

:func:`add_listener` registers a function called with each event and its
fields whatever the log level, for counters such as those of
``slimta serve --metrics``. With no listener and the logger disabled for a
level, events of that level cost one level check.

.. versionadded:: 4.0
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from slimta import logging as slogging

__all__ = [
    "EDGE",
    "QUEUE",
    "Listener",
    "MailLog",
    "add_listener",
    "remove_listener",
    "render",
    "reply_text",
]

#: Logger of session events: connect, tls, reject, accepted, disconnect.
EDGE = "slimta.maillog.edge"
#: Logger of queue events: delivery, bounce, removed.
QUEUE = "slimta.maillog.queue"

#: ``listener(event, fields)``, called for every event.
Listener = Callable[[str, Mapping[str, Any]], None]

_listeners: list[Listener] = []


def add_listener(listener: Listener) -> None:
    """Call *listener* ``(event, fields)`` for every mail-log event.

    Listeners run in the greenlet that has the event, before the line is
    logged, whatever the log level. They must be quick and must not keep
    *fields*, which may be reused. An exception from one is logged and
    otherwise ignored.
    """
    _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    """Stop calling *listener*; nothing happens if it was not added."""
    if listener in _listeners:
        _listeners.remove(listener)


class MailLog:
    """Emits the events of one mail-log logger.

    Callers check :meth:`wanted` before building an event's fields, so that
    a disabled logger costs a level check and nothing more.

    :param name: the logger's name, :data:`EDGE` or :data:`QUEUE`.
    """

    __slots__ = ("logger",)

    def __init__(self, name: str) -> None:
        #: The :class:`logging.Logger` the lines go to.
        self.logger = logging.getLogger(name)

    def wanted(self, level: int = logging.INFO) -> bool:
        """True when an event at *level* would be logged or listened to."""
        return bool(_listeners) or self.logger.isEnabledFor(level)

    def emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        """Hand *event* to the listeners and log its line at *level*.

        :param level: e.g. :data:`logging.INFO`.
        :param event: the event's name, e.g. ``'delivery'``.
        :param fields: the event's fields; the line is written from them.
        """
        if _listeners:
            for listener in tuple(_listeners):
                try:
                    listener(event, fields)
                except Exception:
                    slogging.log_exception(__name__, event=event)
        logger = self.logger
        if logger.isEnabledFor(level):
            extra = dict(fields)
            extra["event"] = event
            # Built directly rather than with logger.log(): the caller's
            # file and line, which logging finds by walking the stack, say
            # nothing here and cost more than the rest of the record.
            record = logger.makeRecord(
                logger.name, level, __file__, 0, render(event, fields), (), None, extra=extra
            )
            logger.handle(record)


def reply_text(reply: Any) -> str | None:
    """A :class:`~slimta.smtp.reply.Reply` as logged: ``'550 5.1.1 No such
    user'``; ``None`` for ``None`` or a reply without a code."""
    if reply is None or not reply.code:
        return None
    text = reply.message
    return f"{reply.code} {text}" if text else str(reply.code)


# --- the text of each line ------------------------------------------------------

#: Control characters (C0, DEL, C1) as ``?``: peers cannot break a line.
_CONTROLS = {code: "?" for code in (*range(0x20), *range(0x7F, 0xA0))}


def _clean(value: object) -> str:
    """*value* as text with its control characters replaced by ``?``."""
    text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable():
        return text
    return text.translate(_CONTROLS)


def _peer(fields: Mapping[str, Any]) -> str:
    ip = fields.get("client") or "unknown"
    port = fields.get("port")
    host = f"[{ip}]"
    return host if port is None else f"{host}:{port}"


def _bracketed(value: object) -> str:
    return "<" + _clean(value if value is not None else "") + ">"


def _reply_suffix(fields: Mapping[str, Any]) -> str:
    reply = fields.get("reply")
    return f" ({_clean(reply)})" if reply else ""


def _render_connect(fields: Mapping[str, Any]) -> str:
    return f"connect from {_peer(fields)}"


def _render_tls(fields: Mapping[str, Any]) -> str:
    return (
        f"tls from {_peer(fields)} protocol={fields.get('tls_protocol')} "
        f"cipher={fields.get('tls_cipher')}"
    )


def _render_reject(fields: Mapping[str, Any]) -> str:
    parts = [f"reject: {fields.get('command')} from {_peer(fields)}: {_clean(fields.get('reply'))}"]
    details = []
    if fields.get("from") is not None:
        details.append(f"from={_bracketed(fields['from'])}")
    if fields.get("to") is not None:
        details.append(f"to={_bracketed(fields['to'])}")
    if fields.get("helo") is not None:
        details.append(f"helo={_bracketed(fields['helo'])}")
    if details:
        parts.append("; " + " ".join(details))
    return "".join(parts)


def _render_accepted(fields: Mapping[str, Any]) -> str:
    line = (
        f"id={fields.get('id')} from={_bracketed(fields.get('from'))} size={fields.get('size')} "
        f"nrcpt={fields.get('nrcpt')} client={fields.get('client') or 'unknown'} "
        f"proto={fields.get('proto')}"
    )
    if fields.get("helo") is not None:
        line += f" helo={_bracketed(fields['helo'])}"
    if fields.get("auth") is not None:
        line += f" auth={_clean(fields['auth'])}"
    return line


def _render_disconnect(fields: Mapping[str, Any]) -> str:
    line = f"disconnect from {_peer(fields)} tls={fields.get('tls')}"
    if fields.get("tls") == "yes":
        line += f" protocol={fields.get('tls_protocol')} cipher={fields.get('tls_cipher')}"
    return (
        f"{line} messages={fields.get('messages')} rejects={fields.get('rejects')} "
        f"duration={fields.get('duration', 0.0):.3f}"
    )


def _render_delivery(fields: Mapping[str, Any]) -> str:
    delay = fields.get("delay")
    line = (
        f"id={fields.get('id')} to={_bracketed(fields.get('to'))} "
        f"relay={_clean(fields.get('relay'))} "
        f"delay={'none' if delay is None else format(delay, '.2f')} "
        f"attempt={fields.get('attempt')}"
    )
    if fields.get("retry") is not None:
        line += f" retry={fields['retry']:.0f}"
    return f"{line} status={fields.get('status')}{_reply_suffix(fields)}"


def _render_bounce(fields: Mapping[str, Any]) -> str:
    return f"id={fields.get('id')} bounce_id={fields.get('bounce_id')}"


def _render_removed(fields: Mapping[str, Any]) -> str:
    return f"id={fields.get('id')} removed"


def _render_other(event: str, fields: Mapping[str, Any]) -> str:
    pairs = " ".join(f"{key}={_clean(value)}" for key, value in fields.items())
    return f"{event} {pairs}" if pairs else event


_RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "connect": _render_connect,
    "tls": _render_tls,
    "reject": _render_reject,
    "accepted": _render_accepted,
    "disconnect": _render_disconnect,
    "delivery": _render_delivery,
    "bounce": _render_bounce,
    "removed": _render_removed,
}


def render(event: str, fields: Mapping[str, Any]) -> str:
    """The text line of *event* (see the module notes for each format)."""
    renderer = _RENDERERS.get(event)
    if renderer is None:
        return _render_other(event, fields)
    return renderer(fields)
