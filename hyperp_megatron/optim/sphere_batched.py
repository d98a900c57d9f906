"""The matrix rules of ``SphereMuon`` (``sphere_muon``, ``muon``), batched across layers: its one production step.

Every matrix piece (a whole matrix, or one Q/K/V piece of a fused QKV) of the rules ``sphere_muon`` and
``muon`` joins the batch of all pieces with the same local shape, sharding (group, partitioned dim,
Newton-Schulz mode), rule and param group, across layers:

- momentum: three ``torch._foreach_*`` calls for all matrices of a param group (state stays per parameter,
  so checkpoints do not change);
- Newton-Schulz: one stacked call per batch (batched matmuls; the same collectives per batch as before);
- sphere statistics ``||W||^2``, ``<W, D>``, ``||D||^2``: one batched matmul of the stacked ``[W, D]`` pairs;
  the statistics of every batch (and of the per-parameter ``sphere_adam`` rule) that belong to one
  process group go in ONE all-reduce, none when nothing is sharded;
- shared spheres (``ParamLayout.sphere_key``, e.g. all routed experts of a layer on one sphere): the
  statistics of their members are summed (:func:`sum_shared_spheres`, one more all-reduce over the
  expert-parallel group) before the step, which is then the same as for any other sphere;
- retraction ``W <- R (c W - s D) / ||c W - s D||``: elementwise on the stack with per-matrix scalars
  (``updates.sphere_scales``; no host sync), written back with one ``torch._foreach_copy_``.

The radius of each piece is read from the per-parameter state once and kept stacked per batch (it is
constant; the cache is rebuilt when a state tensor is replaced or modified, e.g. by loading a checkpoint).
``optim/reference.py`` is the single-device parity target of this step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hyperp_megatron.optim.newton_schulz import orthogonalize
from hyperp_megatron.optim.updates import sphere_scales

SPHERE_RULE = "sphere_muon"


@dataclass(eq=False)
class MatrixBatch:
    """Same-shape pieces ``(planned, piece_index)`` updated together; ``planned`` is a ``_PlannedParam``."""

    items: list[tuple[object, int]]
    rule: str
    group_index: int
    full_shape: tuple[int, int]
    radius: torch.Tensor | None = None  # (batch,) fp32, stacked from the state
    radius_key: tuple = field(default_factory=tuple)  # ((state tensor, its _version), ...) it came from

    @property
    def first(self):
        return self.items[0][0]

    @property
    def whole(self) -> bool:
        """Every piece is a whole parameter (no fused QKV): stacks and write-backs need no splitting."""
        return all(len(planned.piece_rows) == 1 for planned, _ in self.items)


def build_batches(matrices: list) -> list[MatrixBatch]:
    """Batches of the matrix pieces in parameter order (the same on every rank: collectives line up)."""
    batches: dict[tuple, MatrixBatch] = {}
    for planned in matrices:
        layout = planned.layout
        sharding = (id(planned.shard_group), layout.partition_dim, planned.ns_mode)
        full_shapes = planned.full_piece_shapes()
        for piece_index, rows in enumerate(planned.piece_rows):
            shape = (planned.num_row_groups * rows, planned.param.size(-1))
            key = (shape, *sharding, layout.rule, planned.group_index)
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = MatrixBatch([], layout.rule, planned.group_index, full_shapes[piece_index])
            batch.items.append((planned, piece_index))
    return list(batches.values())


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def nesterov_momentum(matrices: list, state: dict, param_groups: list[dict]) -> dict:
    """``M <- mu M + G; U = mu M + G`` for every matrix, foreach per param group: planned -> U."""
    updates = {}
    by_group: dict[int, list] = {}
    for planned in matrices:
        by_group.setdefault(planned.group_index, []).append(planned)
    for group_index, members in by_group.items():
        momentum = param_groups[group_index]["momentum"]
        grads = [_fp32(planned.param.grad) for planned in members]
        buffers = []
        for planned, grad in zip(members, grads):
            param_state = state[planned.param]
            if "momentum_buffer" not in param_state:
                param_state["momentum_buffer"] = torch.zeros_like(grad, dtype=torch.float32)
            buffers.append(param_state["momentum_buffer"])
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        updates.update(zip(members, torch._foreach_add(grads, buffers, alpha=momentum)))
    return updates


def stack_pieces(batch: MatrixBatch, tensors: dict, extra: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(batch, m, n): piece ``i`` of ``tensors[planned]`` for every item. With ``extra`` (one (m, n) tensor
    per item): (batch, 2, m, n), the item's piece then its extra tensor, in one stack."""
    if batch.whole:
        pieces = [_fp32(tensors[planned]) for planned, _ in batch.items]
    else:
        pieces = [_fp32(planned.split_pieces(tensors[planned])[index]) for planned, index in batch.items]
    if extra is None:
        return torch.stack(pieces)
    stacked = torch.stack([tensor for pair in zip(pieces, extra) for tensor in pair])
    return stacked.view(len(pieces), 2, *stacked.shape[1:])


def orthogonalize_batch(batch: MatrixBatch, updates: dict, compute_dtype) -> torch.Tensor:
    """NS5 of the stacked momentum updates of a batch: (batch, m, n) fp32."""
    first = batch.first
    return orthogonalize(stack_pieces(batch, updates), group=first.shard_group,
                         partition_dim=first.layout.partition_dim, mode=first.ns_mode, compute_dtype=compute_dtype)


def weights_and_stats(batch: MatrixBatch, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked weights (a copy, fp32) and the local (batch, 4) sums ``[W.W, W.D, D.W, D.D]``."""
    params = {planned: planned.param for planned, _ in batch.items}
    pairs = stack_pieces(batch, params, extra=list(directions.unbind()))  # (batch, 2, m, n)
    flat = pairs.flatten(2)  # (batch, 2, m n)
    stats = torch.bmm(flat, flat.mT).flatten(1)  # (batch, 4)
    return pairs[:, 0], stats


def all_reduce_by_group(entries: list[tuple[object, torch.Tensor]]) -> list[torch.Tensor]:
    """Sum each tensor over its process group (None: kept); ONE all-reduce per group for all its tensors,
    groups in order of first appearance (the same on every rank)."""
    out = [tensor for _, tensor in entries]
    by_group: dict[int, tuple[object, list[int]]] = {}
    for index, (group, _) in enumerate(entries):
        if group is not None:
            by_group.setdefault(id(group), (group, []))[1].append(index)
    for group, indices in by_group.values():
        flat = torch.cat([out[i].reshape(-1) for i in indices])
        # group = the TP / expert-TP group that shards these matrices: the norms are sums over its shards.
        dist.all_reduce(flat, group=group)
        for i, chunk in zip(indices, flat.split([out[i].numel() for i in indices])):
            out[i] = chunk.view_as(out[i])
    return out


def fresh_spheres(matrices: list, state: dict) -> set:
    """The sphere matrices without a radius yet (their first step): a zero radius per piece to be filled."""
    fresh = set()
    for planned in matrices:
        param_state = state[planned.param]
        if planned.layout.rule == SPHERE_RULE and "radius" not in param_state:
            param_state["radius"] = torch.zeros(len(planned.piece_rows), dtype=torch.float32,
                                                device=planned.param.device)
            fresh.add(planned)
    return fresh


def _radius(batch: MatrixBatch, state: dict, weight_sq: torch.Tensor, fresh: set) -> torch.Tensor:
    """(batch,) R per piece: from the state, stacked once and cached; at the first step R = ||W_0||
    (stored per parameter, before any decay)."""
    if any(planned in fresh for planned, _ in batch.items):
        for (planned, index), value in zip(batch.items, weight_sq.unbind()):
            if planned in fresh:
                state[planned.param]["radius"][index] = value.sqrt()
    sources = [state[planned.param]["radius"] for planned, _ in batch.items]
    versions = [source._version for source in sources]
    # The cache holds the source tensors themselves (not ids, which a replaced tensor's successor may reuse).
    cached = batch.radius_key
    if batch.radius is None or len(cached) != len(sources) or any(
            old is not new or old_version != version
            for (old, old_version), new, version in zip(cached, sources, versions)):
        batch.radius = torch.stack([source[index] for source, (_, index) in zip(sources, batch.items)])
        batch.radius_key = tuple(zip(sources, versions))
    return batch.radius


def sphere_update(batch: MatrixBatch, weights: torch.Tensor, directions: torch.Tensor, stats: torch.Tensor,
                  state: dict, fresh: set, lr: float, decay: float) -> torch.Tensor:
    """New weights (batch, m, n) = R (c W - s D) / ||c W - s D||, s = eta R / ||D||, from the summed
    stats; the norm of ``c W - s D`` is expanded from them (no second reduction). In place on ``weights``."""
    weight_sq, weight_dot_direction, _, direction_sq = stats.unbind(1)
    radius = _radius(batch, state, weight_sq, fresh)
    weight_scale, direction_scale = sphere_scales(radius, weight_sq, weight_dot_direction, direction_sq, lr, decay)
    weights.mul_(weight_scale.view(-1, 1, 1))
    return weights.addcmul_(directions, direction_scale.view(-1, 1, 1), value=-1.0)


def muon_update(batch: MatrixBatch, weights: torch.Tensor, orthogonal: torch.Tensor, lr: float,
                decay: float) -> torch.Tensor:
    """W <- W c - eta sqrt(fan_out / fan_in) O (fan sizes of the whole piece), in place on ``weights``."""
    rows, cols = batch.full_shape
    return weights.mul_(decay).add_(orthogonal, alpha=-lr * math.sqrt(rows / cols))


def write_back(batches: list[MatrixBatch], new_weights: list[torch.Tensor]) -> None:
    """Copy the updated stacks into the parameters: one foreach copy for whole matrices, fused QKV
    parameters merged from their pieces."""
    targets, sources, pieces_of = [], [], {}
    for batch, stacked in zip(batches, new_weights):
        if batch.whole:
            targets += [planned.param for planned, _ in batch.items]
            sources += list(stacked.unbind())
            continue
        for (planned, index), piece in zip(batch.items, stacked.unbind()):
            pieces_of.setdefault(planned, {})[index] = piece
    if targets:
        torch._foreach_copy_(targets, sources)
    for planned, pieces in pieces_of.items():
        planned.param.copy_(planned.merge_pieces([pieces[i] for i in sorted(pieces)]))


def sum_shared_spheres(members: list, stats_list: list[torch.Tensor]) -> list[torch.Tensor]:
    """Members (``PlannedParam``) with the same ``layout.sphere_key`` form one sphere: each gets the sum of
    their (whole-matrix) statistics, over the local members and then over ``layout.sphere_group`` (one
    all-reduce per group, all keys in one flat buffer). Others keep their own. Each member's stats hold one
    piece (no fused QKV); any shape."""
    keyed: dict[tuple, list[int]] = {}
    for index, planned in enumerate(members):
        if planned.layout.sphere_key is not None:
            group = planned.layout.sphere_group
            keyed.setdefault((id(group), planned.layout.sphere_key), []).append(index)
    if not keyed:
        return stats_list
    out = list(stats_list)
    by_group: dict[int, tuple] = {}
    for (group_id, _), indices in keyed.items():  # keys in parameter order: the same on every rank
        group = members[indices[0]].layout.sphere_group
        by_group.setdefault(group_id, (group, []))[1].append(indices)
    for group, index_lists in by_group.values():
        flat = torch.stack([torch.stack([stats_list[i] for i in indices]).sum(dim=0) for indices in index_lists])
        if group is not None and dist.get_world_size(group) > 1:
            # The expert-parallel group: the other members of each sphere (other experts of the layer) live there.
            dist.all_reduce(flat, group=group)
        for total, indices in zip(flat.unbind(), index_lists):
            for i in indices:
                out[i] = total
    return out


def share_batched_spheres(batches: list[MatrixBatch], stats: list[torch.Tensor]) -> list[torch.Tensor]:
    """The (batch, 4) statistics of the ``sphere_muon`` batches with each shared sphere's members summed
    (:func:`sum_shared_spheres`); unchanged (no op) when no matrix has a ``sphere_key``."""
    members = [planned for batch in batches for planned, _ in batch.items]
    if all(planned.layout.sphere_key is None for planned in members):
        return stats
    rows = sum_shared_spheres(members, [row for batch_stats in stats for row in batch_stats.unbind()])
    out, start = [], 0
    for batch in batches:
        out.append(torch.stack(rows[start:start + len(batch.items)]))
        start += len(batch.items)
    return out
