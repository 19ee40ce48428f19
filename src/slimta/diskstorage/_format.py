"""The on-disk format of :class:`~slimta.diskstorage.DiskStorage` files.

Every file (envelope or metadata) is a fixed 32-byte header followed by the
payload::

    offset  size  field
    0       4     magic b"SLQF"
    4       1     format version (1)
    5       1     kind: b"E" (envelope) or b"M" (JSON metadata)
    6       2     reserved, zero
    8       8     payload length, unsigned big-endian
    16      16    BLAKE2b-128 of bytes 0-15 followed by the payload

A file is valid only when its size is exactly 32 plus the payload length and
the digest matches, so a torn write (a short file), a file of the wrong kind,
a file from a future format and any flipped bit are all detected when the
file is read. The writer fsyncs every file before renaming it into place, so
on a sane filesystem these checks fail only after media or operator damage;
they exist so that damage is noticed instead of delivered.

The envelope payload is the time of the first delivery attempt (an IEEE
754 double, big-endian, epoch seconds) followed by the pickled
:class:`~slimta.envelope.Envelope`. A message's metadata file is only
created by its first update: until then, the envelope file alone says all
there is (attempts 0, due at that time), so storing a new message costs one
file.

The metadata payload is a small JSON object (not a pickle: it is rewritten
on every delivery attempt and an operator may want to read it)::

    {"timestamp": 1767225600.0, "attempts": 2, "delivered": [0, 3]}

``delivered`` holds indexes into the recipient list of the envelope as it
was originally written (see :class:`~slimta.diskstorage.DiskStorage`).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ENVELOPE",
    "HEADER_SIZE",
    "META",
    "CorruptFile",
    "Meta",
    "decode_envelope",
    "decode_meta",
    "encode_envelope",
    "encode_meta",
    "header",
    "parse_header",
    "verify",
]

#: First four bytes of every file.
MAGIC: Final = b"SLQF"
#: The format version written, and the only one read.
VERSION: Final = 2
#: Kind byte of an envelope file.
ENVELOPE: Final = b"E"
#: Kind byte of a metadata file.
META: Final = b"M"

#: magic, version, kind, two reserved bytes, payload length.
_PREFIX: Final = struct.Struct(">4sBc2xQ")
#: Size of the BLAKE2b digest stored after the prefix.
_DIGEST_SIZE: Final = 16
#: Size of the whole header.
HEADER_SIZE: Final = _PREFIX.size + _DIGEST_SIZE
#: The first-attempt time in front of an envelope payload.
_FIRST_ATTEMPT: Final = struct.Struct(">d")


class CorruptFile(Exception):
    """A stored file failed validation.

    :param reason: what is wrong with it, for the log.
    """


@dataclass(frozen=True, slots=True)
class Meta:
    """The mutable part of a stored message, kept in the ``.meta`` file."""

    #: Epoch seconds of the next delivery attempt.
    timestamp: float
    #: Delivery attempts so far.
    attempts: int
    #: Indexes (into the originally written recipient list) already done.
    delivered: frozenset[int]


def _digest(prefix: bytes, payload: bytes | memoryview) -> bytes:
    digest = hashlib.blake2b(prefix, digest_size=_DIGEST_SIZE)
    digest.update(payload)
    return digest.digest()


def header(kind: bytes, payload: bytes) -> bytes:
    """The 32-byte header that goes in front of *payload* in a file of *kind*."""
    prefix = _PREFIX.pack(MAGIC, VERSION, kind, len(payload))
    return prefix + _digest(prefix, payload)


def parse_header(kind: bytes, data: bytes) -> int:
    """Check a file's first :data:`HEADER_SIZE` bytes; return the payload length.

    :raises CorruptFile: when the header is short, foreign, of another kind
        or of an unknown version.
    """
    if len(data) < HEADER_SIZE:
        raise CorruptFile(f"truncated header ({len(data)} of {HEADER_SIZE} bytes)")
    magic, version, found_kind, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CorruptFile(f"bad magic {magic!r}")
    if version != VERSION:
        raise CorruptFile(f"unknown format version {version}")
    if found_kind != kind:
        raise CorruptFile(f"kind {found_kind!r} where {kind!r} was expected")
    return int(length)


def verify(data: bytes, payload: bytes | memoryview) -> None:
    """Check *payload* against the digest in the header *data*.

    :raises CorruptFile: when they do not match.
    """
    prefix = data[: _PREFIX.size]
    if _digest(prefix, payload) != data[_PREFIX.size : HEADER_SIZE]:
        raise CorruptFile("checksum mismatch")


def encode_envelope(timestamp: float, pickled: bytes) -> bytes:
    """The payload of an envelope file: first-attempt time, then the pickle."""
    return _FIRST_ATTEMPT.pack(timestamp) + pickled


def decode_envelope(payload: bytes) -> tuple[float, memoryview]:
    """Split an envelope payload into its first-attempt time and its pickle.

    :raises CorruptFile: when it is too short or the time is not finite.
    """
    if len(payload) < _FIRST_ATTEMPT.size:
        raise CorruptFile("envelope payload shorter than its timestamp")
    (timestamp,) = _FIRST_ATTEMPT.unpack_from(payload)
    if not math.isfinite(timestamp):
        raise CorruptFile(f"bad first-attempt timestamp {timestamp!r}")
    return float(timestamp), memoryview(payload)[_FIRST_ATTEMPT.size :]


def encode_meta(meta: Meta) -> bytes:
    """The JSON payload of a metadata file."""
    return json.dumps(
        {
            "timestamp": meta.timestamp,
            "attempts": meta.attempts,
            "delivered": sorted(meta.delivered),
        },
        separators=(",", ":"),
        allow_nan=False,
    ).encode("ascii")


def decode_meta(payload: bytes) -> Meta:
    """Read a metadata payload back.

    :raises CorruptFile: when it is not the JSON object :func:`encode_meta` writes.
    """
    try:
        data = json.loads(payload)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise CorruptFile(f"metadata is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CorruptFile("metadata is not a JSON object")
    timestamp = data.get("timestamp")
    attempts = data.get("attempts")
    delivered = data.get("delivered")
    # bool is an int subclass, and never a valid time, count or index here.
    if (
        isinstance(timestamp, bool)
        or not isinstance(timestamp, int | float)
        or not math.isfinite(timestamp)
    ):
        raise CorruptFile(f"bad timestamp {timestamp!r}")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise CorruptFile(f"bad attempts {attempts!r}")
    if not isinstance(delivered, list):
        raise CorruptFile("bad delivered list")
    indexes: set[int] = set()
    for index in delivered:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise CorruptFile(f"bad delivered index {index!r}")
        indexes.add(index)
    return Meta(float(timestamp), attempts, frozenset(indexes))
