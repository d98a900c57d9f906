"""The per-parameter update rules of ``SphereMuon`` (``optim/layout.py``), as tensor math.

The Adam direction and the elementwise rules (``adamw``; ``sphere_adam``'s step), and the scalars of the
sphere step that every sphere rule shares (:func:`sphere_scales`: ``sphere_muon``'s batched step in
``optim/sphere_batched.py`` and ``sphere_adam``'s :func:`retracted_sphere_step`). The matrix rules'
momentum, Newton-Schulz and steps are batched across layers in ``optim/sphere_batched.py``.
``optim/reference.py`` writes the same rules independently on whole matrices (the parity target). No host
synchronization: Python-side structure only.
"""

from __future__ import annotations

import torch

from hyperp_megatron.optim.layout import PlannedParam


def adam_direction(grad: torch.Tensor, state: dict, betas: tuple[float, float], eps: float) -> torch.Tensor:
    if "step" not in state:
        state["step"] = 0  # a Python int: bias corrections need no host sync
        state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
    beta1, beta2 = betas
    state["step"] += 1
    state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
    exp_avg_sq_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
    return exp_avg_hat / (exp_avg_sq_hat.sqrt() + eps)


def decay_factor(hyper: dict) -> float:
    """The weight's factor ``1 - eta(t) wd`` (decoupled) or, with ``decay_peak_lr``, ``1 - (eta(t) / eta_peak) wd``
    ("independent": follows the LR schedule's shape, not its size; arXiv 2309.14322)."""
    lr, weight_decay, peak = hyper["lr"], hyper["weight_decay"], hyper.get("decay_peak_lr")
    if peak is None:
        return 1 - lr * weight_decay
    return 1 - (lr / peak) * weight_decay


def adamw_step(planned: PlannedParam, direction: torch.Tensor, hyper: dict) -> None:
    param, lr = planned.param, hyper["lr"]
    param.copy_(param.float() * decay_factor(hyper) - lr * direction)


def sphere_scales(radius: torch.Tensor, weight_sq: torch.Tensor, weight_dot_direction: torch.Tensor,
                  direction_sq: torch.Tensor, lr: float, decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sphere step ``W <- R (c W - s D) / ||c W - s D||`` as two factors ``(a, b)``, ``W <- a W - b D``.

    c = the decay factor, s = eta R / ||D|| (a step of norm eta R: eta is an angle). The norm of
    ``c W - s D`` is expanded from the summed statistics ``||W||^2, <W, D>, ||D||^2`` (one tensor per
    sphere, any shape), so the retraction needs no second reduction over the shards."""
    direction_norm = direction_sq.sqrt()
    # An all-zero direction (zero gradient) gives no step rather than 0 * inf = NaN.
    step_scale = torch.where(direction_norm > 0, (lr * radius) / direction_norm, 0.0)
    new_weight_sq = (decay**2) * weight_sq - (2 * decay) * step_scale * weight_dot_direction \
        + step_scale.square() * direction_sq
    retraction = radius / new_weight_sq.sqrt()
    return retraction * decay, retraction * step_scale


def retracted_sphere_step(
    planned: PlannedParam, direction: torch.Tensor, stats: torch.Tensor, state: dict, hyper: dict
) -> None:
    """W <- R (c W - s D) / ||c W - s D|| per piece, c = 1 - eta wd, s = eta R / ||D||.

    stats: (3, num_pieces) = ||W||^2, <W, D>, ||D||^2 summed over the whole matrices.
    """
    weight_sq, weight_dot_direction, direction_sq = stats.unbind()
    if "radius" not in state:
        state["radius"] = weight_sq.sqrt()  # (num_pieces,): R = ||W_0||, before any decay
    weight_scale, direction_scale = sphere_scales(state["radius"], weight_sq, weight_dot_direction, direction_sq,
                                                  hyper["lr"], decay_factor(hyper))
    weight_scale, direction_scale = planned.row_scale(weight_scale), planned.row_scale(direction_scale)
    if planned.param.dtype == torch.float32 and planned.param.is_contiguous():
        # In place on the fp32 (master) weight: no (m, n) temporaries.
        weight = planned.as_row_groups(planned.param)
        weight.mul_(weight_scale).addcmul_(planned.as_row_groups(direction), -direction_scale)
        return
    weight = planned.as_row_groups(planned.param.float()) * weight_scale
    weight = weight - planned.as_row_groups(direction) * direction_scale
    planned.param.copy_(weight.view_as(planned.param))
