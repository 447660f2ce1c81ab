"""The scaling model's formulas (qwen_cpt.planner.comm, benchmarks/scaling_model.py), checked
by hand on a toy shape, against the planner's parameter counts, for sanity across scales, and
against the bytes FSDP2 and DistributedMuon really hand to gloo (benchmarks/comm_volume.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_cpt.planner.comm import (
    UnitTimes,
    fsdp_units,
    muon_exchange_seconds,
    muon_matrices,
    simulate_step,
    step_volume,
)
from qwen_cpt.planner.shapes import QWEN25_SHAPES, ModelShape, count_params

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

# hidden 4, intermediate 6, 1 layer, 2 heads of 2, 1 KV head, vocabulary 10, tied, q/k/v biases
TOY = ModelShape(4, 6, 1, 2, 1, 10, True, 2, qkv_bias=True)


def _scaling_model():
    spec = importlib.util.spec_from_file_location("scaling_model", BENCH / "scaling_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_toy_volumes_by_hand():
    # shard 4, every first dimension padded to a multiple of 4:
    # layer: q 4x4 -> 16, q bias 4, k 2x4 -> 4x4 = 16, k bias 2 -> 4, v 16, v bias 4, o 16,
    #        gate 6x4 -> 8x4 = 32, up 32, down 4x6 -> 24, two norms 4 + 4: 172 elements
    # root:  embedding 10x4 -> 12x4 = 48, final norm 4: 52 elements (tied: no separate head)
    units = fsdp_units(TOY)
    assert [u.padded_numel(4) for u in units] == [52, 172]
    v = step_volume(units, muon_matrices(TOY), shard=4, replicate=2, muon=True)
    assert v.all_gather == (52 + 2 * 172) * 2  # root once, the layer forward and backward, bf16
    assert v.reduce_scatter == (52 + 172) * 4  # fp32 gradients, once
    assert v.all_reduce == (52 + 172) / 4 * 4  # the fp32 shard, across the 2 replicas
    # Muon, per matrix 2 x (3/4) x ceil(rows/4) x cols x 2 B: q, k, v, o 12 each; gate and up
    # 24 each (2 rows per rank); down 18
    assert v.muon == pytest.approx(4 * 12 + 2 * 24 + 18)
    # ring factors on the wire: 3/4 within the shard group, 2 x 1/2 across 2 replicas
    assert v.wire["all_gather"] == pytest.approx(v.all_gather * 0.75)
    assert v.wire["all_reduce"] == pytest.approx(v.all_reduce)
    # accumulation: all-gathers every micro-batch, gradients once or every time
    v4 = step_volume(units, [], shard=4, micro_batches=4, sync_micro_batches=1)
    assert v4.all_gather == 4 * v.all_gather and v4.reduce_scatter == v.reduce_scatter
    v4 = step_volume(units, [], shard=4, micro_batches=4, sync_micro_batches=4)
    assert v4.reduce_scatter == 4 * v.reduce_scatter
    # one rank: nothing to communicate
    assert step_volume(units, muon_matrices(TOY), shard=1, muon=True).to_dict()["all_gather"] == 0


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-32B"])
def test_units_hold_exactly_the_planners_parameters(name):
    shape = QWEN25_SHAPES[name]
    p = count_params(shape)
    assert sum(u.padded_numel(1) for u in fsdp_units(shape)) == p.total
    assert sum(r * c for r, c in muon_matrices(shape)) == p.matrices


def test_newton_schulz_cost_of_7b():
    # docs/design.md, "Muon": about 0.53 PFLOP per step for Qwen2.5-7B's 196 matrices
    mats = muon_matrices(QWEN25_SHAPES["Qwen/Qwen2.5-7B"])
    one_gpu = muon_exchange_seconds(mats, 1, 1.0, 1.0)
    assert len(mats) == 196 and one_gpu["total"] == pytest.approx(0.53e15, rel=0.03)
    # on 8 ranks the owners balance FLOPs: within 10% of an eighth, and the buckets overlap
    # the exchange with Newton-Schulz, so the total is no more than the two one after the other
    eight = muon_exchange_seconds(mats, 8, 360e9, 494e12)
    assert eight["newton_schulz"] <= 1.1 * one_gpu["total"] / 8 / 494e12 + 1e-3
    assert max(eight["newton_schulz"], eight["exchange"] / 2) <= eight["total"]
    assert eight["total"] <= eight["newton_schulz"] + eight["exchange"] + 1e-12


def test_timeline_hides_what_it_can():
    compute = [UnitTimes(0.1, 0.2, 0.0, 0.0, 0.0)] * 5
    alone = simulate_step(compute, micro_batches=2, sync_every=False, same_link=True)
    assert alone.total == pytest.approx(alone.compute) == pytest.approx(3.0)
    # small all-gathers and reduce-scatters hide behind compute but for the first two gathers
    # (root and layer 0: 0.02) and the last two reduce-scatters (layer 0 and root: 0.04)
    small = [UnitTimes(0.1, 0.2, 0.01, 0.02, 0.0)] * 5
    st = simulate_step(small, micro_batches=1, sync_every=True, same_link=True)
    assert st.total == pytest.approx(1.5 + 0.02 + 0.04, abs=1e-9)
    assert st.exposed["all_gather_wait"] == pytest.approx(0.02)
    # a link slower than compute sets the pace
    slow = [UnitTimes(0.01, 0.02, 0.1, 0.2, 0.0)] * 5
    st = simulate_step(slow, micro_batches=1, sync_every=True, same_link=True)
    assert st.total >= 5 * (2 * 0.1 + 0.2) - 0.1  # all link time but the root's second gather
    # HSDP's all-reduce on its own link overlaps the backward of the layers before it
    hsdp = [UnitTimes(0.1, 0.2, 0.0, 0.0, 0.1)] * 5
    st = simulate_step(hsdp, micro_batches=1, sync_every=True, same_link=False)
    assert 0.1 <= st.exposed["gradient_tail"] < 5 * 0.1
    # the optimizer comes after everything
    st2 = simulate_step(hsdp, micro_batches=1, sync_every=True, same_link=False, optimizer_s=0.3)
    assert st2.total == pytest.approx(st.total + 0.3)


def test_scaling_model_sanity():
    sm = _scaling_model()
    kw = dict(global_tokens=4 * 2**20, compute_eff=0.5, link_eff=0.8)

    def row(model, n, mode, opt="adamw", gpu="H100"):
        return sm.evaluate(model, sm.HARDWARE[gpu], n, mode, opt, **kw)

    fsdp = [row("7B", n, "fsdp") for n in (64, 128, 256, 512)]
    hsdp = [row("7B", n, "hsdp") for n in (64, 128, 256, 512)]
    for rows in (fsdp, hsdp):
        mfu = [r["mfu"] for r in rows]
        assert all(0.2 < m < 0.5 for m in mfu)  # below the compute efficiency assumed
        assert mfu == sorted(mfu, reverse=True)  # a fixed global batch: less per GPU, less hidden
        total = [r["tokens_per_s_per_gpu"] * r["gpus"] for r in rows]
        assert total == sorted(total)  # but more GPUs still train faster
    for f, h in zip(fsdp, hsdp):
        # between nodes FSDP moves every all-gather and reduce-scatter, HSDP only its all-reduce
        inter_fsdp = f["wire_bytes"]["all_gather"] + f["wire_bytes"]["reduce_scatter"]
        assert h["wire_bytes"]["all_reduce"] < inter_fsdp / 5
        assert h["mfu"] >= f["mfu"]
    assert hsdp[-1]["mfu"] - fsdp[-1]["mfu"] > 0.05  # at 512 GPUs FSDP is network-bound
    # Muon's step end: under HSDP every node orthogonalizes everything, so its cost per GPU
    # stays as the GPUs grow, while plain FSDP spreads it over all of them
    m_h = [row("7B", n, "hsdp", "muon") for n in (64, 512)]
    m_f = [row("7B", n, "fsdp", "muon") for n in (64, 512)]
    assert m_h[0]["seconds"]["opt_muon_total"] == pytest.approx(m_h[1]["seconds"]["opt_muon_total"])
    assert m_f[1]["seconds"]["opt_muon_total"] < m_f[0]["seconds"]["opt_muon_total"]
    # memory: 32B with AdamW (16 B/param) does not fit sharded over one node of H100s
    assert row("32B", 64, "hsdp")["fits"] is False
    assert row("32B", 64, "hsdp", gpu="H200")["fits"] is True
    assert math.isfinite(row("0.5B", 512, "fsdp")["mfu"])


def test_counted_bytes_match_the_formulas_on_a_2x2_hsdp_mesh():
    """One torchrun of 4 gloo processes (2 replicas x 2 shards) counting every collective of
    an AdamW step and a Muon step: all-gather, reduce-scatter, all-reduce and Muon's
    all-to-all each within 5% of step_volume (in practice equal: the padding is exact)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(BENCH / "comm_volume.py"), "--cases", "2x2", "--json"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(res.stdout)["2x2"]
    seen = {(r["optimizer"], r["kind"]): r for r in rows}
    expected = {("adamw", k) for k in ("all_gather", "reduce_scatter", "all_reduce")}
    expected |= {("muon", k) for k in ("all_gather", "reduce_scatter", "all_reduce", "muon")}
    assert set(seen) == expected, sorted(seen)  # and no collective the formulas do not know
    for key, r in seen.items():
        assert r["counted"] > 0 and r["ratio"] == pytest.approx(1.0, abs=0.05), (key, r)
