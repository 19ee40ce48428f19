"""slimta.util.workers without worker processes: which spools each worker
serves (adoption of orphans), spool locks, what the supervisor accepts as a
setup function, and the ``server.workers`` configuration key.

The processes themselves are tested in ``tests/integration/test_workers.py``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimta.cli.config import load_text
from slimta.cli.errors import ConfigInvalid
from slimta.cli.schema import usable_cpus
from slimta.util.workers import (
    SpoolBusy,
    SpoolLock,
    WorkerContext,
    Workers,
    assign_orphans,
    find_spools,
    plan_spools,
    spool_is_empty,
    spool_name,
)

# --- which worker serves which spool -------------------------------------------------


@pytest.mark.parametrize(
    ("count", "orphans", "expected"),
    [
        (2, [], [[], []]),
        (1, ["a", "b", "c"], [["a", "b", "c"]]),
        (2, ["a", "b", "c"], [["a", "c"], ["b"]]),
        (3, ["a", "b", "c", "d", "e"], [["a", "d"], ["b", "e"], ["c"]]),
        (4, ["a"], [["a"], [], [], []]),
    ],
)
def test_orphans_are_dealt_round_robin(
    count: int, orphans: list[str], expected: list[list[str]]
) -> None:
    assert assign_orphans(count, orphans) == expected


def test_every_orphan_goes_to_exactly_one_worker_and_shares_differ_by_one_at_most() -> None:
    for count in range(1, 7):
        for total in range(0, 20):
            orphans = list(range(total))
            shares = assign_orphans(count, orphans)
            assert len(shares) == count
            assert sorted(o for share in shares for o in share) == orphans
            sizes = [len(share) for share in shares]
            assert max(sizes) - min(sizes) <= 1


def test_a_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        assign_orphans(0, ["a"])


def make_spools(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name / "env").mkdir(parents=True)


def test_only_worker_n_directories_are_spools(tmp_path: Path) -> None:
    make_spools(tmp_path, ["worker-0", "worker-3", "worker-10", "worker-01", "worker-x", "env"])
    (tmp_path / "worker-7").write_text("a file, not a spool")
    (tmp_path / "worker-8").symlink_to(tmp_path / "worker-0")
    assert find_spools(tmp_path) == {
        0: tmp_path / "worker-0",
        3: tmp_path / "worker-3",
        10: tmp_path / "worker-10",
    }
    assert find_spools(tmp_path / "missing") == {}


def test_plan_gives_each_worker_its_own_spool_then_the_orphans(tmp_path: Path) -> None:
    make_spools(tmp_path, [spool_name(n) for n in (0, 1, 2, 3, 4, 10)])
    legacy = tmp_path / "legacy"
    plan = plan_spools(tmp_path, 2, adopt=[legacy])
    w = {n: tmp_path / spool_name(n) for n in (0, 1, 2, 3, 4, 10)}
    # Orphans in order: the adopted directory, then worker-2, 3, 4, 10.
    assert plan == [
        (w[0], legacy, w[3], w[10]),
        (w[1], w[2], w[4]),
    ]


def test_plan_with_more_workers_than_spools_adopts_nothing(tmp_path: Path) -> None:
    make_spools(tmp_path, ["worker-0", "worker-1"])
    plan = plan_spools(tmp_path, 3)
    assert plan == [(tmp_path / spool_name(n),) for n in range(3)]
    assert not (tmp_path / "worker-2").exists(), "planning creates nothing"


def test_lowering_the_count_then_raising_it_again_serves_every_spool(tmp_path: Path) -> None:
    make_spools(tmp_path, [spool_name(n) for n in range(4)])
    for count in (4, 3, 2, 1, 2, 5):
        plan = plan_spools(tmp_path, count)
        served = [path for spools in plan for path in spools]
        assert len(served) == len(set(served)), "a spool served twice"
        assert set(find_spools(tmp_path).values()) <= set(served), count


def test_empty_means_no_file_but_the_lock(tmp_path: Path) -> None:
    spool = tmp_path / "worker-1"
    (spool / "env").mkdir(parents=True)
    (spool / "meta").mkdir()
    assert spool_is_empty(spool)
    (spool / "spool.lock").write_text("123\n")
    assert spool_is_empty(spool)
    (spool / "tmp").mkdir()
    (spool / "tmp" / "1b3c90da-7.spare").write_text("DiskStorage's spare file")
    assert spool_is_empty(spool)
    (spool / "meta" / "tmp").mkdir()
    (spool / "meta" / "tmp" / "x").write_text("only the spool's own tmp/ is disposable")
    assert not spool_is_empty(spool)
    (spool / "meta" / "tmp" / "x").unlink()
    assert spool_is_empty(spool)
    (spool / "env" / "spool.lock").write_text("not the spool's lock")
    assert not spool_is_empty(spool)
    (spool / "env" / "spool.lock").unlink()
    (spool / "quarantine").mkdir()
    (spool / "quarantine" / "damaged.env").write_text("x")
    assert not spool_is_empty(spool)


# --- spool locks ---------------------------------------------------------------------


def test_a_spool_lock_excludes_a_second_one_until_released(tmp_path: Path) -> None:
    with SpoolLock(tmp_path) as lock:
        assert lock.held
        with pytest.raises(SpoolBusy) as caught:
            SpoolLock(tmp_path)
        assert caught.value.pid == os.getpid()
        assert caught.value.path == tmp_path
        assert str(os.getpid()) in str(caught.value)
    assert not lock.held
    SpoolLock(tmp_path).release()


def test_a_spool_lock_held_by_another_process_names_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from slimta.util.workers import SpoolLock; "
            "lock = SpoolLock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()",
            str(tmp_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(SpoolBusy) as caught:
            SpoolLock(tmp_path)
        assert caught.value.pid == holder.pid
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    # The kernel released it with the process.
    SpoolLock(tmp_path).release()


# --- the supervisor's arguments ---------------------------------------------------------


def setup_at_top_level(worker: WorkerContext) -> None:
    """A setup function a worker can import (this module is on sys.path)."""


def test_a_top_level_function_is_a_setup(tmp_path: Path) -> None:
    workers = Workers(setup_at_top_level, 2, spool_root=tmp_path, args=(1, "two", tmp_path))
    assert workers.args == (1, "two", tmp_path)
    assert workers.count == 2


def test_setups_a_worker_cannot_import_are_refused(tmp_path: Path) -> None:
    def nested(worker: WorkerContext) -> None:
        pass

    for setup in (nested, lambda worker: None, functools.partial(setup_at_top_level)):
        with pytest.raises(TypeError, match="top level of a module"):
            Workers(setup, 1, spool_root=tmp_path)


def test_args_must_pickle_and_count_be_positive(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="pickle"):
        Workers(setup_at_top_level, 1, spool_root=tmp_path, args=(lambda: None,))
    workers = Workers(setup_at_top_level, 1, spool_root=tmp_path)
    with pytest.raises(TypeError, match="pickle"):
        workers.args = (lambda: None,)
    with pytest.raises(ValueError):
        Workers(setup_at_top_level, 0, spool_root=tmp_path)


# --- server.workers ---------------------------------------------------------------------


def test_workers_key_default_number_and_auto() -> None:
    assert load_text("", "t.toml").server.workers == 1
    assert load_text("[server]\nworkers = 3", "t.toml").server.workers == 3
    assert load_text('[server]\nworkers = "auto"', "t.toml").server.workers == usable_cpus()
    assert usable_cpus() >= 1


@pytest.mark.parametrize("value", ["0", "257", "true", '"all"', "1.5"])
def test_workers_key_refuses_other_values(value: str) -> None:
    with pytest.raises(ConfigInvalid) as caught:
        load_text(f"[server]\nworkers = {value}", "t.toml")
    (line,) = caught.value.lines()
    assert line.startswith('t.toml: server.workers: expected an integer from 1 to 256, or "auto"')
