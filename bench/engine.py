"""In-process figures of the fit engine, each against a baseline measured in the same process.

Everything runs on one torch thread, as the service's worker does (SGD_TORCH_THREADS=1). The
machine may be shared, so every comparison is taken in alternating rounds and reported as the
median of the per-round figures.
"""

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from service.core import engine as training
from service.core.engine import Engine, FitParams, history, rel_diff, train

TUTORIAL_X = [1.0, 2.0, 3.0]
TUTORIAL_Y = [2.0, 4.0, 6.0]
ROUNDS = 5


def tutorial_loop(x_data: list[float], y_data: list[float], epochs: int) -> list[float]:
    """The tutorial's own loop: one random sample, forward, loss, backward(), update, record."""
    rng = random.Random(0)
    w = torch.tensor([1.0])
    w.requires_grad = True
    epoch_list, w_list, loss_list = [], [], []

    def forward(x: float) -> torch.Tensor:
        return x * w

    def loss_fn(x: float, y: float) -> torch.Tensor:
        y_pred = forward(x)
        return (y_pred - y) ** 2

    for epoch in range(epochs):
        i = rng.randrange(len(x_data))
        loss = loss_fn(x_data[i], y_data[i])
        loss.backward()  # type: ignore[no-untyped-call]
        epoch_list.append(epoch)
        w_list.append(w.item())
        loss_list.append(loss.item())
        assert w.grad is not None  # set by backward()
        w.data = w.data - 0.01 * w.grad.data
        w.grad.data.zero_()
    return w_list


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fit_seconds(
    x: torch.Tensor, y: torch.Tensor, params: FitParams, engine: Engine = "affine"
) -> float:
    """Wall time of a whole fit as the worker runs it: every chunk, as plain arrays."""
    return seconds(lambda: sum(len(c) for c in train(x, y, params, engine)))


def steps_for(per_step: float, budget: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(budget / per_step)))


def median_best(values: list[float], smaller_is_better: bool = True) -> dict[str, float]:
    """The median of the rounds, and their best: neither hides the other."""
    best = min(values) if smaller_is_better else max(values)
    return {"median": statistics.median(values), "best": best}


def per_sample_sgd() -> dict[str, Any]:
    """batch_size 1 on the tutorial's data: the tutorial's loop, the eager and affine engines."""
    x, y = training.as_tensor(TUTORIAL_X), training.as_tensor(TUTORIAL_Y)
    # size each run to about a second of work on this machine, whatever its load
    tut_steps = steps_for(
        seconds(lambda: tutorial_loop(TUTORIAL_X, TUTORIAL_Y, 2000)) / 2000, 1.0, 2000, 60_000
    )
    eager_steps = steps_for(
        fit_seconds(x, y, FitParams(epochs=2000), "eager") / 2000, 0.6, 2000, 40_000
    )
    steps = 1_000_000
    tut, eager, fast, fast_b, ratios, ratios_b = [], [], [], [], [], []
    for _ in range(ROUNDS):
        t = seconds(lambda: tutorial_loop(TUTORIAL_X, TUTORIAL_Y, tut_steps)) / tut_steps
        f = fit_seconds(x, y, FitParams(epochs=steps)) / steps
        e = fit_seconds(x, y, FitParams(epochs=eager_steps), "eager") / eager_steps
        fb = fit_seconds(x, y, FitParams(epochs=steps, fit_intercept=True)) / steps
        tut.append(t)
        fast.append(f)
        eager.append(e)
        fast_b.append(fb)
        ratios.append(t / f)
        ratios_b.append(t / fb)
    return {
        "tutorial_us_per_step": statistics.median(tut) * 1e6,
        "eager_us_per_step": statistics.median(eager) * 1e6,
        "affine_us_per_step": statistics.median(fast) * 1e6,
        "affine_intercept_us_per_step": statistics.median(fast_b) * 1e6,
        "speedup_vs_tutorial": median_best(ratios, smaller_is_better=False),
        "speedup_intercept_vs_tutorial": median_best(ratios_b, smaller_is_better=False),
        "speedup_rounds": ratios,
        "tutorial_steps": tut_steps,
        "affine_steps": steps,
    }


def agreement() -> dict[str, Any]:
    """The largest relative difference, affine against eager, over every mode of a noisy fit."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=gen, dtype=torch.float64)
    y = 1.5 * x - 0.7 + 0.3 * torch.randn(200, generator=gen, dtype=torch.float64)
    worst: dict[str, float] = {}
    for batch_size in (1, 16, None):
        for intercept in (False, True):
            params = FitParams(6000, 0.02, -1.0, batch_size, intercept, seed=1)
            fast, ref = history(train(x, y, params)), history(train(x, y, params, "eager"))
            key = f"batch={batch_size},intercept={intercept}"
            worst[key] = max(rel_diff(a, b) for a, b in zip(fast, ref, strict=True))
    return {"max_rel_diff": max(worst.values()), "by_mode": worst}


def full_batch(n: int = 1_000_000, epochs: int = 100) -> dict[str, Any]:
    """Full-batch epochs on n samples against one torch.dot pass over the same data."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    y = 2 * x + 0.5 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    for _ in range(5):
        torch.dot(x, y)
    dots, ratios, ratios_b, per_epoch, per_epoch_b, setups = [], [], [], [], [], []
    for _ in range(ROUNDS):
        dot = statistics.median(seconds(lambda: torch.dot(x, y)) for _ in range(30))
        fast = fit_seconds(x, y, FitParams(epochs=epochs, batch_size=None)) / epochs
        fast_b = fit_seconds(x, y, FitParams(epochs, 0.01, 1.0, None, True)) / epochs
        setup = fit_seconds(x, y, FitParams(epochs=1, batch_size=None))
        dots.append(dot)
        per_epoch.append(fast)
        per_epoch_b.append(fast_b)
        setups.append(setup)
        ratios.append(fast / dot)
        ratios_b.append(fast_b / dot)
    eager = fit_seconds(x, y, FitParams(epochs=5, batch_size=None), "eager") / 5
    dot = statistics.median(dots)
    return {
        "n": n,
        "epochs": epochs,
        "dot_ms": dot * 1e3,
        "affine_ms_per_epoch": statistics.median(per_epoch) * 1e3,
        "affine_intercept_ms_per_epoch": statistics.median(per_epoch_b) * 1e3,
        "one_epoch_fit_ms": statistics.median(setups) * 1e3,
        "eager_ms_per_epoch": eager * 1e3,
        "ratio_to_dot": median_best(ratios),
        "ratio_to_dot_intercept": median_best(ratios_b),
        "eager_ratio_to_dot": eager / dot,
    }


def sklearn_reference(n: int = 1_000_000) -> dict[str, Any]:
    """scikit-learn's SGDRegressor, one pass of per-sample SGD, and ours on the same data."""
    from sklearn.linear_model import SGDRegressor

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    y = 2 * x + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    features, target = x.numpy()[:, None], y.numpy()
    model = SGDRegressor(
        loss="squared_error",
        penalty=None,
        fit_intercept=False,
        learning_rate="constant",
        eta0=0.01,
        max_iter=1,
        tol=None,
        shuffle=True,
        random_state=0,
    )
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    sk, fast = [], []
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # one pass, on purpose
            sk.append(seconds(lambda: model.fit(features, target)) / n)
        fast.append(fit_seconds(x, y, FitParams(epochs=n)) / n)
    return {
        "n": n,
        "sklearn_us_per_step": statistics.median(sk) * 1e6,
        "affine_us_per_step": statistics.median(fast) * 1e6,
        "sklearn_w": float(model.coef_[0]),
    }


def session_seconds(x: torch.Tensor, y: torch.Tensor, params: FitParams) -> float:
    """Wall time of a whole fit as the workers run it (training.Session): the split, the
    engine, val_loss and the early-stopping check every epoch, and the report."""

    def run() -> None:
        session = training.Session(x, y, params)
        for _ in session.chunks():
            pass
        session.report()

    return seconds(run)


def lifecycle() -> dict[str, Any]:
    """Per-epoch cost of a fit with and without a validation split and early stopping (a tol
    it never meets, so every epoch runs and is checked), on the tutorial's 3 rows and on
    1,000,000 rows, batch 1: the split's losses are O(1) an epoch, whatever the rows."""
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    big_x = torch.randn(1_000_000, generator=gen, dtype=torch.float64)
    big_y = 2 * big_x + 1 + 0.1 * torch.randn(1_000_000, generator=gen, dtype=torch.float64)
    datasets = {
        "tutorial": (training.as_tensor(TUTORIAL_X), training.as_tensor(TUTORIAL_Y)),
        "1M rows": (big_x, big_y),
    }
    epochs = 1_000_000
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "split": {"validation_fraction": 0.2},
        "split + early stop": {"validation_fraction": 0.2, "tol": -1.0, "n_iter_no_change": 10},
        "early stop": {"tol": -1.0, "n_iter_no_change": 10},
    }
    for name, (x, y) in datasets.items():
        for variant, extra in variants.items():
            params = FitParams(epochs=epochs, fit_intercept=True, seed=1, **extra)
            runs = [session_seconds(x, y, params) / epochs * 1e6 for _ in range(3)]
            out[f"{name}, {variant}"] = median_best(runs)
    return out


def run_all(log: Callable[[str], None]) -> dict[str, Any]:
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name, fn in (
        ("agreement", agreement),
        ("per_sample", per_sample_sgd),
        ("full_batch", full_batch),
        ("sklearn", sklearn_reference),
        ("lifecycle", lifecycle),
    ):
        log(f"engine: {name} ...")
        results[name] = fn()
    return results
