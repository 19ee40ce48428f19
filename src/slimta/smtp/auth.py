"""SASL authentication for SMTP (RFC 4954) on top of pysasl 1.x.

:class:`AuthSession` knows which mechanisms a session offers and runs one
SASL exchange, on the server side (:meth:`~AuthSession.server_attempt`) or
the client side (:meth:`~AuthSession.client_attempt`); the I/O of each step
is passed in as a callable, so the same code serves the adapters and tests.
Cleartext mechanisms (PLAIN, LOGIN) are advertised always but refused until
the session is encrypted, on both sides: pysasl 1.x no longer marks them, so
the list is kept in the core (:data:`~slimta.smtp._client.CLEARTEXT_MECHANISMS`).

Secrets never reach a log: AUTH lines a client sends are written to the
socket directly and logged with their SASL data masked.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pysasl import SASLAuth
from pysasl.creds.client import ClientCredentials
from pysasl.exception import AuthenticationError
from pysasl.identity import ClearIdentity
from pysasl.mechanism import ChallengeResponse, ServerChallenge

from slimta.logging import getSocketLogger
from slimta.smtp import RemoteProtocolError, SmtpError
from slimta.smtp._client import (
    CLEARTEXT_MECHANISMS,
    CLIENT_MECHANISMS,
    SASL_CANCEL,
    auth_argument,
    decode_challenge,
    encode_response,
)
from slimta.smtp._sockio import send_or_lost
from slimta.smtp.reply import Reply

__all__ = ["AuthSession", "ServerAuthError"]

log = getSocketLogger(__name__)
#: Mechanisms whose first message comes from the server (no initial response).
SERVER_FIRST_MECHANISMS = frozenset({b"CRAM-MD5"})
#: What ``auth=True`` offers.
DEFAULT_MECHANISMS = (b"CRAM-MD5", b"LOGIN", b"PLAIN")


class ServerAuthError(SmtpError):
    """An AUTH exchange failed; :attr:`reply` is what the client is told."""

    def __init__(self, msg: str, reply: Reply) -> None:
        super().__init__(msg)
        #: The reply to send.
        self.reply = reply


class InvalidAuthString(ServerAuthError):
    """A response was not valid base64, or not what the mechanism expects."""

    def __init__(self) -> None:
        super().__init__(
            "Invalid authentication string", Reply("501", "5.5.2 Invalid authentication string")
        )


class InsecureMechanismError(ServerAuthError):
    """A cleartext mechanism was asked for on an unencrypted session."""

    def __init__(self) -> None:
        reply = Reply("538", "5.7.11 Encryption required for requested authentication mechanism")
        super().__init__("Insecure authentication mechanism requires TLS", reply)


class InvalidMechanismError(ServerAuthError):
    """The mechanism is not offered."""

    def __init__(self) -> None:
        super().__init__(
            "Invalid authentication mechanism",
            Reply("504", "5.5.4 Invalid authentication mechanism"),
        )


class AuthenticationCanceled(ServerAuthError):
    """The client answered a challenge with ``*`` (RFC 4954 4)."""

    def __init__(self) -> None:
        super().__init__(
            "Authentication canceled by client",
            Reply("501", "5.0.0 Authentication canceled by client"),
        )


class InitialResponseRefused(ServerAuthError):
    """An initial response was sent for a mechanism where the server starts."""

    def __init__(self) -> None:
        reply = Reply("501", "5.7.0 Initial response not allowed for this mechanism")
        super().__init__("Initial response not allowed", reply)


class UnexpectedAuthError(ServerAuthError):
    """pysasl refused the exchange."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(
            str(exc) or type(exc).__name__, Reply("501", "5.5.2 Invalid authentication string")
        )


class Credentials:
    """The result of a SASL exchange, as handed to ``handle_auth``.

    It wraps pysasl's credentials: :attr:`authcid`, :attr:`authzid`,
    :meth:`verify` (pysasl 1.x) and the 4.0 :meth:`check_secret`.
    """

    __slots__ = ("_creds", "mechanism")

    def __init__(self, creds: Any, mechanism: bytes) -> None:
        self._creds = creds
        #: The mechanism name used, e.g. ``b'PLAIN'``.
        self.mechanism = mechanism

    @property
    def authcid(self) -> str:
        """The authentication identity (the user name)."""
        return str(self._creds.authcid)

    @property
    def authzid(self) -> str | None:
        """The authorization identity; the authcid when none was given."""
        authzid = self._creds.authzid
        return str(authzid) if authzid is not None else None

    def verify(self, identity: Any) -> bool:
        """Check against a pysasl identity (e.g. ``HashedIdentity``)."""
        return bool(self._creds.verify(identity))

    def check_secret(self, secret: str) -> bool:
        """True when *secret* is the password sent (4.0 interface)."""
        return self.verify(ClearIdentity(self.authcid, secret))

    def __repr__(self) -> str:
        return f"<Credentials authcid={self.authcid!r} mechanism={self.mechanism!r}>"


def build_sasl(auth: bool | Iterable[bytes | str]) -> SASLAuth | None:
    """The pysasl mechanisms for the 4.0 ``auth`` argument."""
    if not auth:
        return None
    if auth is True:
        names: Sequence[bytes] = DEFAULT_MECHANISMS
    else:
        names = [n.encode("ascii") if isinstance(n, str) else n for n in auth]
    return _named(tuple(n.upper() for n in names))


@functools.lru_cache(maxsize=32)
def _named(names: tuple[bytes, ...]) -> SASLAuth:
    # SASLAuth.named() scans the installed packages' entry points, which
    # costs milliseconds: do it once per set of names, not per connection.
    try:
        return SASLAuth.named(list(names))
    except KeyError as exc:
        raise ValueError(f"unknown SASL mechanism: {exc.args[0]!r}") from None


def client_sasl() -> SASLAuth:
    """The pysasl mechanisms an SMTP client runs (PLAIN, LOGIN, CRAM-MD5)."""
    return _named(CLIENT_MECHANISMS)


def decode_response(line: str) -> bytes:
    """Strict base64 (RFC 4954 4): ``=`` is an empty response.

    :raises AuthenticationCanceled: for ``*``.
    :raises InvalidAuthString: for anything not base64.
    """
    if line == "*":
        raise AuthenticationCanceled()
    if line == "=":
        return b""
    try:
        return base64.b64decode(line.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidAuthString() from None


class AuthSession:
    """The AUTH capability of one SMTP session, server or client side.

    :param auth: a :class:`pysasl.SASLAuth`; a client uses
        :func:`client_sasl`.
    :param io: the session's IO (the 4.0 interface): :meth:`client_attempt`
        reads and writes it when given no ``exchange``.
    :param encrypted: a callable telling whether the session is under TLS;
        by default, whether *io* is.
    """

    def __init__(
        self, auth: SASLAuth, io: Any = None, encrypted: Callable[[], bool] | None = None
    ) -> None:
        self.auth = auth
        self.io = io
        self._encrypted = encrypted or (lambda: bool(getattr(io, "encrypted", False)))

    @property
    def server_mechanisms(self) -> list[Any]:
        """Every mechanism offered, cleartext ones included."""
        return list(self.auth.server_mechanisms)

    @property
    def client_mechanisms(self) -> list[Any]:
        """The mechanisms usable now: cleartext ones only under TLS."""
        mechs = self.server_mechanisms
        if self._encrypted():
            return mechs
        return [m for m in mechs if m.name not in CLEARTEXT_MECHANISMS]

    def __str__(self) -> str:
        """The EHLO AUTH parameter: every mechanism, sorted (4.0 behaviour).

        :raises ValueError: when none is offered, which hides AUTH.
        """
        names = sorted(m.name.decode("ascii") for m in self.server_mechanisms)
        if not names:
            raise ValueError("no SASL mechanisms")
        return " ".join(names)

    def server_attempt(
        self,
        mechanism: str,
        initial_response: str | None,
        challenge: Callable[[bytes], str],
    ) -> Credentials:
        """Run one SASL exchange.

        :param mechanism: the name given with AUTH.
        :param initial_response: the base64 text after it, if any.
        :param challenge: sends ``334 <base64 of its argument>`` and returns
            the client's answer line.
        :raises ServerAuthError: with the reply to send on any failure.
        """
        name = mechanism.upper().encode("ascii", "replace")
        mech = self.auth.get_server(name)
        if mech is None:
            raise InvalidMechanismError()
        if name in CLEARTEXT_MECHANISMS and not self._encrypted():
            raise InsecureMechanismError()
        responses: list[ChallengeResponse] = []
        if initial_response is not None and name in SERVER_FIRST_MECHANISMS:
            # RFC 4954 4: the server speaks first here; an answer to no
            # challenge would be a replayable proof of the password.
            raise InitialResponseRefused()
        if initial_response is not None:
            responses.append(ChallengeResponse(b"", decode_response(initial_response)))
        # A bound on round trips: the built-in mechanisms need at most two.
        for _ in range(8):
            try:
                creds, _final = mech.server_attempt(responses)
            except ServerChallenge as chal:
                line = challenge(chal.data)
                responses.append(ChallengeResponse(chal.data, decode_response(line)))
                continue
            except (AuthenticationError, UnicodeDecodeError, ValueError) as exc:
                raise UnexpectedAuthError(exc) from None
            return Credentials(creds, name)
        raise UnexpectedAuthError(ValueError("too many SASL round trips"))

    def client_attempt(
        self,
        authcid: str | bytes,
        secret: str | bytes,
        authzid: str | bytes | None,
        mech_name: str | bytes,
        *,
        exchange: Callable[[bytes], tuple[str, str]] | None = None,
    ) -> Reply:
        """Authenticate to a server: one SASL exchange, client side.

        Sends ``AUTH <mech_name>`` with the initial response pysasl gives
        (PLAIN has one; LOGIN and CRAM-MD5 wait for the server), answers
        every ``334`` challenge through the pysasl mechanism and returns the
        server's final reply. A challenge that is not base64, or that the
        mechanism did not expect, is answered with ``*`` (RFC 4954 4).

        :param authcid: the authentication identity (user name).
        :param secret: the password.
        :param authzid: the identity to act as, or ``None``.
        :param mech_name: the mechanism, e.g. ``b'PLAIN'``.
        :param exchange: sends one line (without CRLF, never logged in the
            clear) and returns the next reply as ``(code, message)``; by
            default the session's :attr:`io` is used.
        :returns: the final reply (``235`` on success), command ``AUTH``.
        :raises InvalidMechanismError: *mech_name* is not one pysasl offers.
        :raises InsecureMechanismError: a cleartext mechanism on an
            unencrypted session; nothing is sent.
        :raises RemoteProtocolError: the server went on challenging after the
            exchange was canceled.

        .. versionchanged:: 4.0
           The mechanisms run through pysasl 1.x; PLAIN and LOGIN are refused
           without TLS.
        """
        name = _text(mech_name).upper().encode("ascii", "replace")
        mech = self.auth.get_client(name)
        if mech is None:
            raise InvalidMechanismError()
        if name in CLEARTEXT_MECHANISMS and not self._encrypted():
            raise InsecureMechanismError()
        send = exchange if exchange is not None else self._io_exchange
        creds = ClientCredentials(
            _text(authcid), _text(secret), _text(authzid) if authzid is not None else None
        )
        # pysasl answers "no challenge yet" with the initial response; it is
        # empty for the mechanisms where the server speaks first (RFC 4954 4).
        challenges: list[ServerChallenge] = []
        initial = mech.client_attempt(creds, challenges).response
        code, message = send(b"AUTH " + auth_argument(name, initial or None))
        canceled = False
        rounds = 0
        while code == "334":
            if canceled:
                # RFC 4954 4: the server must end with 501 after a "*";
                # one that does not leaves the session in an unknown state.
                raise RemoteProtocolError(Reply("421", _NOT_ENDED, command=b"AUTH"))
            rounds += 1
            line = self._answer(mech, creds, challenges, message, rounds)
            canceled = line == SASL_CANCEL
            code, message = send(line)
        return Reply(code, message, command=b"AUTH")

    @staticmethod
    def _answer(
        mech: Any,
        creds: ClientCredentials,
        challenges: list[ServerChallenge],
        text: str,
        rounds: int,
    ) -> bytes:
        # The line answering the challenge in *text*, or SASL_CANCEL.
        data = decode_challenge(text)
        if data is None or rounds > _MAX_CLIENT_ROUNDS:
            return SASL_CANCEL
        challenges.append(ServerChallenge(data))
        try:
            response: bytes = mech.client_attempt(creds, challenges).response
        except (AuthenticationError, ValueError):
            # An unexpected challenge, or a secret SASLprep refuses.
            return SASL_CANCEL
        return encode_response(response)

    def _io_exchange(self, line: bytes) -> tuple[str, str]:
        # The 4.0 way: AuthSession(auth, io) on a client IO.
        io = self.io
        io.flush_send()
        send_secret(io.socket, line + b"\r\n")
        code, message = io.recv_reply()
        return str(code), str(message)


#: Most challenges answered in one exchange before it is canceled; the
#: built-in mechanisms need at most two.
_MAX_CLIENT_ROUNDS = 8
_NOT_ENDED = "4.7.0 Server went on with a canceled AUTH exchange"


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def mask_auth_line(line: bytes) -> bytes:
    """*line* as it may be logged: SASL data replaced by ``********``.

    ``AUTH PLAIN <data>`` keeps its verb and mechanism; a response line is
    masked whole, except a cancel (``*``).
    """
    body = line.rstrip(b"\r\n")
    ending = line[len(body) :]
    if body == SASL_CANCEL:
        return line
    # Base64 has no space: only the command line starts with "AUTH ".
    if body[:5].upper() == b"AUTH ":
        mechanism, _, data = body[5:].partition(b" ")
        return b"AUTH " + mechanism + (b" ********" if data else b"") + ending
    return b"********" + ending


def send_secret(sock: Any, data: bytes) -> None:
    """Send AUTH lines on *sock*, logging them masked (never in the clear).

    :raises ConnectionLost: when the peer reset or closed the connection.
    """
    send_or_lost(sock, data)
    log.send(sock, b"".join(mask_auth_line(line) for line in data.splitlines(keepends=True)))
