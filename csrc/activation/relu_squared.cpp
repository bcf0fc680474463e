// torch.ops.nanotrain.relu_squared on CPU tensors: y = relu(x)^2, 16-bit types computed in fp32 and rounded
// once (the same numbers as torch.relu(x).square()). It is the CPU twin of the CUDA kernel, so the op's
// dispatch, schema and fake can be checked (opcheck) on machines without a GPU.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>

namespace nanotrain {
namespace {

at::Tensor relu_squared_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "relu_squared: x must be a CPU tensor here, got ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_squared", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = y.mutable_data_ptr<scalar_t>();
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) {
      const acc_t a = static_cast<acc_t>(src[i]);
      dst[i] = static_cast<scalar_t>(a < acc_t(0) ? acc_t(0) : a * a);  // NaN stays NaN
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(nanotrain, CPU, m) {
  m.impl("relu_squared", &relu_squared_cpu);
}

}  // namespace nanotrain
