"""Fidelity to the HyperP reference (issue 15): the Muon baseline's independent weight decay, the fp32
residual stream in bf16 runs, and one sphere over all routed experts of a layer (EP=2 == EP=1).
(The paper-comparable monitors are tested in test_monitors.py.)"""

import math

import pytest
import torch
import torch.distributed as dist

from _dist import run_distributed
from trainer_utils import TINY, merge, train_worker

from hyperp_megatron.optim.reference import decay_factor
from hyperp_megatron.optim.sphere_muon import ParamLayout, SphereMuon

pytestmark = pytest.mark.tier("unit")


# ----------------------------------------------------------------------------------------------
# 1. Muon baseline weight decay: (eta(t) / eta_peak) * wd0 * d0 / d per step


def _decayed(lr: float, weight_decay: float, peak: float | None) -> float:
    """The factor one Muon step with a zero gradient (no update direction) applies to the weight."""
    weight = torch.nn.Parameter(torch.ones(6, 4))
    optimizer = SphereMuon([weight], {weight: ParamLayout("muon")}, lr=lr, weight_decay=weight_decay,
                           decay_peak_lr=peak)
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    return float(weight.detach()[0, 0])


@pytest.mark.parametrize("scale", [1.0, 10.0, 0.1])
def test_muon_decay_follows_the_schedule_not_the_lr_size(scale):
    peak = 0.02 * scale
    for fraction in (1.0, 0.5, 0.1):  # eta(t) / eta_peak along the schedule
        got = _decayed(fraction * peak, 0.1, peak)
        assert math.isclose(got, 1 - fraction * 0.1, rel_tol=1e-6), (scale, fraction, got)
    # the coupled convention (no peak): eta(t) * wd, i.e. 1/eta_peak times weaker at the peak
    assert math.isclose(_decayed(peak, 0.1, None), 1 - peak * 0.1, rel_tol=1e-6)
    assert decay_factor(0.5 * peak, 0.1, peak) == pytest.approx(0.95)


def test_muon_baseline_groups_get_the_derived_peak_and_depth_scaled_decay(pg_collection):
    from hyperp_megatron.config import load_config
    from hyperp_megatron.model.gpt import build_model
    from hyperp_megatron.optim.builder import build_optimizer
    from hyperp_megatron.derived import derive

    cfg = load_config(None, merge(TINY, {
        "model": {"num_layers": 4, "parameterization": "muon"},
        "optim": {"name": "muon", "weight_decay": 0.1},
        "hyperp": {"enabled": True, "base_depth": 2, "base_lr": 0.05, "base_batch_tokens": 512}}))
    derived = derive(cfg, 1, vocab_size=256)
    chunks = build_model(cfg, pg_collection, 256)
    optimizer = build_optimizer(cfg, chunks, pg_collection, derived)
    groups = {g["rule"]: g for g in optimizer.param_groups}
    assert groups["muon"]["decay_peak_lr"] == derived.lr != cfg.optim.lr
    assert groups["muon"]["weight_decay"] == pytest.approx(0.1 * 2 / 4) == derived.weight_decay
    assert groups["adamw"]["weight_decay"] == 0.0


def test_sphere_decay_keeps_the_coupled_form():
    """Sphere Muon's (second-order) decay stays eta(t) * wd: the builder sets no peak for sphere rules."""
    from hyperp_megatron.optim.builder import torch_param_groups

    class Assigned:
        def __init__(self, rule):
            self.rule, self.param = rule, torch.nn.Parameter(torch.zeros(2, 2))

    groups = torch_param_groups([Assigned("sphere_muon"), Assigned("muon"), Assigned("adamw")], 0.1, 0.03)
    assert [(g["rule"], g["decay_peak_lr"], g["weight_decay"]) for g in groups] == [
        ("sphere_muon", None, 0.1), ("muon", 0.03, 0.1), ("adamw", None, 0.0)]


# ----------------------------------------------------------------------------------------------
# 2. fp32 residual stream in bf16 runs


def _stream(pg_collection, fp32_residual: bool):
    """(stream entering each layer's pre-MLP norm, the layer input, the attention branch, multiplier)."""
    from megatron.core.transformer.module import Float16Module

    from hyperp_megatron.config import load_config
    from hyperp_megatron.model.gpt import build_model
    from hyperp_megatron.model.spec import branch_multiplier

    cfg = load_config(None, merge(TINY, {"model": {"seq_length": 32, "fp32_residual": fp32_residual},
                                         "train": {"precision": "bf16"}}))
    (gpt,) = build_model(cfg, pg_collection, 256)
    model = Float16Module(gpt.config, gpt)
    seen = {}
    layer = gpt.decoder.layers[1]
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("input", k["hidden_states"]),
                                             with_kwargs=True),
             layer.self_attention.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0])),
             layer.pre_mlp_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("mid", a[0])),
             gpt.decoder.final_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("last", a[0]))]
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = model(ids, torch.arange(32).expand(2, 32), None, labels=ids)
    loss.float().mean().backward()
    for hook in hooks:
        hook.remove()
    assert all(p.grad is not None for p in gpt.parameters() if p.requires_grad)
    return seen, branch_multiplier(cfg.model)


def test_fp32_residual_stream_adds_bf16_branches_exactly(pg_collection):
    seen, multiplier = _stream(pg_collection, fp32_residual=True)
    assert seen["input"].dtype == seen["mid"].dtype == seen["last"].dtype == torch.float32
    assert seen["attn"].dtype == torch.bfloat16  # the branch computes in bf16 ...
    expected = seen["input"] + seen["attn"].float() * multiplier  # ... and is added in fp32, unrounded
    torch.testing.assert_close(seen["mid"], expected, rtol=0, atol=0)


def test_bf16_residual_stream_when_disabled(pg_collection):
    seen, _ = _stream(pg_collection, fp32_residual=False)
    assert seen["input"].dtype == seen["mid"].dtype == seen["last"].dtype == torch.bfloat16


def test_fp32_residual_is_the_default():
    from hyperp_megatron.config import ModelConfig

    assert ModelConfig().fp32_residual is True


BF16_RUN = {"train": {"precision": "bf16", "steps": 3}, "optim": {"name": "sphere_muon", "lr": 0.02}}


@pytest.mark.tier("parallel")
def test_fp32_residual_pipeline_parallel_matches_one_stage(tmp_path):
    """PP=2 exchanges the fp32 stream between stages (pipeline_dtype fp32): same losses as PP=1."""
    expected = run_distributed(train_worker, 1, merge(BF16_RUN, {"logging": {"run_dir": str(tmp_path / "pp1")}}))
    got = run_distributed(train_worker, 2, merge(BF16_RUN, {"parallel": {"pipeline": 2},
                                                           "logging": {"run_dir": str(tmp_path / "pp2")}}))
    assert len(expected[0]["losses"]) == 3
    for a, b in zip(got[0]["losses"], expected[0]["losses"]):
        assert math.isclose(a, b, rel_tol=1e-5), (got[0]["losses"], expected[0]["losses"])


# ----------------------------------------------------------------------------------------------
# 4. One sphere over all routed experts of a layer: EP=2 equals EP=1


NUM_EXPERTS, SHAPE, STEPS, LR = 4, (12, 8), 4, 0.05


def _expert_weights():
    generator = torch.Generator().manual_seed(3)
    return [(torch.rand(SHAPE, generator=generator) * 2 - 1) / math.sqrt(SHAPE[1]) for _ in range(NUM_EXPERTS)]


def _expert_grads(step: int):
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(SHAPE, generator=generator) * (1 + i) for i in range(NUM_EXPERTS)]


def _run_experts(indices, sphere_key, sphere_group):
    weights = _expert_weights()
    params = [torch.nn.Parameter(weights[i].clone()) for i in indices]
    layouts = {p: ParamLayout("sphere_muon", is_expert=True, sphere_key=sphere_key,
                              sphere_group=sphere_group) for p in params}
    optimizer = SphereMuon(params, layouts, lr=LR)
    for step in range(STEPS):
        grads = _expert_grads(step)
        for param, i in zip(params, indices):
            param.grad = grads[i]
        optimizer.step()
    return [p.detach().clone() for p in params]


def expert_parallel_worker(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    ep_group = dist.new_group(list(range(world_size)))  # the expert-parallel group
    local = list(range(rank * NUM_EXPERTS // world_size, (rank + 1) * NUM_EXPERTS // world_size))
    return {"local": local,
            "per_layer_ep2": _run_experts(local, "layer0.fc1", ep_group),
            "per_layer_ep1": _run_experts(list(range(NUM_EXPERTS)), "layer0.fc1", None),
            "per_expert_ep1": _run_experts(list(range(NUM_EXPERTS)), None, None)}


@pytest.mark.tier("parallel")
def test_per_layer_expert_sphere_ep2_equals_ep1():
    results = run_distributed(expert_parallel_worker, 2)
    initial = _expert_weights()
    for result in results:
        for position, i in enumerate(result["local"]):
            torch.testing.assert_close(result["per_layer_ep2"][position], result["per_layer_ep1"][i],
                                       rtol=1e-6, atol=1e-7)
    per_layer, per_expert = results[0]["per_layer_ep1"], results[0]["per_expert_ep1"]
    # The layer's sphere: the norm over all experts is kept, single experts' norms move (gradients differ in
    # scale per expert); per expert, each one keeps its own.
    total = lambda ws: torch.stack([w.norm() ** 2 for w in ws]).sum().sqrt()  # noqa: E731
    assert math.isclose(float(total(per_layer)), float(total(initial)), rel_tol=1e-6)
    moved = max(abs(float(w.norm() / w0.norm()) - 1) for w, w0 in zip(per_layer, initial))
    assert moved > 1e-3
    for w, w0 in zip(per_expert, initial):
        assert math.isclose(float(w.norm()), float(w0.norm()), rel_tol=1e-6)


def test_per_layer_spheres_refuse_layer_wise_data_parallel():
    from hyperp_megatron.config import load_config, validate

    cfg = load_config(None, merge(TINY, {"model": {"moe": {"sparsity": 2, "granularity": 2}},
                                         "optim": {"name": "sphere_muon", "expert_sphere": "per_layer"},
                                         "parallel": {"distributed_optimizer": True}}))
    with pytest.raises(ValueError, match="expert_sphere per_layer"):
        validate(cfg, 2)
    with pytest.raises(ValueError, match="expert_sphere"):
        load_config(None, {"optim": {"expert_sphere": "per_gpu"}})


def test_per_layer_sphere_keys_come_from_the_expert_layer(pg_collection):
    from hyperp_megatron.config import load_config
    from hyperp_megatron.model.gpt import build_model
    from hyperp_megatron.optim.param_groups import assign_parameters

    cfg = load_config(None, merge(TINY, {"model": {"moe": {"sparsity": 2, "granularity": 2}}}))
    chunks = build_model(cfg, pg_collection, 256)
    keys = {a.name: a.layout.sphere_key for a in assign_parameters(chunks, "sphere_muon", pg_collection, "per_layer")}
    experts = {name: key for name, key in keys.items() if ".experts." in name}
    assert len(experts) == 2 * 2 * 4 and len(set(experts.values())) == 2 * 2  # layers x (fc1, fc2)
    assert all(key is None for name, key in keys.items() if ".experts." not in name)
    per_expert = assign_parameters(chunks, "sphere_muon", pg_collection)
    assert all(a.layout.sphere_key is None for a in per_expert)
