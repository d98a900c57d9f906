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


def _all_ranks_finite(loss: float, grad_norm: float, found_inf: bool, device: torch.device) -> bool:
    """True on every rank iff the loss and the gradient norm are finite (and no inf was found) on all.

    ``device``: where the process group's collectives take tensors (NCCL: the GPU)."""
    bad = torch.tensor([float(found_inf or not math.isfinite(loss) or not math.isfinite(grad_norm))],
                       device=device)
    # World all-reduce (MAX): one rank seeing a non-finite value makes every rank skip the update.
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def _mean_loss_over_world(losses: list[dict], pg_collection, is_last_stage: bool, device: torch.device) -> float:
    """Average the micro-batch losses of the last stage over data-parallel ranks, known to every rank."""
    value = torch.zeros(2, dtype=torch.float64, device=device)
    if is_last_stage and pg_collection.tp.rank() == 0 and losses:
        value[0] = torch.stack([d["lm loss"] for d in losses]).double().mean()
        value[1] = 1.0
    # World all-reduce: the last stage's TP-rank-0 processes of every DP replica contribute.
    dist.all_reduce(value)
    return float(value[0] / value[1].clamp(min=1))


def _aux_loss_over_world(model_chunks, pg_collection, num_microbatches: int, device: torch.device) -> float:
    """The step's MoE load-balancing loss, summed over layers and averaged over micro-batches.

    Every rank holds its share of each of its layers (``router.switch_load_balancing_loss``): summed over
    the TP ranks of a replica it is the replica's loss, and replicas average over data parallel.
    """
    value = pop_local_aux_loss(model_chunks, device)
    # World all-reduce: layers on PP stages, shares on TP/CP ranks, one value per DP replica.
    dist.all_reduce(value)
    return float(value / (pg_collection.dp.size() * num_microbatches))


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

    def train_step(self, data_iterator, monitor=None, poison_loss: bool = False) -> dict:
        """Forward/backward over the global batch, then the update unless the loss or the pre-clip
        gradient norm is non-finite on some rank: then every rank skips it (weights and optimizer
        state unchanged) and ``metrics["skipped"]`` is True.

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
        loss = _mean_loss_over_world(losses, self.pg_collection, self.is_last_stage, self.device)
        # Megatron's optimizer.step() = prepare_grads, clip (computing the norm), update. The norm is
        # computed first here (Megatron's own reductions) to decide on the update before any weight moves;
        # step() repeats both (idempotent; one extra pass over the gradients).
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if monitor is not None:
            metrics.update(monitor.gradient_records())
        skipped = not _all_ranks_finite(loss, grad_norm, found_inf, self.device)
        update_successful = False if skipped else self.optimizer.step()[0]
        metrics.update(update_successful=bool(update_successful), skipped=skipped)
        if self.is_moe:  # reported beside the LM loss, which excludes it
            metrics["aux_loss"] = _aux_loss_over_world(self.model_chunks, self.pg_collection,
                                                       self.num_microbatches, self.device)
        if monitor is not None:
            metrics.update(monitor.finish())
        return metrics

    @torch.no_grad()
    def evaluate(self, data_iterator, num_microbatches: int) -> float:
        for chunk in self.model_chunks:
            chunk.eval()
        losses = self._run(data_iterator, forward_only=True, num_microbatches=num_microbatches)
        return _mean_loss_over_world(losses, self.pg_collection, self.is_last_stage, self.device)
