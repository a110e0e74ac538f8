"""Request and response models: the edge validation, and the immutable values the store keeps.

The number types of their fields (Finite, Computed) are service.core.numbers'."""

import math
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    WithJsonSchema,
)

from service.core.errors import InvalidInput
from service.core.intervals import (
    MAX_COVERAGE,
    MIN_COVERAGE,
    Floats,
    Intervals,
    Method,
    Ranked,
)
from service.core.numbers import MAX_SEED, Computed, Finite, integral
from service.core.settings import Settings

# A model version number in a body: strict, but 7.0 is 7, as JSON Schema says.
VersionNumber = Annotated[int, Field(ge=1), BeforeValidator(integral)]
Publish = Literal["always", "never", "if_better"]
# A job's: "canary" rolls the new version out as JobParams.canary says (continuous training).
JobPublish = Literal["always", "never", "if_better", "canary"]


def _served_or_version(value: Any) -> Any:
    """init_from: "served", or a version number (strict, but 7.0 is 7), else a clear error."""
    if value == "served" and isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError('use "served" or a kept version number (an integer >= 1)')


# One plain validator, not a union: its errors name the field, not the union's branches.
InitFrom = Annotated[
    Literal["served"] | int,
    PlainValidator(_served_or_version),
    WithJsonSchema({"anyOf": [{"const": "served"}, {"type": "integer", "minimum": 1}]}),
]
MAX_VALIDATION_FRACTION = 0.5
NO_CHANGE_DEFAULT = 5


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
    validation_fraction: Finite = Field(
        default=0.0,
        ge=0,
        le=MAX_VALIDATION_FRACTION,
        description="share of the rows held out (chosen with the seed) and never trained on; "
        "they give val_mse, val_r2 and the history's val_loss",
    )
    tol: Finite | None = Field(
        default=None,
        ge=0,
        description="stop once the monitored loss (validation MSE with a split, else the "
        "training MSE) has not improved by at least tol for n_iter_no_change epochs; "
        "null: never stop early",
    )
    n_iter_no_change: int = Field(
        default=NO_CHANGE_DEFAULT,
        ge=1,
        description="epochs without improvement before stopping (with tol)",
    )
    publish: Publish = Field(
        default="always",
        description='"always": serve the new version; "never": keep it, unserved; '
        '"if_better": serve it only if its validation MSE beats the served model\'s on the '
        "same held-out rows (needs validation_fraction)",
    )
    init_from: InitFrom | None = Field(
        default=None,
        description="start from the served model's w (and b), or a kept version's, "
        "instead of init_w (a warm start)",
    )

    def check_combinations(self) -> None:
        """Options that make no sense together; raises InvalidInput naming the fields."""
        errors: list[dict[str, Any]] = []

        def bad(fields: str, message: str) -> None:
            errors.append({"field": fields, "message": message, "code": "combination"})

        given = self.model_fields_set
        if self.publish == "if_better" and self.validation_fraction == 0:
            bad(
                "publish, validation_fraction",
                'publish "if_better" compares validation MSEs: set validation_fraction > 0',
            )
        if self.n_iter_no_change != NO_CHANGE_DEFAULT and self.tol is None:
            bad("n_iter_no_change, tol", "n_iter_no_change only applies with tol: set tol too")
        if self.init_from is not None and "init_w" in given:
            bad("init_from, init_w", "a fit starts from init_w or from init_from, not both")
        n = len(self.x)
        held = math.ceil(self.validation_fraction * n)
        if held and n - held < 1:
            bad(
                "validation_fraction, x",
                f"validation_fraction={self.validation_fraction:g} of {n} rows holds out "
                f"{held} and leaves none to train on: send more rows or set it to 0",
            )
        if errors:
            fields = ", ".join(e["field"] for e in errors)
            raise InvalidInput(f"these options do not go together: {fields}", errors)

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
            if values and max(map(abs, values)) > limit:  # one pass in C; then find the first
                over = next(i for i, v in enumerate(values) if abs(v) > limit)
                # named as the caller wrote it, like the other errors: x[3]
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


Coverage = Annotated[
    Finite,
    Field(
        ge=MIN_COVERAGE,
        le=MAX_COVERAGE,
        description="ask for an interval that holds the true score with this probability",
        examples=[0.9],
    ),
]
METHOD_DESCRIPTION = (
    "how the interval is computed (with coverage): conformal (needs a fit with "
    "validation_fraction) or gaussian; default: the first the version has (GET /models/{v})"
)


class PredictRequest(_Input):
    hours: list[Finite] = Field(min_length=1, examples=[[1, 2, 4]])
    version: VersionNumber | None = Field(
        default=None,
        description="a kept model version (GET /models); default: the served one",
    )
    coverage: Coverage | None = None
    method: Method | None = Field(default=None, description=METHOD_DESCRIPTION)

    def check_combinations(self) -> None:
        if self.method is not None and self.coverage is None:
            issue = {"field": "method", "message": "set coverage too", "code": "combination"}
            raise InvalidInput("method only applies with coverage: set coverage too", [issue])


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def ended(self) -> bool:
        return self not in (JobStatus.queued, JobStatus.running)


class CanaryRule(_Output):
    """How a new version is rolled out as a canary (POST /models/{v}/serve's body)."""

    traffic: int = Field(ge=1, le=99, description="percent of predictions sent to the canary")
    promote_after: int | None = Field(
        default=None, ge=1, description="outcomes before the automatic decision (null: by hand)"
    )
    max_worse: float = Field(
        default=0.05, ge=0, le=100, description="promote if MAE <= stable MAE x (1 + max_worse)"
    )


class JobParams(_Output):
    """Hyper-parameters as resolved: the seed is always the one actually used."""

    epochs: int
    learning_rate: float
    init_w: float
    batch_size: int | None
    fit_intercept: bool
    seed: int
    validation_fraction: float = 0.0
    tol: float | None = None
    n_iter_no_change: int = 5
    publish: JobPublish = "always"
    init_from: int | None = Field(
        default=None, description="the model version the fit started from (a warm start)"
    )
    init_b: float = Field(default=0.0, description="b before the first update")
    canary: CanaryRule | None = Field(
        default=None, description='with publish "canary": how the new version is rolled out'
    )


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


class JobResult(_Output):
    model_version: int
    w: Computed
    b: Computed
    final_loss: Computed = Field(description="batch loss of the last epoch")
    mse: Computed = Field(description="mean squared error on the whole data set")
    train_mse: Computed | None = Field(default=None, description="MSE on the training rows")
    train_r2: Computed | None = Field(default=None, description="R^2 on the training rows")
    val_mse: Computed | None = Field(default=None, description="MSE on the held-out rows")
    val_r2: Computed | None = Field(default=None, description="R^2 on the held-out rows")
    epochs_run: int | None = Field(default=None, description="updates made (fewer if stopped)")
    stopped_early: bool = False
    published: bool = Field(default=True, description="whether this version was served")
    not_published_because: str | None = None


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
    train_mse: Computed | None = None
    train_r2: Computed | None = None
    val_mse: Computed | None = None
    val_r2: Computed | None = None


class Model(_Output):
    """One immutable, published model version."""

    version: int
    w: Computed
    b: Computed
    job_id: str
    trained_at: datetime
    params: JobParams
    metrics: ModelMetrics | None = None
    intervals: Intervals | None = Field(
        default=None, description="the intervals this version answers (?coverage=), and why"
    )
    # the kept sorted residuals of its held-out rows (Intervals.conformal): beside the JSON
    _residuals: Ranked | None = PrivateAttr(default=None)

    def predict(self, hours: float) -> float:
        return self.w * hours + self.b

    def __eq__(self, other: object) -> bool:
        """The same version by its fields: where its residuals are held (in memory, or read
        from Redis) does not make another version, and arrays have no single truth value."""
        if not isinstance(other, Model):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = _Output.__hash__

    def holding(self, residuals: bytes | Ranked | None) -> "Model":
        """This version, holding its conformal residuals: float64 values or their bytes, or a
        reader of them in a shared store."""
        if isinstance(residuals, bytes | bytearray):
            residuals = np.frombuffer(residuals, dtype=np.float64)
        self._residuals = residuals
        return self

    @property
    def residuals(self) -> Ranked | None:
        # pydantic's __getattr__ takes ~3 us to find a private attribute: a request asks here
        residuals: Ranked | None = self.__pydantic_private__["_residuals"]  # type: ignore[index]
        return residuals

    @property
    def intervals_wait(self) -> bool:
        """Whether an interval's half width waits on a shared store (call it off the event
        loop then): a kept version read from Redis reads its residual there."""
        return bool(getattr(self.residuals, "remote", False))

    def half_width(
        self, hours: "float | Floats", coverage: float, method: Method | None
    ) -> "tuple[Method, float | Floats]":
        """The interval's method and half width at `hours` (inf: unbounded); raises
        IntervalUnavailable for a method this version cannot answer."""
        intervals = self.intervals or Intervals(methods=[])
        return intervals.half_width(self.residuals, self.version, hours, coverage, method)


RolloutState = Literal["running", "promoted", "rolled_back"]
PREDICTION_ID = r"^v[1-9][0-9]{0,17}-[0-9a-f]{16}$"


class Quality(_Output):
    """How a version did on the outcomes recorded while it was live (served, or a canary):
    its own prediction for each outcome's hours against the score that really happened."""

    outcomes: int = Field(description="outcomes in the window (at most `window`)")
    window: int = Field(description="the last this many outcomes count (SGD_QUALITY_WINDOW)")
    mae: Computed = Field(description="mean absolute error over the window")
    rmse: Computed = Field(description="root mean squared error over the window")
    coverage: Computed | None = Field(
        default=None,
        description="share of the window inside the version's 90% interval (null: it has none)",
    )


class Rollout(_Output):
    """A canary rollout: `traffic` percent of predictions go to `version`, the rest to
    `stable_version`; with `promote_after`, it is promoted or rolled back by itself once it has
    that many outcomes, comparing the two versions' MAE on the same outcomes."""

    version: int
    stable_version: int
    traffic: int = Field(ge=1, le=99, description="percent of predictions sent to `version`")
    promote_after: int | None = Field(
        default=None, description="outcomes before the automatic decision (null: by hand)"
    )
    max_worse: float = Field(
        default=0.0, description="promote if MAE <= stable MAE x (1 + max_worse)"
    )
    started_at: datetime
    outcomes: int = Field(default=0, description="outcomes recorded since it started")
    mae: Computed | None = Field(default=None, description="the canary's MAE on them")
    stable_mae: Computed | None = Field(default=None, description="the stable version's MAE")
    state: RolloutState = "running"
    ended_at: datetime | None = None
    reason: str | None = Field(default=None, description="why it ended as it did")


class ModelVersion(Model):
    """A kept model version, whether it is the one served, its live quality and rollout."""

    served: bool
    quality: Quality | None = Field(default=None, description="null: no outcome scored yet")
    rollout: Rollout | None = Field(default=None, description="its latest canary rollout")

    @classmethod
    def of(
        cls,
        model: Model,
        served: Model | None,
        quality: Quality | None = None,
        rollout: Rollout | None = None,
    ) -> "ModelVersion":
        is_served = served is not None and served.version == model.version
        return cls(**dict(model), served=is_served, quality=quality, rollout=rollout)


class ModelList(_Output):
    served_version: int | None
    canary: Rollout | None = Field(default=None, description="the canary rollout running")
    versions: list[ModelVersion] = Field(description="newest first")


class ServeRequest(_Input):
    """POST /models/{v}/serve's optional body: serve to everyone, or roll out as a canary."""

    traffic: int = Field(
        default=100,
        ge=0,
        le=100,
        description="percent of predictions for this version: 100 serves it to everyone (and "
        "promotes its canary), 1 to 99 start a canary, 0 rolls its canary back",
    )
    promote_after: int | None = Field(
        default=None, ge=1, description="a canary's outcomes before the automatic decision"
    )
    max_worse: Finite = Field(
        default=0.05, ge=0, le=100, description="promote if MAE <= stable MAE x (1 + max_worse)"
    )

    def check_combinations(self) -> None:
        if self.promote_after is not None and self.traffic in (0, 100):
            issue = {
                "field": "promote_after, traffic",
                "message": "promote_after applies to a canary (traffic 1 to 99)",
                "code": "combination",
            }
            raise InvalidInput("promote_after needs a canary: traffic 1 to 99", [issue])

    def rule(self) -> CanaryRule:
        return CanaryRule(
            traffic=self.traffic, promote_after=self.promote_after, max_worse=self.max_worse
        )


class OutcomesRequest(_Input):
    """What really happened: the scores observed for these hours."""

    hours: list[Finite] = Field(min_length=1, examples=[[4, 5]])
    score: list[Finite] = Field(min_length=1, description="one per hours", examples=[[8.1, 9.7]])
    prediction_id: str | None = Field(
        default=None,
        pattern=PREDICTION_ID,
        description="the X-Prediction-Id of the answer these outcomes follow",
    )
    model_version: VersionNumber | None = Field(
        default=None, description="the version that predicted them (or prediction_id)"
    )

    def check_combinations(self) -> None:
        if len(self.hours) != len(self.score):
            issue = {
                "field": "hours, score",
                "message": f"{len(self.hours)} hours but {len(self.score)} scores",
                "code": "combination",
            }
            raise InvalidInput("hours and score must have the same length", [issue])
        if self.prediction_id is not None and self.model_version is not None:
            issue = {
                "field": "prediction_id, model_version",
                "message": "give one of them",
                "code": "combination",
            }
            raise InvalidInput("prediction_id names the version already: drop one", [issue])

    @property
    def named_version(self) -> int | None:
        """The version the caller says predicted these outcomes, if any."""
        if self.prediction_id is not None:
            return int(self.prediction_id[1:].partition("-")[0])
        return self.model_version


class OutcomesReceipt(_Output):
    recorded: int = Field(description="outcomes recorded by this request")
    kept: int = Field(description="outcomes kept now (at most SGD_KEEP_OUTCOMES)")
    total: int = Field(description="outcomes recorded since the store began")
    versions: list[int] = Field(description="the versions these outcomes were scored against")
    decision: Rollout | None = Field(
        default=None, description="the canary these outcomes promoted or rolled back"
    )
    retrain_job: str | None = Field(
        default=None, description="the fit continuous training started (SGD_RETRAIN_AFTER)"
    )


class Interval(_Output):
    lower: float | None = Field(description="null: unbounded (too few held-out rows)")
    upper: float | None = Field(description="null: unbounded (too few held-out rows)")
    coverage: float
    method: Method


class Prediction(_Output):
    hours: float
    score: float
    model_version: int
    interval: Interval | None = Field(default=None, description="only with ?coverage=")


class Predictions(_Output):
    scores: list[float]
    model_version: int
    lower: list[float] | None = Field(
        default=None, description="with coverage; null: unbounded (too few held-out rows)"
    )
    upper: list[float] | None = Field(
        default=None, description="with coverage; null: unbounded (too few held-out rows)"
    )
    coverage: float | None = Field(default=None, description="as asked")
    method: Method | None = Field(default=None, description="the interval's method")


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
    val_loss: list[float] | None = Field(
        default=None, description="validation MSE before each update (with a split)"
    )


class ProgressEvent(BaseModel):
    """The data of a `progress` event: new grid epochs as columns, like GET /history."""

    model_config = ConfigDict(frozen=True)
    epoch: list[int]
    w: list[float]
    b: list[float] | None = None
    loss: list[float]
    val_loss: list[float] | None = None
    progress: Progress


class Quadratic(_Output):
    """The mean squared error of y = w*x + b on one fixed set of rows, for any (w, b), in O(1).

    With (w*, b*) the least-squares optimum on those rows, their residuals are orthogonal to x
    and to 1, so mean((y - w x - b)^2) = L* + (dw mean_x + db)^2 + dw^2 var_x with dw = w - w*,
    db = b - b*: a sum of squares, never below zero, whatever the number of rows.
    """

    w_opt: float
    b_opt: float
    loss_opt: float = Field(description="the MSE at the optimum, computed from the rows")
    mean_x: float
    var_x: float
    var_y: float

    def mse(self, w: float, b: float) -> float:
        dw = w - self.w_opt
        shift = dw * self.mean_x + (b - self.b_opt)
        spread = dw * math.sqrt(self.var_x)  # not dw*dw*var_x: inf * 0 is NaN
        return self.loss_opt + shift * shift + spread * spread

    def r2(self, w: float, b: float) -> float | None:
        """1 - MSE / var(y); None when y is constant (R^2 is undefined there)."""
        return 1.0 - self.mse(w, b) / self.var_y if self.var_y > 0 else None


class FitReport(_Output):
    """What a training worker hands the store when a fit succeeds; every number finite."""

    w: Computed
    b: Computed
    final_loss: Computed
    mse: Computed
    train_mse: Computed
    train_r2: Computed | None
    val_mse: Computed | None = None
    val_r2: Computed | None = None
    epochs_run: int | None = None
    stopped_early: bool = False
    val: Quadratic | None = Field(default=None, description="the held-out rows' loss")
    intervals: Intervals | None = None
    residuals: bytes | None = Field(
        default=None, description="the held-out rows' kept sorted residuals, float64"
    )

    @classmethod
    def plain(cls, w: float, b: float, final_loss: float, mse: float) -> "FitReport":
        """The report of a fit without a split, whose training rows are all the rows."""
        return cls(w=w, b=b, final_loss=final_loss, mse=mse, train_mse=mse, train_r2=None)


class Health(_Output):
    status: str
