"""The multipliers our forward applies that a standard Hugging Face class does not, folded into weights.

For an exact standard target (Qwen3, Llama, Qwen3-Next) the export multiplies (and the import divides):

- ``attention_out`` into ``o_proj``: the residual-branch multiplier ``1/sqrt(2d)`` (HyperP / muon; 1 under
  standard);
- ``mlp_down`` into the dense ``down_proj`` or each routed expert's: the branch multiplier x the shared-expert
  mix (SqrtGate with a shared expert: ``sqrt(1/2)``);
- ``shared_down`` into the shared expert's ``down_proj``: branch x mix / 0.5 (Qwen3-Next's shared gate is
  ``sigmoid(0) = 1/2`` with a zero gate row);
- ``query`` into the q-norm gain (QK-norm) or the ``q_proj`` rows: our softmax scale over HF's
  ``head_dim^-0.5``, ``sqrt(128 / head_dim)`` under HyperP;
- ``lm_head`` into ``lm_head``: the Muon baseline's logit multiplier ``d0/d``.

Every factor is recorded in the export's ``config.json`` (``hyperp_megatron.folds``), so the import undoes
exactly what was done. The custom ``hyperp`` target keeps the multipliers in its config instead (no folds).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from hyperp_megatron.config import Config
from hyperp_megatron.derived import logit_multiplier

QWEN3_NEXT_SHARED_GATE = 0.5
"""``sigmoid(0)``: Qwen3-Next's shared-expert gate with a zero gate row."""


@dataclass(frozen=True)
class Folds:
    """Scalar factors folded into weights (see the module docstring); 1 = nothing folded."""

    attention_out: float = 1.0
    mlp_down: float = 1.0
    shared_down: float = 1.0
    query: float = 1.0
    lm_head: float = 1.0

    def factor(self, piece: str, qk_norm: bool) -> float:
        """The factor of one piece (names as in :mod:`hyperp_megatron.convert.ours`)."""
        if piece == "o":
            return self.attention_out
        if piece == "shared.down":
            return self.shared_down
        if piece == "mlp.down" or (piece.startswith("experts.") and piece.endswith(".down")):
            return self.mlp_down
        if piece == ("q_norm" if qk_norm else "q"):
            return self.query
        if piece == "lm_head":
            return self.lm_head
        return 1.0

    def apply(self, pieces: dict[str, torch.Tensor], qk_norm: bool, inverse: bool = False) -> dict[str, torch.Tensor]:
        """Pieces with the factors multiplied in (``inverse``: divided out), computed in fp32."""
        out = {}
        for name, value in pieces.items():
            factor = self.factor(name, qk_norm)
            if factor == 1.0:
                out[name] = value
            else:
                out[name] = value.float() / factor if inverse else value.float() * factor
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Folds:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown folded factors {sorted(unknown)} in config.json: written by a newer converter?")
        return cls(**{k: float(v) for k, v in data.items()})


def query_scale_ratio(cfg: Config) -> float:
    """Our softmax scale over HF's ``head_dim^-0.5``: ``sqrt(128 / head_dim)`` for the HyperP architecture
    (scale ``sqrt(128)/head_dim``), 1 under the standard parameterization (Megatron's ``1/sqrt(head_dim)``)."""
    from hyperp_megatron.model.spec import BASE_HEAD_DIM

    return math.sqrt(BASE_HEAD_DIM / cfg.model.kv_channels) if cfg.model.hyperp_architecture else 1.0


def shared_expert_mix(cfg: Config) -> float:
    """The factor of ``routed + shared`` in our MoE layer (``HyperPMoELayer.shared_expert_scale``)."""
    from hyperp_megatron.model.moe import SHARED_EXPERT_MIX

    moe = cfg.model.moe
    return SHARED_EXPERT_MIX if moe.enabled and moe.shared_expert and moe.gate == "sqrt" else 1.0


def standard_folds(cfg: Config, shared_gate: float = 1.0) -> Folds:
    """What a standard class (no branch multiplier, softmax scale ``head_dim^-0.5``, no logit multiplier)
    needs folded; ``shared_gate``: the target's fixed factor on the shared expert's output."""
    from hyperp_megatron.model.spec import branch_multiplier

    branch = branch_multiplier(cfg.model)
    mix = shared_expert_mix(cfg)
    return Folds(attention_out=branch, mlp_down=branch * mix, shared_down=branch * mix / shared_gate,
                 query=query_scale_ratio(cfg), lm_head=logit_multiplier(cfg))
