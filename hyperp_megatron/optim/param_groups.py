"""Parameter roles (``model/params.py``) -> update rule and layout (``ParamLayout``) for SphereMuon.

Every trainable parameter has exactly one role (by name, never by ``ndim``; asserted); an unknown name
raises ``ValueError``. All groups use the same LR ``eta`` from the schedule (docs/method.md section 1).

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

(With grouped-GEMM experts, Transformer Engine's or torch's, routed expert ``i`` is
``mlp.experts.linear_fc{1,2}.weight{i}``.) Weight decay of the sphere_muon / sphere_adam / muon rows: the run's
derived matrix weight decay (``derived.DerivedRun.weight_decay``): ``optim.weight_decay``, 0 by default; under
``muon`` the baseline's ``wd0`` becomes ``wd0 d0 / d`` with ``hyperp.enabled``. On the sphere a non-zero value
cannot shrink the radius (docs/method.md section 1, step 4).

The layout of a matrix comes from Megatron's parameter attributes and the role's process group
(``params.shard_layout``): the TP group, or the expert-TP group for routed experts (which also get
``is_expert``, and under ``optim.expert_sphere: per_layer`` the layer's ``sphere_key``). The step batches
same-shape matrices of all layers by itself (``optim/sphere_batched.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperp_megatron.model.params import ROLES, expert_sphere_key, role_of, shard_layout, unwrap
from hyperp_megatron.optim.layout import ParamLayout, QKVSplit

RULES_BY_ROLE: dict[str, tuple[str, str]] = {
    # role: (rule under optim.name sphere_muon, rule under muon)
    "qkv": ("sphere_muon", "muon"),
    "attention_out": ("sphere_muon", "muon"),
    "attention_gate": ("sphere_muon", "muon"),
    "mlp": ("sphere_muon", "muon"),
    "shared_expert": ("sphere_muon", "muon"),
    "router": ("sphere_muon", "muon"),
    "routed_expert": ("sphere_muon", "muon"),
    "output": ("sphere_adam", "adamw"),
    "embedding": ("adamw", "adamw"),
    "norm": ("adamw", "adamw"),
    "bias": ("adamw", "adamw"),
}
assert set(RULES_BY_ROLE) == {role.name for role in ROLES}, "every parameter role needs its update rules"
ADAM_RULES = ("adamw",)
EXPERT_SPHERES = ("per_expert", "per_layer")
OPTIMIZERS = ("sphere_muon", "muon")


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


def rule_of(role: str, optimizer_name: str) -> str:
    """The update rule of a parameter role under ``optim.name`` 'sphere_muon' or 'muon'."""
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"optimizer_name must be one of {OPTIMIZERS}, got {optimizer_name!r}")
    sphere_rule, muon_rule = RULES_BY_ROLE[role]
    return sphere_rule if optimizer_name == "sphere_muon" else muon_rule


def _qkv_split(config, tp_size: int) -> QKVSplit:
    """Megatron's fused QKV rows on one TP rank: query groups are split over TP."""
    heads_per_group = config.num_attention_heads // config.num_query_groups
    return QKVSplit(
        num_local_query_groups=config.num_query_groups // tp_size,
        q_rows_per_group=heads_per_group * config.kv_channels,
        head_dim=config.kv_channels,
    )


def layout_for(name: str, param: torch.Tensor, *, optimizer_name: str, config, pg_collection,
               chunk_index: int = 0, expert_sphere: str = "per_expert") -> tuple[str, ParamLayout]:
    """Role name and ``ParamLayout`` of one parameter of a GPTModel built with ``config``.

    ``expert_sphere`` (sphere_muon): 'per_expert' (each routed expert its own sphere, our default) or
    'per_layer' (all routed experts of a layer, fc1 and fc2 separately, on one sphere, summed over the
    expert-parallel group: the reference's sphere over a GPU's block of experts, made EP-invariant)."""
    if expert_sphere not in EXPERT_SPHERES:
        raise ValueError(f"expert_sphere must be one of {EXPERT_SPHERES}, got {expert_sphere!r}")
    role = role_of(name).name
    rule = rule_of(role, optimizer_name)
    if rule in ADAM_RULES:
        return role, ParamLayout(rule)  # elementwise: needs no process group
    is_expert = role == "routed_expert"
    group, partition_dim = shard_layout(name, param, pg_collection)
    qkv_split = _qkv_split(config, pg_collection.tp.size()) if role == "qkv" else None
    shared = is_expert and expert_sphere == "per_layer" and rule == "sphere_muon"
    return role, ParamLayout(rule, group=group, partition_dim=partition_dim, qkv_split=qkv_split,
                             is_expert=is_expert, sphere_key=expert_sphere_key(chunk_index, name) if shared else None,
                             sphere_group=pg_collection.ep if shared else None)


def assign_parameters(model_chunks: list, optimizer_name: str, pg_collection,
                      expert_sphere: str = "per_expert") -> list[ParamAssignment]:
    """Every trainable parameter of this rank's model chunks with its role and layout, in model order.

    model_chunks: GPTModels, possibly wrapped in DDP / Float16Module. Raises ValueError for a
    parameter no role knows; asserts that each parameter is assigned exactly once.
    """
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
            assignments.append(ParamAssignment(prefix + name, param, role, layout))
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
