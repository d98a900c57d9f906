"""Build the optimizer named by ``optim.name`` for the model chunks of this rank."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from hyperp_megatron.config import Config


def megatron_optimizer_config(cfg: Config) -> OptimizerConfig:
    o = cfg.optim
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.train.precision == "bf16",
        params_dtype=torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


def build_optimizer(cfg: Config, model_chunks: list, pg_collection, peak_lr: float | None = None):
    """A Megatron optimizer (grad clipping over all parallel groups, checkpointable state).

    ``peak_lr``: the schedule's peak LR when it is derived (HyperP transfer), default ``optim.lr``."""
    if cfg.optim.name == "adamw":
        return get_megatron_optimizer(megatron_optimizer_config(cfg), model_chunks,
                                      use_gloo_process_groups=False, pg_collection=pg_collection)
    from hyperp_megatron.optim.sphere_builder import build_sphere_optimizer  # the HyperP optimizer

    return build_sphere_optimizer(cfg, model_chunks, pg_collection, peak_lr)


def set_learning_rate(optimizer, lr: float) -> None:
    """All groups share one LR from the schedule (HYPERP.md section 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
