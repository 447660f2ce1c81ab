"""What one :meth:`CPTTrainer.train` call builds before its first step: the :class:`Run`.

Order, chosen so that bad input costs nothing: the data (read and checked), the model, the
resume checks, the kernels, the wrapping for this world, the optimizers and the schedule. No
file is written here; the trainer prepares ``output_dir`` once everything is checked.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from pathlib import Path

import torch

from . import data as D
from . import resume
from .autotune import choose_kernels
from .checkpoint import CheckpointManager
from .config import ConfigError, CPTConfig
from .distributed import World, mesh_shape
from .evaluate import Evaluator, ForgettingAlarm
from .kernels import enable_liger
from .lean import apply_lean_mode, check_world
from .loss import lm_loss_sum, supports_chunked_loss
from .model import (
    ModelLoadError,
    build_model_skeleton,
    check_vocab,
    count_parameters,
    enable_activation_checkpointing,
    load_model,
    load_tokenizer,
)
from .optim import Optimizers, build_optimizers
from .perf import FlopsMeter, compile_decoder_layers
from .schedule import Schedule, warmup_steps_for
from .state import RNGState
from .tracking import Trackers

log = logging.getLogger("qwen_cpt")


@dataclasses.dataclass
class Run:
    """Everything one ``train()`` call uses; nothing outlives it but files."""

    world: World
    runtime: object
    out: Path
    model: torch.nn.Module
    data: D.Mixture
    evaluator: Evaluator
    loss_module: torch.nn.Module  # the model plus its loss, wrapped for this world
    optimizers: Optimizers
    schedule: Schedule
    checkpoints: CheckpointManager
    rng: RNGState
    flops: FlopsMeter
    steps_per_epoch: int
    sync_every: bool  # sharded: reduce-scatter after every micro-batch
    trackers: Trackers = dataclasses.field(default_factory=lambda: Trackers([]))
    tracker_state: dict = dataclasses.field(default_factory=dict)
    kernels: dict = dataclasses.field(default_factory=dict)  # autotune.KernelChoice.record
    alarm: ForgettingAlarm | None = None  # forgetting_tolerance, set by build_run

    @property
    def total(self) -> int:
        return self.schedule.shape["total_steps"]

    @functools.cached_property
    def cleaned_data(self) -> dict[str, dict]:
        """``{source: its qwen-cpt clean output}`` for the sources that read one (see
        :func:`qwen_cpt.clean.cleaned_inputs`), read once: logged, and saved with each
        checkpoint's state."""
        from .clean import cleaned_inputs

        return cleaned_inputs({name: s.source for name, s in self.data.streams.items()})


def open_data(cfg: CPTConfig, train_specs, eval_specs, share=None):
    """``(tokenizer, training mixture, eval sets, training blocks per epoch)``; the data is read
    (and every record checked) before any model loads. ``share``: the ranks that tokenize the
    training data together (:class:`qwen_cpt.data.tokenize.TokenShare`)."""
    tok_path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    tokenizer = load_tokenizer(tok_path, cfg.trust_remote_code)
    local_tok = tok_path if Path(tok_path).is_dir() else None
    streams = {
        s.name: D.open_stream(s, tokenizer, cfg, local_tok, True, share) for s in train_specs
    }
    data = D.Mixture(streams, {s.name: s.weight for s in train_specs})
    try:
        eval_sets = {
            s.name: D.one_epoch(D.open_stream(s, tokenizer, cfg, None, train=False))
            for s in eval_specs
        }
        if not eval_specs and cfg.validation_split > 0:
            eval_sets = hold_out_validation(cfg, streams)
        blocks_per_epoch = _blocks_per_epoch(data)
    except BaseException:
        data.close()
        raise
    return tokenizer, data, eval_sets, blocks_per_epoch


VALIDATION_MAX_BLOCKS = 128


def hold_out_validation(cfg: CPTConfig, streams: dict) -> dict:
    """No eval data given: each training source lends a small validation slice (logged)."""
    sets = {}
    for name, stream in streams.items():
        blocks = D.hold_out_validation(stream, cfg.validation_split, VALIDATION_MAX_BLOCKS)
        eval_name = "eval" if len(streams) == 1 else name
        if blocks:
            sets[eval_name] = blocks
            log.info(
                "validation: held out %d block%s of %s (validation_split %g) as eval set %r; "
                "they are not trained on (validation_split: 0 trains on everything)",
                len(blocks), "" if len(blocks) == 1 else "s", name, cfg.validation_split,
                eval_name,
            )  # fmt: skip
        else:
            log.warning(
                "validation: %s has a single document, so nothing is held out: no eval loss "
                "and no best/ (give eval_files or eval_texts)",
                name,
            )
    return sets


def build_run(
    cfg: CPTConfig, world: World, runtime, out: Path, tokenizer, data, eval_sets, blocks, path
) -> Run:
    """Load and wrap the model, check a resume from ``path`` (None: a fresh run), build the
    optimizers, schedule and checkpoint manager. The checkpoint's state is loaded later."""
    check_world(cfg, world)  # LoRA / freeze: one process only, refused before loading
    cpu = dataclasses.replace(runtime, device=torch.device("cpu"))
    model = world.load_model(  # sharded: rank 0 reads the weights, the others build on meta
        lambda: load_model(cfg.model_name_or_path, cpu if world.sharded else runtime,
                           cfg.trust_remote_code, "auto" if world.sharded else torch.float32,
                           quantize_4bit=cfg.use_qlora),
        lambda: build_model_skeleton(cfg.model_name_or_path, runtime, cfg.trust_remote_code),
        f"loading {cfg.model_name_or_path}", ModelLoadError,
    )  # fmt: skip
    model.train()  # from_pretrained gives eval mode: the start-up probe measures training
    check_vocab(tokenizer, model, cfg.model_name_or_path)
    check_context_length(cfg, model.config)
    _choose_mesh(cfg, model, world, runtime)  # before auto batch: memory is per dp_shard
    saved_kernels = None  # a resume reuses the kernels the run measured when it started
    if path is not None:
        resume.take_auto_fields(cfg, path)
        saved_kernels = resume.check(path, cfg, world.size, model.config, data).get("kernels")
    else:
        _resolve_auto(cfg, model, world, runtime, blocks)
    # Liger's kernels (CUDA, when installed and checked) before checkpointing and compile wrap
    # each part used only if it passed on every rank
    fused_ce = enable_liger(model, runtime.device, world) if cfg.use_liger_kernel else None
    model = apply_lean_mode(model, cfg)  # LoRA/DoRA adapters or freeze-tuning (qwen_cpt.lean)
    if cfg.use_gradient_checkpointing:
        enable_activation_checkpointing(model, cfg.gradient_checkpointing_every_n_layers)
    # attention and compile: as configured, or measured on this GPU (qwen_cpt.autotune)
    first = functools.partial(_first_position_ids, cfg, data, world)
    kernels = choose_kernels(model, cfg, runtime, first, world, saved_kernels)
    chunked = cfg.use_fused_loss and supports_chunked_loss(model)
    if cfg.use_fused_loss and not chunked:
        log.info("loss: plain HF logits (chunked loss supports %s)", model.config.model_type)
    loss_fn = functools.partial(
        lm_loss_sum, chunked=chunked, chunk_size=cfg.loss_chunk_size,
        fused_ce=fused_ce if chunked else None,
    )  # fmt: skip
    sync_every = _choose_gradient_sync(cfg, model, world, runtime)
    bf16 = runtime.device.type == "cuda" and runtime.autocast_dtype is not None
    loss_module = world.parallelize(model, loss_fn, bf16_params=bf16)
    if kernels.compile:  # after fully_shard: its hooks stay outside the compiled code
        compile_decoder_layers(model)
    optimizers = build_optimizers(model, cfg, sharded=world.sharded, ns_device=runtime.device)
    per_step = cfg.per_device_train_batch_size * world.size * cfg.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(blocks / per_step))
    total = (
        cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_train_epochs)
    )
    warmup = warmup_steps_for(total, cfg.warmup_ratio)
    return Run(
        world, runtime, out, model, data,
        Evaluator(eval_sets, cfg.per_device_eval_batch_size, world, runtime), loss_module,
        optimizers, Schedule(total, warmup, cfg.lr_scheduler_type, cfg.min_lr_ratio, cfg.wsd_decay_ratio),
        CheckpointManager(out, world, keep=cfg.save_total_limit, use_async=cfg.async_checkpoint),
        RNGState(runtime.device), FlopsMeter(model.config, cfg.max_length, runtime.device, cfg.peak_tflops),
        steps_per_epoch, sync_every, kernels=kernels.record,
        alarm=ForgettingAlarm(cfg.forgetting_tolerance, out / "metrics.jsonl"),
    )  # fmt: skip


def check_context_length(cfg: CPTConfig, model_config) -> None:
    """Refuse ``max_length`` above the positions the model was trained for, unless its config
    scales RoPE for longer contexts (``rope_type`` other than ``default``, e.g. yarn)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    rope = getattr(model_config, "rope_parameters", None) or getattr(
        model_config, "rope_scaling", None
    )
    kind = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
    if limit and cfg.max_length > limit and kind == "default":
        raise ConfigError(
            [
                f"max_length: {cfg.max_length} is longer than the {limit} positions "
                f"{cfg.model_name_or_path} has (max_position_embeddings); lower max_length, or "
                "set RoPE scaling (rope_scaling, e.g. yarn) in the model's config.json"
            ]
        )


def _resolve_auto(cfg: CPTConfig, model, world: World, runtime, blocks: int) -> None:
    """Replace ``auto`` learning rate / batch fields with the planner's values, logged."""
    from .planner import resolve_auto

    chosen = world.on_main(  # on rank 0 (which holds the real weights), for the device
        lambda: resolve_auto(
            cfg, model, blocks * cfg.max_length, world_size=world.size, shard_size=world.shard,
            device_memory_gb=cfg.device_memory_gb or _device_memory_gb(runtime.device),
            device=runtime.device.type,
        )
    )  # fmt: skip
    for name, (value, rule) in chosen.items():
        setattr(cfg, name, value)
        log.info("%s: auto -> %s (%s)", name, value, rule)
    if chosen:
        cfg.validate()


def choose_training_mode(cfg: CPTConfig, device: torch.device, out: Path) -> None:
    """``training_mode: auto``: set the fields of the most faithful mode that fits the device
    (:mod:`qwen_cpt.planner.mode`), before anything is loaded; a resume keeps its checkpoint's
    choice. Logged, and kept in config.yaml as ``training_mode_chosen``."""
    from .config import MODE_FIELDS
    from .planner import GiB, PlannerError
    from .planner.mode import NoModeFits, choose_mode, describe
    from .planner.shapes import load_shape

    saved = resume.saved_config(cfg, out)
    if saved is not None and saved.training_mode_chosen is not None:
        for name in MODE_FIELDS:
            setattr(cfg, name, getattr(saved, name))
        cfg.training_mode_chosen = saved.training_mode_chosen
        log.info("training_mode: auto -> %s (from the checkpoint)", saved.training_mode_chosen)
        cfg.validate()
        return
    try:
        shape, _ = load_shape(cfg.model_name_or_path)
    except PlannerError as exc:
        raise ConfigError([f"training_mode: auto needs the model's shape: {exc}"]) from None
    import psutil

    free = float(psutil.virtual_memory().available)  # nothing is loaded yet
    gb = cfg.device_memory_gb or _device_memory_gb(device) or free / GiB  # on a CPU: free RAM
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    try:
        flags, why = choose_mode(
            cfg, shape, world_size=world_size, device=device.type, capacity_bytes=gb * GiB,
            host_bytes=free / max(1, per_node),  # offload's host share of each process
        )  # fmt: skip
    except NoModeFits as exc:
        raise ConfigError([str(exc)]) from None
    for name, value in flags.items():
        setattr(cfg, name, value)
    cfg.training_mode_chosen = f"{describe(flags)} ({why})"
    log.info("training_mode: auto -> %s", cfg.training_mode_chosen)
    cfg.validate()


def _choose_mesh(cfg: CPTConfig, model, world: World, runtime) -> None:
    """Sharded over several ranks: HSDP's ``dp_replicate x dp_shard`` (see ``dp_shard``)."""
    if world.size == 1:
        return
    fits = None
    memory = cfg.device_memory_gb or _device_memory_gb(runtime.device)
    if runtime.device.type == "cuda" and memory:
        from .planner import fits_sharded

        def fits(n: int) -> bool:
            return world.on_main(lambda: fits_sharded(cfg, model, n, memory))

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world.size)))
    try:
        replicate, shard, why = mesh_shape(
            world.size, cfg.dp_replicate, cfg.dp_shard, per_node, fits
        )
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    world.set_mesh(replicate, shard)
    log.info("mesh: %s (%s)", world.describe_mesh(), why)


def _choose_gradient_sync(cfg: CPTConfig, model, world: World, runtime) -> bool:
    """Sharded: True reduce-scatters after every micro-batch, False on the last one only."""
    if not world.sharded or cfg.gradient_accumulation_steps == 1:
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

        memory = _device_memory_gb(runtime.device)
        sync, why = world.on_main(lambda: sync_every_micro_batch(cfg, model, world.shard, memory))
    log.info("gradients: reduce-scattered %s", why)
    return sync


def _first_position_ids(cfg: CPTConfig, data: D.Mixture, world: World) -> torch.Tensor:
    """``position_ids`` of the first micro-batch a rank trains on (the data position is put
    back): the document boundaries the attention choice is measured with."""
    bs = cfg.per_device_train_batch_size
    state = data.state_dict()
    micro = D.collate([data.next_block() for _ in range(bs * world.size)])
    data.load_state_dict(state)
    return world.this_ranks_part(micro, bs)["position_ids"]


def _blocks_per_epoch(data: D.Mixture) -> int:
    """Training blocks in one epoch of the first source, scaled up by the others' share.

    In-memory texts, caches and files up to 16 MB are counted exactly by reading them once,
    which also checks every record before the model loads. Larger inputs are estimated from
    file sizes and a 1 MB sample; set max_steps to fix the length of such a run exactly.
    """
    primary = data.primary
    size = getattr(primary.source, "decompressed_bytes", primary.source.total_bytes)
    if not hasattr(primary, "estimate_blocks") or size() <= 16 << 20:
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


def _device_memory_gb(device: torch.device) -> float | None:
    """The GPU's total memory in GiB (None on a CPU: the planner then reads free RAM)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


# --- what a person reads at the start and the end ---------------------------------------------------


def log_setup(run: Run, cfg: CPTConfig, blocks: int) -> None:
    data, rt, world = run.data, run.runtime, run.world
    raw = [name for name, s in data.streams.items() if isinstance(s, D.BlockStream)]
    if world.size > 1 and data.reads_by_offset:
        log.info(
            "data: prepared caches; each of the %d ranks reads only its own blocks", world.size
        )
    elif world.size > 1 and raw:
        log.info(
            "data: each of the %d ranks tokenizes 1/%d of %s and the ranks exchange the ids, "
            "then each packs the whole stream and keeps its slice (a `qwen-cpt prepare` cache "
            "is read by offset instead, each rank only its own blocks)",
            world.size, world.size, ", ".join(raw),
        )  # fmt: skip
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world.size
    if blocks < global_batch:
        log.warning(
            "data: %d block(s) of %d tokens per epoch, fewer than one global batch of %d blocks: "
            "each step takes the whole data and more, so an epoch is one step and the blocks "
            "repeat within it; add text, or lower max_length or the batch size",
            blocks, cfg.max_length, global_batch,
        )  # fmt: skip
    total_params, non_emb = count_parameters(run.model)
    precision = (
        str(rt.autocast_dtype).replace("torch.", "autocast ") if rt.autocast_dtype else "fp32"
    )
    log.info(
        "model: %s (%s parameters, %s non-embedding) on %s, %s", cfg.model_name_or_path,
        f"{total_params:,}", f"{non_emb:,}", rt.device, precision,
    )  # fmt: skip
    for name, c in run.cleaned_data.items():
        log.info(
            "data: %s reads the cleaned output %s (clean job %s, options %s; %s of %s documents "
            "kept; report %s)", name, c["clean_output"], c["job"], c["options_digest"],
            f"{c['documents_out']:,}", f"{c['documents_in']:,}", c["report"],
        )  # fmt: skip
    log.info(
        "data: %s blocks of %d tokens per epoch (%s), eval sets %s; %d steps (%d per epoch, "
        "%d warmup), global batch %d x %d tokens",
        f"{blocks:,}", cfg.max_length, ", ".join(f"{k} {v:.0%}" for k, v in data.shares.items()),
        {k: len(v) for k, v in run.evaluator.eval_sets.items()} or "none",
        run.total, run.steps_per_epoch, run.schedule.shape["warmup_steps"],
        cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world.size,
        cfg.max_length,
    )  # fmt: skip


def resolved_setup(run: Run) -> dict:
    """What the run really uses (logged at step 0 for the report), not what was asked for."""
    dtype = run.runtime.autocast_dtype
    return {
        "attention": run.kernels.get("attention", run.runtime.attn_implementation),
        "precision": f"{str(dtype).replace('torch.', '')} autocast" if dtype else "fp32",
        "torch_compile": bool(run.kernels.get("compile", False)),
    }


def log_done(run: Run, state) -> None:
    data = run.data
    if len(data.streams) > 1:
        achieved = data.achieved_shares().items()
        log.info(
            "data mix achieved: %s",
            ", ".join(f"{k} {v:.2%} (target {data.shares[k]:.2%})" for k, v in achieved),
        )
    skipped = sum(getattr(s.source, "skipped", 0) for s in data.streams.values())
    if skipped and run.world.is_main:
        log.warning("skip_bad_records: skipped %d malformed records", skipped)
    if run.world.is_main:
        try:  # a finished run never fails on its report
            from .report import write_report

            log.info("report: %s", write_report([run.out]))
        except Exception as exc:
            log.warning("could not write report.html: %s", exc)
    log.info(
        "done: %d steps, %s tokens, average loss %.4f; final model in %s",
        state.step, f"{state.tokens_seen:,}", state.avg_loss, run.out / "final",
    )  # fmt: skip


# --- inputs checked before anything else ------------------------------------------------------------


def check_texts(texts, what: str) -> list[str] | None:
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


def check_writable(out: Path) -> None:
    """Fail before training if ``out`` cannot be created or written (without creating it)."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OSError(f"output_dir: {str(probe)!r} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"output_dir: {str(out)!r} is not writable (checked {str(probe)!r})")
