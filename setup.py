"""Build nanotrain: the pure-Python package, the Triton kernels (as nanotrain.kernels) and, where a
compiler is present, the C++/CUDA extension nanotrain._C.

The extension's sources are listed once, in csrc/sources.cmake (CMakeLists.txt reads the same file).
- nvcc found (CUDA_HOME, /usr/local/cuda, or on PATH) and CUDA sources listed: C++ and CUDA sources, and the
  Triton kernels compiled ahead of time for NANOTRAIN_CUDA_ARCHES (kernels/_aot.py, run in a child process;
  cubins embedded in the library through the generated build/aot/aot_table.cpp, launched through the driver
  API, libcuda opened at the first launch). If that compile fails, the C++ part only.
- no nvcc, or no CUDA sources listed (the case today): the C++ sources only (the best-fit packer).
The library finds torch's libraries through a RUNPATH relative to itself (`runpaths`), never through the
folder it was built in.
- NANOTRAIN_NO_EXT=1, torch missing, or a failed compile: nanotrain installs as pure Python and says the
  extension is absent (nanotrain.ops._ext.extension_status() tells why at run time).
Environment knobs: NANOTRAIN_NO_EXT=1 (skip the extension), NANOTRAIN_NO_CUDA=1 (C++ only),
NANOTRAIN_CUDA_ARCHES="80;90a" (which archs, default both; also the AOT kernels' targets), MAX_JOBS (parallel
compile jobs, default 2; also the AOT compile's processes, each for one arch).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import time

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["nanotrain", "nanotrain.ops", "nanotrain.data", "nanotrain.eval", "nanotrain.kernels",
            "nanotrain.convert"]
PACKAGE_DIR = {"nanotrain.kernels": "kernels"}
DEFAULT_ARCHES = "80;90a"


def say(msg: str) -> None:
    print(f"nanotrain setup: {msg}", file=sys.stderr, flush=True)


def read_sources(path: str = os.path.join(ROOT, "csrc", "sources.cmake")) -> dict[str, list[str]]:
    """The lists of csrc/sources.cmake: {"NANOTRAIN_CPP_SOURCES": [...], "NANOTRAIN_CUDA_SOURCES": [...]}."""
    text = "\n".join(line.split("#", 1)[0] for line in open(path).read().splitlines())
    lists = {name: body.split() for name, body in re.findall(r"set\(\s*(\w+)\s+([^)]*)\)", text)}
    for name, files in lists.items():
        missing = [f for f in files if not os.path.exists(os.path.join(ROOT, f))]
        if missing:
            raise FileNotFoundError(f"csrc/sources.cmake lists files that do not exist in {name}: {missing}")
    return lists


def find_cuda_home() -> str | None:
    """A CUDA toolkit with bin/nvcc and include/cuda_runtime.h (a wrapper script on PATH is followed to it)."""
    if os.environ.get("NANOTRAIN_NO_CUDA") == "1":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def library_headers(cuda_home: str) -> list[str]:
    """Where cublas_v2.h and cusparse.h are, if not in the toolkit: torch's CUDA headers (ATen/cuda/*) include
    them, and a slim toolkit (nvcc and the runtime only) leaves them to pip's nvidia-* wheels."""
    out = []
    for header in ("cublas_v2.h", "cusparse.h"):
        if os.path.exists(os.path.join(cuda_home, "include", header)):
            continue
        for site in sys.path:
            for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
                if os.path.exists(os.path.join(d, header)) and d not in out:
                    out.append(d)
    return out


def arch_flags(spec: str) -> tuple[list[str], str]:
    """nvcc -gencode flags for '80;90a' and the label 'sm_80+sm_90a'."""
    arches = [a.strip() for a in re.split(r"[;, ]+", spec) if a.strip()]
    flags = []
    for a in arches:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags, "+".join(f"sm_{a}" for a in arches)


def extension_modules() -> tuple[list, dict]:
    """The nanotrain._C extension (or none, with the reason printed) and the build_ext command class."""
    if os.environ.get("NANOTRAIN_NO_EXT") == "1":
        say("NANOTRAIN_NO_EXT=1: installing pure Python; the extension nanotrain._C is absent.")
        remove_stale_extension()
        return [], {}
    try:
        cuda_home = find_cuda_home()
        if cuda_home and not os.environ.get("CUDA_HOME"):
            os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # no torch in this environment: still install the Python package
        say(f"cannot import torch ({e}): installing pure Python; the extension nanotrain._C is absent.")
        return [], {}

    lists = read_sources()
    sources = list(lists.get("NANOTRAIN_CPP_SOURCES", []))
    macros = [("NANOTRAIN_TORCH_VERSION", f'"{torch.__version__}"')]
    # -g0: no debug info (Python's CFLAGS carry -g; for the embedded cubins' byte arrays it doubled the library)
    cxx = ["-O3", "-g0"]
    nvcc: list[str] = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    cuda_sources = lists.get("NANOTRAIN_CUDA_SOURCES", [])
    with_cuda = cuda_home is not None and torch.version.cuda is not None and bool(cuda_sources)
    aot_dir = os.path.join(ROOT, "build", "aot")
    if with_cuda and not compile_aot_kernels(aot_dir):
        with_cuda = False
        cuda_failed = True
    else:
        cuda_failed = False
    if with_cuda:
        gencode, label = arch_flags(os.environ.get("NANOTRAIN_CUDA_ARCHES", DEFAULT_ARCHES))
        sources += cuda_sources + [os.path.relpath(os.path.join(aot_dir, "aot_table.cpp"), ROOT)]
        include_dirs.append(aot_dir)
        macros += [("NANOTRAIN_WITH_CUDA", "1"), ("NANOTRAIN_CUDA_ARCHES", f'"{label}"'),
                   ("NANOTRAIN_CUDA_VERSION", f'"{torch.version.cuda}"')]
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *gencode]
        include_dirs += library_headers(cuda_home)
        say(f"building nanotrain._C with CUDA ({cuda_home}, {label}) from {len(sources)} sources.")
        Extension = cpp_extension.CUDAExtension
    else:
        why = "NANOTRAIN_NO_CUDA=1" if os.environ.get("NANOTRAIN_NO_CUDA") == "1" else (
            "the ahead-of-time Triton compile failed (see above)" if cuda_failed else
            "torch has no CUDA" if torch.version.cuda is None else
            "csrc/sources.cmake lists no CUDA sources" if not cuda_sources else "no nvcc found (set CUDA_HOME)")
        say(f"building nanotrain._C CPU-only ({why}) from {len(sources)} sources.")
        Extension = cpp_extension.CppExtension
    rpaths = runpaths(os.path.dirname(os.path.abspath(torch.__file__)), with_cuda)
    os.environ.setdefault("MAX_JOBS", "2")
    ext = Extension(
        name="nanotrain._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=[f"-Wl,-rpath,{d}" for d in rpaths],
    )
    return [ext], {"build_ext": tolerant_build_ext(cpp_extension.BuildExtension)}


def compile_aot_kernels(out_dir: str) -> bool:
    """Compile the Triton kernels ahead of time for NANOTRAIN_CUDA_ARCHES into out_dir (aot_table.cpp, aot_args.h;
    kernels/_aot.py, cached by the sources' digest) in a child process without TRITON_INTERPRET. False (printed)
    when that fails, e.g. without triton: the extension is then built C++-only and the Triton JIT path serves."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    arches = os.environ.get("NANOTRAIN_CUDA_ARCHES", DEFAULT_ARCHES)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "kernels._aot", "--arches", arches, "--out", out_dir],
                          cwd=ROOT, env=env)
    if done.returncode != 0:
        say(f"compiling the Triton kernels ahead of time failed (exit {done.returncode}); building the C++ part only.")
        return False
    say(f"ahead-of-time Triton kernels ready in {time.time() - start:.0f} s.")
    return True


def runpaths(torch_dir: str, with_cuda: bool) -> list[str]:
    """The library search path (RUNPATH) of nanotrain._C, relative to the library itself ($ORIGIN), never to the
    folder it was built in: pip builds in a temporary environment that is deleted after the install.

    Installed as a package, nanotrain/ sits beside torch/ (and nvidia/, torch's CUDA runtime wheels) in the
    same site-packages, so `$ORIGIN/../torch/lib` finds torch's libraries even when nanotrain._C is imported
    before torch. In an editable or in-place build the library stays in the source tree, where those paths
    lead nowhere; there nanotrain.ops._ext imports torch first, which loads the same libraries, and the dynamic
    linker reuses them (it matches libraries already loaded by name).
    """
    paths = ["$ORIGIN/../torch/lib"]
    if with_cuda:  # torch's own CUDA runtime (pip's nvidia-* wheels), never a second copy of libcudart
        site = os.path.dirname(torch_dir)
        paths += sorted("$ORIGIN/../" + os.path.relpath(d, site).replace(os.sep, "/")
                        for d in glob.glob(os.path.join(site, "nvidia", "*", "lib"))
                        if glob.glob(os.path.join(d, "libcudart.so*")))
    return paths


def remove_stale_extension() -> None:
    """Drop an in-place nanotrain/_C*.so left by an earlier editable build, so it is not loaded by mistake."""
    for path in glob.glob(os.path.join(ROOT, "nanotrain", "_C*.so")):
        say(f"removing the earlier build {os.path.relpath(path, ROOT)}")
        os.remove(path)


def tolerant_build_ext(base: type) -> type:
    """BuildExtension that reports a failed compile and carries on, so the pure-Python install still succeeds."""

    class TolerantBuildExt(base):
        def run(self) -> None:
            start = time.time()
            try:
                super().run()
            except Exception as e:  # a compile error must not block installing nanotrain itself
                say(f"building nanotrain._C failed ({type(e).__name__}: {e}); installing without it. "
                    "nanotrain runs on its reference and Triton backends; see the compiler output above.")
                self.extensions = []  # so the install does not look for the library that was not built
                remove_stale_extension()
                return
            say(f"built nanotrain._C in {time.time() - start:.0f} s.")

    return TolerantBuildExt


if "egg_info" in sys.argv or "dist_info" in sys.argv:  # metadata only: no need to look for compilers
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = extension_modules()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass or {"build_ext": build_ext},
)
