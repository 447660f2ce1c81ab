"""Bad input to the data pipeline: one clear DataError line naming the file; nothing dropped."""

import gzip
import json
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zstandard

from qwen_cpt import CPTConfig
from qwen_cpt import data as D
from qwen_cpt.data.tokenize import _batched
from qwen_cpt.model import ModelLoadError, load_tokenizer

WORDS = (
    "model data train token corpus legal court contract law medicine patient drug trial "
    "attention rotary embedding layer gradient optimizer schedule warmup decay batch epoch "
    "continued pretraining domain adaptation forgetting replay mixture weight sample"
).split()


def _records(n: int, seed: int = 0, words: int = 60) -> bytes:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(words)) + f" {i}."
        lines.append(json.dumps({"text": text}))
    return ("\n".join(lines) + "\n").encode()


def _pieces(files, **kw):
    src = D.FileSource([Path(f) for f in files], **kw)
    return [p.text for p in src.pieces(range(len(src.files)))]


# --- 1. truncated or mislabelled compressed files -------------------------------------------------


@pytest.fixture
def compressed(tmp_path):
    raw = _records(3000)
    gz, zst = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.zst"
    gz.write_bytes(gzip.compress(raw))
    zst.write_bytes(zstandard.ZstdCompressor().compress(raw))
    cut_gz, cut_zst = tmp_path / "cut.jsonl.gz", tmp_path / "cut.jsonl.zst"
    cut_gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    cut_zst.write_bytes(zst.read_bytes()[: zst.stat().st_size // 2])
    return {"raw": raw, "gz": gz, "zst": zst, "cut_gz": cut_gz, "cut_zst": cut_zst}


def test_whole_compressed_files_read_fully(compressed):
    n = compressed["raw"].count(b"\n")
    assert len(_pieces([compressed["gz"]])) == n
    assert len(_pieces([compressed["zst"]])) == n


def test_multi_member_gzip_and_multi_frame_zstd(tmp_path):
    raw = _records(50)
    gz, zst = tmp_path / "m.jsonl.gz", tmp_path / "m.jsonl.zst"
    gz.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    c = zstandard.ZstdCompressor()
    zst.write_bytes(c.compress(raw[:1000]) + c.compress(raw[1000:]))
    assert len(_pieces([gz])) == len(_pieces([zst])) == 50


@pytest.mark.parametrize("key,fmt", [("cut_gz", "gzip"), ("cut_zst", "zstd")])
@pytest.mark.parametrize("skip_bad", [False, True])
def test_truncated_file_is_an_error_when_streaming(compressed, key, fmt, skip_bad):
    path = compressed[key]
    with pytest.raises(D.DataError, match="truncated") as err:
        _pieces([compressed["gz"], path], skip_bad_records=skip_bad)
    assert str(path) in str(err.value) and fmt in str(err.value)
    assert "\n" not in str(err.value)


def test_zstd_cut_in_the_header_is_not_read_as_empty(tmp_path, compressed):
    path = tmp_path / "tiny.txt.zst"
    path.write_bytes(compressed["zst"].read_bytes()[:8])
    with pytest.raises(D.DataError, match="truncated"):
        _pieces([path])


def test_not_gzip_and_not_zstd(tmp_path):
    gz, zst = tmp_path / "x.txt.gz", tmp_path / "y.jsonl.zst"
    gz.write_text("this is plain text\n")
    zst.write_text('{"text": "plain"}\n')
    with pytest.raises(D.DataError, match="not gzip") as err:
        _pieces([gz])
    assert str(gz) in str(err.value)
    with pytest.raises(D.DataError, match="not zstd") as err:
        _pieces([zst])
    assert str(zst) in str(err.value)


def test_truncated_file_when_counting_estimating_and_preparing(tmp_path, compressed, tokenizer):
    for key in ("cut_gz", "cut_zst"):
        path = compressed[key]
        stream = D.BlockStream("train", D.FileSource([path]), tokenizer, 64)
        with pytest.raises(D.DataError, match="truncated"):
            stream.count_blocks()
        with pytest.raises(D.DataError, match="truncated"):
            stream.source.decompressed_bytes(sample_bytes=1 << 30)
        with pytest.raises(D.DataError, match="truncated"):
            D.BlockStream("t", D.FileSource([path]), tokenizer, 64).estimate_blocks(1 << 30)
        with pytest.raises(D.DataError, match="truncated"):
            D.prepare([str(path)], tmp_path / f"cache-{key}", tokenizer, None)
        assert not (tmp_path / f"cache-{key}").exists()


# --- 2. batching is bounded by text size for (piece, doc) items ----------------------------------


def test_batched_caps_characters_of_tuple_items():
    big = "word " * 200_000  # 1 MB of text per piece
    items = [(D.Piece(big, {"file": 0, "offset": i}), 0) for i in range(40)]
    batches = list(_batched(iter(items), 256, max_chars=4 << 20))
    assert sum(len(b) for b in batches) == 40
    assert max(len(b) for b in batches) <= 5
    for b in batches:
        assert sum(len(p.text) for p, _ in b) <= (4 << 20) + len(big)


# --- 3. epoch length of compressed files ---------------------------------------------------------


def test_estimate_blocks_of_compressed_files_is_close(tmp_path, tokenizer):
    raw = _records(6000, words=80)  # ~3.5 MB decompressed, ~4x smaller gzipped
    for name, data in (
        ("c.jsonl.gz", gzip.compress(raw)),
        ("c.jsonl.zst", zstandard.ZstdCompressor().compress(raw)),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        assert path.stat().st_size * 2 < len(raw)
        stream = D.BlockStream("train", D.FileSource([path]), tokenizer, 64)
        estimate = stream.estimate_blocks(sample_bytes=256 << 10)
        exact = D.BlockStream("train", D.FileSource([path]), tokenizer, 64).count_blocks()
        assert abs(estimate - exact) / exact < 0.25, (name, estimate, exact)
        sampled = D.FileSource([path]).decompressed_bytes(sample_bytes=256 << 10)  # a sample
        assert abs(sampled - len(raw)) / len(raw) < 0.1, (name, sampled, len(raw))


# --- 4. hidden files ------------------------------------------------------------------------------


def test_directories_and_globs_skip_dot_files(tmp_path):
    root = tmp_path / "data"
    for rel in ("a.txt", "sub/c.txt", ".hidden.txt", ".git/x.txt", ".ipynb_checkpoints/b.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"text of {rel}\n")
    want = [root / "a.txt", root / "sub" / "c.txt"]
    assert D.expand_paths([str(root)]) == want
    assert D.expand_paths([str(root / "**" / "*.txt")]) == want
    assert D.expand_paths([str(root / ".hidden.txt")]) == [root / ".hidden.txt"]  # named: read
    assert D.expand_paths([str(root / ".git" / "*.txt")]) == [root / ".git" / "x.txt"]
    assert D.expand_paths([str(root / ".*.txt")]) == [root / ".hidden.txt"]


# --- 5. never read the run's own output ------------------------------------------------------------


def test_expansion_excludes_output_dir(tmp_path, tiny_qwen):
    data = tmp_path / "runs"
    (data / "out").mkdir(parents=True)
    (data / "a.jsonl").write_bytes(_records(3))
    (data / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    cfg = CPTConfig(
        model_name_or_path=tiny_qwen,
        output_dir=str(data / "out"),
        train_files=[str(data / "**" / "*.jsonl")],
        eval_files=[str(data)],
    )
    train, evals = D.resolve_sources(cfg)
    assert train[0].source.files == [data / "a.jsonl"]
    assert evals[0].source.files == [data / "a.jsonl"]
    only = str(data / "out" / "*.jsonl")
    cfg = CPTConfig(model_name_or_path=tiny_qwen, output_dir=str(data / "out"), train_files=[only])
    with pytest.raises(D.DataError, match="output_dir") as err:
        D.resolve_sources(cfg)
    assert repr(only) in str(err.value)


# --- 6. a tokenizer that cannot encode text ------------------------------------------------------


def test_model_folder_without_tokenizer_files_is_refused(tmp_path, tiny_qwen):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_qwen, folder)
    for f in folder.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            f.unlink()
    with pytest.raises(ModelLoadError, match="no usable tokenizer") as err:
        load_tokenizer(str(folder))
    assert str(folder) in str(err.value) and "tokenizer_name_or_path" in str(err.value)
    assert load_tokenizer(tiny_qwen).eos_token_id is not None


# --- 7. the data fingerprint covers what changes the token stream --------------------------------


def _mixture(files, tokenizer, text_field="text", max_samples=None):
    src = D.FileSource([Path(f) for f in files], text_field)
    stream = D.BlockStream("train", src, tokenizer, 32, max_samples=max_samples)
    return D.Mixture({"train": stream}, {"train": 1.0})


def test_identity_covers_content_options_and_tokenizer(tmp_path, tokenizer, tiny_qwen):
    from transformers import AutoTokenizer

    from qwen_cpt.data import diff_identity

    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    a.write_text(json.dumps({"text": "hello world", "body": "x"}) + "\n")
    b.write_text(json.dumps({"text": "second file"}) + "\n")
    c.write_text(json.dumps({"text": "third file"}) + "\n")
    base = _mixture([a, b], tokenizer)
    saved, ident = base.describe_identity(), base.identity()
    assert len(ident) == 16 and json.loads(json.dumps(saved)) == saved  # storable
    assert diff_identity(saved, _mixture([a, b], tokenizer).describe_identity()) == []
    assert _mixture([a, b], tokenizer).identity() == ident

    a.write_text(json.dumps({"text": "HELLO WORLD", "body": "x"}) + "\n")  # same size
    now = _mixture([a, b], tokenizer)
    assert now.identity() != ident
    assert diff_identity(saved, now.describe_identity()) == [f"train: {a} changed content"]
    a.write_text(json.dumps({"text": "hello world", "body": "x"}) + "\n")

    lines = diff_identity(saved, _mixture([a, b], tokenizer, "body").describe_identity())
    assert lines == ["train: text_field: 'text' -> 'body'"]
    lines = diff_identity(saved, _mixture([a, b], tokenizer, max_samples=5).describe_identity())
    assert lines == ["train: max_samples: None -> 5"]
    lines = diff_identity(saved, _mixture([a, c], tokenizer).describe_identity())
    assert lines == [f"train: removed file {b}", f"train: added file {c}"]

    other = AutoTokenizer.from_pretrained(tiny_qwen)
    other.add_tokens(["<qwen-cpt-test-token>"])
    now = _mixture([a, b], other)
    assert now.identity() != ident
    assert diff_identity(saved, now.describe_identity()) == ["train: tokenizer changed"]


def test_identity_of_a_cache_records_its_tokenizer(tmp_path, tokenizer, tiny_qwen):
    from transformers import AutoTokenizer

    from qwen_cpt.data import diff_identity

    src = tmp_path / "a.jsonl"
    src.write_bytes(_records(20))
    other = AutoTokenizer.from_pretrained(tiny_qwen)
    other.add_tokens(["<qwen-cpt-test-token>"])
    ids = {}
    for name, tok in (("one", tokenizer), ("two", other)):  # rebuilt in place, other tokenizer
        cache = tmp_path / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        D.prepare([str(src)], cache, tok, None)
        stream = D.CacheStream("train", D.CacheSource(cache), tok.eos_token_id, 32)
        ids[name] = D.Mixture({"train": stream}, {"train": 1.0}).describe_identity()
    assert "train: tokenizer changed" in diff_identity(ids["one"], ids["two"])


def test_a_cache_made_with_another_tokenizer_is_refused_before_training(
    tmp_path, tokenizer, tiny_qwen
):
    """Same eos id, so the old eos-only check passed; its ids mean other tokens here."""
    from transformers import AutoTokenizer

    src = tmp_path / "a.jsonl"
    src.write_bytes(_records(20))
    other = AutoTokenizer.from_pretrained(tiny_qwen)
    other.add_tokens(["<qwen-cpt-test-token>"])
    assert other.eos_token_id == tokenizer.eos_token_id
    cache = tmp_path / "cache"
    D.prepare([str(src)], cache, other, None)
    spec = D.SourceSpec("train", D.CacheSource(cache))
    cfg = CPTConfig(model_name_or_path=tiny_qwen, max_length=32)
    with pytest.raises(D.DataError, match="cache was made with another tokenizer") as err:
        D.open_stream(spec, tokenizer, cfg, None, train=True)
    assert str(cache) in str(err.value) and "\n" not in str(err.value)
    D.open_stream(spec, other, cfg, None, train=True).close()  # its own tokenizer: accepted


# --- a validation slice when no eval data is given ---------------------------------------------


def _docs_of(blocks, tokenizer) -> set[str]:
    import re

    return set(re.findall(r"doc\d+", tokenizer.decode([t for b in blocks for t in b.input_ids])))


def test_validation_slice_is_held_out_of_training_on_every_epoch_and_resume(tmp_path, tokenizer):
    texts = [
        f"doc{i} " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) for i in range(300)
    ]
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:150]), encoding="utf-8")
    g = tmp_path / "b.txt"
    g.write_text("\n\n".join(texts[150:]), encoding="utf-8")

    def stream(seed=0):
        src = D.FileSource([f, g], txt_split="paragraph")
        return D.BlockStream("train", src, tokenizer, 64, seed=seed)

    s = stream()
    held = D.hold_out_validation(s, 0.05, 128)
    held_docs = _docs_of(held, tokenizer)
    assert 3 <= len(held_docs) <= 40  # about 5% of 300, from both files
    assert any(int(d[3:]) < 150 for d in held_docs) and any(int(d[3:]) >= 150 for d in held_docs)
    by_epoch: list[list] = [[], [], []]  # two epochs, each in another file order
    while s.state.epoch < 2:
        block = s.next_block()
        by_epoch[s.state.epoch].append(block)
    seen = [_docs_of(blocks, tokenizer) for blocks in by_epoch[:2]]
    every = {f"doc{i}" for i in range(300)}
    assert seen[0] == seen[1] == every - held_docs  # never trained on, nothing else lost
    again = stream()  # a resume rebuilds the same slice
    assert _docs_of(D.hold_out_validation(again, 0.05, 128), tokenizer) == held_docs
    assert again.describe_identity()["options"]["validation_split"] == 0.05
    other = _docs_of(D.hold_out_validation(stream(seed=1), 0.05, 128), tokenizer)
    assert other != held_docs
    capped = D.hold_out_validation(stream(), 0.5, 2)  # a large corpus is read only at its start
    assert len(capped) == 2


def test_validation_slice_of_a_few_texts_and_of_a_cache(tmp_path, tokenizer):
    two = D.BlockStream("train", D.SequenceSource(["first text here", "second text here"]),
                        tokenizer, 16)  # fmt: skip
    held = D.hold_out_validation(two, 0.01, 128)  # no document under 1%: the lowest one goes
    assert len(held) == 1
    left = two.next_block()
    assert two.count_blocks() == 1 and tokenizer.decode(left.input_ids) != tokenizer.decode(
        held[0].input_ids
    )
    one = D.BlockStream("train", D.SequenceSource(["only text"]), tokenizer, 16)
    assert D.hold_out_validation(one, 0.01, 128) == []  # nothing to spare
    src = tmp_path / "a.jsonl"
    src.write_bytes(_records(200))
    D.prepare([str(src)], tmp_path / "cache", tokenizer, None)
    cache = D.CacheStream("train", D.CacheSource(tmp_path / "cache"), tokenizer.eos_token_id, 32)
    n = cache.n_blocks
    held = D.hold_out_validation(cache, 0.05, 128)
    assert 1 <= len(held) < n // 5 and cache.count_blocks() == n - len(held)
    held_ids = {tuple(b.input_ids) for b in held}
    epoch = [cache.next_block() for _ in range(n - len(held))]
    assert not held_ids & {tuple(b.input_ids) for b in epoch}
    cache.next_block()
    assert cache.epoch == 1


# --- 8. tokenizer workers never re-run the user's script ----------------------------------------


def test_worker_pool_matches_in_process_and_fails_once(tmp_path, tokenizer, tiny_qwen):
    texts = [[f"batch {i} text {j} 你好" for j in range(7)] for i in range(9)]
    pool = D.TokenizerPool(tokenizer, 2, tiny_qwen)
    try:
        assert list(pool.map(iter(texts))) == [D.encode_batch(tokenizer, t) for t in texts]
        it = pool.map(iter(texts))  # abandoned half way: the next map is not confused
        next(it)
        del it
        assert list(pool.map(iter(texts[:3]))) == [D.encode_batch(tokenizer, t) for t in texts[:3]]
        pool.workers[1].proc.kill()
        with pytest.raises(D.DataError, match="tokenizer worker 1"):
            list(pool.map(iter(texts)))
    finally:
        pool.close()
    bad = D.TokenizerPool(tokenizer, 1, str(tmp_path / "missing"))
    try:
        with pytest.raises(D.DataError, match="tokenizer worker 0 failed") as err:
            list(bad.map(iter(texts)))
        assert "\n" not in str(err.value)
    finally:
        bad.close()


def test_plain_script_without_main_guard_trains_with_workers(tmp_path, tiny_qwen):
    script = tmp_path / "train_plain.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from qwen_cpt import CPTConfig, CPTTrainer
            print("TOP-LEVEL-MARKER", flush=True)
            cfg = CPTConfig(
                model_name_or_path={tiny_qwen!r},
                output_dir={str(tmp_path / "out")!r},
                max_length=32,
                per_device_train_batch_size=2,
                max_steps=2,
                dataloader_num_workers=2,
            )
            texts = ["Continued pretraining on plain text, number %d." % i for i in range(64)]
            loss = CPTTrainer(cfg).train(texts)
            print("FINAL-LOSS", loss, flush=True)
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("TOP-LEVEL-MARKER") == 1, proc.stdout
    assert proc.stdout.count("FINAL-LOSS") == 1, proc.stdout
