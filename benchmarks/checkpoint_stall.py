"""How long a checkpoint save blocks training (sync vs async), and what integrity hashing costs.

    .venv/bin/python benchmarks/checkpoint_stall.py           # hidden 1024 x 12 layers: 1.2 GB fp32
    .venv/bin/python benchmarks/checkpoint_stall.py --quick   # hidden 160 x 2 layers: ~100 MB

Each mode trains the same Qwen2.5-shaped model (``make_tiny_model``, 151,936 vocabulary rows,
tied head) with the real ``CPTTrainer`` for a few fp32 AdamW steps, saving every
``--save-steps``, in a fresh subprocess. ``CheckpointManager`` is wrapped, not changed:
- stall: the time from calling ``save`` to its return, which is the time the training loop is
  blocked (in async mode: staging to CPU memory, plus waiting for a previous save still in flight);
- write+commit: from calling ``save`` until ``_commit`` (manifest, fsync, rename, rotation)
  returns, which in async mode happens in the background thread; commit: ``_commit`` alone;
- "sync, sizes only" sets ``manager.checksums = False``: the manifest holds file sizes only.
The end-of-run blocking save (same step as the last periodic save) only waits for the save in
flight; it is reported apart. Then, on the sync run's last checkpoint (files in page cache, just
written): ``verify(folder)`` (xxh3-128 of every file), ``verify(folder, checksums=False)`` and
sha256 (hashlib) over the same files, the scheme before xxh3.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=2, intermediate_size=2816)
QUICK = dict(hidden_size=160, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=448)
MODES = {  # name: (async_checkpoint, checksums)
    "sync": (False, True),
    "async": (True, True),
    "sync, sizes only": (False, False),
}
GB = 1e9


def corpus(n_docs: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)
    ]
    return [" ".join(rng.choices(words, k=400)) for _ in range(n_docs)]


def run_child(spec: dict) -> dict:
    """Train in this process with the manager wrapped; return the timings of every save."""
    import qwen_cpt.checkpoint as ck
    from qwen_cpt import CPTConfig, CPTTrainer

    saves: list[dict] = []
    real_init, real_save, real_commit = (
        ck.CheckpointManager.__init__,
        ck.CheckpointManager.save,
        ck.CheckpointManager._commit,
    )

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.checksums = spec["checksums"]

    def save(self, target, *args, **kwargs):
        rec = {"target": str(target), "blocking": kwargs.get("blocking", False)}
        saves.append(rec)
        rec["t0"] = time.perf_counter()
        out = real_save(self, target, *args, **kwargs)
        rec["stall"] = time.perf_counter() - rec["t0"]
        return out

    def commit(self, tmp, target):
        t = time.perf_counter()
        real_commit(self, tmp, target)  # in the background thread for an async save
        rec = next(r for r in saves if r["target"] == str(target))
        rec["commit"], rec["done"] = time.perf_counter() - t, time.perf_counter() - rec["t0"]

    ck.CheckpointManager.__init__, ck.CheckpointManager.save = init, save
    ck.CheckpointManager._commit = commit
    cfg = CPTConfig(
        model_name_or_path=spec["model_dir"],
        output_dir=spec["out_dir"],
        max_steps=spec["max_steps"],
        save_steps=spec["save_steps"],
        save_total_limit=2,
        logging_steps=1,
        eval_steps=10**6,
        per_device_train_batch_size=1,
        max_length=spec["max_length"],
        use_gradient_checkpointing=False,
        async_checkpoint=spec["async"],
        use_bf16=False,
        use_tensorboard=False,
        device="cpu",
        validation_split=0.0,  # measure training and saving alone
    )
    t0 = time.perf_counter()
    CPTTrainer(cfg).train(corpus())
    wall = time.perf_counter() - t0
    last = ck.list_checkpoints(Path(spec["out_dir"]))[-1][1]
    size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
    rss = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if "VmHWM" in ln)
    return {
        "saves": saves,
        "wall": wall,
        "size": size,
        "last": str(last),
        "peak_kb": rss.split()[1],
    }


def time_hashes(folder: Path) -> list[tuple[str, float]]:
    from qwen_cpt.checkpoint import verify

    files = [folder / n for n in json.loads((folder / "manifest.json").read_text())["files"]]
    out = []
    for name, fn in [
        ("verify, xxh3-128 (resume default)", lambda: verify(folder)),
        ("verify, sizes only", lambda: verify(folder, checksums=False)),
        ("sha256 of the same files (hashlib)", lambda: [sha256(f) for f in files] and None),
    ]:
        t = time.perf_counter()
        if fn() is not None:
            raise SystemExit(f"{folder} does not verify")
        out.append((name, time.perf_counter() - t))
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def header(argv: list[str]) -> None:
    import torch

    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()

    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    print(f"date: {sh('date -u')}\ncommand: {' '.join([sys.executable, *argv])}")
    print(f"machine: {cpu}, nproc {sh('nproc')}, torch {torch.__version__}")
    print(f"load average at start: {os.getloadavg()}\n{sh('free -g')}\n", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~100 MB model (smoke run)")
    for key, value in FULL.items():
        ap.add_argument(
            f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}"
        )
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--save-steps", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))))
        return 0
    header(sys.argv)
    shape = {k: getattr(args, k) or v for k, v in (QUICK if args.quick else FULL).items()}
    from qwen_cpt import make_tiny_model

    rows, hashes = [], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", **shape)
        n = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        print(f"model: {shape}, vocab 151936, tied; {n / GB:.2f} GB fp32 weights")
        print(
            f"{args.max_steps} steps, save every {args.save_steps}, 1 x {args.max_length} tokens\n"
        )
        for mode, (use_async, checksums) in MODES.items():
            spec = dict(model_dir=str(model_dir), out_dir=f"{tmp}/{mode.replace(', ', '-')}")
            spec.update(max_steps=args.max_steps, save_steps=args.save_steps)
            spec.update({"async": use_async, "checksums": checksums, "max_length": args.max_length})
            cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"mode {mode!r} failed (exit {proc.returncode})")
            r = json.loads(line[len("RESULT ") :])
            rows.append((mode, r))
            print(f"done: {mode} ({r['wall']:.1f} s)", file=sys.stderr, flush=True)
            if mode == "sync":
                hashes = time_hashes(Path(r["last"]))

    print(
        "| mode | saves | median stall per save (s) | median write+commit (s) | "
        "median commit (s) | each stall (s) | end-of-run wait (s) | run wall (s) | checkpoint (GB) "
        "| peak RSS (GB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, r in rows:
        done = [s for s in r["saves"] if "done" in s and not s["blocking"]]
        end = [s["stall"] for s in r["saves"] if "done" not in s]
        med = {k: statistics.median(s[k] for s in done) for k in ("stall", "done", "commit")}
        each = ", ".join(f"{s['stall']:.2f}" for s in done)
        print(
            f"| {mode} | {len(done)} | {med['stall']:.2f} | {med['done']:.2f} | "
            f"{med['commit']:.2f} | {each} | {sum(end):.2f} | {r['wall']:.1f} | {r['size'] / GB:.2f} | "
            f"{int(r['peak_kb']) * 1024 / GB:.1f} |"
        )
    size = rows[0][1]["size"]
    print(f"\n| check of one checkpoint ({size / GB:.2f} GB, page cache warm) | time (s) | GB/s |")
    print("|---|---|---|")
    for name, t in hashes:
        print(f"| {name} | {t:.2f} | {size / GB / t:.2f} |")
    print(f"\nload average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
