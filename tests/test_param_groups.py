"""The parameter-role table (roles: hyperp_megatron/model/params.py; rules: optim/param_groups.py, README "Which parameter gets which
update rule"): every name Megatron gives a parameter, with the local layers and with Transformer
Engine's (norms fused into the following linear, grouped-GEMM experts ``weight{i}``), lands in the
documented role, rule and layout; the table in the module docstring and the README is the code's."""

import os
import re
from types import SimpleNamespace

import pytest
import torch

from hyperp_megatron.optim import param_groups
from hyperp_megatron.optim.param_groups import ROLES, layout_for, role_of

pytestmark = pytest.mark.tier("unit")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> role, for both layer implementations (local spec / Transformer Engine spec).
NAMES = {
    # attention
    "decoder.layers.0.self_attention.linear_qkv.weight": "qkv",
    "decoder.layers.0.self_attention.linear_qkv.bias": "bias",
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": "norm",  # TE: input norm fused into QKV
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias": "norm",
    "decoder.layers.0.input_layernorm.weight": "norm",  # local spec
    "decoder.layers.0.self_attention.q_layernorm.weight": "norm",
    "decoder.layers.0.self_attention.k_layernorm.weight": "norm",
    "decoder.layers.0.self_attention.linear_proj.weight": "attention_out",
    "decoder.layers.0.self_attention.linear_proj.bias": "bias",
    "decoder.layers.0.self_attention.linear_gate.weight": "attention_gate",
    # dense MLP
    "decoder.layers.1.pre_mlp_layernorm.weight": "norm",
    "decoder.layers.1.mlp.linear_fc1.layer_norm_weight": "norm",  # TE: pre-MLP norm fused into fc1
    "decoder.layers.1.mlp.linear_fc1.weight": "mlp",
    "decoder.layers.1.mlp.linear_fc2.weight": "mlp",
    "decoder.layers.1.mlp.linear_fc2.bias": "bias",
    # MoE
    "decoder.layers.2.mlp.router.weight": "router",
    "decoder.layers.2.mlp.shared_experts.linear_fc1.weight": "shared_expert",
    "decoder.layers.2.mlp.shared_experts.linear_fc2.weight": "shared_expert",
    "decoder.layers.2.mlp.experts.local_experts.0.linear_fc1.weight": "routed_expert",  # SequentialMLP
    "decoder.layers.2.mlp.experts.local_experts.13.linear_fc2.weight": "routed_expert",
    "decoder.layers.2.mlp.experts.linear_fc1.weight0": "routed_expert",  # TEGroupedMLP
    "decoder.layers.2.mlp.experts.linear_fc1.weight12": "routed_expert",
    "decoder.layers.2.mlp.experts.linear_fc2.weight7": "routed_expert",
    "decoder.layers.2.mlp.experts.linear_fc2.bias7": "bias",
    # embedding, head
    "embedding.word_embeddings.weight": "embedding",
    "decoder.final_layernorm.weight": "norm",
    "output_layer.weight": "output",
}


@pytest.mark.parametrize("name, role", NAMES.items(), ids=lambda v: v if "." not in v else v.split("layers.")[-1])
def test_every_megatron_name_has_its_role(name, role):
    assert role_of(name).name == role


@pytest.mark.parametrize("name", [
    "decoder.layers.0.mlp.mystery.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight_extra",
    "decoder.layers.2.mlp.experts.linear_fc3.weight0",
])
def test_unknown_name_raises(name):
    with pytest.raises(ValueError, match="matches no optimizer role"):
        role_of(name)


class FakeGroup:
    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


def _layout(name: str, param: torch.Tensor, optimizer_name: str = "sphere_muon", chunk_index: int = 0,
            expert_sphere: str = "per_layer"):
    config = SimpleNamespace(num_attention_heads=8, num_query_groups=2, kv_channels=16)
    groups = SimpleNamespace(tp=FakeGroup(2), expt_tp=FakeGroup(4), ep=FakeGroup(2))
    return layout_for(name, param, optimizer_name=optimizer_name, config=config, pg_collection=groups,
                      chunk_index=chunk_index, expert_sphere=expert_sphere)


def test_te_grouped_experts_layout():
    """TE's grouped experts carry no tensor-parallel attributes: fc1 is column-parallel (rows, dim 0),
    fc2 row-parallel (dim 1), over the expert-TP group; under per_layer one sphere per layer and fc."""
    fc1_0 = _layout("decoder.layers.2.mlp.experts.linear_fc1.weight0", torch.zeros(8, 4))[1]
    fc1_12 = _layout("decoder.layers.2.mlp.experts.linear_fc1.weight12", torch.zeros(8, 4))[1]
    fc2_7 = _layout("decoder.layers.2.mlp.experts.linear_fc2.weight7", torch.zeros(4, 8))[1]
    other_layer = _layout("decoder.layers.3.mlp.experts.linear_fc1.weight0", torch.zeros(8, 4))[1]
    assert (fc1_0.rule, fc1_0.partition_dim, fc1_0.group.size(), fc1_0.is_expert) == ("sphere_muon", 0, 4, True)
    assert (fc2_7.partition_dim, fc2_7.group.size(), fc2_7.is_expert) == (1, 4, True)
    assert fc1_0.sphere_key == fc1_12.sphere_key == "chunk0.decoder.layers.2.experts.fc1"
    assert fc2_7.sphere_key == "chunk0.decoder.layers.2.experts.fc2"
    assert other_layer.sphere_key != fc1_0.sphere_key
    per_expert = _layout("decoder.layers.2.mlp.experts.linear_fc1.weight0", torch.zeros(8, 4),
                         expert_sphere="per_expert")[1]
    assert per_expert.sphere_key is None and per_expert.sphere_group is None


def test_sequential_experts_and_dense_layouts_follow_megatron_attributes():
    expert = torch.zeros(8, 4)
    expert.tensor_model_parallel, expert.partition_dim = True, 1
    layout = _layout("decoder.layers.2.mlp.experts.local_experts.3.linear_fc2.weight", expert)[1]
    assert (layout.partition_dim, layout.group.size(), layout.sphere_key) == (
        1, 4, "chunk0.decoder.layers.2.experts.fc2")
    qkv = torch.zeros(48, 4)
    qkv.tensor_model_parallel, qkv.partition_dim = True, 0
    layout = _layout("decoder.layers.0.self_attention.linear_qkv.weight", qkv)[1]
    assert (layout.group.size(), layout.partition_dim, layout.is_expert) == (2, 0, False)
    assert (layout.qkv_split.num_local_query_groups, layout.qkv_split.piece_rows) == (1, (64, 16, 16))
    router = _layout("decoder.layers.2.mlp.router.weight", torch.zeros(8, 4))[1]  # replicated: no group
    assert (router.rule, router.group, router.partition_dim) == ("sphere_muon", None, None)


@pytest.mark.parametrize("optimizer_name", ["sphere_muon", "muon"])
def test_te_norms_and_biases_are_adamw_without_a_group(optimizer_name):
    for name in ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
                 "decoder.layers.1.mlp.linear_fc1.layer_norm_weight",
                 "decoder.layers.2.mlp.experts.linear_fc2.bias7"):
        role, layout = _layout(name, torch.zeros(4), optimizer_name)
        assert (layout.rule, layout.group, layout.sphere_key) == ("adamw", None, None), name


def _table_rows(text: str) -> list[list[str]]:
    start = text.index("| role | parameter (name suffix) |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _expand(suffix: str) -> list[str]:
    """`mlp.linear_fc{1,2}.weight` -> both names; `{i}` -> expert 3; `*` -> a layer prefix."""
    names = [suffix.replace("{i}", "3").replace("*", "decoder.layers.0.input_")]
    while any("{" in name for name in names):
        expanded = []
        for name in names:
            match = re.search(r"\{([^}]*)\}", name)
            if not match:
                expanded.append(name)
                continue
            expanded += [name[:match.start()] + option + name[match.end():] for option in match.group(1).split(",")]
        names = expanded
    return names


def test_documented_table_is_the_code():
    """Each row of the table (module docstring = README) names the role's parameters and its rules."""
    doc_rows = _table_rows(param_groups.__doc__)
    readme_rows = _table_rows(open(os.path.join(REPO, "README.md")).read())
    assert doc_rows == readme_rows
    roles = {role.name: role for role in ROLES}
    assert [row[0] for row in doc_rows] == list(roles)
    for role_name, parameters, sphere_rule, muon_rule, *_ in doc_rows:
        role = roles[role_name]
        assert sphere_rule.split(",")[0].split()[0] == param_groups.rule_of(role.name, "sphere_muon"), role_name
        assert muon_rule.split(",")[0].split()[0] == param_groups.rule_of(role.name, "muon"), role_name
        for suffix in re.findall(r"`([^`]+)`", parameters):
            for name in _expand(suffix):
                prefix = "" if name.startswith(("output_layer", "embedding", "decoder")) else "decoder.layers.0."
                assert role_of(prefix + name).name == role_name, (role_name, prefix + name)
