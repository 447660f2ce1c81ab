"""Reading a run folder (``metrics.jsonl``, ``config.yaml``, saved models) and the statistics the
report shows: smoothing, medians, eval changes, run time, the data mix."""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import describe, member

EVAL_KEY = "eval_loss"
DOWNSTREAM = "downstream/"


def _eval_record(key: str) -> bool:
    """Logged at evals (eval loss, downstream scores), so read from :attr:`Run.evals`."""
    entry = describe(key + "x" if key.endswith("/") else key)  # a family prefix: any member
    return key.startswith("eval_") or getattr(entry, "logged", None) == "eval"


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

    def series(self, key: str, records: str = "train") -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``key`` where it is a finite number."""
        steps, values = [], []
        for r in self.train if records == "train" else self.evals:
            v = r.get(key)
            if is_num(v) and math.isfinite(v):
                steps.append(r["step"])
                values.append(float(v))
        return steps, values

    def values(self, key: str) -> list[float]:
        return self.series(key, "eval" if _eval_record(key) else "train")[1]

    def keys(self, prefix: str) -> list[str]:
        """Logged keys of the family ``prefix`` (e.g. ``eval_loss/``), sorted."""
        records = self.evals if _eval_record(prefix) else self.train
        return sorted({k for r in records for k in r if k.startswith(prefix)})

    def eval_keys(self) -> list[str]:
        """``eval_loss`` first (when logged), then ``eval_loss/<source>`` sorted by source."""
        overall = [EVAL_KEY] if any(EVAL_KEY in r for r in self.evals) else []
        return overall + self.keys(EVAL_KEY + "/")

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
            else:  # s[i - 1] <= step < s[i]
                i = max(1, bisect.bisect_right(s, step))
                out.append(t[i - 1] + (t[i] - t[i - 1]) * (step - s[i - 1]) / (s[i] - s[i - 1]))
        return out

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.train + self.evals), default=0)


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
    run = Run(path=path, name=name or "")
    bad, unknown = 0, set()
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError):
            bad += 1  # e.g. the half-written last line of a killed run
            continue
        tr, ev = {}, {}
        for k, v in rec.items():
            entry = describe(k)
            if entry is None:
                unknown.add(k)
            logged = "eval" if _eval_record(k) else getattr(entry, "logged", None)
            (ev if logged == "eval" else tr if logged == "step" else run.extras)[k] = _number(v)
        if ev:
            _append(run.evals, step, ev)
        if tr:
            _append(run.train, step, tr)
    if bad:
        run.notes.append(f"{bad} unreadable line(s) in metrics.jsonl were skipped")
    if not run.train:
        run.notes.append("no training records in metrics.jsonl yet")
    if unknown:  # a newer trainer's metric: add it to qwen_cpt/metrics.py to see it here
        run.notes.append("not in the metric registry, so not shown: " + ", ".join(sorted(unknown)))
    run.config = _read_config(path / "config.yaml", run.notes)
    run.name = run.name or run_name(path, run.config)
    for sub in _model_folders(path):
        state: dict[str, Any] = {}
        try:
            state = json.loads((sub / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        run.folders.append((sub.name, state if isinstance(state, dict) else {}))
    return run


def run_name(path: Path, config: dict[str, Any] | None) -> str:
    """``run_name`` from config.yaml; else the model's name, the first training source and the
    date config.yaml was written (the run's start): ``Qwen2.5-7B · legal · 2026-03-01``; the
    folder's name when config.yaml is missing."""
    config = config or {}
    if config.get("run_name"):
        return str(config["run_name"])
    model = Path(str(config.get("model_name_or_path") or "")).name
    if not model:
        return path.resolve().name
    sources = [s.get("name") for s in config.get("sources") or [] if isinstance(s, dict)]
    files = [Path(str(f)).name for f in config.get("train_files") or []]
    first = next((str(x) for x in sources + files if x), "")
    try:
        import datetime as _dt

        when = _dt.date.fromtimestamp((path / "config.yaml").stat().st_mtime).isoformat()
    except OSError:
        when = ""
    return " · ".join(x for x in (model, first, when) if x)


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


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(v: Any) -> Any:
    """metrics.jsonl writes non-finite floats as strings; turn those back into floats."""
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
        return float(v)
    return v


def median(values: Sequence[float]) -> float | None:
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


def percent(values: list[float]) -> list[float]:
    """MFU is logged as a fraction (0.4); old runs logged percent (40)."""
    return [100 * v for v in values] if values and max(values) <= 1.0 else values


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


def fmt(key: str, v: Any) -> str:
    """A value of metric ``key`` as the registry's ``fmt`` says (``.4g`` for unknown keys)."""
    if not is_num(v) or not math.isfinite(v):
        return "–" if v is None else str(v)
    spec = getattr(describe(key), "fmt", ".4g")
    if spec == "pct":
        return f"{percent([v])[0]:.1f}%"
    return human(v) if spec == "human" else duration(v) if spec == "duration" else format(v, spec)


def config_value(v: Any) -> str:
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


# --- derived facts -------------------------------------------------------------------------------


GENERAL_SETS = ("eval", "eval_files")  # the eval set of eval_files/eval_texts (qwen_cpt.evaluate)


@dataclass
class EvalChange:
    """One eval set's loss (and perplexity, when logged) at its first and its last eval, with a
    verdict: ``better``, ``worse``, ``same`` (within noise: the change is at most twice the
    standard error of the difference, from the ``eval_loss_se`` the evaluator logs: the standard
    error over eval batches at each eval, combined as if independent, which overstates the noise
    of a paired comparison; without it, an exact tie) or ``single`` (one eval only)."""

    key: str
    before: float
    before_step: int
    after: float
    after_step: int
    ppl: tuple[float, float] | None = None
    noise: float | None = None  # 2 x sqrt(se_before^2 + se_after^2)

    def __post_init__(self):
        self.source = "all eval data" if self.key == EVAL_KEY else member(self.key)
        self.ppl_key = self.key.replace("eval_loss", "eval_ppl", 1)
        self.se_key = self.key.replace("eval_loss", "eval_loss_se", 1)
        self.delta = self.after - self.before
        self.pct = 100 * self.delta / self.before if self.before else None
        self.single = self.before_step == self.after_step
        # worse: moved the way the registry says is bad (smaller is better for a loss)
        smaller = getattr(describe(self.key), "smaller_is_better", True) is not False
        if self.single:
            self.verdict = "single"
        elif self.delta == 0 or (self.noise is not None and abs(self.delta) <= self.noise):
            self.verdict = "same"
        else:
            self.verdict = "worse" if (self.delta > 0) == smaller else "better"
        self.worse = self.verdict == "worse"


def eval_changes(run: Run) -> list[EvalChange]:
    """Per eval set (``eval_loss`` first, then each source): its first and its last eval.
    ``eval_loss`` is left out when it is the ``eval_files`` set, also logged by name."""
    out = []
    keys = run.eval_keys()
    if any(f"{EVAL_KEY}/{g}" in keys for g in GENERAL_SETS):
        keys = [k for k in keys if k != EVAL_KEY]
    for key in keys:
        steps, values = run.series(key, "eval")
        if steps:
            ppl = dict(zip(*run.series(key.replace("eval_loss", "eval_ppl", 1), "eval")))
            pair = (ppl[steps[0]], ppl[steps[-1]]) if steps[0] in ppl and steps[-1] in ppl else None
            se = dict(zip(*run.series(key.replace("eval_loss", "eval_loss_se", 1), "eval")))
            noise = None
            if steps[0] in se and steps[-1] in se:
                noise = 2 * math.sqrt(se[steps[0]] ** 2 + se[steps[-1]] ** 2)
            out.append(EvalChange(key, values[0], steps[0], values[-1], steps[-1], pair, noise))
    return out


def eval_role(run: Run, change: EvalChange) -> str:
    """What an eval set measures: ``domain`` (held-out text of the training source with the
    largest share), ``replayed source`` (of another training source), ``general`` (eval data no
    source trains on: eval_files or eval_texts), or ``all eval data``."""
    shares = target_shares(run)
    name = member(change.key)
    if change.key == EVAL_KEY:
        return "general" if shares and not run.keys(EVAL_KEY + "/") else "all eval data"
    if name in GENERAL_SETS:
        return "general"
    if name in shares:
        return "domain" if shares[name] == max(shares.values()) else "replayed source"
    return "eval set"


def runtime(run: Run) -> tuple[float | None, str]:
    """Seconds of training and where the number comes from."""
    v = run.extras.get("train_runtime_s")
    if is_num(v) and math.isfinite(v):
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
        start, end = ((run.path / n).stat().st_mtime for n in ("config.yaml", "metrics.jsonl"))
        wall = end - start
    except OSError:
        wall = 0.0
    if wall > 0:
        return wall, "file times: config.yaml written to last metrics.jsonl write"
    return None, "not recorded"


def optimizer_split(run: Run) -> list[tuple[str, str | None]]:
    """How the trainable parameters are split between Muon and AdamW: parts of a sentence, each
    with the metric it shows (None where it comes from config.yaml)."""
    muon, adamw = run.extras.get("muon_params"), run.extras.get("adamw_params")
    if is_num(muon) and is_num(adamw) and muon + adamw > 0:
        total = muon + adamw
        if not muon:
            everything = f"AdamW: all {int(adamw):,} trainable parameters"
            return [(everything, "adamw_params"), ("Muon: off", "muon_params")]
        return [
            (f"Muon: {int(muon):,} ({100 * muon / total:.1f}%)", "muon_params"),
            (f"AdamW: {int(adamw):,} ({100 * adamw / total:.1f}%)", "adamw_params"),
        ]
    use_muon = (run.config or {}).get("use_muon_optimizer")
    if use_muon is True:
        return [("Muon for hidden matrices + AdamW for the rest (counts not logged)", None)]
    if use_muon is False:
        return [("AdamW for all parameters (counts not logged)", None)]
    return [("not recorded", None)]


def target_shares(run: Run) -> dict[str, float]:
    """The token share each training source was given: its ``weight`` in config.yaml's
    ``sources`` (1.0 when unset) over the sum of all weights, as the trainer's mixture does."""
    sources = (run.config or {}).get("sources") or []
    weights = {
        str(s["name"]): float(s.get("weight", 1.0))
        for s in sources
        if isinstance(s, dict) and "name" in s and is_num(s.get("weight", 1.0))
    }
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()} if total > 0 else {}


# lm-eval metrics where a smaller value is better; every other downstream score is higher-better.
_SMALLER_IS_BETTER = ("perplexity", "bits_per_byte", "ter")


@dataclass
class ScoreChange:
    """One downstream score (``downstream/<task>/<metric>``) at its first and its last eval, with
    lm-eval's standard errors when logged, and a verdict: ``better``, ``worse``, ``same`` (within
    noise: the change is at most twice the standard error of the difference, about a 95% interval;
    without stderr, an exact tie) or ``single`` (one eval only)."""

    key: str
    before: float
    before_step: int
    after: float
    after_step: int
    noise: float | None = None  # 2 x sqrt(se_before^2 + se_after^2)

    def __post_init__(self):
        self.task, _, self.metric = member(self.key).partition("/")
        self.delta = self.after - self.before
        self.single = self.before_step == self.after_step
        metric = self.metric.partition("@")[0]
        self.higher_is_better = not any(metric.endswith(n) for n in _SMALLER_IS_BETTER)
        if self.single:
            self.verdict = "single"
        elif self.delta == 0 or (self.noise is not None and abs(self.delta) <= self.noise):
            self.verdict = "same"
        else:
            self.verdict = "better" if (self.delta > 0) == self.higher_is_better else "worse"


def score_changes(run: Run) -> list[ScoreChange]:
    """Each downstream score of ``run`` (stderr entries aside), first eval against last."""
    out = []
    for key in run.keys(DOWNSTREAM):
        task_metric = member(key)
        metric = task_metric.partition("/")[2]
        if "_stderr" in metric:
            continue
        steps, values = run.series(key, "eval")
        if not steps:
            continue
        name, _, filt = key.partition("@")
        se = dict(zip(*run.series(name + "_stderr" + (f"@{filt}" if filt else ""), "eval")))
        noise = None
        if steps[0] in se and steps[-1] in se:
            noise = 2 * math.sqrt(se[steps[0]] ** 2 + se[steps[-1]] ** 2)
        out.append(ScoreChange(key, values[0], steps[0], values[-1], steps[-1], noise))
    return out


def setup_used(run: Run) -> list[tuple[str, str, str]]:
    """``(what, value, metric)`` of the attention kernel, precision and torch.compile the run
    used, as the trainer logged them at step 0 (not the config's wishes)."""
    rows = []
    for key in ("attention", "precision", "torch_compile"):
        v = run.extras.get(key)
        label = getattr(describe(key), "label", key)
        text = "not recorded (a run from before qwen-cpt logged it)" if v is None else v
        if isinstance(v, bool):
            text = "on" if v else "off"
        rows.append((label, str(text), key))
    return rows
