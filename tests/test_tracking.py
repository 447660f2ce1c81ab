"""Trackers: TensorBoard and W&B receive what metrics.jsonl holds; a failing sink never stops a run."""

from __future__ import annotations

import json
import logging
import math
import struct
import sys
import time
from pathlib import Path

import pytest

from qwen_cpt.config import CPTConfig
from qwen_cpt.tracking import (
    JsonlTracker,
    Tracker,
    Trackers,
    build_trackers,
    namespaced,
    scalars,
)

TRAIN = [
    (
        step,
        {
            "epoch": step / 30,
            "loss": 3.0 - 0.1 * step,
            "avg_loss": 3.1 - 0.09 * step,
            "lr": 5e-5 * step / 10,
            "grad_norm": 1.0 + 0.01 * step,
            "tokens_per_sec": 1000.0 + step,
            "tokens_seen": 4096 * step,
            "memory_gb": 1.5,
        },
    )
    for step in (1, 2, 3)
]
EVAL = [
    (0, {"eval_loss": 3.2, "eval_ppl": math.exp(3.2), "eval_loss/domain": 3.5}),
    (3, {"eval_loss": 2.8, "eval_ppl": math.exp(2.8), "eval_loss/domain": 2.9}),
]
EVENTS = sorted(TRAIN + EVAL, key=lambda e: e[0])


class Capture(logging.Handler):
    """Records of the ``qwen_cpt`` logger, whatever its propagate setting."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    @property
    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


@pytest.fixture
def captured():
    logger = logging.getLogger("qwen_cpt")
    handler, level = Capture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    return tmp_path


def make_cfg(tmp_path: Path, **kw) -> CPTConfig:
    return CPTConfig(model_name_or_path="x", output_dir=str(tmp_path), **kw)


def drive(trackers: Trackers) -> None:
    for step, metrics in EVENTS:
        trackers.log(metrics, step)
    trackers.close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_from_jsonl(path: Path) -> dict[str, dict[int, float]]:
    """``{namespaced name: {step: value}}`` from metrics.jsonl."""
    want: dict[str, dict[int, float]] = {}
    for rec in read_jsonl(path):
        step = rec.pop("step")
        for k, v in rec.items():
            want.setdefault(namespaced(k), {})[step] = v
    return want


# --- names -----------------------------------------------------------------------------------------


def test_namespacing():
    assert namespaced("loss") == "train/loss"
    assert namespaced("tokens_per_sec") == "train/tokens_per_sec"
    assert namespaced("eval_loss") == "eval/loss"
    assert namespaced("eval_ppl") == "eval/ppl"
    assert namespaced("eval_loss/domain") == "eval/loss/domain"
    assert namespaced("eval_ppl/general") == "eval/ppl/general"
    assert namespaced("train_runtime_s") == "train/runtime_s"
    assert namespaced("eval/loss") == "eval/loss"


def test_scalars_keeps_real_numbers_only():
    got = scalars({"a": 1, "b": 2.5, "c": True, "d": "x", "e": None, "f": float("nan")})
    assert got.keys() == {"a", "b", "f"}
    assert isinstance(got["a"], int)


# --- metrics.jsonl ---------------------------------------------------------------------------------


def test_jsonl_writes_strict_json(tmp_path):
    t = JsonlTracker(tmp_path / "metrics.jsonl")
    t.log({"loss": float("nan"), "lr": 1e-5}, 1)
    t.log({"eval_loss/domain": 2.0}, 2)
    t.close()
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert recs == [
        {"step": 1, "loss": "nan", "lr": 1e-5},
        {"step": 2, "eval_loss/domain": 2.0},
    ]


# --- TensorBoard -----------------------------------------------------------------------------------


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(tmp_path, use_tensorboard=True)
    trackers = build_trackers(cfg, tmp_path)
    assert trackers.names == ["metrics.jsonl", "tensorboard"]
    drive(trackers)

    acc = EventAccumulator(cfg.resolved_logging_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = expected_from_jsonl(tmp_path / "metrics.jsonl")
    assert tags == set(want)
    assert {"train/loss", "train/lr", "eval/loss", "eval/ppl", "eval/loss/domain"} <= tags
    for tag, by_step in want.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got.keys() == by_step.keys(), tag
        for step, value in by_step.items():
            assert got[step] == pytest.approx(value, rel=1e-6), (tag, step)
    # the config is there too, as text
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_tensorboard_off(tmp_path):
    trackers = build_trackers(make_cfg(tmp_path, use_tensorboard=False), tmp_path)
    assert trackers.names == ["metrics.jsonl"]
    trackers.close()
    assert not (tmp_path / "logs").exists()


# --- Weights & Biases ------------------------------------------------------------------------------


def wandb_records(run_file: Path) -> list:
    """The protobuf ``Record`` messages of an offline run's ``.wandb`` file.

    The file is a 7-byte W&B header followed by a LevelDB-style log (32 KiB blocks of chunks,
    each with a 7-byte header: crc32, length, type) of ``Record`` messages. wandb 0.31 has no
    Python reader for it any more (the old ``sdk.internal.datastore`` is gone).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, raw = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        if pos + 7 + n > len(data):  # still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 1:  # full
            raw.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            raw.append(pending + chunk)
    records = []
    for chunk in raw:
        rec = pb.Record()
        rec.ParseFromString(chunk)
        records.append(rec)
    return records


def wandb_history(run_file: Path, timeout: float = 20.0) -> list[dict]:
    """History rows of a finished offline run. ``run.finish()`` can return before wandb's
    service process has written the file out, so wait for the run's closing ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_file)
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "exit" in kinds, f"{run_file} holds no exit record after {timeout}s: {kinds}"
    return [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r, kind in zip(records, kinds)
        if kind == "history"
    ]


def test_wandb_offline_run_holds_the_history(tmp_path, wandb_offline, captured):
    cfg = make_cfg(tmp_path, use_tensorboard=False, wandb_project="qwen-cpt-test")
    trackers = build_trackers(cfg, tmp_path)
    assert trackers.names == ["metrics.jsonl", "wandb"], captured.warnings
    drive(trackers)

    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = wandb_history(run_files[0])
    got: dict[str, dict[int, float]] = {}
    for row in rows:
        for k, v in row.items():
            if not k.startswith("_"):
                got.setdefault(k, {})[row["_step"]] = v
    want = expected_from_jsonl(tmp_path / "metrics.jsonl")
    assert got.keys() == want.keys()
    for name, by_step in want.items():
        assert got[name].keys() == by_step.keys(), name
        for step, value in by_step.items():
            assert got[name][step] == pytest.approx(value, rel=1e-9), (name, step)
    assert got["eval/loss/domain"] == {0: 3.5, 3: 2.9}
    assert not captured.warnings


def test_wandb_missing_warns_and_training_goes_on(tmp_path, monkeypatch, captured):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    cfg = make_cfg(tmp_path, use_tensorboard=False, wandb_project="p")
    trackers = build_trackers(cfg, tmp_path)
    assert trackers.names == ["metrics.jsonl"]
    assert len(captured.warnings) == 1
    assert "wandb is not installed" in captured.warnings[0]
    drive(trackers)
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == len(EVENTS)


def test_wandb_init_failure_warns(tmp_path, wandb_offline, monkeypatch, captured):
    import wandb

    def broken_init(**kw):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    trackers = build_trackers(
        make_cfg(tmp_path, use_tensorboard=False, wandb_project="p"), tmp_path
    )
    assert trackers.names == ["metrics.jsonl"]
    assert len(captured.warnings) == 1
    assert "no network" in captured.warnings[0] and "WANDB_MODE=offline" in captured.warnings[0]
    trackers.close()


# --- failure isolation -----------------------------------------------------------------------------


class Broken(Tracker):
    name = "broken"

    def __init__(self, fail_at: int):
        self.fail_at, self.calls, self.closed = fail_at, 0, False

    def log(self, metrics, step):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise OSError("disk full")

    def close(self):
        self.closed = True
        raise RuntimeError("close fails too")


class Recorder(Tracker):
    name = "recorder"

    def __init__(self):
        self.seen: list[tuple[int, dict]] = []
        self.closed = False

    def log(self, metrics, step):
        self.seen.append((step, dict(metrics)))

    def close(self):
        self.closed = True


def test_broken_tracker_warns_once_and_the_others_keep_logging(tmp_path, captured):
    broken, before, after = Broken(fail_at=2), Recorder(), Recorder()
    jsonl = JsonlTracker(tmp_path / "metrics.jsonl")
    trackers = Trackers([before, broken, jsonl, after])
    drive(trackers)

    assert len(captured.warnings) == 1
    msg = captured.warnings[0]
    assert "broken" in msg and "disk full" in msg and "OSError" in msg
    assert "recorder, metrics.jsonl, recorder" in msg
    assert broken.calls == 2 and broken.closed  # closed once, its close error swallowed
    assert before.seen == after.seen == EVENTS
    assert before.closed and after.closed
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == len(EVENTS)
    assert trackers.names == []  # close() empties the container; a second close is a no-op
    trackers.close()
    assert len(captured.warnings) == 1


def test_close_failure_warns_and_closes_the_rest(captured):
    class BadClose(Tracker):
        name = "badclose"

        def close(self):
            raise ValueError("nope")

    rec = Recorder()
    Trackers([BadClose(), rec]).close()
    assert rec.closed
    assert len(captured.warnings) == 1 and "badclose" in captured.warnings[0]


def test_build_trackers_takes_a_plain_config_object(tmp_path):
    class Cfg:
        use_tensorboard = False
        wandb_project = None

    trackers = build_trackers(Cfg(), tmp_path)
    trackers.log({"loss": 1.0, "ok": True, "note": "x"}, 5)
    trackers.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 5, "loss": 1.0, "ok": True, "note": "x"}
    ]
