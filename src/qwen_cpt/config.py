"""``CPTConfig``: every knob of a continued-pretraining run, with the product spec's field names.

The field names are a contract: users copy them from the spec's Chinese usage guide
(``use_muon_optimizer``, ``use_flash_attention``, ``gradient_accumulation_steps`` ...), so they are
never renamed. Each field carries its help text in ``metadata["help"]``; the CLI and the docs read
it from there, so the description lives in one place.

Validation lives in :meth:`CPTConfig.validate` and reports *every* invalid field at once, before
any model is loaded or any file is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

SCHEDULERS = ("cosine", "constant", "wsd")
NAN_POLICIES = ("abort", "skip")
OPTIMIZER_STATES = ("fp32", "bf16", "8bit")
TRAINING_MODES = ("manual", "auto")
# the fields training_mode: auto sets (qwen_cpt.planner.mode); the config must leave them unset
MODE_FIELDS = (
    "fsdp_cpu_offload", "optimizer_states", "freeze_trainable_layers", "use_lora",
    "lora_train_embeddings", "use_qlora",
)  # fmt: skip
ATTENTION_CHOICES = ("auto", "sdpa", "flex_attention", "flash_attention_2", "eager")
AUTO = "auto"  # learning_rate and the batch fields may be "auto": see qwen_cpt.planner


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class CPTConfig:
    """Configuration of a continued-pretraining run.

    Invariants after :meth:`validate`: positive sizes and rates, a known scheduler, and
    ``max_steps > 0`` overriding ``num_train_epochs``. Runtime objects (tokenizer, model, device
    mesh) are never stored here, so a config is always serializable to YAML.
    """

    # --- model ---------------------------------------------------------------------------------
    model_name_or_path: str = _f(
        "", "Local model directory or Hugging Face hub id (e.g. Qwen/Qwen2.5-7B). Required."
    )
    tokenizer_name_or_path: str | None = _f(
        None, "Tokenizer directory or hub id; defaults to model_name_or_path."
    )
    trust_remote_code: bool = _f(
        False, "Allow model code from the model repo to run. Off unless you trust the source."
    )

    # --- data ------------------------------------------------------------------------------------
    train_files: list[str] = _f(
        [],
        "Training data: files, directories or globs of .txt/.md, .jsonl and .parquet files "
        "(.txt/.md/.jsonl may be .gz or .zst compressed), or a qwen-cpt prepare cache directory.",
    )
    eval_files: list[str] = _f([], "Held-out data for eval loss/perplexity, same formats.")
    eval_texts: list[str] = _f([], "Held-out texts given inline (added to eval_files).")
    validation_split: float = _f(
        0.01,
        "With no eval data given, hold out this share of each source's documents (chosen by a "
        "hash, the same on every resume; at least one when a source has two or more; at most "
        "128 blocks) as its eval set, so eval loss and best/ exist. 0: train on everything.",
    )
    text_field: str = _f("text", "Field holding the document text in .jsonl and .parquet records.")
    txt_split: str = _f(
        "file",
        "How .txt/.md files split into documents: file (one each) or paragraph (blank lines).",
    )
    sources: list[dict] = _f(
        [],
        "Named training sources mixed by token share, e.g. domain text plus general replay: "
        "a list of {name, files, weight, eval_files (optional), text_field (optional), clean "
        "(optional: true, or a mapping of `qwen-cpt clean` options; the source is cleaned "
        "once, before training, and decontaminated against the run's eval data), clean_output "
        "(optional, default <output_dir>/cleaned/<name>)}. Use instead of train_files.",
    )
    skip_bad_records: bool = _f(
        False, "Skip malformed records (bad JSON, bad UTF-8, missing field) and count them."
    )
    max_length: int = _f(2048, "Tokens per packed training block (sequence length).")
    max_samples: int | None = _f(None, "Use at most this many training documents (None: all).")
    document_aware_packing: bool = _f(
        True,
        "Restart position_ids at each document inside a packed block, so no token attends "
        "across a document boundary (block-causal mask on SDPA, varlen on flash-attn).",
    )
    dataloader_num_workers: int = _f(
        0, "Worker processes that tokenize input in parallel (0: tokenize in this process)."
    )

    # --- optimization ----------------------------------------------------------------------------
    learning_rate: float | Literal["auto"] = _f(
        5e-5,
        "Peak learning rate (AdamW-style; Muon's is matched to it). auto: the planner's CPT rule, "
        "5e-5*(N/7e9)^-0.25 capped by Step Law (qwen-cpt plan shows it).",
    )
    num_train_epochs: float = _f(3, "Passes over the training data; ignored when max_steps > 0.")
    max_steps: int = _f(-1, "Total optimizer steps; overrides num_train_epochs when > 0.")
    per_device_train_batch_size: int | Literal["auto"] = _f(
        2,
        "Packed blocks per micro-batch on each device. auto: the largest that fits in memory "
        "for the Step Law global batch.",
    )
    per_device_eval_batch_size: int = _f(4, "Packed blocks per eval batch on each device.")
    gradient_accumulation_steps: int | Literal["auto"] = _f(
        1,
        "Micro-batches per optimizer step; micro-batches are weighted by their token counts. "
        "auto: as many as the Step Law global batch (0.58*D^0.571 tokens) needs.",
    )
    warmup_ratio: float = _f(0.03, "Fraction of steps of linear warmup (re-warming for CPT).")
    lr_scheduler_type: str = _f("cosine", "Schedule after warmup: cosine, constant or wsd.")
    min_lr_ratio: float = _f(0.0, "Final LR as a fraction of the peak (cosine and wsd).")
    wsd_decay_ratio: float = _f(0.1, "wsd only: fraction of steps spent in the final decay.")
    weight_decay: float = _f(0.1, "Decoupled weight decay on matrices and embeddings.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.95, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0: no clipping).")
    use_muon_optimizer: bool = _f(
        False,
        "Muon (torch.optim.Muon) for 2-D hidden matrices, AdamW for embeddings, head, norms and "
        "biases. Off by default: for CPT of an AdamW-trained model, Moonlight found it on par, "
        "and our CPU measurement no better, with more forgetting (LoRA-Muon: slightly better).",
    )
    muon_momentum: float = _f(0.95, "Muon momentum (Nesterov).")
    optimizer_states: str = _f(
        "fp32",
        "AdamW's two moments and Muon's momentum: fp32 (AdamW 8 B/param, Muon 4 B); bf16: both "
        "in bf16 with stochastic rounding, fp32 arithmetic and weights (AdamW 4 B, Muon 2 B); or "
        "8bit: bitsandbytes' blockwise 8-bit AdamW (Dettmers et al. 2021, arXiv 2110.02861), "
        "about 2 B/param, Muon's momentum fp32 (pip install 'qwen-cpt[lean]'). bf16 and 8bit: "
        "CPU or CUDA, one process.",
    )

    # --- lean modes: LoRA / DoRA and freeze-tuning (one GPU) --------------------------------------
    use_lora: bool = _f(
        False,
        "Train LoRA adapters (PEFT) instead of the full weights: the base stays frozen in fp32, "
        "checkpoints hold only what trains, and final/ holds the merged model plus adapter/.",
    )
    lora_r: int = _f(64, "LoRA rank.")
    lora_alpha: float = _f(128.0, "LoRA scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input (0: none, as Unsloth's CPT recipe).")
    lora_target_modules: list[str] = _f(
        ["all-linear"],
        "Module names that get adapters (e.g. q_proj, v_proj); all-linear: every linear layer "
        "of the decoder (never lm_head: see lora_train_embeddings).",
    )
    use_dora: bool = _f(False, "DoRA (weight-decomposed LoRA, arXiv 2402.09353) with use_lora.")
    use_qlora: bool = _f(
        False,
        "QLoRA (Dettmers et al. 2023, arXiv 2305.14314), with use_lora: the frozen base's "
        "linear layers are held in 4-bit NF4 with double quantization (bitsandbytes), about "
        "0.52 B/param instead of 4; embeddings, head and norms stay fp32. final/ holds the "
        "merged model on the dequantized base. One process, CPU or CUDA "
        "(pip install 'qwen-cpt[lean]').",
    )
    lora_train_embeddings: bool = _f(
        True,
        "With use_lora or freeze_trainable_layers: also train embed_tokens and lm_head fully "
        "(once when tied), as CPT on new text needs.",
    )
    embedding_learning_rate: float | None = _f(
        None,
        "Peak learning rate of embed_tokens and lm_head (Unsloth's CPT recipe: 2-10x below "
        "learning_rate). None: learning_rate.",
    )
    freeze_trainable_layers: int = _f(
        0,
        "Freeze-tuning (LLaMA-Factory's freeze): train only the last k decoder layers and the "
        "final norm (plus embeddings and head with lora_train_embeddings). 0: off.",
    )
    training_mode: str = _f(
        "manual",
        "manual: train as the fields say. auto: at start-up, pick the mode most faithful to full "
        "training whose estimated peak memory fits the device (qwen-cpt plan's list: full "
        "training, CPU offload, bf16 or 8-bit optimizer states, freeze-tuning, LoRA, QLoRA), "
        "log why, and save it in config.yaml (training_mode_chosen and the fields it set). "
        "Leave fsdp_cpu_offload, optimizer_states, freeze_trainable_layers, use_lora and "
        "use_qlora unset then; lora_r and the other lora_* fields shape LoRA if it is chosen. "
        "A resume keeps the checkpoint's choice.",
    )
    training_mode_chosen: str | None = _f(
        None,
        "Written by the trainer with training_mode: auto: the mode it chose and why (keep it "
        "when reusing a saved config.yaml; leave it unset otherwise).",
    )
    device_memory_gb: float | None = _f(
        None,
        "The memory, in GiB, that the auto fields (batch size, training_mode) plan for. None: "
        "the GPU's total memory, or on a CPU the free RAM.",
    )
    seed: int = _f(42, "Random seed for weights init of new layers, data order and dropout.")
    deterministic: bool = _f(
        False,
        "On CUDA: the same bits from the same inputs (torch.use_deterministic_algorithms, "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8, deterministic flash-attn backward), so a resumed run "
        "matches an unbroken one exactly; somewhat slower, and an op with no deterministic "
        "kernel stops the run naming it. Off: GPU attention backward may differ in the last "
        "bits run to run. A CPU run is deterministic either way.",
    )

    # --- fault handling --------------------------------------------------------------------------
    resume_from_checkpoint: str | None = _f(
        None,
        "auto: resume from the newest valid checkpoint in output_dir (or start fresh and say "
        "so); a path: resume from that checkpoint folder; None: start fresh.",
    )
    overwrite_output_dir: bool = _f(
        False,
        "A fresh run (resume_from_checkpoint: None) into an output_dir that holds a previous "
        "run's checkpoint-*, final/, best/ or metrics.jsonl: False refuses; True removes those "
        "(and logs/, report*, config.yaml) first and says so.",
    )
    nan_policy: str = _f(
        "abort",
        "On a non-finite loss or gradient norm: abort (stop before the optimizer step, exit "
        "non-zero) or skip (drop that step's update, up to max_skipped_steps).",
    )
    max_skipped_steps: int = _f(10, "nan_policy=skip: abort after this many skipped steps.")

    # --- efficiency ------------------------------------------------------------------------------
    use_flash_attention: bool = _f(
        True,
        "With attention_implementation auto: flash_attention_2 when CUDA and flash-attn are "
        "present. Off: never flash_attention_2 unless named.",
    )
    attention_implementation: str = _f(
        "auto",
        "Attention for packed documents. auto: flash_attention_2 (see use_flash_attention), "
        "else on CUDA the faster of sdpa and flex_attention, each checked against eager "
        "attention and timed on this GPU at start-up; sdpa on a CPU. Or name one: sdpa, "
        "flex_attention, flash_attention_2, eager.",
    )
    use_gradient_checkpointing: bool = _f(
        True, "Recompute activations in backward: much less memory, about 30% more compute."
    )
    gradient_checkpointing_every_n_layers: int = _f(
        1,
        "With use_gradient_checkpointing: checkpoint every k-th decoder layer. 1: all layers "
        "(full); k > 1: selective, about 1/k of the recompute and 1/k of the memory savings.",
    )
    use_bf16: bool = _f(
        True, "bf16 autocast (fp32 master weights) where the device supports it, else fp32."
    )
    use_fused_loss: bool = _f(
        True,
        "Compute the LM head and cross-entropy chunk by chunk, never holding the full "
        "[tokens x vocab] logits. Exact; off means the plain HF loss.",
    )
    loss_chunk_size: int = _f(1024, "Tokens per chunk of the fused/chunked loss.")
    use_liger_kernel: bool = _f(
        True,
        "On CUDA with liger-kernel installed (pip install qwen-cpt[gpu]): Liger's fused linear "
        "cross-entropy and its RMSNorm, SwiGLU and RoPE kernels for Qwen2/Qwen3/Llama/Mistral, "
        "each used only after it matches PyTorch on a small check at start-up. No effect "
        "elsewhere.",
    )
    use_torch_compile: bool | None = _f(
        None,
        "torch.compile each decoder layer. None (auto): on CUDA, compile when one decoder "
        "layer's forward + backward measures at least 3% faster compiled at start-up; off on "
        "a CPU, where compiling took longer than it saved (BENCHMARKS.md). true/false: "
        "always/never, nothing measured.",
    )
    peak_tflops: float | None = _f(
        None,
        "Override the device's bf16 peak TFLOP/s used for the logged MFU (None: the GPU's "
        "datasheet figure; no MFU on a CPU or an unknown GPU).",
    )

    # --- multi-GPU / multi-node (torchrun) -------------------------------------------------------
    fsdp_cpu_offload: bool = _f(
        False,
        "Keep parameters, gradients and optimizer state in CPU memory (FSDP2 CPUOffloadPolicy) "
        "and stream each layer to the GPU when it runs. Lets a model train on fewer or smaller "
        "GPUs than it needs otherwise, at a large cost in speed; works on one process too.",
    )
    fsdp_sync_every_micro_batch: bool | None = _f(
        None,
        "Under FSDP2 with gradient accumulation: true reduce-scatters gradients after every "
        "micro-batch, false on the last one only (gradient_accumulation_steps - 1 fewer "
        "reduce-scatters per step, but each GPU holds unsharded fp32 gradients, 4 B/param, "
        "until then). None: the last one only, unless the memory estimate of qwen-cpt plan "
        "says that would not fit the GPU (logged). Always every one with fsdp_cpu_offload.",
    )
    dp_shard: int | Literal["auto"] = _f(
        "auto",
        "Under torchrun: how many ranks share one copy of the model, each holding 1/dp_shard "
        "of the weights, gradients and optimizer state (FSDP2). The others hold replicas "
        "(HSDP: dp_replicate x dp_shard ranks, gradients all-reduced across replicas). auto: "
        "one node's ranks (torchrun's LOCAL_WORLD_SIZE) on several nodes when the model's "
        "memory estimate fits a node, otherwise every rank (plain FSDP).",
    )
    dp_replicate: int | Literal["auto"] = _f(
        "auto",
        "Under torchrun: the number of model replicas (HSDP's replicate dimension, across "
        "nodes). auto: the world size / dp_shard. Set one or both; their product must be the "
        "number of processes.",
    )
    distributed_timeout_minutes: float = _f(
        30.0,
        "Under torchrun: how long a collective may wait for the other ranks before the run "
        "fails with a timeout error instead of hanging (covers the slowest checkpoint save).",
    )

    # --- logging, eval, saving -------------------------------------------------------------------
    output_dir: str = _f("./cpt_output", "Where checkpoints, final/, best/ and metrics go.")
    logging_steps: int = _f(10, "Log metrics every N optimizer steps.")
    eval_steps: int = _f(500, "Evaluate every N optimizer steps (also at step 0 and at the end).")
    eval_tasks: list[str] = _f(
        [],
        "Downstream tasks run with lm-evaluation-harness on the model in memory, before training "
        "and at the end (pip install qwen-cpt[eval]): lm-eval task names, or paths to local "
        "task YAML files or folders of them. Scores are logged as downstream/<task>/<metric>.",
    )
    downstream_eval_steps: int = _f(
        0, "Also run eval_tasks every N optimizer steps (0: only before training and at the end)."
    )
    eval_tasks_limit: int | None = _f(
        None, "Score at most this many examples of each eval_tasks task (None: all of them)."
    )
    forgetting_tolerance: float | None = _f(
        None,
        "Warn once per eval set when its eval loss rises more than this many nats/token above "
        "its value at step 0 (forgetting of general text; e.g. 0.05). None: no warning.",
    )
    save_steps: int = _f(500, "Write checkpoint-<step>/ every N optimizer steps (0: only epochs).")
    save_total_limit: int | None = _f(
        3, "Keep at most N checkpoint-<step>/ folders (None: keep all). best/ is never deleted."
    )
    async_checkpoint: bool = _f(
        False,
        "Write checkpoint-<step>/ in the background (DCP async_save): the state is copied to CPU "
        "memory, training goes on while a thread writes it, and the folder is committed when "
        "the writes are done. Costs one more copy of the model and optimizer states in CPU "
        "memory. A crash during the writes leaves the previous checkpoint as it was.",
    )
    logging_dir: str | None = _f(None, "TensorBoard log dir; defaults to <output_dir>/logs.")
    use_tensorboard: bool = _f(True, "Write TensorBoard scalars under logging_dir.")
    wandb_project: str | None = _f(None, "Log to this Weights & Biases project when set.")
    wandb_run_name: str | None = _f(None, "W&B run name (default: generated).")
    run_name: str | None = _f(
        None,
        "The run's name in report.html (default: the model's name, the first training source "
        "and the start date).",
    )
    device: str = _f("auto", "auto (CUDA if available, else CPU), cpu, cuda or cuda:N.")

    def __post_init__(self) -> None:
        self.validate()

    # -------------------------------------------------------------------------------------------
    def validate(self) -> CPTConfig:
        """Check every field; raise one :class:`ConfigError` listing all problems."""
        errors: list[str] = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                errors.append(msg)

        errors.extend(_type_errors(self))
        if errors:  # range checks on wrong types would only add noise
            raise ConfigError(errors)
        need(bool(self.model_name_or_path), "model_name_or_path: required (a directory or hub id)")
        need(self.max_length > 1, f"max_length: must be > 1, got {self.max_length}")
        need(
            self.learning_rate == AUTO
            or (self.learning_rate > 0 and math.isfinite(self.learning_rate)),
            f"learning_rate: must be > 0 or auto, got {self.learning_rate}",
        )
        need(
            self.num_train_epochs > 0 or self.max_steps > 0,
            f"num_train_epochs: must be > 0 when max_steps <= 0, got {self.num_train_epochs}",
        )
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "eval_steps",
            "loss_chunk_size",
            "gradient_checkpointing_every_n_layers",
        ):
            v = getattr(self, name)
            need(v == AUTO or v >= 1, f"{name}: must be >= 1, got {v}")
        need(
            self.peak_tflops is None or (self.peak_tflops > 0 and math.isfinite(self.peak_tflops)),
            f"peak_tflops: must be > 0 or None, got {self.peak_tflops}",
        )
        for name in ("dp_shard", "dp_replicate"):
            v = getattr(self, name)
            need(v == AUTO or v >= 1, f"{name}: must be >= 1 or auto, got {v}")
        need(
            self.distributed_timeout_minutes > 0,
            f"distributed_timeout_minutes: must be > 0, got {self.distributed_timeout_minutes}",
        )
        need(self.save_steps >= 0, f"save_steps: must be >= 0, got {self.save_steps}")
        need(
            self.downstream_eval_steps >= 0,
            f"downstream_eval_steps: must be >= 0, got {self.downstream_eval_steps}",
        )
        need(
            self.eval_tasks_limit is None or self.eval_tasks_limit >= 1,
            f"eval_tasks_limit: must be >= 1 or None, got {self.eval_tasks_limit}",
        )
        need(
            self.forgetting_tolerance is None or self.forgetting_tolerance >= 0,
            f"forgetting_tolerance: must be >= 0 or None, got {self.forgetting_tolerance}",
        )
        need(
            self.save_total_limit is None or self.save_total_limit >= 1,
            f"save_total_limit: must be >= 1 or None, got {self.save_total_limit}",
        )
        need(
            self.max_samples is None or self.max_samples >= 1,
            f"max_samples: must be >= 1 or None, got {self.max_samples}",
        )
        need(
            self.dataloader_num_workers >= 0,
            f"dataloader_num_workers: must be >= 0, got {self.dataloader_num_workers}",
        )
        need(
            0.0 <= self.validation_split < 1.0,
            f"validation_split: must be in [0, 1), got {self.validation_split}",
        )
        for name in ("warmup_ratio", "min_lr_ratio", "wsd_decay_ratio"):
            v = getattr(self, name)
            need(0.0 <= v <= 1.0, f"{name}: must be in [0, 1], got {v}")
        need(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        need(self.max_grad_norm >= 0, f"max_grad_norm: must be >= 0, got {self.max_grad_norm}")
        for name in ("adam_beta1", "adam_beta2", "muon_momentum"):
            v = getattr(self, name)
            need(0.0 <= v < 1.0, f"{name}: must be in [0, 1), got {v}")
        need(self.adam_epsilon > 0, f"adam_epsilon: must be > 0, got {self.adam_epsilon}")
        need(
            self.lr_scheduler_type in SCHEDULERS,
            f"lr_scheduler_type: must be one of {', '.join(SCHEDULERS)}, "
            f"got {self.lr_scheduler_type!r}",
        )
        need(
            self.nan_policy in NAN_POLICIES,
            f"nan_policy: must be one of {', '.join(NAN_POLICIES)}, got {self.nan_policy!r}",
        )
        need(
            self.max_skipped_steps >= 0,
            f"max_skipped_steps: must be >= 0, got {self.max_skipped_steps}",
        )
        need(self.resume_from_checkpoint != "", "resume_from_checkpoint: use None, not ''")
        need(
            self.lr_scheduler_type != "wsd" or self.warmup_ratio + self.wsd_decay_ratio <= 1.0,
            f"warmup_ratio ({self.warmup_ratio}) + wsd_decay_ratio ({self.wsd_decay_ratio}) "
            "conflict: together they exceed the whole run",
        )
        need(
            self.resume_from_checkpoint is None
            or self.resume_from_checkpoint == "auto"
            or Path(self.resume_from_checkpoint).resolve() != Path(self.output_dir).resolve(),
            "resume_from_checkpoint: points at output_dir itself; use auto, or a checkpoint-<step> folder",
        )
        need(bool(self.output_dir), "output_dir: must not be empty")
        need(bool(self.text_field), "text_field: must not be empty")
        need(
            self.txt_split in ("file", "paragraph"),
            f"txt_split: must be file or paragraph, got {self.txt_split!r}",
        )
        errors.extend(_source_errors(self.sources))
        need(
            not (self.sources and self.train_files),
            "sources and train_files conflict: list the files of each source under sources",
        )
        need(
            self.attention_implementation in ATTENTION_CHOICES,
            f"attention_implementation: must be one of {', '.join(ATTENTION_CHOICES)}, "
            f"got {self.attention_implementation!r}",
        )
        errors.extend(_lean_mode_errors(self))
        need(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        if errors:
            raise ConfigError(errors)
        return self

    # --- (de)serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> CPTConfig:
        """Build from a mapping; unknown keys are an error (never silently dropped)."""
        if not isinstance(data, dict):
            raise ConfigError(
                [f"expected a mapping of field: value, got {type(data).__name__}"], source
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        errors = []
        for key in unknown:
            hint = _closest(key, known)
            errors.append(f"{key}: unknown field" + (f" (did you mean {hint}?)" if hint else ""))
        if errors:
            raise ConfigError(errors, source)
        data = {k: _yaml_number(v) if k in _FLOAT_FIELDS else v for k, v in data.items()}
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(exc.errors, source) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> CPTConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
        if not isinstance(data, dict):
            raise ConfigError(
                [f"expected a mapping at top level, got {type(data).__name__}"], str(path)
            )
        data.update(overrides or {})
        return cls.from_dict(data, source=str(path))

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(
            yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8"
        )

    # --- derived values ------------------------------------------------------------------------
    @property
    def resolved_logging_dir(self) -> str:
        return self.logging_dir or str(Path(self.output_dir) / "logs")


def _source_errors(sources: list[dict]) -> list[str]:
    errors, names = [], set()
    allowed = {"name", "files", "weight", "eval_files", "text_field", "clean", "clean_output"}
    for i, src in enumerate(sources):
        where = f"sources[{i}]"
        unknown = sorted(set(src) - allowed)
        if unknown:
            errors.append(f"{where}: unknown key(s) {unknown} (allowed: {sorted(allowed)})")
        name = src.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            errors.append(f"{where}.name: required, a word without '/', got {name!r}")
        elif name in names:
            errors.append(f"{where}.name: {name!r} is used twice")
        names.add(name)
        for key in ("files", "eval_files"):
            v = src.get(key, [] if key == "eval_files" else None)
            if isinstance(v, str):
                v = [v]
            if (
                not isinstance(v, list)
                or not all(isinstance(x, str) for x in v)
                or (key == "files" and not v)
            ):
                errors.append(f"{where}.{key}: expected a non-empty list of paths, got {v!r}")
        w = src.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            errors.append(f"{where}.weight: must be a number > 0, got {w!r}")
        if src.get("clean") not in (None, False):
            from .clean.options import options_from

            try:
                options_from(src["clean"], f"{where}.clean")
            except ConfigError as exc:
                errors.extend(exc.errors)
        if "clean_output" in src and not (
            isinstance(src["clean_output"], str) and src["clean_output"]
        ):
            errors.append(f"{where}.clean_output: expected a path, got {src['clean_output']!r}")
    return errors


def _lean_mode_errors(cfg: CPTConfig) -> list[str]:
    """LoRA and freeze-tuning fields; each message names its field."""
    errors = []
    if cfg.lora_r < 1:
        errors.append(f"lora_r: must be >= 1, got {cfg.lora_r}")
    if not (cfg.lora_alpha > 0 and math.isfinite(cfg.lora_alpha)):
        errors.append(f"lora_alpha: must be > 0, got {cfg.lora_alpha}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        errors.append(f"lora_dropout: must be in [0, 1), got {cfg.lora_dropout}")
    if not cfg.lora_target_modules or not all(cfg.lora_target_modules):
        errors.append("lora_target_modules: must list module names, or all-linear")
    tables = sorted({"lm_head", "embed_tokens"} & set(cfg.lora_target_modules))
    if tables:
        errors.append(
            f"lora_target_modules: {', '.join(tables)} is trained fully with "
            "lora_train_embeddings, not through an adapter; leave it out"
        )
    lr = cfg.embedding_learning_rate
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        errors.append(f"embedding_learning_rate: must be > 0 or None, got {lr}")
    if cfg.optimizer_states not in OPTIMIZER_STATES:
        errors.append(
            f"optimizer_states: must be one of {', '.join(OPTIMIZER_STATES)}, "
            f"got {cfg.optimizer_states!r}"
        )
    elif cfg.optimizer_states != "fp32" and cfg.fsdp_cpu_offload:
        errors.append(
            f"optimizer_states: {cfg.optimizer_states} does not run with fsdp_cpu_offload "
            "(it steps FSDP2 shards, which lean states do not support yet; offload keeps the "
            "states in host memory anyway); use one or the other"
        )
    if cfg.training_mode not in TRAINING_MODES:
        errors.append(
            f"training_mode: must be one of {', '.join(TRAINING_MODES)}, got {cfg.training_mode!r}"
        )
    elif cfg.training_mode == "auto" and cfg.training_mode_chosen is None:
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        set_by_user = [
            name for name in MODE_FIELDS
            if name != "lora_train_embeddings" and getattr(cfg, name) != defaults[name]
        ]  # fmt: skip
        if set_by_user:
            errors.append(
                f"training_mode: auto chooses {', '.join(set_by_user)} itself; leave "
                f"{'it' if len(set_by_user) == 1 else 'them'} unset, or use training_mode: "
                "manual"
            )
    dm = cfg.device_memory_gb
    if dm is not None and not (dm > 0 and math.isfinite(dm)):
        errors.append(f"device_memory_gb: must be > 0 or None, got {dm}")
    if cfg.freeze_trainable_layers < 0:
        errors.append(f"freeze_trainable_layers: must be >= 0, got {cfg.freeze_trainable_layers}")
    if cfg.use_dora and not cfg.use_lora:
        errors.append("use_dora: needs use_lora: true")
    if cfg.use_qlora and not cfg.use_lora:
        errors.append(
            "use_qlora: needs use_lora: true (QLoRA trains LoRA adapters on a 4-bit base)"
        )
    if cfg.use_lora and cfg.freeze_trainable_layers:
        errors.append("freeze_trainable_layers and use_lora conflict: choose one lean mode")
    if (cfg.use_lora or cfg.freeze_trainable_layers) and cfg.fsdp_cpu_offload:
        errors.append(
            f"fsdp_cpu_offload: not supported with {'use_lora' if cfg.use_lora else 'freeze_trainable_layers'}"
            " (one process, no FSDP2, in this version); use one or the other"
        )
    return errors


def _yaml_number(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``5e-5`` as the string '5e-5'; users mean the number."""
    if isinstance(value, str) and value.strip().lower() != "auto":
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_bool(s: str) -> bool:
    """A true/false value on the command line (``train`` flags and ``clean`` options)."""
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def field_help() -> dict[str, str]:
    """``{field name: help text}`` for every config field, in declaration order."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(CPTConfig)}


def field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(CPTConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(CPTConfig)}


def _type_errors(cfg: CPTConfig) -> list[str]:
    """Check each value against its annotation (YAML and CLI input arrive untyped)."""
    errors = []
    for name, hint in field_types().items():
        value = getattr(cfg, name)
        allowed = (
            typing.get_args(hint)
            if typing.get_origin(hint) in (typing.Union, _UnionType)
            else (hint,)
        )
        ok = False
        for t in allowed:
            if t is type(None):
                ok = ok or value is None
            elif t is float:
                ok = ok or (isinstance(value, (int, float)) and not isinstance(value, bool))
                if ok and isinstance(value, int):
                    setattr(cfg, name, float(value))
            elif t is int:
                ok = ok or (isinstance(value, int) and not isinstance(value, bool))
            elif typing.get_origin(t) is Literal:
                ok = ok or (isinstance(value, str) and value in typing.get_args(t))
            elif typing.get_origin(t) is list:
                item_type = typing.get_args(t)[0] if typing.get_args(t) else str
                ok = ok or (
                    isinstance(value, (list, tuple))
                    and all(isinstance(v, item_type) for v in value)
                )
                if ok and isinstance(value, tuple):
                    setattr(cfg, name, list(value))
            else:
                ok = ok or isinstance(value, t)
        if not ok:
            errors.append(f"{name}: expected {_type_name(hint)}, got {value!r}")
    return errors


try:  # Python >= 3.10: `X | None` annotations are types.UnionType
    from types import UnionType as _UnionType
except ImportError:  # pragma: no cover
    _UnionType = typing.Union  # type: ignore[misc,assignment]


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, _UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        return "list of strings"
    if typing.get_origin(hint) is Literal:
        return " or ".join(str(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _closest(name: str, candidates: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


_FLOAT_FIELDS = {
    name
    for name, hint in typing.get_type_hints(CPTConfig).items()
    if hint is float or float in typing.get_args(hint)
}
