// CUDA implementations of the Muon products and of the Muon step's elementwise and reduction stages from the
// ahead-of-time compiled Triton kernels (kernels/newton_schulz.py: _sym_matmul_kernel, _axpby_matmul_kernel,
// _muon_momentum_kernel, _muon_eq_scale_kernel, _scale_cast_kernel, _sumsq_rows_kernel, _normuon_scale_kernel,
// _muon_apply_kernel; the variants are listed in kernels/_aot.py). Their Python twins are the same-named launchers
// of kernels/newton_schulz.py; the grids, block sizes and warps here are theirs. Schemas: csrc/registration.cpp;
// fakes: nanotrain/ops/_ext.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

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

using aot::cdiv;

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
  const aot::Variant& v = aot::require(aot::kSymMatmulKernel, arch, flags, values.data(), values.size(), "muon=triton");
  const int64_t T = cdiv(M, aot::constexpr_of(v, "BLOCK_M"));
  aot::launch(v, device, c10::cuda::getCurrentCUDAStream(device).stream(),
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
  const aot::Variant& v =
      aot::require(aot::kAxpbyMatmulKernel, arch, flags, values.data(), values.size(), "muon=triton");
  const int64_t tiles = cdiv(M, aot::constexpr_of(v, "BLOCK_M")) * cdiv(N, aot::constexpr_of(v, "BLOCK_N"));
  aot::launch(v, device, c10::cuda::getCurrentCUDAStream(device).stream(),
              {static_cast<uint32_t>(tiles), static_cast<uint32_t>(Bn), 1u}, values.data(), values.size());
}

// ----------------------------------------------------------------------------------------------------------------
// The Muon step around the iteration (kernels/newton_schulz.py muon_momentum ... muon_apply). Their launchers derive
// the block sizes from the shape (_rows_cfg, the BLOCK of muon_eq_scale and normuon_scale, _vector_warps): these ops
// compute the same blocks and pass them to `find` as flags, so each call runs the cubin of the block the Triton JIT
// would launch (and the warps compiled with it), or fails naming the triton backend when the build holds none.
// ----------------------------------------------------------------------------------------------------------------

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// _rows_cfg on the GPU: BLOCK_C = min(1024, next_pow2(max(C, 16))), BLOCK_R = 4096 / BLOCK_C (4 warps, compiled in).
std::pair<int64_t, int64_t> rows_blocks(int64_t C) {
  const int64_t block_c = std::min<int64_t>(1024, next_pow2(std::max<int64_t>(C, 16)));
  return {std::max<int64_t>(1, 4096 / block_c), block_c};
}

// The BLOCK of the one-program-per-matrix kernels: min(4096, next_pow2(n)).
int64_t vector_block(int64_t n) { return std::min<int64_t>(4096, next_pow2(n)); }

void check_stack(const Tensor& t, const char* op, const char* name, int dims, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "nanotrain.", op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dims, "nanotrain.", op, ": ", name, " must have ", dims, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "nanotrain.", op, ": ", name, " is on ", t.device(), ", expected ",
              like.device());
}

// A (K, n) float32 vector per matrix that the kernel indexes as b * n + i.
void check_vectors(const Tensor& t, const char* op, const char* name, int64_t K, int64_t n, const Tensor& like) {
  check_stack(t, op, name, 2, like);
  TORCH_CHECK(t.size(0) == K && t.size(1) == n, "nanotrain.", op, ": ", name, " must be (", K, ", ", n, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "nanotrain.", op, ": ", name,
              " must be a contiguous float32 tensor, got ", t.scalar_type(), (t.is_contiguous() ? "" : " (strided)"));
}

// Launch the row of `kernel` that serves these flags and values on the current stream, or fail naming the backend.
template <size_t N>
void run(const char* kernel, const Tensor& on, std::initializer_list<aot::Constexpr> flags,
         const std::array<aot::Value, N>& values, int64_t grid_x, int64_t grid_y) {
  c10::cuda::CUDAGuard guard(on.device());
  const int device = on.get_device();
  const std::string arch = aot::device_arch(device);
  const aot::Variant& v = aot::require(kernel, arch, flags, values.data(), static_cast<int>(N), "muon_update=triton",
                                        "shape, dtype, strides or alignment (kernels/_aot.py MUON_STEP_VARIANTS "
                                        "lists the compiled blocks)");
  TORCH_CHECK(grid_x <= INT32_MAX, "nanotrain: ", kernel, " grid of ", grid_x, " programs is too large");
  aot::launch(v, device, c10::cuda::getCurrentCUDAStream(device).stream(),
              {static_cast<uint32_t>(grid_x), static_cast<uint32_t>(grid_y), 1u}, values.data(), static_cast<int>(N));
}

// Nesterov momentum in place on grads and momentum_buffer (K, R, C); rsq (K, R) <- the new grads' row sums of squares.
void aot_muon_momentum(const Tensor& grads, const Tensor& momentum_buffer, const Tensor& rsq, double momentum) {
  const char* op = "aot_muon_momentum";
  check_stack(grads, op, "grads", 3, grads);
  check_stack(momentum_buffer, op, "momentum_buffer", 3, grads);
  TORCH_CHECK(momentum_buffer.sizes() == grads.sizes(), "nanotrain.", op, ": momentum_buffer must have grads' shape ",
              grads.sizes(), ", got ", momentum_buffer.sizes());
  const int64_t K = grads.size(0), R = grads.size(1), C = grads.size(2);
  check_vectors(rsq, op, "rsq", K, R, grads);
  if (grads.numel() == 0) return;
  const auto [block_r, block_c] = rows_blocks(C);
  aot::MuonMomentumArgs args{grads, momentum_buffer, rsq, R, C,
                             grads.stride(0), grads.stride(1), grads.stride(2),
                             momentum_buffer.stride(0), momentum_buffer.stride(1), momentum_buffer.stride(2),
                             momentum};
  run(aot::kMuonMomentumKernel, grads, {{"BLOCK_R", block_r}, {"BLOCK_C", block_c}}, aot::values(args),
      cdiv(R, block_r), K);
}

// f (K, R) <- the row equilibration times the Polar Express normalization factors from rsq (K, R).
void aot_muon_eq_scale(const Tensor& rsq, const Tensor& f, double norm_safety) {
  const char* op = "aot_muon_eq_scale";
  check_stack(rsq, op, "rsq", 2, rsq);
  const int64_t K = rsq.size(0), R = rsq.size(1);
  check_vectors(rsq, op, "rsq", K, R, rsq);
  check_vectors(f, op, "f", K, R, rsq);
  if (rsq.numel() == 0) return;
  aot::MuonEqScaleArgs args{rsq, f, R, norm_safety};
  run(aot::kMuonEqScaleKernel, rsq, {{"BLOCK", vector_block(R)}}, aot::values(args), K, 1);
}

// out (K, R, C) <- x * f in out's dtype; f (K, R) per row, or (K,) per matrix.
void aot_scale_cast(const Tensor& x, const Tensor& f, const Tensor& out) {
  const char* op = "aot_scale_cast";
  check_stack(x, op, "x", 3, x);
  check_stack(out, op, "out", 3, x);
  TORCH_CHECK(out.sizes() == x.sizes(), "nanotrain.", op, ": out must have x's shape ", x.sizes(), ", got ",
              out.sizes());
  const int64_t K = x.size(0), R = x.size(1), C = x.size(2);
  TORCH_CHECK(f.is_cuda() && f.device() == x.device() && f.scalar_type() == at::kFloat, "nanotrain.", op,
              ": f must be a float32 tensor on ", x.device());
  TORCH_CHECK((f.dim() == 2 && f.size(0) == K && f.size(1) == R) || (f.dim() == 1 && f.size(0) == K), "nanotrain.",
              op, ": f must be (", K, ", ", R, ") or (", K, "), got ", f.sizes());
  if (x.numel() == 0) return;
  const int64_t stride_fr = f.dim() == 2 ? f.stride(1) : 0;
  const auto [block_r, block_c] = rows_blocks(C);
  aot::ScaleCastArgs args{x, f, out, R, C, x.stride(0), x.stride(1), x.stride(2), f.stride(0), stride_fr,
                          out.stride(0), out.stride(1), out.stride(2)};
  run(aot::kScaleCastKernel, x, {{"BLOCK_R", block_r}, {"BLOCK_C", block_c}}, aot::values(args), cdiv(R, block_r),
      K);
}

// out (K, R) <- sum over the last axis of x^2, x (K, R, C) (any strides) rounded to round_to first (float32: the
// only ROUND_TO compiled, the optimizer's master weights).
void aot_sumsq_rows(const Tensor& x, const Tensor& out, at::ScalarType round_to) {
  const char* op = "aot_sumsq_rows";
  check_stack(x, op, "x", 3, x);
  TORCH_CHECK(round_to == at::kFloat, "nanotrain.", op, ": round_to ", round_to,
              " has no ahead-of-time cubin (float32 only); the triton backend serves it");
  const int64_t K = x.size(0), R = x.size(1), C = x.size(2);
  check_vectors(out, op, "out", K, R, x);
  if (x.numel() == 0) return;
  const auto [block_r, block_c] = rows_blocks(C);
  aot::SumsqRowsArgs args{x, out, R, C, x.stride(0), x.stride(1), x.stride(2)};
  run(aot::kSumsqRowsKernel, x, {{"BLOCK_R", block_r}, {"BLOCK_C", block_c}}, aot::values(args), cdiv(R, block_r),
      K);
}

// Norm snap and NorMuon variance reduction: f (K, L) <- the factors from q (K, L); second_momentum (K, L), any
// strides, updated in place.
void aot_normuon_scale(const Tensor& q, const Tensor& second_momentum, const Tensor& f, double red_size,
                       double target_norm, double beta2) {
  const char* op = "aot_normuon_scale";
  check_stack(q, op, "q", 2, q);
  const int64_t K = q.size(0), L = q.size(1);
  check_vectors(q, op, "q", K, L, q);
  check_vectors(f, op, "f", K, L, q);
  check_stack(second_momentum, op, "second_momentum", 2, q);
  TORCH_CHECK(second_momentum.size(0) == K && second_momentum.size(1) == L, "nanotrain.", op,
              ": second_momentum must be (", K, ", ", L, "), got ", second_momentum.sizes());
  if (q.numel() == 0) return;
  aot::NormuonScaleArgs args{q, second_momentum, f, L, red_size, target_norm, beta2, second_momentum.stride(0),
                             second_momentum.stride(1)};
  run(aot::kNormuonScaleKernel, q, {{"BLOCK", vector_block(L)}}, aot::values(args), K, 1);
}

// The cautious update in place: params <- params - lr (o * f) - lr wd params [same sign]; o, params (K, R, C);
// f (K, R) per row (f_per_row) or (K, C) per column.
void aot_muon_apply(const Tensor& o, const Tensor& f, bool f_per_row, const Tensor& params, double lr,
                    double weight_decay) {
  const char* op = "aot_muon_apply";
  check_stack(params, op, "params", 3, params);
  check_stack(o, op, "o", 3, params);
  TORCH_CHECK(o.sizes() == params.sizes(), "nanotrain.", op, ": o must have params' shape ", params.sizes(),
              ", got ", o.sizes());
  const int64_t K = params.size(0), R = params.size(1), C = params.size(2);
  check_stack(f, op, "f", 2, params);
  TORCH_CHECK(f.size(0) == K && f.size(1) == (f_per_row ? R : C) && f.scalar_type() == at::kFloat, "nanotrain.", op,
              ": f must be float32 (", K, ", ", (f_per_row ? R : C), "), got ", f.scalar_type(), " ", f.sizes());
  if (params.numel() == 0) return;
  const int64_t stride_fr = f_per_row ? f.stride(1) : 0, stride_fc = f_per_row ? 0 : f.stride(1);
  const auto [block_r, block_c] = rows_blocks(C);
  aot::MuonApplyArgs args{o, f, params, R, C, o.stride(0), o.stride(1), o.stride(2), f.stride(0), stride_fr,
                          stride_fc, params.stride(0), params.stride(1), params.stride(2), lr,
                          lr * weight_decay};  // the Python launcher's float(lr * weight_decay): a double product
  run(aot::kMuonApplyKernel, params, {{"BLOCK_R", block_r}, {"BLOCK_C", block_c}}, aot::values(args),
      cdiv(R, block_r), K);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanotrain, CUDA, m) {
  m.impl("aot_sym_matmul", &aot_sym_matmul);
  m.impl("aot_axpby_matmul", &aot_axpby_matmul);
  m.impl("aot_muon_momentum", &aot_muon_momentum);
  m.impl("aot_muon_eq_scale", &aot_muon_eq_scale);
  m.impl("aot_scale_cast", &aot_scale_cast);
  m.impl("aot_sumsq_rows", &aot_sumsq_rows);
  m.impl("aot_normuon_scale", &aot_normuon_scale);
  m.impl("aot_muon_apply", &aot_muon_apply);
}

}  // namespace nanotrain::muon
