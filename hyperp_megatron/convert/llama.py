"""Llama-family adapters: ``Qwen3ForCausalLM`` (QK-norm) and ``LlamaForCausalLM`` (none).

Both are our dense model exactly: RMSNorm pre-norm, RoPE with rotate-half pairs (Megatron's default,
non-interleaved), GQA, SwiGLU, untied embeddings; Qwen3's q/k RMSNorm over the head dim before RoPE is
our QK-norm. Multipliers are folded (:mod:`hyperp_megatron.convert.folds`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hyperp_megatron.config import Config
from hyperp_megatron.convert.targets import Reader, SpecialTokens, Target, require

MAX_IMPORT_SEQ_LENGTH = 4096
"""Training sequence length given to an imported model (capped max_position_embeddings)."""


def rope_theta(hf_config: dict) -> float:
    """RoPE base of an HF config (transformers 5 ``rope_parameters`` or 4.x ``rope_theta``), refusing
    any RoPE scaling (our model has plain RoPE)."""
    rope = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    require(kind == "default", f"RoPE type {kind!r} (scaled RoPE) is not implemented by our model; only plain RoPE")
    theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    require(float(theta).is_integer(), f"rope_theta {theta} is not an integer (model.rotary_base is)")
    partial = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    require(partial == 1.0, f"partial_rotary_factor {partial}: our RoPE rotates the whole head")
    return float(theta)


class LlamaTarget(Target):
    name = "llama"
    architecture = "LlamaForCausalLM"
    model_type = "llama"
    has_qk_norm = False

    def inexact_reason(self, cfg: Config) -> str | None:
        m = cfg.model
        family = self.architecture.removesuffix("ForCausalLM")
        if m.qk_norm != self.has_qk_norm:
            return (f"{family} always normalizes queries and keys and the model has no QK-norm" if self.has_qk_norm
                    else f"the model has QK-norm and {family} has none")
        if m.gated_attention:
            return f"{family} has no attention output gate (gated attention)"
        if m.moe.enabled:
            return f"{family} is dense and the model is a mixture of experts"
        return None

    def hf_config(self, cfg: Config, vocab_size: int, special: SpecialTokens, dtype: str) -> dict:
        from transformers import AutoConfig

        m = cfg.model
        fields = dict(
            vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups, head_dim=m.kv_channels, hidden_act="silu",
            max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_epsilon,
            rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
            tie_word_embeddings=False, attention_bias=False, bos_token_id=special.bos_token_id,
            eos_token_id=special.eos_token_id, dtype=dtype,
        )
        if self.model_type == "llama":
            fields["mlp_bias"] = False
        config = AutoConfig.for_model(self.model_type, **fields)
        return {**config.to_dict(), "architectures": [self.architecture]}

    def top_to_hf(self, pieces: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"model.embed_tokens.weight": pieces["embed"], "model.norm.weight": pieces["final_norm"],
                "lm_head.weight": pieces["lm_head"]}

    def layer_to_hf(self, i: int, pieces: Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        out = {p + "input_layernorm.weight": pieces["attn_norm"], p + "self_attn.q_proj.weight": pieces["q"],
               p + "self_attn.k_proj.weight": pieces["k"], p + "self_attn.v_proj.weight": pieces["v"],
               p + "self_attn.o_proj.weight": pieces["o"], p + "post_attention_layernorm.weight": pieces["mlp_norm"],
               p + "mlp.gate_proj.weight": pieces["mlp.gate"], p + "mlp.up_proj.weight": pieces["mlp.up"],
               p + "mlp.down_proj.weight": pieces["mlp.down"]}
        if self.has_qk_norm:
            out[p + "self_attn.q_norm.weight"] = pieces["q_norm"]
            out[p + "self_attn.k_norm.weight"] = pieces["k_norm"]
        return out

    def top_from_hf(self, read: Reader, hf_config: dict) -> dict[str, torch.Tensor]:
        vocab, hidden = hf_config["vocab_size"], hf_config["hidden_size"]
        embed = read("model.embed_tokens.weight", vocab, hidden)
        tied = hf_config.get("tie_word_embeddings", False)
        # Tied embeddings become an untied copy (our output layer is its own matrix): the same function.
        lm_head = embed.clone() if tied else read("lm_head.weight", vocab, hidden)
        return {"embed": embed, "final_norm": read("model.norm.weight", hidden), "lm_head": lm_head}

    def layer_from_hf(self, i: int, read: Reader, cfg: Config) -> dict[str, torch.Tensor]:
        m = cfg.model
        C, F, hd = m.hidden_size, m.ffn_size, m.kv_channels
        Hq, Hkv = m.num_attention_heads * hd, m.num_query_groups * hd
        p = f"model.layers.{i}."
        out = {"attn_norm": read(p + "input_layernorm.weight", C), "q": read(p + "self_attn.q_proj.weight", Hq, C),
               "k": read(p + "self_attn.k_proj.weight", Hkv, C), "v": read(p + "self_attn.v_proj.weight", Hkv, C),
               "o": read(p + "self_attn.o_proj.weight", C, Hq),
               "mlp_norm": read(p + "post_attention_layernorm.weight", C),
               "mlp.gate": read(p + "mlp.gate_proj.weight", F, C), "mlp.up": read(p + "mlp.up_proj.weight", F, C),
               "mlp.down": read(p + "mlp.down_proj.weight", C, F)}
        if self.has_qk_norm:
            out["q_norm"] = read(p + "self_attn.q_norm.weight", hd)
            out["k_norm"] = read(p + "self_attn.k_norm.weight", hd)
        return out

    def model_config_from_hf(self, hf_config: dict) -> dict:
        """Our ``model`` section for a checkpoint of this family from elsewhere ('standard' parameterization:
        no multipliers, softmax scale ``head_dim^-0.5``, exactly the HF forward)."""
        hf = hf_config
        require(hf.get("hidden_act", "silu") == "silu",
                f"hidden_act {hf.get('hidden_act')!r}: our MLP is SwiGLU (silu)")
        require(not hf.get("attention_bias") and not hf.get("mlp_bias"),
                "attention / MLP biases: our linears have none")
        require(not hf.get("use_sliding_window") and all(t == "full_attention" for t in hf.get("layer_types") or []),
                "sliding-window attention layers: our attention is full causal attention")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return dict(num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
                    num_query_groups=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
                    ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                    seq_length=min(int(hf.get("max_position_embeddings", 2048)), MAX_IMPORT_SEQ_LENGTH),
                    rotary_base=int(rope_theta(hf)), norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
                    qk_norm=self.has_qk_norm, gated_attention=False, parameterization="standard")


class Qwen3Target(LlamaTarget):
    name = "qwen3"
    architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"
    has_qk_norm = True
