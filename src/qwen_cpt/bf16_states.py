"""bf16 optimizer states (``optimizer_states: bf16``): AdamW with bf16 moments, rounded
stochastically.

PyTorch's AdamW keeps its moments in the parameters' dtype (fp32 here: 8 B per parameter), and
torchao's and bitsandbytes' AdamWs offer 8-bit or 4-bit moments, or bf16 moments only for bf16
parameters. This one keeps fp32 master weights and gradients, and holds the two moments in bf16
(4 B per parameter). Each step reads them into fp32, updates them and the weights in fp32 with
exactly torch's single-tensor AdamW arithmetic (with fp32 states it is bitwise torch's, which
tests/test_optimizer_states.py checks), and writes them back with stochastic rounding.

Why stochastic: bf16 keeps 8 significant bits, a relative spacing of 2^-8 to 2^-7. With
``beta2 = 0.95`` the second moment moves by 5% of the gap to g^2 per step, enough for nearest
rounding; with ``beta2 = 0.999`` an update under half the spacing is rounded away and v would
stall forever. Stochastic rounding (Gupta et al. 2015, arXiv 1502.02551; Zamirai et al. 2020,
"Revisiting BFloat16 Training", arXiv 2010.06192) rounds up with probability equal to the
dropped fraction, so the stored moment is right in expectation and small updates accumulate.

The rounding noise comes from a generator seeded by (seed, step, parameter index), so a resumed
run draws the same noise as a straight one and resumes exactly.
"""

from __future__ import annotations

import torch

# elements per slice of a tensor read into fp32 at a time: the step's temporaries are a few
# slices (about 24 B per element), not a copy of the largest tensor
SLICE = 1 << 22
# bytes per element of one slice that the step holds at once: fp32 m and v (8), sqrt(v) and
# the denominator (8), and the rounding's random bits and noise (8)
SLICE_BYTES = 24


def stochastic_round_(
    out: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None = None, noise=None
) -> None:
    """``out`` (bf16) := ``src`` (fp32) rounded to bf16 up or down at random, up with the
    probability of the dropped low 16 bits' fraction (sign-magnitude, so away from zero for
    negative values too). Exact values stay exact; inf stays inf and a quiet NaN (what
    arithmetic produces) NaN; a finite value beyond bf16's range may round to inf, as rounding
    to nearest does. ``noise``: int32 values in [0, 2^16) to use, else drawn from
    ``generator``."""
    if noise is None:
        noise = torch.randint(
            0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator
        )
    noise.add_(src.view(torch.int32)).bitwise_and_(-65536)  # 0xFFFF0000: the bf16 part
    out.copy_(noise.view(torch.float32))  # exact: the low 16 bits are zero


def _slices(n: int):
    for start in range(0, n, SLICE):
        yield slice(start, min(start + SLICE, n))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class AdamWBF16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with its moments stored in
    ``state_dtype`` (bf16, stochastically rounded; fp32 gives torch's AdamW bitwise).

    ``seed`` seeds the rounding noise together with the step and the parameter's index.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        state_dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
    ):
        if state_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"state_dtype must be bfloat16 or float32, got {state_dtype}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self.seed = seed

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        keep_dtype(self, ("exp_avg", "exp_avg_sq"), self.state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is not None:
                    self._step_one(p, group, index)
        return loss

    def _step_one(self, p: torch.Tensor, group: dict, index: int) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(
                    p, dtype=self.state_dtype, memory_format=torch.preserve_format
                )
        state["step"] += 1
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        param, grad = _local(p), _local(p.grad)
        m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        if not (param.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            raise ValueError("AdamWBF16 needs contiguous parameters and states")
        gen = None
        if self.state_dtype == torch.bfloat16:
            gen = torch.Generator(device=param.device)
            gen.manual_seed(_seed(self.seed, step, index))
        param.mul_(1 - lr * group["weight_decay"])
        flat = [t.view(-1) for t in (param, grad.contiguous(), m, v)]
        for s in _slices(param.numel()):
            pf, gf, mf, vf = (t[s] for t in flat)
            m32, v32 = mf.float(), vf.float()  # the states themselves when they are fp32
            m32.lerp_(gf, 1 - beta1)
            v32.mul_(beta2).addcmul_(gf, gf, value=1 - beta2)
            denom = (v32.sqrt() / bias_correction2_sqrt).add_(eps)
            pf.addcdiv_(m32, denom, value=-step_size)
            if gen is not None:  # one draw of 32 random bits: 16 for m, 16 for v
                bits = torch.randint(
                    -(1 << 31), 1 << 31, pf.shape, dtype=torch.int32, device=pf.device,
                    generator=gen,
                )  # fmt: skip
                stochastic_round_(mf, m32, noise=bits.bitwise_right_shift(16).bitwise_and_(0xFFFF))
                stochastic_round_(vf, v32, noise=bits.bitwise_and_(0xFFFF))


def keep_dtype(optimizer: torch.optim.Optimizer, keys: tuple[str, ...], dtype) -> None:
    """Cast the ``keys`` states of ``optimizer`` back to ``dtype``: ``Optimizer.load_state_dict``
    casts every state tensor but ``step`` to its parameter's dtype, which would turn loaded
    bf16 moments into fp32 ones (twice the memory, and no more rounding)."""
    for state in optimizer.state.values():
        for key in keys:
            if key in state and state[key].dtype != dtype:
                state[key] = state[key].to(dtype)


def evaluate_closure(closure):
    """An optimizer's ``step(closure)`` contract: the loss, computed with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _seed(seed: int, step: int, index: int) -> int:
    """A generator seed from the run's seed, the step and the parameter's index (63 bits)."""
    return hash((seed, step, index)) & (2**63 - 1)
