"""MaildirRelay: files read back with the stdlib's :mod:`mailbox`, errors per
recipient, and a real Queue retrying only the recipient that failed.

Errors are provoked without permissions (the tests may run as root): a file
where a directory should be, or ``os`` calls patched to fail.
"""

from __future__ import annotations

import errno
import logging
import mailbox
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent.queue
import pytest

from slimta.envelope import Envelope
from slimta.queue import Queue
from slimta.queue.dict import DictStorage
from slimta.relay import PermanentRelayError, RelayError, TransientRelayError
from slimta.relay.maildir import MaildirRelay
from slimta.smtp.reply import Reply
from slimta.util._durable import write_all

TIMEOUT = 5.0

#: Headers with CRLF line endings and an 8-bit body with a lone CR, a lone LF
#: and a line starting with a dot: all must arrive byte for byte.
MESSAGE = (
    b"From: Sender <sender@x.test>\r\n"
    b"Subject: caf\xc3\xa9\r\n"
    b"\r\n"
    b"8-bit: \xe9\xff\x00 lone CR\r lone LF\n.dot line\r\n"
)

UNIQUE_NAME = re.compile(r"(\d+)\.M(\d+)P(\d+)Q(\d+)\.(.+)")


def make_envelope(
    rcpts: list[str], sender: str | None = "sender@x.test", data: bytes = MESSAGE
) -> Envelope:
    envelope = Envelope(sender, list(rcpts))
    envelope.parse(data)
    return envelope


def prefix(rcpt: str, sender: str = "sender@x.test") -> bytes:
    return b"Return-Path: <%s>\r\nDelivered-To: %s\r\n" % (sender.encode(), rcpt.encode())


def read_box(path: Path) -> list[bytes]:
    """Every message in Maildir *path*, as the raw bytes of its file."""
    box = mailbox.Maildir(str(path), factory=None, create=False)
    return sorted(box.get_bytes(key) for key in box.iterkeys())


def files_in(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "mail"
    path.mkdir()
    return path


@pytest.fixture
def relay(base: Path) -> MaildirRelay:
    return MaildirRelay(base, hostname="host.test")


# --- delivery ----------------------------------------------------------------------


def test_one_recipient_headers_and_exact_body(relay: MaildirRelay, base: Path) -> None:
    results = relay.attempt(make_envelope(["alice@x.test"]), 0)
    assert list(results) == ["alice@x.test"]
    reply = results["alice@x.test"]
    assert isinstance(reply, Reply)
    assert reply.code == "250"
    assert reply.enhanced_status_code == "2.0.0"
    [data] = read_box(base / "alice")
    assert data == prefix("alice@x.test") + MESSAGE
    box = mailbox.Maildir(str(base / "alice"), create=False)
    [message] = box.values()
    assert message["Return-Path"] == "<sender@x.test>"
    assert message["Delivered-To"] == "alice@x.test"
    assert message.get_subdir() == "new"
    assert files_in(base / "alice" / "tmp") == []
    assert files_in(base / "alice" / "cur") == []
    [name] = files_in(base / "alice" / "new")
    assert name in str(reply)


def test_maildir_created_with_private_modes(relay: MaildirRelay, base: Path) -> None:
    relay.attempt(make_envelope(["alice@x.test"]), 0)
    for path in (base / "alice", *(base / "alice" / sub for sub in ("tmp", "new", "cur"))):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    [name] = files_in(base / "alice" / "new")
    assert stat.S_IMODE((base / "alice" / "new" / name).stat().st_mode) == 0o600


def test_file_mode_is_set_exactly_despite_umask(base: Path) -> None:
    relay = MaildirRelay(base, file_mode=0o640)
    old = os.umask(0o077)
    try:
        relay.attempt(make_envelope(["alice@x.test"]), 0)
    finally:
        os.umask(old)
    [name] = files_in(base / "alice" / "new")
    assert stat.S_IMODE((base / "alice" / "new" / name).stat().st_mode) == 0o640


def test_existing_maildir_is_used(relay: MaildirRelay, base: Path) -> None:
    box = mailbox.Maildir(str(base / "alice"), create=True)
    box.add(b"Subject: old\r\n\r\nold\r\n")
    relay.attempt(make_envelope(["alice@x.test"]), 0)
    assert len(read_box(base / "alice")) == 2


def test_several_recipients_each_in_their_own_maildir(relay: MaildirRelay, base: Path) -> None:
    rcpts = ["alice@x.test", "bob@y.test", "carol@x.test"]
    results = relay.attempt(make_envelope(rcpts), 0)
    assert sorted(results) == sorted(rcpts)
    assert all(isinstance(r, Reply) and r.code == "250" for r in results.values())
    assert sorted(os.listdir(base)) == ["alice", "bob", "carol"]
    for rcpt in rcpts:
        assert read_box(base / rcpt.split("@")[0]) == [prefix(rcpt) + MESSAGE]


def test_duplicate_recipient_gets_one_copy(relay: MaildirRelay, base: Path) -> None:
    results = relay.attempt(make_envelope(["alice@x.test", "bob@x.test", "alice@x.test"]), 0)
    assert sorted(results) == ["alice@x.test", "bob@x.test"]
    assert len(read_box(base / "alice")) == 1


def test_local_part_lowercased_and_unquoted(relay: MaildirRelay, base: Path) -> None:
    rcpts = ["Alice@X.test", "alice@y.test", '"Bob \\"B\\" Smith"@x.test', "postmaster"]
    results = relay.attempt(make_envelope(rcpts), 0)
    assert all(isinstance(r, Reply) for r in results.values())
    assert sorted(os.listdir(base)) == sorted(["alice", 'bob "b" smith', "postmaster"])
    # Two addresses, one mailbox: two copies, each naming its own recipient.
    assert read_box(base / "alice") == sorted(
        [prefix("Alice@X.test") + MESSAGE, prefix("alice@y.test") + MESSAGE]
    )


def test_null_sender_and_utf8_addresses(relay: MaildirRelay, base: Path) -> None:
    relay.attempt(make_envelope(["j\u00f6rg@x.test"], sender=""), 0)
    [data] = read_box(base / "j\u00f6rg")
    assert data.startswith(b"Return-Path: <>\r\nDelivered-To: j\xc3\xb6rg@x.test\r\nFrom: ")
    relay.attempt(make_envelope(["none@x.test"], sender=None), 0)
    [data] = read_box(base / "none")
    assert data.startswith(b"Return-Path: <>\r\n")


def test_message_without_header_block(relay: MaildirRelay, base: Path) -> None:
    envelope = Envelope("sender@x.test", ["alice@x.test"], message=b"just a body\r\n")
    relay.attempt(envelope, 0)
    assert read_box(base / "alice") == [prefix("alice@x.test") + b"\r\njust a body\r\n"]


def test_envelope_unchanged(relay: MaildirRelay) -> None:
    envelope = make_envelope(["alice@x.test", "bob@x.test", "alice@x.test", "..@x.test"])
    before = envelope.flatten()
    relay.attempt(envelope, 0)
    assert envelope.flatten() == before
    assert envelope.sender == "sender@x.test"
    assert envelope.recipients == ["alice@x.test", "bob@x.test", "alice@x.test", "..@x.test"]
    assert envelope.headers is not None
    assert "Return-Path" not in envelope.headers
    assert "Delivered-To" not in envelope.headers
    # And a second attempt (a queue retry) writes the same bytes again.
    relay.attempt(envelope, 1)


def test_unique_names_within_one_second(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_123_456_789)
    relay = MaildirRelay(base, hostname="mx/1:25")
    for _ in range(50):
        relay.attempt(make_envelope(["a@x.test", "b@x.test"]), 0)
    names = files_in(base / "a" / "new") + files_in(base / "b" / "new")
    assert len(names) == len(set(names)) == 100
    counters = set()
    for name in names:
        match = UNIQUE_NAME.fullmatch(name)
        assert match is not None, name
        assert match.group(1, 2, 3) == ("1700000000", "123456", str(os.getpid()))
        assert match.group(5) == "mx\\0571\\07225"
        counters.add(int(match.group(4)))
    assert len(counters) == 100


def test_default_hostname_is_the_host_name(base: Path) -> None:
    relay = MaildirRelay(base)
    relay.attempt(make_envelope(["a@x.test"]), 0)
    [name] = files_in(base / "a" / "new")
    match = UNIQUE_NAME.fullmatch(name)
    assert match is not None
    assert "/" not in match.group(5)
    assert ":" not in match.group(5)


# --- refused addresses ---------------------------------------------------------------


@pytest.mark.parametrize(
    "rcpt",
    [
        "@x.test",
        "",
        '""@x.test',
        ".@x.test",
        "..@x.test",
        ".hidden@x.test",
        '"a/b"@x.test',
        '"../../etc"@x.test',
        "a\x00b@x.test",
        "a\rb@x.test",
        "a\nb@x.test",
        "a\r\nDelivered-To: evil@x.test",
        "a\tb@x.test",
        "x" * 256 + "@x.test",
    ],
)
def test_unsafe_local_parts_refused(relay: MaildirRelay, base: Path, rcpt: str) -> None:
    results = relay.attempt(make_envelope([rcpt, "ok@x.test"]), 0)
    error = results[rcpt]
    assert isinstance(error, PermanentRelayError)
    assert error.reply.code == "550"
    assert error.reply.enhanced_status_code == "5.1.3"
    assert "Bad recipient address" in str(error.reply)
    assert os.listdir(base) == ["ok"]


def test_long_but_safe_local_part_accepted(relay: MaildirRelay, base: Path) -> None:
    local = "x" * 255
    results = relay.attempt(make_envelope([local + "@x.test"]), 0)
    assert isinstance(results[local + "@x.test"], Reply)
    assert os.listdir(base) == [local]


def test_sender_with_line_break_refused(relay: MaildirRelay, base: Path) -> None:
    with pytest.raises(PermanentRelayError) as info:
        relay.attempt(make_envelope(["a@x.test"], sender="s@x\r\nX-Evil: 1"), 0)
    assert info.value.reply.code == "550"
    assert info.value.reply.enhanced_status_code == "5.1.7"
    assert os.listdir(base) == []


# --- mailbox_for -------------------------------------------------------------------------


def test_mailbox_for_absolute_and_relative_paths(base: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "deep" / "box"

    def mailbox_for(rcpt: str) -> str | None:
        local, _, domain = rcpt.partition("@")
        if local == "abs":
            return str(elsewhere)
        if local == "nobody":
            return None
        return os.path.join(domain, local)  # relative: under base_dir

    relay = MaildirRelay(base, mailbox_for=mailbox_for)
    results = relay.attempt(make_envelope(["abs@x.test", "Rel@y.test", "nobody@x.test"]), 0)
    assert read_box(elsewhere) == [prefix("abs@x.test") + MESSAGE]
    # Trusted as given: no lower-casing.
    assert read_box(base / "y.test" / "Rel") == [prefix("Rel@y.test") + MESSAGE]
    error = results["nobody@x.test"]
    assert isinstance(error, PermanentRelayError)
    assert (error.reply.code, error.reply.enhanced_status_code) == ("550", "5.1.1")


def test_mailbox_for_errors(base: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def mailbox_for(rcpt: str) -> str:
        calls.append(rcpt)
        if rcpt.startswith("gone"):
            raise PermanentRelayError("gone", Reply("550", "5.1.6 Moved away"))
        if rcpt.startswith("buggy"):
            raise ValueError("a bug")
        return "box"

    relay = MaildirRelay(base, mailbox_for=mailbox_for)
    rcpts = ["gone@x.test", "buggy@x.test", "ok@x.test", "bad\n@x.test"]
    with caplog.at_level(logging.ERROR, logger="slimta.relay.maildir"):
        results = relay.attempt(make_envelope(rcpts), 0)
    gone = results["gone@x.test"]
    assert isinstance(gone, PermanentRelayError)
    assert str(gone.reply) == "550 5.1.6 Moved away"
    buggy = results["buggy@x.test"]
    assert isinstance(buggy, TransientRelayError)
    assert (buggy.reply.code, buggy.reply.enhanced_status_code) == ("450", "4.3.0")
    assert any("ValueError" in r.getMessage() for r in caplog.records)
    assert isinstance(results["ok@x.test"], Reply)
    bad = results["bad\n@x.test"]
    assert isinstance(bad, PermanentRelayError)
    assert bad.reply.enhanced_status_code == "5.1.3"
    assert calls == ["gone@x.test", "buggy@x.test", "ok@x.test"]
    assert len(read_box(base / "box")) == 1


def test_mailbox_path(relay: MaildirRelay, base: Path) -> None:
    assert relay.mailbox_path("Bob@x.test") == os.path.join(str(base), "bob")
    with pytest.raises(PermanentRelayError):
        relay.mailbox_path("../x@x.test")


# --- storage errors ---------------------------------------------------------------------------


def assert_clean(mailbox_dir: Path) -> None:
    """No file left in tmp/, none in new/."""
    assert files_in(mailbox_dir / "tmp") == []
    if (mailbox_dir / "new").is_dir():
        assert files_in(mailbox_dir / "new") == []


def test_file_where_new_should_be(
    relay: MaildirRelay, base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = base / "bob"
    (broken / "tmp").mkdir(parents=True)
    (broken / "new").write_bytes(b"not a directory")
    with caplog.at_level(logging.INFO, logger="slimta.relay.maildir"):
        results = relay.attempt(make_envelope(["alice@x.test", "bob@x.test"]), 0)
    assert isinstance(results["alice@x.test"], Reply)
    error = results["bob@x.test"]
    assert isinstance(error, TransientRelayError)
    assert (error.reply.code, error.reply.enhanced_status_code) == ("450", "4.3.0")
    assert "Not a directory" in str(error.reply)
    assert str(base) not in str(error.reply)
    assert files_in(broken / "tmp") == []
    assert (broken / "new").read_bytes() == b"not a directory"
    levels = {r.getMessage().split(" ")[0]: r.levelno for r in caplog.records}
    [delivered] = [k for k in levels if k.endswith(":delivered")]
    [failed] = [k for k in levels if k.endswith(":failed")]
    assert levels[delivered] == logging.INFO
    assert levels[failed] == logging.WARNING


def test_file_where_mailbox_should_be(relay: MaildirRelay, base: Path) -> None:
    (base / "bob").write_bytes(b"")
    results = relay.attempt(make_envelope(["bob@x.test"]), 0)
    assert isinstance(results["bob@x.test"], TransientRelayError)


def test_missing_base_dir_is_transient_and_not_created(tmp_path: Path) -> None:
    relay = MaildirRelay(tmp_path / "unmounted")
    results = relay.attempt(make_envelope(["alice@x.test"]), 0)
    error = results["alice@x.test"]
    assert isinstance(error, TransientRelayError)
    assert error.reply.code == "450"
    assert not (tmp_path / "unmounted").exists()


def _fail_on_regular_files(err: int) -> Callable[[int], None]:
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(err, os.strerror(err))
        real(fd)

    return fsync


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_at_fsync(
    relay: MaildirRelay, base: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    relay.attempt(make_envelope(["alice@x.test"]), 0)  # the maildir exists
    monkeypatch.setattr(os, "fsync", _fail_on_regular_files(err))
    results = relay.attempt(make_envelope(["alice@x.test"]), 0)
    error = results["alice@x.test"]
    assert isinstance(error, TransientRelayError)
    assert (error.reply.code, error.reply.enhanced_status_code) == ("452", "4.3.1")
    assert os.strerror(err) in str(error.reply)
    assert files_in(base / "alice" / "tmp") == []
    assert len(files_in(base / "alice" / "new")) == 1


def test_io_error_while_writing(
    relay: MaildirRelay, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def writev(fd: int, buffers: Any) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "writev", writev)
    results = relay.attempt(make_envelope(["alice@x.test", "bob@x.test"]), 0)
    for rcpt in ("alice@x.test", "bob@x.test"):
        error = results[rcpt]
        assert isinstance(error, TransientRelayError)
        assert str(error.reply) == "450 4.3.0 Mailbox unavailable: Input/output error"
        assert_clean(base / rcpt.split("@")[0])


def test_short_writes_are_continued(
    relay: MaildirRelay, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.writev

    def one_byte_at_a_time(fd: int, buffers: Any) -> int:
        first = bytes(buffers[0])
        return real(fd, [first[:1]])

    monkeypatch.setattr(os, "writev", one_byte_at_a_time)
    relay.attempt(make_envelope(["alice@x.test"]), 0)
    monkeypatch.undo()
    assert read_box(base / "alice") == [prefix("alice@x.test") + MESSAGE]


def test_write_all_skips_empty_chunks(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        write_all(fd, [b"", b"ab", b"", b"c"])
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abc"


@pytest.mark.parametrize("err", [errno.EXDEV, errno.EPERM, errno.ENOTSUP])
def test_rename_when_hard_links_are_unsupported(
    relay: MaildirRelay, base: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    def link(src: str, dst: str, **kwargs: Any) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "link", link)
    results = relay.attempt(make_envelope(["alice@x.test"]), 0)
    assert isinstance(results["alice@x.test"], Reply)
    monkeypatch.undo()
    assert read_box(base / "alice") == [prefix("alice@x.test") + MESSAGE]
    assert files_in(base / "alice" / "tmp") == []


def test_other_link_error_fails_and_cleans_up(
    relay: MaildirRelay, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def link(src: str, dst: str, **kwargs: Any) -> None:
        raise OSError(errno.EMLINK, os.strerror(errno.EMLINK))

    monkeypatch.setattr(os, "link", link)
    results = relay.attempt(make_envelope(["alice@x.test"]), 0)
    assert isinstance(results["alice@x.test"], TransientRelayError)
    assert_clean(base / "alice")


def test_new_dir_fsync_failure_withdraws_the_file(
    relay: MaildirRelay, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay.attempt(make_envelope(["alice@x.test"]), 0)
    [first] = files_in(base / "alice" / "new")
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    results = relay.attempt(make_envelope(["alice@x.test"]), 0)
    error = results["alice@x.test"]
    assert isinstance(error, TransientRelayError)
    assert error.reply.enhanced_status_code == "4.3.0"
    assert files_in(base / "alice" / "new") == [first]
    assert files_in(base / "alice" / "tmp") == []


def test_new_dir_fsync_failure_after_a_reader_took_the_file(
    relay: MaildirRelay, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay.attempt(make_envelope(["alice@x.test"]), 0)
    new_dir = base / "alice" / "new"
    for name in files_in(new_dir):
        (new_dir / name).unlink()
    real = os.fsync

    def fsync_and_read(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            # A mail reader moves the message to cur/ just now.
            for name in files_in(new_dir):
                os.rename(new_dir / name, base / "alice" / "cur" / (name + ":2,"))
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync_and_read)
    results = relay.attempt(make_envelope(["alice@x.test"]), 0)
    assert isinstance(results["alice@x.test"], Reply)
    assert len(files_in(base / "alice" / "cur")) == 1


def test_tmp_dir_recreated_when_missing(relay: MaildirRelay, base: Path) -> None:
    relay.attempt(make_envelope(["alice@x.test"]), 0)
    (base / "alice" / "tmp").rmdir()
    (base / "alice" / "cur").rmdir()
    relay.attempt(make_envelope(["alice@x.test"]), 0)
    assert len(read_box(base / "alice")) == 2


def test_new_dir_recreated_when_missing(relay: MaildirRelay, base: Path) -> None:
    (base / "alice" / "tmp").mkdir(parents=True)
    relay.attempt(make_envelope(["alice@x.test"]), 0)
    assert len(read_box(base / "alice")) == 1
    assert files_in(base / "alice" / "tmp") == []


# --- through a real queue -----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class RecordingMaildirRelay(MaildirRelay):
    """Puts the recipients of every attempt on :attr:`calls`."""

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self.calls: gevent.queue.Queue[list[str]] = gevent.queue.Queue()

    def attempt(self, envelope: Envelope, attempts: int) -> Any:
        try:
            return super().attempt(envelope, attempts)
        finally:
            self.calls.put(list(envelope.recipients))


@pytest.fixture
def queue_parts(base: Path) -> Iterator[tuple[Queue, RecordingMaildirRelay, FakeClock]]:
    clock = FakeClock()
    relay = RecordingMaildirRelay(base)
    bounces: list[tuple[Envelope, Reply]] = []

    def bounce_factory(envelope: Envelope, reply: Reply) -> None:
        bounces.append((envelope, reply))

    queue = Queue(
        DictStorage(), relay, backoff=lambda e, a: 60.0, bounce_factory=bounce_factory, clock=clock
    )
    queue.start()
    yield queue, relay, clock
    assert bounces == []
    queue.kill(block=True, timeout=TIMEOUT)
    queue.relay_pool.kill(block=True, timeout=TIMEOUT)


def test_queue_retries_only_the_failed_recipient(
    queue_parts: tuple[Queue, RecordingMaildirRelay, FakeClock], base: Path
) -> None:
    queue, relay, clock = queue_parts
    (base / "bob").mkdir()
    (base / "bob" / "new").write_bytes(b"")  # bob's delivery fails for now
    [(_, id)] = queue.enqueue(make_envelope(["alice@x.test", "bob@x.test"]))
    assert isinstance(id, str)
    assert relay.calls.get(timeout=TIMEOUT) == ["alice@x.test", "bob@x.test"]
    assert queue.relay_pool.join(timeout=TIMEOUT)
    envelope, attempts = queue.store.get(id)
    assert envelope.recipients == ["bob@x.test"]
    assert attempts == 1
    assert len(read_box(base / "alice")) == 1

    (base / "bob" / "new").unlink()  # the operator repairs the mailbox
    clock.now += 60.0
    queue.kick()
    assert relay.calls.get(timeout=TIMEOUT) == ["bob@x.test"]
    assert queue.relay_pool.join(timeout=TIMEOUT)
    assert queue.store.get_info()["size"] == 0
    assert read_box(base / "bob") == [prefix("bob@x.test") + MESSAGE]
    assert read_box(base / "alice") == [prefix("alice@x.test") + MESSAGE]


def test_results_are_relay_errors_or_replies(relay: MaildirRelay) -> None:
    results = relay.attempt(make_envelope(["a@x.test", ".b@x.test"]), 0)
    assert isinstance(results["a@x.test"], Reply)
    assert isinstance(results[".b@x.test"], RelayError)
