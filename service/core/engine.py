"""The fit engine: y = w*x (+ b) by (stochastic) gradient descent, gradients from torch autograd.

Data in, per-epoch w/b/loss and the result out: public torch APIs only, no HTTP, no globals, all
float64. A fit runs in blocks of up to MAX_BLOCK_EPOCHS epochs whose samples are drawn at once,
so both engines consume the generator identically; the caller can stop between blocks.

- "eager", the readable reference, is the tutorial's loop: forward, loss, backward(), step.
- "affine", the default, calls autograd once a block instead of once a step. The squared loss
  of a linear model has a gradient affine in theta = (w, b): g(theta) = H theta + g(0). One
  autograd pass gives every epoch's H and g(0) over its batch; a step, theta <- theta - lr
  (H theta + g(0)), is then a few float operations in a plain loop, and the losses follow in
  one vectorised pass.
"""

import dataclasses
import math
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from service.core import intervals
from service.core.errors import Diverged, InvalidInput
from service.core.schemas import FitReport, Quadratic

DTYPE = torch.float64
MAX_BLOCK_EPOCHS = 4096
BLOCK_SAMPLES = 1 << 16  # a block holds about this many sample-steps of work
# Within ~1e8 of overflow the affine engine hands a block over to the eager loop: only the
# reference can say at which epoch a value stops being finite (its loss overflows when its
# batch's sum of squares does). Only diverging fits come near it: one check a block.
SAFE_MAGNITUDE = 1e300

Engine = Literal["affine", "eager"]
ENGINES: tuple[Engine, ...] = ("affine", "eager")


@dataclass(frozen=True)
class FitParams:
    """Hyper-parameters of one fit; the defaults are the tutorial's."""

    epochs: int = 100
    learning_rate: float = 0.01
    init_w: float = 1.0
    batch_size: int | None = 1  # None: the whole data set every epoch (full-batch GD)
    fit_intercept: bool = False
    seed: int = 0
    init_b: float = 0.0
    validation_fraction: float = 0.0  # share of rows held out, chosen with the seed
    tol: float | None = None  # early stopping off
    n_iter_no_change: int = 5

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> "FitParams":
        """From a job's parameters, leaving out those that are not the engine's (publish...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


@dataclass(frozen=True)
class Chunk:
    """Consecutive epochs of a fit: parameters before each update and that epoch's batch loss."""

    first_epoch: int
    w: "array[float]"
    b: "array[float] | None"  # None without an intercept
    loss: "array[float]"
    w_after: float  # parameters after the chunk's last update
    b_after: float
    val_loss: "array[float] | None" = None  # validation MSE before each update, with a split

    def __len__(self) -> int:
        return len(self.w)


@dataclass(frozen=True)
class FitResult:
    """A fit's outcome: every number finite, or result() raised Diverged."""

    w: float
    b: float
    final_loss: float
    mse: float


def as_tensor(values: bytes | Sequence[float]) -> torch.Tensor:
    """A float64 tensor from raw float64 bytes, an array('d') or a list of floats."""
    if isinstance(values, bytes | bytearray):
        return torch.frombuffer(bytearray(values), dtype=DTYPE)
    return torch.tensor(values, dtype=DTYPE)


def mse(x: torch.Tensor, y: torch.Tensor, w: float, b: float) -> float:
    """Mean squared error of y = w*x + b on the whole data set."""
    return float(torch.mean((x * w + b - y) ** 2))


def result(x: torch.Tensor, y: torch.Tensor, last: Chunk, params: FitParams) -> FitResult:
    """The outcome of a fit whose last chunk is `last`; raises Diverged unless all of it is finite.

    The history can be finite while the model it ends with is not usable: the last update can
    take w to where the loss on the data overflows (w = 2e156 gives an mse of inf).
    """
    w, b = last.w_after, last.b_after
    outcome = FitResult(w, b, last.loss[-1], mse(x, y, w, b))
    if not all(map(math.isfinite, (outcome.w, outcome.b, outcome.final_loss, outcome.mse))):
        raise Diverged(params.epochs, params.learning_rate)
    return outcome


def train(
    x: torch.Tensor, y: torch.Tensor, params: FitParams, engine: Engine = "affine"
) -> Iterator[Chunk]:
    """Run the fit block by block; yields each block's history, raises Diverged on NaN/Inf."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {ENGINES}")
    n, batch = x.numel(), params.batch_size
    gen = torch.Generator().manual_seed(params.seed)
    steps = _Affine(x, y, params) if engine == "affine" else _Eager(x, y, params)
    # a full-batch epoch of the affine engine costs O(1), not O(n)
    per_epoch = 1 if engine == "affine" and batch is None else (batch or n)
    block = max(1, min(MAX_BLOCK_EPOCHS, BLOCK_SAMPLES // per_epoch))
    w, b = params.init_w, params.init_b
    for first in range(0, params.epochs, block):
        size = min(block, params.epochs - first)
        idx = None if batch is None else torch.randint(n, (size, batch), generator=gen)
        hist = torch.empty(3, size, dtype=DTYPE)  # rows: w, b before each update; batch loss
        w, b = steps.block(idx, hist, w, b)
        chunk, bad = _to_chunk(first, hist, w, b, params)
        if len(chunk):
            yield chunk
        if bad is not None:
            raise Diverged(bad, params.learning_rate)


class _Eager:
    """The tutorial's loop, the readable reference: forward, loss, backward(), step."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, params: FitParams) -> None:
        self.x, self.y, self.params = x, y, params

    def block(
        self, idx: torch.Tensor | None, hist: torch.Tensor, w0: float, b0: float, start: int = 0
    ) -> tuple[float, float]:
        """Fill a block's history from epoch `start` and (w0, b0) on, up to the first non-finite
        loss (which a non-finite w or b gives too); returns (w, b) after the last update."""
        x, y, lr = self.x, self.y, self.params.learning_rate
        w = torch.tensor(w0, dtype=DTYPE, requires_grad=True)
        b = torch.tensor(b0, dtype=DTYPE, requires_grad=self.params.fit_intercept)
        for e in range(start, hist.shape[1]):
            xb, yb = (x, y) if idx is None else (x[idx[e]], y[idx[e]])
            loss = ((w * xb + b - yb) ** 2).mean()
            loss.backward()  # type: ignore[no-untyped-call]
            with torch.no_grad():
                hist[:, e] = torch.stack([w, b, loss])
                assert w.grad is not None
                w -= lr * w.grad
                w.grad.zero_()
                if b.grad is not None:
                    b -= lr * b.grad
                    b.grad.zero_()
            if not math.isfinite(loss.item()):
                break
        return w.item(), b.item()


def step_terms(x: torch.Tensor, y: torch.Tensor, intercept: bool) -> torch.Tensor:
    """Rows [h_ww, g_w] or [h_ww, h_wb, g_w, h_bw, h_bb, g_b] by autograd at theta = 0, one
    column per epoch: x and y hold an epoch's batch per row. theta has a copy per epoch, so each
    epoch's loss depends on its own copy only: the gradient of the summed losses holds every
    epoch's g(0), and the gradient of each summed gradient component its row of H."""
    w = x.new_zeros(x.shape[0], 1, requires_grad=True)
    b = x.new_zeros(x.shape[0], 1, requires_grad=intercept)
    theta = [w, b] if intercept else [w]
    with torch.enable_grad():
        loss = ((w * x + b - y) ** 2).mean(dim=1).sum()
        rows: list[torch.Tensor] = []
        for g in torch.autograd.grad(loss, theta, create_graph=True):
            rows += torch.autograd.grad(g.sum(), theta, retain_graph=True)
            rows.append(g.detach())
    return torch.cat(rows, dim=1).T


class _Affine:
    """The SGD steps of one fit as affine maps theta <- theta + D theta + C (D = -lr mean H,
    C = -lr mean g(0) over the step's batch), walked in a plain loop a block at a time."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, params: FitParams) -> None:
        self.x, self.y, self.lr = x, y, params.learning_rate
        self.intercept, self.eager = params.fit_intercept, _Eager(x, y, params)
        batch = params.batch_size or x.numel()
        self.limits = SAFE_MAGNITUDE / torch.tensor([[1.0], [1.0], [batch]], dtype=DTYPE)
        if params.batch_size is None:  # one map for every epoch, and the loss as a quadratic
            terms = step_terms(x[None], y[None], self.intercept)[:, 0]
            self.full_map = (-self.lr * terms).tolist()
            # the optimum theta* solves H theta* = -g(0); SVD copes with a singular H (constant x)
            p = 1 + self.intercept
            m = terms.view(p, p + 1)
            opt = torch.linalg.lstsq(m[:, :p], -m[:, p:], driver="gelsd").solution[:, 0].tolist()
            self.opt = opt[0], (opt[1] if self.intercept else 0.0)
            self.mean_x = float(x.mean()) if self.intercept else 0.0
            self.spread_x = float(((x - self.mean_x) ** 2).mean())  # taken about 0 without b
            self.loss_opt = mse(x, y, *self.opt)

    def block(
        self, idx: torch.Tensor | None, hist: torch.Tensor, w: float, b: float
    ) -> tuple[float, float]:
        """Fill a block's history starting from (w, b); returns them after its last update."""
        size = hist.shape[1]
        if idx is None:
            rows = [array("d", [c]) * size for c in self.full_map]
        else:
            xb, yb = self.x[idx], self.y[idx]  # (epochs, batch)
            rows = [_to_array(r) for r in step_terms(xb, yb, self.intercept).mul_(-self.lr)]
        ws, bs = array("d"), array("d")
        w_after, b_after = _walk(w, b, rows, ws, bs)
        hist[0], hist[1] = torch.frombuffer(ws, dtype=DTYPE), torch.frombuffer(bs, dtype=DTYPE)
        if idx is None:
            # Full batch: with d = theta - theta* (theta* the least-squares optimum, where the
            # residuals r* are orthogonal to x and to 1), mean((r* + dw x + db)^2) is
            # L* + (dw mean(x) + db)^2 + dw^2 var(x): O(1) an epoch, never below zero.
            dw = hist[0] - self.opt[0]
            loss = torch.mul(dw, dw, out=hist[2]).mul_(self.spread_x).add_(self.loss_opt)
            if self.intercept:
                shift = (hist[1] - self.opt[1]).add_(dw, alpha=self.mean_x)
                loss.addcmul_(shift, shift)
        else:
            torch.mean((hist[0, :, None] * xb + hist[1, :, None] - yb) ** 2, dim=1, out=hist[2])
        # Near overflow, redo the block eagerly from the epoch before the first unsafe value.
        unsafe = ~(hist.abs() <= self.limits).all(dim=0)  # NaN is unsafe too
        if bool(unsafe.any()) or not abs(w_after) + abs(b_after) <= SAFE_MAGNITUDE:
            first = int(unsafe.nonzero()[0, 0]) if bool(unsafe.any()) else size
            start = max(0, first - 1)
            w_start, b_start = hist[:2, start].tolist()
            return self.eager.block(idx, hist, w_start, b_start, start)
        return w_after, b_after


def _walk(
    w: float, b: float, rows: Sequence[Iterable[float]], ws: "array[float]", bs: "array[float]"
) -> tuple[float, float]:
    """Steps of theta <- theta + D theta + C from (w, b); records both before each step."""
    if len(rows) == 2:  # w alone; b stays 0
        for d, c in zip(*rows, strict=True):
            ws.append(w)
            w += d * w + c
        bs.frombytes(bytes(8 * len(ws)))
        return w, b
    for dww, dwb, cw, dbw, dbb, cb in zip(*rows, strict=True):
        ws.append(w)
        bs.append(b)
        w, b = w + (dww * w + dwb * b + cw), b + (dbw * w + dbb * b + cb)
    return w, b


def _to_array(t: torch.Tensor) -> "array[float]":
    """A tensor's values as array('d'), copied straight into the array's buffer."""
    out = array("d", bytes(8 * t.numel()))
    if t.numel():
        torch.frombuffer(out, dtype=DTYPE).copy_(t)
    return out


def _to_chunk(
    first: int, hist: torch.Tensor, w_after: float, b_after: float, params: FitParams
) -> tuple[Chunk, int | None]:
    """The block as arrays, cut at its first non-finite epoch; that epoch, or a bad update's."""
    keep = bad = hist.shape[1]  # bad: the first epoch that is not finite, or whose update is not
    if not math.isfinite(float(hist.abs().amax())):  # NaN propagates through amax
        keep = bad = int((~torch.isfinite(hist).all(dim=0)).nonzero()[0, 0])
    elif not (math.isfinite(w_after) and math.isfinite(b_after)):
        bad = keep - 1  # only the last update overflowed: keep the history, drop the model
    w, b, loss = (_to_array(row[:keep]) for row in hist)
    chunk = Chunk(first, w, b if params.fit_intercept else None, loss, w_after, b_after)
    return chunk, None if bad == hist.shape[1] else first + bad


def history(chunks: Iterable[Chunk]) -> tuple["array[float]", "array[float]", "array[float]"]:
    """A whole fit's w, b and loss columns (b is zeros without an intercept)."""
    w, b, loss = array("d"), array("d"), array("d")
    for chunk in chunks:
        w.extend(chunk.w)
        b.extend(chunk.b if chunk.b is not None else array("d", bytes(8 * len(chunk))))
        loss.extend(chunk.loss)
    return w, b, loss


# -- a fit as a worker runs it: the split, the monitored losses, early stopping, the report -----


def split(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(train x, train y, held-out x, held-out y): ceil(fraction * n) rows held out, chosen by a
    permutation seeded with the fit's seed (a generator of its own: the training draws are the
    same as without a split, given the same number of training rows). Both parts keep the
    rows' order. No split (None, None) when fraction is 0."""
    held = math.ceil(fraction * x.numel())
    if held == 0:
        return x, y, None, None
    gen = torch.Generator().manual_seed(seed ^ SPLIT_SALT)
    perm = torch.randperm(x.numel(), generator=gen)
    val, train = perm[:held].sort().values, perm[held:].sort().values
    return x[train], y[train], x[val], y[val]


SPLIT_SALT = 0x5E1EC7  # the split's generator differs from the training draws'


def quadratic(x: torch.Tensor, y: torch.Tensor) -> Quadratic:
    """The MSE of these rows as a function of (w, b) (schemas.Quadratic), from one pass."""
    mean_x, mean_y = float(x.mean()), float(y.mean())
    dx = x - mean_x
    var_x, var_y = float((dx * dx).mean()), float(((y - mean_y) ** 2).mean())
    w_opt = float((dx * (y - mean_y)).mean()) / var_x if var_x > 0 else 0.0
    b_opt = mean_y - w_opt * mean_x
    return Quadratic(
        w_opt=w_opt,
        b_opt=b_opt,
        loss_opt=mse(x, y, w_opt, b_opt),
        mean_x=mean_x,
        var_x=var_x,
        var_y=var_y,
    )


def losses(q: Quadratic, w: "array[float]", b: "array[float] | None") -> "array[float]":
    """q's MSE at every (w, b) of a chunk, vectorised: O(1) an epoch, never below zero."""
    out = array("d", bytes(8 * len(w)))
    if not len(w):
        return out
    dw = torch.frombuffer(w, dtype=DTYPE) - q.w_opt
    shift = dw * q.mean_x
    shift += (torch.frombuffer(b, dtype=DTYPE) if b is not None else 0.0) - q.b_opt
    spread = dw.mul_(math.sqrt(q.var_x))  # not dw*dw*var_x: inf * 0 is NaN
    loss = torch.frombuffer(out, dtype=DTYPE)
    torch.mul(spread, spread, out=loss).add_(q.loss_opt).addcmul_(shift, shift)
    return out


class _EarlyStop:
    """scikit-learn's rule, an epoch being one update: stop once the monitored loss has not
    improved on the best so far by at least tol for n_iter_no_change epochs in a row."""

    def __init__(self, tol: float, patience: int) -> None:
        self.tol, self.patience = tol, patience
        self.best, self.count = math.inf, 0

    def stop_at(self, monitored: Iterable[float]) -> int | None:
        """The index in this chunk of the epoch after which to stop, or None."""
        for i, loss in enumerate(monitored):
            self.count = self.count + 1 if loss > self.best - self.tol else 0
            self.best = min(self.best, loss)
            if self.count >= self.patience:
                return i
        return None


class Session:
    """One fit: the split, the engine's chunks (with val_loss, cut where it stops early), and
    its report. Both training workers run fits through this."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, params: FitParams) -> None:
        self.x, self.y, self.params = x, y, params
        self.train_x, self.train_y, self.val_x, self.val_y = split(
            x, y, params.validation_fraction, params.seed
        )
        if not bool(self.train_x.any()):
            raise InvalidInput(
                "every x left to train on after holding out validation_fraction is zero, so w "
                "cannot be learned: send more non-zero x or a smaller validation_fraction",
                [
                    {
                        "field": "validation_fraction",
                        "message": "no non-zero x left",
                        "code": "limit",
                    }
                ],
            )
        self.val = None
        if self.val_x is not None and self.val_y is not None:
            self.val = quadratic(self.val_x, self.val_y)
        self.train_q = quadratic(self.train_x, self.train_y)
        self._stop = None if params.tol is None else _EarlyStop(params.tol, params.n_iter_no_change)
        self.last: Chunk | None = None
        self.stopped_early = False
        self.epochs_run = 0

    def chunks(self) -> Iterator[Chunk]:
        """The fit's history chunk by chunk; raises Diverged on NaN/Inf."""
        for chunk in train(self.train_x, self.train_y, self.params):
            val_loss = None if self.val is None else losses(self.val, chunk.w, chunk.b)
            if val_loss is not None and not math.isfinite(max(val_loss, default=0.0)):
                # the model's error on the held-out rows overflows a float: it has diverged
                first = next(i for i, v in enumerate(val_loss) if not math.isfinite(v))
                raise Diverged(chunk.first_epoch + first, self.params.learning_rate)
            chunk = dataclasses.replace(chunk, val_loss=val_loss)
            if self._stop is not None:
                monitored = (
                    val_loss if val_loss is not None else losses(self.train_q, chunk.w, chunk.b)
                )
                at = self._stop.stop_at(monitored)
                if at is not None:
                    chunk = _cut(chunk, at + 1)
                    self.stopped_early = True
            self.last = chunk
            self.epochs_run = chunk.first_epoch + len(chunk)
            yield chunk
            if self.stopped_early:
                return

    def report(self) -> FitReport:
        """The outcome once chunks() is exhausted; raises Diverged unless all of it is finite."""
        assert self.last is not None
        out = result(self.x, self.y, self.last, self.params)
        w, b = out.w, out.b
        # One exact pass over the rows at the end, as `mse` is: no formula at the extremes.
        train_mse = out.mse if self.val is None else mse(self.train_x, self.train_y, w, b)
        val_x, val_y = self.val_x, self.val_y
        val_mse = None if val_x is None or val_y is None else mse(val_x, val_y, w, b)
        if not all(v is None or math.isfinite(v) for v in (train_mse, val_mse)):
            raise Diverged(self.epochs_run, self.params.learning_rate)
        train = self.train_x.numpy(), self.train_y.numpy()
        held_out = None if val_x is None or val_y is None else (val_x.numpy(), val_y.numpy())
        summary, residuals = intervals.summarise(train, held_out, w, b, self.params.fit_intercept)
        return FitReport(
            w=w,
            b=b,
            final_loss=out.final_loss,
            mse=out.mse,
            train_mse=train_mse,
            train_r2=_r2(train_mse, self.train_q),
            val_mse=val_mse,
            val_r2=None if self.val is None or val_mse is None else _r2(val_mse, self.val),
            epochs_run=self.epochs_run,
            stopped_early=self.stopped_early,
            val=self.val,
            intervals=summary,
            residuals=None if residuals is None else residuals.tobytes(),
        )


def _cut(chunk: Chunk, keep: int) -> Chunk:
    """The chunk's first `keep` epochs; the parameters after them are the next epoch's."""
    if keep >= len(chunk):
        return chunk
    return Chunk(
        chunk.first_epoch,
        chunk.w[:keep],
        None if chunk.b is None else chunk.b[:keep],
        chunk.loss[:keep],
        chunk.w[keep],
        0.0 if chunk.b is None else chunk.b[keep],
        None if chunk.val_loss is None else chunk.val_loss[:keep],
    )


def _r2(mse: float, rows: Quadratic) -> float | None:
    """1 - MSE / var(y) on these rows; None where y is constant (undefined) or it overflows."""
    if rows.var_y <= 0:
        return None
    r2 = 1.0 - mse / rows.var_y
    return r2 if math.isfinite(r2) else None


def rel_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """max |a - b| / max |b|: how far trajectory a is from reference b (inf for other lengths)."""
    if len(a) != len(b):
        return math.inf
    scale = max(map(abs, b), default=0.0)
    diff = max((abs(u - v) for u, v in zip(a, b, strict=True)), default=0.0)
    return diff / scale if scale else diff
