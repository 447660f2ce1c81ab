"""What the trainer's start-up measurement (qwen_cpt.autotune) finds for full-size shapes.

    python benchmarks/kernel_choice.py                         # CUDA: 0.5B and 7B shapes, seq 4096
    python benchmarks/kernel_choice.py --models tiny 0.5B --seq 2048   # e.g. on a CPU

For each model shape it builds the model on the meta device (no memory, no download), then the
trainer's probe: one decoder layer with random weights on the device, bf16 autocast where the
device has it, and a batch of packed blocks whose documents have ``--doc-tokens`` tokens on
average (lengths drawn from an exponential distribution, seed 0, so about one boundary per
``--doc-tokens`` tokens, as in a run on short web or code documents). It prints one markdown row
per shape and candidate: the exactness check against eager attention, the seconds per
micro-batch (one mask build + layers x forward/backward of one layer), and compile's effect.

Candidates are those ``attention_implementation: auto`` measures: SDPA and FlexAttention on CUDA.
On a CPU, FlexAttention cannot run backward, so eager attention stands in as a second candidate;
compile is measured with the chosen attention (on a CPU, the figure behind its default there).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from gpu_bench import SHAPES, build_model  # noqa: E402

from qwen_cpt import autotune  # noqa: E402
from qwen_cpt.model import cpu_has_native_bf16, enable_activation_checkpointing  # noqa: E402


def packed_positions(batch: int, seq: int, doc_tokens: float) -> tuple[torch.Tensor, int]:
    gen = torch.Generator().manual_seed(0)
    rows, docs = [], 0
    for _ in range(batch):
        parts, left = [], seq
        while left > 0:
            n = max(1, min(left, int(torch.empty(1).exponential_(1 / doc_tokens, generator=gen))))
            parts.append(torch.arange(n))
            left -= n
        rows.append(torch.cat(parts))
        docs += len(parts)
    return torch.stack(rows), docs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["0.5B", "7B"], choices=list(SHAPES))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--doc-tokens", type=float, default=1024.0)
    ap.add_argument("--checkpointing", action="store_true", help="as use_gradient_checkpointing")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile measurement")
    a = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # rows survive a timeout

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    dtype = torch.bfloat16 if bf16 else None
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    candidates = autotune.AUTO_CANDIDATES if device.type == "cuda" else ("sdpa", "eager")
    pos, docs = packed_positions(a.batch, a.seq, a.doc_tokens)
    print(
        f"# {where or device.type}, torch {torch.__version__}, {'bf16' if dtype else 'fp32'}; "
        f"batch {a.batch} x {a.seq} tokens, {docs} documents; "
        f"checkpointing {'on' if a.checkpointing else 'off'}\n"
    )
    print("| model | attention | exact vs eager | ms / micro-batch | compiled ms | choice |")
    print("|---|---|---|---:|---:|---|")
    for name in a.models:
        model = build_model(name, "meta").train()  # no memory: the probe builds one layer
        if a.checkpointing:
            enable_activation_checkpointing(model)  # as the trainer does
        probe = autotune.make_probe(model, pos, device, dtype)
        t0 = time.perf_counter()
        best, times = autotune.choose_attention(probe, candidates)
        compiled = {}  # the trainer compiles with the chosen attention only
        if best is not None and not a.no_compile:
            compiled[best] = autotune.choose_compile(probe)  # (use, eager s, compiled s)
        for impl in candidates:
            problem = autotune.check_attention(probe, impl)
            ms = "-" if times[impl] is None else f"{times[impl] * 1e3:.1f}"
            c = compiled.get(impl, (None, None, None))[2]
            cms = "-" if c is None else f"{c * 1e3:.1f}"
            print(
                f"| {name} | {impl} | {'yes' if problem is None else 'no: ' + problem[:60]} "
                f"| {ms} | {cms} | {'<- attention' if impl == best else ''} |"
            )
        if best in compiled and compiled[best][2] is not None:
            use, eager, comp = compiled[best]
            print(
                f"| {name} | compile, with {best} | | {eager * 1e3:.1f} | {comp * 1e3:.1f} "
                f"| compile {'on' if use else 'off'} ({eager / comp:.2f}x) |"
            )
        print(f"<!-- {name}: measured in {time.perf_counter() - t0:.0f} s -->")
        del probe, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
