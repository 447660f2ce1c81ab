"""The report's charts, rendered to PNG bytes on matplotlib's Agg canvas (no global backend change).

Every chart draws its runs against one shared x axis and records which ``metrics.jsonl`` keys it
drew (:attr:`Chart.metrics`), so the page can name them under the chart.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..metrics import member
from .read import EVAL_KEY, Run, ema, human, median, percent, smoothing_weight, target_shares

_STYLE = {
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "font.size": 9.5,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.titlepad": 8,
    "axes.labelsize": 9.5,
    "axes.labelcolor": "#333333",
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "legend.fontsize": 8.5,
    "legend.frameon": True,
    "legend.framealpha": 0.85,
    "legend.edgecolor": "#dddddd",
    "lines.solid_capstyle": "round",
}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
COLORS += ["#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_DASHES = ["-", "--", ":", "-."]
DPI = 110
PER_DEVICE = "tokens_per_sec_per_device"


@dataclass
class Chart:
    key: str  # file suffix: report_<key>.png
    title: str
    png: bytes
    caption: str
    metrics: list[str] = field(default_factory=list)  # the metrics.jsonl keys it draws


class Axis:
    """The shared x axis of every chart: tokens seen when every run logs them, else steps."""

    def __init__(self, runs: list[Run]):
        with_train = [r for r in runs if r.train]
        self.tokens = bool(with_train) and all(r.series("tokens_seen")[0] for r in with_train)
        self.label = "tokens seen" if self.tokens else "optimizer step"

    def x(self, run: Run, steps: Sequence[int]) -> list[float]:
        return run.tokens_at(steps) if self.tokens else [float(s) for s in steps]

    def format(self, ax) -> None:
        from matplotlib.ticker import MaxNLocator

        ax.set_xlabel(self.label)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=7, integer=not self.tokens))
        if self.tokens:
            ax.xaxis.set_major_formatter(_human_ticks())
        # From 0 (the start of the run) to the last point, with room for markers at both ends;
        # a single point or none at all still gets a sensible range.
        right = ax.dataLim.x1
        right = right if math.isfinite(right) and right > 0 else 1.0
        ax.set_xlim(-0.02 * right, 1.02 * right)


def _human_ticks():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: human(v))


class _Plot:
    """One figure of one to two panels, and the metrics drawn on it."""

    def __init__(self, runs: list[Run], axis: Axis, panels: int):
        from matplotlib.figure import Figure

        self.runs, self.axis, self.multi, self.drawn = runs, axis, len(runs) > 1, []
        width, height = (6.4 * panels if panels > 1 else 8.0), 4.0
        self.fig = Figure(figsize=(width, height), dpi=DPI)
        # Fixed margins in inches (tick labels are short by construction: 12K, 3.5, 1e-5), which
        # costs nothing, where tight_layout would measure every text twice.
        self.fig.subplots_adjust(
            left=0.8 / width,
            right=1 - 0.25 / width,
            bottom=0.6 / height,
            top=1 - 0.55 / height,
            wspace=0.9 / 6.4 * panels / 2 if panels > 1 else 0.2,
        )
        self.axes = list(self.fig.subplots(1, panels, squeeze=False)[0])

    def line(self, ax, run: Run, key: str, transform=None, **kw: Any) -> list[float]:
        """Plot ``key`` of ``run``; markers when too few points to read as a line."""
        steps, values = run.series(key, "eval" if key.startswith("eval_") else "train")
        if not steps:
            return []
        values = transform(values) if transform else values
        if len(steps) <= 3 and "marker" not in kw:
            kw.update(marker="o", markersize=4)
        ax.plot(self.axis.x(run, steps), values, **kw)
        if key not in self.drawn:
            self.drawn.append(key)
        return values

    def smoothed(self, ax, run: Run, key: str, color: str, label: str) -> None:
        """Raw values thin and pale, their EMA bold; too few points for an EMA: the values."""
        w = smoothing_weight(len(run.series(key)[1]))
        if w == 0:
            self.line(ax, run, key, color=color, linewidth=1.6, label=label)
            return
        self.line(ax, run, key, color=color, linewidth=0.8, alpha=0.3)
        label += "" if self.multi else " (EMA; raw in pale)"
        self.line(ax, run, key, lambda v: ema(v, w), color=color, linewidth=2.0, label=label)

    def by_source(self, ax, prefix: str, transform=None, targets: bool = False) -> None:
        """One line per ``<prefix><source>`` key: coloured by source for one run, by run (and
        dashed by source) for several; ``targets`` adds each source's target share, dotted."""
        keys = sorted({k for r in self.runs for k in r.keys(prefix)})
        for i, run in enumerate(self.runs):
            shares = target_shares(run) if targets else {}
            for j, key in enumerate(keys):
                src, color = member(key), _color(i if self.multi else j)
                style = _DASHES[j % 4] if self.multi else "-"
                kw = dict(color=color, linewidth=1.5, linestyle=style)
                if prefix.startswith("eval_"):
                    kw.update(marker=_MARKERS[j % len(_MARKERS)], markersize=5)
                label = f"{run.name}: {src}" if self.multi else src
                if src in shares:
                    label += f" (target {100 * shares[src]:.0f}%)"
                    ax.axhline(100 * shares[src], color=color, linestyle=":", linewidth=1.0)
                self.line(ax, run, key, transform, label=label, **kw)

    def panel(self, ax, title: str, ylabel: str, legend="best", zero=False, empty="") -> None:
        """Title, labels and axes of a panel; ``empty``: what to say when nothing was drawn."""
        if empty and not ax.has_data():
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="#888")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            return
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if zero:  # y from 0 to a little above the highest point (flat or one-point curves too)
            top = ax.dataLim.y1
            ax.set_ylim(0, top * 1.12 if math.isfinite(top) and top > 0 else 1.0)
        self.axis.format(ax)
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(loc=legend)

    def chart(self, key: str, title: str, caption: str) -> Chart:
        names = " vs ".join(r.name for r in self.runs)
        if len(names) > 120:
            names = names[:117] + "..."
        run_s = "run: " if len(self.runs) == 1 else "runs: "
        self.fig.text(0.01, 0.985, run_s + names, ha="left", va="top", fontsize=9, color="#666")
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
        return Chart(key, title, buf.getvalue(), caption, self.drawn)


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _loss_chart(runs: list[Run], axis: Axis) -> Chart:
    with_sources = any(r.keys(EVAL_KEY + "/") for r in runs)
    p = _Plot(runs, axis, 2 if with_sources else 1)
    ax = p.axes[0]
    evals = dict(linestyle="--", linewidth=1.3, marker="o", markersize=5)
    evals.update(markerfacecolor="white", markeredgewidth=1.5)
    for i, run in enumerate(runs):
        p.smoothed(ax, run, "loss", _color(i), f"{run.name}: train" if p.multi else "train loss")
        label = f"{run.name}: eval" if p.multi else "eval loss"
        p.line(ax, run, EVAL_KEY, color=_color(i), label=label, **evals)
    title = "Loss" + (" (train: EMA, raw in pale)" if p.multi else "")
    p.panel(ax, title, "loss (nats/token)", "upper right", empty="no loss logged")
    if with_sources:
        p.by_source(p.axes[1], EVAL_KEY + "/")
        p.panel(p.axes[1], "Eval loss by source", "eval loss")
    return p.chart(
        "loss",
        "Loss",
        "Training loss (thick: exponential moving average; pale: as logged) and eval loss against "
        f"{axis.label}. Lower is better."
        + (" Right: eval loss of each eval source." if with_sources else ""),
    )


def _lr_chart(runs: list[Run], axis: Axis) -> Chart:
    with_gn = any(r.series("grad_norm")[0] for r in runs)
    p = _Plot(runs, axis, 2 if with_gn else 1)
    ax = p.axes[0]
    for i, run in enumerate(runs):
        label = run.name if p.multi else "learning rate"
        p.line(ax, run, "lr", color=_color(i), linewidth=1.8, label=label)
    if ax.has_data():
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
    legend = "best" if p.multi else None
    p.panel(ax, "Learning-rate schedule", "learning rate", legend, True, "no learning rate logged")
    if with_gn:
        ax = p.axes[1]
        for i, run in enumerate(runs):
            p.smoothed(ax, run, "grad_norm", _color(i), run.name if p.multi else "gradient norm")
        values = [v for r in runs for v in r.series("grad_norm")[1]]
        if min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")
        p.panel(ax, "Gradient norm (before clipping)", "global L2 norm")
    return p.chart(
        "lr",
        "Learning rate and gradient norm",
        "The learning rate each step used (warmup, then the schedule)"
        + (" and the global gradient norm before clipping." if with_gn else "."),
    )


def _throughput_chart(runs: list[Run], axis: Axis) -> Chart:
    with_mfu = any(r.series("mfu")[0] for r in runs)
    per_device = any(r.series(PER_DEVICE)[0] for r in runs)
    p = _Plot(runs, axis, 2 if with_mfu else 1)
    ax = p.axes[0]
    for i, run in enumerate(runs):
        for key, style, what in (("tokens_per_sec", "-", ""), (PER_DEVICE, "--", "per device: ")):
            med, color = median(run.series(key)[1]), _color(i)
            label = (f"{run.name}: " if p.multi else "") + f"{what}median {human(med)} tokens/s"
            values = p.line(ax, run, key, color=color, linewidth=1.6, linestyle=style, label=label)
            if med is not None and len(values) > 3:
                ax.axhline(med, color=color, linestyle=":", linewidth=1.0, alpha=0.8)
    if ax.has_data():
        ax.yaxis.set_major_formatter(_human_ticks())
    p.panel(ax, "Throughput", "tokens / second", "lower right", True, "no throughput logged")
    if with_mfu:
        for i, run in enumerate(runs):
            label = (f"{run.name}: " if p.multi else "") + "median {:.1f}%"
            label = label.format(median(percent(run.series("mfu")[1])) or 0)
            p.line(p.axes[1], run, "mfu", percent, color=_color(i), linewidth=1.6, label=label)
        p.panel(p.axes[1], "Model FLOPs utilization", "MFU (% of peak)", "lower right", True)
    return p.chart(
        "throughput",
        "Throughput",
        "Training tokens processed per second over each logging window (dotted: the median"
        + ("; dashed: per device" if per_device else "")
        + (")" + (", and model FLOPs utilization." if with_mfu else ".")),
    )


def _memory_chart(runs: list[Run], axis: Axis) -> Chart:
    p = _Plot(runs, axis, 1)
    for i, run in enumerate(runs):
        peak = max(run.series("memory_gb")[1], default=0.0)
        label = (f"{run.name}: " if p.multi else "") + f"peak {peak:.2f} GB"
        p.line(p.axes[0], run, "memory_gb", color=_color(i), linewidth=1.8, label=label)
    p.panel(p.axes[0], "Memory", "GB", "lower right", True, "no memory logged")
    return p.chart(
        "memory",
        "Memory",
        "Peak accelerator memory allocated so far (CUDA), or the process's resident memory (CPU).",
    )


def _mix_chart(runs: list[Run], axis: Axis) -> Chart:
    p = _Plot(runs, axis, 1)
    p.by_source(p.axes[0], "data_share/", percent, targets=True)
    p.panel(p.axes[0], "Data mix", "share of training tokens so far (%)", "best", True)
    targets = any(target_shares(r) for r in runs)
    return p.chart(
        "mix",
        "Data mix",
        "Each training source's share of the tokens trained on so far"
        + ("; dotted: its target share." if targets else "."),
    )


def make_charts(runs: list[Run]) -> list[Chart]:
    """Loss, learning rate, throughput and memory; the data mix too when a run logs it."""
    import matplotlib

    axis = Axis(runs)
    charts = [_loss_chart, _lr_chart, _throughput_chart, _memory_chart]
    if any(r.keys("data_share/") for r in runs):
        charts.append(_mix_chart)
    with matplotlib.rc_context(_STYLE):
        return [chart(runs, axis) for chart in charts]
