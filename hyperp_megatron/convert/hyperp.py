"""The custom ``hyperp`` target: ``HyperPForCausalLM`` (``hf_modeling/modeling_hyperp.py``, shipped with the
export, ``trust_remote_code``). It reproduces every variant, SqrtGate with top-k >= 2 included, and keeps
our multipliers in its config instead of folding them: the weights are ours, unfused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from hyperp_megatron.config import Config
from hyperp_megatron.convert.folds import Folds, shared_expert_mix
from hyperp_megatron.convert.targets import Reader, SpecialTokens, Target, mlp_from_hf, mlp_to_hf
from hyperp_megatron.derived import logit_multiplier

MODELING_FILE = Path(__file__).parent / "hf_modeling" / "modeling_hyperp.py"


class HyperPTarget(Target):
    name = "hyperp"
    architecture = "HyperPForCausalLM"
    model_type = "hyperp"
    custom_code = True

    def inexact_reason(self, cfg: Config) -> str | None:
        return None

    def folds(self, cfg: Config) -> Folds:
        return Folds()

    def hf_config(self, cfg: Config, vocab_size: int, special: SpecialTokens, dtype: str) -> dict:
        from hyperp_megatron.model.spec import branch_multiplier, softmax_scale

        m, moe = cfg.model, cfg.model.moe
        expert_width = m.expert_ffn_size if moe.enabled else 0
        scale = softmax_scale(m.kv_channels) if m.hyperp_architecture else 1 / math.sqrt(m.kv_channels)
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "auto_map": {"AutoConfig": "modeling_hyperp.HyperPConfig",
                         "AutoModelForCausalLM": "modeling_hyperp.HyperPForCausalLM"},
            "vocab_size": vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.ffn_size,
            "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_query_groups, "head_dim": m.kv_channels, "hidden_act": "silu",
            "max_position_embeddings": m.seq_length, "rms_norm_eps": m.norm_epsilon,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
            "qk_norm": m.qk_norm, "attention_gate": "per_head" if m.gated_attention else None,
            "attention_softmax_scale": scale, "residual_multiplier": branch_multiplier(m),
            "logit_multiplier": logit_multiplier(cfg),
            # the output layer's init std (its sphere radius under sphere Muon): what HF's init draws lm_head with
            "output_initializer_range": m.output_init_std if m.hyperp_architecture else m.init_method_std,
            "num_experts": moe.num_routed_experts if moe.enabled else 0,
            "num_experts_per_tok": moe.router_topk if moe.enabled else 1, "moe_intermediate_size": expert_width,
            "shared_expert_intermediate_size": expert_width if moe.enabled and moe.shared_expert else 0,
            "shared_expert_scale": shared_expert_mix(cfg), "router_gate": moe.gate,
            "tie_word_embeddings": False, "bos_token_id": special.bos_token_id, "eos_token_id": special.eos_token_id,
            "dtype": dtype, "use_cache": True,
        }

    def top_to_hf(self, pieces: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"model.embed_tokens.weight": pieces["embed"], "model.norm.weight": pieces["final_norm"],
                "lm_head.weight": pieces["lm_head"]}

    def layer_to_hf(self, i: int, pieces: Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        out = {p + "input_layernorm.weight": pieces["attn_norm"],
               p + "post_attention_layernorm.weight": pieces["mlp_norm"]}
        out.update({a + f"{x}_proj.weight": pieces[x] for x in ("q", "k", "v", "o")})
        if cfg.model.qk_norm:
            out.update({a + "q_norm.weight": pieces["q_norm"], a + "k_norm.weight": pieces["k_norm"]})
        if cfg.model.gated_attention:
            out[a + "gate_proj.weight"] = pieces["gate"]
        out.update(mlp_to_hf(p, pieces, cfg))
        return out

    def top_from_hf(self, read: Reader, hf_config: dict) -> dict[str, torch.Tensor]:
        vocab, hidden = hf_config["vocab_size"], hf_config["hidden_size"]
        return {"embed": read("model.embed_tokens.weight", vocab, hidden),
                "final_norm": read("model.norm.weight", hidden), "lm_head": read("lm_head.weight", vocab, hidden)}

    def layer_from_hf(self, i: int, read: Reader, cfg: Config) -> dict[str, torch.Tensor]:
        m = cfg.model
        H, G, hd, C = m.num_attention_heads, m.num_query_groups, m.kv_channels, m.hidden_size
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        out = {"attn_norm": read(p + "input_layernorm.weight", C),
               "mlp_norm": read(p + "post_attention_layernorm.weight", C), "q": read(a + "q_proj.weight", H * hd, C),
               "k": read(a + "k_proj.weight", G * hd, C), "v": read(a + "v_proj.weight", G * hd, C),
               "o": read(a + "o_proj.weight", C, H * hd)}
        if m.qk_norm:
            out.update(q_norm=read(a + "q_norm.weight", hd), k_norm=read(a + "k_norm.weight", hd))
        if m.gated_attention:
            out["gate"] = read(a + "gate_proj.weight", H, C)
        out.update(mlp_from_hf(p, read, cfg))
        return out
