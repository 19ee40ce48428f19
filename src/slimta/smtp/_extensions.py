"""The core's registry of ESMTP extension keywords (EHLO, RFC 5321 4.1.1.1).

The server core reads it to decide what a session may use; the client core
fills it from an EHLO reply. :class:`slimta.smtp.extensions.Extensions` is
the public class, a subclass of this one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

__all__ = ["Extensions"]

_T = TypeVar("_T")


class Extensions:
    """A case-insensitive map of ESMTP keyword to optional parameter.

    Iteration follows insertion order, which is the order advertised.
    Parameters may be any object whose ``str()`` gives the advertised value;
    when that ``str()`` raises :exc:`ValueError` the keyword is left out of
    the EHLO reply (this is how AUTH disappears with no usable mechanism).
    """

    __slots__ = ("extensions",)

    def __init__(self) -> None:
        #: Upper-cased keyword to parameter (or ``None``).
        self.extensions: dict[str, Any] = {}

    def reset(self) -> None:
        """Remove every extension."""
        self.extensions.clear()

    def __contains__(self, ext: object) -> bool:
        return isinstance(ext, str) and ext.upper() in self.extensions

    def __iter__(self) -> Iterator[str]:
        return iter(self.extensions)

    def __len__(self) -> int:
        return len(self.extensions)

    def add(self, ext: str, param: Any = None) -> None:
        """Add or replace *ext* with an optional parameter."""
        self.extensions[ext.upper()] = param

    def drop(self, ext: str) -> bool:
        """Remove *ext*; :returns: whether it was present."""
        return self.extensions.pop(ext.upper(), _MISSING) is not _MISSING

    def getparam(self, ext: str, filter: Callable[[Any], _T] | None = None) -> Any:
        """The parameter of *ext*, or ``None`` when absent or without one.

        :param filter: applied to the parameter (e.g. ``int``); a
            :exc:`ValueError` from it gives ``None``.
        """
        param = self.extensions.get(ext.upper())
        if param is None or filter is None:
            return param
        try:
            return filter(param)
        except ValueError:
            return None

    def parse_string(self, string: str) -> str:
        """Fill from the text of an EHLO reply (client side).

        :param string: the reply lines without codes, CRLF- or LF-separated.
        :returns: the first line, the server's greeting.
        """
        lines = string.replace("\r\n", "\n").split("\n")
        for line in lines[1:]:
            keyword, _, param = line.strip().partition(" ")
            if keyword:
                self.add(keyword, param.strip() or None)
        return lines[0]

    def build_string(self, header: str, omit: Collection[str] = ()) -> str:
        """The text of an EHLO reply: *header* then one line per extension.

        :param omit: upper-cased keywords to leave out of this reply, e.g.
            ``REQUIRETLS`` before TLS (RFC 8689 2).
        """
        lines = [header]
        for keyword, param in self.extensions.items():
            if omit and keyword in omit:
                continue
            if param is None:
                lines.append(keyword)
                continue
            try:
                lines.append(f"{keyword} {param}")
            except ValueError:
                continue
        return "\r\n".join(lines)

    def __repr__(self) -> str:
        return f"<Extensions {self.extensions!r}>"


_MISSING = object()
