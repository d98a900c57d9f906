"""Sphere Muon in the real trainer (Megatron GPTModel, Megatron wrappers, dist checkpoints) on gloo.

- TP=2 (gather and distributed Newton-Schulz, fused QKV), PP=2, DP=2 layer-wise and TP=2 x DP=2
  reproduce the single-process losses; EP=2 (layer-wise) reproduces EP=1;
- after training every sphere matrix (each Q/K/V piece, each expert, router, gate, output layer)
  still has its initial Frobenius norm, all-reduced over its shard group;
- every parameter lands in exactly one group and an unknown parameter raises;
- checkpoints resume bit-exactly in the same layout (fp32 at TP=2, bf16 with master weights) and
  give the uninterrupted run's next losses after TP 2 -> 1 and after layer-wise DP 2 -> 1;
- the Muon baseline builds and trains.

Each spawned worker runs several short trainings in one process group (a spawn costs ~10 s of imports).
"""

import math
from unittest import mock

import pytest

from _dist import run_distributed
from trainer_utils import TINY, merge, train_worker

STEPS = 5
SAVE_AT = 3
SPHERE = {"optim": {"name": "sphere_muon", "lr": 0.05}, "train": {"steps": STEPS}}
MOE = {"moe": {"sparsity": 2, "granularity": 2, "shared_expert": True}, "gated_attention": True}
MOE_EP = {"moe": {"sparsity": 2, "granularity": 2}}  # 4 routed experts: 2 per EP rank
PARITY_RTOL = 1e-5


def _run(overrides: dict, **sections) -> dict:
    return merge(SPHERE, {**overrides, **sections})


def _saving(run_dir) -> dict:
    return {"logging": {"run_dir": str(run_dir)},
            "checkpoint": {"interval": SAVE_AT, "save_final": False, "keep": 0}}


def _loading(run_dir, checkpoint) -> dict:
    return {"logging": {"run_dir": str(run_dir)}, "checkpoint": {"load": str(checkpoint)}}


def _checkpoint(run_dir):
    return run_dir / "checkpoints" / f"step_{SAVE_AT:06d}"


# ---------------------------------------------------------------------- workers


def _sphere_norms(optimizer) -> dict[str, list[float]]:
    """Per-piece Frobenius norms of every sphere parameter, all-reduced over its shard group."""
    import torch
    import torch.distributed as dist

    norms = {}
    for index, wrapped in enumerate(optimizer.chained_optimizers):
        sphere = wrapped.optimizer
        for group in sphere.param_groups:
            for position, param in enumerate(group["params"]):
                layout = sphere.layout(param)
                if layout.rule not in ("sphere_muon", "sphere_adam"):
                    continue
                weight = param.detach().float()
                split = layout.qkv_split
                pieces = weight.view(split.num_local_query_groups, -1, weight.size(-1)).split(
                    split.piece_rows, dim=1) if split else [weight]
                squares = torch.stack([piece.square().sum() for piece in pieces]).double()
                if layout.group is not None and layout.group.size() > 1:
                    dist.all_reduce(squares, group=layout.group)  # the group sharding this matrix
                norms[f"{index}.{group['rule']}.{position}"] = squares.sqrt().tolist()
    return norms


def _norm_run(rank: int, world_size: int, overrides: dict) -> dict:
    """Train a few steps through the trainer's session; sphere norms before and after, and radii."""
    from hyperp_megatron import train as trainer
    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import load_config, validate

    apply_cpu_patches()
    cfg = load_config(None, merge(TINY, overrides))
    validate(cfg, world_size)
    try:
        s = trainer.setup(cfg, world_size, rank)
        iterator = trainer._train_iterator(s, consumed_samples=0)
        initial = _sphere_norms(s.optimizer)
        losses = []
        for _ in range(cfg.train.steps):
            for group in s.optimizer.param_groups:
                group["lr"] = cfg.optim.lr
            losses.append(s.runner.train_step(iterator)["loss"])
        return {"initial": initial, "final": _sphere_norms(s.optimizer), "losses": losses}
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def _blockwise_sphere_muon(*args, **kwargs):
    from hyperp_megatron.optim.sphere_muon import SphereMuon

    return SphereMuon(*args, **{**kwargs, "ns_mode": "blockwise"})


def two_process_worker(rank: int, world_size: int, tmp_path) -> dict:
    from hyperp_megatron.optim import sphere_builder

    moe_model = {"model": MOE_EP}
    runs = {
        "tp2_gather": _run({"parallel": {"tensor": 2}}, **_saving(tmp_path / "tp2")),
        "tp2_distributed": _run({"parallel": {"tensor": 2}, "optim": {"name": "sphere_muon", "lr": 0.05,
                                                                      "ns_mode": "distributed"}}),
        "pp2": _run({"parallel": {"pipeline": 2}}),
        "dp2_layer_wise": _run({"parallel": {"distributed_optimizer": True}}, **_saving(tmp_path / "dp2")),
        "ep1_dp2_moe": _run(moe_model),
        "ep2_layer_wise_moe": _run(moe_model, parallel={"expert": 2, "distributed_optimizer": True}),
    }
    results = {name: train_worker(rank, world_size, overrides)["losses"] for name, overrides in runs.items()}
    with mock.patch.object(sphere_builder, "SphereMuon", _blockwise_sphere_muon):
        results["tp2_blockwise"] = train_worker(rank, world_size, _run({"parallel": {"tensor": 2}}))["losses"]
    results["tp2_resumed"] = train_worker(rank, world_size, _run(
        {"parallel": {"tensor": 2}}, **_loading(tmp_path / "tp2_resumed", _checkpoint(tmp_path / "tp2"))))["losses"]
    # MoE (routed experts with expert-TP, shared expert, router) and per-head gates, QKV under TP=2 + SP.
    results["norms"] = _norm_run(rank, world_size, _run(
        {"model": MOE, "parallel": {"tensor": 2, "sequence_parallel": True}},
        optim={"name": "sphere_muon", "lr": 0.2, "ns_mode": "distributed"}))
    return results


def _group_checks() -> dict:
    """Build the MoE + gated model and its optimizer in this process: role and group bookkeeping."""
    import torch

    from hyperp_megatron.config import load_config
    from hyperp_megatron.model.gpt import build_model
    from hyperp_megatron.optim.param_groups import assign_parameters, layout_for
    from hyperp_megatron.optim.sphere_builder import build_sphere_optimizer
    from hyperp_megatron.parallel import init_model_parallel

    cfg = load_config(None, merge(TINY, {"model": MOE, "optim": {"name": "sphere_muon"}}))
    pg_collection = init_model_parallel(cfg.parallel, cfg.train.seed)
    try:
        chunks = build_model(cfg, pg_collection, 256)
        optimizer = build_sphere_optimizer(cfg, chunks, pg_collection)
        in_groups = [id(p) for wrapped in optimizer.chained_optimizers for g in wrapped.optimizer.param_groups
                     for p in g["params"]]
        rules = {a.name: a.rule for a in assign_parameters(chunks, "sphere_muon", pg_collection)}
        for group in optimizer.param_groups:  # as the trainer sets the schedule's LR
            group["lr"] = 0.123
        inner_lrs = {g["lr"] for wrapped in optimizer.chained_optimizers for g in wrapped.optimizer.param_groups}
        try:
            layout_for("decoder.layers.0.mlp.mystery.weight", torch.zeros(2, 2), optimizer_name="sphere_muon",
                       config=chunks[0].config, pg_collection=pg_collection)
            unknown_error = None
        except ValueError as error:
            unknown_error = str(error)
        return {"num_params": len(list(chunks[0].parameters())), "in_groups": len(in_groups),
                "distinct_in_groups": len(set(in_groups)),
                "all_covered": set(in_groups) == {id(p) for p in chunks[0].parameters()},
                "num_chained": len(optimizer.chained_optimizers), "rules": rules, "unknown_error": unknown_error,
                "inner_lrs": inner_lrs}
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def one_process_worker(rank: int, world_size: int, tmp_path) -> dict:
    from hyperp_megatron.compat import apply_cpu_patches

    apply_cpu_patches()
    results = {"groups": _group_checks()}
    results["reference"] = train_worker(rank, world_size, SPHERE)["losses"]
    results["muon"] = train_worker(rank, world_size, _run({"optim": {"name": "muon", "lr": 0.02}}))["losses"]
    for name, saved in (("tp1_from_tp2", "tp2"), ("dp1_from_dp2_layer_wise", "dp2")):
        resumed = _run({}, **_loading(tmp_path / name, _checkpoint(tmp_path / saved)))
        results[name] = train_worker(rank, world_size, resumed)["losses"]
    bf16 = {"train": {"precision": "bf16"}}  # Float16 wrapper: fp32 master weights in the checkpoint
    results["bf16"] = train_worker(rank, world_size, _run(bf16, **_saving(tmp_path / "bf16")))["losses"]
    results["bf16_resumed"] = train_worker(rank, world_size, _run(
        bf16, **_loading(tmp_path / "bf16_resumed", _checkpoint(tmp_path / "bf16"))))["losses"]
    return results


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def two(embedded_corpus, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sphere_trainer")
    results = run_distributed(two_process_worker, 2, tmp_path)
    assert results[0] == results[1]  # every rank reports the same losses and all-reduced norms
    return results[0], tmp_path


@pytest.fixture(scope="module")
def single(two):
    _, tmp_path = two
    (result,) = run_distributed(one_process_worker, 1, tmp_path)
    return result


def _close(actual, expected, rtol=PARITY_RTOL):
    assert len(actual) == len(expected), (actual, expected)
    for a, e in zip(actual, expected):
        assert math.isclose(a, e, rel_tol=rtol), f"{actual} vs {expected}"


# ---------------------------------------------------------------------- tests


def test_reference_learns(single):
    losses = single["reference"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("layout", ["tp2_gather", "tp2_distributed", "pp2", "dp2_layer_wise"])
def test_layout_matches_single_process(two, single, layout):
    _close(two[0][layout], single["reference"])


def test_blockwise_newton_schulz_is_caught(two, single):
    """Negative control: per-shard (blockwise) Newton-Schulz at TP=2 is not TP-invariant, and the
    parity check above sees it."""
    blockwise, reference = two[0]["tp2_blockwise"], single["reference"]
    assert max(abs(b - r) / r for b, r in zip(blockwise, reference)) > 10 * PARITY_RTOL, (blockwise, reference)


def test_tp2_x_dp2_matches_single_process(single, embedded_corpus):
    results = run_distributed(train_worker, 4, _run({"parallel": {"tensor": 2, "distributed_optimizer": True}}))
    for result in results:
        _close(result["losses"], single["reference"])


def test_expert_parallel_layer_wise_matches_ep1(two):
    _close(two[0]["ep2_layer_wise_moe"], two[0]["ep1_dp2_moe"])


def test_sphere_matrices_keep_their_initial_norm(two):
    norms = two[0]["norms"]
    assert norms["losses"][-1] < norms["losses"][0]  # the weights did move
    initial, final = norms["initial"], norms["final"]
    # qkv (3 pieces x 2 layers), proj, gate, router, shared fc1/fc2, output; experts: 3 x 2 x 2
    assert len(initial) == 2 * 6 + 1 + 12, sorted(initial)
    assert sum(len(pieces) == 3 for pieces in initial.values()) == 2  # the fused QKVs
    for name, pieces in initial.items():
        for before, after in zip(pieces, final[name]):
            assert math.isclose(after, before, rel_tol=1e-6), (name, before, after)


def test_every_parameter_in_exactly_one_group(single):
    groups = single["groups"]
    assert groups["in_groups"] == groups["distinct_in_groups"] == groups["num_params"]
    assert groups["all_covered"] and groups["num_chained"] == 2  # dense + routed experts
    assert groups["inner_lrs"] == {0.123}  # the trainer's LR reaches every SphereMuon group
    rules = groups["rules"]
    expected = {
        "decoder.layers.0.self_attention.linear_qkv.weight": "sphere_muon",
        "decoder.layers.0.self_attention.linear_gate.weight": "sphere_muon",
        "decoder.layers.0.mlp.router.weight": "sphere_muon",
        "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight": "sphere_muon",
        "decoder.layers.0.mlp.shared_experts.linear_fc1.weight": "sphere_muon",
        "decoder.layers.1.self_attention.k_layernorm.weight": "adamw",
        "decoder.final_layernorm.weight": "adamw",
        "embedding.word_embeddings.weight": "adamw",
        "output_layer.weight": "sphere_adam",
    }
    assert {name: rules[name] for name in expected} == expected


def test_unknown_parameter_raises(single):
    assert "mystery" in (single["groups"]["unknown_error"] or "")


def test_resume_same_layout_is_bit_exact(two, single):
    assert two[0]["tp2_resumed"] == two[0]["tp2_gather"][SAVE_AT:]
    assert single["bf16_resumed"] == single["bf16"][SAVE_AT:]  # bf16 params, fp32 masters and state


@pytest.mark.parametrize("resumed, saved", [("tp1_from_tp2", "tp2_gather"),
                                            ("dp1_from_dp2_layer_wise", "dp2_layer_wise")])
def test_resume_in_another_layout(two, single, resumed, saved):
    _close(single[resumed], two[0][saved][SAVE_AT:], rtol=1e-6)


def test_muon_baseline_trains(single):
    losses = single["muon"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.05, losses
