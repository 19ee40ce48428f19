"""Small blocking helpers for writing files that survive a crash.

The recipe on Linux: write the data under a temporary name, ``fsync`` the
file, give it its final name (rename or link), then ``fsync`` the directory
that holds the final name: the new directory entry is only durable once its
directory is. Used by :mod:`slimta.relay.maildir`; the disk storage's spool
follows the same recipe.

Everything here blocks and logs nothing, so it may run in a native thread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["fsync_dir", "write_all"]

#: Flags for opening a directory to fsync it.
_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: str) -> None:
    """Make the entries of directory *path* (new names, removals) durable.

    :raises OSError: when the directory cannot be opened or synced.
    """
    fd = os.open(path, _DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, chunks: Sequence[bytes]) -> None:
    """Write every byte of *chunks*, in order, to file descriptor *fd*.

    One ``writev`` call usually writes them all; a short write (a regular
    file does that only when the disk fills up, and the next call then
    raises ``ENOSPC``) is continued where it stopped.

    :raises OSError: from ``writev``.
    """
    views = [memoryview(chunk) for chunk in chunks if chunk]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            del views[0]
        if written:
            views[0] = views[0][written:]
