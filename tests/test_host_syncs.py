"""One host synchronization per training step of the real trainer (DP=2 on gloo, Megatron's DDP with
``overlap_grad_reduce``): loss, gradient norm, non-finite flag, aux loss and the preemption agreement are
read once (``step.agree_on_step``). Counted by ``op_counters.count_host_syncs``: ``.item()``, ``float(t)``,
``bool(t)`` (``_local_scalar_dense`` at the dispatcher) and ``.tolist()``, ``.cpu()``, ``.numpy()``.
Control: the counter sees Megatron's own ``optimizer.step()`` read its norm."""

import pytest

from _dist import run_distributed
from trainer_utils import TINY, merge

pytestmark = pytest.mark.tier("parallel")

RUNS = {
    "sphere_muon": {"optim": {"name": "sphere_muon", "lr": 0.05}},
    "sphere_muon_bf16": {"optim": {"name": "sphere_muon", "lr": 0.05}, "train": {"precision": "bf16"}},
    "adamw_distributed": {"optim": {"name": "adamw"}, "parallel": {"distributed_optimizer": True}},
    "moe": {"optim": {"name": "sphere_muon", "lr": 0.05},
            "model": {"moe": {"sparsity": 2, "granularity": 2, "shared_expert": True}}},
}


def _count_worker(rank: int, world_size: int) -> dict:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from hyperp_megatron import train as trainer
    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import load_config, validate
    from hyperp_megatron.op_counters import count_host_syncs
    from hyperp_megatron.resilience import PreemptionFlag
    from hyperp_megatron.step import global_grad_norm

    apply_cpu_patches()
    results = {}
    for name, overrides in RUNS.items():
        cfg = load_config(None, merge(TINY, overrides))
        validate(cfg, world_size)
        try:
            s = trainer.setup(cfg, world_size, rank)
            iterator = trainer._train_iterator(s, consumed_samples=0)
            flag = PreemptionFlag()  # not installed: rank 1 "gets a signal" before the third step
            s.runner.train_step(iterator, preemption=flag)  # the first step creates the optimizer state
            with count_host_syncs() as records:
                metrics = s.runner.train_step(iterator, preemption=flag)
            if rank == 1:
                flag.signum = 15
            third = s.runner.train_step(iterator, preemption=flag)
            # The step's norm is Megatron's (the same gradients and groups), here on the clipped gradients.
            norms = (global_grad_norm(s.optimizer, s.device).item(), s.optimizer.get_grad_norm())
            steps = [state["step"] for leaf in _leaves(s.optimizer) for state in leaf.optimizer.state.values()
                     if torch.is_tensor(state.get("step"))]
            results[name] = {"syncs": records, "host_step_counts": {t.data_ptr() for t in steps if t.is_cpu}, "overlap": s.model_chunks[0].ddp_config.overlap_grad_reduce,
                             "skipped": metrics["skipped"], "preempted": [metrics["preempted"], third["preempted"]],
                             "aux_loss": metrics.get("aux_loss"), "norms": norms}
            if name == "sphere_muon":  # control: Megatron's own step (norm, clip, step) after prepare_grads
                s.runner.train_step(iterator)
                s.optimizer.prepare_grads()
                with count_host_syncs() as control:
                    s.optimizer.step()
                results["control_megatron_step"] = {"syncs": control}
        finally:
            parallel_state.destroy_model_parallel()
    return results


def _leaves(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    return [optimizer] if chained is None else [leaf for inner in chained for leaf in _leaves(inner)]


@pytest.fixture(scope="module")
def counted():
    return run_distributed(_count_worker, 2)


def _device_syncs(result: dict) -> list:
    """All reads except of torch AdamW's step counts: without TE / apex Megatron uses torch's AdamW, which
    (neither fused nor capturable) keeps ``state["step"]`` on the CPU, also in a GPU run: ``.item()`` on it
    reads host memory and does not wait for the device."""
    return [record for record in result["syncs"] if record[2] not in result["host_step_counts"]]


MOE_DISPATCH = ("moe_utils.py", "experts.py", "token_dispatcher.py")
"""Megatron's MoE token dispatch reads the tokens per expert (all-to-all split sizes) in the forward pass."""


@pytest.mark.parametrize("name", list(RUNS))
def test_one_host_sync_per_training_step(counted, name):
    for rank_results in counted:
        result = rank_results[name]
        syncs = _device_syncs(result)
        if name == "moe":
            assert all(where.split(":")[0] in MOE_DISPATCH for _, where, _ in syncs[:-1]), syncs
            syncs = syncs[-1:]
        assert [call for call, _, _ in syncs] == ["tolist"], result["syncs"]
        assert "agree_on_step" in syncs[0][1], result["syncs"]
        assert result["overlap"] is True  # DP=2: Megatron's DDP overlaps the gradient all-reduce
        assert not result["skipped"]
        assert result["preempted"] == [False, True]  # a signal on rank 1 reaches every rank in the same step
        if name == "moe":
            assert result["aux_loss"] > 0
        ours, megatron = result["norms"]
        assert abs(ours - megatron) <= 1e-6 * megatron, result["norms"]


def test_control_megatron_step_reads_its_norm_once(counted):
    """The counter sees Megatron's own ``optimizer.step()`` (what the trainer called before, after its own
    norm) read the gradient norm: exactly once, in ``get_grad_norm_fp32``, since the foreach l2 norm
    (``compat/without_te.py``) replaced the fallback without apex that read it once more (on a GPU once per
    gradient tensor besides)."""
    for rank_results in counted:
        syncs = rank_results["control_megatron_step"]["syncs"]
        assert [where.split(" ")[1] for _, where, _ in syncs] == ["get_grad_norm_fp32"], syncs
