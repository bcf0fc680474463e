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
