"""Units of service.http without a server: the /v2 tensor codec, the rendering of errors (as
problem+json, and as the protocol's {"error"} on /v2), the refusals of a body as they are raised,
and POST /fit's body as a dependency."""

import asyncio
import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from service.core.errors import InvalidInput, NotReady, ServiceError
from service.core.schemas import FitRequest
from service.core.settings import Settings
from service.http import api
from service.http.bodies import error_of, fit_body
from service.http.intake import FitOptions
from service.http.oip import codec
from service.http.oip.codec import Inference
from service.http.oip.errors import InvalidInferenceRequest, ProtocolErrors
from service.http.oip.models import FLOATS, HEADER_LENGTH, INTEGERS
from service.http.problems import PROBLEM_JSON, problem_response
from service.http.reading import NotAccepted, NotJson, NotValid, Unreadable
from service.http.scoring import Floats
from tests.conftest import settings_for_tests

MODEL = "sgd"
BATCH = 50
SETTINGS = settings_for_tests(max_predict_batch=BATCH)
VALUES = [0, 1, 2, 4, 100]  # within every datatype's range
DATATYPES = [*FLOATS, *INTEGERS]


def request(
    data: list[Any] | None,
    shape: list[int],
    datatype: str = "FP64",
    parameters: dict[str, Any] | None = None,
    **top: Any,
) -> bytes:
    tensor: dict[str, Any] = {"name": "hours", "shape": shape, "datatype": datatype}
    if data is not None:
        tensor["data"] = data
    if parameters is not None:
        tensor["parameters"] = parameters
    return json.dumps({"inputs": [tensor], **top}).encode()


def decode(header: bytes, binary: bytes = b"", settings: Settings = SETTINGS) -> Inference:
    return codec.decode(header, binary, MODEL, settings)


def refused(header: bytes, binary: bytes = b"") -> str:
    with pytest.raises(InvalidInferenceRequest) as caught:
        decode(header, binary)
    return caught.value.detail


def binary_of(values: Sequence[float], datatype: str) -> bytes:
    code = FLOATS.get(datatype) or INTEGERS[datatype][0]
    return struct.pack(f"<{len(values)}{code}", *values)


# -- the codec: decode ------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
def test_each_datatype_decodes_from_json(datatype: str) -> None:
    asked = decode(request(VALUES, [len(VALUES)], datatype))
    assert asked.hours.tolist() == [float(v) for v in VALUES]
    assert asked.outputs == (("score", False),)
    assert asked.id is None


@pytest.mark.parametrize("datatype", DATATYPES)
def test_each_datatype_decodes_from_binary_data(datatype: str) -> None:
    tail = binary_of(VALUES, datatype)
    header = request(None, [len(VALUES)], datatype, {"binary_data_size": len(tail)})
    assert decode(header, tail).hours.tolist() == [float(v) for v in VALUES]


def test_fp32_values_are_float32s_whatever_json_wrote() -> None:
    (value,) = decode(request([0.1], [1], "FP32")).hours
    assert value != 0.1
    assert value == struct.unpack("<f", struct.pack("<f", 0.1))[0]


def test_nested_data_is_read_row_major() -> None:
    assert decode(request([[1, 2], [3, [4]]], [4])).hours.tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("datatype", list(INTEGERS))
def test_an_integer_out_of_its_datatypes_range_is_refused(datatype: str) -> None:
    _, lo, hi = INTEGERS[datatype]
    for value in (lo - 1, hi + 1):
        detail = refused(request([1, value], [2], datatype))
        assert f"hours[1] is {value}, not an {datatype} value" in detail


@pytest.mark.parametrize(
    ("data", "shape", "says"),
    [
        ([1, 2, 3], [2], "has shape [2] but its data holds more values"),
        ([1, 2], [3], "has shape [3] but its data holds 2 values"),
        ([1, 2, 3], [1, 3], "it has one dimension, shape [n]"),
        ([1, 2, 3], [], "has shape []: it has one dimension"),
        ([1], [-1], "shape[0]: Input should be greater than or equal to 0"),
        ([1] * (BATCH + 1), [BATCH + 1], f"at most SGD_MAX_PREDICT_BATCH={BATCH}"),
    ],
)
def test_a_bad_shape_is_refused(data: list[Any], shape: list[int], says: str) -> None:
    assert says in refused(request(data, shape))


def test_binary_data_must_match_its_shape_and_its_announced_size() -> None:
    tail = binary_of([1, 2, 3], "FP64")
    assert "is 24 bytes, but its binary_data_size is 16" in refused(
        request(None, [3], parameters={"binary_data_size": 16}), tail
    )
    assert "announces 24 bytes of binary data, but 16 bytes follow" in refused(
        request(None, [3], parameters={"binary_data_size": 24}), tail[:16]
    )
    assert "has both 'data' and binary_data_size" in refused(
        request([1, 2, 3], [3], parameters={"binary_data_size": 24}), tail
    )
    assert "no input says binary_data_size" in refused(request([1, 2, 3], [3]), tail)


def test_values_must_be_finite_and_within_the_limit() -> None:
    assert "hours[1] is inf: send finite numbers" in refused(
        request(None, [2], parameters={"binary_data_size": 16}), binary_of([1, math.inf], "FP64")
    )
    assert "every |hours| must be at most SGD_MAX_ABS_VALUE" in refused(request([1, 2e9], [2]))


def test_split_takes_the_json_object_by_its_announced_length() -> None:
    body = b'{"a":1}' + b"\x00\x01"
    assert codec.split(body, Headers({HEADER_LENGTH: "7"})) == (b'{"a":1}', b"\x00\x01")
    assert codec.split(body, Headers({})) == (body, b"")
    for length in ("99", "-1", "x"):
        with pytest.raises(InvalidInferenceRequest):
            codec.split(body, Headers({HEADER_LENGTH: length}))
    with pytest.raises(InvalidInferenceRequest, match="Content-Encoding 'gzip'"):
        codec.split(body, Headers({"content-encoding": "gzip"}))


def test_a_crowded_body_is_refused_before_it_is_parsed() -> None:
    most = BATCH + codec.OTHER_ITEMS
    codec.refuse_crowded(b"[" + b"0," * (most - 1) + b"0]", BATCH)  # `most` commas and brackets
    with pytest.raises(InvalidInferenceRequest, match="commas and opening brackets"):
        codec.refuse_crowded(b"[" + b"0," * most + b"0]", BATCH)
    codec.refuse_crowded(b'["' + b"," * 10 * most + b'"]', BATCH)  # in a string: not counted


# -- the codec: encode, and round trips -------------------------------------------------------


def floats(*values: float) -> Floats:
    return np.array(values, dtype=np.float64)


def test_scores_encode_as_json() -> None:
    asked = Inference(id="r-1", hours=floats(1.0, 2.0))
    body, json_length = codec.encode(MODEL, 7, asked, {"score": floats(2.5, 4.5)})
    assert json_length is None
    assert json.loads(body) == {
        "model_name": MODEL,
        "model_version": "7",
        "id": "r-1",
        "outputs": [{"name": "score", "datatype": "FP64", "shape": [2], "data": [2.5, 4.5]}],
    }


def test_scores_encode_as_binary_data_after_the_json_object() -> None:
    asked = Inference(id=None, hours=floats(1.0, 2.0, 3.0), outputs=(("score", True),))
    scores = [0.1, -2.0, 1e300]
    body, json_length = codec.encode(MODEL, 3, asked, {"score": floats(*scores)})
    assert json_length is not None
    answer = json.loads(body[:json_length])
    assert "id" not in answer
    (output,) = answer["outputs"]
    assert output == {
        "name": "score",
        "datatype": "FP64",
        "shape": [3],
        "parameters": {"binary_data_size": 24},
    }
    assert list(struct.unpack("<3d", body[json_length:])) == scores


def test_an_id_json_cannot_write_as_utf8_is_escaped() -> None:
    asked = Inference(id="\ud800", hours=floats(1.0))
    body, _ = codec.encode(MODEL, 1, asked, {"score": floats(1.0)})
    assert json.loads(body)["id"] == "\ud800"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_round_trip_keeps_every_float(binary: bool) -> None:
    """Scores encoded, read back as a client reads them, then sent again as `hours`: the same
    floats, bit for bit."""
    scores = [0.1, -0.0, 1 / 3, 123456.789, -5e-300, 987654321.0 + 2.0**-23]
    asked = Inference(None, floats(*[0.0] * 6), (("score", binary),))
    body, json_length = codec.encode(MODEL, 1, asked, {"score": floats(*scores)})
    if json_length is None:
        (output,) = json.loads(body)["outputs"]
        header, tail = request(output["data"], output["shape"]), b""
    else:
        (output,) = json.loads(body[:json_length])["outputs"]
        tail = body[json_length:]
        header = request(None, output["shape"], parameters=output["parameters"])
    assert decode(header, tail).hours.tolist() == scores


# -- errors as problem+json, and as the protocol's on /v2 -------------------------------------


def test_a_service_error_renders_as_problem_json_with_its_headers() -> None:
    error = NotReady("not yet", retry_in=2)
    error.headers["Retry-After"] = "2"
    response = problem_response(error, {"Retry-After": "9", "Connection": "close"})
    assert response.status_code == 503
    assert response.media_type == PROBLEM_JSON
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.headers["retry-after"] == "2"  # the error's, over the transport's
    assert response.headers["connection"] == "close"
    assert json.loads(bytes(response.body)) == {
        "type": error.type,
        "title": error.title,
        "status": 503,
        "detail": "not yet",
        "retry_in": 2,
    }


def test_invalid_input_lists_its_issues() -> None:
    issue = {"field": "x[3]", "message": "too big", "code": "limit"}
    response = problem_response(InvalidInput("fix these fields and retry: x[3]", [issue]))
    assert response.status_code == 422
    assert json.loads(bytes(response.body))["errors"] == [issue]


def _answer(app: Any, path: str) -> tuple[Message, bytes]:
    """What a pure ASGI app sends for GET `path`: its start message and its body."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    asyncio.run(app(scope, receive, send))
    start, *bodies = sent
    return start, b"".join(m.get("body", b"") for m in bodies)


def _failing(error: ServiceError) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await problem_response(error)(scope, receive, send)

    return app


def test_on_v2_a_problem_becomes_the_protocols_error() -> None:
    issue = {"field": "inputs", "message": "Field required", "code": "missing"}
    error = InvalidInput("fix these fields and retry: inputs", [issue])
    error.headers["Allow"] = "POST"
    start, body = _answer(ProtocolErrors(_failing(error)), "/v2/models/sgd/infer")
    assert start["status"] == 400  # the protocol's status for an invalid request
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"allow"] == b"POST"
    assert json.loads(body) == {
        "error": "fix these fields and retry: inputs: inputs: Field required"
    }


def test_elsewhere_a_problem_stays_a_problem() -> None:
    error = NotReady("not yet")
    start, body = _answer(ProtocolErrors(_failing(error)), "/v2x/models")
    assert start["status"] == 503
    assert dict(start["headers"])[b"content-type"] == PROBLEM_JSON.encode()
    assert json.loads(body) == error.problem()


# -- refused bodies, raised as FastAPI or the route raised them -------------------------------


def test_each_refusal_is_raised_as_fastapi_or_the_route_raised_it() -> None:
    not_json = error_of(NotJson("Expecting value", 7))
    assert isinstance(not_json, RequestValidationError)
    assert not_json.errors() == [
        {
            "type": "json_invalid",
            "loc": ("body", 7),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": "Expecting value"},
        }
    ]
    unreadable = error_of(Unreadable())
    assert isinstance(unreadable, HTTPException)
    assert unreadable.status_code == 400
    errors = [{"type": "missing", "loc": ("body", "x"), "msg": "Field required"}]
    not_valid = error_of(NotValid(errors))
    assert isinstance(not_valid, RequestValidationError)
    assert not_valid.errors() == errors
    issues = [{"field": "body", "message": "nested too deeply", "code": "json_invalid"}]
    not_accepted = error_of(NotAccepted("too deep", issues))
    assert isinstance(not_accepted, InvalidInput)
    assert not_accepted.detail == "too deep"
    assert not_accepted.extra["errors"] == issues


# -- POST /fit's body -------------------------------------------------------------------------


def test_fit_options_are_the_fit_requests_fields_but_its_samples() -> None:
    assert list(FitOptions.__dataclass_fields__) == [
        name for name in FitRequest.model_fields if name not in ("x", "y")
    ]
    request = FitRequest.model_validate({"x": [1, 2], "y": [2, 4], "init_from": "served"})
    options = FitOptions.of(request)
    assert options.init_from == "served"
    assert options.epochs == request.epochs


def test_fastapi_reads_no_body_for_fit() -> None:
    """The route declares no body parameter: fit_body, a dependency after the token check,
    reads it; the document describes it as a FitRequest all the same."""
    (route,) = [r for r in api.router.routes if isinstance(r, APIRoute) and r.path == "/fit"]
    assert route.body_field is None
    first, second, *_ = (d.call for d in route.dependant.dependencies)
    assert getattr(first, "scope", None) == "train"  # the token check, then the body
    assert second is fit_body
    assert route.openapi_extra == {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/FitRequest"}}
            },
        }
    }


# -- the codec: a large request read a slice at a time ----------------------------------------

BIG = 100_000  # over SLICED_BYTES as JSON, and more than two slices
BIG_SETTINGS = settings_for_tests(max_predict_batch=200_000)


def stepwise(header: bytes) -> tuple[Inference | None, str | None, int]:
    """What `decoding` gives, stepping through it: the request or the error, and its steps."""
    steps = codec.decoding(header, b"", MODEL, BIG_SETTINGS)
    taken = 0
    try:
        while True:
            next(steps)
            taken += 1
    except StopIteration as done:
        return done.value, None, taken
    except InvalidInferenceRequest as e:
        return None, e.detail, taken


def whole(header: bytes) -> tuple[Inference | None, str | None]:
    try:
        return codec.decode(header, b"", MODEL, BIG_SETTINGS), None
    except InvalidInferenceRequest as e:
        return None, e.detail


def big_values() -> list[Any]:
    return [round(i * 0.37 % 11 - 3, 6) if i % 5 else i % 3 for i in range(BIG)]


def spliced(values: list[Any], text: bytes) -> bytes:
    """A large request whose values' text has `text` in the middle (a value, or stray bytes)."""
    header = request(values, [len(values)])
    middle = header.index(b", ", len(header) // 2)
    return header[:middle] + b"," + text + header[middle:]


BIG_CASES = {
    "valid": request(big_values(), [BIG]),
    "pretty": json.dumps(
        {"inputs": [{"name": "hours", "shape": [BIG], "datatype": "FP64", "data": big_values()}]},
        indent=2,
    ).encode(),
    "FP32": request(big_values(), [BIG], "FP32"),
    "id and outputs": request(big_values(), [BIG], id="r", outputs=[{"name": "score"}]),
    "a boolean": spliced(big_values(), b"true"),
    "a string": spliced(big_values(), b'"4"'),
    "null": spliced(big_values(), b"null"),
    "NaN": spliced(big_values(), b"NaN"),
    "a nested list": spliced(big_values(), b"[1, 2]"),
    "two commas": spliced(big_values(), b""),
    "too big a value": spliced(big_values(), b"1e400"),
    "an integer past 64 bits": spliced(big_values(), b"1" + b"0" * 30),
    "over the limit": spliced(big_values(), b"2e9"),
    "the shape differs": request(big_values(), [BIG + 1]),
    "INT32": request([int(v) for v in big_values()], [BIG], "INT32"),
    "a second data key": request(big_values(), [BIG], parameters={"data": 1}),
    "data in outputs": request(big_values(), [BIG], outputs=[{"name": "score", "data": [1]}]),
    "a trailing comma": request(big_values(), [BIG]).replace(b"]}]}", b",]}]}"),
}


@pytest.mark.parametrize("case", BIG_CASES)
def test_a_large_request_read_a_slice_at_a_time_is_read_as_decode_reads_it(case: str) -> None:
    header = BIG_CASES[case]
    assert len(header) >= codec.SLICED_BYTES
    asked, error, steps = stepwise(header)
    expected, expected_error = whole(header)
    assert error == expected_error
    if expected is None:
        assert asked is None
        return
    assert asked is not None
    assert asked.hours.tobytes() == expected.hours.tobytes()  # every float, bit for bit
    assert (asked.id, asked.outputs) == (expected.id, expected.outputs)
    if case in ("valid", "pretty", "FP32", "id and outputs"):
        assert steps > 2  # it did take steps: the loop had its turns


def test_a_large_answer_is_written_a_slice_at_a_time_as_one_piece_would_be() -> None:
    scores = np.array([v / 7 for v in range(BIG)], dtype=np.float64)
    asked = Inference(id="x", hours=scores)
    parts, json_length = codec.encoding(MODEL, 3, asked, {"score": scores})
    written = list(parts)
    assert json_length is None
    assert len(written) > 3
    assert b"".join(written) == orjson.dumps(
        {
            "model_name": MODEL,
            "model_version": "3",
            "id": "x",
            "outputs": [{"name": "score", "datatype": "FP64", "shape": [BIG], "data": scores}],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def test_an_escaped_data_key_is_read_by_decode() -> None:
    """A tensor's key written `d\\u0061ta` is its data too: the slices are not read from a list
    elsewhere in the body, whatever its key."""
    values = ", ".join(["1.2345678901234567"] * 20_000)
    header = (
        '{"data": [' + values + '], "inputs": [{"name": "hours", "datatype": "FP64", '
        '"shape": [20000], "d\\u0061ta": []}]}'
    ).encode()
    assert len(header) >= codec.SLICED_BYTES
    asked, error, _ = stepwise(header)
    assert asked is None
    assert error == whole(header)[1]
    assert error is not None
    assert "its data holds 0 values" in error
