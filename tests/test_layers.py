"""Layers: the domain (errors, the engine, the worker, the store, the runner) and the client
need no web framework.

Each module is imported in a fresh interpreter, so that what the test process has imported
already cannot hide an import.
"""

import subprocess
import sys

import pytest

WEB_FRAMEWORKS = ("fastapi", "starlette")
DOMAIN = [
    "service.core.errors",
    "service.core.engine",
    "service.runner.worker",
    "service.state.base",
    "service.runner.local",
    "service.runner.forkserver",  # the process every training worker is forked from
    "service.client",  # other services import it: it must not drag a server framework in
]


@pytest.mark.parametrize("module", DOMAIN)
def test_the_domain_imports_no_web_framework(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"web = sorted(m for m in sys.modules if m.split('.')[0] in {WEB_FRAMEWORKS!r})\n"
        "assert not web, web\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
