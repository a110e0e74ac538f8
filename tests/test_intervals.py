"""Prediction intervals (service/core/intervals.py) against independent anchors and measured.

- conformal: the same interval as MAPIE's split conformal regressor given our w, b and held-out
  rows, wherever both take the same order statistic; where MAPIE's float arithmetic takes the
  next one, ours is the textbook ceil((n + 1) c)-th smallest residual (Fraction arithmetic).
- gaussian: the same interval as statsmodels' OLS prediction interval with OUR w, b on the
  training rows (scale from our residuals, the t distribution).
- coverage, measured over hundreds of independent seeded fits: conformal holds 90% on normal and
  on contaminated noise; gaussian holds it on normal noise and misses it on contaminated noise.
- the ranks: a coverage read as its decimal, the kept ranks exactly those some coverage asks for.
"""

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from mapie.regression import SplitConformalRegressor
from sklearn.linear_model import LinearRegression
from statsmodels.regression.linear_model import OLSResults

from service.core import intervals
from service.core.engine import FitParams, Session
from service.core.intervals import METHODS, SHOWN_COVERAGES, Floats, Method, kept_ranks, rank
from service.core.schemas import FitReport

RTOL = 1e-9
FRESH_X = np.array([-20.0, -3.0, 0.0, 1.0, 2.5, 7.0, 50.0])  # the data's x: mean 1, sd 1.5
# the shown coverages, every hundredth in [0.5, 0.99], and two past n/(n+1) even for n = 99
GRID = sorted({*SHOWN_COVERAGES, *(i / 100 for i in range(50, 100)), 0.995, 0.999})


def line(rows: int, seed: int) -> tuple[Floats, Floats]:
    """y = 2x + 1 + N(0, 1) at x ~ N(1, 1.5^2)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 1.5, rows)
    return x, 2.0 * x + 1.0 + rng.normal(0.0, 1.0, rows)


def fit(
    x: Floats,
    y: Floats,
    validation_fraction: float,
    intercept: bool,
    epochs: int = 2000,
    learning_rate: float = 0.1,
    seed: int = 0,
) -> tuple[Session, FitReport]:
    """A full-batch fit through the engine's Session, as a training worker runs it."""
    params = FitParams(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=None,
        fit_intercept=intercept,
        seed=seed,
        validation_fraction=validation_fraction,
    )
    session = Session(torch.tensor(x), torch.tensor(y), params)
    for _ in session.chunks():
        pass
    return session, session.report()


def kept(report: FitReport) -> Floats | None:
    """The report's kept residuals, as Model.holding reads them."""
    return None if report.residuals is None else np.frombuffer(report.residuals, np.float64)


def ours(report: FitReport, xs: Floats, coverage: float, method: Method) -> tuple[Floats, Floats]:
    """Our (lower, upper) at xs: the score plus and minus the half width."""
    assert report.intervals is not None
    used, half = report.intervals.half_width(kept(report), 1, xs, coverage, method)
    assert used == method
    score = report.w * xs + report.b
    return score - half, score + half


def assert_same(got: tuple[Floats, Floats], want: tuple[Floats, Floats]) -> None:
    """Both bounds equal to RTOL relative to the interval's magnitude at each x."""
    scale = np.maximum(np.abs(want[0]), np.abs(want[1]))
    for g, w in zip(got, want, strict=True):
        assert np.all(np.abs(g - w) <= RTOL * scale), (g, w)


def textbook_rank(coverage: float, n: int) -> int:
    """ceil((n + 1) c) in exact arithmetic on the decimal c is written as."""
    return math.ceil(Fraction(repr(coverage)) * (n + 1))


# -- conformal against MAPIE ---------------------------------------------------------------------


def mapie_rank(coverage: float, n: int) -> int:
    """The order statistic MAPIE 1.6 takes: alpha = float(1 - Decimal(str(c))) (its
    _transform_confidence_level_to_alpha), then ceil((1 - alpha) (n + 1)) in floats
    (_compute_regression_quantile), then numpy's "lower" quantile at that rank / n."""
    alpha = float(Decimal(1) - Decimal(str(coverage)))
    return math.ceil((1.0 - alpha) * (n + 1))


def mapie_interval(
    w: float, b: float, intercept: bool, held: tuple[Floats, Floats], coverage: float, xs: Floats
) -> tuple[Floats, Floats] | None:
    """MAPIE's split conformal (lower, upper) at xs for the line w x + b; None when it refuses
    because the conformal quantile does not exist (the corrected level exceeds 1).

    allow_infinite_bounds=True skips MAPIE's stricter check n >= 1/alpha (which refuses n = 99
    at 0.99, although the 99th of 99 residuals exists); its symmetric "absolute" score does not
    pass the option on, so an unbounded interval is still a ValueError there."""
    estimator = LinearRegression(fit_intercept=intercept).fit([[0.0], [1.0]], [0.0, 1.0])
    estimator.coef_ = np.array([w])
    estimator.intercept_ = b if intercept else 0.0
    mapie = SplitConformalRegressor(estimator=estimator, confidence_level=coverage, prefit=True)
    mapie.conformalize(held[0][:, None], held[1])
    try:
        _, bounds = mapie.predict_interval(xs[:, None], allow_infinite_bounds=True)
    except ValueError as e:
        if "exceeds 1.0" not in str(e):
            raise
        return None
    return bounds[:, 0, 0], bounds[:, 1, 0]


def held_out(session: Session) -> tuple[Floats, Floats]:
    assert session.val_x is not None
    assert session.val_y is not None
    return session.val_x.numpy(), session.val_y.numpy()


@pytest.mark.parametrize("intercept", [False, True], ids=["no-intercept", "intercept"])
@pytest.mark.parametrize(
    ("rows", "fraction", "n_held"), [(196, 0.25, 49), (198, 0.5, 99)], ids=["n=49", "n=99"]
)
@pytest.mark.parametrize("epochs", [3, 2000], ids=["short", "converged"])
def test_conformal_equals_mapie(
    rows: int, fraction: float, n_held: int, intercept: bool, epochs: int
) -> None:
    """Over a grid of coverages: ours is the textbook order statistic of the held-out residuals,
    MAPIE's interval where it takes the same one, and MAPIE takes the next one otherwise."""
    x, y = line(rows, seed=rows + intercept)
    session, report = fit(x, y, fraction, intercept, epochs=epochs)
    held = held_out(session)
    n = len(held[0])
    assert n == n_held
    residuals = np.sort(np.abs(held[1] - (held[0] * report.w + report.b)))
    agree, differ = [], []
    for c in GRID:
        k = rank(c, n)
        assert k == textbook_rank(c, n)
        lower, upper = ours(report, FRESH_X, c, "conformal")
        score = report.w * FRESH_X + report.b
        if k > n:
            assert np.all(np.isinf(lower) & (lower < 0))
            assert np.all(np.isinf(upper) & (upper > 0))
        else:
            assert_same((lower, upper), (score - residuals[k - 1], score + residuals[k - 1]))
        theirs = mapie_interval(report.w, report.b, intercept, held, c, FRESH_X)
        k_mapie = mapie_rank(c, n)
        if k_mapie > n:  # MAPIE too says the interval is unbounded
            assert theirs is None or np.all(np.isinf(theirs[1]))
        else:
            assert theirs is not None
            q = residuals[k_mapie - 1]
            assert_same(theirs, (score - q, score + q))
        if k_mapie == k:
            agree.append(c)
            if theirs is not None:
                assert_same((lower, upper), theirs)
        else:
            differ.append(c)
            assert k_mapie == k + 1  # float rounding up past an integer: the next one
    assert set(SHOWN_COVERAGES) <= set(agree)
    assert len(agree) > 4 * len(differ)
    assert any(rank(c, n) > n for c in agree)  # the unbounded case was compared too


def test_mapie_takes_the_next_order_statistic_where_float_rounding_says_so() -> None:
    """0.55 of n = 99: (n + 1) 0.55 = 55 exactly, so the 55th smallest residual; MAPIE computes
    1 - 0.45 = 0.5500000000000000444 in floats, times 100 is 55.00000000000001, and takes the
    56th (a wider interval: still valid, not the textbook one)."""
    n, c = 99, 0.55
    assert rank(c, n) == textbook_rank(c, n) == 55
    assert mapie_rank(c, n) == 56
    held_x = np.linspace(-1.0, 1.0, n)
    held_y = np.random.default_rng(7).permutation(np.arange(1.0, n + 1.0))  # residuals 1..99
    summary, residuals = intervals.summarise((held_x, held_y), (held_x, held_y), 0.0, 0.0, True)
    assert residuals is not None
    assert summary.half_width(residuals, 1, 0.0, c, "conformal") == ("conformal", 55.0)
    theirs = mapie_interval(0.0, 0.0, True, (held_x, held_y), c, np.array([0.0]))
    assert theirs is not None
    assert (float(theirs[0][0]), float(theirs[1][0])) == (-56.0, 56.0)


def test_small_held_out_set_is_unbounded_where_mapie_refuses() -> None:
    """5 held-out rows: q exists up to coverage 5/6; above it ours is inf and MAPIE refuses."""
    x, y = line(20, seed=3)
    session, report = fit(x, y, 0.25, True)
    held = held_out(session)
    assert report.intervals is not None
    assert report.intervals.conformal is not None
    assert report.intervals.conformal.n == len(held[0]) == 5
    assert report.intervals.conformal.max_coverage == 5 / 6
    for c in (0.5, 0.8, 0.83, 0.84, 0.9, 0.95, 0.99):
        lower, upper = ours(report, FRESH_X, c, "conformal")
        theirs = mapie_interval(report.w, report.b, True, held, c, FRESH_X)
        unbounded = c > 5 / 6
        assert bool(np.all(np.isinf(upper))) is unbounded
        assert (theirs is None) is unbounded
        if theirs is not None:
            assert_same((lower, upper), theirs)
        if c in SHOWN_COVERAGES:
            assert (report.intervals.conformal.half_widths[str(c)] is None) is unbounded


# -- gaussian against statsmodels ----------------------------------------------------------------


def statsmodels_results(
    session: Session, report: FitReport, intercept: bool
) -> tuple[OLSResults, OLSResults]:
    """(results with OUR w and b, statsmodels' own least-squares fit) on the training rows."""
    x, y = session.train_x.numpy(), session.train_y.numpy()
    exog = sm.add_constant(x, has_constant="add") if intercept else x[:, None]
    model = sm.OLS(y, exog)
    fitted = model.fit()
    params = np.array([report.b, report.w] if intercept else [report.w])
    mine = OLSResults(model, params, normalized_cov_params=fitted.normalized_cov_params)
    return mine, fitted


@pytest.mark.parametrize("intercept", [False, True], ids=["no-intercept", "intercept"])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5], ids=lambda f: f"split={f}")
@pytest.mark.parametrize("epochs", [3, 2000], ids=["short", "converged"])
def test_gaussian_equals_statsmodels(fraction: float, intercept: bool, epochs: int) -> None:
    """t(1 - alpha/2, n - p) s sqrt(1 + h(x)) on the training rows, s from our own residuals:
    statsmodels' prediction interval, at x near and far from the data."""
    x, y = line(200, seed=11 + intercept)
    session, report = fit(x, y, fraction, intercept, epochs=epochs)
    train_x, train_y = session.train_x.numpy(), session.train_y.numpy()
    assert len(train_x) == 200 - math.ceil(fraction * 200)
    mine, fitted = statsmodels_results(session, report, intercept)
    # the anchor is computed from our parameters: its scale is our SSR / df on the training rows
    ssr = float(np.sum((train_y - (report.w * train_x + report.b)) ** 2))
    df = len(train_x) - (2 if intercept else 1)
    assert mine.use_t
    assert mine.df_resid == df
    assert math.isclose(mine.scale, ssr / df, rel_tol=1e-12)
    if epochs == 3:  # not converged: our line is not statsmodels' own, so the test can tell
        assert abs(report.w - fitted.params[-1]) > 1e-3
        assert mine.scale > fitted.scale
    g = report.intervals.gaussian if report.intervals is not None else None
    assert g is not None
    assert (g.n, g.df) == (len(train_x), df)
    exog = np.column_stack([np.ones_like(FRESH_X), FRESH_X]) if intercept else FRESH_X[:, None]
    prediction = mine.get_prediction(exog)
    assert np.allclose(prediction.predicted_mean, report.w * FRESH_X + report.b, rtol=RTOL)
    for c in (*SHOWN_COVERAGES, 0.55, 0.999):
        band = prediction.conf_int(obs=True, alpha=1.0 - c)
        assert_same(ours(report, FRESH_X, c, "gaussian"), (band[:, 0], band[:, 1]))


# -- coverage, measured --------------------------------------------------------------------------

FITS, ROWS, FRESH, COVERAGE = 250, 100, 200, 0.9
N_HELD = ROWS // 2  # validation_fraction 0.5: 50 rows train, 50 calibrate


def normal(rng: np.random.Generator, k: int) -> Floats:
    return rng.normal(0.0, 1.0, k)


def contaminated(rng: np.random.Generator, k: int) -> Floats:
    """80% small errors N(0, 0.1^2), 20% gross ones near +-3: heavy shoulders, not normal.

    Chosen over Student t: at 90% a t interval errs on the safe side (t(1.5): about 0.93, only
    2-3 tolerances from 0.90 at 250 fits, so its verdict could flip with the seed), while here
    s ~ 1.35 makes t s ~ 2.3 < 3, so the gaussian interval covers the small errors alone: ~0.81,
    ten tolerances below 0.90 under every seed tried, and on the unsafe side. Continuous, so
    no ties among residuals."""
    gross = rng.random(k) < 0.2
    sign = rng.choice([-1.0, 1.0], k)
    return np.where(gross, sign * (3.0 + 0.1 * rng.normal(size=k)), 0.1 * rng.normal(size=k))


NOISES = {"normal N(0,1)": normal, "contaminated 80/20": contaminated}


def coverages(noise: str) -> dict[Method, Floats]:
    """Per fit, the share of FRESH new points inside each method's 90% interval: FITS
    independent fits of y = 2x + 1 + noise, x ~ U(-2, 2), each from its own seeded generator."""
    draw = NOISES[noise]
    shares: dict[Method, list[float]] = {method: [] for method in METHODS}
    for i in range(FITS):
        rng = np.random.default_rng([2026, i])
        x = rng.uniform(-2.0, 2.0, ROWS)
        session, report = fit(
            x, 2 * x + 1 + draw(rng, ROWS), 0.5, True, epochs=400, learning_rate=0.3, seed=i
        )
        # the gaussian interval assumes the least-squares line: the fit has converged to it
        train = np.column_stack([session.train_x.numpy(), np.ones(ROWS - N_HELD)])
        w_ols, b_ols = np.linalg.lstsq(train, session.train_y.numpy(), rcond=None)[0]
        assert abs(report.w - w_ols) <= 1e-9 * (1 + abs(w_ols))
        assert abs(report.b - b_ols) <= 1e-9 * (1 + abs(b_ols))
        fresh_x = rng.uniform(-2.0, 2.0, FRESH)
        fresh_y = 2 * fresh_x + 1 + draw(rng, FRESH)
        for method, got in shares.items():
            lower, upper = ours(report, fresh_x, COVERAGE, method)
            got.append(float(np.mean((lower <= fresh_y) & (fresh_y <= upper))))
    return {method: np.array(got) for method, got in shares.items()}


def summary_line(method: str, noise: str, shares: Floats) -> tuple[float, float]:
    """(mean coverage, tolerance: 4 standard errors of that mean over the fits), printed."""
    mean = float(shares.mean())
    tol = 4 * float(shares.std(ddof=1)) / math.sqrt(len(shares))
    print(
        f"\n{method:<9} {noise:<18} fits={len(shares)} fresh/fit={FRESH} "
        f"mean coverage={mean:.4f} (target {COVERAGE}) tolerance=+-{tol:.4f}",
        end="",
    )
    return mean, tol


@pytest.mark.parametrize("noise", list(NOISES))
def test_coverage_measured(noise: str) -> None:
    """Conformal: at least 90% whatever the noise, and no more than k/(n+1) <= 0.9 + 1/(n+1)
    beyond the sampling error. Gaussian: 90% on normal noise, clearly not on contaminated."""
    shares = coverages(noise)
    mean, tol = summary_line("conformal", noise, shares["conformal"])
    assert mean >= COVERAGE - tol
    assert mean <= COVERAGE + 1 / (N_HELD + 1) + tol
    # exchangeable held-out and fresh rows: the expected coverage is exactly k / (n + 1)
    assert abs(mean - rank(COVERAGE, N_HELD) / (N_HELD + 1)) <= tol
    mean, tol = summary_line("gaussian", noise, shares["gaussian"])
    if noise.startswith("normal"):
        assert abs(mean - COVERAGE) <= tol
    else:
        assert mean < COVERAGE - tol


# -- the ranks -----------------------------------------------------------------------------------

FINE = [i / 2000 for i in range(1000, 1999)] + [0.999]  # steps of 0.0005: (n + 1) 0.0005 < 1
SIZES = [*range(1, 121), 199, 200, 201, 499, 999, 1000, 1998]


def test_rank_reads_the_decimal() -> None:
    """0.55 of 20 ranks is 11; 0.55 of 100 is 55 and 0.56 of 25 is 14, although the float
    products are 55.00000000000001 and 14.000000000000002."""
    assert rank(0.55, 19) == 11
    assert (math.ceil(0.55 * 100), rank(0.55, 99)) == (56, 55)
    assert (math.ceil(0.56 * 25), rank(0.56, 24)) == (15, 14)
    for n in SIZES:
        for c in FINE[::7]:
            assert rank(c, n) == textbook_rank(c, n)


def test_kept_ranks_are_exactly_those_some_coverage_asks_for() -> None:
    """For each n, kept_ranks(n) is the set of ranks <= n of the coverages in [0.5, 0.999]: a
    grid fine enough that consecutive coverages move the rank by at most one."""
    for n in SIZES:
        asked = {k for k in (rank(c, n) for c in FINE) if k <= n}
        assert set(kept_ranks(n)) == asked, n
        assert len(kept_ranks(n)) <= n / 2 + 1


def test_an_answer_is_that_order_statistic() -> None:
    """With residuals 1..n in shuffled order, the half width at c is the rank(c, n)-th smallest,
    i.e. rank(c, n) itself, or inf past n; the summary shows the same at its coverages."""
    for n in (1, 2, 5, 19, 20, 49, 99, 100, 1000):
        xs = np.linspace(0.0, 1.0, n)
        ys = np.random.default_rng(n).permutation(np.arange(1.0, n + 1.0))
        summary, residuals = intervals.summarise((xs, -ys), (xs, -ys), 0.0, 0.0, True)
        assert residuals is not None
        assert summary.conformal is not None
        assert list(residuals) == [float(k) for k in kept_ranks(n)]
        for c in FINE:
            k = textbook_rank(c, n)
            _, half = summary.half_width(residuals, 1, 0.0, c, "conformal")
            assert half == (float(k) if k <= n else math.inf), (n, c)
        for c in SHOWN_COVERAGES:
            k = textbook_rank(c, n)
            assert summary.conformal.half_widths[str(c)] == (float(k) if k <= n else None)
