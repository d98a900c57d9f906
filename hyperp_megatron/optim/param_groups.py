"""Parameter roles of Megatron's GPTModel -> update rule and layout (``ParamLayout``) for SphereMuon.

Roles are recognized by parameter name (the bare model's names, inside DDP / Float16Module), never
by ``ndim``. Every trainable parameter matches exactly one role; an unknown name raises ``ValueError``.
All groups use the same LR ``eta`` from the schedule (HYPERP.md section 1).

| role | parameter (name suffix) | sphere_muon rule | muon rule | LR | sharded by (dim) |
|---|---|---|---|---|---|
| qkv | `self_attention.linear_qkv.weight` | sphere_muon, Q, K, V 3 spheres | muon per Q/K/V | eta | TP (0) |
| attention_out | `self_attention.linear_proj.weight` | sphere_muon | muon | eta | TP (1) |
| attention_gate | `self_attention.linear_gate.weight` | sphere_muon | muon | eta | TP (0) |
| mlp | `mlp.linear_fc1.weight` (gate+up: 1 sphere), `mlp.linear_fc2.weight` | sphere_muon | muon | eta | TP (0 / 1) |
| shared_expert | `mlp.shared_experts.linear_fc{1,2}.weight` | sphere_muon | muon | eta | TP (0 / 1) |
| router | `mlp.router.weight` | sphere_muon | muon | eta | - |
| routed_expert | `mlp.experts.local_experts.{i}.linear_fc{1,2}.weight` | sphere_muon, 1 sphere/expert | muon | eta | expert-TP (0 / 1) |
| output | `output_layer.weight` | sphere_adam | adamw | eta | TP (0, vocab) |
| embedding | `embedding.word_embeddings.weight` | adamw, wd 0 | adamw, wd 0 | eta | TP (0, vocab) |
| norm | `*layernorm.weight`, `*.layer_norm_weight` | adamw, wd 0 | adamw, wd 0 | eta | - |
| bias | any other `*.bias` | adamw, wd 0 | adamw, wd 0 | eta | as its weight |

(With Transformer Engine grouped GEMM, routed expert ``i`` is ``mlp.experts.linear_fc{1,2}.weight{i}``.)
Weight decay of the sphere_muon / sphere_adam / muon rows: ``optim.weight_decay``.
``optim.weight_decay`` is 0 by default. Under ``muon`` it is the baseline's ``wd0`` and becomes
``wd0 d0 / d`` with ``hyperp.enabled`` (``transfer.muon_weight_decay``). On the sphere a non-zero
value cannot shrink the radius (HYPERP.md section 1, step 4).

The layout of a matrix comes from Megatron's parameter attributes (``tensor_model_parallel``,
``partition_dim``) and the role's process group: the TP group, or the expert-TP group for routed
experts (which also get ``is_expert`` and a per-layer ``batch_key``: the experts of one layer are
orthogonalized in one batched Newton-Schulz).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from hyperp_megatron.optim.sphere_muon import ParamLayout, QKVSplit

ADAM_RULES = ("adamw",)


@dataclass(frozen=True)
class Role:
    """One kind of parameter: its name pattern and its rule under sphere_muon / muon."""

    name: str
    pattern: re.Pattern
    sphere_rule: str
    muon_rule: str

    @property
    def is_matrix(self) -> bool:
        return self.sphere_rule == "sphere_muon"


def _role(name: str, pattern: str, sphere_rule: str, muon_rule: str) -> Role:
    return Role(name, re.compile(pattern), sphere_rule, muon_rule)


_ROUTED_EXPERT = re.compile(
    r"mlp\.experts\.(?:local_experts\.(\d+)\.linear_fc([12])\.weight"  # SequentialMLP: expert i
    r"|linear_fc([12])\.weight(\d+))$"  # TEGroupedMLP: weight{i}
)
ROLES: tuple[Role, ...] = (
    _role("qkv", r"self_attention\.linear_qkv\.weight$", "sphere_muon", "muon"),
    _role("attention_out", r"self_attention\.linear_proj\.weight$", "sphere_muon", "muon"),
    _role("attention_gate", r"self_attention\.linear_gate\.weight$", "sphere_muon", "muon"),
    _role("mlp", r"mlp\.linear_fc[12]\.weight$", "sphere_muon", "muon"),
    _role("shared_expert", r"mlp\.shared_experts\.linear_fc[12]\.weight$", "sphere_muon", "muon"),
    _role("router", r"mlp\.router\.weight$", "sphere_muon", "muon"),
    Role("routed_expert", _ROUTED_EXPERT, "sphere_muon", "muon"),
    _role("output", r"^output_layer\.weight$", "sphere_adam", "adamw"),
    _role("embedding", r"^embedding\.word_embeddings\.weight$", "adamw", "adamw"),
    _role("norm", r"(?:layernorm\.(?:weight|bias)|layer_norm_(?:weight|bias))$", "adamw", "adamw"),
    _role("bias", r"(?<!layernorm)\.bias\d*$", "adamw", "adamw"),
)
"""Disjoint: a parameter name matches at most one pattern (asserted in ``role_of``)."""


@dataclass(frozen=True)
class ParamAssignment:
    """Where one model parameter goes: its role, rule and layout."""

    name: str  # bare-model name; "chunk{i}." prefixed with several model chunks
    param: torch.Tensor
    role: str
    layout: ParamLayout

    @property
    def rule(self) -> str:
        return self.layout.rule


def role_of(name: str) -> Role:
    """The one role whose pattern matches ``name``; ValueError for an unknown parameter."""
    matches = [role for role in ROLES if role.pattern.search(name)]
    if not matches:
        known = ", ".join(role.name for role in ROLES)
        raise ValueError(
            f"parameter {name!r} matches no optimizer role ({known}): add it to "
            "hyperp_megatron/optim/param_groups.py ROLES with its update rule"
        )
    assert len(matches) == 1, f"parameter {name!r} matches several roles: {[r.name for r in matches]}"
    return matches[0]


def _qkv_split(config, tp_size: int) -> QKVSplit:
    """Megatron's fused QKV rows on one TP rank: query groups are split over TP."""
    heads_per_group = config.num_attention_heads // config.num_query_groups
    return QKVSplit(
        num_local_query_groups=config.num_query_groups // tp_size,
        q_rows_per_group=heads_per_group * config.kv_channels,
        head_dim=config.kv_channels,
    )


def _shard_layout(name: str, param: torch.Tensor, group, role: Role) -> tuple[object, int | None]:
    """(group, partition_dim) from Megatron's attributes; TE grouped experts carry none (by name)."""
    grouped = _ROUTED_EXPERT.search(name)
    if role.name == "routed_expert" and grouped.group(3) is not None:
        return group, 0 if grouped.group(3) == "1" else 1  # TEGroupedMLP: fc1 column-, fc2 row-parallel
    if not getattr(param, "tensor_model_parallel", False):
        return None, None
    return group, param.partition_dim


def _expert_batch_key(chunk_index: int, name: str) -> str:
    """The routed experts of one layer and one of fc1/fc2 share a batched Newton-Schulz."""
    match = _ROUTED_EXPERT.search(name)
    fc = match.group(2) or match.group(3)
    return f"chunk{chunk_index}.{name[: match.start()]}experts.fc{fc}"


EXPERT_SPHERES = ("per_expert", "per_layer")


def layout_for(name: str, param: torch.Tensor, *, optimizer_name: str, config, pg_collection,
               chunk_index: int = 0, expert_sphere: str = "per_expert") -> tuple[Role, ParamLayout]:
    """Role and ``ParamLayout`` of one parameter of a GPTModel built with ``config``.

    ``expert_sphere`` (sphere_muon): 'per_expert' (each routed expert its own sphere, our default) or
    'per_layer' (all routed experts of a layer, fc1 and fc2 separately, on one sphere, summed over the
    expert-parallel group: the reference's sphere over a GPU's block of experts, made EP-invariant)."""
    if expert_sphere not in EXPERT_SPHERES:
        raise ValueError(f"expert_sphere must be one of {EXPERT_SPHERES}, got {expert_sphere!r}")
    if optimizer_name not in ("sphere_muon", "muon"):
        raise ValueError(f"optimizer_name must be 'sphere_muon' or 'muon', got {optimizer_name!r}")
    role = role_of(name)
    rule = role.sphere_rule if optimizer_name == "sphere_muon" else role.muon_rule
    if rule in ADAM_RULES:
        return role, ParamLayout(rule)  # elementwise: needs no process group
    is_expert = role.name == "routed_expert"
    group, partition_dim = _shard_layout(name, param, pg_collection.expt_tp if is_expert else pg_collection.tp,
                                         role)
    qkv_split = _qkv_split(config, pg_collection.tp.size()) if role.name == "qkv" else None
    batch_key = _expert_batch_key(chunk_index, name) if is_expert else None
    shared = is_expert and expert_sphere == "per_layer" and rule == "sphere_muon"
    return role, ParamLayout(rule, group=group, partition_dim=partition_dim, qkv_split=qkv_split,
                             batch_key=batch_key, is_expert=is_expert, sphere_key=batch_key if shared else None,
                             sphere_group=pg_collection.ep if shared else None)


def assign_parameters(model_chunks: list, optimizer_name: str, pg_collection,
                      expert_sphere: str = "per_expert") -> list[ParamAssignment]:
    """Every trainable parameter of this rank's model chunks with its role and layout, in model order.

    model_chunks: GPTModels, possibly wrapped in DDP / Float16Module. Raises ValueError for a
    parameter no role knows; asserts that each parameter is assigned exactly once.
    """
    from hyperp_megatron.checkpoint import unwrap

    assignments = []
    for chunk_index, chunk in enumerate(model_chunks):
        model = unwrap(chunk)
        prefix = f"chunk{chunk_index}." if len(model_chunks) > 1 else ""
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            role, layout = layout_for(name, param, optimizer_name=optimizer_name, config=model.config,
                                      pg_collection=pg_collection, chunk_index=chunk_index,
                                      expert_sphere=expert_sphere)
            assignments.append(ParamAssignment(prefix + name, param, role.name, layout))
    trainable = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad]
    assigned_ids = [id(a.param) for a in assignments]
    assert len(set(assigned_ids)) == len(assigned_ids), "a parameter was assigned twice"
    assert set(assigned_ids) == {id(p) for p in trainable}, "some trainable parameter has no assignment"
    return assignments


def role_table(assignments: list[ParamAssignment]) -> dict[str, dict]:
    """``{role: {"rule": ..., "count": ..., "numel": ...}}`` for start-up logs."""
    table: dict[str, dict] = {}
    for a in assignments:
        row = table.setdefault(a.role, {"rule": a.rule, "count": 0, "numel": 0})
        row["count"] += 1
        row["numel"] += a.param.numel()
    return table
