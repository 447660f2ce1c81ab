"""Downstream evaluation with lm-evaluation-harness (``eval_tasks``), on the model in memory.

:class:`Downstream` checks the tasks once, before any model loads (a bad name or a missing YAML is
a :class:`~qwen_cpt.config.ConfigError`), and :meth:`Downstream.evaluate` scores the model the
loop is training, with no reload from disk: one process hands it to lm-eval's ``HFLM`` as it is;
a sharded run (torchrun, ``fsdp_cpu_offload``) gathers the whole weights to rank 0, which scores a
consolidated copy while the other ranks wait in the broadcast of its result
(docs/design.md, "Downstream evaluation"). Scores come back as ``downstream/<task>/<metric>``.

lm-eval is an optional dependency (``pip install qwen-cpt[eval]``), imported only here and only
when ``eval_tasks`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, CPTConfig

log = logging.getLogger("qwen_cpt")
PREFIX = "downstream/"
INSTALL = "pip install qwen-cpt[eval]"
# Resamples for the stderr of metrics without a closed form (perplexity, F1 ...); lm-eval's
# default, 100,000, costs minutes in one process (docs/design.md, "Downstream evaluation").
BOOTSTRAP_ITERS = 1000


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(
            [f"eval_tasks: needs lm-evaluation-harness, which is not installed ({INSTALL}): {exc}"]
        ) from None
    return lm_eval, HFLM, TaskManager


@dataclass
class Downstream:
    """The checked tasks of ``eval_tasks``: what lm-eval loads (names or YAML paths) and the
    task manager that indexes them."""

    specs: list[str]
    manager: object
    limit: int | None
    batch_size: int

    @classmethod
    def from_config(cls, cfg: CPTConfig) -> Downstream:
        """:meth:`from_specs` of ``eval_tasks``, ``eval_tasks_limit`` and the eval batch size."""
        return cls.from_specs(cfg.eval_tasks, cfg.eval_tasks_limit, cfg.per_device_eval_batch_size)

    @classmethod
    def from_specs(cls, entries: list[str], limit: int | None, batch_size: int) -> Downstream:
        """Resolve and load every task once; raise ConfigError naming the first bad one.

        A folder contributes every task its YAML files define; a ``.yaml``/``.yml`` path the task
        it defines; anything else is a name in lm-eval's registry (indexing that registry takes
        about 25 s on 2 CPU cores, so it is read only when a name needs it); the tasks shipped in
        :mod:`qwen_cpt.tasks` (``stdlib_next_line``, ``docs_next_sentence``) are known by name.
        """
        _, _, TaskManager = _lm_eval()
        from lm_eval.tasks._index import Kind, TaskIndex

        from .tasks import SHIPPED, TASKS_DIR

        folders, specs, names, shipped = [], [], [], set(SHIPPED)
        for entry in entries:
            path = Path(entry).expanduser()
            if path.is_dir():
                index = TaskIndex().build([path])
                found = sorted(k for k, e in index.items() if e.kind in (Kind.TASK, Kind.PY_TASK))
                if not found:
                    raise ConfigError(
                        [f"eval_tasks: {entry}: the folder holds no lm-eval task YAML"]
                    )
                folders.append(str(path))
                specs += found
            elif path.suffix in (".yaml", ".yml"):
                if not path.is_file():
                    raise ConfigError([f"eval_tasks: {entry}: no such task file"])
                specs.append(str(path))
            elif entry in shipped:  # qwen_cpt.tasks, known without lm-eval's registry
                specs.append(entry)
            else:
                names.append(entry)
                specs.append(entry)
        if shipped & set(specs) and str(TASKS_DIR) not in folders:
            folders.append(str(TASKS_DIR))
        manager = TaskManager(include_path=folders or None, include_defaults=bool(names))
        for name in names:
            if name not in manager.all_tasks and not manager.match_tasks([name]):
                import difflib

                close = difflib.get_close_matches(name, manager.all_tasks, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(
                    [
                        f"eval_tasks: {name!r} is not an lm-eval task, nor a task YAML or folder{hint}"
                    ]
                )
        for spec in specs:  # builds each task and reads its documents: a bad YAML fails here
            try:
                manager.load([spec])
            except Exception as exc:
                msg = " ".join(str(exc).split())
                raise ConfigError([f"eval_tasks: {spec}: lm-eval cannot load it: {msg}"]) from None
        return cls(specs, manager, limit, batch_size)

    # --- scoring ------------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, world, runtime, step: int) -> dict[str, float]:
        """``downstream/<task>/<metric>`` of ``model`` on every rank (the loop logs on rank 0).

        Sharded: the weights are gathered on every rank (a collective), rank 0 scores a copy of
        the whole model, and the others wait for its result in :meth:`World.on_main`, which also
        raises an error on rank 0 on every rank."""
        if world.sharded:
            weights = world.full_state_dict(model)
            metrics = world.on_main(lambda: self._score(_copy(model, weights, runtime), tokenizer))
        else:
            was_training = model.training
            try:
                metrics = self._score(model, tokenizer)
            finally:
                model.train(was_training)
        if metrics:
            shown = ", ".join(
                f"{k[len(PREFIX) :]} {v:.4f}" for k, v in metrics.items() if "_stderr" not in k
            )
            log.info("downstream step %d: %s", step, shown)
        return metrics

    def _score(self, model, tokenizer, progress: bool = False) -> dict[str, float]:
        """lm-eval's scores of ``model``, with the caller's random state put back afterwards
        (``simple_evaluate`` seeds Python, NumPy and torch); lm-eval's progress bars only if
        ``progress`` (the training loop logs one line per evaluation instead)."""
        lm_eval, HFLM, _ = _lm_eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
        with _kept_random_state(), _no_fork(), _progress_bars(progress), torch.no_grad():
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(self.specs),
                task_manager=self.manager,
                limit=self.limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=False,
            )
        return scores(out["results"])


def eval_command(args) -> int:
    """``qwen-cpt eval MODEL_DIR --tasks ...``: the scores of a saved folder, by the code the
    training loop runs (:meth:`Downstream._score`), so they equal the run's logged numbers."""
    import json

    from .model import load_model, load_tokenizer, resolve_runtime

    if args.limit is not None and args.limit < 1:
        raise ConfigError([f"--limit: must be >= 1, got {args.limit}"])
    if args.batch_size < 1:
        raise ConfigError([f"--batch-size: must be >= 1, got {args.batch_size}"])
    tasks = Downstream.from_specs(args.tasks, args.limit, args.batch_size)  # before the model
    runtime = resolve_runtime(args.device, False, False, "auto")
    tokenizer = load_tokenizer(args.model_dir)
    model = load_model(args.model_dir, runtime, False, torch.float32).eval()
    with torch.random.fork_rng(devices=[]):
        metrics = tasks._score(model, tokenizer, progress=sys.stderr.isatty())
    for key, v in metrics.items():
        if "_stderr" not in key:
            se = metrics.get(_stderr_key(key))
            print(f"{key[len(PREFIX) :]:40s} {v:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    return 0


def _stderr_key(key: str) -> str:
    """``downstream/t/acc`` -> ``downstream/t/acc_stderr`` (``acc@f`` -> ``acc_stderr@f``)."""
    name, sep, filt = key.partition("@")
    return f"{name}_stderr{sep}{filt}"


def scores(results: dict) -> dict[str, float]:
    """lm-eval's ``results`` (``{task: {"acc,none": 0.5, "acc_stderr,none": 0.1, ...}}``) as
    ``{"downstream/<task>/<metric>": value}``: finite numbers only; the filter name is kept only
    when it is not lm-eval's default ``none`` (``exact_match,strict-match`` ->
    ``exact_match@strict-match``)."""
    out = {}
    for task, values in results.items():
        for key, v in values.items():
            metric, sep, filt = key.partition(",")
            if not sep or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # "alias", "name", "sample_len", an "N/A" stderr
            if math.isfinite(v):
                name = metric if filt in ("", "none") else f"{metric}@{filt}"
                out[f"{PREFIX}{task}/{name}"] = float(v)
    return out


@contextlib.contextmanager
def _no_fork():
    """lm-eval bootstraps in a multiprocessing pool (a fork) unless DISABLE_MULTIPROC is set; a
    fork of a training process with live threads (gloo, NCCL, tokenizers) can hang
    (docs/design.md, "Downstream evaluation")."""
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before


# The lm-eval modules that draw tqdm bars while scoring (building contexts, tokenizing, running
# requests); most of those bars have no switch of their own.
_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """lm-eval's tqdm bars, hidden unless ``shown``: in a log file or a pipe each bar is one
    screen-wide line per evaluation, between the training log's lines."""
    if shown:
        yield
        return
    from tqdm import tqdm

    def hidden(*args, **kwargs):
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    patched = [m for m in map(sys.modules.get, _BAR_MODULES) if getattr(m, "tqdm", None) is tqdm]
    for module in patched:
        module.tqdm = hidden
    try:
        yield
    finally:
        for module in patched:
            module.tqdm = tqdm


@contextlib.contextmanager
def _kept_random_state():
    import numpy as np

    py, nps = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(nps)


def _copy(model, weights: dict, runtime):
    """A plain (unsharded) copy of ``model`` on ``runtime.device`` holding ``weights`` (the whole
    state dict, a tied weight once), in bf16 when the run trains under bf16 autocast."""
    from transformers import AutoModelForCausalLM

    dtype = runtime.autocast_dtype or torch.float32
    with torch.device(runtime.device):
        copy = AutoModelForCausalLM.from_config(model.config, torch_dtype=dtype)
    missing, unexpected = copy.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - _tied_names(copy):
        raise RuntimeError(
            f"downstream: the gathered weights do not fit the model (missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)})"
        )
    copy.tie_weights()
    return copy.eval()


def _tied_names(model) -> set[str]:
    """Names of the parameters that share their tensor with another one (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n for group in names.values() if len(group) > 1 for n in group}
