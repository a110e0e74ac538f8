"""The command line: fit, predict and history against a real server (`--url`)."""

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.__main__ import main
from service.server import DrainingServer
from tests.conftest import TIMEOUT, Server, free_port, start_server, wait_until
from tests.test_client import RecordingService

TUTORIAL_ARGS = ["--x", "1", "2", "3", "--y", "2", "4", "6"]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # SGD_MAX_EPOCH: a misspelled setting, which start-up must name (test below)
    srv = start_server(str(tmp_path_factory.mktemp("cli")), SGD_MAX_EPOCH="5")
    yield srv
    srv.stop()


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `sgd-service ARGS` in this process: exit status, stdout, stderr."""
    with pytest.raises(SystemExit) as done:
        main(args)
    out, err = capsys.readouterr()
    code = done.value.code
    assert isinstance(code, int)
    return code, out, err


def test_fit_wait_predict_and_history(
    live_server: Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = ["--url", live_server.url]
    code, out, err = run(["fit", *url, *TUTORIAL_ARGS, "--seed", "7", "--wait"], capsys)
    job = json.loads(out)
    assert (code, err) == (0, f"job {job['id']} queued; waiting (Ctrl-C cancels it)\n")
    assert job["status"] == "succeeded"
    assert job["params"]["seed"] == 7
    assert job["result"]["w"] == pytest.approx(2.0, abs=1e-3)

    code, out, _ = run(["predict", *url, "4"], capsys)
    assert code == 0
    assert float(out) == pytest.approx(8.0, abs=0.01)
    code, out, _ = run(["predict", *url, "1", "2", "4"], capsys)
    assert code == 0
    assert [float(line) for line in out.split()] == pytest.approx([2.0, 4.0, 8.0], abs=0.01)

    code, out, _ = run(["history", *url], capsys)
    assert code == 0
    history = json.loads(out)
    assert history["job_id"] == job["id"]
    assert history["epoch"] == list(range(100))
    code, out, _ = run(["history", *url, "--job-id", job["id"], "--max-points", "10"], capsys)
    assert json.loads(out)["count"] <= 10

    png, svg = tmp_path / "out.png", tmp_path / "out.svg"
    code, out, _ = run(["history", *url, "--plot", str(png)], capsys)
    assert (code, out.strip()) == (0, f"wrote {png} (png)")
    assert png.read_bytes().startswith(b"\x89PNG")
    code, out, _ = run(["history", *url, "--job-id", job["id"], "--plot", str(svg)], capsys)
    assert code == 0
    assert "<svg" in svg.read_text()
    log_png, log_svg = tmp_path / "log.png", tmp_path / "log.svg"
    code, out, _ = run(["history", *url, "--plot", str(log_png), "--log"], capsys)
    assert (code, out.strip()) == (0, f"wrote {log_png} (png, log scale)")
    assert log_png.read_bytes().startswith(b"\x89PNG")
    assert log_png.read_bytes() != png.read_bytes()
    run(["history", *url, "--plot", str(log_svg), "--log"], capsys)
    assert "loss (batch MSE, log scale)" in log_svg.read_text()
    assert "log scale" not in svg.read_text()


def test_fit_options_are_passed_on(live_server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--url", live_server.url, *TUTORIAL_ARGS, "--epochs", "50"]
    args += ["--learning-rate", "0.02", "--init-w", "0.5", "--batch-size", "all"]
    args += ["--fit-intercept", "--seed", "3"]
    code, out, _ = run(args, capsys)
    assert code == 0
    assert json.loads(out)["params"] == {
        "epochs": 50,
        "learning_rate": 0.02,
        "init_w": 0.5,
        "batch_size": None,
        "fit_intercept": True,
        "seed": 3,
        "validation_fraction": 0.0,  # the lifecycle options, left to the service
        "tol": None,
        "n_iter_no_change": 5,
        "publish": "always",
        "init_from": None,
        "init_b": 0.0,
        "canary": None,
    }
    code, out, _ = run(
        ["fit", "--url", live_server.url, *TUTORIAL_ARGS, "--batch-size", "2"], capsys
    )
    assert json.loads(out)["params"]["batch_size"] == 2
    assert json.loads(out)["params"]["fit_intercept"] is False  # left to the service


@pytest.fixture
def recording() -> Iterator[RecordingService]:
    service = RecordingService()
    yield service
    service.close()


def test_new_fit_options_are_sent_only_when_given(
    recording: RecordingService, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exactly the flags given reach the body, and nothing else: a recording server reads it
    (a real one would apply defaults and hide what was sent)."""
    fit = ["fit", "--url", recording.url, *TUTORIAL_ARGS]
    given = ["--validation-fraction", "0.2", "--tol", "1e-4", "--n-iter-no-change", "3"]
    given += ["--publish", "if_better", "--init-from", "served"]
    for args in (given, ["--tol", "off", "--publish", "never", "--init-from", "2"], []):
        code, out, _ = run([*fit, *args], capsys)
        assert code == 0
        assert json.loads(out)["status"] == "queued"
    tutorial = {"x": [1.0, 2.0, 3.0], "y": [2.0, 4.0, 6.0]}
    assert recording.bodies() == [
        {
            **tutorial,
            "validation_fraction": 0.2,
            "tol": 1e-4,
            "n_iter_no_change": 3,
            "publish": "if_better",
            "init_from": "served",
        },
        {**tutorial, "tol": None, "publish": "never", "init_from": 2},
        tutorial,  # nothing else: the service's defaults
    ]


def test_new_fit_options_reach_the_service(
    live_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--url", live_server.url]
    code, out, _ = run(["fit", *url, *TUTORIAL_ARGS, "--seed", "1", "--wait"], capsys)
    assert code == 0
    x = [str(i) for i in range(1, 13)]
    y = [str(2 * i + 0.5 * (-1) ** i) for i in range(1, 13)]
    args = ["fit", *url, "--x", *x, "--y", *y, "--seed", "2", "--epochs", "100000"]
    args += ["--validation-fraction", "0.25", "--tol", "1e-4", "--n-iter-no-change", "3"]
    args += ["--publish", "never", "--init-from", "served", "--wait"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    job = json.loads(out)
    params, result = job["params"], job["result"]
    assert params["validation_fraction"] == 0.25
    assert (params["tol"], params["n_iter_no_change"], params["publish"]) == (1e-4, 3, "never")
    assert isinstance(params["init_from"], int)  # "served", resolved to its version
    assert result["val_mse"] is not None
    assert result["published"] is False
    code, out, _ = run(["models", *url, "--limit", "1"], capsys)
    assert json.loads(out)["versions"][0]["served"] is False  # kept, not served


def test_a_bad_batch_size_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["fit", *TUTORIAL_ARGS, "--batch-size", "some"], capsys)
    assert code == 2
    assert "a number of samples or 'all', not 'some'" in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["fit", "--x", "nan", "1", "--y", "1", "2"], "argument --x: not a finite number: 'nan'"),
        (["fit", *TUTORIAL_ARGS, "--learning-rate", "inf"], "not a finite number: 'inf'"),
        (["fit", *TUTORIAL_ARGS, "--wait", "--timeout", "-1"], "a number of seconds >= 0"),
        (["predict", "nan", "1"], "argument hours: not a finite number: 'nan'"),
        (["predict", "--url", "http://[::1", "4"], "argument --url: not a URL: 'http://[::1'"),
        (["predict", "--url", "localhost:8000", "4"], "not an http:// or https:// URL"),
        (["history", "--plot", "x.jpg"], "'x.jpg': the service draws .png and .svg"),
        (["history", "--plot", "x.png", "--max-points", "5"], "--max-points thins the JSON"),
        (["history", "--log"], "--log draws a --plot's loss on a log scale; add --plot FILE"),
        (["fit", *TUTORIAL_ARGS, "--publish", "maybe"], "argument --publish: invalid choice"),
        (["fit", *TUTORIAL_ARGS, "--init-from", "latest"], "'served' or a model version number"),
        (["fit", *TUTORIAL_ARGS, "--init-from", "0"], "'served' or a model version number"),
        (["fit", *TUTORIAL_ARGS, "--tol", "nan"], "argument --tol: not a finite number"),
        (["fit", *TUTORIAL_ARGS, "--validation-fraction", "x"], "not a number: 'x'"),
        (["fit", *TUTORIAL_ARGS, "--n-iter-no-change", "1.5"], "--n-iter-no-change: invalid int"),
    ],
)
def test_a_usage_mistake_is_one_line(
    args: list[str],
    says: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before any request (no server here): one line on stderr, exit status 2."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run(args, capsys)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert says in err
    assert list(tmp_path.iterdir()) == []  # no x.jpg full of PNG bytes


def test_a_token_an_http_header_cannot_carry(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SGD_API_TOKEN", "s\u00e9cret")
    code, out, err = run(["predict", "4"], capsys)
    assert (code, out) == (2, "")
    says = "SGD_API_TOKEN holds characters an HTTP header cannot carry"
    assert err == f"sgd-service predict: error: {says}\n"


def test_sgd_url_that_is_no_url_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SGD_URL", "http://[::1")
    code, _, err = run(["predict", "4"], capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert "argument --url: not a URL: 'http://[::1'" in err


def test_a_plot_that_cannot_be_written_is_one_line(
    live_server: Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = ["--url", live_server.url]
    run(["fit", *url, *TUTORIAL_ARGS, "--wait"], capsys)
    (tmp_path / "dir.png").mkdir()
    for target, why in [
        (tmp_path / "missing" / "out.png", "No such file or directory"),
        (tmp_path / "dir.png", "Is a directory"),
    ]:
        code, out, err = run(["history", *url, "--plot", str(target)], capsys)
        assert (code, out) == (1, "")
        assert err == f"error: cannot write {target}: {why}\n"


def test_ctrl_c_during_fit_wait_cancels_the_job(live_server: Server) -> None:
    """The job id comes first; Ctrl-C cancels the job and exits 130 with one line."""
    args = [*TUTORIAL_ARGS, "--epochs", "1000000", "--batch-size", "65536", "--seed", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "fit", "--url", live_server.url, *args, "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # printed before the wait begins
        job_id = first.split()[1]
        assert first == f"job {job_id} queued; waiting (Ctrl-C cancels it)\n"
        with httpx.Client(base_url=live_server.url, timeout=TIMEOUT) as http:
            wait_until(lambda: http.get(f"/jobs/{job_id}").json()["status"] == "running")
            proc.send_signal(signal.SIGINT)
            out, rest = proc.communicate(timeout=TIMEOUT * 3)
            assert proc.returncode == 130
            assert (out, rest) == ("", f"interrupted: job {job_id} cancelled\n")
            assert http.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_problems_are_printed_with_their_fields(
    live_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["fit", "--url", live_server.url, "--x", "1", "2", "--y", "2"], capsys)
    assert (code, out) == (1, "")
    assert "error: The request is not valid: fix these fields and retry: y" in err
    assert "  y: x has 2 values but y has 1" in err
    code, _, err = run(["history", "--url", live_server.url, "--job-id", "nope"], capsys)
    assert code == 1
    assert "error: No such job" in err


def test_a_failed_fit_with_wait_exits_1(
    live_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", "--url", live_server.url, *TUTORIAL_ARGS, "--learning-rate", "1000", "--wait"]
    code, out, _ = run(args, capsys)
    assert code == 1
    job = json.loads(out)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "diverged"


def test_an_unreachable_service(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(["predict", "--url", url, "4"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {url}: GET /predict")


def test_the_console_script_reads_sgd_url(live_server: Server, tmp_path: Path) -> None:
    """The installed `sgd-service` entry point, with the URL from the environment."""
    script = Path(sys.executable).with_name("sgd-service")
    env = {**os.environ, "SGD_URL": live_server.url}
    fit = subprocess.run(
        [str(script), "fit", *TUTORIAL_ARGS, "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
    )
    assert fit.returncode == 0, fit.stderr
    assert json.loads(fit.stdout)["status"] == "succeeded"
    predict = subprocess.run(
        [sys.executable, "-m", "service", "predict", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
    )
    assert predict.returncode == 0, predict.stderr
    assert float(predict.stdout) == pytest.approx(8.0, abs=0.01)


def test_no_model_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv = start_server(str(tmp_path))
    try:
        code, _, err = run(["predict", "--url", srv.url, "4"], capsys)
        assert code == 1
        assert "error: No model has been trained yet" in err
        code, _, err = run(["history", "--url", srv.url], capsys)
        assert code == 1
        assert "error: No history yet: no job has started yet" in err
    finally:
        srv.stop()


def test_serve_freezes_what_start_up_made() -> None:
    """After start-up, a full collection scans only what requests and jobs make since."""
    app = FastAPI()
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None)
    server = DrainingServer(config, drain_seconds=0)

    async def start_and_stop() -> int:
        serving = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 (uvicorn offers a flag, no event)
            await asyncio.sleep(0.01)
        frozen = gc.get_freeze_count()
        server.should_exit = True
        await serving
        return frozen

    gc.unfreeze()
    try:
        assert asyncio.run(start_and_stop()) > 10_000  # the modules and the app, at least
    finally:
        gc.unfreeze()


def test_a_misspelled_setting_is_named_at_start_up(live_server: Server) -> None:
    wanted = "SGD_MAX_EPOCH is not a setting and is ignored; did you mean SGD_MAX_EPOCHS?"
    lines = [json.loads(x) for x in live_server.log().splitlines() if x.startswith("{")]
    assert [x["level"] for x in lines if x["msg"] == wanted] == ["warning"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SGD_PORT": "abc"}, "SGD_PORT='abc': Input should be a valid integer"),
        ({"SGD_MAX_EPOCHS": "0"}, "SGD_MAX_EPOCHS='0': Input should be greater than or equal to 1"),
        ({"SGD_LOG_LEVEL": "loud"}, "SGD_LOG_LEVEL='loud': Input should be 'critical'"),
    ],
)
def test_an_invalid_setting_stops_start_up_with_one_line(env: dict[str, str], named: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"sgd-service: cannot start: {named}")
    assert done.stderr.count("\n") == 1  # one line, no traceback
    assert done.stdout == ""


def test_client_commands_find_the_server_where_its_settings_put_it(
    live_server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, port = live_server.url.removeprefix("http://").rsplit(":", 1)
    monkeypatch.delenv("SGD_URL", raising=False)
    monkeypatch.setenv("SGD_HOST", host)
    monkeypatch.setenv("SGD_PORT", port)
    code, out, err = run(["fit", *TUTORIAL_ARGS], capsys)
    assert (code, err) == (0, "")
    assert json.loads(out)["n_samples"] == 3


def test_models_lists_and_serves_versions(
    live_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--url", live_server.url]
    for seed in ("1", "2"):
        code, _, _ = run(["fit", *url, *TUTORIAL_ARGS, "--seed", seed, "--wait"], capsys)
        assert code == 0
    code, out, _ = run(["models", *url, "--limit", "2"], capsys)
    listed = json.loads(out)
    newest, older = (v["version"] for v in listed["versions"])
    assert (code, listed["served_version"], newest) == (0, newest, older + 1)
    code, out, _ = run(["models", *url, "--serve", str(older)], capsys)
    assert (code, json.loads(out)["version"], json.loads(out)["served"]) == (0, older, True)
    code, out, _ = run(["predict", *url, "--version", str(newest), "4"], capsys)
    assert code == 0
    assert float(out) == pytest.approx(8.0, abs=0.01)
    code, _, err = run(["models", *url, "--serve", "999"], capsys)
    assert code == 1
    assert "No such model version" in err
    assert len(err.strip().splitlines()) == 1


# -- prediction intervals: --coverage and --method -------------------------------------------

# x = 1..20, y = 2x + a little noise, half the rows held out (10): both methods, and a
# conformal interval bounded up to coverage 10/11 (0.9 is, 0.95 is not)
SPLIT_X = [str(i) for i in range(1, 21)]
SPLIT_Y = [str(round(2 * i + 0.3 * ((i * 7) % 5 - 2), 2)) for i in range(1, 21)]
SPLIT_ARGS = ["--x", *SPLIT_X, "--y", *SPLIT_Y, "--validation-fraction", "0.5", "--seed", "4"]
SPLIT_ARGS += ["--learning-rate", "0.001", "--batch-size", "all", "--epochs", "300"]


def cli_fit(url: str, args: list[str], capsys: pytest.CaptureFixture[str]) -> int:
    """A fit through the command line, waited for; its model version."""
    code, out, err = run(["fit", "--url", url, *args, "--wait"], capsys)
    assert code == 0, err
    version: int = json.loads(out)["result"]["model_version"]
    return version


def test_predict_with_coverage_prints_the_interval(
    live_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--url", live_server.url]
    version = cli_fit(live_server.url, SPLIT_ARGS, capsys)
    at = ["--version", str(version)]
    with httpx.Client(base_url=live_server.url, timeout=TIMEOUT) as http:

        def answer(**params: Any) -> dict[str, Any]:
            got = http.get("/predict", params={**params, "version": version})
            assert got.status_code == 200, got.text
            data: dict[str, Any] = got.json()
            return data

        plain = answer(hours=4)
        conformal = answer(hours=4, coverage=0.9)["interval"]
        gaussian = answer(hours=4, coverage=0.9, method="gaussian")["interval"]
        scores = http.post("/predict", json={"hours": [1, 2, 4], "version": version}).json()

    # without --coverage: exactly as before, one score a line
    code, out, err = run(["predict", *url, *at, "4"], capsys)
    assert (code, out, err) == (0, f"{plain['score']}\n", "")
    code, out, _ = run(["predict", *url, *at, "1", "2", "4"], capsys)
    assert (code, out) == (0, "".join(f"{s}\n" for s in scores["scores"]))

    # the score first, then the interval: the version's first method by default
    code, out, err = run(["predict", *url, *at, "4", "--coverage", "0.9"], capsys)
    assert conformal["method"] == "conformal"
    lower, upper = conformal["lower"], conformal["upper"]
    assert (code, err) == (0, "")
    assert out == f"{plain['score']} [{lower}, {upper}] (90% conformal)\n"
    assert lower < plain["score"] < upper
    code, out, _ = run(
        ["predict", *url, *at, "4", "--coverage", "0.9", "--method", "gaussian"], capsys
    )
    assert code == 0
    assert out == f"{plain['score']} [{gaussian['lower']}, {gaussian['upper']}] (90% gaussian)\n"
    assert out.split()[0] == str(plain["score"])  # `awk '{print $1}'` still reads the score

    # many hours: one line each; too few held-out rows for 95%: unbounded
    code, out, _ = run(["predict", *url, *at, "1", "2", "4", "--coverage", "0.95"], capsys)
    assert code == 0
    assert out == "".join(f"{s} [unbounded] (95% conformal)\n" for s in scores["scores"])
    code, out, _ = run(
        ["predict", *url, *at, "1", "4", "--coverage", "0.8", "--method", "gaussian"], capsys
    )
    lines = out.splitlines()
    assert code == 0
    assert len(lines) == 2
    assert all(line.endswith(" (80% gaussian)") for line in lines)
    assert lines[1].startswith(f"{plain['score']} [")
    low, high = (float(v) for v in lines[1].split("[")[1].split("]")[0].split(", "))
    assert gaussian["lower"] < low < plain["score"] < high < gaussian["upper"]  # 80% < 90%


def test_an_interval_the_version_lacks_is_a_problem(
    live_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--url", live_server.url]
    version = cli_fit(live_server.url, [*TUTORIAL_ARGS, "--seed", "1"], capsys)  # no split
    for hours in (["4"], ["1", "4"]):
        args = ["predict", *url, "--version", str(version), *hours, "--coverage", "0.9"]
        code, out, err = run([*args, "--method", "conformal"], capsys)
        assert (code, out) == (1, "")
        lines = err.splitlines()
        assert lines[0].startswith("error: This model version has no such interval: ")
        assert "validation_fraction" in lines[0]  # why, and how to get one
        assert lines[1].startswith("  method: ")
        code, out, err = run(args, capsys)  # its first method: gaussian
        assert (code, err) == (0, "")
        assert len(out.splitlines()) == len(hours)
        assert all(line.endswith(" (90% gaussian)") for line in out.splitlines())


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--coverage", "90"],
            "argument --coverage: a probability from 0.5 to 0.999 (0.9 for 90%)",
        ),
        (["--coverage", "0.4"], "a probability from 0.5 to 0.999 (0.9 for 90%), not '0.4'"),
        (["--coverage", "1"], "a probability from 0.5 to 0.999 (0.9 for 90%), not '1'"),
        (["--coverage", "nan"], "argument --coverage: not a finite number: 'nan'"),
        (["--coverage", "ninety"], "argument --coverage: not a number: 'ninety'"),
        (["--coverage", "0.9", "--method", "bayes"], "argument --method: invalid choice: 'bayes'"),
        (["--method", "gaussian"], "--method chooses how a --coverage interval is computed"),
    ],
)
def test_a_bad_coverage_or_method_is_a_usage_error(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before any request (nothing listens at the URL): one line, exit status 2."""
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(["predict", "--url", url, "4", *args], capsys)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert says in err
