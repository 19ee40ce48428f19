"""``slimta serve --metrics HOST:PORT``: Prometheus metrics over HTTP.

The counters are fed by the mail log's events
(:func:`slimta.logging.maillog.add_listener`), the same events the log lines
are written from, whatever the log level; the queue's gauges are computed
at each scrape. Served at ``http://HOST:PORT/metrics`` (any path answers)
in the Prometheus text format, by :mod:`prometheus_client` (the optional
extra ``slimta[metrics]``):

``slimta_smtp_sessions_total``
    SMTP sessions opened.
``slimta_smtp_sessions_open``
    SMTP sessions open now.
``slimta_smtp_tls_sessions_total{protocol}``
    Sessions that started TLS (STARTTLS or implicit), by TLS version.
``slimta_smtp_messages_accepted_total``
    Messages accepted (250 after the data), one per queue id.
``slimta_smtp_refused_total{command,code}``
    Commands refused, by command (``CONNECT``, ``EHLO``, ``HELO``, ``AUTH``,
    ``MAIL``, ``RCPT``, ``DATA``, ``END-OF-MESSAGE``) and reply code.
``slimta_deliveries_total{status}``
    Delivery attempt outcomes per recipient: ``sent``, ``deferred``,
    ``bounced``, ``expired``.
``slimta_delivery_delay_seconds``
    Histogram of the time from reception to delivery (``status=sent``).
``slimta_bounces_total``
    Bounces (delivery status notifications) queued.
``slimta_queue_messages``
    Messages in the queue (its storage's ``size``).
``slimta_queue_oldest_age_seconds``
    Age of the oldest message waiting for delivery; 0 when none waits.

plus the ``process_*`` and ``python_*`` metrics of :mod:`prometheus_client`.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from slimta.cli.errors import EX_CONFIG, EX_NOPERM, EX_UNAVAILABLE, CliError
from slimta.logging import maillog

if TYPE_CHECKING:
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from slimta.queue import Queue

__all__ = ["LATENCY_BUCKETS", "Metrics", "start_metrics"]

log = logging.getLogger("slimta.serve")

#: Upper bounds (seconds) of the delivery delay histogram: from a
#: direct delivery to a day in the queue.
LATENCY_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    86400.0,
)

#: Messages whose reception time a scrape may read from storage (loaded at
#: start, not seen since); the rest wait for the next scrapes.
_LOOKUPS_PER_SCRAPE = 256

_MISSING = (
    "--metrics needs the prometheus_client package: "
    "pip install 'python-slimta[metrics]' (or: pip install prometheus_client)"
)


class _QueueCollector:
    """The queue's gauges, computed when scraped (a prometheus_client collector)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        size, oldest = self._families()
        queue = self.metrics.queue
        if queue is not None:
            size.add_metric([], float(queue.store.get_info()["size"]))
            oldest.add_metric([], self.metrics.oldest_age(queue))
        return [size, oldest]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily

        return (
            GaugeMetricFamily("slimta_queue_messages", "Messages in the queue."),
            GaugeMetricFamily(
                "slimta_queue_oldest_age_seconds",
                "Age of the oldest message waiting for delivery (0: none).",
            ),
        )


class Metrics:
    """The metrics of one server, fed by mail-log events.

    :param registry: where the metrics are registered; a new
        ``CollectorRegistry`` (with the process and Python collectors) when
        ``None``.
    :param clock: epoch seconds, for message ages.
    :raises CliError: ``prometheus_client`` is not installed (``EX_CONFIG``).
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise CliError(_MISSING, EX_CONFIG) from None
        if registry is None:
            registry = prom.CollectorRegistry()
            prom.ProcessCollector(registry=registry)
            prom.PlatformCollector(registry=registry)
            prom.GCCollector(registry=registry)
        self.registry = registry
        self.clock = clock
        #: The queue whose gauges are reported; ``None`` until :meth:`watch`.
        self.queue: Queue | None = None
        #: Queue id -> reception time (epoch seconds) of messages seen.
        self.received: dict[str, float] = {}
        self.sessions = prom.Counter(
            "slimta_smtp_sessions", "SMTP sessions opened.", registry=registry
        )
        self.sessions_open = prom.Gauge(
            "slimta_smtp_sessions_open", "SMTP sessions open now.", registry=registry
        )
        self.tls_sessions = prom.Counter(
            "slimta_smtp_tls_sessions",
            "SMTP sessions that started TLS, by TLS version.",
            ["protocol"],
            registry=registry,
        )
        self.accepted = prom.Counter(
            "slimta_smtp_messages_accepted",
            "Messages accepted, one per queue id.",
            registry=registry,
        )
        self.refused = prom.Counter(
            "slimta_smtp_refused",
            "SMTP commands refused, by command and reply code.",
            ["command", "code"],
            registry=registry,
        )
        self.deliveries = prom.Counter(
            "slimta_deliveries",
            "Delivery attempt outcomes per recipient, by status.",
            ["status"],
            registry=registry,
        )
        self.latency = prom.Histogram(
            "slimta_delivery_delay_seconds",
            "Seconds from reception to delivery (status=sent).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.bounces = prom.Counter("slimta_bounces", "Bounces queued.", registry=registry)
        registry.register(_QueueCollector(self))
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "connect": self._connect,
            "disconnect": self._disconnect,
            "tls": self._tls,
            "reject": self._reject,
            "accepted": self._accepted,
            "delivery": self._delivery,
            "bounce": self._bounce,
            "removed": self._removed,
        }

    # -- events ------------------------------------------------------------------------

    def on_event(self, event: str, fields: Mapping[str, Any]) -> None:
        """A mail-log listener (:func:`slimta.logging.maillog.add_listener`)."""
        handler = self._handlers.get(event)
        if handler is not None:
            handler(fields)

    def _connect(self, fields: Mapping[str, Any]) -> None:
        self.sessions.inc()
        self.sessions_open.inc()

    def _disconnect(self, fields: Mapping[str, Any]) -> None:
        self.sessions_open.dec()

    def _tls(self, fields: Mapping[str, Any]) -> None:
        self.tls_sessions.labels(str(fields.get("tls_protocol") or "unknown")).inc()

    def _reject(self, fields: Mapping[str, Any]) -> None:
        code = str(fields.get("code") or "none")
        self.refused.labels(str(fields.get("command")), code).inc()

    def _accepted(self, fields: Mapping[str, Any]) -> None:
        self.accepted.inc()
        self.received[str(fields["id"])] = self.clock()

    def _delivery(self, fields: Mapping[str, Any]) -> None:
        status = str(fields.get("status"))
        self.deliveries.labels(status).inc()
        delay = fields.get("delay")
        if delay is None:
            return
        if status == "sent":
            self.latency.observe(delay)
        self.received.setdefault(str(fields["id"]), self.clock() - delay)

    def _bounce(self, fields: Mapping[str, Any]) -> None:
        self.bounces.inc()
        self.received[str(fields["bounce_id"])] = self.clock()

    def _removed(self, fields: Mapping[str, Any]) -> None:
        self.received.pop(str(fields["id"]), None)

    # -- the queue ---------------------------------------------------------------------

    def watch(self, queue: Queue) -> None:
        """Report *queue*'s size and oldest message from now on."""
        self.queue = queue

    def oldest_age(self, queue: Queue) -> float:
        """Seconds since the oldest message waiting in *queue* was received.

        Reception times come from the events; for messages loaded at start
        and not attempted since, from storage, a few per scrape.
        """
        waiting = queue.queued_ids | queue.active_ids
        received = self.received
        for id in [id for id in received if id not in waiting]:
            del received[id]  # removed without an event (by another process)
        lookups = 0
        for id in [id for id in waiting if id not in received]:
            if lookups == _LOOKUPS_PER_SCRAPE:
                break
            lookups += 1
            try:
                envelope, _ = queue.store.get(id)
            except Exception:
                continue  # removed meanwhile, or unreadable: the queue logs it
            if envelope.timestamp is not None:
                received[id] = envelope.timestamp
        if not received:
            return 0.0
        return max(0.0, self.clock() - min(received.values()))


class MetricsServer:
    """The HTTP server of the metrics, and the listener feeding them."""

    def __init__(self, metrics: Metrics, sock: socket.socket) -> None:
        from gevent.pywsgi import WSGIServer
        from prometheus_client import make_wsgi_app

        self.metrics = metrics
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self._server = WSGIServer(
            sock,
            make_wsgi_app(metrics.registry),
            log=None,
            error_log=logging.getLogger("slimta.metrics"),
        )
        maillog.add_listener(metrics.on_event)
        self._server.start()

    @property
    def url(self) -> str:
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/metrics"

    def watch(self, queue: Queue) -> None:
        """Report *queue*'s gauges; log where the metrics are."""
        self.metrics.watch(queue)
        log.info("metrics: Prometheus text format on %s", self.url)

    def close(self) -> None:
        """Stop serving and stop counting."""
        maillog.remove_listener(self.metrics.on_event)
        self._server.stop(timeout=1.0)


def _bind(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    where = f"cannot serve metrics on {shown}"
    try:
        return socket.create_server((host, port), family=family, backlog=32)
    except socket.gaierror as exc:
        raise CliError(f"{where}: unknown host {host}: {exc.strerror}", EX_UNAVAILABLE) from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CliError(f"{where}: the address is already in use", EX_UNAVAILABLE) from None
        if exc.errno == errno.EACCES:
            raise CliError(f"{where}: permission denied", EX_NOPERM) from None
        raise CliError(f"{where}: {exc.strerror or exc}", EX_UNAVAILABLE) from None


def start_metrics(address: tuple[str, int]) -> MetricsServer:
    """Serve the metrics on *address* (port 0: any free port).

    :raises CliError: ``prometheus_client`` is missing (``EX_CONFIG``), or
        the address cannot be used.
    """
    metrics = Metrics()
    return MetricsServer(metrics, _bind(address))
