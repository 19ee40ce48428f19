"""Relays that hand each message to a local program on its standard input.

:class:`PipeRelay` runs any program; :class:`MaildropRelay` and
:class:`DovecotLdaRelay` run the usual local delivery agents and read their
exit statuses.

Running the program
-------------------

The program is started directly, never through a shell (``shell=True`` is
refused). Each item of *args* is a template for exactly one argument: it is
formatted with :meth:`str.format` and the result is passed as one ``argv``
item whatever it holds (spaces, quotes, ``;``, ``$(...)``, newlines).
Values are inserted once and never formatted again, so a ``{`` in an
address stays a ``{``. The fields a template may name:

``{sender}``, ``{recipient}``
    The envelope sender (``''`` for the null sender) and the recipient this
    run delivers to.
``{message_id}``
    The ``Message-Id`` header, unfolded, or ``''``.
``{client_ip}``, ``{client_host}``, ``{client_ehlo}``, ``{client_protocol}``
    From :attr:`Envelope.client <slimta.envelope.Envelope.client>` (``ip``,
    ``host``, ``name``, ``protocol``); ``''`` when unknown.
``{client_auth}``
    The identity the client authenticated as (the *authcid* of
    ``client['auth']``), or ``''``.

Unknown fields and unbalanced braces raise :class:`ValueError` when the
relay is created, not at delivery time.

.. warning::

   A value from the envelope may begin with ``-``, and ``{message_id}``
   comes from the message itself: put such a value where the program reads
   it as a value, never as an option or a file name (``-f {sender}``, not
   ``{sender}``). :class:`MaildropRelay` and :class:`DovecotLdaRelay` also
   refuse addresses that begin with ``-`` or hold CR, LF or NUL.

The message (:meth:`Envelope.flatten <slimta.envelope.Envelope.flatten>`)
is written to the program's standard input byte for byte, 8-bit data
included. A program may exit before reading all of it: its exit status
decides. At most 64 KiB of each of standard output and standard error are
kept (the rest is read and dropped, so a chatty program never blocks on a
full pipe). After *timeout* seconds the program and its
process group are killed and reaped, and the attempt fails with
``450 4.4.2 Delivery timed out``. Everything runs on gevent's subprocess
support, so other greenlets keep running meanwhile.

Exit statuses
-------------

``0`` is success. Otherwise :meth:`PipeRelay.raise_error` turns the status
and the decoded output into a :class:`~slimta.relay.RelayError`; the
``sysexits.h`` statuses (64 to 78) also give the enhanced status code when
the output has none, e.g. ``EX_NOUSER`` (67) gives ``X.1.1``. A program that
cannot be started at all fails permanently with ``550 5.3.5``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import string
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import gevent
from gevent import subprocess as gsubprocess

from slimta import logging as slogging
from slimta.relay import (
    AttemptResult,
    PermanentRelayError,
    RecipientResult,
    Relay,
    RelayError,
    TransientRelayError,
)
from slimta.smtp.reply import Reply

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["DovecotLdaRelay", "MaildropRelay", "PipeRelay"]

_log = slogging.getSubprocessLogger(__name__)

#: Bytes of standard output, and of standard error, kept from one run.
_OUTPUT_LIMIT = 64 * 1024

#: Bytes read from the program's output at a time.
_CHUNK = 64 * 1024

#: The fields an argument template may name.
_FIELDS = frozenset(
    (
        "sender",
        "recipient",
        "message_id",
        "client_ip",
        "client_host",
        "client_ehlo",
        "client_protocol",
        "client_auth",
    )
)

#: Keyword arguments of :class:`subprocess.Popen` the relay sets itself.
_RESERVED_POPEN_KWARGS = frozenset(
    (
        "args",
        "stdin",
        "stdout",
        "stderr",
        "bufsize",
        "text",
        "universal_newlines",
        "encoding",
        "errors",
        "input",
        "capture_output",
        "timeout",
        "check",
    )
)

#: ``sysexits.h``: exit status -> enhanced status code without its class
#: digit (RFC 3463), used when the program's output carries none.
_SYSEXIT_DETAIL: dict[int, str] = {
    64: "3.5",  # EX_USAGE: the relay's command line is wrong
    65: "6.0",  # EX_DATAERR: the program could not use the message
    66: "3.0",  # EX_NOINPUT
    67: "1.1",  # EX_NOUSER: no such mailbox
    68: "1.2",  # EX_NOHOST
    69: "3.0",  # EX_UNAVAILABLE
    70: "3.0",  # EX_SOFTWARE
    71: "3.0",  # EX_OSERR
    72: "3.5",  # EX_OSFILE
    73: "2.0",  # EX_CANTCREAT: the mailbox cannot be written
    74: "3.0",  # EX_IOERR
    75: "3.0",  # EX_TEMPFAIL
    76: "5.0",  # EX_PROTOCOL
    77: "7.0",  # EX_NOPERM
    78: "3.5",  # EX_CONFIG
}

#: ``errno`` values from starting a program that no retry will fix.
_CANNOT_RUN = frozenset(
    (
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENOEXEC,
        errno.ELOOP,
        errno.ENAMETOOLONG,
    )
)

#: A leading enhanced status code (RFC 3463) in the program's message.
_ESC_PREFIX = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?:\s|$)")

#: Longest reply text taken from a program's output.
_MAX_MESSAGE = 500

#: A character that must not reach a reply line: controls and line breaks.
_UNPRINTABLE = re.compile(r"[^\S ]|[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes | None: ...


class _Writable(Protocol):
    def write(self, data: memoryview, /) -> int | None: ...

    def close(self) -> None: ...


def _clean(line: str) -> str:
    """*line* made safe for one reply line: no controls, bounded length."""
    return _UNPRINTABLE.sub(" ", line).strip()[:_MAX_MESSAGE].rstrip()


def _first_line(text: str) -> str:
    """The first line of *text* with something on it, cleaned; or ``''``."""
    for line in text.splitlines():
        cleaned = _clean(line)
        if cleaned:
            return cleaned
    return ""


def _has_esc(message: str) -> bool:
    return _ESC_PREFIX.match(message) is not None


def _sysexit_reply(code: str, status: int, message: str) -> Reply:
    """``Reply(code, message)``, with the enhanced status code of *status*
    when *message* brings none (its class digit follows *code*)."""
    reply = Reply(code, message)
    detail = _SYSEXIT_DETAIL.get(status)
    if detail is not None and not _has_esc(message):
        reply.enhanced_status_code = f"{code[0]}.{detail}"
    return reply


def _signal_message(status: int) -> str:
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    return f"Delivery program killed by {name}"


def _exit_status_error(status: int, message: str, permanent: bool) -> RelayError:
    """The error for a program that exited with *status* saying *message*.

    A program killed by a signal (negative *status*) and ``EX_TEMPFAIL``
    are always transient: neither says anything about the message.
    """
    if status < 0 or status == os.EX_TEMPFAIL or not permanent:
        return TransientRelayError(message, _sysexit_reply("450", status, message))
    return PermanentRelayError(message, _sysexit_reply("550", status, message))


def _template_fields(template: str) -> set[str]:
    """The fields *template* names.

    :raises ValueError: unbalanced braces, an unknown field, attribute or
        index access, or a nested field in a format spec.
    """
    used: set[str] = set()
    for _, field, spec, _ in string.Formatter().parse(template):
        if field is None:
            continue
        if field not in _FIELDS:
            known = ", ".join(f"{{{name}}}" for name in sorted(_FIELDS))
            raise ValueError(f"Unknown field {{{field}}} in {template!r}; use one of {known}")
        if spec and ("{" in spec or "}" in spec):
            raise ValueError(f"Nested field in {template!r}")
        used.add(field)
    return used


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _auth_identity(auth: object) -> str:
    """The authcid of ``client['auth']`` (``(authcid, authzid)``, or a string)."""
    if isinstance(auth, tuple | list):
        return _text(auth[0]) if auth else ""
    return _text(auth)


def _message_id(envelope: Envelope) -> str:
    headers = envelope.headers
    if headers is None:
        return ""
    value = headers.get("Message-Id")
    return "" if value is None else " ".join(str(value).split())


def _feed(stream: _Writable, data: bytes, failure: list[OSError]) -> None:
    """Write *data* to the program's stdin, then close it.

    A program may exit, or close its stdin, before reading everything
    (``EPIPE``): that is not an error here, its exit status decides. Any
    other write error is put in *failure*.
    """
    view = memoryview(data)
    try:
        while view:
            written = stream.write(view)
            view = view[written or 0 :]
    except BrokenPipeError:
        pass
    except OSError as exc:
        failure.append(exc)
    finally:
        with contextlib.suppress(OSError):
            stream.close()


def _collect(stream: _Readable, sink: bytearray, limit: int) -> None:
    """Read *stream* to its end, keeping its first *limit* bytes in *sink*."""
    while True:
        try:
            chunk = stream.read(_CHUNK)
        except OSError:
            return
        if not chunk:
            return
        room = limit - len(sink)
        if room > 0:
            sink += chunk[:room]


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), 0.0)


class PipeRelay(Relay):
    """Delivers each message by running a program with the message on its stdin.

    With :attr:`per_recipient` true (the default) the program runs once per
    distinct recipient, with ``{recipient}`` set to it, and :meth:`attempt`
    returns one outcome per recipient, so the queue retries only those that
    failed. Otherwise it runs once per message, with ``{recipient}`` set to
    the first recipient.

    ``args`` templates are described in :mod:`slimta.relay.pipe`; each is
    formatted on its own and gives exactly one argument.

    :param args: the program and its arguments, as templates; the program
        is found on ``PATH`` unless it is a path.
    :param timeout: seconds one run may take before the program is killed
        and the attempt fails with ``450 4.4.2 Delivery timed out``;
        ``None`` waits forever.
    :param popen_kwargs: passed to :class:`gevent.subprocess.Popen`
        (``env``, ``cwd``, ``user``, ``umask`` ...). The relay owns the
        standard streams. ``start_new_session`` defaults to ``True`` so that
        a timeout kills everything the program started.
    :raises TypeError: *args* is a string, or *popen_kwargs* sets the
        standard streams or text mode.
    :raises ValueError: *args* is empty or holds a bad template, or
        ``shell=True`` was given.

    .. versionchanged:: 4.0
       Runs once per recipient by default (:attr:`per_recipient`); templates
       are checked when the relay is created; ``{client_*}`` fields that are
       unknown give ``''`` rather than ``'None'``; output is bounded, decoded
       before :meth:`raise_error` sees it, and ``EX_TEMPFAIL`` is always a
       transient failure; the timeout reply is ``450 4.4.2``.
    """

    #: Run the program once per recipient and report per recipient; may be
    #: set on a subclass or an instance.
    per_recipient: bool = True

    #: Refuse sender and recipient values that begin with ``-`` or hold CR,
    #: LF or NUL (subclasses for programs that take them as arguments).
    _refuse_unsafe_addresses: ClassVar[bool] = False

    #: A message starting with this (an enhanced status code of class 5)
    #: makes :meth:`raise_error` report a permanent failure.
    _permanent_error_pattern: ClassVar[re.Pattern[str]] = re.compile(r"5\.\d{1,3}\.\d{1,3}(?:\s|$)")
    #: The 4.0 name of :attr:`_permanent_error_pattern`; overriding either
    #: name in a subclass sets both.
    permanent_error_pattern: ClassVar[re.Pattern[str]] = _permanent_error_pattern

    #: Seconds to keep reading output after the program exited: something it
    #: started in the background may still hold the pipes open.
    _drain_timeout: ClassVar[float] = 5.0
    #: Seconds to wait for a killed program to be reaped.
    _reap_timeout: ClassVar[float] = 5.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "permanent_error_pattern" in own and "_permanent_error_pattern" not in own:
            cls._permanent_error_pattern = own["permanent_error_pattern"]
        elif "_permanent_error_pattern" in own and "permanent_error_pattern" not in own:
            cls.permanent_error_pattern = own["_permanent_error_pattern"]

    def __init__(
        self, args: Sequence[str], timeout: float | None = None, **popen_kwargs: Any
    ) -> None:
        super().__init__()
        if isinstance(args, str | bytes):
            raise TypeError("args must be a list of argument templates, not a string")
        args = list(args)
        if not args:
            raise ValueError("args must name a program")
        if not all(isinstance(arg, str) for arg in args):
            raise TypeError("every argument template must be a str")
        used: set[str] = set()
        for template in args:
            used |= _template_fields(template)
        if popen_kwargs.pop("shell", False):
            raise ValueError("PipeRelay never runs a shell; give the program and its arguments")
        reserved = sorted(_RESERVED_POPEN_KWARGS.intersection(popen_kwargs))
        if reserved:
            raise TypeError(f"PipeRelay sets these itself: {', '.join(reserved)}")
        popen_kwargs.setdefault("start_new_session", True)
        #: The argument templates; the first names the program.
        self.args: list[str] = args
        #: Seconds one run may take, or ``None``.
        self.timeout = timeout
        #: Keyword arguments for :class:`gevent.subprocess.Popen`.
        self.popen_kwargs: dict[str, Any] = popen_kwargs
        self._used_fields = frozenset(used)

    @property
    def _program(self) -> str:
        """The program's name, for messages."""
        return os.path.basename(self.args[0]) or self.args[0]

    def attempt(self, envelope: Envelope, attempts: int) -> AttemptResult:
        """Run the program for *envelope*.

        :param envelope: the message to deliver.
        :param attempts: how many attempts failed before this one (unused).
        :returns: with :attr:`per_recipient`, a dict mapping each recipient
            to ``None`` (delivered) or the :class:`~slimta.relay.RelayError`
            of its run; otherwise ``None``.
        :raises PermanentRelayError: without :attr:`per_recipient`: the run
            failed for good.
        :raises TransientRelayError: without :attr:`per_recipient`: the run
            failed for now (including a timeout).
        """
        header, body = envelope.flatten()
        data = header + body
        if not self.per_recipient:
            recipient = envelope.recipients[0] if envelope.recipients else ""
            self._deliver(envelope, recipient, data)
            return None
        results: dict[str, RecipientResult] = {}
        for recipient in envelope.recipients:
            if recipient in results:
                continue  # one delivery per mailbox, however often it is listed
            try:
                self._deliver(envelope, recipient, data)
            except RelayError as exc:
                results[recipient] = exc
            except Exception as exc:
                # The others' outcomes stand: raising would retry them all.
                slogging.log_exception(__name__, recipient=recipient)
                text = " ".join(str(exc).split())[:_MAX_MESSAGE]
                results[recipient] = TransientRelayError(
                    text, Reply("450", f"4.0.0 Unhandled delivery error: {text}")
                )
            else:
                results[recipient] = None
        return results

    def raise_error(self, status: int, stdout: str, stderr: str) -> None:
        """Raise the error for a run that exited with *status*.

        The message is the first non-blank line of *stdout*, else of
        *stderr*, else ``Delivery failed`` (control characters removed, at
        most 500 characters). It is permanent (``550``) when it matches
        :attr:`_permanent_error_pattern` (an enhanced status code ``5.X.X``),
        transient (``450``) otherwise, and always transient for
        ``EX_TEMPFAIL`` (75) or a program killed by a signal. Override to
        read a program's own conventions; returning without raising counts
        the run as a success.

        :param status: the exit status; negative: killed by that signal.
        :param stdout: the start of the program's standard output, decoded
            as UTF-8 (bad bytes replaced).
        :param stderr: the same for its standard error.
        :raises PermanentRelayError: the failure is permanent.
        :raises TransientRelayError: the failure is transient.

        .. versionchanged:: 4.0
           *stdout* and *stderr* are ``str``, not ``bytes``.
        """
        message = _first_line(stdout) or _first_line(stderr)
        if not message:
            message = _signal_message(status) if status < 0 else "Delivery failed"
        permanent = re.match(self._permanent_error_pattern, message) is not None
        raise _exit_status_error(status, message, permanent)

    # --- one run -------------------------------------------------------------

    def _template_values(self, envelope: Envelope, recipient: str) -> dict[str, str]:
        client: Mapping[str, Any] = envelope.client or {}
        return {
            "sender": _text(envelope.sender),
            "recipient": recipient,
            "message_id": _message_id(envelope) if "message_id" in self._used_fields else "",
            "client_ip": _text(client.get("ip")),
            "client_host": _text(client.get("host")),
            "client_ehlo": _text(client.get("name")),
            "client_protocol": _text(client.get("protocol")),
            "client_auth": _auth_identity(client.get("auth")),
        }

    def _check_values(self, values: Mapping[str, str]) -> None:
        """Refuse values that cannot, or must not, become arguments."""
        for field in sorted(self._used_fields):
            value = values[field]
            reason = None
            if "\0" in value:
                reason = "it contains a NUL character"
            elif self._refuse_unsafe_addresses and field in ("sender", "recipient"):
                if value.startswith("-"):
                    reason = "it begins with '-'"
                elif "\r" in value or "\n" in value:
                    reason = "it contains a line break"
            if reason is None:
                continue
            if field == "recipient":
                text = f"5.1.3 Recipient address not accepted by {self._program}: {reason}"
            elif field == "sender":
                text = f"5.1.7 Sender address not accepted by {self._program}: {reason}"
            else:
                text = f"5.6.0 Value of {{{field}}} not accepted by {self._program}: {reason}"
            raise PermanentRelayError(text, Reply("550", text))

    def _deliver(self, envelope: Envelope, recipient: str, data: bytes) -> None:
        """One run for *recipient*; returns on success.

        :raises RelayError: the run failed.
        """
        values = self._template_values(envelope, recipient)
        self._check_values(values)
        args = [template.format_map(values) for template in self.args]
        status, stdout, stderr = self._run(args, data)
        if status != 0:
            self.raise_error(
                status, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
            )

    def _start(self, args: list[str]) -> gsubprocess.Popen:
        try:
            return gsubprocess.Popen(
                args,
                stdin=gsubprocess.PIPE,
                stdout=gsubprocess.PIPE,
                stderr=gsubprocess.PIPE,
                bufsize=0,
                **self.popen_kwargs,
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno in _CANNOT_RUN:
                text = f"5.3.5 Cannot run delivery program {args[0]}: {reason}"
                raise PermanentRelayError(text, Reply("550", text)) from exc
            text = f"4.3.0 Cannot start delivery program {args[0]}: {reason}"
            raise TransientRelayError(text, Reply("451", text)) from exc

    def _run(self, args: list[str], data: bytes) -> tuple[int, bytes, bytes]:
        """Run *args* with *data* on stdin.

        :returns: ``(status, stdout, stderr)``, each output cut to 64 KiB.
        :raises RelayError: the program could not be started, timed out, or
            could not be given the whole message.
        """
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        proc = self._start(args)
        _log.popen(proc, args)
        stdout, stderr = bytearray(), bytearray()
        write_errors: list[OSError] = []
        greenlets = [
            gevent.spawn(_feed, proc.stdin, data, write_errors),
            gevent.spawn(_collect, proc.stdout, stdout, _OUTPUT_LIMIT),
            gevent.spawn(_collect, proc.stderr, stderr, _OUTPUT_LIMIT),
        ]
        try:
            try:
                status: int = proc.wait(timeout=_remaining(deadline))
            except subprocess.TimeoutExpired:
                self._kill(proc)
                text = "4.4.2 Delivery timed out"
                raise TransientRelayError("Delivery timed out", Reply("450", text)) from None
            except BaseException:
                # This greenlet is being killed (e.g. GreenletExit from a
                # pool kill): the program must not outlive the attempt.
                self._kill(proc)
                raise
            # Normally at EOF already; a background child may hold the pipes.
            gevent.joinall(greenlets[1:], timeout=self._drain_timeout)
        finally:
            gevent.killall(greenlets, block=True)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    stream.close()
            _log.stdio(proc, data, bytes(stdout), bytes(stderr))
            _log.exit(proc)
        if status == 0 and write_errors:
            text = f"4.3.0 Could not write the message to {self._program}: {write_errors[0]}"
            raise TransientRelayError(text, Reply("451", text))
        return status, bytes(stdout), bytes(stderr)

    def _kill(self, proc: gsubprocess.Popen) -> None:
        """Kill *proc* (and its process group when it leads one), then reap it."""
        if proc.returncode is not None:
            return  # already exited and reaped: its pid may belong to another
        with contextlib.suppress(OSError):
            if self.popen_kwargs.get("start_new_session"):
                # Not reaped yet, so the group id is still the program's.
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=self._reap_timeout)


class MaildropRelay(PipeRelay):
    """Delivers with Courier ``maildrop``: ``maildrop -f {sender} [extra_args]``.

    maildrop delivers for the user running it (or the one named by a ``-d``
    in *extra_args*), so it runs once per message (:attr:`per_recipient` is
    false) and ``{recipient}`` is the first recipient. The sender is the
    value of ``-f``; senders (and a ``{recipient}`` used in *extra_args*)
    that begin with ``-`` or hold CR, LF or NUL fail with ``550``.

    Exit status ``EX_TEMPFAIL`` (75) is a transient failure (``450``), any
    other non-zero status a permanent one (``550``). The message is the
    first line of output starting ``maildrop:`` (or the *path* maildrop was
    run as, then ``:``), else ``Delivery failed``.

    :param path: the ``maildrop`` program; default ``maildrop`` on ``PATH``.
    :param timeout: as for :class:`PipeRelay`.
    :param extra_args: more argument templates, e.g. a filter file, or
        ``['-d', '{recipient}']``.
    """

    per_recipient: bool = False
    _refuse_unsafe_addresses: ClassVar[bool] = True

    def __init__(
        self,
        path: str | None = None,
        timeout: float | None = None,
        extra_args: Sequence[str] | None = None,
    ) -> None:
        args = [path or "maildrop", "-f", "{sender}"]
        args.extend(extra_args or ())
        super().__init__(args, timeout)

    def raise_error(self, status: int, stdout: str, stderr: str) -> None:
        """Raise the error for a maildrop run that exited with *status*.

        :raises TransientRelayError: ``EX_TEMPFAIL``, or maildrop was killed.
        :raises PermanentRelayError: any other status.
        """
        # maildrop names itself as it was run: "/usr/bin/maildrop: ...".
        prefixes = (f"{self.args[0]}:", f"{self._program}:", "maildrop:")
        message = ""
        for line in (stdout + "\n" + stderr).splitlines():
            prefix = next((p for p in prefixes if line.startswith(p)), None)
            if prefix is not None:
                message = _clean("maildrop:" + line[len(prefix) :])
                break
        if not message:
            message = _signal_message(status) if status < 0 else "Delivery failed"
        raise _exit_status_error(status, message, permanent=True)


#: A log line Dovecot writes to stderr when ``log_path`` points there:
#: ``<date> lda(<user>)<pid><session>: <Level>: <text>``.
_DOVECOT_LOG_LINE = re.compile(
    r"^(?:.*? )?(?:lda|dovecot-lda|deliver)(?:\([^)]*\))?(?:<[^>]*>)*: "
    r"(?P<level>Debug|Info|Warning|Error|Fatal|Panic): (?P<text>.*)$"
)

#: The ``msgid=<...>: `` Dovecot puts before what it logs about a message.
_LOG_MSGID = re.compile(r"^msgid=\S*: ")


def _lda_message(stdout: str, stderr: str) -> str:
    """What went wrong, from dovecot-lda's output.

    With ``-e`` the rejection reason is a line of its own: the first such
    line wins. Log lines (Dovecot logging to stderr) come next: the last
    error, else the last other line (``save failed to INBOX: Quota
    exceeded`` is logged at Info).
    """
    last_error = last_other = ""
    for line in (stdout + "\n" + stderr).splitlines():
        cleaned = _clean(line)
        if not cleaned:
            continue
        match = _DOVECOT_LOG_LINE.match(cleaned)
        if match is None:
            return cleaned
        text = _clean(_LOG_MSGID.sub("", match.group("text"), count=1))
        if match.group("level") in ("Error", "Fatal", "Panic"):
            last_error = text
        elif match.group("level") != "Debug":
            last_other = text
    return last_error or last_other


def _find_dovecot_lda() -> str:
    """``dovecot-lda`` on ``PATH``, else where distributions install it."""
    found = shutil.which("dovecot-lda")
    if found is not None:
        return found
    for candidate in ("/usr/lib/dovecot/dovecot-lda", "/usr/libexec/dovecot/dovecot-lda"):
        if os.access(candidate, os.X_OK):
            return candidate
    return "dovecot-lda"


class DovecotLdaRelay(PipeRelay):
    """Delivers with Dovecot's LDA:
    ``dovecot-lda -f {sender} -d {recipient} [extra_args]``.

    It runs once per recipient (:attr:`per_recipient` is true). Sender and
    recipient are the values of ``-f`` and ``-d``; those that begin with
    ``-`` or hold CR, LF or NUL fail with ``550``. Add ``-e`` to
    *extra_args* to have rejections (a full mailbox with
    ``quota_full_tempfail = no``, a Sieve ``reject``) reported here, and
    bounced by the queue, instead of Dovecot mailing them itself.

    Exit status ``EX_TEMPFAIL`` (75) is a transient failure (``450``), any
    other non-zero status a permanent one (``550``; ``EX_NOUSER`` gives
    ``5.1.1``). The message is the reason dovecot-lda printed, else
    ``LDA delivery failed``.

    :param path: the LDA program; default ``dovecot-lda`` on ``PATH``, else
        ``/usr/lib/dovecot/dovecot-lda`` (Debian) or
        ``/usr/libexec/dovecot/dovecot-lda``.
    :param timeout: as for :class:`PipeRelay`.
    :param extra_args: more argument templates, e.g. ``['-c', conf]`` or
        ``['-e']``.
    """

    per_recipient: bool = True
    _refuse_unsafe_addresses: ClassVar[bool] = True

    def __init__(
        self,
        path: str | None = None,
        timeout: float | None = None,
        extra_args: Sequence[str] | None = None,
    ) -> None:
        args = [path or _find_dovecot_lda(), "-f", "{sender}", "-d", "{recipient}"]
        args.extend(extra_args or ())
        super().__init__(args, timeout)

    def raise_error(self, status: int, stdout: str, stderr: str) -> None:
        """Raise the error for a dovecot-lda run that exited with *status*.

        :raises TransientRelayError: ``EX_TEMPFAIL``, or the LDA was killed.
        :raises PermanentRelayError: any other status.
        """
        message = _lda_message(stdout, stderr)
        if not message:
            message = _signal_message(status) if status < 0 else "LDA delivery failed"
        raise _exit_status_error(status, message, permanent=True)
