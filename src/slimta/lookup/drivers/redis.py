"""Lookups in Redis (needs the ``redis`` extra: ``pip install python-slimta[redis]``).

Records are JSON objects stored as string values (``GET``), or hashes
(``HGETALL``) with *use_hash*. redis-py uses the :mod:`socket` module, so
lookups cooperate with other greenlets once gevent has monkey patched it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from slimta.lookup import LookupFailed
from slimta.lookup.drivers._base import LookupBase
from slimta.lookup.drivers._template import KeyTemplate

if TYPE_CHECKING:
    import redis as redis_py

__all__ = ["RedisLookup"]


class RedisLookup(LookupBase):
    """Look records up by key in Redis.

    :param key_template: gives the key from the keywords of :meth:`lookup`,
        e.g. ``'slimta:address:{address}'``; only bare ``{name}`` fields, and
        the values put in are never parsed as template text.
    :param host: the Redis server's host name.
    :param port: its port.
    :param db: the database number.
    :param password: the password to authenticate with, if any.
    :param socket_timeout: seconds each connect, send and receive may take
        before the lookup fails; ``None`` waits for ever (set one in
        production: a hung server would otherwise hold each lookup).
    :param use_hash: read hashes with ``HGETALL`` instead of JSON strings.
        Hash values are strings, and an empty hash cannot be told from a
        missing key (both are "not found").
    :raises ImportError: redis-py is not installed.
    :raises ValueError: *key_template* has a field that is not a bare name.

    .. versionchanged:: 4.0
       A failing server raises :class:`~slimta.lookup.LookupFailed` at once
       (one reconnection is tried) instead of redis-py's errors.
    """

    def __init__(
        self,
        key_template: str,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        password: str | None = None,
        socket_timeout: float | None = None,
        use_hash: bool = False,
    ) -> None:
        try:
            import redis as redis_py
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise ImportError(
                "RedisLookup needs redis-py: pip install 'python-slimta[redis]'"
            ) from exc
        self.key_template = key_template
        self._key = KeyTemplate(key_template)
        self.use_hash = use_hash
        self._errors: tuple[type[Exception], ...] = (redis_py.RedisError,)
        #: The redis-py client.
        self.redis: redis_py.Redis = redis_py.Redis(
            host=host,
            port=port,
            db=db,
            password=password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            decode_responses=True,
            # redis-py 6+ retries ten times with back-off by default, seconds
            # of waiting for a server that is down: retry once, at once (a
            # pooled connection may have been closed by a server restart).
            retry=Retry(NoBackoff(), 1),
        )

    def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        """The record stored under the key built from *kwargs*.

        :raises slimta.lookup.LookupFailed: Redis could not be reached or
            timed out, the key holds another type, or a JSON value is not an
            object.
        """
        try:
            key = self._key.render(kwargs)
        except KeyError:
            self.log(__name__, kwargs, None)
            return None
        try:
            ret = self._hash(key) if self.use_hash else self._json(key)
        except self._errors as exc:
            raise LookupFailed(f"redis lookup failed: {type(exc).__name__}: {exc}") from exc
        self.log(__name__, kwargs, ret)
        return ret

    def _json(self, key: str) -> dict[str, Any] | None:
        raw = self.redis.get(key)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise LookupFailed(f"redis value of {key!r} is not JSON") from exc
        if not isinstance(value, dict):
            raise LookupFailed(f"redis value of {key!r} is not a JSON object")
        return value

    def _hash(self, key: str) -> dict[str, Any] | None:
        value = self.redis.hgetall(key)
        if not value:
            return None
        # Strings already (decode_responses); str() is for the type checker.
        return {str(name): field for name, field in value.items()}
