"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) under /v2: health, metadata and
inference with JSON tensors and the binary tensor data extension.

The model is named by SGD_MODEL_NAME; its input `hours` and output `score` are FP64 tensors of
shape [-1]. An inference is /predict's: one read of the served model (or of a kept version, as
`?version=` reads it), plain Python, never torch, never a wait on training.

A body is counted before it is parsed: more commas and brackets than a valid request can hold
is a 400 before anything builds a Python object from it. What passes is parsed by orjson and its
values checked by C loops (array, min, max, sum): a request's work in Python does not grow with
its values, and a value is formatted only for an error's text.

The OpenAPI document states the request's rules in its schema wherever JSON Schema can (each
datatype's values, `data` or binary data, the parameters that mean something), and the others
(shape [n] counts the values, ...) in the description of the 400 that refuses them.

Errors on /v2 take the protocol's form, `{"error": "..."}`: the routes raise domain errors like
every route, and ProtocolErrors, a pure ASGI layer in front of the Host check and the body limit,
rewrites each problem+json answer on a /v2 path into that form. So the Host check's 400, the body
limit's 413 and routing's 404 and 405 take it too, while every other path keeps problem+json.
"""

import json
import math
import re
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    WithJsonSchema,
)
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.core.errors import ModelNotReady, ServiceError, StoreUnavailable, VersionNotFound
from service.core.schemas import Model
from service.core.settings import Settings
from service.http.deps import PREDICT, SettingsDep, StoreDep
from service.http.problems import PROBLEM_JSON
from service.http.turns import give_way
from service.state.base import Store

SERVER_NAME = "sgd-service"
# The protocol's "framework/backend" of the model: this service's own linear model, y = w*x + b.
PLATFORM = "sgd-service"
EXTENSIONS = ["binary_tensor_data"]
INPUT, OUTPUT = "hours", "score"
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE, BINARY_TYPE = "application/json", "application/octet-stream"

# The datatypes `hours` may come in: their binary format (little-endian, as the extension says)
# and, for integers, their range. FP16 and BF16 have no JSON form; BOOL and BYTES are no numbers.
FLOATS = {"FP32": "f", "FP64": "d"}
INTEGERS = {
    f"{kind}{bits}": (code, lo, hi)
    for bits, codes in ((8, "bB"), (16, "hH"), (32, "iI"), (64, "qQ"))
    for kind, code, lo, hi in (
        ("INT", codes[0], -(2 ** (bits - 1)), 2 ** (bits - 1) - 1),
        ("UINT", codes[1], 0, 2**bits - 1),
    )
}
DATATYPES: list[JsonValue] = ["FP64", "FP32", *INTEGERS]
_VERSION = re.compile(r"[1-9][0-9]{0,17}")  # a version number as GET /models shows it

# What a request may hold besides its values. The protocol's parameters are a handful
# (binary_data_output, priority, timeout, sequence ids), and each one costs a check.
MAX_PARAMETERS = 64
# Commas and opening brackets a body may have besides one per value: its names, shape and
# datatype, three full `parameters`, nested lists, fields the protocol does not define.
OTHER_ITEMS = 1024


class InvalidInferenceRequest(ServiceError):
    type = "invalid-inference-request"
    title = "The inference request is not valid"
    status = 400


class ModelNotFound(ServiceError):
    type = "model-not-found"
    title = "No such model"
    status = 404


# -- the protocol's objects ----------------------------------------------------------------


def _parameter(value: Any) -> Any:
    if not isinstance(value, bool | int | float | str):
        raise ValueError("a parameter is a number, a string or a boolean")
    return value


# One check, not a union of four types: one message per bad parameter.
Parameter = Annotated[
    Any, AfterValidator(_parameter), WithJsonSchema({"type": ["boolean", "number", "string"]})
]
# Capped before any parameter is checked: pydantic stops at the 65th.
Parameters = Annotated[dict[str, Parameter], Field(max_length=MAX_PARAMETERS)]


class _Wire(BaseModel):
    # Fields the service has no use for are ignored, as Triton and KServe ignore them (Triton's
    # own examples put "model_name" in a request); types are strict: "3" is no shape.
    model_config = ConfigDict(strict=True, extra="ignore")


class RequestInput(_Wire):
    name: str = Field(json_schema_extra={"enum": [INPUT]})
    shape: list[Annotated[int, Field(ge=0)]] = Field(
        json_schema_extra={"minItems": 1, "maxItems": 1}, examples=[[3]]
    )
    datatype: str = Field(json_schema_extra={"enum": DATATYPES}, examples=["FP64"])
    parameters: Parameters | None = Field(
        default=None, description="binary_data_size: the input's bytes after the JSON object"
    )
    data: list[Any] | None = Field(
        default=None,
        description="the values, row-major, flat or nested; absent when sent as binary data",
        examples=[[1, 2, 4]],
    )


class RequestOutput(_Wire):
    name: str = Field(json_schema_extra={"enum": [OUTPUT]})
    parameters: Parameters | None = Field(
        default=None, description="binary_data: true for the output as binary data"
    )


class InferenceRequest(_Wire):
    id: str | None = Field(default=None, description="echoed in the response")
    parameters: Parameters | None = Field(
        default=None,
        description="binary_data_output: true for every output as binary data; others ignored",
    )
    # One input and one output: the model has no other, and pydantic counts before it checks.
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: Annotated[list[RequestOutput], Field(max_length=1)] | None = None


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class ServerMetadata(_Out):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(_Out):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(_Out):
    name: str
    versions: list[str] = Field(description="the kept versions, newest first")
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ServerLive(_Out):
    live: bool


class ServerReady(_Out):
    ready: bool


class ModelReady(_Out):
    name: str
    ready: bool


class ResponseOutput(_Out):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, int] | None = None
    data: list[float] | None = None


class InferenceResponse(_Out):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class ProtocolError(_Out):
    model_config = ConfigDict(frozen=True, extra="forbid")  # the message alone
    error: str


# Why each error comes, for the OpenAPI document. Every /v2 route can answer 400: the Host
# check is in front of them all.
CAUSES = {
    400: "The Host header names no host of SGD_ALLOWED_HOSTS",
    404: "Another model name, or a version that is not kept",
    413: "The body is over SGD_MAX_BODY_BYTES, or over room for SGD_MAX_PREDICT_BATCH numbers "
    "(32 bytes each, and 1 MiB) when that is less",
    503: "No fit has succeeded yet (in Redis mode, also: Redis cannot be reached)",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the protocol's error answers a route can give."""
    return {code: {"model": ProtocolError, "description": CAUSES[code]} for code in codes}


# -- the routes -----------------------------------------------------------------------------

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])


async def _model_name(name: str, settings: SettingsDep) -> str:
    if name != settings.model_name:
        raise ModelNotFound(f"no model {name!r}: this server serves {settings.model_name!r}")
    return name


NameDep = Annotated[str, Depends(_model_name)]


async def _version_number(name: NameDep, version: str) -> int:
    if not _VERSION.fullmatch(version):
        raise VersionNotFound(
            f"model {name!r} has no version {version!r}: versions are numbers, and "
            f"GET /v2/models/{name} lists the kept ones"
        )
    return int(version)


VersionDep = Annotated[int, Depends(_version_number)]


def _served(store: Store, name: str) -> Model:
    model = store.model  # one read: one version
    if model is None:
        why = store.unreachable
        if why is not None:
            raise StoreUnavailable(f"model {name!r}: this replica has not read it yet: {why}")
        raise ModelNotReady(
            f"model {name!r} is not ready: no fit has succeeded yet (POST /fit, then retry)"
        )
    return model


async def _kept(store: Store, name: str, version: int) -> Model:
    try:
        return await run_in_threadpool(store.version, version)
    except VersionNotFound:
        raise VersionNotFound(
            f"model {name!r} has no version {version}: GET /v2/models/{name} lists the kept ones"
        ) from None


@router.get("", responses=errors(400))
async def server_metadata() -> ServerMetadata:
    """Server metadata: name, version and the protocol extensions it supports."""
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


@router.get("/health/live", responses=errors(400))
async def server_live() -> ServerLive:
    """Liveness: the process answers."""
    return ServerLive(live=True)


@router.get("/health/ready", responses=errors(400, 503))
async def server_ready(store: StoreDep, settings: SettingsDep) -> ServerReady:
    """Readiness for inference: 200 once a model is served, 503 before."""
    _served(store, settings.model_name)
    return ServerReady(ready=True)


async def _metadata(store: Store, settings: Settings) -> ModelMetadata:
    kept = await run_in_threadpool(store.versions, settings.keep_versions)
    return ModelMetadata(
        name=settings.model_name,
        versions=[str(m.version) for m in kept],
        platform=PLATFORM,
        inputs=[MetadataTensor(name=INPUT, datatype="FP64", shape=[-1])],
        outputs=[MetadataTensor(name=OUTPUT, datatype="FP64", shape=[-1])],
    )


@router.get("/models/{name}", dependencies=[PREDICT], responses=errors(400, 404, 503))
async def model_metadata(name: NameDep, store: StoreDep, settings: SettingsDep) -> ModelMetadata:
    """The model's metadata: its kept versions, its input and output tensors."""
    return await _metadata(store, settings)


@router.get(
    "/models/{name}/versions/{version}", dependencies=[PREDICT], responses=errors(400, 404, 503)
)
async def version_metadata(
    name: NameDep, version: VersionDep, store: StoreDep, settings: SettingsDep
) -> ModelMetadata:
    """The model's metadata, for a kept version (404 for any other)."""
    await _kept(store, name, version)
    return await _metadata(store, settings)


@router.get("/models/{name}/ready", dependencies=[PREDICT], responses=errors(400, 404, 503))
async def model_ready(name: NameDep, store: StoreDep) -> ModelReady:
    """Model readiness: 200 once a model is served, 503 before."""
    _served(store, name)
    return ModelReady(name=name, ready=True)


@router.get(
    "/models/{name}/versions/{version}/ready",
    dependencies=[PREDICT],
    responses=errors(400, 404, 503),
)
async def version_ready(name: NameDep, version: VersionDep, store: StoreDep) -> ModelReady:
    """Readiness of a version: 200 while it is kept, 404 otherwise."""
    await _kept(store, name, version)
    return ModelReady(name=name, ready=True)


_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferenceResponse,
        "description": "The scores; with binary outputs asked for, the JSON object then the "
        f"binary data as {BINARY_TYPE}, the JSON's length in {HEADER_LENGTH}",
        "content": {BINARY_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    **errors(400, 404, 413, 503),  # 400's description: `document` writes the rules in
}


@router.post(
    "/models/{name}/infer",
    dependencies=[PREDICT],
    response_model=None,
    responses=_INFER_RESPONSES,
)
async def infer(
    name: NameDep, request: Request, store: StoreDep, settings: SettingsDep
) -> Response:
    """Inference with the served model: `hours` in, `score` out."""
    asked = await _read(request, name, settings)
    return _answer(name, _served(store, name), asked)


@router.post(
    "/models/{name}/versions/{version}/infer",
    dependencies=[PREDICT],
    response_model=None,
    responses=_INFER_RESPONSES,
)
async def infer_version(
    name: NameDep, version: VersionDep, request: Request, store: StoreDep, settings: SettingsDep
) -> Response:
    """Inference with a kept version (404 for any other)."""
    asked = await _read(request, name, settings)
    return _answer(name, await _kept(store, name, version), asked)


# -- inference -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Inference:
    """A request, checked: what was asked, and how to answer."""

    id: str | None
    hours: list[float]
    binary_output: bool


async def _read(request: Request, name: str, settings: Settings) -> Inference:
    """The request's body, checked at the edge like POST /predict's; the model comes after."""
    try:
        body = await request.body()
    except ClientDisconnect:  # the caller left mid-body: nothing to answer, nothing to log
        raise InvalidInferenceRequest("the body ended before its Content-Length") from None
    header, binary = _split(body, request.headers)
    _refuse_crowded(header, settings.max_predict_batch)
    await give_way()  # up to 1.3 MB counted: /predict goes first
    asked = inference(header, binary, name, settings)
    await give_way()  # and again between checking 10,000 values and scoring them
    return asked


def inference(header: bytes, binary: bytes, name: str, settings: Settings) -> Inference:
    """An inference request's JSON object (and binary data), checked, with work that does not
    grow with the values in Python: orjson parses, C loops check the values, and nothing is
    formatted per value. The standard library reads the object again for what orjson refuses
    (NaN, 1e400, a lone surrogate, no JSON at all) and for the exact text of an error."""
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError:
        return _checked(_loads(header), binary, name, settings)
    try:
        return _checked(document, binary, name, settings)
    except InvalidInferenceRequest:
        if not _has_long_integers(header):
            raise
        # orjson read an integer beyond 64 bits as a float: the error names what was sent
        return _checked(_loads(header), binary, name, settings)


def _split(body: bytes, headers: Headers) -> tuple[bytes, bytes]:
    """The JSON object and the binary data after it (the binary tensor data extension)."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise InvalidInferenceRequest(
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed"
        )
    length = headers.get(HEADER_LENGTH)
    if length is None:
        return body, b""
    length = length.strip()
    if not (length.isascii() and length.isdigit() and len(length) < 19) or int(length) > len(body):
        raise InvalidInferenceRequest(
            f"{HEADER_LENGTH} must be the length in bytes of the JSON object that starts the "
            f"body (at most {len(body)}), not {length[:40]!r}"
        )
    return body[: int(length)], body[int(length) :]


def _refuse_crowded(header: bytes, batch: int) -> None:
    """Refuse a JSON object that holds more than a valid request can, before it is parsed.

    Parsing builds an object per value and a list per bracket: 456,000 empty lists (1.3 MB)
    took 150 ms, 100,000 parameters 100 ms. A valid request has a comma per value of `hours`
    and OTHER_ITEMS commas and opening brackets at most besides.
    """
    most = batch + OTHER_ITEMS
    if _commas_and_brackets(header, most) > most:
        raise InvalidInferenceRequest(
            f"the body's JSON has more than {most} commas and opening brackets outside its "
            f"strings: a request holds at most SGD_MAX_PREDICT_BATCH={batch} values of "
            f"{INPUT!r}, with room for {OTHER_ITEMS} more (names, shape, parameters, nested "
            "lists); split the request"
        )


def _commas_and_brackets(text: bytes, most: int) -> int:
    """The commas, '[' and '{' of a JSON text outside its strings: exact up to `most`, and over
    `most` when there are more. A pass or two in C over the bytes, never a parse."""
    count = _structure(text)
    if count <= most:
        return count  # those in strings can only have added to it
    # In a JSON string a backslash starts an escape: without the escaped backslashes, then the
    # escaped quotes, every quote left opens or closes a string.
    if b"\\" in text:
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Every string is a key or an element, and the elements (a member is one) are at most the
    # commas and brackets: more than 2 * most + 1 strings need more than `most` of them.
    parts = text.split(b'"', 4 * most + 3)
    if len(parts) > 4 * most + 3:
        return most + 1
    return count - _structure(b"".join(parts[1::2]))


def _structure(text: bytes) -> int:
    return len(text) - len(text.translate(None, b",[{"))


# Digits, each as a zero: an integer of 19 digits or more is one orjson may read as a float.
_ZEROS = bytes.maketrans(b"0123456789", b"0" * 10)


def _has_long_integers(text: bytes) -> bool:
    return b"0" * 19 in text.translate(_ZEROS)


def _loads(header: bytes) -> Any:
    """The standard library's reading, for NaN and big integers and its exact error texts."""
    try:
        return json.loads(header)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidInferenceRequest(f"the body is not a JSON inference request: {exc}") from None


def _checked(document: Any, binary: bytes, name: str, settings: Settings) -> Inference:
    """A parsed request, checked: the protocol's objects, then the model's input and output."""
    try:
        parsed = InferenceRequest.model_validate(document)
    except ValidationError as exc:
        raise InvalidInferenceRequest(_describe(exc)) from None
    (tensor,) = parsed.inputs
    if tensor.name != INPUT:
        raise InvalidInferenceRequest(
            f"model {name!r} has no input {tensor.name!r}: its input is {INPUT!r}"
        )
    return Inference(
        id=parsed.id,
        hours=_hours(tensor, binary, settings),
        binary_output=_binary_output(parsed, name),
    )


def _describe(exc: ValidationError) -> str:
    """Pydantic's complaints, each at the place a caller wrote it: inputs[0].shape[1]."""
    seen: dict[str, str] = {}
    for error in exc.errors():
        where = ""
        for part in error["loc"]:
            where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
        seen.setdefault(where or "body", error["msg"])
    issues = "; ".join(f"{where}: {message}" for where, message in list(seen.items())[:5])
    return f"the inference request is not valid: {issues}"


def _hours(tensor: RequestInput, binary: bytes, settings: Settings) -> list[float]:
    """The input's values as floats, each finite and within SGD_MAX_ABS_VALUE."""
    datatype = tensor.datatype
    if datatype not in FLOATS and datatype not in INTEGERS:
        raise InvalidInferenceRequest(
            f"input {INPUT!r} cannot be {datatype!r}: send FP64 (FP32, INT8 to INT64 and "
            "UINT8 to UINT64 are accepted too)"
        )
    if len(tensor.shape) != 1:
        raise InvalidInferenceRequest(
            f"input {INPUT!r} has shape {tensor.shape}: it has one dimension, shape [n]"
        )
    (n,) = tensor.shape
    if n > settings.max_predict_batch:
        raise InvalidInferenceRequest(
            f"input {INPUT!r} has {n} values: at most SGD_MAX_PREDICT_BATCH="
            f"{settings.max_predict_batch} per request; split the request"
        )
    parameters = tensor.parameters or {}
    _refuse_shared_memory(parameters)
    size = parameters.get("binary_data_size")
    if size is not None:
        values = _from_binary(size, tensor.data, binary, n, datatype)
    else:
        if binary:
            raise InvalidInferenceRequest(
                f"{len(binary)} bytes follow the JSON object but no input says binary_data_size"
            )
        values = _from_json(tensor.data, n, datatype)
    if datatype == "FP32":  # an FP32 tensor holds float32 values, whatever JSON wrote
        values = array("f", values)
    return _within(values, settings.max_abs_value)


def _refuse_shared_memory(parameters: dict[str, Any]) -> None:
    if "shared_memory_region" in parameters:
        raise InvalidInferenceRequest(
            "the shared memory extension is not supported: send the tensor in the request"
        )


def _from_binary(
    size: object, data: object, binary: bytes, n: int, datatype: str
) -> "array[float]":
    if data is not None:
        raise InvalidInferenceRequest(
            f"input {INPUT!r} has both 'data' and binary_data_size: send one of them"
        )
    code = FLOATS.get(datatype) or INTEGERS[datatype][0]
    expected = n * struct.calcsize(f"<{code}")
    if type(size) is not int or size != expected:  # not True, nor 24.0
        raise InvalidInferenceRequest(
            f"input {INPUT!r} of shape [{n}] and datatype {datatype} is {expected} bytes, but its "
            f"binary_data_size is {size!r}"
        )
    if len(binary) != expected:
        raise InvalidInferenceRequest(
            f"input {INPUT!r} announces {expected} bytes of binary data, but {len(binary)} bytes "
            f"follow the JSON object ({HEADER_LENGTH} gives its length)"
        )
    return array("d", struct.unpack(f"<{n}{code}", binary))


def _from_json(data: list[Any] | None, n: int, datatype: str) -> "array[float]":
    if data is None:
        raise InvalidInferenceRequest(
            f"input {INPUT!r} has no data: send 'data', or binary data with binary_data_size"
        )
    kinds = set(map(type, data))  # one pass in C; bool is a type of its own
    fast = _flat(data, kinds, n, datatype)
    if fast is not None:
        return fast
    elements = _flatten(data, n) if list in kinds else data
    if len(elements) != n:
        held = "more" if len(elements) > n else str(len(elements))
        raise InvalidInferenceRequest(
            f"input {INPUT!r} has shape [{n}] but its data holds {held} values: the shape "
            "counts every value"
        )
    return array("d", [_number(value, i, datatype) for i, value in enumerate(elements)])


def _flat(data: list[Any], kinds: set[type], n: int, datatype: str) -> "array[float] | None":
    """A flat list of n numbers of the datatype as floats, by C loops alone; None for anything
    else (nested lists, other values, integers out of range), which _from_json reads slowly."""
    if len(data) != n or not kinds <= ({int} if datatype in INTEGERS else {int, float}):
        return None
    if datatype in INTEGERS and data:
        _, lo, hi = INTEGERS[datatype]
        if not (lo <= min(data) and max(data) <= hi):
            return None
    try:
        return array("d", data)
    except OverflowError:  # an integer beyond any float
        return None


def _flatten(data: list[Any], n: int) -> list[Any]:
    """The values of nested lists in row-major order, up to n + 1 of them; iterative, so that
    no nesting depth can exhaust the stack."""
    out: list[Any] = []
    stack = [iter(data)]
    while stack and len(out) <= n:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
            if len(out) > n:
                break
        else:
            stack.pop()
    return out


def _number(value: Any, index: int, datatype: str) -> float:
    """One JSON value of a tensor of this datatype, as a float (or infinity when it has none)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInferenceRequest(f"{INPUT}[{index}] is {_shown(value)}, not a number")
    if datatype in INTEGERS:
        _, lo, hi = INTEGERS[datatype]
        if not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidInferenceRequest(
                f"{INPUT}[{index}] is {_shown(value)}, not an {datatype} value (an integer in "
                f"[{lo}, {hi}])"
            )
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float: refused as the infinity it is
        return math.inf if value > 0 else -math.inf


def _shown(value: Any) -> str:
    """A value as the caller wrote it, cut short: only for an error's text."""
    return json.dumps(value)[:40]


def _within(values: "array[float]", limit: float) -> list[float]:
    """The values as floats, each finite and at most `limit` in magnitude. A sum that is
    finite proves them all finite, and then min and max bound them: one value at a time
    only to name the first that fails."""
    if math.isfinite(sum(values)) and (not values or -limit <= min(values) <= max(values) <= limit):
        return values.tolist()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise InvalidInferenceRequest(f"{INPUT}[{i}] is {value}: send finite numbers")
        if abs(value) > limit:
            raise InvalidInferenceRequest(
                f"{INPUT}[{i}] is {value:g}: every |{INPUT}| must be at most "
                f"SGD_MAX_ABS_VALUE={limit:g}"
            )
    return values.tolist()  # finite, within the limit, and a sum that overflowed


def _binary_output(parsed: InferenceRequest, name: str) -> bool:
    """Whether `score` goes back as binary data: the request's binary_data_output, unless the
    requested output says otherwise."""
    binary = _flag(parsed.parameters or {}, "binary_data_output", False)
    for output in parsed.outputs or []:
        if output.name != OUTPUT:
            raise InvalidInferenceRequest(
                f"model {name!r} has no output {output.name!r}: its output is {OUTPUT!r}"
            )
        parameters = output.parameters or {}
        if "classification" in parameters:
            raise InvalidInferenceRequest(
                f"the classification extension is not supported: {OUTPUT!r} is a number"
            )
        _refuse_shared_memory(parameters)
        binary = _flag(parameters, "binary_data", binary)
    return binary


def _flag(parameters: dict[str, Any], key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInferenceRequest(f"parameter {key!r} must be true or false, not {value!r}")
    return value


def _answer(name: str, model: Model, asked: Inference) -> Response:
    """The scores of one model version, as JSON or as binary data after the JSON object."""
    w, b = model.w, model.b  # Model.predict's w * h + b, without a call per value
    scores = [w * h + b for h in asked.hours]
    if not math.isfinite(sum(scores)):  # each is finite when their sum is
        for i, score in enumerate(scores):
            if not math.isfinite(score):
                raise InvalidInferenceRequest(
                    f"the score of {INPUT}[{i}] = {asked.hours[i]:g} overflows a float: send "
                    f"smaller {INPUT}"
                )
    n = len(scores)
    output: dict[str, Any] = {"name": OUTPUT, "datatype": "FP64", "shape": [n]}
    if asked.binary_output:
        output["parameters"] = {"binary_data_size": 8 * n}
    else:
        output["data"] = scores
    answer: dict[str, Any] = {"model_name": name, "model_version": str(model.version)}
    if asked.id is not None:
        answer["id"] = asked.id
    answer["outputs"] = [output]
    try:
        header = orjson.dumps(answer)
    except orjson.JSONEncodeError:  # an id with a lone surrogate, which JSON can only escape
        header = json.dumps(answer, separators=(",", ":")).encode()
    if not asked.binary_output:
        return Response(header, media_type=JSON_TYPE)
    return Response(
        header + struct.pack(f"<{n}d", *scores),
        media_type=BINARY_TYPE,
        headers={HEADER_LENGTH: str(len(header))},
    )


# -- errors: the protocol's form on /v2 ------------------------------------------------------


def is_protocol_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


class ProtocolErrors:
    """Pure ASGI: on /v2 paths, answer each problem+json error as the protocol's error object.

    The problem's detail becomes the message; its status stays, but for 422: the protocol calls
    an invalid request 400. Its headers (Allow, Retry-After, Connection) stay too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_protocol_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and _is_problem(message):
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                status, headers, body = _protocol_error(start, b"".join(chunks))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def _is_problem(start: Message) -> bool:
    headers: Sequence[tuple[bytes, bytes]] = start.get("headers", [])
    return any(k.lower() == b"content-type" and v == PROBLEM_JSON.encode() for k, v in headers)


def _protocol_error(start: Message, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    problem = json.loads(body)
    message = str(problem.get("detail") or problem.get("title") or "error")
    issues = problem.get("errors") or []
    if issues:  # a validation problem: its fields say what is wrong
        message += ": " + "; ".join(f"{i['field']}: {i['message']}" for i in issues[:5])
    status = 400 if start["status"] == 422 else start["status"]
    answer = json.dumps({"error": message}).encode()
    kept = [
        (k, v)
        for k, v in start.get("headers", [])
        if k.lower() not in (b"content-type", b"content-length")
    ]
    headers = [
        *kept,
        (b"content-type", JSON_TYPE.encode()),
        (b"content-length", str(len(answer)).encode()),
    ]
    return status, headers, answer


# -- the OpenAPI document ---------------------------------------------------------------------


def document(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Describe /v2 as it behaves: the protocol's request body with every rule JSON Schema can
    state, the others in the 400's description, the model's name, the limits, and no 422 (the
    protocol answers 400)."""
    schemas = spec["components"]["schemas"]
    request = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(request.pop("$defs", {}))
    schemas["InferenceRequest"] = request
    _state_rules(schemas, settings)
    for path, operations in spec["paths"].items():
        if not is_protocol_path(path):
            continue
        for operation in operations.values():
            operation["responses"].pop("422", None)
            for code, answer in operation["responses"].items():
                if code.startswith(("4", "5")):  # whoever declared it: it comes as {"error"}
                    answer["content"] = {JSON_TYPE: {"schema": _ref("ProtocolError")}}
            for param in operation.get("parameters", []):
                if param["name"] == "name":
                    param["schema"] = {"type": "string", "enum": [settings.model_name]}
                elif param["name"] == "version":
                    param["schema"] = {"type": "string", "pattern": f"^{_VERSION.pattern}$"}
            if path.endswith("/infer"):
                operation["requestBody"] = {
                    "required": True,
                    "description": "An inference request; for binary data (the binary tensor "
                    f"data extension), the JSON object then the data, with {HEADER_LENGTH}",
                    "content": {
                        JSON_TYPE: {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}
                    },
                }
                operation["responses"]["400"]["description"] = (
                    "The request is malformed or invalid, or the Host header names no host of "
                    "SGD_ALLOWED_HOSTS. Besides what the request's schema states: shape [n] "
                    "counts the values of `data`, or binary_data_size their bytes, which follow "
                    f"the JSON object ({HEADER_LENGTH} gives its length); each score is a "
                    f"finite float; the JSON object has at most "
                    f"{settings.max_predict_batch + OTHER_ITEMS} commas and opening brackets "
                    f"outside its strings (SGD_MAX_PREDICT_BATCH + {OTHER_ITEMS})"
                )
    return spec


def _state_rules(schemas: dict[str, Any], settings: Settings) -> None:
    """What the checks refuse, stated in the request's schema wherever JSON Schema can say it:
    each datatype's values and bounds, `data` or binary_data_size (one of them), the parameters
    that mean something, the extensions refused."""
    tensor = schemas["RequestInput"]
    tensor["properties"]["shape"]["items"]["maximum"] = settings.max_predict_batch
    limit = settings.max_abs_value
    bounds = {"HoursFloat": ("number", -limit, limit)}
    by_datatype = [
        {"properties": {"datatype": {"enum": list(FLOATS)}, "data": _data("HoursFloat")}}
    ]
    for datatype, (_, lo, hi) in INTEGERS.items():
        bounds[f"Hours{datatype}"] = (
            "integer",
            max(lo, math.ceil(-limit)),
            min(hi, math.floor(limit)),
        )
        by_datatype.append(
            {"properties": {"datatype": {"const": datatype}, "data": _data(f"Hours{datatype}")}}
        )
    for name, (kind, lo, hi) in bounds.items():  # a value, or a list of them: data may nest
        schemas[name] = {
            "anyOf": [
                {"type": kind, "minimum": lo, "maximum": hi},
                {"type": "array", "items": _ref(name)},
            ]
        }
    tensor["properties"]["data"].update(_data("HoursFloat"))
    binary = {"type": "object", "required": ["binary_data_size"]}
    in_data = {
        "required": ["data"],
        "properties": {"data": {"type": "array"}, "parameters": {"not": binary}},
    }
    in_binary = {
        "required": ["parameters"],
        "properties": {"parameters": binary, "data": {"type": "null"}},
    }
    tensor["allOf"] = [{"anyOf": by_datatype}, {"anyOf": [in_data, in_binary]}]
    refused: dict[str, Any] = {"not": {}}  # a parameter the service refuses
    _parameters(
        tensor, binary_data_size={"type": "integer", "minimum": 0}, shared_memory_region=refused
    )
    _parameters(
        schemas["RequestOutput"],
        binary_data={"type": "boolean"},
        classification=refused,
        shared_memory_region=refused,
    )
    _parameters(schemas["InferenceRequest"], binary_data_output={"type": "boolean"})


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _data(values: str) -> dict[str, Any]:
    """`data`: a list of the named schema's values, or null."""
    return {"anyOf": [{"type": "array", "items": _ref(values)}, {"type": "null"}]}


def _parameters(schema: dict[str, Any], **known: dict[str, Any]) -> None:
    """The parameters that mean something (or are refused) among an object's `parameters`."""
    (parameters,) = (
        s for s in schema["properties"]["parameters"]["anyOf"] if s["type"] == "object"
    )
    parameters["properties"] = known
