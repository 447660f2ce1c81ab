"""Metric sinks behind one interface: the loop calls ``trackers.log(metrics, step)`` and never
asks which ones are on. A sink that fails (to start, to log or to close) gives one warning and is
switched off; it never kills a run, and ``metrics.jsonl`` keeps the full record either way.

Metric names are flat in ``metrics.jsonl`` (``loss``, ``lr``, ``eval_loss``, ``eval_loss/domain``
...). TensorBoard and W&B get them namespaced by :func:`namespaced`: ``eval_<name>`` goes to
``eval/<name>`` (so ``eval_loss/domain`` becomes ``eval/loss/domain``), everything else to
``train/<name>``.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from pathlib import Path
from typing import Any

log = logging.getLogger("qwen_cpt")


def namespaced(key: str) -> str:
    """The TensorBoard/W&B name of a flat metric name (idempotent)."""
    if key.startswith(("train/", "eval/")):
        return key
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_") :]
    if key.startswith("train_"):
        return "train/" + key[len("train_") :]
    return "train/" + key


def scalars(metrics: dict[str, Any]) -> dict[str, int | float]:
    """The real-number entries of ``metrics`` (bools, strings and None left out)."""
    out: dict[str, int | float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        out[k] = int(v) if isinstance(v, numbers.Integral) else float(v)
    return out


class Tracker:
    """Do-nothing base: subclasses override what they need."""

    name = "tracker"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlTracker(Tracker):
    """``metrics.jsonl``: one JSON object per line, flushed at once (survives a crash).

    Non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so every line
    stays strict JSON.
    """

    name = "metrics.jsonl"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardTracker(Tracker):
    """TensorBoard scalars under ``train/...`` and ``eval/...``; the config as a text table."""

    name = "tensorboard"

    def __init__(self, logdir: str | Path, config: dict[str, Any] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))
        if config:
            rows = "\n".join(f"| {k} | `{v!r}` |" for k, v in config.items())
            self.writer.add_text("config", "| field | value |\n|---|---|\n" + rows, 0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in scalars(metrics).items():
            self.writer.add_scalar(namespaced(k), v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """Weights & Biases; honours WANDB_MODE=offline (the run directory then holds the history)."""

    name = "wandb"

    def __init__(
        self,
        project: str,
        run_name: str | None,
        directory: str | Path,
        config: dict,
        run_id: str | None = None,
    ):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            name=run_name,
            dir=str(directory),
            config=config,
            reinit="finish_previous",
            **({"id": run_id, "resume": "allow"} if run_id else {}),
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        data = {namespaced(k): v for k, v in scalars(metrics).items()}
        if data:
            self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers(Tracker):
    """A container of trackers that isolates each one's failures.

    The first exception a tracker raises in :meth:`log` is reported in one warning, the tracker
    is closed (best effort) and dropped, and the others go on logging.
    """

    name = "trackers"

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def state_dict(self) -> dict:
        """What a resume needs to continue the same runs: the W&B run id."""
        ids = [t.run.id for t in self.trackers if isinstance(t, WandbTracker)]
        return {"wandb_run_id": ids[0] if ids else None}

    def load_state_dict(self, state: dict) -> None:
        self.resumed = state  # read by build_trackers (the trackers start after a resume loads)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for t in list(self.trackers):
            try:
                t.log(metrics, step)
            except Exception as exc:  # a sink must never kill training
                self.trackers.remove(t)
                rest = ", ".join(self.names) or "none"
                log.warning(
                    "tracker %s failed at step %d and is switched off (%s: %s); training goes "
                    "on, still logging to: %s",
                    t.name,
                    step,
                    type(exc).__name__,
                    exc,
                    rest,
                )
                try:
                    t.close()
                except Exception:  # already reported; its close may fail for the same reason
                    pass

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close()
            except Exception as exc:
                log.warning("tracker %s failed to close (%s: %s)", t.name, type(exc).__name__, exc)


def build_trackers(cfg, output_dir: Path, state: dict | None = None) -> Trackers:
    """``metrics.jsonl`` always, TensorBoard when ``cfg.use_tensorboard``, W&B when
    ``cfg.wandb_project`` is set. A sink that cannot start is left out with one warning.
    ``state``: a resumed run's :meth:`Trackers.state_dict` (W&B then continues its run)."""
    output_dir = Path(output_dir)
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    trackers: list[Tracker] = []
    try:
        trackers.append(JsonlTracker(output_dir / "metrics.jsonl"))
    except OSError as exc:
        log.warning("metrics.jsonl logging is off: %s", exc)
    if getattr(cfg, "use_tensorboard", False):
        logdir = getattr(cfg, "resolved_logging_dir", None) or output_dir / "logs"
        try:
            trackers.append(TensorBoardTracker(logdir, config))
        except ImportError as exc:
            log.warning("TensorBoard logging is off: %s (pip install tensorboard)", exc)
        except Exception as exc:
            log.warning("TensorBoard logging is off (%s: %s)", type(exc).__name__, exc)
    project = getattr(cfg, "wandb_project", None)
    if project:
        try:
            trackers.append(
                WandbTracker(
                    project,
                    getattr(cfg, "wandb_run_name", None),
                    output_dir,
                    config,
                    (state or {}).get("wandb_run_id"),
                )
            )
        except ImportError:
            log.warning(
                "wandb_project is set but wandb is not installed, so W&B logging is off: "
                "pip install 'qwen-cpt[wandb]'"
            )
        except Exception as exc:
            log.warning(
                "Weights & Biases logging is off (%s: %s); set WANDB_MODE=offline to log "
                "without an account and sync later",
                type(exc).__name__,
                exc,
            )
    return Trackers(trackers)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a crashed run logged after the checkpoint a resume starts from."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by the crash
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
