"""Layer specs: Megatron's GPT layer (local or Transformer Engine modules) with HyperP's changes
plugged in through extension points, not forks.

- residual-branch multiplier ``1/sqrt(2d)``: a bias-dropout-add factory that scales the branch output
  (``TransformerLayerSubmodules.self_attn_bda`` / ``mlp_bda``) and adds it in the residual's dtype (fp32
  residual stream, ``residual.py``);
- QK-norm: Megatron's ``q_layernorm`` / ``k_layernorm`` slots (RMSNorm over the head dim, applied in
  ``get_query_key_value_tensors``, i.e. before RoPE);
- softmax scale ``sqrt(hd0)/hd``: ``TransformerConfig.softmax_scale``;
- optional per-head gated attention: ``self_attention`` becomes
  :class:`~hyperp_megatron.model.attention.GatedSelfAttention` with a column-parallel ``linear_gate``;
- core attention (``model.attention_backend``): torch SDPA
  (:class:`~hyperp_megatron.model.sdpa_attention.SDPACoreAttention`) whenever TE's is not used, or
  Megatron's unfused ``DotProductAttention`` on request.

'muon' (the Muon baseline) shares these; its output-logit multiplier lives on the model (``gpt.py``).
"""

from __future__ import annotations

import math

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from hyperp_megatron.config import ModelConfig
from hyperp_megatron.model.attention import gated_attention_spec
from hyperp_megatron.model.moe import moe_layer_spec
from hyperp_megatron.model.sdpa_attention import SDPACoreAttention, core_attention_impl

try:  # Transformer Engine is an optional GPU extra.
    import transformer_engine  # noqa: F401

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    HAVE_TE = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_TE = False

BASE_HEAD_DIM = 128
"""hd0 of the softmax scale sqrt(hd0)/hd (docs/method.md section 2)."""


def residual_multiplier(num_layers: int) -> float:
    """Branch multiplier 1/sqrt(2d) (Depth-muP, docs/method.md section 2)."""
    return 1.0 / math.sqrt(2 * num_layers)


def branch_multiplier(cfg: ModelConfig) -> float:
    """The factor every residual branch output gets before the add: 1/sqrt(2d) for the HyperP
    architecture, 1 otherwise (the stability monitors read it from here)."""
    return residual_multiplier(cfg.num_layers) if cfg.hyperp_architecture else 1.0


def softmax_scale(head_dim: int) -> float:
    """sqrt(hd0)/hd: equals 1/sqrt(hd) at hd = 128 and keeps logits O(1) as hd changes."""
    return math.sqrt(BASE_HEAD_DIM) / head_dim


def _scaled_bias_dropout_add(multiplier: float, training: bool, fused: bool):
    inner = get_bias_dropout_add(training, fused)

    def scaled(x_with_bias, residual, prob):
        x, bias = x_with_bias
        # In the residual's dtype: Megatron's bias-dropout-add casts the residual to the branch's dtype, which
        # would round an fp32 residual stream (model.fp32_residual) to bf16 at every add.
        x = x.to(residual.dtype) * multiplier
        bias = None if bias is None else bias.to(residual.dtype) * multiplier
        return inner((x, bias), residual, prob)

    return scaled


def scaled_bda(multiplier: float):
    """A drop-in for Megatron's ``get_bias_dropout_add`` that multiplies the branch by ``multiplier`` and adds
    it in the residual stream's dtype (fp32 with ``model.fp32_residual`` in bf16 runs, ``model/residual.py``).

    A plain function (not a partial): Megatron's ``build_module`` returns functions as they are.
    """

    def get_scaled_bias_dropout_add(training: bool, fused: bool):
        return _scaled_bias_dropout_add(multiplier, training, fused)

    return get_scaled_bias_dropout_add


def use_transformer_engine(impl: str, device) -> bool:
    """Whether to build TE layers: 'auto' when TE is installed and ``device`` is a GPU; 'transformer_engine'
    without them is refused with one line (FP8 is checked in ``model/fp8.py``)."""
    import torch

    on_gpu = torch.device(device).type == "cuda"
    if impl == "transformer_engine" and not (HAVE_TE and on_gpu):
        missing = "Transformer Engine is not installed" if not HAVE_TE else f"the device is {device}, not a GPU"
        raise ValueError(f"model.transformer_impl is 'transformer_engine' but {missing}; "
                         "use 'auto' (TE when available) or 'local'")
    return HAVE_TE and on_gpu and impl != "local"


def build_layer_spec(cfg: ModelConfig, use_te: bool = False, pg_collection=None,
                     experts: str = "sequential") -> ModuleSpec:
    """The transformer-layer spec for ``cfg`` (dense or MoE), with HyperP's modifications.

    MoE: SqrtGate router, shared-expert mix and the experts module ``experts`` ('sequential', 'te_grouped' or
    'torch_grouped', from ``moe.experts_impl``), see ``model/moe.py``.
    """
    num_experts = cfg.moe.num_routed_experts if cfg.moe.enabled else None
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts,
                                                          qk_layernorm=cfg.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(num_experts=num_experts, qk_layernorm=cfg.qk_norm,
                                        normalization="RMSNorm")
    attention = core_attention_impl(cfg.attention_backend, use_te)
    if attention != "te":
        spec.submodules.self_attention.submodules.core_attention = (
            SDPACoreAttention if attention == "sdpa" else DotProductAttention)
    bda = scaled_bda(branch_multiplier(cfg))  # multiplier 1 for 'standard': only the residual-dtype add
    spec.submodules.self_attn_bda = bda
    spec.submodules.mlp_bda = bda
    if cfg.gated_attention:
        spec.submodules.self_attention = gated_attention_spec(spec.submodules.self_attention,
                                                              ColumnParallelLinear, normalize_gate_input=use_te)
    if cfg.moe.enabled:
        spec.submodules.mlp = moe_layer_spec(spec.submodules.mlp, cfg.moe, pg_collection, experts)
    return spec
