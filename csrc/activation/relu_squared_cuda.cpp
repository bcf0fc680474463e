// torch.ops.nanotrain.relu_squared on CUDA tensors: checks, allocation, and the launch on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "relu_squared.h"

namespace nanotrain {
namespace {

at::Tensor relu_squared_cuda(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.is_cuda(), "relu_squared: x must be a CUDA tensor here, got ", x_in.device());
  ReluSquaredDtype dtype;
  switch (x_in.scalar_type()) {
    case at::kFloat:
      dtype = ReluSquaredDtype::kFloat32;
      break;
    case at::kDouble:
      dtype = ReluSquaredDtype::kFloat64;
      break;
    case at::kHalf:
      dtype = ReluSquaredDtype::kFloat16;
      break;
    case at::kBFloat16:
      dtype = ReluSquaredDtype::kBFloat16;
      break;
    default:
      TORCH_CHECK(false, "relu_squared: x must be float32, float64, float16 or bfloat16, got ", x_in.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const cudaError_t err = launch_relu_squared(x.const_data_ptr(), y.mutable_data_ptr(), x.numel(), dtype,
                                              c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "relu_squared: CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(nanotrain, CUDA, m) {
  m.impl("relu_squared", &relu_squared_cuda);
}

}  // namespace nanotrain
