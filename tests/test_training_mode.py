"""``training_mode: auto``: the most faithful mode that fits, chosen before loading, logged, saved
in config.yaml and kept by a resume.

References: the planner's own estimates for the tiny model (the memory given is set between two
modes' peaks, so exactly one answer is right), and the trained artefacts (an adapter, or not).
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import yaml

from qwen_cpt import CPTConfig, CPTTrainer
from qwen_cpt.config import ConfigError
from qwen_cpt.planner import CPU_RSS_FACTOR, USABLE_FRACTION, GiB
from qwen_cpt.planner.memory import _memory_for
from qwen_cpt.planner.mode import NoModeFits, choose_mode
from qwen_cpt.planner.plan import lean_modes
from qwen_cpt.planner.shapes import ModelShape, count_params, load_shape

from .test_resume import _cfg, _losses, _write_data

KW = dict(training_mode="auto", use_bf16=False, lora_r=4, learning_rate=1e-2)


def _peaks(model: str, cfg: CPTConfig) -> dict[str, float]:
    """The planner's CPU peaks (bytes) of every candidate, for the config's batch."""
    shape, _ = load_shape(model)
    p = count_params(shape)
    plain = dataclasses.replace(cfg, training_mode="manual")
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    out = {"full": _memory_for(plain, shape, p, micro, 1, "cpu", None, accum).peak}
    for m in lean_modes(plain, shape, p, micro, accum, 1, 1e12, 0.0, device="cpu", every=True):
        out[m["mode"]] = m["peak_gib"] * GiB
    return out


def _gb_for(limit_bytes: float) -> float:
    """device_memory_gb whose usable CPU share is ``limit_bytes``."""
    return limit_bytes / USABLE_FRACTION * CPU_RSS_FACTOR / GiB


def test_auto_picks_the_first_mode_that_fits_and_a_resume_keeps_it(tiny_qwen, tmp_path, caplog):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    cfg = _cfg(tiny_qwen, out, data, max_steps=2, save_steps=1, **KW)
    peaks = _peaks(tiny_qwen, cfg)
    adapters, with_emb = (
        peaks["LoRA r=4, adapters only"],
        peaks["LoRA r=4, embeddings and head trained"],
    )
    # the tiny model is mostly its embedding: every mode that trains it needs about full
    # training's memory, LoRA with adapters only far less. Between the two: only it fits
    # (CPU offload is no candidate on a CPU)
    more_faithful = [
        v
        for k, v in peaks.items()
        if not k.startswith(("LoRA r=4, a", "QLoRA", "full training, CPU"))
    ]
    assert adapters < 0.6 * min(more_faithful), peaks
    cfg.device_memory_gb = _gb_for((adapters + min(more_faithful + [with_emb])) / 2)
    with caplog.at_level(logging.INFO, logger="qwen_cpt"):
        CPTTrainer(cfg).train()
    chosen = [r.getMessage() for r in caplog.records if "training_mode: auto ->" in r.message]
    assert len(chosen) == 1 and "LoRA r=4, adapters only (needs" in chosen[0], chosen
    assert "more faithful, not fitting: full training, bf16 optimizer states" in chosen[0]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["training_mode"] == "auto" and saved["use_lora"] is True
    assert saved["lora_train_embeddings"] is False
    assert saved["training_mode_chosen"].startswith("LoRA r=4, adapters only")
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    # the saved config.yaml is a valid config to run again as it is
    assert CPTConfig.from_yaml(out / "config.yaml").use_lora
    first = _losses(out)

    # resumed with plenty of memory (which alone would choose full training): the checkpoint's
    # choice stands, and the run continues exactly
    caplog.clear()
    again = _cfg(tiny_qwen, out, data, max_steps=3, save_steps=1, resume_from_checkpoint="auto",
                 device_memory_gb=1000.0, **KW)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="qwen_cpt"):
        CPTTrainer(again).train()
    assert any("(from the checkpoint)" in r.message for r in caplog.records)
    assert again.use_lora and not again.lora_train_embeddings
    got = _losses(out)
    assert sorted(got) == [1, 2, 3] and [got[1], got[2]] == [first[1], first[2]]


def test_auto_keeps_full_training_when_it_fits_and_refuses_when_nothing_does(tiny_qwen, tmp_path):
    shape, _ = load_shape(tiny_qwen)
    cfg = _cfg(tiny_qwen, tmp_path / "o", _write_data(tmp_path), **KW)
    peaks = _peaks(tiny_qwen, cfg)
    flags, why = choose_mode(cfg, shape, world_size=1, device="cpu",
                             capacity_bytes=_gb_for(peaks["full"] * 1.01) * GiB)  # fmt: skip
    assert flags == {} and why.startswith("full training as configured fits")
    # on a GPU, CPU offload comes first when full training does not fit (on a CPU it is never
    # chosen: device and host are one memory), also with several processes
    p, plain = count_params(shape), dataclasses.replace(cfg, training_mode="manual")
    for world in (1, 2):
        full, off = (
            _memory_for(dataclasses.replace(plain, fsdp_cpu_offload=o), shape, p,
                        cfg.per_device_train_batch_size, world, "cuda", None,
                        cfg.gradient_accumulation_steps).peak
            for o in (False, True)
        )  # fmt: skip
        assert off < full
        capacity = (off + full) / 2 / USABLE_FRACTION
        got, why = choose_mode(cfg, shape, world_size=world, device="cuda", capacity_bytes=capacity)
        assert got == {"fsdp_cpu_offload": True}, why
        # but not when the host cannot hold the weights, gradients and optimizer state
        host = _memory_for(
            dataclasses.replace(plain, fsdp_cpu_offload=True),
            shape,
            p,
            cfg.per_device_train_batch_size,
            world,
            "cuda",
            None,
            1,
        ).host
        assert host >= 16 * p.total / world  # fp32 weights, gradients and AdamW's moments
        small = dict(world_size=world, device="cuda", capacity_bytes=capacity, host_bytes=host)
        if world == 1:  # a lean mode instead
            got, why = choose_mode(cfg, shape, **small)
            assert got and "fsdp_cpu_offload" not in got and "(host " in why, why
        else:
            with pytest.raises(NoModeFits, match="host memory free per process"):
                choose_mode(cfg, shape, **small)
    with pytest.raises(NoModeFits, match="neither full training .* nor CPU offload"):
        choose_mode(cfg, shape, world_size=2, device="cuda", capacity_bytes=0.01 * GiB)

    # nothing fits: one line naming the field, before anything is loaded or written
    cfg.device_memory_gb = _gb_for(min(peaks.values()) * 0.5)
    with pytest.raises(ConfigError, match="training_mode: auto: no mode fits") as e:
        CPTTrainer(cfg).train()
    assert "\n" not in e.value.errors[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(use_lora=True), "training_mode: auto chooses use_lora itself"),
        (dict(fsdp_cpu_offload=True, optimizer_states="bf16"),
         "training_mode: auto chooses fsdp_cpu_offload, optimizer_states itself; leave them unset"),
        (dict(training_mode="lean"), "training_mode: must be one of manual, auto"),
        (dict(device_memory_gb=0.0), "device_memory_gb: must be > 0"),
    ],
)  # fmt: skip
def test_training_mode_fields_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        CPTConfig(model_name_or_path="m", **{"training_mode": "auto", **fields})


def test_a_7b_on_one_a100_40gb_gets_a_mode_that_fits():
    """The product spec's first row, as training_mode: auto sees it on a 40 GB card."""
    shape = ModelShape(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, tie_word_embeddings=False,
    )  # fmt: skip
    cfg = CPTConfig(model_name_or_path="Qwen/Qwen2.5-7B", training_mode="auto", max_length=4096,
                    per_device_train_batch_size=1, gradient_accumulation_steps=32,
                    use_muon_optimizer=True)  # fmt: skip
    flags, why = choose_mode(cfg, shape, world_size=1, device="cuda", capacity_bytes=40 * GiB)
    assert flags == {"fsdp_cpu_offload": True}, why  # exact full training, on the host
    assert "full training needs 109.8 GiB" in why
    # qwen-cpt plan says the same, with the host memory offload needs
    from qwen_cpt.planner import format_plan, lookup_gpu, make_plan

    text = format_plan(make_plan(cfg, shape, 10**8, gpu=lookup_gpu("A100"), gpu_memory_gib=40))
    line = next(x for x in text.splitlines() if "training_mode: auto" in x)
    assert "-> full training, CPU offload (needs 9.5 GiB" in line, line
    assert "GiB of host memory per process, checked at start-up" in line, line
