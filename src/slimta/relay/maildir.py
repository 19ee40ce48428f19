"""Final delivery into Maildir mailboxes: :class:`MaildirRelay`.

Each recipient gets its own copy of the message, written the way the Maildir
format asks (https://cr.yp.to/proto/maildir.html), so that a reader never
sees a partial file:

1. the copy is written to ``<mailbox>/tmp/<unique name>``, starting with
   the lines ``Return-Path: <sender>`` (RFC 5321 section 4.4: final
   delivery records the reverse-path) and ``Delivered-To: recipient``
   (written as Postfix and qmail write it, without ``<>``), then the
   message exactly as queued;
2. the file is flushed to disk (``fsync``);
3. it is hard-linked to ``<mailbox>/new/<unique name>`` -- a link, unlike a
   rename, never replaces an existing file -- and the ``tmp/`` name is
   removed; on a filesystem without hard links it is renamed instead;
4. ``<mailbox>/new`` itself is fsynced, which makes the new name durable.

Only then does the recipient count as delivered. A recipient reported as
failed has no file left in ``tmp/`` or ``new/``.

Unique names follow the Maildir convention
``<seconds>.M<microseconds>P<pid>Q<counter>.<hostname>``, with a counter
shared by every relay in the process and ``/`` and ``:`` in the host name
written as ``\\057`` and ``\\072``.

Blocking file I/O
-----------------

gevent makes sockets cooperative, not files: every ``write``, ``fsync``,
``link`` and ``mkdir`` here blocks the whole process (the hub included)
until the kernel returns. They are plain :mod:`os` calls on purpose: for a
small message the writes take microseconds and the two fsyncs a fraction of
a millisecond on a local disk. Running each attempt in gevent's threadpool
instead was measured (``bench/maildir_pipeline.py --threadpool-variant``,
``bench/results-maildir.md``): a gain in one load shape that the noise of a
shared box could not confirm, and more CPU per message in the other; so the
simple version stays. A relay writing to a slow or
network filesystem is better put in a process of its own.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from slimta import logging as slogging
from slimta.relay import (
    PermanentRelayError,
    RecipientResult,
    Relay,
    RelayError,
    TransientRelayError,
)
from slimta.smtp.reply import Reply
from slimta.util._durable import fsync_dir, write_all

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["MaildirRelay"]

_log = logging.getLogger(__name__)

#: ``mailbox_for(recipient) -> path``: the Maildir of one recipient, or
#: ``None`` when the recipient has no mailbox.
MailboxFor: TypeAlias = Callable[[str], str | os.PathLike[str] | None]

#: The three directories of a Maildir.
_SUBDIRS = ("tmp", "new", "cur")

#: Flags for a new file in ``tmp/``: it must not exist yet.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)

#: ``link`` errors that mean "this filesystem has no hard links": the file is
#: renamed into ``new/`` instead.
_NO_LINKS = frozenset({errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})

#: Errors that mean the disk, or the user's quota, is full.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

#: Characters never allowed in an address we write into a header or use in
#: a path: control characters (NUL, CR and LF among them) and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: A backslash escape inside a quoted local part (RFC 5321 ``quoted-pairSMTP``).
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)

#: Longest directory name most filesystems accept (``NAME_MAX``), in bytes.
_NAME_MAX = 255

#: Delivery counter for unique names, shared by all relays in the process;
#: ``next()`` on it is atomic in CPython.
_deliveries = itertools.count(1)


def _escape_hostname(hostname: str) -> str:
    # The Maildir convention: "/" and ":" cannot appear in the name, the
    # first because it separates paths, the second because it starts the
    # "info" part readers add in cur/.
    return hostname.replace("/", "\\057").replace(":", "\\072")


def _unique_name(hostname: str) -> str:
    """A Maildir file name no other delivery (here or elsewhere) uses."""
    seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    return f"{seconds}.M{nanoseconds // 1000}P{os.getpid()}Q{next(_deliveries)}.{hostname}"


def _local_part(address: str) -> str:
    """The local part of *address* (all of it without ``@``), unquoted."""
    local = address.rpartition("@")[0] if "@" in address else address
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        # RFC 5322 section 3.2.4: the quotes and backslashes of a quoted
        # string are not part of its content, so "a"@x is a@x.
        local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return local


def _unsafe_reason(local: str) -> str | None:
    """Why *local* cannot be used as a directory name, or ``None``."""
    if not local:
        return "empty local part"
    if local.startswith("."):
        # Also catches "." and "..", and keeps hidden directories out.
        return "local part starts with a dot"
    if "/" in local:
        return "local part contains a slash"
    if _CONTROL.search(local) is not None:
        return "local part contains a control character"
    if len(local.encode("utf-8", "surrogateescape")) > _NAME_MAX:
        return "local part too long"
    return None


def _bad_address(kind: str, esc: str, reason: str) -> PermanentRelayError:
    text = f"Bad {kind} address: {reason}"
    return PermanentRelayError(text, Reply("550", f"{esc} {text}"))


def _no_mailbox() -> PermanentRelayError:
    text = "No such mailbox"
    return PermanentRelayError(text, Reply("550", f"5.1.1 {text}"))


def _io_error(exc: OSError) -> TransientRelayError:
    """The transient failure of one recipient whose file could not be stored."""
    reason = exc.strerror or str(exc)
    if exc.errno in _NO_SPACE:
        text = f"Insufficient system storage: {reason}"
        return TransientRelayError(text, Reply("452", f"4.3.1 {text}"))
    # The reply may end up in a bounce, so it names the reason, never a path.
    text = f"Mailbox unavailable: {reason}"
    return TransientRelayError(text, Reply("450", f"4.3.0 {text}"))


def _header_address(address: str) -> bytes:
    return address.encode("utf-8", "surrogateescape")


# --- the blocking part ---------------------------------------------------------


@dataclass(slots=True)
class _Delivery:
    """One recipient's copy: where it goes and how it went."""

    recipient: str
    mailbox: str
    name: str
    #: Set once the file is durable in ``new/``.
    path: str | None = None
    #: Why it failed, when it did.
    error: OSError | None = None
    #: Something that went wrong after the file was safe, for the log.
    warning: str | None = None


def _mkdir_with_parents(path: str) -> None:
    """Create directory *path* (mode 0o700) and any missing parents, each
    made durable in its parent."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if not parent or parent == path:
            raise
        _mkdir_with_parents(parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
    fsync_dir(os.path.dirname(path) or ".")


def _make_maildir(base_dir: str, mailbox: str) -> None:
    """Create *mailbox* and its ``tmp``, ``new`` and ``cur`` where missing.

    *base_dir* itself is never created: when it is missing (say, the volume
    is not mounted) deliveries fail transiently and the mail stays queued.
    """
    if not os.path.isdir(base_dir):
        raise FileNotFoundError(errno.ENOENT, "Mail base directory is missing", base_dir)
    _mkdir_with_parents(mailbox)
    created = False
    for sub in _SUBDIRS:
        try:
            os.mkdir(os.path.join(mailbox, sub), 0o700)
        except FileExistsError:
            continue
        created = True
    if created:
        fsync_dir(mailbox)


def _write_tmp(tmp: str, chunks: Sequence[bytes], file_mode: int) -> None:
    """Write *chunks* to the new file *tmp* and fsync it; on any error the
    file is removed again."""
    fd = os.open(tmp, _CREATE, file_mode)
    try:
        # fchmod: os.open's mode is cut by the umask, file_mode is meant as given.
        os.fchmod(fd, file_mode)
        write_all(fd, chunks)
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _link_into_new(tmp: str, new: str) -> bool:
    """Give *tmp* its final name *new*.

    :returns: whether *tmp* still exists (a link) or not (a rename).
    """
    try:
        # follow_symlinks=False is link(2) itself: link the tmp/ entry as it is.
        os.link(tmp, new, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links on this filesystem. A rename would replace a file of
        # the same name, but the name is unique, so there is none.
        os.rename(tmp, new)
        return False
    return True


def _store(delivery: _Delivery, base_dir: str, chunks: Sequence[bytes], file_mode: int) -> None:
    """Deliver one copy (steps 1-4 of the module notes); blocking.

    Sets :attr:`_Delivery.path` on success, :attr:`_Delivery.error` on
    failure; leaves no file in ``tmp/`` or ``new/`` behind when it fails.
    """
    mailbox, name = delivery.mailbox, delivery.name
    tmp = os.path.join(mailbox, "tmp", name)
    new_dir = os.path.join(mailbox, "new")
    new = os.path.join(new_dir, name)
    try:
        try:
            _write_tmp(tmp, chunks, file_mode)
        except FileNotFoundError:
            _make_maildir(base_dir, mailbox)
            _write_tmp(tmp, chunks, file_mode)
        try:
            try:
                linked = _link_into_new(tmp, new)
            except FileNotFoundError:
                _make_maildir(base_dir, mailbox)  # new/ was missing
                linked = _link_into_new(tmp, new)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        delivery.error = exc
        return
    if linked:
        try:
            os.unlink(tmp)
        except OSError as exc:
            # The message is safe in new/; readers clean up old tmp/ files.
            delivery.warning = f"tmp file not removed: {exc.strerror or exc}"
    try:
        fsync_dir(new_dir)
    except OSError as exc:
        _withdraw(delivery, new, exc)
        return
    delivery.path = new


def _withdraw(delivery: _Delivery, new: str, exc: OSError) -> None:
    """``new/`` could not be synced: take the file back and report *exc*, so
    that the queue tries again rather than count on a name a crash may lose."""
    try:
        os.unlink(new)
    except FileNotFoundError:
        # A reader has already moved it to cur/: the user has the message.
        delivery.path = new
        delivery.warning = f"new/ not synced, but the message was read: {exc.strerror or exc}"
        return
    except OSError:
        # It stays visible, so reporting a failure would deliver it twice.
        delivery.path = new
        delivery.warning = f"new/ not synced and the file not withdrawn: {exc.strerror or exc}"
        return
    delivery.error = exc


# --- the relay -----------------------------------------------------------------


class MaildirRelay(Relay):
    """Delivers each recipient's copy into a Maildir on the local disk.

    By default the mailbox of ``user@domain`` is ``<base_dir>/user``: the
    local part, unquoted and lower-cased, whatever the domain. Lower-casing
    follows common practice: RFC 5321 section 2.4 leaves the meaning of a
    local part to the host that delivers, and users expect ``Bob@`` and
    ``bob@`` to reach one mailbox (which a case-insensitive filesystem would
    do anyway for some names and not others). Local parts that are not safe
    as a directory name are refused for good with ``550 5.1.3``: empty,
    starting with a dot (so ``.`` and ``..`` too), containing ``/`` or a
    control character (NUL, CR, LF, ...), or over 255 bytes. Recipients are
    accepted for any local part otherwise, and their mailbox is created on
    first delivery; pass *mailbox_for* to restrict or change the layout.

    ``tmp/``, ``new/`` and ``cur/`` (and the mailbox directory) are created
    with mode 0o700 when missing. *base_dir* itself is never created: a
    missing one fails every delivery transiently, so mail waits in the queue
    while, for instance, a volume is not mounted.

    :meth:`attempt` returns one result per distinct recipient (see
    :meth:`~slimta.relay.Relay.attempt`), so a queue retries only the
    recipients that failed. A recipient listed twice gets one copy; two
    addresses leading to one mailbox (``Bob@a``, ``bob@b``) get one each,
    each naming its own recipient in ``Delivered-To``.
    A file that cannot be stored (disk full, permissions, I/O error) fails
    that recipient only, transiently: ``452 4.3.1`` for a full disk or quota
    (``ENOSPC``, ``EDQUOT``), ``450 4.3.0`` otherwise, the reply naming the
    reason.

    The message is written byte for byte as queued, after the two added
    lines: line endings stay CRLF (Dovecot and the stdlib :mod:`mailbox`
    read them; Postfix's ``local`` would write LF) and header fields already
    present, ``Return-Path`` included, are kept.

    Files are written with plain blocking :mod:`os` calls: gevent does not
    make file I/O cooperative, so the process waits for each write and
    fsync (see the module notes).

    :param base_dir: the directory holding the mailboxes; must exist.
    :param mailbox_for: ``mailbox_for(recipient) -> path``: the Maildir of a
        recipient. The path is trusted as given (no checks on its parts);
        a relative one is taken relative to *base_dir*. Build it only from
        parts you checked: ``"../x"@example.org`` is a valid address, and a
        local part joined as it is would leave *base_dir*. ``None`` means "no
        such user": ``550 5.1.1``. A :class:`~slimta.relay.RelayError` it
        raises is that recipient's result; any other exception is logged
        and fails the recipient transiently. Addresses with control
        characters are refused before it is called.
    :param file_mode: permission bits of the delivered files, set exactly
        (not reduced by the umask).
    :param hostname: the host name in unique file names; default
        :func:`socket.gethostname`.

    .. versionadded:: 4.0
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        mailbox_for: MailboxFor | None = None,
        file_mode: int = 0o600,
        hostname: str | None = None,
    ) -> None:
        super().__init__()
        #: The directory holding the mailboxes.
        self.base_dir: str = os.fspath(base_dir)
        #: Permission bits of delivered files.
        self.file_mode = file_mode
        self._mailbox_for = mailbox_for
        self._hostname = _escape_hostname(
            hostname if hostname is not None else socket.gethostname()
        )

    def mailbox_path(self, recipient: str) -> str:
        """The Maildir directory *recipient* is delivered to.

        :param recipient: the recipient address, without ``<>``.
        :returns: the mailbox path.
        :raises PermanentRelayError: ``550 5.1.3`` for an address that is not
            safe to deliver to, ``550 5.1.1`` when *mailbox_for* says there
            is no such mailbox; or what *mailbox_for* raised.
        """
        if _CONTROL.search(recipient) is not None:
            raise _bad_address("recipient", "5.1.3", "contains a control character")
        if self._mailbox_for is None:
            local = _local_part(recipient)
            reason = _unsafe_reason(local)
            if reason is not None:
                raise _bad_address("recipient", "5.1.3", reason)
            return os.path.join(self.base_dir, local.lower())
        path = self._mailbox_for(recipient)
        if path is None:
            raise _no_mailbox()
        return os.path.join(self.base_dir, os.fspath(path))

    def _resolve(self, recipient: str) -> str | RelayError:
        """:meth:`mailbox_path`, with the failure returned instead of raised."""
        try:
            return self.mailbox_path(recipient)
        except RelayError as exc:
            return exc
        except Exception:
            slogging.log_exception(__name__, recipient=recipient)
            text = "Mailbox lookup failed"
            return TransientRelayError(text, Reply("450", f"4.3.0 {text}"))

    def attempt(self, envelope: Envelope, attempts: int) -> dict[str, RecipientResult]:
        """Deliver a copy of *envelope* into the Maildir of each recipient.

        The envelope is not changed: the added header lines exist only in
        the files written.

        :param envelope: the message.
        :param attempts: how many attempts failed before this one (unused).
        :returns: ``{recipient: result}`` for each distinct recipient: a
            ``250 2.0.0`` :class:`~slimta.smtp.reply.Reply` when its copy is
            in ``new/``, else a :class:`~slimta.relay.PermanentRelayError`
            or :class:`~slimta.relay.TransientRelayError`.
        :raises PermanentRelayError: ``550 5.1.7`` when the sender address
            holds a control character (it would break the ``Return-Path``
            line).
        """
        sender = envelope.sender or ""
        if _CONTROL.search(sender) is not None:
            raise _bad_address("sender", "5.1.7", "contains a control character")
        header_bytes, body = envelope.flatten()
        if not header_bytes:
            header_bytes = b"\r\n"  # no header block at all: keep the body a body
        return_path = b"Return-Path: <%s>\r\n" % _header_address(sender)

        results: dict[str, RecipientResult] = {}
        deliveries: list[_Delivery] = []
        for recipient in envelope.recipients:
            if recipient in results:
                continue
            mailbox = self._resolve(recipient)
            if isinstance(mailbox, RelayError):
                results[recipient] = mailbox
                slogging.logline(
                    _log.warning,
                    "maildir",
                    "none",
                    "refused",
                    recipient=recipient,
                    reply=str(mailbox.reply),
                )
                continue
            results[recipient] = None  # a placeholder, so duplicates are skipped
            deliveries.append(_Delivery(recipient, mailbox, _unique_name(self._hostname)))

        for delivery in deliveries:
            delivered_to = b"Delivered-To: %s\r\n" % _header_address(delivery.recipient)
            chunks = (return_path + delivered_to, header_bytes, body)
            _store(delivery, self.base_dir, chunks, self.file_mode)
            results[delivery.recipient] = self._outcome(delivery, sender)
        return results

    def _outcome(self, delivery: _Delivery, sender: str) -> RecipientResult:
        """Log how *delivery* went and turn it into its recipient's result."""
        if delivery.warning is not None:
            slogging.logline(
                _log.warning,
                "maildir",
                delivery.name,
                "warning",
                recipient=delivery.recipient,
                mailbox=delivery.mailbox,
                problem=delivery.warning,
            )
        if delivery.error is not None:
            error = _io_error(delivery.error)
            slogging.logline(
                _log.warning,
                "maildir",
                delivery.name,
                "failed",
                recipient=delivery.recipient,
                mailbox=delivery.mailbox,
                error=str(delivery.error),
                reply=str(error.reply),
            )
            return error
        slogging.logline(
            _log.info,
            "maildir",
            delivery.name,
            "delivered",
            sender=sender,
            recipient=delivery.recipient,
            mailbox=delivery.mailbox,
        )
        return Reply("250", f"2.0.0 Delivered to Maildir as {delivery.name}")
