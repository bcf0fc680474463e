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

# Empty for now: no op has a CUDA kernel in the extension (the unused ReLU² kernel was removed; the
# ahead-of-time kernels of issue #17 will be listed here). setup.py then builds the C++ sources alone.
set(NANOTRAIN_CUDA_SOURCES
)
