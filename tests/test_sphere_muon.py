"""SphereMuon on one process: parity with the reference, sphere invariants, QKV split, weight decay,
state dict, validation. The helpers here also build the sharded problem for test_sphere_muon_dist."""

import copy
import io
import math

import pytest
import torch

from hyperp_megatron.optim import ParamLayout, QKVSplit, ReferenceOptimizer, SphereMuon, assign_to_ranks
from hyperp_megatron.optim.newton_schulz import newton_schulz5
from hyperp_megatron.optim.reference import scaled_sphere_step

pytestmark = [pytest.mark.tier("unit"), pytest.mark.usefixtures("one_thread")]

HIDDEN, HEAD_DIM, NUM_HEADS, NUM_QUERY_GROUPS, VOCAB, NUM_EXPERTS = 32, 8, 4, 2, 64, 4
Q_ROWS_PER_GROUP = NUM_HEADS // NUM_QUERY_GROUPS * HEAD_DIM
LR = 0.02

# name: (full shape, rule, dim sharded by tensor parallelism or None). q, k, v are one fused
# "qkv" parameter in the optimizer, three matrices in the reference. Experts use expert-TP.
MATRICES = {
    "q": ((NUM_HEADS * HEAD_DIM, HIDDEN), "sphere_muon", 0),
    "k": ((NUM_QUERY_GROUPS * HEAD_DIM, HIDDEN), "sphere_muon", 0),
    "v": ((NUM_QUERY_GROUPS * HEAD_DIM, HIDDEN), "sphere_muon", 0),
    "proj": ((HIDDEN, NUM_HEADS * HEAD_DIM), "sphere_muon", 1),
    "fc1": ((2 * HIDDEN, HIDDEN), "sphere_muon", 0),
    "fc2": ((HIDDEN, 2 * HIDDEN), "sphere_muon", 1),
    "router": ((NUM_EXPERTS, HIDDEN), "sphere_muon", None),
    **{f"expert{i}.fc1": ((24, HIDDEN), "sphere_muon", 0) for i in range(NUM_EXPERTS)},
    "baseline": ((48, HIDDEN), "muon", 0),
    "output": ((VOCAB, HIDDEN), "sphere_adam", 0),
    "embedding": ((VOCAB, HIDDEN), "adamw", 0),
    "norm": ((HIDDEN,), "adamw", None),
}
SPHERE_NAMES = [name for name, (_, rule, _) in MATRICES.items() if rule.startswith("sphere")]


def full_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """HyperP initialization of the whole (unsharded) tensors."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (shape, rule, _) in MATRICES.items():
        if rule in ("sphere_muon", "muon"):
            bound = 1 / math.sqrt(shape[-1])
            weights[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        elif name == "norm":
            weights[name] = torch.ones(shape)
        else:
            weights[name] = 0.02 * torch.randn(shape, generator=generator)
    return weights


def full_grads(step: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * seed + step + 1)
    return {name: torch.randn(shape, generator=generator) for name, (shape, _, _) in MATRICES.items()}


def shard(tensor: torch.Tensor, partition_dim: int | None, rank: int, world_size: int) -> torch.Tensor:
    if partition_dim is None or world_size == 1:
        return tensor.clone()
    return tensor.chunk(world_size, dim=partition_dim)[rank].clone()


def fuse_qkv_local(q, k, v, rank: int, world_size: int) -> torch.Tensor:
    """Megatron's linear_qkv rows on TP rank ``rank``: per local query group [Q heads, K, V]."""
    groups_per_rank = NUM_QUERY_GROUPS // world_size
    local_groups = slice(rank * groups_per_rank, (rank + 1) * groups_per_rank)
    pieces = [
        q.view(NUM_QUERY_GROUPS, Q_ROWS_PER_GROUP, -1)[local_groups],
        k.view(NUM_QUERY_GROUPS, HEAD_DIM, -1)[local_groups],
        v.view(NUM_QUERY_GROUPS, HEAD_DIM, -1)[local_groups],
    ]
    return torch.cat(pieces, dim=1).reshape(-1, q.size(-1))


def local_tensors(full: dict, rank: int = 0, world_size: int = 1, fuse_qkv: bool = True) -> dict:
    """This TP rank's tensors; q, k, v fused into "qkv" unless ``fuse_qkv`` is False."""
    local = {name: shard(full[name], MATRICES[name][2], rank, world_size) for name in full}
    if fuse_qkv and "q" in local:
        local["qkv"] = fuse_qkv_local(full["q"], full["k"], full["v"], rank, world_size)
        del local["q"], local["k"], local["v"]
    return local


def layout_for(name: str, world_size: int = 1, tp_group=None, expert_tp_group=None):
    """The ParamLayout a model builder would give this (local) tensor."""
    if name == "qkv":
        split = QKVSplit(NUM_QUERY_GROUPS // world_size, Q_ROWS_PER_GROUP, HEAD_DIM)
        return ParamLayout("sphere_muon", tp_group, 0 if tp_group else None, qkv_split=split)
    _, rule, partition_dim = MATRICES[name]
    if name.startswith("expert"):
        return ParamLayout(rule, expert_tp_group, partition_dim if expert_tp_group else None, is_expert=True)
    group = tp_group if partition_dim is not None else None
    return ParamLayout(rule, group, partition_dim if group else None)


def make_optimizer(local: dict, world_size: int = 1, tp_group=None, expert_tp_group=None, **kwargs):
    params = {name: torch.nn.Parameter(tensor.clone()) for name, tensor in local.items()}
    layouts = {
        param: layout_for(name, world_size, tp_group, expert_tp_group)
        for name, param in params.items()
    }
    kwargs.setdefault("lr", LR)
    return params, SphereMuon(list(params.values()), layouts, **kwargs)


def run_steps(params: dict, optimizer, first_step: int, num_steps: int, rank: int = 0, world_size: int = 1,
              seed: int = 0, fuse_qkv: bool = True) -> None:
    for step in range(first_step, first_step + num_steps):
        grads = local_tensors(full_grads(step, seed), rank, world_size, fuse_qkv)
        for name, param in params.items():
            param.grad = grads[name]
        optimizer.step()


def reference_weights(num_steps: int, weight_decay: float = 0.0, seed: int = 0, names=None) -> dict:
    weights = {name: torch.nn.Parameter(tensor) for name, tensor in full_weights(seed).items()
               if names is None or name in names}
    reference = ReferenceOptimizer(
        {name: (weight, MATRICES[name][1]) for name, weight in weights.items()}, lr=LR, weight_decay=weight_decay
    )
    for step in range(num_steps):
        grads = full_grads(step, seed)
        for name, weight in weights.items():
            weight.grad = grads[name]
        reference.step()
    return {name: weight.detach() for name, weight in weights.items()}


def relative_errors(actual: dict, expected: dict) -> dict[str, float]:
    return {name: ((actual[name] - expected[name]).norm() / expected[name].norm()).item() for name in expected}


def test_matches_reference_for_every_rule():
    params, optimizer = make_optimizer(local_tensors(full_weights()))
    run_steps(params, optimizer, 0, 5)
    expected = local_tensors(reference_weights(5))
    errors = relative_errors({name: p.detach() for name, p in params.items()}, expected)
    assert max(errors.values()) < 1e-5, errors


def _qkv_pieces(qkv: torch.Tensor) -> list[torch.Tensor]:
    grouped = qkv.view(NUM_QUERY_GROUPS, -1, HIDDEN).split([Q_ROWS_PER_GROUP, HEAD_DIM, HEAD_DIM], dim=1)
    return [piece.reshape(-1, HIDDEN) for piece in grouped]


def _sphere_norms(params: dict) -> torch.Tensor:
    norms = [params[name].norm() for name in SPHERE_NAMES if name in params]
    return torch.stack(norms + [piece.norm() for piece in _qkv_pieces(params["qkv"].detach())])


def test_sphere_matrices_keep_their_initial_norm():
    params, optimizer = make_optimizer(local_tensors(full_weights()))
    initial = _sphere_norms(params)
    for step in range(40):
        run_steps(params, optimizer, step, 1)
        relative_drift = (_sphere_norms(params) / initial - 1).abs().max().item()
        assert relative_drift < 1e-6, (step, relative_drift)
    qkv_radius = optimizer.state[params["qkv"]]["radius"]
    assert qkv_radius.shape == (3,) and qkv_radius.dtype == torch.float32
    torch.testing.assert_close(qkv_radius, initial[-3:], rtol=1e-6, atol=0)


def test_first_step_has_norm_lr_times_radius_then_retracts():
    torch.manual_seed(0)
    weight, grad = torch.randn(24, 40), torch.randn(24, 40)
    param = torch.nn.Parameter(weight.clone())
    optimizer = SphereMuon([param], {param: ParamLayout("sphere_muon")}, lr=0.1)
    param.grad = grad
    optimizer.step()
    radius = weight.norm()
    # Step 1: M = G, U = 1.95 G; NS is scale invariant.
    step = scaled_sphere_step(newton_schulz5(1.95 * grad), radius, 0.1)
    torch.testing.assert_close(step.norm(), 0.1 * radius)
    before_retraction = weight - step
    torch.testing.assert_close(param.detach(), before_retraction * radius / before_retraction.norm(),
                               rtol=1e-5, atol=1e-6)


def test_fused_qkv_equals_separate_q_k_v():
    full = full_weights()
    names = ["q", "k", "v"]
    for rule in ("sphere_muon", "muon"):
        separate = {name: torch.nn.Parameter(full[name].clone()) for name in names}
        fused = torch.nn.Parameter(fuse_qkv_local(full["q"], full["k"], full["v"], 0, 1))
        split = QKVSplit(NUM_QUERY_GROUPS, Q_ROWS_PER_GROUP, HEAD_DIM)
        separate_optimizer = SphereMuon(list(separate.values()), {p: ParamLayout(rule) for p in separate.values()},
                                        lr=LR)
        fused_optimizer = SphereMuon([fused], {fused: ParamLayout(rule, qkv_split=split)}, lr=LR)
        for step in range(4):
            grads = full_grads(step)
            for name in names:
                separate[name].grad = grads[name]
            fused.grad = fuse_qkv_local(grads["q"], grads["k"], grads["v"], 0, 1)
            separate_optimizer.step()
            fused_optimizer.step()
        expected = fuse_qkv_local(*(separate[name].detach() for name in names), 0, 1)
        torch.testing.assert_close(fused.detach(), expected, rtol=1e-6, atol=1e-7)


def test_weight_decay_keeps_radius_and_changes_weights_only_to_second_order(measured):
    full = local_tensors(full_weights())
    sphere_only = {name: full[name] for name in ("fc1", "fc2", "output")}
    runs = {}
    for weight_decay in (0.0, 0.1):
        params, optimizer = make_optimizer(sphere_only, weight_decay=weight_decay)
        run_steps(params, optimizer, 0, 5)
        runs[weight_decay] = {name: p.detach() for name, p in params.items()}
        for name, param in params.items():
            assert optimizer.state[param]["radius"].item() == pytest.approx(full[name].norm().item(), rel=1e-6)
            assert param.norm().item() == pytest.approx(full[name].norm().item(), rel=1e-6)
    effects = {}
    for name in sphere_only:
        moved = (runs[0.0][name] - full[name]).norm() / full[name].norm()  # ~ 5 steps x lr
        decay_effect = (runs[0.1][name] - runs[0.0][name]).norm() / full[name].norm()
        effects[name] = decay_effect.item()
        # first order would be ~ 5 lr wd = 1e-2; second order is ~ 5 lr^2 wd = 2e-4
        assert 0 < decay_effect < 5 * 5 * LR**2 * 0.1, (name, decay_effect)
        assert decay_effect < 0.01 * moved
    measured("sphere_invariants", "weight_decay_0.1_effect_after_5_steps_rel", {
        "max": max(effects.values()), "second_order_bound_5x5_lr2_wd": 5 * 5 * LR**2 * 0.1,
        "first_order_would_be_5_lr_wd": 5 * LR * 0.1})


def test_bf16_newton_schulz_keeps_the_sphere_and_tracks_fp32():
    local = local_tensors(full_weights())
    results = []
    for compute_dtype in (None, torch.bfloat16):
        params, optimizer = make_optimizer(local, ns_compute_dtype=compute_dtype)
        run_steps(params, optimizer, 0, 5)
        results.append({name: p.detach() for name, p in params.items()})
        assert (_sphere_norms(params) / _sphere_norms(make_optimizer(local)[0]) - 1).abs().max() < 1e-6
    errors = relative_errors(results[1], results[0])
    assert 0 < max(errors.values()) < 1e-2, errors  # 5 steps of size lr = 0.02, O within ~1e-2


def test_state_dict_round_trip_resumes_bit_exactly():
    params, optimizer = make_optimizer(local_tensors(full_weights()))
    run_steps(params, optimizer, 0, 3)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "params": {n: p.detach() for n, p in params.items()}}, buffer)
    run_steps(params, optimizer, 3, 2)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_params, resumed = make_optimizer(checkpoint["params"])
    resumed.load_state_dict(checkpoint["optimizer"])
    run_steps(resumed_params, resumed, 3, 2)
    for name, param in params.items():
        assert torch.equal(param, resumed_params[name]), name
    for state in resumed.state.values():
        assert all(value.dtype == torch.float32 for value in state.values() if torch.is_tensor(value))


def test_bf16_parameters_keep_fp32_state_across_load():
    param = torch.nn.Parameter(torch.randn(16, 24).bfloat16())
    optimizer = SphereMuon([param], {param: ParamLayout("sphere_muon")}, lr=LR)
    param.grad = torch.randn(16, 24).bfloat16()
    optimizer.step()
    state_dict = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(state_dict)
    state = optimizer.state[param]
    assert state["momentum_buffer"].dtype == torch.float32 and state["radius"].dtype == torch.float32
    assert torch.equal(state["momentum_buffer"], state_dict["state"][0]["momentum_buffer"])


def test_zero_gradient_gives_a_finite_null_step():
    params, optimizer = make_optimizer(local_tensors(full_weights()))
    before = {name: p.detach().clone() for name, p in params.items()}
    for param in params.values():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for name, param in params.items():
        torch.testing.assert_close(param.detach(), before[name], rtol=1e-6, atol=1e-7)


def test_step_does_not_synchronize_with_the_host(monkeypatch):
    params, optimizer = make_optimizer(local_tensors(full_weights()))
    run_steps(params, optimizer, 0, 1)  # the first step creates the state

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronization inside SphereMuon.step()")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    run_steps(params, optimizer, 1, 1)


def test_reference_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(8, 16))
    theirs.data.copy_(ours.data)
    reference = ReferenceOptimizer({"w": (ours, "adamw")}, lr=1e-2, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        ours.grad = torch.randn(8, 16)
        theirs.grad = ours.grad.clone()
        reference.step()
        torch_adamw.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)


def test_reference_muon_baseline_step():
    torch.manual_seed(0)
    weight, grad = torch.randn(48, 16), torch.randn(48, 16)
    param = torch.nn.Parameter(weight.clone())
    param.grad = grad
    ReferenceOptimizer({"w": (param, "muon")}, lr=0.1, weight_decay=0.5).step()
    expected = weight * (1 - 0.1 * 0.5) - 0.1 * math.sqrt(48 / 16) * newton_schulz5(1.95 * grad)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)


def test_assign_to_ranks_balances_costs():
    costs = [100, 90, 50, 40, 30, 20, 10, 10]
    owners = assign_to_ranks(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == rank) for rank in range(2)]
    # Greedy list scheduling: the final imbalance is at most the smallest cost (placed last).
    assert max(loads) - min(loads) <= min(costs)
    assert owners == assign_to_ranks(costs, 2)


def _one_param():
    return torch.nn.Parameter(torch.randn(8, 8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(ns_mode="duplicated"), "ns_mode"),
        (dict(ns_compute_dtype=torch.float16), "ns_compute_dtype"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, match):
    param = _one_param()
    kwargs = {"lr": LR, **kwargs}
    with pytest.raises(ValueError, match=match):
        SphereMuon([param], {param: ParamLayout("sphere_muon")}, **kwargs)


def test_invalid_layouts_raise():
    param, vector = _one_param(), torch.nn.Parameter(torch.ones(8))
    with pytest.raises(ValueError, match="no ParamLayout"):
        SphereMuon([param], {}, lr=LR)
    with pytest.raises(ValueError, match="2-D matrix"):
        SphereMuon([vector], {vector: ParamLayout("sphere_muon")}, lr=LR)
    with pytest.raises(ValueError, match="qkv_split"):
        SphereMuon([param], {param: ParamLayout("sphere_muon", qkv_split=QKVSplit(1, 4, 4))}, lr=LR)
    with pytest.raises(ValueError, match="unknown rule"):
        ParamLayout("sgd")
    with pytest.raises(ValueError, match="partition_dim"):
        ParamLayout("sphere_muon", partition_dim=2)
    with pytest.raises(ValueError, match="needs partition_dim"):
        ParamLayout("sphere_muon", group=object())
    with pytest.raises(ValueError, match="qkv_split applies"):
        ParamLayout("adamw", qkv_split=QKVSplit(1, 4, 4))
    with pytest.raises(ValueError, match="positive int"):
        QKVSplit(0, 4, 4)
