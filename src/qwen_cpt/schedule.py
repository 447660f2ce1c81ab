"""Learning-rate schedules as pure functions of the step (nanoGPT style)."""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int,
    kind: str = "cosine",
    min_ratio: float = 0.0,
    decay_ratio: float = 0.1,
) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based).

    1) linear warmup: (step + 1) / warmup_steps, so the first step already moves the weights;
    2) then ``constant`` (1.0), ``cosine`` (from 1 down to ``min_ratio`` at ``total_steps``), or
       ``wsd``: warmup-stable-decay, flat at 1.0 until the last ``decay_ratio`` of the steps, then
       linear down to ``min_ratio``. WSD makes a later continuation easy: resume from a
       checkpoint taken before the decay (Ibrahim et al. 2024, arXiv 2403.08763).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "wsd":
        decay_steps = max(1, round(total_steps * decay_ratio))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


class Schedule:
    """The run's learning-rate schedule: sets every param group's ``lr`` for a step.

    Its state is its shape; the lr is a pure function of the step, so a resume needs nothing
    else. A resume whose config gives another shape (say a larger ``max_steps``) follows the
    new config, and says so.
    """

    def __init__(self, total_steps: int, warmup_steps: int, kind: str, min_ratio: float, decay):
        self.shape = dict(
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            kind=kind,
            min_ratio=min_ratio,
            decay_ratio=decay,
        )

    def multiplier(self, step: int) -> float:
        return lr_multiplier(step, **self.shape)

    def apply(self, optimizers, step: int) -> float:
        """Set the lr of ``step`` (0-based) on every optimizer; return the multiplier."""
        mult = self.multiplier(step)
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * mult
        return mult

    def state_dict(self) -> dict:
        return dict(self.shape)

    def load_state_dict(self, state: dict) -> None:
        if state != self.shape:
            import logging

            logging.getLogger("qwen_cpt").info(
                "lr schedule: the checkpoint's was %s, this run follows its config: %s",
                state,
                self.shape,
            )
