"""SmtpEdge end to end over real sockets: stdlib smtplib and raw clients."""

from __future__ import annotations

import socket
from typing import Any

import gevent
import gevent.event
import pytest
from conftest import IO_TIMEOUT
from gevent.pool import Pool

from slimta.smtp import reply as named_replies

pytestmark = pytest.mark.timeout(20)

# Named replies: (code, enhanced status code or None for "no code").
BANNER = ("220", None)
OK = ("250", "2.0.0")
SENDER_OK = ("250", "2.1.0")
RECIPIENT_OK = ("250", "2.1.5")
QUEUED = ("250", "2.6.0")
START_DATA = ("354", None)
CANNOT_VRFY = ("252", "2.5.0")
BYE = ("221", "2.0.0")
SIZE_EXCEEDED = ("552", "5.3.4")
TOO_MANY_RECIPIENTS = ("452", "4.5.3")
BAD_RECIPIENT_SYNTAX = ("501", "5.1.3")
NEED_HELLO = ("503", "5.5.1")
BINARY_NEEDS_BDAT = ("503", "5.5.1")
UTF8_NOT_DECLARED = ("553", "5.6.7")
SHUTTING_DOWN = ("421", "4.3.2")
# The issue asks for 500 5.5.1 (RFC 3463: invalid command) where 4.0 sent
# unknown_command (500 5.5.2); EXPN, HELP and the like get 502 5.5.1.
UNRECOGNIZED_COMMAND = ("500", "5.5.1")
NOT_IMPLEMENTED = ("502", "5.5.1")
TIMED_OUT = (named_replies.timed_out.code, named_replies.timed_out.enhanced_status_code)

MESSAGE = b"From: a@example.test\r\nSubject: hello\r\n\r\nbody line 1\r\nbody line 2\r\n"


def message_of_size(size: int) -> bytes:
    """A CRLF message of exactly *size* octets, with a line that needs dot-stuffing."""
    head = b"Subject: size\r\n\r\n.dotted line\r\n"
    filler = size - len(head) - 2
    assert filler >= 0
    return head + b"x" * filler + b"\r\n"


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency, for raw clients."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


# ---------------------------------------------------------------- smtplib


def test_ehlo_advertises_extensions(make_edge, smtp):
    _, port, _ = make_edge(max_size=10000)
    client = smtp(port)
    code, text = client.ehlo("client.test")
    assert code == 250
    assert text.split(b"\n")[0] == b"mx.test Hello client.test"
    for keyword in ("8bitmime", "pipelining", "enhancedstatuscodes", "smtputf8", "chunking"):
        assert client.has_extn(keyword), keyword
    assert client.esmtp_features["size"] == "10000"
    assert not client.has_extn("starttls")
    assert not client.has_extn("auth")


def test_no_size_advertised_without_max_size(edge, smtp):
    _, port, _ = edge
    client = smtp(port)
    client.ehlo("client.test")
    assert not client.has_extn("size")


def test_sendmail_several_recipients(edge, smtp):
    _, port, queue = edge
    client = smtp(port, local_hostname="client.test")
    refused = client.sendmail(
        "sender@example.test",
        ["one@example.test", "two@example.test", "three@example.test"],
        MESSAGE,
    )
    assert refused == {}
    assert queue.wait()
    [envelope] = queue.envelopes
    assert envelope.sender == "sender@example.test"
    assert envelope.recipients == ["one@example.test", "two@example.test", "three@example.test"]
    assert envelope.headers["Subject"] == "hello"
    assert envelope.headers["From"] == "a@example.test"
    assert envelope.message == b"body line 1\r\nbody line 2\r\n"
    assert envelope.receiver == "mx.test"
    assert envelope.timestamp is not None
    assert envelope.client["ip"] == "127.0.0.1"
    assert envelope.client["name"] == "client.test"
    assert envelope.client["protocol"] == "ESMTP"
    assert envelope.client["auth"] is None


def test_data_reply_contains_queue_id(edge, smtp, reply_is):
    _, port, _ = edge
    client = smtp(port)
    client.ehlo("client.test")
    assert reply_is(client.mail("a@example.test"), SENDER_OK)
    assert reply_is(client.rcpt("b@example.test"), RECIPIENT_OK)
    reply = client.data(MESSAGE)
    assert reply_is(reply, QUEUED)
    assert b"queue-id-1" in reply[1]


def test_unknown_command(edge, smtp, reply_is):
    _, port, _ = edge
    client = smtp(port)
    client.ehlo("client.test")
    assert reply_is(client.docmd("XYZZY"), UNRECOGNIZED_COMMAND)
    assert reply_is(client.docmd("EXPN", "list"), NOT_IMPLEMENTED)
    assert reply_is(client.noop(), OK)


def test_vrfy_rset_noop_quit(edge, smtp, reply_is):
    _, port, _ = edge
    client = smtp(port)
    client.ehlo("client.test")
    assert reply_is(client.verify("someone@example.test"), CANNOT_VRFY)
    assert reply_is(client.rset(), OK)
    assert reply_is(client.noop(), OK)
    assert reply_is(client.quit(), BYE)


def test_null_sender(edge, raw):
    _, port, queue = edge
    client = raw(port)
    client.greet()
    assert client.command("MAIL FROM:<>")[0] == "250"
    assert client.command("RCPT TO:<postmaster@example.test>")[0] == "250"
    assert client.command("DATA")[0] == "354"
    client.send(MESSAGE + b".\r\n")
    client.expect(QUEUED)
    [envelope] = queue.envelopes
    assert envelope.sender == ""


def test_smtputf8_addresses(edge, smtp):
    _, port, queue = edge
    client = smtp(port)
    client.sendmail(
        "usér@exämple.test",
        ["rëcipient@exämple.test"],
        b"Subject: utf8\r\n\r\nhi\r\n",
        mail_options=["SMTPUTF8"],
    )
    assert queue.wait()
    [envelope] = queue.envelopes
    assert envelope.sender == "usér@exämple.test"
    assert envelope.recipients == ["rëcipient@exämple.test"]
    # RFC 6531 3.7.3: the "with" protocol of an SMTPUTF8 transaction.
    assert envelope.client["protocol"] == "UTF8SMTP"


def test_utf8_address_without_smtputf8_refused(edge, raw):
    _, port, _ = edge
    client = raw(port)
    client.greet()
    client.send("MAIL FROM:<usér@exämple.test>\r\n".encode())
    client.expect(UTF8_NOT_DECLARED)
    client.send(b"NOOP\r\n")
    client.expect(OK)


# ------------------------------------------------------------------- SIZE


def test_size_declared_too_big(make_edge, smtp, reply_is):
    _, port, _ = make_edge(max_size=1000)
    client = smtp(port)
    client.ehlo("client.test")
    assert reply_is(client.mail("a@example.test", ["SIZE=1001"]), SIZE_EXCEEDED)
    assert reply_is(client.mail("a@example.test", ["SIZE=1000"]), SENDER_OK)


def test_size_limit_is_exact_and_session_continues(make_edge, smtp, reply_is):
    _, port, queue = make_edge(max_size=1000)
    client = smtp(port)
    client.ehlo("client.test")

    exact = message_of_size(1000)
    assert reply_is(client.mail("a@example.test"), SENDER_OK)
    assert reply_is(client.rcpt("b@example.test"), RECIPIENT_OK)
    assert reply_is(client.data(exact), QUEUED)
    assert len(queue.envelopes) == 1
    assert queue.envelopes[0].message == b".dotted line\r\n" + b"x" * (1000 - 33) + b"\r\n"

    assert reply_is(client.mail("a@example.test"), SENDER_OK)
    assert reply_is(client.rcpt("b@example.test"), RECIPIENT_OK)
    assert reply_is(client.data(message_of_size(1001)), SIZE_EXCEEDED)
    assert len(queue.envelopes) == 1
    assert queue.calls == 1

    # The whole oversized message was consumed: the session is in sync.
    assert reply_is(client.rset(), OK)
    assert reply_is(client.mail("a@example.test"), SENDER_OK)
    assert reply_is(client.rcpt("b@example.test"), RECIPIENT_OK)
    assert reply_is(client.data(MESSAGE), QUEUED)
    assert len(queue.envelopes) == 2


def test_much_too_big_message_is_discarded_to_its_end(make_edge, raw):
    _, port, queue = make_edge(max_size=1000)
    client = raw(port)
    client.greet()
    client.command("MAIL FROM:<a@example.test>")
    client.command("RCPT TO:<b@example.test>")
    assert client.command("DATA")[0] == "354"
    client.send(b"Subject: big\r\n\r\n" + (b"y" * 500 + b"\r\n") * 400 + b".\r\n")
    client.expect(SIZE_EXCEEDED)
    client.send(b"NOOP\r\n")
    client.expect(OK)
    assert queue.calls == 0


def test_helo_keeps_size_enforcement(make_edge, raw):
    _, port, queue = make_edge(max_size=1000)
    client = raw(port)
    client.expect(BANNER)
    assert client.command("HELO client.test")[0] == "250"
    client.send(b"MAIL FROM:<a@example.test> SIZE=5000\r\n")
    client.expect(SIZE_EXCEEDED)
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    client.expect(SENDER_OK)
    client.send(b"RCPT TO:<b@example.test>\r\n")
    client.expect(RECIPIENT_OK)
    client.send(b"DATA\r\n")
    client.expect(START_DATA)
    client.send(dot_stuff(message_of_size(1001)) + b".\r\n")
    client.expect(SIZE_EXCEEDED)
    assert queue.calls == 0

    client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)
    client.send(MESSAGE + b".\r\n")
    client.expect(QUEUED)
    [envelope] = queue.envelopes
    assert envelope.client["protocol"] == "SMTP"
    assert envelope.client["name"] == "client.test"


def test_empty_messages(edge, raw):
    _, port, queue = edge
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)
    client.send(b".\r\n")
    client.expect(QUEUED)
    client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nBDAT 0 LAST\r\n")
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(QUEUED)
    assert [env.message for env in queue.envelopes] == [b"", b""]


# ------------------------------------------------------- PIPELINING, BDAT


def test_pipelined_transaction_replies_in_order(edge, raw):
    _, port, queue = edge
    client = raw(port)
    client.greet()
    client.send(
        b"MAIL FROM:<a@example.test>\r\n"
        b"RCPT TO:<good@example.test>\r\n"
        b"RCPT TO:bad-recipient\r\n"
        b"DATA\r\n"
    )
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(BAD_RECIPIENT_SYNTAX)
    client.expect(START_DATA)
    client.send(MESSAGE + b".\r\n")
    client.expect(QUEUED)
    [envelope] = queue.envelopes
    assert envelope.recipients == ["good@example.test"]


def test_pipelined_messages_back_to_back(edge, raw):
    _, port, queue = edge
    client = raw(port)
    client.greet()
    one = b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
    client.send(one)
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)
    # End of data, RSET, a new transaction and QUIT in one write.
    client.send(MESSAGE + b".\r\nRSET\r\n" + one)
    client.expect(QUEUED)
    client.expect(OK)
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)
    client.send(MESSAGE + b".\r\nQUIT\r\n")
    client.expect(QUEUED)
    client.expect(BYE)
    assert client.at_eof()
    assert len(queue.envelopes) == 2


def test_bdat_chunks(edge, raw):
    _, port, queue = edge
    client = raw(port)
    client.greet()
    client.command("MAIL FROM:<a@example.test>")
    client.command("RCPT TO:<b@example.test>")
    part1 = b"Subject: chunked\r\n\r\nfirst "
    part2 = b"second\r\n"
    client.send(b"BDAT %d\r\n%s" % (len(part1), part1))
    code, _ = client.read_reply()
    assert code == "250"
    # Two chunks pipelined in one write, the last one empty.
    client.send(b"BDAT %d\r\n%sBDAT 0 LAST\r\n" % (len(part2), part2))
    assert client.read_reply()[0] == "250"
    text = client.expect(QUEUED)
    assert "queue-id-1" in text
    [envelope] = queue.envelopes
    assert envelope.headers["Subject"] == "chunked"
    assert envelope.message == b"first second\r\n"


def test_bdat_binarymime(edge, raw):
    _, port, queue = edge
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test> BODY=BINARYMIME\r\n")
    client.expect(SENDER_OK)
    client.send(b"RCPT TO:<b@example.test>\r\n")
    client.expect(RECIPIENT_OK)
    client.send(b"DATA\r\n")
    client.expect(BINARY_NEEDS_BDAT)
    body = bytes(range(256)) + b"\n.\n\r.\r\x00"
    data = b"Subject: binary\r\n\r\n" + body
    client.send(b"BDAT %d LAST\r\n%s" % (len(data), data))
    client.expect(QUEUED)
    [envelope] = queue.envelopes
    assert envelope.message == body


# --------------------------------------------------------------- limits


def test_recipient_limit(make_edge, raw):
    _, port, queue = make_edge(max_recipients=2)
    client = raw(port)
    client.greet()
    client.send(
        b"MAIL FROM:<a@example.test>\r\n"
        b"RCPT TO:<r1@example.test>\r\n"
        b"RCPT TO:<r2@example.test>\r\n"
        b"RCPT TO:<r3@example.test>\r\n"
        b"DATA\r\n"
    )
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(RECIPIENT_OK)
    client.expect(TOO_MANY_RECIPIENTS)
    client.expect(START_DATA)
    client.send(MESSAGE + b".\r\n")
    client.expect(QUEUED)
    [envelope] = queue.envelopes
    assert envelope.recipients == ["r1@example.test", "r2@example.test"]


def test_mail_before_ehlo(edge, raw):
    _, port, _ = edge
    client = raw(port)
    client.expect(BANNER)
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    client.expect(NEED_HELLO)


# ------------------------------------------------------------- timeouts


def test_command_timeout(make_edge, raw):
    edge, port, _ = make_edge(command_timeout=0.5)
    client = raw(port)
    client.greet()
    # The client now says nothing: the server gives up on it, putting its
    # reply on a line of its own (4.0 timed_out has newline_first).
    assert client.read_line() == b""
    client.expect(TIMED_OUT)
    assert client.at_eof()
    assert edge.session_ended.wait(5)


def trickle(client, data, every, done):
    """Send *data* one byte per *every* seconds (a slow-loris client), then set *done*."""
    for i in range(len(data)):
        gevent.sleep(every)
        try:
            client.send(data[i : i + 1])
        except OSError:
            return
    done.set()


def test_command_timeout_bounds_the_whole_line(make_edge, raw):
    # 4.0 contract: command_timeout is the time allowed for each command
    # line, so a client cannot hold a session by trickling bytes.
    edge, port, _ = make_edge(command_timeout=0.5)
    client = raw(port)
    client.greet()
    line_sent = gevent.event.Event()
    trickler = gevent.spawn(trickle, client, b"NOOP xxxxx\r\n", 0.2, line_sent)
    try:
        client.expect(TIMED_OUT)
        assert not line_sent.is_set(), "the line was complete before the timeout"
    finally:
        trickler.kill()
    assert edge.session_ended.wait(5)


def test_data_timeout_bounds_the_whole_transfer(make_edge, raw):
    edge, port, queue = make_edge(data_timeout=0.5)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)
    message_sent = gevent.event.Event()
    content = b"Subject: slow\r\n\r\n" + b"a\r\n" * 10 + b".\r\n"
    trickler = gevent.spawn(trickle, client, content, 0.2, message_sent)
    try:
        client.expect(TIMED_OUT)
        assert not message_sent.is_set(), "the message was complete before the timeout"
    finally:
        trickler.kill()
    assert edge.session_ended.wait(5)
    assert queue.calls == 0


def test_data_timeout(make_edge, raw):
    edge, port, queue = make_edge(data_timeout=0.5)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)
    client.send(b"Subject: slow\r\n\r\nthe client stalls here")
    client.expect(TIMED_OUT)
    assert client.at_eof()
    assert edge.session_ended.wait(5)
    assert queue.calls == 0


def _accepted_message(client):
    client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)
    client.send(MESSAGE + b".\r\n")
    client.expect(QUEUED)


def _refused_bdat(client):
    # BDAT without MAIL: the chunk is read and refused.
    client.send(b"BDAT 5 LAST\r\nhello")
    client.expect(("503", "5.5.1"))


def _oversized_bdat(client):
    client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n")
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.send(b"BDAT 200 LAST\r\n" + b"z" * 200)
    client.expect(SIZE_EXCEEDED)


@pytest.mark.parametrize(
    "transfer", [_accepted_message, _refused_bdat, _oversized_bdat], ids=lambda f: f.__name__[1:]
)
def test_data_timeout_ends_with_the_transfer(make_edge, raw, transfer):
    # data_timeout bounds one message's content, not the rest of the session.
    _, port, _ = make_edge(max_size=100, data_timeout=0.3)
    client = raw(port)
    client.greet()
    transfer(client)
    # An idle pause longer than data_timeout, with no command timeout set:
    # the only thing that could end the session now is a leaked data timer.
    gevent.sleep(0.5)
    client.send(b"NOOP\r\n")
    client.expect(OK)


# -------------------------------------------------------- graceful stop


def test_stop_tells_idle_sessions_and_refuses_new_ones(make_edge, raw):
    edge, port, _ = make_edge()
    client = raw(port)
    client.greet()
    edge.stop(grace=0.2)
    client.expect(SHUTTING_DOWN)
    assert client.at_eof()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_stop_lets_busy_session_finish(make_edge, raw):
    edge, port, queue = make_edge()
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)

    stopper = gevent.spawn(edge.stop, 10.0)
    gevent.idle()  # let the stopper close the listener
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)

    client.send(MESSAGE + b".\r\nQUIT\r\n")
    client.expect(QUEUED)
    client.expect(BYE)
    assert client.at_eof()
    stopper.join(timeout=5)
    assert stopper.successful()
    assert len(queue.envelopes) == 1


def test_stop_ends_sessions_still_busy_after_the_grace_time(make_edge, raw):
    edge, port, queue = make_edge()
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(START_DATA)
    client.send(b"Subject: unfinished\r\n\r\nstill typing")
    edge.stop(grace=0.2)
    client.expect(SHUTTING_DOWN)
    assert client.at_eof()
    assert queue.calls == 0


# ------------------------------------------------------- parked sessions
# An idle plain-text session parks in the event loop after park_after
# seconds: it then holds no greenlet, and nothing on the wire may tell it
# from a busy one. The tests wait for each parking (edge.parks) and check
# that no greenlet serves the session while it is parked.

PARK_AFTER = 0.05


def wait_parked(edge: Any, count: int = 1) -> None:
    for _ in range(count):
        edge.parks.get(timeout=IO_TIMEOUT)
    assert edge.parked_sessions == count
    # No greenlet per idle connection: the pool empties.
    assert edge.pool.join(timeout=IO_TIMEOUT)


def test_parked_session_resumes_mid_command_and_mid_transaction(make_edge, raw):
    edge, port, queue = make_edge(park_after=PARK_AFTER)
    client = raw(port)
    client.greet()
    wait_parked(edge)
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    client.expect(SENDER_OK)
    wait_parked(edge)
    # Half a command, the session parks with it buffered, then the rest.
    client.send(b"RCPT TO:<b@exa")
    wait_parked(edge)
    client.send(b"mple.test>\r\n")
    client.expect(RECIPIENT_OK)
    client.send(b"DATA\r\n")
    client.expect(START_DATA)
    client.send(MESSAGE + b".\r\n")
    client.expect(QUEUED)
    wait_parked(edge)
    client.send(b"QUIT\r\n")
    client.expect(BYE)
    assert client.at_eof()
    assert edge.session_ended.wait(5)
    assert edge.parked_sessions == 0
    [envelope] = queue.envelopes
    assert envelope.recipients == ["b@example.test"]


def test_parked_session_times_out(make_edge, raw):
    edge, port, _ = make_edge(park_after=PARK_AFTER, command_timeout=0.5)
    client = raw(port)
    client.greet()
    wait_parked(edge)
    assert client.read_line() == b""
    client.expect(TIMED_OUT)
    assert client.at_eof()
    assert edge.session_ended.wait(5)
    assert edge.parked_sessions == 0


def test_parked_session_closed_by_client(make_edge, raw, smtp):
    edge, port, queue = make_edge(park_after=PARK_AFTER)
    client = raw(port)
    client.greet()
    wait_parked(edge)
    client.close()
    assert edge.session_ended.wait(5)
    assert edge.parked_sessions == 0
    assert smtp(port).sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    assert len(queue.envelopes) == 1


def test_stop_reaches_parked_sessions(make_edge, raw):
    edge, port, _ = make_edge(park_after=PARK_AFTER)
    client = raw(port)
    client.greet()
    wait_parked(edge)
    edge.stop(grace=0.1)
    client.expect(SHUTTING_DOWN)
    assert client.at_eof()
    assert edge.parked_sessions == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_many_parked_sessions(make_edge, raw):
    edge, port, queue = make_edge(park_after=PARK_AFTER)
    clients = [raw(port) for _ in range(50)]
    for client in clients:
        client.greet()
    wait_parked(edge, 50)
    for client in clients:
        client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    for client in clients:
        client.expect(SENDER_OK)
        client.expect(RECIPIENT_OK)
        client.expect(START_DATA)
        client.send(MESSAGE + b".\r\n")
    for client in clients:
        client.expect(QUEUED)
    assert len(queue.envelopes) == 50


def test_bounded_pool_never_parks(make_edge, raw):
    edge, port, _ = make_edge(park_after=PARK_AFTER, pool=Pool(10), command_timeout=0.3)
    client = raw(port)
    client.greet()
    assert client.read_line() == b""
    client.expect(TIMED_OUT)
    assert edge.parks.empty()
