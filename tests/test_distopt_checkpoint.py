"""Megatron's DistributedOptimizer (AdamW with ``parallel.distributed_optimizer``, its state sharded over the
data-parallel ranks) checkpoints and resumes: a DP=2 run saved at step 2 resumes at DP=2 with the
uninterrupted run's losses, and loads into one process with a plain AdamW (the state resharded).

Before the fix every such run crashed in its first save, after training ("ShardedTensor.flattened_range is not
supported": megatron-core's default format for this optimizer cannot be written by its own dist_checkpointing;
``checkpoint._optimizer_metadata`` asks for the ``fully_reshardable`` format).

Control: the same loads without the optimizer state (fresh Adam moments) are caught by the same bounds.
"""

import contextlib

import pytest

from _dist import run_distributed
from mutants import mutated
from trainer_utils import train_worker

pytestmark = pytest.mark.tier("parallel")

STEPS = 4
SAVE_AT = 2
DISTOPT = {"distributed_optimizer": True}
LOSS_RTOL = 1e-6  # the losses of the two steps after the load; measured in the test (see the assertion message)


def _overrides(run_dir, parallel: dict, load=None) -> dict:
    checkpoint = {"interval": SAVE_AT, "keep": 0} if load is None else {"load": str(load)}
    return {"parallel": parallel, "train": {"steps": STEPS}, "logging": {"run_dir": str(run_dir)},
            "checkpoint": checkpoint}


def _losses(rank, world_size, overrides, mutation=None) -> list[float]:
    with mutated(mutation) if mutation else contextlib.nullcontext():
        return train_worker(rank, world_size, overrides)["losses"]


def _saved(tmp_path):
    return tmp_path / "dp2" / "checkpoints" / f"step_{SAVE_AT:06d}"


def two_process_worker(rank, world_size, tmp_path) -> dict:
    distopt = DISTOPT
    return {
        "uninterrupted": _losses(rank, world_size, _overrides(tmp_path / "dp2", distopt)),
        "resumed": _losses(rank, world_size, _overrides(tmp_path / "dp2_resumed", distopt, _saved(tmp_path))),
        "resumed_without_optimizer_state": _losses(
            rank, world_size, _overrides(tmp_path / "dp2_control", distopt, _saved(tmp_path)),
            "reshard_without_optimizer_state"),
    }


def one_process_worker(rank, world_size, tmp_path) -> dict:
    return {
        "resharded": _losses(rank, world_size, _overrides(tmp_path / "dp1", DISTOPT, _saved(tmp_path))),
        "resharded_without_optimizer_state": _losses(
            rank, world_size, _overrides(tmp_path / "dp1_control", DISTOPT, _saved(tmp_path)),
            "reshard_without_optimizer_state"),
    }


@pytest.fixture(scope="module")
def runs(embedded_corpus, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("distopt")
    two = run_distributed(two_process_worker, 2, tmp_path)
    assert two[0] == two[1]  # every rank reports the same losses
    (one,) = run_distributed(one_process_worker, 1, tmp_path)
    return {**two[0], **one}, tmp_path


def _loss_rel(losses, expected) -> float:
    assert len(losses) == len(expected), (losses, expected)
    return max(abs(a - b) / abs(b) for a, b in zip(losses, expected))


def test_distributed_optimizer_saves_a_complete_checkpoint(runs):
    results, tmp_path = runs
    assert len(results["uninterrupted"]) == STEPS
    assert (_saved(tmp_path) / "manifest.json").is_file()
    assert (tmp_path / "dp2" / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:06d}"


@pytest.mark.parametrize("name", ["resumed", "resharded"])
def test_load_continues_the_uninterrupted_losses(runs, name):
    results, _ = runs
    expected = results["uninterrupted"][SAVE_AT:]
    error = _loss_rel(results[name], expected)
    assert error <= LOSS_RTOL, (name, error, results[name], expected)
    control = _loss_rel(results[f"{name}_without_optimizer_state"], expected)
    assert control > 100 * LOSS_RTOL, (name, "control not caught", control)
