"""The streaming data pipeline: sources, workers, exact positions, mixing, cache, bad input."""

import gzip
import json
import subprocess
import sys
import textwrap

import pytest

from qwen_cpt import CPTConfig, CPTTrainer, DataError
from qwen_cpt import data as D
from qwen_cpt.cli import main

from .conftest import SAMPLE_TEXTS


def _stream(tokenizer, files, max_length=32, workers=0, tok_path=None, **kw):
    src = D.FileSource(list(files), **kw)
    return D.BlockStream(
        "s", src, tokenizer, max_length, num_workers=workers, tokenizer_path=tok_path, seed=1
    )


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _ids(blocks):
    return [b.input_ids for b in blocks]


def test_formats_txt_paragraph_jsonl_parquet_gz_zst(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    _jsonl(tmp_path / "b.jsonl", ["json doc"])
    pq.write_table(pa.table({"text": ["parquet doc", "another"]}), tmp_path / "c.parquet")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "gzip doc"}) + "\n")
    (tmp_path / "e.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zstd doc"))
    files = D.expand_paths([str(tmp_path)])
    assert [f.name for f in files] == ["a.txt", "b.jsonl", "c.parquet", "d.jsonl.gz", "e.txt.zst"]
    by_file = list(D.read_documents(files))
    assert by_file[0] == "first paragraph\n\nsecond paragraph\n"  # txt_split=file: one document
    assert by_file[1:] == ["json doc", "parquet doc", "another", "gzip doc", "zstd doc"]
    src = D.FileSource(files[:1], txt_split="paragraph")
    assert [p.text for p in src.pieces([0])] == ["first paragraph\n", "second paragraph\n"]


def test_worker_count_does_not_change_the_blocks(tmp_path, tokenizer, tiny_qwen):
    f = _jsonl(tmp_path / "x.jsonl", [t + f" {i}" for i, t in enumerate(SAMPLE_TEXTS * 5)])
    serial = D.one_epoch(_stream(tokenizer, [f]))
    parallel_stream = _stream(tokenizer, [f], workers=2, tok_path=tiny_qwen)
    parallel = D.one_epoch(parallel_stream)
    parallel_stream.close()
    assert _ids(serial) == _ids(parallel) and len(serial) > 20


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_position_continues_with_the_exact_next_blocks(
    tmp_path, tokenizer, tiny_qwen, workers
):
    files = [
        _jsonl(tmp_path / f"{k}.jsonl", [t + f" file {k}" for t in SAMPLE_TEXTS]) for k in range(3)
    ]
    ref = _stream(tokenizer, files, 24, workers, tiny_qwen)
    expected = [ref.next_block().input_ids for _ in range(60)]  # crosses an epoch boundary
    ref.close()
    for k in (1, 17, 33):
        first = _stream(tokenizer, files, 24)
        for _ in range(k):
            first.next_block()
        state = json.loads(json.dumps(first.state_dict()))  # small and serializable
        assert len(json.dumps(state)) < 200
        again = _stream(tokenizer, files, 24, workers, tiny_qwen)
        again.load_state_dict(state)
        assert [again.next_block().input_ids for _ in range(60 - k)] == expected[k:]
        again.close()


def test_huge_single_line_document_streams_in_bounded_pieces(tmp_path, tokenizer):
    # 5 MB on one line (no newline): read in ~1 MB pieces, never whole
    path = tmp_path / "huge.txt"
    word = "lorem ipsum dolor sit amet "
    path.write_text(word * (5_000_000 // len(word)))
    pieces = list(D.FileSource([path]).pieces([0]))
    assert len(pieces) >= 5
    assert all(len(p.text.encode()) <= D.PIECE_BYTES for p in pieces)
    assert pieces[0].first and not pieces[1].first and pieces[-1].last and not pieces[0].last
    assert "".join(p.text for p in pieces) == path.read_text()
    # blocks restart positions only at block starts: one document spans them all
    stream = _stream(tokenizer, [path], 64)
    blocks = [stream.next_block() for _ in range(50)]
    assert all(b.position_ids == list(range(64)) for b in blocks)


def test_peak_memory_does_not_grow_with_corpus_size(tmp_path, tiny_qwen):
    """Stream 1x and 10x corpora through the loader in fresh processes; compare peak RSS."""
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        from transformers import AutoTokenizer
        from qwen_cpt import data as D
        tok = AutoTokenizer.from_pretrained({tiny_qwen!r})
        stream = D.BlockStream("s", D.FileSource([sys.argv[1]]), tok, 256, seed=0)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = 0
        while stream.state.epoch == 0:
            stream.next_block(); n += 1
        print(json.dumps({{"blocks": n, "base_kb": base,
                          "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
        """
    )
    results = {}
    line = json.dumps({"text": " ".join(SAMPLE_TEXTS)}) + "\n"
    for scale in (1, 10):
        f = tmp_path / f"c{scale}.jsonl"
        f.write_text(line * (300 * scale))  # ~0.5 MB and ~5 MB
        out = subprocess.run(
            [sys.executable, "-c", script, str(f)], capture_output=True, text=True, check=True
        )
        results[scale] = json.loads(out.stdout.strip().splitlines()[-1])
    assert results[10]["blocks"] > 9 * results[1]["blocks"]
    growth_small = results[1]["peak_kb"] - results[1]["base_kb"]
    growth_big = results[10]["peak_kb"] - results[10]["base_kb"]
    # holding the 10x corpus's tokens would add > 20 MB; streaming adds nothing that scales
    assert growth_big < growth_small + 8_000, results


def test_a_150_mb_document_trains_in_the_memory_of_a_15_mb_one(tmp_path, tiny_qwen):
    """One-line documents of 15 and 150 MB, a few training steps each in a fresh process."""
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        from qwen_cpt import CPTConfig, CPTTrainer
        cfg = CPTConfig(model_name_or_path={tiny_qwen!r}, train_files=[sys.argv[1]],
                        output_dir=sys.argv[2], max_length=64, max_steps=3, save_steps=0,
                        per_device_train_batch_size=2, logging_steps=1)
        loss = CPTTrainer(cfg).train()
        print(json.dumps({{"loss": loss,
                          "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
        """
    )
    sentence = " ".join(SAMPLE_TEXTS).replace("\n", " ") + " "
    peak = {}
    for mb in (15, 150):
        f = tmp_path / f"doc{mb}.txt"
        with open(f, "w", encoding="utf-8") as fh:
            chunk = sentence * (1_000_000 // len(sentence))
            for _ in range(mb):
                fh.write(chunk)
        out = subprocess.run(
            [sys.executable, "-c", script, str(f), str(tmp_path / f"out{mb}")],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["loss"] > 0
        peak[mb] = result["peak_kb"] / 1024
        f.unlink()
    # the old loader held a long document's pieces whole: 6.4 GB at 150 MB against 2.3 GB at 15
    assert peak[150] < peak[15] + 300, peak


def test_mixture_hits_its_token_shares_and_eval_is_per_source(tiny_qwen, tmp_path):
    dom = _jsonl(
        tmp_path / "domain.jsonl", [f"legal clause {i}: " + SAMPLE_TEXTS[1] for i in range(60)]
    )
    gen = _jsonl(
        tmp_path / "general.jsonl", [f"general text {i}: " + SAMPLE_TEXTS[0] for i in range(30)]
    )
    cfg = CPTConfig(
        model_name_or_path=tiny_qwen,
        output_dir=str(tmp_path / "out"),
        max_length=16,
        per_device_train_batch_size=4,
        max_steps=25,
        logging_steps=25,
        eval_steps=1000,
        sources=[
            {"name": "domain", "files": [str(dom)], "weight": 0.9, "eval_files": [str(dom)]},
            {"name": "general", "files": [str(gen)], "weight": 0.1, "eval_files": [str(gen)]},
        ],
    )
    CPTTrainer(cfg).train()
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r][-1]
    assert (
        abs(train["data_share/domain"] - 0.9) <= 0.01
        and abs(train["data_share/general"] - 0.1) <= 0.01
    )
    evals = [r for r in recs if "eval_loss" in r]
    assert {"eval_loss/domain", "eval_loss/general"} <= set(evals[0]) and len(evals) == 2


def test_prepare_cache_trains_like_the_raw_files(tiny_qwen, tokenizer, tmp_path, capsys):
    f = _jsonl(tmp_path / "x.jsonl", SAMPLE_TEXTS)
    assert (
        main(
            [
                "prepare",
                "--tokenizer",
                tiny_qwen,
                "--input",
                str(f),
                "--output",
                str(tmp_path / "cache"),
                "--workers",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"{len(SAMPLE_TEXTS)} documents" in out and "tokens/s" in out
    from qwen_cpt.data.cache import CacheSource, CacheStream

    cache = CacheStream("c", CacheSource(tmp_path / "cache"), tokenizer.eos_token_id, 24, seed=0)
    raw = D.one_epoch(D.BlockStream("r", D.FileSource([f]), tokenizer, 24, shuffle_files=False))
    got = sorted(cache.block(i).input_ids for i in range(cache.n_blocks))
    assert got == sorted(b.input_ids for b in raw)  # same blocks, labels and positions too
    by_ids = {tuple(b.input_ids): b for b in raw}
    for i in range(cache.n_blocks):
        b = cache.block(i)
        assert b.position_ids == by_ids[tuple(b.input_ids)].position_ids
        assert b.labels == by_ids[tuple(b.input_ids)].labels
    # and a training run reads the cache directly
    cfg = CPTConfig(
        model_name_or_path=tiny_qwen,
        output_dir=str(tmp_path / "o"),
        max_length=24,
        train_files=[str(tmp_path / "cache")],
        num_train_epochs=1,
        per_device_train_batch_size=2,
    )
    trainer = CPTTrainer(cfg)
    trainer.train()
    # no eval data: validation_split holds out one of the cache's few blocks, not trained on
    assert trainer.state.step == -(-(cache.n_blocks - 1) // 2)


def test_hf_datasets_inputs(tiny_qwen, tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"text": SAMPLE_TEXTS})
    cfg = CPTConfig(
        model_name_or_path=tiny_qwen, output_dir=str(tmp_path / "a"), max_length=32, max_steps=2
    )
    assert CPTTrainer(cfg).train(ds) > 0
    cfg = CPTConfig(
        model_name_or_path=tiny_qwen, output_dir=str(tmp_path / "b"), max_length=32, max_steps=2
    )
    assert CPTTrainer(cfg).train(ds.to_iterable_dataset()) > 0


def test_skip_bad_records_counts_them(tmp_path, tiny_qwen, caplog):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "good one"}\n{oops\n{"body": 1}\n\xff\xfe\n{"text": "good two"}\n')
    src = D.FileSource([bad], skip_bad_records=True)
    assert [p.text for p in src.pieces([0])] == ["good one", "good two"] and src.skipped == 3
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        list(D.FileSource([bad]).pieces([0]))
    cfg = CPTConfig(
        model_name_or_path=tiny_qwen,
        output_dir=str(tmp_path / "o"),
        max_length=16,
        max_steps=1,
        train_files=[str(bad)],
        skip_bad_records=True,
    )
    CPTTrainer(cfg).train()
    assert "skipped 3 malformed records" in caplog.text


def test_nothing_to_train_on_is_named_before_anything_is_written(tmp_path, tiny_qwen):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "   "}) + "\n")
    cases = [
        ([str(empty)], "the file '.*empty.jsonl' is empty"),
        ([str(tmp_path / "*.parquet")], r"pattern '.*\*.parquet' matches no file"),
        ([str(tmp_path / "missing.jsonl")], "no such file or directory: '.*missing.jsonl'"),
        ([str(blank)], "source 'train': no documents"),
    ]
    for files, message in cases:
        out = tmp_path / "out"
        cfg = CPTConfig(model_name_or_path=tiny_qwen, output_dir=str(out), train_files=files)
        with pytest.raises(DataError, match=message):
            CPTTrainer(cfg).train()
        assert not out.exists()


def test_restore_reads_from_the_saved_offset_not_from_the_start(tmp_path, tokenizer):
    """Restore cost is one piece's re-read, whatever the position: no replay of earlier data."""
    f = _jsonl(tmp_path / "big.jsonl", [f"record {i} " + SAMPLE_TEXTS[i % 6] for i in range(3000)])
    for k in (5, 2000):
        s = _stream(tokenizer, [f], 24)
        for _ in range(k):
            s.next_block()
        state = s.state_dict()
        restored = _stream(tokenizer, [f], 24)
        restored.load_state_dict(state)
        seen = []

        def recording(order, start=None, real=restored.source.pieces, seen=seen):
            for p in real(order, start):
                seen.append(p)
                yield p

        restored.source.pieces = recording
        restored.next_block()
        assert seen[0].pos == state["piece"]  # reading starts at the saved byte offset
        assert state["piece"]["offset"] > 0 if k == 2000 else True
        assert len(seen) <= 256  # one tokenizer batch, not the k blocks before it
