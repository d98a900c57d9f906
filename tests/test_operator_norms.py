"""Operator norms of the monitors (issue 17): against direct computations on the whole matrix, warm-started
power iteration, and TP=2 (row and column shards) equal to one process. The trainer-level records are
compared across layouts in test_monitors.py (test_parallel_records_equal_tp1)."""

import math

import pytest
import torch
import torch.distributed as dist

from _dist import run_distributed

from hyperp_megatron.operator_norms import (
    PowerIterationState,
    ShardedMatrix,
    max_row_norm,
    power_iteration,
    rms_inf_norm,
    rms_rms_norm,
    start_vector,
)


def matrix(shape, seed=0, rank_one_boost=0.0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
    if rank_one_boost:  # a clear top singular value (what trained output layers tend to have)
        u, v = torch.randn(shape[0], 1, generator=generator), torch.randn(1, shape[1], generator=generator)
        w += rank_one_boost * u @ v / (u.norm() * v.norm())
    return w


def test_direct_definitions():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    assert rms_inf_norm(w) == pytest.approx(math.sqrt(2) * 5.0)
    sigma = float(torch.linalg.svdvals(w)[0])
    assert rms_rms_norm(w) == pytest.approx(math.sqrt(2 / 3) * sigma)


@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_power_iteration_converges_to_the_spectral_norm(shape):
    w = matrix(shape, seed=1)
    exact = float(torch.linalg.matrix_norm(w, ord=2))
    sigma, _ = power_iteration([ShardedMatrix(w)], [start_vector(shape[1], "cpu")], 200, None)
    assert float(sigma[0]) == pytest.approx(exact, rel=1e-4)
    assert float(max_row_norm(ShardedMatrix(w))) == pytest.approx(float(w.norm(dim=1).max()), rel=1e-6)


def test_warm_start_tracks_a_slowly_moving_matrix_with_few_iterations():
    state = PowerIterationState(first_call_factor=10)
    w = matrix((64, 24), seed=2, rank_one_boost=3.0)
    errors = []
    for step in range(8):
        w = w + 0.01 * matrix((64, 24), seed=100 + step)  # a small "optimizer step"
        got = state.sigma_max([("w", ShardedMatrix(w))], iterations=2)["w"]
        errors.append(abs(got / float(torch.linalg.matrix_norm(w, ord=2)) - 1))
    assert max(errors) < 1e-3, errors
    cold, _ = power_iteration([ShardedMatrix(w)], [start_vector(24, "cpu")], 2, None)
    assert float(cold[0]) <= float(torch.linalg.matrix_norm(w, ord=2)) * (1 + 1e-6)  # a lower bound


def sharded_worker(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    group = dist.new_group(list(range(world_size)))  # stands for the TP group
    rows_sharded, cols_sharded, whole = matrix((64, 16), 3, 2.0), matrix((16, 48), 4, 2.0), matrix((20, 12), 5, 2.0)
    named = [("vocab_parallel", ShardedMatrix(rows_sharded.chunk(world_size, 0)[rank], group, 0)),
             ("row_parallel", ShardedMatrix(cols_sharded.chunk(world_size, 1)[rank], group, 1)),
             ("replicated", ShardedMatrix(whole))]
    state = PowerIterationState()
    out = {"sigma": [state.sigma_max(named, iterations=3) for _ in range(3)]}
    out["max_row"] = [float(max_row_norm(m)) for _, m in named]
    return out


@pytest.fixture(scope="module")
def tp2_and_tp1():
    return run_distributed(sharded_worker, 2), run_distributed(sharded_worker, 1)[0]


def test_tp2_equals_tp1_and_the_exact_values(tp2_and_tp1):
    ranks, single = tp2_and_tp1
    exact = {"vocab_parallel": matrix((64, 16), 3, 2.0), "row_parallel": matrix((16, 48), 4, 2.0),
             "replicated": matrix((20, 12), 5, 2.0)}
    for result in ranks:
        for got_step, expected_step in zip(result["sigma"], single["sigma"]):
            for name, value in expected_step.items():
                assert got_step[name] == pytest.approx(value, rel=1e-6), name
        assert result["max_row"] == pytest.approx(single["max_row"], rel=1e-6)
    for (name, w), row in zip(exact.items(), single["max_row"]):
        assert row == pytest.approx(float(w.norm(dim=1).max()), rel=1e-6)
        assert single["sigma"][-1][name] == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-3)
