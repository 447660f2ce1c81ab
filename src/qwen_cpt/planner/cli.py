"""The ``qwen-cpt plan`` command."""

from __future__ import annotations

import argparse
import json

from .base import PlannerError, _positive
from .hardware import DEFAULT_MFU, GPUS, lookup_gpu
from .plan import BYTES_PER_TOKEN_ESTIMATE, format_plan, make_plan, train_files_tokens
from .shapes import load_shape

# --- the `qwen-cpt plan` command -------------------------------------------------------------------


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``plan`` to the ``qwen-cpt`` subcommands."""
    p = subparsers.add_parser(
        "plan",
        help="estimate lr, batch, memory and time of a run, offline, before training",
        description="Plan a continued-pretraining run from its YAML config: model size, "
        "recommended learning rate and batch, steps, memory per device and time.",
    )
    p.add_argument("config", help="YAML file of CPTConfig fields")
    p.add_argument(
        "--tokens",
        type=float,
        default=None,
        help="tokens in the training data, one epoch (e.g. 1e9); default: the train_files' "
        f"size / {BYTES_PER_TOKEN_ESTIMATE} bytes per token",
    )
    p.add_argument("--gpus", type=int, default=1, help="number of devices (FSDP) [default: 1]")
    p.add_argument(
        "--gpu",
        default="H100",
        help=f"device type: {', '.join(GPUS)} [default: H100]",
    )
    p.add_argument(
        "--gpu-memory", type=float, default=None, help="memory per device in GiB (overrides --gpu)"
    )
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed MFU [default: 0.4]")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run_plan(args: argparse.Namespace) -> int:
    """Run ``qwen-cpt plan``: 0 with a plan printed (fitting or not: see its verdict), 2 on bad
    input."""
    import sys

    from ..config import CPTConfig

    cfg = CPTConfig.from_yaml(args.config)
    try:
        if args.gpus < 1:
            raise PlannerError(f"--gpus: must be >= 1, got {args.gpus}")
        gpu = lookup_gpu(args.gpu)
        shape, shape_source = load_shape(cfg.model_name_or_path)
        if args.tokens is not None:
            _positive(tokens=args.tokens)
            n_tokens, source = int(args.tokens), "--tokens"
        elif cfg.train_files or getattr(cfg, "sources", None):
            n_bytes, n_tokens = train_files_tokens(cfg)
            source = (
                f"estimated: {n_bytes:,} bytes of training files / {BYTES_PER_TOKEN_ESTIMATE} "
                "bytes per token; pass --tokens for an exact count"
            )
        else:
            raise PlannerError(
                "--tokens: required, since the config has no train_files or sources to estimate "
                "it from"
            )
        plan = make_plan(
            cfg,
            shape,
            n_tokens,
            gpus=args.gpus,
            gpu=gpu,
            gpu_memory_gib=args.gpu_memory,
            mfu=args.mfu,
            shape_source=shape_source,
            tokens_source=source,
        )
    except PlannerError as exc:
        print(f"qwen-cpt plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0
