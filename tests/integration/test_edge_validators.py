"""SmtpValidators hooks on a real SmtpEdge: calls, session state, changed replies."""

from __future__ import annotations

import smtplib

import pytest

from slimta.edge.smtp import SmtpValidators

pytestmark = pytest.mark.timeout(20)

# Named replies: (code, enhanced status code or None for "no code").
BANNER = ("220", None)
OK = ("250", "2.0.0")
SENDER_OK = ("250", "2.1.0")
RECIPIENT_OK = ("250", "2.1.5")
QUEUED = ("250", "2.6.0")
START_DATA = ("354", None)
BAD_SEQUENCE = ("503", "5.5.1")
POLICY_REFUSAL = ("550", "5.7.1")
CONTENT_REFUSAL = ("554", "5.7.1")
CLOSING = ("421", "4.7.0")

MESSAGE = b"From: a@example.test\r\nSubject: hello\r\n\r\nbody\r\n"


def recording_validators(**changes):
    """A validator class that records each hook call and the session state seen.

    *changes* maps a hook name to a function ``(validators, reply, *args)``
    that may change the reply.
    """
    calls = []

    class Recording(SmtpValidators):
        def _record(self, name, reply, *args):
            session = self.session
            calls.append(
                {
                    "hook": name,
                    "args": args,
                    "address": session.address,
                    "ehlo_as": session.ehlo_as,
                    "extended_smtp": session.extended_smtp,
                    "security": session.security,
                    "auth": session.auth,
                    "protocol": session.protocol,
                    "sender": session.envelope.sender if session.envelope else None,
                    "recipients": list(session.envelope.recipients) if session.envelope else None,
                    "reverse_address": session.reverse_address,
                }
            )
            change = changes.get(name)
            if change is not None:
                change(self, reply, *args)

        def handle_banner(self, reply, address):
            self._record("banner", reply, address)

        def handle_ehlo(self, reply, ehlo_as):
            self._record("ehlo", reply, ehlo_as)

        def handle_helo(self, reply, helo_as):
            self._record("helo", reply, helo_as)

        def handle_mail(self, reply, sender, params):
            self._record("mail", reply, sender, params)

        def handle_rcpt(self, reply, recipient, params):
            self._record("rcpt", reply, recipient, params)

        def handle_data(self, reply):
            self._record("data", reply)

        def handle_have_data(self, reply, data):
            self._record("have_data", reply, data)

        def handle_queued(self, reply, results):
            self._record("queued", reply, results)

        def handle_rset(self, reply):
            self._record("rset", reply)

    return Recording, calls


def hooks(calls):
    return [call["hook"] for call in calls]


def set_reply(code, message):
    def change(validators, reply, *args):
        reply.code = code
        reply.message = message

    return change


def test_every_hook_is_called_with_session_state(make_edge, smtp, reply_is):
    validators, calls = recording_validators()
    _, port, queue = make_edge(validator_class=validators)
    client = smtp(port, local_hostname="client.test")
    client.ehlo()
    assert reply_is(client.mail("a@example.test", ["BODY=8BITMIME"]), SENDER_OK)
    assert reply_is(client.rcpt("one@example.test"), RECIPIENT_OK)
    assert reply_is(client.rcpt("two@example.test"), RECIPIENT_OK)
    assert reply_is(client.data(MESSAGE), QUEUED)
    assert reply_is(client.rset(), OK)
    client_address = client.sock.getsockname()
    client.quit()

    assert hooks(calls) == [
        "banner",
        "ehlo",
        "mail",
        "rcpt",
        "rcpt",
        "data",
        "have_data",
        "queued",
        "rset",
    ]
    by_hook = {call["hook"]: call for call in calls}
    banner = by_hook["banner"]
    (address,) = banner["args"]
    assert tuple(address[:2]) == client_address
    assert banner["address"] == address
    assert banner["ehlo_as"] is None
    assert banner["protocol"] == "SMTP"

    assert by_hook["ehlo"]["args"] == ("client.test",)
    mail = by_hook["mail"]
    assert mail["args"] == ("a@example.test", {b"BODY": b"8BITMIME"})
    assert mail["ehlo_as"] == "client.test"
    assert mail["extended_smtp"] is True
    assert mail["protocol"] == "ESMTP"
    assert mail["security"] is None
    assert mail["auth"] is None
    assert mail["sender"] is None

    first_rcpt, second_rcpt = (call for call in calls if call["hook"] == "rcpt")
    assert first_rcpt["args"] == ("one@example.test", {})
    assert first_rcpt["sender"] == "a@example.test"
    assert first_rcpt["recipients"] == []
    assert second_rcpt["recipients"] == ["one@example.test"]

    assert by_hook["data"]["recipients"] == ["one@example.test", "two@example.test"]
    assert by_hook["have_data"]["args"] == (MESSAGE,)

    (results,) = by_hook["queued"]["args"]
    [envelope] = queue.envelopes
    assert results == [(envelope, "queue-id-1")]
    assert by_hook["rset"]["args"] == ()


def test_helo_session(make_edge, smtp):
    validators, calls = recording_validators()
    _, port, queue = make_edge(validator_class=validators)
    client = smtp(port)
    code, _ = client.helo("old.client.test")
    assert code == 250
    client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    helo = calls[1]
    assert helo["hook"] == "helo"
    assert helo["args"] == ("old.client.test",)
    mail = calls[2]
    assert mail["hook"] == "mail"
    assert mail["extended_smtp"] is False
    assert mail["ehlo_as"] == "old.client.test"
    assert mail["protocol"] == "SMTP"
    assert queue.envelopes[0].client["protocol"] == "SMTP"


def test_banner_rewritten(make_edge, raw):
    validators, _ = recording_validators(banner=set_reply("220", "welcome to the test"))
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    text = client.expect(BANNER)
    assert text == "welcome to the test"


def test_banner_refusal_leaves_session_unusable(make_edge, raw):
    validators, _ = recording_validators(banner=set_reply("554", "5.7.1 go away"))
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    assert client.read_reply() == ("554", "5.7.1 go away")
    client.send(b"EHLO client.test\r\n")
    client.expect(BAD_SEQUENCE)
    client.send(b"QUIT\r\n")
    assert client.read_reply()[0] == "221"


def test_ehlo_refused(make_edge, raw):
    validators, _ = recording_validators(ehlo=set_reply("550", "5.7.1 not you"))
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    client.expect(BANNER)
    client.send(b"EHLO client.test\r\n")
    client.expect(POLICY_REFUSAL)
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    client.expect(BAD_SEQUENCE)


def test_recipient_refused(make_edge, smtp):
    def refuse_some(validators, reply, recipient, params):
        if recipient.startswith("bad"):
            reply.code = "550"
            reply.message = f"5.7.1 Recipient <{recipient}> Not allowed"

    validators, _ = recording_validators(rcpt=refuse_some)
    _, port, queue = make_edge(validator_class=validators)
    client = smtp(port)
    refused = client.sendmail("a@example.test", ["good@example.test", "bad@example.test"], MESSAGE)
    assert refused == {"bad@example.test": (550, b"5.7.1 Recipient <bad@example.test> Not allowed")}
    [envelope] = queue.envelopes
    assert envelope.recipients == ["good@example.test"]


def test_sender_refused(make_edge, smtp):
    validators, _ = recording_validators(mail=set_reply("550", "5.7.1 Sender Not allowed"))
    _, port, queue = make_edge(validator_class=validators)
    client = smtp(port)
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    assert info.value.smtp_code == 550
    assert queue.calls == 0


def test_data_refused(make_edge, raw):
    validators, calls = recording_validators(data=set_reply("550", "5.7.1 no data today"))
    _, port, queue = make_edge(validator_class=validators)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    client.expect(SENDER_OK)
    client.expect(RECIPIENT_OK)
    client.expect(POLICY_REFUSAL)
    # Not in DATA: the next line is a command.
    client.send(b"NOOP\r\n")
    client.expect(OK)
    assert "have_data" not in hooks(calls)
    assert queue.calls == 0


def test_content_refused(make_edge, smtp, reply_is):
    def refuse_spam(validators, reply, data):
        if b"SPAM" in data:
            reply.code = "554"
            reply.message = "5.7.1 Looks like spam"

    validators, calls = recording_validators(have_data=refuse_spam)
    _, port, queue = make_edge(validator_class=validators)
    client = smtp(port)
    client.ehlo("client.test")
    client.mail("a@example.test")
    client.rcpt("b@example.test")
    assert reply_is(client.data(b"Subject: SPAM\r\n\r\nbuy\r\n"), CONTENT_REFUSAL)
    assert "queued" not in hooks(calls)
    assert queue.calls == 0
    # The transaction is over whatever the verdict; a new one works.
    client.mail("a@example.test")
    client.rcpt("b@example.test")
    assert reply_is(client.data(MESSAGE), QUEUED)
    assert len(queue.envelopes) == 1


def test_queued_reply_rewritten(make_edge, smtp, reply_is):
    def mention_id(validators, reply, results):
        reply.message = f"2.6.0 Ok, filed under {results[0][1]}"

    validators, _ = recording_validators(queued=mention_id)
    _, port, _ = make_edge(validator_class=validators)
    client = smtp(port)
    client.ehlo("client.test")
    client.mail("a@example.test")
    client.rcpt("b@example.test")
    reply = client.data(MESSAGE)
    assert reply_is(reply, QUEUED)
    assert reply[1] == b"2.6.0 Ok, filed under queue-id-1"


def test_rset_reply_changed(make_edge, raw):
    validators, calls = recording_validators(rset=set_reply("250", "2.0.0 Flushed"))
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test>\r\nRSET\r\n")
    client.expect(SENDER_OK)
    assert client.expect(OK) == "2.0.0 Flushed"
    rset = calls[-1]
    assert rset["hook"] == "rset"
    # After RSET the transaction is gone: MAIL is in sequence again.
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    client.expect(SENDER_OK)


@pytest.mark.parametrize("hook", ["ehlo", "mail", "rcpt"])
def test_hook_reply_421_closes_the_connection(make_edge, raw, hook):
    validators, calls = recording_validators(**{hook: set_reply("421", "4.7.0 Go away now")})
    edge, port, queue = make_edge(validator_class=validators)
    client = raw(port)
    client.expect(BANNER)
    # Pipelined commands after the one refused with 421 are never answered.
    client.send(
        b"EHLO client.test\r\nMAIL FROM:<a@example.test>\r\n"
        b"RCPT TO:<b@example.test>\r\nDATA\r\nNOOP\r\n"
    )
    while True:
        code, text = client.read_reply()
        if code != "250":
            break
    assert (code, text) == ("421", "4.7.0 Go away now")
    assert client.at_eof()
    assert edge.session_ended.wait(5)
    assert hooks(calls)[-1] == hook
    assert queue.calls == 0
