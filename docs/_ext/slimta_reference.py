"""The reStructuredText of the ``slimta`` command's reference, written from its code.

Plain functions returning lines of reST, with no Sphinx import, so that
``tests/unit/test_docs_blocks.py`` can check them without Sphinx installed;
``slimta_docs.py`` puts them into the pages as directives.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "command_help",
    "command_help_lines",
    "config_reference_lines",
    "example_config_lines",
    "example_help_lines",
]

#: Width of the generated ``--help`` texts, whatever the terminal's.
HELP_COLUMNS = "80"

#: The underline of the generated titles: a level below the page's ``-``.
TITLE_UNDERLINE = "~"


def _title(text: str) -> list[str]:
    return [text, TITLE_UNDERLINE * len(text), ""]


def _literal(text: str, language: str = "text") -> list[str]:
    lines = [f".. code-block:: {language}", ""]
    lines += [f"   {line}" if line else "" for line in text.rstrip("\n").split("\n")]
    return [*lines, ""]


def _text(text: str) -> str:
    """*text* as plain reST text: markup characters escaped."""
    return re.sub(r"([\\*`|_])", r"\\\1", text)


def _inline(text: str) -> str:
    """*text* as an inline literal, safe for any content."""
    return ":code:`" + text.replace("\\", "\\\\").replace("`", "\\`") + "`"


def config_reference_lines() -> list[str]:
    """The reference of every configuration section and key, as reST lines."""
    from slimta.cli.schema import SECTIONS, Shape, toml_value

    lines: list[str] = []
    for sec in SECTIONS:
        if sec.shape is Shape.NAMED:
            heading = f"[{sec.name}.<name>]"
            form = (
                f"Written as ``[{sec.name}.<name>]`` tables (the name is yours) or as "
                + " ".join(f"``[[{alias}]]``" for alias in sec.aliases)
                + " entries."
            )
        elif sec.shape is Shape.ARRAY:
            heading = f"[[{sec.name}]]"
            form = f"Written as ``[[{sec.name}]]`` entries, as many as needed."
        elif sec.shape is Shape.MAPPING:
            heading = f"[{sec.name}]"
            assert sec.key_kind is not None
            form = _text(
                f"Its keys are free: each is {sec.key_kind.what}, its value "
                f"{sec.keys[0].kind.what}."
            )
        else:
            heading = f"[{sec.name}]"
            form = ""
        lines += [f".. _config-{sec.name.replace('.', '-')}:", ""]
        lines += _title(heading)
        lines += [_text(sec.doc), ""]
        if form:
            lines += [form, ""]
        if sec.shape is Shape.MAPPING:
            (key,) = sec.keys
            lines += [_text(key.doc), "", "Example:", ""]
            lines += _literal(
                f'[{sec.name}]\n"alice@example.com" = {toml_value(key.example)}', "toml"
            )
            continue
        for key in sec.keys:
            lines.append(f"``{key.name}``")
            facts = [_text(key.doc), "", f":Value: {_text(key.kind.what)}"]
            if key.required:
                facts.append(":Required: when the section is present")
            elif key.default_doc is not None:
                facts.append(f":Default: {_text(key.default_doc)}")
            elif key.default is not None:
                facts.append(f":Default: {_inline(toml_value(key.default))}")
            else:
                facts.append(":Default: unset")
            if key.example is not None:
                facts.append(f":Example: {_inline(f'{key.name} = {toml_value(key.example)}')}")
            lines += [f"   {fact}" if fact else "" for fact in facts]
            lines.append("")
    return lines


@contextmanager
def _columns(width: str) -> Iterator[None]:
    """argparse wraps help to $COLUMNS: fix it while the help is written."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def command_help() -> list[tuple[str, str]]:
    """``[(name, help text)]``: ``slimta`` itself, then each subcommand in order."""
    import argparse

    from slimta.cli import _parser

    with _columns(HELP_COLUMNS):
        parser = _parser()
        texts = [("slimta", parser.format_help())]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    texts.append((f"slimta {name}", sub.format_help()))
    return texts


def command_help_lines() -> list[str]:
    lines: list[str] = []
    for name, text in command_help():
        label = name.replace(" ", "-")
        lines += [f".. _command-{label}:", ""]
        lines += _title(f"``{name}``")
        lines += _literal(text)
    return lines


def example_config_lines() -> list[str]:
    from slimta.cli.example import render_example

    return _literal(render_example(), "toml")


def example_help_lines(name: str) -> list[str]:
    """``python examples/<name> --help``; the examples patch the standard
    library with gevent when imported, so they run in a process of their own."""
    script = Path(__file__).resolve().parents[2] / "examples" / name
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": HELP_COLUMNS},
    )
    return _literal(result.stdout)
