"""Run reports: one self-contained HTML page per run, or per comparison of runs.

:func:`write_report` reads a run's ``output_dir`` (``metrics.jsonl``, ``config.yaml``, the
``trainer_state.json`` of ``final/``, ``best/`` and ``checkpoint-*/``) and writes ``report.html``
with every chart embedded as a PNG, and saved next to it (``report_loss.png``, ``report_lr.png``,
``report_throughput.png``, ``report_memory.png``; ``report_mix.png`` for several sources). Its
parts: the *Downstream* table of ``eval_tasks`` scores before and after, *Learning* (loss,
learning rate and gradient norm, the forgetting table of every eval set's first and last eval with
perplexity and the best eval, the data mix against its target), *Run cost* (throughput, MFU,
memory) and *Setup* (the attention kernel, precision and torch.compile the run used, optimizer
split, run time, saved models, the resolved config, with the fields that differ between compared
runs marked). Runs are named by ``run_name``, else by model, first source and date. Where each metric goes comes from the registry in
:mod:`qwen_cpt.metrics`, and every element that shows one carries its key as ``data-metric``.
Every metric but ``step`` is optional: old runs, runs without eval and runs of one logged step all
get a report.

:mod:`.read` reads runs and computes statistics, :mod:`.charts` draws, :mod:`.page` fills
``templates/report.html.j2``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .charts import make_charts
from .page import render_html
from .read import (
    Run,
    ema,
    eval_changes,
    human,
    load_run,
    run_name,
    runtime,
    score_changes,
    smoothing_weight,
)

__all__ = ["REPORT_NAME", "Run", "ema", "eval_changes", "human", "load_run", "make_charts"]
__all__ += ["render_html", "report_command", "run_name", "runtime", "score_changes"]
__all__ += ["smoothing_weight", "write_report"]

log = logging.getLogger("qwen_cpt")

REPORT_NAME = "report.html"


def _unique_names(runs: list[Run]) -> None:
    """Runs are named by :func:`.read.run_name`; two runs of the same name get their folder's
    name added (its parent's too if that is not enough), then a number."""
    names = [r.name for r in runs]
    for i in range(3):
        if len(set(names)) == len(names):
            break
        if i < 2:
            names = [f"{r.name} ({'/'.join(r.path.resolve().parts[-1 - i :])})" for r in runs]
        else:
            names = [f"{n} ({j + 1})" for j, n in enumerate(names)]
    for r, n in zip(runs, names):
        r.name = n


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the HTML report of one run, or the comparison of several, and return its path.

    ``out`` defaults to ``report.html`` in the first run directory; a path ending in ``.html`` is
    the file to write, any other path a directory to write ``report.html`` into. Each chart is
    also written as ``<report name>_<chart>.png`` next to the report.
    """
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("write_report needs at least one run directory")
    runs = [load_run(p) for p in paths]
    _unique_names(runs)
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
