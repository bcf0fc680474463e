// The driver-API launcher of the ahead-of-time compiled kernels (see launcher.h).
#include "aot/launcher.h"

#include <c10/util/Exception.h>
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <vector>

namespace nanotrain::aot {
namespace {

// The few driver entry points the launcher needs, looked up in libcuda.so.1 at the first launch (never linked:
// the extension must load on machines without a driver).
struct Driver {
  CUresult (*module_load_data)(CUmodule*, const void*) = nullptr;
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*func_set_attribute)(CUfunction, CUfunction_attribute, int) = nullptr;
  CUresult (*launch_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                            CUstream, void**, void**) = nullptr;
  CUresult (*get_error_string)(CUresult, const char**) = nullptr;
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*ctx_set_current)(CUcontext) = nullptr;
  CUresult (*device_get)(CUdevice*, int) = nullptr;
  CUresult (*primary_ctx_retain)(CUcontext*, CUdevice) = nullptr;
};

template <typename F>
void bind(void* lib, const char* name, F& slot) {
  void* sym = dlsym(lib, name);
  TORCH_CHECK(sym != nullptr, "nanotrain AOT kernels: libcuda.so.1 has no ", name, " (driver too old?)");
  slot = reinterpret_cast<F>(sym);
}

const Driver& driver() {
  static Driver d = [] {
    Driver out;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    TORCH_CHECK(lib != nullptr, "nanotrain AOT kernels: cannot open the CUDA driver libcuda.so.1 (", dlerror(),
                "); install the NVIDIA driver or use the triton backend");
    bind(lib, "cuModuleLoadData", out.module_load_data);
    bind(lib, "cuModuleGetFunction", out.module_get_function);
    bind(lib, "cuFuncSetAttribute", out.func_set_attribute);
    bind(lib, "cuLaunchKernel", out.launch_kernel);
    bind(lib, "cuGetErrorString", out.get_error_string);
    bind(lib, "cuCtxGetCurrent", out.ctx_get_current);
    bind(lib, "cuCtxSetCurrent", out.ctx_set_current);
    bind(lib, "cuDeviceGet", out.device_get);
    bind(lib, "cuDevicePrimaryCtxRetain", out.primary_ctx_retain);
    return out;
  }();
  return d;
}

void check(CUresult r, const char* what, const Variant& v) {
  if (r == CUDA_SUCCESS) return;
  const char* msg = nullptr;
  driver().get_error_string(r, &msg);
  TORCH_CHECK(false, "nanotrain AOT kernel ", v.kernel, " [", v.label, "] sm_", v.arch, ": ", what, " failed: ",
              msg ? msg : "unknown error", " (", static_cast<int>(r), ")");
}

// The driver calls need a current context on this thread; torch's runtime calls make the device's primary
// context current lazily, and a thread that made none yet (an autograd worker) may have none. As Triton's
// launcher does: retain the primary context of `device` and make it current when the thread has none.
void ensure_context(int device, const Variant& v) {
  CUcontext ctx = nullptr;
  check(driver().ctx_get_current(&ctx), "cuCtxGetCurrent", v);
  if (ctx != nullptr) return;
  CUdevice dev;
  check(driver().device_get(&dev, device), "cuDeviceGet", v);
  check(driver().primary_ctx_retain(&ctx, dev), "cuDevicePrimaryCtxRetain", v);
  check(driver().ctx_set_current(ctx), "cuCtxSetCurrent", v);
}

// One loaded function per (row, device): cuModuleLoadData once per device, as the row is first launched there.
CUfunction function_for(const Variant& v, int device) {
  static std::mutex mu;
  static std::map<std::pair<const Variant*, int>, CUfunction> loaded;
  std::lock_guard<std::mutex> lock(mu);
  auto it = loaded.find({&v, device});
  if (it != loaded.end()) return it->second;
  CUmodule module;
  check(driver().module_load_data(&module, v.cubin), "cuModuleLoadData", v);
  CUfunction fn;
  check(driver().module_get_function(&fn, module, v.function), "cuModuleGetFunction", v);
  if (v.shared > 48 * 1024) {
    check(driver().func_set_attribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, v.shared),
          "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)", v);
  }
  loaded[{&v, device}] = fn;
  return fn;
}

bool admits(const Param& p, const Value& x) {
  switch (p.kind) {
    case Kind::Ptr:
      return x.tag == Value::Tag::Ptr && std::strcmp(p.dtype, x.dtype) == 0 &&
             (!p.div16 || reinterpret_cast<uintptr_t>(x.ptr) % 16 == 0);
    case Kind::One:
      return x.tag == Value::Tag::Int && x.i == 1;
    case Kind::I32:
      if (x.tag != Value::Tag::Int || x.i < INT32_MIN || x.i > INT32_MAX) return false;
      return !p.div16 || x.i % 16 == 0;
    case Kind::I64:
      return x.tag == Value::Tag::Int && (!p.div16 || x.i % 16 == 0);
    case Kind::F32:
      return x.tag == Value::Tag::Float;
  }
  return false;
}

bool flags_match(const Variant& v, const Constexpr* flags, int num_flags) {
  for (int k = 0; k < num_flags; ++k) {
    const Constexpr& f = flags[k];
    bool found = false;
    for (int i = 0; i < v.num_constexprs; ++i) {
      if (std::strcmp(v.constexprs[i].name, f.name) == 0) {
        if (v.constexprs[i].value != f.value) return false;
        found = true;
      }
    }
    if (!found) return false;
  }
  return true;
}

}  // namespace

Tensorish::Tensorish(const at::Tensor& t) : ptr(t.data_ptr()), dtype("") {
  switch (t.scalar_type()) {
    case at::kBFloat16: dtype = "bf16"; break;
    case at::kHalf: dtype = "fp16"; break;
    case at::kFloat: dtype = "fp32"; break;
    case at::kFloat8_e4m3fn: dtype = "fp8e4nv"; break;
    case at::kFloat8_e5m2: dtype = "fp8e5"; break;
    case at::kInt: dtype = "i32"; break;
    case at::kLong: dtype = "i64"; break;
    default: dtype = "?"; break;
  }
}

std::string device_arch(int device) {
  int major = 0, minor = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess,
              "nanotrain AOT kernels: cannot read the compute capability of CUDA device ", device);
  std::string arch = std::to_string(major * 10 + minor);
  return major == 9 ? arch + "a" : arch;  // Triton compiles sm_90a for a 9.0 device
}

const Variant* find(const char* kernel, const std::string& arch, const Constexpr* flags, int num_flags,
                    const Value* values, int num_values) {
  for (int r = 0; r < kNumVariants; ++r) {
    const Variant& v = kVariants[r];
    if (v.kernel == nullptr || std::strcmp(v.kernel, kernel) != 0 || arch != v.arch ||
        !flags_match(v, flags, num_flags)) {
      continue;
    }
    TORCH_CHECK(v.num_params == num_values, "nanotrain AOT kernel ", kernel, ": the op passes ", num_values,
                " arguments, the embedded cubin takes ", v.num_params, " (rebuild the extension)");
    bool ok = true;
    for (int i = 0; i < num_values && ok; ++i) ok = admits(v.params[i], values[i]);
    if (ok) return &v;
  }
  return nullptr;
}

const Variant& require(const char* kernel, const std::string& arch, std::initializer_list<Constexpr> flags,
                       const Value* values, int num_values, const char* triton_override, const char* what) {
  const Variant* v = find(kernel, arch, flags, values, num_values);
  TORCH_CHECK(v != nullptr, "nanotrain: no ahead-of-time cubin serves ", describe_call(kernel, arch, flags),
              " for this call's ", what, "; the triton backend serves it (NANOTRAIN_KERNELS=", triton_override, ")");
  return *v;
}

int64_t constexpr_of(const Variant& v, const char* name) {
  for (int i = 0; i < v.num_constexprs; ++i) {
    if (std::strcmp(v.constexprs[i].name, name) == 0) return v.constexprs[i].value;
  }
  TORCH_CHECK(false, "nanotrain AOT kernel ", v.kernel, " [", v.label, "] has no constexpr ", name);
}

void launch(const Variant& v, int device, void* stream, std::array<uint32_t, 3> grid, const Value* values,
            int num_values) {
  TORCH_CHECK(num_values == v.num_params, "nanotrain AOT kernel ", v.kernel, ": ", num_values,
              " arguments for ", v.num_params, " parameters");
  TORCH_CHECK(grid[1] <= 65535 && grid[2] <= 65535, "nanotrain AOT kernel ", v.kernel, ": grid (", grid[0], ", ",
              grid[1], ", ", grid[2], ") exceeds the 65535 limit of the y and z dimensions");
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return;
  constexpr int kMax = 64;
  TORCH_CHECK(v.num_params + v.hidden_params <= kMax, "nanotrain AOT kernel ", v.kernel, ": too many parameters");
  alignas(8) unsigned char storage[kMax][8];
  void* params[kMax];
  int n = 0;
  for (int i = 0; i < v.num_params; ++i) {
    const Param& p = v.params[i];
    const Value& x = values[i];
    switch (p.kind) {
      case Kind::One: continue;  // compiled in as the constant 1
      case Kind::Ptr: { const void* q = x.ptr; std::memcpy(storage[n], &q, sizeof q); break; }
      case Kind::I32: { int32_t q = static_cast<int32_t>(x.i); std::memcpy(storage[n], &q, sizeof q); break; }
      case Kind::I64: { int64_t q = x.i; std::memcpy(storage[n], &q, sizeof q); break; }
      case Kind::F32: { float q = static_cast<float>(x.f); std::memcpy(storage[n], &q, sizeof q); break; }
    }
    params[n] = storage[n];
    ++n;
  }
  for (int k = 0; k < v.hidden_params; ++k) {  // Triton's scratch pointers: none needed (the generator checks)
    const void* null = nullptr;
    std::memcpy(storage[n], &null, sizeof null);
    params[n] = storage[n];
    ++n;
  }
  ensure_context(device, v);
  CUfunction fn = function_for(v, device);
  check(driver().launch_kernel(fn, grid[0], grid[1], grid[2], 32 * v.num_warps, 1, 1, v.shared,
                               static_cast<CUstream>(stream), params, nullptr),
        "cuLaunchKernel", v);
}

std::string describe_call(const char* kernel, const std::string& arch, std::initializer_list<Constexpr> flags) {
  std::ostringstream s;
  s << kernel << " on sm_" << arch << " with";
  for (const Constexpr& f : flags) s << " " << f.name << "=" << f.value;
  int rows = 0;
  for (int r = 0; r < kNumVariants; ++r) {
    if (kVariants[r].kernel && std::strcmp(kVariants[r].kernel, kernel) == 0 && arch == kVariants[r].arch) ++rows;
  }
  s << " (" << rows << " cubins of this kernel for this arch)";
  return s.str();
}

}  // namespace nanotrain::aot

// The row `find` picks for a call described by plain arrays (nanotrain._C's aot_select, for tests on machines
// without a GPU): tags[i] 0 pointer (dtypes[i], address ints[i]), 1 int (ints[i]), 2 float (floats[i]).
// Returns the row index, or -1 when no row admits the call.
extern "C" int nanotrain_aot_select(const char* kernel, const char* arch, const char* const* flag_names,
                                    const int64_t* flag_values, int num_flags, const int* tags,
                                    const char* const* dtypes, const int64_t* ints, const double* floats, int n) {
  using nanotrain::aot::Constexpr;
  using nanotrain::aot::Value;
  std::vector<Constexpr> flags;
  for (int k = 0; k < num_flags; ++k) flags.push_back({flag_names[k], flag_values[k]});
  std::vector<Value> values;
  for (int i = 0; i < n; ++i) {
    if (tags[i] == 0) {
      values.push_back({Value::Tag::Ptr, reinterpret_cast<const void*>(static_cast<uintptr_t>(ints[i])), dtypes[i]});
    } else if (tags[i] == 1) {
      values.push_back(Value::of(ints[i]));
    } else {
      values.push_back(Value::of(floats[i]));
    }
  }
  try {
    const auto* v = nanotrain::aot::find(kernel, arch, flags.data(), num_flags, values.data(), n);
    return v == nullptr ? -1 : static_cast<int>(v - nanotrain::aot::kVariants);
  } catch (const std::exception&) {  // a wrong argument count: no row serves it
    return -1;
  }
}

// The embedded cubins for nanotrain._C's aot_cubin(i) (tests list them with cuobjdump).
extern "C" int nanotrain_aot_cubin(int i, const unsigned char** data, size_t* size) {
  if (i < 0 || i >= nanotrain::aot::kNumVariants) return 0;
  *data = nanotrain::aot::kVariants[i].cubin;
  *size = nanotrain::aot::kVariants[i].cubin_size;
  return 1;
}
