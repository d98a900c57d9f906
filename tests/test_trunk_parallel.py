"""The trainer reproduces the single-process run under TP=2, PP=2, DP=2 and TP=2 + sequence parallel,
and checkpoints saved at TP=2 resume at TP=1 and at PP=2 with the uninterrupted run's losses."""

import math

import pytest

from _dist import run_distributed
from trainer_utils import train_worker

pytestmark = pytest.mark.tier("parallel")

STEPS = 4


@pytest.fixture(scope="module")
def reference(embedded_corpus):
    (result,) = run_distributed(train_worker, 1, {"train": {"steps": STEPS}})
    return result


def _close(actual, expected, rtol=2e-4):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert math.isclose(a, e, rel_tol=rtol), f"{actual} vs {expected}"


def test_reference_learns(reference):
    losses = reference["losses"]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("layout", [
    {"tensor": 2},
    {"pipeline": 2},
    {},  # data parallel 2
    {"tensor": 2, "sequence_parallel": True},
    {"distributed_optimizer": True},  # Megatron's DistributedOptimizer (AdamW state sharded over DP)
], ids=["tp2", "pp2", "dp2", "tp2_sp", "dp2_distopt"])
def test_layout_matches_single_process(reference, layout):
    results = run_distributed(train_worker, 2, {"parallel": layout, "train": {"steps": STEPS}})
    for result in results:  # every rank knows the same loss
        _close(result["losses"], reference["losses"])


def test_checkpoint_reshard_tp2_to_tp1_and_pp2(reference, tmp_path):
    saved = tmp_path / "tp2"
    run_distributed(train_worker, 2, {
        "parallel": {"tensor": 2}, "train": {"steps": STEPS},
        "logging": {"run_dir": str(saved)}, "checkpoint": {"interval": 2, "save_final": False, "keep": 0},
    })
    ckpt = saved / "checkpoints" / "step_000002"
    assert (ckpt / "manifest.json").is_file()
    (tp1,) = run_distributed(train_worker, 1, {
        "train": {"steps": STEPS}, "logging": {"run_dir": str(tmp_path / "tp1")},
        "checkpoint": {"load": str(ckpt)},
    })
    _close(tp1["losses"], reference["losses"][2:], rtol=1e-5)
    pp2 = run_distributed(train_worker, 2, {
        "parallel": {"pipeline": 2}, "train": {"steps": STEPS}, "logging": {"run_dir": str(tmp_path / "pp2")},
        "checkpoint": {"load": str(ckpt)},
    })
    _close(pp2[0]["losses"], reference["losses"][2:], rtol=1e-5)
