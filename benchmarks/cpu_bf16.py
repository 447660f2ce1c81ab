"""Is bf16 faster than fp32 on this CPU? (decides `use_bf16` on CPU; see model.resolve_runtime)

    .venv/bin/python benchmarks/cpu_bf16.py

Times a 1024^3 matmul and the tiny model's LM head (256 tokens x 151,936 vocab) in fp32 and
bf16, and prints whether the CPU reports native bf16 (AMX / AVX512-BF16).
"""

import time

import torch
import torch.nn.functional as F

from qwen_cpt.model import cpu_has_native_bf16


def gflops(fn, flop: float, repeat: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return flop * repeat / (time.perf_counter() - t) / 1e9


def main() -> None:
    print(
        f"threads {torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"native bf16: {cpu_has_native_bf16()}"
    )
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        h, w = torch.randn(256, 128, dtype=dtype), torch.randn(151936, 128, dtype=dtype)
        mm = gflops(lambda a=a, b=b: a @ b, 2 * 1024**3)
        head = gflops(lambda h=h, w=w: F.linear(h, w), 2 * 256 * 128 * 151936)
        print(f"{str(dtype):15s} matmul 1024^3 {mm:7.1f} GFLOP/s   LM head {head:7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
