"""``qwen-cpt clean``: MB/s and peak RSS per stage, rensa against datasketch, and our whole
pipeline against datatrove's equivalent pipeline, on one corpus of real text.

    .venv/bin/python benchmarks/clean_bench.py --mb 20                       # a quick look
    .venv/bin/python benchmarks/clean_bench.py --mb 200 --workers 2 --root /tmp/cleanbench

The corpus (built once under ``--root`` and reused): this machine's licences, copyright files,
documentation (.txt/.html), man pages (roff markup stripped) and Python's stdlib sources, each a
document, until ``--mb`` minus the injected part; then injected: exact copies (4%, half with case
and spacing changed), near-copies (4%: 2% of the words edited, a block of lines moved), systemd's
message catalogs in 15 other languages, junk pages and three documents holding a planted eval
passage (``eval.jsonl``); shuffled into 16 .jsonl files.

Each stage row is one ``qwen-cpt clean`` in a fresh process with that stage alone (language
identification always runs: the mix is always reported), timed around ``main()``; peak RSS is the
largest of the process and its workers. ``all`` runs every stage. datatrove's pipeline runs the
same steps with its own reader, filters, exact and MinHash dedup and writer on its local executor
(``--workers`` processes), with the same tokenizer, thresholds and signature settings; it has no
eval-file decontamination (its decontaminator reads lighteval tasks), so that step is off in both
for the comparison. rensa and datasketch sign the same shingles with the same settings (128
permutations, 16 bands x 8 rows, seed 1, threshold 0.8) and their decisions are compared.
datasketch and orjson (datatrove's reader) come with pip install -e ".[bench]". One run of each.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

FILES = 16


# --- the corpus -----------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _man(path: str) -> str | None:
    try:
        raw = gzip.decompress(Path(path).read_bytes()).decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    lines = [ln for ln in raw.splitlines() if not ln.startswith((".", "'", '\\"'))]
    return re.sub(r"\\f[BIRP]|\\\(..|\\-|\\&|\\e", "", "\n".join(lines))


def _base_texts():
    """Real text on this machine, one document per file, in a fixed order."""
    paths = sorted(glob.glob("/usr/share/common-licenses/*"))
    paths += sorted(glob.glob("/usr/share/doc/*/copyright"))
    paths += sorted(glob.glob("/usr/share/doc/**/*.txt", recursive=True))
    paths += sorted(glob.glob("/usr/share/doc/**/*.html", recursive=True))
    for p in paths:
        yield _read(p)
    for p in sorted(glob.glob("/usr/share/man/man*/*.gz")):
        yield _man(p)
    for p in sorted(glob.glob(f"{sys.base_prefix}/lib/python3*/**/*.py", recursive=True)):
        yield _read(p)


def _catalogs() -> list[str]:
    out = []
    for path in sorted(glob.glob("/usr/lib/systemd/catalog/systemd.*.catalog")):
        entries = re.split(r"^-- [0-9a-f]{32}\n", _read(path) or "", flags=re.M)[1:]
        body = [
            "".join(x for x in e.splitlines() if not re.match(r"^[A-Za-z-]+: ", x)) for e in entries
        ]
        out += ["\n\n".join(body[i : i + 8]) for i in range(0, len(body) - 7, 8)]
    return out


def _near_copy(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    if len(lines) > 6:
        i = rng.randrange(len(lines) - 2)
        block = lines[i : i + 2]
        del lines[i : i + 2]
        j = rng.randrange(len(lines))
        lines[j:j] = block
    words = "\n".join(lines).split(" ")
    return " ".join(w + "z" + w[::-1] if w and rng.random() < 0.02 else w for w in words)


def _junk(i: int) -> str:
    r = random.Random(i)
    kind = i % 4
    if kind == 0:
        return "\n".join(["Home | About | Contact | Login"] * r.randint(20, 80))
    if kind == 1:
        return " ".join(f"#{r.randrange(10**6)} ### $$$ ..." for _ in range(r.randint(50, 300)))
    if kind == 2:
        return "\n".join(f"- item {k}" for k in range(r.randint(50, 400)))
    return "\n".join(
        "".join(r.choice("qxzjkvw") for _ in range(r.randint(3, 40))) for _ in range(150)
    )


def build_corpus(root: Path, megabytes: float) -> tuple[Path, Path]:
    """``(corpus folder, eval file)`` under ``root``; built once, reused when it is there."""
    src, eval_file = root / "corpus", root / "eval.jsonl"
    if (root / "corpus.done").exists():
        return src, eval_file
    shutil.rmtree(src, ignore_errors=True)
    rng = random.Random(0)
    target = megabytes * 1e6
    base, size = [], 0
    for text in _base_texts():
        if text and 200 <= len(text) <= 1_000_000:
            base.append(text)
            size += len(text.encode())
            if size >= 0.9 * target:
                break
    docs = list(base)
    for n, i in enumerate(rng.sample(range(len(base)), len(base) // 25)):
        docs.append(base[i] if n % 2 else "  " + base[i].upper().replace(" ", "  \t"))
    for i in rng.sample(range(len(base)), len(base) // 25):
        docs.append(_near_copy(base[i], rng))
    docs += _catalogs() + [_junk(i) for i in range(400)]
    heldout = base.pop(rng.randrange(len(base)))  # its passage is planted, it is not trained on
    docs.remove(heldout)
    passage = " ".join(heldout.split()[20:80])
    eval_file.write_text(json.dumps({"text": passage}) + "\n", encoding="utf-8")
    docs += [f"{base[k][:2000]}\n\n{passage}\n\n{base[k + 1][:1000]}" for k in range(3)]
    rng.shuffle(docs)
    src.mkdir(parents=True)
    handles = [open(src / f"part{k:02d}.jsonl", "w", encoding="utf-8") for k in range(FILES)]
    for n, text in enumerate(docs):
        handles[n % FILES].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    for h in handles:
        h.close()
    (root / "corpus.done").write_text(f"{len(docs)} documents, {len(base)} base\n")
    return src, eval_file


# --- our pipeline, one stage at a time ----------------------------------------------------------

OFF = {
    "quality": ["--quality", "false"],
    "exact": ["--exact-dedup", "false"],
    "near": ["--near-dedup", "false"],
}


def stage_flags(eval_file: Path) -> dict[str, list[str]]:
    lang = ["--languages", "en"]
    return {
        "language": [*lang, *OFF["quality"], *OFF["exact"], *OFF["near"]],
        "quality": [*OFF["exact"], *OFF["near"]],
        "decontamination": [
            "--eval-files",
            str(eval_file),
            *OFF["quality"],
            *OFF["exact"],
            *OFF["near"],
        ],
        "exact_dedup": [*OFF["quality"], *OFF["near"]],
        "near_dedup": [*OFF["quality"], *OFF["exact"]],
        "all": [*lang],  # every stage but decontamination, as datatrove's pipeline below
    }


_TIMED = (
    "import resource, sys, time; t = time.perf_counter(); {body}; dt = time.perf_counter() - t; "
    "ru = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print('BENCH', dt, ru)"
)


def _timed(body: str, args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _TIMED.format(body=body), *args],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        sys.exit(f"benchmark step failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH"))
    _, seconds, rss_kb = line.split()
    return {"seconds": float(seconds), "peak_rss_mib": int(rss_kb) / 1024, "stdout": done.stdout}


def run_ours(src: Path, out: Path, flags: list[str], workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = ["clean", "--input", str(src), "--output", str(out), "--workers", str(workers)]
    r = _timed("from qwen_cpt.cli import main; assert main(sys.argv[1:]) == 0", args + flags)
    report = json.loads((out / "clean_report.json").read_text(encoding="utf-8"))
    r["documents_out"] = report["totals"]["documents_out"]
    r["bytes_out"] = report["totals"]["bytes_out"]
    r["removed"] = {s["stage"]: s["documents_removed"] for s in report["stages"]}
    return r


# --- datatrove's pipeline -----------------------------------------------------------------------


def _english(doc) -> bool:
    from qwen_cpt.clean.langid import LanguageId

    global _LANGID
    if "_LANGID" not in globals():
        _LANGID = LanguageId()
    return _LANGID.classify(doc.text)[0] == "en"


def _normalized(doc) -> bytes:
    from qwen_cpt.clean.text import normalized, tokens

    return normalized(tokens(doc.text)).encode("utf-8")


def datatrove_pipeline(src: str, work: str, workers: int) -> None:
    """Language (py3langid in a LambdaFilter: datatrove's own LanguageFilter downloads a fastText
    model), Gopher quality and repetition and FineWeb filters, exact dedup and MinHash dedup,
    written as .jsonl.zst; datatrove's reader, dedup, writer and local executor."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    from qwen_cpt.clean import CleanOptions
    from qwen_cpt.clean.quality import QualityFilter, _word_tokenizer

    w = Path(work)
    q = QualityFilter(CleanOptions())  # datatrove's filters, with our thresholds and tokenizer
    exact = ExactDedupConfig(content_getter=_normalized)
    minhash = MinhashConfig(
        n_grams=3,
        num_buckets=16,
        hashes_per_bucket=8,
        seed=1,
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )
    tok = _word_tokenizer()

    def run(pipeline, tasks):
        LocalPipelineExecutor(
            pipeline,
            tasks=tasks,
            workers=min(workers or 1, tasks),
            logging_dir=str(w / "logs" / str(time.monotonic_ns())),
        ).run()

    run(
        [
            JsonlReader(src),
            LambdaFilter(_english),
            q.gopher,
            q.repetition,
            q.fineweb,
            JsonlWriter(str(w / "filtered"), compression=None),
            ExactDedupSignature(str(w / "exact_sigs"), exact),
        ],
        FILES,
    )
    run([ExactFindDedups(str(w / "exact_sigs"), str(w / "exact_dups"), exact)], 1)
    run(
        [
            JsonlReader(str(w / "filtered")),
            ExactDedupFilter(str(w / "exact_dups"), exact),
            JsonlWriter(str(w / "exact"), compression=None),
            MinhashDedupSignature(str(w / "mh_sigs"), minhash, language=tok),
        ],
        FILES,
    )
    run([MinhashDedupBuckets(str(w / "mh_sigs"), str(w / "mh_buckets"), config=minhash)], 16)
    run([MinhashDedupCluster(str(w / "mh_buckets"), str(w / "mh_remove"), config=minhash)], 1)
    run(
        [
            JsonlReader(str(w / "exact")),
            MinhashDedupFilter(str(w / "mh_remove")),
            JsonlWriter(str(w / "out"), output_filename="${rank}.jsonl.zst", compression="zstd"),
        ],
        FILES,
    )


def run_datatrove(src: Path, work: Path, workers: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    body = "import clean_bench; clean_bench.datatrove_pipeline(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
    env_path = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([env_path, os.environ.get("PYTHONPATH", "")])
    r = _timed(body, [str(src), str(work), str(workers)])
    import zstandard

    docs = nbytes = 0
    for f in sorted((work / "out").glob("*.jsonl.zst")):
        with zstandard.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                docs += 1
                nbytes += len(json.loads(line)["text"].encode())
    r["documents_out"], r["bytes_out"] = docs, nbytes
    return r


# --- rensa vs datasketch --------------------------------------------------------------------


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
    d, d_dup = [], []
    for i, s in enumerate(docs):
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([x.encode() for x in s])
        d.append(m)
        d_dup.append(any(d[int(c)].jaccard(m) >= 0.8 for c in d_lsh.query(m)))
        if not d_dup[-1]:
            d_lsh.insert(str(i), m)
    d_s = time.perf_counter() - t
    both = sum(a and b for a, b in zip(r_dup, d_dup))
    return {
        "documents": len(docs),
        "shingle_mb": sum(len(" ".join(s)) for s in docs) / 1e6,
        "rensa_s": r_s,
        "datasketch_s": d_s,
        "rensa_duplicates": sum(r_dup),
        "datasketch_duplicates": sum(d_dup),
        "both_duplicates": both,
        "decision_agreement": sum(a == b for a, b in zip(r_dup, d_dup)) / len(docs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--root", default=None, help="where the corpus and outputs go [a temp dir]")
    ap.add_argument("--minhash-docs", type=int, default=2000)
    ap.add_argument(
        "--runs",
        nargs="*",
        default=[
            "language",
            "quality",
            "decontamination",
            "exact_dedup",
            "near_dedup",
            "all",
            "datatrove",
            "minhash",
        ],
    )
    args = ap.parse_args()
    root = Path(args.root or os.path.join("/tmp", f"cleanbench-{os.getpid()}"))
    root.mkdir(parents=True, exist_ok=True)
    src, eval_file = build_corpus(root, args.mb)
    size = sum(f.stat().st_size for f in src.glob("*.jsonl")) / 1e6
    docs = sum(1 for f in src.glob("*.jsonl") for _ in f.open(encoding="utf-8"))
    print(f"corpus: {size:.1f} MB, {docs:,} documents in {FILES} files under {src}", flush=True)
    print(f"workers: {args.workers}; load before: {os.getloadavg()}", flush=True)
    flags = stage_flags(eval_file)
    results = {}
    for name in args.runs:
        if name == "minhash":
            m = rensa_vs_datasketch(src, args.minhash_docs)
            results[name] = m
            print(
                f"minhash+lsh on {m['documents']} docs ({m['shingle_mb']:.1f} MB of shingles): "
                f"rensa {m['rensa_s']:.2f} s, datasketch {m['datasketch_s']:.2f} s "
                f"({m['datasketch_s'] / m['rensa_s']:.1f}x); duplicates {m['rensa_duplicates']} vs "
                f"{m['datasketch_duplicates']} ({m['both_duplicates']} by both), same decision "
                f"for {m['decision_agreement']:.2%}",
                flush=True,
            )
            continue
        if name == "datatrove":
            r = run_datatrove(src, root / "out_datatrove", args.workers)
        else:
            r = run_ours(src, root / f"out_{name}", flags[name], args.workers)
        r.pop("stdout")
        results[name] = r
        print(
            f"{name:16s} {r['seconds']:8.1f} s {size / r['seconds']:7.2f} MB/s "
            f"peak RSS {r['peak_rss_mib']:,.0f} MiB; out {r['documents_out']:,} docs "
            f"{r['bytes_out'] / 1e6:,.1f} MB {r.get('removed', '')}; load {os.getloadavg()}",
            flush=True,
        )
    (root / "results.json").write_text(
        json.dumps({"corpus_mb": size, "documents": docs, **results}, indent=1)
    )


if __name__ == "__main__":
    main()
