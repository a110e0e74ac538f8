"""The tutorial's figure: loss, then the parameters, over a shared epoch axis (matplotlib)."""

import io
import math
from typing import TYPE_CHECKING

from service.core.schemas import History

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# A log axis draws losses within these bounds: matplotlib's log ticks overflow a float well
# before the largest float, and a loss of exactly 0 has no logarithm (see _log_losses).
LOG_FLOOR, LOG_CEILING = 1e-100, 1e100
# A linear axis draws values within ±this: its limits and ticks overflow a float beyond.
LINEAR_CEILING = 1e300


def render_history(history: History, image_format: str, log: bool = False) -> bytes:
    """Draw loss, then the parameters, over a shared epoch axis; matplotlib loads only here."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text: smaller, searchable
    from matplotlib.figure import Figure  # an object per call: no pyplot global state
    from matplotlib.ticker import StrMethodFormatter

    fig = Figure(figsize=(7, 5.5), dpi=100)
    # Fixed margins: a layout engine would measure every tick label and double the drawing time.
    fig.subplots_adjust(left=0.11, right=0.97, top=0.89, bottom=0.1, hspace=0.28)
    loss_ax, param_ax = fig.subplots(2, 1, sharex=True)
    model = "y = w·x + b" if history.b is not None else "y = w·x"
    fig.suptitle(f"SGD fit of {model}: job {history.job_id[:8]} ({history.status.value})")

    loss_ax.set_title("Loss per epoch")
    columns = {"loss": history.loss}
    if history.val_loss is not None:  # a fit with a split: the held-out rows' MSE too
        columns["held-out loss"] = history.val_loss
    if log and history.loss:
        columns, note = _log_losses(loss_ax, columns)
        loss_ax.set_ylabel("loss (batch MSE, log scale)")
        if note:
            loss_ax.text(0.99, 0.96, note, ha="right", va="top", transform=loss_ax.transAxes)
    else:
        columns, note = _linear(loss_ax, columns)
        loss_ax.set_ylabel("loss (batch MSE)")
        if note:
            loss_ax.text(
                0.99, 0.96, "losses: " + note, ha="right", va="top", transform=loss_ax.transAxes
            )
    for (label, values), color in zip(columns.items(), ("tab:red", "tab:purple"), strict=False):
        loss_ax.plot(history.epoch, values, color=color, linewidth=1.2, label=label)
    if len(columns) > 1:
        loss_ax.legend(loc="upper right")

    params = {"w": history.w} if history.b is None else {"w": history.w, "b": history.b}
    params, note = _linear(param_ax, params)
    for (label, values), color in zip(params.items(), ("tab:blue", "tab:green"), strict=False):
        param_ax.plot(history.epoch, values, color=color, linewidth=1.2, label=label)
    if note:
        param_ax.text(0.99, 0.04, note, ha="right", va="bottom", transform=param_ax.transAxes)
    param_ax.legend(loc="best")
    param_ax.set_title("Parameters per epoch (before each update)")
    param_ax.set_ylabel("value")
    thinned = f"; one point every {history.stride} shown" if history.stride > 1 else ""
    param_ax.set_xlabel(f"epoch ({history.total_epochs:,} epochs{thinned})")
    param_ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))  # 1,000,000, not 1e6
    if not history.epoch:
        loss_ax.text(0.5, 0.5, "no epochs recorded yet", ha="center", transform=loss_ax.transAxes)
    for ax in (loss_ax, param_ax):
        ax.grid(alpha=0.3)

    out = io.BytesIO()
    fig.savefig(out, format=image_format)
    return out.getvalue()


def _linear(ax: "Axes", columns: dict[str, list[float]]) -> tuple[dict[str, list[float]], str]:
    """Fit `ax`'s linear scale to the columns; the columns to draw, and a note on the values
    moved to fit it. A fit that diverged records values up to the largest float, and
    matplotlib's own limits and ticks for those overflow (a 500 for the plot of such a job):
    the limits are set here, with values beyond LINEAR_CEILING drawn at it."""
    every = [v for values in columns.values() for v in values]
    if not every:
        return columns, ""
    drawn = {
        k: [min(max(v, -LINEAR_CEILING), LINEAR_CEILING) for v in vs] for k, vs in columns.items()
    }
    low = max(min(min(vs) for vs in drawn.values() if vs), -LINEAR_CEILING)
    high = min(max(max(vs) for vs in drawn.values() if vs), LINEAR_CEILING)
    margin = 0.05 * (high - low) if high > low else max(0.05 * abs(high), 1.0)
    ax.set_ylim(low - margin, high + margin)
    huge = sum(abs(v) > LINEAR_CEILING for v in every)
    return drawn, f"{huge:,} beyond ±{LINEAR_CEILING:g} drawn there" if huge else ""


def _log_losses(ax: "Axes", columns: dict[str, list[float]]) -> tuple[dict[str, list[float]], str]:
    """Put `ax` on a log scale fitted to the loss columns; the columns to draw, and a note on
    the losses moved to fit it.

    A loss of exactly 0 (a perfect fit) is drawn at the smallest positive loss, and the note
    says how many there are: symlog would keep 0 on the axis, but its linear band squeezes
    the decades just above 0 into a sliver. The limits are set before anything is drawn:
    matplotlib's own margins would overflow a float for losses near its extremes.
    """
    every = [v for values in columns.values() for v in values]
    positive = [v for v in every if v > 0]
    floor = min(max(min(positive, default=1.0), LOG_FLOOR), LOG_CEILING)
    drawn = {k: [min(max(v, floor), LOG_CEILING) for v in vs] for k, vs in columns.items()}
    low, high = math.log10(floor), math.log10(max(v for vs in drawn.values() for v in vs))
    margin = 0.05 * max(high - low, 1.0)
    ax.set_yscale("log")
    ax.set_ylim(10.0 ** (low - margin), 10.0 ** (high + margin))
    zeros = sum(v == 0 for v in every)
    tiny = sum(0 < v < floor for v in every)  # only when some loss is below LOG_FLOOR
    huge = sum(v > LOG_CEILING for v in every)
    notes = []
    if zeros:
        notes.append(f"{zeros:,} of 0 drawn at {floor:.3g}")
    if tiny:
        notes.append(f"{tiny:,} below {LOG_FLOOR:g} drawn there")
    if huge:
        notes.append(f"{huge:,} above {LOG_CEILING:g} drawn there")
    return drawn, ("losses: " + "; ".join(notes)) if notes else ""
