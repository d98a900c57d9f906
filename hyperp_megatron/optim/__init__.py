"""HyperP optimizers: Newton-Schulz, the sphere Muon optimizer and its single-device reference.

Importing this package does not import megatron. Modules:

- ``newton_schulz``: the quintic iteration and its tensor-parallel forms;
- ``layout``: ``RULES``, a parameter's rule and layout over process groups (``ParamLayout``);
- ``updates``: each rule's tensor math on one parameter; ``sphere_muon``: the ``SphereMuon`` optimizer;
- ``reference``: a single-device reference written independently (the parity target);
- ``param_groups``: parameter role (``model/params.py``) -> update rule and layout, the role table;
- ``builder``: the Megatron wrapping (``optim.name`` -> optimizer, wrappers, grad clipping, checkpoints,
  the LR setter). It imports megatron.
"""

from hyperp_megatron.optim.layout import RULES, ParamLayout, QKVSplit, newton_schulz_cost
from hyperp_megatron.optim.newton_schulz import (
    NS5_COEFFICIENTS,
    NS_MODES,
    newton_schulz5,
    orthogonalize,
    supports_distributed_mode,
)
from hyperp_megatron.optim.reference import ReferenceOptimizer
from hyperp_megatron.optim.sphere_muon import SphereMuon, assign_to_ranks

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
