"""Checkpoints, exact resume and fault handling, with real processes and real signals.

The reference for every resume is a straight run with the same config: per-step losses must be
equal (``==``), as in torchtitan's resume test.
"""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qwen_cpt import CPTConfig, CPTTrainer
from qwen_cpt.checkpoint import CheckpointError, latest_valid_checkpoint, verify
from qwen_cpt.trainer import ResumeError

from .conftest import SAMPLE_TEXTS

# 24 texts -> 15 blocks of 24 tokens -> 8 micro-batches of 2 -> 4 steps per epoch (accum 2)
BASE = dict(
    max_length=24,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    learning_rate=2e-3,
    warmup_ratio=0.25,
    logging_steps=1,
    eval_steps=1000,
    save_total_limit=None,
    use_gradient_checkpointing=False,
    seed=3,
)


def _write_data(tmp_path) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text(
        "".join(json.dumps({"text": t + f" #{i}"}) + "\n" for i, t in enumerate(SAMPLE_TEXTS))
    )
    return str(path)


def _cfg(model, out, data, **kw) -> CPTConfig:
    return CPTConfig(
        model_name_or_path=model, output_dir=str(out), train_files=[data], **{**BASE, **kw}
    )


def _losses(out) -> dict[int, float]:
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _cli(cfg: CPTConfig, tmp_path, name: str, **popen):
    path = tmp_path / f"{name}.yaml"
    cfg.to_yaml(path)
    cmd = [sys.executable, "-m", "qwen_cpt", "train", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if popen:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _resume_from(ckpt: Path, out: Path, model, data, **kw) -> dict[int, float]:
    """Resume in a new process from ``ckpt`` into ``out`` and return all logged losses."""
    cfg = _cfg(model, out, data, resume_from_checkpoint=str(ckpt), **kw)
    res = _cli(cfg, out.parent, out.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resuming from {ckpt} at step" in res.stderr
    return _losses(out)


@pytest.mark.parametrize(
    "muon, steps, at, workers",
    [
        (True, 6, 3, 0),  # Muon, resume mid-epoch
        (False, 8, 4, 0),  # AdamW, resume at an epoch boundary
        (True, 6, 2, 2),  # tokenizer worker processes
    ],
)
def test_resume_gives_identical_losses(tiny_qwen, tmp_path, muon, steps, at, workers):
    data = _write_data(tmp_path)
    straight = tmp_path / "straight"
    kw = dict(
        use_muon_optimizer=muon, max_steps=steps, save_steps=at, dataloader_num_workers=workers
    )
    CPTTrainer(_cfg(tiny_qwen, straight, data, **kw)).train()
    ref = _losses(straight)
    assert sorted(ref) == list(range(1, steps + 1))
    resumed = _resume_from(
        straight / f"checkpoint-{at}", tmp_path / "resumed", tiny_qwen, data, **kw
    )
    assert sorted(resumed) == list(range(at + 1, steps + 1))
    assert [resumed[s] for s in range(at + 1, steps + 1)] == [
        ref[s] for s in range(at + 1, steps + 1)
    ]


def test_resume_twice_in_a_row(tiny_qwen, tmp_path):
    data = _write_data(tmp_path)
    kw = dict(use_muon_optimizer=True, max_steps=6, save_steps=2)
    CPTTrainer(_cfg(tiny_qwen, tmp_path / "straight", data, **kw)).train()
    ref = _losses(tmp_path / "straight")
    first = _resume_from(
        tmp_path / "straight" / "checkpoint-2", tmp_path / "r1", tiny_qwen, data, **kw
    )
    second = _resume_from(tmp_path / "r1" / "checkpoint-4", tmp_path / "r2", tiny_qwen, data, **kw)
    assert [first[s] for s in (3, 4)] == [ref[s] for s in (3, 4)]
    assert [second[s] for s in (5, 6)] == [ref[s] for s in (5, 6)]


def test_checkpoint_holds_full_state_and_verifies(tiny_qwen, tmp_path):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    CPTTrainer(
        _cfg(tiny_qwen, out, data, max_steps=2, save_steps=1, use_muon_optimizer=True)
    ).train()
    ck = out / "checkpoint-1"
    names = {str(p.relative_to(ck)) for p in ck.rglob("*")}
    assert {
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "tokenizer.json",
        "state/.metadata",
        "trainer_state.json",
        "config.yaml",
        "manifest.json",
    } <= names
    assert not any(n.startswith("sharded") for n in names)  # consolidated, then removed
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["format"] == 2 and state["step"] == 1 and state["tokens_seen"] == 4 * 24
    assert set(state["geometry"]) >= {"max_length", "per_device_train_batch_size"}
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(str(ck / "state")).read_metadata().state_dict_metadata)
    assert any(k.startswith("optimizer.muon.state.") for k in keys), sorted(keys)[:5]
    assert any(k.startswith("optimizer.adamw.state.") for k in keys)
    assert {"run.train", "run.data", "run.schedule", "run.trackers", "rng.rank0.torch"} <= keys
    assert verify(ck) is None
    assert latest_valid_checkpoint(out) == out / "checkpoint-2"


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_every_checkpoint_is_an_hf_model_with_the_trainers_logits(tiny_qwen, tmp_path, use_async):
    """``from_pretrained(checkpoint-N)`` gives the trainer's own logits at step N (<= 1e-5)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_cpt.checkpoint import CheckpointManager

    ids = torch.tensor([[9707, 11, 1879, 0, 151643, 785, 1156]])
    seen: dict[str, torch.Tensor] = {}
    real_save = CheckpointManager.save

    def observed_save(self, target, model, *args, **kwargs):  # the trainer's model, then save
        with torch.no_grad():
            seen[target.name] = model(ids).logits.clone()
        return real_save(self, target, model, *args, **kwargs)

    out = tmp_path / "out"
    kw = dict(max_steps=3, save_steps=1, use_muon_optimizer=True, async_checkpoint=use_async)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CheckpointManager, "save", observed_save)
        CPTTrainer(_cfg(tiny_qwen, out, _write_data(tmp_path), **kw)).train()
    assert sorted(seen) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for name, logits in seen.items():
        model = AutoModelForCausalLM.from_pretrained(out / name).eval()
        with torch.no_grad():
            diff = (model(ids).logits - logits).abs().max().item()
        assert diff <= 1e-5, (name, diff)
    assert not torch.equal(seen["checkpoint-1"], seen["checkpoint-3"])  # the weights moved


def test_async_checkpoints_resume_like_sync_ones(tiny_qwen, tmp_path):
    data = _write_data(tmp_path)
    kw = dict(use_muon_optimizer=True, max_steps=6, save_steps=2)
    CPTTrainer(_cfg(tiny_qwen, tmp_path / "sync", data, **kw)).train()
    CPTTrainer(_cfg(tiny_qwen, tmp_path / "async", data, async_checkpoint=True, **kw)).train()
    ref = _losses(tmp_path / "sync")
    assert _losses(tmp_path / "async") == ref
    for step in (2, 4, 6):
        assert verify(tmp_path / "async" / f"checkpoint-{step}") is None
    resumed = _resume_from(
        tmp_path / "async" / "checkpoint-2", tmp_path / "resumed", tiny_qwen, data, **kw
    )
    assert [resumed[s] for s in range(3, 7)] == [ref[s] for s in range(3, 7)]


# Slows DCP's file writes for checkpoint-4 only, then runs the CLI: the background save of
# checkpoint-4 is still writing when the test kills the process.
_SLOW_WRITES = """
import sys, time
import torch.distributed.checkpoint.filesystem as fs
real = fs._write_files_from_queue
def slow(*args, **kwargs):  # the files it will write are queued as (path, name, items)
    if "checkpoint-4" in repr([f[0] for f in kwargs["file_queue"].queue]):
        time.sleep(600)
    return real(*args, **kwargs)
fs._write_files_from_queue = slow
from qwen_cpt.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(
    tiny_qwen, tmp_path, straight_muon
):
    data = _write_data(tmp_path)
    kw, ref = straight_muon

    out = tmp_path / "killed"
    cfg = _cfg(tiny_qwen, out, data, async_checkpoint=True, resume_from_checkpoint="auto", **kw)
    cfg.to_yaml(tmp_path / "killed.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITES, str(tmp_path / "killed.yaml")],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 900
    # training goes on while checkpoint-4 is written: wait for step 5, then kill mid-save
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and 5 in _losses(out):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert (out / ".tmp-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert verify(out / "checkpoint-3") is None  # the previous checkpoint is whole
    res = _cli(cfg, tmp_path, "killed")
    assert res.returncode == 0, res.stderr
    assert f"resuming from {out / 'checkpoint-3'} at step 3" in res.stderr
    got = _losses(out)
    assert [got[s] for s in range(1, 13)] == [ref[s] for s in range(1, 13)]
    assert not list(out.glob(".tmp-*"))


def test_old_layout_checkpoints_are_refused_with_a_message(tiny_qwen, tmp_path):
    data = _write_data(tmp_path)
    old = tmp_path / "out" / "checkpoint-5"
    shutil.copytree(tiny_qwen, old)
    (old / "optimizer.pt").write_bytes(b"0.1")
    (old / "trainer_state.json").write_text(json.dumps({"step": 5}))
    (old / "manifest.json").write_text(json.dumps({"files": {}}))
    for spec in (str(old), "auto"):
        cfg = _cfg(tiny_qwen, tmp_path / "out", data, max_steps=6, resume_from_checkpoint=spec)
        with pytest.raises(CheckpointError, match="written by qwen-cpt 0.1 .*cannot resume"):
            CPTTrainer(cfg).train()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-5"]


@pytest.fixture(scope="module")
def straight_muon(tiny_qwen, tmp_path_factory):
    """``(config fields, per-step losses)`` of a straight 12-step Muon run saving every step:
    the reference of the kill-and-resume tests."""
    tmp = tmp_path_factory.mktemp("straight")
    kw = dict(use_muon_optimizer=True, max_steps=12, save_steps=1)
    CPTTrainer(_cfg(tiny_qwen, tmp / "out", _write_data(tmp), **kw)).train()
    return kw, _losses(tmp / "out")


def test_sigkill_then_auto_resume_matches_a_straight_run(tiny_qwen, tmp_path, straight_muon):
    data = _write_data(tmp_path)
    kw, ref = straight_muon

    out = tmp_path / "killed"
    cfg = _cfg(tiny_qwen, out, data, resume_from_checkpoint="auto", **kw)
    proc = _cli(cfg, tmp_path, "killed", popen=True)
    deadline = time.time() + 600
    while not (out / "checkpoint-4").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: maybe mid-save
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    res = _cli(cfg, tmp_path, "killed")
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr
    got = _losses(out)
    assert [got[s] for s in range(1, 13)] == [ref[s] for s in range(1, 13)]
    assert not list(out.glob(".tmp-*"))


def test_corrupted_and_partial_checkpoints_are_skipped(tiny_qwen, tmp_path, caplog):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    kw = dict(max_steps=3, save_steps=1)
    CPTTrainer(_cfg(tiny_qwen, out, data, **kw)).train()
    ref = _losses(out)
    shutil.rmtree(out / "final")
    # newest checkpoint truncated, the one before it bit-flipped, and a save left half-done
    weights = out / "checkpoint-3" / "model-00001-of-00001.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    opt = out / "checkpoint-2" / "state" / "__0_0.distcp"
    blob = bytearray(opt.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    opt.write_bytes(bytes(blob))
    shutil.copytree(out / "checkpoint-1", out / ".tmp-checkpoint-4-999")
    assert latest_valid_checkpoint(out) == out / "checkpoint-1"
    assert "checkpoint-3: model-00001-of-00001.safetensors has 1000 bytes" in caplog.text
    assert "checkpoint-2: state/__0_0.distcp does not match its checksum" in caplog.text
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 3, "lo')
    CPTTrainer(_cfg(tiny_qwen, out, data, resume_from_checkpoint="auto", **kw)).train()
    assert _losses(out) == ref
    assert not (out / ".tmp-checkpoint-4-999").exists()


def test_sigterm_saves_exits_143_and_resumes_exactly(tiny_qwen, tmp_path):
    data = _write_data(tmp_path)
    kw = dict(max_steps=40, save_steps=1000, use_muon_optimizer=False)
    out = tmp_path / "run"
    cfg = _cfg(tiny_qwen, out, data, resume_from_checkpoint="auto", **kw)
    proc = _cli(cfg, tmp_path, "run", popen=True)
    lines = []
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if "step 3/40" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=600)
    log = "".join(lines) + rest
    assert proc.returncode == 143, log
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and "SIGTERM received" in log and str(saved[0]) in log
    stopped_at = int(saved[0].name.split("-")[1])
    assert 3 <= stopped_at < 40
    res = _cli(cfg, tmp_path, "run")
    assert res.returncode == 0, res.stderr
    CPTTrainer(_cfg(tiny_qwen, tmp_path / "straight", data, **kw)).train()
    assert _losses(out) == _losses(tmp_path / "straight")


def test_resume_may_split_the_same_global_batch_differently(tiny_qwen, tmp_path):
    """2 x 2 micro-batches per step, resumed as 4 x 1: the same blocks make each step."""
    data = _write_data(tmp_path)
    kw = dict(use_muon_optimizer=True, max_steps=4, save_steps=2)
    CPTTrainer(_cfg(tiny_qwen, tmp_path / "straight", data, **kw)).train()
    ref = _losses(tmp_path / "straight")
    out = tmp_path / "resplit"
    cfg = _cfg(
        tiny_qwen,
        out,
        data,
        **{**kw, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1},
        resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"),
    )
    CPTTrainer(cfg).train()
    resumed = _losses(out)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert math.isclose(resumed[step], ref[step], rel_tol=1e-5), (step, resumed, ref)


def test_resume_refuses_changed_geometry_and_data(tiny_qwen, tmp_path):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    CPTTrainer(
        _cfg(tiny_qwen, out, data, max_steps=1, save_steps=1, use_muon_optimizer=True)
    ).train()
    ck = out / "checkpoint-1"
    with pytest.raises(ResumeError, match="max_length: the checkpoint has 24, this run has 32"):
        CPTTrainer(
            _cfg(
                tiny_qwen,
                tmp_path / "o2",
                data,
                max_steps=2,
                max_length=32,
                resume_from_checkpoint=str(ck),
            )
        ).train()
    with pytest.raises(
        ResumeError,
        match=r"global batch \(per_device_train_batch_size x gradient_accumulation_steps x "
        r"processes\): the checkpoint has 2 x 2 x 1 = 4 blocks, this run has 2 x 4 x 1 = 8",
    ):
        CPTTrainer(
            _cfg(
                tiny_qwen,
                tmp_path / "o2",
                data,
                max_steps=2,
                gradient_accumulation_steps=4,
                resume_from_checkpoint=str(ck),
            )
        ).train()
    with pytest.raises(
        ResumeError, match="use_muon_optimizer: the checkpoint has True, this run has False"
    ):
        CPTTrainer(
            _cfg(
                tiny_qwen,
                tmp_path / "o2",
                data,
                max_steps=2,
                use_muon_optimizer=False,
                resume_from_checkpoint=str(ck),
            )
        ).train()
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "something else entirely " * 20}) + "\n")
    with pytest.raises(ResumeError, match=r"training data: .* removed file .*train\.jsonl") as e:
        CPTTrainer(
            _cfg(
                tiny_qwen, tmp_path / "o2", str(other), max_steps=2, resume_from_checkpoint=str(ck)
            )
        ).train()
    assert "added file" in str(e.value) and "other.jsonl" in str(e.value)
    # the same file, edited to the same size: named as changed
    text = Path(data).read_text()
    Path(data).write_text(text.replace("court", "COURT"))
    with pytest.raises(ResumeError, match=r"training data: .*train\.jsonl changed content"):
        CPTTrainer(
            _cfg(tiny_qwen, tmp_path / "o2", data, max_steps=2, resume_from_checkpoint=str(ck))
        ).train()
    assert not (tmp_path / "o2").exists()


def test_resume_refuses_changed_architecture(tiny_qwen, tmp_path):
    from qwen_cpt import make_tiny_model

    data = _write_data(tmp_path)
    out = tmp_path / "out"
    CPTTrainer(_cfg(tiny_qwen, out, data, max_steps=1, save_steps=1)).train()
    wider = make_tiny_model(
        tmp_path / "wider", hidden_size=48, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    with pytest.raises(ResumeError, match="model hidden_size: the checkpoint has 32, .* has 48"):
        CPTTrainer(
            _cfg(
                str(wider),
                tmp_path / "o2",
                data,
                max_steps=2,
                resume_from_checkpoint=str(out / "checkpoint-1"),
            )
        ).train()


def test_missing_or_broken_checkpoint_path(tiny_qwen, tmp_path):
    data = _write_data(tmp_path)
    with pytest.raises(CheckpointError, match="'.*nope' is not a directory"):
        CPTTrainer(
            _cfg(tiny_qwen, tmp_path / "o", data, resume_from_checkpoint=str(tmp_path / "nope"))
        ).train()
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        CPTTrainer(
            _cfg(tiny_qwen, tmp_path / "o", data, resume_from_checkpoint=str(tmp_path / "half"))
        ).train()
    assert not (tmp_path / "o").exists()


def test_auto_resume_with_nothing_to_resume_starts_fresh(tiny_qwen, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qwen_cpt")
    data = _write_data(tmp_path)
    CPTTrainer(
        _cfg(tiny_qwen, tmp_path / "o", data, max_steps=1, resume_from_checkpoint="auto")
    ).train()
    assert "no valid checkpoint" in caplog.text and "starting fresh" in caplog.text


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_full_disk_during_save_keeps_the_previous_checkpoint(
    tiny_qwen, tmp_path, monkeypatch, use_async
):
    import errno

    import torch.distributed.checkpoint.filesystem as fs

    data = _write_data(tmp_path)
    out = tmp_path / "out"
    real_write = fs._write_files_from_queue

    def failing_write(*args, **kwargs):  # the second checkpoint's files hit ENOSPC
        if "checkpoint-2" in repr([f[0] for f in kwargs["file_queue"].queue]):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(fs, "_write_files_from_queue", failing_write)
    cfg = _cfg(tiny_qwen, out, data, max_steps=3, save_steps=1, async_checkpoint=use_async)
    with pytest.raises(
        CheckpointError,
        match="disk full while saving .*checkpoint-2.*previous checkpoint is intact",
    ):
        CPTTrainer(cfg).train()
    assert verify(out / "checkpoint-1") is None
    assert not (out / "checkpoint-2").exists() and not list(out.glob(".tmp-*"))


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d"
    return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and unshare -m to mount a tmpfs")
def test_a_real_full_disk_ends_in_one_line_and_keeps_the_previous_checkpoint(tiny_qwen, tmp_path):
    """A tmpfs in a private mount namespace with room for one checkpoint and a half."""
    data = _write_data(tmp_path)
    sized = tmp_path / "sized"  # how much one checkpoint and a whole run take here
    res = _cli(_cfg(tiny_qwen, sized, data, max_steps=1, save_steps=1), tmp_path, "sized")
    assert res.returncode == 0, res.stderr[-3000:]
    one = _du(sized / "checkpoint-1")
    room = one + one // 2 + (1 << 20)  # checkpoint-1, half of checkpoint-2, the logs
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    cfg_path = tmp_path / "full.yaml"
    _cfg(tiny_qwen, out, data, max_steps=3, save_steps=1).to_yaml(cfg_path)
    check = (
        "import json, sys; from pathlib import Path; from qwen_cpt.checkpoint import verify; "
        "o = Path(sys.argv[1]); print('AFTER', json.dumps({'verify': verify(o / 'checkpoint-1'), "
        "'entries': sorted(p.name for p in o.iterdir())}))"
    )
    script = (
        f"mount -t tmpfs -o size={room} tmpfs {disk} && "
        f"{sys.executable} -m qwen_cpt train {cfg_path}; echo RC=$?; "
        f'{sys.executable} -c "{check}" {out}'
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    text = res.stdout + res.stderr
    assert "RC=1" in res.stdout, text[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
    assert any("disk full while saving" in ln and "checkpoint-2" in ln for ln in errors), text[
        -3000:
    ]
    assert "Traceback" not in text
    after = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("AFTER"))[6:])
    assert after["verify"] is None  # checkpoint-1 intact
    assert "checkpoint-1" in after["entries"]
    assert not [e for e in after["entries"] if e.startswith(".tmp-") or e == "checkpoint-2"]


def test_nan_skip_policy_skips_up_to_the_cap(tiny_qwen, tmp_path, caplog):
    from qwen_cpt import TrainingError

    data = _write_data(tmp_path)
    kw = dict(
        max_steps=6,
        learning_rate=1e30,
        warmup_ratio=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
    )
    with pytest.raises(TrainingError, match="non-finite .* at step 4 .* after 2 skipped steps"):
        CPTTrainer(
            _cfg(tiny_qwen, tmp_path / "o", data, nan_policy="skip", max_skipped_steps=2, **kw)
        ).train()
    assert caplog.text.count("update skipped") == 2
    with pytest.raises(TrainingError, match="at step 2 "):
        CPTTrainer(_cfg(tiny_qwen, tmp_path / "o2", data, **kw)).train()
    assert not list((tmp_path / "o2").glob("checkpoint-*"))


def test_rotation_keeps_newest_and_best(tiny_qwen, tmp_path):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    CPTTrainer(
        _cfg(
            tiny_qwen,
            out,
            data,
            max_steps=5,
            save_steps=1,
            save_total_limit=2,
            eval_steps=1,
            eval_texts=SAMPLE_TEXTS[:2],
        )
    ).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert (out / "best" / "model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["save_total_limit"] == 2


def test_resuming_a_checkpoint_at_max_steps_says_there_is_nothing_to_train(tiny_qwen, tmp_path):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    CPTTrainer(_cfg(tiny_qwen, out, data, max_steps=2, save_steps=1)).train()
    cfg = _cfg(tiny_qwen, out, data, max_steps=2, resume_from_checkpoint="auto")
    res = _cli(cfg, tmp_path, "again")
    assert res.returncode == 0, res.stderr
    assert "the checkpoint is at step 2 and this run ends at step 2: no step to train" in res.stderr
    assert sorted(_losses(out)) == [1, 2]


def test_a_checkpoint_whose_state_would_run_code_is_refused_as_unsafe(tiny_qwen, tmp_path):
    """DCP's state/.metadata is a pickle, and a pickle can run code: a resume reads it through
    an allowlist. A crafted one (manifest rewritten to match) is refused and runs nothing."""
    import pickle

    from qwen_cpt.checkpoint import write_manifest

    data = _write_data(tmp_path)
    out = tmp_path / "out"
    CPTTrainer(_cfg(tiny_qwen, out, data, max_steps=1, save_steps=1)).train()
    ck = out / "checkpoint-1"
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ck / "state" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    write_manifest(ck)  # an attacker would make the manifest match
    cfg = _cfg(tiny_qwen, tmp_path / "o2", data, max_steps=2, resume_from_checkpoint=str(ck))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused as unsafe: it would load "):
        CPTTrainer(cfg).train()
    assert not marker.exists()
