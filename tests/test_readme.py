"""The README's examples, run against a live server: each prints what the README says it prints.

An example's documented output is the `# ...` comment under a command (or beside a Python
call); `…` stands for the rest of a value. The examples fix their seed, so that the numbers
they show are the numbers a reader gets.
"""

import contextlib
import io
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TIMEOUT, Server, start_server

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
DEFAULT = "localhost:8000"


def block(after: str, language: str) -> str:
    """The first ```language block after a heading."""
    start = README.index(after)
    return README[start:].split(f"```{language}\n", 1)[1].split("```", 1)[0]


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, documented output lines); a `#  ` line continues the line above it."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("#  ") and out and out[-1][1]:
            out[-1][1][-1] += line[3:]
        elif line.startswith("# ") and out:
            out[-1][1].append(line[2:])
        elif line.strip():
            out.append((line, []))
    return out


def agrees(documented: str, printed: str) -> bool:
    """Some printed line shows the documented one, `…` standing for anything."""
    regex = re.compile(".*?".join(map(re.escape, documented.split("…"))))
    return any(regex.search(line) for line in printed.splitlines())


def run_until(argv: list[str], expected: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command until its output shows every documented line (a job may still be running);
    a command that changes something (a POST, a fit) runs once."""
    deadline = time.monotonic() + 60.0
    once = "POST" in argv or "fit" in argv
    while True:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=env)
        if all(agrees(line, done.stdout) for line in expected):
            return done.stdout
        if once or time.monotonic() > deadline:
            raise AssertionError(f"{shlex.join(argv)} printed {done.stdout!r}, not {expected}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of this module's own: the README's first fit publishes model version 1."""
    srv = start_server(str(tmp_path_factory.mktemp("readme")))
    yield srv
    srv.stop()


def test_the_tutorial_over_http(server: Server) -> None:
    host = server.url.removeprefix("http://")
    job_id = ""
    for command, expected in commands(block("## The tutorial, over HTTP", "bash")):
        argv = shlex.split(command.replace(DEFAULT, host), comments=True)
        argv = [a.replace("4f0c…", job_id) for a in argv]
        expected = [e.replace("4f0c…", job_id or "…") for e in expected]
        printed = run_until(argv, expected)
        if not job_id:  # the fit: later examples use its id where the README shows 4f0c…
            found = re.search(r'"id":"([0-9a-f]{32})"', printed)
            assert found is not None, printed
            job_id = found.group(1)
    assert job_id


@pytest.mark.parametrize(
    ("heading", "count"),
    [("### Predictions that say how sure they are", 4), ("### Learning from what happened", 10)],
)
def test_the_examples_of_a_section(
    tmp_path_factory: pytest.TempPathFactory, heading: str, count: int
) -> None:
    """On a server of its own: the example's fits are the first versions there."""
    srv = start_server(str(tmp_path_factory.mktemp("readme-section")))
    try:
        host = srv.url.removeprefix("http://")
        examples = commands(block(heading, "bash"))
        assert len(examples) == count
        for command, expected in examples:
            run_until(shlex.split(command.replace(DEFAULT, host), comments=True), expected)
    finally:
        srv.stop()


def test_the_command_line(server: Server) -> None:
    env = {"PATH": str(Path(sys.executable).parent), "SGD_URL": server.url}
    for command, _ in commands(block("## Command line", "bash")):
        argv = shlex.split(command, comments=True)
        comment = command.split("  #", 1)[1].strip() if "  #" in command else ""
        # an output shown beside the command: `# 7.99988…` (the words after a colon explain it)
        expected = [comment.split(":", 1)[0]] if comment[:1].isdigit() else []
        if argv[1] == "serve":
            continue  # the server is already running
        if "--plot" in argv:
            argv[-1] = str(Path(server.log_path).with_name(argv[-1]))
        printed = run_until(argv, expected, env)
        if "--wait" in argv:
            assert '"status": "succeeded"' in printed
        if "--plot" in argv:
            assert Path(argv[-1]).read_bytes().startswith(b"\x89PNG")


def test_the_client_example(server: Server) -> None:
    code = block("## A client for other services", "python").replace(
        "http://127.0.0.1:8000", server.url
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})  # our own README's example
    lines = printed.getvalue().splitlines()
    comments = [m.group(1) for m in re.finditer(r"print\(sgd\.[^\n]*?# (.*)", code)]
    assert comments, "the example documents what it prints"
    for documented in comments:
        assert any(agrees(documented, line) for line in lines), (documented, lines[-3:])
    assert any(line.startswith("epoch ") for line in lines)  # its progress events
