"""What the product spec's guide tells users to do works on a clone of this repository.

- ``from src.pretrain.cpt import CPTTrainer, CPTConfig`` in a script next to ``src/`` (the
  spec's import line): its two snippets run as scripts, as a user runs them;
- ``pip install -r requirements_cpt.txt`` installs this project;
- ``src/pretrain`` is a shim for clones only: it is not installed as a top-level package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import SAMPLE_TEXTS

REPO = Path(__file__).resolve().parent.parent
SPEC_IMPORT = "from src.pretrain.cpt import CPTTrainer, CPTConfig"
TIMEOUT = 900  # a guard against a hang, not a speed check: CI hosts are busy

# The spec's snippets as tests/test_trainer.py runs them, with the spec's import line; the model
# path and output folders are filled in below.
BASIC = """
{import_line}

config = CPTConfig(
    model_name_or_path={model!r},
    max_length=2048, learning_rate=5e-5, num_train_epochs=3,
    per_device_train_batch_size=2, gradient_accumulation_steps=8,
    use_muon_optimizer=True, use_flash_attention=True, use_gradient_checkpointing=True,
    use_bf16=True, output_dir={out!r}, max_samples=1000)
trainer = CPTTrainer(config)
final_loss = trainer.train(["your text 1", "your text 2"])
print("final_loss", final_loss, "steps", trainer.state.step)
"""

# No `if __name__ == "__main__":` guard, as in the spec; dataloader_num_workers=2 (the spec: 8)
# and max_steps=4 keep it short on a shared CPU.
ADVANCED = """
{import_line}

train_texts = {texts!r}
config = CPTConfig(
    model_name_or_path={model!r},
    max_length=64,
    learning_rate=3e-5,
    num_train_epochs=2,
    max_steps=4,
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
    output_dir={out!r},
)
config.wandb_project = "qwen2.5-cpt"
config.logging_dir = {logs!r}
trainer = CPTTrainer(config)
final_loss = trainer.train(train_texts, eval_texts=train_texts[:3])
print("final_loss", final_loss, "steps", trainer.state.step)
"""


def _user_layout(tmp_path: Path) -> Path:
    """A folder like the clone's root: the user's script goes next to ``src/``."""
    root = tmp_path / "clone"
    root.mkdir()
    (root / "src").symlink_to(REPO / "src", target_is_directory=True)
    return root


def _run_script(root: Path, code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = root / "train_cpt.py"
    script.write_text(textwrap.dedent(code), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, script.name],  # sys.path[0] is the script's folder, as for the user
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _final_loss(res: subprocess.CompletedProcess) -> tuple[float, int]:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("final_loss"))
    _, loss, _, steps = line.split()
    return float(loss), int(steps)


def test_spec_basic_snippet_runs_as_a_script(tiny_qwen, tmp_path):
    root = _user_layout(tmp_path)
    out = tmp_path / "cpt_output"
    code = BASIC.format(import_line=SPEC_IMPORT, model=tiny_qwen, out=str(out))
    res = _run_script(root, code, tmp_path)
    loss, steps = _final_loss(res)
    assert 0 < loss < float("inf") and steps == 3  # one block, three epochs
    assert (out / "final" / "model.safetensors").is_file()
    # the spec promises the best model is saved: with no eval data, one text is held out
    assert "validation: held out 1 block of train" in res.stderr + res.stdout
    assert (out / "best" / "model.safetensors").is_file()
    # two short texts are far from one global batch of 16 blocks of 2048 tokens: it says so
    assert "fewer than one global batch of 16 blocks" in res.stderr + res.stdout


def test_spec_advanced_snippet_runs_as_a_script(tiny_qwen, tmp_path):
    root = _user_layout(tmp_path)
    out, logs = tmp_path / "out", tmp_path / "logs"
    code = ADVANCED.format(
        import_line=SPEC_IMPORT,
        texts=SAMPLE_TEXTS,
        model=tiny_qwen,
        out=str(out),
        logs=str(logs),
    )
    try:
        res = _run_script(root, code, tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the advanced snippet did not finish in {TIMEOUT} s")
    loss, steps = _final_loss(res)
    assert 0 < loss < float("inf") and steps == 4
    assert list(logs.glob("events.out.tfevents.*"))
    assert list((out / "wandb").glob("offline-run-*"))


def test_spec_import_names_the_same_classes_without_an_install():
    """From the repository root, with no installed qwen_cpt on sys.path: the shim takes the
    clone's own src/qwen_cpt, and its names are qwen_cpt's."""
    code = textwrap.dedent(
        f"""
        import sys
        src = {str(REPO / "src")!r}
        sys.path[:] = [p for p in sys.path if p.rstrip("/") != src]
        {SPEC_IMPORT}
        from src.pretrain.cpt import CheckpointError, ConfigError, DataError, ModelLoadError
        from src.pretrain.cpt import OptimizerSetupError, ResumeError, TrainingError
        import qwen_cpt
        assert CPTTrainer is qwen_cpt.CPTTrainer and CPTConfig is qwen_cpt.CPTConfig
        assert ConfigError is qwen_cpt.ConfigError and DataError is qwen_cpt.DataError
        print(qwen_cpt.__file__)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code],  # sys.path[0] is '' (the current folder): the repo root
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert Path(res.stdout.strip()).resolve() == REPO / "src" / "qwen_cpt" / "__init__.py"


def test_requirements_cpt_installs_this_project():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    path = REPO / "requirements_cpt.txt"
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    requirements = [ln for ln in lines if ln]
    assert requirements == ["-e ."], requirements  # the repository root, with its dependencies
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == "qwen-cpt"
    assert any(d.replace(" ", "").startswith("torch>=2.9") for d in project["dependencies"])
    assert not any("muon" in d.lower() for d in project["dependencies"])  # torch.optim.Muon


def test_pretrain_shim_is_not_an_installed_package():
    from setuptools import find_packages

    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    find = cfg["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(REPO / find["where"][0]), include=find.get("include", ["*"]))
    assert "qwen_cpt" in packages and "qwen_cpt.data" in packages
    assert not any(p.split(".")[0] == "pretrain" for p in packages), packages
