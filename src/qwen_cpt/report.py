"""Run reports: one self-contained HTML page per run (or per comparison of runs).

:func:`write_report` reads what a run leaves in its ``output_dir`` -- ``metrics.jsonl``,
``config.yaml`` and the ``trainer_state.json`` of ``final/``, ``best/`` and ``checkpoint-*/`` --
and writes ``report.html`` with every chart embedded as a base64 PNG, so the file can be mailed or
attached on its own. Each chart is also saved as a PNG next to it (``report_loss.png``,
``report_lr.png``, ``report_throughput.png``, ``report_memory.png``).

The page has three parts:

* **Learning** -- training loss (raw and EMA-smoothed) and eval loss against tokens seen, the
  learning-rate schedule and gradient norm, and a forgetting table: eval loss of every eval set
  (``eval_loss`` and each ``eval_loss/<source>``) at the first and the last eval, flagged where it
  got worse.
* **Run cost** -- throughput (tokens/s, and MFU when logged) and memory over the run.
* **Setup** -- the optimizer split, the run time, the saved model folders and the resolved config
  (with the fields that differ between runs marked when several runs are compared).

Given several run directories, every chart overlays their curves with a legend naming each run by
its directory name. Every metric except ``step`` is optional, so old runs, runs without eval data
and runs of one or two logged steps all get a report.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("qwen_cpt")

REPORT_NAME = "report.html"

# Keys of the per-step training log; everything else without an ``eval_`` prefix is a one-off
# fact about the run (``muon_params``, ``adamw_params``, ``train_runtime_s`` ...).
TRAIN_KEYS = frozenset(
    {
        "epoch",
        "loss",
        "avg_loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "tokens_seen",
        "memory_gb",
        "tflops",
        "mfu",
    }
)
EVAL_KEY = "eval_loss"


# --- reading a run -------------------------------------------------------------------------------


@dataclass
class Run:
    """What one run directory holds, cleaned up for plotting."""

    path: Path
    name: str
    train: list[dict[str, Any]] = field(default_factory=list)  # by step, one record per step
    evals: list[dict[str, Any]] = field(default_factory=list)  # by step, one record per step
    extras: dict[str, Any] = field(default_factory=dict)  # one-off values, last one wins
    config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # problems found while reading
    folders: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    # -- series ----------------------------------------------------------------------------------
    def series(self, key: str, records: str = "train") -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``key`` where it is a finite number."""
        steps, values = [], []
        for r in self.train if records == "train" else self.evals:
            v = r.get(key)
            if _is_num(v) and math.isfinite(v):
                steps.append(r["step"])
                values.append(float(v))
        return steps, values

    def eval_keys(self) -> list[str]:
        """``eval_loss`` first (when logged), then ``eval_loss/<source>`` sorted by source."""
        keys = {k for r in self.evals for k in r if k == EVAL_KEY or k.startswith(EVAL_KEY + "/")}
        return sorted(keys, key=lambda k: (k != EVAL_KEY, k))

    @property
    def sources(self) -> list[str]:
        return [k for k in self.eval_keys() if k != EVAL_KEY]

    @property
    def has_tokens(self) -> bool:
        return bool(self.series("tokens_seen")[0])

    def tokens_at(self, steps: Sequence[int]) -> list[float]:
        """Tokens seen at each step: exact where a training record has that step, linear in
        between (from 0 tokens at step 0), and at the run's average tokens/step beyond the end."""
        s, t = self.series("tokens_seen")
        if s and s[0] > 0:
            s, t = [0, *s], [0.0, *t]
        out = []
        for step in steps:
            if not s or (len(s) == 1 and step != s[0]):
                out.append(0.0 if step == 0 else math.nan)
            elif step >= s[-1]:
                rate = t[-1] / s[-1] if s[-1] > 0 else 0.0
                out.append(t[-1] + (step - s[-1]) * rate)
            else:
                out.append(_interp(step, s, t))
        return out

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.train] + [r["step"] for r in self.evals]
        return max(steps, default=0)

    @property
    def tokens_seen(self) -> int | None:
        _, t = self.series("tokens_seen")
        return int(t[-1]) if t else None


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """Read a run directory; raise FileNotFoundError when it holds no ``metrics.jsonl``."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{path} holds no metrics.jsonl; pass the output_dir of a qwen-cpt run"
        )
    run = Run(path=path, name=name or path.resolve().name)
    bad = 0
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError):
            bad += 1  # e.g. the half-written last line of a killed run
            continue
        rec = {k: _number(v) for k, v in rec.items()}
        ev = {k: v for k, v in rec.items() if k.startswith("eval_")}
        tr = {k: v for k, v in rec.items() if k in TRAIN_KEYS}
        for k, v in rec.items():
            if k not in ev and k not in tr:
                run.extras[k] = v
        if ev:
            _append(run.evals, step, ev)
        if tr:
            _append(run.train, step, tr)
    if bad:
        run.notes.append(f"{bad} unreadable line(s) in metrics.jsonl were skipped")
    if not run.train:
        run.notes.append("no training records in metrics.jsonl yet")
    run.config = _read_config(path / "config.yaml", run.notes)
    for sub in _model_folders(path):
        state: dict[str, Any] = {}
        try:
            state = json.loads((sub / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        run.folders.append((sub.name, state if isinstance(state, dict) else {}))
    return run


def _append(records: list[dict[str, Any]], step: int, values: dict[str, Any]) -> None:
    """Add a record; a step logged twice merges, and a step going back (a resumed run appending
    to the same file) drops what the earlier attempt logged from that step on."""
    if records and step == records[-1]["step"]:
        records[-1].update(values)
        return
    if records and step < records[-1]["step"]:
        records[:] = [r for r in records if r["step"] < step]
    records.append({"step": step, **values})


def _read_config(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        notes.append("config.yaml not found")
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        notes.append(f"config.yaml could not be read: {exc}")
        return None
    if not isinstance(data, dict):
        notes.append("config.yaml does not hold a mapping")
        return None
    return data


def _model_folders(path: Path) -> list[Path]:
    found = [p for p in path.iterdir() if p.is_dir() and (p / "trainer_state.json").is_file()]

    def order(p: Path) -> tuple[int, int]:
        if p.name.startswith("checkpoint-") and p.name[11:].isdigit():
            return (0, int(p.name[11:]))
        return (1 if p.name == "best" else 2, 0)

    return sorted(found, key=order)


# --- numbers and text ----------------------------------------------------------------------------


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(v: Any) -> Any:
    """metrics.jsonl writes non-finite floats as strings; turn those back into floats."""
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
        return float(v)
    return v


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    lo, hi = 0, len(xs) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if xs[mid] <= x:
            lo = mid
        else:
            hi = mid
    if xs[hi] == xs[lo]:
        return float(ys[lo])
    return ys[lo] + (ys[hi] - ys[lo]) * (x - xs[lo]) / (xs[hi] - xs[lo])


def _median(values: Sequence[float]) -> float | None:
    v = sorted(x for x in values if math.isfinite(x))
    if not v:
        return None
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** (i + 1)))
    return out


def smoothing_weight(n: int) -> float:
    """EMA weight for ``n`` points: none for a handful, about a 1/15th-of-the-run window else."""
    window = min(100.0, n / 15)
    return 0.0 if window <= 1 else round(1 - 1 / window, 3)


def human(n: float | None, digits: int = 3) -> str:
    """1234 -> '1.23K', 5.6e9 -> '5.6B'."""
    if n is None or not math.isfinite(n):
        return "–"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.{digits}g}{suffix}"
    return f"{n:.{digits}g}"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _config_value(v: Any) -> str:
    """A config value as YAML would show it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return str(v)


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


# --- derived facts -------------------------------------------------------------------------------


@dataclass
class EvalChange:
    key: str
    before: float
    before_step: int
    after: float
    after_step: int

    @property
    def source(self) -> str:
        return "all eval data" if self.key == EVAL_KEY else self.key.split("/", 1)[1]

    @property
    def delta(self) -> float:
        return self.after - self.before

    @property
    def pct(self) -> float | None:
        return 100 * self.delta / self.before if self.before else None

    @property
    def single(self) -> bool:
        return self.before_step == self.after_step


def eval_changes(run: Run) -> list[EvalChange]:
    """Per eval set: its loss at the first and at the last eval that measured it."""
    out = []
    for key in run.eval_keys():
        steps, values = run.series(key, "eval")
        if steps:
            out.append(EvalChange(key, values[0], steps[0], values[-1], steps[-1]))
    return out


def runtime(run: Run) -> tuple[float | None, str]:
    """Seconds of training and where the number comes from."""
    v = run.extras.get("train_runtime_s")
    if _is_num(v) and math.isfinite(v):
        return float(v), "train_runtime_s"
    steps, tps = run.series("tokens_per_sec")
    tok = dict(zip(*run.series("tokens_seen")))
    total, prev = 0.0, 0.0
    for s, rate in zip(steps, tps):
        if s in tok and rate > 0:
            total += (tok[s] - prev) / rate
            prev = tok[s]
    if total > 0:
        return total, "sum of logged tokens / tokens per second (eval and saving not included)"
    try:
        wall = (run.path / "metrics.jsonl").stat().st_mtime - (
            run.path / "config.yaml"
        ).stat().st_mtime
    except OSError:
        wall = 0.0
    if wall > 0:
        return wall, "file times: config.yaml written to last metrics.jsonl write"
    return None, "not recorded"


def optimizer_split(run: Run) -> str:
    muon, adamw = run.extras.get("muon_params"), run.extras.get("adamw_params")
    if _is_num(muon) and _is_num(adamw) and muon + adamw > 0:
        total = muon + adamw
        if not muon:
            return f"AdamW: all {int(adamw):,} trainable parameters"
        return (
            f"Muon: {int(muon):,} ({100 * muon / total:.1f}%) · "
            f"AdamW: {int(adamw):,} ({100 * adamw / total:.1f}%)"
        )
    use_muon = (run.config or {}).get("use_muon_optimizer")
    if use_muon is True:
        return "Muon for hidden matrices + AdamW for the rest (counts not logged)"
    if use_muon is False:
        return "AdamW for all parameters (counts not logged)"
    return "not recorded"


# --- charts ---------------------------------------------------------------------------------------

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
_COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DPI = 110


@dataclass
class Chart:
    key: str  # file suffix: report_<key>.png
    title: str
    png: bytes
    caption: str


class _Axis:
    """The shared x axis of every chart: tokens seen when every run logs them, else steps."""

    def __init__(self, runs: list[Run]):
        with_train = [r for r in runs if r.train]
        self.tokens = bool(with_train) and all(r.has_tokens for r in with_train)
        self.label = "tokens seen" if self.tokens else "optimizer step"

    def x(self, run: Run, steps: Sequence[int]) -> list[float]:
        return run.tokens_at(steps) if self.tokens else [float(s) for s in steps]

    def format(self, ax) -> None:
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        ax.set_xlabel(self.label)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=7, integer=not self.tokens))
        if self.tokens:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
        # From 0 (the start of the run) to the last point, with room for markers at both ends;
        # a single point or none at all still gets a sensible range.
        right = ax.dataLim.x1
        right = right if math.isfinite(right) and right > 0 else 1.0
        ax.set_xlim(-0.02 * right, 1.02 * right)


def _figure(panels: int):
    from matplotlib.figure import Figure

    width, height = (6.4 * panels if panels > 1 else 8.0), 4.0
    fig = Figure(figsize=(width, height), dpi=DPI)
    # Fixed margins in inches (tick labels are short by construction: 12K, 3.5, 1e-5), which
    # costs nothing, where tight_layout would measure every text twice.
    fig.subplots_adjust(
        left=0.8 / width,
        right=1 - 0.25 / width,
        bottom=0.6 / height,
        top=1 - 0.55 / height,
        wspace=0.9 / 6.4 * panels / 2 if panels > 1 else 0.2,
    )
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _finish(fig, runs: list[Run]) -> bytes:
    names = " vs ".join(r.name for r in runs)
    if len(names) > 120:
        names = names[:117] + "..."
    fig.text(
        0.01,
        0.985,
        ("run: " if len(runs) == 1 else "runs: ") + names,
        ha="left",
        va="top",
        fontsize=9,
        color="#666666",
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#888888")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _from_zero(ax) -> None:
    """y from 0 to a little above the highest point (flat or one-point curves included)."""
    top = ax.dataLim.y1
    ax.set_ylim(0, top * 1.12 if math.isfinite(top) and top > 0 else 1.0)


def _line_kw(n: int) -> dict[str, Any]:
    """Markers when a curve has too few points to read as a line."""
    return {"marker": "o", "markersize": 4} if n <= 3 else {}


def _legend(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(**kw)


def _plot_smoothed(
    ax, axis: _Axis, run: Run, key: str, color: str, label: str, say_smoothed: bool = False
) -> bool:
    """Raw values thin and pale, their EMA bold; too few points for an EMA: the values."""
    steps, values = run.series(key)
    if not steps:
        return False
    x = axis.x(run, steps)
    w = smoothing_weight(len(values))
    if w > 0:
        ax.plot(x, values, color=color, linewidth=0.8, alpha=0.3)
        label += " (EMA; raw in pale)" if say_smoothed else ""
        ax.plot(x, ema(values, w), color=color, linewidth=2.0, label=label)
    else:
        ax.plot(x, values, color=color, linewidth=1.6, label=label, **_line_kw(len(values)))
    return True


def _loss_chart(runs: list[Run], axis: _Axis) -> Chart:
    multi = len(runs) > 1
    with_sources = any(r.sources for r in runs)
    fig, axes = _figure(2 if with_sources else 1)
    ax = axes[0]
    drawn = False
    for i, run in enumerate(runs):
        color = _COLORS[i % len(_COLORS)]
        drawn |= _plot_smoothed(
            ax, axis, run, "loss", color, f"{run.name}: train" if multi else "train loss", not multi
        )
        es, ev = run.series(EVAL_KEY, "eval")
        if es:
            ax.plot(
                axis.x(run, es),
                ev,
                color=color,
                linestyle="--",
                marker="o",
                markersize=5,
                markerfacecolor="white",
                markeredgewidth=1.5,
                linewidth=1.3,
                label=f"{run.name}: eval" if multi else "eval loss",
            )
            drawn = True
    if drawn:
        ax.set_title("Loss" + (" (train: EMA, raw in pale)" if multi else ""))
        ax.set_ylabel("loss (nats/token)")
        axis.format(ax)
        _legend(ax, loc="upper right")
    else:
        _empty(ax, "no loss logged")
    if with_sources:
        ax = axes[1]
        all_sources = sorted({s for r in runs for s in r.sources})
        for i, run in enumerate(runs):
            for j, key in enumerate(all_sources):
                es, ev = run.series(key, "eval")
                if not es:
                    continue
                src = key.split("/", 1)[1]
                color = _COLORS[(i if multi else j) % len(_COLORS)]
                ax.plot(
                    axis.x(run, es),
                    ev,
                    color=color,
                    marker=_MARKERS[j % len(_MARKERS)],
                    markersize=5,
                    linewidth=1.5,
                    linestyle=["-", "--", ":", "-."][j % 4] if multi else "-",
                    label=f"{run.name}: {src}" if multi else src,
                )
        ax.set_title("Eval loss by source")
        ax.set_ylabel("eval loss")
        axis.format(ax)
        _legend(ax, loc="best")
    png = _finish(fig, runs)
    return Chart(
        "loss",
        "Loss",
        png,
        "Training loss (thick: exponential moving average; pale: as logged) and eval loss against "
        f"{axis.label}. Lower is better."
        + (" Right: eval loss of each eval source." if with_sources else ""),
    )


def _lr_chart(runs: list[Run], axis: _Axis) -> Chart:
    multi = len(runs) > 1
    with_gn = any(r.series("grad_norm")[0] for r in runs)
    fig, axes = _figure(2 if with_gn else 1)
    ax = axes[0]
    drawn = False
    for i, run in enumerate(runs):
        steps, values = run.series("lr")
        if steps:
            ax.plot(
                axis.x(run, steps),
                values,
                color=_COLORS[i % len(_COLORS)],
                linewidth=1.8,
                label=run.name if multi else "learning rate",
                **_line_kw(len(steps)),
            )
            drawn = True
    if drawn:
        ax.set_title("Learning-rate schedule")
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
        _from_zero(ax)
        axis.format(ax)
        if multi:
            _legend(ax, loc="best")
    else:
        _empty(ax, "no learning rate logged")
    if with_gn:
        ax = axes[1]
        lo, hi = math.inf, 0.0
        for i, run in enumerate(runs):
            _, values = run.series("grad_norm")
            if values:
                lo, hi = min(lo, min(values)), max(hi, max(values))
            _plot_smoothed(
                ax,
                axis,
                run,
                "grad_norm",
                _COLORS[i % len(_COLORS)],
                run.name if multi else "gradient norm",
                not multi,
            )
        if lo > 0 and hi / lo > 50:
            ax.set_yscale("log")
        ax.set_title("Gradient norm (before clipping)")
        ax.set_ylabel("global L2 norm")
        axis.format(ax)
        _legend(ax, loc="best")
    png = _finish(fig, runs)
    return Chart(
        "lr",
        "Learning rate and gradient norm",
        png,
        "The learning rate each step used (warmup, then the schedule)"
        + (" and the global gradient norm before clipping." if with_gn else "."),
    )


def _throughput_chart(runs: list[Run], axis: _Axis) -> Chart:
    multi = len(runs) > 1
    mfu_runs = [r for r in runs if r.series("mfu")[0]]
    fig, axes = _figure(2 if mfu_runs else 1)
    ax = axes[0]
    drawn = False
    for i, run in enumerate(runs):
        steps, values = run.series("tokens_per_sec")
        if not steps:
            continue
        med = _median(values)
        color = _COLORS[i % len(_COLORS)]
        ax.plot(
            axis.x(run, steps),
            values,
            color=color,
            linewidth=1.6,
            label=(f"{run.name}: " if multi else "") + f"median {human(med)} tokens/s",
            **_line_kw(len(steps)),
        )
        if med is not None and len(steps) > 3:
            ax.axhline(med, color=color, linestyle=":", linewidth=1.0, alpha=0.8)
        drawn = True
    if drawn:
        ax.set_title("Throughput")
        ax.set_ylabel("tokens / second")
        ax.yaxis.set_major_formatter(_human_formatter())
        _from_zero(ax)
        axis.format(ax)
        _legend(ax, loc="lower right")
    else:
        _empty(ax, "no throughput logged")
    if mfu_runs:
        ax = axes[1]
        for i, run in enumerate(runs):
            steps, values = run.series("mfu")
            if not steps:
                continue
            pct = [100 * v for v in values] if max(values) <= 1.0 else values
            ax.plot(
                axis.x(run, steps),
                pct,
                color=_COLORS[i % len(_COLORS)],
                linewidth=1.6,
                label=(f"{run.name}: " if multi else "") + f"median {_median(pct):.1f}%",
                **_line_kw(len(steps)),
            )
        ax.set_title("Model FLOPs utilization")
        ax.set_ylabel("MFU (% of peak)")
        _from_zero(ax)
        axis.format(ax)
        _legend(ax, loc="lower right")
    png = _finish(fig, runs)
    return Chart(
        "throughput",
        "Throughput",
        png,
        "Training tokens processed per second over each logging window (dotted: the median)"
        + (", and model FLOPs utilization." if mfu_runs else "."),
    )


def _memory_chart(runs: list[Run], axis: _Axis) -> Chart:
    multi = len(runs) > 1
    fig, axes = _figure(1)
    ax = axes[0]
    drawn = False
    for i, run in enumerate(runs):
        steps, values = run.series("memory_gb")
        if not steps:
            continue
        ax.plot(
            axis.x(run, steps),
            values,
            color=_COLORS[i % len(_COLORS)],
            linewidth=1.8,
            label=(f"{run.name}: " if multi else "") + f"peak {max(values):.2f} GB",
            **_line_kw(len(steps)),
        )
        drawn = True
    if drawn:
        ax.set_title("Memory")
        ax.set_ylabel("GB")
        _from_zero(ax)
        axis.format(ax)
        _legend(ax, loc="lower right")
    else:
        _empty(ax, "no memory logged")
    png = _finish(fig, runs)
    return Chart(
        "memory",
        "Memory",
        png,
        "Peak accelerator memory allocated so far (CUDA), or the process's resident memory (CPU).",
    )


def _human_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: human(v))


def make_charts(runs: list[Run]) -> list[Chart]:
    """Render the four charts as PNG bytes (matplotlib's Agg canvas; no global backend change)."""
    import matplotlib

    axis = _Axis(runs)
    with matplotlib.rc_context(_STYLE):
        return [
            _loss_chart(runs, axis),
            _lr_chart(runs, axis),
            _throughput_chart(runs, axis),
            _memory_chart(runs, axis),
        ]


# --- HTML -----------------------------------------------------------------------------------------

_CSS = """
:root { --fg:#1d1d1f; --muted:#6b6b70; --line:#e3e3e6; --bg:#ffffff; --soft:#f6f7f9; }
* { box-sizing: border-box; }
body { font: 14px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, Helvetica, Arial,
       sans-serif; color: var(--fg); background: var(--bg); margin: 0; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 6px; }
p { margin: 6px 0; }
.meta, .caption, .hint { color: var(--muted); }
.caption { font-size: 13px; margin: 2px 0 18px; }
nav a { margin-right: 14px; }
figure { margin: 10px 0 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fbfbfc; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--soft);
       padding: 1px 4px; border-radius: 3px; }
.step { color: var(--muted); font-size: 11px; margin-left: 4px; }
.worse td { background: #fdecea !important; }
.verdict-worse { color: #b3261e; font-weight: 600; }
.verdict-better { color: #1b7f3b; font-weight: 600; }
.verdict-same { color: var(--muted); }
tr.diff td { background: #fff6d6 !important; }
tr.diff td:first-child::after { content: " ≠"; color: #a86b00; font-weight: 700; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; margin: 8px 0; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.wide { overflow-x: auto; }
details { margin: 8px 0; }
summary { cursor: pointer; color: #1f5fa8; }
"""


def _table(head: Sequence[str], rows: Iterable[Any], numeric: Iterable[int] = ()) -> str:
    """Rows are lists of ready-made HTML cells, or ``(cells, row css class)``; the ``numeric``
    columns are right-aligned."""
    num = set(numeric)

    def cell(tag: str, i: int, content: str) -> str:
        return f'<{tag} class="num">{content}</{tag}>' if i in num else f"<{tag}>{content}</{tag}>"

    th = "".join(cell("th", i, h) for i, h in enumerate(head))
    body = []
    for row in rows:
        cls = ""
        if isinstance(row, tuple):  # (cells, css class of the row)
            row, cls = row
        tds = "".join(cell("td", i, c) for i, c in enumerate(row))
        body.append(f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _run_label(run: Run, i: int) -> str:
    color = _COLORS[i % len(_COLORS)]
    return (
        f'<span class="swatch" style="background:{color}"></span>'
        f'<strong title="{esc(run.path.resolve())}">{esc(run.name)}</strong>'
    )


def _summary(runs: list[Run]) -> str:
    rows = []
    for i, run in enumerate(runs):
        _, loss = run.series("loss")
        final_loss = ema(loss, smoothing_weight(len(loss)))[-1] if loss else None
        changes = {c.key: c for c in eval_changes(run)}
        overall = changes.get(EVAL_KEY)
        es, ev = run.series(EVAL_KEY, "eval")
        best = (min(ev), es[ev.index(min(ev))]) if ev else None
        secs, _ = runtime(run)
        _, tps = run.series("tokens_per_sec")
        _, mem = run.series("memory_gb")
        rows.append(
            [
                _run_label(run, i),
                esc(f"{run.last_step:,}"),
                esc(human(run.tokens_seen)),
                esc(f"{final_loss:.4f}") if final_loss is not None else "–",
                esc(f"{overall.before:.4f} → {overall.after:.4f}") if overall else "–",
                (esc(f"{best[0]:.4f}") + f'<span class="step">step {best[1]}</span>')
                if best
                else "–",
                esc(duration(secs)),
                esc(human(_median(tps))),
                esc(f"{max(mem):.2f}") if mem else "–",
            ]
        )
    return _table(
        [
            "run",
            "steps",
            "tokens",
            "train loss (smoothed, last)",
            "eval loss first → last",
            "best eval loss",
            "run time",
            "tokens/s (median)",
            "peak memory GB",
        ],
        rows,
        range(1, 9),
    )


def _forgetting(runs: list[Run]) -> str:
    parts = [
        '<p class="hint">Eval loss of each eval set at the first eval (<em>before</em>; at step 0 '
        "that is the base model) and at the last one (<em>after</em>). Lower is better: a rise on "
        "the domain data means the run is not learning it, a rise on general data is forgetting. "
        "Rows that got worse are flagged.</p>"
    ]
    for i, run in enumerate(runs):
        if len(runs) > 1:
            parts.append(f"<h3>{_run_label(run, i)}</h3>")
        changes = eval_changes(run)
        if not changes:
            parts.append(
                '<p class="note">No eval records: set eval_files or eval_texts to get '
                "eval loss and this table.</p>"
            )
            continue
        rows = []
        for c in changes:
            name = f"{esc(c.source)} <code>{esc(c.key)}</code>"
            before = esc(f"{c.before:.4f}") + f'<span class="step">step {c.before_step}</span>'
            if c.single:
                rows.append(
                    [name, before, "–", "–", "–", '<span class="verdict-same">one eval only</span>']
                )
                continue
            after = esc(f"{c.after:.4f}") + f'<span class="step">step {c.after_step}</span>'
            pct = f"{c.pct:+.2f}%" if c.pct is not None else "–"
            if c.delta > 0:
                verdict, cls = '<span class="verdict-worse">▲ worse</span>', "worse"
            elif c.delta < 0:
                verdict, cls = '<span class="verdict-better">▼ better</span>', ""
            else:
                verdict, cls = '<span class="verdict-same">unchanged</span>', ""
            row = [name, before, after, esc(f"{c.delta:+.4f}"), esc(pct), verdict]
            rows.append((row, cls) if cls else row)
        parts.append(
            _table(
                ["eval set", "before", "after", "change", "change %", "verdict"], rows, range(1, 5)
            )
        )
        worse = [c.source for c in changes if not c.single and c.delta > 0]
        if worse:
            parts.append(f'<p class="verdict-worse">Got worse: {esc(", ".join(worse))}.</p>')
    return "\n".join(parts)


def _cost(runs: list[Run]) -> str:
    rows = []
    for i, run in enumerate(runs):
        _, tps = run.series("tokens_per_sec")
        _, tfl = run.series("tflops")
        _, mfu = run.series("mfu")
        _, mem = run.series("memory_gb")
        secs, _ = runtime(run)
        mfu_pct = [100 * v for v in mfu] if mfu and max(mfu) <= 1.0 else mfu
        med_mfu = _median(mfu_pct)
        med_tfl = _median(tfl)
        rows.append(
            [
                _run_label(run, i),
                esc(duration(secs)),
                esc(human(run.tokens_seen)),
                esc(human(_median(tps))),
                esc(human(sum(tps) / len(tps))) if tps else "–",
                esc(f"{med_tfl:.1f}") if med_tfl is not None else "–",
                esc(f"{med_mfu:.1f}%") if med_mfu is not None else "–",
                esc(f"{max(mem):.2f}") if mem else "–",
            ]
        )
    return _table(
        [
            "run",
            "run time",
            "tokens",
            "tokens/s (median)",
            "tokens/s (mean)",
            "TFLOPS (median)",
            "MFU (median)",
            "peak memory GB",
        ],
        rows,
        range(1, 8),
    )


def _setup(runs: list[Run]) -> str:
    parts = ["<h3>Optimizer and run time</h3>"]
    rows = []
    for i, run in enumerate(runs):
        secs, source = runtime(run)
        rows.append(
            [
                _run_label(run, i),
                esc(optimizer_split(run)),
                esc(duration(secs)) + (f'<div class="step">{esc(source)}</div>' if secs else ""),
            ]
        )
    parts.append(_table(["run", "optimizer split (trainable parameters)", "run time"], rows))

    folder_rows = []
    for i, run in enumerate(runs):
        for name, state in run.folders:
            facts = []
            if _is_num(state.get("step")):
                facts.append(f"step {state['step']:,}")
            if _is_num(state.get("tokens_seen")):
                facts.append(f"{human(state['tokens_seen'])} tokens")
            if _is_num(state.get("best_eval_loss")):
                facts.append(f"best eval loss {state['best_eval_loss']:.4f}")
            folder_rows.append(
                [_run_label(run, i), f"<code>{esc(name)}/</code>", esc(", ".join(facts) or "–")]
            )
    if folder_rows:
        parts.append("<h3>Saved models</h3>")
        parts.append(_table(["run", "folder", "state"], folder_rows))

    parts.append("<h3>Resolved config</h3>")
    configs = [r.config for r in runs]
    if not any(configs):
        parts.append('<p class="note">No config.yaml found.</p>')
        return "\n".join(parts)
    keys: list[str] = []
    for c in configs:
        for k in c or {}:
            if k not in keys:
                keys.append(k)
    multi = len(runs) > 1
    rows, diff_rows = [], []
    for k in keys:
        values = [c.get(k) if c is not None else None for c in configs]
        cells = [f"<code>{esc(k)}</code>"] + [
            esc(_config_value(v)) if c is not None else "–" for v, c in zip(values, configs)
        ]
        if multi and len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            rows.append((cells, "diff"))
            diff_rows.append(cells)
        else:
            rows.append(cells)
    if not multi:
        parts.append(f'<div class="wide">{_table(["field", "value"], rows)}</div>')
        return "\n".join(parts)
    head = ["field"] + [_run_label(r, i) for i, r in enumerate(runs)]
    if diff_rows:
        parts.append(f'<p class="hint">{len(diff_rows)} field(s) differ between the runs:</p>')
        parts.append(f'<div class="wide">{_table(head, diff_rows)}</div>')
    else:
        parts.append('<p class="hint">The runs share the same config.</p>')
    parts.append(
        f"<details><summary>All {len(keys)} config fields (those that differ marked ≠)</summary>"
        f'<div class="wide">{_table(head, rows)}</div></details>'
    )
    return "\n".join(parts)


def render_html(runs: list[Run], charts: list[Chart], chart_files: dict[str, str]) -> str:
    """The report page; ``charts`` are embedded, ``chart_files`` maps chart key -> PNG file name."""
    names = [r.name for r in runs]
    title = "Training report: " + (" vs ".join(names) if len(names) <= 4 else f"{len(names)} runs")
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    by_key = {c.key: c for c in charts}

    def figure(key: str) -> str:
        c = by_key.get(key)
        if c is None:
            return ""
        data = base64.b64encode(c.png).decode("ascii")
        link = chart_files.get(key)
        caption = esc(c.caption) + (f' <a href="{esc(link)}">PNG</a>' if link else "")
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{esc(c.title)}"></figure>'
            f'<p class="caption">{caption}</p>'
        )

    notes = []
    if not charts:
        notes.append(
            '<p class="note">Charts are off: matplotlib is not installed '
            "(<code>pip install matplotlib</code>).</p>"
        )
    for run in runs:
        for n in run.notes:
            notes.append(f'<p class="note"><strong>{esc(run.name)}</strong>: {esc(n)}</p>')

    runs_list = "".join(
        f"<li>{_run_label(r, i)} <code>{esc(r.path.resolve())}</code></li>"
        for i, r in enumerate(runs)
    )
    from . import __version__

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>{esc(title)}</h1>
<p class="meta">Generated {esc(now)} by qwen-cpt {esc(__version__)}.
x axes: {esc(_Axis(runs).label)}.</p>
<ul class="meta">{runs_list}</ul>
<nav><a href="#learning">Learning</a><a href="#forgetting">Forgetting</a>
<a href="#cost">Run cost</a><a href="#setup">Setup</a></nav>
{"".join(notes)}
<h2 id="summary">Summary</h2>
<div class="wide">{_summary(runs)}</div>

<h2 id="learning">Learning</h2>
{figure("loss")}
{figure("lr")}
<h3 id="forgetting">Forgetting: eval loss before and after</h3>
{_forgetting(runs)}

<h2 id="cost">Run cost</h2>
{figure("throughput")}
{figure("memory")}
<div class="wide">{_cost(runs)}</div>

<h2 id="setup">Setup</h2>
{_setup(runs)}
</main>
</body>
</html>
"""


# --- entry points ---------------------------------------------------------------------------------


def _unique_names(paths: list[Path]) -> list[str]:
    names = [p.resolve().name or str(p) for p in paths]
    if len(set(names)) < len(names):  # e.g. two runs both called "output": add the parent
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return names


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the HTML report of one run, or the comparison of several, and return its path.

    ``out`` defaults to ``report.html`` in the first run directory; a path ending in ``.html`` is
    the file to write, any other path a directory to write ``report.html`` into. Each chart is
    also written as ``<report name>_<chart>.png`` next to the report.
    """
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("write_report needs at least one run directory")
    runs = [load_run(p, n) for p, n in zip(paths, _unique_names(paths))]
    if out is None:
        target = paths[0] / REPORT_NAME
    else:
        out = Path(out)
        target = out if out.suffix.lower() in (".html", ".htm") else out / REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)

    try:
        charts = make_charts(runs)
    except ImportError as exc:
        log.warning("report without charts: %s (pip install matplotlib)", exc)
        charts = []
    files = {}
    for chart in charts:
        png = target.parent / f"{target.stem}_{chart.key}.png"
        png.write_bytes(chart.png)
        files[chart.key] = png.name
    text = render_html(runs, charts, files)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target


def report_command(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> int:
    """``qwen-cpt report RUN_DIR [RUN_DIR ...]``: write the report and print its path."""
    path = write_report([Path(d) for d in run_dirs], Path(out) if out else None)
    print(path)
    return 0
