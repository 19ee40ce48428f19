"""A queue policy that signs messages with DKIM (RFC 6376, RFC 8463).

:class:`DkimSign` prepends a ``DKIM-Signature:`` field to each queued
message whose ``From:`` address is in the signing domain. The signature is
made by `dkimpy <https://pypi.org/project/dkimpy/>`_, an optional
dependency: install ``python-slimta[dkim]``. This module imports without
it; constructing :class:`DkimSign` then raises :class:`ImportError`.

What is signed
--------------

The signature covers the message as the relay will send it: the flattened
header block and the body with every line ending made CRLF, as
:class:`~slimta.smtp.datasender.DataSender` writes it. The normalised body
is stored, so every relay sends the signed bytes.

Headers stay unparsed: the field names and the ``From:`` field are found in
the flattened bytes, and the signature is added with
:meth:`~slimta.envelope.Envelope.prepend_header`.

Where to add it
---------------

Add :class:`DkimSign` after the policies that change signed fields or the
body, so that nothing it signed changes afterwards; trace fields prepended
later (``Received:``) are not signed and do no harm. A relay that converts
an 8-bit body to 7-bit for a server without ``8BITMIME``
(:meth:`~slimta.envelope.Envelope.encode_7bit`) breaks the body hash: RFC
6376 section 5.3 asks signers to encode 8-bit content as 7-bit first.

Signing costs CPU time in the greenlet that queues the message (see
``bench/dkim_cost.py``): an RSA-2048 signature takes milliseconds, with the
gevent hub blocked meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import importlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from slimta.policy import QueuePolicy

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["DEFAULT_SIGNED_HEADERS", "DkimSign"]

_log = logging.getLogger(__name__)

#: The fields signed by default, when present: the list of RFC 6376 section
#: 5.4.1, then the fields that identify the message and its MIME structure,
#: whose change would alter what a reader sees.
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Resent-Date",
    "Resent-From",
    "Resent-To",
    "Resent-Cc",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Sender",
    "Resent-Sender",
    "Resent-Message-ID",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
)

#: Oversigned with ``oversign=True``: the fields a reader sees first, so
#: that no copy of them can be added after signing (RFC 6376 section 8.15).
_OVERSIGNED = ("From", "Subject", "Date")

_ALGORITHMS = frozenset(("rsa-sha256", "ed25519-sha256"))
_CANONICALIZATIONS = frozenset(("simple", "relaxed"))

#: RFC 8301 section 3.2: signers MUST use RSA keys of at least 1024 bits.
_MIN_RSA_BITS = 1024

#: RFC 8410 section 7: an Ed25519 PKCS#8 private key is this DER prefix and
#: the 32-byte seed (what ``openssl genpkey`` and ``cryptography`` write).
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_ED25519_SEED_LEN = 32

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)

#: A field name at the start of a header line (continuation lines start
#: with white space, so they never match).
_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:", re.MULTILINE)

#: The ``From:`` fields, continuation lines included.
_FROM_FIELD = re.compile(
    rb"^from[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.MULTILINE | re.IGNORECASE
)


#: RFC 6376 section 3.1 selector / section 3.5 d= (A-labels, dot-separated).
_LABEL = rb"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_DOMAIN_NAME = re.compile(_LABEL + rb"(?:\." + _LABEL + rb")*")


def _import_dkimpy() -> Any:
    try:
        return importlib.import_module("dkim")
    except ImportError as exc:
        raise ImportError(
            "DkimSign needs dkimpy: install the [dkim] extra, "
            "e.g. pip install 'python-slimta[dkim]'"
        ) from exc


def _a_labels(name: str, what: str) -> bytes:
    """*name* as ASCII (IDNA A-labels), lower case; :class:`ValueError` if not a name."""
    try:
        ascii_name = name.rstrip(".").encode("idna").lower()
    except UnicodeError:
        raise ValueError(f"Not a valid {what}: {name!r}") from None
    if not ascii_name or _DOMAIN_NAME.fullmatch(ascii_name) is None:
        raise ValueError(f"Not a valid {what}: {name!r}")
    return ascii_name


def _within(name: bytes, domain: bytes) -> bool:
    """Whether *name* is *domain* or one of its subdomains."""
    return name == domain or name.endswith(b"." + domain)


def _read_key(private_key: str | os.PathLike[str] | bytes) -> tuple[bytes, str]:
    """The key bytes and a name for it in error messages."""
    if isinstance(private_key, bytes):
        return private_key, "private key"
    path = os.fspath(private_key)
    with open(path, "rb") as key_file:
        return key_file.read(), path


def _rsa_key(dkim: Any, data: bytes, where: str) -> bytes:
    """Check that *data* is a usable RSA private key in PEM form."""
    try:
        key = dkim.crypto.parse_pem_private_key(data)
    except Exception as exc:  # dkimpy raises several types for bad input
        raise ValueError(f"{where}: not an RSA private key in PEM form ({exc})") from None
    bits = int(key["modulus"]).bit_length()
    if bits < _MIN_RSA_BITS:
        raise ValueError(f"{where}: RSA key of {bits} bits, at least {_MIN_RSA_BITS} needed")
    return data


def _ed25519_key(data: bytes, where: str) -> bytes:
    """The key as dkimpy takes it: the base64 of the 32-byte seed.

    *data* is an RFC 8410 PKCS#8 PEM key (``BEGIN PRIVATE KEY``) or already
    that base64 seed.
    """
    try:
        importlib.import_module("nacl.signing")
    except ImportError as exc:
        raise ImportError(
            "ed25519-sha256 signing needs PyNaCl: pip install 'dkimpy[ed25519]'"
        ) from exc
    block = _PEM_BLOCK.search(data)
    try:
        if block is not None:
            if block.group(1) != b"PRIVATE KEY":
                raise ValueError(f"a {block.group(1).decode()} block")
            der = base64.b64decode(b"".join(block.group(2).split()), validate=True)
            if len(der) != len(_ED25519_PKCS8_PREFIX) + _ED25519_SEED_LEN or not der.startswith(
                _ED25519_PKCS8_PREFIX
            ):
                raise ValueError("not an Ed25519 PKCS#8 key")
            seed = der[len(_ED25519_PKCS8_PREFIX) :]
        else:
            seed = base64.b64decode(b"".join(data.split()), validate=True)
            if len(seed) != _ED25519_SEED_LEN:
                raise ValueError(f"{len(seed)} bytes, not {_ED25519_SEED_LEN}")
    except (ValueError, binascii.Error) as exc:
        raise ValueError(
            f"{where}: not an Ed25519 private key (PKCS#8 PEM, or base64 seed) ({exc})"
        ) from None
    return base64.b64encode(seed)


class DkimSign(QueuePolicy):
    """Prepends a ``DKIM-Signature:`` field (RFC 6376) to each queued message.

    A message is signed when :meth:`should_sign` says so: by default when it
    has exactly one ``From:`` field and every address in it is in *domain*
    or a subdomain, so that a relay does not sign other people's mail. A
    message that is not signed, or cannot be (no ``From:``, a signing
    error), is queued unchanged and a line is logged on the
    ``slimta.policy.dkim`` logger (WARNING for a missing ``From:`` or an
    error, DEBUG for mail from other domains): it is never refused.

    The key is read and checked once, here.

    :param selector: the ``s=`` tag: the public key is the TXT record of
        ``<selector>._domainkey.<domain>``.
    :param domain: the ``d=`` tag, the signing domain.
    :param private_key: the path of a PEM key file, or the key itself as
        bytes. For ``rsa-sha256``, an RSA key (PKCS#1 or PKCS#8) of at least
        1024 bits (2048 advised). For ``ed25519-sha256``, an Ed25519 PKCS#8
        key (``-----BEGIN PRIVATE KEY-----``, as ``openssl genpkey -algorithm
        ed25519`` writes it), or dkimpy's form: the base64 of the 32-byte
        seed.
    :param algorithm: ``'rsa-sha256'`` or ``'ed25519-sha256'`` (RFC 8463).
    :param canonicalization: the ``c=`` tag: ``'header/body'``, each
        ``simple`` or ``relaxed``; ``'relaxed'`` alone means
        ``relaxed/simple`` (RFC 6376 section 3.5).
    :param signed_headers: the names of the fields to sign, each instance
        present; default :data:`DEFAULT_SIGNED_HEADERS`. ``From`` is always
        signed.
    :param oversign: ``True`` to oversign ``From``, ``Subject`` and
        ``Date``, or the names of the fields to oversign: each is listed in
        ``h=`` once more than it is present, so that a copy added after
        signing breaks the signature (RFC 6376 section 8.15).
    :param identity: the ``i=`` tag, e.g. ``'user@example.com'``; its domain
        must be *domain* or a subdomain. Default none (``@domain``).
    :param from_domains: the ``From:`` domains (with their subdomains) whose
        mail is signed; default *domain* alone.
    :raises ImportError: dkimpy (or, for ed25519, PyNaCl) is not installed.
    :raises OSError: the key file cannot be read.
    :raises ValueError: the key is malformed or of the wrong type, or an
        argument is invalid.
    """

    def __init__(
        self,
        selector: str,
        domain: str,
        private_key: str | os.PathLike[str] | bytes,
        *,
        algorithm: str = "rsa-sha256",
        canonicalization: str = "relaxed/relaxed",
        signed_headers: Iterable[str] | None = None,
        oversign: bool | Iterable[str] = False,
        identity: str | None = None,
        from_domains: Iterable[str] | None = None,
    ) -> None:
        self._dkim = _import_dkimpy()
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"Unknown DKIM algorithm: {algorithm!r}")
        header_c, _, body_c = canonicalization.partition("/")
        body_c = body_c or "simple"
        if header_c not in _CANONICALIZATIONS or body_c not in _CANONICALIZATIONS:
            raise ValueError(f"Unknown DKIM canonicalization: {canonicalization!r}")
        #: The ``s=`` tag.
        self.selector = _a_labels(selector, "DKIM selector").decode("ascii")
        #: The ``d=`` tag, as A-labels.
        self.domain = _a_labels(domain, "DKIM domain").decode("ascii")
        #: The ``a=`` tag.
        self.algorithm = algorithm
        #: The ``c=`` tag, both parts written out.
        self.canonicalization = f"{header_c}/{body_c}"
        #: The ``i=`` tag, or ``None``.
        self.identity = identity
        if identity is not None:
            _, at, identity_domain = identity.rpartition("@")
            # RFC 6376 3.5: i= is d= or a subdomain of it.
            if not at or not _within(
                _a_labels(identity_domain, "identity domain"), self.domain.encode("ascii")
            ):
                raise ValueError(f"DKIM identity {identity!r} is not in {self.domain!r}")

        names = list(DEFAULT_SIGNED_HEADERS if signed_headers is None else signed_headers)
        if isinstance(signed_headers, str):
            raise TypeError("signed_headers must be a list of names, not a str")
        if isinstance(oversign, str):
            raise TypeError("oversign must be a bool or a list of names, not a str")
        over = _OVERSIGNED if oversign is True else () if oversign is False else tuple(oversign)
        # RFC 6376 5.4: From MUST be signed.
        signed: dict[bytes, None] = {b"from": None}
        for name in [*names, *over]:
            signed[_field_name(name)] = None
        self._signed = tuple(signed)
        self._oversigned = frozenset(_field_name(name) for name in over)
        #: The lower-case names of the fields signed.
        self.signed_headers = tuple(name.decode("ascii") for name in self._signed)
        #: The lower-case ``From:`` domains whose mail is signed (A-labels).
        self.from_domains = tuple(
            _a_labels(name, "From domain").decode("ascii")
            for name in ([self.domain] if from_domains is None else from_domains)
        )

        data, where = _read_key(private_key)
        if algorithm == "rsa-sha256":
            self._key = _rsa_key(self._dkim, data, where)
        else:
            self._key = _ed25519_key(data, where)

    def should_sign(self, envelope: Envelope, from_domains: list[str]) -> bool:
        """Whether to sign *envelope*, whose ``From:`` field has *from_domains*.

        Override it to sign by other rules. The default signs when every
        domain is in :attr:`from_domains` (or a subdomain of one).

        :param envelope: the message.
        :param from_domains: the domain of each address of its only ``From:``
            field, lower case, as A-labels where they could be converted;
            never empty.
        """
        wanted = [name.encode("ascii") for name in self.from_domains]
        return all(
            any(_within(domain.encode("ascii", "replace"), name) for name in wanted)
            for domain in from_domains
        )

    def apply(self, envelope: Envelope) -> None:
        """Sign *envelope* if :meth:`should_sign` says so; never raises."""
        try:
            self._apply(envelope)
        except Exception as exc:
            _log.warning(
                "message from %r not DKIM-signed: %s: %s", envelope.sender, type(exc).__name__, exc
            )

    def _apply(self, envelope: Envelope) -> None:
        header_bytes, body = envelope.flatten()
        from_fields = _FROM_FIELD.findall(header_bytes)
        if len(from_fields) != 1:
            # RFC 5322 3.6: exactly one From. Signing one of several would
            # let a reader see the unsigned one.
            _log.warning(
                "message from %r not DKIM-signed: %d From fields",
                envelope.sender,
                len(from_fields),
            )
            return
        domains = _from_domains(from_fields[0])
        if not domains:
            _log.warning("message from %r not DKIM-signed: no From address", envelope.sender)
            return
        if not self.should_sign(envelope, domains):
            _log.debug("message from %r not DKIM-signed: From %s", envelope.sender, domains)
            return
        body = _crlf(body)
        signature = self._sign(header_bytes, body)
        # Both only once signing worked: a failure leaves the envelope as it was.
        envelope.prepend_header("DKIM-Signature", signature)
        envelope.message = body

    def _sign(self, header_bytes: bytes, body: bytes) -> str:
        """The value of the ``DKIM-Signature:`` field for this message."""
        counts = Counter(name.lower() for name in _FIELD_NAME.findall(header_bytes))
        # dkimpy signs one instance per name in h=, from the bottom up: list
        # each name as often as it is present (RFC 6376 5.4.2), once more if
        # oversigned; a name listed but absent signs its absence.
        include = [
            name for name in self._signed for _ in range(counts[name] + (name in self._oversigned))
        ]
        header_c, _, body_c = self.canonicalization.partition("/")
        field: bytes = self._dkim.sign(
            header_bytes + body,
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            self._key,
            identity=None if self.identity is None else self.identity.encode("utf-8"),
            canonicalize=(header_c.encode("ascii"), body_c.encode("ascii")),
            signature_algorithm=self.algorithm.encode("ascii"),
            include_headers=include,
            linesep=b"\r\n",
        )
        name, colon, value = field.partition(b":")
        if not colon or name.lower() != b"dkim-signature":
            raise ValueError(f"dkimpy returned {field[:40]!r}")
        return value.rstrip(b"\r\n").lstrip(b" ").decode("ascii")


def _crlf(body: bytes) -> bytes:
    """*body* with every line ending, bare CR or LF too, made CRLF as DataSender sends it."""
    # Three replaces cost a quarter of one re.sub over r"\r\n|\r|\n".
    return body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _field_name(name: str) -> bytes:
    encoded = name.strip().lower().encode("ascii", "replace")
    if _FIELD_NAME.fullmatch(encoded + b":") is None:
        raise ValueError(f"Not a header field name: {name!r}")
    return encoded


def _from_domains(value: bytes) -> list[str]:
    """The domain of each address in a ``From:`` field body (unfolded here)."""
    text = value.replace(b"\r\n", b"").decode("utf-8", "surrogateescape")
    domains = []
    for _, address in email.utils.getaddresses([text]):
        _, at, domain = address.rpartition("@")
        if not at or not domain:
            continue
        domain = domain.rstrip(".").lower()
        # A name the codec refuses is compared as it is: it matches no A-label.
        with contextlib.suppress(UnicodeError):
            domain = domain.encode("idna").decode("ascii").lower()
        domains.append(domain)
    return domains
