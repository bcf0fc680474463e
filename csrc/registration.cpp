// The schema of every op of the nanotrain extension, callable from Python as torch.ops.nanotrain.<name>.
//
// One m.def per op, whatever its backends: the implementations register themselves per dispatch key
// with TORCH_LIBRARY_IMPL(nanotrain, CPU|CUDA, m) in their own folder (data/, attention/, muon/, fp8/).
// Fake (meta) implementations, used by torch.compile and opcheck, live in Python in
// nanotrain/ops/_ext.py, which set_python_module names so torch can point to it when one is missing.
#include <torch/library.h>

TORCH_LIBRARY(nanotrain, m) {
  m.set_python_module("nanotrain.ops._ext");

  // Best-fit packing of a CSR document buffer into rows (nanotrain/ops/packing.py is the spec).
  m.def(
      "best_fit_pack(Tensor tokens, Tensor offsets, int num_rows, int row_len)"
      " -> (Tensor rows, Tensor consumed, Tensor cropped)");

  // Muon products from the ahead-of-time compiled Triton kernels (muon/aot_ops.cpp; CUDA builds only have a
  // kernel, every build has the schema and the fake): the symmetric product
  // out = alpha * P @ S^T + beta * Z + gamma * I, and out = alpha * X + B @ X (B @ X when alpha is None).
  m.def(
      "aot_sym_matmul(Tensor P, Tensor S, Tensor(a!) out, float alpha, Tensor? Z, float beta, float gamma)"
      " -> ()");
  m.def("aot_axpby_matmul(Tensor B, Tensor X, Tensor(a!) out, float? alpha) -> ()");

  // Sliding-window causal attention from the ahead-of-time compiled Triton kernels (attention/aot_ops.cpp):
  // q (B, T, H, D), k/v (B, T, Hkv, D); the forward writes out and lse (B, H, T) float32, the backward dq, dk, dv.
  m.def(
      "aot_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, int? window, float scale)"
      " -> ()");
  m.def(
      "aot_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor(a!) dq,"
      " Tensor(b!) dk, Tensor(c!) dv, int? window, float scale) -> ()");

  // FP8 casts and GEMM from the ahead-of-time compiled Triton kernels (fp8/aot_ops.cpp; cubins for sm89+ targets
  // only), functional like kernels/fp8.py quantize / quantize_rows_and_cols / matmul: x (R, C) -> (q (R, C) or
  // empty, scale () / (R, 1) / (1, C), q_t (C, R) or empty) for mode -1 / 1 / 0; the dual cast (mode 2); the
  // scaled GEMM a (M, K) x b (K, N) -> (M, N) in out_dtype.
  m.def(
      "aot_fp8_quantize(Tensor x, ScalarType fp8_dtype, int mode, bool power_of_2, bool write_main, bool write_t)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("aot_fp8_quantize_dual(Tensor x, ScalarType fp8_dtype, bool power_of_2) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "aot_fp8_matmul(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, ScalarType out_dtype, bool use_fast_accum)"
      " -> Tensor");
  // KV-cache decode attention, one launch of the ahead-of-time compiled Triton kernel (attention/aot_ops.cpp;
  // kernels/attention.py run_decode plans it and combines the splits): q (B, Tq, H, D) against k_cache/v_cache
  // (B, Tmax, Hkv, D) up to cache_seqlens (B,) int32; writes out (B, Tq, H, D), or with a split the partial
  // outputs o_part (Z, B, H, Tq, D) and their log2-sum-exp2 l_part (Z, B, H, Tq), float32.
  m.def(
      "aot_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor(a!) out,"
      " Tensor(b!)? o_part, Tensor(c!)? l_part, int? window, float scale, int block_m, int split_len) -> ()");
  // The Muon step's elementwise and reduction stages from the ahead-of-time compiled Triton kernels
  // (muon/aot_ops.cpp; the Python twins are kernels/newton_schulz.py muon_momentum ... muon_apply): float32
  // stacks (K, R, C), (K, R) float32 vectors, the bfloat16 iterate; each writes into its mutated arguments.
  m.def("aot_muon_momentum(Tensor(a!) grads, Tensor(b!) momentum_buffer, Tensor(c!) rsq, float momentum) -> ()");
  m.def("aot_muon_eq_scale(Tensor rsq, Tensor(a!) f, float norm_safety) -> ()");
  m.def("aot_scale_cast(Tensor x, Tensor f, Tensor(a!) out) -> ()");
  m.def("aot_sumsq_rows(Tensor x, Tensor(a!) out, ScalarType round_to) -> ()");
  m.def(
      "aot_normuon_scale(Tensor q, Tensor(a!) second_momentum, Tensor(b!) f, float red_size, float target_norm,"
      " float beta2) -> ()");
  m.def(
      "aot_muon_apply(Tensor o, Tensor f, bool f_per_row, Tensor(a!) params, float lr, float weight_decay)"
      " -> ()");
}
