"""Sphinx configuration for the slimta documentation.

The package must be installed (``pip install -e '.[docs]'``); autodoc imports
it from there. The build needs no network access: no intersphinx.

``_ext/slimta_docs.py`` writes the ``slimta`` command's reference (its
``--help`` texts and every configuration key) from the command's own code.
The code blocks of the pages are run by ``tests/unit/test_docs_blocks.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import slimta.core

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "slimta"
author = "slimta developers"
copyright = "slimta developers"
release = slimta.core.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "slimta_docs",
]

exclude_patterns = ["_build"]
root_doc = "index"

# Cross-references to objects outside these docs (the stdlib, gevent) stay
# plain text instead of warnings.
nitpicky = False

autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_typehints = "signature"
autoclass_content = "class"

html_theme = "alabaster"
html_title = f"slimta {release}"
