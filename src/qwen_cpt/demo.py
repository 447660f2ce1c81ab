"""The main job, offline on CPU: continued pretraining of a small pretrained model.

1. **The base.** A small Qwen2-shaped model pretrained here, with this tool, on general text that
   every Debian machine with Python has: the licence texts in /usr/share/common-licenses, the
   English man pages and Python's pydoc topics. It gets its own byte-level BPE tokenizer
   (2,048 ids) so that a few minutes of CPU teach it real statistics: its loss starts far below
   ln(vocab). Built once and cached under ``<output_dir>/base-<hash of its inputs>/``.
2. **CPT on a domain:** the standard library's Python sources, twice: on the domain alone, and
   with a share of general text replayed. Each prints the domain and the general held-out loss
   before -> after and the two shipped downstream tasks (:mod:`qwen_cpt.tasks`) before -> after,
   with a verdict by the report's noise rule.

Held-out documents (and the documents the tasks are made from) are chosen by a hash of their name
(:func:`qwen_cpt.tasks.held_out`) and are never trained on.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import sys
import sysconfig
import time
from pathlib import Path

from .config import CPTConfig
from .tasks import CODE_TASK, GENERAL_TASK, held_out, task_path
from .trainer import CPTTrainer, setup_logging

VOCAB = 2048
EOS = "<|endoftext|>"
# The base and the two CPT runs; `budget` scales every step count (the smoke test uses 0.2).
BASE = dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384, steps=400, lr=5e-3)
CPT = dict(steps=100, lr=2e-3, replay=0.3, task_limit=100)
MAX_LENGTH, BATCH = 128, 16
GENERAL_CHARS = 3_000_000  # man pages beyond this are not read


# --- the text every machine has --------------------------------------------------------------------

_ROFF_ESCAPE = re.compile(r"\\(f(\[[^\]]*\]|\(..|.)|s[-+]?\d|\(..|\[[^\]]*\]|\*(\(..|.)|.)")


def roff_text(source: str) -> str:
    """Plain text of a man page's roff source: requests dropped (their arguments kept for
    headings and tagged paragraphs), escapes removed or replaced by their character."""
    out = []
    for line in source.splitlines():
        if line.startswith((".", "'")):
            head, _, rest = line[1:].partition(" ")
            if head in ("SH", "SS", "TP", "IP", "B", "I", "BR", "IR", "BI", "RB", "RI") and rest:
                line = rest.replace('"', "")
            else:
                continue
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\(em", "-")
        out.append(_ROFF_ESCAPE.sub(lambda m: "-" if m.group(0) == "\\-" else "", line))
    return "\n".join(out)


def general_corpus(max_chars: int = GENERAL_CHARS) -> list[tuple[str, str]]:
    """``[(name, text)]`` of general text: licences, English man pages, pydoc topics, each text
    once (a copy under another name would put held-out text into training)."""
    docs: list[tuple[str, str]] = []
    seen = set()
    for p in sorted(Path("/usr/share/common-licenses").glob("*")):
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text not in seen:  # GPL is a link to GPL-3
            seen.add(text)
            docs.append((f"licence:{p.name}", text))
    try:
        from pydoc_data.topics import topics

        docs += [(f"topic:{k}", v) for k, v in sorted(topics.items()) if len(v) > 200]
    except ImportError:  # some distributions strip pydoc_data
        pass
    total = sum(len(t) for _, t in docs)
    for p in sorted(Path("/usr/share/man").glob("man[1578]/*.gz")):
        if total >= max_chars:
            break
        try:
            text = roff_text(gzip.decompress(p.read_bytes()).decode("utf-8", "replace"))
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        if len(text) > 1500 and text not in seen:  # a page copied under another name
            seen.add(text)
            docs.append((f"man:{p.name[:-3]}", text))
            total += len(text)
    if not docs:
        raise RuntimeError("found no licence texts, man pages or pydoc topics on this machine")
    return docs


def code_corpus(max_files: int = 400) -> list[tuple[str, str]]:
    """``[(name, source)]`` of the standard library's top-level ``.py`` modules (2-60 kB)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(stdlib.glob("*.py")):
        if p.is_file() and 2_000 < p.stat().st_size < 60_000 and len(docs) < max_files:
            try:
                docs.append((f"source:{p.name}", p.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, OSError):
                continue
    if not docs:
        raise RuntimeError(f"found no standard-library sources under {stdlib}")
    return docs


def write_split(docs, folder: Path, kind: str) -> tuple[Path, Path, int]:
    """``<kind>_train.jsonl`` and ``<kind>_heldout.jsonl`` (the first 2,000 characters of each
    held-out document, so an eval pass takes seconds); returns both paths and training chars."""
    folder.mkdir(parents=True, exist_ok=True)
    train = [t for n, t in docs if not held_out(n)]
    paths = folder / f"{kind}_train.jsonl", folder / f"{kind}_heldout.jsonl"
    for path, texts in zip(paths, (train, [t[:2000] for n, t in docs if held_out(n)])):
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return *paths, sum(len(t) for t in train)


# --- the base --------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], folder: Path, vocab: int = VOCAB) -> None:
    """A byte-level BPE tokenizer of ``vocab`` ids on ``texts``, saved as a
    PreTrainedTokenizerFast folder (``<|endoftext|>`` is eos and pad, as in Qwen2.5)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.model_max_length = MAX_LENGTH * 8
    fast.save_pretrained(folder)


def _run_config(model: str, out: Path, sources: list[dict], eval_file: Path, steps: int, lr: float,
                **kw) -> CPTConfig:  # fmt: skip
    return CPTConfig(
        model_name_or_path=str(model),
        output_dir=str(out),
        overwrite_output_dir=True,  # `make demo` again runs the CPT again
        sources=sources,
        eval_files=[str(eval_file)],
        max_length=MAX_LENGTH,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=8,
        learning_rate=lr,
        warmup_ratio=0.05,
        max_steps=steps,
        use_muon_optimizer=True,
        use_gradient_checkpointing=False,
        logging_steps=max(1, steps // 10),
        eval_steps=max(1, steps // 2),
        save_steps=0,
        save_total_limit=1,
        use_tensorboard=False,
        use_bf16=False,  # CPU bf16 autocast is slower than fp32 at this size
        device="cpu",
        seed=0,
        **kw,
    )


def build_base(out: Path, data: Path, general: tuple[Path, Path], budget: float) -> Path:
    """The pretrained base (``final/`` of a run on general text), reused when its inputs (the
    corpus' names and sizes, the settings, this file's version of them) are unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    train_file, heldout_file = general
    steps = max(4, int(BASE["steps"] * budget))
    key = json.dumps(
        [BASE, steps, VOCAB, MAX_LENGTH, BATCH, train_file.stat().st_size, sys.version_info[:2]]
    )
    folder = out / f"base-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    final = folder / "run" / "final"
    if (final / "config.json").is_file():
        print(f"base model: {final} (cached; delete the folder to build it again)", flush=True)
        return final
    started = time.perf_counter()
    texts = [json.loads(x)["text"] for x in train_file.read_text(encoding="utf-8").splitlines()]
    init = folder / "init"
    train_tokenizer(texts, init)
    tok = AutoTokenizer.from_pretrained(init)
    import torch

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=BASE["hidden"], intermediate_size=BASE["intermediate"],
        num_hidden_layers=BASE["layers"], num_attention_heads=BASE["heads"],
        num_key_value_heads=BASE["kv_heads"], max_position_embeddings=MAX_LENGTH * 8,
        tie_word_embeddings=True, rope_theta=1e4, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id, bos_token_id=None, use_cache=False,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(init)
    print(
        f"base model: pretraining {init.parent.name} ({VOCAB:,}-id BPE tokenizer, "
        f"{sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()):,} "
        f"parameters) on general text for {steps} steps ...",
        flush=True,
    )
    sources = [{"name": "general", "files": [str(train_file)]}]
    cfg = _run_config(init, folder / "run", sources, heldout_file, steps, BASE["lr"])
    CPTTrainer(cfg).train()
    print(f"base model: {final} (built in {time.perf_counter() - started:.0f} s)", flush=True)
    return final


# --- the CPT runs and what they print --------------------------------------------------------------


def _evals(run_dir: Path) -> tuple[dict, dict]:
    """The first and the last eval record of a run, eval loss and downstream merged per step."""
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if any(k.startswith(("eval_loss", "downstream/")) for k in rec):
            by_step.setdefault(rec["step"], {}).update(rec)
    steps = sorted(by_step)
    return by_step[steps[0]], by_step[steps[-1]]


def _verdict(before: float, after: float, se_b, se_a, higher_is_better: bool) -> str:
    """The report's rule: the same within noise when the change is at most twice the standard
    error of the difference (qwen_cpt.report.read)."""
    noise = 2 * math.sqrt((se_b or 0) ** 2 + (se_a or 0) ** 2)
    if abs(after - before) <= noise:
        return "same"
    return "better" if (after > before) == higher_is_better else "worse"


def summarize(run_dir: Path) -> list[tuple[str, float, float, str]]:
    """``(what, before, after, verdict)`` rows of a run: the two held-out losses, then the tasks."""
    first, last = _evals(run_dir)
    rows = []
    for label, key in (("domain loss (code)", "eval_loss/code"), ("general loss", "eval_loss")):
        se = key.replace("eval_loss", "eval_loss_se", 1) if "/" in key else "eval_loss_se"
        v = _verdict(first[key], last[key], first.get(se), last.get(se), False)
        rows.append((label, first[key], last[key], v))
    for task in (CODE_TASK, GENERAL_TASK):
        key, se = f"downstream/{task}/acc", f"downstream/{task}/acc_stderr"
        if key in first and key in last:
            v = _verdict(first[key], last[key], first.get(se), last.get(se), True)
            rows.append((f"{task} acc", first[key], last[key], v))
    return rows


def run_demo(
    output_dir: str = "./demo_output", budget: float = 1.0, task_limit: int = CPT["task_limit"]
) -> dict:
    """Build (or reuse) the base, run CPT with and without replay, print what changed.
    ``task_limit``: items of each downstream task scored."""
    import logging
    import os

    setup_logging()
    # lm-eval's progress bars and its note on custom datasets (ours) would bury the results
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    started = time.perf_counter()
    out = Path(output_dir)
    data = out / "data"
    general = write_split(general_corpus(), data, "general")
    code = write_split(code_corpus(), data, "code")
    print(
        f"corpus: general text {general[2] / 1e6:.2f} M characters (licences, man pages, pydoc "
        f"topics), domain {code[2] / 1e6:.2f} M characters (Python "
        f"{sysconfig.get_python_version()} standard library); held-out documents by name hash",
        flush=True,
    )
    base = build_base(out, data, general[:2], budget)
    steps = max(4, int(CPT["steps"] * budget))
    domain = {"name": "code", "files": [str(code[0])], "eval_files": [str(code[1])]}
    replay = {"name": "general", "files": [str(general[0])]}
    runs = {
        "cpt-no-replay": [domain],
        "cpt-replay": [
            {**domain, "weight": 1 - CPT["replay"]},
            {**replay, "weight": CPT["replay"]},
        ],
    }
    results = {}
    for name, sources in runs.items():
        print(f"\n{name}: continued pretraining of the base for {steps} steps ...", flush=True)
        cfg = _run_config(
            base, out / name, sources, general[1], steps, CPT["lr"], run_name=f"demo {name}",
            eval_tasks=[str(task_path(CODE_TASK)), str(task_path(GENERAL_TASK))],
            forgetting_tolerance=0.25, eval_tasks_limit=task_limit,
        )  # fmt: skip
        CPTTrainer(cfg).train()
        results[name] = summarize(out / name)
    base_loss = results["cpt-no-replay"][0][1]
    print(
        f"\nbase model before CPT: domain loss {base_loss:.3f} (perplexity "
        f"{math.exp(base_loss):,.1f}); an untrained model starts at ln({VOCAB:,}) = "
        f"{math.log(VOCAB):.2f}"
    )
    replay_pct = f"{CPT['replay']:.0%}"
    for name, rows in results.items():
        what = "no replay" if name == "cpt-no-replay" else f"{replay_pct} general text replayed"
        print(f"\n{name} ({what}), {steps} steps:")
        for label, b, a, v in rows:
            ppl = f"   (ppl {math.exp(b):,.1f} -> {math.exp(a):,.1f})" if "loss" in label else ""
            print(f"  {label:24s} {b:7.3f} -> {a:7.3f}  {v:6s}{ppl}".rstrip())
        print(f"  report: {out / name / 'report.html'}")
    print(f"\ntrained models (Hugging Face format): {out}/cpt-*/final")
    print(f"demo time: {time.perf_counter() - started:.0f} s")
    domain_rows = [rows[0] for rows in results.values()]
    return {
        "base_loss": base_loss,
        "results": results,
        "improved": all(a < b and math.isfinite(a) for _, b, a, _ in domain_rows),
    }
