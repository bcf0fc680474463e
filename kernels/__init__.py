"""Triton kernels, installed as `nanotrain.kernels`. One module per op family.

Kernels never import nanotrain: the host-side wrappers in nanotrain.ops own dispatch, checks
and autograd; modules here hold @triton.jit kernels and thin launchers.
"""
