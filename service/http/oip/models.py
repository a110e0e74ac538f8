"""The Open Inference Protocol's objects: the model's tensor names, the datatypes `hours` may
come in, and the wire models of requests and answers.

Requests are strict ("3" is no shape) but ignore fields the service has no use for, as Triton
and KServe do; answers are frozen. What JSON Schema can state beyond these models is written
into the OpenAPI document by service.http.oip.openapi.
"""

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, WithJsonSchema

from service.core.numbers import VERSION_NUMBER

SERVER_NAME = "sgd-service"
# The protocol's "framework/backend" of the model: this service's own linear model, y = w*x + b.
PLATFORM = "sgd-service"
EXTENSIONS = ["binary_tensor_data"]
INPUT, OUTPUT = "hours", "score"
# With the request parameter `coverage`: the interval around each score (service.core.intervals)
LOWER, UPPER = "score_lower", "score_upper"
OUTPUTS = (OUTPUT, LOWER, UPPER)
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
VERSION = re.compile(VERSION_NUMBER)

# What a request may hold besides its values. The protocol's parameters are a handful
# (binary_data_output, priority, timeout, sequence ids), and each one costs a check.
MAX_PARAMETERS = 64


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
    name: str = Field(json_schema_extra={"enum": list(OUTPUTS)})
    parameters: Parameters | None = Field(
        default=None, description="binary_data: true for the output as binary data"
    )


class InferenceRequest(_Wire):
    id: str | None = Field(default=None, description="echoed in the response")
    parameters: Parameters | None = Field(
        default=None,
        description="binary_data_output: true for every output as binary data; coverage "
        f"(0.5 to 0.999): {LOWER} and {UPPER} too, an interval holding the true score with "
        "this probability; method: conformal or gaussian (default: the version's first, "
        "GET /models/{version}); others ignored",
    )
    # One input, three outputs at most: the model has no more, and pydantic counts before it
    # checks.
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: (
        Annotated[
            list[RequestOutput],
            Field(max_length=len(OUTPUTS), json_schema_extra={"uniqueItems": True}),
        ]
        | None
    ) = None


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
