"""Data pipeline benchmark: our `prepare` and streaming loader vs HF `datasets` + run_clm.

Same input files (generated .jsonl from the Python standard library's text), same worker count N:
- ours/prepare: `qwen_cpt.data.cache.prepare` (N tokenizer processes) -> memory-mapped cache;
- ours/stream:  `BlockStream` over the raw files (N tokenizer processes), one epoch of blocks;
- baseline:     `datasets.load_dataset("json")` + `map(tokenize, batched=True, num_proc=N)` +
                run_clm's `group_texts` via `map(batched=True, num_proc=N)`.
Each runs in a fresh process; we report tokens/s and peak RSS (the process and its workers),
at two corpus sizes to show whether memory grows with the corpus.

    .venv/bin/python benchmarks/data_pipeline.py --mb 8 40 --workers 2 --tokenizer DIR

Needs the `bench` extra (datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

RUNNER = textwrap.dedent(
    """
    import json, os, resource, sys, time
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    mode, tok_dir, files, workers, max_length, work = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    t0 = time.perf_counter()
    if mode == "prepare":
        from qwen_cpt.data.cache import prepare
        m = prepare(files, os.path.join(work, "cache"), tok, tok_dir, workers=workers, progress=False)
        tokens = m["total_tokens"]
    elif mode == "stream":
        from qwen_cpt import data as D
        s = D.BlockStream("s", D.FileSource(files), tok, max_length, num_workers=workers,
                          tokenizer_path=tok_dir, shuffle_files=False)
        tokens = 0
        while True:
            b = s.next_block()
            if s.state.epoch > 0:
                break
            tokens += len(b.input_ids)
        s.close()
    else:
        os.environ["HF_DATASETS_CACHE"] = os.path.join(work, "hf_cache")
        from datasets import load_dataset, disable_progress_bars
        disable_progress_bars()
        ds = load_dataset("json", data_files=files, split="train", cache_dir=os.path.join(work, "hf_cache"))
        def tokenize(batch):
            return tok(batch["text"])
        ds = ds.map(tokenize, batched=True, num_proc=workers or None, remove_columns=ds.column_names)
        def group_texts(examples):  # run_clm.py
            concatenated = {k: sum(examples[k], []) for k in examples.keys()}
            total = (len(concatenated["input_ids"]) // max_length) * max_length
            result = {k: [t[i : i + max_length] for i in range(0, total, max_length)] for k, t in concatenated.items()}
            result["labels"] = result["input_ids"].copy()
            return result
        ds = ds.map(group_texts, batched=True, num_proc=workers or None)
        tokens = len(ds) * max_length
    dt = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"tokens": tokens, "seconds": dt, "rss_mb": own / 1024, "worker_rss_mb": kids / 1024}))
    """
)


def make_corpus(directory: Path, megabytes: float) -> list[str]:
    from qwen_cpt.demo import code_corpus, general_corpus

    # pydoc topics and stdlib sources (stdlib_corpus before the demo split it in two)
    docs = [
        t
        for n, t in general_corpus(max_chars=0) + code_corpus()
        if n.startswith(("topic:", "source:"))
    ]
    directory.mkdir(parents=True, exist_ok=True)
    target = int(megabytes * 1e6)
    files, written, k = [], 0, 0
    while written < target:
        path = directory / f"part-{k:03d}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            size = 0
            for i, d in enumerate(docs):
                line = json.dumps({"text": f"# copy {k}.{i}\n{d}"}) + "\n"
                fh.write(line)
                size += len(line)
                if written + size >= target:
                    break
        written += size
        files.append(str(path))
        k += 1
    return files


def run(mode: str, tok: str, files: list[str], workers: int, max_length: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                RUNNER,
                mode,
                tok,
                ",".join(files),
                str(workers),
                str(max_length),
                work,
            ],
            capture_output=True,
            text=True,
        )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["tokens_per_sec"] = r["tokens"] / r["seconds"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, nargs="+", default=[8, 40])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: build a tiny model)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = args.tokenizer
        if tok is None:
            from qwen_cpt.tokenizer import save_qwen25_tokenizer

            tok = str(Path(tmp) / "tok")
            save_qwen25_tokenizer(tok)
        rows = []
        for mb in args.mb:
            files = make_corpus(Path(tmp) / f"c{mb}", mb)
            for mode in ("prepare", "stream", "baseline"):
                r = run(mode, tok, files, args.workers, args.max_length)
                rows.append((mb, mode, r))
                print(
                    f"{mb:>5} MB {mode:9s} {r['tokens']:>11,} tokens {r['seconds']:7.1f} s "
                    f"{r['tokens_per_sec']:>10,.0f} tok/s  rss {r['rss_mb']:6.0f} MB "
                    f"(workers {r['worker_rss_mb']:5.0f} MB)",
                    flush=True,
                )
        print()
        print("| corpus | pipeline | tokens/s | vs baseline | peak RSS main / worker (MB) |")
        print("|---|---|---|---|---|")
        for mb in args.mb:
            base = next(r for m, mode, r in rows if m == mb and mode == "baseline")
            for m, mode, r in rows:
                if m == mb:
                    print(
                        f"| {mb:g} MB | {mode} | {r['tokens_per_sec']:,.0f} | "
                        f"{r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x | "
                        f"{r['rss_mb']:.0f} / {r['worker_rss_mb']:.0f} |"
                    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE))
    t = time.time()
    main()
    print(f"\ntotal {time.time() - t:.0f} s")
