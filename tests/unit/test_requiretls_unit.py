"""REQUIRETLS (RFC 8689) without sockets: the server core, the envelope flag
and the ``TLS-Required: No`` header, the bounce, the client's MAIL argument
and the MX relay's choice of exchangers and requirements.

The relay tests give :class:`MxSmtpRelay` fixed MX records, an MTA-STS and a
DANE lookup that answer what each case says, and static relays that record
the requirement they were made for; tests/integration/test_requiretls.py
runs the same rules against real servers.
"""

from __future__ import annotations

import pickle
import ssl
from collections.abc import Callable
from email.message import Message
from typing import Any

import pytest

from slimta.bounce import Bounce
from slimta.envelope import Envelope
from slimta.relay import AttemptResult, PermanentRelayError, RelayError, TransientRelayError
from slimta.relay.smtp.dane import Dane, DaneStatus
from slimta.relay.smtp.mtasts import MtaSts, PolicyFetchError, StsLookup, StsPolicy
from slimta.relay.smtp.mx import MxHost, MxSmtpRelay
from slimta.relay.smtp.static import StaticSmtpRelay
from slimta.relay.smtp.tlspolicy import (
    REQUIRETLS_ESC,
    TlsRequirement,
    TlsResult,
    policy_failure,
    requiretls_failure,
)
from slimta.smtp import _events as ev
from slimta.smtp._client import mail_argument
from slimta.smtp._server import ServerConnection
from slimta.smtp.extensions import Extensions
from slimta.smtp.reply import Reply
from slimta.util.dns import TlsaRecord

REQUIRETLS_NEEDED = ("550", "5.7.30")
POLICY_REFUSED = ("451", "4.7.5")
DOMAIN = "example.test"
MX1 = "mx1.example.test"
MX2 = "mx2.example.test"


def is_(reply: Reply, named: tuple[str, str]) -> bool:
    return reply.code == named[0] and reply.enhanced_status_code == named[1]


# ================================================================ the core
class Session:
    """Drives a :class:`ServerConnection`, answering events with defaults."""

    def __init__(self, *, requiretls: bool = True, encrypted: bool = False) -> None:
        ext = Extensions()
        for keyword in ("8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "STARTTLS"):
            ext.add(keyword)
        if requiretls:
            ext.add("REQUIRETLS")
        self.conn = ServerConnection(ext, encrypted=encrypted)
        self.conn.greet(220, "mx.test ESMTP")
        self.conn.data_to_send()
        self.events: list[ev.Event] = []

    def send(self, line: bytes) -> bytes:
        """Send one command line; the reply bytes it drew."""
        conn = self.conn
        conn.receive_data(line + b"\r\n")
        while True:
            event = conn.next_event()
            if isinstance(event, ev.NeedData | ev.ConnectionClosed):
                return conn.data_to_send()
            self.events.append(event)
            if isinstance(event, ev.Ehlo):
                conn.respond(250, "mx.test Hello")
            elif isinstance(event, ev.StartTls):
                conn.respond(220, "2.0.0 Ready to start TLS")
            elif isinstance(event, ev.MailFrom):
                conn.respond(250, "2.1.0 Sender Ok")
            else:
                conn.respond(250, "2.0.0 Ok")

    def mail_events(self) -> list[ev.MailFrom]:
        return [event for event in self.events if isinstance(event, ev.MailFrom)]


def keywords(ehlo_reply: bytes) -> list[str]:
    """The keywords of a multi-line EHLO reply."""
    return [line[4:].decode() for line in ehlo_reply.split(b"\r\n")[1:] if line]


def test_advertised_only_under_tls() -> None:
    session = Session()
    assert "REQUIRETLS" not in keywords(session.send(b"EHLO client.test"))
    # STARTTLS through the core: the session is encrypted from then on.
    assert session.send(b"STARTTLS").startswith(b"220 ")
    assert session.conn.encrypted
    after = keywords(session.send(b"EHLO client.test"))
    assert "REQUIRETLS" in after and "STARTTLS" not in after


def test_advertised_on_implicit_tls() -> None:
    session = Session(encrypted=True)
    assert "REQUIRETLS" in keywords(session.send(b"EHLO client.test"))


def test_not_advertised_unless_enabled() -> None:
    session = Session(requiretls=False, encrypted=True)
    assert "REQUIRETLS" not in keywords(session.send(b"EHLO client.test"))


def test_mail_parameter_under_tls_reaches_the_event() -> None:
    session = Session(encrypted=True)
    session.send(b"EHLO client.test")
    assert session.send(b"MAIL FROM:<a@origin.test> REQUIRETLS").startswith(b"250 2.1.0")
    (event,) = session.mail_events()
    assert event.address == "a@origin.test"
    assert dict(event.params) == {b"REQUIRETLS": True}


def test_mail_parameter_is_case_insensitive_and_combines() -> None:
    session = Session(encrypted=True)
    session.send(b"EHLO client.test")
    reply = session.send(b"MAIL FROM:<a@origin.test> BODY=8BITMIME requiretls")
    assert reply.startswith(b"250 2.1.0")
    (event,) = session.mail_events()
    assert event.params[b"REQUIRETLS"] is True and event.params[b"BODY"] == b"8BITMIME"


def test_mail_parameter_refused_in_plain_text() -> None:
    session = Session()
    session.send(b"EHLO client.test")
    reply = session.send(b"MAIL FROM:<a@origin.test> REQUIRETLS")
    assert reply == b"530 5.7.10 REQUIRETLS needs a TLS session\r\n"
    assert session.mail_events() == []
    # The transaction was not opened: MAIL may come again.
    assert session.send(b"MAIL FROM:<a@origin.test>").startswith(b"250 2.1.0")


def test_mail_parameter_takes_no_value() -> None:
    session = Session(encrypted=True)
    session.send(b"EHLO client.test")
    reply = session.send(b"MAIL FROM:<a@origin.test> REQUIRETLS=YES")
    assert reply == b"501 5.5.4 REQUIRETLS takes no value\r\n"
    assert session.mail_events() == []


def test_mail_parameter_unknown_when_not_offered() -> None:
    session = Session(requiretls=False, encrypted=True)
    session.send(b"EHLO client.test")
    reply = session.send(b"MAIL FROM:<a@origin.test> REQUIRETLS")
    assert reply == b"555 5.5.4 Unsupported parameter: REQUIRETLS\r\n"


def test_build_string_omits_keywords() -> None:
    ext = Extensions()
    ext.add("PIPELINING")
    ext.add("REQUIRETLS")
    ext.add("SIZE", 100)
    assert ext.build_string("hi") == "hi\r\nPIPELINING\r\nREQUIRETLS\r\nSIZE 100"
    assert ext.build_string("hi", {"REQUIRETLS"}) == "hi\r\nPIPELINING\r\nSIZE 100"


def test_mail_argument() -> None:
    assert mail_argument("a@b.test", requiretls=True) == b"FROM:<a@b.test> REQUIRETLS"
    assert mail_argument("", body="8BITMIME", requiretls=True) == (
        b"FROM:<> BODY=8BITMIME REQUIRETLS"
    )
    assert mail_argument("a@b.test") == b"FROM:<a@b.test>"


# ============================================================ the envelope
def test_envelope_flag_default_copy_and_pickle() -> None:
    env = Envelope("a@origin.test", ["b@example.test"])
    assert env.requiretls is False
    assert "requiretls" not in vars(env)  # old pickles have no such entry
    assert pickle.loads(pickle.dumps(env)).requiretls is False
    env.requiretls = True
    assert pickle.loads(pickle.dumps(env)).requiretls is True
    assert env.copy(["c@example.test"]).requiretls is True


def parsed(data: bytes) -> Envelope:
    env = Envelope("a@origin.test", ["b@example.test"])
    env.parse(data)
    return env


@pytest.mark.parametrize(
    ("header", "optional"),
    [
        (b"TLS-Required: No\r\n", True),
        (b"tls-required: no\r\n", True),
        (b"TLS-Required: NO  \r\n", True),
        (b"TLS-Required:No\r\n", True),  # not the raw form: parsed at once
        (b"TLS-Required:\r\n No\r\n", True),
        (b"TLS-Required: Yes\r\n", False),
        (b"TLS-Required: No thanks\r\n", False),
        (b"TLS-Required: No\r\n thanks\r\n", False),
        (b"X-TLS-Required: No\r\n", False),
        (b"Comment: TLS-Required: No\r\n", False),
        (b"", False),
    ],
)
def test_tls_required_no(header: bytes, optional: bool) -> None:
    data = b"From: a@origin.test\r\n" + header + b"Subject: hi\r\n\r\nTLS-Required: No\r\n"
    env = parsed(data)
    assert env.tls_optional is optional
    # The same answer once the headers are parsed.
    assert env.headers is not None
    assert env.tls_optional is optional


def test_tls_required_no_without_headers() -> None:
    assert Envelope().tls_optional is False
    env = Envelope()
    msg = Message()
    msg["TLS-Required"] = "No"
    env.headers = msg
    assert env.tls_optional is True


def test_requiretls_wins_over_the_header() -> None:
    # RFC 8689 4.1: with the MAIL parameter the header field is ignored.
    env = parsed(b"TLS-Required: No\r\n\r\nbody\r\n")
    env.requiretls = True
    assert env.tls_optional is False


# ================================================================ the bounce
MESSAGE = b"From: a@origin.test\r\nSubject: secret plans\r\n\r\nthe secret body\r\n"


def test_bounce_of_requiretls_message_has_only_headers() -> None:
    env = parsed(MESSAGE)
    env.requiretls = True
    env.dsn_ret = "FULL"  # RFC 8689 5: RET=FULL is not honoured for it
    bounce = Bounce(env, requiretls_failure("mx1 does not offer REQUIRETLS"))
    body = bounce.flatten()[1]
    assert b"Subject: secret plans" in body
    assert b"the secret body" not in body
    assert b"Content-Type: text/rfc822-headers" in body
    assert b"Status: 5.7.30" in body
    assert bounce.requiretls is True
    assert bounce.sender == "" and bounce.recipients == ["a@origin.test"]


def test_bounce_of_other_messages_unchanged() -> None:
    bounce = Bounce(parsed(MESSAGE), Reply("550", "5.1.1 No such user"))
    assert b"the secret body" in bounce.flatten()[1]
    assert bounce.requiretls is False


def test_bounce_factory_keeps_the_flag() -> None:
    env = parsed(MESSAGE)
    env.requiretls = True
    bounce = Bounce.factory(env, Reply("550", "5.1.1 No such user"))
    assert bounce is not None and bounce.requiretls is True
    assert b"the secret body" not in bounce.flatten()[1]


# ============================================================ tlspolicy bits
def test_requiretls_failure_reply() -> None:
    reply = requiretls_failure("mx1 does not offer REQUIRETLS")
    assert is_(reply, REQUIRETLS_NEEDED) and reply.command == b"MAIL"
    assert str(reply) == "550 5.7.30 REQUIRETLS support required: mx1 does not offer REQUIRETLS"
    assert REQUIRETLS_ESC == "5.7.30"


def unverifying() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check(chain: Any) -> None:
    return None


@pytest.mark.parametrize(
    ("requirement", "authenticates"),
    [
        (TlsRequirement("sts", DOMAIN, MX1, ssl.create_default_context(), True), True),
        (TlsRequirement("sts", DOMAIN, MX1, ssl.create_default_context(), False), False),
        (TlsRequirement("sts", DOMAIN, MX1, unverifying(), True), False),
        (TlsRequirement("tlsa", DOMAIN, MX1, unverifying(), True, check), True),
        (TlsRequirement("tlsa", DOMAIN, MX1, unverifying(), True, None), False),
    ],
)
def test_requirement_authenticates(requirement: TlsRequirement, authenticates: bool) -> None:
    assert requirement.authenticates is authenticates


# ============================================================== MX relay
ENFORCE = StsPolicy("enforce", 86400, ("*.example.test",))
TESTING = StsPolicy("testing", 86400, ("*.example.test",))
ONLY_MX2 = StsPolicy("enforce", 86400, (MX2,))
TESTING_ELSEWHERE = StsPolicy("testing", 86400, ("mail.elsewhere.test",))
TLSA = TlsaRecord(3, 1, 1, b"\xab" * 32, 300)
#: One verifying context for every relay (loading the CA store is slow).
CONTEXT = ssl.create_default_context()


class FixedSts(MtaSts):
    """Answers every lookup with one :class:`StsLookup`."""

    def __init__(self, found: StsLookup) -> None:
        super().__init__(fetcher=self.no_fetch)
        self.found = found

    @staticmethod
    def no_fetch(domain: str) -> bytes:
        raise AssertionError("fetched")

    def lookup(self, domain: str) -> StsLookup:
        return self.found


class FixedDane(Dane):
    """Answers each host's lookup from a dict (``none`` by default)."""

    def __init__(self, statuses: dict[str, DaneStatus]) -> None:
        self.statuses = statuses

    def lookup(self, host: str) -> DaneStatus:
        return self.statuses.get(host, DaneStatus("none"))


Behaviour = Callable[[str, Envelope], AttemptResult]


class FakeStatic(StaticSmtpRelay):
    """A static relay that records its attempts and acts as told."""

    def __init__(self, relay: FakeMx, host: str, port: int) -> None:
        super().__init__(host, port, context=CONTEXT)
        self.relay = relay

    def attempt(self, envelope: Envelope, attempts: int) -> AttemptResult:
        requirement = self.client_kwargs.get("tls_requirement")
        self.relay.tried.append((self.host, requirement))
        return self.relay.behaviour(self.host, envelope)


def deliver(host: str, envelope: Envelope) -> AttemptResult:
    return Reply("250", f"2.0.0 delivered to {host}")


class FakeMx(MxSmtpRelay):
    """An MX relay with fixed records and no network at all."""

    def __init__(self, records: list[MxHost], behaviour: Behaviour = deliver, **kw: Any) -> None:
        kw.setdefault("context", CONTEXT)
        super().__init__(**kw)
        self.records = records
        self.behaviour = behaviour
        self.tried: list[tuple[str, TlsRequirement | None]] = []

    def _mx_records(self, domain: str) -> list[MxHost]:
        return list(self.records)

    def new_static_relay(self, destination: str, port: int) -> StaticSmtpRelay:
        return FakeStatic(self, destination, port)


def requiretls_message(tls_required_no: bool = False) -> Envelope:
    extra = b"TLS-Required: No\r\n" if tls_required_no else b""
    env = parsed(b"From: a@origin.test\r\n" + extra + b"\r\nbody\r\n")
    env.recipients = [f"b@{DOMAIN}"]
    env.requiretls = True
    return env


def fails(relay: MxSmtpRelay, env: Envelope, kind: type[RelayError]) -> Reply:
    with pytest.raises(RelayError) as info:
        relay.attempt(env, 0)
    assert type(info.value) is kind or isinstance(info.value, kind)
    return info.value.reply


MXES = [(10, MX1), (20, MX2)]


def test_no_policies_bounce_at_once() -> None:
    relay = FakeMx(MXES)
    reply = fails(relay, requiretls_message(), PermanentRelayError)
    assert is_(reply, REQUIRETLS_NEEDED)
    assert reply.message == (
        "5.7.30 REQUIRETLS support required: "
        f"neither MTA-STS nor DANE can authenticate the MX hosts of {DOMAIN}"
    )
    assert relay.tried == []
    # The same relay delivers other mail as usual.
    env = requiretls_message()
    env.requiretls = False
    assert isinstance(relay.attempt(env, 0), Reply)


def test_enforce_policy_gives_an_authenticating_requirement() -> None:
    relay = FakeMx(MXES, mta_sts=FixedSts(StsLookup(ENFORCE, "1")))
    result = relay.attempt(requiretls_message(), 0)
    assert isinstance(result, Reply) and result.message == f"2.0.0 delivered to {MX1}"
    ((host, requirement),) = relay.tried
    assert host == MX1 and requirement is not None
    assert requirement.policy_type == "sts" and requirement.authenticates
    assert requirement.context is relay.verify_context


def test_testing_policy_is_enforced_for_the_message() -> None:
    relay = FakeMx(MXES, mta_sts=FixedSts(StsLookup(TESTING, "1")))
    relay.attempt(requiretls_message(), 0)
    ((_, requirement),) = relay.tried
    assert requirement is not None and requirement.enforce and requirement.authenticates
    assert requirement.context is relay.verify_context
    # Other mail to the same domain goes as the testing mode says.
    relay.tried.clear()
    env = requiretls_message()
    env.requiretls = False
    relay.attempt(env, 0)
    ((_, other),) = relay.tried
    assert other is not None and not other.enforce


def test_only_hosts_the_policy_lists() -> None:
    relay = FakeMx(MXES, mta_sts=FixedSts(StsLookup(ONLY_MX2, "1")))
    relay.attempt(requiretls_message(), 0)
    assert [host for host, _ in relay.tried] == [MX2]


def test_testing_policy_listing_no_host_bounces() -> None:
    relay = FakeMx(MXES, mta_sts=FixedSts(StsLookup(TESTING_ELSEWHERE, "1")))
    reply = fails(relay, requiretls_message(), PermanentRelayError)
    assert is_(reply, REQUIRETLS_NEEDED) and "no MX host of example.test matches" in str(reply)
    assert relay.tried == []


def test_enforce_policy_listing_no_host_bounces() -> None:
    policy = StsPolicy("enforce", 86400, ("mail.elsewhere.test",))
    relay = FakeMx(MXES, mta_sts=FixedSts(StsLookup(policy, "1")))
    reply = fails(relay, requiretls_message(), PermanentRelayError)
    assert str(reply) == (
        "550 5.7.30 REQUIRETLS support required: "
        f"MTA-STS: no MX host of {DOMAIN} matches its policy"
    )


def test_no_policy_published_without_dane_bounces() -> None:
    relay = FakeMx(MXES, mta_sts=FixedSts(StsLookup(None)))
    reply = fails(relay, requiretls_message(), PermanentRelayError)
    assert is_(reply, REQUIRETLS_NEEDED) and "has no MTA-STS policy" in str(reply)


def test_policy_mode_none_bounces() -> None:
    none = StsPolicy("none", 86400, ())
    relay = FakeMx(MXES, mta_sts=FixedSts(StsLookup(none, "1")))
    assert is_(fails(relay, requiretls_message(), PermanentRelayError), REQUIRETLS_NEEDED)


def test_policy_fetch_failure_is_transient() -> None:
    error = PolicyFetchError("connection refused")
    relay = FakeMx(MXES, mta_sts=FixedSts(StsLookup(None, None, error)))
    reply = fails(relay, requiretls_message(), TransientRelayError)
    assert is_(reply, POLICY_REFUSED) and "connection refused" in str(reply)
    # With DANE too, a host without records waits for the policy as well.
    relay = FakeMx(MXES, mta_sts=FixedSts(StsLookup(None, None, error)), dane=FixedDane({}))
    reply = fails(relay, requiretls_message(), TransientRelayError)
    assert is_(reply, POLICY_REFUSED)
    assert relay.tried == []


def test_dane_usable_records_authenticate() -> None:
    relay = FakeMx(MXES, dane=FixedDane({MX2: DaneStatus("usable", (TLSA,))}))
    result = relay.attempt(requiretls_message(), 0)
    assert isinstance(result, Reply) and result.message == f"2.0.0 delivered to {MX2}"
    ((host, requirement),) = relay.tried
    assert host == MX2 and requirement is not None
    assert requirement.policy_type == "tlsa" and requirement.authenticates


def test_dane_unusable_records_do_not_do() -> None:
    relay = FakeMx([(10, MX1)], dane=FixedDane({MX1: DaneStatus("unusable", (TLSA,))}))
    reply = fails(relay, requiretls_message(), PermanentRelayError)
    assert str(reply) == (
        f"550 5.7.30 REQUIRETLS support required: the TLSA records of {MX1} are all unusable"
    )
    assert relay.tried == []


def test_dane_lookup_failure_is_transient() -> None:
    failed = DaneStatus("failed", result=TlsResult.TLSA_INVALID, reason="TLSA lookup failed")
    relay = FakeMx([(10, MX1)], dane=FixedDane({MX1: failed}))
    reply = fails(relay, requiretls_message(), TransientRelayError)
    assert is_(reply, POLICY_REFUSED) and reply.command == b"[TLSA]"


def refuse_tls(host: str, envelope: Envelope) -> AttemptResult:
    reply = policy_failure("MTA-STS", f"{host} did not offer STARTTLS")
    reply.address = (host, 25)
    raise TransientRelayError("refused", reply)


def no_requiretls(host: str, envelope: Envelope) -> AttemptResult:
    raise PermanentRelayError("no", requiretls_failure(f"{host} does not offer REQUIRETLS"))


def test_tls_failure_on_every_host_is_final() -> None:
    relay = FakeMx(MXES, refuse_tls, mta_sts=FixedSts(StsLookup(ENFORCE, "1")))
    reply = fails(relay, requiretls_message(), PermanentRelayError)
    assert [host for host, _ in relay.tried] == [MX1, MX2]
    assert str(reply) == (
        f"550 5.7.30 REQUIRETLS support required: MTA-STS: {MX2} did not offer STARTTLS"
    )
    assert reply.address == (MX2, 25) and reply.command == b"STARTTLS"
    # The same failures defer other mail (RFC 8461).
    env = requiretls_message()
    env.requiretls = False
    assert is_(fails(relay, env, TransientRelayError), POLICY_REFUSED)


def test_host_without_requiretls_is_skipped() -> None:
    def only_mx2(host: str, envelope: Envelope) -> AttemptResult:
        return no_requiretls(host, envelope) if host == MX1 else deliver(host, envelope)

    relay = FakeMx(MXES, only_mx2, mta_sts=FixedSts(StsLookup(ENFORCE, "1")))
    result = relay.attempt(requiretls_message(), 0)
    assert isinstance(result, Reply) and result.message == f"2.0.0 delivered to {MX2}"
    assert [host for host, _ in relay.tried] == [MX1, MX2]


def test_no_host_offers_requiretls() -> None:
    relay = FakeMx(MXES, no_requiretls, mta_sts=FixedSts(StsLookup(ENFORCE, "1")))
    reply = fails(relay, requiretls_message(), PermanentRelayError)
    assert str(reply).endswith(f"{MX2} does not offer REQUIRETLS")
    assert len(relay.tried) == 2


def test_unreachable_last_host_stays_transient() -> None:
    def unreachable(host: str, envelope: Envelope) -> AttemptResult:
        if host == MX1:
            return no_requiretls(host, envelope)
        raise TransientRelayError("down", Reply("451", "4.3.0 refused", command=b"[CONNECT]"))

    relay = FakeMx(MXES, unreachable, mta_sts=FixedSts(StsLookup(ENFORCE, "1")))
    reply = fails(relay, requiretls_message(), TransientRelayError)
    assert reply.command == b"[CONNECT]"


def test_other_server_refusals_end_the_attempt() -> None:
    def user_unknown(host: str, envelope: Envelope) -> AttemptResult:
        raise PermanentRelayError("no", Reply("550", "5.1.1 No such user", command=b"RCPT"))

    relay = FakeMx(MXES, user_unknown, mta_sts=FixedSts(StsLookup(ENFORCE, "1")))
    reply = fails(relay, requiretls_message(), PermanentRelayError)
    assert str(reply) == "550 5.1.1 No such user" and len(relay.tried) == 1


def test_forced_domain_goes_to_its_destination() -> None:
    # Not found through MX records: the client checks TLS and REQUIRETLS.
    relay = FakeMx(MXES)
    relay.force_mx(DOMAIN, "smarthost.test", 2525)
    result = relay.attempt(requiretls_message(), 0)
    assert isinstance(result, Reply) and relay.tried == [("smarthost.test", None)]


# ========================================================== TLS-Required: No
def test_tls_required_no_skips_the_policies() -> None:
    relay = FakeMx(
        MXES,
        mta_sts=FixedSts(StsLookup(ONLY_MX2, "1")),
        dane=FixedDane({MX1: DaneStatus("usable", (TLSA,))}),
    )
    env = requiretls_message(tls_required_no=True)
    env.requiretls = False
    relay.attempt(env, 0)
    # mx1 first, though the enforce policy does not list it; no requirement.
    assert relay.tried == [(MX1, None)]


def test_tls_required_no_ignored_with_requiretls() -> None:
    relay = FakeMx(MXES, mta_sts=FixedSts(StsLookup(ONLY_MX2, "1")))
    relay.attempt(requiretls_message(tls_required_no=True), 0)
    ((host, requirement),) = relay.tried
    assert host == MX2 and requirement is not None and requirement.authenticates
