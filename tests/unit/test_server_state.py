"""The server core's transition table (slimta.smtp._state), row by row.

Each row of :data:`TRANSITIONS` has a scenario that drives a real
:class:`ServerConnection` through its public methods (bytes in, replies
decided by the test) into the row's state, makes the row's move, and checks
the state the test expects, written here independently of the table. A
last test runs every scenario with the table function recorded and checks
that together they use every row and nothing else; every (state, move) pair
the table lacks must raise.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import slimta.smtp._server as server_module
from slimta.smtp import _events as ev
from slimta.smtp._errors import LocalProtocolError
from slimta.smtp._server import ServerConnection
from slimta.smtp._state import NEXT, TRANSITIONS, Move, State, next_state
from slimta.smtp.extensions import Extensions

S = State
M = Move


def extensions() -> Extensions:
    ext = Extensions()
    for keyword in ("8BITMIME", "PIPELINING", "CHUNKING", "STARTTLS", "SMTPUTF8"):
        ext.add(keyword)
    ext.add("AUTH", "PLAIN")
    return ext


def send(conn: ServerConnection, data: bytes) -> ev.Event:
    """Feed *data* and return the first event that is not NeedData."""
    conn.receive_data(data)
    event = conn.next_event()
    return event


def answer(conn: ServerConnection, data: bytes, code: int, event_type: type[ev.Event]) -> None:
    event = send(conn, data)
    assert isinstance(event, event_type), event
    conn.respond(code, "ok")


# ----------------------------------------------------- reaching each state
def at_greeting() -> ServerConnection:
    return ServerConnection(extensions())


def at_no_service() -> ServerConnection:
    conn = at_greeting()
    conn.greet(554, "5.3.2 No service")
    return conn


def at_hello() -> ServerConnection:
    conn = at_greeting()
    conn.greet(220, "mx.test ESMTP")
    return conn


def at_ready() -> ServerConnection:
    conn = at_hello()
    answer(conn, b"EHLO client.test\r\n", 250, ev.Ehlo)
    return conn


def at_mail() -> ServerConnection:
    conn = at_ready()
    answer(conn, b"MAIL FROM:<a@example.test>\r\n", 250, ev.MailFrom)
    return conn


def at_rcpt() -> ServerConnection:
    conn = at_mail()
    answer(conn, b"RCPT TO:<b@example.test>\r\n", 250, ev.RcptTo)
    return conn


def at_data() -> ServerConnection:
    conn = at_rcpt()
    answer(conn, b"DATA\r\n", 354, ev.Data)
    assert isinstance(conn.next_event(), ev.NeedData)
    return conn


def at_bdat() -> ServerConnection:
    """In a 10-octet BDAT chunk, none of its octets read yet."""
    conn = at_rcpt()
    event = send(conn, b"BDAT 10\r\n")
    assert event == ev.Data(chunking=True)
    conn.respond(354, "go on")
    assert isinstance(conn.next_event(), ev.NeedData)
    return conn


def at_auth() -> ServerConnection:
    conn = at_ready()
    assert isinstance(send(conn, b"AUTH PLAIN\r\n"), ev.Auth)
    conn.challenge("")
    return conn


def at_verdict() -> ServerConnection:
    """The whole message is in; its reply is due."""
    conn = at_data()
    assert isinstance(send(conn, b"Subject: hi\r\n\r\nhello\r\n.\r\n"), ev.MessageReceived)
    return conn


REACH: dict[State, Callable[[], ServerConnection]] = {
    S.GREETING: at_greeting,
    S.NO_SERVICE: at_no_service,
    S.HELLO: at_hello,
    S.READY: at_ready,
    S.MAIL: at_mail,
    S.RCPT: at_rcpt,
    S.DATA: at_data,
    S.BDAT: at_bdat,
    S.AUTH: at_auth,
}


# -------------------------------------------------------------- the moves
def hello(conn: ServerConnection) -> None:
    answer(conn, b"EHLO again.test\r\n", 250, ev.Ehlo)


def rset(conn: ServerConnection) -> None:
    answer(conn, b"RSET\r\n", 250, ev.Rset)


def noop(conn: ServerConnection) -> None:
    answer(conn, b"NOOP\r\n", 250, ev.Noop)


def quit_221(conn: ServerConnection) -> None:
    answer(conn, b"QUIT\r\n", 221, ev.Quit)


def timeout(conn: ServerConnection) -> None:
    conn.close(421, "4.4.2 Connection timed out")


def end_of_input(conn: ServerConnection) -> None:
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ev.ConnectionClosed)


def chunk(conn: ServerConnection) -> None:
    answer(conn, b"BDAT 3\r\n", 354, ev.Data)


def chunk_end(conn: ServerConnection) -> None:
    assert isinstance(send(conn, b"0123456789"), ev.NeedData)
    assert conn.data_to_send().endswith(b"250 2.0.0 10 octets received\r\n")


def content_end(conn: ServerConnection) -> None:
    assert isinstance(send(conn, b"Subject: hi\r\n\r\nhello\r\n.\r\n"), ev.MessageReceived)


def challenge_again(conn: ServerConnection) -> None:
    assert send(conn, b"dGVzdA==\r\n") == ev.AuthResponse("dGVzdA==")
    conn.challenge("")


def auth_refused(conn: ServerConnection) -> None:
    answer(conn, b"AUTH PLAIN\r\n", 535, ev.Auth)


def auth_response_accepted(conn: ServerConnection) -> None:
    assert send(conn, b"AHVzZXIAcGFzcw==\r\n") == ev.AuthResponse("AHVzZXIAcGFzcw==")
    conn.respond(235, "2.7.0 Authentication successful")


def no_service_answer(conn: ServerConnection) -> None:
    answer(conn, b"QUIT\r\n", 250, ev.Quit)


#: Row -> (how to get to its state, the move, the state expected after it).
SCENARIOS: dict[tuple[State, Move], tuple[Callable[[], ServerConnection], Callable, State]] = {
    (S.GREETING, M.GREET_OPEN): (at_greeting, lambda c: c.greet(220, "hi"), S.HELLO),
    (S.GREETING, M.GREET_REFUSE): (at_greeting, lambda c: c.greet(554, "no"), S.NO_SERVICE),
    (S.GREETING, M.CLOSE): (at_greeting, lambda c: c.greet(421, "busy"), S.CLOSED),
    (S.HELLO, M.HELLO): (at_hello, hello, S.READY),
    (S.READY, M.HELLO): (at_ready, hello, S.READY),
    (S.MAIL, M.HELLO): (at_mail, hello, S.READY),
    (S.RCPT, M.HELLO): (at_rcpt, hello, S.READY),
    (S.READY, M.MAIL): (
        at_ready,
        lambda c: answer(c, b"MAIL FROM:<>\r\n", 250, ev.MailFrom),
        S.MAIL,
    ),
    (S.MAIL, M.RCPT): (
        at_mail,
        lambda c: answer(c, b"RCPT TO:<b@example.test>\r\n", 250, ev.RcptTo),
        S.RCPT,
    ),
    (S.RCPT, M.RCPT): (
        at_rcpt,
        lambda c: answer(c, b"RCPT TO:<c@example.test>\r\n", 250, ev.RcptTo),
        S.RCPT,
    ),
    (S.RCPT, M.DATA): (at_rcpt, lambda c: answer(c, b"DATA\r\n", 354, ev.Data), S.DATA),
    (S.DATA, M.CONTENT_END): (at_data, content_end, S.RCPT),
    (S.RCPT, M.CHUNK): (at_rcpt, chunk, S.BDAT),
    (S.BDAT, M.CHUNK_END): (at_bdat, chunk_end, S.RCPT),
    (S.RCPT, M.VERDICT): (at_verdict, lambda c: c.respond(250, "2.6.0 Queued"), S.READY),
    (S.HELLO, M.RSET): (at_hello, rset, S.HELLO),
    (S.READY, M.RSET): (at_ready, rset, S.READY),
    (S.MAIL, M.RSET): (at_mail, rset, S.READY),
    (S.RCPT, M.RSET): (at_rcpt, rset, S.READY),
    (S.READY, M.TLS): (
        at_ready,
        lambda c: answer(c, b"STARTTLS\r\n", 220, ev.StartTls),
        S.HELLO,
    ),
    (S.READY, M.CHALLENGE): (
        at_ready,
        lambda c: (send(c, b"AUTH PLAIN\r\n"), c.challenge("")),
        S.AUTH,
    ),
    (S.AUTH, M.CHALLENGE): (at_auth, challenge_again, S.AUTH),
    (S.READY, M.AUTH_END): (at_ready, auth_refused, S.READY),
    (S.AUTH, M.AUTH_END): (at_auth, auth_response_accepted, S.READY),
    (S.NO_SERVICE, M.ANSWER): (at_no_service, no_service_answer, S.NO_SERVICE),
    (S.HELLO, M.ANSWER): (at_hello, noop, S.HELLO),
    (S.READY, M.ANSWER): (at_ready, noop, S.READY),
    (S.MAIL, M.ANSWER): (at_mail, noop, S.MAIL),
    (S.RCPT, M.ANSWER): (at_rcpt, noop, S.RCPT),
    (S.NO_SERVICE, M.CLOSE): (at_no_service, quit_221, S.CLOSED),
    (S.HELLO, M.CLOSE): (at_hello, quit_221, S.CLOSED),
    (S.READY, M.CLOSE): (at_ready, quit_221, S.CLOSED),
    (S.MAIL, M.CLOSE): (at_mail, timeout, S.CLOSED),
    (S.RCPT, M.CLOSE): (at_rcpt, quit_221, S.CLOSED),
    (S.DATA, M.CLOSE): (at_data, end_of_input, S.CLOSED),
    (S.BDAT, M.CLOSE): (at_bdat, end_of_input, S.CLOSED),
    (S.AUTH, M.CLOSE): (at_auth, end_of_input, S.CLOSED),
}


class RecordingRow(dict[Move, State]):
    """One state's row of the table, noting every lookup in *moves*."""

    def __init__(self, state: State, moves: list[tuple[State, Move]]) -> None:
        super().__init__(NEXT[state])
        self.state = state
        self.moves = moves

    def __getitem__(self, move: Move) -> State:
        self.moves.append((self.state, move))
        return super().__getitem__(move)

    def __missing__(self, move: Move) -> State:
        return NEXT[self.state][move]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[State, Move]]:
    """Every (state, move) the server core asks the table for."""
    moves: list[tuple[State, Move]] = []
    table = {state: RecordingRow(state, moves) for state in State}
    monkeypatch.setattr(server_module, "NEXT", table)
    return moves


def test_the_index_is_the_table() -> None:
    assert {(state, move): after for state in State for move, after in NEXT[state].items()} == (
        TRANSITIONS
    )


@pytest.mark.parametrize("row", list(SCENARIOS), ids=lambda row: f"{row[0].name}-{row[1].name}")
def test_row(row: tuple[State, Move], recorded: list[tuple[State, Move]]) -> None:
    reach, move, expected = SCENARIOS[row]
    conn = reach()
    assert conn.state is row[0]
    del recorded[:]
    move(conn)
    assert conn.state is expected
    assert row in recorded
    assert TRANSITIONS[row] is expected


def test_scenarios_cover_the_table_exactly(recorded: list[tuple[State, Move]]) -> None:
    for reach, move, _ in SCENARIOS.values():
        move(reach())
    assert set(recorded) == set(TRANSITIONS)
    assert set(SCENARIOS) == set(TRANSITIONS)


REFUSED = [(state, move) for state in State for move in Move if (state, move) not in TRANSITIONS]


@pytest.mark.parametrize("pair", REFUSED, ids=lambda pair: f"{pair[0].name}-{pair[1].name}")
def test_moves_the_table_lacks_raise(pair: tuple[State, Move]) -> None:
    with pytest.raises(LocalProtocolError, match=f"no move {pair[1].name} from state"):
        next_state(*pair)
    with pytest.raises(LocalProtocolError, match=f"no move {pair[1].name} from state"):
        TRANSITIONS[pair]
    with pytest.raises(LocalProtocolError, match=f"no move {pair[1].name} from state"):
        NEXT[pair[0]][pair[1]]


def test_the_core_refuses_a_move_the_table_lacks() -> None:
    # The one mutator consults the table: a move it lacks leaves the state.
    conn = at_mail()
    with pytest.raises(LocalProtocolError, match="no move DATA from state MAIL"):
        conn._move(M.DATA)
    assert conn.state is S.MAIL


def test_closed_is_final() -> None:
    assert all((S.CLOSED, move) not in TRANSITIONS for move in Move)


# --------------------------------- moves refused through the public methods
def test_greet_twice_is_refused() -> None:
    conn = at_hello()
    with pytest.raises(LocalProtocolError):
        conn.greet(220, "again")


def test_respond_without_event_is_refused() -> None:
    conn = at_ready()
    with pytest.raises(LocalProtocolError):
        conn.respond(250, "Ok")


def test_challenge_outside_auth_is_refused() -> None:
    conn = at_ready()
    assert isinstance(send(conn, b"NOOP\r\n"), ev.Noop)
    with pytest.raises(LocalProtocolError):
        conn.challenge("")
    conn.respond(250, "2.0.0 Ok")
    assert conn.state is S.READY


def test_next_event_before_greeting_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        at_greeting().next_event()


def test_next_event_with_a_reply_due_is_refused() -> None:
    conn = at_ready()
    send(conn, b"NOOP\r\n")
    with pytest.raises(LocalProtocolError):
        conn.next_event()


@pytest.mark.parametrize("code", [99, 600, "250", 250.0, True])
def test_invalid_codes_are_refused(code: object) -> None:
    conn = at_ready()
    send(conn, b"NOOP\r\n")
    with pytest.raises(ValueError):
        conn.respond(code, "x")  # type: ignore[arg-type]


# ------------------------------------------- refusals never move the state
@pytest.mark.parametrize(
    ("reach", "line", "event_type"),
    [
        (at_hello, b"EHLO x\r\n", ev.Ehlo),
        (at_ready, b"MAIL FROM:<a@b.test>\r\n", ev.MailFrom),
        (at_mail, b"RCPT TO:<a@b.test>\r\n", ev.RcptTo),
        (at_rcpt, b"DATA\r\n", ev.Data),
        (at_rcpt, b"RSET\r\n", ev.Rset),
        (at_ready, b"STARTTLS\r\n", ev.StartTls),
    ],
)
def test_refusal_keeps_the_state(
    reach: Callable[[], ServerConnection], line: bytes, event_type: type[ev.Event]
) -> None:
    conn = reach()
    before = conn.state
    answer(conn, line, 550, event_type)
    assert conn.state is before


def test_unknown_verbs_get_the_cores_suggested_reply() -> None:
    conn = at_ready()
    assert send(conn, b"EXPN list\r\n") == ev.UnknownCommand(
        "EXPN", "list", 502, "5.5.1 Command not implemented"
    )
    conn.respond(502, "5.5.1 Command not implemented")
    assert send(conn, b"XFOO\r\n") == ev.UnknownCommand(
        "XFOO", None, 500, "5.5.1 Command unrecognized"
    )


def test_too_big_is_one_reply_for_data_and_bdat() -> None:
    ext = extensions()
    ext.add("SIZE", 10)
    replies = []
    for content in (b"DATA\r\n", b"BDAT 20 LAST\r\n"):
        conn = ServerConnection(ext)
        conn.greet(220, "hi")
        for line, event_type in (
            (b"EHLO c\r\n", ev.Ehlo),
            (b"MAIL FROM:<a@b.test>\r\n", ev.MailFrom),
            (b"RCPT TO:<a@b.test>\r\n", ev.RcptTo),
        ):
            answer(conn, line, 250, event_type)
        assert isinstance(send(conn, content), ev.Data)
        conn.respond(354, "go on")
        conn.data_to_send()
        conn.receive_data(b"x" * 20 + (b"\r\n.\r\n" if content == b"DATA\r\n" else b""))
        event = conn.next_event()
        if isinstance(event, ev.MessageRefused):
            assert event.too_big
            conn.respond(event.code, event.message)
        replies.append(conn.data_to_send())
    assert replies[0] == replies[1] == b"552 5.3.4 Message exceeded size limit\r\n"
