"""``qwen-cpt clean``: throughput and peak RSS per stage, and rensa against datasketch.

    .venv/bin/python benchmarks/clean_bench.py --mb 20            # a 20 MB corpus
    .venv/bin/python benchmarks/clean_bench.py --mb 200 --workers 2

The corpus is this machine's real text (licences, copyright files, man pages, Python's stdlib
sources), repeated with 2% of the words edited per copy until it reaches ``--mb``, in 16
.jsonl files. Each stage runs alone (the others off) in a fresh process, so its MB/s and peak
RSS are its own; then the whole pipeline. rensa and datasketch sign the same shingles with the
same settings (128 permutations, 16 bands x 8 rows, threshold 0.8) and their duplicate
decisions are compared. datasketch is a dev dependency (pip install -e ".[dev]").
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_corpus(root: Path, megabytes: float, files: int = 16) -> Path:
    texts = []
    for p in sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(
        glob.glob("/usr/share/doc/*/copyright")
    ):
        try:
            texts.append(Path(p).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            pass
    for p in sorted(glob.glob("/usr/share/man/man1/*.gz"))[:500]:
        try:
            texts.append(gzip.decompress(Path(p).read_bytes()).decode("utf-8"))
        except (OSError, UnicodeDecodeError, EOFError):
            pass
    for p in sorted(Path(sys.base_prefix).glob("lib/python3*/*.py")):
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
    rng = random.Random(0)
    src = root / "corpus"
    src.mkdir()
    handles = [open(src / f"part{k:02d}.jsonl", "w", encoding="utf-8") for k in range(files)]
    written, n = 0, 0
    while written < megabytes * 1e6:
        t = texts[n % len(texts)]
        if n >= len(texts):  # a near-copy
            t = " ".join(w + "x" if rng.random() < 0.02 else w for w in t.split(" "))
        line = json.dumps({"text": t}) + "\n"
        handles[n % files].write(line)
        written += len(line.encode())
        n += 1
    for h in handles:
        h.close()
    return src


STAGE_FLAGS = {
    "language": [
        "--languages",
        "en",
        "--quality",
        "false",
        "--exact-dedup",
        "false",
        "--near-dedup",
        "false",
    ],
    "quality": ["--exact-dedup", "false", "--near-dedup", "false"],
    "exact_dedup": ["--quality", "false", "--near-dedup", "false"],
    "near_dedup": ["--quality", "false", "--exact-dedup", "false"],
    "all": [],
}


def run_stage(src: Path, out: Path, flags: list[str], workers: int) -> dict:
    code = (
        "import resource, sys, time; from qwen_cpt.cli import main; t = time.perf_counter(); "
        "rc = main(sys.argv[1:]); dt = time.perf_counter() - t; "
        "ru = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "print('BENCH', rc, dt, ru)"
    )
    args = ["clean", "--input", str(src), "--output", str(out), "--workers", str(workers)]
    done = subprocess.run(
        [sys.executable, "-c", code, *args, *flags], capture_output=True, text=True, check=True
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH"))
    _, rc, seconds, rss_kb = line.split()
    return {"seconds": float(seconds), "peak_rss_mib": int(rss_kb) / 1024}


def rensa_vs_datasketch(src: Path, limit: int) -> dict:
    from datasketch import MinHash, MinHashLSH
    from rensa import RMinHash, RMinHashLSH

    from qwen_cpt.clean.text import shingles, tokens

    docs = []
    for f in sorted(src.glob("*.jsonl")):
        for line in f.open(encoding="utf-8"):
            docs.append(shingles(tokens(json.loads(line)["text"]), 3))
            if len(docs) >= limit:
                break
    t = time.perf_counter()
    r = RMinHash.from_token_sets(docs, num_perm=128, seed=1)
    lsh = RMinHashLSH(0.8, 128, 16)
    r_dup = []
    for i, m in enumerate(r):
        r_dup.append(any(r[c].jaccard(m) >= 0.8 for c in lsh.query(m)))
        if not r_dup[-1]:
            lsh.insert(i, m)
    r_s = time.perf_counter() - t
    t = time.perf_counter()
    d_lsh = MinHashLSH(num_perm=128, params=(16, 8))
    d = []
    d_dup = []
    for i, s in enumerate(docs):
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([x.encode() for x in s])
        d.append(m)
        d_dup.append(any(d[int(c)].jaccard(m) >= 0.8 for c in d_lsh.query(m)))
        if not d_dup[-1]:
            d_lsh.insert(str(i), m)
    d_s = time.perf_counter() - t
    agree = sum(a == b for a, b in zip(r_dup, d_dup)) / len(docs)
    mb = sum(len(" ".join(s)) for s in docs) / 1e6
    return {
        "documents": len(docs),
        "rensa_s": r_s,
        "datasketch_s": d_s,
        "rensa_duplicates": sum(r_dup),
        "datasketch_duplicates": sum(d_dup),
        "decision_agreement": agree,
        "shingle_mb": mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--minhash-docs", type=int, default=2000)
    ap.add_argument("--stages", nargs="*", default=list(STAGE_FLAGS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = build_corpus(root, args.mb)
        size = sum(f.stat().st_size for f in src.glob("*.jsonl")) / 1e6
        print(f"corpus: {size:.1f} MB in 16 files")
        for stage in args.stages:
            r = run_stage(src, root / f"out_{stage}", STAGE_FLAGS[stage], args.workers)
            print(
                f"{stage:12s} {r['seconds']:8.1f} s {size / r['seconds']:7.2f} MB/s "
                f"peak RSS {r['peak_rss_mib']:,.0f} MiB"
            )
        m = rensa_vs_datasketch(src, args.minhash_docs)
        print(
            f"minhash+lsh on {m['documents']} docs ({m['shingle_mb']:.1f} MB of shingles): "
            f"rensa {m['rensa_s']:.2f} s, datasketch {m['datasketch_s']:.2f} s "
            f"({m['datasketch_s'] / m['rensa_s']:.1f}x); duplicates {m['rensa_duplicates']} vs "
            f"{m['datasketch_duplicates']}, same decision for {m['decision_agreement']:.1%}"
        )
        print(
            "peak RSS of this process:",
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "MiB",
        )


if __name__ == "__main__":
    main()
