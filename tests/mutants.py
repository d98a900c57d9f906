"""Deliberately wrong variants of the code, for negative controls.

Each property a test claims (layout parity, resume, global statistics, ...) has a control: the test
applies one mutation below, reruns its check on the mutated code and asserts that the check fails.
A check that also passed the mutant would prove nothing. Mutations are applied inside the process
that runs the code: in-process with ``with mutated(name):`` (in the workers of ``run_distributed``), or
for real torchrun jobs through this module as the entry point (from the repository root)::

    torchrun --nproc-per-node 2 -m tests.mutants resume_restarts_from_step_0 --config run.yaml

(``trainer_utils.launch_torchrun(..., mutation=name)``), which applies the mutation and runs the trainer.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from unittest import mock


class _WithoutAllReduce:
    """``torch.distributed`` with ``all_reduce`` a no-op (each rank keeps its local value)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    @staticmethod
    def all_reduce(tensor, *args, **kwargs):
        return None


def _fresh_train_state(session):
    from hyperp_megatron.checkpoint import TrainState

    return TrainState()


def resume_restarts_from_step_0():
    """``maybe_resume`` ignores the checkpoints: the relaunched job trains again from step 0 (with a
    deterministic trainer it still ends on the same weights)."""
    from hyperp_megatron import train

    return mock.patch.object(train, "maybe_resume", _fresh_train_state)


@contextlib.contextmanager
def sphere_radius_per_shard():
    """The all-reduce of the per-shard squared norms (``sphere_batched.all_reduce_by_group`` in the step) is
    skipped: each TP shard is retracted to its own norm instead of the whole matrix's."""
    from hyperp_megatron.optim import sphere_batched

    summed = sphere_batched.all_reduce_by_group
    with mock.patch.object(sphere_batched, "all_reduce_by_group",
                           lambda entries: summed([(None, tensor) for _, tensor in entries])):
        yield


def _blockwise_sphere_muon(*args, **kwargs):
    from hyperp_megatron.optim.sphere_muon import SphereMuon

    return SphereMuon(*args, **{**kwargs, "ns_mode": "blockwise"})


def newton_schulz_per_shard():
    """The trainer's SphereMuon orthogonalizes each TP shard on its own (``ns_mode='blockwise'``)."""
    from hyperp_megatron.optim import builder

    return mock.patch.object(builder, "SphereMuon", _blockwise_sphere_muon)


def moe_load_statistics_local():
    """The router's top-k counts are not all-reduced over TP x DP x CP: ``f`` of the load-balancing loss
    is this rank's, not the global batch's."""
    from hyperp_megatron.model import router

    return mock.patch.object(router, "dist", _WithoutAllReduce(router.dist))


def _build_without_sequence_parallel_tags(original, *args, **kwargs):
    chunks = original(*args, **kwargs)
    for chunk in chunks:
        for param in chunk.parameters():
            if getattr(param, "sequence_parallel", False):
                param.sequence_parallel = False
    return chunks


def sequence_parallel_norm_grads_not_reduced():
    """Norm gains lose their ``sequence_parallel`` tag (``compat/without_te.py`` sets it): under sequence
    parallelism ``finalize_model_grads`` no longer sums their gradients over the TP ranks, each of
    which saw only its part of the sequence."""
    from hyperp_megatron.model import gpt

    return mock.patch.object(gpt, "build_model",
                             functools.partial(_build_without_sequence_parallel_tags, gpt.build_model))


def reshard_without_optimizer_state():
    """``checkpoint.load`` restores the weights but not the optimizer state (momentum, Adam moments,
    radii)."""
    from hyperp_megatron import checkpoint

    return mock.patch.object(checkpoint, "load", functools.partial(checkpoint.load, load_optimizer=False))


@contextlib.contextmanager
def dp_grad_sync_skips_embedding_and_output():
    """The data-parallel gradient all-reduce (Megatron's bucket sync) leaves out the embedding and the output
    layer (``is_embedding_or_output_parameter``): each DP rank keeps its own micro-batches' gradient for them,
    scaled as before the collective."""
    from megatron.core.distributed import param_and_grad_buffer

    group_class = param_and_grad_buffer._ParamAndGradBucketGroup
    start, finish = group_class.start_grad_sync, group_class.finish_grad_sync

    def start_keeping_local(self, *args, **kwargs):
        if self.grad_reduce_handle is None:  # not yet dispatched: the gradients are still this rank's own
            self.local_grads = [(param, param.main_grad.detach().clone(), bucket.gradient_scaling_factor)
                                for bucket in self.buckets for param in bucket.params
                                if getattr(param, "is_embedding_or_output_parameter", False)]
        return start(self, *args, **kwargs)

    def finish_restoring_local(self, *args, **kwargs):
        result = finish(self, *args, **kwargs)
        for param, local, scale in getattr(self, "local_grads", ()):
            param.main_grad.copy_(local * scale)
        self.local_grads = []
        return result

    with mock.patch.object(group_class, "start_grad_sync", start_keeping_local), \
            mock.patch.object(group_class, "finish_grad_sync", finish_restoring_local):
        yield


def monitor_reductions_skipped():
    """The stability monitors skip their all-reduces (the world sum of per-layer statistics, the TP /
    expert-TP sums of gradient norms and radii): each rank reports its own partial values."""
    from hyperp_megatron import monitors

    return mock.patch.object(monitors, "dist", _WithoutAllReduce(monitors.dist))


def _routing_with_phantoms(self, logits, padding_mask=None):
    import torch

    from hyperp_megatron.model.router import topk_gates

    real = self.num_real_experts
    logits = logits.view(-1, real)
    padded = torch.nn.functional.pad(logits, (0, self.config.num_moe_experts - real))  # phantom logits 0
    probs, routing_map = topk_gates(padded, self.topk, self.gate)
    if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():  # aux loss: real experts
        real_probs = self._attach_load_balancing_loss(probs[:, :real], logits, routing_map[:, :real])
        probs = torch.cat([real_probs, probs[:, real:]], dim=1)
    return probs, routing_map


def phantom_experts_routable():
    """Phantom experts are not masked: the router's top-k and softmax run over the padded expert count with a
    logit of 0 for each phantom (zero weights), so tokens are sent to phantom experts."""
    from hyperp_megatron.model import router

    return mock.patch.object(router.SqrtGateRouter, "routing", _routing_with_phantoms)


def sequential_experts_save_empty_extra_state():
    """``SequentialExperts`` keeps SequentialMLP's empty ``_extra_state`` objects in its sharded state dict (the
    code before the fix): it saves checkpoints as before and asks a grouped-experts checkpoint for them."""
    from hyperp_megatron.model import experts

    return mock.patch.object(experts, "_carries_nothing", lambda value: False)


def experts_checkpoint_permuted():
    """The routed experts' checkpoint offsets are reversed (global expert ``e`` <-> ``E - 1 - e``): a load
    puts each expert's weights in another expert's place."""
    from hyperp_megatron.model import experts

    original = experts._expert_offsets

    def reversed_offsets(prefix, sharded_offsets, expert, num_real, singleton):
        return original(prefix, sharded_offsets, num_real - 1 - expert, num_real, singleton)

    return mock.patch.object(experts, "_expert_offsets", reversed_offsets)


MUTATIONS = {fn.__name__: fn for fn in (
    resume_restarts_from_step_0, sphere_radius_per_shard, newton_schulz_per_shard, moe_load_statistics_local,
    sequence_parallel_norm_grads_not_reduced, reshard_without_optimizer_state, monitor_reductions_skipped,
    dp_grad_sync_skips_embedding_and_output,
    phantom_experts_routable, sequential_experts_save_empty_extra_state, experts_checkpoint_permuted,
)}


@contextlib.contextmanager
def mutated(name: str):
    """Apply mutation ``name`` (a key of ``MUTATIONS``) inside the block."""
    with MUTATIONS[name]():
        yield


def main(argv: list[str]) -> int:
    """``python -m tests.mutants NAME [trainer arguments]``: the trainer's entry point with mutation NAME applied."""
    name, rest = argv[0], argv[1:]
    from hyperp_megatron import train

    with mutated(name):
        return train.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
