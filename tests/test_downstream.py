"""eval_tasks: lm-evaluation-harness scores of the model in memory, before training and at the end.

The reference is lm-eval itself, run on the model folders loaded from disk: the base model for
step 0 and the saved ``final/`` for the end. Two local tasks, written here: a multiple-choice one
(``acc``, a multiple of 1/8) and a loglikelihood one whose ``perplexity`` is a continuous number,
so a stale or mixed-up score cannot match by chance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from qwen_cpt import CPTConfig, CPTTrainer  # noqa: E402
from qwen_cpt.cli import main  # noqa: E402
from qwen_cpt.config import ConfigError  # noqa: E402
from qwen_cpt.downstream import BOOTSTRAP_ITERS, Downstream, scores  # noqa: E402
from qwen_cpt.report.page import _score  # noqa: E402

from .conftest import SAMPLE_TEXTS  # noqa: E402

QUESTIONS = [
    ("def add(a, b):\n    return", ["a + b", "a * b", "None", "b - a"], 0),
    ("The capital of France is", ["Paris", "Berlin", "Rome", "Madrid"], 0),
    ("Two plus two equals", ["three", "four", "five", "six"], 1),
    ("The court held that the contract was", ["void", "blue", "fast", "tall"], 0),
    ("Patients were randomised to receive the drug or", ["a car", "placebo", "snow", "it"], 1),
    ("import os\nprint(os.path.", ["join", "banana", "seven", "the"], 0),
    ("Water freezes at zero degrees", ["Celsius", "horses", "music", "Tuesday"], 0),
    ("Qwen2.5 models use rotary position", ["embeddings", "cheese", "rivers", "doors"], 0),
]
CONTINUATIONS = [
    ("Continued pretraining adapts a language model", " to a new domain by training on raw text."),
    ("The court held that the contract", " was void for lack of consideration."),
    ("def add(a, b):\n", "    return a + b\n"),
    ("Qwen2.5 models use grouped-query attention", " and rotary position embeddings."),
]


def _write_tasks(root: Path) -> tuple[Path, Path]:
    """A multiple-choice task YAML and a folder holding a loglikelihood task, on local jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    mc_data, ll_dir = root / "mc.jsonl", root / "ll_tasks"
    ll_dir.mkdir()
    mc_data.write_text(
        "".join(json.dumps({"q": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS)
    )
    (ll_dir / "ll.jsonl").write_text(
        "".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in CONTINUATIONS)
    )
    mc_yaml = root / "tiny_mc.yaml"
    mc_yaml.write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc_data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    (ll_dir / "tiny_ll.yaml").write_text(
        f"""task: tiny_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ll_dir / "ll.jsonl"}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""
    )
    return mc_yaml, ll_dir


def _config(model: str, out: Path, tasks: list[str], **kw) -> CPTConfig:
    return CPTConfig(
        model_name_or_path=model,
        output_dir=str(out),
        max_length=32,
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        logging_steps=1,
        eval_steps=100,
        save_steps=0,
        use_tensorboard=False,
        eval_tasks=tasks,
        **kw,
    )


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _downstream(out: Path) -> dict[int, dict[str, float]]:
    """{step: {downstream key: value}} from metrics.jsonl."""
    got: dict[int, dict[str, float]] = {}
    for r in _records(out):
        d = {k: v for k, v in r.items() if k.startswith("downstream/")}
        if d:
            got.setdefault(r["step"], {}).update(d)
    return got


def _reference(model_dir: str | Path, tasks: list[str]) -> dict[str, float]:
    """lm-eval on a model folder loaded from disk, as a user would run it."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folders = [t for t in tasks if Path(t).is_dir()]
    names = [t for t in tasks if not Path(t).is_dir()] + ["tiny_ll"] * bool(folders)
    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=4, dtype="float32")
    manager = TaskManager(include_path=folders, include_defaults=False)
    with pytest.MonkeyPatch.context() as mp:  # the bootstrapped stderr as the trainer draws it
        mp.setenv("DISABLE_MULTIPROC", "1")
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, log_samples=False,
            bootstrap_iters=BOOTSTRAP_ITERS,
        )  # fmt: skip
    return scores(out["results"])


def _assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-9), (k, got[k], want[k])


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[str]:
    mc_yaml, ll_dir = _write_tasks(tmp_path_factory.mktemp("tasks"))
    return [str(mc_yaml), str(ll_dir)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    return str(path)


@pytest.fixture(scope="module")
def trained(tiny_qwen, tasks, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "with_tasks"
    CPTTrainer(_config(tiny_qwen, out, tasks, train_files=[data])).train()
    return out


def test_scores_before_and_after_match_lm_eval_on_the_saved_models(trained, tiny_qwen, tasks):
    by_step = _downstream(trained)
    assert sorted(by_step) == [0, 4]  # before training and at the end, nothing in between
    keys = {"downstream/tiny_mc/acc", "downstream/tiny_mc/acc_stderr"}
    keys |= {"downstream/tiny_ll/perplexity", "downstream/tiny_ll/perplexity_stderr"}
    assert keys == set(by_step[0]) == set(by_step[4])
    _assert_same(by_step[0], _reference(tiny_qwen, tasks))
    _assert_same(by_step[4], _reference(trained / "final", tasks))
    # the report of the run shows them, before and after
    page = (trained / "report.html").read_text()
    assert 'data-metric="downstream/tiny_ll/perplexity">tiny_ll' in page
    assert f">{_score(by_step[0]['downstream/tiny_ll/perplexity'])}<" in page
    # training moved the model: the end is not a copy of the start
    assert (
        by_step[4]["downstream/tiny_ll/perplexity"] != by_step[0]["downstream/tiny_ll/perplexity"]
    )


def test_downstream_eval_leaves_training_as_it_was(trained, tiny_qwen, data, tmp_path):
    """Scoring in the loop (with downstream_eval_steps) must not change the run: same losses
    as a run without eval_tasks (lm-eval seeds the random generators; they are put back)."""
    out = tmp_path / "plain"
    CPTTrainer(_config(tiny_qwen, out, [], train_files=[data])).train()
    plain = [r["loss"] for r in _records(out) if "loss" in r]
    with_tasks = [r["loss"] for r in _records(trained) if "loss" in r]
    assert len(plain) == 4 and plain == with_tasks


def test_every_n_steps_and_on_a_sharded_model(tiny_qwen, tasks, data, tmp_path):
    """downstream_eval_steps adds the steps in between; under FSDP2 (fsdp_cpu_offload shards on
    a one-process group) rank 0 scores a gathered copy, which matches final/ from disk."""
    out = tmp_path / "sharded"
    cfg = _config(
        tiny_qwen, out, tasks[:1], train_files=[data], downstream_eval_steps=2,
        fsdp_cpu_offload=True,
    )  # fmt: skip
    CPTTrainer(cfg).train()
    by_step = _downstream(out)
    assert sorted(by_step) == [0, 2, 4]
    _assert_same(by_step[4], _reference(out / "final", tasks[:1]))


def test_bad_tasks_are_refused_before_training(tiny_qwen, data, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"eval_tasks: .*missing\.yaml: no such task file"):
        Downstream.from_config(_config(tiny_qwen, tmp_path / "o", [str(tmp_path / "missing.yaml")]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no lm-eval task YAML"):
        Downstream.from_config(_config(tiny_qwen, tmp_path / "o", [str(empty)]))
    # a name lm-eval does not know, through the CLI: exit 2, nothing written
    args = ["train", "--model_name_or_path", tiny_qwen, "--train_files", data]
    args += ["--output_dir", str(tmp_path / "out"), "--eval_tasks", "no_such_task_xyz"]
    assert main(args) == 2
    assert "eval_tasks: 'no_such_task_xyz' is not an lm-eval task" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_scores_keeps_numbers_and_names_filters():
    results = {
        "t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 8},
        "g": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": float("nan")},
    }
    assert scores(results) == {
        "downstream/t/acc": 0.5,
        "downstream/g/exact_match@strict-match": 0.25,
    }
