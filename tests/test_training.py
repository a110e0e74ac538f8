"""The fit engine alone: affine against the eager reference, the tutorial, seeds, divergence."""

import itertools
import math
from array import array

import pytest
import torch

from service.core import engine as training
from service.core.engine import Chunk, FitParams, history, rel_diff, train
from service.core.errors import Diverged

TUTORIAL_X = training.as_tensor([1.0, 2.0, 3.0])
TUTORIAL_Y = training.as_tensor([2.0, 4.0, 6.0])
ALL_MODES = [
    pytest.param(batch_size, intercept, id=f"batch={batch_size}-intercept={intercept}")
    for batch_size in (1, 7, None)
    for intercept in (False, True)
]


def noisy_line(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    return x, 1.5 * x - 0.7 + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)


def run(
    x: torch.Tensor, y: torch.Tensor, params: FitParams, engine: training.Engine = "affine"
) -> list[Chunk]:
    return list(train(x, y, params, engine))


def diverged_run(
    x: torch.Tensor, y: torch.Tensor, params: FitParams, engine: training.Engine
) -> tuple[list[Chunk], Diverged]:
    chunks: list[Chunk] = []
    with pytest.raises(Diverged) as caught:
        chunks.extend(train(x, y, params, engine))
    return chunks, caught.value


@pytest.mark.parametrize(("batch_size", "intercept"), ALL_MODES)
def test_affine_follows_the_eager_trajectory(batch_size: int | None, intercept: bool) -> None:
    x, y = noisy_line(50)
    # several blocks of either engine, and a last block that is shorter
    params = FitParams(5000, 0.02, -1.0, batch_size, intercept, seed=7)
    fast, ref = run(x, y, params), run(x, y, params, "eager")
    fast_cols, ref_cols = history(fast), history(ref)
    assert len(fast_cols[0]) == len(ref_cols[0]) == 5000
    for fast_col, ref_col in zip(fast_cols, ref_cols, strict=True):
        assert rel_diff(fast_col, ref_col) < 1e-9
    assert math.isclose(fast[-1].w_after, ref[-1].w_after, rel_tol=1e-9)
    assert math.isclose(fast[-1].b_after, ref[-1].b_after, rel_tol=1e-9, abs_tol=1e-12)
    assert (fast[-1].b is None) is (not intercept)
    # the fit has moved: equal trajectories are not two copies of the starting point
    assert abs(ref[-1].w_after - 1.5) < 0.2


@pytest.mark.parametrize("engine", training.ENGINES)
def test_tutorial_fit_converges_to_two(engine: training.Engine) -> None:
    chunks = run(TUTORIAL_X, TUTORIAL_Y, FitParams(), engine)
    w, _, loss = history(chunks)
    assert len(w) == len(loss) == 100
    assert w[0] == 1.0
    assert w[-1] != w[0]
    assert abs(chunks[-1].w_after - 2.0) < 1e-3
    assert chunks[-1].b_after == 0.0
    assert chunks[-1].b is None
    assert loss[-1] < loss[0]
    assert all(isinstance(c.w, array) and c.w.typecode == "d" for c in chunks)


def test_chunks_tile_the_epochs_in_order() -> None:
    chunks = run(TUTORIAL_X, TUTORIAL_Y, FitParams(epochs=10_000))
    starts = [c.first_epoch for c in chunks]
    assert starts == [0, 4096, 8192]
    assert sum(len(c) for c in chunks) == 10_000
    for before, after in itertools.pairwise(chunks):
        # the next block starts where the previous one's last update left w
        assert after.w[0] == before.w_after


def test_a_long_fit_yields_its_first_chunk_without_running_the_rest() -> None:
    first = next(iter(train(TUTORIAL_X, TUTORIAL_Y, FitParams(epochs=10**9))))
    assert len(first) == training.MAX_BLOCK_EPOCHS


@pytest.mark.parametrize("engine", training.ENGINES)
def test_same_seed_is_bit_identical_and_another_seed_differs(engine: training.Engine) -> None:
    x, y = noisy_line(30)
    params = FitParams(epochs=3000, batch_size=2, fit_intercept=True, seed=123)
    first, again = history(run(x, y, params, engine)), history(run(x, y, params, engine))
    other = history(run(x, y, FitParams(3000, 0.01, 1.0, 2, True, seed=124), engine))
    assert first == again
    assert first[0] != other[0]


@pytest.mark.parametrize(("batch_size", "intercept"), ALL_MODES)
def test_divergence_names_the_same_epoch_as_the_reference(
    batch_size: int | None, intercept: bool
) -> None:
    params = FitParams(5000, 10.0, 1.0, batch_size, intercept, seed=3)
    fast, fast_error = diverged_run(TUTORIAL_X, TUTORIAL_Y, params, "affine")
    ref, ref_error = diverged_run(TUTORIAL_X, TUTORIAL_Y, params, "eager")
    assert fast_error.epoch == ref_error.epoch
    fast_cols, ref_cols = history(fast), history(ref)
    assert len(fast_cols[0]) == fast_error.epoch  # every epoch before it, and none after
    for fast_col, ref_col in zip(fast_cols, ref_cols, strict=True):
        assert all(map(math.isfinite, fast_col))
        assert rel_diff(fast_col, ref_col) < 1e-9


def test_tutorial_divergence_with_lr_10() -> None:
    chunks, error = diverged_run(TUTORIAL_X, TUTORIAL_Y, FitParams(learning_rate=10.0), "affine")
    w, _, loss = history(chunks)
    assert 0 < error.epoch < 100
    assert len(w) == len(loss) == error.epoch
    assert all(map(math.isfinite, [*w, *loss]))
    assert max(map(abs, w)) > 1e10  # it was on its way out, not stopped early for nothing
    assert error.problem()["epoch"] == error.epoch
    assert "learning_rate" in error.detail


@pytest.mark.parametrize("engine", training.ENGINES)
def test_an_update_that_overflows_keeps_the_history_before_it(engine: training.Engine) -> None:
    # A huge learning rate makes the first update overflow while the first loss is finite.
    params = FitParams(epochs=10, learning_rate=1e308, batch_size=None)
    chunks, error = diverged_run(TUTORIAL_X, TUTORIAL_Y, params, engine)
    assert error.epoch == 1
    assert history(chunks) == (array("d", [1.0]), array("d", [0.0]), array("d", [14 / 3]))
    # when that update is the last of the block, its epoch is named and the model dropped
    chunks, error = diverged_run(TUTORIAL_X, TUTORIAL_Y, FitParams(1, 1e308, 1.0, None), engine)
    assert error.epoch == 0
    assert [len(c) for c in chunks] == [1]
    assert not math.isfinite(chunks[0].w_after)


def test_a_slow_divergence_hands_over_to_eager_before_the_sum_overflows() -> None:
    # |1 - lr * 2 mean(x^2)| is about 1.05: thousands of epochs before anything overflows, and
    # the eager loss (a mean of 1000 squares) overflows before the affine engine's quadratic would.
    x, y = noisy_line(1000, seed=6)
    lr = 2.05 / float(2 * (x * x).mean())
    params = FitParams(30_000, lr, 1.0, None)
    fast, fast_error = diverged_run(x, y, params, "affine")
    ref, ref_error = diverged_run(x, y, params, "eager")
    assert fast_error.epoch == ref_error.epoch > 5000
    assert max(map(abs, history(fast)[2])) > 1e300 / 1000  # the last losses were near overflow
    for fast_col, ref_col in zip(history(fast), history(ref), strict=True):
        assert rel_diff(fast_col, ref_col) < 1e-9


def test_step_terms_are_each_epochs_own_autograd_derivatives() -> None:
    # one autograd pass over a block's batches gives what a pass per batch gives
    x, y = noisy_line(20, seed=8)
    xb, yb = x.view(5, 4), y.view(5, 4)  # five epochs of a batch of four
    for intercept in (False, True):
        terms = training.step_terms(xb, yb, intercept)
        assert terms.shape == ((6 if intercept else 2), 5)
        for e in range(5):
            w = torch.zeros((), dtype=torch.float64, requires_grad=True)
            b = torch.zeros((), dtype=torch.float64, requires_grad=intercept)
            theta = [w, b] if intercept else [w]
            loss = ((w * xb[e] + b - yb[e]) ** 2).mean()
            expected = []
            for g in torch.autograd.grad(loss, theta, create_graph=True):
                expected += [*torch.autograd.grad(g, theta, retain_graph=True), g.detach()]
            assert torch.equal(terms[:, e], torch.stack(expected))


def test_full_batch_on_diabetes_bmi_lands_on_least_squares() -> None:
    from sklearn.datasets import load_diabetes  # 0.7 s to import: paid by this test only

    features, target = load_diabetes(return_X_y=True)
    x = torch.tensor(features[:, 2], dtype=torch.float64)  # bmi, scaled as the package ships it
    y = torch.tensor(target, dtype=torch.float64)
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    w_ls, b_ls = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
    params = FitParams(epochs=20_000, learning_rate=0.5, init_w=0.0, batch_size=None)
    params = FitParams(**{**params.__dict__, "fit_intercept": True})
    last = run(x, y, params)[-1]
    assert abs(last.w_after - w_ls) <= 0.01 * abs(w_ls)
    assert abs(last.b_after - b_ls) <= 0.01 * abs(b_ls)
    loss_ls = training.mse(x, y, w_ls, b_ls)
    assert training.mse(x, y, last.w_after, last.b_after) <= 1.0001 * loss_ls


def test_full_batch_loss_is_the_mse_at_the_recorded_parameters() -> None:
    x, y = noisy_line(200, seed=5)
    chunks = run(x, y, FitParams(300, 0.1, 3.0, None, True))
    w, b, loss = history(chunks)
    for e in (0, 1, 150, 299):
        assert math.isclose(loss[e], training.mse(x, y, w[e], b[e]), rel_tol=1e-12)


@pytest.mark.parametrize(
    "x",
    [
        pytest.param([0.1, 0.1, 0.1], id="constant"),  # its mean is not exactly 0.1
        pytest.param([1e6, 1e6 + 1e-4, 1e6 - 2e-4, 1e6 + 3e-4], id="nearly-constant"),
        pytest.param([0.0, 0.0], id="zero"),
    ],
)
@pytest.mark.parametrize("intercept", [False, True])
def test_full_batch_losses_hold_when_x_barely_varies(x: list[float], intercept: bool) -> None:
    # The loss around the optimum is only right at the true optimum: a singular or nearly
    # singular H must not put it elsewhere (a review found final_loss 8.67 against 1.155).
    xs = training.as_tensor(x)
    ys = training.as_tensor([1.0 + i for i in range(len(x))])
    params = FitParams(200, 0.5 / max(1.0, float((xs * xs).mean())), 0.0, None, intercept)
    fast, ref = history(run(xs, ys, params)), history(run(xs, ys, params, "eager"))
    for fast_col, ref_col in zip(fast, ref, strict=True):
        assert rel_diff(fast_col, ref_col) < 1e-9


def test_the_affine_engine_uses_autograd_gradients_that_are_affine_in_theta() -> None:
    x, y = noisy_line(40, seed=2)
    # each sample as an epoch of its own
    h_ww, h_wb, g_w, h_bw, h_bb, g_b = training.step_terms(x[:, None], y[:, None], True)
    assert torch.equal(h_wb, h_bw)
    theta = torch.tensor([0.8, -2.5], dtype=torch.float64, requires_grad=True)
    for i in (0, 17, 39):
        loss = (theta[0] * x[i] + theta[1] - y[i]) ** 2
        (grad,) = torch.autograd.grad(loss, theta)
        affine_w = h_ww[i] * 0.8 + h_wb[i] * -2.5 + g_w[i]
        affine_b = h_wb[i] * 0.8 + h_bb[i] * -2.5 + g_b[i]
        assert torch.allclose(grad, torch.stack([affine_w, affine_b]), rtol=1e-12)


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="engine"):
        run(TUTORIAL_X, TUTORIAL_Y, FitParams(), "jit")  # type: ignore[arg-type]


def test_a_data_set_larger_than_a_block_follows_the_reference() -> None:
    # more samples than a block's sample-steps: a block draws from all of them
    x, y = noisy_line(training.BLOCK_SAMPLES + 10, seed=4)
    params = FitParams(3000, 0.05, 0.0, 1, True, seed=9)
    fast, ref = history(run(x, y, params)), history(run(x, y, params, "eager"))
    for fast_col, ref_col in zip(fast, ref, strict=True):
        assert rel_diff(fast_col, ref_col) < 1e-9


def test_a_model_whose_loss_overflows_diverges_on_both_engines() -> None:
    # Issue 11: w = 2e156 after the last update; the history is finite, the mse is not.
    x, y = training.as_tensor([1.0]), training.as_tensor([0.0])
    params = FitParams(epochs=68, learning_rate=100.0, batch_size=1, seed=0)
    for engine in training.ENGINES:
        chunks = run(x, y, params, engine)
        assert abs(chunks[-1].w_after) > 1e150
        with pytest.raises(Diverged) as caught:
            training.result(x, y, chunks[-1], params)
        assert caught.value.epoch == 68
        assert "learning_rate" in caught.value.detail


def test_the_full_batch_loss_near_zero_is_never_negative() -> None:
    # Issue 11: the expansion L* + g*.d + d'Hd/2 gave -2.78e-17 at epoch 484 here.
    x, y = training.as_tensor([4.603309337219006]), training.as_tensor([-17.031268745236762])
    params = FitParams(500, 0.001, -2.3804099297572487, None, True, seed=0)
    fast = history(run(x, y, params))
    ref = history(run(x, y, params, "eager"))
    assert min(fast[2]) >= 0
    for fast_col, ref_col in zip(fast, ref, strict=True):
        assert rel_diff(fast_col, ref_col) < 1e-9
    outcome = training.result(x, y, run(x, y, params)[-1], params)
    assert outcome.final_loss >= 0
    # the last epoch's loss and the mse after it are both tiny, and of the eager engine's size
    assert outcome.mse < 1e-15
    assert abs(fast[2][-1] - ref[2][-1]) <= 1e-9 * ref[2][0]
