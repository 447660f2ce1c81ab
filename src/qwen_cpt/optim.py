"""Optimizers: AdamW, or Muon for hidden matrices plus AdamW for the rest.

Muon orthogonalizes each 2-D update with Newton-Schulz. It is meant for the hidden weight
matrices only: embeddings and the LM head are lookup/readout tables whose rows should move
independently, and 1-D parameters (norm gains, biases) have no matrix to orthogonalize
(Keller Jordan's Muon notes; Moonlight, arXiv 2502.16982). Those go to AdamW.

``adjust_lr_fn="match_rms_adamw"`` scales Muon's update to AdamW's RMS (0.2 * sqrt(max(A, B))),
so the AdamW-style learning rates of the spec (3e-5 .. 5e-5) and its weight decay carry over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("qwen_cpt")


class OptimizerSetupError(RuntimeError):
    pass


@dataclass
class ParamSplit:
    muon: list[tuple[str, torch.nn.Parameter]] = field(default_factory=list)
    adamw_decay: list[tuple[str, torch.nn.Parameter]] = field(default_factory=list)
    adamw_no_decay: list[tuple[str, torch.nn.Parameter]] = field(default_factory=list)

    @staticmethod
    def count(named) -> int:
        return sum(p.numel() for _, p in named)


def _tables(model) -> set[int]:
    """Parameters that are lookup or readout tables, not hidden matrices: every
    ``nn.Embedding`` (tokens, learned positions, token types), the input and output embeddings
    however a model implements them, and every ``lm_head``-like readout."""
    ids = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        ids.add(id(head.weight))
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) or leaf in READOUT_NAMES:
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


# Readout heads by module name, for a model whose get_output_embeddings does not return them
# (GPT-NeoX calls its head embed_out)
READOUT_NAMES = ("lm_head", "embed_out")


def split_parameters(model, use_muon: bool) -> ParamSplit:
    """Route each trainable parameter (tied weights once) to its optimizer group."""
    table_ids = _tables(model)
    split = ParamSplit()
    for name, p in model.named_parameters():  # yields a tied parameter once
        if not p.requires_grad:
            continue
        if use_muon and p.ndim == 2 and id(p) not in table_ids:
            split.muon.append((name, p))
        elif p.ndim >= 2:
            split.adamw_decay.append((name, p))
        else:
            split.adamw_no_decay.append((name, p))
    if use_muon and not split.muon:
        raise OptimizerSetupError(
            "use_muon_optimizer=True, but no parameter qualifies for Muon (2-D hidden matrices); "
            "is the model frozen or are its weights flattened?"
        )
    return split


class Optimizers:
    """One or two torch optimizers driven as one: step, zero_grad and state_dict together."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], split: ParamSplit):
        self.optimizers = optimizers
        self.split = split

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.optimizers) ^ set(state)
        if missing:
            raise ValueError(
                f"optimizer state holds {sorted(state)}, this run uses {sorted(self.optimizers)}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])

    def summary(self) -> dict[str, int]:
        s = self.split
        return {
            "muon_params": s.count(s.muon),
            "adamw_params": s.count(s.adamw_decay) + s.count(s.adamw_no_decay),
        }


def _can_fuse(params: list[torch.Tensor]) -> bool | None:
    """Fused AdamW (one kernel over all tensors, no temporaries) where torch has it.

    On a CPU it steps 2.7x faster than the default single-tensor loop (0.23 s vs 0.62 s for the
    19.5M parameters of a hidden-128 Qwen2.5-shaped model, BENCHMARKS.md) and holds no
    per-step temporaries; on CUDA it is what HF Trainer uses by default (adamw_torch_fused).
    None (torch's own choice) on other devices or dtypes.
    """
    ok = all(
        p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
        for p in params
    )
    return True if ok and params else None


def build_optimizers(model, cfg, sharded: bool = False, ns_device=None) -> Optimizers:
    """Muon (+ AdamW) or AdamW for ``model``.

    ``sharded``: the parameters are FSDP2 shards; Muon is then
    :class:`qwen_cpt.muon.DistributedMuon`, which orthogonalizes whole matrices (on
    ``ns_device``) and otherwise matches ``torch.optim.Muon``.
    """
    split = split_parameters(model, cfg.use_muon_optimizer)
    emb_lr = getattr(cfg, "embedding_learning_rate", None)
    tables = _tables(model) if emb_lr is not None else set()
    adamw_groups = [
        {
            "params": [p for _, p in split.adamw_decay if id(p) not in tables],
            "weight_decay": cfg.weight_decay,
        },
        # embed_tokens / lm_head at their own peak lr (Unsloth's CPT recipe), same schedule
        {
            "params": [p for _, p in split.adamw_decay if id(p) in tables],
            "weight_decay": cfg.weight_decay,
            "lr": emb_lr,
        },
        {"params": [p for _, p in split.adamw_no_decay], "weight_decay": 0.0},
    ]
    adamw_groups = [g for g in adamw_groups if g["params"]]
    if not split.muon and not adamw_groups:
        raise OptimizerSetupError("no parameter is trainable (every weight is frozen)")
    opts: dict[str, torch.optim.Optimizer] = {}
    if split.muon:
        muon_args = dict(
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )
        states = getattr(cfg, "optimizer_states", "fp32")
        if sharded or states == "bf16":
            from .muon import DistributedMuon

            if states == "bf16":
                muon_args.update(momentum_dtype=torch.bfloat16, seed=getattr(cfg, "seed", 0))
            opts["muon"] = DistributedMuon(
                [p for _, p in split.muon], ns_device=ns_device, **muon_args
            )
        else:
            opts["muon"] = torch.optim.Muon([p for _, p in split.muon], **muon_args)
    if adamw_groups:
        opts["adamw"] = _adamw(adamw_groups, cfg)
    for opt in opts.values():  # the peak lr; the schedule scales it each step (as torch's do)
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    optimizers = Optimizers(opts, split)
    counts = optimizers.summary()
    if split.muon:
        log.info(
            "optimizer: Muon holds %s parameters in %d matrices; AdamW holds %s "
            "(embeddings, head, norms, biases)",
            f"{counts['muon_params']:,}",
            len(split.muon),
            f"{counts['adamw_params']:,}",
        )
        if not trained_with_muon(getattr(cfg, "model_name_or_path", None)):
            log.info(MUON_ON_ADAMW_MODEL)
    else:
        log.info("optimizer: AdamW holds all %s parameters", f"{counts['adamw_params']:,}")
    states = getattr(cfg, "optimizer_states", "fp32")
    if "adamw" in opts and states == "8bit":
        log.info(
            "optimizer: AdamW's moments in 8 bits (bitsandbytes AdamW8bit, blockwise; tensors "
            "under %s elements keep fp32 moments)",
            f"{EIGHT_BIT_MIN_SIZE:,}",
        )
    elif states == "bf16":
        log.info(
            "optimizer: %s in bf16 with stochastic rounding (fp32 weights, gradients and "
            "arithmetic)",
            " and ".join(
                x
                for x, on in (("AdamW's moments", "adamw" in opts), ("Muon's momentum", split.muon))
                if on
            ),
        )
    return optimizers


# what benchmarks/muon_measured.py found (BENCHMARKS.md, "Muon vs AdamW again"): said once
# when Muon continues a model that qwen-cpt did not train with Muon
MUON_ON_ADAMW_MODEL = (
    "optimizer: Muon on a model qwen-cpt did not train with Muon: if it was pretrained with AdamW, "
    "in our CPU measurement (3 seeds) full CPT with Muon learned the domain no better than AdamW "
    "and forgot more, LoRA-Muon slightly better (from scratch Muon won; BENCHMARKS.md)"
)


def trained_with_muon(model_dir) -> bool:
    """Whether ``model_dir`` is a qwen-cpt output (its config.yaml) of a run with Muon. Other
    models (the published Qwen2.5 among them) were pretrained with AdamW as far as we know."""
    from pathlib import Path

    import yaml

    path = Path(str(model_dir or "")) / "config.yaml"
    try:
        return bool(yaml.safe_load(path.read_text(encoding="utf-8")).get("use_muon_optimizer"))
    except (OSError, AttributeError, yaml.YAMLError):
        return False


# bitsandbytes' default: smaller tensors (norm gains, biases) keep 32-bit moments, where 8-bit
# blocks would save little and cost accuracy
EIGHT_BIT_MIN_SIZE = 4096


def _adamw(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """torch's AdamW (fused where it can be); with ``optimizer_states: 8bit`` bitsandbytes'
    AdamW8bit: the same update (decoupled decay, bias correction, per-group lr) with each
    moment kept as 8-bit codes plus one fp32 scale per 256-element block; with ``bf16``
    :class:`qwen_cpt.bf16_states.AdamWBF16`: bf16 moments, stochastically rounded."""
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    states = getattr(cfg, "optimizer_states", "fp32")
    if states == "8bit":
        bnb = import_bitsandbytes()
        return bnb.optim.AdamW8bit(groups, min_8bit_size=EIGHT_BIT_MIN_SIZE, **kw)
    if states == "bf16":
        from .bf16_states import AdamWBF16

        return AdamWBF16(groups, seed=getattr(cfg, "seed", 0), **kw)
    return torch.optim.AdamW(
        groups, fused=_can_fuse([p for g in groups for p in g["params"]]), **kw
    )


def import_bitsandbytes(what: str = "optimizer_states: 8bit"):
    """``bitsandbytes``, or a ConfigError naming the field (``what``) and the install command.
    Its CPU backend logs a warning at import about an optional 4-bit matmul kernel from the Hub
    (the kernels package); without it QLoRA on CPU uses bitsandbytes' PyTorch fallback, which
    gives the same results. That one message is kept out of the run's log."""
    from .errors import ConfigError

    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(
            [
                f"{what} needs bitsandbytes ({exc}); "
                "pip install 'qwen-cpt[lean]' (or bitsandbytes>=0.50)"
            ]
        ) from None
    finally:
        quiet.setLevel(level)
    return bitsandbytes
