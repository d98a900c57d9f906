"""Layout-invariant initialization: every parameter's *full* tensor is drawn from a generator seeded by
(seed, its canonical name), then this rank keeps its shard. The full matrices are therefore the same
for any TP / PP / EP size, so different layouts start from identical weights.

HyperP (HYPERP.md section 2): hidden matrices (and router, experts) ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
so the sphere radius is ``R ~ sqrt(fan_out/3)``; output layer ``N(0, 0.02^2)``; embedding
``N(0, 1e-4^2)``; norm gains 1 (the same for the 'muon' baseline, so that side-by-side runs start
from the same weights). Standard: Megatron's ``N(0, std^2)`` with output projections scaled
by ``1/sqrt(2 d)``.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

from hyperp_megatron.config import Config

EMBEDDING_STD = 1e-4
OUTPUT_STD = 0.02

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"experts\.linear_fc([12])\.weight(\d+)$")
"""TEGroupedMLP (grouped GEMM) keeps expert i as ``experts.linear_fc{1,2}.weight{i}``. Its canonical name is
SequentialMLP's ``experts.local_experts.{global i}.linear_fc{1,2}.weight`` (the same initial experts with
or without grouped GEMM). Under EP / expert-TP, TE's weights carry no Megatron partition attributes
(Megatron slices them itself), so the layout comes from the name: fc1 column-, fc2 row-parallel."""


def canonical_names(model: torch.nn.Module, pg_collection) -> dict[str, str]:
    """Local parameter name -> name in the unsharded model (global layer and expert numbers)."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    global_layer = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
    names = {}
    for name, _ in model.named_parameters():
        canonical = _LAYER.sub(lambda m: f"decoder.layers.{global_layer[m.group(1)]}.", name)
        match = _EXPERT.search(name)
        if match:
            experts = _parent_module(model, name[: match.start()] + "local_experts")
            global_id = pg_collection.ep.rank() * len(experts) + int(match.group(1))
            canonical = _EXPERT.sub(f"local_experts.{global_id}.", canonical)
        grouped = _GROUPED_EXPERT.search(name)
        if grouped:
            experts = _parent_module(model, name[: grouped.start()] + "experts")
            global_id = pg_collection.ep.rank() * experts.num_local_experts + int(grouped.group(2))
            canonical = _GROUPED_EXPERT.sub(
                f"experts.local_experts.{global_id}.linear_fc{grouped.group(1)}.weight", canonical)
        names[name] = canonical
    return names


def _parent_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    module = model
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _shard_group(name: str, param: torch.Tensor, pg_collection):
    if _GROUPED_EXPERT.search(name):
        return pg_collection.expt_tp
    if not getattr(param, "tensor_model_parallel", False):
        return None
    is_expert = "experts" in name and "shared_experts" not in name
    return pg_collection.expt_tp if is_expert else pg_collection.tp


def _partition_dim(name: str, param: torch.Tensor) -> int:
    grouped = _GROUPED_EXPERT.search(name)
    if grouped:
        return 0 if grouped.group(1) == "1" else 1
    return getattr(param, "partition_dim", 0)


def _is_glu_fc1(name: str) -> bool:
    return name.endswith("linear_fc1.weight")


def _full_to_local(full: torch.Tensor, name: str, dim: int, rank: int, size: int) -> torch.Tensor:
    if size == 1:
        return full
    if _is_glu_fc1(name) and dim == 0:
        # SwiGLU fc1 keeps [gate_r; up_r] on rank r, not a contiguous slice of [gate; up].
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=dim)[rank]


def _draw(name: str, shape: tuple, cfg: Config, generator: torch.Generator) -> torch.Tensor:
    is_norm = len(shape) == 1 and ("norm" in name)
    if is_norm:
        return torch.ones(shape)
    if len(shape) == 1:  # biases
        return torch.zeros(shape)
    if "word_embeddings" in name:
        std = EMBEDDING_STD if cfg.model.hyperp_architecture else cfg.model.init_method_std
        return torch.randn(shape, generator=generator) * std
    if "output_layer" in name:
        std = OUTPUT_STD if cfg.model.hyperp_architecture else cfg.model.init_method_std
        return torch.randn(shape, generator=generator) * std
    if cfg.model.hyperp_architecture:
        bound = 1.0 / math.sqrt(shape[-1])
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    std = cfg.model.init_method_std
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        std = std / math.sqrt(2.0 * cfg.model.num_layers)
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def initialize_parameters(model: torch.nn.Module, cfg: Config, pg_collection) -> None:
    """Overwrite every parameter with its layout-invariant initial value."""
    names = canonical_names(model, pg_collection)
    for name, param in model.named_parameters():
        canonical = names[name]
        group = _shard_group(name, param, pg_collection)
        dim = _partition_dim(name, param)
        size = group.size() if group is not None else 1
        full_shape = list(param.shape)
        if size > 1:
            full_shape[dim] *= size
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + zlib.crc32(canonical.encode()))
        full = _draw(canonical, tuple(full_shape), cfg, generator)
        local = _full_to_local(full, canonical, dim, group.rank() if group is not None else 0, size)
        param.copy_(local.to(param.dtype))
