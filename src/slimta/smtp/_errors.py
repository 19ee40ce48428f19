"""The error the sans-IO cores raise when their caller breaks the protocol."""

from __future__ import annotations

__all__ = ["LocalProtocolError"]


class LocalProtocolError(RuntimeError):
    """This side asked the core for a move the protocol does not allow here:
    a reply with no command waiting for one, a greeting sent twice, a
    transition its state table lacks. It is a bug in the caller, never the
    peer's doing; what the peer does wrong is answered on the wire.
    """
