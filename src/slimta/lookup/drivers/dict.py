"""Lookups in a mapping: a ``dict``, a :mod:`shelve`, or regular expressions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from slimta.lookup import LookupFailed
from slimta.lookup.drivers._base import LookupBase
from slimta.lookup.drivers._template import KeyTemplate

__all__ = ["DictLookup", "RegexLookup"]


def _record(value: object) -> dict[str, Any]:
    # A copy: a caller that edits the record must not edit the table.
    if not isinstance(value, Mapping):
        raise LookupFailed(f"lookup record is not a mapping: {type(value).__name__}")
    return dict(value)


class DictLookup(LookupBase):
    """Look records up by key in a mapping.

    :param backend: a mapping of key strings to records (mappings), filled
        beforehand, or a proxy to a store such as :mod:`shelve`.
    :param key_template: gives the key from the keywords of :meth:`lookup`,
        e.g. ``'{address}'``. Only bare ``{name}`` fields are allowed, and
        the values put in are never parsed as template text.
    :raises ValueError: *key_template* has a field that is not a bare name.
    """

    def __init__(self, backend: Mapping[str, Any], key_template: str) -> None:
        self.backend = backend
        self.key_template = key_template
        self._key = KeyTemplate(key_template)

    def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        """The record stored under the key built from *kwargs*.

        :raises slimta.lookup.LookupFailed: the backend raised something
            other than ``KeyError``, or the value is not a mapping.
        """
        ret: dict[str, Any] | None = None
        try:
            key = self._key.render(kwargs)
            value = self.backend[key]
        except KeyError:
            pass
        except Exception as exc:
            raise LookupFailed(f"dict lookup failed: {type(exc).__name__}") from exc
        else:
            ret = _record(value)
        self.log(__name__, kwargs, ret)
        return ret


class RegexLookup(LookupBase):
    """Look records up by matching a string against regular expressions.

    The string is built from the keywords of :meth:`lookup` by
    *str_template*; the first expression added with :meth:`add_regex` that
    matches at its start (:meth:`re.Pattern.match`) gives the record.

    :param str_template: e.g. ``'{domain}'``; only bare ``{name}`` fields.
    :raises ValueError: *str_template* has a field that is not a bare name.
    """

    def __init__(self, str_template: str) -> None:
        self.str_template = str_template
        self._text = KeyTemplate(str_template)
        #: ``(compiled pattern, record)`` pairs, in the order they are tried.
        self.regexes: list[tuple[re.Pattern[str], Mapping[str, Any]]] = []

    def add_regex(self, pattern: str | re.Pattern[str], value: Mapping[str, Any]) -> None:
        """Try *pattern* after those added before; a match gives *value*.

        :param pattern: a regular expression, as text or compiled; anchor it
            with ``$`` (or ``\\Z``) to match the whole string.
        :param value: the record returned (as a copy) on a match.
        """
        self.regexes.append((re.compile(pattern), value))

    def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        """The record of the first expression matching the built string."""
        ret: dict[str, Any] | None = None
        try:
            text = self._text.render(kwargs)
        except KeyError:
            pass
        else:
            for regex, value in self.regexes:
                if regex.match(text) is not None:
                    ret = _record(value)
                    break
        self.log(__name__, kwargs, ret)
        return ret
