"""The cleaning job: scan every input file, resolve duplicates across the corpus, write shards.

Three phases, each resumable, each writing its results atomically (a temporary name, then
``os.replace``), so a job killed at any point and run again redoes only unfinished work:

1. **scan** (one task per input file, in ``workers`` processes): read the documents with the
   trainer's readers (:class:`qwen_cpt.data.sources.FileSource`), run the per-document stages
   (language, quality, decontamination), and save per document its stage verdict, byte count,
   language, the 128-bit hash of its normalized text and its MinHash signature (rensa).
2. **resolve** (one process, documents in input order): exact dedup on the hashes, then
   near-duplicate removal: each document queries rensa's LSH index of the documents kept so far;
   a candidate whose estimated Jaccard similarity reaches ``threshold`` makes it a duplicate of
   the earliest such document (kept), otherwise it is inserted. Memory holds a hash and the LSH
   band keys per document; the signatures are read from the scan files (memory-mapped).
3. **write** (one task per input file): re-read the file and write the kept documents to
   ``part-<file index>.jsonl.zst``.

Every decision depends on the input and the options only (never on timing or the number of
workers), so a killed and rerun job writes the same bytes as an uninterrupted one. The work lives
in ``<output>.work/`` and the shards in ``<output>.partial/``, which becomes ``<output>`` when the
report is written; an existing ``<output>`` is never touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from ..data.sources import FileSource, _kind, expand_paths, file_digest
from ..data.types import CACHE_MANIFEST, DataError
from .options import CleanOptions
from .stages import CODE, KEPT, MANIFEST, REPORT_HTML, REPORT_JSON, library_versions

log = logging.getLogger("qwen_cpt")

FORMAT = 1
MINHASH_BATCH = 256


def _atomic_write(path: Path, write: Callable) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()
    _atomic_write(path, lambda fh: fh.write(data))


# --- per-process state of the scan and write tasks ---------------------------------------------

_STATE: dict = {}


def _tools(opts: CleanOptions, eval_entries: Sequence[str]):
    key = json.dumps([opts.to_dict(), list(eval_entries)], sort_keys=True)
    if _STATE.get("key") != key:
        from .decontam import EvalIndex
        from .langid import LanguageId
        from .quality import QualityFilter

        _STATE.clear()
        _STATE["key"] = key
        _STATE["langid"] = LanguageId(opts.language_sample_chars)
        _STATE["quality"] = QualityFilter(opts) if opts.quality else None
        _STATE["eval"] = (
            EvalIndex(eval_entries, opts.decontam_ngram, opts.text_field) if eval_entries else None
        )
    return _STATE["langid"], _STATE["quality"], _STATE["eval"]


def _source(path: Path, opts: CleanOptions) -> FileSource:
    return FileSource([path], opts.text_field, opts.txt_split, opts.skip_bad_records)


def _documents(source: FileSource):
    from .decontam import read_whole_documents

    return read_whole_documents(source)


def scan_file(index: int, path: str, opts_dict: dict, work: str, eval_entries: list) -> dict:
    """Phase 1 for one input file (see the module docstring); returns its summary."""
    import xxhash
    from rensa import RMinHash

    from .text import normalized, shingles, snippet, tokens

    opts = CleanOptions(**opts_dict)
    langid, quality, evals = _tools(opts, eval_entries)
    work_dir = Path(work)
    source = _source(Path(path), opts)
    k = opts.samples_per_rule
    stage: list[int] = []
    nbytes: list[int] = []
    langs: list[str] = []
    exact = []
    sig_doc: list[int] = []
    minhashes: list = []
    digests: list[np.ndarray] = []
    pending: list[list[str]] = []
    rules: Counter = Counter()
    samples: dict[str, list] = {}
    contamination: dict[str, dict] = {}

    def flush() -> None:
        if pending:
            made = RMinHash.from_token_sets(pending, num_perm=opts.num_perm, seed=opts.seed)
            minhashes.extend(made)
            digests.extend(np.asarray(m.digest(), dtype=np.uint32) for m in made)
            pending.clear()

    for d, text in enumerate(_documents(source)):
        size = len(text.encode("utf-8"))
        lang, score = langid.classify(text)
        verdict, rule = KEPT, None
        if opts.languages and lang not in opts.languages:
            verdict, rule = CODE["language"], f"language:{lang}"
        elif opts.languages and score < opts.min_language_score:
            verdict, rule = CODE["language"], "language:low_score"
        if verdict == KEPT and quality is not None:
            failed = quality.check(text, lang)
            if failed:
                verdict, rule = CODE["quality"], f"quality:{failed}"
        toks = tokens(text) if verdict == KEPT or evals else None
        if evals:  # every document is checked, so the report shows all hits
            hits = evals.hits(toks)
            for name, (count, window) in hits.items():
                c = contamination.setdefault(name, {"documents": 0, "windows": 0, "samples": []})
                c["documents"] += 1
                c["windows"] += count
                if len(c["samples"]) < k:
                    c["samples"].append(
                        {"doc": d, "window": window, "windows": count, "snippet": snippet(text)}
                    )
            if hits and verdict == KEPT and opts.decontaminate == "drop":
                verdict, rule = CODE["decontamination"], "decontamination:" + "+".join(hits)
        if verdict == KEPT:
            h = xxhash.xxh3_128_intdigest(normalized(toks).encode("utf-8"))
            exact.append((h >> 64, h & 0xFFFFFFFFFFFFFFFF))
            if opts.near_dedup and toks:
                sig_doc.append(d)
                pending.append(shingles(toks, opts.ngram))
                if len(pending) >= MINHASH_BATCH:
                    flush()
        else:
            exact.append((0, 0))
            rules[rule] += 1
            shown = samples.setdefault(rule, [])
            if len(shown) < k:
                shown.append({"doc": d, "bytes": size, "lang": lang, "snippet": snippet(text)})
        stage.append(verdict)
        nbytes.append(size)
        langs.append(lang)
    flush()

    n = len(stage)
    arrays = {
        "stage": np.asarray(stage, dtype=np.uint8),
        "bytes": np.asarray(nbytes, dtype=np.uint64),
        "lang": np.asarray(langs, dtype="U8") if n else np.zeros(0, dtype="U8"),
        "exact": np.asarray(exact, dtype=np.uint64).reshape(n, 2),
        "sig_doc": np.asarray(sig_doc, dtype=np.uint32),
    }
    base = work_dir / f"scan-{index:05d}"
    _atomic_write(base.with_suffix(".npz"), lambda fh: np.savez(fh, **arrays))
    matrix = (
        np.stack(digests) if digests else np.zeros((0, opts.num_perm), dtype=np.uint32)
    ).astype(np.uint32)
    _atomic_write(base.with_suffix(".sig.npy"), lambda fh: np.save(fh, matrix))
    _atomic_write(base.with_suffix(".mh.pkl"), lambda fh: pickle.dump(minhashes, fh, protocol=4))
    summary = {
        "file": path,
        "documents": n,
        "rules": dict(sorted(rules.items())),
        "samples": samples,
        "contamination": contamination,
        "skipped_records": source.skipped,
    }
    _write_json(base.with_suffix(".json"), summary)  # written last: the phase's marker
    return summary


def write_file(index: int, path: str, opts_dict: dict, work: str, partial: str, want: list):
    """Phase 3 for one input file: its kept documents into ``part-<index>.jsonl.zst``."""
    import zstandard

    from .text import snippet

    opts = CleanOptions(**opts_dict)
    stage = np.load(Path(work) / f"keep-{index:05d}.npy")
    wanted = set(want)
    snippets: dict[str, str] = {}
    name = f"part-{index:05d}.jsonl.zst"
    target = Path(partial) / name
    kept = int(np.count_nonzero(stage == KEPT))
    if kept:

        def write(fh) -> None:
            writer = zstandard.ZstdCompressor(level=3).stream_writer(fh, closefd=False)
            for d, text in enumerate(_documents(_source(Path(path), opts))):
                if d in wanted:
                    snippets[str(d)] = snippet(text)
                if stage[d] == KEPT:
                    writer.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode())
            writer.flush(zstandard.FLUSH_FRAME)

        _atomic_write(target, write)
    elif wanted:
        for d, text in enumerate(_documents(_source(Path(path), opts))):
            if d in wanted:
                snippets[str(d)] = snippet(text)
    result = {"shard": name if kept else None, "documents": kept, "snippets": snippets}
    _write_json(Path(work) / f"write-{index:05d}.json", result)
    return result


# --- the job ----------------------------------------------------------------------------------


class _Runner:
    """Runs tasks in order in this process, or in a pool of ``workers`` processes."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            import multiprocessing as mp

            ctx = mp.get_context("forkserver")  # rensa's threads make a plain fork unsafe
            ctx.set_forkserver_preload(["qwen_cpt.clean.pipeline"])
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, fn, jobs: list[tuple]) -> list:
        """``fn(*job)`` for each job; the error of the lowest-numbered failed job is raised."""
        if self.pool is None:
            return [fn(*job) for job in jobs]
        futures = [self.pool.submit(fn, *job) for job in jobs]
        wait(futures, return_when="FIRST_EXCEPTION")
        for f in futures:
            if f.done() and f.exception() is not None:
                for other in futures:
                    other.cancel()
                wait(futures)
                for g in futures:
                    if not g.cancelled() and g.exception() is not None:
                        raise g.exception()
        return [f.result() for f in futures]


def _inputs(entries: Sequence[str], own: Sequence[Path] = ()) -> tuple[list[Path], list[str]]:
    """The input files and, for each, the ``--input`` entry it came from (its source).

    Nothing under ``own`` (the output and its work folders) is read: an output placed inside an
    input folder is never read back when the job resumes."""
    files, origin = [], []
    skip = [p.resolve() for p in own]
    for entry in entries:
        for f in expand_paths([entry], what="clean --input"):
            if any(f.resolve().is_relative_to(s) for s in skip):
                continue
            if f.is_dir() or _kind(f) == "" or (f / CACHE_MANIFEST).exists():
                raise DataError(
                    f"clean --input: {str(f)!r} is a qwen-cpt prepare cache (token ids, not "
                    "text); clean the files it was prepared from"
                )
            files.append(f)
            origin.append(entry)
    return files, origin


def _task_sets(opts: CleanOptions) -> dict[str, list[str]]:
    """``{eval set name: texts}`` of the lm-eval ``eval_tasks`` (a task named like an eval file
    is called ``task:<name>``)."""
    if not opts.eval_tasks:
        return {}
    from .decontam import parse_eval_entries, task_documents

    taken = {name for name, _ in parse_eval_entries(opts.eval_files)}
    return {
        (f"task:{name}" if name in taken else name): texts
        for name, texts in task_documents(opts.eval_tasks).items()
    }


def _texts_digest(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()[:16]


def _job_identity(
    opts: CleanOptions, files: list[Path], origin: list[str], tasks: dict[str, list[str]]
) -> dict:
    evals = {}
    if opts.eval_files:
        from .decontam import parse_eval_entries

        for name, path in parse_eval_entries(opts.eval_files):
            evals[name] = {
                str(f): file_digest(f) for f in expand_paths([path], what=f"eval_files ({name})")
            }
    return {
        "format": FORMAT,
        "options": opts.output_options(),
        "inputs": [[str(f), file_digest(f), o] for f, o in zip(files, origin)],
        "eval_files": evals,
        "eval_tasks": {name: _texts_digest(texts) for name, texts in tasks.items()},
    }


def job_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def clean(
    inputs: Sequence[str],
    output: str | Path,
    opts: CleanOptions | None = None,
    reuse: bool = False,
    what: str = "clean --output",
) -> dict:
    """Clean ``inputs`` (files, directories, globs) into the new directory ``output``.

    Returns the report (also written as ``clean_report.json`` and ``clean_report.html``).
    Raises :class:`DataError` for unusable input or an existing ``output``, before writing it.
    With ``reuse`` (``prepare --clean`` and a training source's ``clean``), an ``output`` that
    holds this very job's finished output (same inputs, options and eval data) is
    returned as it is; one of another job is still refused.
    """
    opts = (opts or CleanOptions()).validate()
    out = Path(output).expanduser()
    work = out.with_name(out.name + ".work")
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not reuse:
        raise DataError(
            f"{what}: {str(out)!r} already exists; qwen-cpt clean never writes over a "
            "previous output (choose a new directory, or remove that one)"
        )
    files, origin = _inputs(inputs, own=(out, work, partial))
    if opts.eval_files:  # a bad eval file is refused before the work folder is made
        _tools(opts, list(opts.eval_files))
    tasks = _task_sets(opts)
    identity = _job_identity(opts, files, origin, tasks)
    if out.exists():
        try:
            done = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
            report = json.loads((out / REPORT_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            done = None
        if done is None or done.get("job") != job_digest(identity):
            kind = "an earlier clean output of other inputs or options" if done else "other files"
            raise DataError(
                f"{what}: {str(out)!r} holds {kind}; qwen-cpt never writes over it (remove it, "
                "or choose another directory)"
            )
        log.info("clean: %s already holds this job's output (job %s)", out, done["job"])
        return _something_kept(report, out)
    job_file = work / "job.json"
    if work.exists():
        try:
            previous = json.loads(job_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous is None and any(work.iterdir()):
            raise DataError(f"clean: {str(work)!r} exists and is not a qwen-cpt clean work folder")
        if previous != identity:
            log.info("clean: the inputs or options changed since %s was begun; starting over", work)
            shutil.rmtree(work)
            shutil.rmtree(partial, ignore_errors=True)
        else:
            log.info("clean: resuming the job in %s", work)
    elif partial.exists():  # shards of a job whose work folder is gone: not this job's
        log.info("clean: removing %s, left by an earlier job", partial)
        shutil.rmtree(partial)
    work.mkdir(parents=True, exist_ok=True)
    partial.mkdir(parents=True, exist_ok=True)
    if not job_file.exists():
        _write_json(job_file, identity)
    od = opts.to_dict()
    eval_entries = list(opts.eval_files)
    for name, texts in tasks.items():  # the task documents, read by the scan like eval files
        target = work / ("eval-task-" + re.sub(r"[^\w.-]", "_", name) + ".jsonl")
        if not target.exists():
            data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
            encoded = data.encode("utf-8")
            _atomic_write(target, lambda fh, b=encoded: fh.write(b))
        eval_entries.append(f"{name.replace('/', '_')}={target}")

    with _Runner(opts.workers) as runner:
        # 1. scan
        todo = [
            (i, str(f), od, str(work), eval_entries)
            for i, f in enumerate(files)
            if not (work / f"scan-{i:05d}.json").exists()
        ]
        log.info("clean: scanning %d of %d files", len(todo), len(files))
        runner.run(scan_file, todo)
        scans = [
            json.loads((work / f"scan-{i:05d}.json").read_text(encoding="utf-8"))
            for i in range(len(files))
        ]
        if not sum(s["documents"] for s in scans):
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)
            raise DataError(f"clean --input: no documents found in {list(inputs)}")
        # 2. resolve
        resolved_file = work / "resolve.json"
        if not resolved_file.exists():
            log.info("clean: finding exact and near duplicates")
            _write_json(resolved_file, _resolve(len(files), opts, work))
        resolved = json.loads(resolved_file.read_text(encoding="utf-8"))
        # 3. write
        want: dict[int, set] = {}
        for f, d in resolved["wanted"]:
            want.setdefault(f, set()).add(d)
        todo = []
        for i, f in enumerate(files):
            marker = work / f"write-{i:05d}.json"
            if marker.exists():
                done = json.loads(marker.read_text(encoding="utf-8"))
                if done["shard"] is None or (partial / done["shard"]).exists():
                    continue
            todo.append((i, str(f), od, str(work), str(partial), sorted(want.get(i, ()))))
        log.info("clean: writing %d of %d shards", len(todo), len(files))
        runner.run(write_file, todo)
    writes = [
        json.loads((work / f"write-{i:05d}.json").read_text(encoding="utf-8"))
        for i in range(len(files))
    ]

    from .report import build_report, render_html

    eval_stats = dict(_tools(opts, eval_entries)[2].stats) if eval_entries else {}
    for name in tasks:  # named by the task, not by the exported file
        eval_stats[name.replace("/", "_")] = {
            **eval_stats[name.replace("/", "_")],
            "path": f"lm-eval task {name}",
            "files": [],
        }
    report = build_report(files, origin, opts, eval_stats, scans, resolved, writes, work)
    _write_json(partial / REPORT_JSON, report)
    html = render_html(report).encode("utf-8")
    _atomic_write(partial / REPORT_HTML, lambda fh: fh.write(html))
    manifest = {
        "format": FORMAT,
        "kind": "qwen-cpt clean output",
        "options": opts.output_options(),
        "library_versions": library_versions(),
        "inputs": identity["inputs"],
        "eval_files": identity["eval_files"],
        "eval_tasks": identity["eval_tasks"],
        "shards": [
            {"file": w["shard"], "documents": w["documents"], "input": str(files[i])}
            for i, w in enumerate(writes)
            if w["shard"]
        ],
        "documents_in": report["totals"]["documents_in"],
        "documents_out": report["totals"]["documents_out"],
        "job": job_digest(identity),
    }
    _write_json(partial / MANIFEST, manifest)
    os.replace(partial, out)
    shutil.rmtree(work, ignore_errors=True)
    return _something_kept(report, out)


def removed_summary(report: dict) -> str:
    """``quality 7, exact_dedup 3``: the documents each stage removed, stages that removed any."""
    stages = report["stages"]
    return ", ".join(
        f"{s['stage']} {s['documents_removed']:,}" for s in stages if s["documents_removed"]
    )


def _something_kept(report: dict, out: Path) -> dict:
    """``report``, unless the job kept no document: then a DataError saying which stages removed
    them (a clean that leaves nothing to train on is not a success). The output, its report
    included, stays for the user to read."""
    t = report["totals"]
    if t["documents_out"] == 0:
        raise DataError(
            f"clean: kept none of the {t['documents_in']:,} documents (removed: "
            f"{removed_summary(report) or 'none'}); {out / REPORT_HTML} shows what each rule "
            "removed; loosen those options, and clean into a new output"
        )
    return report


def _resolve(n_files: int, opts: CleanOptions, work: Path) -> dict:
    """Phase 2: exact and near duplicates, in input order (see the module docstring)."""
    from rensa import RMinHashLSH

    seen: dict[int, int] = {}  # normalized-text hash -> global id of the kept document
    lsh = RMinHashLSH(opts.threshold, opts.num_perm, opts.bands) if opts.near_dedup else None
    sig_docs: list[np.ndarray] = []
    sigs: list[np.ndarray] = []
    sizes: dict[str, Counter] = {"exact_dedup": Counter(), "near_dedup": Counter()}
    members: dict[str, dict] = {"exact_dedup": {}, "near_dedup": {}}
    samples: dict[str, list] = {"exact_dedup": [], "near_dedup": []}
    k, shown = opts.samples_per_rule, 5

    def gid(f: int, d: int) -> int:
        return (f << 32) | d

    for i in range(n_files):
        base = work / f"scan-{i:05d}"
        z = np.load(base.with_suffix(".npz"))
        stage = z["stage"].copy()
        exact = z["exact"]
        sig_doc = z["sig_doc"]
        sig_docs.append(sig_doc)
        sigs.append(np.load(base.with_suffix(".sig.npy"), mmap_mode="r"))
        row_of = {int(d): r for r, d in enumerate(sig_doc)}
        with open(base.with_suffix(".mh.pkl"), "rb") as fh:
            minhashes = pickle.load(fh)
        for d in np.flatnonzero(stage == KEPT).tolist():
            me = gid(i, d)
            if opts.exact_dedup:
                key = (int(exact[d, 0]) << 64) | int(exact[d, 1])
                rep = seen.get(key)
                if rep is not None:
                    stage[d] = CODE["exact_dedup"]
                    _note(sizes, members, samples, "exact_dedup", rep, me, None, k, shown)
                    continue
                seen[key] = me
            row = row_of.get(d)
            if lsh is None or row is None:
                continue
            mine = sigs[i][row]
            best = None
            for cand in sorted(lsh.query(minhashes[row])):
                cf, crow = cand >> 32, cand & 0xFFFFFFFF
                similarity = float(np.count_nonzero(sigs[cf][crow] == mine)) / opts.num_perm
                if similarity >= opts.threshold:
                    best = (gid(cf, int(sig_docs[cf][crow])), similarity)
                    break
            if best is not None:
                stage[d] = CODE["near_dedup"]
                _note(sizes, members, samples, "near_dedup", best[0], me, best[1], k, shown)
            else:
                lsh.insert(gid(i, row), minhashes[row])
        _atomic_write(work / f"keep-{i:05d}.npy", lambda fh, s=stage: np.save(fh, s))

    def split(g: int) -> list[int]:
        return [g >> 32, g & 0xFFFFFFFF]

    clusters = []
    for kind in ("exact_dedup", "near_dedup"):
        for rep, size in sorted(sizes[kind].items(), key=lambda kv: (-kv[1], kv[0])):
            clusters.append(
                {
                    "kind": kind,
                    "size": size + 1,  # the kept document and its duplicates
                    "kept": split(rep),
                    "removed": [[*split(m), s] for m, s in members[kind][rep]],
                }
            )
    clusters.sort(key=lambda c: (-c["size"], c["kind"], c["kept"]))
    clusters = clusters[: opts.top_clusters]
    wanted = set()
    for c in clusters:
        wanted.add(tuple(c["kept"]))
        wanted.update((m[0], m[1]) for m in c["removed"])
    for kind in samples:
        for s in samples[kind]:
            wanted.add(tuple(s["doc"]))
            wanted.add(tuple(s["kept"]))
    return {
        "clusters": clusters,
        "dedup_samples": samples,
        "cluster_count": {kind: len(sizes[kind]) for kind in sizes},
        "wanted": sorted([list(w) for w in wanted]),
    }


def _note(sizes, members, samples, kind, rep, me, similarity, k, shown) -> None:
    sizes[kind][rep] += 1
    listed = members[kind].setdefault(rep, [])
    if len(listed) < shown:
        listed.append((me, similarity))
    if len(samples[kind]) < k:
        samples[kind].append(
            {
                "doc": [me >> 32, me & 0xFFFFFFFF],
                "kept": [rep >> 32, rep & 0xFFFFFFFF],
                "similarity": similarity,
            }
        )
