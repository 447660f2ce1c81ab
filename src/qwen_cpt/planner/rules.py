"""Learning-rate and batch-size rules.

Sources (docs/design.md, "Learning rate and batch size"):
- Step Law, Li et al. 2025 (arXiv 2503.04715): lr and batch from N (non-embedding) and D (tokens),
  fitted on AdamW training *from scratch*.
- DeepSeek LLM, 2024 (arXiv 2401.02954): lr and batch from the compute budget C.
- Ibrahim et al. 2024 (arXiv 2403.08763): continued pretraining re-warms the learning rate and
  re-decays it; the peak stays well below a from-scratch optimum to limit forgetting.
"""

from __future__ import annotations

import math

from .base import _positive

# --- learning rate ---------------------------------------------------------------------------------

SPEC_LR_TABLE = {"7B": 5e-5, "14B": 3e-5, "32B": 2e-5}  # the product spec's own anchors


def lr_spec(n_params: float) -> float:
    """The product spec's rule: ``5e-5 * (N / 7e9) ** -0.25``, N = total parameters.

    Its own table (7B 5e-5, 14B 3e-5, 32B 2e-5) falls faster than N^-0.25 (which would give
    4.2e-5 at 14B and 3.4e-5 at 32B), so the two disagree above 7B; the planner shows both.
    """
    _positive(n_params=n_params)
    return 5e-5 * (n_params / 7e9) ** -0.25


def lr_step_law(n_non_embedding: float, tokens: float) -> float:
    """Step Law (arXiv 2503.04715): ``eta_opt = 1.79 * N**-0.713 * D**0.307``.

    N = non-embedding parameters, D = training tokens; fitted on AdamW from scratch, so for
    continued pretraining it is an upper bound, not a target.
    """
    _positive(n_non_embedding=n_non_embedding, tokens=tokens)
    return 1.79 * n_non_embedding**-0.713 * tokens**0.307


def lr_deepseek(compute: float) -> float:
    """DeepSeek LLM (arXiv 2401.02954): ``eta_opt = 0.3118 * C**-0.125``, C in FLOPs."""
    _positive(compute=compute)
    return 0.3118 * compute**-0.125


def recommend_lr(n_params: float, n_non_embedding: float, tokens: float) -> tuple[float, str]:
    """The default CPT rule: the spec's rule, capped by Step Law, ``min(spec, step_law)``.

    Why: continued pretraining re-warms and re-decays the learning rate from a trained model,
    and a peak well below the from-scratch optimum limits forgetting (Ibrahim et al. 2024,
    arXiv 2403.08763). The spec's N^-0.25 rule gives CPT-sized rates (5e-5 at 7B); Step Law's
    from-scratch optimum can only be an upper bound, and it binds when D is small.
    """
    spec = lr_spec(n_params)
    step = lr_step_law(n_non_embedding, tokens)
    if spec <= step:
        return spec, f"spec 5e-5*(N/7e9)^-0.25 = {spec:.3g} (below the Step Law cap {step:.3g})"
    return step, f"Step Law cap 1.79*N^-0.713*D^0.307 = {step:.3g} (spec rule gives {spec:.3g})"


# --- batch size ------------------------------------------------------------------------------------


def batch_step_law(tokens: float) -> float:
    """Step Law (arXiv 2503.04715): ``B_opt = 0.58 * D**0.571`` tokens per optimizer step."""
    _positive(tokens=tokens)
    return 0.58 * tokens**0.571


def batch_step_law_for_steps(max_steps: int) -> float:
    """Step Law's B when the run is fixed at ``max_steps`` (D = steps * B, solved for B).

    ``B = 0.58 * (steps * B)**0.571``  =>  ``B = (0.58 * steps**0.571) ** (1 / 0.429)``.
    """
    _positive(max_steps=max_steps)
    return (0.58 * max_steps**0.571) ** (1 / (1 - 0.571))


def batch_spec(n_params: float, tokens: float) -> float:
    """The product spec's "effective batch proportional to (N*D)**0.4".

    The spec gives no constant and no unit (tokens? sequences?): taken as tokens it is 9e7 for
    7B on 1e10 tokens, far beyond any published optimum. Shown for reference, never used.
    """
    _positive(n_params=n_params, tokens=tokens)
    return (n_params * tokens) ** 0.4


def batch_deepseek(compute: float) -> float:
    """DeepSeek LLM (arXiv 2401.02954): ``B_opt = 0.2920 * C**0.3271`` tokens."""
    _positive(compute=compute)
    return 0.2920 * compute**0.3271


def split_batch(
    global_tokens: float, max_length: int, world_size: int, max_micro: int
) -> tuple[int, int]:
    """``(micro_batch, accumulation)`` per device for a global batch of ``global_tokens``.

    The global batch is rounded to whole sequences on every device (at least one each); the
    micro-batch is as large as memory allows (``max_micro``), and then evened out so that
    ``micro * accumulation`` overshoots the target by less than one accumulation step.
    """
    _positive(max_length=max_length, world_size=world_size)
    per_device = max(1, round(global_tokens / max_length / world_size))
    micro = max(1, min(max_micro, per_device))
    accum = math.ceil(per_device / micro)
    return math.ceil(per_device / accum), accum
