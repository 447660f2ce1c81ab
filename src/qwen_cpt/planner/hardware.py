"""Hardware: the GPU table (datasheet peaks, memory) and the wall-clock time of a run."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import PlannerError, _positive

# torchtitan Llama-3.1-8B on H100 with torch.compile: about 39% MFU
# (docs/design.md, "Throughput anchors and MFU")
DEFAULT_MFU = 0.4


# --- hardware and time -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # bf16 dense, datasheet
    memory_gib: float  # total, as nvidia-smi reports it
    note: str = ""


GPUS: dict[str, GPU] = {
    "H100": GPU("H100", 989.0, 79.6, "SXM, bf16 dense"),
    "H200": GPU("H200", 989.0, 140.4, "bf16 dense spec; a bf16 8192^3 matmul measured 790"),
    "A100": GPU("A100", 312.0, 80.0, "80 GB"),
    "A100-40GB": GPU("A100-40GB", 312.0, 40.0),
    "A10G": GPU("A10G", 125.0, 22.5, "NVIDIA's A10 figure; AWS's A10G is reported lower"),
    "L40S": GPU("L40S", 362.0, 45.0),
    "RTX4090": GPU("RTX4090", 165.0, 24.0),
}


def lookup_gpu(name: str) -> GPU:
    key = re.sub(r"[\s_]", "", name).upper().replace("RTX", "")
    for gpu_name, gpu in GPUS.items():
        if key == gpu_name.upper().replace("RTX", ""):
            return gpu
    raise PlannerError(f"--gpu: unknown GPU {name!r} (known: {', '.join(GPUS)})")


def estimate_seconds(
    tokens: float, flops_token: float, n_devices: int, peak_tflops: float, mfu: float = DEFAULT_MFU
) -> float:
    """Wall-clock seconds: ``tokens * flops/token / (devices * peak * MFU)``.

    MFU counts model FLOPs (:func:`flops_per_token`), so the recomputation of gradient
    checkpointing (about a third more work) has to be inside the MFU assumed.
    """
    _positive(tokens=tokens, flops_token=flops_token, n_devices=n_devices, peak_tflops=peak_tflops)
    if not 0 < mfu <= 1:
        raise PlannerError(f"mfu: must be in (0, 1], got {mfu}")
    return tokens * flops_token / (n_devices * peak_tflops * 1e12 * mfu)
