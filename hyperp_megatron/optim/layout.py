"""How SphereMuon sees one parameter: its update rule and layout over process groups (``ParamLayout``),
the fused-QKV row split (``QKVSplit``) and the per-step view derived from both (``PlannedParam``).

The four update rules (``RULES``; the math: ``optim/sphere_muon.py`` and ``optim/updates.py``):
``sphere_muon`` (hidden matrices), ``sphere_adam`` (the output layer on its sphere), ``adamw`` (elementwise)
and ``muon`` (the Muon baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch
import torch.distributed as dist

RULES = ("sphere_muon", "sphere_adam", "adamw", "muon")
MATRIX_RULES = ("sphere_muon", "muon")  # orthogonalized by Newton-Schulz
SPHERE_RULES = ("sphere_muon", "sphere_adam")  # stepped and retracted on a sphere


@dataclass(frozen=True)
class QKVSplit:
    """Megatron's fused ``linear_qkv`` weight on one TP rank: rows interleaved by query group.

    For each of the ``num_local_query_groups`` groups of this rank: ``q_rows_per_group`` rows of
    its query heads (heads per group x head_dim), then ``head_dim`` rows of K, ``head_dim`` rows of V.
    Query groups are contiguous by TP rank, so the rank-ordered Q (K, V) pieces form the full Q (K, V).
    """

    num_local_query_groups: int
    q_rows_per_group: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_local_query_groups", "q_rows_per_group", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"QKVSplit.{name} must be a positive int, got {getattr(self, name)!r}")

    @property
    def piece_rows(self) -> tuple[int, int, int]:
        """Rows of Q, K, V within one query group."""
        return (self.q_rows_per_group, self.head_dim, self.head_dim)


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is updated and laid out over process groups.

    rule: "sphere_muon" | "sphere_adam" | "adamw" | "muon".
    group: the process group whose ranks hold the shards of this parameter (TP, or expert-TP for
        experts); None when this rank holds the whole parameter.
    partition_dim: the sharded dim with ``group``: 0 = rows (column-parallel), 1 = cols (row-parallel).
    qkv_split: fused-QKV rows of this rank; Q, K and V become three matrices (matrix rules only).
    is_expert: use the expert data-parallel group in layer-wise mode.
    sphere_key: sphere rules only: parameters with the same key share ONE sphere (one radius, one
        step norm, one retraction over all of them), e.g. every routed expert of a layer
        (``optim.expert_sphere: per_layer``); None = the parameter (each Q/K/V piece) is its own sphere.
    sphere_group: the group over which the members of a shared sphere are spread (the expert-parallel
        group); their norms are summed over it by one more all-reduce. None = all members are local.
    """

    rule: str
    group: dist.ProcessGroup | None = None
    partition_dim: int | None = None
    qkv_split: QKVSplit | None = None
    is_expert: bool = False
    sphere_key: Hashable | None = None
    sphere_group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; expected one of {RULES}")
        if self.partition_dim not in (None, 0, 1):
            raise ValueError(f"partition_dim must be None, 0 (rows) or 1 (cols), got {self.partition_dim!r}")
        if self.group is not None and self.partition_dim is None:
            raise ValueError("a ParamLayout with a group needs partition_dim (the dim the group shards)")
        if self.rule not in MATRIX_RULES and self.qkv_split is not None:
            raise ValueError(f"qkv_split applies to {MATRIX_RULES} only, not {self.rule!r}")
        if self.sphere_key is not None and (self.rule not in SPHERE_RULES or self.qkv_split is not None):
            raise ValueError(f"sphere_key applies to whole {SPHERE_RULES} matrices only, not {self.rule!r} "
                             "or a fused QKV")
        if self.sphere_group is not None and self.sphere_key is None:
            raise ValueError("a ParamLayout with a sphere_group needs a sphere_key")


@dataclass(eq=False)
class PlannedParam:
    """One parameter with everything the step needs, derived once from its layout (``SphereMuon``'s plan)."""

    param: torch.Tensor
    layout: ParamLayout
    group_index: int
    shard_count: int  # ranks in layout.group (1 when unsharded)
    num_row_groups: int  # query groups of a fused QKV, else 1
    piece_rows: tuple[int, ...]  # rows of each piece within one row group
    ns_mode: str
    owner_rank: int | None = None  # layer-wise: the DP rank that updates it; None = every rank
    updated_here: bool = True  # False on the other DP ranks in layer-wise mode

    @property
    def shard_group(self) -> dist.ProcessGroup | None:
        """The group to reduce over; None when this rank holds the whole matrix."""
        return self.layout.group if self.shard_count > 1 else None

    def as_row_groups(self, tensor: torch.Tensor) -> torch.Tensor:
        """(m_local, n) -> (num_row_groups, rows_per_group, n), a view."""
        return tensor.view(self.num_row_groups, -1, tensor.size(-1))

    def split_pieces(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """(m_local, n) -> one (piece_rows_local, n) tensor per matrix (Q, K, V or the whole)."""
        if len(self.piece_rows) == 1:
            return [tensor]
        pieces = self.as_row_groups(tensor).split(self.piece_rows, dim=1)  # (groups, rows, n) each
        return [piece.reshape(-1, tensor.size(-1)) for piece in pieces]

    def merge_pieces(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        if len(pieces) == 1:
            return pieces[0].view_as(self.param)
        grouped = [piece.view(self.num_row_groups, -1, piece.size(-1)) for piece in pieces]
        return torch.cat(grouped, dim=1).view_as(self.param)

    def full_piece_shapes(self) -> list[tuple[int, int]]:
        """Shapes of the whole (unsharded) matrices."""
        shapes = []
        for rows in self.piece_rows:
            shape = [self.num_row_groups * rows, self.param.size(-1)]
            if self.layout.partition_dim is not None:
                shape[self.layout.partition_dim] *= self.shard_count
            shapes.append((shape[0], shape[1]))
        return shapes

    def row_scale(self, per_piece: torch.Tensor) -> torch.Tensor:
        """(num_pieces,) -> (1, rows_per_group, 1), broadcastable over ``as_row_groups``."""
        rows = [value.expand(count) for value, count in zip(per_piece.unbind(), self.piece_rows)]
        return torch.cat(rows).view(1, -1, 1)

    def piece_sums(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Local sum of left * right over each piece: (num_pieces,)."""
        if len(self.piece_rows) == 1 and left.is_contiguous() and right.is_contiguous():
            return torch.dot(left.view(-1), right.view(-1)).view(1)  # no (m, n) temporary
        row_sums = (self.as_row_groups(left) * self.as_row_groups(right)).sum(dim=(0, 2))
        return torch.stack([chunk.sum() for chunk in row_sums.split(self.piece_rows)])


def newton_schulz_cost(shape: tuple[int, int]) -> int:
    """Relative Newton-Schulz flops of an (m, n) matrix: m n min(m, n)."""
    return shape[0] * shape[1] * min(shape)
