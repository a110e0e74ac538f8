"""The OpenAPI document tells the truth: the configured limits written into it, and the bodies
that dependencies read (FastAPI documents only those it reads itself)."""

from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.core.settings import Settings

# What FastAPI writes for its own 422, which the service's routes declare as problem+json
_FASTAPI_ERRORS = {"HTTPValidationError", "ValidationError"}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route whose dependency reads its JSON body: the body, described as
    FastAPI describes a body parameter of this model (`document_bodies` adds its schema)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def document_bodies(spec: dict[str, Any], models: Iterable[type[BaseModel]]) -> dict[str, Any]:
    """Add the schemas of these models, as FastAPI writes them for a body parameter, to the
    document's, in FastAPI's order (by name); and put each operation's request body before its
    answers, where FastAPI puts one."""
    router = APIRouter()
    for model in models:

        async def read(body: Any) -> None:
            """Never called: its body parameter makes FastAPI write the model's schema."""

        read.__annotations__["body"] = model  # a body parameter of this model
        router.add_api_route(f"/{model.__name__}", read, methods=["POST"])
    written = get_openapi(title="", version="", routes=router.routes)["components"]["schemas"]
    schemas = spec["components"]["schemas"]
    for name in written.keys() - _FASTAPI_ERRORS - schemas.keys():  # the models', nested too
        schemas[name] = written[name]
    spec["components"]["schemas"] = dict(sorted(schemas.items()))
    for operations in spec["paths"].values():
        for operation in operations.values():
            if "requestBody" in operation and "responses" in operation:
                operation["responses"] = operation.pop("responses")
    return spec


def document_limits(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Write the configured limits into the OpenAPI document, so that it tells callers the truth."""
    limit = settings.max_abs_value
    bounded = {"minimum": -limit, "maximum": limit}
    schemas = spec["components"]["schemas"]
    fit = schemas["FitRequest"]["properties"]
    for name in ("x", "y"):
        fit[name]["maxItems"] = settings.max_samples
        fit[name]["items"].update(bounded)
    fit["x"]["contains"] = {"not": {"const": 0}}  # at least one non-zero x
    fit["epochs"]["maximum"] = settings.max_epochs
    # JSON Schema cannot bound a product: said in words, and as an extension for programs.
    fit["epochs"]["description"] += (
        f"; epochs x batch_size (x the number of samples when batch_size is null) is at most "
        f"SGD_MAX_SAMPLE_STEPS={settings.max_sample_steps}"
    )
    schemas["FitRequest"]["x-max-sample-steps"] = settings.max_sample_steps
    fit["init_w"].update(bounded)
    fit["batch_size"]["anyOf"][0]["maximum"] = settings.max_samples
    hours = schemas["PredictRequest"]["properties"]["hours"]
    hours["maxItems"] = settings.max_predict_batch
    hours["items"].update(bounded)
    for param in spec["paths"]["/predict"]["get"]["parameters"]:
        if param["name"] == "hours":
            param["schema"].update(bounded)
    return spec
