// CUDA implementations of sliding-window causal attention (forward, backward, KV-cache decode) from the
// ahead-of-time compiled Triton kernels (kernels/attention.py; the variants are listed in kernels/_aot.py). Their
// Python twins are kernels/attention.py attention_fwd, attention_bwd and _triton_decode_launch; the arguments and
// grids here are theirs. The decode op is one launch of the kernel: kernels/attention.py run_decode (the length
// checks, the plan: BLOCK_M, split count and length; the split buffers and their combine) drives it.
// Schemas: csrc/registration.cpp; fakes: nanotrain/ops/_ext.py; autograd: nanotrain/ops/attention.py.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "aot/launcher.h"
#include "aot_args.h"

namespace nanotrain::attention {
namespace {

using at::Tensor;
namespace aot = nanotrain::aot;

constexpr double kLog2e = 1.4426950408889634;

void check_btHd(const Tensor& t, const char* name, const Tensor& q, int64_t heads) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "nanotrain.aot_attention: ", name, " must be on ", q.device(),
              ", got ", t.device());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == heads &&
                  t.size(3) == q.size(3),
              "nanotrain.aot_attention: ", name, " must be (", q.size(0), ", ", q.size(1), ", ", heads, ", ", q.size(3),
              "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "nanotrain.aot_attention: ", name, " has dtype ", t.scalar_type(),
              ", expected q's ", q.scalar_type());
  TORCH_CHECK(t.stride(3) == 1, "nanotrain.aot_attention: ", name, " must have a contiguous last dimension");
}

void check_stats(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "nanotrain.aot_attention: ", name, " must be on ", q.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "nanotrain.aot_attention: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(2) && t.size(2) == q.size(1),
              "nanotrain.aot_attention: ", name, " must be (", q.size(0), ", ", q.size(2), ", ", q.size(1), "), got ",
              t.sizes());
  TORCH_CHECK(t.stride(2) == 1, "nanotrain.aot_attention: ", name, " must have a contiguous last dimension");
}

// q (B, T, H, D), k and v (B, T, Hkv, D) with H a multiple of Hkv.
int64_t check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4, "nanotrain.aot_attention: q must be a (B, T, H, D) CUDA tensor, got ",
              q.dim(), " dims on ", q.device());
  TORCH_CHECK(q.stride(3) == 1, "nanotrain.aot_attention: q must have a contiguous last dimension");
  TORCH_CHECK(k.dim() == 4, "nanotrain.aot_attention: k must be (B, T, Hkv, D), got ", k.sizes());
  const int64_t hkv = k.size(2);
  TORCH_CHECK(hkv > 0 && q.size(2) % hkv == 0, "nanotrain.aot_attention: q's ", q.size(2),
              " heads must be a multiple of k's ", hkv);
  check_btHd(k, "k", q, hkv);
  check_btHd(v, "v", q, hkv);
  return hkv;
}

using aot::cdiv;

// kernels/attention.py _bucket and tune_key: the autotuner's buckets, unused by the math but kernel arguments.
int64_t bucket(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return std::max<int64_t>(16, p);
}

int64_t effective_window(std::optional<int64_t> window, int64_t T) {
  TORCH_CHECK(!window.has_value() || *window >= 1, "nanotrain.aot_attention: window must be >= 1 or None, got ",
              *window);
  return !window.has_value() || *window >= T ? T : *window;
}

// The row serving a call, or an error naming the call (`triton_override`: how NANOTRAIN_KERNELS sends it to Triton).
const aot::Variant& pick(const char* kernel, const std::string& arch, std::initializer_list<aot::Constexpr> flags,
                         const aot::Value* values, size_t n, const char* triton_override = "attention=triton") {
  return aot::require(kernel, arch, flags, values, static_cast<int>(n), triton_override);
}

uint32_t u32(int64_t x) { return static_cast<uint32_t>(x); }

void aot_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                       std::optional<int64_t> window, double scale) {
  const int64_t hkv = check_qkv(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  check_btHd(out, "out", q, H);
  check_stats(lse, "lse", q);
  c10::cuda::CUDAGuard guard(q.device());
  const int device = q.get_device();
  const int64_t w = effective_window(window, T);
  aot::AttnFwdArgs a{q, k, v, out, lse,
                     q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                     lse.stride(0), lse.stride(1),
                     T, H, H / hkv, w, scale * kLog2e, bucket(T), w >= T ? 0 : bucket(w), bucket(B * H)};
  const auto values = aot::values(a);
  const std::string arch = aot::device_arch(device);
  const aot::Variant& fwd = pick(aot::kAttnFwdKernel, arch, {{"HEAD_DIM", D}}, values.data(), values.size());
  aot::launch(fwd, device, c10::cuda::getCurrentCUDAStream(device).stream(),
              {u32(cdiv(T, aot::constexpr_of(fwd, "BLOCK_M"))), u32(B * H), 1u}, values.data(),
              static_cast<int>(values.size()));
}

void aot_attention_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                       const Tensor& lse, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                       std::optional<int64_t> window, double scale) {
  const int64_t hkv = check_qkv(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  check_btHd(grad_out, "grad_out", q, H);
  check_btHd(out, "out", q, H);
  check_btHd(dq, "dq", q, H);
  check_btHd(dk, "dk", q, hkv);
  check_btHd(dv, "dv", q, hkv);
  check_stats(lse, "lse", q);
  c10::cuda::CUDAGuard guard(q.device());
  const int device = q.get_device();
  const std::string arch = aot::device_arch(device);
  void* stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int64_t w = effective_window(window, T);
  const int64_t tune_w = w >= T ? 0 : bucket(w);
  Tensor delta = at::empty({B, H, T}, q.options().dtype(at::kFloat));

  aot::AttnPreprocessArgs p{out, grad_out, delta, out.stride(0), out.stride(1), out.stride(2),
                            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), delta.stride(0),
                            delta.stride(1), T, H};
  const auto pv = aot::values(p);
  const aot::Variant& pre = pick(aot::kAttnPreprocessKernel, arch, {{"HEAD_DIM", D}}, pv.data(), pv.size());
  aot::launch(pre, device, stream, {u32(cdiv(T, aot::constexpr_of(pre, "BLOCK_M"))), u32(B * H), 1u}, pv.data(),
              static_cast<int>(pv.size()));

  aot::AttnDkdvArgs kv{q, k, v, grad_out, lse, delta, dk, dv,
                       q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                       v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1),
                       grad_out.stride(2), lse.stride(0), lse.stride(1), dk.stride(0), dk.stride(1), dk.stride(2),
                       dv.stride(0), dv.stride(1), dv.stride(2),
                       T, hkv, H / hkv, w, scale * kLog2e, scale, bucket(T), tune_w, bucket(B * hkv)};
  const auto kvv = aot::values(kv);
  const aot::Variant& dkdv = pick(aot::kAttnDkdvKernel, arch, {{"HEAD_DIM", D}}, kvv.data(), kvv.size());
  aot::launch(dkdv, device, stream, {u32(cdiv(T, aot::constexpr_of(dkdv, "BLOCK_N"))), u32(B * hkv), 1u},
              kvv.data(), static_cast<int>(kvv.size()));

  aot::AttnDqArgs qa{q, k, v, grad_out, lse, delta, dq,
                     q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1),
                     grad_out.stride(2), lse.stride(0), lse.stride(1), dq.stride(0), dq.stride(1), dq.stride(2),
                     T, H, H / hkv, w, scale * kLog2e, scale, bucket(T), tune_w, bucket(B * H)};
  const auto qv = aot::values(qa);
  const aot::Variant& dqk = pick(aot::kAttnDqKernel, arch, {{"HEAD_DIM", D}}, qv.data(), qv.size());
  aot::launch(dqk, device, stream, {u32(cdiv(T, aot::constexpr_of(dqk, "BLOCK_M"))), u32(B * H), 1u}, qv.data(),
              static_cast<int>(qv.size()));
}

// One launch of the decode kernel, as kernels/attention.py _triton_decode_launch does it: q (B, Tq, H, D) against
// the caches (B, Tmax, Hkv, D) up to cache_seqlens (B,) int32; with o_part (Z, B, H, Tq, D) and l_part
// (Z, B, H, Tq), both float32 contiguous, the KV range is split in Z chunks of split_len keys (SPLIT) whose
// partial outputs the caller combines; without them the output goes to out. block_m is the plan's query tile.
void aot_attention_decode(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                          const Tensor& out, const std::optional<Tensor>& o_part, const std::optional<Tensor>& l_part,
                          std::optional<int64_t> window, double scale, int64_t block_m, int64_t split_len) {
  constexpr const char* who = "nanotrain.aot_attention_decode: ";
  TORCH_CHECK(q.is_cuda() && q.dim() == 4, who, "q must be a (B, Tq, H, D) CUDA tensor, got ", q.dim(), " dims on ",
              q.device());
  TORCH_CHECK(q.stride(3) == 1, who, "q must have a contiguous last dimension");
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(3) == D, who, "k_cache must be (", B,
              ", Tmax, Hkv, ", D, "), got ", k_cache.sizes());
  const int64_t Tmax = k_cache.size(1), hkv = k_cache.size(2);
  TORCH_CHECK(hkv > 0 && H % hkv == 0, who, "q's ", H, " heads must be a multiple of the cache's ", hkv);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), who, "v_cache must have k_cache's shape ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{k_cache, "k_cache"}, {v_cache, "v_cache"},
                                {out, "out"}}) {
    TORCH_CHECK(t.is_cuda() && t.device() == q.device(), who, name, " must be on ", q.device(), ", got ",
                t.device());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), who, name, " has dtype ", t.scalar_type(), ", expected q's ",
                q.scalar_type());
    TORCH_CHECK(t.stride(3) == 1, who, name, " must have a contiguous last dimension");
  }
  TORCH_CHECK(out.sizes() == q.sizes(), who, "out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(cache_seqlens.is_cuda() && cache_seqlens.device() == q.device() &&
                  cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == B && cache_seqlens.is_contiguous(),
              who, "cache_seqlens must be a contiguous (", B, ",) int32 tensor on ", q.device(), ", got ",
              cache_seqlens.scalar_type(), " ", cache_seqlens.sizes(), " on ", cache_seqlens.device());
  TORCH_CHECK(o_part.has_value() == l_part.has_value(), who, "o_part and l_part go together (a split) or not at all");
  const bool split = o_part.has_value();
  int64_t splits = 1;
  if (split) {
    splits = o_part->size(0);
    for (const auto& [t, name, dims] :
         {std::tuple<const Tensor&, const char*, int64_t>{*o_part, "o_part", 5}, {*l_part, "l_part", 4}}) {
      TORCH_CHECK(t.is_cuda() && t.device() == q.device() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                  who, name, " must be a contiguous float32 tensor on ", q.device());
      std::vector<int64_t> want = {splits, B, H, Tq, D};
      want.resize(dims);
      TORCH_CHECK(t.sizes() == at::IntArrayRef(want), who, name, " must be ", at::IntArrayRef(want), ", got ",
                  t.sizes());
    }
    TORCH_CHECK(splits >= 1, who, "o_part must hold at least one split");
  }
  TORCH_CHECK(split_len > 0, who, "split_len must be positive, got ", split_len);
  if (B == 0 || Tq == 0 || H == 0) return;

  c10::cuda::CUDAGuard guard(q.device());
  const int device = q.get_device();
  const int64_t w = effective_window(window, Tmax);
  const Tensor& op = split ? *o_part : out;  // unused without a split (the Triton launcher passes out too)
  const Tensor& lp = split ? *l_part : out;
  aot::AttnDecodeArgs a{q, k_cache, v_cache, cache_seqlens, out, op, lp,
                        q.stride(0), q.stride(1), q.stride(2),
                        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                        out.stride(0), out.stride(1), out.stride(2),
                        Tq, H, H / hkv, w, scale * kLog2e, split_len, bucket(Tmax), w >= Tmax ? 0 : bucket(w),
                        bucket(B * H)};
  const auto values = aot::values(a);
  const std::string arch = aot::device_arch(device);
  const aot::Variant& v = pick(aot::kAttnDecodeKernel, arch, {{"HEAD_DIM", D}, {"BLOCK_M", block_m}, {"SPLIT", split}},
                               values.data(), values.size(), "attention_decode=triton");
  TORCH_CHECK(!split || split_len % aot::constexpr_of(v, "BLOCK_N") == 0, who, "split_len ", split_len,
              " must be a multiple of the kernel's BLOCK_N ", aot::constexpr_of(v, "BLOCK_N"));
  aot::launch(v, device, c10::cuda::getCurrentCUDAStream(device).stream(),
              {u32(cdiv(Tq, block_m)), u32(B * H), u32(splits)}, values.data(), static_cast<int>(values.size()));
}

}  // namespace

TORCH_LIBRARY_IMPL(nanotrain, CUDA, m) {
  m.impl("aot_attention_fwd", &aot_attention_fwd);
  m.impl("aot_attention_bwd", &aot_attention_bwd);
  m.impl("aot_attention_decode", &aot_attention_decode);
}

}  // namespace nanotrain::attention
