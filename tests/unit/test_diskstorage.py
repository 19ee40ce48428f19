"""DiskStorage: the shared storage contract, durability order, group commit,
a hub that keeps running during fsyncs, crash recovery and disk errors.

The filesystem is real (``tmp_path``); where a test needs to see or break
the system calls it wraps ``os.fsync``, ``os.replace`` or ``os.write`` --
the calls still reach the disk unless the test makes them fail.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.monkey
import pytest

from slimta.diskstorage import DiskStorage, _spool
from slimta.diskstorage._format import (
    ENVELOPE,
    HEADER_SIZE,
    META,
    CorruptFile,
    Meta,
    decode_meta,
    encode_meta,
    header,
    parse_header,
    verify,
)
from slimta.envelope import Envelope
from slimta.logging import parseline
from slimta.queue import QueueError, QueueStorage

# tests/ is on sys.path (pyproject: pythonpath = ["tests"]).
from slimta.util.ids import uuid4_hex
from storage_contract import StorageContract, make_envelope

# Native-thread primitives even when another test module monkey-patched the
# process: the wrapped os functions run in DiskStorage's native threads.
ThreadEvent = gevent.monkey.get_original("threading", "Event")
thread_ident = gevent.monkey.get_original("threading", "get_ident")

pytestmark = pytest.mark.timeout(30)

LOGGER = "slimta.diskstorage"


def open_storage(spool: Path) -> DiskStorage:
    return DiskStorage(spool / "env", spool / "meta")


def env_file(spool: Path, id: str) -> Path:
    return spool / "env" / f"{id}.env"


def meta_file(spool: Path, id: str) -> Path:
    return spool / "meta" / f"{id}.meta"


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def temps(spool: Path) -> list[str]:
    """Temporary files in the spool, spare files (recycled ones) aside."""
    return [name for name in names(spool / "tmp") if not name.endswith(".spare")]


def spares(spool: Path) -> list[str]:
    return [name for name in names(spool / "tmp") if name.endswith(".spare")]


def log_ops(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, dict[str, object]]]:
    """``(id, operation, data)`` of every structured line DiskStorage logged."""
    found = []
    for record in caplog.records:
        if record.name == LOGGER:
            _, id, operation, data = parseline(record.getMessage())
            found.append((id, operation, data))
    return found


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


# --- the shared contract ---------------------------------------------------------


class TestDiskStorageContract(StorageContract):
    @pytest.fixture
    def storage(self, spool: Path) -> QueueStorage:
        return open_storage(spool)

    @pytest.fixture
    def reopen(self, spool: Path) -> Callable[[QueueStorage], QueueStorage]:
        return lambda old: open_storage(spool)


# --- basics --------------------------------------------------------------------------


def test_default_directories_beside_env_dir(spool: Path) -> None:
    storage = open_storage(spool)
    assert storage.tmp_dir == str(spool / "tmp")
    assert storage.quarantine_dir == str(spool / "quarantine")
    assert names(spool) == ["env", "meta", "quarantine", "tmp"]
    info = storage.get_info()
    assert info["size"] == 0
    assert info["env_dir"] == str(spool / "env")


def test_explicit_tmp_and_quarantine_dirs(tmp_path: Path) -> None:
    storage = DiskStorage(
        tmp_path / "e", str(tmp_path / "m"), tmp_path / "t", quarantine_dir=tmp_path / "q"
    )
    id = storage.write(make_envelope(), 1.0)
    assert names(tmp_path) == ["e", "m", "q", "t"]
    assert names(tmp_path / "e") == [f"{id}.env"]
    assert names(tmp_path / "t") == []


def test_ids_are_uuid4_hex(spool: Path) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    assert len(id) == 32
    assert int(id, 16) >= 0


def test_wait_is_not_supported(spool: Path) -> None:
    with pytest.raises(NotImplementedError):
        open_storage(spool).wait()


def test_unknown_ids(spool: Path) -> None:
    storage = open_storage(spool)
    for call in (
        lambda: storage.set_timestamp("0" * 32, 1.0),
        lambda: storage.increment_attempts("0" * 32),
        lambda: storage.set_recipients_delivered("0" * 32, [0]),
        lambda: storage.get("../../etc/passwd"),
    ):
        with pytest.raises(KeyError):
            call()
    storage.remove("../../etc/passwd")  # not an id: ignored, nothing touched


def test_files_are_self_validating(spool: Path) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 100.0)
    storage.increment_attempts(id)
    data = meta_file(spool, id).read_bytes()
    assert parse_header(META, data[:HEADER_SIZE]) == len(data) - HEADER_SIZE
    assert decode_meta(data[HEADER_SIZE:]) == Meta(100.0, 1, frozenset())
    data = env_file(spool, id).read_bytes()
    assert parse_header(ENVELOPE, data[:HEADER_SIZE]) == len(data) - HEADER_SIZE


def test_delivered_indexes_relative_to_write_until_get(spool: Path) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(["a@x", "b@x", "c@x", "d@x"]), 1.0)
    # Both calls refer to the envelope as written: index 0 is a@x twice.
    storage.set_recipients_delivered(id, [0])
    storage.set_recipients_delivered(id, [0, 2])
    got, _ = storage.get(id)
    assert got.recipients == ["b@x", "d@x"]
    storage.set_recipients_delivered(id, [1, 7, -1])  # out of range: ignored
    assert storage.get(id)[0].recipients == ["b@x"]


def test_delivered_indexes_after_restart(spool: Path) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(["a@x", "b@x", "c@x"]), 1.0)
    storage.set_recipients_delivered(id, [1])
    # A new process has seen no get yet: indexes refer to what is left.
    again = open_storage(spool)
    again.set_recipients_delivered(id, [1])
    assert again.get(id)[0].recipients == ["a@x"]


def test_get_info_counts_loaded_messages(spool: Path) -> None:
    storage = open_storage(spool)
    for _ in range(3):
        storage.write(make_envelope(), 1.0)
    assert open_storage(spool).get_info()["size"] == 3


# --- file format ---------------------------------------------------------------------


def test_format_rejects_damage() -> None:
    payload = b"payload bytes"
    head = header(ENVELOPE, payload)
    assert len(head) == HEADER_SIZE
    assert parse_header(ENVELOPE, head) == len(payload)
    verify(head, payload)
    with pytest.raises(CorruptFile, match="kind"):
        parse_header(META, head)
    with pytest.raises(CorruptFile, match="magic"):
        parse_header(ENVELOPE, b"X" + head[1:])
    with pytest.raises(CorruptFile, match="version"):
        parse_header(ENVELOPE, head[:4] + b"\x09" + head[5:])
    with pytest.raises(CorruptFile, match="truncated"):
        parse_header(ENVELOPE, head[:10])
    with pytest.raises(CorruptFile, match="checksum"):
        verify(head, b"payload bytez")
    # The length is covered by the checksum too.
    with pytest.raises(CorruptFile, match="checksum"):
        verify(head[:15] + b"\x01" + head[16:], payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"timestamp": "1", "attempts": 0, "delivered": []}',
        b'{"timestamp": 1.0, "attempts": -1, "delivered": []}',
        b'{"timestamp": 1.0, "attempts": true, "delivered": []}',
        b'{"timestamp": 1.0, "attempts": 0, "delivered": [-1]}',
        b'{"timestamp": 1.0, "attempts": 0, "delivered": {}}',
        b'{"timestamp": NaN, "attempts": 0, "delivered": []}',
        b'{"attempts": 0, "delivered": []}',
    ],
)
def test_meta_rejects_malformed(payload: bytes) -> None:
    with pytest.raises(CorruptFile):
        decode_meta(payload)


def test_meta_round_trip() -> None:
    meta = Meta(1234.5678901234, 7, frozenset({3, 0}))
    assert decode_meta(encode_meta(meta)) == meta


# --- durability order ------------------------------------------------------------------


class SyscallLog:
    """Wraps os.fsync and os.replace, recording each call in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, ...]] = []
        real_fsync = os.fsync
        real_replace = os.replace

        def fsync(fd: int) -> None:
            kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
            self.events.append(("fsync", kind, os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src: str, dst: str) -> None:
            self.events.append(("replace", os.fspath(src), os.fspath(dst)))
            real_replace(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def where(self, *event: str) -> int:
        return self.events.index(event)

    def count(self, kind: str) -> int:
        return sum(1 for event in self.events if event[:2] == ("fsync", kind))

    def assert_durable(self, final: Path) -> None:
        """*final* was fsynced (under its temporary name), then renamed, then
        its directory fsynced."""
        renames = [e for e in self.events if e[0] == "replace" and e[2] == str(final)]
        assert len(renames) == 1, self.events
        renamed = self.events.index(renames[0])
        tmp = renames[0][1]
        assert self.where("fsync", "file", tmp) < renamed
        dir_syncs = [
            i
            for i, e in enumerate(self.events)
            if e == ("fsync", "dir", str(final.parent)) and i > renamed
        ]
        assert dir_syncs, self.events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_write_is_durable_before_it_returns(spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(spool)
    calls = SyscallLog(monkeypatch)
    id = storage.write(make_envelope(), 100.0)
    # Everything below happened before write() returned. A new message is
    # its envelope file alone: it holds the first-attempt time, and the
    # metadata file only appears with the first update.
    calls.assert_durable(env_file(spool, id))
    assert not meta_file(spool, id).exists()
    assert calls.count("file") == 1
    renamed = [e[2] for e in calls.events if e[0] == "replace"]
    assert renamed == [str(env_file(spool, id))]
    assert temps(spool) == []
    assert open_storage(spool).load() == [(100.0, id)]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize(
    "update",
    [
        lambda s, id: s.set_timestamp(id, 5.0),
        lambda s, id: s.increment_attempts(id),
        lambda s, id: s.set_recipients_delivered(id, [0]),
    ],
)
def test_metadata_updates_are_durable(
    spool: Path, monkeypatch: pytest.MonkeyPatch, update: Callable[[DiskStorage, str], object]
) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 100.0)
    calls = SyscallLog(monkeypatch)
    update(storage, id)
    calls.assert_durable(meta_file(spool, id))
    assert [e[2] for e in calls.events if e[0] == "replace"] == [str(meta_file(spool, id))]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("updated", [False, True])
def test_remove_deletes_every_file_without_fsync(
    spool: Path, monkeypatch: pytest.MonkeyPatch, updated: bool
) -> None:
    # A removal lost in a crash only means a second delivery (at least
    # once), so it does not pay for a journal commit.
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 100.0)
    if updated:
        storage.increment_attempts(id)
        assert meta_file(spool, id).exists()
    calls = SyscallLog(monkeypatch)
    storage.remove(id)
    assert names(spool / "env") == names(spool / "meta") == []
    assert calls.count("dir") == calls.count("file") == 0


# --- group commit -----------------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_concurrent_writes_share_directory_fsyncs(
    spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(spool)
    calls = SyscallLog(monkeypatch)
    writers = [gevent.spawn(storage.write, make_envelope(), 100.0) for _ in range(50)]
    gevent.joinall(writers, raise_error=True)
    ids = {writer.value for writer in writers}
    assert len(ids) == 50
    # Every envelope is fsynced, but its directory once per batch: all 50
    # writers queue before the committer starts, so one batch, one dir.
    assert calls.count("file") == 50
    assert calls.count("dir") <= 2, calls.count("dir")
    for id in ids:
        calls.assert_durable(env_file(spool, id))
    assert sorted(id for _, id in storage.load()) == sorted(ids)


@pytest.mark.parametrize("threshold", [3, None])
def test_large_batches_flush_with_one_syncfs(
    spool: Path, monkeypatch: pytest.MonkeyPatch, threshold: int | None
) -> None:
    real = _spool._syncfs_function
    if real is None:
        pytest.skip("no syncfs on this platform")
    calls: list[int] = []

    def syncfs(fd: int) -> object:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(_spool, "_syncfs_function", syncfs)
    storage = DiskStorage(spool / "env", spool / "meta", syncfs_threshold=threshold)
    storage.write(make_envelope(), 1.0)  # a batch of one: plain fsync
    assert calls == []
    writers = [gevent.spawn(storage.write, make_envelope(), 1.0) for _ in range(20)]
    gevent.joinall(writers, raise_error=True)
    assert len(calls) == (1 if threshold is not None else 0)
    assert len(open_storage(spool).load()) == 21


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_sequential_writes_fsync_directories_each_time(
    spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The baseline the group commit improves on.
    storage = open_storage(spool)
    calls = SyscallLog(monkeypatch)
    for _ in range(5):
        storage.write(make_envelope(), 100.0)
    assert calls.count("dir") == 5


def test_batch_mixing_every_operation(spool: Path) -> None:
    storage = open_storage(spool)
    old = [storage.write(make_envelope(["a@x", "b@x"]), 1.0) for _ in range(4)]
    jobs = [
        gevent.spawn(storage.write, make_envelope(), 2.0),
        gevent.spawn(storage.remove, old[0]),
        gevent.spawn(storage.increment_attempts, old[1]),
        gevent.spawn(storage.increment_attempts, old[1]),
        gevent.spawn(storage.set_timestamp, old[2], 9.0),
        gevent.spawn(storage.set_recipients_delivered, old[3], [1]),
        gevent.spawn(storage.remove, old[3]),
    ]
    gevent.joinall(jobs, raise_error=True)
    new = jobs[0].value
    assert sorted(jobs[2:4], key=lambda g: g.value)[-1].value == 2
    again = open_storage(spool)
    assert sorted(again.load()) == sorted([(1.0, old[1]), (9.0, old[2]), (2.0, new)])
    assert again.get(old[1])[1] == 2
    assert temps(spool) == []


# --- recycled files ------------------------------------------------------------------------


def test_removed_files_are_reused_for_new_messages(spool: Path) -> None:
    storage = open_storage(spool)
    long = storage.write(make_envelope(["a@x"] * 50), 1.0)
    storage.increment_attempts(long)  # a metadata file too
    inodes = {env_file(spool, long).stat().st_ino, meta_file(spool, long).stat().st_ino}
    storage.remove(long)
    assert len(spares(spool)) == 2
    # Shorter than the file it overwrites: cut to its own length.
    short = storage.write(make_envelope(["b@x"]), 2.0)
    storage.set_timestamp(short, 3.0)
    assert spares(spool) == []
    assert {env_file(spool, short).stat().st_ino, meta_file(spool, short).stat().st_ino} == inodes
    again = open_storage(spool)
    assert again.load() == [(3.0, short)]
    assert again.get(short)[0].recipients == ["b@x"]


def test_spares_survive_a_restart_within_the_limit(
    spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(spool)
    ids = [storage.write(make_envelope(), 1.0) for _ in range(5)]
    for id in ids:
        storage.remove(id)
    assert len(spares(spool)) == 5
    monkeypatch.setattr(_spool, "MAX_SPARES", 3)
    again = open_storage(spool)
    assert len(spares(spool)) == 3
    again.write(make_envelope(), 1.0)
    assert len(spares(spool)) == 2
    assert temps(spool) == []


def test_vanished_spare_falls_back_to_a_new_file(spool: Path) -> None:
    storage = open_storage(spool)
    storage.remove(storage.write(make_envelope(), 1.0))
    for name in spares(spool):
        (spool / "tmp" / name).unlink()
    id = storage.write(make_envelope(), 4.0)
    assert open_storage(spool).load() == [(4.0, id)]
    assert temps(spool) == []


# --- the hub keeps running ------------------------------------------------------------------


def test_hub_runs_while_fsync_blocks(spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(spool)
    release = ThreadEvent()
    entered = ThreadEvent()
    threads: list[int] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        threads.append(thread_ident())
        entered.set()
        release.wait(20)  # blocks this thread only, until the test says go
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    ticks = 0

    def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            gevent.sleep(0.001)

    running = gevent.spawn(ticker)
    writer = gevent.spawn(storage.write, make_envelope(), 100.0)
    try:
        deadline = time.monotonic() + 10
        while not entered.is_set():
            assert time.monotonic() < deadline, "fsync never called"
            gevent.sleep(0.001)
        seen = ticks
        while ticks < seen + 20:
            assert time.monotonic() < deadline, "the hub stopped while fsync blocked"
            gevent.sleep(0.001)
        assert not writer.ready()  # still waiting for its fsync
    finally:
        release.set()
        running.kill()
    assert isinstance(writer.get(timeout=10), str)
    assert thread_ident() not in threads


# --- recovery ---------------------------------------------------------------------------------


def test_leftover_temp_files_removed(spool: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    # What a crash between write and rename leaves: a half-written temp file.
    torn = Path(storage._spool._tmp_path("f" * 32, "env"))
    torn.write_bytes(b"SLQF half a header")
    foreign = spool / "tmp" / "someone-elses.tmp"
    foreign.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = open_storage(spool)
    assert not torn.exists()
    assert foreign.exists()  # not named like ours: left alone
    assert ("f" * 32, "tmp_removed", {"file": torn.name}) in log_ops(caplog)
    assert [i for _, i in again.load()] == [id]
    # load() does it too, for a storage already running.
    torn.write_bytes(b"")
    again.load()
    assert not torn.exists()


def test_corrupt_envelope_quarantined(spool: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = open_storage(spool)
    bad = storage.write(make_envelope(), 1.0)
    storage.increment_attempts(bad)  # so that it has a metadata file too
    good = storage.write(make_envelope(), 2.0)
    path = env_file(spool, bad)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = open_storage(spool)
    assert again.load() == [(2.0, good)]
    assert (spool / "quarantine" / f"{bad}.env").read_bytes() == bytes(data)
    assert (spool / "quarantine" / f"{bad}.meta").exists()
    assert not path.exists()
    assert not meta_file(spool, bad).exists()
    quarantined = [(id, d) for id, op, d in log_ops(caplog) if op == "quarantine"]
    assert {d["file"] for id, d in quarantined if id == bad} == {f"{bad}.env", f"{bad}.meta"}
    assert all("checksum" in str(d["reason"]) for _, d in quarantined)
    with pytest.raises(KeyError):
        again.get(bad)


def test_torn_envelope_detected(spool: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    path = env_file(spool, id)
    path.write_bytes(path.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = open_storage(spool)
    assert again.load() == []
    assert (spool / "quarantine" / f"{id}.env").exists()
    reasons = [str(d["reason"]) for _, op, d in log_ops(caplog) if op == "quarantine"]
    assert reasons and "size" in reasons[0]


@pytest.mark.parametrize("length", [0, 10, HEADER_SIZE])
def test_envelope_torn_in_header_detected(spool: Path, length: int) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    path = env_file(spool, id)
    path.write_bytes(path.read_bytes()[:length])
    assert open_storage(spool).load() == []
    assert (spool / "quarantine" / f"{id}.env").exists()


def test_same_name_quarantined_twice_keeps_both(spool: Path) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    (spool / "quarantine" / f"{id}.env").write_bytes(b"older")
    env_file(spool, id).write_bytes(b"garbage")
    open_storage(spool)
    assert (spool / "quarantine" / f"{id}.env").read_bytes() == b"older"
    assert (spool / "quarantine" / f"{id}.env.1").read_bytes() == b"garbage"


def test_envelope_damaged_while_running_quarantined_by_get(
    spool: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    path = env_file(spool, id)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(KeyError):
        storage.get(id)
    assert (spool / "quarantine" / f"{id}.env").exists()
    assert storage.load() == []
    assert any(op == "quarantine" for _, op, _ in log_ops(caplog))


def test_envelope_that_does_not_unpickle_quarantined(spool: Path) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    payload = b"not a pickle"
    env_file(spool, id).write_bytes(header(ENVELOPE, payload) + payload)
    with pytest.raises(KeyError):
        storage.get(id)
    assert (spool / "quarantine" / f"{id}.env").exists()


def test_corrupt_meta_quarantined_and_message_recovered(
    spool: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    storage.increment_attempts(id)
    meta_file(spool, id).write_bytes(b"\x00garbage")
    before = time.time()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = open_storage(spool)
    assert (spool / "quarantine" / f"{id}.meta").read_bytes() == b"\x00garbage"
    [(timestamp, loaded)] = again.load()
    assert loaded == id
    assert before <= timestamp <= time.time()  # due now
    envelope, attempts = again.get(id)
    assert attempts == 0
    assert envelope.recipients == make_envelope().recipients
    ops = {op for i, op, _ in log_ops(caplog) if i == id}
    assert {"quarantine", "recover"} <= ops
    # Nothing is left to repair: a third start finds the envelope alone, a
    # message with no attempts due at its first-attempt time.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert open_storage(spool).load() == [(1.0, id)]
    assert log_ops(caplog) == []


def test_envelope_without_meta_is_a_message_never_updated(
    spool: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.5)
    assert not meta_file(spool, id).exists()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = open_storage(spool)
    assert again.load() == [(1.5, id)]
    assert again.get(id)[1] == 0
    assert not meta_file(spool, id).exists()
    assert log_ops(caplog) == []
    # Its first update creates the metadata file, which wins from then on.
    again.set_timestamp(id, 7.0)
    assert open_storage(spool).load() == [(7.0, id)]


@pytest.mark.parametrize("cut", [0, 4, 7])
def test_envelope_payload_without_its_timestamp_quarantined(spool: Path, cut: int) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    payload = env_file(spool, id).read_bytes()[HEADER_SIZE : HEADER_SIZE + cut]
    env_file(spool, id).write_bytes(header(ENVELOPE, payload) + payload)
    assert open_storage(spool).load() == []
    assert (spool / "quarantine" / f"{id}.env").exists()


def test_meta_without_envelope_removed(spool: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    storage.increment_attempts(id)
    env_file(spool, id).unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = open_storage(spool)
    assert again.load() == []
    assert not meta_file(spool, id).exists()
    assert (id, "orphan_meta_removed", {}) in log_ops(caplog)


def test_foreign_files_left_alone(spool: Path) -> None:
    storage = open_storage(spool)
    (spool / "env" / "README").write_text("hello")
    (spool / "meta" / "x.meta").write_text("hello")
    assert open_storage(spool).load() == []
    assert storage.load() == []
    assert names(spool / "env") == ["README"]
    assert names(spool / "meta") == ["x.meta"]


def test_load_merges_without_losing_updates(spool: Path) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    storage.increment_attempts(id)
    # A message put in place by someone else is picked up and validated.
    other = open_storage(spool).write(make_envelope(), 3.0)
    assert sorted(storage.load()) == [(1.0, id), (3.0, other)]
    assert storage.get(id)[1] == 1


# --- disk errors ---------------------------------------------------------------------------------


def enospc_on_write(monkeypatch: pytest.MonkeyPatch, fail_calls: set[int] | None = None) -> None:
    """Make os.writev fail with ENOSPC (only the *fail_calls*-th calls, from 0)."""
    real_writev = os.writev
    calls = 0

    def writev(fd: int, buffers: Any) -> int:
        nonlocal calls
        calls += 1
        if fail_calls is None or calls - 1 in fail_calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)


def assert_nothing_stored(spool: Path) -> None:
    assert names(spool / "env") == []
    assert names(spool / "meta") == []
    assert temps(spool) == []


def test_disk_full_raises_queue_error(
    spool: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    storage = open_storage(spool)
    enospc_on_write(monkeypatch)
    with caplog.at_level(logging.ERROR, logger=LOGGER), pytest.raises(QueueError) as info:
        storage.write(make_envelope(), 1.0)
    assert "No space left on device" in str(info.value)
    assert info.value.reply is None  # the edge answers 451 4.3.0
    assert_nothing_stored(spool)
    assert storage.load() == []
    assert any(op == "error" for _, op, _ in log_ops(caplog))
    monkeypatch.undo()
    id = storage.write(make_envelope(), 1.0)
    assert storage.load() == [(1.0, id)]


def test_one_failure_does_not_fail_the_batch(spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(spool)
    enospc_on_write(monkeypatch, {0})  # the first write of the batch
    writers = [gevent.spawn(storage.write, make_envelope(), 1.0) for _ in range(3)]
    gevent.joinall(writers)
    assert isinstance(writers[0].exception, QueueError)
    stored = [w.value for w in writers[1:]]
    assert all(isinstance(id, str) for id in stored)
    assert sorted(i for _, i in storage.load()) == sorted(stored)
    assert sorted(names(spool / "env")) == sorted(f"{id}.env" for id in stored)
    assert temps(spool) == []


def test_fsync_error_raises_queue_error(spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(spool)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(QueueError, match="Input/output error"):
        storage.write(make_envelope(), 1.0)
    monkeypatch.undo()
    assert_nothing_stored(spool)


def test_directory_fsync_error_leaves_no_final_file(
    spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(spool)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(QueueError):
        storage.write(make_envelope(), 1.0)
    monkeypatch.undo()
    assert_nothing_stored(spool)


def test_envelope_dir_not_a_directory(spool: Path) -> None:
    storage = open_storage(spool)
    (spool / "env").rmdir()
    (spool / "env").write_bytes(b"")  # rename into it: ENOTDIR
    with pytest.raises(QueueError, match="Not a directory"):
        storage.write(make_envelope(), 1.0)
    assert names(spool / "meta") == []
    assert temps(spool) == []


def test_meta_dir_not_a_directory_fails_updates(spool: Path) -> None:
    storage = open_storage(spool)
    (spool / "meta").rmdir()
    (spool / "meta").write_bytes(b"")
    # A new message needs no metadata file; its first update does.
    id = storage.write(make_envelope(), 1.0)
    with pytest.raises(QueueError, match="Not a directory"):
        storage.increment_attempts(id)
    assert names(spool / "env") == [f"{id}.env"]
    assert temps(spool) == []


def test_metadata_update_error(spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(spool)
    id = storage.write(make_envelope(), 1.0)
    enospc_on_write(monkeypatch)
    with pytest.raises(QueueError):
        storage.increment_attempts(id)
    monkeypatch.undo()
    assert temps(spool) == []
    # Memory moved on; the next successful update writes all of it.
    assert storage.increment_attempts(id) == 2
    assert open_storage(spool).get(id)[1] == 2


def test_unusable_directories_raise_queue_error(tmp_path: Path) -> None:
    (tmp_path / "env").write_bytes(b"")
    with pytest.raises(QueueError, match="Cannot use the queue directories"):
        DiskStorage(tmp_path / "env", tmp_path / "meta")


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as path:
        yield Path(path)


def test_tmp_dir_on_another_filesystem_refused(tmp_path: Path, other_filesystem: Path) -> None:
    with pytest.raises(QueueError, match="different filesystems"):
        DiskStorage(tmp_path / "env", tmp_path / "meta", other_filesystem / "tmp")


def test_quarantine_on_another_filesystem(tmp_path: Path, other_filesystem: Path) -> None:
    quarantine = other_filesystem / "q"
    storage = DiskStorage(tmp_path / "env", tmp_path / "meta", quarantine_dir=quarantine)
    id = storage.write(make_envelope(), 1.0)
    (tmp_path / "env" / f"{id}.env").write_bytes(b"junk")
    DiskStorage(tmp_path / "env", tmp_path / "meta", quarantine_dir=quarantine)
    assert (quarantine / f"{id}.env").read_bytes() == b"junk"
    assert not (tmp_path / "env" / f"{id}.env").exists()


def test_envelope_kept_whole(spool: Path) -> None:
    # A large, 8-bit message survives byte for byte.
    envelope = Envelope("s@x", ["r@x"])
    body = bytes(range(256)) * 4096 + b"\r\n"
    envelope.parse(b"Subject: big\r\n\r\n" + body)
    storage = open_storage(spool)
    id = storage.write(envelope, 1.0)
    got, _ = open_storage(spool).get(id)
    assert got.flatten() == envelope.flatten()


def test_concurrent_copies_with_one_queue_id_get_distinct_ids(spool: Path) -> None:
    # The commit yields to the hub (fsync on the thread pool): both writes are
    # in flight together, so the first id must be held before its commit ends.
    storage = open_storage(spool)
    envelope = make_envelope()
    envelope.queue_id = uuid4_hex()
    writers = [gevent.spawn(storage.write, envelope.copy(), 100.0) for _ in range(3)]
    gevent.joinall(writers, raise_error=True)
    ids = [writer.value for writer in writers]
    assert len(set(ids)) == 3
    assert envelope.queue_id in ids
    assert sorted(id for _, id in open_storage(spool).load()) == sorted(ids)
