"""Single-device reference of the HyperP update rules (readable; the parity target of SphereMuon).

One function per rule, each updating one whole matrix ``weight`` in place from its gradient and a
per-matrix ``state`` dict (fp32 tensors). ``ReferenceOptimizer`` applies them to named tensors.
A fused QKV projection is NOT special here: the caller passes Q, K and V as three separate matrices
(each its own sphere and its own Newton-Schulz), which is what the distributed optimizer must match.

Rules (HyperP, arXiv 2603.28743, section 1; Muon: K. Jordan et al., 2024):

- ``sphere_muon`` (hidden matrices):  M <- mu M + G;  U = mu M + G;  O = NS5(U);
  W <- W (1 - eta wd);  W <- W - eta (R / ||O||) O;  W <- W R / ||W||.
  R = ||W|| measured once, at the first step, before any decay (weight decay cannot shrink it).
- ``sphere_adam`` (output layer): the same sphere step with the Adam direction
  u = m_hat / (sqrt(v_hat) + eps) in place of O.
- ``adamw`` (embeddings, norm gains, biases): AdamW, weight decay 0 by default.
- ``muon`` (baseline): W <- W (1 - eta wd) - eta sqrt(fan_out / fan_in) O, decoupled weight decay.

Weight decay: ``1 - eta wd`` per step, or with ``decay_peak_lr = eta_peak`` the "independent" form
``1 - (eta / eta_peak) wd`` (:func:`decay_factor`; the Muon baseline of the HyperP reference).
"""

from __future__ import annotations

import math

import torch

from hyperp_megatron.optim.layout import RULES
from hyperp_megatron.optim.newton_schulz import newton_schulz5


def decay_factor(lr: float, weight_decay: float, decay_peak_lr: float | None = None) -> float:
    """Per-step weight factor: ``1 - eta wd`` (decoupled), or ``1 - (eta / eta_peak) wd`` ("independent":
    follows the LR schedule's shape, not its size; arXiv 2309.14322, HyperP reference's Muon baseline)."""
    if decay_peak_lr is None:
        return 1 - lr * weight_decay
    return 1 - (lr / decay_peak_lr) * weight_decay


def nesterov_momentum(grad: torch.Tensor, state: dict, momentum: float) -> torch.Tensor:
    """Heavy-ball momentum without dampening, Nesterov look-ahead: M <- mu M + G; return mu M + G."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grad, dtype=torch.float32)
    buffer = state["momentum_buffer"]
    buffer.mul_(momentum).add_(grad)
    return grad + momentum * buffer


def adam_direction(grad: torch.Tensor, state: dict, betas: tuple[float, float], eps: float) -> torch.Tensor:
    """Bias-corrected Adam direction m_hat / (sqrt(v_hat) + eps); updates the moments in ``state``."""
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
    beta1, beta2 = betas
    state["step"] += 1
    state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
    exp_avg_sq_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
    return exp_avg_hat / (exp_avg_sq_hat.sqrt() + eps)


def scaled_sphere_step(direction: torch.Tensor, radius: torch.Tensor, lr: float) -> torch.Tensor:
    """eta (R / ||D||) D: a step of Frobenius norm exactly eta R (eta is an angle on the sphere)."""
    return lr * (radius / direction.norm()) * direction


def sphere_step(
    weight: torch.Tensor, direction: torch.Tensor, state: dict, lr: float, weight_decay: float
) -> None:
    """Decay, step of norm eta R along ``direction``, retract onto the sphere of radius R."""
    if "radius" not in state:
        state["radius"] = weight.float().norm()  # stored once, from the initialized weight
    radius = state["radius"]
    new_weight = weight.float() * (1 - lr * weight_decay)
    new_weight -= scaled_sphere_step(direction, radius, lr)
    new_weight *= radius / new_weight.norm()
    weight.copy_(new_weight)


def sphere_muon_update(
    weight: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, momentum: float, weight_decay: float
) -> None:
    update = nesterov_momentum(grad.float(), state, momentum)  # (m, n)
    sphere_step(weight, newton_schulz5(update), state, lr, weight_decay)


def sphere_adam_update(
    weight: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    direction = adam_direction(grad.float(), state, betas, eps)
    sphere_step(weight, direction, state, lr, weight_decay)


def adamw_update(
    weight: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    direction = adam_direction(grad.float(), state, betas, eps)
    new_weight = weight.float() * (1 - lr * weight_decay) - lr * direction
    weight.copy_(new_weight)


def muon_update(
    weight: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, momentum: float, weight_decay: float,
    decay_peak_lr: float | None = None,
) -> None:
    """Plain Muon baseline: W <- W (1 - eta wd) - eta sqrt(fan_out / fan_in) NS5(U) (decay: :func:`decay_factor`)."""
    fan_out, fan_in = weight.shape
    orthogonal = newton_schulz5(nesterov_momentum(grad.float(), state, momentum))
    new_weight = (weight.float() * decay_factor(lr, weight_decay, decay_peak_lr)
                  - lr * math.sqrt(fan_out / fan_in) * orthogonal)
    weight.copy_(new_weight)


class ReferenceOptimizer:
    """Applies the HyperP rules to named whole tensors on one device.

    params: name -> (tensor, rule), rule in ``RULES``. Gradients are read from ``tensor.grad``.
    All tensors share ``lr`` (the schedule's eta), as in HyperP.
    """

    def __init__(
        self,
        params: dict[str, tuple[torch.Tensor, str]],
        *,
        lr: float,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay_peak_lr: float | None = None,
    ) -> None:
        for name, (tensor, rule) in params.items():
            if rule not in RULES:
                raise ValueError(f"{name}: unknown rule {rule!r}; expected one of {RULES}")
            if rule != "adamw" and tensor.dim() != 2:
                raise ValueError(f"{name}: rule {rule!r} needs a matrix, got shape {tuple(tensor.shape)}")
        self.params = params
        self.lr, self.momentum, self.betas, self.eps = lr, momentum, betas, eps
        self.weight_decay = weight_decay
        self.decay_peak_lr = decay_peak_lr  # the Muon rule's independent decay (see decay_factor)
        self.state: dict[str, dict] = {name: {} for name in params}

    @torch.no_grad()
    def step(self) -> None:
        for name, (weight, rule) in self.params.items():
            if weight.grad is None:
                continue
            state, grad = self.state[name], weight.grad
            common = dict(lr=self.lr, weight_decay=self.weight_decay)
            if rule == "sphere_muon":
                sphere_muon_update(weight, grad, state, momentum=self.momentum, **common)
            elif rule == "muon":
                muon_update(weight, grad, state, momentum=self.momentum, decay_peak_lr=self.decay_peak_lr, **common)
            elif rule == "sphere_adam":
                sphere_adam_update(weight, grad, state, betas=self.betas, eps=self.eps, **common)
            else:
                adamw_update(weight, grad, state, betas=self.betas, eps=self.eps, **common)
