"""Full training against each lean mode, on the same data and steps: what each learns (held-out
domain loss) and what each keeps (held-out general loss), on CPU.

    .venv/bin/python benchmarks/lean_modes.py [--output demo_output] [--steps 100]

It uses `make demo`'s pieces: the base model pretrained here on general text (licences, man
pages, pydoc topics; reused from ``--output`` when `make demo` built it already), then CPT on
Python's standard library sources with no replay. Every mode runs the same steps, batch, data
order and schedule, with AdamW:

- full training, fp32 AdamW moments, at the demo's learning rate;
- full training, bf16 AdamW moments, stochastically rounded (``optimizer_states: bf16``), the
  same learning rate;
- full training, 8-bit AdamW moments (``optimizer_states: 8bit``), the same learning rate;
- freeze-tuning of the last of the base's 2 layers, embeddings and head trained;
- LoRA r=16 on every linear layer, embeddings and head trained at the demo's rate (Unsloth's
  recipe), the adapters at 5x it (LoRA takes a higher rate);
- LoRA r=16, adapters only, at 5x the rate.

It prints a Markdown table: each mode's domain and general eval loss before and after, the
change, and the run's wall time. About 5 minutes on 2 cores. ``--only TEXT`` runs the modes
whose name contains TEXT (``--only full,`` the three full-training ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

from qwen_cpt import CPTTrainer
from qwen_cpt.demo import CPT, _run_config, build_base, code_corpus, general_corpus, write_split


def _first_last(run: Path) -> tuple[dict, dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval_loss" in r]
    return evals[0], evals[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="demo_output", help="where make demo keeps its base")
    ap.add_argument("--steps", type=int, default=CPT["steps"])
    ap.add_argument("--only", default="", help="only the modes whose name contains this")
    args = ap.parse_args()
    out = Path(args.output)
    data = out / "data"
    general = write_split(general_corpus(), data, "general")
    code = write_split(code_corpus(), data, "code")
    base = build_base(out, data, general[:2], 1.0)
    domain = {"name": "code", "files": [str(code[0])], "eval_files": [str(code[1])]}
    lr = CPT["lr"]
    modes = {
        "full, fp32 AdamW": dict(),
        "full, bf16 AdamW states": dict(optimizer_states="bf16"),
        "full, 8-bit AdamW states": dict(optimizer_states="8bit"),
        "freeze-tuning, last 1 of 2 layers + embeddings": dict(freeze_trainable_layers=1),
        "LoRA r=16 + embeddings (adapters at 5x lr)": dict(
            use_lora=True, lora_r=16, lora_alpha=32.0, learning_rate=5 * lr,
            embedding_learning_rate=lr,
        ),
        "LoRA r=16, adapters only (5x lr)": dict(
            use_lora=True, lora_r=16, lora_alpha=32.0, learning_rate=5 * lr,
            lora_train_embeddings=False,
        ),
    }  # fmt: skip
    rows = []
    for i, (name, fields) in enumerate(modes.items()):
        if args.only not in name:
            continue
        cfg = _run_config(base, out / f"lean-{i}", [domain], general[1], args.steps, lr)
        cfg = dataclasses.replace(cfg, use_muon_optimizer=False, **fields)
        print(f"{name}: {args.steps} steps ...", flush=True)
        t0 = time.perf_counter()
        CPTTrainer(cfg).train()
        wall = time.perf_counter() - t0
        first, last = _first_last(out / f"lean-{i}")
        rows.append((name, first, last, wall))
    print(
        f"\nmachine: {platform.processor() or platform.machine()}; base {base}; "
        f"{args.steps} steps of CPT on the stdlib sources, no replay, AdamW\n"
    )
    print("| mode | domain loss before -> after | change | general loss before -> after | "
          "change | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, first, last, wall in rows:
        d0, d1 = first["eval_loss/code"], last["eval_loss/code"]
        g0, g1 = first["eval_loss"], last["eval_loss"]
        print(
            f"| {name} | {d0:.3f} -> {d1:.3f} | {d1 - d0:+.3f} | {g0:.3f} -> {g1:.3f} | "
            f"{g1 - g0:+.3f} | {wall:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
