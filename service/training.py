"""The fit engine: y = w*x (+ b) by (stochastic) gradient descent, gradients from torch autograd.

Data in, per-epoch w/b/loss and the result out: torch only, no HTTP, no globals. Everything is
float64 so that a fit is reproducible and comparable across engines.

Two engines give the same trajectory. "eager" is the tutorial's loop (forward, loss, backward,
step, once per epoch) and stays as the readable reference. "scan", the default, pays autograd
once instead of every step: the squared loss of a linear model has a gradient that is affine in
theta = (w, b), g_i(theta) = H_i theta + g_i(0), so autograd (torch.func, traced once per process
with make_fx) gives H_i and g_i(0) once per data set (per block's draws above BLOCK_SAMPLES
samples). Every step is then the affine map theta <- theta - lr (mean H theta + mean g(0)) over
its batch, and a block of steps is composed by a parallel prefix scan: log2(block) passes of
vectorised tensor ops give theta before every epoch, and the batch losses follow from it.
"""

import functools
import math
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.dialect.common.cse_pass import CSEPass

from service.errors import Diverged

DTYPE = torch.float64
# Epochs are processed in blocks: indices for a whole block are drawn at once (so every engine
# consumes the generator identically) and cancellation is checked between blocks.
MAX_BLOCK_EPOCHS = 4096
BLOCK_SAMPLES = 1 << 16
# Within a factor of ~1e8 of overflow the scan hands a block over to the eager loop: there only
# the reference can say at which epoch a value stops being finite (the eager loss overflows
# when its batch's sum of squares does). Rounding is scale-free below it, and no fit of valid
# data comes near it unless it diverges.
SAFE_MAGNITUDE = 1e300

Engine = Literal["scan", "eager"]
ENGINES: tuple[Engine, ...] = ("scan", "eager")


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
    """A fit's outcome: every number finite, or result() raised Diverged."""

    w: float
    b: float
    final_loss: float
    mse: float


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


def prepare() -> dict[str, str | float]:
    """One-off, per-process engine set-up (trace, warm up, self-check); returns what it did."""
    started = time.perf_counter()
    for intercept in (False, True):
        _derivatives(intercept)
    traced = time.perf_counter()
    # The first run of each code path pays torch's one-off dispatch costs: pay them here, and
    # check the scan against the reference on the way.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=gen, dtype=DTYPE)
    y = 3 * x + 1 + 0.1 * torch.randn(64, generator=gen, dtype=DTYPE)
    worst = 0.0
    for batch_size in (1, 8, None):
        for intercept in (False, True):
            params = FitParams(300, 0.05, 0.5, batch_size, intercept, seed=1)
            fast, ref = history(train(x, y, params)), history(train(x, y, params, "eager"))
            worst = max(worst, *(rel_diff(a, b) for a, b in zip(fast, ref, strict=True)))
    return {
        "engine": "scan",
        "trace_seconds": round(traced - started, 3),
        "warmup_seconds": round(time.perf_counter() - traced, 3),
        "self_check_rel_diff": worst,  # scan against eager on a small fit: about 1e-15
    }


def train(
    x: torch.Tensor, y: torch.Tensor, params: FitParams, engine: Engine = "scan"
) -> Iterator[Chunk]:
    """Run the fit block by block; yields each block's history, raises Diverged on NaN/Inf."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {ENGINES}")
    n = x.numel()
    gen = torch.Generator().manual_seed(params.seed)
    scan = _Scan(x, y, params) if engine == "scan" else None
    block = block_epochs(n, params.batch_size)
    if scan is not None and params.batch_size is None:
        block = MAX_BLOCK_EPOCHS  # a full-batch epoch of the scan costs O(1), not O(n)
    w = torch.tensor(params.init_w, dtype=DTYPE, requires_grad=True)
    b = torch.tensor(0.0, dtype=DTYPE, requires_grad=params.fit_intercept)
    for first in range(0, params.epochs, block):
        size = min(block, params.epochs - first)
        idx = None
        if params.batch_size is not None:
            idx = torch.randint(n, (size, params.batch_size), generator=gen)
        hist = torch.empty(3, size, dtype=DTYPE)  # rows: w, b before each update; batch loss
        if scan is None:
            _eager_block(x, y, idx, hist, 0, w, b, params)
        else:
            scan.block(idx, hist, w, b)
        chunk, bad = _to_chunk(first, hist, w, b, params)
        if len(chunk):
            yield chunk
        if bad is not None:
            raise Diverged(bad, params.learning_rate)


# -- the eager reference --------------------------------------------------------------------


def _eager_block(
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor | None,
    hist: torch.Tensor,
    start: int,
    w: torch.Tensor,
    b: torch.Tensor,
    params: FitParams,
) -> None:
    """The tutorial's loop from epoch `start` of a block: forward, loss, backward, step.

    w and b are updated in place. It stops at the first non-finite loss (a non-finite w or b
    makes the loss non-finite too): that epoch and the rest of the block are cut anyway.
    """
    lr = params.learning_rate
    for e in range(start, hist.shape[1]):
        xb, yb = (x, y) if idx is None else (x[idx[e]], y[idx[e]])
        loss = ((w * xb + b - yb) ** 2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            hist[0, e] = w
            hist[1, e] = b
            hist[2, e] = loss
            assert w.grad is not None
            w -= lr * w.grad
            w.grad.zero_()
            if b.grad is not None:
                b -= lr * b.grad
                b.grad.zero_()
        if not math.isfinite(loss.item()):
            return


# -- the scan engine ------------------------------------------------------------------------


def _sample_loss(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return (w * x + b - y) ** 2


def _sample_derivatives(
    x: torch.Tensor, y: torch.Tensor, intercept: bool
) -> tuple[torch.Tensor, ...]:
    """Per sample, by autograd at theta = 0: (h_ww, g_w) or (h_ww, h_wb, h_bb, g_w, g_b).

    w and b hold one copy per sample, so each sample's loss depends on its own copies only: a
    vector-Jacobian product with ones gives every per-sample gradient at once, and one more
    gives every per-sample Hessian entry.
    """
    w, b, ones = torch.zeros_like(x), torch.zeros_like(x), torch.ones_like(x)

    def grads(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pull = torch.func.vjp(lambda w, b: _sample_loss(w, b, x, y), w, b)[1]
        g_w, g_b = pull(ones)
        return g_w, g_b

    g_w, g_b = grads(w, b)
    h_ww, h_wb = torch.func.vjp(lambda w, b: grads(w, b)[0], w, b)[1](ones)
    if not intercept:
        return h_ww, g_w
    (h_bb,) = torch.func.vjp(lambda b: grads(w, b)[1], b)[1](ones)
    return h_ww, h_wb, h_bb, g_w, g_b


Derivatives = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


@functools.cache
def _derivatives(intercept: bool) -> Derivatives:
    """_sample_derivatives traced once per process into a graph of plain aten ops.

    The trace runs torch.func's transforms once; a call then costs only the graph's elementwise
    ops, after the repeats and the multiplications by one that the transforms leave are gone.
    Every shape in it comes from the input's (zeros_like, ones_like), so one graph serves any
    number of samples.
    """
    example = torch.linspace(1.0, 2.0, 5, dtype=DTYPE)
    derive = functools.partial(_sample_derivatives, intercept=intercept)
    graph = make_fx(derive)(example, example + 1)
    deduplicated = CSEPass()(graph)  # the transforms repeat the forward pass
    assert deduplicated is not None
    graph = deduplicated.graph_module
    _fold_identities(graph.graph)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return cast(Derivatives, graph)


def _fold_identities(graph: torch.fx.Graph) -> None:
    """Drop the ops that the expansion at theta = 0 makes identities: a * 1, a ** 1, 0 * a...

    Each rewrite gives the same values (up to the sign of a zero) for finite inputs, and every
    tensor in the graph has the input's shape, so an operand of ones can simply be dropped.
    """
    aten = torch.ops.aten
    ones = next((n for n in graph.nodes if n.target == aten.ones_like.default), None)

    def kind(arg: object) -> str:
        if isinstance(arg, torch.fx.Node):
            if arg.target == aten.ones_like.default:
                return "one"
            return "zero" if arg.target == aten.zeros_like.default else "tensor"
        if isinstance(arg, float) and arg in (0.0, 1.0):
            return "one" if arg == 1.0 else "zero"
        return "other"

    for node in list(graph.nodes):
        if node.op != "call_function" or len(node.args) != 2:
            continue
        a, b = node.args
        kinds = (kind(a), kind(b))
        same: object = None
        if node.target in (aten.mul.Tensor, aten.mul.Scalar):
            if kinds[1] == "one":
                same = a
            elif kinds[0] == "one":
                same = b
            elif "zero" in kinds and isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
                same = a if kinds[0] == "zero" else b
        elif node.target == aten.add.Tensor and "zero" in kinds:
            same = b if kinds[0] == "zero" else a
        elif node.target == aten.sub.Tensor and kinds[0] == "zero":
            with graph.inserting_before(node):
                same = graph.call_function(aten.neg.default, (b,))
        elif node.target == aten.pow.Tensor_Scalar and kinds[1] == "one":
            same = a
        elif node.target == aten.pow.Tensor_Scalar and kinds[1] == "zero" and ones is not None:
            same = ones
        if isinstance(same, torch.fx.Node):
            node.replace_all_uses_with(same)


class _Scan:
    """A fit's SGD steps as affine maps, composed a block at a time.

    Step t is theta <- theta + D_t theta + C_t with D_t = -lr mean(H) and C_t = -lr mean(g(0))
    over its batch. A map is stored as the p x (p+1) matrix [D | C], p = 1 (w) or 2 (w, b), one
    step per column along the last axis.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, params: FitParams) -> None:
        self.x, self.y, self.params = x, y, params
        self.p = 2 if params.fit_intercept else 1
        self.derive = _derivatives(params.fit_intercept)
        self.table: torch.Tensor | None = None
        batch = x.numel() if params.batch_size is None else params.batch_size
        limits = [SAFE_MAGNITUDE, SAFE_MAGNITUDE, SAFE_MAGNITUDE / batch]
        self.limits = torch.tensor(limits, dtype=DTYPE)
        if params.batch_size is None:
            self._full_batch_setup()
        elif x.numel() <= BLOCK_SAMPLES:  # once per data set; larger ones derive per block
            self.table = self._terms(x, y)

    def _terms(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample rows: the map [D | C] (p x (p+1) rows, flattened), then x and y."""
        lr = self.params.learning_rate
        parts = self.derive(x, y)
        if self.p == 1:
            h_ww, g_w = parts
            rows = [h_ww, g_w]
        else:
            h_ww, h_wb, h_bb, g_w, g_b = parts
            rows = [h_ww, h_wb, g_w, h_wb, h_bb, g_b]
        return torch.cat([torch.stack(rows).mul_(-lr), torch.stack([x, y])])

    def _full_batch_setup(self) -> None:
        """Full batch: one map for every epoch, and the loss as a quadratic in theta."""
        x, y, lr = self.x, self.y, self.params.learning_rate
        means = [float(t.mean()) for t in self.derive(x, y)]
        if self.p == 2:
            h_ww, h_wb, h_bb, g_w, g_b = means
            hessian = torch.tensor([[h_ww, h_wb], [h_wb, h_bb]], dtype=DTYPE)
            grad0 = torch.tensor([[g_w], [g_b]], dtype=DTYPE)
            opt = torch.linalg.lstsq(hessian, -grad0).solution
            w_opt, b_opt = float(opt[0, 0]), float(opt[1, 0])
            self.map = torch.cat([hessian, grad0], dim=1).mul_(-lr)
        else:
            h_ww, g_w = means
            w_opt, b_opt = (-g_w / h_ww if h_ww > 0 else 0.0), 0.0
            self.map = torch.tensor([[h_ww, g_w]], dtype=DTYPE).mul_(-lr)
        # The loss around the least-squares optimum, as sums of squares (see _quadratic_loss).
        self.opt = (w_opt, b_opt)
        self.loss_opt = mse(x, y, w_opt, b_opt)
        self.mean_x = float(x.mean())
        spread = x - self.mean_x if self.p == 2 else x  # about the mean with b, about 0 without
        self.spread_x = float((spread * spread).mean())

    def block(
        self, idx: torch.Tensor | None, hist: torch.Tensor, w: torch.Tensor, b: torch.Tensor
    ) -> None:
        """Fill a block's history starting from (w, b), and leave them after its last update."""
        p, size = self.p, hist.shape[1]
        if idx is None:
            maps = self.map[..., None].expand(p, p + 1, size).clone()
        else:
            flat = idx.flatten()
            if self.table is not None:
                terms = self.table.index_select(1, flat).view(-1, *idx.shape)
            else:
                xb, yb = self.x.index_select(0, flat), self.y.index_select(0, flat)
                terms = self._terms(xb.view(idx.shape), yb.view(idx.shape))
            maps = (terms[:-2, :, 0] if idx.shape[1] == 1 else terms[:-2].mean(dim=2)).view(
                p, p + 1, size
            )
        maps = _compose(maps)
        theta0 = [float(w.detach()), float(b.detach())][:p]
        # theta after each update: theta_0 + D theta_0 + C
        after = maps[:, p].clone()
        for m in range(p):
            after.add_(maps[:, m], alpha=theta0[m])
        after.add_(torch.tensor(theta0, dtype=DTYPE)[:, None])
        hist[:p, 0] = torch.tensor(theta0, dtype=DTYPE)
        hist[:p, 1:] = after[:, :-1]
        if p == 1:
            hist[1].zero_()
        if idx is None:
            self._quadratic_loss(hist)
        else:
            xb, yb = terms[-2], terms[-1]
            fitted = hist[0, :, None] * xb
            if p == 2:
                fitted += hist[1, :, None]
            if idx.shape[1] == 1:
                torch.pow((fitted - yb)[:, 0], 2, out=hist[2])
            else:
                torch.mean((fitted - yb) ** 2, dim=1, out=hist[2])
        with torch.no_grad():
            w.copy_(after[0, -1])
            if p == 2:
                b.copy_(after[1, -1])
        self._hand_over_near_overflow(idx, hist, w, b)

    def _quadratic_loss(self, hist: torch.Tensor) -> None:
        """Full-batch loss at every epoch, in O(1) an epoch and never below zero.

        With d = theta - theta* (theta* the least-squares optimum, where the residuals r* are
        orthogonal to x and to 1), mean((r* + dw x + db)^2) = L* + mean((dw x + db)^2), and
        mean((dw x + db)^2) = (dw mean(x) + db)^2 + dw^2 var(x): three non-negative terms. The
        expansion L* + g*.d + d'Hd/2 that stood here cancelled near convergence, and rounding
        made losses of exactly linear data negative.
        """
        dw = hist[0] - self.opt[0]
        loss = torch.mul(dw, dw, out=hist[2]).mul_(self.spread_x)
        if self.p == 2:
            shift = (hist[1] - self.opt[1]).add_(dw, alpha=self.mean_x)
            loss.addcmul_(shift, shift)
        loss.add_(self.loss_opt)

    def _hand_over_near_overflow(
        self, idx: torch.Tensor | None, hist: torch.Tensor, w: torch.Tensor, b: torch.Tensor
    ) -> None:
        """Redo a block eagerly from the epoch before the first value near overflow.

        Near overflow: |w|, |b| or the batch's sum of squared errors past SAFE_MAGNITUDE.
        Fits of valid data that converge never get there, so the normal path costs one check.
        """
        limits = self.limits[:, None]
        peak = hist.abs().amax(dim=1)  # NaN propagates, and fails the test below
        after = abs(float(w.detach())) + abs(float(b.detach()))
        if bool((peak <= self.limits).all()) and after <= SAFE_MAGNITUDE:
            return
        unsafe = ~(hist.abs() <= limits).all(dim=0)
        first = int(unsafe.nonzero()[0, 0]) if bool(unsafe.any()) else hist.shape[1]
        start = max(0, first - 1)
        with torch.no_grad():
            w.copy_(hist[0, start])
            b.copy_(hist[1, start])
        _eager_block(self.x, self.y, idx, hist, start, w, b, self.params)


def _compose(maps: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix composition of affine maps [D | C] (p x (p+1), one per column).

    Column t of the result maps theta_0 to theta after step t: theta_0 + D theta_0 + C.
    Step 1 then step 2 compose to D = D1 + D2 + D2 D1 and C = C1 + C2 + D2 C1, that is
    [D | C] = [D2 | C2] + [D1 | C1] + D2 [D1 | C1]; keeping I + D as D loses nothing when
    lr * H is small. Hillis-Steele: log2(size) passes, pass k folding in the span that ends k
    steps earlier. The input is overwritten.
    """
    p, size = maps.shape[0], maps.shape[-1]
    spare = torch.empty_like(maps)
    k = 1
    while k < size:
        later, earlier, out = maps[..., k:], maps[..., :-k], spare[..., k:]
        spare[..., :k] = maps[..., :k]
        torch.add(later, earlier, out=out)
        for m in range(p):
            out.addcmul_(later[:, m : m + 1], earlier[m : m + 1])
        maps, spare = spare, maps
        k *= 2
    return maps


# -- shared ---------------------------------------------------------------------------------


def _to_array(t: torch.Tensor) -> "array[float]":
    """A tensor's values as array('d'), copied straight into the array's buffer."""
    out = array("d", bytes(8 * t.numel()))
    if t.numel():
        torch.frombuffer(out, dtype=DTYPE).copy_(t)
    return out


def _to_chunk(
    first: int, hist: torch.Tensor, w: torch.Tensor, b: torch.Tensor, params: FitParams
) -> tuple[Chunk, int | None]:
    """A block as plain arrays, cut before the first non-finite epoch (returned too, if any)."""
    w_after, b_after = float(w.detach()), float(b.detach())
    bad: int | None = None
    keep = hist.shape[1]
    if not math.isfinite(float(hist.abs().amax())):  # NaN propagates through amax
        finite = torch.isfinite(hist).all(dim=0)
        bad = keep = int((~finite).nonzero()[0, 0])
    elif not (math.isfinite(w_after) and math.isfinite(b_after)):
        bad = keep - 1  # only the last update overflowed: keep the history, drop the model
    chunk = Chunk(
        first_epoch=first,
        w=_to_array(hist[0, :keep]),
        b=_to_array(hist[1, :keep]) if params.fit_intercept else None,
        loss=_to_array(hist[2, :keep]),
        w_after=w_after,
        b_after=b_after,
    )
    return chunk, None if bad is None else first + bad


def history(chunks: Iterable[Chunk]) -> tuple["array[float]", "array[float]", "array[float]"]:
    """A whole fit's w, b and loss columns (b is zeros without an intercept)."""
    w, b, loss = array("d"), array("d"), array("d")
    for chunk in chunks:
        w.extend(chunk.w)
        b.extend(chunk.b if chunk.b is not None else array("d", bytes(8 * len(chunk))))
        loss.extend(chunk.loss)
    return w, b, loss


def rel_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """max |a - b| / max |b|: how far trajectory a is from reference b (inf for other lengths)."""
    if len(a) != len(b):
        return math.inf
    scale = max(map(abs, b), default=0.0)
    diff = max((abs(u - v) for u, v in zip(a, b, strict=True)), default=0.0)
    return diff / scale if scale else diff
