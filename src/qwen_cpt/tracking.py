"""Metric sinks behind one interface: the loop calls ``trackers.log(metrics, step)`` and never
asks which ones are on. A sink that fails warns once and is switched off; it never kills a run.

Metric names are flat (``loss``, ``lr``, ``eval_loss`` ...). TensorBoard and W&B get them under
``train/...`` and ``eval/...``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("qwen_cpt")


def namespaced(key: str) -> str:
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_") :]
    return "train/" + key


class Tracker:
    """Do-nothing base: subclasses override what they need."""

    name = "tracker"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlTracker(Tracker):
    """``metrics.jsonl``: one JSON object per line, flushed at once (survives a crash)."""

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
    name = "tensorboard"

    def __init__(self, logdir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(namespaced(k), v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """Weights & Biases; honours WANDB_MODE=offline (the run directory then holds the history)."""

    name = "wandb"

    def __init__(self, project: str, run_name: str | None, directory: str | Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            name=run_name,
            dir=str(directory),
            config=config,
            reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        data = {namespaced(k): v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers(Tracker):
    """A container of trackers that isolates each one's failures."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for t in list(self.trackers):
            try:
                t.log(metrics, step)
            except Exception as exc:  # a sink must never kill training
                log.warning("tracker %s failed and is switched off: %s", t.name, exc)
                self.trackers.remove(t)

    def close(self) -> None:
        for t in self.trackers:
            try:
                t.close()
            except Exception as exc:
                log.warning("tracker %s failed to close: %s", t.name, exc)


def build_trackers(cfg, output_dir: Path) -> Trackers:
    trackers: list[Tracker] = [JsonlTracker(output_dir / "metrics.jsonl")]
    if cfg.use_tensorboard:
        try:
            trackers.append(TensorBoardTracker(cfg.resolved_logging_dir))
        except Exception as exc:
            log.warning("TensorBoard logging is off: %s (pip install tensorboard)", exc)
    if cfg.wandb_project:
        try:
            trackers.append(
                WandbTracker(cfg.wandb_project, cfg.wandb_run_name, output_dir, cfg.to_dict())
            )
        except ImportError:
            log.warning(
                "wandb_project is set but wandb is not installed: pip install qwen-cpt[wandb]"
            )
        except Exception as exc:
            log.warning("Weights & Biases logging is off: %s", exc)
    return Trackers(trackers)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
