"""Lookup drivers: where records come from.

Every driver is a :class:`LookupBase`: :meth:`~LookupBase.lookup` takes
keywords and returns a ``dict`` or ``None``, and raises
:class:`~slimta.lookup.LookupFailed` when its backend cannot be read. Drivers
never change their backend.

* :class:`DictLookup`, :class:`RegexLookup`: a mapping, or regular
  expressions, in memory.
* :class:`SQLite3Lookup`, :class:`DBAPI2Lookup`: an SQL query.
* :class:`RedisLookup`: Redis keys (needs the ``redis`` extra).

Keys are built from templates with ``{name}`` fields, which take the
keywords' values as plain text; SQL drivers pass the keywords as query
parameters.
"""

from __future__ import annotations

from slimta.lookup.drivers._base import LookupBase
from slimta.lookup.drivers.dbapi2 import DBAPI2Lookup, SQLite3Lookup
from slimta.lookup.drivers.dict import DictLookup, RegexLookup
from slimta.lookup.drivers.redis import RedisLookup

__all__ = [
    "DBAPI2Lookup",
    "DictLookup",
    "LookupBase",
    "RedisLookup",
    "RegexLookup",
    "SQLite3Lookup",
]
