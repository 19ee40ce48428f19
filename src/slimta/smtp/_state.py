"""The server session state machine, written as data.

::

    GREETING --GREET_OPEN--> HELLO --HELLO--> READY --MAIL--> MAIL --RCPT--> RCPT
        |                    ^  ^               ^  ^                          |  ^
     GREET_REFUSE            |  +-----TLS-------+  +---------VERDICT---------+  |
        v                    |                                                |  |
    NO_SERVICE            RSET (not greeted)       DATA --CONTENT_END--> RCPT <-+  |
                                                   BDAT --CHUNK_END----> RCPT ----+
    READY --CHALLENGE--> AUTH --AUTH_END--> READY

Every state but CLOSED --CLOSE--> CLOSED (a 221/421 reply, ``close()``,
too many errors, end of input).

Two tables decide everything:

* :data:`ALLOWED` answers "is this command verb in sequence now?"; a verb out
  of sequence is refused on the wire (503) and moves nothing.
* :data:`TRANSITIONS` maps ``(state, move)`` to the next state, where a
  :class:`Move` is what the core or its caller did: a reply of a given kind
  to a given command, a challenge, the end of the message content.
  :func:`next_state` applies it; a move the table lacks raises
  :class:`~slimta.smtp._errors.LocalProtocolError`. The server core changes
  its state nowhere else.
"""

from __future__ import annotations

from enum import Enum, auto

from slimta.smtp._errors import LocalProtocolError

__all__ = [
    "ALLOWED",
    "BANNERED",
    "HAVE_MAIL",
    "HAVE_RCPT",
    "KNOWN_VERBS",
    "NEXT",
    "RECEIVING_CONTENT",
    "TRANSITIONS",
    "Move",
    "State",
    "next_state",
]


class State(Enum):
    """Where the session is."""

    # Members are singletons: identity hashing is right, and it keeps the
    # (state, move) lookups in C instead of Enum's Python-level __hash__.
    __hash__ = object.__hash__

    #: Connected, greeting not sent yet.
    GREETING = auto()
    #: The greeting was not 220: only QUIT is served (RFC 5321 3.1).
    NO_SERVICE = auto()
    #: Waiting for EHLO or HELO.
    HELLO = auto()
    #: Greeted, no mail transaction open.
    READY = auto()
    #: MAIL accepted, no recipient accepted yet.
    MAIL = auto()
    #: At least one recipient accepted.
    RCPT = auto()
    #: Receiving DATA content.
    DATA = auto()
    #: Receiving the octets of an accepted BDAT chunk.
    BDAT = auto()
    #: In a SASL exchange started by AUTH.
    AUTH = auto()
    #: The session is over.
    CLOSED = auto()


class Move(Enum):
    """Something that may change the state: the rows of :data:`TRANSITIONS`."""

    __hash__ = object.__hash__

    #: The greeting was 220.
    GREET_OPEN = auto()
    #: The greeting had another code: the session serves only QUIT.
    GREET_REFUSE = auto()
    #: A positive reply to EHLO or HELO.
    HELLO = auto()
    #: A positive reply to MAIL.
    MAIL = auto()
    #: A positive reply to RCPT.
    RCPT = auto()
    #: A positive reply to DATA: the content follows.
    DATA = auto()
    #: The end of DATA content (``CRLF.CRLF``).
    CONTENT_END = auto()
    #: A BDAT chunk whose octets belong to the message.
    CHUNK = auto()
    #: The last octet of that chunk was read.
    CHUNK_END = auto()
    #: The reply to a complete message (accepted or not).
    VERDICT = auto()
    #: A positive reply to RSET.
    RSET = auto()
    #: 220 to STARTTLS: TLS starts and the session begins again (RFC 3207 4.2).
    TLS = auto()
    #: A 334 SASL challenge.
    CHALLENGE = auto()
    #: The final reply to AUTH, or the core ending the exchange itself.
    AUTH_END = auto()
    #: Any other reply: refusals, NOOP, VRFY, QUIT without 221, other verbs.
    ANSWER = auto()
    #: A 221 or 421 reply, :meth:`close`, too many errors, end of input.
    CLOSE = auto()


# Plain module names for the members: Enum attribute lookups are slow on hot paths.
ST_GREETING = State.GREETING
ST_NO_SERVICE = State.NO_SERVICE
ST_HELLO = State.HELLO
ST_READY = State.READY
ST_MAIL = State.MAIL
ST_RCPT = State.RCPT
ST_DATA = State.DATA
ST_BDAT = State.BDAT
ST_AUTH = State.AUTH
ST_CLOSED = State.CLOSED

MV_GREET_OPEN = Move.GREET_OPEN
MV_GREET_REFUSE = Move.GREET_REFUSE
MV_HELLO = Move.HELLO
MV_MAIL = Move.MAIL
MV_RCPT = Move.RCPT
MV_DATA = Move.DATA
MV_CONTENT_END = Move.CONTENT_END
MV_CHUNK = Move.CHUNK
MV_CHUNK_END = Move.CHUNK_END
MV_VERDICT = Move.VERDICT
MV_RSET = Move.RSET
MV_TLS = Move.TLS
MV_CHALLENGE = Move.CHALLENGE
MV_AUTH_END = Move.AUTH_END
MV_ANSWER = Move.ANSWER
MV_CLOSE = Move.CLOSE

# Tuples, not sets: membership then compares by identity in C.
_SERVING = (ST_HELLO, ST_READY, ST_MAIL, ST_RCPT)

#: The states in which each command verb is in sequence.
ALLOWED: dict[str, tuple[State, ...]] = {
    "EHLO": _SERVING,
    "HELO": _SERVING,
    "MAIL": (ST_READY,),
    "RCPT": (ST_MAIL, ST_RCPT),
    "DATA": (ST_RCPT,),
    "BDAT": (ST_RCPT,),
    "STARTTLS": (ST_READY,),
    "AUTH": (ST_READY,),
    "RSET": _SERVING,
    "NOOP": _SERVING,
    "QUIT": (*_SERVING, ST_NO_SERVICE),
    "VRFY": _SERVING,
}

#: Verbs with a meaning in the core; anything else is an unknown command.
KNOWN_VERBS = frozenset(ALLOWED)


class _Table(dict[tuple[State, Move], State]):
    """The transition table: looking up a move it lacks raises."""

    __slots__ = ()

    def __missing__(self, key: tuple[State, Move]) -> State:
        state, move = key
        raise LocalProtocolError(f"no move {move.name} from state {state.name}")


#: ``(state, move) -> next state``; see the module docstring. Looking up a
#: move it lacks raises :class:`~slimta.smtp._errors.LocalProtocolError`.
TRANSITIONS: dict[tuple[State, Move], State] = _Table(
    {
        (ST_GREETING, MV_GREET_OPEN): ST_HELLO,
        (ST_GREETING, MV_GREET_REFUSE): ST_NO_SERVICE,
        # EHLO/HELO may come again at any time outside a transfer and end the
        # transaction (RFC 5321 4.1.4).
        (ST_HELLO, MV_HELLO): ST_READY,
        (ST_READY, MV_HELLO): ST_READY,
        (ST_MAIL, MV_HELLO): ST_READY,
        (ST_RCPT, MV_HELLO): ST_READY,
        (ST_READY, MV_MAIL): ST_MAIL,
        (ST_MAIL, MV_RCPT): ST_RCPT,
        (ST_RCPT, MV_RCPT): ST_RCPT,
        (ST_RCPT, MV_DATA): ST_DATA,
        (ST_DATA, MV_CONTENT_END): ST_RCPT,
        (ST_RCPT, MV_CHUNK): ST_BDAT,
        (ST_BDAT, MV_CHUNK_END): ST_RCPT,
        (ST_RCPT, MV_VERDICT): ST_READY,
        # RSET before a greeting has nothing to reset.
        (ST_HELLO, MV_RSET): ST_HELLO,
        (ST_READY, MV_RSET): ST_READY,
        (ST_MAIL, MV_RSET): ST_READY,
        (ST_RCPT, MV_RSET): ST_READY,
        (ST_READY, MV_TLS): ST_HELLO,
        (ST_READY, MV_CHALLENGE): ST_AUTH,
        (ST_AUTH, MV_CHALLENGE): ST_AUTH,
        (ST_READY, MV_AUTH_END): ST_READY,
        (ST_AUTH, MV_AUTH_END): ST_READY,
        (ST_NO_SERVICE, MV_ANSWER): ST_NO_SERVICE,
        (ST_HELLO, MV_ANSWER): ST_HELLO,
        (ST_READY, MV_ANSWER): ST_READY,
        (ST_MAIL, MV_ANSWER): ST_MAIL,
        (ST_RCPT, MV_ANSWER): ST_RCPT,
        **{(state, MV_CLOSE): ST_CLOSED for state in State if state is not ST_CLOSED},
    }
)

#: States after a 220 greeting (:attr:`slimta.smtp.server.Server.bannered`).
BANNERED = tuple(state for state in State if state not in (ST_GREETING, ST_NO_SERVICE))
#: States in which message content (DATA, an accepted BDAT chunk) is read.
RECEIVING_CONTENT = (ST_DATA, ST_BDAT)
#: States with a MAIL command accepted.
HAVE_MAIL = (ST_MAIL, ST_RCPT, ST_DATA, ST_BDAT)
#: States with at least one recipient accepted.
HAVE_RCPT = (ST_RCPT, ST_DATA, ST_BDAT)


class _Row(dict[Move, State]):
    """The moves out of one state: an index over :data:`TRANSITIONS`."""

    __slots__ = ("state",)

    def __init__(self, state: State) -> None:
        rows = TRANSITIONS.items()
        super().__init__((move, after) for (before, move), after in rows if before is state)
        self.state = state

    def __missing__(self, move: Move) -> State:
        return TRANSITIONS[self.state, move]


#: ``NEXT[state][move]`` is ``TRANSITIONS[state, move]`` (and raises the
#: same way), without building a tuple key: for the cores' hot paths.
NEXT: dict[State, dict[Move, State]] = {state: _Row(state) for state in State}


def next_state(state: State, move: Move) -> State:
    """The state after *move* in *state*.

    :raises LocalProtocolError: the table has no such move.
    """
    return TRANSITIONS[state, move]
