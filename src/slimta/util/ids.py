"""Random identifiers in the ``uuid4().hex`` format, made quickly.

Queue ids and the ids in relay replies are ``uuid.uuid4().hex``: 32
lowercase hex digits of a random (version 4, RFC 9562) UUID. Building a
:class:`uuid.UUID` object only to print it costs several times more than
the random bytes themselves, and it happens for every message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Container
from typing import TypeGuard

__all__ = ["is_uuid4_hex", "preferred_id", "uuid4_hex"]


def uuid4_hex() -> str:
    """The same as ``uuid.uuid4().hex``: 122 random bits, version 4, variant 1."""
    data = bytearray(os.urandom(16))
    data[6] = (data[6] & 0x0F) | 0x40
    data[8] = (data[8] & 0x3F) | 0x80
    return data.hex()


_UUID4_HEX = re.compile(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}")


def is_uuid4_hex(text: object) -> TypeGuard[str]:
    """Whether *text* is a string :func:`uuid4_hex` could have returned."""
    return isinstance(text, str) and _UUID4_HEX.fullmatch(text) is not None


def preferred_id(proposed: object, *taken: Container[str]) -> str:
    """*proposed* if it is a :func:`uuid4_hex` id in none of *taken*, else a new one.

    Storages call it to store a message under the id the queue proposed
    (:attr:`~slimta.envelope.Envelope.queue_id`); the format check keeps a
    value set by other code out of file names and keys.
    """
    if is_uuid4_hex(proposed) and not any(proposed in ids for ids in taken):
        return proposed
    while True:
        id = uuid4_hex()
        if not any(id in ids for ids in taken):
            return id
