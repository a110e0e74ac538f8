"""Layers: import-linter's contracts ([tool.importlinter] in pyproject.toml) hold, and they bite.

`make lint` runs `lint-imports` on the real tree. These tests show that the contracts would catch
a wrong import: each adds one to a copy of service/ and runs lint-imports on that copy, which
must then fail and name the contract the import breaks, and the import.
"""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def contract_names() -> dict[str, str]:
    """The contracts' names by id, as pyproject.toml declares them."""
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    return {c["id"]: c["name"] for c in config["contracts"]}


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with the project's contracts on the `service` package found first from
    `cwd` (lint-imports puts its working directory first on the path)."""
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", str(PYPROJECT)],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "250", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_tree_keeps_every_contract() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    names = contract_names()
    for name in names.values():
        assert f"{name} KEPT" in done.stdout
    assert f"Contracts: {len(names)} kept, 0 broken." in done.stdout


# (file under service/, line added at its end, contract id, what the report must say)
WRONG = [
    ("core/errors.py", "import fastapi", "web", "service.core.errors -> fastapi"),
    (
        "state/base.py",
        "from service.http import app",
        "layers",
        "service.state is not allowed to import service.http",
    ),
    (
        "state/redis.py",
        "from starlette.types import Scope",
        "web",
        "service.state.redis -> starlette",
    ),
    (
        "runner/queue_worker.py",
        "from service.http import deps",
        "layers",
        "service.runner.queue_worker -> service.http.deps",
    ),
    (
        "runner/fleet.py",
        "import prometheus_client",
        "web",
        "service.runner.fleet -> prometheus_client",
    ),
    (
        "http/api.py",
        "def later() -> None:\n    import torch",  # inside a function: it counts too
        "torch",
        "service.http.api -> torch",
    ),
    ("runner/local.py", "import torch", "torch", "service.runner.local -> torch"),
    ("http/plotter.py", "import matplotlib", "matplotlib", "service.http.plotter -> matplotlib"),
    (
        "client.py",
        "from service.state import base",
        "client",
        "service.client -> service.state.base",
    ),
    (
        "client.py",
        "from service.core import engine",
        "client",
        "service.client is not allowed to import torch",
    ),
    (
        "core/schemas.py",
        "from service.runner import base",
        "layers",
        "service.core.schemas -> service.runner.base",
    ),
    ("jobs.py", "", "layers", "service.jobs"),  # a new module must take its place in a layer
    (  # the circle this layout broke: the consumer importing the producer
        "runner/queue_worker.py",
        "from service.runner import fleet",
        "acyclic",
        "- .queue_worker -> .fleet (1 import)",
    ),
]


@pytest.mark.parametrize(
    ("path", "line", "contract", "report"), WRONG, ids=[f"{w[0]}:{w[2]}" for w in WRONG]
)
def test_a_wrong_import_breaks_its_contract(
    tmp_path: Path, path: str, line: str, contract: str, report: str
) -> None:
    shutil.copytree(
        ROOT / "service", tmp_path / "service", ignore=shutil.ignore_patterns("__pycache__")
    )
    target = tmp_path / "service" / path
    with target.open("a") as f:
        f.write(f"\n{line}  # deliberately wrong\n" if line else "")
    done = lint_imports(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{contract_names()[contract]} BROKEN" in done.stdout, done.stdout
    assert report in done.stdout, done.stdout


def test_every_module_is_under_a_contract() -> None:
    """The layers contract is exhaustive over service/'s children, so a module is either in a
    layer's package or is the client; the Redis modules are in the graph import-linter reads."""
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["id"] == "layers"]
    tails = {t.strip() for layer in layers["layers"] for t in layer.split(":")}
    places = {f"service.{t}" for t in tails | set(layers["exhaustive_ignores"])}
    modules = grimp.build_graph("service").modules - {"service"}
    assert {"service.state.redis", "service.runner.fleet", "service.runner.queue_worker"} <= modules
    outside = {m for m in modules if not any(m == p or m.startswith(f"{p}.") for p in places)}
    assert not outside


# What import-linter cannot see: whether an import runs when its module loads or only inside a
# function. The server, the command line and the client load neither torch nor matplotlib (the
# worker processes and the plotting process import them inside their own process).
LIGHT = ["service.__main__", "service.server", "service.http.app", "service.cli", "service.client"]


def test_the_server_and_the_client_load_no_torch_nor_matplotlib() -> None:
    code = (
        f"import sys, {', '.join(LIGHT)}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib'))\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
