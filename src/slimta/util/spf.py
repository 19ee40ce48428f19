"""Sender Policy Framework (RFC 7208) checks for :class:`~slimta.edge.smtp.SmtpEdge`.

:class:`EnforceSpf` asks whether the client may send mail for the sender's
domain, and its :meth:`~EnforceSpf.check` decorator refuses the command when
the result is one you chose to enforce::

    from slimta.edge.smtp import SmtpValidators
    from slimta.util.spf import EnforceSpf

    spf = EnforceSpf()
    spf.set_enforcement("fail", match_code="550", match_message="5.7.1 SPF: {reason}")
    spf.set_enforcement("temperror", match_code="451", match_message="4.7.1 SPF: {reason}")

    class Validators(SmtpValidators):
        @spf.check
        def handle_mail(self, reply, sender, params):
            pass

The identity checked is the MAIL FROM address; for the null sender ``<>``
it is ``postmaster@<HELO name>`` (RFC 7208 2.4). Results are the strings
``'pass' 'fail' 'softfail' 'neutral' 'none' 'permerror' 'temperror'``.

Records are evaluated by slimta itself on :class:`~slimta.util.dns.DNSResolver`
(answers cached by TTL); see RFC 7208 for the rules. Not supported: the
``exp=`` explanation (ignored, the reason is slimta's own text), and
``%{p}``, which expands to ``unknown`` (allowed by RFC 7208 7.3).

.. versionchanged:: 4.0
   Part of slimta (it was the separate ``python-slimta-spf`` package, whose
   ``slimta.spf`` import path still works) and no longer uses pyspf.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from slimta import logging as slogging
from slimta.util._spf_eval import check_host

__all__ = ["EnforceSpf"]

log = logging.getLogger(__name__)

_Hook = TypeVar("_Hook", bound=Callable[..., Any])

#: Every result :meth:`EnforceSpf.set_enforcement` accepts.
_RESULTS = frozenset({"pass", "permerror", "fail", "temperror", "softfail", "none", "neutral"})


class EnforceSpf:
    """SPF checks whose results may refuse SMTP commands.

    :param timeout: the most seconds one check waits for DNS; a check that
        runs out of time gives ``temperror``.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        #: Seconds one check may take.
        self.timeout = timeout
        self._enforce: dict[str, tuple[str, str]] = {}
        # Per validators object (one per session): the identity last checked
        # and its result, so that MAIL, RCPT and DATA of one transaction
        # share one check.
        self._checked: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], tuple[str, str]]] = (
            weakref.WeakKeyDictionary()
        )

    def set_enforcement(
        self,
        result: str,
        match_code: str = "550",
        match_message: str = "5.7.1 Access denied",
    ) -> None:
        """Refuse commands whose check gives *result*.

        :param result: one of ``'pass' 'permerror' 'fail' 'temperror'
            'softfail' 'none' 'neutral'``.
        :param match_code: the reply code.
        :param match_message: the reply text; ``{reason}`` in it is replaced
            by the reason the check gave.
        :raises ValueError: unknown *result*.
        """
        if result not in _RESULTS:
            raise ValueError(f"unknown SPF result: {result!r}")
        self._enforce[result] = (match_code, match_message)

    def query(self, sender: str, ip: str, ehlo_as: str | None) -> tuple[str, str]:
        """The SPF result of *sender* sending from *ip*.

        :param sender: the MAIL FROM address; empty for the null sender, in
            which case ``postmaster@<ehlo_as>`` is checked (RFC 7208 2.4).
        :param ip: the client's IP address.
        :param ehlo_as: the client's HELO/EHLO name.
        :returns: ``(result, reason)``. Never raises: an invalid address
            gives ``'none'`` and an unexpected error ``'temperror'``.
        """
        helo = (ehlo_as or "").strip()
        sender = (sender or "").strip()
        if not sender:
            sender = f"postmaster@{helo}"
        local, at, domain = sender.rpartition("@")
        if not at:
            local, domain = "", sender
        if not local:
            sender = f"postmaster@{domain}"  # 4.3: an empty local-part
        if not domain:
            return "none", "no domain to check"
        try:
            result, reason = check_host(
                ip, domain, sender, helo, deadline=time.monotonic() + self.timeout
            )
        except ValueError:
            return "none", f"{ip!r} is not an IP address"
        except Exception:
            # A bug must not become an error reply for every client.
            slogging.log_exception(__name__, sender=sender, ip=ip)
            return "temperror", "internal error"
        slogging.logline(log.debug, "spf", domain, result, ip=ip, sender=sender, reason=reason)
        return result, reason

    def _result_for(self, validators: Any, sender: str) -> tuple[str, str]:
        session = validators.session
        address = getattr(session, "address", None)
        ip = address[0] if isinstance(address, tuple | list) and address else None
        if not isinstance(ip, str):
            return "none", "no client address"
        ehlo_as = session.ehlo_as
        key = (sender, ip, ehlo_as)
        try:
            done = self._checked.get(validators)
        except TypeError:  # a validators class with __slots__: no memory
            return self.query(sender, ip, ehlo_as)
        if done is not None and done[0] == key:
            return done[1]
        result = self.query(sender, ip, ehlo_as)
        self._checked[validators] = (key, result)
        return result

    def check(self, hook: _Hook) -> _Hook:
        """Decorate ``handle_mail``, ``handle_rcpt`` or ``handle_data`` of
        :class:`~slimta.edge.smtp.SmtpValidators`.

        The sender is the ``handle_mail`` argument, or else
        ``self.session.envelope.sender``. The check runs once per transaction
        (later hooks of it reuse the result). When the result is enforced
        (:meth:`set_enforcement`) the reply gets its code and message and the
        hook is not called; otherwise the hook is called.
        """

        @functools.wraps(hook)
        def checked(validators: Any, reply: Any, *args: Any, **kwargs: Any) -> Any:
            if hook.__name__ == "handle_mail" and args:
                sender = args[0]
            else:
                envelope = getattr(validators.session, "envelope", None)
                sender = getattr(envelope, "sender", None)
            if isinstance(sender, bytes):
                sender = sender.decode("utf-8", "replace")
            if isinstance(sender, str):
                result, reason = self._result_for(validators, sender)
                enforced = self._enforce.get(result)
                if enforced is not None:
                    reply.code = enforced[0]
                    reply.message = enforced[1].replace("{reason}", reason)
                    return None
            return hook(validators, reply, *args, **kwargs)

        return checked  # type: ignore[return-value]
