"""Deployment validation: `python -m ryzen_llm.doctor`.

Prints the CPU's features, the torch build, CUDA devices, whether ryzen_llm._C loaded, and for
every fused op on every available device a quick self-check against its plain-PyTorch reference
(forward and backward), and level 4's int8 GEMMs (the own kernel and torch._int_mm) against exact
integer sums. Exits 1 when something that was asked for is broken: the extension
(always), a fused op that is built but disagrees with its reference, or a device named with
--device that is not there.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from ryzen_llm.hardware import cpu_flags, environment
from ryzen_llm.ops._extension import (
    embeds_libstdcxx, extension_error, extension_loaded, libstdcxx_owner,
)
from ryzen_llm.ops.dispatch import LEVEL_OF_OP, LEVELS, OP_SPECS, KernelSet, resolve


def _flatten(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


def self_check(op: str, device: str) -> tuple[bool, str]:
    """Fused vs reference on one device: forward outputs and input gradients, fp32."""
    sample = OP_SPECS[op].sample_inputs
    if sample is None:
        return True, "no self-check here (optimizer, generation or int8 op): checked by its tests"
    args = sample(device, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # other ops falling back is not this check's business
        warnings.simplefilter("ignore")
        fused_kernels = KernelSet(3, overrides={op: "fused"})
    results = []
    for fn in (getattr(fused_kernels, op), OP_SPECS[op].reference):
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        for t in tensors:
            t.grad = None
        outs = _flatten(fn(*args))
        sum(o.float().sum() * (i + 1) for i, o in enumerate(outs)).backward()
        results.append([o.detach() for o in outs] + [t.grad.clone() for t in tensors])
    worst = max(
        ((a.double() - b.double()).abs().max() / (1 + b.double().abs().max())).item()
        for a, b in zip(*results)
    )
    return worst < 1e-4, f"max relative difference {worst:.1e}"


def int8_gemm_check() -> tuple[bool, str]:
    """Level 4's int8 GEMM on the CPU: the own kernel and torch._int_mm against exact integer
    sums, on an awkward shape."""
    from ryzen_llm.ops import reference
    from ryzen_llm.ops.linear import set_int8_gemm

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (37, 45), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (29, 45), generator=g, dtype=torch.int8).t()
    wrong = []
    old = set_int8_gemm("own")
    try:
        for impl in ("own", "onednn"):
            set_int8_gemm(impl)
            if not torch.equal(torch.ops.ryzen_llm.int8_mm(a, b), reference.int8_matmul(a, b)):
                wrong.append(impl)
    finally:
        set_int8_gemm(old)
    own = ("AVX512-VNNI" if "avx512_vnni" in cpu_flags()
           else "plain loops: no AVX512-VNNI here, so level 4 runs torch._int_mm")
    if wrong:
        return False, f"{' and '.join(wrong)} differ from the exact integer sums"
    return True, f"own kernel ({own}) and torch._int_mm: exact"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ryzen_llm.doctor", description=__doc__)
    parser.add_argument("--device", action="append", choices=("cpu", "cuda"),
                        help="devices that must be present and pass (default: all available)")
    args = parser.parse_args(argv)
    env = environment()
    ok = True
    print(f"CPU:        {env['cpu']} ({env['logical_cpus']} logical CPUs, "
          f"torch uses {env['torch_threads']} threads)")
    print(f"CPU flags:  {' '.join(env['cpu_flags']) or 'unknown'}")
    print(f"native bf16: {'yes' if env['native_bf16'] else 'no'} "
          f"(level 3 {'uses' if env['native_bf16'] else 'does not use'} bf16 autocast)")
    print(f"torch:      {env['torch']} (CPU capability {env['torch_cpu_capability']}, "
          f"CUDA {env['cuda'] or 'none'})")
    print(f"CUDA devices: {', '.join(env['cuda_devices']) or 'none'}")
    if extension_loaded():
        print("extension:  ryzen_llm._C loaded")
        if embeds_libstdcxx():
            print("[FAIL] the extension carries its own copy of libstdc++ (its compiler linked it "
                  "statically): an error message that formats a number can crash the process. "
                  "Rebuild with the system compiler, e.g. CXX=g++ CC=gcc pip install "
                  "--no-build-isolation -e .")
            ok = False
        else:
            print(f"libstdc++:  {libstdcxx_owner() or 'unknown'}")
    else:
        print(f"extension:  NOT LOADED: {extension_error()}")
        ok = False
    choices = resolve(max(LEVELS)) if extension_loaded() else {}
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("[FAIL] cuda: requested with --device but no CUDA device is available")
            ok = False
            continue
        for op in LEVEL_OF_OP:
            choice = choices.get(op)
            if choice is None or choice.impl != "fused":
                why = choice.reason if choice else "extension not loaded"
                print(f"[ -- ] {device:<4} {op:<22} fused kernel unavailable ({why})")
                continue
            try:
                passed, detail = self_check(op, device)
            except Exception as exc:  # a broken kernel must be reported, not crash the doctor
                passed, detail = False, f"{type(exc).__name__}: {exc}"
            ok &= passed
            print(f"[{'PASS' if passed else 'FAIL'}] {device:<4} {op:<22} {detail}")
    if extension_loaded() and "cpu" in devices:
        try:
            passed, detail = int8_gemm_check()
        except Exception as exc:
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        ok &= passed
        print(f"[{'PASS' if passed else 'FAIL'}] cpu  {'int8 GEMM (level 4)':<22} {detail}")
    print("all requested parts work" if ok else "some requested parts are broken (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
