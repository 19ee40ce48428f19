"""Relays that deliver every message to one fixed SMTP or LMTP server."""

from __future__ import annotations

import ssl
from typing import Any

from slimta.relay.pool import RelayPool, RelayPoolClient
from slimta.relay.smtp.client import SmtpRelayClient
from slimta.relay.smtp.lmtpclient import LmtpRelayClient

__all__ = ["StaticLmtpRelay", "StaticSmtpRelay"]


class StaticSmtpRelay(RelayPool):
    """Delivers everything to ``host:port`` over pooled, reused connections.

    :param host: the server's host name or address (also the TLS name).
    :param port: the server's port.
    :param pool_size: most connections at once; ``None`` is unbounded.
    :param client_class: the pool client class; defaults to
        :class:`~slimta.relay.smtp.client.SmtpRelayClient`.
    :param context: the client :class:`ssl.SSLContext` for (opportunistic)
        STARTTLS; ``ssl.create_default_context()`` when ``None``, so
        certificates are verified.
    :param client_kwargs: passed to *client_class* (``socket_creator``,
        ``ehlo_as``, ``tls_immediately``, ``tls_required``,
        ``connect_timeout``, ``command_timeout``, ``data_timeout``,
        ``idle_timeout``, ``credentials``, ``binary_encoder``).

    A message flagged :attr:`~slimta.envelope.Envelope.requiretls` (RFC 8689)
    goes only over TLS whose certificate *context* verified for *host*, to a
    server that offers REQUIRETLS, with ``REQUIRETLS`` on its ``MAIL``;
    otherwise it fails for good, ``550 5.7.30``, before ``MAIL`` is sent.

    .. versionchanged:: 4.0
       *context* replaces the ``tls`` dict.
    """

    #: The pool client class used when *client_class* is ``None``.
    _default_client_class: type[SmtpRelayClient] = SmtpRelayClient

    def __init__(
        self,
        host: str,
        port: int = 25,
        pool_size: int | None = None,
        client_class: type[SmtpRelayClient] | None = None,
        context: ssl.SSLContext | None = None,
        **client_kwargs: Any,
    ) -> None:
        super().__init__(pool_size)
        self.host = host
        self.port = port
        self.client_class = client_class or self._default_client_class
        self.context = context if context is not None else ssl.create_default_context()
        self.client_kwargs = client_kwargs

    def add_client(self) -> RelayPoolClient:
        """A new client for ``(host, port)`` on this pool's queue."""
        return self.client_class(
            (self.host, self.port), self.queue, context=self.context, **self.client_kwargs
        )


class StaticLmtpRelay(StaticSmtpRelay):
    """Delivers everything to an LMTP server (RFC 2033), e.g. a local MDA.

    :param host: the LMTP server's host.
    :param port: its port (24).
    :param pool_size: most connections at once; ``None`` is unbounded.
    :param client_kwargs: as for :class:`StaticSmtpRelay`, ``context`` and
        ``client_class`` included.
    """

    _default_client_class: type[SmtpRelayClient] = LmtpRelayClient

    def __init__(
        self,
        host: str = "localhost",
        port: int = 24,
        pool_size: int | None = None,
        **client_kwargs: Any,
    ) -> None:
        super().__init__(host, port, pool_size, **client_kwargs)
