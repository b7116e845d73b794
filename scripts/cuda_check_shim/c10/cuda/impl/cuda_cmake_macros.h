// Stand-in for the header that CUDA builds of torch generate at their build time and CPU builds
// do not ship. Used only by scripts/check_cuda_compile.sh, which compiles the CUDA sources
// against a CPU torch's headers; real CUDA builds use torch's own copy.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
