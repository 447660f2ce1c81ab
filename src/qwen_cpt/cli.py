"""The ``qwen-cpt`` command line: ``train``, ``prepare``, ``clean``, ``plan``, ``tiny-model``, ``demo``,
``eval`` and ``report``.

Every ``CPTConfig`` field is a ``train`` flag (``--learning_rate 3e-5`` or ``--learning-rate 3e-5``),
generated from the dataclass, with the field's help text; a negative value may follow a space
(``--learning_rate -1e-3``) and then meets the config's validation.

Exit status: 0 done; 2 bad input refused before training (configuration, command line, data,
model, a checkpoint that cannot be resumed, an unwritable path); 1 a failure while training (a
non-finite loss, a save that failed); 128 + the signal after a SIGTERM/SIGINT and its checkpoint.
Errors are printed as ``qwen-cpt: error: ...``, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import typing
from typing import Any

from .config import ConfigError, CPTConfig, _type_name, field_help, field_types, parse_bool

log = logging.getLogger("qwen_cpt")


def _converter(hint: Any):
    args = typing.get_args(hint)
    optional = type(None) in args
    literals = {
        v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)
    }
    base = next(
        (a for a in args if a is not type(None) and typing.get_origin(a) is not typing.Literal),
        hint,
    )
    if typing.get_origin(hint) is list or typing.get_origin(base) is list:
        return str, "+"
    conv = {bool: parse_bool, int: int, float: float}.get(base, str)

    def parse(s: str):
        if optional and s.strip().lower() in ("none", "null"):
            return None
        if s.strip().lower() in literals:  # e.g. --learning_rate auto
            return s.strip().lower()
        return conv(s)

    parse.__name__ = _type_name(hint)
    return parse, None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    helps, types = field_help(), field_types()
    defaults = {f.name: f for f in dataclasses.fields(CPTConfig)}
    group = parser.add_argument_group("config fields (override the YAML file)")
    for name, hint in types.items():
        conv, nargs = _converter(hint)
        f = defaults[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(
            *flags,
            dest=name,
            type=conv,
            nargs=nargs,
            default=argparse.SUPPRESS,
            metavar=_type_name(hint).upper().replace(" ", "_"),
            help=f"{helps[name]} [default: {default!r}]".replace("%", "%%"),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-cpt",
        description="Efficient continued pretraining of Qwen2.5 and other Hugging Face causal LMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "prepare",
        help="tokenize a corpus once into a memory-mapped cache that train_files can name",
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (or the model's)")
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--output", required=True, help="cache directory to create")
    p.add_argument("--workers", type=int, default=0, help="tokenizer worker processes")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet records")
    p.add_argument("--txt-split", choices=["file", "paragraph"], default="file")
    p.add_argument("--skip-bad-records", action="store_true")
    p.add_argument(
        "--clean", type=parse_bool, default=False, metavar="BOOL",
        help="first clean the input as `qwen-cpt clean` does (the clean options below), then "
        "tokenize what it keeps; its report and manifest go into the cache [default: false]",
    )  # fmt: skip
    from .clean import add_clean_options

    add_clean_options(p, skip=("workers", "text_field", "txt_split", "skip_bad_records"))

    p = sub.add_parser("train", help="train from a YAML config, with optional field overrides")
    p.add_argument("config", nargs="?", help="YAML file of CPTConfig fields")
    add_config_flags(p)

    from .planner import add_plan_parser

    add_plan_parser(sub)

    from .clean import add_clean_parser

    add_clean_parser(sub)

    p = sub.add_parser(
        "tiny-model", help="write a tiny random Qwen2.5-shaped model + real tokenizer"
    )
    p.add_argument("directory")
    p.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=176)
    p.add_argument("--vocab-size", type=int, default=151936)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "demo", help="the main job, offline on CPU: CPT of a tiny model on Python's stdlib"
    )
    p.add_argument("--output-dir", default="./demo_output")
    p.add_argument(
        "--budget", type=float, default=1.0, help="scale every step count (0.2: a quick check)"
    )

    p = sub.add_parser(
        "eval", help="score a saved model folder on lm-eval tasks, as eval_tasks does in a run"
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model folder (final/)")
    p.add_argument(
        "--tasks", nargs="+", required=True, help="lm-eval task names, task YAMLs or folders"
    )
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")

    p = sub.add_parser(
        "report", help="write report.html (charts, forgetting table, config) for runs to compare"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a run")
    p.add_argument(
        "--out", default=None, help="report .html file or directory [default: first RUN_DIR]"
    )
    return parser


_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--flag -1e-3`` becomes ``--flag=-1e-3`` for the subcommand's one-value flags.

    argparse reads a token that starts with ``-`` as an option unless it matches its own
    negative-number pattern (``-1``, ``-.5``: not ``-1e-3``), so ``--learning_rate -1e-3`` would
    fail with "expected one argument". Joined, the value reaches the flag's type and then the
    config's validation, which names the field.
    """
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    command = next((i for i, w in enumerate(argv) if not w.startswith("-")), None)
    if not subparsers or command is None or argv[command] not in subparsers[0].choices:
        return argv
    sub = subparsers[0].choices[argv[command]]
    takes_one = {
        flag
        for a in sub._actions
        if isinstance(a, argparse._StoreAction) and a.nargs is None
        for flag in a.option_strings
    }
    out = argv[: command + 1]
    i = command + 1
    while i < len(argv):
        word = argv[i]
        if word == "--":
            out += argv[i:]
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if word in takes_one and nxt is not None and _NEGATIVE_NUMBER.fullmatch(nxt):
            out.append(f"{word}={nxt}")
            i += 2
        else:
            out.append(word)
            i += 1
    return out


def _exit_status(exc: BaseException) -> int | None:
    """2 for bad input refused before training, 1 for a failure while training, None: raise."""
    from . import DataError, ModelLoadError, TrainingError
    from .checkpoint import CheckpointError, CheckpointSaveError
    from .optim import OptimizerSetupError
    from .resume import ResumeError

    if isinstance(exc, CheckpointSaveError):  # a save that failed while training
        return 1
    if isinstance(
        exc, (CheckpointError, DataError, ModelLoadError, ResumeError, OptimizerSetupError)
    ):
        return 2
    if isinstance(exc, TrainingError):  # a non-finite loss, a second train() ...
        return 1
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(join_negative_values(parser, argv))
    if args.command is None:
        parser.print_help()
        return 2
    from .trainer import setup_logging

    setup_logging()
    if os.environ.get("WORLD_SIZE", "1") != "1":  # under torchrun: a rank that crashes
        import faulthandler  # (SIGSEGV, SIGABRT) prints its Python stack before it dies

        faulthandler.enable()
    try:
        return _run(args)
    except (ConfigError, OSError) as exc:  # bad config, missing or unwritable paths
        print(f"qwen-cpt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qwen-cpt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from .trainer import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):  # documented: 128 + signal (143 for SIGTERM)
            print(f"qwen-cpt: {exc}", file=sys.stderr)
            return 128 + exc.signum
        status = _exit_status(exc)
        if status is None and _out_of_memory(exc):
            print(f"qwen-cpt: error: {_out_of_memory(exc)}", file=sys.stderr)
            return 1
        if status is None and _peer_lost(exc):
            print(f"qwen-cpt: error: {_peer_lost(exc)}", file=sys.stderr)
            return 1
        if status is None:
            raise
        print(f"qwen-cpt: error: {exc}", file=sys.stderr)
        return status


_ALLOCATION = re.compile(r"(?:tried to allocate|allocate) ([0-9.]+) ?(bytes|[KMG]i?B)", re.I)
_UNITS = {
    "bytes": 1,
    "kb": 2**10,
    "kib": 2**10,
    "mb": 2**20,
    "mib": 2**20,
    "gb": 2**30,
    "gib": 2**30,
}


def _out_of_memory(exc: BaseException) -> str | None:
    """One line for an out-of-memory error of the host (PyTorch's CPU allocator, MemoryError)
    or of a GPU (torch.OutOfMemoryError): how much was asked for and what to change."""
    import torch

    text = str(exc)
    gpu = isinstance(exc, torch.OutOfMemoryError)
    host = isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in text
    if not (gpu or host):
        return None
    asked = _ALLOCATION.search(text)
    size = ""
    if asked:
        n = float(asked.group(1)) * _UNITS.get(asked.group(2).lower(), 1)
        size = f" (an allocation of {n / 2**30:.2f} GiB failed)"
    where = "GPU" if gpu else "host"
    return (
        f"out of {where} memory{size}; lower per_device_train_batch_size or max_length, set "
        "use_gradient_checkpointing: true or fsdp_cpu_offload: true, and see `qwen-cpt plan` "
        "for what fits"
    )


# what gloo and NCCL say in a collective when another rank of the group has died
_PEER_LOST = re.compile(
    r"Connection (?:closed|reset) by peer|Broken pipe|remote process exited|"
    r"NCCL communicator was aborted|ProcessGroupNCCL.*(?:aborted|timed out)|"
    r"Socket Timeout|Timed out waiting .*for (?:send|recv)",
    re.I,
)


def _peer_lost(exc: BaseException) -> str | None:
    """Under torchrun, one line for a collective that failed because another rank died (its
    own log says why), instead of this survivor's traceback through FSDP or DCP."""
    import torch.distributed as dist

    if os.environ.get("WORLD_SIZE", "1") == "1":
        return None
    seen = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, dist.DistError) or _PEER_LOST.search(text):
            break
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    detail = text.strip().splitlines()[0] if text.strip() else type(seen).__name__
    detail = re.sub(r"^\[[^\]]*\]\s*", "", detail)  # gloo's "[.../pair.cc:553] " source tag
    detail = detail.split(". This is typically")[0].rstrip(".")
    return (
        f"rank {os.environ.get('RANK', '?')} lost contact with the group ({detail}): another "
        "rank stopped or stalled first (torchrun's lines name it); under torchrun "
        "--max-restarts the group restarts and resumes from the newest valid checkpoint"
    )


def _prepare(args: argparse.Namespace) -> int:
    from .data.cache import prepare
    from .model import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    inputs, attach, cleaned = args.input, (), None
    if args.clean:  # the clean pipeline first, then its shards are tokenized
        from .clean import clean_for_prepare

        inputs, attach, cleaned = clean_for_prepare(args)
    m = prepare(
        inputs,
        args.output,
        tokenizer,
        args.tokenizer,
        workers=args.workers,
        text_field="text" if cleaned else args.text_field,
        txt_split="file" if cleaned else args.txt_split,
        skip_bad_records=False if cleaned else args.skip_bad_records,
        attach=attach,
    )
    if cleaned:
        import shutil

        shutil.rmtree(cleaned)
    skipped = f", skipped {m['skipped_records']:,} bad records" if m["skipped_records"] else ""
    print(
        f"prepared {args.output}: {m['total_docs']:,} documents, {m['total_tokens']:,} tokens "
        f"in {m['seconds']:.1f} s ({m['tokens_per_sec']:,.0f} tokens/s){skipped}"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        names = set(field_types())
        overrides = {k: v for k, v in vars(args).items() if k in names}
        if args.config:
            cfg = CPTConfig.from_yaml(args.config, overrides)
        else:
            cfg = CPTConfig.from_dict(overrides, source="command-line flags")
        from .trainer import CPTTrainer

        loss = CPTTrainer(cfg).train()
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, from rank 0
            print(f"final average training loss: {loss:.4f}")
        return 0
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "clean":
        from .clean import run_clean

        return run_clean(args)
    if args.command == "plan":
        from .planner import run_plan

        return run_plan(args)
    if args.command == "tiny-model":
        from .model import make_tiny_model

        path = make_tiny_model(
            args.directory,
            arch=args.arch,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            intermediate_size=args.intermediate_size,
            vocab_size=args.vocab_size,
            seed=args.seed,
        )
        print(f"wrote a tiny {args.arch} model and the Qwen2.5 tokenizer to {path}")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        result = run_demo(args.output_dir, args.budget)
        return 0 if result["improved"] else 1
    if args.command == "eval":
        from .downstream import eval_command

        return eval_command(args)
    if args.command == "report":
        from .report import report_command

        return report_command(args.run_dirs, args.out)
    raise AssertionError(args.command)
