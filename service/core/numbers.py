"""Numbers at the edge: what the service takes as a number and what it answers as one.

A number in a body is a finite float, strictly (`Finite`); in a query or a path it is written as
JSON writes one (`Written`, `WHOLE`, `NUMBER`); what the service computes and answers is never
NaN or Infinity (`Computed`, `finite_or_raise`). No web framework: the models (service.core.
schemas) and the routes (service.http) take these.
"""

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from service.core.errors import PredictionOutOfRange

# Strict: true, "3" and null are not numbers; NaN/Infinity (and 1e400, which parses as inf) neither.
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
MAX_SEED = 2**63 - 1

# A number in a query or a path, as JSON writes one. pydantic reads such text as Python's int()
# and float() do, which take " 1", "1_0", "+1", full-width digits and "infinity" too.
WHOLE_NUMBER = r"[0-9]+"
JSON_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
VERSION_NUMBER = r"[1-9][0-9]{0,17}"  # a model version as GET /models shows it


@dataclass(frozen=True)
class Written:
    """Metadata of a query or path parameter: its text must match `pattern` whole, or the usual
    422 names the parameter with `message`; OpenAPI shows the pattern beside the number type.

    Put it after Query() or Path(): pydantic documents bounds that follow a validator as raw
    `ge`/`le` instead of `minimum`/`maximum`.
    """

    pattern: str
    code: str
    message: str

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        regex = re.compile(self.pattern)

        def check(value: Any) -> Any:
            if isinstance(value, str) and not regex.fullmatch(value):
                raise PydanticCustomError(self.code, self.message)
            return value

        return core_schema.no_info_before_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        for branch in json_schema.get("anyOf", [json_schema]):  # `int | None`: the int
            if branch.get("type") in ("integer", "number"):
                branch["pattern"] = f"^{self.pattern}$"
        return json_schema


WHOLE = Written(
    WHOLE_NUMBER,
    "int_parsing",
    "Input should be a whole number in the digits 0-9 alone: no sign, space or _",
)
NUMBER = Written(
    JSON_NUMBER,
    "float_parsing",
    "Input should be a number as JSON writes it, such as 4, -2.5 or 1e3: no space, +, _, "
    "leading zero, inf or nan",
)


def integral(value: Any) -> Any:
    """JSON Schema's integer includes 7.0: take an integral float as the int it is (a bool or a
    string is still refused by the strict check that follows)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# What the service computes and answers: never NaN or Infinity (JSON would carry them as null).
Computed = Annotated[float, Field(allow_inf_nan=False)]


def finite_or_raise(value: float, what: str) -> float:
    """Guard for computed numbers: never put NaN or Infinity in a response."""
    if not math.isfinite(value):
        raise overflowed(what)
    return value


def overflowed(what: str) -> PredictionOutOfRange:
    return PredictionOutOfRange(f"{what} overflows a float; ask for smaller hours")
