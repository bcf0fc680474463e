// CUDA implementations of the Muon products from the ahead-of-time compiled Triton kernels
// (kernels/newton_schulz.py: _sym_matmul_kernel, _axpby_matmul_kernel; the variants are listed in
// kernels/_aot.py). Their Python twins are kernels/newton_schulz.py sym_matmul and axpby_matmul; the grids
// here are theirs. Schemas: csrc/registration.cpp; fakes: nanotrain/ops/_ext.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "aot/launcher.h"
#include "aot_args.h"

namespace nanotrain::muon {
namespace {

using at::Tensor;
namespace aot = nanotrain::aot;

void check_operand(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "nanotrain.aot_muon: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3, "nanotrain.aot_muon: ", name, " must be a (batch, rows, cols) stack, got ",
              t.dim(), " dims");
  TORCH_CHECK(t.device() == like.device(), "nanotrain.aot_muon: ", name, " is on ", t.device(), ", expected ",
              like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "nanotrain.aot_muon: ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
}

[[noreturn]] void no_cubin(const char* kernel, const std::string& arch, std::initializer_list<aot::Constexpr> f) {
  TORCH_CHECK(false, "nanotrain: no ahead-of-time cubin serves ", aot::describe_call(kernel, arch, f),
              " for this call's dtype, strides or alignment; the triton backend serves it "
              "(NANOTRAIN_KERNELS=muon=triton)");
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out = alpha * P @ S^T + beta * Z + gamma * I, for a result known to be symmetric (see sym_matmul).
void aot_sym_matmul(const Tensor& P, const Tensor& S, const Tensor& out, double alpha, const std::optional<Tensor>& Z,
                    double beta, double gamma) {
  check_operand(P, "P", P);
  check_operand(S, "S", P);
  check_operand(out, "out", P);
  TORCH_CHECK(S.sizes() == P.sizes(), "nanotrain.aot_muon: S must have P's shape ", P.sizes(), ", got ",
              S.sizes());
  const int64_t B = P.size(0), M = P.size(1), K = P.size(2);
  TORCH_CHECK(out.size(0) == B && out.size(1) == M && out.size(2) == M, "nanotrain.aot_muon: out must be (", B,
              ", ", M, ", ", M, "), got ", out.sizes());
  const Tensor& zz = Z.has_value() ? *Z : out;
  if (Z.has_value()) {
    check_operand(*Z, "Z", P);
    TORCH_CHECK(Z->sizes() == out.sizes(), "nanotrain.aot_muon: Z must have out's shape ", out.sizes(), ", got ",
                Z->sizes());
    TORCH_CHECK(Z->data_ptr() != out.data_ptr(), "nanotrain.aot_muon: out must not alias Z");
  }
  TORCH_CHECK(out.data_ptr() != P.data_ptr() && out.data_ptr() != S.data_ptr(),
              "nanotrain.aot_muon: out must not alias P or S");
  c10::cuda::CUDAGuard guard(P.device());
  const int device = P.get_device();
  aot::SymMatmulArgs args{P, S, zz, out, M, K,
                          P.stride(0), P.stride(1), P.stride(2), S.stride(0), S.stride(1), S.stride(2),
                          zz.stride(0), zz.stride(1), zz.stride(2), out.stride(0), out.stride(1), out.stride(2),
                          alpha, beta, gamma};
  const auto values = aot::values(args);
  const std::string arch = aot::device_arch(device);
  std::initializer_list<aot::Constexpr> flags = {{"HAS_Z", Z.has_value()}, {"HAS_I", gamma != 0.0}};
  const aot::Variant* v = aot::find(aot::kSymMatmulKernel, arch, flags, values.data(), values.size());
  if (v == nullptr) no_cubin(aot::kSymMatmulKernel, arch, flags);
  const int64_t T = cdiv(M, aot::constexpr_of(*v, "BLOCK_M"));
  aot::launch(*v, device, c10::cuda::getCurrentCUDAStream(device).stream(),
              {static_cast<uint32_t>(T * (T + 1) / 2), static_cast<uint32_t>(B), 1u}, values.data(), values.size());
}

// out = alpha * X + B @ X, or B @ X when alpha is None (see axpby_matmul).
void aot_axpby_matmul(const Tensor& Bm, const Tensor& X, const Tensor& out, std::optional<double> alpha) {
  check_operand(X, "X", X);
  check_operand(Bm, "B", X);
  check_operand(out, "out", X);
  const int64_t Bn = X.size(0), M = X.size(1), N = X.size(2);
  TORCH_CHECK(Bm.size(0) == Bn && Bm.size(1) == M && Bm.size(2) == M, "nanotrain.aot_muon: B must be (", Bn, ", ",
              M, ", ", M, "), got ", Bm.sizes());
  TORCH_CHECK(out.sizes() == X.sizes(), "nanotrain.aot_muon: out must have X's shape ", X.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(out.data_ptr() != X.data_ptr() && out.data_ptr() != Bm.data_ptr(),
              "nanotrain.aot_muon: out must not alias B or X");
  c10::cuda::CUDAGuard guard(X.device());
  const int device = X.get_device();
  aot::AxpbyMatmulArgs args{Bm, X, out, M, N, Bm.stride(0), Bm.stride(1), Bm.stride(2),
                            X.stride(0), X.stride(1), X.stride(2), out.stride(0), out.stride(1), out.stride(2),
                            alpha.value_or(0.0)};
  const auto values = aot::values(args);
  const std::string arch = aot::device_arch(device);
  std::initializer_list<aot::Constexpr> flags = {{"ADD_X", alpha.has_value()}};
  const aot::Variant* v = aot::find(aot::kAxpbyMatmulKernel, arch, flags, values.data(), values.size());
  if (v == nullptr) no_cubin(aot::kAxpbyMatmulKernel, arch, flags);
  const int64_t tiles = cdiv(M, aot::constexpr_of(*v, "BLOCK_M")) * cdiv(N, aot::constexpr_of(*v, "BLOCK_N"));
  aot::launch(*v, device, c10::cuda::getCurrentCUDAStream(device).stream(),
              {static_cast<uint32_t>(tiles), static_cast<uint32_t>(Bn), 1u}, values.data(), values.size());
}

}  // namespace

TORCH_LIBRARY_IMPL(nanotrain, CUDA, m) {
  m.impl("aot_sym_matmul", &aot_sym_matmul);
  m.impl("aot_axpby_matmul", &aot_axpby_matmul);
}

}  // namespace nanotrain::muon
