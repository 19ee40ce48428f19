"""The server session state machine, written as data.

::

    GREETING --greet 220--> HELLO --EHLO/HELO 250--> READY --MAIL 250--> MAIL
        |                    ^  ^                      ^  ^                |
        |                    |  +----STARTTLS 220------+  |            RCPT 250
     greet other             |                            |                v
        v                    +---RSET (not greeted)       +--- RSET ---- RCPT --DATA 354--> DATA
    NO_SERVICE                                            +-- end of DATA / BDAT LAST ------+

Any state --221/421 or too many errors or end of input--> CLOSED.
``AUTH`` and ``BDAT`` run as sub-steps of READY and RCPT (:class:`State.AUTH`,
:class:`State.BDAT`). :data:`ALLOWED` answers "is this verb allowed now?";
:func:`after_success` gives the state after a positive reply.
"""

from __future__ import annotations

from enum import Enum, auto

__all__ = [
    "ALLOWED",
    "KNOWN_VERBS",
    "ST_AUTH",
    "ST_BDAT",
    "ST_CLOSED",
    "ST_DATA",
    "ST_GREETING",
    "ST_HELLO",
    "ST_MAIL",
    "ST_NO_SERVICE",
    "ST_RCPT",
    "ST_READY",
    "State",
    "after_success",
]


class State(Enum):
    """Where the session is."""

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
    #: Receiving the octets of a BDAT chunk.
    BDAT = auto()
    #: In a SASL exchange started by AUTH.
    AUTH = auto()
    #: The session is over.
    CLOSED = auto()


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

# Tuples, not sets: membership then compares by identity in C, where a set
# would call Enum.__hash__, a Python function, on every command.
_SERVING = (ST_HELLO, ST_READY, ST_MAIL, ST_RCPT)
_GREETED = (ST_READY, ST_MAIL, ST_RCPT)

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


def after_success(verb: str, state: State) -> State:
    """The state after a positive (2xx/3xx) reply to *verb* in *state*."""
    if verb in ("EHLO", "HELO"):
        return ST_READY
    if verb == "MAIL":
        return ST_MAIL
    if verb == "RCPT":
        return ST_RCPT
    if verb == "DATA":
        return ST_DATA
    if verb == "RSET":
        return ST_READY if state in _GREETED else state
    return state
