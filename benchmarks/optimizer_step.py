"""``optimizer.step()`` alone, fp32 vs bf16 optimizer states, on CPU (or CUDA with --device).

    .venv/bin/python benchmarks/optimizer_step.py [--device cuda] [--steps 6]

The tensors have the shapes of the h256 model of ``memory_estimate.py`` (151,936 x 256
embedding, 4 layers of attention and MLP matrices, norm gains; no biases: 41.6M parameters),
with fixed random gradients. It prints the median step time of:

- ``torch.optim.AdamW(fused=True)``, the trainer's fp32 AdamW;
- :class:`qwen_cpt.bf16_states.AdamWBF16` with fp32 states (torch's arithmetic, bitwise) and
  with bf16 states (``optimizer_states: bf16``);
- ``torch.optim.Muon`` and :class:`qwen_cpt.muon.DistributedMuon` with bf16 momentum, on the
  hidden matrices only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwen_cpt.bf16_states import AdamWBF16
from qwen_cpt.muon import DistributedMuon

MATRICES = [(256, 256)] * 8 + [(704, 256), (256, 704), (704, 256)] * 4
SHAPES = [(151936, 256), *MATRICES, *[(256,)] * 9]


def median_step(make, shapes, device: str, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_(True) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    opt = make(params)
    opt.step()  # states allocated
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    adamw = dict(lr=1e-3, weight_decay=0.1)
    muon = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    cases = [
        ("torch.optim.AdamW(fused=True)", SHAPES,
         lambda ps: torch.optim.AdamW(ps, fused=True, **adamw)),
        ("AdamWBF16, fp32 states", SHAPES,
         lambda ps: AdamWBF16(ps, state_dtype=torch.float32, **adamw)),
        ("AdamWBF16, bf16 states", SHAPES, lambda ps: AdamWBF16(ps, **adamw)),
        ("torch.optim.Muon (matrices)", MATRICES, lambda ps: torch.optim.Muon(ps, **muon)),
        ("DistributedMuon, bf16 momentum (matrices)", MATRICES,
         lambda ps: DistributedMuon(ps, momentum_dtype=torch.bfloat16, **muon)),
    ]  # fmt: skip
    print(f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| optimizer | parameters | step (s) |\n|---|---|---|")
    for name, shapes, make in cases:
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"| {name} | {n:,} | {median_step(make, shapes, args.device, args.steps):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
