"""A deque whose ``pop()`` and ``popleft()`` wait for an item.

Relay pools hand work to their client greenlets through one of these: a
client blocks in ``popleft()`` until a message is queued for it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import SupportsIndex, TypeVar

from gevent.lock import Semaphore

__all__ = ["BlockingDeque"]

_T = TypeVar("_T")


class BlockingDeque(collections.deque[_T]):
    """A :class:`collections.deque` whose pops block until an item arrives.

    A gevent :class:`~gevent.lock.Semaphore` counts the items: every method
    that adds or removes items (including ``maxlen`` discards, ``clear()``,
    ``remove()``, ``del d[i]``, ``+=`` and ``*=``) keeps the count equal to
    ``len(d)``, so a waiting greenlet wakes once per item. Use
    :class:`gevent.Timeout` to bound the wait.

    :param iterable: Initial items.
    :param maxlen: As for :class:`collections.deque`.
    """

    def __init__(self, iterable: Iterable[_T] = (), maxlen: int | None = None) -> None:
        super().__init__(iterable, maxlen)
        self._items = Semaphore(len(self))

    def _sync(self, before: int) -> None:
        """Move the semaphore by the change in length since *before*."""
        change = len(self) - before
        for _ in range(change):
            self._items.release()
        for _ in range(-change):
            # Never blocks: the count was len(self) >= -change before.
            self._items.acquire(blocking=False)

    def append(self, x: _T, /) -> None:
        """Add *x* on the right, waking one waiting pop."""
        before = len(self)
        super().append(x)
        self._sync(before)

    def appendleft(self, x: _T, /) -> None:
        """Add *x* on the left, waking one waiting pop."""
        before = len(self)
        super().appendleft(x)
        self._sync(before)

    def extend(self, iterable: Iterable[_T], /) -> None:
        """Add the items of *iterable* on the right."""
        before = len(self)
        super().extend(iterable)
        self._sync(before)

    def extendleft(self, iterable: Iterable[_T], /) -> None:
        """Add the items of *iterable* on the left, in reverse order."""
        before = len(self)
        super().extendleft(iterable)
        self._sync(before)

    def insert(self, i: int, x: _T, /) -> None:
        """Insert *x* before position *i*."""
        before = len(self)
        super().insert(i, x)
        self._sync(before)

    def pop(self) -> _T:  # type: ignore[override]  # as collections.deque
        """Remove and return the rightmost item, waiting for one if empty."""
        self._items.acquire()
        return super().pop()

    def popleft(self) -> _T:
        """Remove and return the leftmost item, waiting for one if empty."""
        self._items.acquire()
        return super().popleft()

    def remove(self, value: _T, /) -> None:
        """Remove the first occurrence of *value*.

        :raises ValueError: *value* is not present.
        """
        before = len(self)
        super().remove(value)
        self._sync(before)

    def clear(self) -> None:
        """Remove every item."""
        before = len(self)
        super().clear()
        self._sync(before)

    def __delitem__(self, key: SupportsIndex, /) -> None:  # type: ignore[override]
        before = len(self)
        super().__delitem__(key)
        self._sync(before)

    def __iadd__(self, value: Iterable[_T], /) -> BlockingDeque[_T]:
        before = len(self)
        result = super().__iadd__(value)
        self._sync(before)
        return result

    def __imul__(self, value: int, /) -> BlockingDeque[_T]:
        before = len(self)
        result = super().__imul__(value)
        self._sync(before)
        return result

    # deque's own + and * fill the new deque in C, behind the overrides above.

    def __add__(self, value: collections.deque[_T], /) -> BlockingDeque[_T]:
        result = self.copy()
        result.extend(value)
        return result

    def __mul__(self, value: int, /) -> BlockingDeque[_T]:
        result = self.copy()
        result *= value
        return result

    __rmul__ = __mul__

    def __reduce__(self) -> tuple[type[BlockingDeque[_T]], tuple[list[_T], int | None]]:  # type: ignore[override]
        # The semaphore cannot be pickled; a copy builds its own from the items.
        return type(self), (list(self), self.maxlen)
