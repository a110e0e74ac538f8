"""The tensor codec of /v2 inference: a request's body to the values of `hours` (decode), and
the scores to an answer's body (encode), as JSON tensors or with the binary tensor data
extension.

A body is counted before it is parsed: more commas and brackets than a valid request can hold
is refused before anything builds a Python object from it (`refuse_crowded`). What passes is
parsed by orjson and its values checked by C loops (array, min, max, sum): a request's work in
Python does not grow with its values, and a value is formatted only for an error's text.
"""

import contextlib
import itertools
import json
import math
import re
import struct
from array import array
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import orjson
from pydantic import ValidationError

from service.core.intervals import MAX_COVERAGE, METHODS, MIN_COVERAGE, Method
from service.core.settings import Settings
from service.http.oip.errors import InvalidInferenceRequest
from service.http.oip.models import (
    FLOATS,
    HEADER_LENGTH,
    INPUT,
    INTEGERS,
    OUTPUT,
    OUTPUTS,
    InferenceRequest,
    RequestInput,
)
from service.http.reading import has_long_integers
from service.http.scoring import Floats, first_over

Binary = bytes | memoryview  # the binary data after the JSON object, as the body holds it

# Commas and opening brackets a body may have besides one per value: its names, shape and
# datatype, three full `parameters`, nested lists, fields the protocol does not define.
OTHER_ITEMS = 1024


@dataclass(frozen=True)
class Inference:
    """A request, checked: what was asked, and how to answer: the outputs, in order, each with
    whether it goes as binary data; with `coverage`, the interval's outputs too."""

    id: str | None
    hours: Floats
    outputs: tuple[tuple[str, bool], ...] = ((OUTPUT, False),)
    coverage: float | None = None
    method: Method | None = None


def decode(header: bytes, binary: Binary, name: str, settings: Settings) -> Inference:
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
        if not has_long_integers(header):
            raise
        # orjson read an integer beyond 64 bits as a float: the error names what was sent
        return _checked(_loads(header), binary, name, settings)


# A JSON object this long or longer is read a slice of its values at a time (`decoding`), and an
# answer of more values than a slice written a slice at a time (`encoding`): ~1 ms a step.
SLICED_BYTES = 256 * 1024
SLICE = 16_384
_DATA = re.compile(rb'"data"\s*:\s*\[')


def decoding(
    header: bytes, binary: Binary, name: str, settings: Settings
) -> Generator[None, None, Inference]:
    """`decode`, a step at a time: yields between steps, each ~1 ms or less.

    A large request's one flat list of numbers (`inputs[0].data`) is parsed a slice at a time,
    the rest of the object on its own; any other request, or one that this reading would not
    take exactly as `decode` does (another key "data", a value that is not a number, a shape
    that differs), is read by `decode` in one step, which gives the error.
    """
    taken = _values_taken_out(header) if len(header) >= SLICED_BYTES else None
    if taken is not None:
        rest, (start, stop) = taken
        parts = []
        while start < stop:
            end = header.find(b",", min(start + SLICE * 16, stop), stop)  # ~16 bytes a value
            end = stop if end < 0 else end
            part = _numbers(memoryview(header)[start:end])
            if part is None:
                break
            parts.append(part)
            start = end + 1
            yield
        else:
            read = np.concatenate(parts) if parts else np.empty(0)
            asked = _checked_with(rest, read, binary, name, settings)
            if asked is not None:
                return asked
        yield
    return decode(header, binary, name, settings)


def _values_taken_out(header: bytes) -> tuple[bytes, tuple[int, int]] | None:
    """The object with its one list after a key "data" emptied, and where that list's text
    is; None unless there is one such key, and its list holds no list, object or string."""
    at = header.find(b'"data"')
    found = _DATA.match(header, at) if at >= 0 else None
    if found is None:
        return None
    start = found.end()
    end = header.find(b"]", start)
    if end < 0:
        return None
    if any(header.find(c, start, end) >= 0 for c in (b"[", b"{", b'"')):  # memchr: 0.1 ms/MB
        return None
    rest = header[:start] + header[end:]
    # no escapes: every key is written as it reads (a key "d\u0061ta" is one "data" too)
    if b"\\" in rest or rest.count(b'"data"') != 1:
        return None
    return rest, (start, end)


def _numbers(text: memoryview) -> Floats | None:
    """The numbers of a slice of the list (`1.5,2,3e4`) as floats; None for anything else,
    booleans included, which `decode` reads and refuses."""
    try:
        data = orjson.loads(b"".join((b"[", text, b"]")))
        values: Floats = np.frombuffer(array("d", data))
    except (orjson.JSONDecodeError, TypeError, OverflowError):
        return None
    if not data:  # a comma too many: `1,,2` or `1,]`
        return None
    maybe = np.flatnonzero((values == 0) | (values == 1)).tolist()
    return None if bool in set(map(type, map(data.__getitem__, maybe))) else values


def _checked_with(
    rest: bytes, read: Floats, binary: Binary, name: str, settings: Settings
) -> Inference | None:
    """The request whose values were read apart, checked as `decode` checks it; None where
    `decode` may answer otherwise (it reads the request again, and says what is wrong)."""
    try:
        document = orjson.loads(rest)
        (tensor,) = document["inputs"]
        fits = (
            tensor["data"] == []
            and tensor.get("datatype") in FLOATS
            and tensor.get("shape") == [len(read)]
        )
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        return None
    if not fits:
        return None
    try:
        return _checked(document, binary, name, settings, read)
    except InvalidInferenceRequest:
        return None


def split(body: bytes, headers: Mapping[str, str]) -> tuple[bytes, Binary]:
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
    at = int(length)
    return body[:at], memoryview(body)[at:]  # the binary data, not copied


def refuse_crowded(header: bytes, batch: int) -> None:
    """Refuse a JSON object that holds more than a valid request can, before it is parsed.

    Parsing builds an object per value and a list per bracket: 456,000 empty lists (1.3 MB)
    took 150 ms, 100,000 parameters 100 ms. A valid request has a comma per value of `hours`
    and OTHER_ITEMS commas and opening brackets at most besides.
    """
    most = batch + OTHER_ITEMS
    if len(header) > most and _commas_and_brackets(header, most) > most:  # a byte each at least
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


_COMMA, _BRACKET, _BRACE = b",[{"


def _structure(text: bytes) -> int:
    """The commas, '[' and '{' of the text: a compare per byte in numpy, 10x bytes.count."""
    codes = np.frombuffer(text, dtype=np.uint8)
    return sum(int(np.count_nonzero(codes == c)) for c in (_COMMA, _BRACKET, _BRACE))


def _loads(header: bytes) -> Any:
    """The standard library's reading, for NaN and big integers and its exact error texts."""
    try:
        return json.loads(header)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidInferenceRequest(f"the body is not a JSON inference request: {exc}") from None


def _checked(
    document: Any, binary: Binary, name: str, settings: Settings, read: Floats | None = None
) -> Inference:
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
    parameters = parsed.parameters or {}
    coverage, method = _coverage(parameters), _method(parameters)
    return Inference(
        id=parsed.id,
        hours=_hours(tensor, binary, settings, read),
        outputs=_outputs(parsed, name, coverage is not None),
        coverage=coverage,
        method=method,
    )


def _coverage(parameters: dict[str, Any]) -> float | None:
    value = parameters.get("coverage")
    if value is None:
        return None
    if type(value) not in (int, float) or not MIN_COVERAGE <= value <= MAX_COVERAGE:
        raise InvalidInferenceRequest(
            f"parameter 'coverage' must be a number from {MIN_COVERAGE} to {MAX_COVERAGE}, "
            f"not {value!r}"
        )
    return float(value)


def _method(parameters: dict[str, Any]) -> Method | None:
    value = parameters.get("method")
    if value is None:
        return None
    if value not in METHODS:
        raise InvalidInferenceRequest(
            f"parameter 'method' must be one of {', '.join(METHODS)}, not {value!r}"
        )
    if "coverage" not in parameters:
        raise InvalidInferenceRequest("parameter 'method' only applies with 'coverage': set it")
    return cast(Method, value)


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


def _hours(
    tensor: RequestInput, binary: Binary, settings: Settings, read: Floats | None = None
) -> Floats:
    """The input's values as floats, each finite and within SGD_MAX_ABS_VALUE (`read`: its
    values, read apart by `decoding`)."""
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
        values = _from_json(tensor.data, n, datatype) if read is None else read
    if datatype == "FP32":  # an FP32 tensor holds float32 values, whatever JSON wrote
        with np.errstate(over="ignore"):  # past float32's range: an infinity, refused below
            values = values.astype(np.float32).astype(np.float64)
    return _within(values, settings.max_abs_value)


def _refuse_shared_memory(parameters: dict[str, Any]) -> None:
    if "shared_memory_region" in parameters:
        raise InvalidInferenceRequest(
            "the shared memory extension is not supported: send the tensor in the request"
        )


def _from_binary(size: object, data: object, binary: Binary, n: int, datatype: str) -> Floats:
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
    values: Floats = np.frombuffer(binary, dtype=np.dtype(code).newbyteorder("<"))
    return values.astype(np.float64, copy=False)  # FP64: the body's own bytes, read only


def _from_json(data: list[Any] | None, n: int, datatype: str) -> Floats:
    if data is None:
        raise InvalidInferenceRequest(
            f"input {INPUT!r} has no data: send 'data', or binary data with binary_data_size"
        )
    if datatype in FLOATS and len(data) == n:
        # array() takes ints and floats, and true and false as 1.0 and 0.0: only the values
        # that read as 0 or 1 can be booleans, and only their types are looked at (in C)
        with contextlib.suppress(TypeError, OverflowError):
            values: Floats = np.frombuffer(array("d", data))
            maybe = np.flatnonzero((values == 0) | (values == 1)).tolist()
            if bool not in set(map(type, map(data.__getitem__, maybe))):
                return values
    kinds = set(map(type, data))  # one pass in C; bool is a type of its own
    fast = _flat(data, kinds, n, datatype)
    if fast is not None:
        return np.frombuffer(fast)
    elements = _flatten(data, n) if list in kinds else data
    if len(elements) != n:
        held = "more" if len(elements) > n else str(len(elements))
        raise InvalidInferenceRequest(
            f"input {INPUT!r} has shape [{n}] but its data holds {held} values: the shape "
            "counts every value"
        )
    return np.array([_number(value, i, datatype) for i, value in enumerate(elements)])


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


def _within(values: Floats, limit: float) -> Floats:
    """The values, each finite and at most `limit` in magnitude; the error names the first
    that is not."""
    i = first_over(values, limit)
    if i is None:
        return values
    value = float(values[i])
    if not math.isfinite(value):
        raise InvalidInferenceRequest(f"{INPUT}[{i}] is {value}: send finite numbers")
    raise InvalidInferenceRequest(
        f"{INPUT}[{i}] is {value:g}: every |{INPUT}| must be at most SGD_MAX_ABS_VALUE={limit:g}"
    )


def _outputs(parsed: InferenceRequest, name: str, interval: bool) -> tuple[tuple[str, bool], ...]:
    """The outputs to answer, in order, and whether each goes back as binary data: those the
    request names (each once), else all (the interval's with `coverage`); binary as the
    request's binary_data_output says, unless the output's binary_data says otherwise."""
    binary = _flag(parsed.parameters or {}, "binary_data_output", False)
    if not parsed.outputs:
        return tuple((o, binary) for o in (OUTPUTS if interval else (OUTPUT,)))
    asked: dict[str, bool] = {}
    for output in parsed.outputs:
        if output.name not in OUTPUTS:
            raise InvalidInferenceRequest(
                f"model {name!r} has no output {output.name!r}: its outputs are "
                f"{', '.join(map(repr, OUTPUTS))}"
            )
        if output.name in asked:
            raise InvalidInferenceRequest(f"output {output.name!r} is asked for twice")
        if output.name != OUTPUT and not interval:
            raise InvalidInferenceRequest(
                f"output {output.name!r} is an interval's bound: set the parameter 'coverage'"
            )
        parameters = output.parameters or {}
        if "classification" in parameters:
            raise InvalidInferenceRequest(
                f"the classification extension is not supported: {output.name!r} is a number"
            )
        _refuse_shared_memory(parameters)
        asked[output.name] = _flag(parameters, "binary_data", binary)
    return tuple(asked.items())


def _flag(parameters: dict[str, Any], key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInferenceRequest(f"parameter {key!r} must be true or false, not {value!r}")
    return value


def encode(
    name: str,
    version: int,
    asked: Inference,
    values: Mapping[str, Floats],
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The answer's body: the JSON object, followed by the outputs asked for as binary data;
    and the JSON object's length then (None for JSON alone). `values`: each output's;
    `parameters`: the answer's own, if any."""
    parts, json_length = encoding(name, version, asked, values, parameters)
    return b"".join(parts), json_length


def encoding(
    name: str,
    version: int,
    asked: Inference,
    values: Mapping[str, Floats],
    parameters: Mapping[str, Any] | None = None,
) -> tuple[Iterator[bytes | memoryview], int | None]:
    """`encode`'s body in parts: JSON values SLICE at a time, each slice as orjson writes it."""
    answer: dict[str, Any] = {"model_name": name, "model_version": str(version)}
    if asked.id is not None:
        answer["id"] = asked.id
    if parameters is not None:
        answer["parameters"] = parameters
    outputs = []
    for output, binary in asked.outputs:
        n = len(values[output])
        tensor: dict[str, Any] = {"name": output, "datatype": "FP64", "shape": [n]}
        if binary:
            tensor["parameters"] = {"binary_data_size": 8 * n}
        else:
            tensor["data"] = values[output] if n <= SLICE else []
        outputs.append(tensor)
    answer["outputs"] = outputs
    if all(len(values[o]) <= SLICE and not b for o, b in asked.outputs):
        return iter([_dumps(answer)]), None  # the common case: one object, one call
    # The JSON object, each large JSON output's data written a slice at a time (`data` is the
    # last key of each output, `outputs` the last of the object: each ends with `[]}`)...
    answer["outputs"] = []
    head = _dumps(answer).removesuffix(b"[]}") + b"["
    parts: list[Iterator[bytes]] = [iter([head])]
    for i, (tensor, (output, binary)) in enumerate(zip(outputs, asked.outputs, strict=True)):
        text = (b"," if i else b"") + _dumps(tensor)
        if binary or len(values[output]) <= SLICE:
            parts.append(iter([text]))
        else:
            parts.append(_slices(text.removesuffix(b"[]}"), values[output], b"]}"))
    parts.append(iter([b"]}"]))
    json_parts = itertools.chain.from_iterable(parts)
    binary_outputs = [values[o] for o, b in asked.outputs if b]
    if not binary_outputs:
        return json_parts, None
    # ...then the binary outputs, written once into one buffer after it
    header = b"".join(json_parts)
    body = bytearray(len(header) + sum(8 * len(v) for v in binary_outputs))
    body[: len(header)] = header
    at = len(header)
    for data in binary_outputs:
        np.frombuffer(body, dtype="<f8", count=len(data), offset=at)[:] = data
        at += 8 * len(data)
    return iter([memoryview(body)]), len(header)


def _slices(opening: bytes, scores: Floats, closing: bytes) -> Iterator[bytes]:
    yield opening + b"["
    for i in range(0, len(scores), SLICE):
        text = orjson.dumps(scores[i : i + SLICE], option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
        yield text if i == 0 else b"," + text
    yield closing


def _dumps(answer: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:  # an id with a lone surrogate, which JSON can only escape
        for output in answer["outputs"]:
            if isinstance(output.get("data"), np.ndarray):
                output["data"] = output["data"].tolist()
        return json.dumps(answer, separators=(",", ":")).encode()
