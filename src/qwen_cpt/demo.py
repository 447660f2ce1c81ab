"""The main job, offline: continue pretraining a tiny Qwen2.5-shaped model on Python's own
standard library (its documentation topics and its source files), a real corpus present on
every machine that runs this, and show held-out perplexity before and after.
"""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
from pathlib import Path

from .config import CPTConfig
from .model import make_tiny_model
from .trainer import CPTTrainer, setup_logging


def stdlib_corpus(max_source_files: int = 400) -> list[tuple[str, str]]:
    """``[(name, text)]``: pydoc topic pages, then stdlib ``.py`` sources, in a fixed order."""
    docs: list[tuple[str, str]] = []
    try:
        from pydoc_data.topics import topics

        docs += [(f"topic:{k}", v) for k, v in sorted(topics.items()) if len(v) > 200]
    except ImportError:  # some distributions strip pydoc_data
        pass
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(
        p for p in stdlib.glob("*.py") if p.is_file() and 2_000 < p.stat().st_size < 60_000
    )[:max_source_files]
    for p in sources:
        try:
            docs.append((f"source:{p.name}", p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    if not docs:
        raise RuntimeError(f"found no standard-library text under {stdlib}")
    return docs


def held_out(name: str, every: int = 10) -> bool:
    """A stable ~1/every split by name hash, the same on every machine."""
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % every == 0


def run_demo(output_dir: str = "./demo_output", max_steps: int = 60) -> dict:
    setup_logging()
    out = Path(output_dir)
    model_dir = out / "tiny-qwen2.5"
    if not (model_dir / "config.json").is_file():
        make_tiny_model(
            model_dir,
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=352,
        )
    # Two sources written as .jsonl, as a user's corpus would be: prose (pydoc topics) and
    # code (stdlib sources), each with a held-out split evaluated on its own.
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for kind in ("docs", "code"):
        docs = [
            (n, t)
            for n, t in stdlib_corpus()
            if n.startswith("topic:" if kind == "docs" else "source:")
        ]
        train = [t for n, t in docs if not held_out(n)]
        # the first 2,000 characters of each held-out document keep each eval pass to seconds
        heldout = [t[:2000] for n, t in docs if held_out(n)]
        for name, texts in ((f"{kind}_train", train), (f"{kind}_heldout", heldout)):
            with open(data_dir / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        sizes[kind] = sum(len(t) for t in train)
        print(
            f"corpus {kind}: {len(train)} training and {len(heldout)} held-out documents from the "
            f"Python {sysconfig.get_python_version()} standard library",
            flush=True,
        )
    total = sum(sizes.values())
    cfg = CPTConfig(
        model_name_or_path=str(model_dir),
        output_dir=str(out / "run"),
        overwrite_output_dir=True,  # `make demo` again starts the demo again
        sources=[
            {
                "name": kind,
                "files": [str(data_dir / f"{kind}_train.jsonl")],
                "weight": round(sizes[kind] / total, 3),
                "eval_files": [str(data_dir / f"{kind}_heldout.jsonl")],
            }
            for kind in ("code", "docs")
        ],
        max_length=256,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,
        gradient_accumulation_steps=1,
        learning_rate=3e-3,
        warmup_ratio=0.05,
        max_steps=max_steps,
        use_muon_optimizer=True,
        use_gradient_checkpointing=False,
        logging_steps=10,
        eval_steps=max_steps // 2,
        save_steps=0,
        save_total_limit=2,
        seed=0,
    )
    trainer = CPTTrainer(cfg)
    final_loss = trainer.train()
    evals_logged = [
        json.loads(line)
        for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
        if "eval_loss" in line
    ]
    before, after = evals_logged[0]["eval_ppl"], evals_logged[-1]["eval_ppl"]
    print(
        f"\nheld-out perplexity: before {before:,.1f} -> after {after:,.1f} "
        f"({'lower' if after < before else 'NOT lower'}); final training loss {final_loss:.4f}"
    )
    for kind in ("code", "docs"):
        b, a = evals_logged[0][f"eval_ppl/{kind}"], evals_logged[-1][f"eval_ppl/{kind}"]
        print(f"  {kind:5s} held-out perplexity: {b:,.1f} -> {a:,.1f}")
    print(f"report: {Path(cfg.output_dir) / 'report.html'}")
    print(f"trained model (Hugging Face format): {Path(cfg.output_dir) / 'final'}")
    return {
        "ppl_before": before,
        "ppl_after": after,
        "final_loss": final_loss,
        "improved": after < before and math.isfinite(after),
    }
