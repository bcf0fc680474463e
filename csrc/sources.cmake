# The one list of the sources of the extension nanotrain._C.
#
# Read by CMakeLists.txt (include()) and parsed by setup.py, so keep the plain form below:
# one path per line, relative to the repository root, inside set(NAME ...). Comments start with '#'.
#
# NANOTRAIN_CPP_SOURCES are compiled everywhere (plain C++, no CUDA headers).
# NANOTRAIN_CUDA_SOURCES are compiled only where nvcc is found: every .cu file, and the .cpp files
# that include CUDA headers (e.g. the TORCH_LIBRARY_IMPL(nanotrain, CUDA, m) wrappers).

set(NANOTRAIN_CPP_SOURCES
  csrc/module.cpp
  csrc/registration.cpp
  csrc/data/best_fit_pack.cpp
)

# The launcher of the ahead-of-time compiled Triton kernels and the ops that call it. Beside these, a CUDA build
# compiles the file kernels/_aot.py generates at build time (aot_table.cpp: the cubins; aot_args.h: the
# argument structs), in setup.py's build folder (build/aot) or CMake's binary folder.
set(NANOTRAIN_CUDA_SOURCES
  csrc/aot/launcher.cpp
  csrc/attention/aot_ops.cpp
  csrc/muon/aot_ops.cpp
  csrc/fp8/aot_ops.cpp
)
