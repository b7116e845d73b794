"""The one build of ryzen_llm._C.

csrc/python_module.cpp, csrc/registration.cpp and csrc/cpu/*.cpp are always compiled; csrc/cuda/*.cu are added when the
torch in the build environment has CUDA and nvcc is found (RYZEN_LLM_CUDA=1 forces them on,
RYZEN_LLM_CUDA=0 off). The compiled extension only works with the torch it was built against, so
the runtime dependency on torch is pinned to that exact release.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("RYZEN_LLM_CUDA", "auto").lower()
    if flag in ("0", "off", "false"):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "on", "true"):
        if not available:
            raise RuntimeError(
                "RYZEN_LLM_CUDA=1 but the build torch has no CUDA "
                f"(torch {torch.__version__}, CUDA_HOME={CUDA_HOME})"
            )
        return True
    return available


def _extension():
    sources = ["csrc/python_module.cpp", "csrc/registration.cpp", "csrc/decode_block.cpp"] + sorted(
        glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-DRYZEN_LLM_EXTENSION"]
    extra = {"cxx": cxx}
    kwargs = dict(
        name="ryzen_llm._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if _want_cuda():
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
        # Ampere and Hopper unless TORCH_CUDA_ARCH_LIST says otherwise; torch's build turns the
        # list into -gencode flags (without it, it would build only for the GPUs it can see).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # No --use_fast_math: quantize_blockwise must round bit for bit like the CPU kernel (no
        # flush to zero, IEEE division), and GELU/softmax use the accurate erfc/exp.
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DRYZEN_LLM_CUDA"]
        extra["cxx"] = cxx + ["-DRYZEN_LLM_CUDA"]
        return CUDAExtension(extra_compile_args=extra, **kwargs)
    return CppExtension(extra_compile_args=extra, **kwargs)


_torch_release = torch.__version__.split("+")[0]

setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[
        f"torch=={_torch_release}",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "psutil>=5.9",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "prometheus_client>=0.20",
        "cachetools>=5.3",
        "aiohttp>=3.9",  # the load generator (ryzen_llm.loadtest)
        # `pytest benchmarks --benchmark-only` works right after `pip install -e .`
        "pytest>=7.4",
        "pytest-benchmark>=4.0",
    ],
    extras_require={
        "test": ["expecttest", "httpx>=0.25"],
        # the Hugging Face generate() peer of benchmarks/bench_generate.py and torchao's int8
        # mixed-precision training peer of bench_train_step.py; without them those peers are
        # reported as "not measured"
        "bench": ["transformers>=4.40", "torchao>=0.14"],
    },
)
