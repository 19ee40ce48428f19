"""Tests for slimta.util.deque.BlockingDeque with real greenlets."""

from __future__ import annotations

import copy
import pickle
from collections import deque
from collections.abc import Callable

import gevent
import pytest

import slimta.util.deque
from slimta.util.deque import BlockingDeque


def waiting(func: Callable[[], int]) -> gevent.Greenlet:
    """Start *func* in a greenlet and let it run until it blocks."""
    greenlet = gevent.spawn(func)
    gevent.idle()
    return greenlet


def assert_in_step(d: BlockingDeque[int]) -> None:
    """Every item can be popped without blocking, and then no more."""
    items = list(d)
    popped = [d.popleft() for _ in items]
    assert popped == items
    blocked = waiting(d.popleft)
    assert not blocked.ready(), "popleft() did not block on an empty deque"
    blocked.kill()
    d.extend(items)


def test_public_names() -> None:
    assert slimta.util.deque.__all__ == ["BlockingDeque"]


def test_is_a_deque() -> None:
    d = BlockingDeque([1, 2, 3])
    assert isinstance(d, deque)
    assert list(d) == [1, 2, 3]
    assert d.pop() == 3
    assert d.popleft() == 1
    assert list(d) == [2]


def test_popleft_waits_for_append() -> None:
    d: BlockingDeque[int] = BlockingDeque()
    greenlet = waiting(d.popleft)
    assert not greenlet.ready()
    d.append(7)
    assert greenlet.get(timeout=5) == 7
    assert len(d) == 0


def test_pop_waits_for_appendleft() -> None:
    d: BlockingDeque[int] = BlockingDeque()
    greenlet = waiting(d.pop)
    assert not greenlet.ready()
    d.appendleft(8)
    assert greenlet.get(timeout=5) == 8


def test_each_item_wakes_one_waiter() -> None:
    d: BlockingDeque[int] = BlockingDeque()
    greenlets = [waiting(d.popleft) for _ in range(3)]
    d.extend([1, 2])
    gevent.idle()
    assert sorted(g.value for g in greenlets if g.ready()) == [1, 2]
    d.extendleft([3])
    gevent.joinall(greenlets, timeout=5)
    assert sorted(g.value for g in greenlets) == [1, 2, 3]


def test_timeout_while_waiting_leaves_count_alone() -> None:
    d: BlockingDeque[int] = BlockingDeque()
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.01):
        d.popleft()
    d.append(1)
    assert_in_step(d)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.append(9), [1, 2, 3, 9]),
        (lambda d: d.appendleft(0), [0, 1, 2, 3]),
        (lambda d: d.extend([4, 5]), [1, 2, 3, 4, 5]),
        (lambda d: d.extendleft([0, -1]), [-1, 0, 1, 2, 3]),
        (lambda d: d.insert(1, 9), [1, 9, 2, 3]),
        (lambda d: d.remove(2), [1, 3]),
        (lambda d: d.clear(), []),
        (lambda d: d.__delitem__(0), [2, 3]),
        (lambda d: d.__iadd__([4]), [1, 2, 3, 4]),
        (lambda d: d.__imul__(2), [1, 2, 3, 1, 2, 3]),
        (lambda d: d.__imul__(0), []),
        (lambda d: d.rotate(1), [3, 1, 2]),
        (lambda d: d.reverse(), [3, 2, 1]),
        (lambda d: d.__setitem__(0, 5), [5, 2, 3]),
    ],
)
def test_mutators_keep_count_in_step(
    mutate: Callable[[BlockingDeque[int]], object], expected: list[int]
) -> None:
    d = BlockingDeque([1, 2, 3])
    mutate(d)
    assert list(d) == expected
    assert_in_step(d)


def test_maxlen_discards_keep_count_in_step() -> None:
    d = BlockingDeque([1, 2], maxlen=3)
    d.append(3)
    d.append(4)
    d.appendleft(0)
    d.extend([7, 8, 9, 10])
    assert list(d) == [8, 9, 10]
    assert_in_step(d)
    with pytest.raises(IndexError):
        d.insert(0, 1)
    assert_in_step(d)


def test_failed_remove_keeps_count() -> None:
    d = BlockingDeque([1])
    with pytest.raises(ValueError):
        d.remove(2)
    assert_in_step(d)


@pytest.mark.parametrize(
    "make",
    [
        lambda d: d.copy(),
        lambda d: copy.copy(d),
        lambda d: copy.deepcopy(d),
        lambda d: pickle.loads(pickle.dumps(d)),
        lambda d: d + deque([4]),
        lambda d: d * 2,
        lambda d: 2 * d,
    ],
)
def test_new_deques_count_their_items(make: Callable[[BlockingDeque[int]], object]) -> None:
    d = BlockingDeque([1, 2, 3], maxlen=6)
    new = make(d)
    assert type(new) is BlockingDeque
    assert new.maxlen == 6
    assert_in_step(new)
    assert_in_step(d)


def test_item_taken_before_woken_waiter_runs() -> None:
    d: BlockingDeque[int] = BlockingDeque()
    greenlet = waiting(d.popleft)
    d.append(1)
    assert d.popleft() == 1  # this greenlet gets there first, without yielding
    gevent.idle()
    assert not greenlet.ready()  # the waiter went back to waiting, no IndexError
    d.append(2)
    assert greenlet.get(timeout=5) == 2


def test_item_removed_before_woken_waiter_runs() -> None:
    d: BlockingDeque[int] = BlockingDeque()
    greenlet = waiting(d.popleft)
    d.append(1)
    d.remove(1)
    gevent.idle()
    assert not greenlet.ready()
    d.appendleft(3)
    assert greenlet.get(timeout=5) == 3
