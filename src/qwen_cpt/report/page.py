"""The report page: the runs' facts as tables, rendered with the charts by ``templates/``.

A table is ``{"cols": [...], "rows": [...]}``; a cell is a string or a dict of ``text`` and optional
``run`` (the run's label), ``cls``, ``metric`` (the key it shows, as ``data-metric``), ``code``,
``step``, ``note`` and ``parts`` (such dicts). Columns of optional metrics no run logged are left out.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from ..metrics import describe, member
from .charts import COLORS, Axis, Chart
from .read import (
    EVAL_KEY,
    GENERAL_SETS,
    Run,
    config_value,
    duration,
    ema,
    eval_changes,
    eval_role,
    fmt,
    human,
    is_num,
    median,
    optimizer_split,
    runtime,
    score_changes,
    setup_used,
    smoothing_weight,
    target_shares,
)

NONE = "–"
Column = tuple[str, str | None, Callable[[Run, str], Any]]  # title, metric, cell of a run


def _cell(text: Any = "", **kw: Any) -> dict[str, Any]:
    return {"text": text, **{k: v for k, v in kw.items() if v is not None}}


def _col(title: Any, metric: str | None = None, num: bool = True) -> dict[str, Any]:
    return {"title": title, "metric": metric, "num": num}


def _text_cols(*titles: str) -> list[dict[str, Any]]:
    return [_col(t, num=False) for t in titles]


def _table(cols: list[dict], rows: list) -> dict[str, Any]:
    """Rows are lists of cells, or ``(cells, row css class)``."""
    rows = [r if isinstance(r, tuple) else (r, "") for r in rows]

    def keep(j: int) -> bool:
        entry = describe(cols[j]["metric"] or "")
        return entry is None or entry.only_if is None or any(r[0][j] != NONE for r in rows)

    js = [j for j in range(len(cols)) if keep(j)]
    return {
        "cols": [cols[j] for j in js],
        "rows": [{"cells": [cells[j] for j in js], "cls": cls} for cells, cls in rows],
    }


def _per_run(runs: list[Run], columns: list[Column], num: bool = True) -> dict[str, Any]:
    cols = [_col("run", num=False)] + [_col(t, k, num) for t, k, _ in columns]
    rows = [[{"run": i}] + [f(r, k) for _, k, f in columns] for i, r in enumerate(runs)]
    return _table(cols, rows)


def _of(stat: Callable[[list[float]], float]) -> Callable[[Run, str], str]:
    """A per-run cell: ``stat`` of the metric's logged values, formatted as the registry says."""
    return lambda r, k: fmt(k, stat(r.values(k)) if r.values(k) else None)


_LAST, _MEDIAN, _PEAK = _of(lambda v: v[-1]), _of(median), _of(max)
_MEAN = _of(lambda v: sum(v) / len(v))


def _train_last(r: Run, k: str) -> Any:
    """The last train loss, smoothed when the run has enough points for an EMA; a short run
    shows its raw last value, said to be raw, rather than a "smoothed" copy of it."""
    v = r.values(k)
    if not v:
        return NONE
    w = smoothing_weight(len(v))
    if w == 0:
        return _cell(fmt(k, v[-1]), note=f"as logged: {len(v)} points are too few to smooth")
    return _cell(fmt(k, ema(v, w)[-1]), note=f"EMA, weight {w:g}; as logged {fmt(k, v[-1])}")


def _first_last(r: Run, k: str) -> str:
    c = next((c for c in eval_changes(r) if c.key == k), None)
    return f"{fmt(k, c.before)} → {fmt(k, c.after)}" if c else NONE


def _best(r: Run, k: str) -> Any:
    steps, values = r.series(k, "eval")
    return _loss_at(*min(zip(values, steps))) if values else NONE


def _run_time(r: Run, k: str, source: bool = False) -> Any:
    secs, where = runtime(r)
    return _cell(duration(secs), note=where if secs else None) if source else duration(secs)


def _loss_at(value: float, step: int) -> dict[str, Any]:
    return _cell(fmt(EVAL_KEY, value), step=step)


def _optimizer(run: Run) -> list[dict[str, Any]]:
    return [_cell(text, metric=metric) for text, metric in optimizer_split(run)]


SUMMARY: list[Column] = [
    ("steps", "step", lambda r, k: fmt(k, r.last_step)),
    ("epochs", "epoch", _LAST),
    ("tokens", "tokens_seen", _LAST),
    ("train loss, last", "loss", _train_last),
    ("mean train loss", "avg_loss", _LAST),
    ("eval loss first → last", EVAL_KEY, _first_last),
    ("best eval loss", EVAL_KEY, _best),
    ("eval perplexity, last", "eval_ppl", _LAST),
    ("run time", "train_runtime_s", _run_time),
    ("tokens/s (median)", "tokens_per_sec", _MEDIAN),
    ("peak memory GB", "memory_gb", _PEAK),
    ("skipped steps", "skipped_steps", _LAST),
]
COST: list[Column] = [
    ("run time", "train_runtime_s", _run_time),
    ("tokens", "tokens_seen", _LAST),
    ("tokens/s (median)", "tokens_per_sec", _MEDIAN),
    ("tokens/s (mean)", "tokens_per_sec", _MEAN),
    ("tokens/s per device (median)", "tokens_per_sec_per_device", _MEDIAN),
    ("TFLOPS (median)", "tflops", _MEDIAN),
    ("MFU (median)", "mfu", _MEDIAN),
    ("peak memory GB", "memory_gb", _PEAK),
]


def _used(r: Run, k: str) -> dict[str, Any]:
    return next(_cell(v, metric=k) for _, v, m in setup_used(r) if m == k)


SETUP: list[Column] = [
    ("attention kernel (used)", "attention", _used),
    ("precision (used)", "precision", _used),
    ("torch.compile (used)", "torch_compile", _used),
    ("optimizer split (trainable parameters)", None, lambda r, k: _cell(parts=_optimizer(r))),
    ("run time", "train_runtime_s", lambda r, k: _run_time(r, k, source=True)),
]


_FORGETTING = [_col("eval set", num=False)] + [_col(t) for t in ("before", "after", "change")]
_FORGETTING += [_col("change %"), _col("± noise (2σ)", "eval_loss_se"), _col("verdict", num=False)]
_FORGETTING += [_col("perplexity before → after", "eval_ppl"), _col("best eval loss")]
_FORGETTING += [_col("perplexity at best", "eval_ppl")]
_VERDICTS = dict(
    worse="▲ worse", better="▼ better", same="same within noise", single="one eval only"
)


def _forgetting(runs: list[Run]) -> list[dict[str, Any]]:
    out = []
    for i, run in enumerate(runs):
        changes, rows = eval_changes(run), []
        for c in changes:
            ppl = f"{fmt(c.ppl_key, c.ppl[0])} → {fmt(c.ppl_key, c.ppl[1])}" if c.ppl else None
            cells = [_cell(c.source, code=c.key, metric=c.key), _loss_at(c.before, c.before_step)]
            if c.single:
                cells += [NONE, NONE, NONE]
            else:
                pct = NONE if c.pct is None else f"{c.pct:+.2f}%"
                cells += [_loss_at(c.after, c.after_step), f"{c.delta:+.4f}", pct]
            v = c.verdict
            cells += [
                NONE if c.noise is None else _cell(f"{c.noise:.4f}", metric=c.se_key),
                _cell(_VERDICTS[v], cls=f"verdict-{v}"),
                _cell(ppl, metric=c.ppl_key) if ppl else NONE,
                *_best_of(run, c.key, c.ppl_key),
            ]
            rows.append((cells, "worse" if c.worse else ""))
        worse = ", ".join(c.source for c in changes if c.worse)
        out.append({"run": i, "table": _table(_FORGETTING, rows) if rows else None, "worse": worse})
    return out


def _best_of(run: Run, key: str, ppl_key: str) -> list[Any]:
    """The lowest eval loss of one eval set (with its step) and the perplexity at that eval."""
    steps, values = run.series(key, "eval")
    if not values:
        return [NONE, NONE]
    value, step = min(zip(values, steps))
    ppl = dict(zip(*run.series(ppl_key, "eval"))).get(step)
    return [_loss_at(value, step), _cell(fmt(ppl_key, ppl), metric=ppl_key) if ppl else NONE]


_SCORES = _text_cols("task", "metric") + [_col(t) for t in ("before", "after", "change")]
_SCORES += [_col("± noise (2σ)"), _col("verdict", num=False)]
_SCORE_VERDICTS = dict(
    worse="▼ worse", better="▲ better", same="same within noise", single="one eval only"
)


def _score(v: float, sign: str = "") -> str:
    """A score with 4 decimals; a huge one (the perplexity of an untrained model) in 4 digits."""
    return f"{v:{sign}.4f}" if abs(v) < 1e4 else f"{v:{sign}.4g}"


def _downstream(runs: list[Run]) -> list[dict[str, Any]]:
    """Per run, each downstream score before (first eval, the base model at step 0) and after."""
    out = []
    for i, run in enumerate(runs):
        rows = []
        for c in score_changes(run):
            after = NONE if c.single else _cell(_score(c.after), step=c.after_step)
            noise = NONE if c.noise is None else _score(c.noise)
            cells = [
                _cell(c.task, metric=c.key), _cell(code=c.metric),
                _cell(_score(c.before), step=c.before_step), after,
                NONE if c.single else _score(c.delta, "+"), noise,
                _cell(_SCORE_VERDICTS[c.verdict], cls=f"verdict-{c.verdict}"),
            ]  # fmt: skip
            rows.append((cells, "worse" if c.verdict == "worse" else ""))
        worse = ", ".join(
            f"{c.task} {c.metric}" for c in score_changes(run) if c.verdict == "worse"
        )
        out.append({"run": i, "table": _table(_SCORES, rows) if rows else None, "worse": worse})
    return out if any(d["table"] for d in out) else []


_ANSWER = _text_cols("what", "measures") + [_col("before → after"), _col("change")]
_ANSWER += [_col("± noise (2σ)"), _col("verdict", num=False), _col("perplexity before → after")]
_ROLE_ORDER = {"domain": 0, "replayed source": 1, "eval set": 2, "general": 3, "all eval data": 4}


def _answer(runs: list[Run]) -> list[dict[str, Any]]:
    """Per run, the report's first answer: what the domain gained and what general ability
    changed, one row per eval set (domain first) and per downstream score, each with a verdict by
    its noise rule; plus a sentence of the setup the run really used and its achieved data mix."""
    out = []
    for i, run in enumerate(runs):
        rows, said = [], []
        changes = sorted(eval_changes(run), key=lambda c: _ROLE_ORDER[eval_role(run, c)])
        for c in changes:
            role = eval_role(run, c)
            ppl = f"{fmt(c.ppl_key, c.ppl[0])} → {fmt(c.ppl_key, c.ppl[1])}" if c.ppl else NONE
            change = NONE if c.single else f"{c.delta:+.4f}"
            cells = [
                _cell(f"{_set_name(c)} loss", metric=c.key), role,
                f"{c.before:.4f} → {c.after:.4f}" if not c.single else f"{c.before:.4f}",
                change, NONE if c.noise is None else _cell(f"{c.noise:.4f}", metric=c.se_key),
                _cell(_VERDICTS[c.verdict], cls=f"verdict-{c.verdict}"), ppl,
            ]  # fmt: skip
            rows.append((cells, "worse" if c.worse else ""))
            if not c.single:
                said.append(f"{role} ({_set_name(c)}) loss {_WORDS[c.verdict]}")
        for c in score_changes(run):
            cells = [
                _cell(f"{c.task} {c.metric}", metric=c.key), "downstream task",
                f"{_score(c.before)} → {_score(c.after)}" if not c.single else _score(c.before),
                NONE if c.single else _score(c.delta, "+"),
                NONE if c.noise is None else _score(c.noise),
                _cell(_SCORE_VERDICTS[c.verdict], cls=f"verdict-{c.verdict}"), NONE,
            ]  # fmt: skip
            rows.append((cells, "worse" if c.verdict == "worse" else ""))
            if not c.single:
                said.append(f"{c.task} {c.metric} {_WORDS[c.verdict]}")
        out.append(
            {"run": i, "table": _table(_ANSWER, rows) if rows else None,
             "said": "; ".join(said), "used": _used_sentence(run)}
        )  # fmt: skip
    return out


def _set_name(c) -> str:
    """An eval set as a reader knows it: the eval_files/eval_texts set is named so."""
    return "eval_files" if c.source in GENERAL_SETS else c.source


_WORDS = dict(better="better", worse="worse", same="the same within noise", single="")


def _used_sentence(run: Run) -> str:
    """The attention kernel, precision, compile, optimizer split and data mix the run used."""
    used = {m: v for _, v, m in setup_used(run)}
    parts = [f"attention {used['attention']}", f"precision {used['precision']}"]
    parts.append(f"torch.compile {used['torch_compile']}")
    parts += [text for text, _ in optimizer_split(run)]
    targets = target_shares(run)
    mix = [
        f"{member(k)} {100 * run.values(k)[-1]:.1f}% of tokens (target {100 * targets[member(k)]:.1f}%)"
        for k in run.keys("data_share/")
        if run.values(k) and member(k) in targets
    ]
    return "; ".join(parts + (["data mix: " + ", ".join(mix)] if mix else []))


def _mix(runs: list[Run]) -> dict[str, Any] | None:
    rows = []
    for i, run in enumerate(runs):
        targets = target_shares(run)
        for key in run.keys("data_share/"):
            got, want = (run.values(key) or [None])[-1], targets.get(member(key))
            diff = NONE if got is None or want is None else f"{100 * (got - want):+.1f} points"
            source = _cell(member(key), code=key, metric=key)
            rows.append([{"run": i}, source, fmt(key, want), fmt(key, got), diff])
    cols = _text_cols("run", "source") + [_col("target share"), _col("achieved share (last)")]
    return _table(cols + [_col("difference")], rows) if rows else None


def _setup(runs: list[Run]) -> dict[str, Any]:
    folders = []
    for i, run in enumerate(runs):
        for name, state in run.folders:
            facts = []
            if is_num(state.get("step")):
                facts.append(f"step {state['step']:,}")
            if is_num(state.get("tokens_seen")):
                facts.append(f"{human(state['tokens_seen'])} tokens")
            if is_num(state.get("best_eval_loss")):
                facts.append(f"best eval loss {state['best_eval_loss']:.4f}")
            folders.append([{"run": i}, _cell(code=f"{name}/"), ", ".join(facts) or NONE])
    return {
        "optimizer": _per_run(runs, SETUP, num=False),
        "folders": _table(_text_cols("run", "folder", "state"), folders) if folders else None,
        "config": _config(runs),
    }


def _config(runs: list[Run]) -> dict[str, Any] | None:
    configs = [r.config for r in runs]
    if not any(configs):
        return None
    keys = list(dict.fromkeys(k for c in configs for k in c or {}))
    multi = len(runs) > 1
    rows, diff = [], []
    for k in keys:
        values = [c.get(k) if c is not None else None for c in configs]
        cells = [_cell(code=k)] + [
            config_value(v) if c is not None else NONE for v, c in zip(values, configs)
        ]
        differs = multi and len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1
        rows.append((cells, "diff") if differs else cells)
        diff += [cells] if differs else []
    head = _text_cols("field", *([{"run": i} for i in range(len(runs))] if multi else ["value"]))
    return {"all": _table(head, rows), "diff": _table(head, diff), "n": len(keys), "multi": multi}


@lru_cache(maxsize=1)
def _template():
    import jinja2
    from markupsafe import Markup

    def finalize(v: Any) -> Markup:  # html.escape: quotes as &quot;
        return v if isinstance(v, Markup) else Markup(html.escape(str(v), quote=True))

    env = jinja2.Environment(
        loader=jinja2.PackageLoader(__package__, "templates"),
        autoescape=True,
        finalize=finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    return env.get_template("report.html.j2")


def render_html(runs: list[Run], charts: list[Chart], chart_files: dict[str, str]) -> str:
    """The report page; ``charts`` are embedded, ``chart_files`` maps chart key -> PNG file name."""
    from .. import __version__

    names = [r.name for r in runs]
    title = "Training report: " + (" vs ".join(names) if len(names) <= 4 else f"{len(names)} runs")
    return _template().render(
        title=title,
        now=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        version=__version__,
        axis=Axis(runs).label,
        runs=runs,
        colors=COLORS,
        charts={c.key: c for c in charts},
        files=chart_files,
        summary=_per_run(runs, SUMMARY),
        answer=_answer(runs),
        forgetting=_forgetting(runs),
        downstream=_downstream(runs),
        mix=_mix(runs),
        cost=_per_run(runs, COST),
        setup=_setup(runs),
    )
