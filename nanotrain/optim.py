"""MuonAdamW: Muon for the transformer's matrices, AdamW for everything else, and the training schedules.

Muon (https://kellerjordan.github.io/posts/muon/) updates each 2-D weight of the blocks with an
orthogonalized momentum; matrices of the same shape are stacked and updated together by
`nanotrain.ops.newton_schulz.muon_update` (Nesterov momentum, MuonEq, Polar Express, Muon+ norm snap,
NorMuon variance reduction, cautious weight decay, all in place). AdamW (decoupled weight decay, bias
correction, float32 math) handles the embeddings, the lm_head and the scalars, where orthogonalized
updates make no sense (lookup tables, a classifier, 0/1-D parameters).

The grouping and per-group hyperparameters follow nanochat's GPT.setup_optimizer; the schedules follow
nanochat's base_train. The per-group update functions (`_adamw_update`, `_muon_update_stack`) are
methods that DistMuonAdamW, the data-parallel (ZeRO-2) subclass used under torchrun, reuses on the slices
and whole matrices each rank owns; merge_optimizer_shards turns its per-rank state_dicts back into one
full state, which either optimizer loads at any world size.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from nanotrain import distributed
from nanotrain.ops import newton_schulz

ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
MUON_KEYS = ("lr", "momentum", "ns_steps", "beta2", "weight_decay")


@torch.no_grad()
def adamw_update_(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place on p and both moments (float32 moments; math in float32).

    Decoupled weight decay first (p *= 1 - lr * wd), then the moment updates, bias correction
    (1 - beta^step) and p -= lr / bias1 * m / (sqrt(v / bias2) + eps). All tensors share p's shape.
    """
    p32 = p if p.dtype == torch.float32 else p.float()
    g = grad.float()
    p32.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.lerp_(g.square(), 1.0 - beta2)
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
    p32.addcdiv_(exp_avg, denom, value=-lr / bias1)
    if p32 is not p:
        p.copy_(p32)


def muon_lr_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """Aspect factor sqrt(max(1, rows/cols)) on the Muon LR (nanochat): tall matrices (c_fc) get more."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two update rules, chosen per param group by group['kind'] in {'adamw', 'muon'}.

    AdamW groups need lr, betas, eps, weight_decay. Muon groups need lr, momentum, ns_steps, beta2,
    weight_decay, and all their parameters must be 2-D with one shape (they are stacked). The Muon
    state of a group (momentum_buffer (K, m, n), second_momentum (K, m, 1) or (K, 1, n)) lives in the
    state of the group's first parameter, so state_dict()/load_state_dict() round-trip it.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]]) -> None:
        groups = [dict(g) for g in param_groups]
        for i, g in enumerate(groups):
            kind = g.get("kind")
            keys = {"adamw": ADAMW_KEYS, "muon": MUON_KEYS}.get(kind)
            if keys is None:
                raise ValueError(f"param group {i}: kind must be 'adamw' or 'muon', got {kind!r}")
            missing = [k for k in keys if k not in g]
            if missing:
                raise ValueError(f"param group {i} ({kind}) lacks {missing}")
            g["params"] = list(g["params"])
            if kind == "muon":
                shapes = {tuple(p.shape) for p in g["params"]}
                if len(shapes) > 1 or any(len(s) != 2 for s in shapes):
                    raise ValueError(f"param group {i} (muon) needs 2-D parameters of one shape, got {shapes}")
        super().__init__(groups, defaults={})
        # the Muon step's backend per (device type, dtype, shape), resolved now, not inside step()
        self._muon_kernels: dict[tuple, Any] = {}
        for g in self.param_groups:
            if g["kind"] == "muon" and g["params"]:
                self._muon_kernel(g["params"][0])

    def _muon_kernel(self, p: Tensor) -> Any:
        """The resolved Muon step for stacks of p's shape, device and dtype (resolved on first sight)."""
        key = (p.device.type, p.dtype, tuple(p.shape[-2:]))
        if key not in self._muon_kernels:
            self._muon_kernels[key] = newton_schulz.resolve_update(p.device, p.dtype, key[2])
        return self._muon_kernels[key]

    # ------------------------------------------------------------------ AdamW
    def _adamw_update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """AdamW step of one tensor (a whole parameter, or the slice a rank owns) with its own state."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adamw_update_(p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"], beta1, beta2,
                      group["eps"], group["weight_decay"])

    def _step_adamw(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is not None:
                self._adamw_update(p, p.grad, self.state[p], group)

    # ------------------------------------------------------------------ Muon
    def _muon_update_stack(self, params: Tensor, grads: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Muon step of a stack of same-shape matrices, in place on `params`; `grads` is consumed.

        params, grads: (K, m, n). state holds the buffers for exactly these K matrices (created here
        on first use), so a ZeRO-2 rank can call this on the K matrices it owns.
        """
        K, m, n = params.shape
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(params)
            second_shape = (K, m, 1) if m >= n else (K, 1, n)
            state["second_momentum"] = torch.zeros(second_shape, dtype=params.dtype, device=params.device)
        update = self._muon_kernel(params)
        update(grads, params, state["momentum_buffer"], state["second_momentum"], group["momentum"],
               group["lr"] * muon_lr_scale((m, n)), group["weight_decay"], group["beta2"], group["ns_steps"])

    def _muon_group_update(self, params: list[Tensor], grads: list[Tensor | None], state: dict[str, Any],
                           group: dict[str, Any]) -> None:
        """Stack the group's matrices and gradients (a missing gradient counts as zero), update, copy back."""
        stacked_params = torch.stack(params)                                            # (K, m, n)
        stacked_grads = torch.stack([torch.zeros_like(p) if g is None else g.to(p.dtype)
                                     for p, g in zip(params, grads)])
        self._muon_update_stack(stacked_params, stacked_grads, state, group)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    def _step_muon(self, group: dict[str, Any]) -> None:
        params = group["params"]
        grads = [p.grad for p in params]
        if not params or all(g is None for g in grads):
            return
        self._muon_group_update(params, grads, self.state[params[0]], group)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch.optim signature)
        """Apply one update to every group (closure, if given, is evaluated first with grad enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)
        return loss


    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict() of this optimizer, or a merged one (see merge_optimizer_shards).

        A single shard of a DistMuonAdamW run with several ranks is refused (ValueError): its tensors are
        slices, which this optimizer would misread as whole states.
        """
        zero = state_dict.get(ZERO_KEY)
        if zero is not None and zero["world_size"] > 1:
            raise ValueError(f"this is one rank's shard of a {zero['world_size']}-rank optimizer state; merge "
                             "all ranks' shards with merge_optimizer_shards first")
        self._load_keeping_dtypes({k: v for k, v in state_dict.items() if k != ZERO_KEY})

    def _load_keeping_dtypes(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, then the saved dtypes back: torch casts every state tensor to its
        parameter's dtype, which would turn the float32 AdamW moments of a bfloat16 parameter into bfloat16."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            st = self.state[params[index]]
            for key, value in saved.items():
                if isinstance(value, Tensor) and isinstance(st.get(key), Tensor) and st[key].dtype != value.dtype:
                    st[key] = st[key].to(value.dtype)


# ---------------------------------------------------------------------- ZeRO-2 data parallelism
ZERO_KEY = "zero"  # the key of a sharded state_dict's layout: {"world_size", "rank", "params": {index: layout}}


def _split(numel: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """(chunk, lo, hi): rank owns flat elements [lo, hi) of a tensor cut into world_size chunks of `chunk`
    (the last chunks are padded past numel; a rank may own nothing when numel < world_size * chunk)."""
    chunk = -(-numel // world_size)
    lo = min(rank * chunk, numel)
    return chunk, lo, min(lo + chunk, numel)


class DistMuonAdamW(MuonAdamW):
    """MuonAdamW for data parallelism without DDP: gradients are averaged inside step(), optimizer state is
    sharded across ranks (ZeRO-2), and each rank updates only what it owns before the parameters are gathered.

    Ownership rules (a pure function of the parameter shapes, the world size and min_shard_numel):
      AdamW parameter with numel >= world_size * min_shard_numel: flattened and cut into world_size equal
        chunks (padded at the end when numel does not divide); the gradient is reduce-scattered (mean) so rank
        r receives chunk r, updates those elements with state for them alone, and the chunks are all-gathered.
      Smaller AdamW parameters (scalars, per-layer lambdas, the smear gate): the gradient is all-reduced (mean)
        and every rank updates the whole tensor with its own copy of the (tiny) state; one collective per
        parameter is cheaper than a reduce-scatter and an all-gather of a few elements.
      Muon group of K same-shape matrices: whole matrices, round robin (rank r owns matrices r, r + W, ... of
        the first group; later groups continue the rotation where the previous one stopped, so remainders
        spread over the ranks). Any W works: when W does not divide K the stack is padded with zero matrices
        so every rank sends and receives ceil(K/W) of them.
        The stacked gradients are reduce-scattered (mean) so each owner receives the mean gradient of its
        matrices, runs the Muon step on them (state (n_owned, m, n)), and the stacks are all-gathered.
    So per-rank optimizer memory falls as ~1/W. Communication overlaps computation: step() launches every
    group's gradient reduction asynchronously first, then in group order waits for one, updates it and
    launches its all-gather, so later reductions and earlier gathers run while a group computes.

    Every rank must hold the same parameters at construction (they are broadcast from rank 0 then, as DDP
    does) and call step() together. Gradients are the per-rank means of their micro-steps, as the trainer
    makes them; the mean over ranks then equals one rank accumulating W times as many micro-steps.
    Parameters whose gradient is None are skipped (AdamW) or count as zero (Muon), as in MuonAdamW; that
    must agree across ranks (it does when every rank runs the same model).
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], *, rank: int | None = None,
                 world_size: int | None = None, min_shard_numel: int = 1024, broadcast: bool = True) -> None:
        super().__init__(param_groups)
        self.rank = distributed.get_rank() if rank is None else rank
        self.world_size = distributed.get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.min_shard_numel = min_shard_numel
        if broadcast and distributed.is_initialized():
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        distributed.broadcast_(p.data, src=0)

    # ------------------------------------------------------------------ ownership
    def _sharded(self, p: Tensor) -> bool:
        return p.numel() >= self.world_size * self.min_shard_numel and p.is_contiguous()

    def _muon_owners(self, group: dict[str, Any]) -> list[list[int]]:
        """owners[r]: indices (within the Muon group) of the matrices rank r owns.

        Round robin over the ranks, continued from one Muon group to the next (the first group's matrix i
        goes to rank i mod W; each later group starts where the previous one stopped), so groups whose size
        W does not divide do not all load the low ranks: every rank owns ceil(K/W) or floor(K/W) of a group.
        """
        offset = 0
        for g in self.param_groups:
            if g is group:
                break
            if g["kind"] == "muon":
                offset += len(g["params"])
        W = self.world_size
        return [[i for i in range(len(group["params"])) if (i + offset) % W == r] for r in range(W)]

    def layout(self) -> dict[int, dict[str, Any]]:
        """{state_dict param index: how this rank holds its state} (saved in state_dict()[ZERO_KEY])."""
        out: dict[int, dict[str, Any]] = {}
        index = 0
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "muon":
                if params:
                    out[index] = {"kind": "muon", "shape": list(params[0].shape), "count": len(params),
                                  "owned": self._muon_owners(group)[self.rank]}
            else:
                for i, p in enumerate(params):
                    if self._sharded(p):
                        _, lo, hi = _split(p.numel(), self.world_size, self.rank)
                        out[index + i] = {"kind": "flat", "shape": list(p.shape), "lo": lo, "hi": hi}
                    else:
                        out[index + i] = {"kind": "replicated", "shape": list(p.shape)}
            index += len(params)
        return out

    # ------------------------------------------------------------------ step
    def _launch_adamw(self, group: dict[str, Any]) -> list[tuple]:
        """Start the gradient reductions of an AdamW group; returns one pending entry per parameter."""
        pending = []
        W = self.world_size
        for p in group["params"]:
            if p.grad is None:
                continue
            if not self._sharded(p):
                grad = p.grad.contiguous()
                pending.append(("replicated", p, grad, distributed.all_reduce_mean(grad, async_op=True)))
                continue
            numel = p.numel()
            chunk, lo, hi = _split(numel, W, self.rank)
            flat = p.grad.reshape(-1)
            if chunk * W != numel:
                padded = flat.new_zeros(chunk * W)
                padded[:numel] = flat
                flat = padded
            out = flat.new_empty(chunk)
            pending.append(("flat", p, out, distributed.reduce_scatter_mean(out, flat.contiguous(), async_op=True)))
        return pending

    def _launch_muon(self, group: dict[str, Any]) -> list[tuple]:
        params = group["params"]
        grads = [p.grad for p in params]
        if not params or all(g is None for g in grads):
            return []
        W, K = self.world_size, len(params)
        per_rank = -(-K // W)
        zero = torch.zeros_like(params[0])
        # rank r's chunk (slots r * per_rank ...) holds the matrices it owns, padded with zeros to per_rank
        owners = self._muon_owners(group)
        slots = [grads[i].to(params[0].dtype) if i is not None and grads[i] is not None else zero
                 for r in range(W) for i in owners[r] + [None] * (per_rank - len(owners[r]))]
        stacked = torch.stack(slots)                                                    # (W * per_rank, m, n)
        out = stacked.new_empty((per_rank, *stacked.shape[1:]))                         # (per_rank, m, n)
        return [("muon", params, out, distributed.reduce_scatter_mean(out, stacked, async_op=True))]

    def _update_and_gather(self, entry: tuple, group: dict[str, Any]) -> tuple | None:
        """Wait for one reduction, update what this rank owns, start the all-gather; returns the finishing work."""
        kind, target, buf, work = entry
        work.wait()
        if kind == "replicated":
            self._adamw_update(target, buf.view_as(target), self.state[target], group)
            return None
        if kind == "flat":
            p, numel = target, target.numel()
            chunk, lo, hi = _split(numel, self.world_size, self.rank)
            flat = p.data.view(-1)
            if hi > lo:
                self._adamw_update(flat[lo:hi], buf[:hi - lo], self.state[p], group)
            if chunk * self.world_size == numel:  # gather in place into the parameter
                return ("flat", p, None, distributed.all_gather_flat(flat, flat[lo:hi], async_op=True))
            mine = buf  # the reduced gradient is spent: reuse it to send this rank's updated elements
            mine[:hi - lo] = flat[lo:hi]
            full = buf.new_empty(chunk * self.world_size)
            return ("flat", p, full, distributed.all_gather_flat(full, mine, async_op=True))
        params = target
        owned = self._muon_owners(group)[self.rank]
        if owned:
            mats = torch.stack([params[i].data for i in owned])                         # (n_owned, m, n)
            self._muon_update_stack(mats, buf[:len(owned)], self.state[params[0]], group)
            buf[:len(owned)] = mats
        full = buf.new_empty((buf.shape[0] * self.world_size, *buf.shape[1:]))          # (W * per_rank, m, n)
        return ("muon", params, full, distributed.all_gather_flat(full, buf, async_op=True))

    def _finish(self, entry: tuple, group: dict[str, Any]) -> None:
        kind, target, full, work = entry
        work.wait()
        if kind == "flat":
            if full is not None:
                target.data.view(-1).copy_(full[:target.numel()])
            return
        params, W = target, self.world_size
        per_rank = full.shape[0] // W
        order = [(r * per_rank + j, i) for r, owned in enumerate(self._muon_owners(group)) for j, i in enumerate(owned)]
        torch._foreach_copy_([params[i].data for _, i in order], [full[s] for s, _ in order])

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch.optim signature)
        """Average the gradients across ranks, update the owned parts, gather the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        launched = [(group, self._launch_adamw(group) if group["kind"] == "adamw" else self._launch_muon(group))
                    for group in self.param_groups]
        gathers = [(self._update_and_gather(entry, group), group) for group, entries in launched for entry in entries]
        for entry, group in gathers:
            if entry is not None:
                self._finish(entry, group)
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: the usual optimizer state_dict (state of owned slices/matrices only) plus its
        layout under ZERO_KEY, so shards of any world size can be merged (merge_optimizer_shards)."""
        sd = super().state_dict()
        sd[ZERO_KEY] = {"world_size": self.world_size, "rank": self.rank, "params": self.layout()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's own shard (same world size and rank), or a full state (a MuonAdamW state_dict or
        merge_optimizer_shards' output), from which this rank cuts what it owns: that is how a run re-shards."""
        zero = state_dict.get(ZERO_KEY)
        if zero is not None and zero["world_size"] > 1:
            if (zero["world_size"], zero["rank"]) != (self.world_size, self.rank):
                raise ValueError(f"this is rank {zero['rank']}'s shard of a {zero['world_size']}-rank state and this "
                                 f"is rank {self.rank} of {self.world_size}; merge all shards with "
                                 "merge_optimizer_shards and load the result")
            self._load_keeping_dtypes({k: v for k, v in state_dict.items() if k != ZERO_KEY})
            return
        self._load_keeping_dtypes(self._shard_full_state(state_dict))

    def _shard_full_state(self, full: dict[str, Any]) -> dict[str, Any]:
        """The part of a full (unsharded) state_dict this rank owns, in this optimizer's layout."""
        state = {}
        for index, info in self.layout().items():
            st = full["state"].get(index)
            if not st:
                continue
            if info["kind"] == "replicated":
                state[index] = dict(st)
            elif info["kind"] == "flat":
                lo, hi = info["lo"], info["hi"]
                if hi > lo:
                    state[index] = {k: (v.reshape(-1)[lo:hi].clone() if isinstance(v, Tensor) and v.dim() else v)
                                    for k, v in st.items()}
            elif info["owned"]:
                idx = torch.tensor(info["owned"])
                state[index] = {k: v.index_select(0, idx.to(v.device)) for k, v in st.items()}
        return {"state": state, "param_groups": full["param_groups"]}


def merge_optimizer_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """One full (MuonAdamW-layout) optimizer state_dict from every rank's DistMuonAdamW.state_dict().

    shards: one per rank, any order. The result loads into a MuonAdamW (one process) or into a DistMuonAdamW
    of any world size (each rank cuts its part), which is how a checkpoint is re-sharded.
    """
    if not shards:
        raise ValueError("merge_optimizer_shards needs at least one shard")
    if any(ZERO_KEY not in s for s in shards):
        if len(shards) == 1:
            return shards[0]
        raise ValueError("merge_optimizer_shards: a state without a shard layout cannot be merged with others")
    shards = sorted(shards, key=lambda s: s[ZERO_KEY]["rank"])
    world = shards[0][ZERO_KEY]["world_size"]
    if [s[ZERO_KEY]["rank"] for s in shards] != list(range(world)) or any(
            s[ZERO_KEY]["world_size"] != world for s in shards):
        raise ValueError(f"merge_optimizer_shards needs exactly one shard of each of the {world} ranks")
    state: dict[int, dict[str, Any]] = {}
    for index, info in shards[0][ZERO_KEY]["params"].items():
        parts = [(s[ZERO_KEY]["params"][index], s["state"].get(index)) for s in shards]
        present = [(i, st) for i, st in parts if st]
        if not present:
            continue
        if info["kind"] == "replicated":
            state[index] = dict(present[0][1])
        elif info["kind"] == "flat":
            numel = math.prod(info["shape"])
            merged: dict[str, Any] = {}
            for i, st in present:
                for key, value in st.items():
                    if isinstance(value, Tensor) and value.dim():
                        if key not in merged:
                            merged[key] = value.new_zeros(numel)
                        merged[key][i["lo"]:i["hi"]] = value
                    else:
                        merged.setdefault(key, value)
            state[index] = {k: (v.view(info["shape"]) if isinstance(v, Tensor) and v.dim() else v)
                            for k, v in merged.items()}
        else:
            count = info["count"]
            merged = {}
            for i, st in present:
                idx = torch.tensor(i["owned"])
                for key, value in st.items():
                    if key not in merged:
                        merged[key] = value.new_zeros((count, *value.shape[1:]))
                    merged[key].index_copy_(0, idx.to(value.device), value)
            state[index] = merged
    return {"state": state, "param_groups": shards[0]["param_groups"]}


def build_optimizer(model: torch.nn.Module, *, embedding_lr: float, unembedding_lr: float, matrix_lr: float,
                    scalar_lr: float, weight_decay: float,
                    adam_betas: tuple[float, float] | None = (0.8, 0.95), model_dim_lr_scale: bool = True,
                    smear_lr: float = 0.2, muon_momentum: float = 0.95, muon_beta2: float = 0.9,
                    ns_steps: int = 5, sharded: bool | None = None) -> MuonAdamW:
    """MuonAdamW for a nanotrain GPT with nanochat's grouping and per-group settings.

    sharded: build a DistMuonAdamW (gradients averaged across ranks inside step(), state sharded ZeRO-2
    style); None (default) does so when torch.distributed is initialized with more than one rank.

    AdamW groups (lr scaled by (n_embd/768)^-0.5 when model_dim_lr_scale, tuned at width 768):
      lm_head       lr unembedding_lr,        wd 0.01
      wte           lr embedding_lr,          wd 0.001
      value_embeds  lr embedding_lr * 0.5,    wd 0.01
    with betas = adam_betas (the --adam-beta1/--adam-beta2 options); adam_betas=None gives nanochat's
    current per-group betas instead: (0.8, 0.96) for lm_head, (0.8, 0.995) for wte and value_embeds.
    Scalar groups (no width scaling, fixed betas as nanochat):
      resid_lambdas lr scalar_lr * 0.01, betas (0.8, 0.95), wd 0.05
      x0_lambdas    lr scalar_lr,        betas (0.96, 0.95), wd 0   (higher beta1: a smoother signal)
      smear gate, smear_lambda, backout_lambda: lr smear_lr (0.2), betas (0.8, 0.95), wd 0
    eps is 1e-10 everywhere. Muon: one group per matrix shape of the transformer blocks, lr matrix_lr
    (times the aspect factor at step time), momentum muon_momentum, NorMuon beta2 muon_beta2, weight
    decay weight_decay, ns_steps Polar Express steps. Every group records 'initial_lr' so the trainer
    can set group['lr'] = group['initial_lr'] * lrm; the trainer also sets the Muon groups' 'momentum'
    and 'weight_decay' from the schedules below each step.
    """
    n_embd = model.config.n_embd
    dmodel_scale = (n_embd / 768) ** -0.5 if model_dim_lr_scale else 1.0
    head_betas, embed_betas = ((0.8, 0.96), (0.8, 0.995)) if adam_betas is None else (adam_betas, adam_betas)
    matrix_params = list(model.transformer.h.parameters())
    eps = 1e-10
    groups: list[dict[str, Any]] = [
        dict(kind="adamw", name="lm_head", params=list(model.lm_head.parameters()), lr=unembedding_lr * dmodel_scale,
             betas=tuple(head_betas), eps=eps, weight_decay=0.01),
        dict(kind="adamw", name="wte", params=list(model.transformer.wte.parameters()),
             lr=embedding_lr * dmodel_scale, betas=tuple(embed_betas), eps=eps, weight_decay=0.001),
        dict(kind="adamw", name="value_embeds", params=list(model.value_embeds.parameters()),
             lr=embedding_lr * dmodel_scale * 0.5, betas=tuple(embed_betas), eps=eps, weight_decay=0.01),
        dict(kind="adamw", name="resid_lambdas", params=[model.resid_lambdas], lr=scalar_lr * 0.01,
             betas=(0.8, 0.95), eps=eps, weight_decay=0.05),
        dict(kind="adamw", name="x0_lambdas", params=[model.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), eps=eps,
             weight_decay=0.0),
        dict(kind="adamw", name="smear", params=[model.smear_gate.weight, model.smear_lambda, model.backout_lambda],
             lr=smear_lr, betas=(0.8, 0.95), eps=eps, weight_decay=0.0),
    ]
    groups = [g for g in groups if g["params"]]
    for shape in sorted({tuple(p.shape) for p in matrix_params}):
        groups.append(dict(kind="muon", name=f"matrices{shape}", params=[p for p in matrix_params
                                                                          if tuple(p.shape) == shape],
                           lr=matrix_lr, momentum=muon_momentum, ns_steps=ns_steps, beta2=muon_beta2,
                           weight_decay=weight_decay))
    grouped = [p for g in groups for p in g["params"]]
    if len(grouped) != len({id(p) for p in grouped}) or {id(p) for p in grouped} != {id(p) for p in model.parameters()}:
        raise ValueError("build_optimizer: every model parameter must be in exactly one group")
    if sharded is None:
        sharded = distributed.get_world_size() > 1
    optimizer = DistMuonAdamW(groups) if sharded else MuonAdamW(groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


# ---------------------------------------------------------------------- schedules
def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """LR multiplier at `step`: linear warmup, constant, then linear warmdown to final_lr_frac.

    Warmup over round(warmup_ratio * N) steps ((step + 1) / warmup: never 0, so step 0 already moves),
    flat at 1 until N - round(warmdown_ratio * N), then linear to final_lr_frac at step N. The long
    linear warmdown (rather than cosine) is what nanochat and modded-nanogpt found best at a fixed horizon.
    """
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    if warmdown == 0:
        return final_lr_frac
    progress = max(0.0, (num_iterations - step) / warmdown)
    return progress + (1.0 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float, *, start: float = 0.85, peak: float = 0.97,
                  end: float = 0.90, warmup_steps: int = 400) -> float:
    """Muon momentum at `step` (nanochat's base_train).

    Ramps linearly from `start` to `peak` over the first warmup_steps (a low momentum early keeps the
    first, noisy updates from compounding), holds `peak`, and during the LR warmdown
    (the last round(warmdown_ratio * N) steps) falls linearly to `end` so that the shrinking updates
    are not averaged over a stale history. The warm-up takes precedence, as in nanochat: a run shorter
    than warmup_steps never reaches the warmdown branch.
    """
    warmdown = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown
    if step < warmup_steps:
        frac = step / warmup_steps
        return (1.0 - frac) * start + frac * peak
    if step >= warmdown_start and warmdown > 0:
        progress = min(1.0, (step - warmdown_start) / warmdown)
        return (1.0 - progress) * peak + progress * end
    return peak


def weight_decay_multiplier(step: int, num_iterations: int) -> float:
    """Multiplier on the Muon weight decay: cosine from 1 at step 0 to 0 at the last step (nanochat).

    Weight decay matters for the equilibrium norm of the weights late in training less than early;
    decaying it with the horizon (in the spirit of the T_epoch = B/(lr*wd*D) analysis the trainer's
    scaling uses) avoids pulling weights down while the LR anneals.
    """
    frac = min(max(step / max(num_iterations, 1), 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * frac))


__all__ = ["DistMuonAdamW", "MuonAdamW", "ZERO_KEY", "adamw_update_", "build_optimizer", "lr_multiplier",
           "merge_optimizer_shards", "muon_lr_scale", "muon_momentum", "weight_decay_multiplier"]
