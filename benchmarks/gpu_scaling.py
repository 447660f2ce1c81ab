"""Scaling from 1 to N GPUs: the real trainer under torchrun, and its throughput and efficiency.

    python benchmarks/gpu_scaling.py              # 1, 2, 4, 8 GPUs (those present); 480 s budget
    python benchmarks/gpu_scaling.py --gpus 1 2 --model 0.5B --memory-gb 40 --optimizer muon
    python benchmarks/gpu_scaling.py --model 7B --offload --budget-s 1200 --case-timeout-s 600
    python benchmarks/gpu_scaling.py --dry-run    # on CPU: tiny model, 1 and 2 gloo processes
    python benchmarks/gpu_scaling.py --dry-run --gpus 1

Weak scaling: every case keeps the per-device micro-batch (``--batch`` packed blocks of
``--seq`` tokens) and the gradient accumulation (``--accum``), so the global batch grows with the
number of GPUs N. Each case launches ``python -m torch.distributed.run --standalone
--nproc_per_node=N`` on this very script in ``--worker`` mode, which runs the public API,
``CPTTrainer(CPTConfig(...)).train()``; under torchrun the trainer itself shards the model with
FSDP2 (NCCL on GPUs, gloo on CPU), except at N = 1 (``WORLD_SIZE`` 1), where it runs its plain
single-device path: the baseline is the trainer as a one-GPU user runs it. ``--offload`` sets
``CPTConfig.fsdp_cpu_offload`` (FSDP2 CPU offload); ``--memory-gb X`` caps each worker with
``torch.cuda.set_per_process_memory_fraction`` to model an X GB card (e.g. 40 on an H200 of
about 139 GiB).

The model is written once, before any case, with random weights (no download) by
``qwen_cpt.make_tiny_model``: Qwen2.5-0.5B's shapes by default, Qwen2.5-7B's with ``--model 7B``.
Weights are written in bf16, as Qwen ships them, and the 7B head is untied, as in Qwen2.5-7B (the
7B model is about 15 GB on disk and takes minutes to write: give it a larger budget). The
data is Python's standard library (pydoc topics and ``.py`` sources, as in qwen_cpt.demo), one
JSONL record per document, repeated until there is about twice the text the case's steps need.

Each case logs every step to ``metrics.jsonl``. The first ``--warmup`` steps (torch.compile's
included) are dropped, and the throughput is the rest's tokens over their time (the harmonic mean
of the per-step ``tokens_per_sec``, which the trainer sums over ranks). A case stops as soon as
its last step is logged, so the trainer's final checkpoint and model are never written (a 7B
one would not fit on the disk), and is killed when it outlasts its timeout (``--case-timeout-s``
or what is left of ``--budget-s``) and reported as timed out; no case starts with under 60 s
left. Scaling efficiency is tok/s per GPU at N over tok/s at 1 GPU; MFU is tok/s per GPU times
qwen_cpt.perf's model FLOPs per token over the GPU's bf16 dense peak (989 TFLOP/s on an H200);
peak memory is what rank 0 logged (``torch.cuda.max_memory_allocated``, process RSS on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "0.5B": dict(
        hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864
    ),
    "7B": dict(
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
    ),
    "tiny": {},  # --dry-run: make_tiny_model's defaults
}
UNTIED = {"7B"}
GRAD_CKPT = {"0.5B": 0, "7B": 1, "tiny": 0}  # default --grad-ckpt: checkpoint every k-th layer
GPU_COUNTS = (1, 2, 4, 8)
MIN_CASE_S = 60  # do not start a case with less time left than this
CHARS_PER_TOKEN = 4.1  # the Qwen2.5 tokenizer on the stdlib corpus
DATA_MARGIN = 2.0


def build_model(name: str, directory: Path) -> Path:
    import torch

    from qwen_cpt import make_tiny_model

    dtype = torch.float32 if name == "tiny" else torch.bfloat16  # as Qwen ships its weights
    return make_tiny_model(
        directory, **SHAPES[name], tie_word_embeddings=name not in UNTIED, dtype=dtype
    )


def write_corpus(path: Path, tokens: int) -> Path:
    """JSONL of stdlib documents, cycled until it holds about ``DATA_MARGIN`` x ``tokens``."""
    from qwen_cpt.demo import code_corpus, general_corpus

    # pydoc topics and stdlib sources (stdlib_corpus before the demo split it in two)
    docs = [
        text
        for n, text in general_corpus(max_chars=0) + code_corpus()
        if n.startswith(("topic:", "source:"))
    ]
    want = tokens * CHARS_PER_TOKEN * DATA_MARGIN
    chars, i = 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while chars < want:
            text = docs[i % len(docs)]
            fh.write(json.dumps({"text": text}) + "\n")
            chars += len(text)
            i += 1
    return path


def read_steps(path: Path) -> list[dict]:
    """The training rows of ``metrics.jsonl`` so far (a half-written last line is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "tokens_per_sec" in row:
            rows.append(row)
    return rows


def stop(proc: subprocess.Popen, pid_dir: Path) -> None:
    """Kill a case: its workers (torchrun puts each in a session of its own), then torchrun."""
    for pid_file in pid_dir.glob("*"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_case(n: int, payload: dict, case_dir: Path, steps: int, timeout: float) -> dict:
    """Run one case under torchrun; ``{"status": "ok", "rows": [...]}`` or a failure status."""
    pid_dir = Path(payload["pid_dir"])
    pid_dir.mkdir(parents=True)
    log_path = case_dir / "torchrun.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(payload),
    ]
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    metrics = Path(payload["config"]["output_dir"]) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            while True:
                exited = proc.poll() is not None
                rows = read_steps(metrics)
                if len(rows) >= steps:
                    return {"status": "ok", "rows": rows}
                if exited:
                    break
                if time.monotonic() > deadline:
                    return {"status": "timed out", "rows": rows}
                time.sleep(1)
        finally:
            stop(proc, pid_dir)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if "ChildFailedError" in text:  # torchrun's own traceback comes last: show the workers'
        lines = lines[: max(i for i, ln in enumerate(lines) if ln.startswith("Traceback"))]
    tail = "\n".join(lines[-25:])
    print(f"--- {n} GPU(s): the last lines of the workers' output ---\n{tail}", file=sys.stderr)
    status = (
        "out of memory" if "out of memory" in text.lower() else f"failed (exit {proc.returncode})"
    )
    return {"status": status, "rows": rows}


def summarize(rows: list[dict], warmup: int) -> dict | None:
    """Throughput over the steps after ``warmup`` and the peak memory; None if none are left."""
    timed = [r for r in rows if r["step"] > warmup]
    if not timed:
        return None
    return {
        "tok_s": len(timed) / sum(1 / r["tokens_per_sec"] for r in timed),
        "memory_gb": max((r["memory_gb"] for r in rows if "memory_gb" in r), default=math.nan),
        "loss": timed[-1]["loss"],
    }


def worker(payload: dict) -> None:
    """One torchrun rank: cap its GPU memory if asked, then train through the public API."""
    (Path(payload["pid_dir"]) / os.environ.get("RANK", "0")).write_text(str(os.getpid()))
    import torch

    from qwen_cpt import CPTConfig, CPTTrainer

    if payload["memory_gb"]:
        index = int(os.environ.get("LOCAL_RANK", "0"))
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(payload["memory_gb"] * 2**30 / total, index)
    CPTTrainer(CPTConfig(**payload["config"])).train()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 4 steps, seq 128")
    ap.add_argument("--gpus", nargs="+", type=int, help="GPU counts (default: 1 2 4 8 present)")
    ap.add_argument("--model", choices=["0.5B", "7B"], default="0.5B", help="Qwen2.5 shapes")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per packed block")
    ap.add_argument("--batch", type=int, default=1, help="per-device micro-batch (blocks)")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--warmup", type=int, default=3, help="steps not timed (compile included)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    ap.add_argument("--grad-ckpt", type=int, help="checkpoint every k-th layer (0: off)")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile")
    ap.add_argument(
        "--attention",
        default="sdpa",
        help="attention_implementation (auto measures at start-up, inside the case's time)",
    )
    ap.add_argument("--memory-gb", type=float, help="cap each GPU to this many GiB")
    ap.add_argument("--offload", action="store_true", help="FSDP2 CPU offload")
    ap.add_argument("--budget-s", type=float, default=480, help="start no case after this")
    ap.add_argument("--case-timeout-s", type=float, default=300, help="kill a case after this")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    start = time.monotonic()
    import torch

    from qwen_cpt import CPTConfig
    from qwen_cpt.perf import mfu, model_flops_per_token, peak_tflops

    if args.dry_run:
        if args.memory_gb:
            sys.exit("--memory-gb needs CUDA GPUs")
        name, seq, batch, accum, warmup, steps = "tiny", 128, 1, 2, 1, 3
        counts, compile_, device = args.gpus or [1, 2], False, "CPU (dry run, gloo)"
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_scaling.py needs CUDA GPUs (use --dry-run to check it on CPU)")
        present = torch.cuda.device_count()
        counts = args.gpus or [n for n in GPU_COUNTS if n <= present]
        if any(not 1 <= n <= present for n in counts):
            sys.exit(f"--gpus {' '.join(map(str, counts))}: this machine has {present} GPU(s)")
        smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(present))
        if args.memory_gb and not 0 < args.memory_gb * 2**30 <= smallest:
            sys.exit(f"--memory-gb {args.memory_gb}: must be in (0, {smallest / 2**30:.1f}]")
        name, seq, batch, accum = args.model, args.seq, args.batch, args.accum
        warmup, steps, compile_ = args.warmup, args.steps, not args.no_compile
        device = f"{torch.cuda.get_device_name()} x {present}"
    if args.offload and "fsdp_cpu_offload" not in {f.name for f in dataclasses.fields(CPTConfig)}:
        sys.exit("--offload: this qwen-cpt's CPTConfig has no fsdp_cpu_offload field")
    grad_ckpt = GRAD_CKPT[name] if args.grad_ckpt is None else args.grad_ckpt
    per_gpu = batch * accum * seq  # tokens per GPU per optimizer step
    total_steps = warmup + steps
    setup = (
        f"model: {name} shapes (random weights), seq {seq}, per-device micro-batch {batch} x "
        f"accumulation {accum} = {per_gpu:,} tokens per GPU per step, {args.optimizer}, "
        f"torch.compile {'on' if compile_ else 'off'}, activation checkpointing "
        + (f"every {grad_ckpt} layer(s)" if grad_ckpt else "off")
        + f", memory cap {f'{args.memory_gb:g} GiB' if args.memory_gb else 'none'}, CPU offload "
        f"{'on' if args.offload else 'off'}; {warmup} warm-up + {steps} timed steps per case"
    )
    print(setup, flush=True)

    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_scaling_") as tmp:
        t0 = time.monotonic()
        model_dir = build_model(name, Path(tmp) / "model")
        print(f"model written in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        from transformers import AutoConfig

        flops_token = model_flops_per_token(AutoConfig.from_pretrained(model_dir), seq)
        peak = None if args.dry_run else peak_tflops("cuda")
        for n in counts:
            left = args.budget_s - (time.monotonic() - start)
            if left < MIN_CASE_S:
                results[n] = {"status": "not started (time budget)", "summary": None}
                continue
            case_dir = Path(tmp) / f"gpus{n}"
            case_dir.mkdir()
            config = dict(
                model_name_or_path=str(model_dir),
                train_files=[str(write_corpus(case_dir / "data.jsonl", n * per_gpu * total_steps))],
                output_dir=str(case_dir / "out"),
                max_length=seq,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accum,
                max_steps=total_steps,
                logging_steps=1,
                save_steps=0,
                validation_split=0.0,  # measure training alone
                use_muon_optimizer=args.optimizer == "muon",
                use_gradient_checkpointing=grad_ckpt > 0,
                gradient_checkpointing_every_n_layers=max(1, grad_ckpt),
                use_torch_compile=compile_,
                attention_implementation=args.attention,
                use_tensorboard=False,
                **({"fsdp_cpu_offload": True} if args.offload else {}),
            )
            CPTConfig(**config)  # a bad value fails here, not in N workers
            payload = {
                "config": config,
                "memory_gb": args.memory_gb,
                "pid_dir": str(case_dir / "pids"),
            }
            t0 = time.monotonic()
            r = run_case(n, payload, case_dir, total_steps, min(args.case_timeout_s, left))
            shutil.rmtree(case_dir, ignore_errors=True)
            r["summary"] = summarize(r["rows"], warmup) if r["status"] == "ok" else None
            if r["status"] == "ok" and r["summary"] is None:
                r["status"] = "no steps after warm-up"
            results[n] = r
            s = r["summary"]
            print(
                f"{n} GPU(s): {r['status']} after {time.monotonic() - t0:.0f} s"
                + (f", {s['tok_s']:,.0f} tok/s, last loss {s['loss']:.3f}" if s else ""),
                file=sys.stderr,
                flush=True,
            )

    base = results.get(1, {}).get("summary")
    print(f"\ncommand: {shlex.join(['python', *sys.argv])}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"device: {device}; torch {torch.__version__}")
    print(f"{setup}; {time.monotonic() - start:.0f} s in all\n")
    print(
        "| GPUs | global batch tokens | tok/s total | tok/s per GPU | scaling efficiency | MFU "
        "| peak memory GB (rank 0) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in results.items():
        s = r["summary"]
        if s is None:
            print(f"| {n} | {n * per_gpu:,} | {r['status']} | | | | |")
            continue
        each = s["tok_s"] / n
        eff = f"{each / base['tok_s']:.1%}" if base else "n/a"
        util = f"{mfu(each, flops_token, peak):.1%}" if peak else "n/a"
        print(
            f"| {n} | {n * per_gpu:,} | {s['tok_s']:,.0f} | {each:,.0f} | {eff} | {util} | "
            f"{s['memory_gb']:.2f} |"
        )
    ran = [r for r in results.values() if not r["status"].startswith("not started")]
    return 0 if ran and all(r["summary"] for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
