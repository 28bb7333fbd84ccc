"""Compile every Triton kernel variant that the GPU tests and benchmarks launch, in parallel processes, into
Triton's on-disk cache, so the timed steps after it do not compile them one at a time (each fused conv1
variant is a long compile; there are dtypes x modes x autotune candidates of them).

    python benchmarks/gpu/warm_cache.py [WORKERS]

Each variant is compiled through the launchers' ``warmup`` path with the same specialization as a real
launch (do_not_specialize sizes, 16-byte aligned tensors), so later launches find it in the cache.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import sys
import time

DTYPES = ("float16", "bfloat16", "float32", "float32-ieee")


def _variants():
    from zfserve.kernels import triton_conv1, triton_unpool
    for dtype in DTYPES:
        for flag in (False, True):
            for index in range(len(triton_conv1.CONFIGS)):
                yield "conv", dtype, flag, index
            if dtype != "float32-ieee":  # the unpool has no matmul: fp32 is one variant
                for index in range(len(triton_unpool.CONFIGS)):
                    yield "unpool", dtype, flag, index


def _compile(variant) -> str:
    import torch

    from zfserve.kernels import triton_conv1, triton_unpool
    kind, dtype_name, flag, index = variant
    dtype = getattr(torch, dtype_name.split("-")[0])
    torch.backends.cudnn.allow_tf32 = not dtype_name.endswith("ieee")  # the conv kernel reads this flag
    start = time.perf_counter()
    if kind == "conv":
        x = torch.randn(1, 3, 23, 29, device="cuda", dtype=dtype)
        w = torch.randn(96, 3, 7, 7, device="cuda", dtype=dtype)
        b = torch.randn(96, device="cuda", dtype=dtype)
        triton_conv1.conv1_relu_pool_triton(x, w, b, return_conv=flag, config=triton_conv1.CONFIGS[index],
                                            warmup=True)
    else:
        pooled = torch.randn(1, 2, 13, 13, device="cuda", dtype=dtype)
        switches = torch.zeros(1, 2, 13, 13, device="cuda", dtype=torch.int8)
        triton_unpool.unpool_sum_triton(pooled, switches, (26, 26), relu=flag, config=triton_unpool.CONFIGS[index],
                                        warmup=True)
    return f"{kind} {dtype_name} flag={flag} config={index}: {time.perf_counter() - start:.1f}s"


def main(workers: int) -> int:
    variants = list(_variants())
    start = time.perf_counter()
    failed = 0
    context = multiprocessing.get_context("spawn")  # CUDA does not survive fork
    with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for variant, job in [(v, pool.submit(_compile, v)) for v in variants]:
            try:
                print(job.result(), flush=True)
            except Exception as exc:  # report and go on: the run compiles it lazily then
                failed += 1
                print(f"FAILED {variant}: {type(exc).__name__}: {exc}"[:500], flush=True)
    print(f"{len(variants) - failed}/{len(variants)} variants compiled in {time.perf_counter() - start:.0f}s "
          f"with {workers} workers")
    return 1 if failed else 0


if __name__ == "__main__":
    default = max(1, min(12, (os.cpu_count() or 2) - 2))
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else default))
