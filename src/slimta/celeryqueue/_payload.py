"""How an envelope travels inside a Celery task message.

A task's arguments go through the Celery app's serializer, JSON by default.
JSON cannot carry an :class:`~slimta.envelope.Envelope`, and switching the
app to Celery's pickle serializer would make its workers unpickle the
arguments of *every* task of the app. So the envelope is pickled here, and
only here, and travels as text in a small JSON object::

    {"v": 1, "envelope": "<base64 of the pickle>", "mac": "<hex HMAC-SHA256>"}

``mac`` is present when the queue has a signing key: it covers the version
and the pickle, and a worker with a key refuses a payload whose ``mac`` is
missing or wrong *before* unpickling it. Without a key anyone who can
publish to the broker can make a worker run code (unpickling runs code),
exactly as with Celery's pickle serializer: the broker must then be trusted.

Pickle protocol 5 (Python 3.8+) is fixed rather than "the highest", so that
machines running different Python versions can share one queue.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import pickle
from typing import Any

from slimta.envelope import Envelope

__all__ = ["EnvelopeCodec", "PayloadError"]

#: Format version, in the payload and in what the MAC covers.
VERSION = 1
#: Pickle protocol of the envelope; see the module notes.
PICKLE_PROTOCOL = 5
#: What the MAC covers before the pickle, so that a MAC made for another
#: purpose with the same key cannot pass.
_MAC_PREFIX = b"slimta.celeryqueue payload v%d\0" % VERSION


class PayloadError(ValueError):
    """A task payload that is not an envelope this queue may read."""


class EnvelopeCodec:
    """Turns envelopes into task payloads and back.

    :param key: the HMAC-SHA256 key payloads are signed with and checked
        against; ``None`` to neither sign nor check.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key

    def _mac(self, pickled: bytes) -> str:
        assert self._key is not None
        return hmac.new(self._key, _MAC_PREFIX + pickled, hashlib.sha256).hexdigest()

    def encode(self, envelope: Envelope) -> dict[str, Any]:
        """The JSON-ready payload carrying *envelope*."""
        pickled = pickle.dumps(envelope, PICKLE_PROTOCOL)
        payload: dict[str, Any] = {
            "v": VERSION,
            "envelope": base64.b64encode(pickled).decode("ascii"),
        }
        if self._key is not None:
            payload["mac"] = self._mac(pickled)
        return payload

    def decode(self, payload: object) -> Envelope:
        """The envelope carried by *payload*.

        :raises PayloadError: *payload* is malformed, of another version,
            unsigned or wrongly signed while this codec has a key, or does not
            hold an :class:`~slimta.envelope.Envelope`.
        """
        if not isinstance(payload, dict) or payload.get("v") != VERSION:
            raise PayloadError("not a version 1 envelope payload")
        text = payload.get("envelope")
        if not isinstance(text, str):
            raise PayloadError("payload has no envelope")
        try:
            pickled = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PayloadError(f"envelope is not base64: {exc}") from None
        if self._key is not None:
            mac = payload.get("mac")
            if not isinstance(mac, str):
                raise PayloadError("payload is not signed")
            if not hmac.compare_digest(mac, self._mac(pickled)):
                raise PayloadError("payload signature does not match")
        try:
            envelope = pickle.loads(pickled)
        except Exception as exc:
            raise PayloadError(f"envelope does not unpickle: {exc!r}") from None
        if not isinstance(envelope, Envelope):
            raise PayloadError(f"payload holds {type(envelope).__name__}, not an Envelope")
        return envelope
