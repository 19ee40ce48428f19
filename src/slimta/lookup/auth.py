"""Check SMTP AUTH credentials against password hashes found by a lookup.

A record's ``password`` field holds a salted scrypt hash made by
:func:`hash_password`, in the PHC string format::

    $scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<key>

where *salt* (16 random bytes) and *key* (32 bytes, from
:func:`hashlib.scrypt` of the SASLprep-ed password, UTF-8) are base64
without padding. A record holding anything else, a plain password above
all, never authenticates. Hashing runs in gevent's thread pool (scrypt
releases the GIL), so other sessions go on meanwhile.

The SMTP edge has no hook for a credentials backend: a validator calls
:meth:`LookupAuth.handle_auth` from its own ``handle_auth``::

    users = LookupAuth(SQLite3Lookup('users.db',
        'SELECT password FROM users WHERE name = :address'))

    class Validators(SmtpValidators):
        def handle_auth(self, reply, creds):
            users.handle_auth(reply, creds)

    SmtpEdge(('', 587), queue, validator_class=Validators,
             auth=[b'PLAIN', b'LOGIN'], context=tls_context)

Offer only PLAIN and LOGIN: CRAM-MD5 needs the plain password on the
server, so it always fails here.

.. versionchanged:: 4.0
   Records hold scrypt hashes (4.0 used passlib's LDAP ``{SCHEME}`` hashes);
   the ``user`` field no longer renames the identity.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
from typing import Any, Protocol

import gevent
from pysasl.creds.external import ExternalVerificationRequired
from pysasl.exception import MechanismUnusable
from pysasl.prep import saslprep

from slimta.lookup import LookupFailed
from slimta.lookup.drivers import LookupBase
from slimta.smtp.reply import Reply, invalid_credentials

__all__ = ["HashedSecretIdentity", "LookupAuth", "hash_password"]

_log = logging.getLogger(__name__)

#: Defaults of :func:`hash_password`: N = 2**14 (16 MiB with r = 8) and
#: p = 5, one of OWASP's scrypt settings, about 0.2 s of one core.
DEFAULT_LN = 14
DEFAULT_R = 8
DEFAULT_P = 5
#: Limits on a hash's parameters, so that a bad record cannot make one AUTH
#: take gigabytes: N <= 2**20, r <= 32, p <= 16, and scrypt's memory
#: (128 * r * N bytes) at most 128 MiB, OWASP's largest setting.
_MAX_LN = 20
_MAX_R = 32
_MAX_P = 16
_MAX_MEMORY = 128 * 2**20
_SALT_BYTES = 16
_KEY_BYTES = 32

_HASH = re.compile(
    r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


class _Params:
    """The parsed fields of a hash string."""

    __slots__ = ("key", "ln", "p", "r", "salt")

    def __init__(self, ln: int, r: int, p: int, salt: bytes, key: bytes) -> None:
        self.ln = ln
        self.r = r
        self.p = p
        self.salt = salt
        self.key = key

    @classmethod
    def parse(cls, text: object) -> _Params | None:
        if not isinstance(text, str):
            return None
        match = _HASH.fullmatch(text)
        if match is None:
            return None
        ln, r, p = (int(match.group(i)) for i in (1, 2, 3))
        if not _in_range(ln, r, p):
            return None
        try:
            salt, key = _unb64(match.group(4)), _unb64(match.group(5))
        except (binascii.Error, ValueError):
            return None
        if len(salt) < 8 or len(key) < 16:
            return None
        return cls(ln, r, p, salt, key)

    def derive(self, secret: bytes) -> bytes:
        n, r, p = 1 << self.ln, self.r, self.p
        # OpenSSL's scrypt needs 128 * r * (N + p) bytes and some slack.
        maxmem = 128 * r * (n + p) + (1 << 20)
        pool = gevent.get_hub().threadpool
        return bytes(
            pool.apply(
                hashlib.scrypt,
                (secret,),
                {
                    "salt": self.salt,
                    "n": n,
                    "r": r,
                    "p": p,
                    "maxmem": maxmem,
                    "dklen": len(self.key),
                },
            )
        )


def _in_range(ln: int, r: int, p: int) -> bool:
    if not (1 <= ln <= _MAX_LN and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        return False
    return 128 * r * (1 << ln) <= _MAX_MEMORY


def hash_password(
    password: str, *, ln: int = DEFAULT_LN, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """The string to store in a record's ``password`` field.

    :param password: the plain password; SASLprep is applied first (as
        pysasl does to what clients send).
    :param ln: log2 of scrypt's cost N (at most 20).
    :param r: scrypt's block size (at most 32); 128 * r * N bytes of memory
        must stay within 128 MiB.
    :param p: scrypt's parallelism (at most 16).
    :returns: ``$scrypt$ln=..,r=..,p=..$<salt>$<key>`` with a new random salt.
    :raises ValueError: a parameter is out of range, or SASLprep refuses the
        password.
    """
    if not _in_range(ln, r, p):
        raise ValueError("scrypt parameters out of range")
    salt = os.urandom(_SALT_BYTES)
    params = _Params(ln, r, p, salt, b"\0" * _KEY_BYTES)
    key = params.derive(saslprep(password).encode("utf-8"))
    return f"$scrypt$ln={ln},r={r},p={p}${_b64(salt)}${_b64(key)}"


class _Creds(Protocol):
    """What :meth:`LookupAuth.verify` needs of ``handle_auth``'s *creds*."""

    @property
    def authcid(self) -> str: ...

    @property
    def authzid(self) -> str | None: ...

    def verify(self, identity: Any) -> bool: ...


class HashedSecretIdentity:
    """A pysasl identity whose secret is checked against a stored hash.

    ``creds.verify(identity)`` calls :meth:`compare_secret`, which always
    derives a key, also when *params* is ``None`` (an unknown user, or a
    record without a valid hash): then it derives one from *dummy* and
    answers ``False``, so that both cases take about as long as a real
    check.
    """

    __slots__ = ("_authcid", "_dummy", "_params")

    def __init__(self, authcid: str, params: _Params | None, dummy: _Params) -> None:
        self._authcid = authcid
        self._params = params
        self._dummy = dummy

    @property
    def authcid(self) -> str:
        """The authentication identity."""
        return self._authcid

    def compare_authcid(self, authcid: str) -> bool:
        """Constant-time comparison of SASLprep-ed identities."""
        try:
            this, that = saslprep(self._authcid), saslprep(authcid)
        except ValueError:
            return False
        return hmac.compare_digest(this.encode("utf-8"), that.encode("utf-8"))

    def compare_secret(self, secret: str) -> bool:
        """True when *secret* hashes to the stored key."""
        params = self._params if self._params is not None else self._dummy
        try:
            prepared: bytes | None = saslprep(secret).encode("utf-8")
        except ValueError:
            prepared = None
        key = params.derive(prepared if prepared is not None else secret.encode("utf-8", "replace"))
        same = hmac.compare_digest(key, params.key)
        return same and prepared is not None and self._params is not None

    def get_clear_secret(self) -> None:
        """There is none: mechanisms that need it (CRAM-MD5) cannot be used."""
        return None


class LookupAuth:
    """Credentials checked against password hashes found by *lookup*.

    The user is looked up with ``lookup.lookup_address(authcid,
    authzid=authzid)``; the record's ``password`` field must hold a
    :func:`hash_password` string.

    :param lookup: the driver, a :class:`~slimta.lookup.drivers.LookupBase`.
    """

    #: The record field holding the hash.
    password_field = "password"

    def __init__(self, lookup: LookupBase) -> None:
        self.lookup = lookup
        # The hash an unknown user is checked against. It takes the cost
        # parameters of the last valid record seen, so that unknown users
        # and known ones take comparable time.
        self._dummy = _Params(
            DEFAULT_LN, DEFAULT_R, DEFAULT_P, os.urandom(_SALT_BYTES), os.urandom(_KEY_BYTES)
        )

    def get_identity(self, authcid: str, authzid: str | None = None) -> HashedSecretIdentity:
        """The pysasl identity to verify credentials for *authcid* against.

        Never ``None``: an unknown user, or a record without a valid hash,
        gives an identity that refuses every secret (after hashing it).

        :raises slimta.lookup.LookupFailed: the lookup failed.
        """
        record = self.lookup.lookup_address(authcid, authzid=authzid)
        params: _Params | None = None
        if record is not None:
            params = _Params.parse(record.get(self.password_field))
            if params is None:
                # Not the value: it may be a plain password.
                _log.warning("lookup record of %r holds no valid password hash", authcid)
            elif (params.ln, params.r, params.p) != (self._dummy.ln, self._dummy.r, self._dummy.p):
                self._dummy = _Params(
                    params.ln, params.r, params.p, os.urandom(_SALT_BYTES), os.urandom(_KEY_BYTES)
                )
        return HashedSecretIdentity(authcid, params, self._dummy)

    def verify(self, creds: _Creds) -> bool:
        """True when *creds* hold the right password for their user.

        An authorization identity other than the user's own is refused:
        acting as another user is not something a record grants.

        :param creds: the ``creds`` of ``handle_auth(reply, creds)``.
        :raises slimta.lookup.LookupFailed: the lookup failed.
        """
        authcid, authzid = creds.authcid, creds.authzid
        if authzid and authzid != authcid:
            return False
        identity = self.get_identity(authcid, authzid)
        try:
            return bool(creds.verify(identity))
        except MechanismUnusable:
            # CRAM-MD5 needs the plain password, which is never stored.
            return False
        except ExternalVerificationRequired:
            # EXTERNAL: the TLS client certificate is the application's to check.
            return False

    def handle_auth(self, reply: Reply, creds: _Creds) -> None:
        """Decide the reply to AUTH, for a validator's ``handle_auth``.

        Leaves *reply* (``235``) when the credentials are right; sets
        ``535 5.7.8`` when they are wrong or the user is unknown, and
        ``454 4.7.0`` (RFC 4954 6, a temporary failure) when the lookup
        failed.
        """
        try:
            ok = self.verify(creds)
        except LookupFailed:
            _log.warning("AUTH lookup failed", exc_info=True)
            reply.code = "454"
            reply.message = "4.7.0 Temporary authentication failure"
            return
        if not ok:
            reply.copy(invalid_credentials)
