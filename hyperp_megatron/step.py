"""One optimizer step and one evaluation, on Megatron's pipeline schedules (so PP works unchanged)."""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from hyperp_megatron.data.datasets import get_batch
from hyperp_megatron.model.moe import pop_local_aux_loss
from hyperp_megatron.optim.sphere_muon import leaf_optimizers


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, poison: bool = False):
    """Mean token loss of one micro-batch; Megatron divides by the number of micro-batches.

    ``poison`` (testing knob ``debug.nan_at_steps``): multiply by NaN, so the loss and every gradient
    are non-finite.
    """
    losses = output_tensor.float()
    loss = torch.sum(losses.view(-1) * loss_mask.view(-1)) / loss_mask.sum().clamp(min=1)
    if poison:
        loss = loss * float("nan")
    # clone: Megatron divides the returned loss by the number of micro-batches in place.
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model, device: torch.device, poison_loss: bool = False):
    batch = get_batch(data_iterator, device)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, functools.partial(_loss_func, batch["loss_mask"], poison=poison_loss)


@torch.no_grad()
def global_grad_norm(optimizer, device: torch.device) -> torch.Tensor:
    """The pre-clip gradient norm Megatron's ``get_grad_norm`` computes (the same gradients: no shared or
    TP-duplicate parameters), as a 0-d fp64 tensor on ``device``: a foreach norm per optimizer and one
    all-reduce over its grad-stats group; no host sync (Megatron's fallback l2 norm without apex syncs once
    per gradient tensor)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for leaf in leaf_optimizers(optimizer):
        if getattr(leaf, "is_stub_optimizer", False):
            continue
        grads = leaf.get_main_grads_for_grad_norm()
        square = torch.zeros(1, dtype=torch.float64, device=device)
        if grads:
            square += torch.stack(torch._foreach_norm(grads)).double().square().sum().to(device)
        # The group Megatron reduces this optimizer's norm over: model parallel (TP x PP; expert optimizers
        # TP x EP x PP), the world under the distributed optimizer (its gradients are DP shards).
        dist.all_reduce(square, group=leaf.get_grad_stats_parallel_group())
        total = total + square[0]
    return total.sqrt()


@torch.no_grad()
def clip_and_step(optimizer, grad_norm: float) -> bool:
    """Megatron's ``ChainedOptimizer.step`` after ``prepare_grads``, with the norm already known: scale the
    gradients by ``clip_grad / grad_norm`` when below 1, then update (returns success)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for leaf in leaf_optimizers(optimizer):
        params = [] if getattr(leaf, "is_stub_optimizer", False) else leaf.get_parameters()
        if params and leaf.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, max_norm=leaf.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=leaf.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return optimizer.step_with_ready_grads()


def agree_on_step(loss_sums: torch.Tensor, grad_norm: torch.Tensor, found_inf: bool, aux_loss: torch.Tensor,
                  preempt: bool, device: torch.device) -> dict:
    """Every scalar the step needs on the host, in ONE world all-reduce and ONE host read.

    loss_sums: (2,) this rank's (loss, contributes) (see :func:`_local_loss_sums`); grad_norm: 0-d, the same
    on every rank (already reduced); aux_loss: 0-d, this rank's share; preempt: a signal reached this rank.
    Returns floats: ``loss`` (mean over the contributing ranks), ``grad_norm``, ``aux_sum`` (world sum),
    ``skipped`` (non-finite loss or gradient norm, or an inf found, on any rank) and ``preempted`` (any rank).
    """
    # Host values enter as kernel scalars (torch.tensor(x, device=cuda) would be a synchronizing copy).
    preempted = torch.zeros((), dtype=torch.float64, device=device) + float(preempt)
    flags = torch.stack([(~torch.isfinite(grad_norm)).double() + float(found_inf), aux_loss.double(), preempted])
    packed = torch.cat([loss_sums.double(), flags])
    # World all-reduce (SUM): the loss from the last stage's TP-rank-0 processes of every DP replica, the
    # aux-loss shares of every rank, and any rank's non-finite flag or preemption signal reach all ranks.
    dist.all_reduce(packed)
    loss_sum, count, bad, aux_sum, preempted, norm = torch.cat([packed, grad_norm.double().view(1)]).tolist()
    loss = loss_sum / max(count, 1.0)
    skipped = bad > 0 or not math.isfinite(loss) or not math.isfinite(norm)
    return {"loss": loss, "grad_norm": norm, "aux_sum": aux_sum, "skipped": skipped, "preempted": preempted > 0}


def _local_loss_sums(losses: list[dict], pg_collection, is_last_stage: bool, device: torch.device) -> torch.Tensor:
    """(mean micro-batch loss, 1) on the last stage's TP-rank-0 processes, (0, 0) elsewhere: summed over the
    world, their ratio is the loss averaged over data-parallel replicas."""
    value = torch.zeros(2, dtype=torch.float64, device=device)
    if is_last_stage and pg_collection.tp.rank() == 0 and losses:
        value[0] = torch.stack([d["lm loss"] for d in losses]).double().mean()
        value[1].fill_(1.0)  # a kernel scalar, not a host-to-device copy
    return value


def _mean_loss_over_world(losses: list[dict], pg_collection, is_last_stage: bool, device: torch.device) -> float:
    """Average the micro-batch losses of the last stage over data-parallel ranks, known to every rank."""
    value = _local_loss_sums(losses, pg_collection, is_last_stage, device)
    # World all-reduce: the last stage's TP-rank-0 processes of every DP replica contribute.
    dist.all_reduce(value)
    return float(value[0] / value[1].clamp(min=1))


class StepRunner:
    """Runs forward/backward over the micro-batches of one global batch and the optimizer step.

    ``device``: where batches go and the loop's own collectives run (the model's device)."""

    def __init__(self, model_chunks, optimizer, pg_collection, seq_length: int, micro_batch_size: int,
                 num_microbatches: int, device: torch.device):
        self.device = torch.device(device)
        self.model_chunks = model_chunks
        self.optimizer = optimizer
        self.pg_collection = pg_collection
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.num_microbatches = num_microbatches
        self.forward_backward = get_forward_backward_func()
        self.is_last_stage = pg_collection.pp.rank() == pg_collection.pp.size() - 1
        self.is_moe = get_model_config(model_chunks[0]).num_moe_experts is not None

    def _run(self, data_iterator, forward_only: bool, num_microbatches: int,
             poison_loss: bool = False) -> list[dict]:
        return self.forward_backward(
            forward_step_func=functools.partial(forward_step, device=self.device, poison_loss=poison_loss),
            data_iterator=data_iterator,
            model=self.model_chunks,
            num_microbatches=num_microbatches,
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self, data_iterator, monitor=None, poison_loss: bool = False, preemption=None) -> dict:
        """Forward/backward over the global batch, then the update unless the loss or the pre-clip
        gradient norm is non-finite on some rank: then every rank skips it (weights and optimizer
        state unchanged) and ``metrics["skipped"]`` is True.

        One host sync per step (:func:`agree_on_step`): loss, gradient norm (computed once, reused by the
        clip), non-finite flag, MoE aux loss and the preemption agreement (``metrics["preempted"]``: a
        signal of ``preemption``, a :class:`~hyperp_megatron.resilience.PreemptionFlag`, on any rank). Monitor
        steps read the monitor's own records besides.

        ``monitor``: a :class:`~hyperp_megatron.monitors.StabilityMonitor` on monitor steps;
        ``poison_loss``: testing knob (``debug.nan_at_steps``).
        """
        for chunk in self.model_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        if monitor is not None:
            monitor.start()
        losses = self._run(data_iterator, forward_only=False, num_microbatches=self.num_microbatches,
                           poison_loss=poison_loss)
        loss_sums = _local_loss_sums(losses, self.pg_collection, self.is_last_stage, self.device)
        # Megatron's optimizer.step() = prepare_grads, grad norm + clip, update; split here so that the norm
        # decides on the update before any weight moves and is computed once.
        found_inf = self.optimizer.prepare_grads()  # bf16 / fp32: no loss scaler, no host sync
        grad_norm = global_grad_norm(self.optimizer, self.device)
        aux_loss = pop_local_aux_loss(self.model_chunks, self.device)
        records = monitor.gradient_records() if monitor is not None else {}
        agreed = agree_on_step(loss_sums, grad_norm, found_inf, aux_loss,
                               preemption is not None and preemption.signum is not None, self.device)
        update_successful = False if agreed["skipped"] else clip_and_step(self.optimizer, agreed["grad_norm"])
        metrics = {"loss": agreed["loss"], "grad_norm": agreed["grad_norm"], **records,
                   "update_successful": bool(update_successful), "skipped": agreed["skipped"],
                   "preempted": agreed["preempted"]}
        if self.is_moe:  # reported beside the LM loss, which excludes it
            metrics["aux_loss"] = agreed["aux_sum"] / (self.pg_collection.dp.size() * self.num_microbatches)
        if monitor is not None:
            metrics.update(monitor.finish())
        return metrics

    @torch.no_grad()
    def evaluate(self, data_iterator, num_microbatches: int) -> float:
        for chunk in self.model_chunks:
            chunk.eval()
        losses = self._run(data_iterator, forward_only=True, num_microbatches=num_microbatches)
        return _mean_loss_over_world(losses, self.pg_collection, self.is_last_stage, self.device)
