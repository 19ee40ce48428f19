"""Sphinx directives that write the ``slimta`` command's reference from its code.

The pages of the command (``docs/command.rst``) never repeat by hand what
the command knows about itself, so they cannot drift from it:

``.. slimta-config-reference::``
    Every section and key of the configuration file, from
    :data:`slimta.cli.schema.SECTIONS`: the same table the loader,
    ``slimta check-config`` and ``slimta example-config`` are driven by.

``.. slimta-command-help::``
    ``slimta --help`` and the ``--help`` of every subcommand, from the
    command's own argument parser (a subcommand added to it gets its section
    here without a change to the docs).

``.. slimta-example-config::``
    The output of ``slimta example-config``, as a TOML literal block.

``.. example-help:: NAME``
    The ``--help`` of ``examples/NAME``, run at build time.

Each directive writes reStructuredText (``slimta_reference.py``, which the
tests read too) and parses it in place, so the generated sections get
titles, labels (``config-<section>``, ``command-<subcommand>``) and entries
in the table of contents.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from slimta_reference import (
    command_help_lines,
    config_reference_lines,
    example_config_lines,
    example_help_lines,
)
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


class _Generated(SphinxDirective):
    """Parses the reST lines of :meth:`lines` where the directive stands."""

    has_content = False

    def lines(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        source = self.get_source_info()[0] or "<generated>"
        content = StringList()
        for number, line in enumerate(self.lines()):
            content.append(line, source, number)
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, content, container)
        return list(container.children)


class ConfigReference(_Generated):
    def lines(self) -> list[str]:
        return config_reference_lines()


class CommandHelp(_Generated):
    def lines(self) -> list[str]:
        return command_help_lines()


class ExampleConfig(_Generated):
    def lines(self) -> list[str]:
        return example_config_lines()


class ExampleHelp(_Generated):
    required_arguments = 1

    def lines(self) -> list[str]:
        return example_help_lines(self.arguments[0])


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("slimta-config-reference", ConfigReference)
    app.add_directive("slimta-command-help", CommandHelp)
    app.add_directive("slimta-example-config", ExampleConfig)
    app.add_directive("example-help", ExampleHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
