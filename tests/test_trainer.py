"""End-to-end runs of the single-device trainer on the tiny offline model."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_cpt import ConfigError, CPTConfig, CPTTrainer, DataError, ModelLoadError, TrainingError

from .conftest import SAMPLE_TEXTS


def _records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_spec_advanced_snippet_with_trackers(tiny_qwen, tmp_path):
    config = CPTConfig(
        model_name_or_path=tiny_qwen,
        max_length=64,
        learning_rate=3e-5,
        num_train_epochs=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        warmup_ratio=0.1,
        weight_decay=0.01,
        max_grad_norm=1.0,
        dataloader_num_workers=2,
        logging_steps=1,
        save_steps=2,
        eval_steps=2,
        save_total_limit=2,
        trust_remote_code=False,
        use_muon_optimizer=True,
        output_dir=str(tmp_path / "out"),
    )
    config.wandb_project = "qwen2.5-cpt"
    config.logging_dir = str(tmp_path / "logs")
    loss = CPTTrainer(config).train(SAMPLE_TEXTS, eval_texts=SAMPLE_TEXTS[:3])
    assert math.isfinite(loss)
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))


def test_run_leaves_the_promised_files_and_metrics(tiny_qwen, tmp_path):
    out = tmp_path / "run"
    cfg = CPTConfig(
        model_name_or_path=tiny_qwen,
        output_dir=str(out),
        max_length=32,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        num_train_epochs=2,
        learning_rate=1e-3,
        logging_steps=1,
        warmup_ratio=0.2,
        eval_steps=3,
        save_steps=3,
        save_total_limit=2,
        use_gradient_checkpointing=False,
        eval_texts=SAMPLE_TEXTS[:2],
    )
    trainer = CPTTrainer(cfg)
    trainer.train(SAMPLE_TEXTS)
    steps = trainer.state.step
    assert steps > 6
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    # save_total_limit=2 keeps the two newest; the final step is always saved
    assert len(ckpts) == 2 and f"checkpoint-{steps}" in ckpts
    for name in ("final", "best"):
        assert (out / name / "model.safetensors").is_file()
        assert (out / name / "tokenizer.json").is_file()
        assert (out / name / "config.json").is_file()
    assert CPTConfig.from_yaml(out / "config.yaml") == cfg
    assert not list(out.glob(".tmp-*"))
    recs = _records(out)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for key in ("epoch", "loss", "avg_loss", "lr", "grad_norm", "tokens_per_sec", "memory_gb"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert evals[0]["step"] == 0 and evals[-1]["step"] == steps
    assert all(abs(r["eval_ppl"] - math.exp(r["eval_loss"])) < 1e-6 * r["eval_ppl"] for r in evals)
    assert train[-1]["loss"] < train[0]["loss"]
    best = json.loads((out / "best" / "trainer_state.json").read_text())
    assert best["best_eval_loss"] == pytest.approx(min(r["eval_loss"] for r in evals[1:]))
    # warmup then cosine: the lr rises first and ends below its peak
    lrs = [r["lr"] for r in train]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)
    # the final model reloads with plain transformers and continues the trained weights
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("Hello, world!", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[9707, 11, 1879, 0]]
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), trainer.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1.detach(), p2.detach().cpu())

    # a second train() on the same trainer never writes over the finished run
    before = {p: p.read_bytes() for p in (out / "final").iterdir()}
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(TrainingError, match="has finished its run .*final model in") as err:
        trainer.train(SAMPLE_TEXTS[:3])
    assert "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in (out / "final").iterdir()} == before
    assert (out / "metrics.jsonl").read_text() == metrics


def test_llama_architecture_trains(tiny_llama, tmp_path):
    cfg = CPTConfig(
        model_name_or_path=tiny_llama,
        output_dir=str(tmp_path),
        max_length=32,
        max_steps=3,
        use_muon_optimizer=True,
        learning_rate=1e-3,
        logging_steps=1,
    )
    assert math.isfinite(CPTTrainer(cfg).train(SAMPLE_TEXTS))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final").config.model_type == "llama"


def test_train_files_and_max_samples(tiny_qwen, tokenizer, tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    cfg = CPTConfig(
        model_name_or_path=tiny_qwen,
        output_dir=str(tmp_path / "o"),
        max_length=16,
        train_files=[str(data)],
        max_samples=2,
        num_train_epochs=1,
        logging_steps=1,
        per_device_train_batch_size=1,
    )
    trainer = CPTTrainer(cfg)
    trainer.train()
    # one epoch of the first two documents (each + eos), in 16-token blocks, one block a step
    n_tokens = sum(len(tokenizer(t)["input_ids"]) + 1 for t in SAMPLE_TEXTS[:2])
    assert trainer.state.step == math.ceil(n_tokens / 16)
    assert trainer.state.tokens_seen == 16 * trainer.state.step


# --- bad input: a clear error, and nothing written -----------------------------------------------


def _assert_nothing_written(path):
    assert not Path(path).exists()


def test_missing_model_path(tmp_path):
    out = tmp_path / "out"
    cfg = CPTConfig(model_name_or_path=str(tmp_path / "no-such-model"), output_dir=str(out))
    with pytest.raises(ModelLoadError, match="no-such-model.*is not a directory"):
        CPTTrainer(cfg).train(["some text"])
    _assert_nothing_written(out)


def test_empty_text_list(tiny_qwen, tmp_path):
    out = tmp_path / "out"
    cfg = CPTConfig(model_name_or_path=tiny_qwen, output_dir=str(out))
    with pytest.raises(DataError, match="train_texts: the list is empty"):
        CPTTrainer(cfg).train([])
    with pytest.raises(DataError, match="train_texts: the list is empty or holds only blank"):
        CPTTrainer(cfg).train(["  ", "\n"])
    with pytest.raises(DataError, match="nothing to train on"):
        CPTTrainer(cfg).train()
    with pytest.raises(DataError, match="expected a list of texts, got a single string"):
        CPTTrainer(cfg).train("one string")
    _assert_nothing_written(out)


def test_invalid_values_assigned_after_construction(tiny_qwen, tmp_path):
    out = tmp_path / "out"
    cfg = CPTConfig(model_name_or_path=tiny_qwen, output_dir=str(out))
    trainer = CPTTrainer(cfg)
    cfg.learning_rate = -1.0
    cfg.gradient_accumulation_steps = 0
    with pytest.raises(ConfigError) as info:
        trainer.train(["text"])
    assert "learning_rate" in str(info.value) and "gradient_accumulation_steps" in str(info.value)
    _assert_nothing_written(out)


def test_bad_train_file_is_named_before_anything_is_written(tiny_qwen, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    out = tmp_path / "out"
    cfg = CPTConfig(model_name_or_path=tiny_qwen, output_dir=str(out), train_files=[str(bad)])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        CPTTrainer(cfg).train()
    _assert_nothing_written(out)


def test_unwritable_output_dir(tiny_qwen, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = CPTConfig(model_name_or_path=tiny_qwen, output_dir=str(blocker / "out"))
    with pytest.raises(OSError, match="exists and is not a directory"):
        CPTTrainer(cfg).train(["text"])


def test_tokenizer_larger_than_embedding_is_refused(tiny_qwen, tmp_path):
    from qwen_cpt import make_tiny_model

    small = make_tiny_model(
        tmp_path / "small-vocab",
        hidden_size=16,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        vocab_size=1000,
    )
    cfg = CPTConfig(model_name_or_path=str(small), output_dir=str(tmp_path / "out"))
    with pytest.raises(ModelLoadError, match="151665 ids but the model .* has only 1000"):
        CPTTrainer(cfg).train(["text"])
    _assert_nothing_written(tmp_path / "out")


def test_tiny_model_untied_in_bf16_trains_in_fp32(tmp_path):
    """Qwen2.5-7B's layout (untied head, bf16 files): the trainer keeps fp32 master weights."""
    import json

    from safetensors import safe_open

    from qwen_cpt import make_tiny_model

    path = make_tiny_model(
        tmp_path / "untied",
        hidden_size=16,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        tie_word_embeddings=False,
        dtype=torch.bfloat16,
    )
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    trainer = CPTTrainer(
        CPTConfig(
            model_name_or_path=str(path),
            output_dir=str(tmp_path / "out"),
            max_steps=1,
            max_length=16,
            use_muon_optimizer=False,
        )
    )
    trainer.train(SAMPLE_TEXTS[:4])
    head, emb = trainer.model.lm_head.weight, trainer.model.model.embed_tokens.weight
    assert head.dtype == torch.float32 and head.data_ptr() != emb.data_ptr()


def test_non_finite_loss_stops_before_the_optimizer_step(tiny_qwen, tmp_path):
    from qwen_cpt import TrainingError

    cfg = CPTConfig(
        model_name_or_path=tiny_qwen,
        output_dir=str(tmp_path / "out"),
        max_length=16,
        max_steps=3,
        learning_rate=1e30,
        warmup_ratio=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        use_muon_optimizer=False,
    )
    with pytest.raises(TrainingError, match="non-finite .* at step 2"):
        CPTTrainer(cfg).train(SAMPLE_TEXTS)
    assert not (tmp_path / "out" / "final").exists()


def test_auto_learning_rate_and_batch_train_end_to_end(tiny_qwen, tmp_path):
    out = tmp_path / "auto"
    cfg = CPTConfig(
        model_name_or_path=tiny_qwen,
        output_dir=str(out),
        max_length=32,
        learning_rate="auto",
        per_device_train_batch_size="auto",
        gradient_accumulation_steps="auto",
        max_steps=2,
        logging_steps=1,
    )
    loss = CPTTrainer(cfg).train(SAMPLE_TEXTS)
    assert math.isfinite(loss)
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert isinstance(saved["learning_rate"], float) and saved["learning_rate"] > 0
    assert isinstance(saved["per_device_train_batch_size"], int)
    assert isinstance(saved["gradient_accumulation_steps"], int)


def test_max_length_beyond_the_models_positions_is_refused(tiny_qwen, tmp_path):
    import shutil

    short = tmp_path / "short-context"
    shutil.copytree(tiny_qwen, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    cfg = CPTConfig(model_name_or_path=str(short), output_dir=str(tmp_path / "out"), max_length=24)
    with pytest.raises(ConfigError, match="max_length: 24 is longer than the 16 positions"):
        CPTTrainer(cfg).train(SAMPLE_TEXTS)
    assert not (tmp_path / "out").exists()
    # with RoPE scaling configured for the longer context, it trains
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": config.get("rope_theta", 1e6)}
    (short / "config.json").write_text(
        json.dumps({**config, "max_position_embeddings": 16, "rope_parameters": rope})
    )
    cfg.max_steps = 1
    assert math.isfinite(CPTTrainer(cfg).train(SAMPLE_TEXTS))
