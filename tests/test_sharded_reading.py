"""Reading by rank: on prepared caches each rank builds only the blocks it trains on.

The reference is the one-process draw: the same global order, each rank's rows of every global
micro-batch, and the same loss-token count per step. The ranks run the trainer's own
``_step_batches`` in two threads, joined by a two-party stand-in for the process group's sum.
"""

import json
import math
import re
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qwen_cpt import CPTConfig, CPTTrainer
from qwen_cpt import data as D
from qwen_cpt.data.tokenize import TokenShare

from .conftest import SAMPLE_TEXTS


class _ThreadWorld:
    """Rank ``rank`` of ``size`` threads: ``sum`` adds the values every thread passes."""

    def __init__(self, rank: int, size: int, shared: dict):
        self.rank, self.size, self.shared = rank, size, shared

    def sum(self, values):
        box, barrier = self.shared["box"], self.shared["barrier"]
        box[self.rank] = values
        barrier.wait()
        out = [sum(v[i] for v in box.values()) for i in range(len(values))]
        barrier.wait()  # everyone has read before the next step writes
        return out

    def this_ranks_part(self, micro, per_rank):
        lo = self.rank * per_rank
        return {k: v[lo : lo + per_rank] for k, v in micro.items()}


def _mixture(caches, eos, counter=None):
    streams = {}
    for name, path in caches.items():
        stream = D.CacheStream(name, D.CacheSource(path), eos, 24, seed=3)
        if counter is not None:
            real = stream.block

            def block(g, real=real, name=name):
                counter[name] = counter.get(name, 0) + 1
                return real(g)

            stream.block = block
        streams[name] = stream
    return D.Mixture(streams, {"code": 3.0, "general": 1.0})


def test_each_rank_reads_only_its_rows_of_a_prepared_cache(tmp_path, tokenizer, tiny_qwen):
    caches = {}
    for name, texts in (("code", SAMPLE_TEXTS), ("general", SAMPLE_TEXTS[::-1])):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t + f" {name}"}) + "\n" for t in texts))
        D.prepare([str(src)], tmp_path / name, tokenizer, None)
        caches[name] = tmp_path / name
    eos, world, steps = tokenizer.eos_token_id, 2, 6  # 6 x 8 blocks: several epochs
    cfg = CPTConfig(model_name_or_path=tiny_qwen, max_length=24, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2)  # fmt: skip

    # one process draws every global micro-batch of world x 2 blocks
    ref_counter: dict = {}
    ref = CPTTrainer(CPTConfig(model_name_or_path=tiny_qwen, max_length=24,
                               per_device_train_batch_size=2 * world, gradient_accumulation_steps=2))  # fmt: skip
    one = SimpleNamespace(world=_ThreadWorld(0, 1, {}), data=_mixture(caches, eos, ref_counter))
    one.total = steps
    reference = list(ref._step_batches(one))
    assert len(reference) == steps

    shared = {"box": {}, "barrier": threading.Barrier(world)}
    results, counters, errors = {}, {}, []

    def rank_main(rank):
        try:
            counters[rank] = {}
            run = SimpleNamespace(
                world=_ThreadWorld(rank, world, shared),
                data=_mixture(caches, eos, counters[rank]),
                total=steps,
            )
            results[rank] = list(CPTTrainer(cfg)._step_batches(run))
            results[f"state{rank}"] = run.data.state_dict()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors

    for step, (ref_group, ref_loss, ref_all) in enumerate(reference):
        for rank in range(world):
            group, n_loss, n_all = results[rank][step]
            assert (n_loss, n_all) == (ref_loss, ref_all), step  # the global step's counts
            for micro, ref_micro in zip(group, ref_group, strict=True):
                for key, value in micro.items():  # this rank's rows of the global micro-batch
                    assert torch.equal(value, ref_micro[key][rank * 2 : rank * 2 + 2]), key
    # every rank's data position is the one-process position: a resume on any world size
    assert results["state0"] == results["state1"] == one.data.state_dict()
    # each rank built its own half of the blocks, not all of them
    built = {r: sum(counters[r].values()) for r in range(world)}
    assert sum(ref_counter.values()) == steps * 2 * 2 * world
    assert built == {0: steps * 2 * 2, 1: steps * 2 * 2}


DATA_WORKER = str(Path(__file__).with_name("data_worker.py"))


def tokenized_per_rank(stdout: str) -> dict[int, int]:
    """``{rank: characters tokenized}`` from tests/data_worker.py's lines."""
    found = re.findall(r"TOKENIZED rank=(\d+) chars=(\d+)", stdout)
    return {int(r): int(n) for r, n in found}


def test_ranks_tokenize_raw_text_together(tiny_qwen, tmp_path, monkeypatch):
    """Under torchrun each rank tokenizes its share of every batch of documents and the ranks
    exchange the ids: the tokenizing over 2 ranks is that of one process (not twice it), and
    the losses are one process's."""
    from .data_worker import count_tokenizing
    from .test_distributed import ENV, TORCHRUN
    from .test_resume import _cfg, _losses, _write_data

    data = _write_data(tmp_path)
    kw = dict(max_steps=3, save_steps=100, validation_split=0.0)  # eval sets: every rank
    with monkeypatch.context() as patch:
        count = count_tokenizing(patch.setattr)
        CPTTrainer(
            _cfg(tiny_qwen, tmp_path / "one", data, per_device_train_batch_size=2, **kw)
        ).train()
    path = tmp_path / "two.yaml"
    _cfg(tiny_qwen, tmp_path / "two", data, per_device_train_batch_size=1, **kw).to_yaml(path)
    res = subprocess.run([*TORCHRUN, "2", DATA_WORKER, str(path)], env=ENV, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "each of the 2 ranks tokenizes 1/2 of train" in res.stderr
    per_rank = tokenized_per_rank(res.stdout)
    print(f"characters tokenized: one process {count[0]}, two ranks {per_rank}")
    assert sorted(per_rank) == [0, 1]
    assert abs(sum(per_rank.values()) - count[0]) <= 0.1 * count[0], (per_rank, count)
    assert max(per_rank.values()) <= 0.6 * count[0]  # shared, not all on one rank
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for step in one:
        assert math.isclose(two[step], one[step], rel_tol=1e-4), (step, two, one)


def _thread_shares(size: int):
    box, barrier = {}, threading.Barrier(size)

    def make(rank):
        def gather(obj):
            box[rank] = obj
            barrier.wait()
            out = [box[r] for r in range(size)]
            barrier.wait()
            return out

        return TokenShare(rank, size, gather)

    return [make(r) for r in range(size)]


def _run_ranks(fn, size):
    results, threads = {}, []

    def main(rank):
        try:
            results[rank] = ("ok", fn(rank))
        except Exception as exc:  # noqa: BLE001 - compared below
            results[rank] = ("error", exc)

    threads = [threading.Thread(target=main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


@pytest.mark.parametrize("workers", [0, 1])
def test_shared_tokenizing_gives_one_process_ids_and_shares_failures(tiny_qwen, tokenizer, workers):
    batches = [[f"{t} {i}" for t in SAMPLE_TEXTS[: 5 + i]] for i in range(4)] + [["one"], []]
    expected = [D.encode_batch(tokenizer, b) for b in batches]
    shares = _thread_shares(3)

    def tokenize(rank):
        pool = D.TokenizerPool(tokenizer, workers, tiny_qwen, shares[rank])
        try:
            return list(pool.map(iter(batches))), pool.chars
        finally:
            pool.close()

    results = _run_ranks(tokenize, 3)
    assert all(kind == "ok" for kind, _ in results.values()), results
    for rank in range(3):
        assert results[rank][1][0] == expected  # every rank gets every id, in order
    chars = [results[r][1][1] for r in range(3)]
    assert sum(chars) == sum(len(t) for b in batches for t in b)
    assert max(chars) < 0.5 * sum(chars)

    # a tokenizer that fails on rank 1 only: every rank stops at that batch, none waits
    class Failing:
        def __init__(self, rank):
            self.rank = rank

        def __call__(self, texts, **kw):
            if self.rank == 1 and any("3" in t for t in texts):
                raise RuntimeError("worker died")
            return tokenizer(texts, **kw)

    def failing(rank):
        pool = D.TokenizerPool(Failing(rank), 0, None, shares[rank])
        return list(pool.map(iter(batches)))

    results = _run_ranks(failing, 3)
    assert [kind for kind, _ in results.values()] == ["error"] * 3
    assert "worker died" in str(results[1][1])
    for rank in (0, 2):
        assert isinstance(results[rank][1], D.DataError)
        assert "tokenizing failed on rank 1: worker died" in str(results[rank][1])
