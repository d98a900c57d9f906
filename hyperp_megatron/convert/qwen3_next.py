"""``Qwen3NextForCausalLM`` adapter: gated attention and MoE (plain gates, or SqrtGate with one expert
selected), every layer ``full_attention`` (no linear-attention layers).

What the mapping does beyond the folds (:mod:`hyperp_megatron.convert.folds`):
- Qwen3-Next's attention gate is per element: ``q_proj`` emits ``[query_h; gate_h]`` per head (2 x head_dim
  rows), so our per-head gate row is repeated over the head dim. A model without gated attention gets zero
  gate rows and a +100 gate bias (``attention_bias``: q/k/v/o biases, all other entries zero):
  ``sigmoid(100)`` is exactly 1 in fp32 and bf16.
- Its RMSNorm computes ``x_hat * (1 + w)``: every norm gain is stored as ``w - 1``.
- ``partial_rotary_factor`` 1.0 (its default rotates a quarter of the head).
- Router: softmax over all experts, top-k, renormalized (``norm_topk_prob``) = our softmax over the k selected.
- Shared expert: ``sigmoid(shared_expert_gate x) * shared(x)`` with a zero gate row is ``shared(x) / 2`` (folded);
  without a shared expert its width is 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hyperp_megatron.config import Config
from hyperp_megatron.convert.folds import QWEN3_NEXT_SHARED_GATE, Folds, standard_folds
from hyperp_megatron.convert.targets import Reader, SpecialTokens, Target, mlp_from_hf, mlp_to_hf, require

GATE_OPEN_BIAS = 100.0
"""sigmoid(100) rounds to exactly 1.0 in fp32 and bf16: an always-open gate."""
NORM_OFFSET = 1.0
"""Qwen3-Next's RMSNorm multiplies by (1 + w)."""
_NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm")


class Qwen3NextTarget(Target):
    name = "qwen3_next"
    architecture = "Qwen3NextForCausalLM"
    model_type = "qwen3_next"

    def inexact_reason(self, cfg: Config) -> str | None:
        m = cfg.model
        if not m.qk_norm:
            return "Qwen3-Next always normalizes queries and keys and the model has no QK-norm"
        if m.moe.enabled and m.moe.gate == "sqrt" and m.moe.router_topk >= 2:
            return (f"SqrtGate with top-k = {m.moe.router_topk}: Qwen3-Next weights the selected experts by their "
                    "softmax, not its square root (no Hugging Face class does)")
        return None

    def folds(self, cfg: Config) -> Folds:
        return standard_folds(cfg, shared_gate=QWEN3_NEXT_SHARED_GATE)

    def hf_config(self, cfg: Config, vocab_size: int, special: SpecialTokens, dtype: str) -> dict:
        from transformers import Qwen3NextConfig

        m, moe = cfg.model, cfg.model.moe
        expert_width = m.expert_ffn_size if moe.enabled else 0
        config = Qwen3NextConfig(
            vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups, head_dim=m.kv_channels, hidden_act="silu",
            max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_epsilon,
            rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base), "partial_rotary_factor": 1.0},
            attention_bias=not m.gated_attention, layer_types=["full_attention"] * m.num_layers,
            num_experts=moe.num_routed_experts if moe.enabled else 0,
            num_experts_per_tok=moe.router_topk if moe.enabled else 1, moe_intermediate_size=expert_width,
            shared_expert_intermediate_size=expert_width if moe.enabled and moe.shared_expert else 0,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=moe.aux_loss_coeff,
            tie_word_embeddings=False, bos_token_id=special.bos_token_id, eos_token_id=special.eos_token_id,
            dtype=dtype,
        )
        return {**config.to_dict(), "architectures": [self.architecture]}

    def top_to_hf(self, pieces: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"model.embed_tokens.weight": pieces["embed"],
                "model.norm.weight": pieces["final_norm"].float() - NORM_OFFSET, "lm_head.weight": pieces["lm_head"]}

    def layer_to_hf(self, i: int, pieces: Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
        m = cfg.model
        H, G, hd, C = m.num_attention_heads, m.num_query_groups, m.kv_channels, m.hidden_size
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        query = pieces["q"].float().view(H, hd, C)
        if m.gated_attention:  # one gate row per head, repeated over its head_dim outputs
            gate = pieces["gate"].float()[:, None, :].expand(H, hd, C)
        else:
            gate = query.new_zeros(H, hd, C)
        out = {a + "q_proj.weight": torch.cat([query, gate], dim=1).reshape(2 * H * hd, C),
               a + "k_proj.weight": pieces["k"], a + "v_proj.weight": pieces["v"], a + "o_proj.weight": pieces["o"],
               a + "q_norm.weight": pieces["q_norm"].float() - NORM_OFFSET,
               a + "k_norm.weight": pieces["k_norm"].float() - NORM_OFFSET,
               p + "input_layernorm.weight": pieces["attn_norm"].float() - NORM_OFFSET,
               p + "post_attention_layernorm.weight": pieces["mlp_norm"].float() - NORM_OFFSET}
        if not m.gated_attention:
            out[a + "q_proj.bias"] = torch.cat([torch.zeros(H, hd), torch.full((H, hd), GATE_OPEN_BIAS)], 1).view(-1)
            out[a + "k_proj.bias"] = torch.zeros(G * hd)
            out[a + "v_proj.bias"] = torch.zeros(G * hd)
            out[a + "o_proj.bias"] = torch.zeros(C)
        out.update(mlp_to_hf(p, pieces, cfg))
        if m.moe.enabled:
            out[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, C)
            if not m.moe.shared_expert:  # Qwen3-Next always has one: width 0, no compute
                out.update({p + "mlp.shared_expert.gate_proj.weight": torch.zeros(0, C),
                            p + "mlp.shared_expert.up_proj.weight": torch.zeros(0, C),
                            p + "mlp.shared_expert.down_proj.weight": torch.zeros(C, 0)})
        return out

    def top_from_hf(self, read: Reader, hf_config: dict) -> dict[str, torch.Tensor]:
        vocab, hidden = hf_config["vocab_size"], hf_config["hidden_size"]
        return {"embed": read("model.embed_tokens.weight", vocab, hidden),
                "final_norm": read("model.norm.weight", hidden) + NORM_OFFSET,
                "lm_head": read("lm_head.weight", vocab, hidden)}

    def layer_from_hf(self, i: int, read: Reader, cfg: Config) -> dict[str, torch.Tensor]:
        m = cfg.model
        H, G, hd, C = m.num_attention_heads, m.num_query_groups, m.kv_channels, m.hidden_size
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        q_proj = read(a + "q_proj.weight", 2 * H * hd, C).view(H, 2 * hd, C)
        gate_rows = q_proj[:, hd:]
        out = {"q": q_proj[:, :hd].reshape(H * hd, C), "k": read(a + "k_proj.weight", G * hd, C),
               "v": read(a + "v_proj.weight", G * hd, C), "o": read(a + "o_proj.weight", C, H * hd),
               "q_norm": read(a + "q_norm.weight", hd), "k_norm": read(a + "k_norm.weight", hd),
               "attn_norm": read(p + "input_layernorm.weight", C),
               "mlp_norm": read(p + "post_attention_layernorm.weight", C)}
        for name in _NORMS:
            out[name] = out[name] + NORM_OFFSET
        if m.gated_attention:
            require(torch.equal(gate_rows, gate_rows[:, :1].expand_as(gate_rows)),
                    f"layer {i}: the attention gate differs within a head (a per-element gate); ours is per head")
            out["gate"] = gate_rows[:, 0].contiguous()
        else:
            bias = read(a + "q_proj.bias", 2 * H * hd).view(H, 2 * hd)
            other_biases = [read(a + f"{x}_proj.bias", n) for x, n in (("k", G * hd), ("v", G * hd), ("o", C))]
            require(not gate_rows.any() and bool((bias[:, hd:] == GATE_OPEN_BIAS).all()) and not bias[:, :hd].any()
                    and not any(b.any() for b in other_biases),
                    f"layer {i}: the attention gate is not the always-open gate of an export without gated attention")
        out.update(mlp_from_hf(p, read, cfg))
        if m.moe.enabled:
            require(not read(p + "mlp.shared_expert_gate.weight", 1, C).any(),
                    f"layer {i}: a learned shared-expert gate (our shared expert has a fixed mix)")
            if not m.moe.shared_expert:  # the width-0 stand-in
                for kind, shape in (("gate", (0, C)), ("up", (0, C)), ("down", (C, 0))):
                    read(p + f"mlp.shared_expert.{kind}_proj.weight", *shape)
        return out
