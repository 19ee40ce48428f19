"""Key templates: ``str.format``-style text with named fields, and nothing else.

A template such as ``'alias:{domain}:{localpart}'`` is parsed once, when the
driver is made, into literal text and field names. Rendering joins the
literal text with ``str()`` of each named value; the values are never parsed
again, so a ``{`` in a local part is plain text. Only bare names are
allowed: attribute and index lookups (``{address.__class__}``), conversions
and format specs are refused when the template is parsed, so a template
cannot reach anything but the values it is given.
"""

from __future__ import annotations

import string
from collections.abc import Mapping

__all__ = ["KeyTemplate"]


class KeyTemplate:
    """A parsed key template.

    :param template: e.g. ``'{address}'``; ``{{`` and ``}}`` stand for
        braces.
    :raises ValueError: a field is not a bare name (``{}``, ``{0}``,
        ``{a.b}``, ``{a[0]}``, ``{a!r}``, ``{a:>9}``) or a brace is unmatched.
    """

    __slots__ = ("_parts", "fields", "template")

    def __init__(self, template: str) -> None:
        #: The template text as given.
        self.template = template
        parts: list[tuple[str, str | None]] = []
        for literal, name, spec, conversion in string.Formatter().parse(template):
            if name is not None and (not name.isidentifier() or spec or conversion is not None):
                raise ValueError(f"template fields must be bare names: {template!r}")
            parts.append((literal, name))
        self._parts = tuple(parts)
        #: The names the template uses.
        self.fields = frozenset(name for _, name in parts if name is not None)

    def render(self, values: Mapping[str, object]) -> str:
        """The key for *values*.

        :raises KeyError: a field of the template is not in *values*.
        """
        out: list[str] = []
        for literal, name in self._parts:
            out.append(literal)
            if name is not None:
                out.append(str(values[name]))
        return "".join(out)

    def __repr__(self) -> str:
        return f"KeyTemplate({self.template!r})"
