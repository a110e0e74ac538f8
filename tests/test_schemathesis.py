"""Schemathesis (a tool nobody here wrote) fuzzes a live server from its own OpenAPI document."""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TUTORIAL, start_server, wait_job

CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_failures(tmp_path: Any) -> None:
    # Small limits keep generated fits short; the schema advertises them, so they are honoured.
    srv = start_server(
        str(tmp_path), SGD_MAX_EPOCHS="20000", SGD_MAX_SAMPLES="2000", SGD_MAX_QUEUED_JOBS="8"
    )
    st = Path(sys.executable).with_name("st")
    try:
        # A served model first: a 503 model-not-ready is by design, but Schemathesis counts any
        # 5xx as a failure, and whether its first /predict comes before its first fit has ended
        # is a race it would lose on a busy machine.
        with srv.client() as http:
            job = wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])
            assert job["status"] == "succeeded", job
        run = subprocess.run(
            [
                str(st),
                "--config-file",
                str(CONFIG),
                "run",
                f"{srv.url}/openapi.json",
                "--checks",
                "all",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--max-examples",
                os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "40"),
                "--max-time",
                os.environ.get("SCHEMATHESIS_MAX_TIME", "150"),
                "--request-timeout",
                "10",
                "--seed",
                "20261125",
                "--no-color",
                "--generation-database",
                "none",  # leave no .schemathesis/ folder in the tree
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        srv.stop()
    summary = [line for line in run.stdout.splitlines() if " in " in line and "=====" in line]
    print(run.stdout[-6000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert summary, run.stdout[-2000:]
    # "No issues found in …" or "N warnings in …" (e.g. a path with no generated data): no failure
    assert not re.search(r"\d+ (failures?|errors?)", summary[-1]), summary[-1]
