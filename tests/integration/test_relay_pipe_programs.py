"""MaildropRelay and DovecotLdaRelay against the real programs.

Debian packages: ``maildrop`` and ``dovecot-core``. Each family of tests is
skipped, saying why, when its program is missing.

maildrop runs in manual mode with a filter file of ours (given through
*extra_args*) that delivers to maildirs under ``tmp_path``; in that mode it
reads neither ``/etc/maildroprc`` nor a home directory, and it runs as the
user running the tests.

dovecot-lda looks each ``-d`` user up through the ``auth-userdb`` socket of
a running Dovecot, so the ``dovecot`` fixture starts a private ``dovecot -F``
(no protocols, no listening ports) with a throwaway configuration: a
``passwd-file`` userdb with a few users, maildirs under a temporary
directory, the quota plugin (``quota_full_tempfail = yes``; one user has a
1-byte quota) and logging to stderr. Dovecot refuses to deliver as uid 0, so
as root the mail belongs to ``nobody``, and the directory is made outside
pytest's private ``tmp_path``; as another user the mail and Dovecot's
internal processes run as that user.
"""

from __future__ import annotations

import contextlib
import grp
import mailbox
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.queue
import gevent.subprocess
import pytest

from slimta.envelope import Envelope
from slimta.queue import Queue
from slimta.queue.dict import DictStorage
from slimta.relay import PermanentRelayError, RelayError, TransientRelayError
from slimta.relay.pipe import DovecotLdaRelay, MaildropRelay
from slimta.smtp.reply import Reply

pytestmark = pytest.mark.timeout(60)

#: Seconds one delivery, or Dovecot's startup, may take.
TIMEOUT = 20.0

# Named replies: (code, enhanced status code).
MAILBOX_TEMPFAIL = ("450", "4.3.0")  # EX_TEMPFAIL without a code of its own
NO_SUCH_USER = ("550", "5.1.1")  # EX_NOUSER
REJECTED = ("550", "5.7.0")  # EX_NOPERM: dovecot-lda -e, maildrop EXITCODE=77
BAD_RECIPIENT = ("550", "5.1.3")
BAD_SENDER = ("550", "5.1.7")

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: caf\xc3\xa9\r\n"
    b"Message-Id: <20261206.42@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=latin-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"8-bit body: \xe9\xe8\xff; a shell would choke on $(this) and `that`\r\n"
    b".\r\n"
    b"last line\r\n"
)


def reply_is(error: RelayError, named: tuple[str, str]) -> bool:
    code, esc = named
    return error.reply.code == code and error.reply.enhanced_status_code == esc


def envelope(sender: str = "alice@example.test", *rcpts: str) -> Envelope:
    env = Envelope(sender, list(rcpts) or ["bob@example.test"])
    env.parse(MESSAGE)
    return env


def maildir_messages(path: Path) -> list[bytes]:
    """The messages in maildir *path*, read with the stdlib; [] if none."""
    if not path.is_dir():
        return []
    box = mailbox.Maildir(str(path), factory=None, create=False)
    return sorted(box.get_bytes(key) for key in box.iterkeys())


# --- maildrop ----------------------------------------------------------------------


@pytest.fixture
def maildrop() -> str:
    found = shutil.which("maildrop")
    if found is None:
        pytest.skip("maildrop is not installed (Debian package: maildrop)")
    return found


def make_maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def filter_file(directory: Path, text: str) -> str:
    """A maildrop filter; it must be ours and private, or maildrop refuses it."""
    path = directory / "mailfilter"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_maildrop_delivers_verbatim_once_per_message(maildrop: str, tmp_path: Path) -> None:
    box = make_maildir(tmp_path / "Maildir")
    rules = filter_file(tmp_path, f'to "{box}/"\n')
    relay = MaildropRelay(path=maildrop, timeout=TIMEOUT, extra_args=[rules])
    env = envelope("we{ird} $(sender)'@example.test", "bob@example.test", "carol@example.test")
    assert relay.attempt(env, 0) is None
    # One run for the whole message: maildrop delivers for the invoking user.
    assert maildir_messages(box) == [MESSAGE]


def test_maildrop_null_sender(maildrop: str, tmp_path: Path) -> None:
    box = make_maildir(tmp_path / "Maildir")
    rules = filter_file(tmp_path, f'to "{box}/"\n')
    relay = MaildropRelay(path=maildrop, timeout=TIMEOUT, extra_args=[rules])
    assert relay.attempt(envelope(""), 0) is None
    assert maildir_messages(box) == [MESSAGE]


def test_maildrop_missing_mailbox_is_transient(maildrop: str, tmp_path: Path) -> None:
    rules = filter_file(tmp_path, f'to "{tmp_path}/missing/Maildir/"\n')
    relay = MaildropRelay(path=maildrop, timeout=TIMEOUT, extra_args=[rules])
    with pytest.raises(TransientRelayError) as info:
        relay.attempt(envelope(), 0)
    assert reply_is(info.value, MAILBOX_TEMPFAIL)
    assert (info.value.reply.raw_message or "").startswith("maildrop: Unable to create a dot-lock")


def test_maildrop_missing_filter_is_transient(maildrop: str, tmp_path: Path) -> None:
    relay = MaildropRelay(path=maildrop, timeout=TIMEOUT, extra_args=[str(tmp_path / "nofilter")])
    with pytest.raises(TransientRelayError) as info:
        relay.attempt(envelope(), 0)
    assert reply_is(info.value, MAILBOX_TEMPFAIL)
    assert info.value.reply.raw_message == "maildrop: Unable to open filter file, errno=2."


def test_maildrop_filter_rejection_is_permanent(maildrop: str, tmp_path: Path) -> None:
    box = make_maildir(tmp_path / "Maildir")
    rules = filter_file(
        tmp_path,
        'if ($FROM eq "spammer@example.test")\n'
        "{\n"
        '  echo "maildrop: sender refused by filter"\n'
        "  EXITCODE=77\n"
        "  exit\n"
        "}\n"
        f'to "{box}/"\n',
    )
    relay = MaildropRelay(path=maildrop, timeout=TIMEOUT, extra_args=[rules])
    with pytest.raises(PermanentRelayError) as info:
        relay.attempt(envelope("spammer@example.test"), 0)
    assert reply_is(info.value, REJECTED)
    assert info.value.reply.raw_message == "maildrop: sender refused by filter"
    assert maildir_messages(box) == []
    # The filter saw the sender given with -f: another one gets through.
    assert relay.attempt(envelope("friend@example.test"), 0) is None
    assert maildir_messages(box) == [MESSAGE]


def test_maildrop_refuses_sender_that_looks_like_an_option(maildrop: str, tmp_path: Path) -> None:
    box = make_maildir(tmp_path / "Maildir")
    rules = filter_file(tmp_path, f'to "{box}/"\n')
    relay = MaildropRelay(path=maildrop, timeout=TIMEOUT, extra_args=[rules])
    for sender in ("-d root", "--version", "a@example.test\nX-Evil: 1"):
        with pytest.raises(PermanentRelayError) as info:
            relay.attempt(envelope(sender), 0)
        assert reply_is(info.value, BAD_SENDER)
    assert maildir_messages(box) == []


class PerRecipientMaildrop(MaildropRelay):
    """maildrop run once per recipient; the filter picks the maildir from $1."""

    per_recipient = True


def test_maildrop_per_recipient(maildrop: str, tmp_path: Path) -> None:
    boxes = tmp_path / "boxes"
    bob = make_maildir(boxes / "bob@example.test")
    carol = make_maildir(boxes / "carol@example.test")
    rules = filter_file(tmp_path, f'to "{boxes}/$1/"\n')
    relay = PerRecipientMaildrop(path=maildrop, timeout=TIMEOUT, extra_args=[rules, "{recipient}"])
    rcpts = ("bob@example.test", "ghost@example.test", "carol@example.test", "-x@example.test")
    result = relay.attempt(envelope("alice@example.test", *rcpts), 0)
    assert isinstance(result, Mapping)
    assert result["bob@example.test"] is None
    assert result["carol@example.test"] is None
    ghost = result["ghost@example.test"]
    assert isinstance(ghost, TransientRelayError)
    assert reply_is(ghost, MAILBOX_TEMPFAIL)
    dash = result["-x@example.test"]
    assert isinstance(dash, PermanentRelayError)
    assert reply_is(dash, BAD_RECIPIENT)
    assert maildir_messages(bob) == maildir_messages(carol) == [MESSAGE]
    assert sorted(p.name for p in boxes.iterdir()) == ["bob@example.test", "carol@example.test"]


# --- dovecot-lda ---------------------------------------------------------------------


@dataclass
class Dovecot:
    lda: str
    top: Path
    config: Path
    users: Path
    #: The owner of the mail.
    uid: int
    gid: int
    #: Lines Dovecot's master process logged.
    log: list[str]

    def maildir(self, user: str) -> Path:
        return self.top / "mail" / user / "Maildir"

    def messages(self, user: str) -> list[bytes]:
        return maildir_messages(self.maildir(user))

    def relay(self, *extra: str, timeout: float = TIMEOUT) -> DovecotLdaRelay:
        return DovecotLdaRelay(
            path=self.lda, timeout=timeout, extra_args=["-c", str(self.config), *extra]
        )

    def lock_home(self, user: str) -> None:
        """Make *user*'s home unusable: deliveries to it fail for now."""
        home = self.top / "mail" / user
        home.mkdir(exist_ok=True)
        os.chown(home, self.uid, self.gid)
        home.chmod(0)

    def unlock_home(self, user: str) -> None:
        (self.top / "mail" / user).chmod(0o700)


def find_program(name: str, *places: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    for place in places:
        if os.access(place, os.X_OK):
            return place
    return None


#: The users of the passwd-file userdb, with their quota rules.
USERS = {
    "bob@example.test": "",
    "carol@example.test": "",
    "full@example.test": "userdb_quota_rule=*:storage=1B",
    "dave@example.test": "",
}


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    lda = find_program(
        "dovecot-lda", "/usr/lib/dovecot/dovecot-lda", "/usr/libexec/dovecot/dovecot-lda"
    )
    master = find_program("dovecot", "/usr/sbin/dovecot")
    if lda is None or master is None:
        pytest.skip("dovecot-lda or dovecot is not installed (Debian package: dovecot-core)")

    top = Path(tempfile.mkdtemp(prefix="slimta-dovecot-"))
    top.chmod(0o755)  # the mail user must reach its maildirs
    (top / "mail").mkdir()
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
        os.chown(top / "mail", uid, gid)
        internal = ""  # the package's dovecot and dovenull users
    else:
        uid, gid = os.getuid(), os.getgid()
        user, group = pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name
        internal = (
            f"default_internal_user = {user}\n"
            f"default_internal_group = {group}\n"
            f"default_login_user = {user}\n"
        )
    users = top / "users"
    users.write_text(
        "".join(
            f"{name}::{uid}:{gid}::{top}/mail/{name}::{extra}\n" for name, extra in USERS.items()
        )
    )
    users.chmod(0o644)
    config = top / "dovecot.conf"
    config.write_text(
        f"base_dir = {top}/run\n"
        f"state_dir = {top}/state\n"
        "log_path = /dev/stderr\n"
        "ssl = no\n"
        "protocols =\n"
        "auth_cache_size = 0\n"
        "mail_location = maildir:~/Maildir\n"
        "postmaster_address = postmaster@example.test\n"
        "mail_plugins = quota\n"
        "quota_full_tempfail = yes\n"
        "plugin {\n  quota = maildir:User quota\n}\n"
        "service anvil {\n  chroot =\n}\n"
        f"passdb {{\n  driver = passwd-file\n  args = {users}\n}}\n"
        f"userdb {{\n  driver = passwd-file\n  args = {users}\n}}\n" + internal
    )
    config.chmod(0o644)

    # A session of its own, so teardown stops Dovecot's children too.
    proc = gevent.subprocess.Popen(
        [master, "-F", "-c", str(config)],
        stdin=gevent.subprocess.DEVNULL,
        stdout=gevent.subprocess.DEVNULL,
        stderr=gevent.subprocess.PIPE,
        start_new_session=True,
    )
    log: list[str] = []
    try:
        # The master logs "starting up" once its sockets are bound.
        with gevent.Timeout(TIMEOUT, AssertionError(f"dovecot did not start: {log}")):
            while not any("starting up" in line for line in log):
                line = proc.stderr.readline()
                if not line:
                    pytest.fail(f"dovecot exited with {proc.wait()}: {log}")
                log.append(line.decode("utf-8", "replace").rstrip())
        assert (top / "run" / "auth-userdb").exists(), log

        def drain() -> None:
            for line in proc.stderr:
                log.append(line.decode("utf-8", "replace").rstrip())

        drainer = gevent.spawn(drain)
        yield Dovecot(lda, top, config, users, uid, gid, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=TIMEOUT)
        except gevent.subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
        with contextlib.suppress(NameError):
            drainer.kill()
        shutil.rmtree(top, ignore_errors=True)


#: dovecot-lda stores messages with LF line endings; the bytes are kept.
STORED = MESSAGE.replace(b"\r\n", b"\n")


def test_lda_delivers_to_each_recipient(dovecot: Dovecot) -> None:
    relay = dovecot.relay()
    env = envelope("we{ird} $(sender)'@example.test", "bob@example.test", "carol@example.test")
    assert relay.attempt(env, 0) == {"bob@example.test": None, "carol@example.test": None}
    assert dovecot.messages("bob@example.test")[-1:] == [STORED]
    assert dovecot.messages("carol@example.test")[-1:] == [STORED]


def test_lda_null_sender(dovecot: Dovecot) -> None:
    before = len(dovecot.messages("bob@example.test"))
    assert dovecot.relay().attempt(envelope(""), 0) == {"bob@example.test": None}
    assert len(dovecot.messages("bob@example.test")) == before + 1


def test_lda_per_recipient_outcomes(dovecot: Dovecot) -> None:
    carol = len(dovecot.messages("carol@example.test"))
    rcpts = (
        "carol@example.test",
        "ghost@example.test",  # no such user: EX_NOUSER
        "full@example.test",  # over quota, quota_full_tempfail: EX_TEMPFAIL
        "-oops@example.test",  # refused before dovecot-lda runs
        "a{b}$(id)`id`@example.test",  # an odd name dovecot does not know
    )
    result = dovecot.relay().attempt(envelope("alice@example.test", *rcpts), 0)
    assert isinstance(result, Mapping)
    assert result["carol@example.test"] is None
    ghost, full, dash, odd = (result[rcpt] for rcpt in rcpts[1:])
    assert isinstance(ghost, PermanentRelayError) and reply_is(ghost, NO_SUCH_USER)
    assert isinstance(full, TransientRelayError) and reply_is(full, MAILBOX_TEMPFAIL)
    assert (
        full.reply.raw_message == "save failed to INBOX: Quota exceeded (mailbox for user is full)"
    )
    assert isinstance(dash, PermanentRelayError) and reply_is(dash, BAD_RECIPIENT)
    assert isinstance(odd, PermanentRelayError) and reply_is(odd, NO_SUCH_USER)
    assert len(dovecot.messages("carol@example.test")) == carol + 1
    assert dovecot.messages("full@example.test") == []
    # Nothing was created for the users that do not exist.
    assert {p.name for p in (dovecot.top / "mail").iterdir()} <= set(USERS)


def test_lda_rejection_with_e_is_permanent(dovecot: Dovecot) -> None:
    relay = dovecot.relay("-e", "-o", "quota_full_tempfail=no")
    [error] = dict(relay.attempt(envelope("alice@example.test", "full@example.test"), 0)).values()
    assert isinstance(error, PermanentRelayError)
    assert reply_is(error, REJECTED)
    assert error.reply.raw_message == "Quota exceeded (mailbox for user is full)"


def test_lda_refuses_sender_that_looks_like_an_option(dovecot: Dovecot) -> None:
    before = len(dovecot.messages("bob@example.test"))
    [error] = dict(dovecot.relay().attempt(envelope("-e"), 0)).values()
    assert isinstance(error, PermanentRelayError) and reply_is(error, BAD_SENDER)
    assert len(dovecot.messages("bob@example.test")) == before


def test_lda_missing_configuration_is_reported(dovecot: Dovecot, tmp_path: Path) -> None:
    relay = DovecotLdaRelay(
        path=dovecot.lda, timeout=TIMEOUT, extra_args=["-c", str(tmp_path / "none.conf")]
    )
    [error] = dict(relay.attempt(envelope(), 0)).values()
    assert isinstance(error, RelayError)
    assert error.reply.raw_message not in (None, "", "LDA delivery failed")


class Announcing(DovecotLdaRelay):
    """Puts the recipients of each attempt on :attr:`attempts` as it starts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: gevent.queue.Queue[list[str]] = gevent.queue.Queue()

    def attempt(self, envelope: Envelope, attempts: int) -> Any:
        self.attempts.put(list(envelope.recipients))
        return super().attempt(envelope, attempts)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_queue_retries_only_the_failed_recipient(dovecot: Dovecot) -> None:
    relay = Announcing(path=dovecot.lda, timeout=TIMEOUT, extra_args=["-c", str(dovecot.config)])
    clock = FakeClock()
    store = DictStorage()
    bounces: list[tuple[list[str], Reply]] = []

    def bounce(env: Envelope, reply: Reply) -> None:
        bounces.append((list(env.recipients), reply))

    queue = Queue(store, relay, backoff=lambda env, n: 60.0, bounce_factory=bounce, clock=clock)
    queue.start()
    bob = len(dovecot.messages("bob@example.test"))
    dovecot.lock_home("dave@example.test")
    try:
        rcpts = ["bob@example.test", "dave@example.test", "ghost@example.test"]
        [(_, id)] = queue.enqueue(envelope("alice@example.test", *rcpts))
        assert relay.attempts.get(timeout=TIMEOUT) == rcpts
        assert queue.relay_pool.join(timeout=TIMEOUT)
        assert store.get(id)[0].recipients == ["dave@example.test"]
        [(bounced, reply)] = bounces
        assert bounced == ["ghost@example.test"]
        assert reply.code == "550" and reply.enhanced_status_code == "5.1.1"
        assert len(dovecot.messages("bob@example.test")) == bob + 1

        dovecot.unlock_home("dave@example.test")
        clock.now += 60.0
        queue.kick()
        assert relay.attempts.get(timeout=TIMEOUT) == ["dave@example.test"]
        assert queue.relay_pool.join(timeout=TIMEOUT)
        assert store.get_info()["size"] == 0
        assert dovecot.messages("dave@example.test") == [STORED]
        assert len(dovecot.messages("bob@example.test")) == bob + 1
        assert len(bounces) == 1
    finally:
        dovecot.unlock_home("dave@example.test")
        queue.kill(block=True, timeout=TIMEOUT)
        queue.relay_pool.kill(block=True, timeout=TIMEOUT)
