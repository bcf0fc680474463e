"""FP8 training for linear layers: dynamic scaling, saturating casts, scaled GEMMs and the autograd of a
linear whose three GEMMs (forward, grad-input, grad-weight) all run in FP8.

A linear layer computes, with x (M, K), W (N, K) and dY (M, N):
    forward      y      = x  @ W.T     (M, N)
    grad-input   dx     = dY @ W       (M, K)
    grad-weight  dW     = dY.T @ x     (N, K)
Each GEMM operand is quantized on the fly: scale = fp8_max / amax (amax floored at EPS so an all-zero
tensor gets a finite scale), x_fp8 = cast(clamp(x * scale, -fp8_max, fp8_max)) rounded to nearest even,
and the GEMM divides its fp32 accumulator by scale_a * scale_b. The clamp makes every cast saturating:
out-of-range values become ±fp8_max, never inf or NaN. The fp32 master weights are never modified.

Recipes (Float8Config.from_recipe), following torchao's float8 training recipes:
  tensorwise  one fp32 scale per tensor; x and W in e4m3, dY in e5m2 (range for gradients); the forward
              GEMM uses fast accumulation, the two backward GEMMs do not. The forward saves the fp8
              copies (transposed, as the backward wants them), so the backward re-reads no bf16.
  rowwise     one scale per row of the left operand and per column of the right (amax along the GEMM's
              inner dimension), so every GEMM needs its operands scaled along a different axis: x and dY
              are each quantized twice. e4m3 everywhere (per-row scales leave enough range for
              gradients) with scales rounded down to powers of two, fast accumulation in all GEMMs.

Backends (see registry.py): op "fp8_matmul": scaled_mm (torch._scaled_mm / cuBLASLt, CUDA sm89+;
rowwise needs sm90), triton (kernels/fp8.py, scales applied in the epilogue), reference (dequantize to
fp32 and matmul, anywhere). Op "fp8_quantize": triton (fused absmax + scale + cast + transposed copy),
reference. Op "fp8_quantize_dual" (rowwise: a tensor scaled per row and, transposed, per column, from one
amax pass and one cast pass): triton, reference. Each op also has an `aot` backend ahead of triton (after
scaled_mm for the GEMM): the same kernels compiled ahead of time into nanotrain._C (sm89+ targets only).
The registry keeps the first available; a per-shape measured choice between scaled_mm and triton is left
for when a GPU has measured both (bench_fp8.py).

Each fused backend is a torch.library custom op with a fake implementation (nanotrain::triton_fp8_quantize,
triton_fp8_quantize_dual, triton_fp8_matmul), so torch.compile traces the autograd.Function around them as
opaque nodes; the references and torch._scaled_mm are traced as they are. The backends are chosen once:
`convert_to_float8` resolves an `Fp8Kernels` record per layer (self-checked on the GPU) and the
autograd.Function calls those callables; no registry lookup runs inside the compiled forward or an op.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nanotrain.errors import UserError
from nanotrain.ops import registry

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
EPS = 1e-12  # amax floor (kernels/fp8.py uses the same)
MIN_FEATURES = 128  # the default filter leaves linears with a smaller dimension in bf16
SKIP_NAMES = ("lm_head",)  # the default filter keeps the output projection in bf16 (torchtitan's default)
RECIPES = ("tensorwise", "rowwise")


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Float8Config:
    """How a Float8Linear scales and casts: granularity, the fp8 format per operand, scale rounding and
    fast accumulation per GEMM. Build it with `Float8Config.from_recipe(name)`."""
    recipe: str = "tensorwise"
    rowwise: bool = False
    input_dtype: torch.dtype = E4M3
    weight_dtype: torch.dtype = E4M3
    grad_dtype: torch.dtype = E5M2
    power_of_2_scales: bool = False
    fast_accum_forward: bool = True
    fast_accum_backward: bool = False

    def __post_init__(self) -> None:
        for name in ("input_dtype", "weight_dtype", "grad_dtype"):
            if getattr(self, name) not in (E4M3, E5M2):
                raise ValueError(f"Float8Config.{name} must be float8_e4m3fn or float8_e5m2, "
                                 f"got {getattr(self, name)}")
        if self.input_dtype == E5M2 and self.weight_dtype == E5M2:
            raise ValueError("Float8Config: the forward GEMM cannot take two e5m2 operands")

    @classmethod
    def from_recipe(cls, name: str) -> Float8Config:
        """The config of a named recipe: "tensorwise" or "rowwise" (see the module doc)."""
        if name == "tensorwise":
            return cls(recipe="tensorwise")
        if name == "rowwise":
            return cls(recipe="rowwise", rowwise=True, grad_dtype=E4M3, power_of_2_scales=True,
                       fast_accum_forward=True, fast_accum_backward=True)
        raise UserError(f"unknown FP8 recipe '{name}'; use --fp8-recipe tensorwise or --fp8-recipe rowwise.")


# ----------------------------------------------------------------------------------------------------
# Quantization: the reference definition


def _fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def scale_from_amax(amax: Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False) -> Tensor:
    """fp8_max / max(amax, EPS) in float32 (optionally rounded down to a power of two); NaN for a NaN amax."""
    scale = (_fp8_max(fp8_dtype) / amax.double().clamp(min=EPS)).float()
    if power_of_2:  # clear the mantissa bits: 2^floor(log2(scale)), exactly, for any positive normal scale
        # (not of a NaN, which would become inf and hide the NaN)
        scale = torch.where(scale.isnan(), scale, (scale.view(torch.int32) & 0x7F800000).view(torch.float32))
    return scale


def to_fp8_saturated(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast already-scaled values to `dtype`, clamping to ±fp8_max first: a plain cast would turn values
    past the range into inf (e5m2) or NaN, silently."""
    fp8_max = _fp8_max(dtype)
    return x.float().clamp(-fp8_max, fp8_max).to(dtype)


def quantize(x: Tensor, dtype: torch.dtype = E4M3, axis: int | None = None,
             power_of_2: bool = False) -> tuple[Tensor, Tensor]:
    """Scale x into the range of `dtype` and cast with saturation (the reference definition).

    axis=None: one scale for the whole tensor (scale shape ()); axis=d: amax is taken along dimension d,
    so there is one scale per slice across it (scale keeps d with size 1: for x (R, C), axis=-1 gives
    per-row scales (R, 1), axis=0 per-column scales (1, C)). Returns (x_fp8, scale) with
    x_fp8 ~ x * scale; dequantize(x_fp8, scale) ~ x.
    """
    xf = x.float()
    amax = xf.abs().amax() if axis is None else xf.abs().amax(dim=axis, keepdim=True)
    scale = scale_from_amax(amax, dtype, power_of_2)
    return to_fp8_saturated(xf * scale, dtype), scale


def dequantize(x_fp8: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """x_fp8 / scale in `dtype` (scale broadcasts: () or with size-1 dims as quantize returns it)."""
    return (x_fp8.float() / scale).to(dtype)


def sqnr(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(‖ref‖ / ‖ref - approx‖) (inf when equal)."""
    ref, approx = ref.double(), approx.double()
    noise = torch.linalg.vector_norm(ref - approx).item()
    signal = torch.linalg.vector_norm(ref).item()
    return math.inf if noise == 0 else 20.0 * math.log10(signal / noise)


# The mode of a 2-D cast (shared with kernels/fp8.py): -1 one scale per tensor, 1 per row, 0 per column.
_MODE_AXIS = {-1: None, 1: 1, 0: 0}


def reference_cast(x: Tensor, fp8_dtype: torch.dtype, mode: int, power_of_2: bool, write_main: bool,
                   write_t: bool) -> tuple[Tensor, Tensor, Tensor]:
    """x: (R, C) -> (x_fp8 (R, C) or empty, scale, x_fp8.T contiguous (C, R) or empty), via `quantize`."""
    q, scale = quantize(x, fp8_dtype, _MODE_AXIS[mode], power_of_2)
    empty = q.new_empty((0,))
    return (q if write_main else empty), scale, (q.t().contiguous() if write_t else empty)


def triton_cast(x: Tensor, fp8_dtype: torch.dtype, mode: int, power_of_2: bool, write_main: bool,
                write_t: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The fused Triton absmax + scale + cast (+ transposed copy): same contract as reference_cast."""
    from nanotrain.kernels import fp8 as kernels

    return kernels.quantize(x, fp8_dtype, mode, power_of_2, write_main, write_t)


def reference_cast_dual(x: Tensor, fp8_dtype: torch.dtype, power_of_2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x: (R, C) -> (x_fp8 (R, C) scaled per row, scales (R, 1), x.T in fp8 (C, R) scaled per column of x,
    scales (1, C)): the two operands a rowwise linear needs from one tensor."""
    q_rows, s_rows = quantize(x, fp8_dtype, -1, power_of_2)
    q_cols, s_cols = quantize(x, fp8_dtype, 0, power_of_2)
    return q_rows, s_rows, q_cols.t().contiguous(), s_cols


def triton_cast_dual(x: Tensor, fp8_dtype: torch.dtype, power_of_2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """reference_cast_dual in one Triton amax pass (row and column maxima together) and one cast pass."""
    from nanotrain.kernels import fp8 as kernels

    return kernels.quantize_rows_and_cols(x, fp8_dtype, power_of_2)


def _fp8_capability_reason(device: torch.device) -> str | None:
    """None on an NVIDIA GPU with FP8 tensor cores (sm89+), else a description of the device."""
    if device.type != "cuda":
        return {"cpu": "the CPU", "mps": "an Apple GPU (MPS)"}.get(device.type, device.type)
    if getattr(torch.version, "hip", None):
        return f"{torch.cuda.get_device_name(device)} (ROCm)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return None


def _check_triton(device: torch.device, dtype: torch.dtype, **props) -> str | None:
    if device.type == "cpu":
        return None  # the registry allows the interpreter only when forced under TRITON_INTERPRET=1
    why = _fp8_capability_reason(device)
    return None if why is None else f"FP8 Triton kernels need CUDA sm89+, this device is {why}"




# ----------------------------------------------------------------------------------------------------
# Scaled GEMM backends: out = (a_fp8 @ b_fp8) / (scale_a * scale_b)


def reference_scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
                        use_fast_accum: bool = False) -> Tensor:
    """Dequantize to fp32 and matmul. a (M, K), b (K, N) fp8; scale_a () or (M, 1); scale_b () or (1, N)."""
    return (dequantize(a, scale_a) @ dequantize(b, scale_b)).to(out_dtype)


def cublas_scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
                     use_fast_accum: bool = False) -> Tensor:
    """torch._scaled_mm (cuBLASLt tensorwise, CUTLASS rowwise). It wants a row-major, b column-major and
    the dequantization (inverse) scales; rowwise scaling needs a bf16 output (cast after if needed)."""
    M, N = a.shape[0], b.shape[1]
    rowwise = scale_a.numel() > 1 or scale_b.numel() > 1
    a = a.contiguous()
    if b.stride(0) != 1:
        b = b.t().contiguous().t()
    inv_a, inv_b = scale_a.float().reciprocal(), scale_b.float().reciprocal()
    if rowwise:  # both scales as vectors: (M, 1) and (1, N)
        inv_a = inv_a.reshape(-1, 1).expand(M, 1).contiguous()
        inv_b = inv_b.reshape(1, -1).expand(1, N).contiguous()
    mm_dtype = torch.bfloat16 if rowwise else out_dtype
    out = torch._scaled_mm(a, b, scale_a=inv_a, scale_b=inv_b, out_dtype=mm_dtype, use_fast_accum=use_fast_accum)
    return out if mm_dtype == out_dtype else out.to(out_dtype)


def triton_scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
                     use_fast_accum: bool = False) -> Tensor:
    """The Triton FP8 GEMM (kernels/fp8.py), scales applied in the epilogue; use_fast_accum lets Hopper
    accumulate over all of K in its reduced-precision fp8 accumulator, else each K tile is added in fp32."""
    from nanotrain.kernels import fp8 as kernels

    return kernels.matmul(a, b, scale_a, scale_b, out_dtype, use_fast_accum=use_fast_accum)


def _check_scaled_mm(device: torch.device, dtype: torch.dtype, rowwise: bool = False, aligned: bool = True,
                     **props) -> str | None:
    if device.type != "cuda":
        return "torch._scaled_mm needs a CUDA GPU"
    why = _fp8_capability_reason(device)
    if why is not None:
        return f"FP8 tensor cores need compute capability 8.9+, this device is {why}"
    if rowwise and torch.cuda.get_device_capability(device) < (9, 0):
        return "rowwise-scaled torch._scaled_mm needs sm90+"
    if not aligned:
        return "torch._scaled_mm needs every GEMM dimension divisible by 16"
    return None




# ----------------------------------------------------------------------------------------------------
# Custom ops: one `nanotrain::` op per fused backend (opaque to torch.compile, with a fake); the references
# and torch._scaled_mm are plain PyTorch that torch.compile traces. No backend choice happens inside an op.


@torch.library.custom_op("nanotrain::triton_fp8_quantize", mutates_args=())
def _triton_cast_op(x: Tensor, fp8_dtype: torch.dtype, mode: int, power_of_2: bool, write_main: bool,
                    write_t: bool) -> tuple[Tensor, Tensor, Tensor]:
    return triton_cast(x, fp8_dtype, mode, power_of_2, write_main, write_t)


@_triton_cast_op.register_fake
def _(x, fp8_dtype, mode, power_of_2, write_main, write_t):
    R, C = x.shape
    scale_shape = () if mode == -1 else ((R, 1) if mode == 1 else (1, C))
    return (x.new_empty((R, C) if write_main else (0,), dtype=fp8_dtype),
            x.new_empty(scale_shape, dtype=torch.float32),
            x.new_empty((C, R) if write_t else (0,), dtype=fp8_dtype))


@torch.library.custom_op("nanotrain::triton_fp8_quantize_dual", mutates_args=())
def _triton_cast_dual_op(x: Tensor, fp8_dtype: torch.dtype, power_of_2: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return triton_cast_dual(x, fp8_dtype, power_of_2)


@_triton_cast_dual_op.register_fake
def _(x, fp8_dtype, power_of_2):
    R, C = x.shape
    return (x.new_empty((R, C), dtype=fp8_dtype), x.new_empty((R, 1), dtype=torch.float32),
            x.new_empty((C, R), dtype=fp8_dtype), x.new_empty((1, C), dtype=torch.float32))


@torch.library.custom_op("nanotrain::triton_fp8_matmul", mutates_args=())
def _triton_mm_op(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
                  use_fast_accum: bool) -> Tensor:
    return triton_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum)


@_triton_mm_op.register_fake
def _(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def triton_quantize(x: Tensor, fp8_dtype: torch.dtype, mode: int, power_of_2: bool, write_main: bool,
                    write_t: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The fp8_quantize Triton backend: nanotrain::triton_fp8_quantize (a plain function, so that a model
    holding it can be deep-copied)."""
    return _triton_cast_op(x, fp8_dtype, mode, power_of_2, write_main, write_t)


def triton_quantize_dual(x: Tensor, fp8_dtype: torch.dtype, power_of_2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fp8_quantize_dual Triton backend: nanotrain::triton_fp8_quantize_dual."""
    return _triton_cast_dual_op(x, fp8_dtype, power_of_2)


def triton_matmul(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
                  use_fast_accum: bool = False) -> Tensor:
    """The fp8_matmul Triton backend: nanotrain::triton_fp8_matmul."""
    return _triton_mm_op(a, b, scale_a, scale_b, out_dtype, use_fast_accum)


# ----------------------------------------------------------------------------------------------------
# AOT backend: the same three kernels compiled ahead of time into nanotrain._C (kernels/_aot.py lists the
# variants: the recipes' and the self-checks' casts and GEMMs, for sm89+ targets only), launched by
# csrc/fp8/aot_ops.cpp with the configs NANOTRAIN_AUTOTUNE=first gives the Triton backend, so the same bits.
# No Triton, no compile, no autotune at run time for the calls the cubins serve.
#
# A call whose flags have no cubin (a custom Float8Config's e5m2 weights, fp16 inputs, an int past 32 bits) is
# routed to the Triton backend by the wrapper itself: `aot_serves` reads the extension's embedded table once per
# device (a flag combination counts when it has a generic row, so every shape and stride of it has a cubin) and
# is a constant for torch.compile, which traces the wrappers (inside _Float8LinearFn) with the decision folded in.
# The check cannot refuse instead: one resolved backend serves every cast of a layer (bf16 x, fp32 weight, ...).

AOT_QUANTIZE_KERNELS = ("fp8_amax", "fp8_cast")
AOT_MATMUL_KERNELS = ("fp8_matmul",)
# torch dtype -> Triton's name of a pointer to it (the table's params' dtype)
_AOT_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", E4M3: "fp8e4nv",
               E5M2: "fp8e5"}
_AOT_SERVED: dict[int, frozenset] = {}  # CUDA device index -> aot_served_keys of its arch


def aot_served_keys(table: list[dict], arch: str) -> frozenset:
    """The FP8 calls the embedded cubins serve on target `arch` (e.g. "90a"), as keys: ("fp8_amax", x dtype,
    MODE), ("fp8_cast", x dtype, fp8 dtype, MODE, POW2, WRITE_MAIN, WRITE_T), ("fp8_matmul", a, b, out dtype,
    FAST_ACCUM), dtypes by Triton name. Only flag combinations with a generic row count (every int a plain i32,
    no hint): then any call of them with 32-bit ints has a row (the ops copy an input that is not 16-byte
    aligned)."""
    keys = set()
    for row in table:
        if row["arch"] != arch or not row["kernel"].startswith("fp8_"):
            continue
        if not all(p["kind"] in ("ptr", "i32") and (p["kind"] == "ptr" or p["hint"] == "") for p in row["params"]):
            continue
        ptr = {p["name"]: p["dtype"] for p in row["params"] if p["kind"] == "ptr"}
        c = row["constexprs"]
        if row["kernel"] == "fp8_amax":
            keys.add(("fp8_amax", ptr["x_ptr"], c["MODE"]))
        elif row["kernel"] == "fp8_cast":
            keys.add(("fp8_cast", ptr["x_ptr"], ptr["out_ptr"], c["MODE"], bool(c["POW2"]), bool(c["WRITE_MAIN"]),
                      bool(c["WRITE_T"])))
        elif row["kernel"] == "fp8_matmul":
            keys.add(("fp8_matmul", ptr["a_ptr"], ptr["b_ptr"], ptr["c_ptr"], bool(c["FAST_ACCUM"])))
    return frozenset(keys)


@torch.compiler.assume_constant_result
def aot_serves(device_index: int, *keys: tuple) -> bool:
    """Whether the cubins nanotrain._C embeds for CUDA device `device_index`'s arch serve every key (see
    aot_served_keys). Read once per device; a constant for torch.compile."""
    from nanotrain.ops import _ext

    served = _AOT_SERVED.get(device_index)
    if served is None:
        served = aot_served_keys(_ext.aot_table(), _ext.device_arch(torch.device("cuda", device_index)))
        _AOT_SERVED[device_index] = served
    return all(k in served for k in keys)


def _fits_i32(*values: int) -> bool:
    return all(-(2**31) <= v < 2**31 for v in values)


def _device_index(t: Tensor) -> int:
    return t.device.index if t.device.index is not None else 0


def aot_quantize(x: Tensor, fp8_dtype: torch.dtype, mode: int, power_of_2: bool, write_main: bool,
                 write_t: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The fp8_quantize aot backend: nanotrain::aot_fp8_quantize where a cubin serves the call (aot_serves), else
    the Triton backend. Same contract as reference_cast."""
    xd, qd = _AOT_DTYPES.get(x.dtype), _AOT_DTYPES.get(fp8_dtype)
    if (x.dim() == 2 and _fits_i32(*x.shape, *x.stride()) and
            aot_serves(_device_index(x), ("fp8_amax", xd, mode),
                       ("fp8_cast", xd, qd, mode, bool(power_of_2), bool(write_main), bool(write_t)))):
        return torch.ops.nanotrain.aot_fp8_quantize(x, fp8_dtype, mode, power_of_2, write_main, write_t)
    return triton_quantize(x, fp8_dtype, mode, power_of_2, write_main, write_t)


def aot_quantize_dual(x: Tensor, fp8_dtype: torch.dtype, power_of_2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fp8_quantize_dual aot backend: nanotrain::aot_fp8_quantize_dual where a cubin serves the call, else the
    Triton backend."""
    xd, qd = _AOT_DTYPES.get(x.dtype), _AOT_DTYPES.get(fp8_dtype)
    if (x.dim() == 2 and _fits_i32(*x.shape, *x.stride()) and
            aot_serves(_device_index(x), ("fp8_amax", xd, 2), ("fp8_cast", xd, qd, 2, bool(power_of_2), True, True))):
        return torch.ops.nanotrain.aot_fp8_quantize_dual(x, fp8_dtype, power_of_2)
    return triton_quantize_dual(x, fp8_dtype, power_of_2)


def aot_matmul(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
               use_fast_accum: bool = False) -> Tensor:
    """The fp8_matmul aot backend: nanotrain::aot_fp8_matmul where a cubin serves the call, else the Triton
    backend."""
    key = ("fp8_matmul", _AOT_DTYPES.get(a.dtype), _AOT_DTYPES.get(b.dtype), _AOT_DTYPES.get(out_dtype),
           bool(use_fast_accum))
    if (a.dim() == 2 and b.dim() == 2 and _fits_i32(*a.shape, *a.stride(), *b.shape, *b.stride()) and
            aot_serves(_device_index(a), key)):
        return torch.ops.nanotrain.aot_fp8_matmul(a, b, scale_a, scale_b, out_dtype, bool(use_fast_accum))
    return triton_matmul(a, b, scale_a, scale_b, out_dtype, use_fast_accum)


def _aot_check(device: torch.device, dtype: torch.dtype, kernels: tuple[str, ...], op: str) -> str | None:
    from nanotrain.ops import _ext

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        why = _fp8_capability_reason(device)
        if why is not None:
            return f"FP8 cubins need CUDA sm89+, this device is {why}"
    if dtype not in (torch.bfloat16, torch.float32):
        return f"{dtype} has no FP8 cubins (bfloat16 or float32; the triton backend serves it)"
    why = _ext.aot_unavailable(kernels, device, ops=(op,))
    if why is not None and why.startswith("no cubin"):
        why += "; the FP8 cubins are built for sm89+ targets only (Ada GPUs: add 89 to NANOTRAIN_CUDA_ARCHES)"
    return why


def aot_check_quantize(device: torch.device, dtype: torch.dtype, **props) -> str | None:
    """Why the AOT fp8_quantize cannot run here (None if it can): an sm89+ GPU, bfloat16 or float32, the extension's
    cubins for the GPU's arch (see _ext.aot_unavailable; the default build holds them for sm_90a only)."""
    return _aot_check(device, dtype, AOT_QUANTIZE_KERNELS, "aot_fp8_quantize")


def aot_check_quantize_dual(device: torch.device, dtype: torch.dtype, **props) -> str | None:
    """aot_check_quantize for fp8_quantize_dual."""
    return _aot_check(device, dtype, AOT_QUANTIZE_KERNELS, "aot_fp8_quantize_dual")


def aot_check_matmul(device: torch.device, dtype: torch.dtype, **props) -> str | None:
    """aot_check_quantize for fp8_matmul (tensorwise and rowwise, aligned or not: the generic rows serve any shape)."""
    return _aot_check(device, dtype, AOT_MATMUL_KERNELS, "aot_fp8_matmul")


# ----------------------------------------------------------------------------------------------------
# Self-checks (registry.register_self_check): SQNR in dB against the unquantized values (DESIGN.md: >= 25 for
# casts and GEMMs), on small random inputs, for each scaling mode the case uses.

SQNR_MIN = 25.0


def _check_input(device: torch.device, dtype: torch.dtype, shape: tuple[int, int], seed: int) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, device=device, generator=gen) * 3).to(dtype)


def self_check_cast(fn: Callable[..., tuple[Tensor, Tensor, Tensor]], device: torch.device, dtype: torch.dtype,
                    **props) -> registry.CheckResult:
    """A cast backend in every mode: both its outputs dequantized against x (the lowest SQNR counts)."""
    x = _check_input(device, dtype, (48, 80), 0)
    worst = math.inf
    for mode in (-1, 1, 0):
        q, scale, q_t = fn(x, E4M3, mode, mode != -1, True, True)
        worst = min(worst, sqnr(x, dequantize(q, scale)), sqnr(x.t(), dequantize(q_t, scale.t())))
    return registry.CheckResult(worst, SQNR_MIN, "SQNR dB", higher_is_better=True)


def self_check_cast_dual(fn: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]], device: torch.device,
                         dtype: torch.dtype, **props) -> registry.CheckResult:
    """A dual-cast backend: the per-row copy and the transposed per-column copy against x."""
    x = _check_input(device, dtype, (48, 80), 0)
    q_rows, s_rows, q_cols_t, s_cols = fn(x, E4M3, True)
    worst = min(sqnr(x, dequantize(q_rows, s_rows)), sqnr(x.t(), dequantize(q_cols_t, s_cols.t())))
    return registry.CheckResult(worst, SQNR_MIN, "SQNR dB", higher_is_better=True)


def self_check_matmul(fn: Callable[..., Tensor], device: torch.device, dtype: torch.dtype, rowwise: bool = False,
                      aligned: bool = True, **props) -> registry.CheckResult:
    """A scaled-GEMM backend on operands quantized by the reference, against the unquantized fp32 product, with
    and without fast accumulation."""
    M, K, N = (64, 96, 80) if aligned else (40, 72, 56)
    a, w = _check_input(device, dtype, (M, K), 0).float(), _check_input(device, dtype, (N, K), 1).float()
    qa, sa = quantize(a, E4M3, -1 if rowwise else None)
    qw, sw = quantize(w, E4M3, -1 if rowwise else None)
    exact = a @ w.t()
    worst = math.inf
    for fast in (False, True):
        out = fn(qa, qw.t(), sa, sw.t() if rowwise else sw, torch.bfloat16 if device.type == "cuda" else dtype, fast)
        worst = min(worst, sqnr(exact, out.float()))
    return registry.CheckResult(worst, SQNR_MIN, "SQNR dB", higher_is_better=True)


registry.register_self_check("fp8_quantize", self_check_cast, [{}])
registry.register_self_check("fp8_quantize_dual", self_check_cast_dual, [{}])
registry.register_self_check("fp8_matmul", self_check_matmul,
                             [{"rowwise": r, "aligned": True} for r in (False, True)])
registry.register("fp8_quantize", "triton", triton_quantize, _check_triton, interpreter=True,
                  description="fused Triton absmax + scale + saturating cast (+ transposed copy)")
registry.register("fp8_quantize", "reference", reference_cast, description="pure-PyTorch amax, scale and cast")
registry.register("fp8_quantize_dual", "triton", triton_quantize_dual, _check_triton, interpreter=True,
                  description="fused Triton row + column absmax, then both casts in one pass")
registry.register("fp8_quantize_dual", "reference", reference_cast_dual, description="two pure-PyTorch quantizes")
registry.register("fp8_matmul", "scaled_mm", cublas_scaled_mm, _check_scaled_mm, fused=True,
                  description="torch._scaled_mm (cuBLASLt / CUTLASS FP8)")
registry.register("fp8_matmul", "triton", triton_matmul, _check_triton, interpreter=True,
                  description="Triton FP8 GEMM, scales in the epilogue")
registry.register("fp8_matmul", "reference", reference_scaled_mm, description="dequantize to fp32 and matmul")
registry.register("fp8_quantize", "aot", aot_quantize, aot_check_quantize, fused=True, before="triton",
                  description="AOT-compiled FP8 amax + cast from nanotrain._C (sm89+ cubins, no JIT)")
registry.register("fp8_quantize_dual", "aot", aot_quantize_dual, aot_check_quantize_dual, fused=True, before="triton",
                  description="AOT-compiled FP8 row + column amax and dual cast from nanotrain._C (no JIT)")
registry.register("fp8_matmul", "aot", aot_matmul, aot_check_matmul, fused=True, before="triton",
                  description="AOT-compiled Triton FP8 GEMM from nanotrain._C (sm89+ cubins, no JIT)")


@dataclass(frozen=True)
class Fp8Kernels:
    """The FP8 backends of a linear layer, resolved once when the model is converted (`resolve_kernels`):
    the casts and the GEMM for shapes whose dimensions are all multiples of 16 (`matmul`) or not
    (`matmul_unaligned`: torch._scaled_mm needs the alignment)."""
    quantize: Callable[..., tuple[Tensor, Tensor, Tensor]]
    quantize_dual: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
    matmul: Callable[..., Tensor]
    matmul_unaligned: Callable[..., Tensor]
    names: tuple[str, ...] = ()


def resolve_kernels(device: torch.device | str, dtype: torch.dtype, rowwise: bool) -> Fp8Kernels:
    """Resolve (and self-check, on a GPU) the FP8 backends for a linear on device/dtype with this recipe."""
    device = torch.device(device)
    quant = registry.resolve("fp8_quantize", device, dtype)
    dual = registry.resolve("fp8_quantize_dual", device, dtype)
    mm = registry.resolve("fp8_matmul", device, dtype, rowwise=rowwise, aligned=True)
    mm_u = registry.resolve("fp8_matmul", device, dtype, rowwise=rowwise, aligned=False)
    return Fp8Kernels(quant.fn, dual.fn, mm.fn, mm_u.fn, (quant.name, dual.name, mm.name, mm_u.name))


def _kernels_for(x: Tensor, rowwise: bool) -> Fp8Kernels:
    """Per-call resolution, for a Float8Linear used on its own (tests, scripts) without resolve_kernels."""
    return resolve_kernels(x.device, x.dtype, rowwise)


def cast_to_fp8(x: Tensor, fp8_dtype: torch.dtype, mode: int, power_of_2: bool = False, write_main: bool = True,
                write_t: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize a 2-D x (R, C) through the best fp8_quantize backend, resolved on this call. mode: -1 one scale
    per tensor, 1 one per row, 0 one per column. Returns (x_fp8 (R, C) or empty, scale, x_fp8.T (C, R) or
    empty)."""
    backend = registry.resolve("fp8_quantize", x.device, x.dtype)
    return backend.fn(x, fp8_dtype, mode, power_of_2, write_main, write_t)


def cast_to_fp8_rows_and_cols(x: Tensor, fp8_dtype: torch.dtype, power_of_2: bool = False,
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (R, C) -> (x_fp8 per-row scaled (R, C), scales (R, 1), x.T fp8 per-column scaled (C, R), scales (1, C))
    through the best fp8_quantize_dual backend, resolved on this call (one pass over x on the GPU)."""
    return registry.resolve("fp8_quantize_dual", x.device, x.dtype).fn(x, fp8_dtype, power_of_2)


def _aligned(*dims: int) -> bool:
    return all(d % 16 == 0 for d in dims)


def scaled_mm(a_fp8: Tensor, b_fp8: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
              use_fast_accum: bool = False) -> Tensor:
    """(a_fp8 @ b_fp8) / (scale_a * scale_b) in out_dtype through the best fp8_matmul backend, resolved on this
    call.

    a_fp8 (M, K) and b_fp8 (K, N) in fp8 (b ideally column-major, i.e. the .t() of a row-major (N, K));
    scale_a () or (M, 1) and scale_b () or (1, N): the quantization scales `quantize` returned.
    """
    rowwise = scale_a.numel() > 1 or scale_b.numel() > 1
    aligned = _aligned(a_fp8.shape[0], a_fp8.shape[1], b_fp8.shape[1])
    backend = registry.resolve("fp8_matmul", a_fp8.device, out_dtype, rowwise=rowwise, aligned=aligned)
    return backend.fn(a_fp8, b_fp8, scale_a, scale_b, out_dtype, use_fast_accum)


# ----------------------------------------------------------------------------------------------------
# Autograd


class _Float8LinearFn(torch.autograd.Function):
    """y = x @ W.T with all three GEMMs in FP8 (layouts: the left operand row-major, the right one
    column-major, which the transposed copies of the cast provide), through already-resolved backends."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, config: Float8Config, out_dtype: torch.dtype,
                kernels: Fp8Kernels) -> Tensor:
        # x: (M, K), weight: (N, K) -> (M, N)
        p2 = config.power_of_2_scales
        cast, mm = kernels.quantize, kernels.matmul
        if not _aligned(x.shape[0], x.shape[1], weight.shape[0]):
            mm = kernels.matmul_unaligned
        if config.rowwise:
            # x per row for this GEMM (M, 1); x per column (1, K), transposed (K, M), for grad_weight
            x_q, x_s, x_qt, xc_s = kernels.quantize_dual(x, config.input_dtype, p2)
            w_q, w_s, _ = cast(weight, config.weight_dtype, 1, p2, True, False)               # w_s (N, 1)
            y = mm(x_q, w_q.t(), x_s, w_s.t(), out_dtype, config.fast_accum_forward)
            ctx.save_for_backward(x_qt, xc_s, weight)
        else:
            x_q, x_s, x_qt = cast(x, config.input_dtype, -1, p2, True, True)
            w_q, w_s, w_qt = cast(weight, config.weight_dtype, -1, p2, True, True)
            y = mm(x_q, w_q.t(), x_s, w_s, out_dtype, config.fast_accum_forward)
            ctx.save_for_backward(x_qt, x_s, w_qt, w_s)
        ctx.config, ctx.kernels, ctx.mm = config, kernels, mm
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        # dy: (M, N) -> dx (M, K), dW (N, K)
        config, kernels, mm = ctx.config, ctx.kernels, ctx.mm
        p2, fast = config.power_of_2_scales, config.fast_accum_backward
        dy = dy.contiguous()
        if config.rowwise:
            x_qt, xc_s, weight = ctx.saved_tensors
            # dy per row (M, 1) for grad_input; per column (1, N), transposed (N, M), for grad_weight
            dy_q, dy_s, dy_qt, dyc_s = kernels.quantize_dual(dy, config.grad_dtype, p2)
            _, wc_s, w_qt = kernels.quantize(weight, config.weight_dtype, 0, p2, False, True)
            dx = mm(dy_q, w_qt.t(), dy_s, wc_s, ctx.x_dtype, fast)
            dw = mm(dy_qt, x_qt.t(), dyc_s.t(), xc_s, ctx.w_dtype, fast)
        else:
            x_qt, x_s, w_qt, w_s = ctx.saved_tensors
            dy_q, dy_s, dy_qt = kernels.quantize(dy, config.grad_dtype, -1, p2, True, True)
            dx = mm(dy_q, w_qt.t(), dy_s, w_s, ctx.x_dtype, fast)
            dw = mm(dy_qt, x_qt.t(), dy_s, x_s, ctx.w_dtype, fast)
        return dx, dw, None, None, None


def float8_linear(x: Tensor, weight: Tensor, bias: Tensor | None, config: Float8Config,
                  kernels: Fp8Kernels | None = None) -> Tensor:
    """F.linear with FP8 GEMMs. x: (..., K), weight: (N, K) -> (..., N) in the autocast dtype when autocast
    is on for x's device, else in x's dtype. Gradients come back in x's and weight's dtypes. `kernels`: the
    backends resolved in advance (default: resolved on this call)."""
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x2d = x.reshape(-1, x.shape[-1])
    kernels = _kernels_for(x, config.rowwise) if kernels is None else kernels
    y = _Float8LinearFn.apply(x2d, weight, config, out_dtype, kernels)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


# ----------------------------------------------------------------------------------------------------
# Modules


class Float8Linear(nn.Linear):
    """nn.Linear whose matmuls run in FP8 (same parameters and state dict as the nn.Linear it replaces).

    While `fp8_enabled` is False (see disable_fp8) it is exactly nn.Linear. `kernels` holds the backends
    convert_to_float8 resolved for the weight's device; while it is None, or for tensors of another device
    type, each call resolves them (for standalone use; not inside a compiled model).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 config: Float8Config | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config or Float8Config.from_recipe("tensorwise")
        self.fp8_enabled = True
        self.kernels: Fp8Kernels | None = None
        self.kernels_device_type: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Float8Config) -> Float8Linear:
        """A Float8Linear that shares `linear`'s Parameter objects (so optimizers keep working)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  config=config)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if not self.fp8_enabled:
            return F.linear(x, self.weight, self.bias)
        kernels = self.kernels if self.kernels_device_type == x.device.type else None
        return float8_linear(x, self.weight, self.bias, self.config, kernels)

    def resolve_kernels(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Resolve the FP8 backends once for `device` (default: the weight's) and `dtype` (default: bfloat16 on
        CUDA, where the trainer autocasts, else float32)."""
        device = torch.device(device) if device is not None else self.weight.device
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.kernels = resolve_kernels(device, dtype, self.config.rowwise)
        self.kernels_device_type = device.type

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.config.recipe}"


def default_module_filter(module: nn.Module, fqn: str) -> bool:
    """Convert a linear when both dims are multiples of 16 (FP8 GEMM alignment), the smaller is at least
    MIN_FEATURES (small GEMMs lose more to the casts than they gain) and it is not the output projection
    (SKIP_NAMES: its gradient feeds every logit; torchtitan keeps it in bf16 by default)."""
    if not isinstance(module, nn.Linear):
        return False
    if module.in_features % 16 or module.out_features % 16:
        return False
    if min(module.in_features, module.out_features) < MIN_FEATURES:
        return False
    return fqn.rsplit(".", 1)[-1] not in SKIP_NAMES


def convert_to_float8(model: nn.Module, config: Float8Config,
                      module_filter: Callable[[nn.Module, str], bool] | None = None) -> tuple[int, int]:
    """Swap, in place, each nn.Linear child that `module_filter(module, fqn)` accepts (default:
    default_module_filter) for a Float8Linear sharing its parameters. Call before torch.compile.

    Each converted layer resolves its FP8 backends now (on the device its weight lives on, unless that is the
    meta device), so that no backend choice runs inside the compiled forward.

    Returns (converted, total linear layers), for the line "FP8: converted N of M linear layers".
    """
    accept = module_filter or default_module_filter
    total, targets = 0, []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        total += 1
        if fqn and not isinstance(module, Float8Linear) and accept(module, fqn):
            targets.append(fqn)
    for fqn in targets:
        parent_name, _, child_name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = Float8Linear.from_linear(getattr(parent, child_name), config)
        if new.weight.device.type != "meta":
            new.resolve_kernels()
        setattr(parent, child_name, new)
    return len(targets), total


@contextlib.contextmanager
def disable_fp8(model: nn.Module) -> Iterator[None]:
    """Inside the block every Float8Linear of `model` is a plain linear (evaluation, sampling)."""
    modules = [m for m in model.modules() if isinstance(m, Float8Linear)]
    before = [m.fp8_enabled for m in modules]
    for m in modules:
        m.fp8_enabled = False
    try:
        yield
    finally:
        for m, state in zip(modules, before):
            m.fp8_enabled = state


# ----------------------------------------------------------------------------------------------------
# Device support


def fp8_available(device: torch.device | str) -> str | None:
    """None when `device` can train in FP8 (NVIDIA sm89+); otherwise what the device is, for messages."""
    return _fp8_capability_reason(torch.device(device))


def check_fp8_supported(device: torch.device | str) -> None:
    """Raise a UserError unless `device` has FP8 tensor cores (the trainer calls this for --fp8)."""
    why = fp8_available(device)
    if why is not None:
        raise UserError("--fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+, e.g. H100); "
                        f"this device is {why}. Run without --fp8.")
