"""Request and response models: the edge validation, and the immutable values the store keeps."""

import math
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.errors import InvalidInput, PredictionOutOfRange
from service.settings import Settings

# Strict: true, "3" and null are not numbers; NaN/Infinity (and 1e400, which parses as inf) neither.
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
MAX_SEED = 2**63 - 1


def _integral(value: Any) -> Any:
    """JSON Schema's integer includes 7.0: take an integral float as the int it is (a bool or a
    string is still refused by the strict check that follows)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# A model version number in a body: strict, but 7.0 is 7, as JSON Schema says.
VersionNumber = Annotated[int, Field(ge=1), BeforeValidator(_integral)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Output(BaseModel):
    model_config = ConfigDict(frozen=True)


class FitRequest(_Input):
    """Training data and hyper-parameters; the defaults reproduce the tutorial."""

    x: list[Finite] = Field(min_length=1, description="hours studied", examples=[[1, 2, 3]])
    y: list[Finite] = Field(
        min_length=1, description="exam scores, one per x", examples=[[2, 4, 6]]
    )
    epochs: int = Field(default=100, ge=1, description="number of updates (one batch each)")
    learning_rate: Finite = Field(default=0.01, gt=0, le=1e6)
    init_w: Finite = Field(default=1.0, description="w before the first update (b starts at 0)")
    batch_size: int | None = Field(
        default=1, ge=1, description="samples drawn (with replacement) per epoch; null = all"
    )
    fit_intercept: bool = Field(default=False, description="learn y = w*x + b instead of w*x")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="random if omitted")

    def check_limits(self, settings: Settings) -> None:
        """Bounds that depend on the settings; raises InvalidInput naming every offending field."""
        errors: list[dict[str, Any]] = []

        def bad(field: str, message: str) -> None:
            errors.append({"field": field, "message": message, "code": "limit"})

        n, limit = len(self.x), settings.max_abs_value
        if len(self.y) != n:
            bad("y", f"x has {n} values but y has {len(self.y)}: send one score per hour value")
        if n > settings.max_samples:
            bad("x", f"{n} samples is more than SGD_MAX_SAMPLES={settings.max_samples}")
        for name, values in (("x", self.x), ("y", self.y)):
            over = next((i for i, v in enumerate(values) if abs(v) > limit), None)
            if over is not None:  # named as the caller wrote it, like the other errors: x[3]
                bad(f"{name}[{over}]", f"every |value| must be at most SGD_MAX_ABS_VALUE={limit:g}")
        if not any(self.x):
            bad("x", "all x are zero, so w cannot be learned: send at least one non-zero x")
        if self.epochs > settings.max_epochs:
            bad("epochs", f"at most SGD_MAX_EPOCHS={settings.max_epochs}")
        if self.batch_size is not None and self.batch_size > settings.max_samples:
            bad("batch_size", f"at most SGD_MAX_SAMPLES={settings.max_samples}, or null for all")
        per_epoch = n if self.batch_size is None else self.batch_size
        steps, most = self.epochs * per_epoch, settings.max_sample_steps
        if steps > most:
            bad(
                "epochs",
                f"{self.epochs:,} epochs x {per_epoch:,} samples per epoch = {steps:,} samples to "
                f"process, more than SGD_MAX_SAMPLE_STEPS={most:,}: ask for fewer epochs or a "
                "smaller batch_size",
            )
        if abs(self.init_w) > limit:
            bad("init_w", f"|init_w| must be at most SGD_MAX_ABS_VALUE={limit:g}")
        if errors:
            fields = ", ".join(sorted({e["field"] for e in errors}))
            raise InvalidInput(f"fix these fields and retry: {fields}", errors)


class PredictRequest(_Input):
    hours: list[Finite] = Field(min_length=1, examples=[[1, 2, 4]])
    version: VersionNumber | None = Field(
        default=None,
        description="a kept model version (GET /models); default: the served one",
    )


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def ended(self) -> bool:
        return self not in (JobStatus.queued, JobStatus.running)


class JobParams(_Output):
    """Hyper-parameters as resolved: the seed is always the one actually used."""

    epochs: int
    learning_rate: float
    init_w: float
    batch_size: int | None
    fit_intercept: bool
    seed: int


class Progress(_Output):
    epoch: int = Field(description="epochs completed")
    epochs: int


class ValidationIssue(_Output):
    field: str
    message: str
    code: str


class Problem(_Output):
    """An RFC 9457 problem; extra members (errors, epoch) depend on the type."""

    model_config = ConfigDict(frozen=True, extra="allow")
    type: str
    title: str
    status: int
    detail: str
    errors: list[ValidationIssue] | None = None


# What the service computes and answers: never NaN or Infinity (JSON would carry them as null).
Computed = Annotated[float, Field(allow_inf_nan=False)]


class JobResult(_Output):
    model_version: int
    w: Computed
    b: Computed
    final_loss: Computed = Field(description="batch loss of the last epoch")
    mse: Computed = Field(description="mean squared error on the whole data set")


class Job(_Output):
    id: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    params: JobParams
    n_samples: int
    progress: Progress
    attempts: int = Field(
        default=0, description="runs started: more than 1 when a training worker died under it"
    )
    result: JobResult | None = None
    error: Problem | None = None


class JobList(_Output):
    jobs: list[Job]


class ModelMetrics(_Output):
    final_loss: Computed = Field(description="batch loss of the fit's last epoch")
    mse: Computed = Field(description="mean squared error on the fit's whole data set")


class Model(_Output):
    """One immutable, published model version."""

    version: int
    w: Computed
    b: Computed
    job_id: str
    trained_at: datetime
    params: JobParams
    metrics: ModelMetrics | None = None

    def predict(self, hours: float) -> float:
        return self.w * hours + self.b


class ModelVersion(Model):
    """A kept model version, and whether it is the one served."""

    served: bool

    @classmethod
    def of(cls, model: Model, served: Model | None) -> "ModelVersion":
        is_served = served is not None and served.version == model.version
        return cls(**dict(model), served=is_served)


class ModelList(_Output):
    served_version: int | None
    versions: list[ModelVersion] = Field(description="newest first")


class Prediction(_Output):
    hours: float
    score: float
    model_version: int


class Predictions(_Output):
    scores: list[float]
    model_version: int


class History(_Output):
    """Column arrays of a job's history; `stride` > 1 when thinned, `next_since` when paged."""

    job_id: str
    status: JobStatus
    total_epochs: int = Field(description="epochs recorded so far")
    since: int
    stride: int
    count: int
    next_since: int | None = Field(description="pass as ?since= for the next page")
    epoch: list[int]
    w: list[float]
    b: list[float] | None = None
    loss: list[float]


class ProgressEvent(BaseModel):
    """The data of a `progress` event: new grid epochs as columns, like GET /history."""

    model_config = ConfigDict(frozen=True)
    epoch: list[int]
    w: list[float]
    b: list[float] | None = None
    loss: list[float]
    progress: Progress


class Health(_Output):
    status: str


def finite_or_raise(value: float, what: str) -> float:
    """Guard for computed numbers: never put NaN or Infinity in a response."""
    if not math.isfinite(value):
        raise PredictionOutOfRange(f"{what} overflows a float; ask for smaller hours")
    return value


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
