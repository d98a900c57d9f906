"""The trainer (AdamW) reproduces the single-process run under TP=2, PP=2, DP=2, TP=2 + sequence parallel
and Megatron's DistributedOptimizer, from the same state (as test_sphere_trainer.py's ``check_layout``):
from the same initial weights the losses of steps 1-2 and the weights after step 1, from the layout's step-2
checkpoint the losses of steps 3-4 and every final weight (gathered); a checkpoint saved at TP=2 resumes
at TP=1 and at PP=2 with the uninterrupted run's losses and weights.

Controls: sequence parallelism with the norm gains' gradients left unreduced over TP (their TP copies
drift apart), and a TP 2 -> 1 load without the optimizer state.

AdamW reproduces layouts less closely than sphere Muon's matrices: every entry moves by ~lr g / (|g| +
eps) whatever the size of its gradient, so entries whose gradient is within rounding of zero take
visibly different steps (see ``trainer_utils.parity``); the bounds below sit a small margin above the
measured values (``python bench/parity.py`` -> ``bench/results/parity.json``). Along two free 4-step
trajectories that rounding grows step after step (issue 21): TP=2's final weights were 2.3e-3 (of a 5e-3
bound) with AVX2 kernels, 1.2e-4 with AVX-512 ones; from the same state 1.0e-6 .. 6.5e-6.
"""

import contextlib
import math

import pytest

from _dist import run_distributed
from mutants import mutated
from trainer_utils import parity, train_worker

pytestmark = pytest.mark.tier("parallel")

STEPS = 4
SAVE_AT = 2
LAYOUTS = {
    "tp2": {"tensor": 2},
    "pp2": {"pipeline": 2},
    "dp2": {},  # data parallel 2
    "tp2_sp": {"tensor": 2, "sequence_parallel": True},
    "dp2_distopt": {"distributed_optimizer": True},  # Megatron's DistributedOptimizer (AdamW state over DP)
}
# Megatron's DistributedOptimizer checkpoint loads at another DP size but only into a DistributedOptimizer (its
# dp_reshardable format, hyperp_megatron.checkpoint._optimizer_metadata): the single process loads it with one.
SINGLE_LOADER = {"dp2_distopt": {"distributed_optimizer": True}}
UNSAVED = ()
LOSS_RTOL = 1e-6  # measured <= 1.1e-7 (TP=2; 1.7e-7 with Megatron's attention)
STEP1_ADAM_FRO_RTOL = 5e-4  # 1.7e-4 (TP=2)
FINAL_ADAM_FRO_RTOL = 5e-3  # 6.5e-6 (TP=2, from the step-2 checkpoint); controls >= 0.15


def _run(parallel: dict, **sections) -> dict:
    return {"parallel": parallel, "train": {"steps": STEPS}, **sections}


def _saving(run_dir) -> dict:
    return {"logging": {"run_dir": str(run_dir)}, "checkpoint": {"interval": SAVE_AT, "save_final": False, "keep": 0}}


def _loading(run_dir, saved_dir) -> dict:
    checkpoint = saved_dir / "checkpoints" / f"step_{SAVE_AT:06d}"
    return {"logging": {"run_dir": str(run_dir)}, "checkpoint": {"load": str(checkpoint)}}


def _trained(rank: int, world_size: int, overrides: dict, mutation: str | None = None) -> dict:
    with mutated(mutation) if mutation else contextlib.nullcontext():
        result = train_worker(rank, world_size, overrides, weights=True)
    return {key: result[key] for key in ("losses", "weights", "weights_step1", "replica_spread")}


def two_process_worker(rank: int, world_size: int, tmp_path) -> dict:
    results = {}
    for name, layout in LAYOUTS.items():
        saving = {} if name in UNSAVED else _saving(tmp_path / f"saved_{name}")
        results[name] = _trained(rank, world_size, _run(layout, **saving))
    results["tp2_sp_norm_grads_not_reduced"] = _trained(rank, world_size, _run(LAYOUTS["tp2_sp"]),
                                                        "sequence_parallel_norm_grads_not_reduced")
    results["pp2_from_tp2"] = _trained(rank, world_size, _run({"pipeline": 2}, **_loading(tmp_path / "pp2",
                                                                                          tmp_path / "saved_tp2")))
    return results


def one_process_worker(rank: int, world_size: int, tmp_path) -> dict:
    results = {"reference": _trained(rank, world_size, _run({}))}
    for name in set(LAYOUTS) - set(UNSAVED):  # the single process from each layout's step-SAVE_AT checkpoint
        results[f"from_{name}"] = _trained(rank, world_size, _run(SINGLE_LOADER.get(name, {}), **_loading(tmp_path / f"from_{name}",
                                                                                 tmp_path / f"saved_{name}")))
    results["tp1_from_tp2"] = results["from_tp2"]
    results["tp1_from_tp2_without_optimizer_state"] = _trained(
        rank, world_size, _run({}, **_loading(tmp_path / "mutant", tmp_path / "saved_tp2")),
        "reshard_without_optimizer_state")
    return results


@pytest.fixture(scope="module")
def two(embedded_corpus, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trunk")
    results = run_distributed(two_process_worker, 2, tmp_path)
    for name, run in results[0].items():  # every rank knows the same losses
        assert run["losses"] == results[1][name]["losses"], name
    return results[0], tmp_path


@pytest.fixture(scope="module")
def single(two):
    (result,) = run_distributed(one_process_worker, 1, two[1])
    return result


def _resumed_reference(uninterrupted: dict) -> dict:
    return {"losses": uninterrupted["losses"][SAVE_AT:], "weights": uninterrupted["weights"]}


def check_parity(measured, name: str, run: dict, reference: dict) -> dict:
    errors = parity(run, reference, "adamw")
    measured("parity/adamw_trainer", name, errors)
    assert errors["replica_spread"] == 0.0, errors
    assert errors["loss_rel"] <= LOSS_RTOL, (errors, run["losses"], reference["losses"])
    if "step1" in errors:
        assert errors["step1"]["adam_fro_rel"] <= STEP1_ADAM_FRO_RTOL, errors
    assert errors["final"]["adam_fro_rel"] <= FINAL_ADAM_FRO_RTOL, errors
    return errors


def test_reference_learns(single):
    losses = single["reference"]["losses"]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses


def check_layout(measured, name: str, run: dict, reference: dict, resumed: dict) -> dict:
    """``run`` reproduces the single-process run from the same state: ``free`` from the same initial weights
    (losses of steps 1..SAVE_AT, weights after step 1), ``forced`` from the layout's step-SAVE_AT checkpoint
    (``resumed``: the later losses and the final weights)."""
    free = parity({**run, "losses": run["losses"][:SAVE_AT]}, {**reference, "losses": reference["losses"][:SAVE_AT]},
                  "adamw")
    errors = {"free": {"loss_rel": free["loss_rel"], "step1": free["step1"]},
              "forced": parity(resumed, _resumed_reference(run), "adamw"), "replica_spread": run["replica_spread"]}
    measured("parity/adamw_trainer", name, errors)
    assert errors["replica_spread"] == 0.0, errors
    assert free["loss_rel"] <= LOSS_RTOL, (errors, run["losses"], reference["losses"])
    assert free["step1"]["adam_fro_rel"] <= STEP1_ADAM_FRO_RTOL, errors
    assert errors["forced"]["loss_rel"] <= LOSS_RTOL, (errors, run["losses"], resumed["losses"])
    assert errors["forced"]["final"]["adam_fro_rel"] <= FINAL_ADAM_FRO_RTOL, errors
    return errors


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(two, single, layout, measured):
    if layout in UNSAVED:
        check_parity(measured, layout, two[0][layout], single["reference"])
    else:
        check_layout(measured, layout, two[0][layout], single["reference"], single[f"from_{layout}"])


def test_control_sequence_parallel_norm_grads_not_reduced_is_caught(two, single, measured):
    """Negative control: under TP=2 + SP each rank's norm gains see only its half of the sequence unless
    their gradients are summed over TP; the two copies of every norm gain then drift apart."""
    mutant = two[0]["tp2_sp_norm_grads_not_reduced"]
    with pytest.raises(AssertionError):
        check_parity(lambda *args: None, "control", mutant, single["reference"])
    errors = parity(mutant, single["reference"], "adamw")
    measured("controls", "sequence_parallel_norm_grads_not_reduced/adamw_tp2_sp", errors)
    assert errors["replica_spread"] > 1e-3 and errors["final"]["adam_fro_rel"] > 10 * FINAL_ADAM_FRO_RTOL, errors


@pytest.mark.parametrize("resumed", ["tp1_from_tp2", "pp2_from_tp2"])
def test_checkpoint_reshard_tp2_to_tp1_and_pp2(two, single, resumed, measured):
    run = single[resumed] if resumed in single else two[0][resumed]
    check_parity(measured, f"resume_{resumed}", run, _resumed_reference(two[0]["tp2"]))


def test_control_reshard_without_optimizer_state_is_caught(two, single, measured):
    """Negative control: the TP 2 -> 1 load restores the weights but not AdamW's moments."""
    mutant, reference = single["tp1_from_tp2_without_optimizer_state"], _resumed_reference(two[0]["tp2"])
    with pytest.raises(AssertionError):
        check_parity(lambda *args: None, "control", mutant, reference)
    errors = parity(mutant, reference, "adamw")
    measured("controls", "reshard_without_optimizer_state/adamw_tp2_to_tp1", errors)
    assert errors["final"]["adam_fro_rel"] > 10 * FINAL_ADAM_FRO_RTOL, errors
