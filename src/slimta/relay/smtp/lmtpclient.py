"""The pooled client greenlet that delivers messages over LMTP (RFC 2033)."""

from __future__ import annotations

from typing import Any

from slimta.relay import RelayError
from slimta.relay.smtp import SmtpRelayError
from slimta.relay.smtp.client import SmtpRelayClient
from slimta.smtp.client import Client, LmtpClient
from slimta.smtp.reply import Reply

__all__ = ["LmtpRelayClient"]


class LmtpRelayClient(SmtpRelayClient):
    """Like :class:`~slimta.relay.smtp.client.SmtpRelayClient`, over LMTP.

    LHLO replaces EHLO (there is no HELO fallback), and the data draws one
    reply per accepted recipient: a recipient whose reply is an error gets
    an :class:`~slimta.relay.smtp.SmtpRelayError` in the result dict, and
    RSET follows. REQUIRETLS messages are delivered as any other: LMTP
    hands them to the message store, final delivery that RFC 8689 leaves out.
    """

    _client_class: type[Client] = LmtpClient
    # The data always goes with DATA, which draws the per-recipient replies.
    _bdat_allowed = False
    _relays_requiretls = False

    def _hello(self, client: Client) -> Reply:
        if not isinstance(client, LmtpClient):
            raise TypeError("LmtpRelayClient needs an LmtpClient", client)
        with self._deadline(self.command_timeout, b"LHLO"):
            return client.lhlo(self._get_ehlo_as())

    def _finish(
        self, client: Client, rcpts: list[tuple[str, Reply]], final: Any
    ) -> dict[str, Reply | RelayError | None]:
        results: dict[str, Reply | RelayError | None] = {}
        for rcpt, reply in rcpts:
            if reply.is_error():
                results[rcpt] = SmtpRelayError.factory(reply)
        failed = False
        for rcpt, reply in final:
            if reply.is_error():
                failed = True
                results[rcpt] = SmtpRelayError.factory(reply)
            else:
                results[rcpt] = reply
        if failed:
            with self._deadline(self.command_timeout, b"RSET"):
                client.rset()
                client.flush_pipeline()
        return results
