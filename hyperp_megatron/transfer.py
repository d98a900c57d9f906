"""HyperP hyperparameter transfer rules (docs/method.md section 3), as pure functions of numbers.

One function per rule; each docstring gives the formula, its source and its assumptions. Sources:
docs/method.md (the method as this repository implements it); Ren et al., "Rethinking Language Model Scaling under Transferable
Hypersphere Optimization", arXiv 2603.28743 ("the paper"); the reference code microsoft/ArchScale
("the reference": ``pretrain.py:setup``).

No torch and no config here. ``budget.py`` counts parameters, FLOPs and memory; ``derived.py`` applies
these rules to a run's config (``derive``), once.
"""

from __future__ import annotations

import math

# The paper's base point and fitted exponent (docs/method.md section 3): the defaults of config.HyperPConfig and of
# the rules below, and the reference value the science report compares its fits with.
PAPER_BASE_DEPTH = 8
"""d0: the depth at which eta0 was tuned."""
PAPER_BASE_LR_DENSE = 1.5e-2
"""eta0 of the dense models (1.4e-2 for MoE: PAPER_BASE_LR_MOE)."""
PAPER_BASE_LR_MOE = 1.4e-2
PAPER_BASE_BATCH_TOKENS = 2**21
"""B0: tokens per optimizer step at the base point."""
PAPER_BASE_TOKENS = 10.4e9
"""T0: training tokens at d0."""
PAPER_TOKEN_EXPONENT = -0.32
"""The data-scaling law's exponent: eta ~ (T / T0) ** -0.32."""


def check_positive(**values: float) -> None:
    """ValueError naming the first value that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Transfer rules (docs/method.md section 3)


def default_tokens(base_tokens: float, num_params_target: float, num_params_base: float) -> float:
    """Chinchilla-style token budget ``T = T0 * N(d) / N(d0)`` (docs/method.md section 3; reference
    ``train_tokens = int(t0 * n_target / n_base)``). With T0 = 10.4e9 and N(8) = 208.1M this is
    ~50 tokens per parameter, embeddings included."""
    check_positive(base_tokens=base_tokens, num_params_target=num_params_target, num_params_base=num_params_base)
    return base_tokens * num_params_target / num_params_base


def depth_factor(depth: int, base_depth: int) -> float:
    """Depth-muP LR factor ``sqrt(d0 / d)`` (docs/method.md section 3; paper: still needed on the sphere,
    with the ``1/sqrt(2d)`` residual-branch multiplier of section 2)."""
    check_positive(depth=depth, base_depth=base_depth)
    return math.sqrt(base_depth / depth)


def token_factor(tokens: float, base_tokens: float, exponent: float = PAPER_TOKEN_EXPONENT) -> float:
    """Data-scaling LR factor ``(T / T0) ** -0.32`` (docs/method.md section 3; paper's fitted exponent,
    the same one seen for AdamW in arXiv 2409.19913; reference applies it to MuonH only)."""
    check_positive(tokens=tokens, base_tokens=base_tokens)
    return (tokens / base_tokens) ** exponent


def batch_factor(batch_tokens: float, base_batch_tokens: float) -> float:
    """Square-root batch rule ``sqrt(B / B0)`` (docs/method.md section 3; reference
    ``apply_batch_size_scaling(..., "default")``), B in tokens per optimizer step."""
    check_positive(batch_tokens=batch_tokens, base_batch_tokens=base_batch_tokens)
    return math.sqrt(batch_tokens / base_batch_tokens)


def lr_factors(*, depth: int, base_depth: int, tokens: float, base_tokens: float, batch_tokens: float,
               base_batch_tokens: float, token_exponent: float = PAPER_TOKEN_EXPONENT, depth_rule: bool = True,
               token_rule: bool = True, batch_rule: bool = True) -> dict[str, float]:
    """The three LR factors of :func:`hyperp_lr` by name (``depth_factor``, ``token_factor``,
    ``batch_factor``); a rule that is off gives 1 (and its inputs are not checked)."""
    return dict(depth_factor=depth_factor(depth, base_depth) if depth_rule else 1.0,
                token_factor=token_factor(tokens, base_tokens, token_exponent) if token_rule else 1.0,
                batch_factor=batch_factor(batch_tokens, base_batch_tokens) if batch_rule else 1.0)


def compose_lr(base_lr: float, factors: dict[str, float]) -> float:
    """``eta0`` times the factors of :func:`lr_factors` (in this order: the trainer's LR, bit for bit)."""
    return base_lr * factors["depth_factor"] * factors["token_factor"] * factors["batch_factor"]


def hyperp_lr(base_lr: float, *, depth: int, base_depth: int, tokens: float, base_tokens: float,
              batch_tokens: float, base_batch_tokens: float, token_exponent: float = PAPER_TOKEN_EXPONENT,
              depth_rule: bool = True, token_rule: bool = True, batch_rule: bool = True) -> float:
    """Peak LR of a target run (docs/method.md section 3):

        eta = eta0 * sqrt(B / B0) * sqrt(d0 / d) * (T / T0) ** -0.32

    Each switch replaces its factor by 1 (ablations, claims 2 and 3 of section 7). No width or
    MoE-granularity factor: the sphere's angular step and SqrtGate remove those dependences.
    Check (eta0 = 1.4e-2, B = B0, default T): 1.400e-2 (d8), 8.28e-3 (d12), 5.59e-3 (d16),
    4.10e-3 (d20), 3.17e-3 (d24).
    """
    check_positive(base_lr=base_lr)
    return compose_lr(base_lr, lr_factors(
        depth=depth, base_depth=base_depth, tokens=tokens, base_tokens=base_tokens, batch_tokens=batch_tokens,
        base_batch_tokens=base_batch_tokens, token_exponent=token_exponent, depth_rule=depth_rule,
        token_rule=token_rule, batch_rule=batch_rule))


def lr_at(step: int, total_steps: int, peak: float, min_ratio: float = 0.1, warmup: int = 0) -> float:
    """LR of the 0-based optimizer step ``step`` (HyperP schedule: no warmup, linear to 0.1 eta).

    Warmup (``step < warmup``): ``peak * (step + 1) / (warmup + 1)``. Then linear decay,

        lr = peak * ((1 - p) + min_ratio * p),   p = (step - warmup) / (total_steps - 1 - warmup)

    so the first decay step has exactly ``peak`` and the last step (``total_steps - 1``) exactly
    ``min_ratio * peak``; later steps stay at the minimum. Reference: ``min_lr_mult = 0.1``,
    ``warmup_tokens = 0`` for MuonH runs.
    """
    if total_steps < 1 or step < 0:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got step={step}, total_steps={total_steps}")
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if warmup < 0 or (warmup and warmup >= total_steps):
        raise ValueError(f"warmup must be in [0, total_steps) = [0, {total_steps}), got {warmup}")
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    decay_steps = total_steps - 1 - warmup
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup) / decay_steps)
    # the interpolation written this way is exact at both ends in floating point
    return peak * (1.0 - progress) + peak * min_ratio * progress


def muon_weight_decay(base_weight_decay: float, depth: int, base_depth: int) -> float:
    """Muon-baseline weight decay ``lambda = wd0 * d0 / d`` (docs/method.md section 3; reference
    ``weight_decay * d0 / depth`` for Muon, after arXiv 2512.05620), applied "independently" of the LR's
    size: the weights shrink by ``(eta(t) / eta_peak) * lambda`` per step (reference: its group weight decay
    is ``lambda / eta_peak``, times the group LR ``eta(t)``), so a reference ``wd0`` carries over unchanged.
    Not used by sphere Muon, where weight decay is a first-order no-op (default 0)."""
    if base_weight_decay < 0:
        raise ValueError(f"base weight decay must be >= 0, got {base_weight_decay}")
    return base_weight_decay * depth_factor(depth, base_depth) ** 2


def muon_logit_multiplier(depth: int, base_depth: int) -> float:
    """Muon-baseline output-logit multiplier ``d0 / d`` (docs/method.md section 3). HyperP uses none."""
    return depth_factor(depth, base_depth) ** 2


def muon_baseline_lr(base_lr: float, *, depth: int, base_depth: int, batch_tokens: float,
                     base_batch_tokens: float, depth_rule: bool = True, batch_rule: bool = True) -> float:
    """Muon-baseline LR ``eta0 * sqrt(B/B0) * sqrt(d0/d)``: the same depth factor, no token factor
    (docs/method.md section 3). Its step is ``W (1 - (eta(t)/eta_peak) lambda) - eta(t) sqrt(fan_out/fan_in) O``
    with ``lambda`` = :func:`muon_weight_decay`."""
    return hyperp_lr(base_lr, depth=depth, base_depth=base_depth, tokens=1.0, base_tokens=1.0,
                     batch_tokens=batch_tokens, base_batch_tokens=base_batch_tokens,
                     depth_rule=depth_rule, token_rule=False, batch_rule=batch_rule)


def output_logit_multiplier(parameterization: str, depth: int, base_depth: int) -> float:
    """The output-logit multiplier of a model: :func:`muon_logit_multiplier` ``d0 / d`` under
    ``model.parameterization`` 'muon' (the Muon baseline); 1 under 'hyperp' and 'standard'."""
    return muon_logit_multiplier(depth, base_depth) if parameterization == "muon" else 1.0
