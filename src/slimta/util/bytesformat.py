"""A small ``str.format`` for bytes templates.

:class:`BytesFormat` fills ``{name}`` and ``{0}`` fields of a bytes template.
Field names are word characters only (``[A-Za-z0-9_]``): no attribute access,
no indexing, no format specs, no ``{{`` escapes, so any other use of braces in
the template is plain text. That keeps templates such as MIME message skeletons
(:class:`slimta.bounce.Bounce`) safe to write without escaping.

The template is split into literal chunks and field names once, when the
object is built; :meth:`BytesFormat.format` then only joins them.
"""

from __future__ import annotations

import re
from typing import SupportsBytes

__all__ = ["BytesFormat"]

#: A field: a brace, one or more ASCII word characters, a brace. The group
#: makes :func:`re.split` keep the names between the literal chunks.
_FIELD = re.compile(rb"\{(\w+)\}", re.ASCII)

#: The accepted ``mode`` values.
_MODES = frozenset(("ignore", "remove", "strict"))


class BytesFormat:
    """A bytes template with ``{name}`` / ``{0}`` fields.

    A field whose name is all digits takes a positional argument of
    :meth:`format`; any other takes a keyword argument.

    :param template: The template.
    :param mode: What :meth:`format` does with a field it has no value for:
        ``'ignore'`` leaves the field in the output as it is written,
        ``'remove'`` drops it, ``'strict'`` raises :exc:`KeyError` (named
        field) or :exc:`IndexError` (numbered field).
    :raises ValueError: ``mode`` is not one of the three above.
    """

    __slots__ = ("_fields", "_literals", "mode", "template")

    def __init__(self, template: bytes, mode: str = "ignore") -> None:
        if mode not in _MODES:
            raise ValueError(f"Invalid BytesFormat mode: {mode!r}")
        #: The template, as given.
        self.template = bytes(template)
        #: ``'ignore'``, ``'remove'`` or ``'strict'``.
        self.mode = mode
        # split() alternates literal chunks and field names, starting and
        # ending with a (possibly empty) literal chunk.
        pieces = _FIELD.split(self.template)
        self._literals: list[bytes] = pieces[0::2]
        self._fields: list[str] = [name.decode("ascii") for name in pieces[1::2]]

    def __repr__(self) -> str:
        return f"BytesFormat({self.template!r}, mode={self.mode!r})"

    def format(self, *args: object, **kwargs: object) -> bytes:
        """Return the template with its fields replaced.

        Values that are bytes-like, or define ``__bytes__``, are converted
        with :class:`bytes`; anything else is turned into :class:`str` and
        encoded as UTF-8 (lone surrogates from ``surrogateescape`` decoding
        become the bytes they stand for).

        :param args: Values for the numbered fields, ``{0}``, ``{1}``, ...
        :param kwargs: Values for the named fields.
        :returns: The filled-in template.
        :raises KeyError: In ``'strict'`` mode, a named field has no value.
        :raises IndexError: In ``'strict'`` mode, a numbered field has no value.
        :raises UnicodeEncodeError: A value holds a surrogate that
            ``surrogateescape`` cannot encode.
        """
        literals = self._literals
        out = [literals[0]]
        for name, literal in zip(self._fields, literals[1:], strict=True):
            if name.isdigit():
                index = int(name)
                if index < len(args):
                    out.append(_to_bytes(args[index]))
                elif self.mode == "strict":
                    raise IndexError(index)
                elif self.mode == "ignore":
                    out.append(b"{%s}" % name.encode("ascii"))
            elif name in kwargs:
                out.append(_to_bytes(kwargs[name]))
            elif self.mode == "strict":
                raise KeyError(name)
            elif self.mode == "ignore":
                out.append(b"{%s}" % name.encode("ascii"))
            out.append(literal)
        return b"".join(out)


def _to_bytes(value: object) -> bytes:
    """Convert a field value: ``bytes()`` where it applies, else UTF-8 text."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    # bytes(5) would mean five NUL bytes, so only objects that say how they
    # become bytes go through bytes().
    if isinstance(value, SupportsBytes):
        return bytes(value)
    return str(value).encode("utf-8", "surrogateescape")
