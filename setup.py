"""Build nanotrain: the pure-Python package, the Triton kernels (as nanotrain.kernels) and,
where a compiler is present, the C++/CUDA extension nanotrain._C (added by the kernel platform)."""
from setuptools import setup

setup(
    packages=["nanotrain", "nanotrain.ops", "nanotrain.data", "nanotrain.eval", "nanotrain.kernels"],
    package_dir={"nanotrain.kernels": "kernels"},
)
