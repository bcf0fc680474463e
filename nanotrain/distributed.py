"""torchrun / process-group setup and rank helpers (NCCL on GPUs, gloo on CPU)."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanotrain.errors import UserError


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device and its place among the ranks."""
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def setup(device_type: str = "auto") -> Runtime:
    """Pick the device and, under torchrun, join the process group (one device per rank)."""
    device_type = autodetect_device_type() if device_type in ("auto", "") else device_type
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda was asked for but no CUDA GPU is visible; "
                        "check the driver / CUDA_VISIBLE_DEVICES, or pass --device-type cpu")
    if device_type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device-type mps was asked for but MPS is not available; pass --device-type cpu")
    if not _launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device(device_type)
        if device_type == "cuda":
            torch.cuda.set_device(device)
        return Runtime(device=device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started local rank {local_rank} but only {torch.cuda.device_count()} GPUs "
                            "are visible; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device_type == "cpu":
        device, backend = torch.device("cpu"), "gloo"
    else:
        raise UserError(f"distributed training on {device_type} is not supported; use CUDA GPUs or CPU (gloo)")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return Runtime(device=device, rank=rank, local_rank=local_rank, world_size=world)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (every rank gets the same answer, so all take the same path)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_max(t).item() > 0)


class PeerFailed(RuntimeError):
    """Another rank failed the local part of a computation whose result is summed over the ranks."""


def sum_over_ranks(local: Callable[[], torch.Tensor | Sequence[torch.Tensor]], numel: int,
                   device: torch.device) -> torch.Tensor:
    """Run `local()` on this rank (a tensor, or tensors, of `numel` numbers in all) and sum the numbers over the
    ranks: a flat float64 tensor (on the CPU for an MPS `device`, which has no float64).

    Every rank reaches the one collective whatever `local` did, so a failure on one rank cannot leave the others
    waiting in a collective it never joins: an exception in `local` is raised again on its rank after the sum,
    and the other ranks raise PeerFailed. Everything that can fail on one rank alone (reading data, a forward that
    runs out of memory) belongs inside `local`."""
    device = torch.device("cpu") if device.type == "mps" else device
    error: Exception | None = None
    try:
        out = local()
        parts = [out] if isinstance(out, torch.Tensor) else list(out)
        values = torch.cat([p.reshape(-1).to(device).to(torch.float64) for p in parts])
        if values.numel() != numel:
            raise ValueError(f"sum_over_ranks: local() gave {values.numel()} numbers, expected {numel}")
    except Exception as e:  # raised again below, after the collective
        error, values = e, torch.zeros(numel, dtype=torch.float64, device=device)
    if not is_initialized():
        if error is not None:
            raise error
        return values
    packed = torch.cat([values, torch.tensor([float(error is not None)], dtype=torch.float64, device=device)])
    all_reduce_sum(packed)
    if error is not None:
        raise error
    if packed[-1].item() > 0:
        raise PeerFailed(f"failed on {int(packed[-1].item())} other rank(s)")
    return packed[:-1]


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


# Collectives on flat buffers for the sharded optimizer. torch >= 2.13 renames reduce_scatter_tensor /
# all_gather_into_tensor to *_single (same signatures); use whichever this torch has.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter_mean(out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
    """out (n, ...) on rank r <- the mean over ranks of inp[r*n:(r+1)*n] (inp: (world*n, ...), contiguous).

    Returns the Work handle when async_op (call .wait() before reading out), else None.
    """
    return _reduce_scatter(out, inp, op=dist.ReduceOp.AVG, async_op=async_op)


def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
    """out (world*n, ...) <- every rank's inp (n, ...) in rank order; inp may be rank r's slice of out (in place)."""
    return _all_gather(out, inp, async_op=async_op)


def all_reduce_mean(t: torch.Tensor, async_op: bool = False):
    """t <- the mean of t over ranks, in place (Work handle when async_op)."""
    return dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=async_op)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank src's values of t on every rank, in place (a no-op without a process group)."""
    if is_initialized():
        dist.broadcast(t, src=src)
    return t
