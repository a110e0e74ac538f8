"""The /v2 part of the OpenAPI document, as the routes behave.

The request's rules are stated in its schema wherever JSON Schema can (each datatype's values,
`data` or binary data, the parameters that mean something), and the others (shape [n] counts
the values, ...) in the description of the 400 that refuses them; the errors are the
protocol's `{"error"}`, and there is no 422 (the protocol answers 400).
"""

import math
from typing import Any

from service.core.settings import Settings
from service.http.oip.codec import OTHER_ITEMS
from service.http.oip.errors import is_protocol_path
from service.http.oip.models import (
    FLOATS,
    HEADER_LENGTH,
    INTEGERS,
    JSON_TYPE,
    VERSION,
    InferenceRequest,
)


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
                    param["schema"] = {"type": "string", "pattern": f"^{VERSION.pattern}$"}
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
