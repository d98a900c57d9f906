"""Helpers to run the real trainer in test worker processes (see tests/_dist.py)."""

from __future__ import annotations

import copy
import os
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "seq_length": 64},
    "data": {"cache_dir": os.path.join(REPO, "data")},
    "train": {"steps": 4, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "eval_iters": 1,
              "log_interval": 1},
    "optim": {"name": "adamw", "lr": 1e-2},
    "logging": {"progress": False, "tensorboard": False},
    "checkpoint": {"save_final": False, "resume": False},
}


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def train_worker(rank: int, world_size: int, overrides: dict) -> dict:
    """Run the trainer in this (already gloo-initialized) process; returns its result dict."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import load_config, validate
    from hyperp_megatron.parallel import destroy
    from hyperp_megatron.train import train

    apply_cpu_patches()
    cfg = load_config(None, merge(TINY, overrides))
    validate(cfg, world_size)
    try:
        return train(cfg, world_size, rank)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
