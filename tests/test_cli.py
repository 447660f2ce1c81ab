import json
import subprocess
import sys

import pytest
import yaml

from qwen_cpt.cli import main
from qwen_cpt.config import field_help

from .conftest import SAMPLE_TEXTS


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for name, help_text in field_help().items():
        assert f"--{name}" in text, name
        assert " ".join(help_text.split()[:4]) in flat, name  # the field's own description
    assert "Muon (torch.optim.Muon)" in " ".join(text.split())


def test_top_level_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "qwen_cpt", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for cmd in ("train", "tiny-model", "demo"):
        assert cmd in out.stdout


def test_train_from_yaml_with_overrides(tiny_qwen, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": tiny_qwen,
                "output_dir": str(tmp_path / "out"),
                "max_length": 32,
                "train_files": [str(data)],
                "max_steps": 50,
                "logging_steps": 1,
            }
        )
    )
    rc = main(
        [
            "train",
            str(cfg_path),
            "--max_steps",
            "2",
            "--use-muon-optimizer",
            "true",
            "--save_total_limit",
            "none",
            "--eval_files",
            str(data),
        ]
    )
    assert rc == 0
    assert "final average training loss" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["use_muon_optimizer"] is True
    assert saved["save_total_limit"] is None and saved["eval_files"] == [str(data)]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_train_errors_are_one_clear_line(tiny_qwen, tmp_path, capsys):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(f"model_name_or_path: {tiny_qwen}\nlearning_rate: -1\nmax_length: 0\n")
    assert main(["train", str(cfg_path), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cfg.yaml" in err and "learning_rate" in err and "max_length" in err
    assert "Traceback" not in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(cfg_path), "--max_steps", "many"])
    assert (
        main(["train", "--model_name_or_path", tiny_qwen, "--output_dir", str(tmp_path / "o")]) == 1
    )
    assert "nothing to train on" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_tiny_model_command(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    assert (
        main(
            [
                "tiny-model",
                str(tmp_path / "m"),
                "--hidden-size",
                "32",
                "--num-layers",
                "1",
                "--intermediate-size",
                "64",
            ]
        )
        == 0
    )
    cfg = AutoConfig.from_pretrained(tmp_path / "m")
    assert cfg.model_type == "qwen2" and cfg.vocab_size == 151936 and cfg.tie_word_embeddings
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.rope_parameters["rope_theta"] == 1e6
    assert AutoTokenizer.from_pretrained(tmp_path / "m")("Hello, world!")["input_ids"] == [
        9707,
        11,
        1879,
        0,
    ]
