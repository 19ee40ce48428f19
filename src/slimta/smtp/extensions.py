"""ESMTP extension keywords advertised in, or parsed from, an EHLO reply."""

from __future__ import annotations

from slimta.smtp import _extensions

__all__ = ["Extensions"]


class Extensions(_extensions.Extensions):
    """A case-insensitive map of ESMTP keyword to optional parameter.

    Iteration follows insertion order, which is the order advertised.
    Parameters may be any object whose ``str()`` gives the advertised value;
    when that ``str()`` raises :exc:`ValueError` the keyword is left out of
    the EHLO reply (this is how AUTH disappears with no usable mechanism).

    The SMTP cores keep their own registry class; this public one adds
    nothing to it but the name users import, so that the cores never import
    the public package.
    """

    __slots__ = ()
