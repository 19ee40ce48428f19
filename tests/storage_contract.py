"""The contract every :class:`slimta.queue.QueueStorage` must meet, as tests.

Import-safe: importing this module has no side effects and needs nothing
but slimta and pytest, so any backend's test module can reuse it. Usage::

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
    from storage_contract import StorageContract


    class TestMyStorage(StorageContract):
        @pytest.fixture
        def storage(self, tmp_path):
            return MyStorage(tmp_path)

        # optional: the same stored data seen through a new instance
        @pytest.fixture
        def reopen(self, tmp_path):
            return lambda old: MyStorage(tmp_path)

pytest then runs every ``test_*`` method below against the backend. The
``storage`` fixture must return a new, empty storage for each test. The
``reopen`` fixture, when overridden, returns a function that takes the
storage in use and returns another instance over the same data (after
closing the old one if needed); the persistence test is skipped without it.

The recipient index rule checked here is the one documented on
:class:`~slimta.queue.QueueStorage`: indexes given to
``set_recipients_delivered`` are positions in the envelope of the latest
``get``, and later ``get`` calls omit those recipients.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import pytest

from slimta.envelope import Envelope
from slimta.queue import QueueStorage
from slimta.util.ids import is_uuid4_hex, uuid4_hex

__all__ = ["StorageContract", "make_envelope"]

#: A message with a header block and an 8-bit body, as an edge would pass it.
RAW_MESSAGE = (
    b"From: sender@example.com\r\n"
    b"To: a@example.net, b@example.net\r\n"
    b"Subject: contract\r\n"
    b"\r\n"
    b"body line 1\r\n"
    b"8-bit: \xc3\xa9\xff\r\n"
)


def make_envelope(
    recipients: list[str] | None = None, sender: str = "sender@example.com"
) -> Envelope:
    """An envelope with every attribute a storage must keep set."""
    envelope = Envelope(sender, recipients or ["a@example.net", "b@example.net"])
    envelope.parse(RAW_MESSAGE)
    envelope.client = {
        "ip": "192.0.2.1",
        "host": "client.example.com",
        "name": "client.example.com",
        "protocol": "ESMTPS",
        "auth": None,
    }
    envelope.receiver = "mx.example.org"
    envelope.timestamp = 1234567890.5
    envelope.dsn_ret = "HDRS"
    envelope.dsn_envid = "envid-1"
    envelope.dsn_notify = {"a@example.net": ("FAILURE", "DELAY")}
    envelope.dsn_orcpt = {"a@example.net": "rfc822;a@example.net"}
    return envelope


def assert_same_message(got: Envelope, want: Envelope) -> None:
    """*got* carries everything of *want* that delivery needs."""
    assert got.sender == want.sender
    assert got.recipients == want.recipients
    assert got.flatten() == want.flatten()
    assert got.headers is not None
    assert got.headers["Subject"] == "contract"
    assert got.client == want.client
    assert got.receiver == want.receiver
    assert got.timestamp == want.timestamp
    assert got.dsn_ret == want.dsn_ret
    assert got.dsn_envid == want.dsn_envid
    assert got.dsn_notify == want.dsn_notify
    assert got.dsn_orcpt == want.dsn_orcpt


class StorageContract:
    """Contract tests for a :class:`~slimta.queue.QueueStorage`.

    Subclass as ``Test<Backend>`` and override the :meth:`storage` fixture
    (and, for durable backends, :meth:`reopen`).
    """

    @pytest.fixture
    def storage(self) -> QueueStorage:
        """A new, empty storage; subclasses must override this fixture."""
        raise NotImplementedError("override the storage fixture")

    @pytest.fixture
    def reopen(self) -> Callable[[QueueStorage], QueueStorage] | None:
        """``reopen(old) -> new`` over the same data, or ``None`` (default)."""
        return None

    # --- write / get -------------------------------------------------------

    def test_write_returns_str_id(self, storage: QueueStorage) -> None:
        id = storage.write(make_envelope(), 100.0)
        assert isinstance(id, str)
        assert id

    def test_ids_are_unique(self, storage: QueueStorage) -> None:
        ids = [storage.write(make_envelope(), 100.0) for _ in range(50)]
        assert len(set(ids)) == 50

    def test_proposed_queue_id_is_kept_while_free(self, storage: QueueStorage) -> None:
        envelope = make_envelope()
        envelope.queue_id = uuid4_hex()
        assert storage.write(envelope, 100.0) == envelope.queue_id
        # A copy carrying the same id (a split message) gets one of its own.
        other = storage.write(envelope.copy(), 100.0)
        assert other != envelope.queue_id
        assert is_uuid4_hex(other)
        assert storage.get(other)[0].recipients == envelope.recipients

    @pytest.mark.parametrize("proposed", ["../../etc/passwd", "ABC", "0" * 32, "x\r\ny", ""])
    def test_malformed_queue_id_is_not_used(self, storage: QueueStorage, proposed: str) -> None:
        envelope = make_envelope()
        envelope.queue_id = proposed
        id = storage.write(envelope, 100.0)
        assert is_uuid4_hex(id)
        storage.get(id)

    def test_get_returns_envelope_and_zero_attempts(self, storage: QueueStorage) -> None:
        envelope = make_envelope()
        id = storage.write(envelope, 100.0)
        got, attempts = storage.get(id)
        assert attempts == 0
        assert_same_message(got, make_envelope())

    def test_envelope_survives_pickling(self, storage: QueueStorage) -> None:
        # Durable backends pickle; whatever get returns must pickle again.
        id = storage.write(make_envelope(), 100.0)
        got, _ = storage.get(id)
        assert_same_message(pickle.loads(pickle.dumps(got)), make_envelope())

    def test_later_changes_do_not_reach_storage(self, storage: QueueStorage) -> None:
        # Relay policies change the envelope being delivered; the stored
        # message must not change with it.
        envelope = make_envelope()
        id = storage.write(envelope, 100.0)
        envelope.recipients.append("late@x.test")
        envelope.prepend_header("X-Late", "1")
        got, _ = storage.get(id)
        got.recipients.clear()
        got.prepend_header("X-Later", "1")
        again, _ = storage.get(id)
        assert_same_message(again, make_envelope())

    def test_null_sender_and_no_headers(self, storage: QueueStorage) -> None:
        envelope = Envelope("", ["postmaster@example.net"])
        envelope.parse(b"\r\nbody only\r\n")
        id = storage.write(envelope, 100.0)
        got, _ = storage.get(id)
        assert got.sender == ""
        assert got.recipients == ["postmaster@example.net"]
        assert got.flatten() == envelope.flatten()

    def test_get_missing_raises_key_error(self, storage: QueueStorage) -> None:
        with pytest.raises(KeyError):
            storage.get("0123456789abcdef0123456789abcdef")

    # --- metadata ------------------------------------------------------------

    def test_increment_attempts(self, storage: QueueStorage) -> None:
        id = storage.write(make_envelope(), 100.0)
        assert storage.increment_attempts(id) == 1
        assert storage.increment_attempts(id) == 2
        assert storage.get(id)[1] == 2

    def test_attempts_are_per_message(self, storage: QueueStorage) -> None:
        first = storage.write(make_envelope(), 100.0)
        second = storage.write(make_envelope(), 100.0)
        storage.increment_attempts(first)
        assert storage.get(first)[1] == 1
        assert storage.get(second)[1] == 0

    def test_load_lists_every_message(self, storage: QueueStorage) -> None:
        first = storage.write(make_envelope(), 100.0)
        second = storage.write(make_envelope(), 250.5)
        assert sorted(storage.load()) == sorted([(100.0, first), (250.5, second)])

    def test_load_when_empty(self, storage: QueueStorage) -> None:
        assert list(storage.load()) == []

    def test_set_timestamp(self, storage: QueueStorage) -> None:
        id = storage.write(make_envelope(), 100.0)
        storage.set_timestamp(id, 4321.25)
        assert list(storage.load()) == [(4321.25, id)]
        assert storage.get(id)[1] == 0

    # --- remove / info ---------------------------------------------------------

    def test_remove(self, storage: QueueStorage) -> None:
        kept = storage.write(make_envelope(), 100.0)
        gone = storage.write(make_envelope(), 100.0)
        storage.remove(gone)
        with pytest.raises(KeyError):
            storage.get(gone)
        assert list(storage.load()) == [(100.0, kept)]
        storage.get(kept)

    def test_remove_missing_is_ignored(self, storage: QueueStorage) -> None:
        id = storage.write(make_envelope(), 100.0)
        storage.remove(id)
        storage.remove(id)
        storage.remove("0123456789abcdef0123456789abcdef")

    def test_get_info_size(self, storage: QueueStorage) -> None:
        assert storage.get_info()["size"] == 0
        ids = [storage.write(make_envelope(), 100.0) for _ in range(3)]
        assert storage.get_info()["size"] == 3
        storage.remove(ids[0])
        assert storage.get_info()["size"] == 2

    # --- delivered recipients --------------------------------------------------

    def test_set_recipients_delivered_twice(self, storage: QueueStorage) -> None:
        rcpts = ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
        id = storage.write(make_envelope(rcpts), 100.0)
        storage.set_recipients_delivered(id, [1])
        got, _ = storage.get(id)
        assert got.recipients == ["a@x.test", "c@x.test", "d@x.test"]
        # Indexes are relative to the envelope of the latest get.
        storage.set_recipients_delivered(id, [0])
        got, _ = storage.get(id)
        assert got.recipients == ["c@x.test", "d@x.test"]

    def test_set_recipients_delivered_several(self, storage: QueueStorage) -> None:
        rcpts = ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
        id = storage.write(make_envelope(rcpts), 100.0)
        storage.set_recipients_delivered(id, [3, 0])
        got, attempts = storage.get(id)
        assert got.recipients == ["b@x.test", "c@x.test"]
        assert attempts == 0
        assert got.flatten() == make_envelope().flatten()

    def test_set_recipients_delivered_keeps_other_messages(self, storage: QueueStorage) -> None:
        first = storage.write(make_envelope(["a@x.test", "b@x.test"]), 100.0)
        second = storage.write(make_envelope(["a@x.test", "b@x.test"]), 100.0)
        storage.set_recipients_delivered(first, [0])
        assert storage.get(second)[0].recipients == ["a@x.test", "b@x.test"]

    # --- durability (optional) ----------------------------------------------------

    def test_persists_across_reopen(
        self,
        storage: QueueStorage,
        reopen: Callable[[QueueStorage], QueueStorage] | None,
    ) -> None:
        if reopen is None:
            pytest.skip("this backend does not persist")
        id = storage.write(make_envelope(["a@x.test", "b@x.test", "c@x.test"]), 100.0)
        storage.increment_attempts(id)
        storage.set_timestamp(id, 200.0)
        storage.set_recipients_delivered(id, [1])
        again = reopen(storage)
        assert list(again.load()) == [(200.0, id)]
        got, attempts = again.get(id)
        assert attempts == 1
        assert got.recipients == ["a@x.test", "c@x.test"]
        assert got.flatten() == make_envelope().flatten()
        info: dict[str, Any] = again.get_info()
        assert info["size"] == 1
