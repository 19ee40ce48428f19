"""Process set-up for MTA daemons: detach, redirect stdio, drop root, pid file.

A typical start-up, after binding privileged ports as root::

    system.redirect_stdio('/var/log/slimta.log', '/var/log/slimta.err')
    system.daemonize()
    system.drop_privileges('slimta', 'slimta')

.. versionchanged:: 4.0
   Moved here from ``slimta.system``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import sys
from types import TracebackType

from gevent.os import fork_gevent

__all__ = ["PidFile", "daemonize", "drop_privileges", "redirect_stdio"]

#: Mode of files :func:`redirect_stdio` creates: output may hold message
#: details, so it is not world-readable.
_OUTPUT_FILE_MODE = 0o640


def _flush_stdio() -> None:
    # Buffered output written before a fork or dup2 belongs to the old
    # process or the old file; flush it so it is neither lost nor doubled.
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()


def _fork() -> int | None:
    """Fork (re-initialising gevent in the child); ``None`` if it fails."""
    try:
        pid: int = fork_gevent()
    except OSError:
        return None
    return pid


def daemonize() -> int | None:
    """Detach from the terminal and session with the classic double fork.

    The calling process and the intermediate one exit (status 0); only the
    daemon returns. It runs in a new session without a controlling terminal,
    in ``/``, with a umask of 0. Standard input and output are not touched:
    call :func:`redirect_stdio` first.

    :returns: The daemon's PID, or ``None`` if a fork failed (in the process
        that tried it).
    """
    _flush_stdio()
    pid = _fork()
    if pid is None:
        return None
    if pid:
        os._exit(0)  # skip atexit handlers and buffers that belong to the child
    os.setsid()
    pid = _fork()
    if pid is None:
        return None
    if pid:
        os._exit(0)
    os.chdir("/")
    os.umask(0)
    return os.getpid()


def _point_fd(fd: int, path: str | os.PathLike[str], flags: int) -> None:
    new_fd = os.open(path, flags, _OUTPUT_FILE_MODE)
    try:
        if new_fd != fd:
            os.dup2(new_fd, fd)
    finally:
        if new_fd != fd:
            os.close(new_fd)


def redirect_stdio(
    stdout: str | os.PathLike[str] | None = None,
    stderr: str | os.PathLike[str] | None = None,
    stdin: str | os.PathLike[str] | None = None,
) -> None:
    """Re-point file descriptors 0, 1 and 2 at files.

    Output files are opened for appending (created if missing, mode 0640),
    the input file read-only. Any one not given goes to :data:`os.devnull`.
    ``sys.stdout`` and friends keep working, now writing to the new files.

    :param stdout: File for standard output.
    :param stderr: File for standard error.
    :param stdin: File for standard input.
    :raises OSError: A file could not be opened; descriptors already
        re-pointed stay so.
    """
    _flush_stdio()
    append = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    _point_fd(0, stdin or os.devnull, os.O_RDONLY)
    _point_fd(1, stdout or os.devnull, append)
    _point_fd(2, stderr or os.devnull, append)


def _numeric_id(value: int | str) -> int | None:
    if isinstance(value, int):
        return value
    if value.isascii() and value.isdigit():
        return int(value)
    return None


def _resolve_user(user: int | str) -> tuple[int, int | None]:
    """UID of *user* and its primary GID (``None`` if not in the passwd db)."""
    uid = _numeric_id(user)
    try:
        entry = pwd.getpwuid(uid) if uid is not None else pwd.getpwnam(str(user))
    except KeyError:
        if uid is not None:  # a bare numeric id need not have a passwd entry
            return uid, None
        raise ValueError(f"drop_privileges: unknown user {user!r}") from None
    return entry.pw_uid, entry.pw_gid


def _resolve_group(group: int | str) -> int:
    gid = _numeric_id(group)
    if gid is not None:
        return gid
    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise ValueError(f"drop_privileges: unknown group {group!r}") from None


def drop_privileges(user: int | str | None = None, group: int | str | None = None) -> None:
    """Switch the process to *group* and then *user*, e.g. after binding ports.

    Names and numeric ids (as ``int`` or numeric strings) are both accepted.
    Both are looked up before anything changes, so an unknown name leaves
    the process as it was.

    When running as root, supplementary groups are dropped too, and a *user*
    given without a *group* also takes that user's primary group, so no
    root group membership survives the switch. (A numeric *user* with no
    passwd entry has no primary group: pass *group* as well.)

    :param user: User to become, or ``None`` to keep the user.
    :param group: Group to become, or ``None`` (see above).
    :raises ValueError: *user* or *group* is an unknown name.
    :raises OSError: The switch was not permitted.

    .. versionchanged:: 4.0
       Supplementary groups are cleared and a lone *user* brings its primary
       group.
    """
    uid = gid = None
    if user is not None:
        uid, gid = _resolve_user(user)
    if group is not None:
        gid = _resolve_group(group)
    if uid is None and gid is None:
        return
    if os.geteuid() == 0:
        os.setgroups([])
    if gid is not None:
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


class PidFile:
    """Context manager that keeps a file holding the process id.

    The path is made absolute when the object is created, so a later
    ``chdir`` (as in :func:`daemonize`) does not move it::

        with PidFile('/run/slimta.pid'):
            serve_forever()

    :param filename: Where to write the pid; if empty or ``None``, nothing
        is written.
    """

    def __init__(self, filename: str | os.PathLike[str] | None = None) -> None:
        #: The absolute path of the pid file, or ``None``.
        self.filename: str | None = os.path.abspath(filename) if filename else None
        self._pid: int | None = None

    def __enter__(self) -> str | None:
        """Write ``"<pid>\\n"`` to the file.

        :returns: The file's absolute path, or ``None`` without a filename.
        """
        if not self.filename:
            return None
        self._pid = os.getpid()
        with open(self.filename, "w", encoding="ascii") as pid_file:
            pid_file.write(f"{self._pid}\n")
        return self.filename

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Remove the file, ignoring errors.

        A forked child leaving the ``with`` block leaves the file alone: it
        names its parent.
        """
        if not self.filename or self._pid != os.getpid():
            return
        with contextlib.suppress(OSError):
            os.unlink(self.filename)
