// y = relu(x)^2, the MLP activation: the launcher of the CUDA kernel (relu_squared_kernel.cu).
//
// The kernel file includes no torch header so that nvcc, which parses it once per target architecture,
// stays fast; relu_squared_cuda.cpp does the tensor checks and calls this launcher.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace nanotrain {

enum class ReluSquaredDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// y[i] = x[i] < 0 ? 0 : x[i] * x[i] for i < n (computed in fp32 for 16-bit inputs, rounded once).
// x and y are contiguous device arrays of n elements of `dtype`. Returns the launch's error code.
cudaError_t launch_relu_squared(const void* x, void* y, int64_t n, ReluSquaredDtype dtype, cudaStream_t stream);

}  // namespace nanotrain
