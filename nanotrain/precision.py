"""The arithmetic a run trains in, decided once per device: autocast dtype and gradient scaling.

- CUDA with compute capability 8.0+ (A100, H100, RTX 30xx and newer): bf16 autocast; bf16 has fp32's
  exponent range, so no loss scaling is needed.
- CUDA before Ampere (V100, T4, the free notebook GPUs): no bf16 tensor cores, so fp16 autocast with a
  gradient scaler (torch.amp.GradScaler). fp16's small range makes small gradients underflow without
  scaling, and a scale that is too high overflows: such a step is skipped (the weights keep their values),
  the scale is lowered, and the run counts the skipped steps.
- Apple MPS: bf16 autocast where the installed torch supports it (probed once), float32 otherwise.
- CPU: float32, no autocast (training is bit-for-bit what it always was).

Under torchrun every rank skips the same steps: each rank's overflow flag is agreed across ranks before
the optimizer step, because the sharded optimizer reduces gradients inside its step and a rank alone
could see an overflow the others do not.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ContextManager

import torch

from nanotrain import distributed


@dataclass
class Precision:
    """One device's training arithmetic: the autocast dtype (None: plain float32) and, for fp16, a scaler."""
    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None = None
    reason: str = ""
    skipped_steps: int = field(default=0)

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def describe(self) -> str:
        """The startup line: what the run computes in, and why."""
        scaling = " with a gradient scaler (overflowing steps are skipped and counted)" if self.scaler else ""
        return f"Precision: {self.name}{' autocast' if self.dtype else ''}{scaling} ({self.reason})"

    def autocast(self) -> ContextManager:
        """The context every forward (training and evaluation) runs under."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.amp.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), scaled when a scaler is in use."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the gradients; False when the scaler found an overflow (on any rank) and skipped the step."""
        if self.scaler is None:
            optimizer.step()
            return True
        self.scaler.unscale_(optimizer)
        found = found_inf_tensors(self.scaler, optimizer)
        overflow = distributed.any_rank(any(bool(t.item()) for t in found), self.device)
        if overflow:
            for t in found:  # every rank skips, and lowers its scale, together
                t.fill_(1.0)
        self.scaler.step(optimizer)
        self.scaler.update()
        if overflow:
            self.skipped_steps += 1
        return not overflow

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resume continues the scale (empty without a scaler)."""
        if self.scaler is None:
            return {"skipped_steps": self.skipped_steps}
        return {"skipped_steps": self.skipped_steps, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from a state_dict(); a checkpoint without one (an older run, another device) starts fresh."""
        state = state or {}
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def found_inf_tensors(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The scaler's per-device overflow flags for `optimizer`, as set by unscale_ (the tensors step() and
    update() read: writing into them makes every rank skip together)."""
    return list(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())


def mps_supports_bf16() -> bool:
    """Whether this torch runs a bf16 autocast matmul on MPS (older versions refuse it or fall back silently)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "bfloat16 is not supported on MPS, autocast disabled" is a warning
            a = torch.ones(8, 8, device="mps")
            with torch.amp.autocast("mps", dtype=torch.bfloat16):
                out = a @ a
        return out.dtype == torch.bfloat16
    except (RuntimeError, TypeError, UserWarning):
        return False


def choose(device: torch.device, *, mps_probe: Callable[[], bool] = mps_supports_bf16) -> Precision:
    """The precision policy for `device` (see the module doc)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return Precision(device, torch.bfloat16, reason=f"compute capability {major}.{minor}")
        return Precision(device, torch.float16, torch.amp.GradScaler("cuda"),
                         reason=f"compute capability {major}.{minor} has no bf16 tensor cores")
    if device.type == "mps":
        if mps_probe():
            return Precision(device, torch.bfloat16, reason="this torch supports bf16 autocast on MPS")
        return Precision(device, None, reason=f"torch {torch.__version__} has no bf16 autocast on MPS")
    return Precision(device, None, reason=f"{device.type}: autocast would change the numbers for little speed")
