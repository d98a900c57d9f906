"""Per-head gated self-attention (docs/method.md section 2, optional).

Each head's attention output is multiplied by ``sigmoid(g_proj(x))`` before the output projection,
one scalar per head and token. ``g_proj`` (``linear_gate``, ``C -> num_heads``, no bias) is a
column-parallel hidden matrix: TP rank ``r`` holds the gate rows of the heads it computes
(heads ``r*H/tp .. (r+1)*H/tp - 1``, the same contiguous slice as its Q heads), so gating is local.
Under sequence parallelism ``linear_gate`` all-gathers its input over the sequence like
``linear_qkv`` does, and the gate covers the full sequence like the attention output.

With Transformer Engine layers the input norm is fused into ``linear_qkv``
(``TELayerNormColumnParallelLinear``) and the attention receives the un-normalized residual stream;
the gate then normalizes its input with that same norm gain (``linear_qkv.layer_norm_weight``), so it
sees exactly the ``x`` that Q, K and V see. ``linear_gate`` itself is a local (non-TE) layer: it is
tiny and stays in high precision under FP8.

This is not Megatron's ``attention_output_gate``, which gates elementwise (one gate per channel)
and fuses ``g_proj`` into ``linear_qkv``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


@dataclass
class GatedSelfAttentionSubmodules(SelfAttentionSubmodules):
    """Megatron's self-attention submodules plus the gate projection."""

    linear_gate: ModuleSpec | type | None = None


class GatedSelfAttention(SelfAttention):
    """Megatron ``SelfAttention`` whose per-head outputs are scaled by ``sigmoid(linear_gate(x))``.

    Megatron's ``forward`` runs unchanged; the gate is computed from the same input at the start of
    ``forward`` and applied to the input of ``linear_proj`` (a forward pre-hook), which is exactly
    the concatenated per-head attention output ``[s, b, heads * head_dim]``.
    """

    def __init__(self, config, submodules: GatedSelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.padding, cp_comm_type: str | None = None,
                 pg_collection=None, normalize_gate_input: bool = False):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection)
        if submodules.linear_gate is None:
            raise ValueError("GatedSelfAttention needs submodules.linear_gate")
        self.linear_gate = build_module(
            submodules.linear_gate,
            config.hidden_size,
            config.num_attention_heads,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="gate",
            tp_group=self.pg_collection.tp,
        )
        self.normalize_gate_input = normalize_gate_input
        if normalize_gate_input and (config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma
                                     or not hasattr(self.linear_qkv, "layer_norm_weight")):
            raise ValueError("normalize_gate_input needs an RMSNorm fused into linear_qkv (Transformer Engine)")
        self._head_gate: torch.Tensor | None = None
        self.linear_proj.register_forward_pre_hook(self._gate_heads)

    def head_gate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``sigmoid(g_proj(x))`` for this rank's heads: ``[s, b, h]`` -> ``[s(full), b, heads/tp]``."""
        if self.normalize_gate_input:
            hidden_states = torch.nn.functional.rms_norm(
                hidden_states, (hidden_states.shape[-1],), self.linear_qkv.layer_norm_weight,
                self.config.layernorm_epsilon)
        logits, _ = self.linear_gate(hidden_states)
        return torch.sigmoid(logits.float())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        # The gate lives for exactly one forward; linear_proj's pre-hook consumes it.
        self._head_gate = self.head_gate(hidden_states)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self._head_gate = None

    def _gate_heads(self, module, args):
        (context,) = args  # [s, b, heads/tp * head_dim], heads in this rank's order
        gate = self._head_gate
        assert gate is not None, "linear_proj ran outside GatedSelfAttention.forward"
        seq, batch, width = context.shape
        assert gate.shape == (seq, batch, self.num_attention_heads_per_partition), (gate.shape, context.shape)
        heads = context.view(seq, batch, gate.shape[-1], width // gate.shape[-1])
        gated = (heads.float() * gate.unsqueeze(-1)).to(context.dtype)
        return (gated.view(seq, batch, width),)


def gated_attention_spec(attention_spec: ModuleSpec, linear_gate: ModuleSpec | type,
                         normalize_gate_input: bool = False) -> ModuleSpec:
    """Turn a ``SelfAttention`` spec into the gated one, keeping its submodules and params;
    ``normalize_gate_input`` when the input norm is fused into ``linear_qkv`` (Transformer Engine)."""
    base = attention_spec.submodules
    submodules = GatedSelfAttentionSubmodules(
        linear_qkv=base.linear_qkv, core_attention=base.core_attention, linear_proj=base.linear_proj,
        q_layernorm=base.q_layernorm, k_layernorm=base.k_layernorm, linear_gate=linear_gate,
    )
    params = {**attention_spec.params, "normalize_gate_input": normalize_gate_input}
    return ModuleSpec(module=GatedSelfAttention, params=params, submodules=submodules)
