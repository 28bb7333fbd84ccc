"""Compile the Triton kernels for a Hopper GPU (sm_90) on a machine without one, and report each variant's
registers, spills and matrix instructions: the checks the interpreter cannot do (it accepts code the GPU
compiler rejects, and says nothing about register pressure).

    TRITON_INTERPRET=0 python benchmarks/gpu/compile_check.py            # every variant
    TRITON_INTERPRET=0 python benchmarks/gpu/compile_check.py conv:fp16:0:conv unpool:fp32:1:relu

A variant is ``conv:<fp16|bf16|fp32|fp32ieee>:<candidate>:<conv|noconv>`` or
``unpool:<fp16|bf16|fp32>:<candidate>:<relu|norelu>``. Needs triton's bundled ptxas (any triton wheel for
x86-64 Linux has it); exits 1 if a variant fails to compile.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # must hold before the kernels are imported

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from zfserve.kernels import triton_conv1, triton_unpool  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SIZE_ARGS = {name: "i32" for name in triton_conv1.SIZE_ARGS}


def _ptxas_report(ptx: str) -> str:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for exe in ("ptxas", "ptxas-blackwell"):  # the older one rejects newer PTX versions
            result = subprocess.run([os.path.join(bindir, exe), "-v", "--gpu-name", "sm_90a", src, "-o",
                                     os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
            if result.returncode == 0:
                lines = [line.split(":", 1)[-1].strip() for line in result.stderr.splitlines()
                         if "registers" in line or "spill" in line]
                return "; ".join(lines)
    return "ptxas failed: " + result.stderr.strip()[-200:]


def _compile(fn, signature: dict, constants: dict, config):
    signature = dict(signature, **{name: "constexpr" for name in constants})
    return triton.compile(ASTSource(fn, signature, constants), target=TARGET,
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def compile_variant(spec: str):
    kind, dtype, index, mode = spec.split(":")
    ptr = "*fp32" if dtype.startswith("fp32") else f"*{dtype}"
    if kind == "conv":
        config = triton_conv1.CONFIGS[int(index)]
        signature = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "pooled_ptr": ptr, "switch_ptr": "*i8",
                     "conv_ptr": ptr, **SIZE_ARGS}
        constants = dict(C_IN=3, KS=7, STRIDE=2, NPAD=triton_conv1.CHANNEL_PAD, RETURN_CONV=mode == "conv",
                         UPCAST=False, IEEE=dtype == "fp32ieee", **config.kwargs)
        return config, _compile(triton_conv1.conv1_relu_pool_kernel.fn, signature, constants, config)
    config = triton_unpool.CONFIGS[int(index)]
    signature = {"pooled_ptr": ptr, "switch_ptr": "*i8", "out_ptr": ptr, "PH": "i32", "PW": "i32", "OH": "i32",
                 "OW": "i32"}
    constants = dict(RELU=mode == "relu", INTERPRETED=False, BLOCK_W=128, **config.kwargs)
    return config, _compile(triton_unpool.unpool_sum_kernel.fn, signature, constants, config)


def all_variants():
    for dtype in ("fp16", "bf16", "fp32", "fp32ieee"):
        for index in range(len(triton_conv1.CONFIGS)):
            for mode in ("noconv", "conv"):
                yield f"conv:{dtype}:{index}:{mode}"
    for dtype in ("fp16", "bf16", "fp32"):
        for index in range(len(triton_unpool.CONFIGS)):
            yield f"unpool:{dtype}:{index}:relu"


def main(specs) -> int:
    print(f"triton {triton.__version__}, target sm_90", flush=True)
    failed = 0
    for spec in specs or all_variants():
        start = time.perf_counter()
        try:
            config, kernel = compile_variant(spec)
        except Exception as exc:
            failed += 1
            print(f"{spec}: FAILED {type(exc).__name__}: {exc}"[:2000], flush=True)
            continue
        ptx = kernel.asm["ptx"]
        ops = f"wgmma {ptx.count('wgmma.mma_async')}, mma.sync {len(re.findall(r'mma.sync', ptx))}"
        print(f"{spec} {config.kwargs} warps={config.num_warps} stages={config.num_stages}: shared "
              f"{kernel.metadata.shared} B; {_ptxas_report(ptx)}; {ops}; {time.perf_counter() - start:.0f}s",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
