// y = relu(x)^2 on CUDA: one pass over memory, 16-byte vector loads and stores where the pointers allow.
// No torch header here (see relu_squared.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "relu_squared.h"

namespace nanotrain {
namespace {

template <typename T>
struct Math;  // to/from the type the arithmetic is done in

template <>
struct Math<float> {
  __device__ static float up(float v) { return v; }
  __device__ static float down(float v) { return v; }
};
template <>
struct Math<double> {
  __device__ static double up(double v) { return v; }
  __device__ static double down(double v) { return v; }
};
template <>
struct Math<__half> {
  __device__ static float up(__half v) { return __half2float(v); }
  __device__ static __half down(float v) { return __float2half_rn(v); }
};
template <>
struct Math<__nv_bfloat16> {
  __device__ static float up(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 down(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ T relu_squared_one(T v) {
  const auto a = Math<T>::up(v);
  // `a < 0` is false for NaN, so NaN propagates like torch.relu(x).square().
  return Math<T>::down(a < decltype(a)(0) ? decltype(a)(0) : a * a);
}

// kVec elements per 16-byte access; each thread strides over whole vectors, the tail is done per element.
template <typename T>
__global__ void relu_squared_kernel(const T* __restrict__ x_ptr, T* __restrict__ y_ptr, int64_t n, bool vectorized) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail_start = 0;
  if (vectorized) {
    const int64_t num_vec = n / kVec;
    for (int64_t v = tid; v < num_vec; v += stride) {
      uint4 bits = reinterpret_cast<const uint4*>(x_ptr)[v];
      T* vals = reinterpret_cast<T*>(&bits);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        vals[j] = relu_squared_one(vals[j]);
      }
      reinterpret_cast<uint4*>(y_ptr)[v] = bits;
    }
    tail_start = num_vec * kVec;
  }
  for (int64_t i = tail_start + tid; i < n; i += stride) {
    y_ptr[i] = relu_squared_one(x_ptr[i]);
  }
}

template <typename T>
cudaError_t launch(const void* x, void* y, int64_t n, cudaStream_t stream) {
  if (n == 0) {
    return cudaSuccess;
  }
  constexpr int kThreads = 256;
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0;
  const int64_t work = vectorized ? std::max<int64_t>(n / kVec, 1) : n;
  // Enough blocks to fill any current GPU several times over; the grid-stride loop covers the rest.
  const int blocks = static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, 65536));
  relu_squared_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), n,
                                                          vectorized);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_relu_squared(const void* x, void* y, int64_t n, ReluSquaredDtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case ReluSquaredDtype::kFloat32:
      return launch<float>(x, y, n, stream);
    case ReluSquaredDtype::kFloat64:
      return launch<double>(x, y, n, stream);
    case ReluSquaredDtype::kFloat16:
      return launch<__half>(x, y, n, stream);
    case ReluSquaredDtype::kBFloat16:
      return launch<__nv_bfloat16>(x, y, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace nanotrain
