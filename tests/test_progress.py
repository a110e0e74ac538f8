"""Long work shows its progress where people wait: the command line in a pseudo-terminal, and
the client's wait(progress=...) in a terminal, in a file and in a real Jupyter kernel, on both
stores (real servers, nothing of ours mocked)."""

import asyncio
import io
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pexpect
import pytest

from service.client import AsyncSGDClient, FitOptions, SGDClient, WaitTimeout
from service.core.schemas import Job, JobStatus
from tests.conftest import TIMEOUT, TUTORIAL, Server, wait_job, wait_until

pytestmark = pytest.mark.timeout(180)

X, Y = TUTORIAL["x"], TUTORIAL["y"]
FIT_ARGS = ["--x", "1", "2", "3", "--y", "2", "4", "6"]
# A fit of a few seconds: long enough for many redraws of a bar (tqdm draws at most every 0.1 s)
EPOCHS = 300_000
SECONDS: FitOptions = {"epochs": EPOCHS, "batch_size": 64, "seed": 1}
SECONDS_ARGS = [*FIT_ARGS, "--epochs", str(EPOCHS), "--batch-size", "64", "--seed", "1"]
SPLIT: FitOptions = {**SECONDS, "fit_intercept": True, "validation_fraction": 0.3}
# A fit that runs for minutes: cancelled by the tests that start it
LONG: FitOptions = {"epochs": 1_000_000, "batch_size": 65_536, "seed": 1}
LONG_ARGS = [*FIT_ARGS, "--epochs", "1000000", "--batch-size", "65536", "--seed", "1"]
ADVANCED_LONG = r"running:\s+\d+%\|[^|]*\|\s*[1-9]\d*/1000000"  # the long fit's bar moved
# A bar's counter as tqdm draws it: "running:  42%|####  | 126000/300000 [00:01<00:02, ..."
COUNTS = re.compile(r"(queued|running|succeeded|failed|cancelled):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


@pytest.fixture
def http(shared_server: Server) -> Iterator[httpx.Client]:
    with shared_server.client() as client:
        yield client


def cli(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "service", args[0], "--url", url, *args[1:]]


class Terminal:
    """A command in a pseudo-terminal of 120 columns (pexpect): its stdout and stderr are the
    screen a person reads."""

    def __init__(self, argv: list[str]) -> None:
        self.child = pexpect.spawn(
            argv[0], argv[1:], encoding="utf-8", timeout=TIMEOUT * 6, dimensions=(24, 120)
        )
        self.screen = ""  # what was read so far

    def expect(self, pattern: str) -> "re.Match[str]":
        self.child.expect(pattern)
        assert isinstance(self.child.before, str)
        assert isinstance(self.child.match, re.Match)
        self.screen += self.child.before + self.child.match.group(0)
        return self.child.match

    def interrupt(self) -> None:
        self.child.sendintr()  # Ctrl-C: SIGINT to the terminal's foreground process

    def finish(self) -> tuple[int, str]:
        """Read to the end: the exit status and the whole screen."""
        self.child.expect(pexpect.EOF)
        assert isinstance(self.child.before, str)
        self.screen += self.child.before
        self.child.close()
        assert self.child.exitstatus is not None, self.screen
        return self.child.exitstatus, self.screen


def redraws(screen: str) -> list[tuple[str, int, int]]:
    """Every state of the bar drawn on the screen: (status, epochs done, epochs)."""
    return [(m[1], int(m[2]), int(m[3])) for m in COUNTS.finditer(screen)]


def assert_advanced(screen: str, epochs: int) -> None:
    """The bar was redrawn as the fit went: at least three different counts, never going back,
    the last of them all the fit's epochs."""
    counts = [done for _, done, total in redraws(screen) if total == epochs]
    assert len(set(counts)) >= 4, screen[-2000:]  # 0 and at least three advances
    assert counts == sorted(counts), counts
    assert counts[-1] == epochs


def cancel_if_running(http: httpx.Client, job_id: str) -> None:
    """Leave the shared server idle: a job a test started is cancelled if it still runs."""
    if http.get(f"/jobs/{job_id}").json()["status"] in ("queued", "running"):
        http.post(f"/jobs/{job_id}/cancel")
    wait_job(http, job_id)


# -- the command line ------------------------------------------------------------------------


def test_fit_wait_on_a_terminal_shows_a_bar(shared_server: Server, http: httpx.Client) -> None:
    terminal = Terminal(cli(shared_server.url, "fit", *SECONDS_ARGS, "--wait"))
    job_id = terminal.expect(r"job ([0-9a-f]{32}) queued; waiting \(Ctrl-C cancels it\)")[1]
    try:
        status, screen = terminal.finish()
        job = http.get(f"/jobs/{job_id}").json()
        assert job["status"] == "succeeded"
        assert status == 0
        assert_advanced(screen, EPOCHS)
        assert {"running", "succeeded"} <= {status for status, _, _ in redraws(screen)}
        for shown in ("epoch/s", "loss=", "w="):
            assert shown in screen
        version, w = job["result"]["model_version"], job["result"]["w"]
        # the last line names the version; no JSON for the person at the terminal
        last = screen.rstrip().splitlines()[-1]
        assert last == f"succeeded: model version {version} (w={w:.6g})"
        assert '"status"' not in screen
    finally:
        cancel_if_running(http, job_id)


def test_piped_output_is_todays_json(shared_server: Server, http: httpx.Client) -> None:
    """No terminal: stdout is the job exactly as `fit --wait` always printed it, stderr its one
    line; --progress adds the bar on stderr and changes nothing on stdout."""
    for extra in ([], ["--progress"]):
        done = subprocess.run(
            cli(shared_server.url, "fit", *FIT_ARGS, "--seed", "3", "--wait", *extra),
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 6,
        )
        job_id = done.stderr.split()[1]
        body = http.get(f"/jobs/{job_id}").content
        # what the command printed before this issue: the client's Job, as pydantic writes it
        assert done.stdout == Job.model_validate_json(body).model_dump_json(indent=2) + "\n"
        assert done.returncode == 0
        first = f"job {job_id} queued; waiting (Ctrl-C cancels it)\n"
        if extra:
            assert done.stderr.startswith(first)
            assert redraws(done.stderr)[-1] == ("succeeded", 100, 100)
        else:
            assert done.stderr == first


def test_json_on_a_terminal_prints_todays_json(shared_server: Server, http: httpx.Client) -> None:
    argv = cli(shared_server.url, "fit", *FIT_ARGS, "--seed", "4", "--wait", "--json")
    terminal = Terminal(argv)
    status, screen = terminal.finish()
    screen = screen.replace("\r\n", "\n")
    job_id = screen.split()[1]
    body = http.get(f"/jobs/{job_id}").content
    printed = Job.model_validate_json(body).model_dump_json(indent=2) + "\n"
    assert screen == f"job {job_id} queued; waiting (Ctrl-C cancels it)\n{printed}"
    assert status == 0


def test_ctrl_c_in_a_terminal_cancels_the_job(shared_server: Server, http: httpx.Client) -> None:
    terminal = Terminal(cli(shared_server.url, "fit", *LONG_ARGS, "--wait"))
    job_id = terminal.expect(r"job ([0-9a-f]{32}) queued")[1]
    try:
        terminal.expect(ADVANCED_LONG)
        terminal.interrupt()
        status, screen = terminal.finish()
        assert http.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
        assert status == 130
        assert screen.rstrip().endswith(f"interrupted: job {job_id} cancelled")
    finally:
        cancel_if_running(http, job_id)


def test_wait_follows_a_job_started_elsewhere(shared_server: Server, http: httpx.Client) -> None:
    """`wait JOB` shows a queued job as queued, then its run; Ctrl-C on a `wait` stops waiting
    and leaves the job alone (it may be someone else's)."""
    sgd = SGDClient(http)
    ahead, job = sgd.fit(X, Y, **LONG), sgd.fit(X, Y, **SECONDS)
    try:
        terminal = Terminal(cli(shared_server.url, "wait", job.id))
        terminal.expect(r"queued:\s+0%\|[^|]*\|\s*0/300000 \[00:0[1-9]")  # its time queued
        sgd.cancel(ahead.id)
        status, screen = terminal.finish()
        assert status == 0
        assert_advanced(screen, EPOCHS)
        result = sgd.job(job.id).result
        assert result is not None
        assert f"succeeded: model version {result.model_version} (w=" in screen

        piped = subprocess.run(
            cli(shared_server.url, "wait", job.id), capture_output=True, text=True, timeout=30
        )
        assert (piped.returncode, piped.stderr) == (0, "")
        assert piped.stdout == sgd.job(job.id).model_dump_json(indent=2) + "\n"

        other = sgd.fit(X, Y, **LONG)
        terminal = Terminal(cli(shared_server.url, "wait", other.id))
        terminal.expect(ADVANCED_LONG)
        terminal.interrupt()
        status, screen = terminal.finish()
        assert status == 130
        assert f"interrupted: stopped waiting; job {other.id} goes on" in screen
        assert sgd.job(other.id).status is JobStatus.running
        assert sgd.cancel(other.id).status is JobStatus.cancelled
    finally:
        for started in (ahead, job):
            cancel_if_running(http, started.id)


def test_a_failed_or_cancelled_job_ends_the_bar_with_why(
    shared_server: Server, http: httpx.Client
) -> None:
    sgd = SGDClient(http)
    failed = sgd.fit(X, Y, learning_rate=1000.0, seed=1)  # diverges
    status, screen = Terminal(cli(shared_server.url, "wait", failed.id)).finish()
    error = sgd.wait(failed.id).error
    assert error is not None
    assert status == 1
    assert screen.rstrip().splitlines()[-1] == f"failed: {error.title}: {error.detail}"

    cancelled = sgd.fit(X, Y, **LONG)
    sgd.cancel(cancelled.id)
    status, screen = Terminal(cli(shared_server.url, "wait", cancelled.id)).finish()
    assert status == 1
    assert screen.rstrip().splitlines()[-1] == "cancelled"


def test_progress_needs_wait(shared_server: Server) -> None:
    done = subprocess.run(
        cli(shared_server.url, "fit", *FIT_ARGS, "--progress"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    why = "--progress shows how a --wait goes; add --wait"
    assert done.stderr == f"sgd-service fit: error: {why}\n"


# -- the client ------------------------------------------------------------------------------

CLIENT_SCRIPT = """
import sys
import httpx
from service.client import SGDClient
with httpx.Client(base_url=sys.argv[1], timeout=10) as http:
    sgd = SGDClient(http)
    job = sgd.wait(sgd.fit([1, 2, 3], [2, 4, 6], **{options}).id, progress=True)
print("returned", job.status.value, job.result.model_version)
"""


def test_the_clients_bar_in_a_terminal(shared_server: Server, http: httpx.Client) -> None:
    """progress=True in a terminal: tqdm.auto draws text on stderr, the screen shows it."""
    script = CLIENT_SCRIPT.format(options=repr(dict(SECONDS)))
    terminal = Terminal([sys.executable, "-c", script, shared_server.url])
    returned = terminal.expect(r"returned (\w+) (\d+)")
    screen = terminal.screen
    status, _ = terminal.finish()
    assert (returned[1], status) == ("succeeded", 0)
    assert_advanced(screen, EPOCHS)
    version = int(returned[2])
    assert http.get(f"/models/{version}").json()["w"] == pytest.approx(2.0)


def test_the_clients_bar_in_a_file_sync_and_async(shared_server: Server) -> None:
    """A text file gets the bar; the job returned is the one wait() returns without a bar."""
    out = io.StringIO()
    with shared_server.client() as http:
        sgd = SGDClient(http)
        job = sgd.wait(sgd.fit(X, Y, **SECONDS).id, progress=out)
        assert job == sgd.wait(job.id)
    assert job.status is JobStatus.succeeded
    assert_advanced(out.getvalue(), EPOCHS)

    async def run_async() -> tuple[Job, Job]:
        async with httpx.AsyncClient(base_url=shared_server.url, timeout=TIMEOUT) as http:
            sgd = AsyncSGDClient(http)
            started = await sgd.fit(X, Y, **SPLIT)
            shown = await sgd.wait(started.id, progress=async_out)
            return shown, await sgd.wait(started.id)

    async_out = io.StringIO()
    shown, plain = asyncio.run(run_async())
    assert shown == plain
    assert shown.status is JobStatus.succeeded
    assert_advanced(async_out.getvalue(), EPOCHS)
    assert "b=" in async_out.getvalue()
    assert "val_loss=" in async_out.getvalue()


def test_a_bar_keeps_wait_s_deadline(shared_server: Server, http: httpx.Client) -> None:
    sgd = SGDClient(http)
    job = sgd.fit(X, Y, **LONG)
    try:
        # started: a WaitTimeout on a busy machine then carries a running job, never a queued one
        wait_until(lambda: sgd.job(job.id).status is JobStatus.running, 60.0, "the fit's start")
        out = io.StringIO()
        with pytest.raises(WaitTimeout) as timed_out:
            sgd.wait(job.id, timeout=1.0, progress=out)
        assert timed_out.value.job.status is JobStatus.running  # its state at the deadline
        assert timed_out.value.job.progress.epoch > 0
        assert redraws(out.getvalue())[-1][0] == "running"

        async def run_async() -> None:
            async with httpx.AsyncClient(base_url=shared_server.url, timeout=TIMEOUT) as client:
                with pytest.raises(WaitTimeout):
                    await AsyncSGDClient(client).wait(job.id, timeout=1.0, progress=io.StringIO())

        asyncio.run(run_async())
    finally:
        cancel_if_running(http, job.id)


def notebook_widgets(url: str, options: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Run the client's progress=True in a real Jupyter kernel (nbclient, as Jupyter runs a
    cell): the cell's outputs, and the state of the widgets it drew."""
    import nbclient
    import nbformat

    cell = CLIENT_SCRIPT.replace("sys.argv[1]", repr(url)).format(options=repr(options))
    new_cell, new_notebook = nbformat.v4.new_code_cell, nbformat.v4.new_notebook
    notebook = new_notebook(cells=[new_cell(cell)])  # type: ignore[no-untyped-call]
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", store_widget_state=True
    )
    client.execute()
    state = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return notebook.cells[0].outputs, {k: v["state"] for k, v in state.items()}


def test_the_clients_bar_in_a_notebook(
    shared_server: Server, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """progress=True in Jupyter: tqdm.auto draws an ipywidgets bar (not text) whose last state
    is the whole fit, in green, with the job's status."""
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # Jupyter's new paths: no warning of them
    outputs, widgets = notebook_widgets(shared_server.url, dict(SECONDS))
    printed = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    found = re.search(r"returned succeeded (\d+)", printed)
    assert found is not None, outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), (
        outputs
    )
    assert COUNTS.search(printed) is None  # no text bar in the cell's output
    bars = [w for w in widgets.values() if w["_model_name"] == "FloatProgressModel"]
    assert [(b["value"], b["max"], b["bar_style"]) for b in bars] == [(EPOCHS, EPOCHS, "success")]
    texts = [w["value"] for w in widgets.values() if w["_model_name"] == "HTMLModel"]
    assert any(t.startswith("succeeded:") for t in texts), texts
    assert any(f"{EPOCHS}/{EPOCHS}" in t and "loss=" in t for t in texts), texts
    assert http.get(f"/models/{found.group(1)}").status_code == 200


def test_importing_the_client_does_not_import_tqdm() -> None:
    """Other services import the client: tqdm comes only with a bar."""
    code = "import sys, service.client; print('tqdm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout == "False\n", done.stderr
