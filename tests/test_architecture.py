"""docs/architecture.md's import tables are the code's and the contracts'.

The tables between the markers below are written from the import graph (grimp, which
import-linter reads too) and from [tool.importlinter] in pyproject.toml. When the test fails,
`python -m tests.test_architecture` writes them again; read the difference before committing it.
"""

import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grimp

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PYPROJECT = ROOT / "pyproject.toml"
BEGIN = "<!-- imports: written by `python -m tests.test_architecture`, checked by its test -->"
END = "<!-- end of imports -->"


def contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def layers() -> list[list[str]]:
    """The layers contract's layers, top first, each the names of its packages or modules."""
    return [[t.strip() for t in layer.split(":")] for layer in contracts()["layers"]["layers"]]


def packages() -> list[str]:
    """The table's rows: "top" (the entry points' layer), the other layers, the client."""
    return ["top", *(layer[0] for layer in layers()[1:]), "client"]


def package_of(module: str) -> str | None:
    """The row a module of service belongs to; None for the root package (its version only)."""
    parts = module.split(".")
    if parts[0] != "service" or len(parts) == 1:
        return None
    return "top" if parts[1] in layers()[0] else parts[1]


def may_import() -> dict[str, list[str]]:
    """What each row may import: the layers below it; the entry points also the client, which
    imports service.core only."""
    below = [layer[0] for layer in layers()[1:]]
    rules = {name: below[i + 1 :] for i, name in enumerate(below)}
    return {"top": [*below, "client"], **rules, "client": ["core"]}


def third_party(names: Iterable[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] not in sys.stdlib_module_names}


def real_imports() -> dict[str, tuple[set[str], set[str]]]:
    """Per row: the rows its modules import, and the third-party libraries they import (at any
    depth of a function: grimp reads every import statement)."""
    graph = grimp.build_graph("service", include_external_packages=True)
    table: dict[str, tuple[set[str], set[str]]] = {p: (set(), set()) for p in packages()}
    for module in graph.modules:
        row = package_of(module)
        if row is None:
            continue
        ours, theirs = table[row]
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] != "service":
                theirs |= third_party([imported])
            elif (other := package_of(imported)) not in (None, row):
                ours.add(other)
    return table


def code(names: Iterable[str]) -> str:
    """Names as code, in the tables' order of packages, then alphabetically."""
    order = packages()
    return (
        ", ".join(
            f"`{n}`" for n in sorted(names, key=lambda n: (order.index(n) if n in order else 99, n))
        )
        or "—"
    )


def table() -> str:
    """The two tables as docs/architecture.md holds them, markers included."""
    top = ", ".join(f"`{m}`" for m in layers()[0])
    rows = [
        "| package | may import | imports | third-party libraries it imports |",
        "|---|---|---|---|",
    ]
    rules, real = may_import(), real_imports()
    for row in packages():
        name = f"the entry points ({top})" if row == "top" else f"`{row}`"
        ours, theirs = real[row]
        rows.append(f"| {name} | {code(rules[row])} | {code(ours)} | {code(theirs)} |")
    c = contracts()
    only = {
        lib: sorted({i.split(" -> ")[0] for i in c[lib]["ignore_imports"]})
        for lib in ("torch", "matplotlib")
    }
    sources = {package_of(m) for m in c["web"]["source_modules"]}
    web = " and ".join(
        "the entry points" if p == "top" else f"`service.{p}`"
        for p in packages()
        if p not in sources
    )
    rows += [
        "",
        "| library | imported only by | contract |",
        "|---|---|---|",
        *(f"| `{lib}` | {code(mods)} | `{lib}` |" for lib, mods in only.items()),
        f"| {code(c['web']['forbidden_modules'])} | {web}; never (not even through "
        f"another module) {code(c['web']['source_modules'])} | `web` |",
    ]
    return "\n".join([BEGIN, *rows, END])


def section(doc: str) -> str:
    start, end = doc.index(BEGIN), doc.index(END) + len(END)
    return doc[start:end]


def test_the_import_tables_are_the_codes() -> None:
    assert section(DOC.read_text()) == table(), (
        "docs/architecture.md's import tables are out of date: `python -m tests.test_architecture`"
        " writes them again"
    )


def test_every_package_imports_only_what_it_may() -> None:
    """The layers contract (lint-imports) checks the layers; this the table's rule for the
    client too: only the entry points import it."""
    rules = may_import()
    for row, (ours, _) in real_imports().items():
        assert ours <= set(rules[row]), (row, ours - set(rules[row]))


if __name__ == "__main__":
    doc = DOC.read_text()
    DOC.write_text(doc.replace(section(doc), table()))
