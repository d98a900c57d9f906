"""SphereMuon: the HyperP optimizer ("MuonH") on tensor-, expert- and data-parallel shards.

Update rules (HyperP, arXiv 2603.28743, section 1; Muon: K. Jordan et al., 2024, "Muon: An optimizer
for hidden layers in neural networks"), eta = group["lr"], one per step for every group:

``sphere_muon``  (hidden matrices; each fused-QKV piece and each expert is its own matrix)
    M <- mu M + G;   U = mu M + G                      (heavy ball, Nesterov, mu = 0.95)
    O = NS5(U)                                         (TP-invariant quintic Newton-Schulz)
    W <- W (1 - eta wd)                                (wd = 0 by default; cannot shrink R)
    W <- W - eta (R / ||O||) O                         (a step of norm eta R: eta is an angle)
    W <- W R / ||W||                                   (retraction; R = ||W_0||, stored once)
``sphere_adam``  (output layer): the same sphere step with D = m_hat / (sqrt(v_hat) + eps) for O.
``adamw``        (embeddings, norm gains, biases): AdamW, betas (0.9, 0.95), eps 1e-8, wd 0.
``muon``         (baseline): W <- W (1 - eta wd) - eta sqrt(fan_out / fan_in) O.

Weight decay per step is ``eta(t) wd`` (decoupled, AdamW's convention) or, for a group with
``decay_peak_lr = eta_peak``, ``(eta(t) / eta_peak) wd`` ("independent" weight decay, Wortsman et al.,
arXiv 2309.14322): it follows the schedule's shape but not the LR's size. The Muon baseline uses the latter
with ``wd = wd0 d0 / d``, as the HyperP reference does.

The rules' tensor math is in ``optim/updates.py``, the per-parameter layout in ``optim/layout.py``; this
module orchestrates a step. Distributed form. Each parameter comes with a ``ParamLayout`` saying which
group shards it:
- Newton-Schulz is done on the whole matrix ("gather") or with all-reduced Gram matrices
  ("distributed"), see ``newton_schulz.orthogonalize``. The step (``optim/sphere_batched.py``) batches
  every same-shape matrix piece of all layers (momentum, Newton-Schulz, statistics, retraction); shared
  spheres (``ParamLayout.sphere_key``) are a case of it (their members' statistics summed).
- The sphere needs ``||W||^2``, ``<W, D>`` and ``||D||^2`` per matrix (per Q/K/V piece, per expert).
  ``||W - s D||^2`` is expanded from these three, so the retraction needs no second reduction: all
  scalars of one step that belong to one process group travel in ONE flat buffer, ONE all-reduce.
- No host synchronization: every branch depends on Python-side structure only.
- Layer-wise data parallel (optional): whole matrices are assigned to DP ranks by Newton-Schulz
  cost; a rank updates (and keeps state for) only its own, then the parameters are all-gathered.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Mapping, NamedTuple

import torch
import torch.distributed as dist

from hyperp_megatron.optim import sphere_batched
from hyperp_megatron.optim.layout import (
    MATRIX_RULES,
    SPHERE_RULES,
    ParamLayout,
    PlannedParam,
    newton_schulz_cost,
)
from hyperp_megatron.optim.newton_schulz import NS_MODES, supports_distributed_mode
from hyperp_megatron.optim.sphere_batched import sum_shared_spheres
from hyperp_megatron.optim.updates import adam_direction, adamw_step, decay_factor, retracted_sphere_step

logger = logging.getLogger(__name__)

NS_COMPUTE_DTYPES = (None, torch.float32, torch.bfloat16)


class MatrixPiece(NamedTuple):
    """One matrix a Newton-Schulz rule updates, as this rank holds it (:meth:`SphereMuon.matrix_pieces`)."""

    param: torch.Tensor  # the parameter it is part of
    index: int  # Q, K, V = 0, 1, 2 of a fused QKV; else 0
    local: torch.Tensor  # this rank's shard of the piece (a copy for Q, K, V, else a view)
    group: dist.ProcessGroup | None  # the group sharding it (None: whole here)
    partition_dim: int | None
    is_expert: bool


def assign_to_ranks(costs: list[float], num_ranks: int) -> list[int]:
    """Greedy longest-processing-time assignment: biggest cost first, to the least loaded rank."""
    loads = [0.0] * num_ranks
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = min(range(num_ranks), key=lambda r: loads[r])
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


class SphereMuon(torch.optim.Optimizer):
    """HyperP sphere Muon over sharded parameters (see the module docstring for the math).

    Args:
        params: parameters or param groups (torch convention); groups may override lr, momentum,
            betas, eps and weight_decay.
        layouts: a ``ParamLayout`` for every parameter (keyed by the tensor itself).
        lr: eta; the trainer sets ``group["lr"]`` from the schedule each step.
        momentum: mu of the Nesterov heavy-ball momentum (matrix rules).
        betas, eps: Adam moments (sphere_adam, adamw).
        decay_peak_lr: None (default): decay ``eta(t) wd`` per step; a float ``eta_peak``: independent
            decay ``(eta(t) / eta_peak) wd`` per step (per group; the Muon baseline's groups set it).
        weight_decay: decoupled, ``W <- W (1 - eta wd)`` before the step; on a sphere it only
            changes the step to second order in eta.
        ns_mode: "gather" (default) or "distributed" (Gram all-reduce; matrices sharded along their
            short side fall back to "gather", logged) or "blockwise" (NOT TP-invariant: controls only).
        ns_compute_dtype: None (fp32 state dtype) or torch.bfloat16 for the Newton-Schulz iterations.
        layer_wise_dp_group / layer_wise_expert_dp_group: the data-parallel group over which dense /
            expert (``is_expert``) parameters are split layer-wise; None = updated on every rank.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        layouts: Mapping[torch.Tensor, ParamLayout],
        *,
        lr: float,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay_peak_lr: float | None = None,
        ns_mode: str = "gather",
        ns_compute_dtype: torch.dtype | None = None,
        layer_wise_dp_group: dist.ProcessGroup | None = None,
        layer_wise_expert_dp_group: dist.ProcessGroup | None = None,
    ) -> None:
        if ns_mode not in NS_MODES:
            raise ValueError(f"ns_mode must be one of {NS_MODES}, got {ns_mode!r}")
        if ns_compute_dtype not in NS_COMPUTE_DTYPES:
            raise ValueError(f"ns_compute_dtype must be one of {NS_COMPUTE_DTYPES}, got {ns_compute_dtype!r}")
        self.ns_mode = ns_mode
        self.ns_compute_dtype = ns_compute_dtype
        self.layer_wise_dp_group = layer_wise_dp_group
        self.layer_wise_expert_dp_group = layer_wise_expert_dp_group
        self._batches: tuple[tuple, list[sphere_batched.MatrixBatch]] = ((), [])
        self._layout_by_param_id = {id(param): layout for param, layout in layouts.items()}
        self._plan: list[PlannedParam] | None = None
        defaults = dict(lr=lr, momentum=momentum, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decay_peak_lr=decay_peak_lr)
        super().__init__(params, defaults)
        self._get_plan()  # surfaces layout errors now; rebuilt lazily after add_param_group

    # ------------------------------------------------------------------ construction and checks

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_hyperparameters(group, len(self.param_groups) - 1)
        for index, param in enumerate(group["params"]):
            where = f"param group {len(self.param_groups) - 1}, parameter {index} {tuple(param.shape)}"
            layout = self._layout_by_param_id.get(id(param))
            if layout is None:
                raise ValueError(f"{where} has no ParamLayout: pass one in `layouts` for every parameter")
            _validate_layout_for_param(layout, param, where)
        self._plan = None

    def _get_plan(self) -> list[PlannedParam]:
        if self._plan is None:
            self._plan = self._build_plan()
        return self._plan

    def _planned_by_id(self) -> dict[int, PlannedParam]:
        return {id(planned.param): planned for planned in self._get_plan()}

    def _build_plan(self) -> list[PlannedParam]:
        plan = []
        for group_index, group in enumerate(self.param_groups):
            for param in group["params"]:
                layout = self._layout_by_param_id[id(param)]
                shard_count = 1 if layout.group is None else dist.get_world_size(layout.group)
                split = layout.qkv_split
                planned = PlannedParam(
                    param=param,
                    layout=layout,
                    group_index=group_index,
                    shard_count=shard_count,
                    num_row_groups=split.num_local_query_groups if split else 1,
                    piece_rows=split.piece_rows if split else (param.size(0),),
                    ns_mode=self.ns_mode,
                )
                planned.ns_mode = self._ns_mode_for(planned)
                plan.append(planned)
        for dp_group, is_expert in self._layer_wise_groups():
            if any(p.layout.sphere_key is not None and p.layout.is_expert == is_expert for p in plan):
                raise ValueError("shared spheres (sphere_key, optim.expert_sphere per_layer) need every member "
                                 "updated on the same rank: not supported with layer-wise data parallelism")
            _assign_layer_wise_owners([p for p in plan if p.layout.is_expert == is_expert], dp_group)
        return plan

    def _layer_wise_groups(self) -> list[tuple[dist.ProcessGroup, bool]]:
        """(DP group, is_expert) of each parameter family split layer-wise over data parallel."""
        groups = [(self.layer_wise_dp_group, False), (self.layer_wise_expert_dp_group, True)]
        return [(group, is_expert) for group, is_expert in groups if group is not None]

    def _ns_mode_for(self, planned: PlannedParam) -> str:
        is_sharded_matrix = planned.shard_count > 1 and planned.layout.rule in MATRIX_RULES
        if self.ns_mode != "distributed" or not is_sharded_matrix:
            return self.ns_mode
        partition_dim = planned.layout.partition_dim
        if all(supports_distributed_mode(shape, partition_dim) for shape in planned.full_piece_shapes()):
            return "distributed"
        logger.info(
            "SphereMuon: matrices %s are sharded along their short side (dim %d): gather-mode "
            "Newton-Schulz instead of distributed", planned.full_piece_shapes(), partition_dim,
        )
        return "gather"

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One step of every parameter updated here with a gradient: the matrix rules batched across layers
        (``sphere_batched``), the others per parameter (``updates``); one all-reduce per process group for
        all sphere scalars (plus one per sphere group for shared spheres); no host synchronization."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owned = [p for p in self._get_plan() if p.updated_here and p.param.grad is not None]
        matrices = [p for p in owned if p.layout.rule in MATRIX_RULES]
        others = [p for p in owned if p.layout.rule not in MATRIX_RULES]
        directions = {p: adam_direction(p.param.grad.float(), self.state[p.param],
                                         self.param_groups[p.group_index]["betas"],
                                         self.param_groups[p.group_index]["eps"]) for p in others}
        if self._batches[0] != tuple(matrices):  # the plan or the set of parameters with gradients changed
            self._batches = (tuple(matrices), sphere_batched.build_batches(matrices))
        batches = self._batches[1]
        fresh = sphere_batched.fresh_spheres(matrices, self.state)
        updates = sphere_batched.nesterov_momentum(matrices, self.state, self.param_groups)
        orthogonal = [sphere_batched.orthogonalize_batch(b, updates, self.ns_compute_dtype) for b in batches]
        del updates
        weights, entries = [], []
        for batch, directions_of_batch in zip(batches, orthogonal):
            if batch.rule == "sphere_muon":
                stacked, stats = sphere_batched.weights_and_stats(batch, directions_of_batch)
                entries.append((batch.first.shard_group, stats))
            else:
                stacked = sphere_batched.stack_pieces(batch, {p: p.param for p, _ in batch.items})
            weights.append(stacked)
        spheres = [batch for batch in batches if batch.rule == "sphere_muon"]
        adam_spheres = [p for p in others if p.layout.rule == "sphere_adam"]
        entries += [(p.shard_group, _local_sphere_stats(p, directions[p])) for p in adam_spheres]
        summed = sphere_batched.all_reduce_by_group(entries)  # ONE all-reduce per group
        sphere_stats = iter(sphere_batched.share_batched_spheres(spheres, summed[:len(spheres)]))
        for index, batch in enumerate(batches):
            hyper = self.param_groups[batch.group_index]
            if batch.rule == "sphere_muon":
                sphere_batched.sphere_update(batch, weights[index], orthogonal[index], next(sphere_stats),
                                             self.state, fresh, hyper["lr"], decay_factor(hyper))
            else:
                sphere_batched.muon_update(batch, weights[index], orthogonal[index], hyper["lr"], decay_factor(hyper))
        sphere_batched.write_back(batches, weights)
        adam_stats = sphere_batched.sum_shared_spheres(adam_spheres, summed[len(spheres):])
        for planned, stats in zip(adam_spheres, adam_stats):
            retracted_sphere_step(planned, directions[planned], stats, self.state[planned.param],
                                  self.param_groups[planned.group_index])
        for planned in others:
            if planned.layout.rule == "adamw":
                adamw_step(planned, directions[planned], self.param_groups[planned.group_index])
        self._all_gather_layer_wise_params()
        return loss

    def _all_gather_layer_wise_params(self) -> None:
        for dp_group, is_expert in self._layer_wise_groups():
            family = [p for p in self._get_plan() if p.layout.is_expert == is_expert]
            _all_gather_owned_params(family, dp_group)

    # ------------------------------------------------------------------ wrappers and checkpoints

    def replace_params(self, replacements: Mapping[torch.Tensor, torch.Tensor]) -> None:
        """``param_groups`` now hold ``new`` where they held ``old`` (``{old: new}``): e.g. the fp32
        master copies a mixed-precision wrapper puts in place of bf16 model parameters. Layouts (and
        any state) carry over; the plan is rebuilt."""
        for old, new in replacements.items():
            self._layout_by_param_id[id(new)] = self._layout_by_param_id.pop(id(old))
            if old in self.state:
                self.state[new] = self.state.pop(old)
        held = {id(p) for group in self.param_groups for p in group["params"]}
        assert all(id(new) in held for new in replacements.values()), "replace_params: new tensor not in a group"
        self._plan = None
        self._get_plan()

    def layout(self, param: torch.Tensor) -> ParamLayout:
        return self._layout_by_param_id[id(param)]

    def num_pieces(self, param: torch.Tensor) -> int:
        """Matrices (spheres) inside ``param``: 3 for a fused QKV, else 1."""
        split = self.layout(param).qkv_split
        return len(split.piece_rows) if split is not None else 1

    def is_updated_here(self, param: torch.Tensor) -> bool:
        """False on the DP ranks that do not own ``param`` in layer-wise mode (they keep no state)."""
        return self._planned_by_id()[id(param)].updated_here

    def is_layer_wise(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s updates (and state) are split over data-parallel ranks."""
        is_expert = self.layout(param).is_expert
        return any(flag == is_expert for _, flag in self._layer_wise_groups())

    # ------------------------------------------------------------------ monitoring

    @torch.no_grad()
    def radius_drift(self) -> torch.Tensor:
        """max of ``| ||W|| / R - 1 |`` over the sphere pieces (Q, K, V separately; experts separately) whose
        radius ``R`` is held here, as a float64 scalar on the parameters' device (0 when none is).

        Collective: ``||W||^2`` is summed over each group that shards the sphere matrices (one all-reduce per
        group; every rank of the group holds the same matrices, so the collectives line up) and shared spheres
        over their sphere group. ``R`` lives only where a matrix is updated (layer-wise DP: one DP rank), so
        the caller reduces the result with MAX over the data-parallel (or whole) world."""
        by_group: dict[int, tuple] = {}
        for planned in self._get_plan():
            if planned.layout.rule not in SPHERE_RULES:
                continue
            weight = planned.param.detach().float()
            radius = self.state.get(planned.param, {}).get("radius")
            group = planned.shard_group
            by_group.setdefault(id(group), (group, []))[1].append((planned, planned.piece_sums(weight, weight), radius))
        drift = torch.zeros((), dtype=torch.float64, device=self.param_groups[0]["params"][0].device)
        for group, items in by_group.values():
            flat = torch.cat([squares for _, squares, _ in items])
            if group is not None:
                dist.all_reduce(flat, group=group)  # the TP / expert-TP group sharding these matrices
            # Shared spheres (optim.expert_sphere per_layer): the norm of all members together (EP all-reduce).
            summed = sum_shared_spheres([planned for planned, _, _ in items],
                                        list(flat.split([len(squares) for _, squares, _ in items])))
            for squares, (_, _, radius) in zip(summed, items):
                if radius is not None:
                    drift = torch.maximum(drift, (squares.sqrt() / radius - 1).abs().max().double())
        return drift

    def matrix_pieces(self) -> list[MatrixPiece]:
        """Every matrix a Newton-Schulz rule (sphere_muon, muon) updates, as the step sees it: each piece of a
        fused QKV and each expert separately, with the group that shards it. In plan order (the same on every
        rank of a group). Call it when the current weights are wanted (Q, K, V pieces are copies)."""
        pieces = []
        for planned in self._get_plan():
            if planned.layout.rule not in MATRIX_RULES:
                continue
            for index, local in enumerate(planned.split_pieces(planned.param.detach())):
                pieces.append(MatrixPiece(planned.param, index, local, planned.shard_group,
                                          planned.layout.partition_dim, planned.layout.is_expert))
        return pieces

    # ------------------------------------------------------------------ state

    def init_state(self) -> None:
        """Create (zero) state for every parameter updated here, so that a checkpoint can be loaded
        into it. Only for loading: a zero ``radius`` is overwritten by the checkpoint's."""
        for planned in self._get_plan():
            state = self.state[planned.param]
            if not planned.updated_here or state:
                continue
            rule = planned.layout.rule
            if rule in MATRIX_RULES:
                state["momentum_buffer"] = torch.zeros_like(planned.param, dtype=torch.float32)
            else:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(planned.param, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(planned.param, dtype=torch.float32)
            if rule in SPHERE_RULES:
                state["radius"] = torch.zeros(len(planned.piece_rows), dtype=torch.float32,
                                              device=planned.param.device)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts floating state to the parameter dtype; keep it fp32 (and a private copy)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value):
                    self.state[param][key] = value.to(device=param.device, dtype=torch.float32, copy=True)


# ---------------------------------------------------------------------- validation helpers


def _validate_hyperparameters(group: dict, group_index: int) -> None:
    where = f"param group {group_index}"
    lr, momentum, eps, weight_decay = group["lr"], group["momentum"], group["eps"], group["weight_decay"]
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{where}: lr must be a finite float >= 0, got {lr!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where}: momentum must be in [0, 1) (HyperP uses 0.95), got {momentum!r}")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"{where}: betas must be two floats in [0, 1) (HyperP: (0.9, 0.95)), got {betas!r}")
    if not eps > 0:
        raise ValueError(f"{where}: eps must be > 0 (HyperP: 1e-8), got {eps!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"{where}: weight_decay must be >= 0 (HyperP: 0), got {weight_decay!r}")
    peak = group["decay_peak_lr"]
    if peak is not None and not (isinstance(peak, (int, float)) and math.isfinite(peak) and peak > 0):
        raise ValueError(f"{where}: decay_peak_lr must be None or a positive float (the peak LR), got {peak!r}")


def _validate_layout_for_param(layout: ParamLayout, param: torch.Tensor, where: str) -> None:
    if layout.rule != "adamw" and param.dim() != 2:
        raise ValueError(f"{where}: rule {layout.rule!r} needs a 2-D matrix; use 'adamw' for this tensor")
    split = layout.qkv_split
    if split is not None:
        rows = split.num_local_query_groups * sum(split.piece_rows)
        if param.size(0) != rows:
            raise ValueError(
                f"{where}: qkv_split {split} describes {rows} local rows, the parameter has {param.size(0)}"
            )
    if layout.group is not None and not dist.is_initialized():
        raise ValueError(f"{where}: its layout names a process group; initialize torch.distributed first")


# ---------------------------------------------------------------------- layer-wise data parallel; reductions over shards


def _assign_layer_wise_owners(planned_params: list[PlannedParam], dp_group: dist.ProcessGroup) -> None:
    """Whole matrices to DP ranks, balanced by update cost; the same result on every DP rank."""
    costs = []
    for planned in planned_params:
        if planned.layout.rule in MATRIX_RULES:
            costs.append(sum(newton_schulz_cost(shape) for shape in planned.full_piece_shapes()))
        else:
            costs.append(planned.param.numel())  # elementwise rules: cost ~ size
    owners = assign_to_ranks(costs, dist.get_world_size(dp_group))
    for planned, owner in zip(planned_params, owners):
        planned.owner_rank = owner
        planned.updated_here = owner == dist.get_rank(dp_group)


def _all_gather_owned_params(planned_params: list[PlannedParam], dp_group: dist.ProcessGroup) -> None:
    """Every DP rank contributes the parameters it updated; afterwards all ranks hold all of them."""
    num_ranks, rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    for dtype in sorted({p.param.dtype for p in planned_params}, key=str):
        by_owner = [[p.param for p in planned_params if p.owner_rank == r and p.param.dtype == dtype]
                    for r in range(num_ranks)]
        sizes = [sum(param.numel() for param in params) for params in by_owner]
        device = planned_params[0].param.device
        local = torch.zeros(max(sizes), dtype=dtype, device=device)  # padded: gloo needs equal sizes
        if by_owner[rank]:
            torch.cat([param.reshape(-1) for param in by_owner[rank]], out=local[: sizes[rank]])
        gathered = [torch.empty_like(local) for _ in range(num_ranks)]
        # DP group: the owner of a matrix is one DP rank; every replica needs the new values.
        dist.all_gather(gathered, local, group=dp_group)
        for owner, params in enumerate(by_owner):
            if owner == rank:
                continue
            flat_values = gathered[owner][: sizes[owner]].split([param.numel() for param in params])
            for param, values in zip(params, flat_values):
                param.copy_(values.view_as(param))


def _local_sphere_stats(planned: PlannedParam, direction: torch.Tensor) -> torch.Tensor:
    """(3, num_pieces): this rank's partial sums ||W||^2, <W, D>, ||D||^2 of each piece."""
    weight = planned.param.float()
    return torch.stack([planned.piece_sums(weight, weight), planned.piece_sums(weight, direction),
                        planned.piece_sums(direction, direction)])


# ---------------------------------------------------------------------- inside Megatron's wrappers


def leaf_optimizers(optimizer) -> list:
    """Megatron optimizers inside a (possibly chained) Megatron optimizer, in a rank-independent order."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is None:
        return [optimizer]
    return [leaf for inner in chained for leaf in leaf_optimizers(inner)]


def sphere_optimizers(optimizer) -> list[SphereMuon]:
    """The SphereMuon instances inside a Megatron optimizer (``optim/builder.py``; empty under AdamW)."""
    found = []
    for leaf in leaf_optimizers(optimizer):
        inner = leaf
        while inner is not None and not isinstance(inner, SphereMuon):
            inner = getattr(inner, "optimizer", None)
        if inner is not None:
            found.append(inner)
    return found
