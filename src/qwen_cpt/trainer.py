"""``CPTTrainer``: the single-device continued-pretraining loop.

Order of work in :meth:`CPTTrainer.train`, chosen so that bad input costs nothing:
config check -> data sources -> tokenizer -> tokenized data -> model -> output_dir. Any error
before the last step leaves the disk untouched.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as D
from .checkpoint import remove_stale_tmp, rotate_checkpoints, save_model_dir
from .config import CPTConfig
from .loss import lm_loss_sum, supports_chunked_loss
from .model import (
    Runtime,
    check_vocab,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_runtime,
)
from .optim import Optimizers, build_optimizers
from .schedule import lr_multiplier, warmup_steps_for
from .tracking import Trackers, build_trackers

log = logging.getLogger("qwen_cpt")


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss); nothing was stepped after it."""


@dataclass
class TrainState:
    step: int = 0
    epoch: float = 0.0
    tokens_seen: int = 0
    loss_sum: float = 0.0  # token-weighted sum of training loss over the run
    loss_tokens: int = 0
    best_eval_loss: float = math.inf

    @property
    def avg_loss(self) -> float:
        return self.loss_sum / max(1, self.loss_tokens)


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
    handler = logging.StreamHandler(sys.stderr)
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
        train_files = D.expand_paths(cfg.train_files, "train_files")
        eval_files = D.expand_paths(cfg.eval_files, "eval_files")
        if not train_texts and not train_files:
            raise D.DataError(
                "nothing to train on: pass train_texts to train() or set train_files in the config"
            )
        out = Path(cfg.output_dir)
        _check_writable(out)

        runtime = resolve_runtime(cfg.device, cfg.use_bf16, cfg.use_flash_attention)
        seed_everything(cfg.seed)
        tok_path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
        self.tokenizer = load_tokenizer(tok_path, cfg.trust_remote_code)

        train_blocks = self._blocks(train_texts, train_files, tok_path, cfg.max_samples)
        if not train_blocks:
            raise D.DataError("no training documents left: every input text is empty")
        eval_blocks = self._blocks(list(cfg.eval_texts) + (eval_texts or []), eval_files, tok_path)

        self.model = load_model(cfg.model_name_or_path, runtime, cfg.trust_remote_code)
        check_vocab(self.tokenizer, self.model, cfg.model_name_or_path)
        if cfg.use_gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        chunked = cfg.use_fused_loss and supports_chunked_loss(self.model)
        if cfg.use_fused_loss and not chunked:
            log.info(
                "loss: plain HF logits (chunked loss supports %s)", self.model.config.model_type
            )
        optimizers = build_optimizers(self.model, cfg)

        # Only now, with every input checked, does anything touch the disk.
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out)
        cfg.to_yaml(out / "config.yaml")
        trackers = build_trackers(cfg, out)
        try:
            return self._loop(runtime, optimizers, trackers, train_blocks, eval_blocks, chunked)
        finally:
            trackers.close()

    # ------------------------------------------------------------------------------------------
    def _loop(
        self,
        runtime: Runtime,
        optimizers: Optimizers,
        trackers: Trackers,
        train_blocks: list[D.Block],
        eval_blocks: list[D.Block],
        chunked: bool,
    ) -> float:
        cfg, model, st = self.config, self.model, self.state
        out = Path(cfg.output_dir)
        bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        micro_per_epoch = math.ceil(len(train_blocks) / bs)
        steps_per_epoch = math.ceil(micro_per_epoch / accum)
        total = (
            cfg.max_steps
            if cfg.max_steps > 0
            else math.ceil(steps_per_epoch * cfg.num_train_epochs)
        )
        warmup = warmup_steps_for(total, cfg.warmup_ratio)
        total_params, non_emb = count_parameters(model)
        log.info(
            "model: %s (%s parameters, %s non-embedding) on %s, %s",
            cfg.model_name_or_path,
            f"{total_params:,}",
            f"{non_emb:,}",
            runtime.device,
            f"autocast {runtime.autocast_dtype}".replace("torch.", "")
            if runtime.autocast_dtype
            else "fp32",
        )
        log.info(
            "data: %d train blocks of %d tokens, %d eval blocks; %d steps (%d per epoch, "
            "%d warmup), global batch %d x %d tokens",
            len(train_blocks),
            cfg.max_length,
            len(eval_blocks),
            total,
            steps_per_epoch,
            warmup,
            bs * accum,
            cfg.max_length,
        )
        peak_lrs = {
            id(g): g["lr"] for opt in optimizers.optimizers.values() for g in opt.param_groups
        }

        def evaluate() -> None:
            if not eval_blocks:
                return
            loss = self._eval_loss(eval_blocks, runtime, chunked)
            metrics = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
            log.info("eval step %d: loss %.4f, perplexity %.2f", st.step, loss, metrics["eval_ppl"])
            trackers.log(metrics, st.step)
            if st.step > 0 and loss < st.best_eval_loss:
                st.best_eval_loss = loss
                save_model_dir(out / "best", model, self.tokenizer, cfg, self._state_dict())
                log.info("best: eval loss %.4f at step %d saved to %s", loss, st.step, out / "best")

        evaluate()
        bar = _progress(total)
        window_tokens, window_start = 0, time.perf_counter()
        window_loss, window_loss_tokens = 0.0, 0
        model.train()
        for epoch, group, epoch_end in self._step_batches(train_blocks, total, steps_per_epoch):
            # 1) set this step's learning rate
            mult = lr_multiplier(
                st.step, total, warmup, cfg.lr_scheduler_type, cfg.min_lr_ratio, cfg.wsd_decay_ratio
            )
            for opt in optimizers.optimizers.values():
                for g in opt.param_groups:
                    g["lr"] = peak_lrs[id(g)] * mult
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
            # 3) clip, check, step
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            ).item()
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                raise TrainingError(
                    f"non-finite {'loss' if not math.isfinite(step_loss) else 'gradient norm'} "
                    f"at step {st.step + 1} (loss={step_loss}, grad_norm={grad_norm}); stopped "
                    "before the optimizer step, so the last checkpoint is clean. Lower "
                    "learning_rate or check the data."
                )
            optimizers.step()
            optimizers.zero_grad()
            st.step += 1
            st.epoch = epoch
            st.tokens_seen += sum(int(b["input_ids"].numel()) for b in group)
            st.loss_sum += step_loss * n_tokens
            st.loss_tokens += n_tokens
            window_loss += step_loss * n_tokens
            window_loss_tokens += n_tokens
            window_tokens += sum(int(b["input_ids"].numel()) for b in group)
            bar.update(1)
            # 4) log, evaluate, save
            if st.step % cfg.logging_steps == 0 or st.step == total:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "epoch": round(st.epoch, 4),
                    "loss": window_loss / max(1, window_loss_tokens),
                    "avg_loss": st.avg_loss,
                    "lr": cfg.learning_rate * mult,
                    "grad_norm": grad_norm,
                    "tokens_per_sec": window_tokens / max(elapsed, 1e-9),
                    "tokens_seen": st.tokens_seen,
                    "memory_gb": memory_gb(runtime.device),
                }
                trackers.log(metrics, st.step)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    lr=f"{metrics['lr']:.2e}",
                    tok_s=f"{metrics['tokens_per_sec']:.0f}",
                )
                _log_line(bar, st.step, total, metrics)
                window_tokens, window_start = 0, time.perf_counter()
                window_loss, window_loss_tokens = 0.0, 0
            if st.step % cfg.eval_steps == 0 and st.step != total:
                evaluate()
                model.train()
            if (cfg.save_steps and st.step % cfg.save_steps == 0) or (
                epoch_end and st.step != total
            ):
                self._save_checkpoint(out)
        bar.close()
        evaluate()
        self._save_checkpoint(out)
        save_model_dir(out / "final", model, self.tokenizer, cfg, self._state_dict())
        log.info(
            "done: %d steps, %s tokens, average loss %.4f; final model in %s",
            st.step,
            f"{st.tokens_seen:,}",
            st.avg_loss,
            out / "final",
        )
        return st.avg_loss

    # ------------------------------------------------------------------------------------------
    def _blocks(self, texts, files, tok_path: str, limit: int | None = None) -> list[D.Block]:
        cfg = self.config

        def docs():
            yield from texts or []
            yield from D.read_documents(files, cfg.text_field)

        return D.build_blocks(
            D.take((t for t in docs() if t.strip()), limit),
            self.tokenizer,
            cfg.max_length,
            cfg.document_aware_packing,
            cfg.dataloader_num_workers,
            tok_path if Path(tok_path).is_dir() else None,
        )

    def _step_batches(
        self, blocks: list[D.Block], total: int, steps_per_epoch: int
    ) -> Iterator[tuple[float, list[dict], bool]]:
        """Yield ``(epoch, micro-batches, epoch_ended)`` for each optimizer step.

        Each epoch visits every block once in an order fixed by ``seed`` and the epoch number.
        """
        cfg = self.config
        bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        step, epoch = 0, 0
        while step < total:
            gen = torch.Generator().manual_seed(cfg.seed + epoch)
            order = torch.randperm(len(blocks), generator=gen).tolist()
            micro = [order[i : i + bs] for i in range(0, len(order), bs)]
            for s in range(steps_per_epoch):
                if step >= total:
                    return
                group = [
                    D.collate([blocks[i] for i in m]) for m in micro[s * accum : (s + 1) * accum]
                ]
                step += 1
                yield epoch + (s + 1) / steps_per_epoch, group, s == steps_per_epoch - 1
            epoch += 1

    @torch.no_grad()
    def _eval_loss(self, blocks: list[D.Block], runtime: Runtime, chunked: bool) -> float:
        model, bs = self.model, self.config.per_device_eval_batch_size
        model.eval()
        total, n = 0.0, 0
        for i in range(0, len(blocks), bs):
            batch = D.collate(blocks[i : i + bs])
            n += D.count_loss_tokens(batch)
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            with runtime.autocast:
                total += lm_loss_sum(model, batch, chunked, self.config.loss_chunk_size).item()
        return total / max(1, n)

    def _state_dict(self) -> dict:
        st = self.state
        return {
            "step": st.step,
            "epoch": st.epoch,
            "tokens_seen": st.tokens_seen,
            "avg_loss": st.avg_loss,
            "best_eval_loss": st.best_eval_loss if math.isfinite(st.best_eval_loss) else None,
        }

    def _save_checkpoint(self, out: Path) -> None:
        path = out / f"checkpoint-{self.state.step}"
        if path.exists():
            return
        save_model_dir(path, self.model, self.tokenizer, self.config, self._state_dict())
        rotate_checkpoints(out, self.config.save_total_limit)
        log.info("saved %s", path)


# --- helpers ---------------------------------------------------------------------------------------


def _check_texts(texts, what: str) -> list[str] | None:
    if texts is None:
        return None
    if isinstance(texts, str):
        raise D.DataError(f"{what}: expected a list of texts, got a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise D.DataError(f"{what}[{i}]: expected a string, got {type(t).__name__}")
    if what == "train_texts" and texts is not None and not any(t.strip() for t in texts):
        raise D.DataError(f"{what}: the list is empty or holds only blank texts")
    return texts


def _check_writable(out: Path) -> None:
    """Fail before training if ``out`` cannot be created or written (without creating it)."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OSError(f"output_dir: {str(probe)!r} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"output_dir: {str(out)!r} is not writable (checked {str(probe)!r})")


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="training",
        unit="step",
        dynamic_ncols=True,
        disable=not sys.stderr.isatty(),
    )


def _log_line(bar, step: int, total: int, m: dict) -> None:
    line = (
        f"step {step}/{total} | epoch {m['epoch']:.2f} | loss {m['loss']:.4f} | "
        f"avg {m['avg_loss']:.4f} | lr {m['lr']:.3e} | grad_norm {m['grad_norm']:.3f} | "
        f"{m['tokens_per_sec']:.0f} tok/s | mem {m['memory_gb']:.2f} GB"
    )
    if bar.disable:
        log.info(line)
    else:
        bar.write(line)
