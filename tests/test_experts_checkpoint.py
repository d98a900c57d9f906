"""Checkpoints move between the two routed-experts modules without Transformer Engine (``model/experts.py``):
the torch grouped-GEMM experts (``model.moe.grouped_gemm: true``, or ``auto`` on a GPU without TE) and Megatron's
SequentialMLP (``SequentialExperts``: ``false``, ``auto`` on the CPU, and what ``hyperp-convert export`` builds).

One process, test_moe.py's MoE model (8 routed experts, top-2, a shared expert, sphere Muon), checkpoints at step
2 of 4:

- a grouped-experts checkpoint resumes with SequentialMLP experts, and a SequentialMLP checkpoint in the format
  saved before the fix (with the experts' empty ``_extra_state`` objects) resumes with the grouped experts and
  with SequentialMLP: steps 3-4 reproduce the uninterrupted run's losses and final weights;
- the same at EP = 2 (two processes, 4 experts each), both directions;
- ``hyperp-convert export`` reads the grouped-experts checkpoint (the same tensors as the SequentialMLP run's);
- controls: the experts loaded permuted diverge; SequentialExperts as before the fix (asking for the
  ``_extra_state`` objects) fails to load the grouped checkpoint with the reported missing key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _dist import run_distributed
from test_moe import FINAL_MATRIX_RTOL, LOSS_RTOL, moe_overrides, moe_worker
from trainer_utils import merge, parity

pytestmark = pytest.mark.tier("parallel")

SAVE_AT = 2
OLD_FORMAT = "sequential_experts_save_empty_extra_state"  # tests/mutants.py: SequentialExperts before the fix


def _kind(grouped: bool, expert_parallel: int = 1) -> dict:
    return moe_overrides(8 // expert_parallel, {"expert": expert_parallel} if expert_parallel > 1 else None,
                         grouped_gemm="true" if grouped else "false")


def _checkpoint(root: Path, name: str) -> Path:
    return root / name / "checkpoints" / f"step_{SAVE_AT:06d}"


def _saving(root: Path, name: str, grouped: bool, expert_parallel: int = 1) -> dict:
    return merge(_kind(grouped, expert_parallel), {"logging": {"run_dir": str(root / name)},
                                  "checkpoint": {"interval": SAVE_AT, "keep": 0}})


def _loading(root: Path, name: str, grouped: bool, source: str, expert_parallel: int = 1) -> dict:
    return merge(_kind(grouped, expert_parallel), {"logging": {"run_dir": str(root / name)},
                                  "checkpoint": {"load": str(_checkpoint(root, source))}})


def worker(rank: int, world_size: int, root: str) -> dict:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    root = Path(root)
    results = moe_worker(rank, world_size, {
        "sequential_old": (_saving(root, "sequential_old", False), OLD_FORMAT),
        "grouped": (_saving(root, "grouped", True), None),
        "sequential_from_grouped": (_loading(root, "sequential_from_grouped", False, "grouped"), None),
        "grouped_from_sequential_old": (_loading(root, "grouped_from_sequential_old", True, "sequential_old"), None),
        "sequential_from_sequential_old": (
            _loading(root, "sequential_from_sequential_old", False, "sequential_old"), None),
        "permuted_sequential_from_grouped": (
            _loading(root, "permuted_sequential_from_grouped", False, "grouped"), "experts_checkpoint_permuted"),
    })
    try:
        moe_worker(rank, world_size, {"unfixed": (_loading(root, "unfixed", False, "grouped"), OLD_FORMAT)})
        results["unfixed_error"] = None
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - the control's load fails; message checked
        results["unfixed_error"] = f"{type(exc).__name__}: {exc}"[:3000]
    return results


def ep2_worker(rank: int, world_size: int, root: str) -> dict:
    """EP = 2 (4 experts per rank): each kind's checkpoint resumed with the other kind."""
    root = Path(root)
    return moe_worker(rank, world_size, {
        "ep2_grouped": (_saving(root, "ep2_grouped", True, 2), None),
        "ep2_sequential": (_saving(root, "ep2_sequential", False, 2), None),
        "ep2_sequential_from_grouped": (_loading(root, "ep2_sequential_from_grouped", False, "ep2_grouped", 2), None),
        "ep2_grouped_from_sequential": (_loading(root, "ep2_grouped_from_sequential", True, "ep2_sequential", 2), None),
    })


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experts_checkpoint")


@pytest.fixture(scope="module")
def runs(embedded_corpus, root):
    (result,) = run_distributed(worker, 1, str(root))
    return result


@pytest.fixture(scope="module")
def ep2_runs(embedded_corpus, root):
    return run_distributed(ep2_worker, 2, str(root))[0]


def _resumed_reference(uninterrupted: dict) -> dict:
    return {"losses": uninterrupted["losses"][SAVE_AT:], "weights": uninterrupted["weights"]}


def check_resumed(runs: dict, measured, resumed: str, saved: str) -> None:
    """``runs[resumed]`` (loaded from ``runs[saved]``'s step-SAVE_AT checkpoint) continues ``runs[saved]``."""
    run = runs[resumed]
    assert len(run["losses"]) == len(runs[saved]["losses"]) - SAVE_AT == 2
    errors = parity(run, _resumed_reference(runs[saved]), "sphere_muon")
    measured("parity/experts_checkpoint", resumed, errors)
    assert errors["loss_rel"] <= LOSS_RTOL, errors
    assert errors["final"]["matrix_max_rel"] <= FINAL_MATRIX_RTOL, errors


@pytest.mark.parametrize("resumed, saved", [("sequential_from_grouped", "grouped"),
                                            ("grouped_from_sequential_old", "sequential_old"),
                                            ("sequential_from_sequential_old", "sequential_old")])
def test_resume_across_expert_kinds_continues_the_run(runs, measured, resumed, saved):
    check_resumed(runs, measured, resumed, saved)


@pytest.mark.parametrize("resumed, saved", [("ep2_sequential_from_grouped", "ep2_grouped"),
                                            ("ep2_grouped_from_sequential", "ep2_sequential")])
def test_resume_across_expert_kinds_at_ep2(ep2_runs, measured, resumed, saved):
    check_resumed(ep2_runs, measured, resumed, saved)


def test_uninterrupted_runs_of_both_kinds_agree(runs, measured):
    errors = parity(runs["grouped"], runs["sequential_old"], "sphere_muon")
    measured("parity/experts_checkpoint", "grouped_vs_sequential", errors)
    assert errors["loss_rel"] <= LOSS_RTOL, errors


def test_control_experts_loaded_permuted_diverge(runs, measured):
    errors = parity(runs["permuted_sequential_from_grouped"], _resumed_reference(runs["grouped"]), "sphere_muon")
    measured("controls", "experts_checkpoint_permuted", errors)
    assert errors["loss_rel"] > 100 * LOSS_RTOL, errors


def test_control_sequential_experts_before_the_fix_miss_the_extra_state(runs):
    error = runs["unfixed_error"]
    assert error is not None and "_extra_state" in error, error


def test_export_reads_a_grouped_experts_checkpoint(runs, root, tmp_path):
    from safetensors.torch import load_file

    from hyperp_megatron.convert.export import export

    for name in ("grouped", "sequential_old"):
        info = export(_checkpoint(root, name), tmp_path / name)
        assert info["step"] == SAVE_AT
    tensors = [{k: v for path in sorted((tmp_path / name).glob("*.safetensors")) for k, v in load_file(path).items()}
               for name in ("grouped", "sequential_old")]
    assert tensors[0].keys() == tensors[1].keys()
    experts = [k for k in tensors[0] if ".experts." in k]
    assert len({k.split(".experts.")[1].split(".")[0] for k in experts}) == 8, experts
    for key, value in tensors[0].items():  # two steps of the same run with either module: rounding apart
        torch.testing.assert_close(value, tensors[1][key], rtol=1e-5, atol=1e-6, msg=key)
