"""Deterministic training settings and a record of the machine that trained a model.

CPU training is not bit-reproducible across machines: oneDNN (MKL-DNN) and MKL pick kernels by the
CPU's instruction set (AVX2, AVX-512, AMX) and block them by cache size, so sums run in another
order. What can be fixed is fixed here (seeds, thread count, torch's deterministic algorithms);
what cannot is recorded (CPU model and the ISA flags that change kernels, torch build, oneDNN
version, the environment variables that cap kernels), so ``metrics.json`` says where a model's
figures came from. Tests therefore check what a model learned, never exact figures.
"""

from __future__ import annotations

import os
import platform
import random
import re

import numpy as np
import torch

# CPU flags that change which oneDNN / MKL / ATen kernels run (from /proc/cpuinfo "flags").
_ISA_PATTERN = re.compile(r"^(sse4_2|fma|f16c|avx|avx2|avx512\w*|avx_vnni\w*|amx\w*)$")
# Environment variables that cap or pin kernels and threads; recorded when set.
KERNEL_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
              "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def make_deterministic(seed: int, threads: int) -> None:
    """Seed every generator, fix the intra-op thread count and ask torch for deterministic kernels.

    ``warn_only``: torch warns instead of raising for the few ops without a deterministic version.
    The thread count matters on CPU too: reductions are split per thread. Filling uninitialised
    memory with NaN (on by default with deterministic algorithms) only helps to find reads of
    uninitialised memory and cost ~30 % CPU per ResNet-18 training step here: off.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def cpu_info() -> dict:
    """CPU model and the instruction-set flags that select kernels (Linux /proc/cpuinfo; else platform)."""
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = sorted(f for f in value.split() if _ISA_PATTERN.match(f))
    model = model or platform.processor() or platform.machine()
    return {"model": model, "machine": platform.machine(), "logical_cpus": os.cpu_count(), "isa_flags": flags}


def torch_build() -> dict:
    """torch version and the kernel libraries it was built with (from ``torch.__config__.show()``)."""
    config = torch.__config__.show()

    def find(pattern: str) -> str | None:
        match = re.search(pattern, config)
        return match.group(1).strip() if match else None

    return {"version": torch.__version__,
            "onednn": find(r"MKL-DNN (v[\d.]+(?: \(Git Hash \w+\))?)"),
            "mkl": find(r"Math Kernel Library Version ([^\n]+?) for"),
            "openmp": find(r"OpenMP (\d+)"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_enabled": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled}


def runtime_record(seed: int) -> dict:
    """Everything above plus the settings in force, for ``metrics.json`` and the model card."""
    return {"cpu": cpu_info(), "torch": torch_build(), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "seed": seed,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}
