// Marks the functions written once for host and device (lse_math.h, mask.h). Under nvcc they are
// __host__ __device__; a plain C++ compiler sees ordinary inline functions.
//   RING_EXT_HOST_DEVICE     small helpers, always inlined (__forceinline__ under nvcc)
//   RING_EXT_HOST_DEVICE_FN  members of class templates and function templates (inline already),
//                            left to the compiler's inlining heuristics
#pragma once

#if defined(__CUDACC__)
#define RING_EXT_HOST_DEVICE __host__ __device__ __forceinline__
#define RING_EXT_HOST_DEVICE_FN __host__ __device__
#else
#define RING_EXT_HOST_DEVICE inline
#define RING_EXT_HOST_DEVICE_FN
#endif
