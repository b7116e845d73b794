"""What the machine offers: CPU features, native bf16, and a one-line environment summary."""
from __future__ import annotations

import os
import platform

import torch

# The flags that matter for the kernels, in the order people look for them.
RELEVANT_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "sve", "bf16",
)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (empty where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_native_bf16() -> bool:
    """True where bf16 matrix math runs in hardware (AMX, AVX512-BF16 or Arm BF16)."""
    flags = cpu_flags()
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def environment() -> dict:
    """The facts a measurement needs beside it."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cpu_flags": [f for f in RELEVANT_FLAGS if f in flags],
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "python": platform.python_version(),
        "native_bf16": has_native_bf16(),
    }
