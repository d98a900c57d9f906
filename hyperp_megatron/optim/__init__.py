"""HyperP optimizers: Newton-Schulz, the sphere Muon optimizer and its single-device reference.

Importing this package does not import megatron. The Megatron glue: ``param_groups`` (parameter
roles -> rule and layout, the role table), ``sphere_builder`` (Megatron wrappers, grad clipping,
checkpoints) and ``builder`` (``optim.name`` -> optimizer).
"""

from hyperp_megatron.optim.newton_schulz import (
    NS5_COEFFICIENTS,
    NS_MODES,
    newton_schulz5,
    orthogonalize,
    supports_distributed_mode,
)
from hyperp_megatron.optim.reference import RULES, ReferenceOptimizer
from hyperp_megatron.optim.sphere_muon import (
    ParamLayout,
    QKVSplit,
    SphereMuon,
    assign_to_ranks,
    newton_schulz_cost,
)

__all__ = [
    "NS5_COEFFICIENTS",
    "NS_MODES",
    "RULES",
    "ParamLayout",
    "QKVSplit",
    "ReferenceOptimizer",
    "SphereMuon",
    "assign_to_ranks",
    "newton_schulz5",
    "newton_schulz_cost",
    "orthogonalize",
    "supports_distributed_mode",
]
