"""``qwen-cpt clean`` on a corpus built from real text on this machine.

The base corpus: licence texts (/usr/share/common-licenses, /usr/share/doc/*/copyright), man
pages and the docstrings of Python's standard library, made free of near-duplicates (no two base
documents share half their shingles: checked with exact sets). Injected: exact copies (some with
case and spacing changed), near-copies (2% of the words edited and a block of lines moved),
non-English documents (Chinese, French, Polish, Italian and Russian from systemd's message
catalogs), junk pages and documents that contain a planted eval passage.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from qwen_cpt.clean import CleanOptions, clean
from qwen_cpt.clean.text import shingles, tokens
from qwen_cpt.cli import main
from qwen_cpt.data.types import DataError

REPO = Path(__file__).resolve().parent.parent
EDIT_RATE = 0.02


# --- the corpus ----------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _man_page(path: str) -> str | None:
    try:
        raw = gzip.decompress(Path(path).read_bytes()).decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    lines = []
    for line in raw.splitlines():
        if line.startswith((".", "'", '\\"')):
            continue
        lines.append(re.sub(r"\\f[BIRP]|\\\(..|\\-|\\&|\\e", "", line))
    return "\n".join(lines)


_DOCSTRING = re.compile(r'^(?:\s*#[^\n]*\n)*\s*[rRuU]?"""(.*?)"""', re.S)


def _docstrings(limit: int) -> list[str]:
    """Module docstrings of Python's standard library (the text of its pydoc pages)."""
    out = []
    stdlib = Path(os.__file__).parent
    for path in sorted(stdlib.glob("*.py")):
        m = _DOCSTRING.match(_read(str(path)) or "")
        if m and len(m.group(1).split()) > 150:
            out.append(m.group(1).strip())
        if len(out) >= limit:
            break
    return out


def _base_documents() -> list[str]:
    candidates = [_read(p) for p in sorted(glob.glob("/usr/share/common-licenses/*"))]
    candidates += [_read(p) for p in sorted(glob.glob("/usr/share/doc/*/copyright"))[:300]]
    candidates += [_man_page(p) for p in sorted(glob.glob("/usr/share/man/man1/*.1.gz"))[:100]]
    candidates += _docstrings(50)
    docs, kept_sets = [], []
    for text in candidates:
        if not text or not 200 <= len(text.split()) <= 4000:
            continue
        s = {hash(x) for x in shingles(tokens(text), 3)}
        # no base document may be a near-duplicate of another (exact Jaccard < 0.5; a pair
        # whose sizes differ by more than 2x cannot reach it)
        if any(
            len(s) <= 2 * len(t) and len(t) <= 2 * len(s) and len(s & t) >= 0.5 * len(s | t)
            for t in kept_sets
        ):
            continue
        docs.append(text)
        kept_sets.append(s)
    return docs


def _catalog_entries(path: str) -> list[str]:
    text = _read(path) or ""
    out = []
    for entry in re.split(r"^-- [0-9a-f]{32}\n", text, flags=re.M)[1:]:
        body = [ln for ln in entry.splitlines() if ln and not re.match(r"^[A-Za-z-]+: ", ln)]
        if body:  # one paragraph, without the @PLACEHOLDER@ fields of the catalog
            out.append(re.sub(r"@[A-Z_]+@", "", "".join(x.strip() for x in body)))
    return out


def _non_english() -> dict[str, list[str]]:
    """Documents per language: eight catalog entries each, one paragraph per entry."""
    out: dict[str, list[str]] = {}
    for lang, files in {
        "zh": ["/usr/lib/systemd/catalog/systemd.zh_CN.catalog"],
        "fr": ["/usr/lib/systemd/catalog/systemd.fr.catalog"],
        "pl": ["/usr/lib/systemd/catalog/systemd.pl.catalog"],
        "it": ["/usr/lib/systemd/catalog/systemd.it.catalog"],
        "ru": ["/usr/lib/systemd/catalog/systemd.ru.catalog"],
    }.items():
        entries = [e for f in files for e in _catalog_entries(f)]
        out[lang] = ["\n\n".join(entries[i : i + 8]) for i in range(0, len(entries) - 7, 8)][:6]
    return out


def _near_copy(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    if len(lines) > 6:  # move a block of two lines elsewhere
        i = rng.randrange(len(lines) - 2)
        block = lines[i : i + 2]
        del lines[i : i + 2]
        j = rng.randrange(len(lines))
        lines[j:j] = block
    out = []
    for line in lines:
        words = line.split(" ")
        out.append(
            " ".join(w + "z" + w[::-1] if w and rng.random() < EDIT_RATE else w for w in words)
        )
    return "\n".join(out)


JUNK = [
    "\n".join(["Home | About | Contact | Login"] * 40),
    " ".join(f"#{random.Random(1).randrange(10**6)} ### $$$ %%% ..." for _ in range(120)),
    "\n".join(f"- item {i}" for i in range(200)),
    "buy now " * 300,
    "\n".join(
        "".join(random.Random(i).choice("qxzjkvw") for _ in range(random.Random(i).randint(3, 40)))
        for i in range(150)
    ),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = _base_documents()
    if len(base) < 120:
        pytest.skip(f"only {len(base)} real documents found on this machine")
    rng = random.Random(18)
    root = tmp_path_factory.mktemp("corpus")
    originals = base[:]  # base[i] is group i
    groups: list[int] = list(range(len(base)))  # group of each training document
    kinds: list[str] = ["base"] * len(base)
    docs: list[str] = list(base)
    exact_idx = rng.sample(range(len(base) - 1), 20)
    near_idx = rng.sample([i for i in range(len(base) - 1) if i not in exact_idx], 40)
    exact_copies = []
    for n, i in enumerate(exact_idx):
        copy = base[i] if n % 2 else "  " + base[i].upper().replace(" ", "  \t") + "\n"
        exact_copies.append(copy)
        docs.append(copy)
        groups.append(i)
        kinds.append("exact")
    near_copies = []
    for i in near_idx:
        copy = _near_copy(base[i], rng)
        near_copies.append(copy)
        docs.append(copy)
        groups.append(i)
        kinds.append("near")
    # the planted eval passage: 60 words from a held-out document, placed inside two documents
    heldout = base[-1]
    assert len(base) - 1 not in exact_idx + near_idx
    docs.pop(len(base) - 1)
    groups.pop(len(base) - 1)
    kinds.pop(len(base) - 1)
    words = heldout.split()
    passage = " ".join(words[40:100])
    eval_file = root / "eval" / "heldout_qa.jsonl"
    eval_file.parent.mkdir()
    eval_file.write_text(json.dumps({"text": passage}) + "\n", encoding="utf-8")
    planted = [
        base[0][:3000] + "\n\n" + passage + "\n\n" + base[1][:2000],
        "Quoted for reference: " + passage.upper().replace(",", " ,") + " End of the quote.",
    ]
    # shuffle, then write four .jsonl files and a .txt directory
    order = list(range(len(docs)))
    rng.shuffle(order)
    files = [root / "train" / f"part{k}.jsonl" for k in range(4)]
    files[0].parent.mkdir()
    handles = [open(f, "w", encoding="utf-8") for f in files]
    for n, k in enumerate(order):
        handles[n % 4].write(json.dumps({"text": docs[k]}, ensure_ascii=False) + "\n")
    for h in handles:
        h.close()
    other = _non_english()
    extra = root / "train" / "extra.jsonl"
    with open(extra, "w", encoding="utf-8") as fh:
        for lang, texts in other.items():
            for t in texts:
                fh.write(json.dumps({"text": t, "lang": lang}, ensure_ascii=False) + "\n")
        for t in JUNK + planted:
            fh.write(json.dumps({"text": t}) + "\n")
    return {
        "root": root,
        "inputs": [str(root / "train")],
        "docs": docs,
        "groups": groups,
        "kinds": kinds,
        "originals": originals,
        "exact_copies": exact_copies,
        "near_copies": near_copies,
        "other": other,
        "junk": JUNK,
        "planted": planted,
        "eval_file": eval_file,
        "passage": passage,
    }


def read_output(out: Path) -> list[str]:
    texts = []
    for shard in sorted(out.glob("part-*.jsonl.zst")):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(shard.read_bytes())
        texts += [json.loads(line)["text"] for line in data.decode("utf-8").splitlines()]
    return texts


# --- dedup ------------------------------------------------------------------------------------------


def test_exact_and_near_duplicates(corpus, tmp_path):
    out = tmp_path / "dedup"
    opts = CleanOptions(quality=False)  # dedup alone; language and eval stages are off
    parts = sorted(str(p) for p in (corpus["root"] / "train").glob("part*.jsonl"))
    report = clean(parts, out, opts)
    kept = read_output(out)
    kept_set = set(kept)
    assert len(kept) == len(kept_set)  # a copy with the very same text did not survive
    docs, groups = corpus["docs"], corpus["groups"]
    # exact copies: all removed (each group keeps one document)
    for copy in corpus["exact_copies"]:
        group = groups[docs.index(copy)]
        members = {d for d, g in zip(docs, groups) if g == group}  # a same-text copy once
        assert sum(d in kept_set for d in members) == 1, "an exact copy survived"
    stage = {s["stage"]: s for s in report["stages"]}
    assert stage["exact_dedup"]["documents_removed"] == len(corpus["exact_copies"])
    # near copies: recall over the injected copies, precision over everything near_dedup removed
    # a group's variants: its documents up to normalization (an exact copy is its original)
    variants: dict[int, dict[str, bool]] = {}
    for d, g in zip(docs, groups):
        v = variants.setdefault(g, {})
        key = " ".join(tokens(d))
        v[key] = v.get(key, False) or d in kept_set
    expected = sum(len(v) - 1 for v in variants.values())
    found = sum(sum(not k for k in v.values()) for v in variants.values() if len(v) > 1)
    wrong = sum(1 for v in variants.values() if not any(v.values()))
    removed = stage["near_dedup"]["documents_removed"]
    recall = found / expected
    precision = found / removed if removed else 0.0
    print(
        f"\nnear-dedup at threshold {opts.threshold}: recall {recall:.3f} ({found}/{expected}), "
        f"precision {precision:.3f} ({found}/{removed}); {wrong} base documents removed"
    )
    assert expected == len(corpus["near_copies"])
    assert found + wrong == removed  # every removal is accounted for
    assert recall >= 0.9
    assert precision >= 0.95
    # every group keeps a document, a second one only where a near-copy was missed
    assert all(any(v.values()) for v in variants.values())
    assert sum(sum(v.values()) - 1 for v in variants.values()) == expected - found
    assert report["clusters"] and report["clusters"][0]["size"] >= 2
    assert report["cluster_count"]["near_dedup"] == found


# --- language, quality, contamination ----------------------------------------------------------


def _task_yaml(root: Path, question: str) -> Path:
    """A local lm-eval multiple-choice task whose one document asks ``question``."""
    data = root / "task.jsonl"
    data.write_text(json.dumps({"q": question, "choices": ["yes", "no"], "answer": 0}) + "\n")
    path = root / "tiny_task.yaml"
    path.write_text(
        f"task: tiny_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return path


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    task = _task_yaml(root, corpus["passage"])  # the planted passage is also an lm-eval question
    opts = CleanOptions(
        languages=["en", "zh"],
        eval_files=[f"heldout={corpus['eval_file']}"],
        eval_tasks=[str(task)],
    )
    report = clean(corpus["inputs"], root / "clean", opts)
    return root / "clean", report


def test_language_filter_keeps_what_it_should(corpus, full_run):
    out, report = full_run
    kept = set(read_output(out))
    other = corpus["other"]
    assert len(other["zh"]) >= 3
    assert all(t in kept for t in other["zh"]), "a Chinese document was dropped"
    for lang in ("fr", "pl", "it", "ru"):
        assert other[lang] and not any(t in kept for t in other[lang]), lang
    rules = {r["rule"]: r["documents"] for r in report["rules"]}
    dropped = sum(n for r, n in rules.items() if r.startswith("language:"))
    injected = sum(len(other[x]) for x in ("fr", "pl", "it", "ru"))
    # the injected ones, and few English documents (langid can call code or a word list other)
    assert injected <= dropped <= injected + 0.05 * len(corpus["originals"])
    mix = {entry["language"]: entry for entry in report["languages"]}
    assert mix["zh"]["documents_in"] >= len(other["zh"]) and mix["zh"]["documents_out"] >= 3
    assert mix["en"]["documents_in"] > 100 and mix["en"]["documents_out"] >= 10


def test_junk_pages_are_removed_by_the_quality_rules(corpus, full_run):
    out, report = full_run
    kept = set(read_output(out))
    assert not any(j in kept for j in corpus["junk"])
    quality = next(s for s in report["stages"] if s["stage"] == "quality")
    assert quality["documents_removed"] >= len(corpus["junk"])
    samples = [s for r in report["rules"] if r["rule"].startswith("quality:") for s in r["samples"]]
    assert samples and all(s["snippet"] for s in samples)


def test_planted_eval_text_is_found(corpus, full_run):
    out, report = full_run
    kept = set(read_output(out))
    hit = report["contamination"]["heldout"]
    assert hit["documents"] == len(corpus["planted"])  # both, the upper-cased one too
    assert hit["eval_set"]["documents"] == 1
    assert not any(p in kept for p in corpus["planted"])
    task = report["contamination"]["tiny_task"]  # found through lm-eval's task documents too
    assert task["documents"] == len(corpus["planted"])
    assert task["eval_set"]["path"] == "lm-eval task tiny_task"
    window = " ".join(tokens(corpus["passage"])[:13])
    assert any(
        window in s["window"] or s["window"] in " ".join(tokens(corpus["passage"]))
        for s in hit["samples"]
    )
    html = (out / "clean_report.html").read_text(encoding="utf-8")
    assert "heldout" in html and "near_dedup" in html and "zh" in html
    manifest = json.loads((out / "clean_manifest.json").read_text(encoding="utf-8"))
    assert manifest["options"]["languages"] == ["en", "zh"]
    assert manifest["library_versions"]["rensa"] != "not installed"
    assert manifest["documents_out"] == len(read_output(out))
    assert list(manifest["eval_tasks"]) == ["tiny_task"]


def test_output_is_readable_by_the_trainer(full_run):
    from qwen_cpt.data.sources import FileSource, expand_paths, read_documents

    out, report = full_run
    files = expand_paths([str(out)])
    assert all(f.name.endswith(".jsonl.zst") for f in files)
    assert sum(1 for _ in read_documents(files)) == report["totals"]["documents_out"]
    assert isinstance(FileSource(files), FileSource)


# --- killed and rerun ---------------------------------------------------------------------------


def _small_corpus(root: Path, docs: list[str], files: int) -> Path:
    src = root / "many"
    src.mkdir()
    for k in range(files):
        with open(src / f"f{k:03d}.jsonl", "w", encoding="utf-8") as fh:
            for d in docs[k::files]:
                fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return src


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _kill_when(cmd: list[str], ready, env) -> None:
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not ready():
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # a real signal, to the job and its workers
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL


def test_killed_and_rerun_equals_uninterrupted(corpus, tmp_path, caplog):
    docs = corpus["docs"][:60] + corpus["near_copies"][:5] + corpus["other"]["zh"]
    src = _small_corpus(tmp_path, docs, 16)
    flags = ["--eval-files", str(corpus["eval_file"]), "--languages", "en", "zh"]
    reference = tmp_path / "reference"
    assert main(["clean", "--input", str(src), "--output", str(reference), *flags]) == 0

    out = tmp_path / "resumed"
    work, partial = tmp_path / "resumed.work", tmp_path / "resumed.partial"
    args = ["clean", "--input", str(src), "--output", str(out), *flags]
    cmd = [sys.executable, "-m", "qwen_cpt", *args, "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    # killed (SIGKILL, the job and its worker processes) while scanning, then while writing
    _kill_when(cmd, lambda: (work / "scan-00003.json").exists(), env)
    assert not out.exists() and (work / "job.json").exists()
    assert len(list(work.glob("scan-*.json"))) < 16
    _kill_when(cmd[:-2], lambda: (work / "write-00002.json").exists(), env)  # in-process
    assert not out.exists()
    assert len(list(work.glob("scan-*.json"))) == 16
    shards = {}  # shards finished before the kill (their marker written)
    for marker in work.glob("write-*.json"):
        name = json.loads(marker.read_text())["shard"]
        if name:
            st = (partial / name).stat()
            shards[name] = (st.st_ino, st.st_mtime_ns)
    assert shards
    # rerun in-process (workers: 0): the output does not depend on the number of workers
    with caplog.at_level("INFO", logger="qwen_cpt"):
        assert main(args) == 0
    assert "clean: scanning 0 of 16 files" in caplog.text  # nothing scanned twice
    for name, stamp in shards.items():  # finished shards were not rewritten
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == stamp, name
    assert _tree(out) == _tree(reference)
    assert not work.exists() and not partial.exists()


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    good = json.dumps({"text": "a fine document " * 20})
    (src / "a.jsonl").write_text(good + "\n", encoding="utf-8")
    (src / "b.jsonl").write_text(good + "\n" + good + "\n{not json\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["clean", "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.jsonl:3: malformed JSON" in err[0], err
    assert not out.exists()

    # an existing output is never written over
    out.mkdir()
    (out / "keep.txt").write_text("previous output")
    (src / "b.jsonl").write_text(good + "\n", encoding="utf-8")
    assert main(["clean", "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0], err
    assert _tree(out) == {"keep.txt": b"previous output"}

    # a missing field names the file and line; bad options are refused before reading
    (src / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    assert main(["clean", "--input", str(src), "--output", str(tmp_path / "o2")]) == 2
    assert "c.jsonl:1: record has no field 'text'" in capsys.readouterr().err
    assert (
        main(["clean", "--input", str(src), "--output", str(tmp_path / "o3"), "--bands", "7"]) == 2
    )
    assert "bands x rows" in capsys.readouterr().err
    (src / "c.jsonl").unlink()
    refused = {  # each: flags -> what the error names; nothing is created for any of them
        ("--languages", "english"): "languages: ['english'] not known to py3langid",
        ("--threshold", "1.5"): "threshold must be in (0, 1]",
        ("--eval-tasks", str(tmp_path / "no.yaml")): "no.yaml: no such task file",
        ("--eval-files", str(tmp_path / "none.jsonl")): "none.jsonl",
    }
    bad_eval = tmp_path / "ev.jsonl"
    bad_eval.write_text(good + "\n{bad\n", encoding="utf-8")
    refused[("--eval-files", str(bad_eval))] = "ev.jsonl:2: malformed JSON"
    for flags, message in refused.items():
        o = tmp_path / "o4"
        assert main(["clean", "--input", str(src), "--output", str(o), *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
        assert not o.exists() and not (tmp_path / "o4.work").exists(), flags
    # unreadable input: a .zst that is not zstd, named in one line
    (src / "d.jsonl.zst").write_bytes(b"not zstd at all" * 8)
    assert main(["clean", "--input", str(src), "--output", str(tmp_path / "o5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "d.jsonl.zst: not zstd" in err[0], err
    assert not (tmp_path / "o5").exists()
    # a .parquet that is not parquet: the same, not a pyarrow traceback
    (src / "d.jsonl.zst").unlink()
    (src / "e.parquet").write_bytes(b"PAR1 but truncated" * 4)
    assert main(["clean", "--input", str(src), "--output", str(tmp_path / "o6")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "e.parquet: not a readable parquet file" in err[0], err
    assert not (tmp_path / "o6").exists()


def test_a_job_that_keeps_nothing_fails_and_keeps_its_report(tmp_path, capsys):
    """Every document removed by the rules is not a success: exit 2 with one line naming the
    stages, and the output (report included) stays for the user to read."""
    src = tmp_path / "in"
    src.mkdir()
    junk = ["{} {} {}".format(*[str(i)] * 3) + " | ## $$ %% " * 40 for i in range(5)]
    (src / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in junk), encoding="utf-8"
    )
    out = tmp_path / "out"
    assert main(["clean", "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "kept none of the 5 documents (removed: quality 5)" in err[0], err
    assert (out / "clean_report.html").is_file() and (out / "clean_report.json").is_file()
    assert read_output(out) == []
    # reusing that output (prepare --clean, a training source) refuses it the same way
    with pytest.raises(DataError, match="kept none of the 5 documents"):
        clean([str(src)], out, CleanOptions(), reuse=True)


def test_an_output_is_reused_only_for_the_same_job(tmp_path, caplog):
    """prepare --clean and a training source reuse a finished output of the same job; one of
    other options is refused, and output folders placed inside the input are not read."""
    src = tmp_path / "in"
    src.mkdir()
    text = "The cat sat on the mat and then it went to sleep for a while. " * 12
    (src / "a.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    stale = src / "o.partial"  # as a killed job leaves it, inside the input folder
    stale.mkdir()
    (stale / "part-00099.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(json.dumps({"text": text + "x"}).encode() + b"\n")
    )
    opts = CleanOptions(quality=False)
    first = clean([str(src)], src / "o", opts)
    assert first["totals"]["documents_in"] == 1  # o.partial was not read as input
    before = _tree(src / "o")
    with caplog.at_level("INFO", logger="qwen_cpt"):
        assert clean([str(src)], src / "o", opts, reuse=True) == first
    assert "already holds this job's output" in caplog.text
    with pytest.raises(DataError, match="holds an earlier clean output of other inputs or options"):
        clean([str(src)], src / "o", CleanOptions(quality=False, ngram=5), reuse=True)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="holds other files"):
        clean([str(src)], tmp_path / "other", opts, reuse=True)
    assert _tree(src / "o") == before  # untouched by the reuse and the refusals
    assert read_output(src / "o") == [text]


def test_prepare_cleans_straight_into_a_cache(corpus, tiny_qwen, tmp_path, capsys):
    from qwen_cpt.clean import cleaned_inputs
    from qwen_cpt.data.cache import CacheSource

    src = _small_corpus(tmp_path, corpus["docs"][:20] + corpus["docs"][:3], 2)
    cache = tmp_path / "cache"
    args = ["prepare", "--tokenizer", tiny_qwen, "--input", str(src), "--output", str(cache)]
    assert main([*args, "--clean", "true", "--quality", "false"]) == 0
    assert "prepared" in capsys.readouterr().out
    manifest = json.loads((cache / "clean_manifest.json").read_text(encoding="utf-8"))
    assert (cache / "clean_report.html").is_file() and not (tmp_path / "cache.clean").exists()
    assert manifest["documents_in"] == 23 and manifest["documents_out"] == 20
    assert CacheSource(cache).manifest["total_docs"] == 20
    assert cleaned_inputs({"c": CacheSource(cache)})["c"]["job"] == manifest["job"]
    # bad clean options on prepare: refused before anything is written
    bad = [
        "prepare",
        "--tokenizer",
        tiny_qwen,
        "--input",
        str(src),
        "--output",
        str(tmp_path / "c2"),
    ]
    assert main([*bad, "--clean", "true", "--bands", "3"]) == 2
    assert "bands x rows" in capsys.readouterr().err
    assert not any(p.name.startswith("c2") for p in tmp_path.iterdir())


def test_a_training_source_is_cleaned_and_the_run_records_it(corpus, tiny_qwen, tmp_path, caplog):
    from qwen_cpt import CPTConfig, CPTTrainer
    from qwen_cpt.config import ConfigError

    data = _small_corpus(tmp_path, corpus["docs"][:12] + corpus["docs"][:2], 1)
    out = tmp_path / "run"
    source = {"name": "law", "files": [str(data)], "clean": {"quality": False}}
    kw = dict(
        model_name_or_path=tiny_qwen, output_dir=str(out), max_length=32,
        per_device_train_batch_size=2, max_steps=2, save_steps=2, eval_steps=100,
        logging_steps=1, use_tensorboard=False,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"sources\[0\]\.clean\.thresold: not a clean option"):
        CPTConfig(**kw, sources=[{**source, "clean": {"thresold": 0.5}}]).validate()
    with caplog.at_level("INFO", logger="qwen_cpt"):
        CPTTrainer(CPTConfig(**kw, sources=[source])).train()
    manifest = json.loads((out / "cleaned/law/clean_manifest.json").read_text(encoding="utf-8"))
    assert manifest["documents_in"] == 14 and manifest["documents_out"] == 12
    state = json.loads((out / "checkpoint-2/trainer_state.json").read_text(encoding="utf-8"))
    assert state["cleaned_data"]["law"]["job"] == manifest["job"]
    assert "law reads the cleaned output" in caplog.text and manifest["job"] in caplog.text


def test_skip_bad_records_counts_them(tmp_path):
    src = tmp_path / "in.jsonl"
    text = "The cat sat on the mat and then it went to sleep for a while. " * 12
    src.write_text(json.dumps({"text": text}) + "\n{broken\n", encoding="utf-8")
    opts = CleanOptions(skip_bad_records=True, quality=False)
    report = clean([str(src)], tmp_path / "o", opts)
    assert report["totals"]["skipped_records"] == 1
    assert read_output(tmp_path / "o") == [text]


def test_signature_similarity_is_rensas_jaccard():
    """The resolve phase compares stored digests; that equals rensa's own estimate."""
    import numpy as np
    from rensa import RMinHash

    a_tokens = [f"w{i}" for i in range(300)]
    b_tokens = [f"w{i}" for i in range(60, 360)]
    a, b = RMinHash.from_token_sets([a_tokens, b_tokens], num_perm=128, seed=1)
    share = np.count_nonzero(np.asarray(a.digest()) == np.asarray(b.digest())) / 128
    assert share == a.jaccard(b)
    assert 0.5 < share < 0.8  # true Jaccard 240/360 = 0.667


def test_text_tokens_split_chinese_into_characters():
    assert tokens("Hello,  WORLD! 你好世界") == ["hello", "world", "你", "好", "世", "界"]
    assert shingles(tokens("a b c d"), 3) == ["a b c", "b c d"]
