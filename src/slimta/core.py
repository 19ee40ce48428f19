"""Root of the slimta exception tree and the package version.

Every exception class the package defines derives from :class:`SlimtaError`,
except :class:`slimta.smtp.LocalProtocolError`, a :exc:`RuntimeError` that
means a bug in the caller rather than a mail error::

    SlimtaError
     +-- slimta.smtp.SmtpError
     |    +-- ConnectionLost, MessageTooBig, BadReply, RemoteProtocolError
     |    +-- slimta.smtp.auth.ServerAuthError
     +-- slimta.queue.QueueError
     +-- slimta.relay.RelayError
     |    +-- PermanentRelayError, TransientRelayError
     +-- slimta.policy.PolicyError
     +-- slimta.lookup.LookupFailed

"""

from __future__ import annotations

from importlib import metadata

__all__ = ["SlimtaError"]


def _installed_version() -> str:
    try:
        return metadata.version("python-slimta")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "4.0.0"


#: The installed distribution version, e.g. ``'4.0.0'``.
__version__: str = _installed_version()


class SlimtaError(Exception):
    """Base class of every exception raised by slimta."""
