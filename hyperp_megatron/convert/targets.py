"""Export targets: one small adapter per Hugging Face model family, and the choice among them.

An adapter maps our pieces (:mod:`hyperp_megatron.convert.ours`, multipliers already folded by
:mod:`hyperp_megatron.convert.folds`) to the family's parameter names and back, writes its
``config.json`` fields, and says when it cannot reproduce a model exactly. ``auto`` picks the first
exact target of :data:`AUTO_ORDER` (the most standard class first).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from hyperp_megatron.config import Config
from hyperp_megatron.convert.folds import Folds, standard_folds

Reader = Callable[..., torch.Tensor]
"""``read(name, *shape)``: the HF checkpoint's tensor of that name, checked against ``shape`` (fp32);
ValueError (one line) when it is missing or has another shape."""


@dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int | None
    eos_token_id: int | None


class Target:
    """Base adapter. Subclasses set the class attributes and implement the mapping methods."""

    name: str = ""
    architecture: str = ""
    model_type: str = ""
    custom_code: bool = False

    def inexact_reason(self, cfg: Config) -> str | None:
        """Why this family cannot reproduce the model exactly (None: it can)."""
        raise NotImplementedError

    def folds(self, cfg: Config) -> Folds:
        return standard_folds(cfg)

    def hf_config(self, cfg: Config, vocab_size: int, special: SpecialTokens, dtype: str) -> dict:
        raise NotImplementedError

    def top_to_hf(self, pieces: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def layer_to_hf(self, i: int, pieces: Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def top_from_hf(self, read: Reader, hf_config: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def layer_from_hf(self, i: int, read: Reader, cfg: Config) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def model_config_from_hf(self, hf_config: dict) -> dict:
        """Our ``model`` config section for a checkpoint of this family from elsewhere (no folds block)."""
        raise ValueError(f"{self.architecture} checkpoints can only be imported when this project exported them "
                         "(config.json has a 'hyperp_megatron' block)")


def require(condition: bool, message: str) -> None:
    """ValueError ``message`` unless ``condition`` (an HF config feature our model does not have)."""
    if not condition:
        raise ValueError(message)


def mlp_to_hf(prefix: str, pieces: Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """The MLP of one layer in the Qwen naming (dense ``mlp.*_proj`` or MoE ``mlp.gate`` router,
    ``mlp.experts.{j}.*_proj`` per expert on disk, ``mlp.shared_expert.*_proj``)."""
    if not cfg.model.moe.enabled:
        return {f"{prefix}mlp.{kind}_proj.weight": pieces[f"mlp.{kind}"] for kind in ("gate", "up", "down")}
    out = {f"{prefix}mlp.gate.weight": pieces["router"]}
    for j in range(cfg.model.moe.num_routed_experts):
        out.update({f"{prefix}mlp.experts.{j}.{kind}_proj.weight": pieces[f"experts.{j}.{kind}"]
                    for kind in ("gate", "up", "down")})
    if cfg.model.moe.shared_expert:
        out.update({f"{prefix}mlp.shared_expert.{kind}_proj.weight": pieces[f"shared.{kind}"]
                    for kind in ("gate", "up", "down")})
    return out


def mlp_from_hf(prefix: str, read: Reader, cfg: Config) -> dict[str, torch.Tensor]:
    """Inverse of :func:`mlp_to_hf`, shapes checked."""
    m = cfg.model
    C = m.hidden_size

    def glu(hf: str, ours: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{ours}.gate": read(f"{prefix}{hf}.gate_proj.weight", width, C),
                f"{ours}.up": read(f"{prefix}{hf}.up_proj.weight", width, C),
                f"{ours}.down": read(f"{prefix}{hf}.down_proj.weight", C, width)}

    if not m.moe.enabled:
        return glu("mlp", "mlp", m.ffn_size)
    width = m.expert_ffn_size
    out = {"router": read(f"{prefix}mlp.gate.weight", m.moe.num_routed_experts, C)}
    for j in range(m.moe.num_routed_experts):
        out.update(glu(f"mlp.experts.{j}", f"experts.{j}", width))
    if m.moe.shared_expert:
        out.update(glu("mlp.shared_expert", "shared", width))
    return out
