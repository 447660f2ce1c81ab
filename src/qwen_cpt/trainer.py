"""``CPTTrainer``: the continued-pretraining loop, one code path for one process and for many.

Order of work in :meth:`CPTTrainer.train`, chosen so that bad input costs nothing:
config -> data sources -> resume checkpoint -> tokenizer -> tokenized data -> model ->
output_dir. Any error before the last step leaves the disk untouched.

What differs between one process and many (under torchrun, or ``fsdp_cpu_offload``) is decided
once, in :class:`qwen_cpt.distributed.World`; the loop never asks. Every rank reads the same
data stream and trains on its own slice of each global batch, the loss and stop signals are
summed over ranks, and only rank 0 writes logs, metrics and the run's small files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from . import data as D
from . import outdir, resume
from .checkpoint import remove_stale_tmp, save_model_dir, write_run_files
from .config import CPTConfig
from .distributed import World
from .downstream import Downstream
from .elastic import check_restart
from .logs import Window, log_step, memory_gb, progress, setup_logging
from .model import resolve_runtime, set_deterministic
from .perf import to_device
from .resume import ResumeError
from .run import (
    Run,
    build_run,
    check_texts,
    check_writable,
    choose_training_mode,
    log_done,
    log_setup,
    open_data,
    resolved_setup,
)
from .state import TrainState, Value, seed_everything
from .tracking import build_trackers, truncate_metrics

log = logging.getLogger("qwen_cpt")
__all__ = ["CPTTrainer", "ResumeError", "TrainingError", "TrainingInterrupted", "setup_logging"]


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss); nothing was stepped after it."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT arrived: the step finished, a checkpoint was written, the run stopped.

    The CLI exits with ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, signum: int, checkpoint: Path):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after saving {checkpoint}; "
            "resume with resume_from_checkpoint=auto"
        )


class CPTTrainer:
    """Continued pretraining of a Hugging Face causal LM on your text.

    >>> trainer = CPTTrainer(CPTConfig(model_name_or_path="Qwen/Qwen2.5-7B"))
    >>> final_loss = trainer.train(["your text 1", "your text 2"])

    After :meth:`train`, ``trainer.model`` and ``trainer.tokenizer`` hold the trained model, and
    ``output_dir`` holds ``final/``, ``best/`` (lowest eval loss: on the eval data, or on the
    ``validation_split`` slice held out when none is given),
    ``checkpoint-<step>/`` folders, ``config.yaml`` and ``metrics.jsonl``. After a sharded run
    ``trainer.model`` holds this rank's FSDP2 shards only; load ``final/`` with
    ``from_pretrained`` to use the whole model. ``clock``: seconds for the logged throughput
    (tests inject one).
    """

    def __init__(self, config: CPTConfig, *, clock: Callable[[], float] = time.perf_counter):
        if not isinstance(config, CPTConfig):
            raise TypeError(f"CPTTrainer needs a CPTConfig, got {type(config).__name__}")
        self.config = config.validate()
        self.model = self.tokenizer = None
        self.state = TrainState()
        self.clock = clock
        self._finished: Path | None = None  # final/ of a finished train()
        self._stop_signal: int | None = None
        self._downstream: Downstream | None = None  # eval_tasks, checked by train()
        setup_logging()

    def train(
        self, train_texts: Sequence[str] | None = None, eval_texts: Sequence[str] | None = None
    ) -> float:
        """Train and return the token-weighted average training loss over the run."""
        if self._finished is not None:
            raise TrainingError(
                f"this CPTTrainer has finished its run (final model in {self._finished}); to "
                "train on more text, start a new CPTTrainer with model_name_or_path set to it "
                "and a new output_dir"
            )
        cfg = self.config.validate()  # fields may have been assigned after construction
        train_texts = check_texts(train_texts, "train_texts")
        eval_texts = check_texts(eval_texts, "eval_texts")
        train_specs, eval_specs = D.resolve_sources(cfg, train_texts, eval_texts)
        out = Path(cfg.output_dir)
        check_writable(out)
        self._downstream = Downstream.from_config(cfg) if cfg.eval_tasks else None  # no model yet
        if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 logs (or warns)
            log.setLevel(logging.WARNING)
        set_deterministic(cfg.deterministic)  # before the first cuBLAS handle
        runtime = resolve_runtime(
            cfg.device, cfg.use_bf16, cfg.use_flash_attention, cfg.attention_implementation
        )
        if cfg.training_mode == "auto" and cfg.training_mode_chosen is None:
            choose_training_mode(cfg, runtime.device, out)  # before the world: offload shapes it
        world = World.create(runtime.device, cfg.fsdp_cpu_offload, cfg.distributed_timeout_minutes)
        runtime = dataclasses.replace(runtime, device=world.device)
        self.state, self._stop_signal, data = TrainState(), None, None
        lock = outdir.OutputDirLock(out)  # rank 0 holds it, from before the first read to the end
        try:
            if world.sharded:
                log.info("distributed: %s", world.describe())
            check_restart(cfg.resume_from_checkpoint)  # a torchrun restart: resume, not over
            world.on_main(lock.acquire)  # a second run is refused before it loads anything
            path = world.on_main(lambda: resume.find_checkpoint(cfg, out))
            seed_everything(cfg.seed)
            share = world.token_share()  # the ranks tokenize the training data together
            self.tokenizer, data, eval_sets, blocks = open_data(cfg, train_specs, eval_specs, share)
            run = build_run(cfg, world, runtime, out, self.tokenizer, data, eval_sets, blocks, path)
            self.model = run.model
            self._start(run, path)
            log_setup(run, cfg, blocks)
            try:
                with self._catch_stop_signals():
                    loss = self._loop(run)
            finally:
                run.checkpoints.close()  # a save still in flight commits; nothing waits on ranks
                run.trackers.close()
        finally:
            if data is not None:
                data.close()
            world.close()
            lock.release()
        self._finished = out / "final"
        return loss

    def _start(self, run: Run, path: Path | None) -> None:
        """Load the checkpoint's state (a resume), then, with every input checked and
        ``output_dir`` locked, prepare it and start the trackers: the first writes of the run."""
        cfg, world = self.config, run.world
        if path is not None:
            trackers = Value({})
            parts = self._parts(run, trackers)
            run.checkpoints.load(path, run.model, run.optimizers.optimizers, parts, run.rng)
            run.tracker_state = trackers.value

        def prepare_output_dir() -> None:
            run.out.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(run.out)
            if cfg.resume_from_checkpoint is None:
                outdir.check_fresh_start(run.out, cfg.overwrite_output_dir)
            elif cfg.resume_from_checkpoint == "auto":  # newer checkpoints failed verification
                outdir.set_aside_broken(run.out, None if path is None else self.state.step)
            if path is not None:
                truncate_metrics(run.out / "metrics.jsonl", self.state.step)
            elif cfg.resume_from_checkpoint == "auto":  # starting fresh: not the old records
                truncate_metrics(run.out / "metrics.jsonl", -1)
            cfg.to_yaml(run.out / "config.yaml")

        world.on_main(prepare_output_dir)
        if world.is_main:
            run.trackers = build_trackers(cfg, run.out, run.tracker_state)
        run.tracker_state = world.on_main(lambda: run.trackers.state_dict())

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self, run: Run) -> float:
        cfg, st, world = self.config, self.state, run.world
        if st.step == 0:
            run.trackers.log({**run.optimizers.summary(), **resolved_setup(run)}, 0)
            self._evaluate(run)
            self._downstream_eval(run)
        elif st.step >= run.total:
            log.warning(
                "the checkpoint is at step %d and this run ends at step %d: no step to train; "
                "raise max_steps (or num_train_epochs) to train further", st.step, run.total,
            )  # fmt: skip
        window, started = Window(self.clock), self.clock()
        with progress(run.total, st.step, world.is_main) as bar:
            for micro_batches, n_loss, n_tokens in self._step_batches(run):
                mult = run.schedule.apply(run.optimizers.optimizers.values(), st.step)
                loss_sum, n_loss, grad_norm, stop = self.train_step(run, micro_batches, n_loss)
                st.step += 1
                st.epoch = st.step / run.steps_per_epoch
                st.tokens_seen += n_tokens
                window.add(loss_sum, n_loss, n_tokens)
                bar.update(1)
                if st.step % cfg.logging_steps == 0 or st.step == run.total:
                    metrics = self._step_metrics(run, window, mult, grad_norm)
                    run.trackers.log(metrics, st.step)
                    log_step(bar, st.step, run.total, metrics)
                    window = Window(self.clock)
                with window.paused():  # evaluation and saving are not training time
                    if st.step % cfg.eval_steps == 0 and st.step != run.total:
                        self._evaluate(run)
                    every = cfg.downstream_eval_steps
                    if every and st.step % every == 0 and st.step != run.total:
                        self._downstream_eval(run)
                    epoch_end = st.step % run.steps_per_epoch == 0
                    if (cfg.save_steps and st.step % cfg.save_steps == 0) or (
                        epoch_end and st.step != run.total
                    ):
                        self._save_checkpoint(run, window)
                if stop:
                    path = self._save_checkpoint(run, window, blocking=True)
                    signum = self._stop_signal or signal.SIGTERM  # another rank's signal
                    log.warning(
                        "%s received%s: step %d finished and saved to %s; exiting",
                        signal.Signals(signum).name,
                        "" if self._stop_signal else " by another rank",
                        st.step,
                        path,
                    )
                    raise TrainingInterrupted(signum, path)
        self._evaluate(run)
        self._downstream_eval(run)
        self._save_checkpoint(run, window, blocking=True)
        self._save_model(run, run.out / "final")
        run.trackers.log({"train_runtime_s": self.clock() - started}, st.step)
        log_done(run, st)
        return st.avg_loss

    def train_step(self, run: Run, micro_batches: list[dict], n_loss: int):
        """One optimizer step over this rank's micro-batches: ``(loss summed over all ranks, a
        device tensor; the loss tokens it counts (0 for a skipped step); grad norm; stop?)``.

        Each micro-batch is weighted by its share of the step's loss tokens over all ranks, so
        the loss does not depend on how the step is split (trl #2175); FSDP2 averages gradients
        over ranks, hence the factor ``world.size``. The loss stays on the device: the one host
        read per step is the finite check (with any rank's stop signal), so that a non-finite
        value never reaches the weights.
        """
        world, runtime, cfg = run.world, run.runtime, self.config
        if n_loss == 0:  # an empty tokenizer or empty texts: never a loss of 0 over nothing
            raise TrainingError(
                f"step {self.state.step + 1} has no token to learn from (its blocks hold no "
                "target tokens); check that the tokenizer encodes the training text"
            )
        loss_sum = torch.zeros((), dtype=torch.float32, device=runtime.device)
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, runtime.device)  # pinned first on CUDA: a true async copy
            last = i == len(micro_batches) - 1
            world.set_gradient_sync(run.sync_every or last, all_reduce=last)
            with runtime.autocast:
                loss = run.loss_module(batch)
            if loss.requires_grad:
                (loss * (world.size / max(1, n_loss))).backward()
            loss_sum += loss.detach().float()
        stop = torch.tensor(float(self._stop_signal is not None), device=runtime.device)
        flags = world.sum_(torch.stack([loss_sum, stop]))  # every rank sees a NaN or a stop
        loss_sum = flags[0]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = world.clip_grad_norm(list(self.model.parameters()), max_norm)
        ok = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        finite, stop = torch.stack([ok, flags[1] > 0]).tolist()
        if finite:
            run.optimizers.step()
        else:
            self._skip_or_stop(float(loss_sum) / max(1, n_loss), float(grad_norm), world)
            loss_sum, n_loss = torch.zeros_like(loss_sum), 0
        run.optimizers.zero_grad()
        return loss_sum, n_loss, grad_norm, bool(stop)

    def _step_batches(self, run: Run) -> Iterator[tuple[list[dict], int, int]]:
        """For each optimizer step from ``state.step``: ``(this rank's micro-batches, loss
        tokens in the global step, tokens in the global step)``.

        The blocks come from the data streams, whose small state (saved in checkpoints) is the
        exact data position: a resume continues with the very next block, without replaying
        earlier batches (HF Trainer's replay took 28 h in transformers #18649). Every rank draws
        each global micro-batch (``world x batch`` blocks) and keeps its own disjoint slice, so
        the run sees the same blocks in the same steps as one process with a ``world`` times
        larger batch.
        """
        bs, accum = self.config.per_device_train_batch_size, self.config.gradient_accumulation_steps
        world, data = run.world, run.data
        if world.size > 1 and data.reads_by_offset:
            yield from self._own_blocks(run, bs, accum)
            return
        for _ in range(self.state.step, run.total):
            group, n_loss, n_all = [], 0, 0
            for _ in range(accum):
                micro = D.collate([data.next_block() for _ in range(bs * world.size)])
                n_loss += D.count_loss_tokens(micro)
                n_all += micro["input_ids"].numel()
                group.append(world.this_ranks_part(micro, bs))
            yield group, n_loss, n_all

    def _own_blocks(self, run: Run, bs: int, accum: int) -> Iterator[tuple[list[dict], int, int]]:
        """:meth:`_step_batches` on prepared caches: every rank steps through the same global
        order but reads only its own rows, so reading does not grow with the number of ranks;
        the step's loss tokens are summed over ranks (one small host collective per step)."""
        world, data = run.world, run.data
        lo, hi = world.rank * bs, (world.rank + 1) * bs
        for _ in range(self.state.step, run.total):
            group, n_loss = [], 0
            for _ in range(accum):
                blocks = [data.next_block(build=lo <= j < hi) for j in range(bs * world.size)]
                micro = D.collate(blocks[lo:hi])
                n_loss += D.count_loss_tokens(micro)
                group.append(micro)
            n_all = accum * bs * world.size * self.config.max_length
            yield group, int(world.sum([float(n_loss)])[0]), n_all

    # --- evaluate, save, log --------------------------------------------------------------------
    def _parts(self, run: Run, trackers=None) -> dict:
        """The small stateful parts a checkpoint holds besides weights and optimizer states."""
        trackers = trackers or Value(run.tracker_state)
        return {
            "train": self.state,
            "data": run.data,
            "schedule": run.schedule,
            "trackers": trackers,
        }

    def _downstream_eval(self, run: Run) -> None:
        """``eval_tasks`` on the model in memory (qwen_cpt.downstream), logged at this step."""
        if self._downstream is not None:
            args = (self.model, self.tokenizer, run.world, run.runtime, self.state.step)
            run.trackers.log(self._downstream.evaluate(*args), self.state.step)

    def _evaluate(self, run: Run) -> None:
        st = self.state
        if not run.evaluator:
            return
        metrics = run.evaluator.evaluate(run.loss_module, st.step)
        run.trackers.log(metrics, st.step)
        if run.world.is_main:
            run.alarm.check(metrics, st.step)
        loss = metrics["eval_loss"]
        if st.step > 0 and (st.best_eval_loss is None or loss < st.best_eval_loss):
            st.best_eval_loss = loss
            self._save_model(run, run.out / "best")
            log.info("best: eval loss %.4f at step %d saved to %s", loss, st.step, run.out / "best")

    def _save_checkpoint(self, run: Run, window: Window, blocking: bool = False) -> Path:
        st, cfg = self.state, self.config
        path = run.out / f"checkpoint-{st.step}"
        window.fold_into(st)
        summary = {
            "format": 2, **st.state_dict(), "geometry": resume.geometry(cfg, run.world.size),
            "data_fingerprint": run.data.identity(), "data_identity": run.data.describe_identity(),
            "data_position": run.data.state_dict(), "kernels": run.kernels,
            "cleaned_data": run.cleaned_data,  # which `qwen-cpt clean` output it read
        }  # fmt: skip

        def main_files(tmp: Path) -> None:
            self.model.config.save_pretrained(tmp)
            write_run_files(tmp, self.tokenizer, cfg, summary)

        return run.checkpoints.save(
            path, self.model, run.optimizers.optimizers, self._parts(run), run.rng, main_files,
            blocking=blocking,
        )  # fmt: skip

    def _save_model(self, run: Run, target: Path) -> None:
        """An HF-format model folder; sharded weights are gathered to rank 0 first."""
        weights = run.world.full_state_dict(self.model)
        state = self.state.state_dict()
        run.world.on_main(
            lambda: save_model_dir(target, self.model, self.tokenizer, self.config, state, weights)
        )

    def _step_metrics(self, run: Run, window: Window, mult: float, grad_norm) -> dict:
        st, world = self.state, run.world
        window.fold_into(st)
        tok_s = window.tokens_per_sec()
        metrics = {
            "epoch": round(st.epoch, 4), "loss": window.loss(), "avg_loss": st.avg_loss,
            "lr": float(self.config.learning_rate) * mult, "grad_norm": float(grad_norm),
            "tokens_per_sec": tok_s,
            **({"tokens_per_sec_per_device": tok_s / world.size} if world.size > 1 else {}),
            **run.flops.metrics(tok_s / world.size), "tokens_seen": st.tokens_seen,
            "memory_gb": world.max([memory_gb(run.runtime.device)])[0],
            "skipped_steps": st.skipped_steps,
        }  # fmt: skip
        if len(run.data.streams) > 1:  # achieved token shares of the mixture so far
            metrics.update({f"data_share/{k}": v for k, v in run.data.achieved_shares().items()})
        return metrics

    def _skip_or_stop(self, loss: float, grad_norm: float, world: World) -> None:
        st, cfg = self.state, self.config
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        where = f"step {st.step + 1}" + (
            f" (summed over all {world.size} ranks; every rank stops here)"
            if world.size > 1
            else ""
        )
        if cfg.nan_policy == "skip" and st.skipped_steps < cfg.max_skipped_steps:
            st.skipped_steps += 1
            log.warning(
                "non-finite %s at %s (loss=%s, grad_norm=%s): update skipped (%d of at most %d)",
                what, where, loss, grad_norm, st.skipped_steps, cfg.max_skipped_steps,
            )  # fmt: skip
            return
        extra = f" after {st.skipped_steps} skipped steps" if cfg.nan_policy == "skip" else ""
        raise TrainingError(
            f"non-finite {what} at {where} (loss={loss}, grad_norm={grad_norm}){extra}; stopped "
            "before the optimizer step, so the last checkpoint is clean. Lower learning_rate or "
            "check the data; nan_policy=skip drops such steps instead."
        )

    @contextlib.contextmanager
    def _catch_stop_signals(self):
        """SIGTERM/SIGINT: finish the current step, save, then stop (Megatron's behaviour).
        A second SIGINT stops at once."""
        if threading.current_thread() is not threading.main_thread():  # signals need it
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


# --- helpers ---------------------------------------------------------------------------------------
