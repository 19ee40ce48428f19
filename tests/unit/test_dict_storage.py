"""DictStorage: the shared storage contract, over dicts and over shelves."""

from __future__ import annotations

import contextlib
import logging
import shelve
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slimta.envelope import Envelope
from slimta.logging import parseline
from slimta.queue import QueueError, QueueStorage
from slimta.queue.dict import DictStorage

# tests/ is on sys.path (pyproject: pythonpath = ["tests"]).
from storage_contract import StorageContract, make_envelope


class TestDictStorage(StorageContract):
    @pytest.fixture
    def storage(self) -> QueueStorage:
        return DictStorage()


class TestShelveDictStorage(StorageContract):
    @pytest.fixture
    def shelves(self) -> Iterator[contextlib.ExitStack]:
        with contextlib.ExitStack() as stack:
            yield stack

    def _open(self, tmp_path: Path, shelves: contextlib.ExitStack) -> DictStorage:
        # The ExitStack closes them (ruff does not see through enter_context).
        env_db = shelves.enter_context(shelve.open(str(tmp_path / "envelopes")))  # noqa: SIM115
        meta_db = shelves.enter_context(shelve.open(str(tmp_path / "meta")))  # noqa: SIM115
        return DictStorage(env_db, meta_db)  # type: ignore[arg-type]

    @pytest.fixture
    def storage(self, tmp_path: Path, shelves: contextlib.ExitStack) -> QueueStorage:
        return self._open(tmp_path, shelves)

    @pytest.fixture
    def reopen(
        self, tmp_path: Path, shelves: contextlib.ExitStack
    ) -> Callable[[QueueStorage], QueueStorage]:
        def reopen(old: QueueStorage) -> QueueStorage:
            assert isinstance(old, DictStorage)
            old.env_db.close()  # type: ignore[attr-defined]
            old.meta_db.close()  # type: ignore[attr-defined]
            return self._open(tmp_path, shelves)

        return reopen


def test_empty_shelf_is_used_not_replaced(tmp_path: Path) -> None:
    # An empty shelf is false; DictStorage must not swap it for a dict.
    with shelve.open(str(tmp_path / "e")) as env_db, shelve.open(str(tmp_path / "m")) as meta_db:
        storage = DictStorage(env_db, meta_db)  # type: ignore[arg-type]
        assert storage.env_db is env_db
        assert storage.meta_db is meta_db
        id = storage.write(make_envelope(), 5.0)
        assert id in env_db
        assert meta_db[id] == {"timestamp": 5.0, "attempts": 0}


def test_meta_layout_and_info() -> None:
    storage = DictStorage()
    id = storage.write(make_envelope(), 7.5)
    assert len(id) == 32
    int(id, 16)
    storage.increment_attempts(id)
    storage.set_timestamp(id, 9.0)
    assert storage.meta_db[id] == {"timestamp": 9.0, "attempts": 1}
    assert storage.get_info() == {"size": 1, "meta_size": 1}


def test_meta_dicts_are_assigned_back() -> None:
    # A shelf only stores what is assigned, so each change must be.
    class Recording(dict[str, dict[str, object]]):
        assigned: list[str] = []

        def __setitem__(self, key: str, value: dict[str, object]) -> None:
            self.assigned.append(key)
            super().__setitem__(key, value)

    meta = Recording()
    storage = DictStorage(meta_db=meta)  # type: ignore[arg-type]
    id = storage.write(make_envelope(), 1.0)
    storage.increment_attempts(id)
    storage.set_timestamp(id, 2.0)
    assert meta.assigned == [id, id, id]


def test_unpicklable_envelope_is_a_queue_error() -> None:
    envelope = make_envelope()
    envelope.client["socket"] = lambda: None
    with pytest.raises(QueueError):
        DictStorage().write(envelope, 1.0)


def test_wait_is_not_supported() -> None:
    with pytest.raises(NotImplementedError):
        list(DictStorage().wait())


def test_operations_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    storage = DictStorage()
    with caplog.at_level(logging.DEBUG, logger="slimta.queue.dict"):
        id = storage.write(Envelope("s@x.test", ["r@x.test"]), 1.0)
        storage.increment_attempts(id)
        storage.set_recipients_delivered(id, [0])
        storage.remove(id)
    lines = [parseline(r.getMessage()) for r in caplog.records if r.name == "slimta.queue.dict"]
    assert [(kind, op) for kind, _, op, _ in lines] == [
        ("queue", "write"),
        ("queue", "meta"),
        ("queue", "meta"),
        ("queue", "remove"),
    ]
    assert all(typeid == id for _, typeid, _, _ in lines)
    assert lines[0][3] == {"sender": "s@x.test", "recipients": ["r@x.test"]}
    assert lines[1][3] == {"attempts": 1}
    assert lines[2][3] == {"delivered_indexes": [0]}


def test_plain_envelopes_are_copied_like_pickles() -> None:
    storage = DictStorage()
    envelope = make_envelope()
    envelope.client = {"ip": "192.0.2.1", "host": None, "name": "client.test"}
    envelope.receiver = "mx.test"
    id = storage.write(envelope, 1.0)
    envelope.recipients.append("late@example.test")
    envelope.client["ip"] = "changed"
    got, _ = storage.get(id)
    assert got is not envelope
    assert got.recipients == make_envelope().recipients
    assert got.client == {"ip": "192.0.2.1", "host": None, "name": "client.test"}
    assert got.flatten() == envelope.flatten()
    got.recipients.clear()
    got.client.clear()
    again, _ = storage.get(id)
    assert again.recipients == make_envelope().recipients
    assert again.client["name"] == "client.test"


def test_parsed_headers_and_nested_values_are_deep_copied() -> None:
    storage = DictStorage()
    envelope = make_envelope()
    envelope.client = {"auth": ("alice", None)}
    envelope.headers["X-Mark"] = "1"  # parses the header block
    id = storage.write(envelope, 1.0)
    del envelope.headers["X-Mark"]
    got, _ = storage.get(id)
    assert got.headers["X-Mark"] == "1"
    assert got.client == {"auth": ("alice", None)}
    got.headers["X-Other"] = "2"
    assert "X-Other" not in storage.get(id)[0].headers
