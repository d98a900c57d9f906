"""Layout-invariant initialization: every parameter's *full* tensor is drawn from a generator seeded by
(seed, its canonical name), then this rank keeps its shard. The full matrices are therefore the same
for any TP / PP / EP size, so different layouts start from identical weights.

By role (``model/params.py``), HyperP (docs/method.md section 2): hidden matrices (router and experts included)
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` so the sphere radius is ``R ~ sqrt(fan_out/3)``; output layer
``N(0, model.output_init_std^2)`` (the reference's 0.02); embedding ``N(0, 1e-4^2)``; norm gains 1, biases 0, phantom experts 0 (the same for the
'muon' baseline, so that side-by-side runs start from the same weights). Standard: Megatron's
``N(0, std^2)`` with the matrices that write into the residual stream scaled by ``1/sqrt(2 d)``.
"""

from __future__ import annotations

import math
import zlib

import torch

from hyperp_megatron.config import Config
from hyperp_megatron.model.params import canonical_names, is_glu_fc1, role_of, shard_layout, writes_residual

EMBEDDING_STD = 1e-4


def _full_to_local(full: torch.Tensor, name: str, dim: int, rank: int, size: int) -> torch.Tensor:
    if size == 1:
        return full
    if is_glu_fc1(name) and dim == 0:
        # SwiGLU fc1 keeps [gate_r; up_r] on rank r, not a contiguous slice of [gate; up].
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=dim)[rank]


def _draw(name: str, shape: tuple, cfg: Config, generator: torch.Generator) -> torch.Tensor:
    """The full initial tensor of the parameter with canonical name ``name``."""
    kind = role_of(name).kind
    if kind == "bias" or name.endswith("bias"):  # a LayerNorm's bias has the norm role, and starts at 0
        return torch.zeros(shape)
    if kind == "norm":
        return torch.ones(shape)
    hyperp = cfg.model.hyperp_architecture
    if kind == "embedding":
        return torch.randn(shape, generator=generator) * (EMBEDDING_STD if hyperp else cfg.model.init_method_std)
    if kind == "output":
        return torch.randn(shape, generator=generator) * (cfg.model.output_init_std if hyperp else cfg.model.init_method_std)
    if hyperp:
        bound = 1.0 / math.sqrt(shape[-1])
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    std = cfg.model.init_method_std
    if writes_residual(name):
        std = std / math.sqrt(2.0 * cfg.model.num_layers)
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def initialize_parameters(model: torch.nn.Module, cfg: Config, pg_collection) -> None:
    """Overwrite every parameter with its layout-invariant initial value."""
    names = canonical_names(model, pg_collection)
    for name, param in model.named_parameters():
        if getattr(param, "phantom_expert", False):  # zero and frozen (model/experts.py)
            param.zero_()
            continue
        canonical = names[name]
        group, dim = shard_layout(name, param, pg_collection)
        size = group.size() if group is not None else 1
        full_shape = list(param.shape)
        if size > 1:
            full_shape[dim] *= size
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + zlib.crc32(canonical.encode()))
        full = _draw(canonical, tuple(full_shape), cfg, generator)
        local = _full_to_local(full, canonical, dim, group.rank() if group is not None else 0, size)
        param.copy_(local.to(param.dtype))
