// FASTNN_HD: marks the math shared by the CPU and CUDA kernels (host + device under nvcc, inline on the host).
#pragma once

#if defined(__CUDACC__)
#define FASTNN_HD __host__ __device__ __forceinline__
#else
#define FASTNN_HD inline
#endif
