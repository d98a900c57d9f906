"""Operator norms of weight matrices for the stability monitors (issue 17, "norm transfer").

Filatov et al., "Optimal Scaling Needs Optimal Norm" (arXiv 2510.03871), found that the optimal
(learning rate, batch size) pairs of a model family share one operator norm of the output layer. Two norms
of a matrix ``W`` of shape (fan_out, fan_in) are logged:

``rms_inf``  the RMS -> infinity norm ``sqrt(fan_in) * max_i ||row_i(W)||_2`` (the paper's norm of the
             output layer, whose rows are the vocabulary entries);
``rms_rms``  the RMS -> RMS norm ``sqrt(fan_in / fan_out) * sigma_max(W)``, ``sigma_max`` from a few power
             iterations whose vector is kept between calls (warm start: the weights move little between
             monitor steps, so a couple of iterations per call track ``sigma_max`` closely).

Sharded matrices. A matrix split over a process group along ``partition_dim`` (0: rows, e.g. the
vocab-parallel output layer; 1: columns, row-parallel layers) is never gathered: row norms are local and
their maximum is reduced with MAX; the power iteration runs on ``W^T W`` (rows sharded: the vector lives on
the replicated column space) or on ``W W^T`` (columns sharded: the vector lives on the replicated row space),
so each iteration is one local product pair plus ONE sum all-reduce of the new vector per group, for all
matrices of that group together. The start vector depends only on the length of the replicated dimension
(a fixed seed), so every layout computes the same numbers as one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hyperp_megatron.model.params import unwrap
from hyperp_megatron.optim.sphere_muon import sphere_optimizers

START_SEED = 20251003
"""Seed of the power iteration's start vectors (the same on every rank and layout)."""


@dataclass(eq=False)
class ShardedMatrix:
    """One matrix as this rank holds it: its local shard, the group that shards it and along which dim.

    local: (rows_local, cols_local). group None (or of size 1) = the whole matrix is here.
    """

    local: torch.Tensor
    group: dist.ProcessGroup | None = None
    partition_dim: int | None = None

    @property
    def shards(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def full_shape(self) -> tuple[int, int]:
        rows, cols = self.local.shape
        if self.partition_dim == 0:
            rows *= self.shards
        elif self.partition_dim == 1:
            cols *= self.shards
        return rows, cols

    @property
    def iterates_on_rows(self) -> bool:
        """True: the vector lives in the row space (power iteration on W W^T) because the columns are (or,
        with another layout, would be) sharded. A row-parallel matrix iterates on rows even unsharded, so that
        the few iterations give the same estimate for every tensor-parallel size."""
        return self.partition_dim == 1

    def apply_gram(self, vector: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of ``W^T W v`` (or ``W W^T u``); summed over ``group`` it is exact."""
        weight = self.local.float()
        if self.iterates_on_rows:
            return weight @ (weight.t() @ vector)
        return weight.t() @ (weight @ vector)


def rms_inf_norm(weight: torch.Tensor) -> float:
    """``sqrt(fan_in) * max_i ||row_i||_2`` of a whole (fan_out, fan_in) matrix (the direct definition)."""
    return math.sqrt(weight.shape[1]) * float(weight.float().norm(dim=1).max())


def rms_rms_norm(weight: torch.Tensor) -> float:
    """``sqrt(fan_in / fan_out) * sigma_max`` of a whole matrix, by an exact SVD (the direct definition)."""
    fan_out, fan_in = weight.shape
    return math.sqrt(fan_in / fan_out) * float(torch.linalg.matrix_norm(weight.float(), ord=2))


def max_row_norm(matrix: ShardedMatrix) -> torch.Tensor:
    """max_i ||row_i||_2 over the whole matrix (a MAX all-reduce over the group for row shards; a column
    shard holds parts of every row, so the squares are summed over the group first)."""
    squares = matrix.local.float().pow(2).sum(dim=1)
    if matrix.shards > 1 and matrix.partition_dim == 1:
        dist.all_reduce(squares, group=matrix.group)  # row = sum of its column pieces
    value = squares.max().sqrt()
    if matrix.shards > 1 and matrix.partition_dim == 0:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=matrix.group)  # rows split over the group
    return value


def start_vector(length: int, device) -> torch.Tensor:
    """Unit start vector of a given length: a function of the length only, so identical on every rank and
    for every layout (a generic start: its overlap with the top singular vector is nonzero almost surely)."""
    generator = torch.Generator().manual_seed(START_SEED)
    vector = torch.randn(length, generator=generator, dtype=torch.float32)
    return (vector / vector.norm()).to(device)


def power_iteration(matrices: list[ShardedMatrix], vectors: list[torch.Tensor], iterations: int,
                    group: dist.ProcessGroup | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``iterations`` power-iteration steps on every matrix (all sharded by ``group``, or unsharded).

    vectors: unit vectors on each matrix's replicated space (see ``ShardedMatrix.iterates_on_rows``).
    Returns (sigma_max estimates [num_matrices] float64, the new unit vectors). ``sigma^2`` is the Rayleigh
    quotient ``x . (G x)`` of the last iteration (a lower bound that converges twice as fast as ``||G x||``).
    Collectives: one sum all-reduce over ``group`` per iteration, of all vectors concatenated.
    """
    assert iterations >= 1 and len(matrices) == len(vectors)
    sigma_sq = torch.zeros(len(matrices), dtype=torch.float64)
    for _ in range(iterations):
        products = [matrix.apply_gram(vector) for matrix, vector in zip(matrices, vectors)]
        flat = torch.cat(products)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)  # the group sharding these matrices: partial products sum
        products = list(flat.split([p.numel() for p in products]))
        sigma_sq = torch.stack([torch.dot(x, y).double().cpu() for x, y in zip(vectors, products)])
        vectors = [y / y.norm().clamp(min=torch.finfo(torch.float32).tiny) for y in products]
    return sigma_sq.clamp(min=0).sqrt(), vectors


class PowerIterationState:
    """Power-iteration vectors kept between monitor steps, keyed by matrix name.

    ``sigma_max(named, iterations)`` estimates the largest singular value of each named matrix, grouping
    the matrices by the process group that shards them (one all-reduce per group and iteration). Every rank
    of a group must pass the group's matrices in the same order. A matrix seen for the first time starts
    from :func:`start_vector` and gets ``first_call_factor`` times the iterations.
    """

    def __init__(self, first_call_factor: int = 5):
        self.vectors: dict[str, torch.Tensor] = {}
        self.first_call_factor = first_call_factor

    def sigma_max(self, named: list[tuple[str, ShardedMatrix]], iterations: int) -> dict[str, float]:
        by_group: dict[int, tuple] = {}
        for name, matrix in named:
            group = matrix.group if matrix.shards > 1 else None
            by_group.setdefault(id(group), (group, []))[1].append((name, matrix))
        results = {}
        for group, members in by_group.values():  # first-seen order: the same on every rank of a group
            vectors, fresh = [], False
            for name, matrix in members:
                rows, cols = matrix.full_shape
                length = rows if matrix.iterates_on_rows else cols
                vector = self.vectors.get(name)
                if vector is None or vector.numel() != length:
                    vector, fresh = start_vector(length, matrix.local.device), True
                vectors.append(vector)
            # Every rank of the group decides ``fresh`` alike: the group's members are the same matrices.
            count = iterations * (self.first_call_factor if fresh else 1)
            sigmas, vectors = power_iteration([m for _, m in members], vectors, count, group)
            for (name, _), sigma, vector in zip(members, sigmas.tolist(), vectors):
                self.vectors[name] = vector
                results[name] = sigma
        return results


# ----------------------------------------------------------------------------------------------
# The model's matrices


def output_layer_matrix(model_chunks, tp_group) -> ShardedMatrix | None:
    """The (untied) output layer of this rank's stage as a vocab-parallel ``ShardedMatrix``, else None."""
    for chunk in model_chunks:
        layer = getattr(unwrap(chunk), "output_layer", None)
        if layer is not None and getattr(layer, "weight", None) is not None:
            weight = layer.weight
            sharded = getattr(weight, "tensor_model_parallel", False)
            return ShardedMatrix(weight.detach(), tp_group if sharded else None,
                                 weight.partition_dim if sharded else None)
    return None


def hidden_matrices(optimizer) -> list[tuple[str, ShardedMatrix, bool]]:
    """(name, matrix, is_expert) of every hidden matrix piece (Q, K, V separately; each expert) that a
    Newton-Schulz rule updates (``SphereMuon.matrix_pieces``: sphere Muon / Muon; empty under AdamW).

    The pieces of a fused QKV are copies: call this when the current weights are wanted."""
    found = []
    for index, sphere in enumerate(sphere_optimizers(optimizer)):
        for piece in sphere.matrix_pieces():
            name = f"{index}.{id(piece.param)}.{piece.index}"
            found.append((name, ShardedMatrix(piece.local, piece.group, piece.partition_dim), piece.is_expert))
    return found


OPERATOR_NORM_MODES = ("off", "output", "all")


class OperatorNormMonitor:
    """Records (the same on every rank) of the output layer's and, with ``mode='all'``, every hidden
    matrix's operator norms; see the module docstring. Collective over the world.

    ``output_rms_inf``, ``output_rms_rms``: the output layer (the last pipeline stage holds it; a world MAX
    gives every rank the value). ``hidden_rms_rms_mean`` / ``_max`` and ``hidden_spectral_ratio_mean``
    (``sigma_max / ||W||_F``, in ``[1/sqrt(rank), 1]``: 1 for a rank-one matrix): over every hidden matrix
    of the model, each counted once (dense matrices are held by ``world / PP`` ranks, experts by
    ``world / (PP * EP)``, so each holder adds ``1 / holders``).
    """

    def __init__(self, mode: str, iterations: int, model_chunks, optimizer, pg_collection):
        if mode not in OPERATOR_NORM_MODES:
            raise ValueError(f"monitor.operator_norms must be one of {OPERATOR_NORM_MODES}, got {mode!r}")
        self.mode, self.iterations = mode, iterations
        self.output = output_layer_matrix(model_chunks, pg_collection.tp) if mode != "off" else None
        self.optimizer = optimizer
        world, pp, ep = dist.get_world_size(), pg_collection.pp.size(), pg_collection.ep.size()
        self.holders = {False: world / pp, True: world / (pp * ep)}
        self.state = PowerIterationState()
        self.device = next(model_chunks[0].parameters()).device

    @torch.no_grad()
    def records(self) -> dict[str, float]:
        if self.mode == "off":
            return {}
        # [output rms_inf, output rms_rms, hidden rms_rms max] (MAX) and [sum rms_rms, sum ratio, count] (SUM)
        maxima = torch.zeros(3, dtype=torch.float64, device=self.device)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        if self.output is not None:
            rows, cols = self.output.full_shape
            sigma = self.state.sigma_max([("output", self.output)], self.iterations)["output"]
            maxima[0] = math.sqrt(cols) * max_row_norm(self.output).double()
            maxima[1] = math.sqrt(cols / rows) * sigma
        hidden = hidden_matrices(self.optimizer) if self.mode == "all" else []  # this step's weights
        if hidden:
            sigmas = self.state.sigma_max([(name, matrix) for name, matrix, _ in hidden], self.iterations)
            frobenius = _frobenius_norms([matrix for _, matrix, _ in hidden])
            for (name, matrix, is_expert), frob in zip(hidden, frobenius):
                rows, cols = matrix.full_shape
                rms_rms = math.sqrt(cols / rows) * sigmas[name]
                weight = 1.0 / self.holders[is_expert]
                maxima[2] = max(float(maxima[2]), rms_rms)
                sums += torch.tensor([weight * rms_rms, weight * sigmas[name] / max(frob, 1e-30), weight],
                                     dtype=torch.float64, device=self.device)
        # World reductions: the output layer lives on the last stage, hidden matrices on every stage.
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        dist.all_reduce(sums)
        records = {"output_rms_inf": float(maxima[0]), "output_rms_rms": float(maxima[1])}
        if self.mode == "all":
            count = float(sums[2])
            records.update(hidden_rms_rms_max=float(maxima[2]),
                           hidden_rms_rms_mean=float(sums[0]) / count if count else 0.0,
                           hidden_spectral_ratio_mean=float(sums[1]) / count if count else 0.0)
        return records


def _frobenius_norms(matrices: list[ShardedMatrix]) -> list[float]:
    """||W||_F of each whole matrix: local squares, one sum all-reduce per sharding group."""
    squares = [m.local.float().pow(2).sum().double() for m in matrices]
    by_group: dict[int, tuple] = {}
    for index, matrix in enumerate(matrices):
        group = matrix.group if matrix.shards > 1 else None
        by_group.setdefault(id(group), (group, []))[1].append(index)
    for group, indices in by_group.values():
        flat = torch.stack([squares[i] for i in indices])
        if group is not None:
            dist.all_reduce(flat, group=group)  # the group sharding these matrices
        for i, value in zip(indices, flat.tolist()):
            squares[i] = value
    return [math.sqrt(float(s)) for s in squares]
