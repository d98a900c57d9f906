"""The parameters of our GPTModel by name: role, shard group, partition dim, canonical name; ``unwrap``.

Everything that treats parameters differently reads this module: the initialization (``model/init.py``),
the optimizer's role -> update rule table (``optim/param_groups.py``), the stability and operator-norm
monitors and the coord check. Roles are recognized by the bare model's parameter names (inside DDP /
Float16Module, see :func:`unwrap`), never by ``ndim``; an unknown name raises ``ValueError``.

| role | parameter (name suffix) | kind | sharded by (dim) |
|---|---|---|---|
| qkv | ``self_attention.linear_qkv.weight`` | hidden matrix | TP (0) |
| attention_out | ``self_attention.linear_proj.weight`` | hidden matrix | TP (1) |
| attention_gate | ``self_attention.linear_gate.weight`` | hidden matrix | TP (0) |
| mlp | ``mlp.linear_fc1.weight`` (SwiGLU ``[gate; up]``), ``mlp.linear_fc2.weight`` | hidden matrix | TP (0 / 1) |
| shared_expert | ``mlp.shared_experts.linear_fc{1,2}.weight`` | hidden matrix | TP (0 / 1) |
| router | ``mlp.router.weight`` | hidden matrix | - |
| routed_expert | ``mlp.experts.local_experts.{i}.linear_fc{1,2}.weight`` | hidden matrix | expert-TP (0 / 1) |
| output | ``output_layer.weight`` | output | TP (0, vocab) |
| embedding | ``embedding.word_embeddings.weight`` | embedding | TP (0, vocab) |
| norm | ``*layernorm.{weight,bias}``, ``*.layer_norm_{weight,bias}`` (gains, and biases of a LayerNorm) | norm | - |
| bias | any other ``*.bias`` | bias | as its weight |

Grouped-GEMM experts (Transformer Engine's ``TEGroupedMLP`` or ``model/experts.py``) keep routed expert
``i`` as ``mlp.experts.linear_fc{1,2}.weight{i}``; TE's carry no Megatron partition attributes, so their
layout comes from the name (fc1 column-, fc2 row-parallel over expert-TP). Their canonical name (the
unsharded model's, :func:`canonical_names`) is SequentialMLP's with the global expert number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

KINDS = ("hidden_matrix", "output", "embedding", "norm", "bias")
"""What a role is to the method (docs/method.md section 1): hidden matrices live on spheres; the output layer,
embeddings, norm gains and biases do not."""

ROUTED_EXPERT = re.compile(  # also a bare MoE layer's names (``experts.*``, tests build one)
    r"(?:^|(?<=\.))(?:mlp\.)?experts\.(?:local_experts\.(\d+)\.linear_fc([12])\.weight"  # SequentialMLP: local expert i
    r"|linear_fc([12])\.weight(\d+))$"  # grouped GEMM: weight{i}
)
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"local_experts\.(\d+)\.")
_GLU_FC1 = re.compile(r"linear_fc1\.weight\d*$")
_RESIDUAL_WRITER = re.compile(r"(?:self_attention\.linear_proj\.weight|linear_fc2\.weight\d*)$")


@dataclass(frozen=True)
class Role:
    """One kind of parameter: its name pattern and what it is to the method (one of ``KINDS``)."""

    name: str
    pattern: re.Pattern
    kind: str

    @property
    def is_hidden_matrix(self) -> bool:
        return self.kind == "hidden_matrix"


def _role(name: str, pattern: str | re.Pattern, kind: str) -> Role:
    assert kind in KINDS, kind
    return Role(name, re.compile(pattern), kind)


ROLES: tuple[Role, ...] = (
    _role("qkv", r"self_attention\.linear_qkv\.weight$", "hidden_matrix"),
    _role("attention_out", r"self_attention\.linear_proj\.weight$", "hidden_matrix"),
    _role("attention_gate", r"self_attention\.linear_gate\.weight$", "hidden_matrix"),
    _role("mlp", r"(?:^|mlp\.)linear_fc[12]\.weight$", "hidden_matrix"),
    _role("shared_expert", r"(?:^|\.)shared_experts\.linear_fc[12]\.weight$", "hidden_matrix"),
    _role("router", r"(?:^|\.)router\.weight$", "hidden_matrix"),
    _role("routed_expert", ROUTED_EXPERT, "hidden_matrix"),
    _role("output", r"^output_layer\.weight$", "output"),
    _role("embedding", r"^embedding\.word_embeddings\.weight$", "embedding"),
    _role("norm", r"(?:layernorm\.(?:weight|bias)|layer_norm_(?:weight|bias))$", "norm"),
    _role("bias", r"(?<!layernorm)\.bias\d*$", "bias"),
)
"""Disjoint: a parameter name matches at most one pattern (asserted in :func:`role_of`)."""


def role_of(name: str) -> Role:
    """The one role whose pattern matches ``name`` (a bare-model name); ValueError for an unknown one."""
    matches = [role for role in ROLES if role.pattern.search(name)]
    if not matches:
        known = ", ".join(role.name for role in ROLES)
        raise ValueError(f"parameter {name!r} matches no optimizer role ({known}): add it to "
                         "hyperp_megatron/model/params.py ROLES and its update rule to optim/param_groups.py")
    assert len(matches) == 1, f"parameter {name!r} matches several roles: {[r.name for r in matches]}"
    return matches[0]


def is_glu_fc1(name: str) -> bool:
    """A SwiGLU input projection: its rows are ``[gate; up]`` (on TP rank ``r``: ``[gate_r; up_r]``)."""
    return bool(_GLU_FC1.search(name))


def writes_residual(name: str) -> bool:
    """A matrix whose output is added to the residual stream: attention's output projection and every fc2."""
    return bool(_RESIDUAL_WRITER.search(name))


def expert_sphere_key(chunk_index: int, name: str) -> str:
    """The routed experts of one layer and one of fc1 / fc2 (their sphere under optim.expert_sphere per_layer)."""
    match = ROUTED_EXPERT.search(name)
    assert match is not None, f"{name!r} is not a routed expert"
    fc = match.group(2) or match.group(3)
    return f"chunk{chunk_index}.{name[: match.start()]}experts.fc{fc}"


def shard_layout(name: str, param: torch.Tensor, pg_collection) -> tuple[object | None, int | None]:
    """(process group that shards ``param``, partition dim): TP, or expert-TP for routed experts, from
    Megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes; grouped-GEMM experts by name (fc1
    dim 0, fc2 dim 1). ``(None, None)`` when this rank holds the whole tensor."""
    grouped = ROUTED_EXPERT.search(name)
    if grouped is not None and grouped.group(3) is not None:
        return pg_collection.expt_tp, 0 if grouped.group(3) == "1" else 1
    if not getattr(param, "tensor_model_parallel", False):
        return None, None
    group = pg_collection.expt_tp if grouped is not None else pg_collection.tp
    return group, param.partition_dim


def canonical_names(model: torch.nn.Module, pg_collection) -> dict[str, str]:
    """Local parameter name -> its name in the unsharded model (global layer and expert numbers;
    grouped-GEMM experts under SequentialMLP's names), the same for every TP / PP / EP layout."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    global_layer = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
    names = {}
    for name, _ in model.named_parameters():
        canonical = _LAYER.sub(lambda m: f"decoder.layers.{global_layer[m.group(1)]}.", name)
        local = _LOCAL_EXPERT.search(name)
        if local:
            experts = _submodule(model, name[: local.start()] + "local_experts")
            global_id = pg_collection.ep.rank() * len(experts) + int(local.group(1))
            canonical = _LOCAL_EXPERT.sub(f"local_experts.{global_id}.", canonical)
        grouped = ROUTED_EXPERT.search(canonical)
        if grouped and grouped.group(3) is not None:
            experts = _submodule(model, name[: name.rindex("experts.")] + "experts")
            global_id = pg_collection.ep.rank() * experts.num_local_experts + int(grouped.group(4))
            canonical = (canonical[: canonical.rindex("experts.")]
                         + f"experts.local_experts.{global_id}.linear_fc{grouped.group(3)}.weight")
        names[name] = canonical
    return names


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    module = model
    for part in path.split("."):
        module = getattr(module, part)
    return module


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (parameter names and checkpoints are the bare model's)."""
    # Imported here: megatron-core takes seconds to import, and the entry point and checkpoint.py import this
    # module before the config is validated.
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk
