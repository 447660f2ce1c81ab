"""HSDP: 4 gloo processes as a 2 x 2 mesh (2 replicas of a model sharded over 2 ranks).

References: one process with the same global batch (losses per step within a relative 1e-4),
a straight 2 x 2 run (a resume gives ``==`` losses), and the checkpoint resharded onto 2
processes (plain FSDP) and 1.
"""

import math

import pytest

from qwen_cpt import CPTTrainer
from qwen_cpt.distributed import mesh_shape

from .data_worker import count_tokenizing
from .test_distributed import _torchrun, _train
from .test_resume import _cfg, _losses, _write_data
from .test_sharded_reading import DATA_WORKER, tokenized_per_rank

# 4 ranks x 1 block per micro-batch = one process with 4; 2 micro-batches per step.
KW = dict(max_steps=4, save_steps=2, gradient_accumulation_steps=2, validation_split=0.0)


@pytest.mark.parametrize("muon", [True], ids=["muon"])
def test_a_2x2_mesh_matches_one_process_resumes_exactly_and_reshards(
    tiny_qwen, tmp_path, muon, monkeypatch
):
    data = _write_data(tmp_path)
    kw = dict(KW, use_muon_optimizer=muon)
    single = tmp_path / "single"
    with monkeypatch.context() as patch:
        count = count_tokenizing(patch.setattr)
        CPTTrainer(_cfg(tiny_qwen, single, data, per_device_train_batch_size=4, **kw)).train()
    ref = _losses(single)

    # reduce-scatter on every micro-batch, all-reduce across the replicas on the last only
    hsdp = dict(
        per_device_train_batch_size=1, dp_replicate=2, dp_shard=2, fsdp_sync_every_micro_batch=True
    )
    straight = tmp_path / "straight"
    path = tmp_path / "straight.yaml"
    _cfg(tiny_qwen, straight, data, **hsdp, **kw).to_yaml(path)
    res = _torchrun([DATA_WORKER, str(path)], nproc=4)  # the trainer, counting its tokenizing
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # 4 ranks tokenize what one process does, not 4 times it
    per_rank = tokenized_per_rank(res.stdout)
    print(f"characters tokenized: one process {count[0]}, four ranks {per_rank}")
    assert sorted(per_rank) == [0, 1, 2, 3]
    assert abs(sum(per_rank.values()) - count[0]) <= 0.1 * count[0], (per_rank, count)
    assert max(per_rank.values()) <= 0.4 * count[0]
    assert "mesh: HSDP: 2 replicas (dp_replicate) x 2 shards (dp_shard)" in res.stderr
    assert "global batch 8 x 24 tokens" in res.stderr
    two_by_two = _losses(straight)
    assert sorted(two_by_two) == [1, 2, 3, 4]
    for step in ref:
        assert math.isclose(two_by_two[step], ref[step], rel_tol=1e-4), (step, two_by_two, ref)
    assert two_by_two[4] < two_by_two[1]

    ckpt = str(straight / "checkpoint-2")
    # the same mesh from its checkpoint: the straight run's losses, exactly
    again = tmp_path / "again"
    cfg = _cfg(tiny_qwen, again, data, **hsdp, **kw, resume_from_checkpoint=ckpt)
    res = _train(cfg, tmp_path, "again", nproc=4)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _losses(again) == {s: two_by_two[s] for s in (3, 4)}

    # resharded onto 2 processes (FSDP over both) with the same global batch
    two = tmp_path / "two"
    cfg = _cfg(tiny_qwen, two, data, per_device_train_batch_size=2, **kw,
               resume_from_checkpoint=ckpt)  # fmt: skip
    res = _train(cfg, tmp_path, "two", nproc=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "mesh: FSDP2 over all 2 ranks" in res.stderr
    resharded = _losses(two)
    assert sorted(resharded) == [3, 4]
    for step in (3, 4):
        assert math.isclose(resharded[step], two_by_two[step], rel_tol=1e-5), (step, resharded)


def test_mesh_shape_rules():
    # several nodes: shard within a node, replicate across (unless a node cannot hold it)
    assert mesh_shape(16, "auto", "auto", 8)[:2] == (2, 8)
    assert mesh_shape(16, "auto", "auto", 8, fits_node=lambda n: False)[:2] == (1, 16)
    assert mesh_shape(8, "auto", "auto", 8)[:2] == (1, 8)  # one node: FSDP
    assert mesh_shape(4, "auto", 2, 4)[:2] == (2, 2)
    assert mesh_shape(4, 4, "auto", 4)[:2] == (4, 1)  # pure replication (DDP-like)
    assert mesh_shape(6, 2, 3, 6)[:2] == (2, 3)
    with pytest.raises(ValueError, match="dp_shard: 3 does not divide the 4 processes"):
        mesh_shape(4, "auto", 3, 4)
    with pytest.raises(ValueError, match=r"dp_replicate x dp_shard = 2 x 1 = 2, but there are 4"):
        mesh_shape(4, 2, 1, 4)
