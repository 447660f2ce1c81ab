"""Muon vs AdamW where Muon drives most weights: 3 seeds, 3 settings, CPU.

    .venv/bin/python benchmarks/muon_measured.py           # the measurement: 49.6 min (below)
    .venv/bin/python benchmarks/muon_measured.py --quick   # a smoke run: a few steps each

``benchmarks/muon_vs_adamw.py`` measured Muon on a hidden-64 model with Qwen's 151,936-row
vocabulary, where the embedding holds 98% of the weights and Muon drives 2%, with one seed.
This script measures it again on a model whose hidden matrices are most of it:

- a 2,048-id byte-level BPE tokenizer trained (``qwen_cpt.demo.train_tokenizer``) on the
  training documents of both corpora below, held-out documents excluded;
- ``make_tiny_model`` with hidden 256, 4 layers, 4/2 heads (GQA), intermediate 704, tied
  embeddings, vocabulary 2,048: Muon (``qwen_cpt.optim.build_optimizers`` with
  ``use_muon_optimizer``) holds 85% of its parameters;
- text from ``qwen_cpt.demo``: general text (licences, man pages, pydoc topics,
  ``general_corpus``) and the domain, Python's standard-library sources (``code_corpus``);
  held-out documents by name hash (``held_out``), the first 2,000 characters of each.

Three settings, each with a 3-value learning-rate grid per optimizer run on seed 0 (a best lr
at an end of the grid gets one more lr beyond that end); the best lr of each (lowest final
held-out domain loss) is then run on seeds 1 and 2:

1. from scratch on the domain (seed: initialization and data order);
2. full CPT: the model pretrained ONCE with AdamW on general text, continued on the domain with
   a fresh Muon or AdamW optimizer (seed: data order); held-out domain and general loss;
3. LoRA CPT of the same pretrained model: the product's ``qwen_cpt.lean.apply_lean_mode``
   (PEFT, r 16, alpha 32, all linear layers, embeddings frozen), so every trainable matrix is a
   2-D LoRA matrix and goes to Muon under ``use_muon_optimizer`` (seed: LoRA init, data order).

Both optimizers see the same blocks in the same order for a given seed. The training loop is
``muon_vs_adamw.train``: document-aware packing, 4 x 128 tokens per step, cosine schedule with
10% warmup down to 10% of the peak, grad clip 1.0, weight decay 0.1, fp32.

Results: a markdown summary on stdout, ``benchmarks/results/muon_measured.json`` and the
seed-0 grids as ``benchmarks/results/muon_measured_{scratch,full,lora}.png``.

How long it took: 49.6 minutes of wall time (2026-12-03, 13:40 to 14:30 UTC) on a shared 2-core
Xeon with 1 torch thread, 33 training runs plus the pretraining, at load average 3 to 6 (other
jobs' tests; for its first 10 minutes also an aborted earlier copy of this script). On a quiet
core expect about 35 minutes (an estimate from a 20-step probe). The results do not depend on
the load: 1 thread, fixed seeds.
Figures and reading: BENCHMARKS.md, "CPU: Muon vs AdamW again, with Muon driving most weights".
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import muon_vs_adamw as bench  # noqa: E402
import torch  # noqa: E402

from qwen_cpt import make_tiny_model  # noqa: E402
from qwen_cpt.demo import VOCAB, code_corpus, general_corpus, held_out, train_tokenizer  # noqa: E402
from qwen_cpt.lean import apply_lean_mode  # noqa: E402
from qwen_cpt.model import tune_cpu_allocator  # noqa: E402
from qwen_cpt.optim import split_parameters  # noqa: E402

MODEL = bench.WIDE  # hidden 256, 4 layers, 4/2 heads, intermediate 704 (2.75x)
SEEDS = (0, 1, 2)
KINDS = ("adamw", "muon")
EVAL_BLOCKS = 48  # held-out blocks per domain: 6,144 tokens
EVAL_CHARS = 2000  # of each held-out document, as the demo's held-out files
EVALS_PER_RUN = 8
PRETRAIN_LR = 5e-3
GRIDS = {
    "scratch": [2e-3, 6e-3, 2e-2],
    "full": [1e-3, 3e-3, 1e-2],
    "lora": [3e-3, 1e-2, 3e-2],
}
STEPS = {"scratch": 240, "pretrain": 500, "full": 160, "lora": 160}
QUICK_STEPS = {"scratch": 6, "pretrain": 6, "full": 4, "lora": 4}
LORA = SimpleNamespace(
    use_lora=True,
    use_dora=False,
    use_qlora=False,
    lora_r=16,
    lora_alpha=32.0,
    lora_dropout=0.0,
    lora_target_modules=["all-linear"],
    lora_train_embeddings=False,
    freeze_trainable_layers=0,
)
TITLES = {
    "scratch": "(i) from scratch on code",
    "full": "(ii) full CPT: AdamW-pretrained on general text, then code",
    "lora": "(iii) LoRA CPT (r 16, all linear): same base, then code",
}


# --- data --------------------------------------------------------------------------------------------


def load_data(folder: Path) -> tuple[int, dict]:
    """Train the tokenizer, then ``{domain: (train blocks, held-out blocks)}`` for ``general``
    and ``code``; returns the vocabulary size too."""
    from transformers import AutoTokenizer

    corpora = {"general": general_corpus(), "code": code_corpus()}
    train_texts = {k: [t for n, t in docs if not held_out(n)] for k, docs in corpora.items()}
    train_tokenizer(train_texts["general"] + train_texts["code"], folder, VOCAB)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.model_max_length = 10**9  # whole documents; packing cuts them into blocks
    data = {}
    for kind, docs in corpora.items():
        # held-out documents in a fixed pseudo-random order, so EVAL_BLOCKS span many of them
        ev = sorted((n, t) for n, t in docs if held_out(n))
        ev.sort(key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())
        ev_ids = [tok(t[:EVAL_CHARS])["input_ids"] for _, t in ev]
        train_ids = [tok(t)["input_ids"] for t in train_texts[kind]]
        data[kind] = (
            bench.pack(train_ids, bench.SEQ, tok.eos_token_id),
            bench.pack(ev_ids, bench.SEQ, tok.eos_token_id)[:EVAL_BLOCKS],
        )
    return len(tok), data


def order(blocks: list, seed: int, n: int) -> list:
    """The first ``n`` blocks of a seeded permutation: the data order of one seed."""
    idx = list(range(len(blocks)))
    random.Random(seed).shuffle(idx)
    return [blocks[i] for i in idx[:n]]


# --- the measurement ---------------------------------------------------------------------------------


def measure(setting: str, run, grid: list[float], seeds, keys: list[str]) -> dict:
    """``run(kind, lr, seed) -> curve``: the grid on seed 0 for both optimizers, then each one's
    best lr (final held-out ``keys[0]`` loss) on the other seeds. A best lr at an end of the
    grid is checked once: one more lr beyond that end (the grid's ratio) joins the grid."""
    print(f"\n## {TITLES[setting]}: lr grid {grid} on seed {seeds[0]}", flush=True)
    grid_runs, grids, best = {}, {}, {}
    for kind in KINDS:
        grids[kind] = list(grid)
        for lr in grid:
            grid_runs[(kind, lr)] = run(kind, lr, seeds[0])
        best[kind] = pick(grids[kind], grid_runs, kind, keys[0])
        if best[kind] in (grid[0], grid[-1]):
            lr = grid[0] ** 2 / grid[1] if best[kind] == grid[0] else grid[-1] ** 2 / grid[-2]
            lr = float(f"{lr:.1g}")
            print(f"## {setting}: {kind}'s best lr is at the grid's end; also {lr:g}", flush=True)
            grid_runs[(kind, lr)] = run(kind, lr, seeds[0])
            grids[kind] = sorted(grids[kind] + [lr])
            best[kind] = pick(grids[kind], grid_runs, kind, keys[0])
    print(f"## {setting}: best lr {best}; seeds {list(seeds[1:])}", flush=True)
    per_seed = {kind: {seeds[0]: grid_runs[(kind, best[kind])]} for kind in KINDS}
    for seed in seeds[1:]:
        for kind in KINDS:
            per_seed[kind][seed] = run(kind, best[kind], seed)
    finals = {
        kind: {key: [per_seed[kind][s][-1][1][key] for s in seeds] for key in keys}
        for kind in KINDS
    }
    return {
        "grid": grids,
        "grid_final": {
            kind: {f"{lr:g}": grid_runs[(kind, lr)][-1][1] for lr in grids[kind]} for kind in KINDS
        },
        "best_lr": best,
        "best_lr_at_grid_edge": {k: best[k] in (grids[k][0], grids[k][-1]) for k in KINDS},
        "final": finals,
        "stats": {kind: {key: stats(finals[kind][key]) for key in keys} for kind in KINDS},
        "muon_minus_adamw": {
            key: stats([m - a for m, a in zip(finals["muon"][key], finals["adamw"][key])])
            for key in keys
        },
        "start": grid_runs[(KINDS[0], grid[0])][0][1],
        "curves_grid_seed0": {f"{k}@{lr:g}": c for (k, lr), c in grid_runs.items()},
        "curves_best_lr": {kind: {str(s): c for s, c in per_seed[kind].items()} for kind in KINDS},
        "_grid_runs": grid_runs,
    }


def pick(lrs: list[float], runs: dict, kind: str, key: str) -> float:
    """The lr of ``lrs`` whose run ended with the lowest held-out ``key`` loss."""
    return min(lrs, key=lambda x: runs[(kind, x)][-1][1][key])


def stats(xs: list[float]) -> dict:
    return {
        "values": xs,
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
    }


def timed(label: str, fn, *args):
    print(f"  [{label}]", end="", flush=True)
    return fn(*args)


# --- the report --------------------------------------------------------------------------------------


def fmt(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.3f}..{s['max']:.3f})"


def table(setting: str, r: dict) -> list[str]:
    keys = list(r["stats"]["adamw"])
    general = "general" in keys
    head = "| optimizer | lr grid: final domain loss, seed 0 | best lr | domain loss, 3 seeds |"
    lines = [head + (" general loss, 3 seeds |" if general else ""), ""]
    lines[1] = "|---" * (5 if general else 4) + "|"
    for kind in KINDS:
        grid = ", ".join(
            f"{lr:.0e}: {r['grid_final'][kind][f'{lr:g}']['code']:.3f}" for lr in r["grid"][kind]
        )
        edge = " (grid edge)" if r["best_lr_at_grid_edge"][kind] else ""
        row = (
            f"| {'AdamW' if kind == 'adamw' else 'Muon'} | {grid} | {r['best_lr'][kind]:.0e}{edge} "
            f"| {fmt(r['stats'][kind]['code'])} |"
        )
        lines.append(row + (f" {fmt(r['stats'][kind]['general'])} |" if general else ""))
    for key in keys:
        d = r["muon_minus_adamw"][key]
        lines.append(
            f"\nMuon - AdamW, {key} loss, paired by seed: "
            + ", ".join(f"{v:+.3f}" for v in d["values"])
            + f" (mean {d['mean']:+.3f})"
        )
    start = ", ".join(f"{k} {v:.3f}" for k, v in r["start"].items())
    lines.append(f"\nHeld-out loss before training: {start}.")
    return [f"### {TITLES[setting]}", "", *lines]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps each: a smoke run")
    ap.add_argument(
        "--out", default=None, help="where the JSON and PNGs go (default benchmarks/results/; "
        "with --quick a temporary folder)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    steps = QUICK_STEPS if args.quick else STEPS
    out = Path(
        args.out or (tempfile.mkdtemp(prefix="muon_quick_") if args.quick else bench.RESULTS)
    )
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    load0 = os.getloadavg()[0]
    print(
        f"# Muon vs AdamW, Muon driving most weights: {cpu}, {os.cpu_count()} cores, "
        f"{args.threads} torch thread(s), torch {torch.__version__}, load {load0:.1f}, {date}",
        flush=True,
    )
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        vocab, data = load_data(Path(tmp) / "tokenizer")
        (code_train, code_eval), (gen_train, gen_eval) = data["code"], data["general"]
        for kind, (tr, ev) in data.items():
            print(
                f"data {kind}: {len(tr):,} train blocks, {len(ev)} held-out blocks of {bench.SEQ}"
            )
        inits, model = {}, None
        for seed in SEEDS:
            folder = make_tiny_model(
                Path(tmp) / f"init{seed}", vocab_size=vocab, seed=seed, **MODEL
            )
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            inits[seed] = {k: v.clone() for k, v in model.state_dict().items()}
        split = split_parameters(model, True)
        n_total = sum(p.numel() for p in model.parameters())
        n_muon = split.count(split.muon)
        print(f"model: {n_total:,} parameters, {n_muon:,} ({n_muon / n_total:.1%}) in Muon")
        need = max(steps["scratch"], steps["full"], steps["lora"]) * bench.BATCH
        assert len(code_train) >= need, f"not enough code: {len(code_train)} < {need} blocks"
        code_order = {s: order(code_train, s, need) for s in SEEDS}
        both = {"code": code_eval, "general": gen_eval}
        wall: dict[str, float] = {}

        def run_wall(setting, fn):
            def wrapped(kind, lr, seed):
                t0 = time.perf_counter()
                curve = timed(f"{setting} seed {seed}", fn, kind, lr, seed)
                wall[f"{setting}/{kind}@{lr:g}/seed{seed}"] = time.perf_counter() - t0
                return curve

            return wrapped

        every = {k: max(1, v // EVALS_PER_RUN) for k, v in steps.items()}

        def scratch(kind, lr, seed):
            return bench.train(
                model, inits[seed], kind, lr, code_order[seed], steps["scratch"],
                {"code": code_eval}, every["scratch"],
            )  # fmt: skip

        res = {"scratch": measure("scratch", run_wall("scratch", scratch), GRIDS["scratch"], SEEDS,
                                  ["code"])}  # fmt: skip

        print(f"\n## pretraining once: AdamW {PRETRAIN_LR:g}, {steps['pretrain']} steps, general")
        gen_blocks = order(gen_train, 0, steps["pretrain"] * bench.BATCH)
        pre_curve = timed(
            "pretrain", bench.train, model, inits[0], "adamw", PRETRAIN_LR, gen_blocks,
            steps["pretrain"], both, every["pretrain"],
        )  # fmt: skip
        pretrained = {k: v.clone() for k, v in model.state_dict().items()}

        def full(kind, lr, seed):
            return bench.train(
                model, pretrained, kind, lr, code_order[seed], steps["full"], both, every["full"]
            )

        res["full"] = measure("full", run_wall("full", full), GRIDS["full"], SEEDS,
                              ["code", "general"])  # fmt: skip

        lora_models = {}
        for seed in SEEDS:  # the pretrained model with seed-initialized adapters
            m = AutoModelForCausalLM.from_pretrained(Path(tmp) / "init0", dtype=torch.float32)
            m.load_state_dict(pretrained)
            torch.manual_seed(seed)
            apply_lean_mode(m, LORA)
            lora_models[seed] = (m, {k: v.clone() for k, v in m.state_dict().items()})
        lsplit = split_parameters(lora_models[0][0], True)
        n_lora = sum(p.numel() for p in lora_models[0][0].parameters() if p.requires_grad)

        def lora(kind, lr, seed):
            m, state = lora_models[seed]
            return bench.train(
                m, state, kind, lr, code_order[seed], steps["lora"], both, every["lora"]
            )

        res["lora"] = measure("lora", run_wall("lora", lora), GRIDS["lora"], SEEDS,
                              ["code", "general"])  # fmt: skip
    load1 = os.getloadavg()[0]
    elapsed = time.perf_counter() - started

    for setting, r in res.items():
        keys = [("code", "held-out code loss (domain)")]
        if setting != "scratch":
            keys.append(("general", "held-out general loss (forgetting)"))
        bench.plot(
            r.pop("_grid_runs"), keys,
            f"{TITLES[setting]}, seed 0\nh256 x 4 layers, vocab {vocab:,}, Muon holds "
            f"{n_muon / n_total:.0%} of the weights", out / f"muon_measured_{setting}.png",
        )  # fmt: skip
    md = [
        f"Model: {n_total:,} parameters, {n_muon:,} ({n_muon / n_total:.1%}) in Muon; LoRA: "
        f"{n_lora:,} trainable, {lsplit.count(lsplit.muon):,} of them in Muon. "
        f"Pretraining (AdamW {PRETRAIN_LR:g}, {steps['pretrain']} steps): held-out general "
        f"{pre_curve[0][1]['general']:.3f} -> {pre_curve[-1][1]['general']:.3f}, code "
        f"{pre_curve[0][1]['code']:.3f} -> {pre_curve[-1][1]['code']:.3f}. "
        f"Wall time {elapsed / 60:.1f} min, load average {load0:.1f} at the start and "
        f"{load1:.1f} at the end.",
    ]
    for setting, r in res.items():
        md += ["", *table(setting, r)]
    print("\n# Summary\n\n" + "\n".join(md), flush=True)
    result = {
        "date": date,
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "load_start": load0, "load_end": load1},
        "config": {"model": MODEL, "vocab": vocab, "tokenizer": f"byte-level BPE, {vocab} ids",
                   "seq": bench.SEQ, "batch": bench.BATCH, "steps": steps, "grids": GRIDS,
                   "pretrain_lr": PRETRAIN_LR, "seeds": list(SEEDS), "eval_blocks": EVAL_BLOCKS,
                   "lora": vars(LORA), "quick": args.quick},
        "params": {"total": n_total, "muon": n_muon, "muon_share": n_muon / n_total,
                   "lora_trainable": n_lora, "lora_muon": lsplit.count(lsplit.muon)},
        "pretrain_curve": pre_curve,
        **res,
        "wall_s_per_run": wall,
        "elapsed_s": elapsed,
        "summary_md": "\n".join(md),
    }  # fmt: skip
    (out / "muon_measured.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}/muon_measured.json and muon_measured_{{scratch,full,lora}}.png")
    finals = [v for r in res.values() for k in KINDS for xs in r["final"][k].values() for v in xs]
    return 0 if all(math.isfinite(v) for v in finals) else 1


if __name__ == "__main__":
    sys.exit(main())
