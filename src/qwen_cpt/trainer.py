"""``CPTTrainer``: the single-device continued-pretraining loop.

Order of work in :meth:`CPTTrainer.train`, chosen so that bad input costs nothing:
config -> data sources -> resume checkpoint -> tokenizer -> tokenized data -> model ->
output_dir. Any error before the last step leaves the disk untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import data as D
from .checkpoint import (
    CheckpointError,
    jsonable_rng,
    latest_valid_checkpoint,
    load_training_state,
    remove_stale_tmp,
    rotate_checkpoints,
    save_model_dir,
    save_training_checkpoint,
    verify,
)
from .config import CPTConfig
from .loss import lm_loss_sum, supports_chunked_loss
from .model import (
    Runtime,
    check_vocab,
    count_parameters,
    enable_activation_checkpointing,
    load_model,
    load_tokenizer,
    resolve_runtime,
)
from .optim import Optimizers, build_optimizers
from .perf import FlopsMeter, compile_decoder_layers
from .schedule import lr_multiplier, warmup_steps_for
from .tracking import Trackers, build_trackers

log = logging.getLogger("qwen_cpt")

# Fields that must not change between a checkpoint and its resume: they fix the data order
# and what a "step" is, so changing them would silently break the exact-resume promise.
GEOMETRY_FIELDS = (
    "max_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "document_aware_packing",
    "seed",
)
ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss); nothing was stepped after it."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT arrived: the step finished, a checkpoint was written, the run stopped.

    The CLI exits with ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, signum: int, checkpoint: Path):
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after saving {checkpoint}; "
            "resume with resume_from_checkpoint=auto"
        )


class ResumeError(TrainingError):
    """The checkpoint cannot be resumed with this config; the message names both values."""


@dataclass
class TrainState:
    step: int = 0
    epoch: float = 0.0
    tokens_seen: int = 0
    loss_sum: float = 0.0  # token-weighted sum of training loss over the run
    loss_tokens: int = 0
    best_eval_loss: float | None = None
    skipped_steps: int = 0

    @property
    def avg_loss(self) -> float:
        return self.loss_sum / max(1, self.loss_tokens)


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines above a live progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Give the library logger a stderr handler unless the application configured logging."""
    if not sys.stderr.isatty():  # transformers' per-save bars would litter CI logs
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    if log.handlers or logging.getLogger().handlers:
        return
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[qwen-cpt %(asctime)s] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class CPTTrainer:
    """Continued pretraining of a Hugging Face causal LM on your text.

    >>> trainer = CPTTrainer(CPTConfig(model_name_or_path="Qwen/Qwen2.5-7B"))
    >>> final_loss = trainer.train(["your text 1", "your text 2"])

    After :meth:`train`, ``trainer.model`` and ``trainer.tokenizer`` hold the trained model, and
    ``output_dir`` holds ``final/``, ``best/`` (lowest eval loss, when eval data is given),
    ``checkpoint-<step>/`` folders, ``config.yaml`` and ``metrics.jsonl``.
    """

    def __init__(self, config: CPTConfig):
        if not isinstance(config, CPTConfig):
            raise TypeError(f"CPTTrainer needs a CPTConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.model = None
        self.tokenizer = None
        self.state = TrainState()
        self._stop_signal: int | None = None
        setup_logging()

    # ------------------------------------------------------------------------------------------
    def train(
        self,
        train_texts: Sequence[str] | None = None,
        eval_texts: Sequence[str] | None = None,
    ) -> float:
        """Train and return the token-weighted average training loss over the run."""
        cfg = self.config.validate()  # fields may have been assigned after construction
        train_texts = _check_texts(train_texts, "train_texts")
        eval_texts = _check_texts(eval_texts, "eval_texts")
        train_specs, eval_specs = D.resolve_sources(cfg, train_texts, eval_texts)
        out = Path(cfg.output_dir)
        _check_writable(out)
        resume_dir = self._find_resume_checkpoint(out)

        runtime = resolve_runtime(cfg.device, cfg.use_bf16, cfg.use_flash_attention)
        seed_everything(cfg.seed)
        tok_path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
        self.tokenizer = load_tokenizer(tok_path, cfg.trust_remote_code)

        local_tok = tok_path if Path(tok_path).is_dir() else None
        data = D.Mixture(
            {
                s.name: D.open_stream(s, self.tokenizer, cfg, local_tok, train=True)
                for s in train_specs
            },
            {s.name: s.weight for s in train_specs},
        )
        try:
            blocks_per_epoch = self._blocks_per_epoch(data)  # reads (and checks) the data
            eval_sets = {
                s.name: D.one_epoch(D.open_stream(s, self.tokenizer, cfg, None, train=False))
                for s in eval_specs
            }
            return self._train_on(data, eval_sets, blocks_per_epoch, runtime, resume_dir, out)
        finally:
            data.close()

    def _train_on(self, data, eval_sets, blocks_per_epoch, runtime, resume_dir, out) -> float:
        cfg = self.config

        self.model = load_model(cfg.model_name_or_path, runtime, cfg.trust_remote_code)
        check_vocab(self.tokenizer, self.model, cfg.model_name_or_path)
        self._resolve_auto(blocks_per_epoch, resume_dir)
        resumed = None
        if resume_dir is not None:
            resumed = self._check_resume(resume_dir, data)
            self._load_weights(resume_dir)
        if cfg.use_gradient_checkpointing:
            enable_activation_checkpointing(self.model, cfg.gradient_checkpointing_every_n_layers)
        if cfg.use_torch_compile:
            compile_decoder_layers(self.model)
        chunked = cfg.use_fused_loss and supports_chunked_loss(self.model)
        if cfg.use_fused_loss and not chunked:
            log.info(
                "loss: plain HF logits (chunked loss supports %s)", self.model.config.model_type
            )
        optimizers = build_optimizers(self.model, cfg)
        if resumed is not None:
            self._restore(resumed, optimizers)
            data.load_state_dict(resumed["state"]["data"]["position"])

        # Only now, with every input checked, does anything touch the disk.
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out)
        if resumed is not None:
            _truncate_metrics(out / "metrics.jsonl", self.state.step)
        cfg.to_yaml(out / "config.yaml")
        trackers = build_trackers(cfg, out)
        try:
            with self._catch_stop_signals():
                return self._loop(
                    runtime, optimizers, trackers, data, eval_sets, blocks_per_epoch, chunked
                )
        finally:
            trackers.close()

    # ------------------------------------------------------------------------------------------
    def _loop(
        self,
        runtime: Runtime,
        optimizers: Optimizers,
        trackers: Trackers,
        data: D.Mixture,
        eval_sets: dict[str, list[D.Block]],
        blocks_per_epoch: int,
        chunked: bool,
    ) -> float:
        cfg, model, st = self.config, self.model, self.state
        out = Path(cfg.output_dir)
        steps_per_epoch = max(
            1,
            math.ceil(
                math.ceil(blocks_per_epoch / cfg.per_device_train_batch_size)
                / cfg.gradient_accumulation_steps
            ),
        )
        total = (
            cfg.max_steps
            if cfg.max_steps > 0
            else math.ceil(steps_per_epoch * cfg.num_train_epochs)
        )
        warmup = warmup_steps_for(total, cfg.warmup_ratio)
        self._log_setup(runtime, data, eval_sets, blocks_per_epoch, total, steps_per_epoch, warmup)
        self._data = data

        def evaluate() -> None:
            if not eval_sets:
                return
            metrics, parts = {}, []
            for name, blocks in eval_sets.items():
                loss_sum, n = self._eval_loss(blocks, runtime, chunked)
                parts.append((loss_sum, n))
                if name not in ("eval", "eval_files") or len(eval_sets) > 1:
                    metrics[f"eval_loss/{name}"] = loss_sum / max(1, n)
                    metrics[f"eval_ppl/{name}"] = math.exp(min(loss_sum / max(1, n), 50.0))
            # the overall eval loss: the general eval set if given, else all sets token-weighted
            overall = [
                p for name, p in zip(eval_sets, parts) if name in ("eval", "eval_files")
            ] or parts
            loss = sum(p[0] for p in overall) / max(1, sum(p[1] for p in overall))
            metrics = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), **metrics}
            per_source = ", ".join(
                f"{k[len('eval_loss/') :]} {v:.4f}"
                for k, v in metrics.items()
                if k.startswith("eval_loss/")
            )
            log.info(
                "eval step %d: loss %.4f, perplexity %.2f%s",
                st.step,
                loss,
                metrics["eval_ppl"],
                f" ({per_source})" if per_source else "",
            )
            trackers.log(metrics, st.step)
            if st.step > 0 and (st.best_eval_loss is None or loss < st.best_eval_loss):
                st.best_eval_loss = loss
                save_model_dir(out / "best", model, self.tokenizer, cfg, asdict(st))
                log.info("best: eval loss %.4f at step %d saved to %s", loss, st.step, out / "best")
            model.train()

        self._start_time = time.perf_counter()
        if st.step == 0:
            trackers.log(optimizers.summary(), 0)
            evaluate()
        bar = _progress(total, st.step)
        window = _Window()
        flops = FlopsMeter(model.config, cfg.max_length, runtime.device, cfg.peak_tflops)
        model.train()
        for epoch, group, epoch_end in self._step_batches(data, total, steps_per_epoch):
            # 1) this step's learning rate: a pure function of the step (resume needs no state)
            mult = lr_multiplier(
                st.step, total, warmup, cfg.lr_scheduler_type, cfg.min_lr_ratio, cfg.wsd_decay_ratio
            )
            for opt in optimizers.optimizers.values():
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * mult
            # 2) forward/backward every micro-batch, each weighted by its share of the step's
            #    tokens, so the loss does not depend on how the step is split (trl #2175)
            n_tokens = sum(D.count_loss_tokens(b) for b in group)
            step_loss = 0.0
            for batch in group:
                batch = {k: v.to(runtime.device, non_blocking=True) for k, v in batch.items()}
                with runtime.autocast:
                    loss_sum = lm_loss_sum(model, batch, chunked, cfg.loss_chunk_size)
                if loss_sum.requires_grad:
                    (loss_sum / max(1, n_tokens)).backward()
                step_loss += loss_sum.item()
            step_loss /= max(1, n_tokens)
            # 3) clip, check, step: a non-finite value never reaches the weights
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            ).item()
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if finite:
                optimizers.step()
            else:
                self._handle_non_finite(step_loss, grad_norm)
            optimizers.zero_grad()
            st.step += 1
            st.epoch = epoch
            step_tokens = sum(int(b["input_ids"].numel()) for b in group)
            st.tokens_seen += step_tokens
            if finite:
                st.loss_sum += step_loss * n_tokens
                st.loss_tokens += n_tokens
                window.add(step_loss, n_tokens, step_tokens)
            bar.update(1)
            # 4) log, evaluate, save, and honour a stop signal at this step boundary
            if st.step % cfg.logging_steps == 0 or st.step == total:
                tok_s = window.tokens_per_sec
                metrics = {
                    "epoch": round(st.epoch, 4),
                    "loss": window.loss,
                    "avg_loss": st.avg_loss,
                    "lr": cfg_lr(cfg) * mult,
                    "grad_norm": grad_norm,
                    "tokens_per_sec": tok_s,
                    **flops.metrics(tok_s),
                    "tokens_seen": st.tokens_seen,
                    "memory_gb": memory_gb(runtime.device),
                }
                if len(data.streams) > 1:  # achieved token shares of the mixture so far
                    metrics.update(
                        {f"data_share/{k}": v for k, v in data.achieved_shares().items()}
                    )
                trackers.log(metrics, st.step)
                _log_line(bar, st.step, total, metrics)
                window = _Window()
            if st.step % cfg.eval_steps == 0 and st.step != total:
                evaluate()
            if (cfg.save_steps and st.step % cfg.save_steps == 0) or (
                epoch_end and st.step != total
            ):
                self._save_checkpoint(out, optimizers)
            if self._stop_signal is not None:
                bar.close()
                path = self._save_checkpoint(out, optimizers)
                log.warning(
                    "%s received: step %d finished and saved to %s; exiting",
                    signal.Signals(self._stop_signal).name,
                    st.step,
                    path,
                )
                raise TrainingInterrupted(self._stop_signal, path)
        bar.close()
        evaluate()
        self._save_checkpoint(out, optimizers)
        save_model_dir(out / "final", model, self.tokenizer, cfg, asdict(st))
        trackers.log({"train_runtime_s": time.perf_counter() - self._start_time}, st.step)
        if len(data.streams) > 1:
            log.info(
                "data mix achieved: %s",
                ", ".join(
                    f"{k} {v:.2%} (target {data.shares[k]:.2%})"
                    for k, v in data.achieved_shares().items()
                ),
            )
        skipped = sum(getattr(s.source, "skipped", 0) for s in data.streams.values())
        if skipped:
            log.warning("skip_bad_records: skipped %d malformed records", skipped)
        _write_report(out)
        log.info(
            "done: %d steps, %s tokens, average loss %.4f; final model in %s",
            st.step,
            f"{st.tokens_seen:,}",
            st.avg_loss,
            out / "final",
        )
        return st.avg_loss

    def _handle_non_finite(self, loss: float, grad_norm: float) -> None:
        st, cfg = self.state, self.config
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        where = f"step {st.step + 1}" + (
            f" on rank {os.environ['RANK']}" if "RANK" in os.environ else ""
        )
        if cfg.nan_policy == "skip" and st.skipped_steps < cfg.max_skipped_steps:
            st.skipped_steps += 1
            log.warning(
                "non-finite %s at %s (loss=%s, grad_norm=%s): update skipped (%d of at most %d)",
                what,
                where,
                loss,
                grad_norm,
                st.skipped_steps,
                cfg.max_skipped_steps,
            )
            return
        extra = f" after {st.skipped_steps} skipped steps" if cfg.nan_policy == "skip" else ""
        raise TrainingError(
            f"non-finite {what} at {where} (loss={loss}, grad_norm={grad_norm}){extra}; stopped "
            "before the optimizer step, so the last checkpoint is clean. Lower learning_rate or "
            "check the data; nan_policy=skip drops such steps instead."
        )

    # --- data ----------------------------------------------------------------------------------
    def _resolve_auto(self, blocks_per_epoch: int, resume_dir: Path | None) -> None:
        """Replace ``auto`` learning rate / batch fields with the planner's values, logged.

        A resume takes them from the checkpoint's config instead, so the run keeps its geometry
        even if free memory changed.
        """
        from .config import AUTO

        cfg = self.config
        if resume_dir is not None:
            saved = CPTConfig.from_yaml(resume_dir / "config.yaml")
            for name in (
                "learning_rate",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
            ):
                if getattr(cfg, name) == AUTO:
                    setattr(cfg, name, getattr(saved, name))
                    log.info("%s: auto -> %s (from %s)", name, getattr(saved, name), resume_dir)
            return
        from .planner import resolve_auto

        chosen = resolve_auto(cfg, self.model, blocks_per_epoch * cfg.max_length)
        for name, (value, rule) in chosen.items():
            setattr(cfg, name, value)
            log.info("%s: auto -> %s (%s)", name, value, rule)
        if chosen:
            cfg.validate()

    def _blocks_per_epoch(self, data: D.Mixture) -> int:
        """Training blocks in one epoch of the first source, scaled up by the others' share.

        In-memory texts, caches and files up to 16 MB are counted exactly by reading them once,
        which also checks every record before the model loads. Larger inputs are estimated from
        file sizes and a 1 MB sample; set max_steps to fix the length of such a run exactly.
        """
        primary = data.primary
        if not hasattr(primary, "estimate_blocks") or primary.source.total_bytes() <= 16 << 20:
            n = primary.count_blocks()
        else:
            n = primary.estimate_blocks()
            log.info(
                "data: about %s blocks per epoch in %s (estimated from file sizes; set max_steps "
                "for an exact run length)",
                f"{n:,}",
                primary.name,
            )
        for stream in data.streams.values():  # the first records of every source must be usable
            initial = stream.state_dict()
            stream.next_block()
            stream.load_state_dict(initial)
        return max(1, math.ceil(n / data.shares[primary.name]))

    def _step_batches(
        self, data: D.Mixture, total: int, steps_per_epoch: int
    ) -> Iterator[tuple[float, list[dict], bool]]:
        """Yield ``(epoch, micro-batches, epoch_ended)`` for each optimizer step from ``state.step``.

        The blocks come from the data streams, whose small state (saved in checkpoints) is the
        exact data position: a resume continues with the very next block, without replaying
        earlier batches (HF Trainer's replay took 28 h in transformers #18649).
        """
        cfg = self.config
        bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        for step in range(self.state.step, total):
            group = [D.collate([data.next_block() for _ in range(bs)]) for _ in range(accum)]
            yield (step + 1) / steps_per_epoch, group, (step + 1) % steps_per_epoch == 0

    @torch.no_grad()
    def _eval_loss(
        self, blocks: list[D.Block], runtime: Runtime, chunked: bool
    ) -> tuple[float, int]:
        """(summed token loss, tokens) over ``blocks``."""
        model, bs = self.model, self.config.per_device_eval_batch_size
        model.eval()
        total, n = 0.0, 0
        from tqdm.auto import tqdm

        starts = range(0, len(blocks), bs)
        for i in tqdm(
            starts, desc="eval", unit="batch", leave=False, disable=not sys.stderr.isatty()
        ):
            batch = D.collate(blocks[i : i + bs])
            n += D.count_loss_tokens(batch)
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            with runtime.autocast:
                total += lm_loss_sum(model, batch, chunked, self.config.loss_chunk_size).item()
        return total, n

    # --- checkpoints and resume ----------------------------------------------------------------
    def _save_checkpoint(self, out: Path, optimizers: Optimizers) -> Path:
        path = out / f"checkpoint-{self.state.step}"
        if path.exists() and verify(path, checksums=False) is None:
            return path
        cfg = self.config
        state = {
            **asdict(self.state),
            "data": {"position": self._data.state_dict(), "fingerprint": self._data.identity()},
            "geometry": {k: getattr(cfg, k) for k in GEOMETRY_FIELDS},
            "rng": jsonable_rng(random.getstate(), _numpy_rng_state()),
        }
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_training_checkpoint(
            path, self.model, self.tokenizer, cfg, state, optimizers.state_dict(), rng
        )
        rotate_checkpoints(out, cfg.save_total_limit, keep=path)
        log.info("saved %s", path)
        return path

    def _find_resume_checkpoint(self, out: Path) -> Path | None:
        spec = self.config.resume_from_checkpoint
        if spec is None:
            return None
        if spec == "auto":
            path = latest_valid_checkpoint(out)
            if path is None:
                log.info(
                    "resume_from_checkpoint=auto: no valid checkpoint in %s; starting fresh", out
                )
            return path
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"resume_from_checkpoint: {spec!r} is not a directory")
        problem = verify(path)
        if problem:
            raise CheckpointError(f"resume_from_checkpoint: {spec!r} is not usable: {problem}")
        return path

    def _check_resume(self, path: Path, data: D.Mixture) -> dict:
        """Refuse, before training, a resume that could not continue the same run exactly."""
        cfg = self.config
        state, optim_state, rng = load_training_state(path)
        problems = []
        for key, saved in state["geometry"].items():
            if getattr(cfg, key) != saved:
                problems.append(
                    f"{key}: the checkpoint has {saved!r}, this run has {getattr(cfg, key)!r}"
                )
        saved_arch = json.loads((path / "config.json").read_text(encoding="utf-8"))
        current = self.model.config.to_dict()
        for key in ARCH_FIELDS:
            if key in saved_arch and saved_arch.get(key) != current.get(key):
                problems.append(
                    f"model {key}: the checkpoint has {saved_arch.get(key)!r}, "
                    f"{cfg.model_name_or_path} has {current.get(key)!r}"
                )
        fingerprint = data.identity()
        if state["data"]["fingerprint"] != fingerprint:
            problems.append(
                f"training data: the checkpoint was trained on data with fingerprint "
                f"{state['data']['fingerprint']}, this run's data has {fingerprint}"
            )
        if problems:
            raise ResumeError(
                f"cannot resume exactly from {path}:\n  - "
                + "\n  - ".join(problems)
                + "\nTo continue with new settings, start a new run with model_name_or_path "
                f"set to {path}."
            )
        log.info("resuming from %s at step %d", path, state["step"])
        return {"state": state, "optimizer": optim_state, "rng": rng, "path": path}

    def _load_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            if f.name != "rng_state.safetensors":
                tensors.update(load_file(str(f)))
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        tied = (
            {k for k in missing if k.endswith("lm_head.weight")}
            if self.model.config.tie_word_embeddings
            else set()
        )
        if set(missing) - tied or unexpected:
            raise ResumeError(
                f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )

    def _restore(self, resumed: dict, optimizers: Optimizers) -> None:
        state = resumed["state"]
        fields = {k: state[k] for k in asdict(TrainState()) if k in state}
        self.state = TrainState(**fields)
        optimizers.load_state_dict(resumed["optimizer"])
        rng = state["rng"]
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "numpy" in rng:
            import numpy as np

            n = rng["numpy"]
            np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        torch.set_rng_state(resumed["rng"]["torch"])
        if torch.cuda.is_available():
            states = [resumed["rng"][k] for k in sorted(resumed["rng"]) if k.startswith("cuda")]
            if states:
                torch.cuda.set_rng_state_all(states)

    @contextlib.contextmanager
    def _catch_stop_signals(self):
        """SIGTERM/SIGINT: finish the current step, save, then stop (Megatron's behaviour).

        A second SIGINT stops at once.
        """
        if (
            threading.current_thread() is not threading.main_thread()
        ):  # signals need the main thread
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning(
                "%s received: finishing this step, then saving", signal.Signals(signum).name
            )

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _log_setup(
        self, runtime, data, eval_sets, blocks_per_epoch, total, steps_per_epoch, warmup
    ) -> None:
        cfg = self.config
        total_params, non_emb = count_parameters(self.model)
        log.info(
            "model: %s (%s parameters, %s non-embedding) on %s, %s",
            cfg.model_name_or_path,
            f"{total_params:,}",
            f"{non_emb:,}",
            runtime.device,
            str(runtime.autocast_dtype).replace("torch.", "autocast ")
            if runtime.autocast_dtype
            else "fp32",
        )
        log.info(
            "data: %s blocks of %d tokens per epoch (%s), eval sets %s; %d steps (%d per epoch, "
            "%d warmup), global batch %d x %d tokens",
            f"{blocks_per_epoch:,}",
            cfg.max_length,
            ", ".join(f"{k} {v:.0%}" for k, v in data.shares.items()),
            {k: len(v) for k, v in eval_sets.items()} or "none",
            total,
            steps_per_epoch,
            warmup,
            cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
            cfg.max_length,
        )


# --- helpers ---------------------------------------------------------------------------------------


def cfg_lr(cfg: CPTConfig) -> float:
    return float(cfg.learning_rate)


class _Window:
    """Loss and throughput over the steps since the last log line."""

    def __init__(self):
        self.loss_sum, self.loss_tokens, self.tokens = 0.0, 0, 0
        self.start = time.perf_counter()

    def add(self, loss: float, loss_tokens: int, tokens: int) -> None:
        self.loss_sum += loss * loss_tokens
        self.loss_tokens += loss_tokens
        self.tokens += tokens

    @property
    def loss(self) -> float:
        return self.loss_sum / self.loss_tokens if self.loss_tokens else float("nan")

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


def _write_report(out: Path) -> None:
    """The run's report.html; a finished run never fails on its report."""
    try:
        from .report import write_report

        log.info("report: %s", write_report([out]))
    except Exception as exc:
        log.warning("could not write report.html: %s", exc)


def _numpy_rng_state():
    try:
        import numpy as np
    except ImportError:
        return None
    return np.random.get_state()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records a crashed run logged after the checkpoint we resume from."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by the crash
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _check_texts(texts, what: str) -> list[str] | None:
    if texts is None:
        return None
    if isinstance(texts, str):
        raise D.DataError(f"{what}: expected a list of texts, got a single string")
    if type(texts).__module__.startswith("datasets"):  # a datasets (Iterable)Dataset streams as is
        return texts
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise D.DataError(f"{what}[{i}]: expected a string, got {type(t).__name__}")
    if what == "train_texts" and not any(t.strip() for t in texts):
        raise D.DataError(f"{what}: the list is empty or holds only blank texts")
    return texts


def _check_writable(out: Path) -> None:
    """Fail before training if ``out`` cannot be created or written (without creating it)."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OSError(f"output_dir: {str(probe)!r} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"output_dir: {str(out)!r} is not writable (checked {str(probe)!r})")


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="training",
        unit="step",
        dynamic_ncols=True,
        disable=not sys.stderr.isatty(),
    )


def _log_line(bar, step: int, total: int, m: dict) -> None:
    bar.set_postfix(
        loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_sec']:.0f}"
    )
    line = (
        f"step {step}/{total} | epoch {m['epoch']:.2f} | loss {m['loss']:.4f} | "
        f"avg {m['avg_loss']:.4f} | lr {m['lr']:.3e} | grad_norm {m['grad_norm']:.3f} | "
        f"{m['tokens_per_sec']:.0f} tok/s | mem {m['memory_gb']:.2f} GB"
    )
    if "tflops" in m:
        line += f" | {m['tflops']:.3g} TFLOP/s" + (f" (MFU {m['mfu']:.1%})" if "mfu" in m else "")
    if bar.disable:
        log.info(line)
    else:
        bar.write(line)
