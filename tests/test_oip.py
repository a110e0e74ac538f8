"""The Open Inference Protocol (KServe v2) end to end: a real server on each store, driven by
NVIDIA's tritonclient (a client nobody here wrote) and by raw HTTP where the answer's exact body
matters."""

import json
import math
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs  # Schemathesis's validator: the published schema read by another's code
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from service.http.oip import codec
from tests.conftest import (
    STORES,
    TIMEOUT,
    TUTORIAL,
    Server,
    settings_for_tests,
    start_server,
    store_env,
    wait_job,
)

# Every test starts a server or shares one: a hard limit on each, its fixtures included.
pytestmark = pytest.mark.timeout(90)

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL = "sgd"
BATCH = 50  # SGD_MAX_PREDICT_BATCH of the shared server
HOURS = [1.0, 2.0, 4.0]


@dataclass
class Fitted:
    """A server that published two versions: y = 2x (version 1), then y = 3x (served)."""

    server: Server
    versions: dict[int, tuple[float, float]]  # version: (w, b)

    def score(self, version: int, hours: float) -> float:
        w, b = self.versions[version]
        return w * hours + b


@pytest.fixture(scope="module", params=STORES)
def fitted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fitted]:
    srv = start_server(
        str(tmp_path_factory.mktemp("oip")),
        SGD_MAX_PREDICT_BATCH=str(BATCH),
        **store_env(request, request.param),
    )
    try:
        with srv.client() as http:
            for slope in (2.0, 3.0):
                body = {"x": [1.0, 2.0, 3.0], "y": [slope, 2 * slope, 3 * slope]}
                job = http.post("/fit", json={**body, "batch_size": None, "epochs": 300})
                assert wait_job(http, job.json()["id"])["status"] == "succeeded"
            kept = http.get("/models").json()["versions"]
        versions = {m["version"]: (m["w"], m["b"]) for m in kept}
        assert sorted(versions) == [1, 2]
        assert abs(versions[1][0] - 2) < 0.01
        assert abs(versions[2][0] - 3) < 0.01
        yield Fitted(srv, versions)
    finally:
        srv.stop()


@contextmanager
def client_of(srv: Server) -> Iterator[Any]:
    """tritonclient's HTTP client, pointed at the server (it takes host:port, no scheme)."""
    client = triton.InferenceServerClient(
        srv.url.removeprefix("http://"), connection_timeout=TIMEOUT, network_timeout=TIMEOUT
    )
    try:
        yield client
    finally:
        client.close()


def hours_input(values: Any, datatype: str = "FP64", binary: bool = True) -> Any:
    array = np.asarray(values, dtype=triton_to_np_dtype(datatype))
    tensor = triton.InferInput("hours", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def infer_error(client: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
    """The status and message of the InferenceServerException an inference raises."""
    with pytest.raises(InferenceServerException) as raised:
        client.infer(*args, **kwargs)
    return raised.value.status(), raised.value.message()


def protocol_error(r: httpx.Response, status: int) -> str:
    """The protocol's error object, alone: {"error": "..."} as JSON, with the status."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"], body
    assert isinstance(body["error"], str)
    assert body["error"]
    message: str = body["error"]
    return message


def infer_body(
    data: Any,
    shape: list[int],
    datatype: str = "FP64",
    parameters_of_input: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": "hours", "shape": shape, "datatype": datatype}
    if data is not None:
        tensor["data"] = data
    if parameters_of_input is not None:
        tensor["parameters"] = parameters_of_input
    return {"inputs": [tensor], **extra}


def with_binary(document: dict[str, Any], zeros: int = 0) -> tuple[bytes, dict[str, str]]:
    """A body of the binary tensor data extension: the JSON object, then `zeros` zero bytes."""
    header = json.dumps(document).encode()
    return header + bytes(zeros), {"Inference-Header-Content-Length": str(len(header))}


# -- health and metadata --------------------------------------------------------------------


def test_health_and_metadata(fitted: Fitted) -> None:
    with client_of(fitted.server) as client:
        assert client.is_server_live() is True
        assert client.is_server_ready() is True
        assert client.is_model_ready(MODEL) is True
        assert client.is_model_ready(MODEL, "1") is True  # kept, though not served
        assert client.is_model_ready(MODEL, "3") is False
        assert client.is_model_ready("nope") is False
        assert client.get_server_metadata() == {
            "name": "sgd-service",
            "version": "0.1.0",
            "extensions": ["binary_tensor_data"],
        }
        tensor = {"datatype": "FP64", "shape": [-1]}
        expected = {
            "name": MODEL,
            "versions": ["2", "1"],
            "platform": "sgd-service",
            "inputs": [{"name": "hours", **tensor}],
            # the interval's bounds: answered with the request parameter `coverage`
            "outputs": [{"name": n, **tensor} for n in ("score", "score_lower", "score_upper")],
        }
        assert client.get_model_metadata(MODEL) == expected
        assert client.get_model_metadata(MODEL, "1") == expected
        with pytest.raises(InferenceServerException) as raised:
            client.get_model_metadata(MODEL, "3")
        assert raised.value.status() == "404"
        assert "has no version 3" in raised.value.message()
    with fitted.server.client() as http:
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").json() == {"ready": True}
        assert http.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
        assert "no model 'nope'" in protocol_error(http.get("/v2/models/nope"), 404)
        assert "no model 'nope'" in protocol_error(http.get("/v2/models/nope/ready"), 404)
        for version in ("0", "3", "01", "one", "99999999999999999999"):
            r = http.get(f"/v2/models/{MODEL}/versions/{version}/ready")
            assert "has no version" in protocol_error(r, 404)


# -- inference ------------------------------------------------------------------------------


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_infer_fp64(fitted: Fitted, binary_in: bool, binary_out: bool) -> None:
    with client_of(fitted.server) as client:
        score = triton.InferRequestedOutput("score", binary_data=binary_out)
        result = client.infer(
            MODEL, [hours_input(HOURS, binary=binary_in)], outputs=[score], request_id="r-42"
        )
    response = result.get_response()
    assert response["model_name"] == MODEL
    assert response["model_version"] == "2"  # the served one, as a string
    assert response["id"] == "r-42"
    (output,) = response["outputs"]
    assert output["datatype"] == "FP64"
    assert output["shape"] == [3]
    assert ("data" in output) is not binary_out
    scores = result.as_numpy("score")
    assert scores.dtype == np.float64
    assert scores.tolist() == [fitted.score(2, h) for h in HOURS]  # bit for bit


def test_infer_asks_binary_outputs_by_default(fitted: Fitted) -> None:
    """With no outputs named, tritonclient asks for all of them as binary data."""
    with client_of(fitted.server) as client:
        result = client.infer(MODEL, [hours_input(HOURS)])
    (output,) = result.get_response()["outputs"]
    assert output["parameters"] == {"binary_data_size": 24}
    assert result.as_numpy("score").tolist() == [fitted.score(2, h) for h in HOURS]


@pytest.mark.parametrize("datatype", ["FP32", "INT32", "INT8", "UINT16", "INT64", "UINT64"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
def test_infer_other_numeric_datatypes(fitted: Fitted, datatype: str, binary_in: bool) -> None:
    values = [0.1, 2.5, 7.0] if datatype == "FP32" else [0, 3, 100]
    sent = np.asarray(values, dtype=triton_to_np_dtype(datatype))
    with client_of(fitted.server) as client:
        result = client.infer(MODEL, [hours_input(sent, datatype, binary_in)])
    # an FP32 tensor holds float32 values, 0.1 as 0.100000001490116…, JSON or binary alike
    expected = [fitted.score(2, float(v)) for v in sent]
    assert result.as_numpy("score").tolist() == expected
    assert result.get_response()["outputs"][0]["datatype"] == "FP64"


def test_infer_a_kept_version(fitted: Fitted) -> None:
    with client_of(fitted.server) as client:
        old = client.infer(MODEL, [hours_input(HOURS)], model_version="1")
        served = client.infer(MODEL, [hours_input(HOURS)])
        status, message = infer_error(client, MODEL, [hours_input(HOURS)], model_version="3")
    assert old.get_response()["model_version"] == "1"
    assert old.as_numpy("score").tolist() == [fitted.score(1, h) for h in HOURS]
    assert served.get_response()["model_version"] == "2"
    assert served.as_numpy("score").tolist() == [fitted.score(2, h) for h in HOURS]
    assert (status, message) == (
        "404",
        f"model '{MODEL}' has no version 3: GET /v2/models/{MODEL} lists the kept ones",
    )
    with fitted.server.client() as http:
        r = http.post(f"/v2/models/{MODEL}/versions/1/infer", json=infer_body([4], [1]))
    assert r.json() == {
        "model_name": MODEL,
        "model_version": "1",
        "outputs": [
            {"name": "score", "datatype": "FP64", "shape": [1], "data": [fitted.score(1, 4.0)]}
        ],
    }


def test_what_the_protocol_lets_a_server_ignore_is_ignored(fitted: Fitted) -> None:
    """Scheduling parameters, custom ones and fields the protocol does not define."""
    with client_of(fitted.server) as client:
        result = client.infer(
            MODEL,
            [hours_input(HOURS)],
            priority=1,
            timeout=1000,
            parameters={"custom": "x"},
        )
    assert result.as_numpy("score").tolist() == [fitted.score(2, h) for h in HOURS]
    body = infer_body([4], [1], model_name="other", parameters={"sequence_id": 3})
    body["inputs"][0]["parameters"] = {"binary_data": True}  # an output's parameter, on an input
    with fitted.server.client() as http:
        r = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [fitted.score(2, 4.0)]


def test_nested_data_is_read_in_row_major_order(fitted: Fitted) -> None:
    with fitted.server.client() as http:
        r = http.post(f"/v2/models/{MODEL}/infer", json=infer_body([[1, 2], [[3], 4]], [4]))
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [fitted.score(2, h) for h in (1, 2, 3, 4)]
        empty = http.post(f"/v2/models/{MODEL}/infer", json=infer_body([], [0]))
        assert empty.json()["outputs"][0] == {
            "name": "score",
            "datatype": "FP64",
            "shape": [0],
            "data": [],
        }
        short = http.post(f"/v2/models/{MODEL}/infer", json=infer_body([[1, 2], [3, 4]], [3]))
        assert "has shape [3] but its data holds more values" in protocol_error(short, 400)


def test_infer_leaves_the_rest_of_the_service_alone(fitted: Fitted) -> None:
    """An inference reads the served model; errors elsewhere are problem+json as before."""
    with fitted.server.client() as http:
        before = http.get("/model").json()
        jobs = http.get("/jobs").json()
        http.post(f"/v2/models/{MODEL}/infer", json=infer_body(HOURS, [3]))
        http.post(f"/v2/models/{MODEL}/infer", content=b"{")
        assert http.get("/model").json() == before
        assert http.get("/jobs").json() == jobs
        for r in (http.get("/nope"), http.post("/predict", json={"hours": ["a"]})):
            assert r.headers["content-type"] == "application/problem+json"
        assert http.post("/predict", json={"hours": HOURS}).json()["scores"] == [
            fitted.score(2, h) for h in HOURS
        ]


# -- errors ---------------------------------------------------------------------------------


def _bytes_input() -> Any:
    tensor = triton.InferInput("hours", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([b"1", b"2"], dtype=np.object_))
    return tensor


def _bool_input() -> Any:
    tensor = triton.InferInput("hours", [2], "BOOL")
    tensor.set_data_from_numpy(np.array([True, False]), binary_data=False)
    return tensor


def _shape_lies() -> Any:
    tensor = hours_input([1.0, 2.0])
    tensor.set_shape([3])  # two values' bytes for a shape of three
    return tensor


def _named(name: str) -> Any:
    tensor = triton.InferInput(name, [1], "FP64")
    tensor.set_data_from_numpy(np.array([1.0]))
    return tensor


TRITON_ERRORS: list[tuple[str, Callable[[], dict[str, Any]], str, str]] = [
    ("unknown model", lambda: {"model_name": "nope"}, "404", "no model 'nope': this server"),
    ("bytes", lambda: {"inputs": [_bytes_input()]}, "400", "input 'hours' cannot be 'BYTES'"),
    ("bool", lambda: {"inputs": [_bool_input()]}, "400", "input 'hours' cannot be 'BOOL'"),
    ("2-d shape", lambda: {"inputs": [hours_input([[1.0], [2.0]])]}, "400", "one dimension"),
    ("shape lies", lambda: {"inputs": [_shape_lies()]}, "400", "is 24 bytes, but its binary"),
    (
        "nan binary",
        lambda: {"inputs": [hours_input([1.0, math.nan])]},
        "400",
        "hours[1] is nan: send finite numbers",
    ),
    (
        "nan json",
        lambda: {"inputs": [hours_input([math.nan], binary=False)]},
        "400",
        "hours[0] is nan",
    ),
    (
        "too large",
        lambda: {"inputs": [hours_input([1.0, 2.0, -2e9])]},
        "400",
        "hours[2] is -2e+09: every |hours| must be at most SGD_MAX_ABS_VALUE=1e+09",
    ),
    (
        "too many",
        lambda: {"inputs": [hours_input([1.0] * (BATCH + 1))]},
        "400",
        f"has {BATCH + 1} values: at most SGD_MAX_PREDICT_BATCH={BATCH} per request",
    ),
    ("input name", lambda: {"inputs": [_named("x")]}, "400", "has no input 'x'"),
    (
        "output name",
        lambda: {"outputs": [triton.InferRequestedOutput("nope")]},
        "400",
        "model 'sgd' has no output 'nope': its outputs are 'score', 'score_lower', 'score_upper'",
    ),
    (
        "classification",
        lambda: {"outputs": [triton.InferRequestedOutput("score", class_count=2)]},
        "400",
        "classification extension is not supported",
    ),
    (
        "gzip",
        lambda: {"request_compression_algorithm": "gzip"},
        "400",
        "Content-Encoding 'gzip' is not supported",
    ),
]


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [pytest.param(case, status, message, id=name) for name, case, status, message in TRITON_ERRORS],
)
def test_tritonclient_gets_each_error(
    fitted: Fitted, case: Callable[[], dict[str, Any]], status: str, message: str
) -> None:
    call = {"model_name": MODEL, "inputs": [hours_input(HOURS)], **case()}
    with client_of(fitted.server) as client:
        got = infer_error(client, **call)
    assert got[0] == status, got
    assert message in got[1], got


RAW_ERRORS: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("not json", b"{", {}, 400, "the body is not a JSON inference request"),
    ("not utf-8", b"\xff\xfe{", {}, 400, "the body is not a JSON inference request"),
    ("deep", b"[" * 1_000, {}, 400, "the body is not a JSON inference request"),
    (
        "crowded",
        b"[" * 100_000,
        {},
        400,
        f"the body's JSON has more than {BATCH + 1024} commas and opening brackets outside its "
        f"strings: a request holds at most SGD_MAX_PREDICT_BATCH={BATCH} values of 'hours'",
    ),
    ("an array", b"[]", {}, 400, "body: Input should be a valid dictionary"),
    ("no inputs", b'{"inputs": []}', {}, 400, "inputs: List should have at least 1 item"),
    (
        "nan literal",
        b'{"inputs": [{"name": "hours", "shape": [2], "datatype": "FP64", "data": [1, NaN]}]}',
        {},
        400,
        "hours[1] is nan",
    ),
    (
        "1e400",
        b'{"inputs": [{"name": "hours", "shape": [1], "datatype": "FP64", "data": [1e400]}]}',
        {},
        400,
        "hours[0] is inf",
    ),
    (
        "huge integer",
        json.dumps(infer_body([10**400], [1])).encode(),
        {},
        400,
        "hours[0] is inf",
    ),
    ("count", json.dumps(infer_body([1, 2], [3])).encode(), {}, 400, "its data holds 2 values"),
    ("string", json.dumps(infer_body([1, "2"], [2])).encode(), {}, 400, 'hours[1] is "2", not a'),
    ("boolean", json.dumps(infer_body([True], [1])).encode(), {}, 400, "hours[0] is true, not a"),
    (
        "int8 range",
        json.dumps(infer_body([1, 128], [2], "INT8")).encode(),
        {},
        400,
        "hours[1] is 128, not an INT8 value (an integer in [-128, 127])",
    ),
    (
        "float for int",
        json.dumps(infer_body([1.5], [1], "INT32")).encode(),
        {},
        400,
        "hours[0] is 1.5, not an INT32 value",
    ),
    ("fp16", json.dumps(infer_body([1], [1], "FP16")).encode(), {}, 400, "cannot be 'FP16'"),
    ("no data", json.dumps(infer_body(None, [1])).encode(), {}, 400, "input 'hours' has no data"),
    (
        "negative dimension",
        json.dumps(infer_body([1], [-1])).encode(),
        {},
        400,
        "inputs[0].shape[0]: Input should be greater than or equal to 0",
    ),
    (
        "two inputs",
        json.dumps({"inputs": infer_body([1], [1])["inputs"] * 2}).encode(),
        {},
        400,
        "inputs: List should have at most 1 item after validation, not 2",
    ),
    (
        "an output twice",
        json.dumps(infer_body([1], [1], outputs=[{"name": "score"}] * 2)).encode(),
        {},
        400,
        "output 'score' is asked for twice",
    ),
    (
        "four outputs",
        json.dumps(infer_body([1], [1], outputs=[{"name": "score"}] * 4)).encode(),
        {},
        400,
        "outputs: List should have at most 3 items after validation, not 4",
    ),
    (
        "a bound without coverage",
        json.dumps(infer_body([1], [1], outputs=[{"name": "score_lower"}])).encode(),
        {},
        400,
        "output 'score_lower' is an interval's bound: set the parameter 'coverage'",
    ),
    (
        "65 parameters",
        json.dumps(infer_body([1], [1], parameters={f"p{i}": i for i in range(65)})).encode(),
        {},
        400,
        "parameters: Dictionary should have at most 64 items after validation, not more",
    ),
    (
        "an integer beyond 64 bits",
        json.dumps(infer_body([1, 2**64], [2], "UINT64")).encode(),
        {},
        400,
        "hours[1] is 18446744073709551616, not an UINT64 value",
    ),
    (
        "id not a string",
        json.dumps(infer_body([1], [1], id=42)).encode(),
        {},
        400,
        "id: Input should be a valid string",
    ),
    (
        "parameter not a value",
        json.dumps(infer_body([1], [1], parameters={"x": [1]})).encode(),
        {},
        400,
        "parameters.x: Value error, a parameter is a number, a string or a boolean",
    ),
    (
        "binary flag not a bool",
        json.dumps(infer_body([1], [1], parameters={"binary_data_output": 1})).encode(),
        {},
        400,
        "parameter 'binary_data_output' must be true or false",
    ),
    (
        "shared memory",
        *with_binary(infer_body(None, [1], parameters_of_input={"shared_memory_region": "r"})),
        400,
        "the shared memory extension is not supported",
    ),
    (
        "data and binary data",
        *with_binary(infer_body([1], [1], parameters_of_input={"binary_data_size": 8}), 8),
        400,
        "has both 'data' and binary_data_size",
    ),
    (
        "binary size beyond 64 bits",
        *with_binary(infer_body(None, [1], parameters_of_input={"binary_data_size": 2**64}), 8),
        400,
        "is 8 bytes, but its binary_data_size is 18446744073709551616",
    ),
    (
        "binary size not an integer",
        *with_binary(infer_body(None, [1], parameters_of_input={"binary_data_size": 8.0}), 8),
        400,
        "is 8 bytes, but its binary_data_size is 8.0",
    ),
    (
        "binary size short",
        *with_binary(infer_body(None, [2], parameters_of_input={"binary_data_size": 16}), 8),
        400,
        "announces 16 bytes of binary data, but 8 bytes follow the JSON object",
    ),
    (
        "bytes after the json",
        *with_binary(infer_body([1], [1]), 8),
        400,
        "8 bytes follow the JSON object but no input says binary_data_size",
    ),
    (
        "header length too long",
        json.dumps(infer_body([1], [1])).encode(),
        {"Inference-Header-Content-Length": "100000"},
        400,
        "Inference-Header-Content-Length must be the length in bytes",
    ),
    (
        "another host",
        json.dumps(infer_body([1], [1])).encode(),
        {"Host": "rebound.example"},
        400,
        "Host 'rebound.example' is not one",
    ),
]


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in RAW_ERRORS],
)
def test_raw_errors_are_the_protocols_error_object(
    fitted: Fitted, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    with fitted.server.client() as http:
        r = http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert message in protocol_error(r, status)


# What the published schema says of a request, and what the server answers it: "ok" (valid, 200),
# "refused" (invalid, 400), or "count": valid, but refused for the one rule JSON Schema cannot
# state, that shape [n] counts the values. Each probe changes one thing of a valid request.
ABSENT: Any = object()
SCHEMA_PROBES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("valid", {}, {}, "ok"),
    ("nested", {"data": [[1], [2, [4]]]}, {}, "ok"),
    ("no data", {"datatype": "FP32", "shape": [0], "data": ABSENT}, {}, "refused"),  # issue 26
    ("null data", {"shape": [0], "data": None}, {}, "refused"),
    ("a boolean", {"data": [1, 2, True]}, {}, "refused"),
    ("a string", {"data": [1, 2, "4"]}, {}, "refused"),
    ("over SGD_MAX_ABS_VALUE", {"data": [1, 2, 2e9]}, {}, "refused"),
    ("INT8", {"datatype": "INT8", "data": [-128, 0, 127]}, {}, "ok"),
    ("INT8 out of range", {"datatype": "INT8", "data": [1, 2, 128]}, {}, "refused"),
    ("UINT8 below 0", {"datatype": "UINT8", "data": [1, 2, -1]}, {}, "refused"),
    ("INT32 fraction", {"datatype": "INT32", "data": [1, 2, 1.5]}, {}, "refused"),
    (
        "binary size only",
        {"shape": [0], "data": ABSENT, "parameters": {"binary_data_size": 0}},
        {},
        "ok",
    ),
    ("data and binary size", {"parameters": {"binary_data_size": 24}}, {}, "refused"),
    ("shared memory", {"parameters": {"shared_memory_region": "r"}}, {}, "refused"),
    ("output twice", {}, {"outputs": [{"name": "score"}] * 2}, "refused"),
    (
        "binary_data not a flag",
        {},
        {"outputs": [{"name": "score", "parameters": {"binary_data": 1}}]},
        "refused",
    ),
    (
        "classification",
        {},
        {"outputs": [{"name": "score", "parameters": {"classification": 2}}]},
        "refused",
    ),
    ("binary_data_output not a flag", {}, {"parameters": {"binary_data_output": "yes"}}, "refused"),
    ("64 parameters", {}, {"parameters": {f"p{i}": i for i in range(64)}}, "ok"),
    ("65 parameters", {}, {"parameters": {f"p{i}": i for i in range(65)}}, "refused"),
    ("fields the protocol does not define", {"extra": [1]}, {"model_name": "x"}, "ok"),
    ("too few values", {"shape": [4]}, {}, "count"),
    (
        "binary size and no bytes",
        {"data": ABSENT, "parameters": {"binary_data_size": 24}},
        {},
        "count",
    ),
]


@pytest.mark.parametrize(
    ("tensor", "extra", "verdict"),
    [pytest.param(*probe[1:], id=probe[0]) for probe in SCHEMA_PROBES],
)
def test_the_schema_states_the_rules(
    fitted: Fitted, tensor: dict[str, Any], extra: dict[str, Any], verdict: str
) -> None:
    """Before: a request without data, or with a boolean among its values, was valid by the
    published schema and answered 400 (Schemathesis's ST202). Now every rule but the count is
    in the schema, and the 400 that states the count is declared."""
    given = {"name": "hours", "shape": [3], "datatype": "FP64", "data": [1, 2, 4], **tensor}
    body = {"inputs": [{k: v for k, v in given.items() if v is not ABSENT}], **extra}
    with fitted.server.client() as http:
        spec = http.get("/openapi.json").json()
        r = http.post(f"/v2/models/{MODEL}/infer", content=json.dumps(body))
    schema = {"$ref": "#/components/schemas/InferenceRequest", "components": spec["components"]}
    assert jsonschema_rs.Draft202012Validator(schema).is_valid(body) is (verdict != "refused")
    assert r.status_code == (200 if verdict == "ok" else 400), r.text


def test_every_v2_error_is_declared_as_the_protocols(fitted: Fitted) -> None:
    """Each /v2 operation lists its errors, 400 (the Host check) among them, as {"error"}, and
    inference's 400 states the rules its request's schema cannot."""
    with fitted.server.client() as http:
        spec = http.get("/openapi.json").json()
    declared = spec["paths"]["/v2/models/{name}/infer"]["post"]["responses"]["400"]
    assert "shape [n] counts the values of `data`" in declared["description"]
    error = {"$ref": "#/components/schemas/ProtocolError"}
    assert spec["components"]["schemas"]["ProtocolError"]["additionalProperties"] is False
    for path, operations in spec["paths"].items():
        if not path.startswith("/v2"):
            continue
        for operation in operations.values():
            codes = {int(code) for code in operation["responses"]} - {200}
            assert 400 in codes, path
            assert 422 not in codes, path
            for code in codes:
                content = operation["responses"][str(code)]["content"]
                assert content == {"application/json": {"schema": error}}, (path, code)


def _calls(work: Callable[[], object]) -> int:
    """The function calls, Python's and C's, made while `work` runs (sys.setprofile)."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        work()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("datatype", ["FP64", "FP32", "INT32"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_values_are_checked_without_python_work_per_value(datatype: str, binary: bool) -> None:
    """Before: each value of a valid request took a json.dumps (for an error text rarely shown)
    and a Python call of its own: 24 ms for 10,000 values. Now C loops read and check them, so
    10,000 values take the same calls as 10."""
    settings = settings_for_tests()

    def checked(n: int) -> int:
        values = [i % 7 for i in range(n)]
        if not binary:
            header = json.dumps(infer_body(values, [n], datatype)).encode()
            return _calls(lambda: codec.decode(header, b"", MODEL, settings))
        tail = np.asarray(values, dtype=triton_to_np_dtype(datatype)).tobytes()
        document = infer_body(None, [n], datatype, {"binary_data_size": len(tail)})
        header = json.dumps(document).encode()
        return _calls(lambda: codec.decode(header, tail, MODEL, settings))

    asked = codec.decode(json.dumps(infer_body([4], [1])).encode(), b"", MODEL, settings)
    assert asked.hours.tolist() == [4.0]
    assert checked(10_000) == checked(10)


def test_a_wrong_method_is_405_with_allow(fitted: Fitted) -> None:
    with fitted.server.client() as http:
        r = http.get(f"/v2/models/{MODEL}/infer")
        assert r.headers["allow"] == "POST"
        assert "GET is not allowed" in protocol_error(r, 405)
        r = http.delete("/v2")
        assert r.headers["allow"] == "GET"
        protocol_error(r, 405)
        assert "no route /v2/models" in protocol_error(http.get("/v2/models"), 404)


# -- before the first fit, and a model name of one's own ------------------------------------


@pytest.mark.parametrize("store", STORES)
def test_before_any_fit_then_after_one(
    request: pytest.FixtureRequest, make_server: Callable[..., Server], store: str
) -> None:
    name = "linear-1.x"
    srv = make_server(
        SGD_MODEL_NAME=name,
        SGD_MAX_BODY_BYTES="1024",
        SGD_MAX_ABS_VALUE="1e200",
        **store_env(request, store),
    )
    with client_of(srv) as client:
        assert client.is_server_live() is True
        assert client.is_server_ready() is False  # no model yet: False, not an exception
        assert client.is_model_ready(name) is False
        assert client.is_model_ready(name, "1") is False
        assert client.get_model_metadata(name)["versions"] == []
        status, message = infer_error(client, name, [hours_input(HOURS)])
        assert status == "503"
        assert message.startswith(f"model '{name}' is not ready: no fit has succeeded yet")
        assert infer_error(client, MODEL, [hours_input(HOURS)])[0] == "404"  # not this name
    with srv.client() as http:
        assert "is not ready" in protocol_error(http.get("/v2/health/ready"), 503)
        assert "is not ready" in protocol_error(http.get(f"/v2/models/{name}/ready"), 503)
        big = infer_body([1.0] * 300, [300])
        too_large = protocol_error(http.post(f"/v2/models/{name}/infer", json=big), 413)
        assert too_large.startswith("the body is over SGD_MAX_BODY_BYTES=1024 bytes")
        # a huge w times huge hours: a score that is no float is an error, never Infinity
        big_fit = {"x": [1.0], "y": [1e200], "init_w": 1e200, "batch_size": None, "epochs": 1}
        assert wait_job(http, http.post("/fit", json=big_fit).json()["id"])["status"] == "succeeded"
        r = http.post(f"/v2/models/{name}/infer", json=infer_body([1e200], [1]))
        assert "overflows a float" in protocol_error(r, 400)
        wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])
    with client_of(srv) as client:
        assert client.is_server_ready() is True
        assert client.is_model_ready(name) is True
        assert client.get_model_metadata(name)["versions"] == ["2", "1"]
        result = client.infer(name, [hours_input(HOURS)])
        assert result.get_response()["model_version"] == "2"


# -- the README -----------------------------------------------------------------------------


def readme_block(language: str) -> str:
    """The first ```language block of the README's section on the protocol."""
    text = README.read_text()
    section = text[text.index("## Open Inference Protocol") :]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def documented(line: str, printed: str) -> bool:
    """The printed line is the documented one, `…` standing for the rest of a number."""
    return re.fullmatch(".*?".join(map(re.escape, line.split("…"))), printed) is not None


def test_the_readme_examples(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's curl and tritonclient examples print what it says after its tutorial fit."""
    with server.client() as http:
        fit = http.post("/fit", json={**TUTORIAL, "seed": 42})
        assert wait_job(http, fit.json()["id"])["status"] == "succeeded"
    host = server.url.removeprefix("http://")
    command, *output = readme_block("bash").strip().splitlines()
    argv = shlex.split(command.replace("localhost:8000", host))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=True)
    expected = "".join(line.removeprefix("# ").removeprefix(" ") for line in output)
    assert documented(expected, done.stdout), (done.stdout, expected)

    code = readme_block("python").replace('"localhost:8000"', repr(host))
    exec(compile(code, "README.md", "exec"), {})  # our own README's example
    printed = capsys.readouterr().out.splitlines()
    comments = re.findall(r"print\(.*\)  # (.*)", code)
    assert len(comments) == len(printed) >= 3, (comments, printed)
    for line, comment in zip(printed, comments, strict=True):
        assert documented(comment, line), (line, comment)


def test_a_body_cut_off_mid_way_logs_no_traceback(fitted: Fitted) -> None:
    """Before: an aborted /v2 body logged an error traceback (ClientDisconnect), so anyone
    could flood the log."""
    host, port = fitted.server.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
            s.sendall(
                f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode()
                + b'{"inputs": ['
            )
    with fitted.server.client() as http:  # served after the three: the aborts were handled
        assert http.get(f"/v2/models/{MODEL}/ready").status_code == 200
        time.sleep(0.5)  # uvicorn notices each closed socket on its own turn of the loop
        assert http.get(f"/v2/models/{MODEL}/ready").status_code == 200
    log = fitted.server.log()
    assert "Traceback" not in log
    assert "ClientDisconnect" not in log
