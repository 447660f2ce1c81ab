"""Muon vs AdamW on CPU, honestly: tokens to reach the same held-out loss, and step cost.

    .venv/bin/python benchmarks/muon_vs_adamw.py            # 6.3 minutes on 2 shared CPU cores
    .venv/bin/python benchmarks/muon_vs_adamw.py --quick    # a smoke run: a few steps each

What it does, with a tiny Qwen2.5-shaped model (hidden 64, 4 layers, GQA 4/2 heads, the real
151,936-row vocabulary, tied embeddings) and Python's standard library as text:

1. from scratch: train on stdlib source code with AdamW and with Muon (qwen_cpt.optim: Muon on
   the 2-D hidden matrices, AdamW on embeddings/head/norms/biases, ``match_rms_adamw`` so the
   same learning rates apply), 3 learning rates each, and evaluate held-out source-code loss;
2. continued pretraining: pretrain once with AdamW on the pydoc topic pages (English prose),
   then continue on source code with a fresh Muon or AdamW optimizer (3 learning rates each);
   held-out loss on code (the new domain) and on the topics (forgetting) is tracked;
3. optimizer step cost: ``optimizer.step()`` alone, Muon vs AdamW, on this model and on a
   wider one (hidden 256, 4 layers), with random gradients.

Every run sees the same blocks in the same order (document-aware packing, 4 x 128 tokens per
step, cosine schedule with 10% warmup to 10% of the peak, grad clip 1.0, weight decay 0.1, fp32).
"Tokens to reach the same loss": for each optimizer take its best learning rate (lowest final
held-out loss), take as target the higher of the two final losses (the loss both reached), and
read off the first evaluation at or below it (linear interpolation between evaluations).

Results: a markdown summary on stdout, ``benchmarks/results/muon_vs_adamw.json`` and two PNG
curves in ``benchmarks/results/``. The model is tiny: its embedding and head hold 98% of the
parameters, and those stay on AdamW under Muon too, so this measures Muon where it has the
least to work on. Do not read it as a prediction for 7B.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from qwen_cpt import make_tiny_model  # noqa: E402
from qwen_cpt.demo import code_corpus, general_corpus, held_out  # noqa: E402
from qwen_cpt.loss import lm_loss_sum  # noqa: E402
from qwen_cpt.model import tune_cpu_allocator  # noqa: E402
from qwen_cpt.optim import build_optimizers  # noqa: E402
from qwen_cpt.schedule import lr_multiplier, warmup_steps_for  # noqa: E402

EOS = 151643
SEQ, BATCH = 128, 4
MODEL = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=176)
WIDE = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=704)
EVAL_BLOCKS = 8  # held-out blocks per domain: 1,024 tokens
RESULTS = Path(__file__).resolve().parent / "results"


# --- data --------------------------------------------------------------------------------------------


def pack(docs: list[list[int]], seq: int, eos: int = EOS) -> list[dict[str, torch.Tensor]]:
    """Document-aware blocks as qwen_cpt packs them: eos after each document, positions
    restarting per document, the first token of each document masked from the loss."""
    ids, pos, labels = [], [], []
    for doc in docs:
        doc = doc + [eos]
        ids += doc
        pos += list(range(len(doc)))
        labels += [-100] + doc[1:]
    n = len(ids) // seq
    return [
        {
            "input_ids": torch.tensor(ids[i * seq : (i + 1) * seq]),
            "position_ids": torch.tensor(pos[i * seq : (i + 1) * seq]),
            "labels": torch.tensor(labels[i * seq : (i + 1) * seq]),
        }
        for i in range(n)
    ]


def batches(blocks, bs):
    for i in range(0, len(blocks) - bs + 1, bs):
        yield {k: torch.stack([b[k] for b in blocks[i : i + bs]]) for k in blocks[0]}


def load_data(tokenizer, need_train_blocks: int):
    # the pydoc topic pages and the stdlib sources (no man pages: only topic: and source: are read)
    corpus = general_corpus(max_chars=0) + code_corpus()
    out = {}
    for kind, prefix in (("prose", "topic:"), ("code", "source:")):
        docs = [(n, t) for n, t in corpus if n.startswith(prefix)]
        train_docs = [t for n, t in docs if not held_out(n)]
        eval_docs = [t[:3000] for n, t in docs if held_out(n)]
        train_ids, blocks = [], []
        for t in train_docs:  # tokenize only as much as the runs read
            train_ids.append(tokenizer(t)["input_ids"])
            if sum(map(len, train_ids)) > (need_train_blocks + 2) * SEQ * 1.1:
                break
        blocks = pack(train_ids, SEQ)
        ev = pack([tokenizer(t)["input_ids"] for t in eval_docs], SEQ)[:EVAL_BLOCKS]
        out[kind] = (blocks, ev)
    return out


# --- training ----------------------------------------------------------------------------------------


@torch.no_grad()
def eval_loss(model, blocks) -> float:
    model.eval()
    total, n = 0.0, 0
    for b in batches(blocks, 8):
        total += lm_loss_sum(model, b, True, 512).item()
        n += int((b["labels"][:, 1:] != -100).sum())
    model.train()
    return total / n


def opt_config(kind: str, lr: float):
    return SimpleNamespace(
        use_muon_optimizer=kind == "muon",
        learning_rate=lr,
        weight_decay=0.1,
        muon_momentum=0.95,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
    )


def train(model, init_state, kind, lr, blocks, steps, evals, eval_every):
    """Train from ``init_state``; return ``[(tokens, {eval name: loss})]`` and the final state."""
    model.load_state_dict(init_state)
    model.train()
    opts = build_optimizers(model, opt_config(kind, lr))
    warmup = warmup_steps_for(steps, 0.1)
    curve = [(0, {k: eval_loss(model, v) for k, v in evals.items()})]
    tokens = 0
    it = batches(blocks, BATCH)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = next(it)
        mult = lr_multiplier(step, steps, warmup, "cosine", 0.1)
        for opt in opts.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * mult
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = lm_loss_sum(model, batch, True, 512)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opts.step()
        opts.zero_grad()
        tokens += batch["input_ids"].numel()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((tokens, {k: eval_loss(model, v) for k, v in evals.items()}))
    final = curve[-1][1]
    print(
        f"  {kind:5s} lr {lr:.0e}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in final.items())
        + f"  ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return curve


def tokens_to_reach(curve, key, target) -> float | None:
    prev_t, prev_l = curve[0][0], curve[0][1][key]
    for t, losses in curve[1:]:
        loss = losses[key]
        if loss <= target:
            if prev_l == loss:
                return float(t)
            return prev_t + (t - prev_t) * (prev_l - target) / (prev_l - loss)
        prev_t, prev_l = t, loss
    return None


def compare(runs, key):
    """Best LR per optimizer; tokens each needs to reach the loss both reach."""
    best = {
        kind: min(
            ((lr, c) for (k, lr), c in runs.items() if k == kind), key=lambda x: x[1][-1][1][key]
        )
        for kind in ("adamw", "muon")
    }
    target = max(c[-1][1][key] for _, c in best.values())
    reach = {kind: tokens_to_reach(c, key, target) for kind, (_, c) in best.items()}
    return {
        "best_lr": {kind: lr for kind, (lr, _) in best.items()},
        "final_loss": {kind: c[-1][1][key] for kind, (_, c) in best.items()},
        "target_loss": target,
        "tokens_to_target": reach,
        "adamw_over_muon_tokens": reach["adamw"] / reach["muon"]
        if reach["adamw"] and reach["muon"]
        else None,
    }


def plot(runs, keys, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(6.8, 5.2 * len(keys))
    fig, axes = plt.subplots(1, len(keys), figsize=(width, 4.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for (kind, lr), curve in sorted(runs.items()):
            lrs = sorted({lr_ for k, lr_ in runs if k == kind})
            ls = ["--", "-", ":", "-."][lrs.index(lr) % 4]
            color = "tab:blue" if kind == "adamw" else "tab:red"
            xs = [t / 1000 for t, _ in curve]
            ys = [v[key] for _, v in curve]
            name = f"{'AdamW' if kind == 'adamw' else 'Muon'} lr {lr:.0e}"
            ax.plot(xs, ys, ls, color=color, lw=1.6, label=name)
        ax.set_xlabel("training tokens (thousands)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        lo = min(v[key] for c in runs.values() for _, v in c)
        hi = max(v[key] for c in runs.values() for _, v in c[1:])
        ax.set_ylim(lo - 0.1, hi + 0.1)
    axes[0][0].legend(fontsize=7.5)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_all(scratch, cont, out: Path) -> None:
    plot(
        scratch,
        [("code", "held-out code loss")],
        f"From scratch on code\ntiny Qwen2.5 shape (h64 x 4 layers, vocab 151,936), "
        f"{BATCH}x{SEQ} tokens/step",
        out / "muon_vs_adamw_scratch.png",
    )
    plot(
        cont,
        [("code", "new domain: held-out code loss"), ("prose", "old domain: held-out prose loss")],
        "Continued pretraining: AdamW-pretrained on prose, then code (fresh optimizer)",
        out / "muon_vs_adamw_cpt.png",
    )


def replot(out: Path) -> None:
    """Redraw the PNGs from ``muon_vs_adamw.json`` (``--plot-only``)."""
    curves = json.loads((out / "muon_vs_adamw.json").read_text())["curves"]

    def runs(d):
        return {
            (key.split("@")[0], float(key.split("@")[1])): [(t, v) for t, v in c]
            for key, c in d.items()
        }

    plot_all(runs(curves["scratch"]), runs(curves["cpt"]), out)


# --- optimizer step cost -----------------------------------------------------------------------------


def step_cost(model_dir: str, reps: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = {}
    for kind in ("adamw", "muon"):
        opts = build_optimizers(model, opt_config(kind, 1e-3))
        times = []
        for i in range(reps + 2):
            torch.manual_seed(i)
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            t0 = time.perf_counter()
            opts.step()
            times.append(time.perf_counter() - t0)
            opts.zero_grad()
        out[kind] = statistics.median(times[2:])
    total = sum(p.numel() for p in model.parameters())
    matrices = opts.summary()["muon_params"]
    return {"params": total, "muon_params": matrices, **out}


# --- main --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps each: a smoke run")
    ap.add_argument("--out", default=str(RESULTS), help="where the JSON and PNGs go")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the training runs (default 1: on a shared 2-core machine, "
        "OpenMP barriers of small ops stall when other processes hold the cores)",
    )
    ap.add_argument(
        "--plot-only", action="store_true", help="redraw the PNGs from the results JSON"
    )
    args = ap.parse_args()
    if args.plot_only:
        replot(Path(args.out))
        return 0
    torch.set_num_threads(args.threads)
    scratch_steps, pre_steps, cont_steps = (6, 6, 4) if args.quick else (48, 48, 32)
    scratch_every, cont_every = (3, 2) if args.quick else (6, 4)
    scratch_lrs = [1e-2, 3e-2, 1e-1]
    cont_lrs = [1e-3, 3e-3, 1e-2]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tune_cpu_allocator()
    t_start = time.perf_counter()
    print(
        f"# Muon vs AdamW on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU threads, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny_model(Path(tmp) / "tiny", seed=0, **MODEL))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        need = max(scratch_steps, pre_steps, cont_steps) * BATCH
        data = load_data(tokenizer, need)
        for kind, (tr, ev) in data.items():
            print(f"data {kind}: {len(tr)} train blocks, {len(ev)} held-out blocks of {SEQ}")
            assert len(tr) >= need, f"not enough {kind} text: {len(tr)} < {need} blocks"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        n_total = sum(p.numel() for p in model.parameters())
        init = {k: v.clone() for k, v in model.state_dict().items()}

        print(f"\n## (i) from scratch on code, {scratch_steps} steps of {BATCH}x{SEQ} tokens")
        code_train, code_eval = data["code"]
        prose_train, prose_eval = data["prose"]
        scratch = {}
        for kind in ("adamw", "muon"):
            for lr in scratch_lrs:
                scratch[(kind, lr)] = train(
                    model,
                    init,
                    kind,
                    lr,
                    code_train,
                    scratch_steps,
                    {"code": code_eval},
                    scratch_every,
                )

        print(f"\n## (ii) pretrain on prose (AdamW 1e-2, {pre_steps} steps), continue on code")
        pre_curve = train(
            model, init, "adamw", 1e-2, prose_train, pre_steps, {"prose": prose_eval}, pre_steps
        )
        pretrained = {k: v.clone() for k, v in model.state_dict().items()}
        cont = {}
        for kind in ("adamw", "muon"):
            for lr in cont_lrs:
                cont[(kind, lr)] = train(
                    model,
                    pretrained,
                    kind,
                    lr,
                    code_train,
                    cont_steps,
                    {"code": code_eval, "prose": prose_eval},
                    cont_every,
                )

        print("\n## optimizer.step() alone (median of repeats)", flush=True)
        wide_dir = str(make_tiny_model(Path(tmp) / "wide", seed=0, **WIDE))
        costs = {}
        for threads in sorted({1, os.cpu_count() or 1}):
            costs[f"bench model, {threads} thread(s)"] = step_cost(
                model_dir, 3 if args.quick else 10, threads
            )
            costs[f"hidden 256 x 4 layers, {threads} thread(s)"] = step_cost(
                wide_dir, 2 if args.quick else 5, threads
            )
        load_after_costs = os.getloadavg()[0]

    res_scratch = compare(scratch, "code")
    res_cont = compare(cont, "code")
    forgetting = {
        kind: cont[(kind, res_cont["best_lr"][kind])][-1][1]["prose"] for kind in ("adamw", "muon")
    }
    plot_all(scratch, cont, out)
    elapsed = time.perf_counter() - t_start

    def row(name, r):
        t = r["tokens_to_target"]
        ratio = r["adamw_over_muon_tokens"]
        return (
            f"| {name} | {r['best_lr']['adamw']:.0e} | {r['best_lr']['muon']:.0e} | "
            f"{r['final_loss']['adamw']:.3f} | {r['final_loss']['muon']:.3f} | "
            f"{r['target_loss']:.3f} | {t['adamw'] or float('nan'):,.0f} | "
            f"{t['muon'] or float('nan'):,.0f} | " + (f"{ratio:.2f}x" if ratio else "n/a") + " |"
        )

    print(f"\n## Summary ({elapsed / 60:.1f} min, model {n_total:,} parameters)\n")
    print(
        "| setting | best lr AdamW | best lr Muon | final loss AdamW | final loss Muon | "
        "target (both reach) | tokens AdamW | tokens Muon | AdamW/Muon tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(row("from scratch (code)", res_scratch))
    print(row("CPT prose -> code", res_cont))
    print(
        f"\nCPT: held-out prose loss after pretraining {pre_curve[-1][1]['prose']:.3f}; after "
        f"continuing on code: AdamW {forgetting['adamw']:.3f}, Muon {forgetting['muon']:.3f} "
        "(best lr of each)"
    )
    print(f"\nStep cost measured at load average {load_after_costs:.1f} (1-min, 2 cores).")
    print("\n| model | parameters | in Muon | AdamW step | Muon step | Muon/AdamW |")
    print("|---|---|---|---|---|---|")
    for name, c in costs.items():
        print(
            f"| {name} | {c['params']:,} | {c['muon_params']:,} | {c['adamw'] * 1e3:.1f} ms | "
            f"{c['muon'] * 1e3:.1f} ms | {c['muon'] / c['adamw']:.2f}x |"
        )
    result = {
        "config": {
            "model": MODEL,
            "vocab": 151936,
            "seq": SEQ,
            "batch": BATCH,
            "scratch_steps": scratch_steps,
            "pretrain_steps": pre_steps,
            "cont_steps": cont_steps,
            "scratch_lrs": scratch_lrs,
            "cont_lrs": cont_lrs,
        },
        "scratch": res_scratch,
        "cpt": res_cont,
        "cpt_prose_loss": {"after_pretrain": pre_curve[-1][1]["prose"], **forgetting},
        "step_cost_s": costs,
        "curves": {
            "scratch": {f"{k}@{lr:g}": c for (k, lr), c in scratch.items()},
            "cpt": {f"{k}@{lr:g}": c for (k, lr), c in cont.items()},
        },
        "elapsed_s": elapsed,
    }
    (out / "muon_vs_adamw.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}/muon_vs_adamw.json, muon_vs_adamw_scratch.png, muon_vs_adamw_cpt.png")
    return 0 if all(math.isfinite(v) for v in res_cont["final_loss"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
