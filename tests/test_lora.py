"""LoRA / DoRA (PEFT) and freeze-tuning: exact resume, small checkpoints, merged final/ and best/.

References: a straight run for every resume (per-step losses ``==``), the adapter model's own
logits for the merged model, the base model's tensors for what must not change.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen_cpt import CPTConfig, CPTTrainer
from qwen_cpt.config import ConfigError

from .test_resume import _cfg, _cli, _losses, _write_data

IDS = torch.tensor([[9707, 11, 1879, 0, 151643, 785, 1156, 2610]])
# lean runs train few tensors: a larger lr so that 4 steps move them
LEAN = dict(max_steps=4, save_steps=2, learning_rate=1e-2, lora_r=4, lora_alpha=8.0)


def _eval_losses(out) -> list[float]:
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in recs if "eval_loss" in r]


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _tensor_bytes(ckpt) -> int:
    """Bytes of weights and optimizer state (the tokenizer, 18.7 MB, is in every folder)."""
    files = [*Path(ckpt).glob("*.safetensors"), *(Path(ckpt) / "state").glob("*")]
    return sum(f.stat().st_size for f in files)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def _straight_and_resumed(model, tmp_path, **kw):
    data = _write_data(tmp_path)
    straight = tmp_path / "straight"
    trainer = CPTTrainer(_cfg(model, straight, data, **{**LEAN, **kw}))
    trainer.train()
    resumed = tmp_path / "resumed"
    ckpt = straight / "checkpoint-2"
    CPTTrainer(
        _cfg(model, resumed, data, resume_from_checkpoint=str(ckpt), **{**LEAN, **kw})
    ).train()
    return trainer, straight, resumed


@pytest.fixture(scope="module")
def full_checkpoint_bytes(tiny_qwen, tmp_path_factory):
    """The size of a full-training checkpoint of the tiny Qwen (the reference for 'small')."""
    tmp = tmp_path_factory.mktemp("full")
    out = tmp / "out"
    CPTTrainer(_cfg(tiny_qwen, out, _write_data(tmp), max_steps=1, save_steps=1)).train()
    return _tensor_bytes(out / "checkpoint-1")


@pytest.mark.parametrize(
    "arch, kw",
    [
        # AdamW, LoRA on every linear, tied embeddings trained once at their own lr
        ("qwen", dict(use_lora=True, embedding_learning_rate=2e-3)),
        # Muon on the LoRA matrices, DoRA, untied embeddings and head trained
        ("llama", dict(use_lora=True, use_dora=True, use_muon_optimizer=True)),
        # adapters only: the checkpoint is tiny
        ("qwen", dict(use_lora=True, lora_train_embeddings=False, use_muon_optimizer=True)),
        # QLoRA: a 4-bit NF4 base (bitsandbytes runs it on CPU); fp32 compute for the 1e-5
        # comparison (with use_bf16 the 4-bit layers compute in bf16)
        ("qwen", dict(use_lora=True, use_qlora=True, use_bf16=False)),
        # QDoRA with Muon, untied head: PEFT's DoRA merge on the dequantized base
        ("llama", dict(use_lora=True, use_qlora=True, use_dora=True, use_muon_optimizer=True,
                       use_bf16=False)),
    ],
    ids=["lora-adamw-emb", "dora-muon-emb", "lora-muon-adapters-only", "qlora-adamw-emb",
         "qdora-muon-emb"],
)  # fmt: skip
def test_lora_resumes_exactly_and_saves_a_merged_final(
    request, tmp_path, arch, kw, full_checkpoint_bytes
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_path = request.getfixturevalue(f"tiny_{arch}")
    trainer, straight, resumed = _straight_and_resumed(base_path, tmp_path, **kw)
    ref, got = _losses(straight), _losses(resumed)
    assert sorted(got) == [3, 4]
    assert [got[s] for s in (3, 4)] == [ref[s] for s in (3, 4)]
    evals = _eval_losses(straight)
    assert evals[-1] < evals[0]  # held-out loss went down

    # the checkpoint holds only the trainable tensors (and their optimizer state)
    ckpt = straight / "checkpoint-2"
    saved = _weights(ckpt)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(saved) <= trainable and saved
    assert all("lora_" in n or "embed" in n or "lm_head" in n for n in saved)
    size = _tensor_bytes(ckpt)
    if not kw.get("lora_train_embeddings", True):
        assert size < full_checkpoint_bytes / 100, (size, full_checkpoint_bytes)
    else:  # the embedding is most of this tiny model: no hidden weights, no state for them
        params = dict(trainer.model.named_parameters())
        trained = sum(p.numel() for p in params.values() if p.requires_grad)
        # fp32 weights and at most two optimizer moments, of the trainable tensors only
        assert size < 12 * trained + 2**20, (size, trained)

    # final/: a plain HF model, the adapter merged in; final/adapter/: the PEFT adapter
    final = straight / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert not (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base_kw = {}
    if kw.get("use_qlora"):  # the adapter was trained on the 4-bit base: load it so again
        from transformers import BitsAndBytesConfig

        assert "quantization_config" not in json.loads((final / "config.json").read_text())
        base_kw = dict(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
            device_map="cpu",
        )  # fmt: skip
        assert any(getattr(p, "quant_state", None) is not None for p in trainer.model.parameters())
    base = AutoModelForCausalLM.from_pretrained(base_path, **base_kw)
    for module in base.modules():  # as the trainer does: bitsandbytes' CPU inference repack
        if hasattr(module, "support_avx512bf16_for_cpu"):  # needs in_features >= 64
            module.support_avx512bf16_for_cpu = False
    adapter = PeftModel.from_pretrained(base, str(final / "adapter"))
    # fp32: merging reassociates W x + s B (A x) as (W + s B A) x, a few ulps of the logits
    # (|logits| < 10 here, so 1e-5 is about 100 ulps; a missed adapter moves them by >= 1e-3)
    in_memory = _logits(trainer.model)
    assert (_logits(merged) - in_memory).abs().max() <= 1e-5
    assert (_logits(adapter) - in_memory).abs().max() <= 1e-5
    assert (_logits(AutoModelForCausalLM.from_pretrained(base_path)) - in_memory).abs().max() > 1e-3

    # only the intended tensors changed, tensor by tensor
    before, after = _weights(base_path), _weights(final)
    assert set(before) == set(after)
    for name, t in before.items():
        table = "embed_tokens" in name or "lm_head" in name
        adapted = name.endswith("proj.weight")
        if table:
            assert torch.equal(t, after[name]) != kw.get("lora_train_embeddings", True), name
        elif adapted:
            assert not torch.equal(t, after[name]), name
        else:  # norms and biases are frozen
            assert torch.equal(t, after[name]), name

    # best/ follows the same rule
    if (straight / "best").exists():
        assert (straight / "best" / "adapter" / "adapter_model.safetensors").is_file()
        assert not any("lora" in k for k in _weights(straight / "best"))


def test_freeze_tuning_trains_only_the_last_layers(tiny_qwen, tmp_path, full_checkpoint_bytes):
    kw = dict(freeze_trainable_layers=1, lora_train_embeddings=False)
    _, straight, resumed = _straight_and_resumed(tiny_qwen, tmp_path, **kw)
    ref, got = _losses(straight), _losses(resumed)
    assert [got[s] for s in (3, 4)] == [ref[s] for s in (3, 4)]
    assert _eval_losses(straight)[-1] < _eval_losses(straight)[0]
    saved = _weights(straight / "checkpoint-2")
    assert saved and all(k.startswith(("model.layers.1.", "model.norm.")) for k in saved)
    size = _tensor_bytes(straight / "checkpoint-2")
    assert size < full_checkpoint_bytes / 100, (size, full_checkpoint_bytes)
    before, after = _weights(tiny_qwen), _weights(straight / "final")
    assert set(before) == set(after)
    for name, t in before.items():
        trained = name.startswith(("model.layers.1.", "model.norm."))
        if trained and "layernorm" not in name and "norm." not in name:
            assert not torch.equal(t, after[name]), name
        elif not trained:
            assert torch.equal(t, after[name]), name


# Issue #16: each lean mode is killed (SIGKILL) through the CLI and resumed with "auto"; its
# per-step losses must equal (==) those of a straight run, step by step.
KILLED = [
    # adapters only, AdamW; dropout on the LoRA input: the RNG must resume too
    ("qwen", dict(use_lora=True, lora_train_embeddings=False, lora_dropout=0.1)),
    # DoRA with Muon on the adapter matrices (untied arch, tables frozen)
    ("llama", dict(use_lora=True, use_dora=True, lora_train_embeddings=False,
                   use_muon_optimizer=True)),
    # LoRA plus the tied embeddings trained at their own lr
    ("qwen", dict(use_lora=True, embedding_learning_rate=2e-3)),
    # freeze-tuning: the last decoder layer and the final norm
    ("qwen", dict(freeze_trainable_layers=1, lora_train_embeddings=False)),
]  # fmt: skip


@pytest.mark.parametrize(
    "arch, kw", KILLED, ids=["lora-adapters-only", "dora-muon", "lora-embeddings", "freeze"]
)
def test_lean_modes_resume_exactly_after_sigkill(request, tmp_path, arch, kw):
    base_path = request.getfixturevalue(f"tiny_{arch}")
    data = _write_data(tmp_path)
    kw = {**LEAN, "max_steps": 6, "save_steps": 1, **kw}
    steps = range(1, 7)
    straight = tmp_path / "straight"
    CPTTrainer(_cfg(base_path, straight, data, **kw)).train()
    ref = _losses(straight)
    assert sorted(ref) == list(steps)

    out = tmp_path / "killed"
    cfg = _cfg(base_path, out, data, resume_from_checkpoint="auto", **kw)
    proc = _cli(cfg, tmp_path, "killed", popen=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if (out / "checkpoint-2").is_dir():  # training on at step 3, maybe saving checkpoint-3
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: maybe mid-save
    proc.communicate()  # reaps it and closes the pipe
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()

    res = _cli(cfg, tmp_path, "killed")
    assert res.returncode == 0, res.stderr[-3000:]
    resumed_at = re.search(r"resuming from \S+checkpoint-(\d+) at step (\d+)", res.stderr)
    assert resumed_at, res.stderr[-3000:]
    assert resumed_at[1] == resumed_at[2] and 2 <= int(resumed_at[2]) < 6  # a real resume
    got = _losses(out)
    assert sorted(got) == list(steps)
    assert [got[s] for s in steps] == [ref[s] for s in steps]
    evals = _eval_losses(out)  # step 0 from the killed run, the end from the resumed one
    assert evals == _eval_losses(straight) and evals[-1] < evals[0]
    assert not list(out.glob(".tmp-*"))

    # final/: the merged plain HF model (the base's tensor names), plus adapter/ for LoRA
    final = _weights(out / "final")
    assert set(final) == set(_weights(base_path))
    assert not any("lora" in n for n in final)
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file() == bool(
        kw.get("use_lora")
    )
    straight_final = _weights(straight / "final")
    assert all(torch.equal(t, straight_final[n]) for n, t in final.items())


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(use_lora=True, lora_r=0), "lora_r: must be >= 1"),
        (dict(use_lora=True, lora_dropout=1.0), "lora_dropout: must be in [0, 1)"),
        (dict(use_lora=True, lora_target_modules=["lm_head"]), "lora_target_modules: lm_head"),
        (dict(use_dora=True), "use_dora: needs use_lora"),
        (dict(use_qlora=True), "use_qlora: needs use_lora"),
        (dict(use_lora=True, freeze_trainable_layers=2), "freeze_trainable_layers and use_lora"),
        (dict(use_lora=True, fsdp_cpu_offload=True), "fsdp_cpu_offload: not supported"),
        (dict(embedding_learning_rate=0.0), "embedding_learning_rate: must be > 0"),
        (dict(freeze_trainable_layers=-1), "freeze_trainable_layers: must be >= 0"),
    ],
)
def test_lean_fields_are_checked(fields, message):
    with pytest.raises(ConfigError) as err:
        CPTConfig(model_name_or_path="m", **fields)
    assert len(err.value.errors) == 1 and err.value.errors[0].startswith(message.split(":")[0])
    assert message in err.value.errors[0]


def test_lora_under_fsdp_is_refused_in_one_line():
    from qwen_cpt.distributed import World
    from qwen_cpt.lean import check_world

    cfg = CPTConfig(model_name_or_path="m", use_lora=True)
    with pytest.raises(ConfigError, match="use_lora: runs on one process only") as err:
        check_world(cfg, World(rank=0, size=2, sharded=True))
    assert "\n" not in err.value.errors[0]
    check_world(cfg, World())  # one process: fine


def test_too_many_freeze_layers_and_unknown_targets_name_the_field(tiny_qwen, tmp_path):
    data = _write_data(tmp_path)
    for kw, msg in (
        (dict(freeze_trainable_layers=5), "freeze_trainable_layers: 5 is more than"),
        (dict(use_lora=True, lora_target_modules=["nope_proj"]), "lora_target_modules:"),
    ):
        with pytest.raises(ConfigError, match=msg):
            CPTTrainer(_cfg(tiny_qwen, tmp_path / "o", data, max_steps=1, **kw)).train()
        assert not (tmp_path / "o").exists()
