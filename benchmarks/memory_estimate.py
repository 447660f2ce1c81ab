"""Check the planner's memory estimate against the peak RSS of real CPTTrainer steps on CPU.

    .venv/bin/python benchmarks/memory_estimate.py           # every case in every allocator mode
    .venv/bin/python benchmarks/memory_estimate.py --quick   # the first two cases, "live" only

About 12 minutes on 2 CPU cores for everything (the 151,936-row LM head dominates the compute).

Each case trains a tiny Qwen2.5-shaped model (``make_tiny_model``: 151,936 vocabulary rows, so
the logits are big) for a few fp32 steps (``use_bf16=False``) in a fresh subprocess, and measures:
- baseline: VmRSS right before the trainer loads the model (imports, tokenizer and tokenized
  data are already resident); the peak counter (VmHWM) is reset there (``/proc/self/clear_refs``);
- after step: VmRSS right after the last optimizer step (weights, gradients and optimizer state
  are all held there, and on CPU the fused loss's chunk workspace), minus the baseline;
- peak: VmHWM after the last optimizer step, minus the baseline, with the counter reset again
  once the model is loaded: loading holds the file's tensors beside the model's for a moment,
  a host-side peak of up to twice the weights that the step never reaches when little trains
  (LoRA); it is printed apart as the load peak;
and compares them with ``estimate_memory`` (weights, grads, optimizer, its step temporaries,
activations and logits; on CPU there is no CUDA overhead and no autocast copy).

RSS counts what the C allocator holds, not only live tensors, so each case runs under up to three
allocator modes:
- ``live``: ``MALLOC_MMAP_THRESHOLD_=1048576`` fixes glibc's mmap threshold, so every block of
  1 MiB or more is its own mmap and is returned on free: RSS follows live memory, which is what
  the estimate models;
- ``default``: glibc's dynamic threshold (it rises up to 32 MiB after frees), so mid-sized
  activation blocks land in the heap and fragment it;
- ``tuned``: the trainer's own ``tune_cpu_allocator`` (its default on CPU), which keeps every
  freed block below 1 GiB in the heap for speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20

SMALL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=704)
# wider, so that the decoder's matrices (67M) are a large share beside the 156M-entry table:
# where QLoRA's 4-bit base shows
WIDE = dict(hidden_size=1024, num_layers=6, num_heads=8, num_kv_heads=2, intermediate_size=2816)
# name, make_tiny_model kwargs, CPTConfig overrides
CASES = [
    (
        "h256 AdamW, plain loss, no ckpt, 2x256, accum 2",
        SMALL,
        dict(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_length=256,
            use_fused_loss=False,
            use_gradient_checkpointing=False,
        ),
    ),
    (
        "h256 AdamW, chunked loss 256, full ckpt, 2x512, accum 2",
        SMALL,
        dict(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_length=512,
            use_fused_loss=True,
            loss_chunk_size=256,
            use_gradient_checkpointing=True,
        ),
    ),
    (
        "h256 Muon, plain loss, no ckpt, 2x256, accum 2",
        SMALL,
        dict(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_length=256,
            use_fused_loss=False,
            use_gradient_checkpointing=False,
            use_muon_optimizer=True,
        ),
    ),
    (
        "h256 AdamW, plain loss, no ckpt, 2x256, accum 1",
        SMALL,
        dict(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
            max_length=256,
            use_fused_loss=False,
            use_gradient_checkpointing=False,
        ),
    ),
    (
        "Llama (untied) h512 x8, chunked 256, no ckpt, 2x1024, accum 1",
        dict(
            arch="llama",
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            num_kv_heads=2,
            intermediate_size=1408,
        ),
        dict(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
            max_length=1024,
            use_fused_loss=True,
            loss_chunk_size=256,
            use_gradient_checkpointing=False,
        ),
    ),
]
# lean modes (issue 16): one process, fp32, plain loss so the head's share is known exactly
LEAN_CASES = [
    (
        f"h256 {'QLoRA' if q else 'LoRA'} r=16{', embeddings trained' if emb else ', adapters only'}"
        ", plain loss, no ckpt, 2x256, accum 2",
        SMALL,
        dict(
            per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=256,
            use_fused_loss=False, use_gradient_checkpointing=False, use_lora=True, lora_r=16,
            lora_train_embeddings=emb, use_qlora=q,
        ),
    )
    for q in (False, True)
    for emb in (True, False)
] + [
    (
        f"h1024 x6 {'QLoRA' if q else 'LoRA'} r=16, adapters only, chunked loss 256, no ckpt, "
        "2x256, accum 1",
        WIDE,
        dict(
            per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=256,
            use_fused_loss=True, loss_chunk_size=256, use_gradient_checkpointing=False,
            use_lora=True, lora_r=16, lora_train_embeddings=False, use_qlora=q,
        ),
    )
    for q in (False, True)
] + [
    (
        "h256 freeze last 1 of 4 layers, embeddings frozen, plain loss, no ckpt, 2x256, accum 2",
        SMALL,
        dict(
            per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=256,
            use_fused_loss=False, use_gradient_checkpointing=False, freeze_trainable_layers=1,
            lora_train_embeddings=False,
        ),
    )
] + [
    (
        f"h256 {opt} with {'8-bit AdamW' if states == '8bit' else 'bf16'} states, plain loss, "
        "no ckpt, 2x256, accum 2",
        SMALL,
        dict(
            per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=256,
            use_fused_loss=False, use_gradient_checkpointing=False, optimizer_states=states,
            use_muon_optimizer=opt == "Muon",
        ),
    )
    for states in ("8bit", "bf16")
    for opt in ("AdamW", "Muon")
] + [
    (  # FSDP2's CPU offload on one process: on a CPU "device" and host are the same memory
        f"h256 {opt} with fsdp_cpu_offload, plain loss, no ckpt, 2x256, accum 2",
        SMALL,
        dict(
            per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=256,
            use_fused_loss=False, use_gradient_checkpointing=False, fsdp_cpu_offload=True,
            use_muon_optimizer=opt == "Muon",
        ),
    )
    for opt in ("AdamW", "Muon")
]  # fmt: skip
STEPS = 3


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak RSS (Linux >= 4.0)
        fh.write("5")


def _corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]
    return [" ".join(rng.choice(words) for _ in range(400)) for _ in range(n_docs)]


def run_case(model_dir: str, overrides: dict, out_dir: str, tuned_allocator: bool) -> dict:
    """Train ``STEPS`` steps in this process and return the measured and estimated bytes.

    ``tuned_allocator=False`` keeps glibc's default thresholds, so freed large blocks go back to
    the OS and RSS follows live memory; the trainer's ``tune_cpu_allocator`` (on by default on
    CPU) keeps them in the heap for speed, and RSS then also counts the fragmented free heap.
    """
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import qwen_cpt.run as trainer_mod  # the module that loads the model for the trainer
    from qwen_cpt import CPTConfig, CPTTrainer
    from qwen_cpt.planner import ModelShape, estimate_memory
    from qwen_cpt.planner.memory import lean_mode_of

    measured: dict[str, int] = {}
    real_load = trainer_mod.load_model

    def load_and_measure(*args, **kwargs):
        measured["baseline"] = _status("VmRSS")
        _reset_peak()
        model = real_load(*args, **kwargs)
        measured["after_load"] = _status("VmRSS")
        # loading holds the file's tensors beside the model's for a moment (2x the weights): a
        # host-side peak, not the step's; count it apart and measure the step from here
        measured["load_peak"] = _status("VmHWM")
        _reset_peak()
        return model

    trainer_mod.load_model = load_and_measure  # instrumentation only: the trainer runs as is
    # Read the weights into the process's own memory, not a mapping of the file: RSS counts a
    # mapped file's touched pages, which outlive the tensors read from them (QLoRA's fp32
    # matrices, once quantized) and which the kernel can drop at will. Anonymous memory is what
    # a step needs.
    from transformers import AutoModelForCausalLM as _Auto

    real_from_pretrained = _Auto.from_pretrained.__func__

    def from_pretrained_unmapped(cls, *args, **kwargs):
        return real_from_pretrained(cls, *args, **{"disable_mmap": True, **kwargs})

    _Auto.from_pretrained = classmethod(from_pretrained_unmapped)
    if not tuned_allocator:
        import qwen_cpt.model as model_mod

        model_mod.tune_cpu_allocator = lambda: False

    def after_step(optimizer, args, kwargs):
        # gradients are still held here (zero_grad comes next): weights + grads + optimizer
        measured["static"] = _status("VmRSS")
        measured["peak"] = _status("VmHWM")
        if type(optimizer).__module__.startswith("bitsandbytes"):
            measured["adamw_impl"] = "8bit"
        elif isinstance(optimizer, torch.optim.AdamW):  # which AdamW the trainer built
            d = optimizer.defaults
            measured["adamw_impl"] = (
                "fused" if d.get("fused") else "foreach" if d.get("foreach") else "single"
            )

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(after_step)

    # Import the modeling code and its lazy modules before the baseline: that is code (about
    # 110 MiB for transformers' Qwen2), not model memory.
    from transformers import AutoConfig, AutoModelForCausalLM

    small = AutoConfig.from_pretrained(model_dir)
    small.num_hidden_layers, small.vocab_size, small.pad_token_id = 1, 1024, None
    AutoModelForCausalLM.from_config(small)

    cfg = CPTConfig(
        model_name_or_path=model_dir,
        output_dir=out_dir,
        max_steps=STEPS,
        use_bf16=False,
        use_flash_attention=False,
        logging_steps=1,
        eval_steps=10**6,
        save_steps=0,
        use_tensorboard=False,
        device="cpu",
        validation_split=0.0,  # measure training alone
        **overrides,
    )
    blocks_needed = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * STEPS
    texts = _corpus(n_docs=blocks_needed * cfg.max_length // 150 + 8)
    t0 = time.perf_counter()
    CPTTrainer(cfg).train(texts)
    wall = time.perf_counter() - t0
    if "baseline" not in measured or "peak" not in measured:
        raise RuntimeError("instrumentation did not run: did trainer.py stop using load_model?")

    shape = ModelShape.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
    est = estimate_memory(
        shape,
        micro_batch=cfg.per_device_train_batch_size,
        seq_len=cfg.max_length,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        optimizer="muon" if cfg.use_muon_optimizer else "adamw",
        checkpointing="full" if cfg.use_gradient_checkpointing else "none",
        bf16=False,
        chunked_loss=cfg.use_fused_loss,
        loss_chunk_size=cfg.loss_chunk_size,
        device="cpu",
        adamw_impl="fused"
        if measured.get("adamw_impl") == "8bit"
        else measured.get("adamw_impl", "fused"),
        lean=lean_mode_of(cfg),
        optimizer_states=cfg.optimizer_states,
        cpu_offload=cfg.fsdp_cpu_offload,
    )
    c = est.components
    # with fsdp_cpu_offload the estimate splits device and host memory; here they are one
    host = est.host
    return {
        "measured_static": measured["static"] - measured["baseline"],
        "measured_peak": measured["peak"] - measured["baseline"],
        "measured_load_peak": measured["load_peak"] - measured["baseline"],
        "estimated_static": c["weights"] + c["grads"] + c["optimizer"] + c["loss_workspace"] + host,
        "estimated_peak": est.peak + host,
        "components": est.components,
        "adamw_impl": measured.get("adamw_impl", "-"),
        "wall_s": wall,
    }


MODES = {
    "live": {"MALLOC_MMAP_THRESHOLD_": "1048576"},
    "default": {},
    "tuned": {},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help='the first two cases, "live" only')
    ap.add_argument(
        "--lean",
        action="store_true",
        help='the LoRA, freeze, 8-bit/bf16 states and offload cases, "live" only',
    )
    ap.add_argument("--only", default="", help="only the cases whose name contains this")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one case, in a fresh process so the allocator state is clean
        spec = json.loads(args.child)
        result = run_case(
            spec["model_dir"], spec["overrides"], spec["out_dir"], spec["mode"] == "tuned"
        )
        print("RESULT " + json.dumps(result))
        return 0

    from qwen_cpt import make_tiny_model

    runs = [(case, "live") for case in CASES] + [(case, "default") for case in CASES]
    runs += [(case, "tuned") for case in CASES[:2]]
    if args.quick:
        runs = [(case, "live") for case in CASES[:2]]
    if args.lean:
        runs = [(case, "live") for case in LEAN_CASES]
    runs = [(case, mode) for case, mode in runs if args.only in case[0]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, ((name, model_kw, overrides), mode) in enumerate(runs):
            model_dir = Path(tmp) / f"model{i}"
            make_tiny_model(model_dir, **model_kw)
            spec = {
                "model_dir": str(model_dir),
                "overrides": overrides,
                "out_dir": f"{tmp}/run{i}",
                "mode": mode,
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                env={**os.environ, **MODES[mode]},
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"case {name!r} ({mode}) failed (exit {proc.returncode})")
            r = json.loads(line[len("RESULT ") :])
            rows.append((name, mode, r))
            print(f"done: {name} [{mode}] ({r['wall_s']:.1f} s)", file=sys.stderr, flush=True)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; {STEPS} fp32 steps per case\n"
    )
    print(
        "| case | allocator | AdamW | after step est. / meas. (MiB) | peak est. (MiB) | "
        "peak meas. (MiB) | peak error | est. (MiB): activations, logits, loss workspace, "
        "step temp, embedding grad | load peak meas. (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, mode, r in rows:
        c = {k: v / MiB for k, v in r["components"].items()}
        err = (r["estimated_peak"] - r["measured_peak"]) / r["measured_peak"]
        print(
            f"| {name} | {mode} | {r['adamw_impl']} | {r['estimated_static'] / MiB:.0f} / "
            f"{r['measured_static'] / MiB:.0f} | "
            f"{r['estimated_peak'] / MiB:.0f} | {r['measured_peak'] / MiB:.0f} | {err:+.1%} | "
            f"{c['activations']:.0f}, {c['logits']:.0f}, {c['loss_workspace']:.0f}, "
            f"{c['optimizer_step_temp']:.0f}, {c['embedding_grad']:.0f} | "
            f"{r['measured_load_peak'] / MiB:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
