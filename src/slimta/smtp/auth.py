"""SASL authentication for SMTP (RFC 4954) on top of pysasl 1.x.

:class:`AuthSession` knows which mechanisms a session offers and runs one
SASL exchange; the I/O of each step is passed in as two callables, so the
same code serves the server adapter and tests. Cleartext mechanisms
(PLAIN, LOGIN) are advertised always but refused until the session is
encrypted: pysasl 1.x no longer marks them, so the list is kept here.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pysasl import SASLAuth
from pysasl.exception import AuthenticationError
from pysasl.identity import ClearIdentity
from pysasl.mechanism import ChallengeResponse, ServerChallenge

from slimta.smtp import SmtpError
from slimta.smtp.reply import Reply

__all__ = ["AuthSession", "ServerAuthError"]

#: Mechanisms that send the secret in the clear: refused without TLS.
CLEARTEXT_MECHANISMS = frozenset({b"PLAIN", b"LOGIN"})
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
    """The AUTH capability of one SMTP session.

    :param auth: a :class:`pysasl.SASLAuth`.
    :param io: the session's IO (kept for the 4.0 interface).
    :param encrypted: a callable telling whether the session is under TLS.
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
