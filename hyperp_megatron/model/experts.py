"""Grouped-GEMM routed experts without Transformer Engine: :class:`TorchGroupedMLP`.

A drop-in for Megatron's ``SequentialMLP`` / ``TEGroupedMLP`` (constructor ``(num_local_experts, config,
submodules, pg_collection)``, forward ``(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
-> (output, None)``) whose two expert GEMMs are each ONE ``torch._grouped_mm`` call per layer on a Hopper
(or newer) GPU in bf16, and a per-expert loop elsewhere (CPU, fp32, older GPUs, unaligned widths).

Each expert keeps its own parameters, ``linear_fc1.weight{i}`` ``[2 ffn/etp, C]`` (SwiGLU gate and up
rows, ``[gate_r; up_r]`` on expert-TP rank ``r`` as in Megatron's MLP) and ``linear_fc2.weight{i}``
``[C, ffn/etp]``: TEGroupedMLP's naming, so the optimizer roles (``optim/param_groups.py``: one sphere per
expert) and the layout-invariant init (``model/init.py``) treat them as SequentialMLP's
``local_experts.{i}.linear_fc{1,2}.weight``, and the checkpoint keys are SequentialMLP's: a checkpoint saved
with either loads into the other (:class:`SequentialExperts` leaves out SequentialMLP's empty ``_extra_state``
objects, which this module has no counterpart for).
The kernel path stacks the ``n`` local weights into one ``[n, in, out]`` operand per forward (a copy of
the local expert weights; its backward splits the gradient back per expert).

Phantom experts (docs/moe.md): with ``num_real_experts`` below the padded count, the local experts whose
global number is ``>= num_real_experts`` are phantoms: zero weights with ``requires_grad`` off and the
attribute ``phantom_expert`` (so DDP, the optimizer and clipping skip them), left out of the checkpoint,
which then holds exactly the unpadded model's experts. :class:`SequentialExperts` is Megatron's
``SequentialMLP`` with the same treatment.

Expert parallelism and expert tensor parallelism are Megatron's: the token dispatcher delivers this
rank's tokens sorted by local expert and reduces over expert-TP afterwards, so the expert GEMMs are local
(fc1 column-, fc2 row-parallel over ``pg_collection.expt_tp``, like Megatron's expert linears, which skip
their own collectives).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

KERNELS = ("auto", "grouped_mm", "loop")
""":attr:`TorchGroupedMLP.kernel`: 'auto' (``torch._grouped_mm`` where :func:`grouped_mm_usable`, else the
loop), 'grouped_mm' (always; for tests and benchmarks, needs a torch that has it on the device) or 'loop'."""


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def grouped_mm_usable(x: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """``torch._grouped_mm``'s fast CUDA path applies: bf16 input and weights on a GPU of compute
    capability >= 9.0, and 16-byte aligned rows (inner dims a multiple of 8 elements) for the input
    ``[tokens, in]`` and the column-major ``[n, in, out]`` weight view."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if x.dtype != torch.bfloat16 or any(w.dtype != torch.bfloat16 for w in weights):
        return False
    if x.shape[-1] % 8:
        return False
    return _hopper_or_newer(x.device.index)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``_grouped_mm``'s backward
    rejects stride-0 (expanded) or otherwise unaligned gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weights: list[torch.Tensor], tokens_per_expert: torch.Tensor | list[int],
                   use_grouped_mm: bool) -> torch.Tensor:
    """``cat_i(x_i @ W_i^T)`` for the row blocks ``x_i`` of ``x`` [tokens, in] (expert ``i`` gets
    ``tokens_per_expert[i]`` consecutive rows), ``W_i`` [out, in] -> [tokens, out].

    Grouped: one ``torch._grouped_mm(x, stack(W)^T, offs=cumsum(counts))`` (int32 end offsets on the
    input's device; no host sync). Loop: one matmul per expert (``tokens_per_expert`` read on the host,
    as SequentialMLP does).
    """
    if use_grouped_mm and x.shape[0] > 0:  # no routed token on this rank: the loop handles the empty input
        counts = torch.as_tensor(tokens_per_expert)
        offsets = counts.to(device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        stacked = torch.stack(weights).transpose(1, 2)  # [n, in, out], column-major per expert
        return _ContiguousGrad.apply(torch._grouped_mm(x.contiguous(), stacked, offs=offsets))
    if len(weights) == 1:
        return torch.matmul(x, weights[0].t())
    counts = tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else list(tokens_per_expert)
    return torch.cat([torch.matmul(chunk, w.t()) for chunk, w in zip(torch.split(x, counts), weights)])


class GroupedExpertWeights(torch.nn.Module):
    """``weight0 .. weight{n-1}``: one ``[out, in]`` parameter per local expert, with Megatron's tensor-parallel
    attributes (``partition_dim`` over expert-TP) and its ``allreduce`` flag (False under expert parallelism:
    DDP then reduces the gradient over the expert-data-parallel group)."""

    def __init__(self, num_local_experts: int, out_features: int, in_features: int, *, partition_dim: int,
                 config, init_method):
        super().__init__()
        self.num_local_experts = num_local_experts
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        expert_parallel = config.expert_model_parallel_size > 1
        for i in range(num_local_experts):
            weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=config.params_dtype,
                                                    device=device))
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=partition_dim, stride=1)
            weight.allreduce = not expert_parallel
            if config.perform_initialization:  # model/init.py overwrites it layout-invariantly
                with torch.no_grad():
                    init_method(weight)
            self.register_parameter(f"weight{i}", weight)

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"weight{i}") for i in range(self.num_local_experts)]


def is_phantom(param: torch.Tensor) -> bool:
    """Whether ``param`` belongs to a phantom expert (module docstring)."""
    return getattr(param, "phantom_expert", False)


@torch.no_grad()
def _make_phantom(params) -> None:
    for param in params:
        param.zero_()
        param.requires_grad_(False)
        param.phantom_expert = True


def _global_experts(ep_group, num_local_experts: int, num_real_experts: int | None) -> tuple[int, int]:
    """(global number of this rank's first local expert, real experts in the model)."""
    padded = ep_group.size() * num_local_experts
    real = padded if num_real_experts is None else num_real_experts
    if not padded - num_local_experts < real <= padded:
        raise ValueError(f"{real} real experts over {padded} padded ones leave an expert-parallel rank "
                         "without a real expert: use a smaller parallel.expert")
    return ep_group.rank() * num_local_experts, real


def _expert_offsets(prefix: str, sharded_offsets: tuple, expert: int, num_real: int, singleton: bool):
    """(sharded-key prefix, offsets) of global expert ``expert`` among ``num_real`` (SequentialMLP's layout)."""
    if singleton:
        return f"{prefix}experts.{expert}.", sharded_offsets
    return f"{prefix}experts.", (*sharded_offsets, (len(sharded_offsets), expert, num_real))


def _carries_nothing(value) -> bool:
    """An ``_extra_state`` sharded object whose state is None: what Megatron's local linear layers save
    (``get_extra_state`` returns None; their load-state-dict pre-hook sets it back to None when absent)."""
    return isinstance(value, ShardedObject) and value.key.endswith("._extra_state") and value.data is None


class SequentialExperts(SequentialMLP):
    """Megatron's ``SequentialMLP`` (one MLP per local expert) that knows the phantom experts: they are zero,
    frozen and left out of :meth:`sharded_state_dict`, whose expert axis has the real count.

    Its checkpoint is ``SequentialMLP``'s without the experts' empty ``_extra_state`` objects (their state is
    None with Megatron's local linears), so it is :class:`TorchGroupedMLP`'s: checkpoints move between the
    two in both directions. ``SequentialMLP`` checkpoints that hold those objects still load (they are not
    read; the linears' load fills in None)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, num_real_experts=None):
        super().__init__(num_local_experts, config, submodules, pg_collection)
        first, self.num_real_experts = _global_experts(self.ep_group, num_local_experts, num_real_experts)
        for i, expert in enumerate(self.local_experts):
            if first + i >= self.num_real_experts:
                _make_phantom(expert.parameters())

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """``SequentialMLP.sharded_state_dict`` (megatron-core 0.16.1) over the real experts only."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = metadata.get("singleton_local_shards", False)
        first = self.ep_group.rank() * self.num_local_experts
        sharded = {}
        for i, expert in enumerate(self.local_experts):
            if first + i >= self.num_real_experts:
                continue
            state_prefix = f"{prefix}local_experts.{i}."
            key_prefix, offsets = _expert_offsets(prefix, sharded_offsets, first + i, self.num_real_experts,
                                                  singleton)
            state = {key: value for key, value in expert.sharded_state_dict(state_prefix, offsets, metadata).items()
                     if not _carries_nothing(value)}
            replace_prefix_for_sharding(state, state_prefix, key_prefix)
            for tensor in state.values():  # replicated over expert-DP
                tensor.replica_id = (*tensor.replica_id[:2], self.dp_group.rank())
            sharded.update(state)
        return sharded


def _refuse_unsupported(config) -> None:
    problems = {
        "expert biases (add_bias_linear)": config.add_bias_linear,
        "FP8 / FP4": bool(config.fp8 or getattr(config, "fp4", None)),
        "a latent MoE (moe_latent_size)": getattr(config, "moe_latent_size", None) is not None,
        "TE activation functions (use_te_activation_func)": getattr(config, "use_te_activation_func", False),
        "a fused activation other than SwiGLU": config.bias_activation_fusion and not (
            config.gated_linear_unit and config.activation_func is F.silu),
    }
    refused = [name for name, bad in problems.items() if bad]
    if refused:
        raise ValueError(f"the torch grouped-GEMM experts do not support {', '.join(refused)}: set "
                         "model.moe.grouped_gemm: false (Megatron's SequentialMLP) or use Transformer Engine")


class TorchGroupedMLP(MegatronModule):
    """Routed experts with grouped GEMMs and one parameter per expert (module docstring)."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None,
                 num_real_experts: int | None = None):
        super().__init__(config=config)
        _refuse_unsupported(config)
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.kernel = "auto"
        ffn_per_rank = config.moe_ffn_hidden_size // self.tp_group.size()
        fc1_rows = 2 * ffn_per_rank if config.gated_linear_unit else ffn_per_rank
        self.linear_fc1 = GroupedExpertWeights(num_local_experts, fc1_rows, config.hidden_size, partition_dim=0,
                                               config=config, init_method=config.init_method)
        self.linear_fc2 = GroupedExpertWeights(num_local_experts, config.hidden_size, ffn_per_rank, partition_dim=1,
                                               config=config, init_method=config.output_layer_init_method)
        self.activation_func = config.activation_func
        first, self.num_real_experts = _global_experts(self.ep_group, num_local_experts, num_real_experts)
        for i in range(max(self.num_real_experts - first, 0), num_local_experts):
            _make_phantom([self.linear_fc1.weights()[i], self.linear_fc2.weights()[i]])

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.kernel not in KERNELS:
            raise ValueError(f"TorchGroupedMLP.kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.kernel == "auto":
            fc2 = self.linear_fc2.weights()
            return grouped_mm_usable(x, self.linear_fc1.weights() + fc2) and fc2[0].shape[1] % 8 == 0
        return self.kernel == "grouped_mm"

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor) -> tuple[torch.Tensor, None]:
        """[tokens, C] sorted by local expert, [num_local_experts] counts, [tokens] gates -> ([tokens, C], None)."""
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:  # as Megatron's experts: top-1 only, gates applied first
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        use_grouped_mm = self._use_grouped_mm(x)
        hidden = grouped_linear(x, self.linear_fc1.weights(), tokens_per_expert, use_grouped_mm)
        hidden = self._weighted_activation(hidden, probs)
        return grouped_linear(hidden, self.linear_fc2.weights(), tokens_per_expert, use_grouped_mm), None

    def _weighted_activation(self, hidden: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Megatron MLP's activation with per-token gates (``MLP.forward`` with ``per_token_scale``)."""
        config = self.config
        if config.bias_activation_fusion:  # SwiGLU (checked at construction): Megatron's fused kernel
            from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

            return weighted_bias_swiglu_impl(hidden, None, probs.unsqueeze(-1),
                                             config.activation_func_fp8_input_store)
        if config.gated_linear_unit:
            gate, linear = torch.chunk(hidden, 2, dim=-1)
            if (clamp := config.activation_func_clamp_value) is not None:
                gate, linear = gate.clamp(max=clamp), linear.clamp(min=-clamp, max=clamp)
            activated = self.activation_func(gate) * (linear + config.glu_linear_offset)
        else:
            activated = self.activation_func(hidden)
        return (activated * probs.unsqueeze(-1)).to(activated.dtype)

    def backward_dw(self):
        """Nothing deferred: weight gradients are computed in the ordinary backward."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """SequentialMLP's checkpoint layout (the same sharded keys, offsets and replica ids) without its empty
        ``_extra_state`` objects, i.e. :class:`SequentialExperts`' layout, so checkpoints move between the two
        implementations; state-dict keys are this module's ``linear_fc{1,2}.weight{i}``.
        Phantom experts are left out (the expert axis has the real count)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton_local_shards = metadata.get("singleton_local_shards", False)
        first_global = self.ep_group.rank() * self.num_local_experts
        sharded = {}
        for i in range(min(self.num_local_experts, self.num_real_experts - first_global)):  # no phantom expert
            expert = first_global + i
            key_prefix, offsets = _expert_offsets(prefix, sharded_offsets, expert, self.num_real_experts,
                                                  singleton_local_shards)
            for name, tp_axis in (("linear_fc1", 0), ("linear_fc2", 1)):
                weight = getattr(getattr(self, name), f"weight{i}")
                (tensor,) = make_sharded_tensors_for_checkpoint(
                    {"weight": weight}, f"{key_prefix}{name}.", {"weight": tp_axis}, offsets,
                    tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]).values()
                if name == "linear_fc1" and self.config.gated_linear_unit:
                    tensor = apply_swiglu_sharded_factory(tensor, offsets, singleton_local_shards)
                tensor.replica_id = (*tensor.replica_id[:2], self.dp_group.rank())  # replicated over expert-DP
                sharded[f"{prefix}{name}.weight{i}"] = tensor
        return sharded
