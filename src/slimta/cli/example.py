"""``slimta example-config``: a commented configuration file covering every key.

Written from :data:`slimta.cli.schema.SECTIONS`, so it always matches what
the loader accepts; a unit test checks that it passes ``check-config`` as it
is, and with every setting uncommented too.

Lines ``#key = value`` (a ``#`` directly followed by the setting) are
settings left at their default or off; prose comments start with ``# ``.
"""

from __future__ import annotations

import textwrap

from slimta.cli.schema import SECTIONS, Key, Section, Shape, toml_value

__all__ = ["render_example"]

_WIDTH = 78

_HEADER = """\
# slimta configuration (TOML), as written by "slimta example-config".
#
# Check a file with "slimta check-config FILE", run it with
# "slimta serve --config FILE"; "slimta serve" alone runs the defaults.
# Each setting is shown with its default. Lines "#key = value" are left at
# their default or unset: remove the "#" to use them. Relative paths are
# relative to the directory of this file.
"""


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent="# ", subsequent_indent="# ")


def _key_lines(key: Key, active: bool) -> list[str]:
    lines = _comment(key.doc)
    if key.default_doc is not None:
        lines += _comment(f"Default: {key.default_doc}.")
    if key.default is not None and not (isinstance(key.default, list) and key.example):
        value = key.default
    else:
        value = key.example
        active = False
    setting = f"{key.name} = {toml_value(value)}"
    lines.append(setting if active else "#" + setting)
    return lines


def _table(header: str, sec: Section, active: bool) -> list[str]:
    lines = [header if active else "#" + header]
    for key in sec.keys:
        lines.append("")
        lines += _key_lines(key, active)
    return lines


def _section_lines(sec: Section) -> list[str]:
    lines = [f"# == {sec.name} " + "=" * max(3, _WIDTH - 6 - len(sec.name))]
    lines += _comment(sec.doc)
    active = sec.example_active
    if sec.shape is Shape.TABLE:
        lines += _table(f"[{sec.name}]", sec, active)
    elif sec.shape is Shape.ARRAY:
        lines += _table(f"[[{sec.name}]]", sec, active)
    elif sec.shape is Shape.NAMED:
        lines += _table(f"[{sec.name}.smtp]", sec, active)
        lines.append("")
        lines += _comment("Another one, in the [[listener]] form:")
        lines.append("#[[listener]]")
        lines.append('#kind = "submission"')
        lines.append('#address = "0.0.0.0:587"')
    else:  # a mapping: free keys, one documented value
        (key,) = sec.keys
        lines.append(f"[{sec.name}]" if active else f"#[{sec.name}]")
        lines += _comment(key.doc)
        lines.append(f'#"alice@example.com" = {toml_value(key.example)}')
    return lines


def render_example() -> str:
    """The example configuration file, as text."""
    lines = [_HEADER]
    for sec in SECTIONS:
        lines += _section_lines(sec)
        lines.append("")
    return "\n".join(lines)
