"""A :class:`~slimta.queue.QueueStorage` kept in two mappings (memory by default)."""

from __future__ import annotations

import pickle
import shelve
from collections.abc import MutableMapping, Sequence
from typing import Any

from slimta.envelope import Envelope
from slimta.logging import getQueueStorageLogger
from slimta.queue import QueueError, QueueStorage
from slimta.util.ids import preferred_id

__all__ = ["DictStorage"]

log = getQueueStorageLogger(__name__)


#: Values that need no copying: immutable, and picklable as they are.
_SCALARS = frozenset({str, bytes, int, float, bool, type(None)})


def _plain_copy(envelope: Envelope) -> Envelope | None:
    """The copy a pickle round trip would make, made several times faster.

    Only for a plain :class:`Envelope` whose headers are still the raw block
    and whose attributes are scalars, or lists or dicts of scalars (the
    usual case: sender, recipients, client ...); ``None`` otherwise, and
    the caller pickles.
    """
    if envelope.__class__ is not Envelope:
        return None
    state: dict[str, Any] = {}
    for name, value in envelope.__dict__.items():
        kind = value.__class__
        if kind in _SCALARS:
            state[name] = value
        elif kind is list and all(item.__class__ in _SCALARS for item in value):
            state[name] = value[:]
        elif (
            kind is dict
            and all(key.__class__ is str for key in value)
            and all(item.__class__ in _SCALARS for item in value.values())
        ):
            state[name] = value.copy()
        else:
            return None  # parsed headers, tuples, objects: pickle them
    copied = Envelope.__new__(Envelope)
    copied.__dict__.update(state)
    return copied


class DictStorage(QueueStorage):
    """Queue storage over two mappings: envelopes and their metadata.

    With the default new dicts, messages live only as long as the process.
    Two :mod:`shelve` objects give crude persistence: each metadata dict is
    assigned back after every change so a shelf writes it out.

    Ids are random (``uuid4().hex``). ``meta_db[id]`` is ``{'timestamp':
    float, 'attempts': int}``. Recipients marked delivered are deleted from
    the stored envelope, so indexes given to
    :meth:`set_recipients_delivered` refer to the envelope of the latest
    :meth:`get` (see :class:`~slimta.queue.QueueStorage`).

    Every operation is logged through a
    :class:`~slimta.logging.queuestorage.QueueStorageLogger`.

    :param envelope_db: mapping from id to :class:`~slimta.envelope.Envelope`;
        default a new dict.
    :param meta_db: mapping from id to the metadata dict; default a new dict.

    .. versionchanged:: 4.0
       Over mappings that are not shelves, :meth:`write` stores a private
       copy and :meth:`get` returns one (a pickle round trip, as a durable
       backend makes), so changes to an envelope being delivered, such as
       those of relay policies, never reach the stored message.
    """

    def __init__(
        self,
        envelope_db: MutableMapping[str, Envelope] | None = None,
        meta_db: MutableMapping[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        # "is None", not "or": an empty shelf is false.
        #: Envelopes by id.
        self.env_db: MutableMapping[str, Envelope] = envelope_db if envelope_db is not None else {}
        #: Metadata dicts by id.
        self.meta_db: MutableMapping[str, dict[str, Any]] = meta_db if meta_db is not None else {}
        # A shelf pickles on every write and unpickles on every read already.
        self._copies = not isinstance(self.env_db, shelve.Shelf)

    def _copy(self, envelope: Envelope) -> Envelope:
        if not self._copies:
            return envelope
        copied = _plain_copy(envelope)
        if copied is None:
            copied = pickle.loads(pickle.dumps(envelope, pickle.HIGHEST_PROTOCOL))
        return copied

    def _update_meta(self, id: str, **what: Any) -> None:
        meta = self.meta_db[id]
        meta.update(what)
        self.meta_db[id] = meta  # assigned back, so a shelf stores the change
        log.update_meta(id, **what)

    def write(self, envelope: Envelope, timestamp: float) -> str:
        """Store *envelope*, first attempt at *timestamp*.

        :returns: the new id.
        :raises QueueError: *envelope* cannot be pickled.
        """
        try:
            stored = self._copy(envelope)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise QueueError(f"Cannot store message: {exc}") from exc
        id = preferred_id(envelope.queue_id, self.env_db)
        self.env_db[id] = stored
        self.meta_db[id] = {"timestamp": timestamp, "attempts": 0}
        log.write(id, envelope)
        return id

    def set_timestamp(self, id: str, timestamp: float) -> None:
        """Store the next attempt time of message *id*."""
        self._update_meta(id, timestamp=timestamp)

    def increment_attempts(self, id: str) -> int:
        """Count one more attempt of message *id*; :returns: the new count."""
        attempts: int = self.meta_db[id]["attempts"] + 1
        self._update_meta(id, attempts=attempts)
        return attempts

    def set_recipients_delivered(self, id: str, rcpt_indexes: Sequence[int]) -> None:
        """Delete the recipients at *rcpt_indexes* from stored message *id*."""
        envelope = self.env_db[id]
        self._remove_delivered_rcpts(envelope, rcpt_indexes)
        self.env_db[id] = envelope
        log.update_meta(id, delivered_indexes=list(rcpt_indexes))

    def load(self) -> list[tuple[float, str]]:
        """Every stored message as ``(timestamp, id)``."""
        return [(meta["timestamp"], id) for id, meta in self.meta_db.items()]

    def get(self, id: str) -> tuple[Envelope, int]:
        """Message *id* and its attempt count.

        :raises KeyError: *id* is not stored.
        """
        envelope = self.env_db[id]
        meta = self.meta_db[id]
        return self._copy(envelope), meta["attempts"]

    def remove(self, id: str) -> None:
        """Delete message *id*; an unknown id is ignored."""
        self.env_db.pop(id, None)
        self.meta_db.pop(id, None)
        log.remove(id)

    def get_info(self) -> dict[str, Any]:
        """``{'size': <envelopes>, 'meta_size': <metadata entries>}``."""
        return {"size": len(self.env_db), "meta_size": len(self.meta_db)}
