"""GPU throughput, MFU and peak memory: an HF-Trainer-style step vs qwen-cpt's, at sequence 4096.

    python benchmarks/gpu_bench.py               # on one CUDA GPU; stops starting cases after 480 s
    python benchmarks/gpu_bench.py --dry-run     # on CPU: a tiny model, 2 steps per case
    python benchmarks/gpu_bench.py --models 0.5B --cases hf ours --accum 4

Models are built from config with random weights (no download), with the shapes of
Qwen2.5-0.5B and Qwen2.5-7B (docs/design.md, "Qwen2.5 shapes and tokenizer ids"), fp32 master
weights and bf16 autocast. Each case runs in its own subprocess, so one case's memory or an
out-of-memory never affects the next, and writes one markdown row to stdout:

- ``hf``: what ``transformers.Trainer`` does with ``bf16=True`` and run_clm's data: SDPA with a
  plain causal mask (``attention_mask`` of ones), the model's own loss over full logits, fused
  AdamW (its default ``adamw_torch_fused``), grad clipping 1.0, no activation checkpointing;
- ``hf+ckpt``: the same with ``gradient_checkpointing=True`` (what a 7B run on one GPU needs);
- ``ours``: qwen-cpt's step: Muon on the hidden matrices + AdamW on the rest, the fused chunked
  loss, SDPA on document-aware packed blocks (position_ids restart per document, the
  block-causal mask), each decoder layer ``torch.compile``d, activation checkpointing where the
  model needs it (7B: every layer; 0.5B: none);
- ``ours-adamw``: ``ours`` with AdamW instead of Muon, to separate the optimizer's cost;
- ``ours-flex``: ``ours`` with ``flex_attention`` instead of SDPA on the same packed blocks
  (transformers builds its block mask from the restarting ``position_ids``), to decide which
  attention the trainer should pick on a GPU without flash-attn. Not in ``--dry-run``: in torch
  2.13 FlexAttention has no backward on a CPU;
- ``ours-liger``: ``ours`` with Liger-Kernel's fused linear cross-entropy, RMSNorm, SwiGLU and
  RoPE (``qwen_cpt.kernels``, each checked against PyTorch first); it needs liger-kernel, which
  the lent machine lacks unless carried as a wheel (see benchmarks/device_checks.sh).

Every optimizer step takes ``--accum`` micro-batches of 1 x 4096 tokens (default 8: 32k tokens
per step; Muon's Newton-Schulz costs about 0.53 PFLOP per 7B step, so tokens per step matter:
docs/design.md, "Muon"). Throughput is measured over ``--steps`` optimizer steps after
``--warmup`` steps (which include compilation). MFU uses qwen_cpt.perf: torchtitan's model FLOPs
per token (recomputation not counted) over the bf16 dense peak (989 TFLOP/s on H100/H200); the
table also gives it against the 790 TFLOP/s that a bf16 8192^3 matmul reached on this
workplace's H200.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

MEASURED_H200_TFLOPS = 790.0
SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, tied
    "0.5B": (896, 4864, 24, 14, 2, 151936, True),
    "7B": (3584, 18944, 28, 28, 4, 152064, False),
    "tiny": (64, 176, 2, 4, 2, 151936, True),  # --dry-run
}
CKPT = {"0.5B": 0, "7B": 1, "tiny": 1}  # ours: checkpoint every k-th layer (0: none)
CASES = ("hf", "hf+ckpt", "ours", "ours-adamw", "ours-flex", "ours-liger")
CPU_CASES = CASES[:4]  # FlexAttention has no backward on a CPU (torch 2.13)
DEFAULT_PLAN = [  # most wanted first: cases left when the time budget runs out are skipped
    ("0.5B", "hf"),
    ("0.5B", "ours"),
    ("7B", "ours"),
    ("7B", "hf+ckpt"),
    ("0.5B", "ours-liger"),
    ("0.5B", "ours-flex"),  # benchmarks/kernel_choice.py also measures SDPA vs FlexAttention
]


def build_model(name: str, device, attn: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    h, inter, layers, heads, kv, vocab, tied = SHAPES[name]
    config = Qwen2Config(
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=151643,
        pad_token_id=151643,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attn
        )
    model.config.use_cache = False
    return model


def make_batch(seq: int, vocab: int, device, packed: bool, gen):
    """Random tokens; ``packed``: documents of 256..2048 tokens with restarting positions."""
    import torch

    ids = torch.randint(0, min(vocab, 151643), (1, seq), generator=gen)
    labels = ids.clone()
    if packed:
        pos, start = [], 0
        while start < seq:
            n = int(torch.randint(256, 2049, (1,), generator=gen))
            n = min(n, seq - start)
            pos += list(range(n))
            labels[0, start] = -100  # a document's first token: no cross-document context
            start += n
        position_ids = torch.tensor([pos])
    else:
        position_ids = None
    batch = {"input_ids": ids, "labels": labels}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return {k: v.to(device) for k, v in batch.items()}


def run_case(a: dict) -> dict:
    import torch

    from qwen_cpt import perf
    from qwen_cpt.loss import lm_loss_sum
    from qwen_cpt.model import enable_activation_checkpointing, resolve_runtime
    from qwen_cpt.optim import build_optimizers

    dry = a["dry_run"]
    device = torch.device("cpu" if dry else "cuda")
    runtime = resolve_runtime(str(device), use_bf16=not dry, use_flash_attention=False)
    case, name, seq, accum = a["case"], a["model"], a["seq"], a["accum"]
    ours = case.startswith("ours")
    out = {"model": name, "case": case, "seq": seq, "accum": accum}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_model(name, device, "flex_attention" if case == "ours-flex" else "sdpa")
    model.train()
    out["build_s"] = time.perf_counter() - t0
    fused_ce = None
    if case == "ours-liger":
        from qwen_cpt.kernels import enable_liger

        fused_ce = enable_liger(model, device)
        if fused_ce is None:  # the log above says why (not installed, or failed its check)
            raise RuntimeError("ours-liger: Liger's fused linear cross-entropy is not in use")
    if ours:
        if CKPT[name]:
            enable_activation_checkpointing(model, CKPT[name])
        perf.compile_decoder_layers(model, **({"backend": "aot_eager"} if dry else {}))
    elif case == "hf+ckpt":
        enable_activation_checkpointing(model, 1)

    class Cfg:  # the CPTConfig fields build_optimizers reads
        use_muon_optimizer = case in ("ours", "ours-flex", "ours-liger")
        learning_rate = 1e-5
        weight_decay = 0.1
        muon_momentum = 0.95
        adam_beta1, adam_beta2, adam_epsilon = 0.9, 0.95, 1e-8

    opts = build_optimizers(model, Cfg)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    fpt = perf.model_flops_per_token(model.config, seq)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step() -> float:
        """One optimizer step of ``accum`` micro-batches; returns the optimizer's seconds."""
        batches = [make_batch(seq, vocab, device, ours, gen) for _ in range(accum)]
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            with runtime.autocast:
                if ours:  # summed over the micro-batch, weighted by the step's token count
                    loss_sum = lm_loss_sum(model, b, True, 1024, fused_ce)
                    (loss_sum / n).backward()
                    last = loss_sum.detach() / int((b["labels"][:, 1:] != -100).sum())
                else:  # HF: the mean over the micro-batch, divided by the accumulation steps
                    loss = model(
                        input_ids=b["input_ids"],
                        attention_mask=torch.ones_like(b["input_ids"]),
                        labels=b["labels"],
                        use_cache=False,
                    ).loss
                    (loss / accum).backward()
                    last = loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sync()
        t = time.perf_counter()
        opts.step()
        sync()
        dt = time.perf_counter() - t
        opts.zero_grad()
        out["loss"] = float(last)  # the last micro-batch's mean token loss
        return dt

    try:
        t0 = time.perf_counter()
        for _ in range(a["warmup"]):
            step()
        sync()
        out["warmup_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        opt_s = [step() for _ in range(a["steps"])]
        sync()
        elapsed = time.perf_counter() - t0
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # compiled code may re-wrap an OOM
        if "out of memory" not in str(exc).lower():
            raise
        out["oom"] = str(exc).split("\n")[0][:160]
        if cuda:
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out
    tok_s = seq * accum * a["steps"] / elapsed
    out.update(
        tok_s=tok_s,
        step_s=elapsed / a["steps"],
        optimizer_s=sum(opt_s) / len(opt_s),
        tflops=perf.achieved_tflops(tok_s, fpt),
        flops_per_token=fpt,
    )
    peak = perf.peak_tflops(device)
    if peak:
        out["mfu"] = perf.mfu(tok_s, fpt, peak)
        out["peak_tflops"] = peak
        out["mfu_vs_790"] = perf.mfu(tok_s, fpt, MEASURED_H200_TFLOPS)
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    return out


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['model']} | {r['case']} | error: {r['error']} | | | | | | |"
    if "oom" in r:
        peak = f"{r.get('peak_gib', float('nan')):.1f} GiB at OOM"
        return f"| {r['model']} | {r['case']} | out of memory | | | | {peak} | | |"
    mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
    mfu790 = f"{r['mfu_vs_790']:.1%}" if "mfu_vs_790" in r else "n/a"
    peak = f"{r['peak_gib']:.1f} GiB" if "peak_gib" in r else "n/a (CPU)"
    return (
        f"| {r['model']} | {r['case']} | {r['tok_s']:,.0f} | {r['tflops']:.3g} | {mfu} | "
        f"{mfu790} | {peak} | {r['optimizer_s'] * 1e3:.0f} ms | {r['loss']:.3f} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps per case")
    ap.add_argument("--models", nargs="+", choices=[k for k in SHAPES if k != "tiny"])
    ap.add_argument("--cases", nargs="+", choices=CASES)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step")
    ap.add_argument("--warmup", type=int, default=2, help="steps before timing (compile)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    ap.add_argument("--budget-s", type=float, default=480, help="skip cases after this")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))), flush=True)
        return 0

    if args.dry_run:
        plan = [("tiny", c) for c in (args.cases or CPU_CASES)]
        seq, accum, warmup, steps = 128, 2, 1, 1
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_bench.py needs a CUDA GPU (use --dry-run to check it on CPU)")
        models = args.models or ["0.5B", "7B"]
        if args.cases:
            plan = [(m, c) for m in models for c in args.cases]
        else:
            plan = [(m, c) for m, c in DEFAULT_PLAN if m in models]
        seq, accum, warmup, steps = args.seq, args.accum, args.warmup, args.steps
    start = time.perf_counter()
    print(
        f"seq {seq}, {accum} micro-batches of 1 x {seq} tokens per optimizer step, "
        f"{warmup} warm-up + {steps} timed steps per case",
        flush=True,
    )
    results = []
    for name, case in plan:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            results.append({"model": name, "case": case, "error": "skipped: time budget spent"})
            continue
        payload = dict(
            model=name,
            case=case,
            seq=seq,
            accum=accum,
            warmup=warmup,
            steps=steps,
            dry_run=args.dry_run,
        )
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(payload)],
                capture_output=True,
                text=True,
                timeout=left,
                env=env,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                r = {"model": name, "case": case, "error": f"exit {proc.returncode}: {tail[:200]}"}
            else:
                r = json.loads(lines[-1])
        except subprocess.TimeoutExpired:
            r = {"model": name, "case": case, "error": "timed out (time budget)"}
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    gpu = next((r["gpu"] for r in results if "gpu" in r), "CPU (dry run)")
    print(f"\n{gpu}, {time.perf_counter() - start:.0f} s in all\n")
    print(
        "| model | case | tok/s | model TFLOP/s | MFU (bf16 peak) | MFU (vs 790) | peak memory "
        "| optimizer step | last loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))
    ok = [r for r in results if "tok_s" in r]
    for name in sorted({r["model"] for r in ok}):
        by = {r["case"]: r for r in ok if r["model"] == name}
        base = by.get("hf") or by.get("hf+ckpt")
        if base and "ours" in by:
            print(
                f"\n{name}: ours/{base['case']} throughput "
                f"{by['ours']['tok_s'] / base['tok_s']:.2f}x"
                + (
                    f", peak memory {by['ours']['peak_gib'] / base['peak_gib']:.2f}x"
                    if "peak_gib" in base
                    else ""
                )
            )
    return 0 if ok and all(math.isfinite(r["loss"]) for r in ok) else 1


if __name__ == "__main__":
    sys.exit(main())
