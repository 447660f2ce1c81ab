"""eval_tasks: lm-evaluation-harness scores of the model in memory, before training and at the end.

The references are lm-eval itself on the base model folder (step 0), and ``qwen-cpt eval`` on the
saved ``final/`` (the end). Two tasks: ``stdlib_next_line``, shipped in qwen_cpt.tasks (multiple
choice, ``acc``), and a loglikelihood task written here whose ``perplexity`` is a continuous
number, so a stale or mixed-up score cannot match by chance. Nothing here indexes lm-eval's whole
task registry (about 25 s): an unknown name is checked against a small one.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from qwen_cpt import CPTConfig, CPTTrainer  # noqa: E402
from qwen_cpt.cli import main  # noqa: E402
from qwen_cpt.config import ConfigError  # noqa: E402
from qwen_cpt.downstream import BOOTSTRAP_ITERS, Downstream, scores  # noqa: E402
from qwen_cpt.evaluate import ForgettingAlarm  # noqa: E402
from qwen_cpt.report.page import _score  # noqa: E402
from qwen_cpt.tasks import CODE_TASK, GENERAL_TASK, TASKS_DIR, held_out, task_path  # noqa: E402

from .conftest import SAMPLE_TEXTS  # noqa: E402

LIMIT = 12  # examples of the shipped task scored: enough for a continuous-ish accuracy, cheap
CONTINUATIONS = [
    ("Continued pretraining adapts a language model", " to a new domain by training on raw text."),
    ("The court held that the contract", " was void for lack of consideration."),
    ("def add(a, b):\n", "    return a + b\n"),
    ("Qwen2.5 models use grouped-query attention", " and rotary position embeddings."),
]


def _write_ll_task(root: Path) -> Path:
    """A folder holding a loglikelihood task on local jsonl."""
    ll_dir = root / "ll_tasks"
    ll_dir.mkdir(parents=True)
    (ll_dir / "ll.jsonl").write_text(
        "".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in CONTINUATIONS)
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
    return ll_dir


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
        eval_tasks_limit=LIMIT,
        per_device_eval_batch_size=4,
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
    limit = LIMIT
    with pytest.MonkeyPatch.context() as mp:  # the bootstrapped stderr as the trainer draws it
        mp.setenv("DISABLE_MULTIPROC", "1")
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, log_samples=False,
            bootstrap_iters=BOOTSTRAP_ITERS, limit=limit,
        )  # fmt: skip
    return scores(out["results"])


def _assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-9), (k, got[k], want[k])


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[str]:
    """The shipped code task, by its YAML path, and a folder of a local loglikelihood task."""
    return [str(task_path(CODE_TASK)), str(_write_ll_task(tmp_path_factory.mktemp("tasks")))]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    return str(path)


@pytest.fixture(scope="module")
def trained(tiny_qwen, tasks, data, tmp_path_factory) -> Path:
    """A 4-step run with eval_tasks; its final/ is what `qwen-cpt eval` scores."""
    out = tmp_path_factory.mktemp("runs") / "with_tasks"
    CPTTrainer(_config(tiny_qwen, out, tasks, train_files=[data])).train()
    return out


def _cli_eval(model_dir: Path, tasks: list[str], tmp_path: Path) -> dict[str, float]:
    """``qwen-cpt eval`` on a saved folder, read back from its --json file."""
    out = tmp_path / f"scores_{model_dir.name}.json"
    args = ["eval", str(model_dir), "--tasks", *tasks, "--limit", str(LIMIT)]
    assert main([*args, "--batch-size", "4", "--device", "cpu", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_scores_before_and_after_match_lm_eval_and_qwen_cpt_eval(
    trained, tiny_qwen, tasks, tmp_path, capsys
):
    by_step = _downstream(trained)
    assert sorted(by_step) == [0, 4]  # before training and at the end, nothing in between
    keys = {f"downstream/{CODE_TASK}/acc", f"downstream/{CODE_TASK}/acc_stderr"}
    keys |= {"downstream/tiny_ll/perplexity", "downstream/tiny_ll/perplexity_stderr"}
    assert keys == set(by_step[0]) == set(by_step[4])
    _assert_same(by_step[0], _reference(tiny_qwen, tasks))  # lm-eval itself, on the base
    _assert_same(by_step[4], _cli_eval(trained / "final", tasks, tmp_path))  # qwen-cpt eval
    printed = capsys.readouterr().out
    assert f"{CODE_TASK}/acc" in printed and "tiny_ll/perplexity" in printed
    # the report of the run shows them, before and after, in its top answer and its table
    page = (trained / "report.html").read_text()
    assert 'data-metric="downstream/tiny_ll/perplexity">tiny_ll' in page
    ppl = by_step[0]["downstream/tiny_ll/perplexity"], by_step[4]["downstream/tiny_ll/perplexity"]
    assert f">{_score(ppl[0])}<" in page
    assert f"{_score(ppl[0])} → {_score(ppl[1])}" in page  # the answer table
    # training moved the model: the end is not a copy of the start
    assert ppl[1] != ppl[0]


def test_shipped_tasks_come_from_held_out_documents():
    """Every item names a document the demo never trains on, and has one right answer."""
    for name in (CODE_TASK, GENERAL_TASK):
        lines = (TASKS_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        items = [json.loads(x) for x in lines]
        assert len(items) >= 100
        for it in items:
            assert held_out(it["doc"]), it["doc"]
            assert len(set(it["choices"])) == 4 and 0 <= it["answer"] < 4
        assert len({it["doc"] for it in items}) >= 10  # spread over documents


def test_downstream_eval_leaves_training_as_it_was(trained, tiny_qwen, data, tmp_path):
    """Scoring in the loop (with downstream_eval_steps) must not change the run: same losses
    as a run without eval_tasks (lm-eval seeds the random generators; they are put back)."""
    out = tmp_path / "plain"
    CPTTrainer(_config(tiny_qwen, out, [], train_files=[data])).train()
    plain = [r["loss"] for r in _records(out) if "loss" in r]
    with_tasks = [r["loss"] for r in _records(trained) if "loss" in r]
    assert len(plain) == 4 and plain == with_tasks


def test_every_n_steps_and_on_a_sharded_model(tiny_qwen, tasks, data, tmp_path, capfd):
    """downstream_eval_steps adds the steps in between; under FSDP2 (fsdp_cpu_offload shards on
    a one-process group) rank 0 scores a gathered copy, which matches final/ from disk. The
    loop logs one line per evaluation, without lm-eval's progress bars between its lines."""
    out = tmp_path / "sharded"
    cfg = _config(
        tiny_qwen, out, [CODE_TASK], train_files=[data], downstream_eval_steps=2,
        fsdp_cpu_offload=True,
    )  # fmt: skip
    CPTTrainer(cfg).train()
    by_step = _downstream(out)
    assert sorted(by_step) == [0, 2, 4]  # a shipped task named, without lm-eval's registry
    err = capfd.readouterr().err
    assert "%|" not in err and "Running loglikelihood" not in err, err[-2000:]
    _assert_same(by_step[4], _reference(out / "final", [str(task_path(CODE_TASK))]))


def test_bad_tasks_are_refused_before_training(tiny_qwen, data, tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=r"eval_tasks: .*missing\.yaml: no such task file"):
        Downstream.from_config(_config(tiny_qwen, tmp_path / "o", [str(tmp_path / "missing.yaml")]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no lm-eval task YAML"):
        Downstream.from_config(_config(tiny_qwen, tmp_path / "o", [str(empty)]))
    # a name lm-eval does not know, through the CLI: exit 2, nothing written. The registry is
    # our task folder only (the whole one takes 25 s to index; the lookup code is the same).
    from lm_eval.tasks import TaskManager

    import qwen_cpt.downstream as ds

    small = lambda include_path=None, include_defaults=True: TaskManager(  # noqa: E731
        include_path=[str(TASKS_DIR)], include_defaults=False
    )
    real = ds._lm_eval
    monkeypatch.setattr(ds, "_lm_eval", lambda: (*real()[:2], small))
    args = ["train", "--model_name_or_path", tiny_qwen, "--train_files", data]
    args += ["--output_dir", str(tmp_path / "out"), "--eval_tasks", "stdlib_next_lin"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "eval_tasks: 'stdlib_next_lin' is not an lm-eval task" in err
    assert "did you mean stdlib_next_line" in err
    assert not (tmp_path / "out").exists()
    # qwen-cpt eval: the same checks, before any model loads
    assert main(["eval", str(tmp_path / "no_model"), "--tasks", str(tmp_path / "x.yaml")]) == 2
    assert "x.yaml: no such task file" in capsys.readouterr().err
    assert main(["eval", tiny_qwen, "--tasks", CODE_TASK, "--limit", "0"]) == 2
    assert "--limit: must be >= 1" in capsys.readouterr().err


def test_eval_loss_standard_error_is_the_ratio_estimators():
    """The one-pass sums the evaluator gathers give the two-pass standard error of the mean loss
    (sum L_i / sum n_i over eval batches), and none for a single batch."""
    import random

    from qwen_cpt.evaluate import _stderr

    rng = random.Random(0)
    n_i = [rng.randint(50, 200) for _ in range(7)]
    l_i = [k * rng.uniform(2.0, 4.0) for k in n_i]
    total, n = sum(l_i), sum(n_i)
    m = total / n
    k = len(n_i)
    direct = math.sqrt(k / (k - 1) * sum((li - m * ni) ** 2 for li, ni in zip(l_i, n_i))) / n
    sums = (sum(x * x for x in l_i), sum(x * y for x, y in zip(l_i, n_i)), sum(x * x for x in n_i))
    assert _stderr(total, n, *sums, k) == pytest.approx(direct, rel=1e-9)
    assert math.isnan(_stderr(l_i[0], n_i[0], l_i[0] ** 2, l_i[0] * n_i[0], n_i[0] ** 2, 1))


def test_forgetting_alarm_warns_once_per_eval_set(tmp_path, caplog):
    alarm = ForgettingAlarm(0.05, tmp_path / "metrics.jsonl")
    start = {"eval_loss": 3.0, "eval_loss/code": 4.0, "eval_loss/eval": 3.0}
    with caplog.at_level(logging.WARNING, logger="qwen_cpt"):
        assert alarm.check(start, 0) == []
        assert alarm.check({**start, "eval_loss/eval": 3.05, "eval_loss": 3.05}, 10) == []
        rose = {"eval_loss": 3.2, "eval_loss/code": 3.0, "eval_loss/eval": 3.2}
        assert alarm.check(rose, 20) == ["eval_loss/eval"]  # eval_loss is that same set
        assert alarm.check({**rose, "eval_loss/eval": 3.5}, 30) == []  # said once
    text = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(text) == 1
    assert (
        "eval loss of eval (eval_files/eval_texts) is 3.2000 at step 20, 0.2000 above its start 3.0000"
        in text[0]
    )
    assert "more weight" in text[0] and "learning_rate" in text[0]
    # a resumed run compares with step 0 of metrics.jsonl, not with its own first eval
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "eval_loss": 3.0, "eval_loss_se": 0.1}) + "\n"
    )
    resumed = ForgettingAlarm(0.05, tmp_path / "metrics.jsonl")
    assert resumed.check({"eval_loss": 3.3}, 40) == []  # the first eval of this process...
    assert resumed.check({"eval_loss": 3.3}, 50) == ["eval_loss"]  # ...is measured from step 0
    assert ForgettingAlarm(None, tmp_path / "m").check({"eval_loss": 9.0}, 5) == []
    with pytest.raises(ConfigError, match="forgetting_tolerance: must be >= 0"):
        CPTConfig(model_name_or_path="m", forgetting_tolerance=-0.1).validate()


def test_forgetting_alarm_runs_in_the_loop(tiny_qwen, data, tmp_path, caplog):
    """The trainer hands every eval (step 0, each eval_steps, the end) to the alarm."""
    seen = []
    real = ForgettingAlarm.check
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ForgettingAlarm, "check", lambda self, m, s: seen.append(s) or real(self, m, s))
        cfg = _config(tiny_qwen, tmp_path / "alarm", [], train_files=[data])
        cfg.eval_texts, cfg.forgetting_tolerance, cfg.eval_steps = SAMPLE_TEXTS[:4], 0.0, 2
        CPTTrainer(cfg).train()
    assert seen == [0, 2, 4]


def test_scores_keeps_numbers_and_names_filters():
    results = {
        "t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 8},
        "g": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": float("nan")},
    }
    assert scores(results) == {
        "downstream/t/acc": 0.5,
        "downstream/g/exact_match@strict-match": 0.25,
    }
