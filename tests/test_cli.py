import json
import re
import subprocess
import sys

import pytest
import yaml

from qwen_cpt.cli import build_parser, join_negative_values, main
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
        main(["train", "--model_name_or_path", tiny_qwen, "--output_dir", str(tmp_path / "o")]) == 2
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


# --- negative numbers after a space, and exit statuses -------------------------------------------


def test_negative_numbers_after_a_space_are_values():
    parser = build_parser()
    argv = ["train", "--learning_rate", "-1e-3", "--seed", "-1", "--max-grad-norm", "-.5"]
    ns = parser.parse_args(join_negative_values(parser, argv))
    assert ns.learning_rate == -1e-3 and ns.seed == -1 and ns.max_grad_norm == -0.5
    # only one-value flags of the command given are joined; "--" ends the options
    assert join_negative_values(parser, ["train", "--eval_files", "-1"]) == [
        "train",
        "--eval_files",
        "-1",
    ]
    assert join_negative_values(parser, ["train", "--", "--seed", "-1"]) == [
        "train",
        "--",
        "--seed",
        "-1",
    ]
    assert join_negative_values(parser, ["plan", "c.yaml", "--tokens", "-2e9"])[-1] == (
        "--tokens=-2e9"
    )


def test_negative_learning_rate_is_refused_by_the_config(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["train", "--model_name_or_path", "m", "--output_dir", str(out)]
    assert main([*argv, "--learning_rate", "-1e-3"]) == 2
    err = capsys.readouterr().err
    assert "expected one argument" not in err and "Traceback" not in err
    assert err.startswith("qwen-cpt: error: invalid configuration in command-line flags")
    assert "learning_rate: must be > 0 or auto, got -0.001" in err
    assert not out.exists()


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("qwen-cpt")]
    assert len(lines) == 1 and lines[0].startswith("qwen-cpt: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_input_exits_2_with_one_line(tiny_qwen, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    base = ["train", "--max_length", "32", "--max_steps", "1", "--train_files", str(data)]
    # a model folder that does not exist
    missing = [
        "--model_name_or_path",
        str(tmp_path / "no-model"),
        "--output_dir",
        str(tmp_path / "o0"),
    ]
    assert main([*base, *missing]) == 2
    assert "no-model" in _one_error_line(capsys.readouterr().err)
    # a malformed record (DataError)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    argv = ["train", "--model_name_or_path", tiny_qwen, "--train_files", str(bad)]
    assert main([*argv, "--output_dir", str(tmp_path / "o1")]) == 2
    assert "bad.jsonl:2" in _one_error_line(capsys.readouterr().err)
    # a checkpoint that cannot be resumed (CheckpointError refusal)
    argv = [*base, "--model_name_or_path", tiny_qwen, "--output_dir", str(tmp_path / "o2")]
    assert main([*argv, "--resume_from_checkpoint", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "error, status",
    [
        ("qwen_cpt.DataError", 2),
        ("qwen_cpt.ModelLoadError", 2),
        ("qwen_cpt.trainer.ResumeError", 2),
        ("qwen_cpt.optim.OptimizerSetupError", 2),
        ("qwen_cpt.checkpoint.CheckpointError:checkpoint format 'x', not 2", 2),
        ("qwen_cpt.checkpoint.CheckpointSaveError:disk full while saving out/checkpoint-3; ...", 1),
        ("qwen_cpt.checkpoint.CheckpointSaveError:saving out/checkpoint-3 failed on rank 1: x", 1),
        ("qwen_cpt.TrainingError:non-finite loss at step 3, stopped before the optimizer step", 1),
    ],
)
def test_exit_status_by_error(error, status, monkeypatch, tmp_path, capsys):
    import importlib

    import qwen_cpt.trainer

    target, _, message = error.partition(":")
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)

    def fail(self, *args, **kwargs):
        raise cls(message or f"{name} for the test")

    monkeypatch.setattr(qwen_cpt.trainer.CPTTrainer, "train", fail)
    monkeypatch.setattr(qwen_cpt.trainer.CPTTrainer, "__init__", lambda self, cfg: None)
    argv = ["train", "--model_name_or_path", "m", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == status
    assert (
        _one_error_line(capsys.readouterr().err)
        == f"qwen-cpt: error: {message or name + ' for the test'}"
    )


def test_a_real_ulimit_out_of_memory_is_one_line(tiny_qwen, tmp_path):
    """Under ``ulimit -v`` (7.6 GiB of address space), a 9.3 GiB loss chunk cannot be had. Which
    allocation fails first depends on what the process already mapped (2.3 GiB under
    pytest-xdist), so the message is checked for a real size, not for one number."""
    import random

    from qwen_cpt import CPTConfig

    rng = random.Random(0)
    words = " ".join(SAMPLE_TEXTS).split()
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choices(words, k=3000))}) + "\n" for _ in range(12)
        )
    )
    cfg = tmp_path / "c.yaml"
    CPTConfig(
        model_name_or_path=tiny_qwen, train_files=[str(data)], output_dir=str(tmp_path / "o"),
        max_length=8192, per_device_train_batch_size=2, loss_chunk_size=16384, max_steps=2,
    ).to_yaml(cfg)  # fmt: skip
    res = subprocess.run(
        ["sh", "-c", f"ulimit -v 8000000 && exec {sys.executable} -m qwen_cpt train {cfg}"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr[-3000:]
    line = _one_error_line(res.stderr)
    size = re.match(
        r"qwen-cpt: error: out of host memory \(an allocation of ([\d.]+) GiB failed\)", line
    )
    assert size and float(size.group(1)) >= 1.0, line
    assert "Traceback" not in res.stderr


def test_out_of_host_memory_is_one_line_with_the_size_and_what_to_change(
    monkeypatch, tmp_path, capsys
):
    """PyTorch's real CPU allocator error (an allocation of 128 TiB), raised inside train()."""
    import torch

    import qwen_cpt.trainer

    def train(self, *args, **kwargs):
        torch.empty(2**47, dtype=torch.uint8)

    monkeypatch.setattr(qwen_cpt.trainer.CPTTrainer, "train", train)
    monkeypatch.setattr(qwen_cpt.trainer.CPTTrainer, "__init__", lambda self, cfg: None)
    argv = ["train", "--model_name_or_path", "m", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("qwen-cpt: error: out of host memory (an allocation of 131072.00 GiB")
    assert "per_device_train_batch_size" in line and "qwen-cpt plan" in line


def test_a_survivor_rank_that_lost_its_peer_says_so_in_one_line(monkeypatch):
    """gloo's (and NCCL's) error in a collective after another rank died: one line naming this
    rank and the cause, found also when wrapped; other errors and one process are not matched."""
    import torch.distributed as dist

    from qwen_cpt.cli import _peer_lost

    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
        "closed by peer [127.0.0.1]:36745. This is typically caused by a remote worker crashing."
    )
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _peer_lost(gloo) is None  # one process has no peers to lose
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    line = _peer_lost(gloo)
    assert line.startswith("rank 1 lost contact with the group (Connection closed by peer ")
    assert "pair.cc" not in line and "typically" not in line and "\n" not in line
    try:
        try:
            raise gloo
        except RuntimeError as inner:
            raise ValueError("while saving") from inner
    except ValueError as outer:
        assert _peer_lost(outer) == line
    assert "(NCCL error: remote process exited)" in _peer_lost(
        dist.DistBackendError("NCCL error: remote process exited\nmore")
    )
    assert _peer_lost(RuntimeError("shape mismatch")) is None
