"""Lookups: ask a table about an address, and act on the record found.

A *lookup driver* (:mod:`slimta.lookup.drivers`) turns keyword arguments into
a record: a ``dict``, or ``None`` when there is none. The same drivers serve
:class:`~slimta.lookup.policy.LookupPolicy` (aliases, VERP, added headers,
when a message is queued) and :class:`~slimta.lookup.auth.LookupAuth`
(password hashes, for the SMTP edge's AUTH).

"Not found" and "could not look" are kept apart. ``None`` means the table
was read and holds no record; :class:`LookupFailed` means it could not be
read (a database missing or locked, Redis down or too slow, a malformed
record). Callers turn the first into a permanent answer and the second into
a transient one, so that mail is retried rather than refused for good::

    SlimtaError
     +-- slimta.lookup.LookupFailed

.. versionadded:: 4.0
   The lookup extension (python-slimta-lookup) is part of the core package.
"""

from __future__ import annotations

from slimta.core import SlimtaError
from slimta.smtp.reply import Reply

__all__ = ["LookupFailed"]


class LookupFailed(SlimtaError):
    """A lookup could not be answered: a temporary failure, not "not found".

    Drivers raise it from :meth:`~slimta.lookup.drivers.LookupBase.lookup`
    for any error of their backend; the original error is its
    ``__cause__``. Raised inside a queue policy it makes the edge answer
    ``451 4.3.0``; a validator can answer with :attr:`reply`.

    :param msg: what failed; never a secret or a record.
    """

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        #: The transient reply for an SMTP client: ``451 4.3.0``.
        self.reply = Reply("451", "4.3.0 Temporary lookup failure")
