"""The fit engine: y = w*x (+ b) by (stochastic) gradient descent, gradients from torch autograd.

Data in, per-epoch w/b/loss and the result out: torch only, no HTTP, no globals. Everything is
float64 so that a fit is reproducible and comparable across engines.
"""

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from service.errors import Diverged

DTYPE = torch.float64
# Epochs are processed in blocks: indices for a whole block are drawn at once (so every engine
# consumes the generator identically) and cancellation is checked between blocks.
MAX_BLOCK_EPOCHS = 4096
BLOCK_SAMPLES = 1 << 16


@dataclass(frozen=True)
class FitParams:
    """Hyper-parameters of one fit; the defaults are the tutorial's."""

    epochs: int = 100
    learning_rate: float = 0.01
    init_w: float = 1.0
    batch_size: int | None = 1  # None: the whole data set every epoch (full-batch GD)
    fit_intercept: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Chunk:
    """Consecutive epochs of a fit: parameters before each update and that epoch's batch loss."""

    first_epoch: int
    w: array  # type: ignore[type-arg]  # array('d')
    b: array | None  # type: ignore[type-arg]
    loss: array  # type: ignore[type-arg]
    w_after: float  # parameters after the chunk's last update
    b_after: float

    def __len__(self) -> int:
        return len(self.w)


@dataclass(frozen=True)
class FitResult:
    w: float
    b: float
    final_loss: float
    mse: float
    epochs: int


def block_epochs(n_samples: int, batch_size: int | None) -> int:
    """How many epochs one block holds: about BLOCK_SAMPLES sample-steps of work."""
    per_epoch = n_samples if batch_size is None else batch_size
    return max(1, min(MAX_BLOCK_EPOCHS, BLOCK_SAMPLES // per_epoch))


def as_tensor(values: bytes | array | list[float]) -> torch.Tensor:  # type: ignore[type-arg]
    """A float64 tensor from raw float64 bytes, an array('d') or a list of floats."""
    if isinstance(values, bytes | bytearray):
        return torch.frombuffer(bytearray(values), dtype=DTYPE)
    return torch.tensor(values, dtype=DTYPE)


def mse(x: torch.Tensor, y: torch.Tensor, w: float, b: float) -> float:
    """Mean squared error of y = w*x + b on the whole data set."""
    return float(torch.mean((x * w + b - y) ** 2))


def prepare() -> dict[str, str | float]:
    """One-off, per-process engine set-up; returns what it did, for the start-up log."""
    return {"engine": "eager"}


def train(x: torch.Tensor, y: torch.Tensor, params: FitParams) -> Iterator[Chunk]:
    """Run the fit block by block; yields each block's history, raises Diverged on NaN/Inf."""
    n = x.numel()
    gen = torch.Generator().manual_seed(params.seed)
    block = block_epochs(n, params.batch_size)
    w = torch.tensor(params.init_w, dtype=DTYPE, requires_grad=True)
    b = torch.tensor(0.0, dtype=DTYPE, requires_grad=params.fit_intercept)
    for first in range(0, params.epochs, block):
        size = min(block, params.epochs - first)
        idx = None
        if params.batch_size is not None:
            idx = torch.randint(n, (size, params.batch_size), generator=gen)
        w_hist, b_hist, loss_hist = _eager_block(x, y, idx, size, w, b, params)
        chunk, bad = _to_chunk(first, w_hist, b_hist, loss_hist, w, b, params)
        if len(chunk):
            yield chunk
        if bad is not None:
            raise Diverged(bad, params.learning_rate)


def _eager_block(
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor | None,
    size: int,
    w: torch.Tensor,
    b: torch.Tensor,
    params: FitParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tutorial's loop: forward, loss, backward, step; w and loss recorded every epoch."""
    w_hist = torch.empty(size, dtype=DTYPE)
    b_hist = torch.empty(size, dtype=DTYPE)
    loss_hist = torch.empty(size, dtype=DTYPE)
    lr = params.learning_rate
    for e in range(size):
        xb, yb = (x, y) if idx is None else (x[idx[e]], y[idx[e]])
        loss = ((w * xb + b - yb) ** 2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            w_hist[e] = w
            b_hist[e] = b
            loss_hist[e] = loss
            assert w.grad is not None
            w -= lr * w.grad
            w.grad.zero_()
            if b.grad is not None:
                b -= lr * b.grad
                b.grad.zero_()
    return w_hist, b_hist, loss_hist


def _to_chunk(
    first: int,
    w_hist: torch.Tensor,
    b_hist: torch.Tensor,
    loss_hist: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    params: FitParams,
) -> tuple[Chunk, int | None]:
    """A block as plain arrays, cut before the first non-finite epoch (returned too, if any)."""
    w_after, b_after = float(w.detach()), float(b.detach())
    finite = torch.isfinite(w_hist) & torch.isfinite(b_hist) & torch.isfinite(loss_hist)
    bad: int | None = None
    keep = len(w_hist)
    if not bool(finite.all()):
        bad = keep = int((~finite).nonzero()[0, 0])
    elif not (math.isfinite(w_after) and math.isfinite(b_after)):
        bad = keep - 1  # only the last update overflowed: keep the history, drop the model
    chunk = Chunk(
        first_epoch=first,
        w=array("d", w_hist[:keep].tolist()),
        b=array("d", b_hist[:keep].tolist()) if params.fit_intercept else None,
        loss=array("d", loss_hist[:keep].tolist()),
        w_after=w_after,
        b_after=b_after,
    )
    return chunk, None if bad is None else first + bad
