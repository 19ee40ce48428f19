"""The client core's state table, row by row, through the public methods.

The expected moves are written out here, apart from the table they check
(:data:`SENDS` and :data:`REPLY_CHANGES`): every row of
:data:`~slimta.smtp._client_state.TRANSITIONS` is driven by a scenario on a
real :class:`~slimta.smtp._client.ClientConnection`, every key the table
lacks must raise :class:`~slimta.smtp._errors.LocalProtocolError`, and a
hypothesis property runs whole relay-like sessions, pipelined or not, with
the replies arriving in arbitrary pieces.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimta.smtp._client import ClientConnection
from slimta.smtp._client_state import (
    BANNER,
    BDAT_LAST,
    OTHER,
    R2,
    R3,
    R4,
    R5,
    R220,
    R221,
    R334,
    R354,
    R421,
    REPLY_CLASS,
    SEND_DATA,
    SENT,
    START_TLS,
    TRANSITIONS,
    UNSOLICITED,
    VERBS,
    State,
    next_state,
)
from slimta.smtp._errors import LocalProtocolError
from slimta.smtp.extensions import Extensions

CONNECTED = State.CONNECTED
BANNER_ST = State.BANNER
HELLO = State.HELLO
READY = State.READY
MAIL = State.MAIL
RCPT = State.RCPT
DATA = State.DATA
AUTH = State.AUTH
TLS = State.TLS
CLOSED = State.CLOSED

Key = tuple[State, bytes, int]

# ------------------------------------------------------------ the spec
#: A code for each reply class.
CODE = {R2: 250, R220: 220, R221: 221, R3: 350, R334: 334, R354: 354, R4: 450, R421: 421, R5: 550}
REPLIES = tuple(CODE)
EVENTS = (SENT, *REPLIES)
POSITIVE = (R2, R220, R3, R334, R354)
NOT_CLOSING = (*POSITIVE, R4, R5)

COMMANDS = (
    b"EHLO",
    b"HELO",
    b"LHLO",
    b"MAIL",
    b"RCPT",
    b"DATA",
    b"BDAT",
    BDAT_LAST,
    b"RSET",
    b"QUIT",
    b"STARTTLS",
    b"AUTH",
    OTHER,
)
#: States in which any command may go, pipelined or not.
OPEN = (BANNER_ST, HELLO, READY, MAIL, RCPT)
#: States a reply moves out of by REPLY_CHANGES (DATA, AUTH, CLOSED have rules of their own).
COMMAND_STATES = (HELLO, READY, MAIL, RCPT)
#: States a reply to a command (or to the data) may arrive in.
ANSWERED = (*COMMAND_STATES, DATA, AUTH, CLOSED)

#: ``(state, verb) -> state after``: what may be sent (or awaited) where.
SENDS: dict[tuple[State, bytes], State] = {
    # A send before the banner is awaited: the caller read it elsewhere.
    **{(CONNECTED, verb): HELLO for verb in COMMANDS},
    **{(state, verb): state for state in OPEN for verb in COMMANDS},
    (AUTH, b"AUTH"): AUTH,
    (CONNECTED, BANNER): BANNER_ST,
    (CONNECTED, SEND_DATA): HELLO,
    (DATA, SEND_DATA): READY,
    (CONNECTED, START_TLS): CONNECTED,
    (TLS, START_TLS): HELLO,
}

#: ``(verbs, classes, from states, to)``: the replies that move the session
#: out of a state of COMMAND_STATES; any other leaves it where it is, but
#: for 221 and 421, which close it.
REPLY_CHANGES: list[tuple[tuple[bytes, ...], tuple[int, ...], tuple[State, ...], State]] = [
    ((b"EHLO", b"HELO", b"LHLO"), POSITIVE, COMMAND_STATES, READY),
    ((b"MAIL",), POSITIVE, COMMAND_STATES, MAIL),
    ((b"RCPT",), POSITIVE, (MAIL, RCPT), RCPT),
    ((b"DATA",), (R354,), COMMAND_STATES, DATA),
    ((b"DATA",), POSITIVE, (RCPT,), DATA),
    ((b"RSET", BDAT_LAST), POSITIVE, (MAIL, RCPT), READY),
    ((b"STARTTLS",), (R220,), COMMAND_STATES, TLS),
    ((b"AUTH",), (R334,), COMMAND_STATES, AUTH),
    ((b"QUIT",), NOT_CLOSING, COMMAND_STATES, CLOSED),
]
_CHANGES = {
    (state, verb, event): to
    for verbs, events, states, to in REPLY_CHANGES
    for verb, event, state in itertools.product(verbs, events, states)
}


def expected(key: Key) -> State | None:
    """The state after *key*, or ``None`` where the move must be refused."""
    state, verb, event = key
    if event == SENT:
        return SENDS.get((state, verb))
    if verb == BANNER:
        states: tuple[State, ...] = (BANNER_ST,)
    elif verb == UNSOLICITED:
        states = (CONNECTED, *ANSWERED)
    elif verb in COMMANDS or verb == SEND_DATA:
        states = ANSWERED
    else:
        return None
    if state not in states:
        return None
    if event in (R221, R421) or state is CLOSED:
        return CLOSED
    if verb == BANNER:
        return HELLO
    if state is DATA:
        return DATA
    if state is AUTH:
        if verb == b"AUTH":
            return AUTH if event == R334 else READY
        return AUTH
    return _CHANGES.get(key, state)


ALL_KEYS = list(itertools.product(State, sorted(VERBS), EVENTS))
ROWS = [key for key in ALL_KEYS if expected(key) is not None]
REFUSED = [key for key in ALL_KEYS if expected(key) is None]


def key_id(key: Key) -> str:
    state, verb, event = key
    return f"{state.name}-{verb.decode()}-{'SENT' if event == SENT else CODE[event]}"


# --------------------------------------------------------- the drivers
def feed(conn: ClientConnection, code: int) -> tuple[bytes, int]:
    """Receive one reply with *code*; the command it answers and its code."""
    conn.receive_data(b"%d 2.0.0 text\r\n" % code)
    got = conn.next_reply()
    assert got is not None
    return got[0], got[1].code


def send(conn: ClientConnection, verb: bytes) -> None:
    """This side's move for *verb*, through the public method that makes it."""
    if verb in (BANNER, UNSOLICITED):
        conn.expect(verb)
    elif verb == SEND_DATA:
        conn.send_data(b".\r\n")
    elif verb == START_TLS:
        conn.start_tls()
    elif verb == b"BDAT":
        conn.send_data(b"BDAT 1\r\nx", b"BDAT")
    elif verb == BDAT_LAST:
        conn.send_data(b"BDAT 0 LAST\r\n", b"BDAT")
    elif verb == b"AUTH":
        conn.send_line(b"AUTH PLAIN AHUAcA==", b"AUTH")
    elif verb == OTHER:
        conn.send_command(b"NOOP")
    else:
        conn.send_command(verb, b"x" if verb in (b"EHLO", b"HELO", b"LHLO") else None)


def answers(verb: bytes) -> bytes:
    """The command :meth:`next_reply` gives for a reply to *verb*."""
    return b"NOOP" if verb == OTHER else verb


#: From READY, the commands and reply codes that lead to each state.
MOVERS: dict[State, list[tuple[bytes, int]]] = {
    READY: [],
    MAIL: [(b"MAIL", 250)],
    RCPT: [(b"MAIL", 250), (b"RCPT", 250)],
    DATA: [(b"DATA", 354)],
    AUTH: [(b"AUTH", 334)],
    TLS: [(b"STARTTLS", 220)],
    CLOSED: [(OTHER, 421)],
}


def reach(state: State) -> ClientConnection:
    """A connection in *state*, nothing queued, nothing awaited (but the
    banner in BANNER)."""
    conn = ClientConnection()
    if state is not CONNECTED:
        conn.expect(BANNER)
    if state not in (CONNECTED, BANNER_ST):
        feed(conn, 220)
    if state not in (CONNECTED, BANNER_ST, HELLO):
        send(conn, b"EHLO")
        feed(conn, 250)
        for verb, code in MOVERS[state]:
            send(conn, verb)
            assert feed(conn, code)[0] == answers(verb)
    conn.data_to_send()
    assert conn.state is state and conn.waiting == (state is BANNER_ST)
    return conn


def awaiting(state: State, verb: bytes) -> ClientConnection:
    """A connection in *state* whose next reply answers *verb*."""
    if verb == BANNER:
        conn = reach(CONNECTED)
        send(conn, BANNER)
        return conn
    if verb == UNSOLICITED:
        return reach(state)
    if state is HELLO:
        conn = ClientConnection() if verb == SEND_DATA else reach(HELLO)
        send(conn, verb)
        return conn
    movers = MOVERS[state]
    if verb == SEND_DATA:
        # The only way to send the data: after DATA is answered; the movers
        # were pipelined past DATA and are answered after the data is sent.
        conn = reach(RCPT)
        send(conn, b"DATA")
        for mover, _ in movers:
            send(conn, mover)
        assert feed(conn, 354) == (b"DATA", 354)
        send(conn, SEND_DATA)
    else:
        conn = reach(READY)
        for mover, _ in movers:
            send(conn, mover)
        send(conn, verb)
    for mover, code in movers:
        assert feed(conn, code)[0] == answers(mover)
    return conn


# ------------------------------------------------------------ the rows
def test_spec_and_table_have_the_same_rows() -> None:
    # A row added to (or dropped from) the table without its expected move
    # here fails; each row below has its scenario.
    assert set(ROWS) == set(TRANSITIONS)
    assert {key: expected(key) for key in ROWS} == TRANSITIONS


@pytest.mark.parametrize("key", [key for key in ROWS if key[2] == SENT], ids=key_id)
def test_send_row(key: Key) -> None:
    state, verb, _ = key
    conn = reach(state)
    waiting = conn.waiting
    send(conn, verb)
    assert conn.state is expected(key)
    if verb == START_TLS:
        assert conn.waiting == 0
    elif verb == SEND_DATA:
        assert conn.waiting == waiting + 1 and conn.data_to_send() == b".\r\n"
    else:
        assert conn.waiting == waiting + 1


@pytest.mark.parametrize("key", [key for key in ROWS if key[2] != SENT], ids=key_id)
def test_reply_row(key: Key) -> None:
    state, verb, event = key
    conn = awaiting(state, verb)
    assert conn.state is state
    command, code = feed(conn, CODE[event])
    assert (command, REPLY_CLASS[code]) == (answers(verb), event)
    assert conn.state is expected(key)


@pytest.mark.parametrize("key", REFUSED, ids=key_id)
def test_refused_move(key: Key) -> None:
    state, verb, event = key
    if event == SENT:
        conn = reach(state)
        with pytest.raises(LocalProtocolError):
            send(conn, verb)
        # Nothing queued, nothing awaited, nothing moved.
        assert conn.data_to_send() == b""
        assert conn.waiting == (state is BANNER_ST) and conn.state is state
    else:
        if state is TLS:
            # Bytes after the 220 to STARTTLS are never parsed (whatever
            # was pipelined past STARTTLS): start_tls() drops them.
            conn = reach(READY)
            send(conn, b"STARTTLS")
            send(conn, b"RSET")
            assert feed(conn, 220) == (b"STARTTLS", 220) and conn.state is TLS
            conn.receive_data(b"%d injected\r\n" % CODE[event])
            assert conn.next_reply() is None
            assert conn.start_tls() == b"%d injected\r\n" % CODE[event]
            assert conn.state is HELLO and conn.waiting == 0
        # Otherwise no sequence of public calls leads there: a reply to the
        # banner anywhere but first, to a command before the banner is
        # awaited, to start_tls().
        with pytest.raises(LocalProtocolError):
            next_state(state, verb, event)


# ------------------------------------------------- around the table
def test_reply_classes() -> None:
    special = {220: R220, 221: R221, 334: R334, 354: R354, 421: R421}
    by_digit = {2: R2, 3: R3, 4: R4, 5: R5}
    for code in range(200, 560):
        assert REPLY_CLASS[code] == special.get(code, by_digit[code // 100]), code


def send_other(conn: ClientConnection, command: bytes) -> None:
    if command.startswith(b"["):
        conn.expect(command)
    else:
        conn.send_command(command)


@pytest.mark.parametrize("state", list(State), ids=lambda state: state.name)
@pytest.mark.parametrize("command", [b"XCUSTOM", b"noop", b"VRFY", b"[TIMEOUT]"])
def test_other_verbs_move_as_other(state: State, command: bytes) -> None:
    # Verbs the table does not name take the rows of OTHER.
    key = (state, OTHER, SENT)
    conn = reach(state)
    if key not in TRANSITIONS:
        with pytest.raises(LocalProtocolError):
            send_other(conn, command)
        return
    send_other(conn, command)
    assert conn.state is TRANSITIONS[key]
    if state in COMMAND_STATES:
        for event in REPLIES:
            assert next_state(state, command.upper(), event) is TRANSITIONS[state, OTHER, event]


def test_state_is_read_only() -> None:
    conn = reach(READY)
    assert not conn.closed
    with pytest.raises(AttributeError):
        conn.state = CLOSED  # type: ignore[misc]
    send(conn, b"QUIT")
    feed(conn, 221)
    assert conn.closed


def test_lmtp_data_draws_one_reply_per_recipient() -> None:
    conn = reach(RCPT)
    send(conn, b"DATA")
    feed(conn, 354)
    conn.send_data(b".\r\n", replies=3)
    assert conn.state is READY and conn.waiting == 3
    conn.receive_data(b"250 ok\r\n550 no\r\n250 ok\r\n")
    assert [command for command, _ in _drain(conn)] == [SEND_DATA] * 3
    # No accepted recipient: no reply, and commands may follow.
    conn = reach(DATA)
    conn.send_data(b".\r\n", replies=0)
    assert conn.state is READY and conn.waiting == 0
    send(conn, b"RSET")


def _drain(conn: ClientConnection) -> Iterator[tuple[bytes, int]]:
    while (got := conn.next_reply()) is not None:
        yield got[0], got[1].code


# ---------------------------------------------------------- the property
OK, TEMPFAIL, PERMFAIL = 250, 451, 554


@st.composite
def transactions(draw: st.DrawFn) -> dict[str, object]:
    rcpts = draw(st.lists(st.sampled_from([250, 251, 450, 550]), min_size=1, max_size=4))
    return {
        "mail": draw(st.sampled_from([250, 451, 550])),
        "rcpts": rcpts,
        "data": draw(st.sampled_from([354, 354, 354, 250, 350, 451, 554])),
        "final": draw(st.sampled_from([OK, OK, TEMPFAIL, PERMFAIL])),
        "lmtp": draw(st.sampled_from([[], [OK, PERMFAIL, OK, TEMPFAIL]])),
        "bdat": draw(st.lists(st.sampled_from([250, 250, 250, 554]), max_size=3)),
        "noop": draw(st.booleans()),
    }


class Session:
    """Drives a ClientConnection as the relays do, against a scripted server
    whose replies reach the client in pieces at arbitrary times."""

    def __init__(self, data: st.DataObject, pipelining: bool) -> None:
        self.data = data
        self.pipelining = pipelining
        ext = Extensions()
        if pipelining:
            ext.add("PIPELINING")
        self.conn = ClientConnection(ext)
        self.sent: list[bytes] = []
        self.inbox = bytearray()
        self.got: list[tuple[bytes, int]] = []

    def arrive(self) -> None:
        # Some of what the server sent reaches the client: any prefix, cut
        # anywhere, parsed as far as it goes.
        size = self.data.draw(st.integers(0, len(self.inbox)))
        self.conn.receive_data(bytes(self.inbox[:size]))
        del self.inbox[:size]
        self.got.extend(_drain(self.conn))

    def command(self, verb: bytes, code: int, arg: bytes | None = None) -> None:
        self.conn.send_command(verb, arg)
        self.inbox += b"%d 2.0.0 reply\r\n" % code
        self.arrive()
        if not self.pipelining or self.conn.ends_group(verb):
            self.sync()

    def sync(self) -> list[int]:
        # End of a group: read every reply awaited.
        self.conn.data_to_send()
        self.conn.receive_data(bytes(self.inbox))
        self.inbox.clear()
        self.got.extend(_drain(self.conn))
        assert self.conn.waiting == 0
        codes = [code for _, code in self.got]
        self.got.clear()
        return codes

    def rset(self) -> None:
        # After a failure, as the relays do: RSET and flush the pipeline.
        self.command(b"RSET", 250)
        self.sync()

    def transaction(self, plan: dict[str, object], lmtp: bool) -> None:
        conn = self.conn
        mail, rcpts = plan["mail"], plan["rcpts"]
        assert isinstance(mail, int) and isinstance(rcpts, list)
        self.command(b"MAIL", mail, b"FROM:<a@example.com>")
        if not self.pipelining and mail >= 400:
            self.rset()
            return
        for code in rcpts:
            self.command(b"RCPT", code, b"TO:<b@example.com>")
        accepted = [code for code in rcpts if code < 400]
        if not self.pipelining and not accepted:
            self.rset()
            return
        bdat = plan["bdat"]
        assert isinstance(bdat, list)
        if bdat and not lmtp:
            self.sync()
            for n, code in enumerate(bdat):
                last = n == len(bdat) - 1
                conn.send_data(b"BDAT 1%s\r\nx" % (b" LAST" if last else b""), b"BDAT")
                self.inbox += b"%d 2.0.0 chunk\r\n" % code
                self.arrive()
            codes = self.sync()
            if any(code >= 400 for code in codes):
                self.rset()
            assert conn.state is READY
            return
        data = plan["data"]
        assert isinstance(data, int)
        self.command(b"DATA", data)
        if mail >= 400 or not accepted:
            if data == 354:
                # RFC 2920 3.1: end the data phase with no message.
                conn.send_data(b".\r\n")
                self.inbox += b"%d 5.5.1 no valid recipients\r\n" % PERMFAIL
                self.sync()
            self.rset()
        elif data >= 400:
            self.rset()
        else:
            final = plan["lmtp"] if lmtp else [plan["final"]]
            assert isinstance(final, list)
            replies = final[: len(accepted)] if lmtp else final
            conn.send_data(b"Subject: t\r\n\r\nbody\r\n.\r\n", replies=len(replies))
            assert conn.state is READY
            for code in replies:
                self.inbox += b"%d 2.0.0 done\r\n" % code
                self.arrive()
            if plan["noop"]:
                # Pipelined after the message data (RFC 2920 3.1).
                conn.send_command(b"NOOP")
                self.inbox += b"250 2.0.0 ok\r\n"
                self.arrive()
            if any(code >= 400 for code in self.sync()):
                self.rset()
        assert conn.state is READY


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    pipelining=st.booleans(),
    lmtp=st.booleans(),
    starttls=st.booleans(),
    auth=st.lists(st.just(334), max_size=2).map(lambda chal: [*chal, 235]),
    plans=st.lists(transactions(), min_size=1, max_size=4),
    timeout_notice=st.booleans(),
)
def test_relay_sessions_never_raise(
    data: st.DataObject,
    pipelining: bool,
    lmtp: bool,
    starttls: bool,
    auth: list[int],
    plans: list[dict[str, object]],
    timeout_notice: bool,
) -> None:
    session = Session(data, pipelining)
    conn = session.conn
    conn.expect(BANNER)
    session.inbox += b"220 mx.test ESMTP\r\n"
    hello = b"LHLO" if lmtp else b"EHLO"
    # The banner may still be on its way when the hello is sent.
    session.command(hello, 250, b"client.test")
    if starttls:
        session.command(b"STARTTLS", 220)
        assert conn.state is TLS
        conn.start_tls()
        session.command(hello, 250, b"client.test")
    conn.send_line(b"AUTH CRAM-MD5", b"AUTH")
    for code in auth:
        session.inbox += b"%d x\r\n" % code
        session.sync()
        if code == 334:
            conn.send_line(b"dXNlciBkaWdlc3Q=", b"AUTH")
    assert conn.state is READY
    for plan in plans:
        session.transaction(plan, lmtp)
    if timeout_notice:
        # A 421 while idle (step 8 of the relay): the session is over.
        conn.receive_data(b"421 4.4.2 timeout\r\n")
        assert next(_drain(conn)) == (UNSOLICITED, 421)
        assert conn.closed
        return
    session.command(b"QUIT", 221)
    assert conn.closed
