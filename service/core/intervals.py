"""Prediction intervals: how far off a score may be, from what a fit kept. No web framework,
no torch: the prediction routes call this for every request that asks for `coverage`.

Two methods (docs/architecture.md, "Intervals"):

- **conformal**, split-conformal: with the absolute residuals |y - (w x + b)| of the final model
  on the n held-out rows of a fit, the interval is score +- q, q the ceil((n+1) coverage)-th
  smallest residual, unbounded when (n+1) coverage > n. Distribution-free: a fresh point
  exchangeable with the held-out rows falls inside with probability at least `coverage`.
  The fit keeps the sorted residuals of the ranks some coverage in [MIN, MAX] asks for
  (`kept_ranks`), about half of them: exact at any coverage, O(1) a request.
- **gaussian**, the classical prediction interval of least squares through the fitted line:
  score +- t(1 - alpha/2, df) s sqrt(1 + h(x)), s^2 = SSR / df on the training rows, df = n - p,
  h(x) the leverage of x: x^2 / sum(x^2) without an intercept, 1/n + (x - mean)^2 / Sxx with
  one (what statsmodels' OLS computes from the same w and b). Valid when the errors are
  independent, normal and of constant variance.

A coverage is read as the decimal it is written as: 0.55 of 100 ranks (n = 99) is rank 55,
although the float 0.55 times 100 is 55.00000000000001 (MAPIE takes rank 56 there).
"""

import functools
import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from service.core.errors import IntervalUnavailable

Method = Literal["conformal", "gaussian"]
METHODS: tuple[Method, ...] = ("conformal", "gaussian")
MIN_COVERAGE, MAX_COVERAGE = 0.5, 0.999
SHOWN_COVERAGES = (0.5, 0.8, 0.9, 0.95, 0.99)  # GET /models/{v} shows q at these
Floats = npt.NDArray[np.float64]


class Ranked(Protocol):
    """A version's kept sorted residuals, by position: a float64 array in memory, or a reader
    of them in a shared store (`remote`: each read waits on it)."""

    def item(self, i: int, /) -> float: ...

    def tobytes(self) -> bytes: ...


class _Summary(BaseModel):
    model_config = ConfigDict(frozen=True)


class ConformalSummary(_Summary):
    """What a version's conformal interval stands on (its residuals are kept beside it)."""

    n: int = Field(description="held-out rows, whose absolute residuals give q")
    first_rank: int = Field(description="rank of the smallest residual kept (1 = the smallest)")
    max_coverage: float = Field(description="n/(n+1): above it the interval is unbounded")
    half_widths: dict[str, float | None] = Field(
        description="q at some coverages (null: unbounded): the interval is score +- q"
    )


class GaussianSummary(_Summary):
    """What a version's gaussian interval stands on: its training rows' fit."""

    n: int = Field(description="training rows")
    df: int = Field(description="degrees of freedom: n minus the parameters (w, and b)")
    s: float = Field(description="residual standard error: sqrt(SSR / df)")
    fit_intercept: bool
    center: float = Field(description="mean of the training x with an intercept, else 0")
    spread: float = Field(description="sum of (x - center)^2 over the training x")


class Intervals(_Summary):
    """The intervals a version can answer, and the numbers behind them."""

    methods: list[Method] = Field(description="what ?coverage= can use; the first by default")
    conformal: ConformalSummary | None = None
    gaussian: GaussianSummary | None = None
    missing: dict[str, str] = Field(default_factory=dict, description="why a method is not")

    def half_width(
        self,
        residuals: "Ranked | None",
        version: int,
        hours: "float | Floats",
        coverage: float,
        method: "Method | None",
    ) -> "tuple[Method, float | Floats]":
        """The method used and the interval's half width at `hours` (inf: unbounded); raises
        IntervalUnavailable for a method this version cannot answer."""
        if method is None:
            method = self.methods[0] if self.methods else "gaussian"
        if method == "conformal" and self.conformal is not None and residuals is not None:
            c = self.conformal
            return method, conformal_half_width(residuals, c.first_rank, c.n, coverage)
        if method == "gaussian" and self.gaussian is not None:
            g = self.gaussian
            half = gaussian_half_width(
                hours, coverage, g.n, g.df, g.s, g.center, g.spread, g.fit_intercept
            )
            return method, half
        raise unavailable(method, version, self.missing.get(method, NOT_KEPT))


NOT_KEPT = "it was fitted before the service kept what intervals need: fit it again"
NO_SPLIT = "its fit held out no rows: fit with validation_fraction > 0"


def summarise(
    train: "tuple[Floats, Floats]",
    held_out: "tuple[Floats, Floats] | None",
    w: float,
    b: float,
    intercept: bool,
) -> "tuple[Intervals, Floats | None]":
    """What a fit keeps for its intervals: the summary, and the kept sorted residuals of its
    held-out rows (None without a split)."""
    missing: dict[str, str] = {}
    methods: list[Method] = []
    conformal = residuals = None
    if held_out is not None:
        n_held, first, residuals = residual_summary(*held_out, w, b)
        halves = {
            str(c): _finite_or_none(conformal_half_width(residuals, first, n_held, c))
            for c in SHOWN_COVERAGES
        }
        conformal = ConformalSummary(
            n=n_held, first_rank=first, max_coverage=n_held / (n_held + 1), half_widths=halves
        )
        methods.append("conformal")
    else:
        missing["conformal"] = NO_SPLIT
    gaussian, why = _gaussian(*train, w, b, intercept)
    if gaussian is not None:
        methods.append("gaussian")
    else:
        missing["gaussian"] = why
    summary = Intervals(methods=methods, conformal=conformal, gaussian=gaussian, missing=missing)
    return summary, residuals


def _gaussian(
    x: "Floats", y: "Floats", w: float, b: float, intercept: bool
) -> "tuple[GaussianSummary | None, str]":
    n = len(x)
    df = n - (2 if intercept else 1)
    if df < 1:
        return None, (
            f"{n} training rows leave no degree of freedom for {2 if intercept else 1} "
            "parameters: fit more rows"
        )
    with np.errstate(all="ignore"):
        residuals = y - (x * w + b)
        center = float(x.mean()) if intercept else 0.0
        spread = float(np.sum((x - center) ** 2))
        s = math.sqrt(float(np.dot(residuals, residuals)) / df)
    if not spread > 0 or not math.isfinite(spread):
        return None, "its training x are all the same, so the slope's error is unknown"
    if not math.isfinite(s):
        return None, "its residuals overflow a float"
    summary = GaussianSummary(
        n=n, df=df, s=s, fit_intercept=intercept, center=center, spread=spread
    )
    return summary, ""


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@functools.lru_cache(maxsize=4096)
def rank(coverage: float, n: int) -> int:
    """ceil((n + 1) coverage), the coverage read as the decimal it prints as."""
    return math.ceil(Decimal(repr(coverage)) * (n + 1))


def kept_ranks(n: int) -> range:
    """The ranks (1-based) of the n sorted residuals that some coverage in [MIN_COVERAGE,
    MAX_COVERAGE] asks for: at most n/2 + 1 of them."""
    return range(rank(MIN_COVERAGE, n), min(n, rank(MAX_COVERAGE, n)) + 1)


def conformal_half_width(residuals: Ranked, first: int, n: int, coverage: float) -> float:
    """q: the rank(coverage, n)-th smallest of n residuals, of which `residuals` holds the
    sorted ranks first, first + 1, ...; inf when the rank is past n."""
    k = rank(coverage, n)
    return math.inf if k > n else float(residuals.item(k - first))


@functools.lru_cache(maxsize=1024)
def t_quantile(coverage: float, df: int) -> float:
    """t(1 - alpha/2, df) with alpha = 1 - coverage: what statsmodels multiplies s by."""
    from scipy.special import stdtrit  # ~20 ms the first time, at startup (`warm_up`)

    return float(stdtrit(df, 1.0 - (1.0 - coverage) / 2.0))


def warm_up() -> None:
    """Import the t quantile's code now, not on a request."""
    t_quantile(0.9, 1)


def gaussian_half_width(
    hours: float | Floats,
    coverage: float,
    n: int,
    df: int,
    s: float,
    center: float,
    spread: float,
    intercept: bool,
) -> float | Floats:
    """t s sqrt(1 + h(hours)) with h = [intercept]/n + (hours - center)^2 / spread; an
    overflow is an infinity, which the caller refuses."""
    base = 1.0 + (1.0 / n if intercept else 0.0)
    factor = t_quantile(coverage, df) * s
    if factor == 0:  # a perfect fit: a width of 0 anywhere (not 0 * inf far away)
        return hours * 0.0
    if isinstance(hours, float):  # one value: plain floats, ~10x quicker than numpy's scalars
        d = hours - center
        return factor * math.sqrt(base + d * d / spread)
    with np.errstate(all="ignore"):
        return factor * np.sqrt(base + (hours - center) ** 2 / spread)


def residual_summary(
    x: Sequence[float] | Floats, y: Sequence[float] | Floats, w: float, b: float
) -> tuple[int, int, Floats]:
    """(n, first kept rank, the kept sorted absolute residuals) of w x + b on held-out rows."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    residuals = np.sort(np.abs(ys - (xs * w + b)))
    ranks = kept_ranks(len(residuals))
    return len(residuals), ranks.start, residuals[ranks.start - 1 : ranks.stop - 1].copy()


def unavailable(method: Method, version: int, why: str) -> IntervalUnavailable:
    return IntervalUnavailable(
        f"model version {version} has no {method} interval: {why}",
        errors=[{"field": "method", "message": why, "code": "unavailable"}],
    )
