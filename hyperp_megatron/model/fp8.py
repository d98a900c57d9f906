"""FP8 through Transformer Engine: when a run may use it, and the ``TransformerConfig`` fields it sets.

FP8 covers the GEMMs of the transformer layers only: Megatron wraps the decoder block in TE's
``fp8_autocast`` (``transformer_block.py``, ``fp8_utils.get_fp8_context``), while ``GPTModel``'s output
layer is Megatron's own ``ColumnParallelLinear`` outside that context, so the logits stay in
high precision (bf16 / fp32); master weights and optimizer state stay fp32.
"""

from __future__ import annotations

import torch

from hyperp_megatron.config import TrainConfig

MIN_COMPUTE_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}
"""FP8 recipe -> the oldest GPU architecture TE runs it on (Ada/Hopper, Hopper, Blackwell)."""


def check_fp8(train: TrainConfig, use_te: bool, have_te: bool, device: torch.device) -> None:
    """Refuse ``train.fp8`` with one line when TE, its layers or a capable GPU is missing (never a
    silent bf16 run)."""
    if train.fp8 is None:
        return
    device = torch.device(device)
    need = MIN_COMPUTE_CAPABILITY[train.fp8_recipe]
    problem = None
    if device.type != "cuda":
        problem = f"this run's device is {device.type}"
        if not have_te:
            problem += " and Transformer Engine is not installed"
    elif not have_te:
        problem = "Transformer Engine is not installed"
    elif not use_te:
        problem = "model.transformer_impl is 'local'"
    else:
        capability = torch.cuda.get_device_capability(device)
        if capability < need:
            problem = (f"{torch.cuda.get_device_name(device)} has compute capability "
                       f"{capability[0]}.{capability[1]}")
    if problem:
        raise ValueError(f"train.fp8 {train.fp8!r} (recipe {train.fp8_recipe!r}) needs Transformer Engine layers on "
                         f"a GPU of compute capability >= {need[0]}.{need[1]}, but {problem}; unset train.fp8 "
                         "(or use train.precision bf16)")


def fp8_config_kwargs(train: TrainConfig) -> dict:
    """``TransformerConfig`` FP8 fields for a TE run with ``train.fp8`` set (empty otherwise)."""
    if train.fp8 is None:
        return {}
    return {
        "fp8": train.fp8,
        "fp8_recipe": train.fp8_recipe,
        "fp8_margin": 0,
        # Delayed scaling: the scale comes from the max |x| over the last N steps (other recipes scale
        # from the current tensor and ignore these two).
        "fp8_amax_history_len": train.fp8_amax_history_len,
        "fp8_amax_compute_algo": train.fp8_amax_compute_algo,
    }
