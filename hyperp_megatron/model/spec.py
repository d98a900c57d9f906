"""Layer specs: Megatron's GPT layer (local or Transformer Engine modules) with HyperP's changes
plugged in through extension points, not forks.

- residual-branch multiplier ``1/sqrt(2d)``: a bias-dropout-add factory that scales the branch output
  (``TransformerLayerSubmodules.self_attn_bda`` / ``mlp_bda``);
- QK-norm: Megatron's ``q_layernorm`` / ``k_layernorm`` slots (RMSNorm over the head dim, applied in
  ``get_query_key_value_tensors``, i.e. before RoPE);
- softmax scale ``sqrt(hd0)/hd``: ``TransformerConfig.softmax_scale``.
"""

from __future__ import annotations

import math

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from hyperp_megatron.config import ModelConfig

try:  # Transformer Engine is an optional GPU extra.
    import transformer_engine  # noqa: F401

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    HAVE_TE = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_TE = False

BASE_HEAD_DIM = 128
"""hd0 of the softmax scale sqrt(hd0)/hd (HYPERP.md section 2)."""


def residual_multiplier(num_layers: int) -> float:
    """Branch multiplier 1/sqrt(2d) (Depth-muP, HYPERP.md section 2)."""
    return 1.0 / math.sqrt(2 * num_layers)


def softmax_scale(head_dim: int) -> float:
    """sqrt(hd0)/hd: equals 1/sqrt(hd) at hd = 128 and keeps logits O(1) as hd changes."""
    return math.sqrt(BASE_HEAD_DIM) / head_dim


def _scaled_bias_dropout_add(multiplier: float, training: bool, fused: bool):
    inner = get_bias_dropout_add(training, fused)

    def scaled(x_with_bias, residual, prob):
        x, bias = x_with_bias
        x = x * multiplier
        bias = None if bias is None else bias * multiplier
        return inner((x, bias), residual, prob)

    return scaled


def scaled_bda(multiplier: float):
    """A drop-in for Megatron's ``get_bias_dropout_add`` that multiplies the branch by ``multiplier``.

    A plain function (not a partial): Megatron's ``build_module`` returns functions as they are.
    """

    def get_scaled_bias_dropout_add(training: bool, fused: bool):
        return _scaled_bias_dropout_add(multiplier, training, fused)

    return get_scaled_bias_dropout_add


def use_transformer_engine(requested: bool) -> bool:
    """TE layers when TE and a GPU are present; a one-line message when requested but unavailable."""
    import torch

    if requested and not (HAVE_TE and torch.cuda.is_available()):
        print("[hyperp] Transformer Engine/FP8 requested but unavailable (no TE or no GPU): "
              "using Megatron's local layers")
        return False
    return requested


def build_layer_spec(cfg: ModelConfig, use_te: bool = False) -> ModuleSpec:
    """The transformer-layer spec for ``cfg`` (dense or MoE), with HyperP's modifications."""
    num_experts = cfg.moe.num_routed_experts if cfg.moe.enabled else None
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts,
                                                          qk_layernorm=cfg.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(num_experts=num_experts, qk_layernorm=cfg.qk_norm,
                                        normalization="RMSNorm")
    if cfg.parameterization == "hyperp":
        bda = scaled_bda(residual_multiplier(cfg.num_layers))
        spec.submodules.self_attn_bda = bda
        spec.submodules.mlp_bda = bda
    return spec
