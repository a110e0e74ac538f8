"""The OpenAPI document tells the truth: the configured limits written into it."""

from typing import Any

from service.core.settings import Settings


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
