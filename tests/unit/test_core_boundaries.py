"""The seams of the SMTP core, checked in the source (design.md, issue 11).

The sans-IO core imports only the standard library's pure parts and its own
modules; the SMTP edge drives :class:`~slimta.smtp.server.Server` through
its public methods only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import slimta.edge.smtp
import slimta.smtp

SMTP_DIR = Path(slimta.smtp.__file__).parent
CORE_MODULES = (
    "_address",
    "_buffer",
    "_client",
    "_client_state",
    "_errors",
    "_events",
    "_extensions",
    "_reply",
    "_server",
    "_state",
)
#: Standard library modules the core may use: nothing that does I/O, keeps
#: time or logs.
ALLOWED_STDLIB = {
    "__future__",
    "base64",
    "binascii",
    "collections",
    "dataclasses",
    "enum",
    "functools",
    "ipaddress",
    "re",
    "types",
    "typing",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.add(node.module or "")
    return names


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_imports_only_itself(module: str) -> None:
    for name in imported_modules(SMTP_DIR / f"{module}.py"):
        top = name.split(".")[0]
        if top == "slimta":
            assert re.fullmatch(r"slimta\.smtp\._[a-z_]+", name), f"{module} imports {name}"
            assert name.rsplit(".", 1)[1] in CORE_MODULES, f"{module} imports {name}"
        else:
            assert top in ALLOWED_STDLIB, f"{module} imports {name}"


def test_edge_uses_only_public_server_members() -> None:
    source = Path(slimta.edge.smtp.__file__).read_text(encoding="utf-8")
    assert not re.findall(r"\bserver\._\w+", source)
