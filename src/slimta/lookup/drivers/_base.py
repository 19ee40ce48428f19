"""The interface every lookup driver implements."""

from __future__ import annotations

import logging
from typing import Any

from slimta.logging import logline

__all__ = ["LookupBase"]


class LookupBase:
    """Base class of the lookup drivers: override :meth:`lookup`.

    Drivers only read their backend, never change it.
    """

    def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        """The record for *kwargs*.

        Drivers use the keywords to build a key (from a template) or as the
        parameters of a query.

        :param kwargs: what to look up, e.g. ``address='a@example.com'``.
        :returns: a new ``dict``, or ``None`` when there is no record (or the
            key template names a keyword not given).
        :raises slimta.lookup.LookupFailed: the backend could not be read.
        :raises NotImplementedError: in this base class.
        """
        raise NotImplementedError()

    def lookup_address(self, address: str, **extra: Any) -> dict[str, Any] | None:
        """:meth:`lookup` with an address split into template keys.

        The keywords are ``address`` (as given), ``localpart`` (before the
        last ``@``) and ``domain`` (after it); without an ``@``,
        ``localpart`` is the whole address and ``domain`` is ``''``. Case is
        kept as given.

        :param address: e.g. ``'user@example.com'``.
        :param extra: more keywords for :meth:`lookup`.
        :raises slimta.lookup.LookupFailed: the backend could not be read.

        .. versionchanged:: 4.0
           ``localpart`` is new, and ``domain`` is always given.
        """
        localpart, at, domain = address.rpartition("@")
        if not at:
            localpart, domain = address, ""
        return self.lookup(address=address, localpart=localpart, domain=domain, **extra)

    def log(self, name: str, kwargs: dict[str, Any], ret: dict[str, Any] | None) -> None:
        """Log one lookup at debug level: its keywords and whether it found
        a record (never the record, which may hold a password hash).

        :param name: the driver's module name, e.g. ``__name__``.
        :param kwargs: the keywords given to :meth:`lookup`.
        :param ret: what :meth:`lookup` returns.
        """
        operation = "notfound" if ret is None else "found"
        logline(logging.getLogger(name).debug, "lookup", id(self), operation, **kwargs)
