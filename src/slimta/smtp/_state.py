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

__all__ = ["ALLOWED", "KNOWN_VERBS", "State", "after_success"]


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


_SERVING = frozenset({State.HELLO, State.READY, State.MAIL, State.RCPT})
_GREETED = frozenset({State.READY, State.MAIL, State.RCPT})

#: The states in which each command verb is in sequence.
ALLOWED: dict[str, frozenset[State]] = {
    "EHLO": _SERVING,
    "HELO": _SERVING,
    "MAIL": frozenset({State.READY}),
    "RCPT": frozenset({State.MAIL, State.RCPT}),
    "DATA": frozenset({State.RCPT}),
    "BDAT": frozenset({State.RCPT}),
    "STARTTLS": frozenset({State.READY}),
    "AUTH": frozenset({State.READY}),
    "RSET": _SERVING,
    "NOOP": _SERVING,
    "QUIT": _SERVING | {State.NO_SERVICE},
    "VRFY": _SERVING,
}

#: Verbs with a meaning in the core; anything else is an unknown command.
KNOWN_VERBS = frozenset(ALLOWED)


def after_success(verb: str, state: State) -> State:
    """The state after a positive (2xx/3xx) reply to *verb* in *state*."""
    if verb in ("EHLO", "HELO"):
        return State.READY
    if verb == "MAIL":
        return State.MAIL
    if verb == "RCPT":
        return State.RCPT
    if verb == "DATA":
        return State.DATA
    if verb == "RSET":
        return State.READY if state in _GREETED else state
    return state
