"""Quintic Newton-Schulz orthogonalization (NS5), single-device and tensor-parallel.

``newton_schulz5(X)`` maps a matrix ``X = U S V^T`` to approximately ``U V^T`` (every singular value
pushed near 1) with five quintic iterations ``X <- a X + (b A + c A^2) X``, ``A = X X^T``, using the
per-iteration coefficients of HyperP (arXiv 2603.28743) / Muon (K. Jordan et al., 2024).

Tensor-parallel forms for a matrix sharded along ``partition_dim`` (0: rows, column-parallel linear;
1: columns, row-parallel linear) over a process group (TP or expert-TP):

- ``"gather"``: all-gather the shards, orthogonalize the full matrix on every rank, keep the local
  shard. TP-invariant, any shape; every rank computes the whole NS.
- ``"distributed"``: orient the matrix so that the sharded dim is the long one (columns of a wide
  matrix); then ``A = X X^T = sum_rank X_r X_r^T`` is one all-reduce per iteration and the update
  ``X_r <- a X_r + (b A + c A^2) X_r`` is local. TP-invariant; valid only when the sharded dim is the
  long side (else ``ValueError``; see ``supports_distributed_mode``).
- ``"blockwise"``: NS on each shard independently. NOT TP-invariant: negative controls only.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

# (a, b, c) for each of the five iterations, from HyperP section 1 / the ArchScale reference code.
NS5_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
NS_MODES = ("gather", "distributed", "blockwise")
NORM_EPS = 1e-8


def _quintic_iterations(
    wide: torch.Tensor, sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Normalize and iterate on a wide matrix (rows <= cols), possibly column-sharded.

    wide: (..., short, long_local). ``sum_over_shards`` turns a per-shard partial sum into the sum
    over all column shards (None when the matrix is whole).
    """
    squared_norm = wide.square().sum(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    if sum_over_shards is not None:
        squared_norm = sum_over_shards(squared_norm)
    # Row-major, whatever the layout of ``wide`` (a tall matrix arrives as a transposed view): both buffers
    # below inherit x's layout, and a bf16 GEMM into a transposed output takes oneDNN's reference kernel on
    # the CPU (~1000x slower).
    x = (wide / (squared_norm.sqrt() + NORM_EPS)).contiguous()
    # beta * bias + alpha * left @ right in one GEMM call (no separate elementwise passes over x).
    fused = torch.addmm if x.dim() == 2 else torch.baddbmm
    spare = torch.empty_like(x)  # x and spare alternate as the iterate: no (..., short, long) allocation per step
    for a, b, c in NS5_COEFFICIENTS:
        gram = x @ x.mT  # (..., short, short)
        if sum_over_shards is not None:
            # Reduced in fp32 even when x is bf16: it is a sum over shards. (Whole matrices skip the
            # round trip: a bf16 GEMM's output converts to fp32 and back exactly.)
            gram = sum_over_shards(gram.float()).to(x.dtype)
        polynomial = fused(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x, spare = fused(x, polynomial, x, beta=a, out=spare), x  # a X + (b A + c A^2) X
    return x


def newton_schulz5(update: torch.Tensor, *, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Orthogonalize a whole matrix or a batch of matrices.

    update: (m, n) or (batch, m, n); returns the same shape and dtype. Tall matrices are
    transposed to wide first (fewer flops: the Gram matrix is min(m, n) square).
    compute_dtype: dtype of the iterations (e.g. torch.bfloat16); default: the input dtype.
    """
    if update.dim() not in (2, 3):
        raise ValueError(f"newton_schulz5 expects (m, n) or (batch, m, n), got shape {tuple(update.shape)}")
    x = update.to(compute_dtype or update.dtype)
    is_tall = x.size(-2) > x.size(-1)
    if is_tall:
        x = x.mT  # (..., n, m): wide
    x = _quintic_iterations(x)
    if is_tall:
        x = x.mT
    return x.to(update.dtype)


def supports_distributed_mode(full_shape: tuple[int, int], partition_dim: int) -> bool:
    """Whether the Gram-all-reduce form applies: the sharded dim must be the long (or equal) side."""
    return full_shape[partition_dim] >= full_shape[1 - partition_dim]


def _local_to_full_shape(local: torch.Tensor, partition_dim: int, world_size: int) -> tuple[int, int]:
    full = [local.size(-2), local.size(-1)]
    full[partition_dim] *= world_size
    return full[0], full[1]


def _gather_newton_schulz(
    shard: torch.Tensor, group: dist.ProcessGroup, partition_dim: int, compute_dtype
) -> torch.Tensor:
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    tensor_dim = shard.dim() - 2 + partition_dim
    shard = shard.contiguous()
    shards = [torch.empty_like(shard) for _ in range(world_size)]
    # group = the TP / expert-TP group that shards this matrix: rank order = shard order.
    dist.all_gather(shards, shard, group=group)
    full = torch.cat(shards, dim=tensor_dim)  # (..., m, n)
    orthogonal = newton_schulz5(full, compute_dtype=compute_dtype)
    return orthogonal.narrow(tensor_dim, rank * shard.size(tensor_dim), shard.size(tensor_dim))


def _distributed_newton_schulz(
    shard: torch.Tensor, group: dist.ProcessGroup, partition_dim: int, compute_dtype
) -> torch.Tensor:
    full_shape = _local_to_full_shape(shard, partition_dim, dist.get_world_size(group))
    if not supports_distributed_mode(full_shape, partition_dim):
        raise ValueError(
            f"distributed Newton-Schulz needs the shard along the long side, but the full matrix "
            f"{full_shape} is sharded along dim {partition_dim} (the short side): use mode='gather'"
        )

    def sum_over_shards(partial: torch.Tensor) -> torch.Tensor:
        # Sum over the TP / expert-TP group that shards the matrix along its long side.
        dist.all_reduce(partial, group=group)
        return partial

    x = shard.to(compute_dtype or shard.dtype)
    if partition_dim == 0:
        x = x.mT  # (..., n, m_local): sharded rows become sharded columns of a wide matrix
    x = _quintic_iterations(x, sum_over_shards)
    if partition_dim == 0:
        x = x.mT
    return x.to(shard.dtype)


def orthogonalize(
    update: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    partition_dim: int | None = None,
    mode: str = "gather",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """NS5 of a (batch of) matrix shard(s); returns this rank's shard of the orthogonalized matrix.

    update: (m_local, n_local) or (batch, m_local, n_local), the local shard of matrices sharded
    along ``partition_dim`` (0 rows, 1 cols) in rank order over ``group``. ``group=None``,
    ``partition_dim=None`` or a group of size 1 means whole matrices.
    """
    if mode not in NS_MODES:
        raise ValueError(f"unknown Newton-Schulz mode {mode!r}; expected one of {NS_MODES}")
    if partition_dim not in (None, 0, 1):
        raise ValueError(f"partition_dim must be None, 0 (rows) or 1 (cols), got {partition_dim!r}")
    if group is None or partition_dim is None or dist.get_world_size(group) == 1 or mode == "blockwise":
        return newton_schulz5(update, compute_dtype=compute_dtype)
    if mode == "gather":
        return _gather_newton_schulz(update, group, partition_dim, compute_dtype)
    return _distributed_newton_schulz(update, group, partition_dim, compute_dtype)
