"""Syntax of MAIL and RCPT arguments: paths (RFC 5321 4.1.2) and parameters.

Paths follow RFC 5321 with the UTF-8 additions of RFC 6531; callers decide
whether non-ASCII is allowed in the transaction. Parameters are
``KEYWORD[=VALUE]`` words (RFC 5321 4.1.2 ``esmtp-param``).
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "SIMPLE_MAIL",
    "SIMPLE_RCPT",
    "ArgumentError",
    "decode_xtext",
    "parse_mail_argument",
    "parse_params",
    "parse_rcpt_argument",
]

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_SUB_DOMAIN = (
    r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?"
)
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_MAILBOX = rf"(?:{_DOT_STRING}|{_QUOTED})@(?:{_DOMAIN}|{_LITERAL})"
_ROUTE = rf"@{_DOMAIN}(?:,@{_DOMAIN})*:"

#: ``<[route:]mailbox>`` followed by the rest of the line.
_PATH = re.compile(rf"<(?:{_ROUTE})?({_MAILBOX})>")
_POSTMASTER = re.compile(r"<(postmaster)>", re.IGNORECASE)
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*\Z")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+\Z")
_PREFIX_SPACES = re.compile(r" *")
_BAD_SENDER = (501, "5.1.7 Bad sender address syntax")
_BAD_RECIPIENT = (501, "5.1.3 Bad recipient address syntax")
#: Standardized-tag of a general address literal (RFC 5321 4.1.3).
_GENERAL_TAG = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?")


_ASCII_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]"
_ASCII_SUB = r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
_SIMPLE_MAILBOX = rf"{_ASCII_ATEXT}+(?:\.{_ASCII_ATEXT}+)*@{_ASCII_SUB}(?:\.{_ASCII_SUB})*"
#: The common case, in one match: ``FROM:<user@host>`` or ``TO:<user@host>``
#: with an ASCII dot-string and host name and no parameters.
SIMPLE_MAIL = re.compile(rf"(?i:FROM):<({_SIMPLE_MAILBOX})>\Z")
SIMPLE_RCPT = re.compile(rf"(?i:TO):<({_SIMPLE_MAILBOX})>\Z")


class ArgumentError(ValueError):
    """A MAIL or RCPT argument does not follow the syntax.

    :param code: the reply code to answer with.
    :param message: the reply text, with its enhanced status code.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


def _split_prefix(arg: str, prefix: str) -> str:
    """Strip ``FROM:`` / ``TO:`` (any case) and optional spaces after it."""
    if arg[: len(prefix)].upper() != prefix:
        raise ArgumentError(
            501,
            "5.5.4 Syntax: "
            + ("MAIL FROM:<address>" if prefix == "FROM:" else "RCPT TO:<address>"),
        )
    rest = arg[len(prefix) :]
    # RFC 5321 allows no space here; many clients send one, so tolerate it.
    return rest[_PREFIX_SPACES.match(rest).end() :]  # type: ignore[union-attr]


def parse_mail_argument(arg: str) -> tuple[str, str]:
    """Split ``FROM:<path> params``.

    :returns: the address (``''`` for the null path, source route dropped)
        and the parameter text.
    :raises ArgumentError: on bad syntax.
    """
    rest = _split_prefix(arg, "FROM:")
    if rest.startswith("<>"):
        return "", _after_path(rest, 2)
    match = _PATH.match(rest)
    if match is None:
        raise ArgumentError(*_BAD_SENDER)
    _check_literal(match.group(1), _BAD_SENDER)
    return match.group(1), _after_path(rest, match.end())


def parse_rcpt_argument(arg: str) -> tuple[str, str]:
    """Split ``TO:<path> params``; ``<Postmaster>`` alone is allowed (RFC 5321 4.5.1).

    :raises ArgumentError: on bad syntax, including the null path.
    """
    rest = _split_prefix(arg, "TO:")
    match = _PATH.match(rest) or _POSTMASTER.match(rest)
    if match is None:
        raise ArgumentError(*_BAD_RECIPIENT)
    _check_literal(match.group(1), _BAD_RECIPIENT)
    return match.group(1), _after_path(rest, match.end())


def _check_literal(address: str, reply: tuple[int, str]) -> None:
    """Validate an address literal (RFC 5321 4.1.3), if the domain is one."""
    at = address.rfind("@")
    domain = address[at + 1 :]
    if not domain.startswith("["):
        return
    content = domain[1:-1]
    try:
        if content[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(content[5:])
            return
        if ":" in content:
            tag = content.partition(":")[0]
            if _GENERAL_TAG.fullmatch(tag):
                return
            raise ValueError(tag)
        ipaddress.IPv4Address(content)
    except ValueError:
        raise ArgumentError(*reply) from None


def _after_path(rest: str, end: int) -> str:
    tail = rest[end:]
    if tail and tail[0] != " ":
        raise ArgumentError(501, "5.5.4 Syntax error in parameters or arguments")
    return tail.strip(" ")


def parse_params(text: str) -> dict[bytes, bytes | bool]:
    """Parse ``KEY[=VALUE]`` words into the 4.0 form: upper-cased bytes keys,
    bytes values or ``True`` for a bare keyword.

    :raises ArgumentError: on a malformed or repeated parameter.
    """
    params: dict[bytes, bytes | bool] = {}
    if not text:
        return params
    for word in text.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            raise ArgumentError(501, "5.5.4 Malformed parameter: " + word[:64])
        bkey = key.upper().encode("ascii")
        if bkey in params:
            raise ArgumentError(501, "5.5.4 Duplicate parameter: " + key.upper())
        params[bkey] = value.encode("utf-8") if eq else True
    return params


_XTEXT_HEX = re.compile(rb"\+([0-9A-F]{2})")


def decode_xtext(value: bytes) -> str:
    """Decode xtext (RFC 3461 4): ``+HH`` stands for the octet HH."""
    raw = _XTEXT_HEX.sub(lambda m: bytes([int(m.group(1), 16)]), value)
    return raw.decode("utf-8", "replace")
