"""The update rules of ``SphereMuon`` on one planned parameter (``optim/layout.py``), as tensor math.

The direction (Nesterov momentum for the matrix rules, the Adam direction otherwise) and the step of each
rule; ``sphere_muon`` and ``sphere_adam`` share :func:`retracted_sphere_step`, whose norms are summed over
the shards by the optimizer first. ``optim/reference.py`` writes the same rules independently on whole
matrices (the parity target). No host synchronization: Python-side structure only.
"""

from __future__ import annotations

import math

import torch

from hyperp_megatron.optim.layout import PlannedParam


def nesterov_momentum(grad: torch.Tensor, state: dict, momentum: float) -> torch.Tensor:
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grad, dtype=torch.float32)
    buffer = state["momentum_buffer"]
    buffer.mul_(momentum).add_(grad)
    return grad + momentum * buffer


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


def muon_step(planned: PlannedParam, orthogonal: torch.Tensor, hyper: dict) -> None:
    """W <- W (1 - eta wd) - eta sqrt(fan_out / fan_in) O, fan sizes of each whole piece."""
    param, lr = planned.param, hyper["lr"]
    weight = planned.as_row_groups(param.float()) * decay_factor(hyper)  # a new tensor
    orthogonal = planned.as_row_groups(orthogonal)
    start = 0
    for rows, (full_rows, full_cols) in zip(planned.piece_rows, planned.full_piece_shapes()):
        piece = slice(start, start + rows)
        weight[:, piece] -= lr * math.sqrt(full_rows / full_cols) * orthogonal[:, piece]
        start += rows
    param.copy_(weight.view_as(param))


def retracted_sphere_step(
    planned: PlannedParam, direction: torch.Tensor, stats: torch.Tensor, state: dict, hyper: dict
) -> None:
    """W <- R (c W - s D) / ||c W - s D|| per piece, c = 1 - eta wd, s = eta R / ||D||.

    stats: (3, num_pieces) = ||W||^2, <W, D>, ||D||^2 summed over the whole matrices.
    """
    weight_sq, weight_dot_direction, direction_sq = stats.unbind()
    if "radius" not in state:
        state["radius"] = weight_sq.sqrt()  # (num_pieces,): R = ||W_0||, before any decay
    radius, lr = state["radius"], hyper["lr"]
    decay = decay_factor(hyper)
    direction_norm = direction_sq.sqrt()
    # An all-zero direction (zero gradient) gives no step rather than 0 * inf = NaN.
    step_scale = torch.where(direction_norm > 0, lr * radius / direction_norm, torch.zeros_like(radius))
    new_weight_sq = (
        decay**2 * weight_sq - 2 * decay * step_scale * weight_dot_direction + step_scale**2 * direction_sq
    )
    retraction = radius / new_weight_sq.sqrt()
    weight_scale, direction_scale = planned.row_scale(retraction * decay), planned.row_scale(retraction * step_scale)
    if planned.param.dtype == torch.float32 and planned.param.is_contiguous():
        # In place on the fp32 (master) weight: no (m, n) temporaries.
        weight = planned.as_row_groups(planned.param)
        weight.mul_(weight_scale).addcmul_(planned.as_row_groups(direction), -direction_scale)
        return
    weight = planned.as_row_groups(planned.param.float()) * weight_scale
    weight = weight - planned.as_row_groups(direction) * direction_scale
    planned.param.copy_(weight.view_as(planned.param))
