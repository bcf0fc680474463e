"""MuonAdamW: Muon for the transformer's matrices, AdamW for everything else, and the training schedules.

Muon (https://kellerjordan.github.io/posts/muon/) updates each 2-D weight of the blocks with an
orthogonalized momentum; matrices of the same shape are stacked and updated together by
`nanotrain.ops.newton_schulz.muon_update` (Nesterov momentum, MuonEq, Polar Express, Muon+ norm snap,
NorMuon variance reduction, cautious weight decay, all in place). AdamW (decoupled weight decay, bias
correction, float32 math) handles the embeddings, the lm_head and the scalars, where orthogonalized
updates make no sense (lookup tables, a classifier, 0/1-D parameters).

The grouping and per-group hyperparameters follow nanochat's GPT.setup_optimizer; the schedules follow
nanochat's base_train. The per-group update functions (`_adamw_update`, `_muon_update_stack`) are
methods a distributed (ZeRO-2) subclass reuses on the slices it owns.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from nanotrain.ops.newton_schulz import muon_update

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
        muon_update(grads, params, state["momentum_buffer"], state["second_momentum"], group["momentum"],
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


def build_optimizer(model: torch.nn.Module, *, embedding_lr: float, unembedding_lr: float, matrix_lr: float,
                    scalar_lr: float, weight_decay: float,
                    adam_betas: tuple[float, float] | None = (0.8, 0.95), model_dim_lr_scale: bool = True,
                    smear_lr: float = 0.2, muon_momentum: float = 0.95, muon_beta2: float = 0.9,
                    ns_steps: int = 5) -> MuonAdamW:
    """MuonAdamW for a nanotrain GPT with nanochat's grouping and per-group settings.

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
    optimizer = MuonAdamW(groups)
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


__all__ = ["MuonAdamW", "adamw_update_", "build_optimizer", "lr_multiplier", "muon_lr_scale", "muon_momentum",
           "weight_decay_multiplier"]
