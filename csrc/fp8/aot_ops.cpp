// CUDA implementations of the FP8 casts and GEMM from the ahead-of-time compiled Triton kernels (kernels/fp8.py:
// _fp8_amax_kernel, _fp8_cast_kernel, _fp8_matmul_kernel; the variants are listed in kernels/_aot.py, for sm89+
// targets only). Their Python twins are kernels/fp8.py quantize, quantize_rows_and_cols and matmul: the same
// outputs (shapes, dtypes, the R == 0 or C == 0 case), the same launches (amax into a zeroed buffer, then the
// cast; the GEMM's 1-D grouped grid) with the launch configs of NANOTRAIN_AUTOTUNE=first. Schemas:
// csrc/registration.cpp; fakes: nanotrain/ops/_ext.py; the Python backend: nanotrain/ops/fp8.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <tuple>

#include "aot/launcher.h"
#include "aot_args.h"

namespace nanotrain::fp8 {
namespace {

using at::Tensor;
namespace aot = nanotrain::aot;

constexpr double kEps = 1e-12;  // the amax floor of kernels/fp8.py (EPS)

// The constants of a format as kernels/fp8.py's FP8_FORMATS and torch.finfo give them.
struct Format {
  double max;
  int mant_bits;
  int min_exp;
};

Format format_of(at::ScalarType t, const char* arg) {
  if (t == at::kFloat8_e4m3fn) return {448.0, 3, -6};
  if (t == at::kFloat8_e5m2) return {57344.0, 2, -14};
  TORCH_CHECK(false, "nanotrain.aot_fp8: ", arg, " must be torch.float8_e4m3fn or torch.float8_e5m2, got ", t);
}

// The error of a call no cubin serves: what NANOTRAIN_KERNELS takes to send the FP8 ops to the Triton backend, and
// what of the call the rows did not admit.
constexpr const char* kTritonOverride = "fp8_quantize=triton,fp8_quantize_dual=triton,fp8_matmul=triton";
constexpr const char* kUnserved = "dtypes, strides or alignment";
using aot::cdiv;

// `t` itself when its start is 16-byte aligned (what every compiled variant assumes of a pointer, as Triton's
// launcher assumes of torch's allocations), else a copy: an odd view costs a copy, never a wrong result.
Tensor aligned(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

void check_input(const Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "nanotrain.aot_fp8: ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "nanotrain.aot_fp8: ", name, " must be 2-D (rows, cols), got ", x.dim(), " dims");
}

// kernels/fp8.py _launch: the amax pass over x (into `amax`, zeroed, and `amax_col` for mode 2), then the cast.
void launch_amax_and_cast(const Tensor& x, const Tensor& amax, const Tensor& amax_col, const Tensor& q,
                          const Tensor& q_t, const Tensor& scale, const Tensor& scale_col, int64_t mode,
                          const Format& f, bool power_of_2, bool write_main, bool write_t) {
  const int device = x.get_device();
  const std::string arch = aot::device_arch(device);
  void* stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int64_t R = x.size(0), C = x.size(1);

  aot::Fp8AmaxArgs a{x, amax, amax_col, R, C, x.stride(0), x.stride(1)};
  const auto av = aot::values(a);
  std::initializer_list<aot::Constexpr> amax_flags = {{"MODE", mode}};
  const aot::Variant& va =
      aot::require(aot::kFp8AmaxKernel, arch, amax_flags, av.data(), av.size(), kTritonOverride, kUnserved);

  aot::Fp8CastArgs c{x, amax, amax_col, q, q_t, scale, scale_col, R, C, x.stride(0), x.stride(1)};
  const auto cv = aot::values(c);
  std::initializer_list<aot::Constexpr> cast_flags = {{"MODE", mode},           {"POW2", power_of_2},
                                                      {"MANT_BITS", f.mant_bits}, {"MIN_EXP", f.min_exp},
                                                      {"WRITE_MAIN", write_main}, {"WRITE_T", write_t}};
  const aot::Variant& vc =
      aot::require(aot::kFp8CastKernel, arch, cast_flags, cv.data(), cv.size(), kTritonOverride, kUnserved);

  aot::launch(va, device, stream, {static_cast<uint32_t>(cdiv(R, aot::constexpr_of(va, "BLOCK_R"))), 1u, 1u},
              av.data(), av.size());
  aot::launch(vc, device, stream,
              {static_cast<uint32_t>(cdiv(R, aot::constexpr_of(vc, "BLOCK_R"))),
               static_cast<uint32_t>(cdiv(C, aot::constexpr_of(vc, "BLOCK_C"))), 1u},
              cv.data(), cv.size());
}

// kernels/fp8.py quantize: (q (R, C) or empty, scale () / (R, 1) / (1, C) float32, q_t (C, R) or empty).
std::tuple<Tensor, Tensor, Tensor> aot_fp8_quantize(const Tensor& x_in, at::ScalarType fp8_dtype, int64_t mode,
                                                    bool power_of_2, bool write_main, bool write_t) {
  check_input(x_in, "x");
  TORCH_CHECK(mode == -1 || mode == 0 || mode == 1, "nanotrain.aot_fp8_quantize: mode must be -1, 0 or 1, got ",
              mode);
  const Format f = format_of(fp8_dtype, "fp8_dtype");
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = aligned(x_in);
  const int64_t R = x.size(0), C = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  const auto q8 = x.options().dtype(fp8_dtype);
  Tensor amax = at::zeros({mode == -1 ? 1 : (mode == 1 ? R : C)}, f32);
  Tensor scale = mode == -1 ? at::empty(c10::IntArrayRef{}, f32)
                            : (mode == 1 ? at::empty({R, 1}, f32) : at::empty({1, C}, f32));
  Tensor q = write_main ? at::empty({R, C}, q8) : at::empty({0}, q8);
  Tensor q_t = write_t ? at::empty({C, R}, q8) : at::empty({0}, q8);
  if (R == 0 || C == 0) {
    scale.fill_(f.max / kEps);
    return {q, scale, q_t};
  }
  launch_amax_and_cast(x, amax, amax, q, q_t, scale, scale, mode, f, power_of_2, write_main, write_t);
  return {q, scale, q_t};
}

// kernels/fp8.py quantize_rows_and_cols: (q (R, C) per row, scale_rows (R, 1), q_t (C, R) per column of x,
// scale_cols (1, C)), one amax pass and one cast pass (mode 2).
std::tuple<Tensor, Tensor, Tensor, Tensor> aot_fp8_quantize_dual(const Tensor& x_in, at::ScalarType fp8_dtype,
                                                                 bool power_of_2) {
  check_input(x_in, "x");
  const Format f = format_of(fp8_dtype, "fp8_dtype");
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = aligned(x_in);
  const int64_t R = x.size(0), C = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  const auto q8 = x.options().dtype(fp8_dtype);
  Tensor amax_r = at::zeros({R}, f32), amax_c = at::zeros({C}, f32);
  Tensor scale_r = at::empty({R, 1}, f32), scale_c = at::empty({1, C}, f32);
  Tensor q = at::empty({R, C}, q8), q_t = at::empty({C, R}, q8);
  if (R == 0 || C == 0) {
    scale_r.fill_(f.max / kEps);
    scale_c.fill_(f.max / kEps);
    return {q, scale_r, q_t, scale_c};
  }
  launch_amax_and_cast(x, amax_r, amax_c, q, q_t, scale_r, scale_c, 2, f, power_of_2, true, true);
  return {q, scale_r, q_t, scale_c};
}

// kernels/fp8.py matmul: (a (M, K) @ b (K, N)) / (scale_a * scale_b) in out_dtype, a new row-major (M, N).
Tensor aot_fp8_matmul(const Tensor& a_in, const Tensor& b_in, const Tensor& scale_a, const Tensor& scale_b,
                      at::ScalarType out_dtype, bool use_fast_accum) {
  check_input(a_in, "a");
  check_input(b_in, "b");
  format_of(a_in.scalar_type(), "a");
  format_of(b_in.scalar_type(), "b");
  TORCH_CHECK(b_in.device() == a_in.device(), "nanotrain.aot_fp8_matmul: b is on ", b_in.device(), ", a on ",
              a_in.device());
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(1);
  TORCH_CHECK(b_in.size(0) == K, "nanotrain.aot_fp8_matmul: a ", a_in.sizes(), " and b ", b_in.sizes(),
              " do not chain");
  TORCH_CHECK(scale_a.numel() == 1 || scale_a.numel() == M, "nanotrain.aot_fp8_matmul: scale_a must hold 1 or M = ",
              M, " scales, got ", scale_a.numel());
  TORCH_CHECK(scale_b.numel() == 1 || scale_b.numel() == N, "nanotrain.aot_fp8_matmul: scale_b must hold 1 or N = ",
              N, " scales, got ", scale_b.numel());
  TORCH_CHECK(scale_a.device() == a_in.device() && scale_b.device() == a_in.device(),
              "nanotrain.aot_fp8_matmul: scale_a and scale_b must be on a's device ", a_in.device());
  c10::cuda::CUDAGuard guard(a_in.device());
  Tensor out = at::empty({M, N}, a_in.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const Tensor a = aligned(a_in), b = aligned(b_in);
  // as kernels/fp8.py matmul: float32 scales, a vector read with stride 1 or a single one with stride 0
  const Tensor sa = aligned(scale_a.reshape(-1).to(at::kFloat).contiguous());
  const Tensor sb = aligned(scale_b.reshape(-1).to(at::kFloat).contiguous());
  const int device = a.get_device();
  const std::string arch = aot::device_arch(device);
  aot::Fp8MatmulArgs args{a, b, out, sa, sb, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                          out.stride(0), out.stride(1), sa.numel() > 1 ? 1 : 0, sb.numel() > 1 ? 1 : 0};
  const auto values = aot::values(args);
  std::initializer_list<aot::Constexpr> flags = {{"FAST_ACCUM", use_fast_accum}};
  const aot::Variant& v =
      aot::require(aot::kFp8MatmulKernel, arch, flags, values.data(), values.size(), kTritonOverride, kUnserved);
  const int64_t tiles = cdiv(M, aot::constexpr_of(v, "BLOCK_M")) * cdiv(N, aot::constexpr_of(v, "BLOCK_N"));
  aot::launch(v, device, c10::cuda::getCurrentCUDAStream(device).stream(), {static_cast<uint32_t>(tiles), 1u, 1u},
              values.data(), values.size());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nanotrain, CUDA, m) {
  m.impl("aot_fp8_quantize", &aot_fp8_quantize);
  m.impl("aot_fp8_quantize_dual", &aot_fp8_quantize_dual);
  m.impl("aot_fp8_matmul", &aot_fp8_matmul);
}

}  // namespace nanotrain::fp8
