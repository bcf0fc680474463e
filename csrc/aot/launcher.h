// Launching the ahead-of-time compiled Triton kernels embedded in nanotrain._C (kernels/_aot.py generates the
// table, aot_table.cpp, and the argument structs, aot_args.h, at build time).
//
// A kernel's compiled variants are rows of kVariants: one cubin per (specialization, target), with the compiled
// kernel's parameter list. An op fills the generated argument struct of its kernel, turns it into Values
// (values(args), generated), and asks `find` for the first row of the device's architecture whose constexpr
// flags equal the call's and whose parameter classes admit the call's values (a pointer's dtype and 16-byte
// alignment, an int equal to 1 where the variant compiled the constant 1, a multiple of 16 where it assumed
// one, an int32 range). `launch` packs the values the row keeps (the constant-1 ones are not parameters) in
// the row's types, adds the trailing pointers Triton appends to every kernel (its scratch buffers; null:
// the generator refuses kernels that need scratch; their count read from the PTX entry) and launches through the CUDA driver API. libcuda is opened with dlopen at the first launch, so
// the library loads on machines without a driver (CPU CI).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

namespace nanotrain::aot {

enum class Kind : uint8_t { Ptr, I32, I64, F32, One };

// One parameter of a compiled kernel, in the kernel's order: `div16` is Triton's divisibility hint (a pointer
// 16-byte aligned, an int a multiple of 16); `dtype` the pointee type of a pointer ("bf16", "fp32", ...).
struct Param {
  const char* name;
  Kind kind;
  bool div16;
  const char* dtype;
};

struct Constexpr {
  const char* name;
  int64_t value;
};

struct Variant {
  const char* kernel;    // the table's kernel name, e.g. "sym_matmul"
  const char* label;     // e.g. "bf16 HAS_Z=0 row"
  const char* arch;      // "80", "90a"
  const char* function;  // the cubin's entry point
  const unsigned char* cubin;
  size_t cubin_size;
  int num_warps;
  int shared;  // bytes of dynamic shared memory
  const Param* params;
  int num_params;
  const Constexpr* constexprs;  // flags and block sizes (the int and bool constexprs)
  int num_constexprs;
  int hidden_params;  // trailing pointers Triton adds (global and profile scratch: 2 in Triton 3.8), passed null
};

extern const Variant kVariants[];
extern const int kNumVariants;

// A pointer argument: a tensor's data pointer and the Triton name of its dtype.
struct Tensorish {
  const void* ptr;
  const char* dtype;
  Tensorish(const at::Tensor& t);  // NOLINT: implicit, so an op writes {P, S, ...} in its argument struct
};

struct Value {
  enum class Tag : uint8_t { Ptr, Int, Float } tag;
  const void* ptr = nullptr;
  const char* dtype = "";
  int64_t i = 0;
  double f = 0.0;
  static Value of(const Tensorish& t) { return {Tag::Ptr, t.ptr, t.dtype}; }
  static Value of(int64_t v) { return {Tag::Int, nullptr, "", v}; }
  static Value of(double v) { return {Tag::Float, nullptr, "", 0, v}; }
};

// "90a" for a compute capability 9.0 device, "80" for 8.0, ...: the arch of the cubins that run on it.
std::string device_arch(int device);

// The first row for `kernel` on `arch` with these constexpr flags that admits `values`; nullptr if none.
const Variant* find(const char* kernel, const std::string& arch, const Constexpr* flags, int num_flags,
                    const Value* values, int num_values);
inline const Variant* find(const char* kernel, const std::string& arch, std::initializer_list<Constexpr> flags,
                           const Value* values, int num_values) {
  return find(kernel, arch, flags.begin(), static_cast<int>(flags.size()), values, num_values);
}

// `find`'s row, or a TORCH_CHECK failure naming the call and how to send it to the Triton backend instead
// (`triton_override`, e.g. "attention=triton", for NANOTRAIN_KERNELS); `what` names the call's properties a row
// did not admit.
const Variant& require(const char* kernel, const std::string& arch, std::initializer_list<Constexpr> flags,
                       const Value* values, int num_values, const char* triton_override,
                       const char* what = "dtype, strides or alignment");

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The value of constexpr `name` in row `v` (e.g. BLOCK_M, for the grid); TORCH_CHECK fails if absent.
int64_t constexpr_of(const Variant& v, const char* name);

// Launch row `v` on `device`'s current stream with grid (x, y, z).
void launch(const Variant& v, int device, void* stream, std::array<uint32_t, 3> grid, const Value* values,
            int num_values);

// Why no row serves a call (for the error message).
std::string describe_call(const char* kernel, const std::string& arch, std::initializer_list<Constexpr> flags);

}  // namespace nanotrain::aot
