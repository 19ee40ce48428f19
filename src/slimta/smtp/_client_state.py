"""The client session state machine, written as data.

::

    CONNECTED --expect [BANNER]--> BANNER --any reply--> HELLO --EHLO/HELO/LHLO 2xx/3xx--> READY

    READY --MAIL 2xx/3xx--> MAIL --RCPT 2xx/3xx--> RCPT --DATA 2xx/3xx--> DATA
      ^                      |                      |                      |
      +---RSET 2xx/3xx, BDAT LAST 2xx/3xx-----------+                      |
      +---message data sent (send_data)------------------------------------+

    READY --STARTTLS 220--> TLS --start_tls()--> HELLO
    READY --AUTH 334--> AUTH --another reply to AUTH--> READY
    HELLO, READY, MAIL --DATA 354--> DATA (RFC 2920 3.1: the data is then empty)
    CONNECTED --any other send: the caller read the greeting itself--> HELLO
    CONNECTED --start_tls() (implicit TLS, RFC 8314)--> CONNECTED
    Every state but TLS --221, 421, any reply to QUIT--> CLOSED

Replies to EHLO, MAIL, STARTTLS and AUTH move the session alike from HELLO,
READY, MAIL and RCPT; a refusal (4xx, 5xx) leaves it where it is, except
where the exchange it answers is over anyway (AUTH after a challenge).

The client core (:class:`~slimta.smtp._client.ClientConnection`) keeps one
:class:`State`, and :data:`TRANSITIONS` maps ``(state, verb, event)`` to the
next one. The *verb* is the command a reply answers (``b'MAIL'``), one of
the pseudo-commands of the core (``b'[BANNER]'``, ``b'[SEND_DATA]'``...), or
:data:`OTHER` for any verb the table does not name (NOOP, VRFY, custom
commands). The *event* is either :data:`SENT`, this side's move (a command
sent, a reply awaited with ``expect``, message data sent, TLS started), or
the class of the reply received (:data:`REPLY_CLASS`). :func:`next_state`
applies one row and raises :class:`~slimta.smtp._errors.LocalProtocolError`
on a key the table lacks. The core changes its state nowhere else.

What may be sent is checked against the state the replies confirmed, and
pipelining (RFC 2920) sends MAIL, RCPT and DATA before MAIL is answered;
so sending is refused only where it would corrupt the session: anything
but the message data once DATA is answered (DATA), anything but SASL lines
during an AUTH exchange (AUTH), anything but ``start_tls()`` after the 220
to STARTTLS (TLS), anything after CLOSED, the message data anywhere but
in DATA (its lines would be read as commands; CONNECTED knows nothing
either way), and the banner awaited anywhere but first. Replies are the
peer's doing and are never refused: every state a reply can arrive in has
a row for each verb and class (TLS has none: bytes read after the 220 are
dropped by ``start_tls()``, never parsed).
"""

from __future__ import annotations

from enum import Enum, auto

from slimta.smtp._errors import LocalProtocolError

__all__ = [
    "BANNER",
    "BDAT_LAST",
    "OTHER",
    "R2",
    "R3",
    "R4",
    "R5",
    "R220",
    "R221",
    "R334",
    "R354",
    "R421",
    "REPLY_CLASS",
    "SEND_DATA",
    "SENT",
    "START_TLS",
    "TRANSITIONS",
    "UNSOLICITED",
    "VERBS",
    "State",
    "next_state",
]


class State(Enum):
    """Where the client session is, as far as the replies so far tell."""

    # Members are singletons: identity hashing is right, and it keeps the
    # (state, verb, event) lookups in C instead of Enum's Python __hash__.
    __hash__ = object.__hash__

    #: Nothing exchanged yet; the greeting is not awaited.
    CONNECTED = auto()
    #: The greeting is awaited (``expect(b'[BANNER]')``).
    BANNER = auto()
    #: Greeted; no EHLO, HELO or LHLO accepted yet.
    HELLO = auto()
    #: A hello accepted; no mail transaction open.
    READY = auto()
    #: MAIL accepted, no recipient yet.
    MAIL = auto()
    #: At least one recipient accepted.
    RCPT = auto()
    #: DATA answered: only the message data may be sent.
    DATA = auto()
    #: A 334 challenge to AUTH: only SASL response lines may be sent.
    AUTH = auto()
    #: 220 to STARTTLS: nothing may be sent or parsed until ``start_tls()``.
    TLS = auto()
    #: 221 or 421 received, or QUIT answered: nothing more may be sent.
    CLOSED = auto()


# Plain module names for the members: Enum attribute lookups are slow on hot paths.
ST_CONNECTED = State.CONNECTED
ST_BANNER = State.BANNER
ST_HELLO = State.HELLO
ST_READY = State.READY
ST_MAIL = State.MAIL
ST_RCPT = State.RCPT
ST_DATA = State.DATA
ST_AUTH = State.AUTH
ST_TLS = State.TLS
ST_CLOSED = State.CLOSED

# ------------------------------------------------------------------- events
#: The event of this side's own moves: a send, an ``expect``, ``start_tls()``.
SENT = 0
# Reply classes: ints (hashed and compared in C), one per reply that moves
# the state differently; the rest go by their first digit.
#: Another 2xx.
R2 = 2
#: Another 3xx.
R3 = 3
#: Another 4xx.
R4 = 4
#: A 5xx.
R5 = 5
#: 220: STARTTLS may begin (RFC 3207 4).
R220 = 220
#: 221: the server closes the connection (RFC 5321 4.2.3).
R221 = 221
#: 334: a SASL challenge (RFC 4954 4).
R334 = 334
#: 354: the message data may be sent (RFC 5321 4.3.2).
R354 = 354
#: 421: the server is shutting the connection down (RFC 5321 3.8).
R421 = 421
#: The event of each reply code, by index (the parser takes codes 200-559).
REPLY_CLASS: tuple[int, ...] = tuple(
    code if code in (R220, R221, R334, R354, R421) else code // 100 for code in range(560)
)
_REPLIES = (R2, R220, R221, R3, R334, R354, R4, R421, R5)
_POSITIVE = frozenset({R2, R220, R3, R334, R354})
_CLOSING = frozenset({R221, R421})

# -------------------------------------------------------------------- verbs
#: The reply nothing was awaited for (a timeout notice, say).
UNSOLICITED = b"[UNSOLICITED]"
#: The server's greeting.
BANNER = b"[BANNER]"
#: The message data after DATA, ended by ``CRLF . CRLF``.
SEND_DATA = b"[SEND_DATA]"
#: The last BDAT chunk (RFC 3030 2): its reply ends the transaction.
BDAT_LAST = b"BDAT LAST"
#: ``start_tls()``: TLS starts on the connection.
START_TLS = b"[TLS]"
#: Any verb the table does not name: NOOP, VRFY, HELP, custom commands.
OTHER = b"[OTHER]"
_HELLOS = (b"EHLO", b"HELO", b"LHLO")
#: Command verbs; each may be sent wherever any command may.
_COMMANDS = (
    *_HELLOS,
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
#: Every verb the table names.
VERBS = frozenset({*_COMMANDS, UNSOLICITED, BANNER, SEND_DATA, START_TLS})

# ------------------------------------------------------------------- table
#: States in which any command may be sent: the replies so far say nothing
#: that forbids it, and a pipelined group must not be refused.
_OPEN = (ST_BANNER, ST_HELLO, ST_READY, ST_MAIL, ST_RCPT)
#: States a reply to a command (or to the data) can arrive in. A command is
#: sent in a state of _OPEN (BANNER and CONNECTED are left before its reply
#: arrives), and the replies before its own may lead anywhere but back.
_ANSWERED = (ST_HELLO, ST_READY, ST_MAIL, ST_RCPT, ST_DATA, ST_AUTH, ST_CLOSED)
_TRANSACTION = (ST_MAIL, ST_RCPT)


def _after_reply(state: State, verb: bytes, event: int) -> State:
    """The rule behind every reply row of :data:`TRANSITIONS`."""
    if event in _CLOSING or state is ST_CLOSED:
        return ST_CLOSED
    if state is ST_DATA:
        # The server reads lines as message data until the end marker,
        # whatever a (misordered) reply claims.
        return ST_DATA
    positive = event in _POSITIVE
    if state is ST_AUTH:
        # RFC 4954 4: the exchange goes on while the server sends 334.
        if verb == b"AUTH":
            return ST_AUTH if event == R334 else ST_READY
        return ST_AUTH
    if verb == BANNER:
        return ST_HELLO
    if verb == b"QUIT":
        return ST_CLOSED
    if verb in _HELLOS:
        # A hello ends any transaction (RFC 5321 4.1.4).
        return ST_READY if positive else state
    if verb == b"MAIL":
        return ST_MAIL if positive else state
    if verb == b"RCPT":
        # A recipient accepted after a refused MAIL (pipelined) opens nothing.
        return ST_RCPT if positive and state in _TRANSACTION else state
    if verb == b"DATA":
        # The data goes when DATA is not refused and a recipient was
        # accepted, as the 4.0 relays do; after 354 it must go even with no
        # recipient, and is then empty (RFC 2920 3.1).
        if event == R354 or (positive and state is ST_RCPT):
            return ST_DATA
        return state
    if verb in (b"RSET", BDAT_LAST):
        # BDAT LAST's reply is the transaction's last (RFC 3030 2).
        return ST_READY if positive and state in _TRANSACTION else state
    if verb == b"STARTTLS":
        return ST_TLS if event == R220 else state
    if verb == b"AUTH":
        return ST_AUTH if event == R334 else state
    # BDAT, [SEND_DATA] (sending it left DATA), [UNSOLICITED], OTHER.
    return state


def _build() -> dict[tuple[State, bytes, int], State]:
    table: dict[tuple[State, bytes, int], State] = {}
    # This side's moves.
    for verb in _COMMANDS:
        # A command before the greeting is awaited: the caller read it.
        table[ST_CONNECTED, verb, SENT] = ST_HELLO
        for state in _OPEN:
            table[state, verb, SENT] = state
    table[ST_AUTH, b"AUTH", SENT] = ST_AUTH
    table[ST_CONNECTED, BANNER, SENT] = ST_BANNER
    # The data goes in DATA; CONNECTED knows nothing that forbids it.
    table[ST_CONNECTED, SEND_DATA, SENT] = ST_HELLO
    table[ST_DATA, SEND_DATA, SENT] = ST_READY
    table[ST_CONNECTED, START_TLS, SENT] = ST_CONNECTED
    # RFC 3207 4.2: the session starts again, without a new greeting.
    table[ST_TLS, START_TLS, SENT] = ST_HELLO
    # The peer's moves.
    for event in _REPLIES:
        table[ST_BANNER, BANNER, event] = _after_reply(ST_BANNER, BANNER, event)
        for state in (ST_CONNECTED, *_ANSWERED):
            table[state, UNSOLICITED, event] = _after_reply(state, UNSOLICITED, event)
        for verb in (*_COMMANDS, SEND_DATA):
            for state in _ANSWERED:
                table[state, verb, event] = _after_reply(state, verb, event)
    return table


#: ``(state, verb, event) -> next state``; see the module docstring.
TRANSITIONS: dict[tuple[State, bytes, int], State] = _build()


def next_state(state: State, verb: bytes, event: int) -> State:
    """The state after *event* (:data:`SENT` or a reply class) for *verb*.

    A verb the table does not name moves as :data:`OTHER`.

    :raises LocalProtocolError: the table has no such move.
    """
    try:
        return TRANSITIONS[state, verb, event]
    except KeyError:
        pass
    if verb not in VERBS:
        new = TRANSITIONS.get((state, OTHER, event))
        if new is not None:
            return new
    what = "sending" if event == SENT else f"a reply of class {event} to"
    raise LocalProtocolError(f"no move for {what} {verb!r} in state {state.name}")
