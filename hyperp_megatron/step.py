"""One optimizer step and one evaluation, on Megatron's pipeline schedules (so PP works unchanged)."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from hyperp_megatron.data import get_batch


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean token loss of one micro-batch; Megatron divides by the number of micro-batches."""
    losses = output_tensor.float()
    loss = torch.sum(losses.view(-1) * loss_mask.view(-1)) / loss_mask.sum().clamp(min=1)
    # clone: Megatron divides the returned loss by the number of micro-batches in place.
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    batch = get_batch(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, functools.partial(_loss_func, batch["loss_mask"])


def _mean_loss_over_world(losses: list[dict], pg_collection, is_last_stage: bool) -> float:
    """Average the micro-batch losses of the last stage over data-parallel ranks, known to every rank."""
    value = torch.zeros(2, dtype=torch.float64)
    if is_last_stage and pg_collection.tp.rank() == 0 and losses:
        value[0] = torch.stack([d["lm loss"] for d in losses]).double().mean()
        value[1] = 1.0
    # World all-reduce: the last stage's TP-rank-0 processes of every DP replica contribute.
    dist.all_reduce(value)
    return float(value[0] / value[1].clamp(min=1))


class StepRunner:
    """Runs forward/backward over the micro-batches of one global batch and the optimizer step."""

    def __init__(self, model_chunks, optimizer, pg_collection, seq_length: int, micro_batch_size: int,
                 num_microbatches: int):
        self.model_chunks = model_chunks
        self.optimizer = optimizer
        self.pg_collection = pg_collection
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.num_microbatches = num_microbatches
        self.forward_backward = get_forward_backward_func()
        self.is_last_stage = pg_collection.pp.rank() == pg_collection.pp.size() - 1

    def _run(self, data_iterator, forward_only: bool, num_microbatches: int) -> list[dict]:
        return self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=data_iterator,
            model=self.model_chunks,
            num_microbatches=num_microbatches,
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self, data_iterator) -> dict:
        for chunk in self.model_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run(data_iterator, forward_only=False, num_microbatches=self.num_microbatches)
        update_successful, grad_norm, _ = self.optimizer.step()
        loss = _mean_loss_over_world(losses, self.pg_collection, self.is_last_stage)
        return {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "update_successful": bool(update_successful)}

    @torch.no_grad()
    def evaluate(self, data_iterator, num_microbatches: int) -> float:
        for chunk in self.model_chunks:
            chunk.eval()
        losses = self._run(data_iterator, forward_only=True, num_microbatches=num_microbatches)
        return _mean_loss_over_world(losses, self.pg_collection, self.is_last_stage)
