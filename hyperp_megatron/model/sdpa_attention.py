"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` (no Transformer Engine).

A drop-in for Megatron's local ``DotProductAttention`` (megatron-core 0.16.1): the same constructor
(``SelfAttention`` builds it with ``config, layer_number, attn_mask_type, attention_type, cp_comm_type,
softmax_scale, pg_collection``) and forward (``query, key, value, attention_mask, attn_mask_type=,
attention_bias=, packed_seq_params=``), the same ``[s, b, heads, head_dim]`` inputs and
``[s, b, heads * head_dim]`` output. Megatron's version materializes the ``b x heads x s x s`` scores
(``transfer.attention_keeps_scores``, the memory planner); SDPA dispatches to a fused kernel that does not:
FlashAttention-2 / cuDNN / memory-efficient attention on CUDA, the flash kernel on CPU.

- Softmax scale: the ``softmax_scale`` Megatron passes (HyperP's ``sqrt(128)/head_dim``, see
  ``model/spec.py``), else ``1/sqrt(head_dim)``. Megatron's ``apply_query_key_layer_scaling`` divides the
  scale by the layer number and multiplies the scores back in the softmax: the net factor is unchanged.
- Masks, as in Megatron's ``FusedScaleMaskSoftmax``: ``attention_mask=None`` with the causal mask type is
  causal attention (``is_causal``, no mask tensor); a boolean mask ``[b|1, 1|heads, sq, sk]`` (True =
  masked, Megatron's convention) is used as given, whatever the mask type. A query row whose keys are all
  masked gets a zero output (torch's safe softmax) where Megatron averages all values (-10000 fill).
- GQA without copying K/V (``enable_gqa``) where the kernel supports it: on CPU, and on CUDA in
  fp16/bf16 without a mask tensor (flash / cuDNN). Elsewhere on CUDA (fp32, or an explicit mask) K/V are
  repeated per query head so the memory-efficient kernel runs instead of the math fallback.
- Refused with a ``ValueError``: packed sequences (THD), attention bias, context parallelism, sliding
  windows, non-vanilla softmax, attention dropout > 0, QK-clip / max-logit logging.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from hyperp_megatron.config import ATTENTION_BACKENDS

_HALF = (torch.float16, torch.bfloat16)


def core_attention_impl(backend: str, use_te: bool) -> str:
    """Which core attention a layer uses: 'te' (Transformer Engine's fused attention, kept with TE layers
    under 'auto'), 'sdpa' (:class:`SDPACoreAttention`: 'auto' without TE, or 'sdpa') or 'megatron_local'
    (Megatron's unfused ``DotProductAttention``, which materializes the ``s x s`` scores)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "te" if use_te else "sdpa"
    return backend


def _refuse_unsupported(config, attention_dropout: float | None) -> None:
    dropout = config.attention_dropout if attention_dropout is None else attention_dropout
    problems = {
        "context parallelism (context_parallel_size > 1)": config.context_parallel_size != 1,
        "sliding-window attention (window_size)": config.window_size is not None,
        f"softmax_type {config.softmax_type!r}": config.softmax_type != "vanilla",
        f"attention dropout {dropout}": dropout != 0.0,
        "qk_clip / log_max_attention_logit": bool(config.qk_clip or getattr(config, "log_max_attention_logit", False)),
    }
    refused = [name for name, bad in problems.items() if bad]
    if refused:
        raise ValueError(f"the SDPA core attention does not support {', '.join(refused)}: "
                         "set model.attention_backend: megatron_local (or use Transformer Engine layers)")


class SDPACoreAttention(MegatronModule):
    """Megatron's core-attention interface on ``F.scaled_dot_product_attention`` (module docstring)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        _refuse_unsupported(config, attention_dropout)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.current_max_attn_logits = None  # Megatron's QK-clip slot (refused above)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] (np % ng == 0) -> context [sq, b, np * hn]."""
        if packed_seq_params is not None:
            raise ValueError("packed sequences (THD) are not supported by the SDPA core attention: "
                             "use Transformer Engine layers")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the SDPA core attention")
        seq_q, batch, heads, head_dim = query.shape
        seq_k, groups = key.shape[0], key.shape[2]
        if heads % groups:
            raise ValueError(f"{heads} query heads are not a multiple of {groups} key/value heads")
        mask, is_causal = self._sdpa_mask(attention_mask, attn_mask_type or self.attn_mask_type, seq_q, seq_k)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads|groups, s, hn] views
        native_gqa = groups != heads and _kernel_takes_gqa(q, mask)
        if groups != heads and not native_gqa:
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=is_causal,
                                                 scale=self.softmax_scale, enable_gqa=native_gqa)
        return context.permute(2, 0, 1, 3).reshape(seq_q, batch, heads * head_dim)  # [sq, b, np * hn]

    @staticmethod
    def _sdpa_mask(attention_mask: torch.Tensor | None, mask_type: AttnMaskType, seq_q: int,
                   seq_k: int) -> tuple[torch.Tensor | None, bool]:
        """(SDPA's boolean mask, True = attend; is_causal) from Megatron's mask (True = masked)."""
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(f"attention_mask must be boolean (True = masked), got {attention_mask.dtype}")
            return ~attention_mask, False
        if mask_type == AttnMaskType.causal and seq_q > 1:
            if seq_q != seq_k:
                raise ValueError(f"causal attention without a mask needs sq == sk, got {seq_q} and {seq_k}")
            return None, True
        return None, False  # sq == 1 (one query sees every key), or no mask


def _kernel_takes_gqa(query: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """SDPA's ``enable_gqa`` reaches a fused kernel (torch 2.5+): CPU flash always; on CUDA only
    FlashAttention / cuDNN (fp16/bf16, no mask tensor); the memory-efficient kernel has no GQA and the
    call would fall back to the math path, which materializes the scores."""
    if not query.is_cuda:
        return True
    return query.dtype in _HALF and mask is None
