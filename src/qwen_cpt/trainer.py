"""``CPTTrainer``: the continued-pretraining loop, on one device or on many under torchrun.

Order of work in :meth:`CPTTrainer.train`, chosen so that bad input costs nothing:
config -> data sources -> resume checkpoint -> tokenizer -> tokenized data -> model ->
output_dir. Any error before the last step leaves the disk untouched.

Under torchrun (``WORLD_SIZE > 1``) or with ``fsdp_cpu_offload`` the same loop runs on FSDP2
shards (:mod:`qwen_cpt.distributed`): every rank reads the same data stream and trains on its
own slice of each global batch, the loss and stop signals are summed over ranks, and only rank
0 writes logs, metrics and the small checkpoint files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from .autotune import choose_kernels
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
    write_run_files,
)
from .config import CPTConfig
from .distributed import (
    DistContext,
    clip_grad_norm,
    full_state_dict,
    init_distributed,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    shard_model,
)
from .kernels import enable_liger
from .loss import lm_loss_sum, supports_chunked_loss
from .model import (
    ModelLoadError,
    Runtime,
    build_model_skeleton,
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

# What a checkpoint records of the run's layout. A resume must keep the fields that fix the
# blocks and their order (max_length, packing, seed) and the global batch, which fixes what a
# step is: per_device_train_batch_size x gradient_accumulation_steps x processes blocks, the
# next ones of the stream. How the global batch is split over processes and micro-batches may
# change: the step's token-weighted loss does not depend on the split.
GEOMETRY_FIELDS = (
    "max_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "document_aware_packing",
    "seed",
)
FIXED_FIELDS = ("max_length", "document_aware_packing", "seed")
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
    ``checkpoint-<step>/`` folders, ``config.yaml`` and ``metrics.jsonl``. After a sharded run
    (torchrun or ``fsdp_cpu_offload``) ``trainer.model`` holds this rank's FSDP2 shards only;
    load ``final/`` with ``from_pretrained`` to use the whole model.
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
        self._dist: DistContext | None = None
        self._root = None  # the FSDP2 root (model + loss) when sharded
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
        if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 logs (or warns)
            log.setLevel(logging.WARNING)
        runtime = resolve_runtime(
            cfg.device, cfg.use_bf16, cfg.use_flash_attention, cfg.attention_implementation
        )
        self._dist = init_distributed(
            runtime.device, cfg.fsdp_cpu_offload, cfg.distributed_timeout_minutes
        )
        try:
            return self._prepare_and_train(train_specs, eval_specs, out, runtime)
        finally:
            if self._dist is not None:
                self._dist.close()

    def _prepare_and_train(self, train_specs, eval_specs, out, runtime) -> float:
        cfg = self.config
        if self._dist is not None:
            runtime = dataclasses.replace(runtime, device=self._dist.device)
            log.info(
                "distributed: %d ranks (FSDP2%s), this is rank %d on %s",
                self._dist.world_size,
                ", CPU offload" if cfg.fsdp_cpu_offload else "",
                self._dist.rank,
                runtime.device,
            )
        resume_dir = self._on_main(lambda: self._find_resume_checkpoint(out))
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
        cfg, ctx = self.config, self._dist

        if ctx is None:
            self.model = load_model(cfg.model_name_or_path, runtime, cfg.trust_remote_code)
        else:  # rank 0 loads on the CPU in the checkpoint's dtype, the others build on meta;
            # shard_model then gives every rank its fp32 shards on the device
            self.model = self._load_on_main(runtime)
        check_vocab(self.tokenizer, self.model, cfg.model_name_or_path)
        self._resolve_auto(blocks_per_epoch, resume_dir, runtime)
        resumed = None
        if resume_dir is not None:
            resumed = self._check_resume(resume_dir, data)
            if ctx is None:
                self._load_weights(resume_dir)
        # Liger's kernels (CUDA, when installed and checked) before checkpointing and compile wrap
        fused_ce = enable_liger(self.model, runtime.device) if cfg.use_liger_kernel else None
        if ctx is not None and not ctx.all_ok(fused_ce is not None):
            fused_ce = None  # one loss on every rank
        if cfg.use_gradient_checkpointing:
            enable_activation_checkpointing(self.model, cfg.gradient_checkpointing_every_n_layers)
        # attention and compile: as configured, or measured on this GPU (qwen_cpt.autotune)
        _, use_compile = choose_kernels(
            self.model, cfg, runtime, lambda: self._first_position_ids(data), ctx
        )
        if use_compile:
            compile_decoder_layers(self.model)
        chunked = cfg.use_fused_loss and supports_chunked_loss(self.model)
        if cfg.use_fused_loss and not chunked:
            log.info(
                "loss: plain HF logits (chunked loss supports %s)", self.model.config.model_type
            )
        self._chunked = chunked  # what _loss_sum runs when not sharded
        self._sync_every = ctx is not None and self._choose_gradient_sync(runtime)
        self._fused_ce = fused_ce if chunked else None
        if ctx is not None:
            self._root = shard_model(
                self.model,
                functools.partial(
                    lm_loss_sum,
                    chunked=chunked,
                    chunk_size=cfg.loss_chunk_size,
                    fused_ce=self._fused_ce,
                ),
                ctx,
                bf16_params=runtime.device.type == "cuda" and runtime.autocast_dtype is not None,
                cpu_offload=cfg.fsdp_cpu_offload,
            )
        optimizers = build_optimizers(
            self.model, cfg, sharded=ctx is not None, ns_device=runtime.device
        )
        if resumed is not None:
            self._restore(resumed, optimizers)
            data.load_state_dict(resumed["state"]["data"]["position"])

        # Only now, with every input checked, does anything touch the disk.
        def prepare_output_dir() -> None:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(out)
            if resumed is not None:
                _truncate_metrics(out / "metrics.jsonl", self.state.step)
            cfg.to_yaml(out / "config.yaml")

        self._on_main(prepare_output_dir)
        trackers = build_trackers(cfg, out) if self._is_main else Trackers([])
        try:
            with self._catch_stop_signals():
                return self._loop(runtime, optimizers, trackers, data, eval_sets, blocks_per_epoch)
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
    ) -> float:
        cfg, model, st = self.config, self.model, self.state
        out = Path(cfg.output_dir)
        world = self._world_size
        steps_per_epoch = max(
            1,
            math.ceil(
                math.ceil(blocks_per_epoch / (cfg.per_device_train_batch_size * world))
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
                loss_sum, n = self._eval_loss(blocks, runtime)
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
                self._save_model(out / "best")
                log.info("best: eval loss %.4f at step %d saved to %s", loss, st.step, out / "best")
            model.train()

        self._start_time = time.perf_counter()
        if st.step == 0:
            trackers.log(optimizers.summary(), 0)
            evaluate()
        bar = _progress(total, st.step, enabled=self._is_main)
        window = _Window()
        flops = FlopsMeter(model.config, cfg.max_length, runtime.device, cfg.peak_tflops)
        model.train()
        for epoch, group, epoch_end, n_tokens, step_tokens in self._step_batches(
            data, total, steps_per_epoch
        ):
            # 1) this step's learning rate: a pure function of the step (resume needs no state)
            mult = lr_multiplier(
                st.step, total, warmup, cfg.lr_scheduler_type, cfg.min_lr_ratio, cfg.wsd_decay_ratio
            )
            for opt in optimizers.optimizers.values():
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * mult
            # 2) forward/backward every micro-batch, each weighted by its share of the step's
            #    tokens (over all ranks), so the loss does not depend on how the step is split
            #    (trl #2175). FSDP2 averages gradients over ranks, hence the factor `world`.
            step_loss = 0.0
            for i, batch in enumerate(group):
                batch = {k: v.to(runtime.device, non_blocking=True) for k, v in batch.items()}
                if self._root is not None:
                    # reduce-scatter on the last micro-batch only; until then each rank holds
                    # unsharded fp32 gradients, which CPU offload has no GPU room for
                    self._root.set_requires_gradient_sync(self._sync_every or i == len(group) - 1)
                with runtime.autocast:
                    loss_sum = self._loss_sum(batch)
                if loss_sum.requires_grad:
                    (loss_sum * (world / max(1, n_tokens))).backward()
                step_loss += loss_sum.item()
            stop = self._stop_signal is not None
            if self._dist is not None:  # one sum: every rank sees a NaN or a stop of any rank
                step_loss, stopping_ranks = self._dist.sum([step_loss, float(stop)])
                stop = stopping_ranks > 0
            step_loss /= max(1, n_tokens)
            # 3) clip, check, step: a non-finite value never reaches the weights
            grad_norm = clip_grad_norm(
                list(model.parameters()),
                cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"),
            )
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if finite:
                optimizers.step()
            else:
                self._handle_non_finite(step_loss, grad_norm)
            optimizers.zero_grad()
            st.step += 1
            st.epoch = epoch
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
                    **({"tokens_per_sec_per_device": tok_s / world} if world > 1 else {}),
                    **flops.metrics(tok_s / world),
                    "tokens_seen": st.tokens_seen,
                    "memory_gb": self._peak_memory_gb(runtime.device),
                }
                if len(data.streams) > 1:  # achieved token shares of the mixture so far
                    metrics.update(
                        {f"data_share/{k}": v for k, v in data.achieved_shares().items()}
                    )
                trackers.log(metrics, st.step)
                _log_line(bar, st.step, total, metrics)
                window = _Window()
            # evaluation and saving are not training: tokens_per_sec (and MFU) leave them out
            if st.step % cfg.eval_steps == 0 and st.step != total:
                with window.paused():
                    evaluate()
            if (cfg.save_steps and st.step % cfg.save_steps == 0) or (
                epoch_end and st.step != total
            ):
                with window.paused():
                    self._save_checkpoint(out, optimizers)
            if stop:
                bar.close()
                path = self._save_checkpoint(out, optimizers)
                signum = self._stop_signal or signal.SIGTERM  # another rank's signal
                log.warning(
                    "%s received%s: step %d finished and saved to %s; exiting",
                    signal.Signals(signum).name,
                    "" if self._stop_signal else " by another rank",
                    st.step,
                    path,
                )
                raise TrainingInterrupted(signum, path)
        bar.close()
        evaluate()
        self._save_checkpoint(out, optimizers)
        self._save_model(out / "final")
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
        if skipped and self._is_main:
            log.warning("skip_bad_records: skipped %d malformed records", skipped)
        if self._is_main:
            _write_report(out)
        log.info(
            "done: %d steps, %s tokens, average loss %.4f; final model in %s",
            st.step,
            f"{st.tokens_seen:,}",
            st.avg_loss,
            out / "final",
        )
        return st.avg_loss

    # --- one process or many -------------------------------------------------------------------
    def _load_on_main(self, runtime: Runtime):
        cfg, ctx = self.config, self._dist
        model, error = None, None
        try:
            if ctx.is_main:
                cpu = dataclasses.replace(runtime, device=torch.device("cpu"))
                model = load_model(cfg.model_name_or_path, cpu, cfg.trust_remote_code, "auto")
            else:
                model = build_model_skeleton(cfg.model_name_or_path, runtime, cfg.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, then raise
            error = exc
        ctx.raise_unless_all_ok(error, f"loading {cfg.model_name_or_path}", ModelLoadError)
        return model

    @property
    def _world_size(self) -> int:
        return self._dist.world_size if self._dist else 1

    @property
    def _is_main(self) -> bool:
        return self._dist is None or self._dist.is_main

    def _on_main(self, fn):
        """``fn()`` on rank 0 (file system work), its result or exception on every rank."""
        return fn() if self._dist is None else self._dist.on_main(fn)

    def _choose_gradient_sync(self, runtime: Runtime) -> bool:
        """True: reduce-scatter after every micro-batch; False: on the last one only."""
        cfg = self.config
        if cfg.gradient_accumulation_steps == 1:
            return False
        if cfg.fsdp_cpu_offload:
            sync, why = True, "after every micro-batch (fsdp_cpu_offload)"
        elif cfg.fsdp_sync_every_micro_batch is not None:
            sync = cfg.fsdp_sync_every_micro_batch
            why = f"{'after every' if sync else 'on the last'} micro-batch (config)"
        elif runtime.device.type != "cuda":
            sync, why = False, "on the last micro-batch only"
        else:
            from .planner import sync_every_micro_batch

            sync, why = self._on_main(
                lambda: sync_every_micro_batch(
                    self.config,
                    self.model,
                    self._world_size,
                    _device_memory_gb(runtime.device),
                )
            )
        log.info("gradients: reduce-scattered %s", why)
        return sync

    def _peak_memory_gb(self, device: torch.device) -> float:
        """This process's memory, or the largest over the ranks (the one closest to OOM)."""
        gb = memory_gb(device)
        return gb if self._dist is None else self._dist.max([gb])[0]

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._root is not None:  # through the FSDP2 root, which gathers its parameters
            return self._root(batch)
        return lm_loss_sum(
            self.model, batch, self._chunked, self.config.loss_chunk_size, self._fused_ce
        )

    def _handle_non_finite(self, loss: float, grad_norm: float) -> None:
        st, cfg = self.state, self.config
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        where = f"step {st.step + 1}" + (
            f" (summed over all {self._world_size} ranks; every rank stops here)"
            if self._dist is not None
            else ""
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
    def _resolve_auto(self, blocks_per_epoch: int, resume_dir: Path | None, runtime) -> None:
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

        # on rank 0 (which holds the real weights), for the device that will train
        chosen = self._on_main(
            lambda: resolve_auto(
                cfg,
                self.model,
                blocks_per_epoch * cfg.max_length,
                world_size=self._world_size,
                device_memory_gb=_device_memory_gb(runtime.device),
                device=runtime.device.type,
            )
        )
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

    def _first_position_ids(self, data: D.Mixture) -> torch.Tensor:
        """``position_ids`` of the first micro-batch a rank trains on (the data position is
        put back): the document boundaries the attention choice is measured with."""
        state = data.state_dict()
        blocks = [data.next_block() for _ in range(self.config.per_device_train_batch_size)]
        data.load_state_dict(state)
        return D.collate(blocks)["position_ids"]

    def _step_batches(
        self, data: D.Mixture, total: int, steps_per_epoch: int
    ) -> Iterator[tuple[float, list[dict], bool, int, int]]:
        """For each optimizer step from ``state.step``, yield ``(epoch, this rank's
        micro-batches, epoch_ended, loss tokens in the global step, tokens in the global step)``.

        The blocks come from the data streams, whose small state (saved in checkpoints) is the
        exact data position: a resume continues with the very next block, without replaying
        earlier batches (HF Trainer's replay took 28 h in transformers #18649). With several
        ranks, every rank draws each global micro-batch (``world x batch`` blocks) and keeps
        its own disjoint slice, so the position is one global value, and the run sees the same
        blocks in the same steps as one process with a ``world`` times larger batch.
        """
        cfg = self.config
        bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        world, rank = self._world_size, self._dist.rank if self._dist else 0
        for step in range(self.state.step, total):
            group, n_loss, n_all = [], 0, 0
            for _ in range(accum):
                micro = D.collate([data.next_block() for _ in range(bs * world)])
                n_loss += D.count_loss_tokens(micro)
                n_all += micro["input_ids"].numel()
                group.append({k: v[rank * bs : (rank + 1) * bs] for k, v in micro.items()})
            epoch_end = (step + 1) % steps_per_epoch == 0
            yield (step + 1) / steps_per_epoch, group, epoch_end, n_loss, n_all

    @torch.no_grad()
    def _eval_loss(self, blocks: list[D.Block], runtime: Runtime) -> tuple[float, int]:
        """(summed token loss, tokens) over ``blocks``, split over the ranks when sharded.

        Every rank runs the same number of forward passes (FSDP2 gathers parameters in each):
        a rank whose share ran out repeats a block and does not count it.
        """
        bs, world = self.config.per_device_eval_batch_size, self._world_size
        mine = blocks[self._dist.rank :: world] if self._dist else blocks
        n_batches = math.ceil(math.ceil(len(blocks) / world) / bs)
        self.model.eval()
        total, n = 0.0, 0
        from tqdm.auto import tqdm

        for i in tqdm(
            range(n_batches),
            desc="eval",
            unit="batch",
            leave=False,
            disable=not (sys.stderr.isatty() and self._is_main),
        ):
            part = mine[i * bs : (i + 1) * bs]
            batch = D.collate(part or blocks[:1])
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            with runtime.autocast:
                loss = self._loss_sum(batch).item()
            if part:
                total += loss
                n += D.count_loss_tokens(batch)
        if self._dist is not None:
            total, n = self._dist.sum([total, n])
        return total, int(n)

    # --- checkpoints and resume ----------------------------------------------------------------
    def _save_checkpoint(self, out: Path, optimizers: Optimizers) -> Path:
        path = out / f"checkpoint-{self.state.step}"
        if self._on_main(lambda: path.exists() and verify(path, checksums=False) is None):
            return path
        cfg = self.config
        state = {
            **asdict(self.state),
            "data": {"position": self._data.state_dict(), "fingerprint": self._data.identity()},
            "geometry": {**{k: getattr(cfg, k) for k in GEOMETRY_FIELDS}, **self._layout()},
            "rng": jsonable_rng(random.getstate(), _numpy_rng_state()),
        }
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            devices = (
                [self._dist.device.index]
                if self._dist and self._dist.device.type == "cuda"
                else range(torch.cuda.device_count())
            )
            for i in devices:
                rng[f"cuda{i}"] = torch.cuda.get_rng_state(i)
        if self._dist is None:
            save_training_checkpoint(
                path, self.model, self.tokenizer, cfg, state, optimizers.state_dict(), rng
            )
        else:

            def write_main_files(tmp: Path) -> None:
                self.model.config.save_pretrained(tmp)  # for the architecture check on resume
                write_run_files(tmp, self.tokenizer, cfg, state)

            save_sharded_checkpoint(
                path, self._dist, self.model, optimizers.optimizers, rng, write_main_files
            )
        self._on_main(lambda: rotate_checkpoints(out, cfg.save_total_limit, keep=path))
        log.info("saved %s", path)
        return path

    def _save_model(self, target: Path) -> None:
        """An HF-format model folder; sharded weights are gathered to rank 0 first."""
        cfg, state = self.config, asdict(self.state)
        if self._dist is None:
            save_model_dir(target, self.model, self.tokenizer, cfg, state)
            return
        weights = full_state_dict(self.model)
        self._on_main(
            lambda: save_model_dir(target, self.model, self.tokenizer, cfg, state, weights)
        )

    def _layout(self) -> dict:
        """How the run is laid out; a checkpoint resumes only into the same layout."""
        return {"world_size": self._world_size, "sharded": self._dist is not None}

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
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        problems = []
        current = {**{k: getattr(cfg, k) for k in GEOMETRY_FIELDS}, **self._layout()}
        saved_geometry = {"world_size": 1, "sharded": False, **state["geometry"]}
        for key in FIXED_FIELDS:
            if current[key] != saved_geometry[key]:
                problems.append(
                    f"{key}: the checkpoint has {saved_geometry[key]!r}, "
                    f"this run has {current[key]!r}"
                )
        split = [_global_batch(saved_geometry), _global_batch(current)]
        if split[0][1] != split[1][1]:
            problems.append(
                "global batch (per_device_train_batch_size x gradient_accumulation_steps x "
                f"processes): the checkpoint has {split[0][0]}, this run has {split[1][0]}"
            )
        if saved_geometry["sharded"] != current["sharded"]:
            kinds = {True: "sharded (FSDP2/DCP)", False: "single-process"}
            problems.append(
                f"checkpoint format: the checkpoint is {kinds[saved_geometry['sharded']]}, "
                f"this run is {kinds[current['sharded']]} (fsdp_cpu_offload or torchrun decide)"
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
                + (
                    f"set to the final/ (or best/) folder of that run: a sharded checkpoint "
                    f"such as {path} holds no Hugging Face weights."
                    if saved_geometry["sharded"]
                    else f"set to {path}."
                )
            )
        log.info("resuming from %s at step %d", path, state["step"])
        if split[0][0] != split[1][0]:
            log.info(
                "global batch split as %s (the checkpoint: %s): the same blocks per step",
                split[1][0],
                split[0][0],
            )
        return {"state": state, "path": path}

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
        if self._dist is None:
            _, optim_state, torch_rng = load_training_state(resumed["path"])
            optimizers.load_state_dict(optim_state)
        else:
            torch_rng = load_sharded_checkpoint(
                resumed["path"], self._dist, self.model, optimizers.optimizers
            )
        rng = state["rng"]
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "numpy" in rng:
            import numpy as np

            n = rng["numpy"]
            np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        torch.set_rng_state(torch_rng["torch"])
        for key, value in torch_rng.items():
            index = int(key[4:]) if key.startswith("cuda") else None
            if index is not None and index < torch.cuda.device_count():
                torch.cuda.set_rng_state(value, index)

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
        raw = [name for name, s in data.streams.items() if isinstance(s, D.BlockStream)]
        if self._world_size > 1 and raw:
            log.info(
                "data: each of the %d ranks reads the whole stream and keeps its slice, so %s "
                "is tokenized on every rank; `qwen-cpt prepare` tokenizes it once into a cache",
                self._world_size,
                ", ".join(raw),
            )
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
            cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self._world_size,
            cfg.max_length,
        )


# --- helpers ---------------------------------------------------------------------------------------


def _device_memory_gb(device: torch.device) -> float | None:
    """The GPU's total memory in GiB (None on a CPU: the planner then reads free RAM)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def _global_batch(geometry: dict) -> tuple[str, int]:
    """``("2 x 4 x 8 = 64 blocks", 64)``: how a step's blocks are split, and how many."""
    parts = [
        geometry["per_device_train_batch_size"],
        geometry["gradient_accumulation_steps"],
        geometry["world_size"],
    ]
    total = math.prod(parts)
    return " x ".join(map(str, parts)) + f" = {total} blocks", total


def cfg_lr(cfg: CPTConfig) -> float:
    return float(cfg.learning_rate)


class _Window:
    """Loss and throughput over the training steps since the last log line."""

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

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside does not count towards tokens_per_sec."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t0


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


def _progress(total: int, initial: int, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="training",
        unit="step",
        dynamic_ncols=True,
        disable=not (enabled and sys.stderr.isatty()),
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
