"""Hostile and broken clients against a real SmtpEdge.

Covers SMTP smuggling (SEC Consult, Dec 2023), bare line ends, over-long and
malformed command lines, floods, error limits, failing hooks and queues, and
clients that vanish mid-transaction.
"""

from __future__ import annotations

import tracemalloc

import gevent
import gevent.event
import pytest

from slimta.edge.smtp import SmtpValidators
from slimta.smtp.reply import Reply

pytestmark = pytest.mark.timeout(20)

# Named replies: (code, enhanced status code or None for "no code").
OK = ("250", "2.0.0")
SENDER_OK = ("250", "2.1.0")
RECIPIENT_OK = ("250", "2.1.5")
QUEUED = ("250", "2.6.0")
START_DATA = ("354", None)
BYE = ("221", "2.0.0")
BARE_LINE_END_IN_DATA = ("550", "5.5.2")
SYNTAX_ERROR = ("500", "5.5.2")
TOO_MANY_ERRORS = ("421", "4.7.0")
LOCAL_ERROR = ("451", "4.3.0")
POLICY_REFUSAL = ("550", "5.7.1")

MESSAGE = b"From: a@example.test\r\nSubject: hello\r\n\r\nbody\r\n"
SMUGGLED = b"MAIL FROM:<spoof@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nspoofed\r\n"


def open_transaction(client, sender=b"legit@a.test"):
    """EHLO, MAIL, RCPT and DATA; the client is left sending content."""
    client.greet()
    client.send(b"MAIL FROM:<%s>\r\nRCPT TO:<rcpt@b.test>\r\nDATA\r\n" % sender)
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)


def full_transaction(smtp, port):
    """A normal message from a fresh smtplib client; returns the refused dict."""
    client = smtp(port)
    refused = client.sendmail("ok@a.test", ["ok@b.test"], MESSAGE)
    client.quit()
    return refused


# ---------------------------------------------------------- SMTP smuggling


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r"],
    ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CR"],
)
def test_smtp_smuggling_is_not_possible(edge, raw, fake_end):
    _, port, queue = edge
    client = raw(port)
    open_transaction(client)
    client.send(b"Subject: innocent\r\n\r\nhello" + fake_end + SMUGGLED + b"\r\n.\r\n")
    # Exactly one reply for the whole content: the smuggled commands were data.
    client.expect(BARE_LINE_END_IN_DATA)
    client.send(b"NOOP\r\n")
    client.expect(OK)
    assert queue.calls <= 1
    assert all(env.sender != "spoof@x.test" for env in queue.envelopes)
    assert all("victim@y.test" not in env.recipients for env in queue.envelopes)


def test_smuggling_payload_with_real_terminators_is_ordinary_data(edge, raw):
    # The same bytes with CRLF line ends and dot-stuffing stay one message.
    _, port, queue = edge
    client = raw(port)
    open_transaction(client)
    client.send(b"Subject: innocent\r\n\r\nhello\r\n..\r\n" + SMUGGLED + b".\r\n")
    client.expect(QUEUED)
    [envelope] = queue.envelopes
    assert envelope.sender == "legit@a.test"
    assert envelope.message == b"hello\r\n.\r\n" + SMUGGLED


# -------------------------------------------------------- command framing


@pytest.mark.parametrize(
    "line",
    [
        b"NOOP\nNOOP\r\n",
        b"MAIL FROM:<a@b.test>\nRCPT TO:<c@d.test>\r\n",
        b"NOOP\rNOOP\r\n",
    ],
    ids=["LF-in-NOOP", "LF-between-commands", "CR-in-NOOP"],
)
def test_bare_line_end_in_command_is_refused(edge, raw, line):
    _, port, _ = edge
    client = raw(port)
    client.greet()
    client.send(line)
    client.expect(SYNTAX_ERROR)
    # Nothing after the bare line end ran as a command: the next reply is NOOP's.
    client.send(b"NOOP\r\n")
    client.expect(OK)
    client.send(b"MAIL FROM:<a@b.test>\r\n")
    client.expect(SENDER_OK)


@pytest.mark.parametrize("length", [513, 600, 100_000])
def test_over_long_command_line(edge, raw, length):
    _, port, _ = edge
    client = raw(port)
    client.greet()
    line = b"NOOP " + b"x" * (length - 5)
    client.send(line + b"\r\n")
    client.expect(SYNTAX_ERROR)
    client.send(b"NOOP\r\n")
    client.expect(OK)


def test_longest_allowed_command_line(edge, raw):
    # RFC 5321 4.5.3.1.4: 512 octets including the CRLF.
    _, port, _ = edge
    client = raw(port)
    client.greet()
    client.send(b"NOOP " + b"x" * 505 + b"\r\n")
    client.expect(OK)


@pytest.mark.parametrize(
    "line",
    [b"EHLO \xff\xfe\r\n", b"NOOP \xc3\x28\r\n", b"NOOP\x00\r\n", b"MAIL FROM:<a\x00@b.test>\r\n"],
    ids=["bad-utf8-ehlo", "bad-utf8-noop", "nul-noop", "nul-address"],
)
def test_invalid_bytes_in_commands(edge, raw, smtp, line):
    _, port, queue = edge
    client = raw(port)
    client.greet()
    client.send(line)
    code, _ = client.read_reply()
    assert code.startswith("5")
    client.send(b"NOOP\r\n")
    client.expect(OK)
    # And the server still serves everyone else.
    assert full_transaction(smtp, port) == {}
    assert len(queue.envelopes) == 1


def test_too_many_errors_closes_the_session(edge, raw):
    _, port, _ = edge
    client = raw(port)
    client.greet()
    bad = [b"XYZZY\r\n", b"MAIL FROM:nonsense\r\n", b"RCPT TO:<a@b.test>\r\n", b"DATA x\r\n"]
    # 20 protocol errors, and more commands that must never be answered.
    client.send(b"".join(bad * 5) + b"NOOP\r\n" * 5)
    for _ in range(20):
        code, _ = client.read_reply()
        assert code.startswith("5")
    client.expect(TOO_MANY_ERRORS)
    assert client.at_eof()


def test_unterminated_flood_does_not_starve_other_clients(edge, raw, smtp):
    _, port, queue = edge
    flooder = raw(port)
    flooder.greet()

    chunk = b"A" * 65536
    minimum = 5 * 1024 * 1024
    cap = 1024 * 1024 * 1024
    flooding = gevent.event.Event()
    second_done = gevent.event.Event()
    progress = {"sent": 0}

    def flood():
        # Keep the one unterminated line coming at least until the second
        # client is through, so that client's whole transaction happens
        # while the flood is being sent.
        while progress["sent"] < minimum or not second_done.is_set():
            flooder.send(chunk)
            progress["sent"] += len(chunk)
            if progress["sent"] >= 1024 * 1024:
                flooding.set()
            if progress["sent"] >= cap:
                return

    tracemalloc.start()
    flood_greenlet = gevent.spawn(flood)
    try:
        assert flooding.wait(10), "the flood did not get going"
        assert full_transaction(smtp, port) == {}
        assert not flood_greenlet.dead, "the flood ended before the second client"
        second_done.set()
        flood_greenlet.join(timeout=10)
        assert flood_greenlet.successful()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        flood_greenlet.kill()
        tracemalloc.stop()
    assert progress["sent"] >= minimum
    # The server drops the line as it comes: it never holds the flood.
    assert peak < minimum // 2, f"peak memory {peak} while flooded"
    assert len(queue.envelopes) == 1

    # The flooded session survives: its line is refused once, then it works.
    flooder.send(b"\r\n")
    flooder.expect(SYNTAX_ERROR)
    flooder.send(b"NOOP\r\n")
    flooder.expect(OK)


# ----------------------------------------------- failing hooks and queues


class ExplodingValidators(SmtpValidators):
    def handle_rcpt(self, reply, recipient, params):
        if recipient.startswith("boom@"):
            raise RuntimeError("validator bug")


def test_validator_that_raises(make_edge, raw, smtp):
    _, port, queue = make_edge(validator_class=ExplodingValidators)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<boom@b.test>\r\n")
    client.expect(SENDER_OK)
    client.expect(LOCAL_ERROR)
    client.send(b"RCPT TO:<fine@b.test>\r\nDATA\r\n")
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)
    client.send(MESSAGE + b".\r\n")
    client.expect(QUEUED)
    assert queue.envelopes[0].recipients == ["fine@b.test"]
    # The next client is served as usual.
    assert full_transaction(smtp, port) == {}
    assert len(queue.envelopes) == 2


def test_queue_that_raises(edge, raw, smtp):
    _, port, queue = edge
    queue.exception = RuntimeError("storage is down")
    client = raw(port)
    open_transaction(client)
    client.send(MESSAGE + b".\r\n")
    client.expect(LOCAL_ERROR)
    client.send(b"NOOP\r\n")
    client.expect(OK)
    assert queue.calls == 1
    queue.exception = None
    assert full_transaction(smtp, port) == {}


def test_queue_error_with_reply(edge, raw):
    _, port, queue = edge
    queue.fail_with(Reply("550", "5.7.1 nope"))
    client = raw(port)
    open_transaction(client)
    client.send(MESSAGE + b".\r\n")
    text = client.expect(POLICY_REFUSAL)
    assert text == "5.7.1 nope"
    assert queue.calls == 1


def test_queue_error_without_reply(edge, raw):
    _, port, queue = edge
    queue.fail_with(None)
    client = raw(port)
    open_transaction(client)
    client.send(MESSAGE + b".\r\n")
    client.expect(LOCAL_ERROR)


# ------------------------------------------------------ vanishing clients


@pytest.mark.parametrize("data_timeout", [None, 0.3])
def test_client_closing_mid_data(make_edge, raw, smtp, data_timeout):
    edge, port, queue = make_edge(data_timeout=data_timeout)
    client = raw(port)
    open_transaction(client)
    client.send(b"Subject: cut\r\n\r\nhalf a mess")
    client.close()
    assert edge.session_ended.wait(5)
    assert queue.calls == 0
    assert full_transaction(smtp, port) == {}
    assert len(queue.envelopes) == 1


def test_client_closing_mid_bdat(edge, raw, smtp):
    edge, port, queue = edge
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 1000 LAST\r\nonly a bit")
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.close()
    assert edge.session_ended.wait(5)
    assert queue.calls == 0
    assert full_transaction(smtp, port) == {}


def test_quit_mid_pipeline_stops_processing(edge, raw):
    _, port, _ = edge
    client = raw(port)
    client.greet()
    client.send(b"QUIT\r\nMAIL FROM:<a@b.test>\r\n")
    client.expect(BYE)
    assert client.at_eof()
