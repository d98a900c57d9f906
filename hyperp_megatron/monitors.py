"""Stability indicators (docs/method.md section 5) and the non-finite step policy.

Every ``monitor.interval`` optimizer steps, :class:`StabilityMonitor` records, without gradient and
over all micro-batches of that step, per layer (keys ``monitor/<name>/layerNN``) and averaged over
layers (``monitor/<name>``):

``attn_z``            mean over (sequence, sampled query position t, sampled head) of
                      ``(logsumexp_s scale * q_t . k_s)^2`` over the keys ``s`` the query attends to.
                      Megatron's local ``DotProductAttention`` does not return the log-sum-exp, so a
                      forward pre-hook on ``core_attention`` takes the query/key it receives
                      ([s, b, heads, d], after QK-norm and RoPE), the attention mask (None = causal)
                      and the softmax scale, and recomputes the LSE for ``monitor.sample_tokens``
                      evenly spaced query positions and ``monitor.sample_heads`` evenly spaced heads
                      (global head indices: the same sample for every TP size).
``router_z``          ``mean_t (logsumexp_e router_logits[t, e])^2`` (MoE layers only; a forward hook
                      on the router recomputes its gating GEMM from the router input).
``attn_rms``, ``mlp_rms``   ``sqrt(mean(h^2))`` of the branch output ``h`` (``self_attention`` /
                      ``mlp`` output plus bias) times the residual multiplier
                      (``spec.branch_multiplier``, 1/sqrt(2d) under HyperP), i.e. what is added to the
                      residual stream.
``attn_outlier_pct``, ``mlp_outlier_pct``  percent of elements of ``h`` with
                      ``|x - mu_t| > outlier_sigma * sigma_t`` (mean and population std per token over
                      the hidden dim).
``maxvio``            ``(max_e f_e - mean f) / mean f`` of the top-k assignment counts of the LAST
                      micro-batch of the step (over all data/expert-parallel ranks), per MoE layer: the
                      value the reference logs (its training loop reports the last micro-batch's router).
``maxvio_step``       the same over the whole step's global batch (all micro-batches).

Layer means (``monitor/<name>``) are arithmetic means over the layers, except ``attn_rms`` and ``mlp_rms``:
their layer mean is the quadratic mean ``sqrt(mean_l rms_l^2)``, as the paper's plots average them.

and, once per monitor step: ``grad_norm_matrix`` / ``grad_norm_other`` (pre-clip, over Megatron's
grad-norm groups, so ``matrix^2 + other^2 = grad_norm^2``; hidden matrices = the sphere-Muon roles of
``model.params``), ``lr/<optimizer>.<group>`` (every param group of every rank) and
``sphere_radius_drift`` = max over sphere pieces of ``| ||W|| / R - 1 |`` (sphere Muon only;
``SphereMuon.radius_drift``); the operator norms of ``operator_norms.OperatorNormMonitor`` (``monitor.operator_norms``):
``output_rms_inf``, ``output_rms_rms`` and, with 'all', ``hidden_rms_rms_mean`` / ``_max`` and
``hidden_spectral_ratio_mean``.

Reductions. Activation statistics are (sum, count) pairs indexed by global layer, summed over the
whole world in ONE all-reduce: layers are disjoint across PP stages, tokens across DP replicas (and
across TP ranks under sequence parallelism, where branch outputs are reduce-scattered but every
token's hidden vector is whole), attention heads across TP ranks. Ranks that hold replicas (TP without
sequence parallelism: the row-parallel output is all-reduced, whole on every TP rank) add the same
value and count, which leaves each ratio unchanged; so every value equals the TP=1 one. Hooks exist
only during monitor steps.

Non-finite steps: ``StepRunner.train_step`` skips the update on every rank when the loss or the
pre-clip gradient norm is non-finite on any rank (one all-reduced flag); :class:`SkipCounter` stops
the run after ``monitor.max_consecutive_skips`` skipped steps in a row.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from hyperp_megatron.config import ModelConfig, MonitorConfig
from hyperp_megatron.model.params import role_of, unwrap
from hyperp_megatron.operator_norms import OperatorNormMonitor
from hyperp_megatron.optim.sphere_muon import leaf_optimizers, sphere_optimizers

# Imports of megatron-core (and of the model modules built on it) sit inside functions: the trainer's entry point
# imports this module before it validates the config, and megatron-core takes seconds to import.

PREFIX = "monitor/"
LAYER_STATS = ("attn_z", "router_z", "attn_rms", "mlp_rms", "attn_outlier_pct", "mlp_outlier_pct")
"""Per-layer statistics accumulated as (sum, count); ``*_rms`` take a square root, ``*_pct`` x 100."""
_STAT = {name: index for index, name in enumerate(LAYER_STATS)}


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm."""


# ----------------------------------------------------------------------------------------------
# Pure statistics (tested against direct computations)


def evenly_spaced(total: int, sample: int) -> torch.Tensor:
    """``sample`` evenly spaced indices in ``[0, total)`` (first and last included); all if 0 or >= total."""
    if sample <= 0 or sample >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, sample).round().long().unique()


def attention_logsumexp(query: torch.Tensor, key: torch.Tensor, scale: float, positions: torch.Tensor,
                        heads: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """LSE over keys of the scaled attention logits of some query positions and heads.

    query [sq, b, np, d], key [sk, b, ng, d] (GQA: query head h uses key group h // (np / ng)),
    positions [n] query positions, heads [m] query-head indices (into ``np``), attention_mask
    [b or 1, 1, sq, sk] bool (True = masked) or None (causal: query t sees keys 0..t).
    Returns [b, m, n] float32 (-inf where a query sees no key).
    """
    group_size = query.shape[2] // key.shape[2]
    q = query.index_select(0, positions).index_select(2, heads).float()  # [n, b, m, d]
    k = key.index_select(2, torch.div(heads, group_size, rounding_mode="floor")).float()  # [sk, b, m, d]
    logits = torch.einsum("nbmd,sbmd->bmns", q, k) * scale  # [b, m, n, sk]
    if attention_mask is None:
        masked = torch.arange(key.shape[0], device=key.device)[None, :] > positions[:, None]  # [n, sk]
    else:
        masked = attention_mask.index_select(2, positions)  # [b|1, 1, n, sk]
    return torch.logsumexp(logits.masked_fill(masked, float("-inf")), dim=-1)


def branch_statistics(h: torch.Tensor, outlier_sigma: float) -> torch.Tensor:
    """[sum of squares, outlier elements, elements] (float64) of ``h`` [..., hidden].

    Outlier: ``|x - mu_t| > outlier_sigma * sigma_t``, mean and population std per token (last dim).
    """
    x = h.detach().float().reshape(-1, h.shape[-1])
    var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)  # per token
    outliers = ((x - mean).abs_() > outlier_sigma * var.sqrt()).sum()
    sum_sq = (var.double() + mean.double().pow(2)).sum() * x.shape[-1]  # sum_t n (var_t + mean_t^2)
    return torch.stack([sum_sq, outliers.double(),
                        torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])


def layer_mean(name: str, values: list[float]) -> float:
    """Mean over layers: quadratic (``sqrt(mean v^2)``) for the ``*_rms`` statistics, arithmetic otherwise."""
    if name.endswith("_rms"):
        return math.sqrt(sum(v * v for v in values) / len(values))
    return sum(values) / len(values)


def max_violation(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """MaxVio ``(max_e f_e - mean f) / mean f`` of a load vector [..., E] (``model.router``'s definition)."""
    from hyperp_megatron.model.router import max_violation as moe_max_violation

    return moe_max_violation(tokens_per_expert)


# ----------------------------------------------------------------------------------------------
# Parameter and optimizer statistics


def hidden_matrix_ids(model_chunks) -> set[int]:
    """ids of the hidden weight matrices: the parameters whose role (``model.params.role_of``) is a hidden
    matrix (QKV, output projection, fc1/fc2, router, experts, gate). Embeddings, the output layer, norm
    gains, biases and any parameter no role knows count as 'other'."""
    ids = set()
    for chunk in model_chunks:
        for name, param in unwrap(chunk).named_parameters():
            try:
                if role_of(name).is_hidden_matrix:
                    ids.add(id(param))
            except ValueError:  # unknown to the roles: 'other'
                pass
    return ids


_MAIN_PARAM_GROUPS = (  # (model params, the optimizer's own copies), index-aligned, per Megatron class
    ("float16_groups", "fp32_from_float16_groups"),  # Float16OptimizerWithFloat16Params
    ("model_float16_groups", "shard_fp32_from_float16_groups"),  # DistributedOptimizer
    ("model_fp32_groups", "shard_fp32_groups"),  # DistributedOptimizer
)


def _model_param_of(optimizer) -> dict[int, torch.Tensor]:
    """id(optimizer's main param) -> model param (identity for fp32 optimizers, absent from the map)."""
    mapping = {}
    for model_attr, main_attr in _MAIN_PARAM_GROUPS:
        if hasattr(optimizer, model_attr) and hasattr(optimizer, main_attr):
            for model_group, main_group in zip(getattr(optimizer, model_attr), getattr(optimizer, main_attr)):
                mapping.update({id(main): model for model, main in zip(model_group, main_group)})
    return mapping


@torch.no_grad()
def gradient_norms(optimizer, matrix_ids: set[int], device: torch.device) -> tuple[float, float]:
    """Pre-clip gradient norms (hidden matrices, everything else), global over all parallel groups;
    reduced on ``device`` (the model's).

    Call after ``optimizer.prepare_grads()`` and before clipping. Counts exactly the gradients
    Megatron's ``get_grad_norm`` counts (no shared or TP-duplicate parameters; the local shard under
    the distributed optimizer), so ``matrix^2 + other^2 = grad_norm^2``.
    """
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    total = None
    for leaf in leaf_optimizers(optimizer):
        model_of = _model_param_of(leaf)
        params = leaf.get_parameters()
        grads: tuple[list, list] = ([], [])  # (hidden matrices, other)
        for param in params:
            if param.grad is None or not param_is_not_shared(param) or not param_is_not_tensor_parallel_duplicate(
                    param, getattr(leaf, "tp_group", None)):
                continue
            grads[0 if id(model_of.get(id(param), param)) in matrix_ids else 1].append(param.grad.detach())
        squares = torch.stack([torch.stack(torch._foreach_norm(g)).double().pow(2).sum() if g
                               else torch.zeros((), dtype=torch.float64, device=device) for g in grads])
        # The group Megatron reduces this optimizer's grad norm over (model parallel: TP x PP, and
        # data parallel too under the distributed optimizer, whose gradients are DP shards).
        dist.all_reduce(squares, group=leaf.get_grad_stats_parallel_group())
        total = squares if total is None else total + squares.to(total.device)
    matrix, other = total.sqrt().tolist()
    return matrix, other


def learning_rates(optimizer) -> dict[str, float]:
    """LR of every param group of every rank, named ``<optimizer index>.<rule>`` (SphereMuon groups)
    or ``<optimizer index>.group<index>`` (Megatron's). Collective: pipeline stages hold different
    groups (the output layer's only on the last), so the names are gathered over the world."""
    local = {}
    for leaf_index, leaf in enumerate(leaf_optimizers(optimizer)):
        for group_index, group in enumerate(leaf.param_groups):
            local[f"{leaf_index}.{group.get('rule', f'group{group_index}')}"] = float(group["lr"])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)  # world: a few names and floats per rank, monitor steps only
    return {name: lr for rank_lrs in gathered for name, lr in sorted(rank_lrs.items())}


@torch.no_grad()
def sphere_radius_drift(optimizer) -> float | None:
    """max over sphere pieces (Q/K/V separately, experts separately) of ``| ||W|| / R - 1 |`` (each
    ``SphereMuon.radius_drift``, then a world MAX); None without sphere Muon."""
    spheres = sphere_optimizers(optimizer)
    if not spheres:
        return None
    drift = torch.stack([sphere.radius_drift() for sphere in spheres]).max()
    # World all-reduce (MAX): layers on PP stages, R only on the DP rank that updates a matrix.
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    return float(drift)


# ----------------------------------------------------------------------------------------------
# The monitor


def _transformer_layers(model_chunks) -> list:
    """(global 0-based layer index, layer) of this rank's pipeline stage."""
    layers = []
    for chunk in model_chunks:
        decoder = getattr(unwrap(chunk), "decoder", None)
        layers += [(layer.layer_number - 1, layer) for layer in getattr(decoder, "layers", [])]
    return layers


def _softmax_scale(core_attention, config) -> float:
    """The factor on q . k: the module's ``softmax_scale`` times the query-key layer-scaling
    coefficient its softmax multiplies back (Megatron local attention), else the config's."""
    scale = getattr(core_attention, "softmax_scale", None) or config.softmax_scale
    if scale is None:
        scale = 1.0 / math.sqrt(config.kv_channels)
    coefficient = getattr(getattr(core_attention, "scale_mask_softmax", None), "scale", None)
    return scale * (coefficient or 1.0)


def _positional(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs.get(name)


class StabilityMonitor:
    """Per-layer stability indicators on monitor steps (see the module docstring).

    Per monitor step, :class:`~hyperp_megatron.step.StepRunner` calls :meth:`start` (hooks on),
    :meth:`gradient_records` (after the gradients are reduced, before clipping) and :meth:`finish`
    (hooks off; reductions; returns the ``monitor/...`` records, the same on every rank).
    """

    def __init__(self, cfg: MonitorConfig, model_cfg: ModelConfig, model_chunks, optimizer, pg_collection):
        from hyperp_megatron.model.spec import branch_multiplier

        self.cfg = cfg
        self.optimizer = optimizer
        self.num_layers = model_cfg.num_layers
        self.num_experts = model_cfg.moe.num_routed_experts if model_cfg.moe.enabled else 0
        self.num_heads = model_cfg.num_attention_heads
        self.multiplier = branch_multiplier(model_cfg)
        self.tp_rank = pg_collection.tp.rank()
        self.layers = _transformer_layers(model_chunks)
        self.matrix_ids = hidden_matrix_ids(model_chunks)
        self.device = next(model_chunks[0].parameters()).device
        self.operator_norms = OperatorNormMonitor(cfg.operator_norms, cfg.power_iterations, model_chunks,
                                                  optimizer, pg_collection)
        self._handles: list = []
        self._stats = self._expert_counts = None

    def is_due(self, step: int) -> bool:
        """Whether 1-based optimizer step ``step`` is a monitor step."""
        return self.cfg.interval > 0 and step % self.cfg.interval == 0

    # ------------------------------------------------------------------ hooks

    def start(self) -> None:
        """Zero the accumulators and attach the hooks (until :meth:`finish`)."""
        assert not self._handles, "StabilityMonitor.start called twice"
        self._stats = torch.zeros(self.num_layers, len(LAYER_STATS), 2, dtype=torch.float64, device=self.device)
        # [0]: summed over the step's micro-batches; [1]: the latest micro-batch (overwritten per call)
        self._expert_counts = torch.zeros(2, self.num_layers, self.num_experts, dtype=torch.float64,
                                          device=self.device)
        for index, layer in self.layers:
            attention = getattr(layer, "self_attention", None)
            if hasattr(attention, "core_attention"):
                self._handles.append(attention.core_attention.register_forward_pre_hook(
                    functools.partial(self._on_core_attention, index), with_kwargs=True))
            branches = (("attn", attention), ("mlp", getattr(layer, "mlp", None)))
            for name, module in branches:
                if isinstance(module, torch.nn.Module):
                    self._handles.append(module.register_forward_hook(
                        functools.partial(self._on_branch_output, index, name)))
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if router is not None and self.num_experts:
                self._handles.append(router.register_forward_hook(functools.partial(self._on_router, index)))

    def _add(self, index: int, stat: str, total: torch.Tensor, count) -> None:
        self._stats[index, _STAT[stat], 0] += total.to(self.device)
        self._stats[index, _STAT[stat], 1] += count

    @torch.no_grad()
    def _on_core_attention(self, index: int, module, args: tuple, kwargs: dict) -> None:
        query, key = _positional(args, kwargs, 0, "query"), _positional(args, kwargs, 1, "key")
        mask = _positional(args, kwargs, 3, "attention_mask")
        if query.dim() != 4:  # packed sequences (thd): not monitored
            return
        local_heads = query.shape[2]
        first = self.tp_rank * local_heads  # this rank's heads are global heads first .. first + local - 1
        heads = evenly_spaced(self.num_heads, self.cfg.sample_heads)
        heads = heads[(heads >= first) & (heads < first + local_heads)] - first
        if heads.numel() == 0:
            return
        positions = evenly_spaced(query.shape[0], self.cfg.sample_tokens).to(query.device)
        lse = attention_logsumexp(query, key, _softmax_scale(module, module.config), positions,
                                  heads.to(query.device), mask)
        lse = lse[lse != float("-inf")]  # queries whose keys are all masked (padding) attend to nothing
        self._add(index, "attn_z", lse.double().pow(2).sum(), lse.numel())

    @torch.no_grad()
    def _on_branch_output(self, index: int, name: str, module, args, output) -> None:
        out, bias = output if isinstance(output, (tuple, list)) else (output, None)
        branch = out if bias is None else out + bias
        sum_sq, outliers, count = branch_statistics(branch, self.cfg.outlier_sigma).unbind()
        self._add(index, f"{name}_rms", sum_sq * self.multiplier**2, count)  # after the multiplier
        self._add(index, f"{name}_outlier_pct", outliers, count)  # scale-invariant

    @torch.no_grad()
    def _on_router(self, index: int, module, args, output) -> None:
        logits = module.gating(args[0]).reshape(-1, self.num_experts).float()  # the router's own GEMM
        lse = torch.logsumexp(logits, dim=-1)
        self._add(index, "router_z", lse.double().pow(2).sum(), lse.numel())
        routing_map = output[1][:, : self.num_experts]  # [tokens, experts] bool: top-k (phantom columns cut)
        counts = routing_map.sum(dim=0).to(self._expert_counts)
        self._expert_counts[0, index] += counts
        self._expert_counts[1, index] = counts

    # ------------------------------------------------------------------ results

    def gradient_records(self) -> dict:
        """Pre-clip gradient norms split hidden-matrix / other (collective)."""
        matrix, other = gradient_norms(self.optimizer, self.matrix_ids, self.device)
        return {f"{PREFIX}grad_norm_matrix": matrix, f"{PREFIX}grad_norm_other": other}

    def finish(self) -> dict:
        """Detach the hooks and return this step's records (collective; the same on every rank)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        flat = torch.cat([self._stats.flatten(), self._expert_counts.flatten()])
        # World all-reduce (SUM) of (sum, count) pairs and expert counts per global layer: see the
        # module docstring for why one world sum gives the TP=1 values for every layout.
        dist.all_reduce(flat)
        stats = flat[: self._stats.numel()].view_as(self._stats).cpu()
        expert_counts = flat[self._stats.numel():].view_as(self._expert_counts).cpu()
        records = self._layer_records(stats, expert_counts)
        records.update({f"{PREFIX}lr/{name}": lr for name, lr in learning_rates(self.optimizer).items()})
        drift = sphere_radius_drift(self.optimizer)
        if drift is not None:
            records[f"{PREFIX}sphere_radius_drift"] = drift
        records.update({f"{PREFIX}{name}": value for name, value in self.operator_norms.records().items()})
        return records

    def _layer_records(self, stats: torch.Tensor, expert_counts: torch.Tensor) -> dict:
        """Per-layer values and their mean over the layers that have them."""
        per_layer: dict[str, dict[int, float]] = {name: {} for name in (*LAYER_STATS, "maxvio", "maxvio_step")}
        for layer in range(self.num_layers):
            for name, index in _STAT.items():
                total, count = stats[layer, index].tolist()
                if count > 0:
                    value = total / count
                    per_layer[name][layer] = (math.sqrt(value) if name.endswith("_rms")
                                              else 100 * value if name.endswith("_pct") else value)
            for name, counts in (("maxvio_step", expert_counts[0, layer]), ("maxvio", expert_counts[1, layer])):
                if self.num_experts and counts.sum() > 0:
                    per_layer[name][layer] = float(max_violation(counts))
        records = {}
        for name, values in per_layer.items():
            if values:
                records[f"{PREFIX}{name}"] = layer_mean(name, list(values.values()))
                records.update({f"{PREFIX}{name}/layer{layer:02d}": value for layer, value in values.items()})
        return records


class SkipCounter:
    """Consecutive optimizer steps skipped by the non-finite guard (``StepRunner.train_step``)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0

    def record(self, skipped: bool) -> bool:
        """Count one step; True when ``limit`` steps in a row were skipped (the run must stop)."""
        self.consecutive = self.consecutive + 1 if skipped else 0
        return self.consecutive >= self.limit

    def error(self, step: int) -> NonFiniteTrainingError:
        return NonFiniteTrainingError(
            f"stopping at step {step}: {self.consecutive} consecutive steps had a non-finite loss or gradient "
            f"norm (monitor.max_consecutive_skips = {self.limit}); each was skipped, so the weights are those "
            f"after step {step - self.consecutive}. Lower the learning rate or resume from a checkpoint.")
