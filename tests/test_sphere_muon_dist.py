"""SphereMuon and Newton-Schulz on 2 gloo processes against the single-process reference.

TP=2 (gather and distributed Newton-Schulz; column- and row-parallel shards, Megatron's fused QKV,
vocab-parallel output layer, expert-TP experts), the collective count, layer-wise DP=2 and EP=2.
Negative controls: blockwise (per-shard) Newton-Schulz, and each shard retracted to its own norm
(the all-reduce in ``sphere_batched.all_reduce_by_group`` skipped), which keeps the total norm, so only the
parity check sees it. Each worker runs once per module (a spawn costs seconds) and returns numbers;
the tests assert on them.
"""

import contextlib
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from mutants import mutated
from test_sphere_muon import (
    NUM_EXPERTS,
    full_weights,
    local_tensors,
    make_optimizer,
    reference_weights,
    relative_errors,
    run_steps,
    shard,
)

from hyperp_megatron.optim.newton_schulz import newton_schulz5, orthogonalize

pytestmark = pytest.mark.tier("parallel")

WORLD_SIZE = 2
NUM_STEPS = 5
TOLERANCE = 1e-6  # relative Frobenius error vs the reference; measured <= 2.6e-7 (bench/results/parity.json)


@contextlib.contextmanager
def count_collectives():
    """Count torch.distributed.all_reduce / all_gather calls made inside the block."""
    counts = {"all_reduce": 0, "all_gather": 0}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    with mock.patch.object(dist, "all_reduce", counting("all_reduce", dist.all_reduce)), \
            mock.patch.object(dist, "all_gather", counting("all_gather", dist.all_gather)):
        yield counts


def _raw_newton_schulz_errors(rank: int, world_size: int, group) -> dict[str, float]:
    """Sharded NS of a batch of 3 matrices vs the shard of the whole-matrix NS (max abs error)."""
    torch.manual_seed(0)  # the same full matrices on every rank
    errors = {}
    cases = {"col_parallel": ((3, 64, 32), 0), "row_parallel": ((3, 32, 64), 1), "short_side": ((3, 48, 32), 1)}
    for case, (shape, partition_dim) in cases.items():
        full = torch.randn(shape)
        expected = shard(newton_schulz5(full), partition_dim + 1, rank, world_size)
        local = shard(full, partition_dim + 1, rank, world_size)
        for mode in ("gather", "distributed", "blockwise"):
            try:
                result = orthogonalize(local, group=group, partition_dim=partition_dim, mode=mode)
            except ValueError:
                errors[f"{case}/{mode}"] = "ValueError"
                continue
            errors[f"{case}/{mode}"] = (result - expected).abs().max().item()
    return errors


def _sphere_norm_drift(params: dict, full: dict, group) -> float:
    """Largest relative change of a whole sharded matrix's Frobenius norm (squares summed over ranks)."""
    drifts = []
    for name in ("proj", "fc1", "fc2", "output"):
        square = params[name].detach().double().square().sum()
        dist.all_reduce(square, group=group)
        drifts.append(abs(square.sqrt().item() / full[name].double().norm().item() - 1))
    return max(drifts)


def tensor_parallel_worker(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    tp_group = dist.new_group(list(range(world_size)))
    expert_tp_group = dist.new_group(list(range(world_size)))  # a distinct group, as in Megatron
    full = full_weights()
    expected = local_tensors(reference_weights(NUM_STEPS), rank, world_size)
    results = {"raw_ns": _raw_newton_schulz_errors(rank, world_size, tp_group)}
    for mode in ("gather", "distributed", "blockwise"):
        local = local_tensors(full, rank, world_size)
        params, optimizer = make_optimizer(local, world_size, tp_group, expert_tp_group, ns_mode=mode)
        with count_collectives() as counts:
            run_steps(params, optimizer, 0, NUM_STEPS, rank, world_size)
        results[mode] = {
            "errors": relative_errors({name: p.detach() for name, p in params.items()}, expected),
            "all_reduce_per_step": counts["all_reduce"] / NUM_STEPS,
            "all_gather_per_step": counts["all_gather"] / NUM_STEPS,
        }
    with mutated("sphere_radius_per_shard"):
        local = local_tensors(full, rank, world_size)
        params, optimizer = make_optimizer(local, world_size, tp_group, expert_tp_group)
        run_steps(params, optimizer, 0, NUM_STEPS, rank, world_size)
    results["radius_per_shard"] = {
        "errors": relative_errors({name: p.detach() for name, p in params.items()}, expected),
        "norm_drift": _sphere_norm_drift(params, full, tp_group),
    }
    # Only matrices sharded over one group: still one all-reduce per step, whatever their number.
    dense = {name: t for name, t in local_tensors(full, rank, world_size).items() if not name.startswith("expert")}
    params, optimizer = make_optimizer(dense, world_size, tp_group, expert_tp_group)
    with count_collectives() as counts:
        run_steps(params, optimizer, 0, 2, rank, world_size)
    results["dense_only_all_reduce_per_step"] = counts["all_reduce"] / 2
    return results


def data_and_expert_parallel_worker(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    full = full_weights()
    reference = reference_weights(NUM_STEPS)
    results = {}

    # Layer-wise DP: replicas get the same (DP-reduced) gradients; each updates its own matrices.
    dp_group = dist.new_group(list(range(world_size)))
    params, optimizer = make_optimizer(
        local_tensors(full), layer_wise_dp_group=dp_group, layer_wise_expert_dp_group=dp_group
    )
    run_steps(params, optimizer, 0, NUM_STEPS)
    results["layer_wise_errors"] = relative_errors({n: p.detach() for n, p in params.items()}, local_tensors(reference))
    results["layer_wise_updated_here"] = sorted(n for n, p in params.items() if optimizer.state[p])
    results["layer_wise_params"] = torch.cat([p.detach().reshape(-1) for p in params.values()])

    # EP=2: this rank holds half of the experts, whole; no communication at all.
    experts_per_rank = NUM_EXPERTS // world_size
    names = [f"expert{i}.fc1" for i in range(rank * experts_per_rank, (rank + 1) * experts_per_rank)]
    params, optimizer = make_optimizer({name: full[name] for name in names})
    with count_collectives() as counts:
        run_steps(params, optimizer, 0, NUM_STEPS)
    results["expert_parallel_errors"] = relative_errors(
        {n: p.detach() for n, p in params.items()}, {n: reference[n] for n in names}
    )
    results["expert_parallel_collectives"] = counts
    return results


@pytest.fixture(scope="module")
def tensor_parallel_results():
    return run_distributed(tensor_parallel_worker, WORLD_SIZE)


@pytest.fixture(scope="module")
def data_and_expert_parallel_results():
    return run_distributed(data_and_expert_parallel_worker, WORLD_SIZE)


@pytest.mark.parametrize("mode", ["gather", "distributed"])
def test_tp2_matches_single_process_reference(tensor_parallel_results, mode, measured):
    for rank, rank_results in enumerate(tensor_parallel_results):
        errors = rank_results[mode]["errors"]
        assert set(errors) == set(local_tensors(full_weights()))  # qkv, proj, fc1, ..., output
        measured("parity/sphere_muon_raw_shards", f"tp2_{mode}_rank{rank}", max(errors.values()))
        assert max(errors.values()) < TOLERANCE, errors


def test_control_sphere_radius_per_shard_is_caught(tensor_parallel_results, measured):
    """Negative control: without the all-reduce of the shards' squared norms each TP shard is pulled back
    to its own norm. The whole matrix keeps its norm (so a norm check passes), the parity check fails."""
    for rank, rank_results in enumerate(tensor_parallel_results):
        errors, drift = rank_results["radius_per_shard"]["errors"], rank_results["radius_per_shard"]["norm_drift"]
        measured("controls", f"sphere_radius_per_shard/raw_shards_rank{rank}",
                 {"max_error": max(errors.values()), "whole_matrix_norm_drift": drift})
        assert drift < 1e-6, drift  # what a sphere-norm test sees: nothing
        for name in ("qkv", "proj", "fc1", "fc2", "output", "expert0.fc1"):  # sharded spheres
            assert errors[name] > 100 * TOLERANCE, (name, errors[name])
        for name in ("router", "baseline", "embedding", "norm"):  # unsharded, or no sphere
            assert errors[name] < TOLERANCE, (name, errors[name])


def test_control_blockwise_newton_schulz_is_caught(tensor_parallel_results, measured):
    """Negative control: the same harness sees per-shard NS as a clear error."""
    for rank, rank_results in enumerate(tensor_parallel_results):
        errors = rank_results["blockwise"]["errors"]
        measured("controls", f"newton_schulz_per_shard/raw_shards_rank{rank}", max(errors.values()))
        for name in ("qkv", "proj", "fc1", "fc2", "expert0.fc1", "baseline"):
            assert errors[name] > 1e4 * TOLERANCE, (name, errors[name])
        for name in ("router", "output", "embedding", "norm"):  # no sharded Newton-Schulz involved
            assert errors[name] < TOLERANCE, (name, errors[name])


def test_one_all_reduce_of_norms_per_group_per_step(tensor_parallel_results):
    for rank_results in tensor_parallel_results:
        # 11 sharded sphere matrices (Q, K, V, proj, fc1, fc2, output, 4 experts) over 2 groups (TP,
        # expert-TP): one fused all-reduce each; the unsharded router needs none.
        assert rank_results["gather"]["all_reduce_per_step"] == 2
        assert rank_results["blockwise"]["all_reduce_per_step"] == 2
        assert rank_results["dense_only_all_reduce_per_step"] == 1
        # distributed NS: + (1 norm + 5 Gram) all-reduces for each of proj, fc1, fc2, baseline; the
        # fused QKV (K is sharded along its short side) and the experts fall back to gather.
        assert rank_results["distributed"]["all_reduce_per_step"] == 2 + 6 * 4
        # gather NS: Q, K+V batched, proj, fc1, fc2, the 4 experts batched, baseline.
        assert rank_results["gather"]["all_gather_per_step"] == 7
        assert rank_results["distributed"]["all_gather_per_step"] == 3


def test_raw_newton_schulz_modes_on_shards(tensor_parallel_results):
    for rank_results in tensor_parallel_results:
        errors = rank_results["raw_ns"]
        for case in ("col_parallel", "row_parallel", "short_side"):
            assert errors[f"{case}/gather"] < 1e-5, errors
            assert errors[f"{case}/blockwise"] > 1e-2, errors
        assert errors["col_parallel/distributed"] < 1e-5, errors
        assert errors["row_parallel/distributed"] < 1e-5, errors
        assert errors["short_side/distributed"] == "ValueError"


def test_layer_wise_dp2_matches_reference_and_replicas_agree(data_and_expert_parallel_results, measured):
    rank0, rank1 = data_and_expert_parallel_results
    for rank, rank_results in enumerate((rank0, rank1)):
        measured("parity/sphere_muon_raw_shards", f"dp2_layer_wise_rank{rank}",
                 max(rank_results["layer_wise_errors"].values()))
        assert max(rank_results["layer_wise_errors"].values()) < TOLERANCE, rank_results["layer_wise_errors"]
    assert torch.equal(rank0["layer_wise_params"], rank1["layer_wise_params"])
    updated0, updated1 = set(rank0["layer_wise_updated_here"]), set(rank1["layer_wise_updated_here"])
    assert updated0 and updated1 and not updated0 & updated1  # state lives on one DP rank only
    assert updated0 | updated1 == set(local_tensors(full_weights()))


def test_expert_parallel_2_equals_ep1(data_and_expert_parallel_results, measured):
    for rank, rank_results in enumerate(data_and_expert_parallel_results):
        errors = rank_results["expert_parallel_errors"]
        measured("parity/sphere_muon_raw_shards", f"ep2_rank{rank}", max(errors.values()))
        assert len(errors) == NUM_EXPERTS // WORLD_SIZE
        assert max(errors.values()) < TOLERANCE, errors
        assert rank_results["expert_parallel_collectives"] == {"all_reduce": 0, "all_gather": 0}

