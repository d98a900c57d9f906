"""Compatibility patches for megatron-core 0.16.1, in two groups selected by the decided device:

- ``without_te`` (:mod:`.without_te`): megatron-core without Transformer Engine / apex, on any device
  (the MoE router GEMM, sequence parallelism with torch norms; fused-kernel flags only when importable);
- ``cpu`` (:mod:`.cpu`): megatron-core on the CPU with gloo, only when the device is the CPU.

Each patch names the upstream function it changes and why.
"""

from __future__ import annotations

import torch

from hyperp_megatron.compat import cpu, without_te
from hyperp_megatron.compat.without_te import fused_kernel_flags

PATCH_GROUPS = {"without_te": without_te.apply, "cpu": cpu.apply}


def patch_groups(device: torch.device) -> tuple[str, ...]:
    """The patch groups a process on ``device`` needs."""
    return ("without_te", "cpu") if torch.device(device).type == "cpu" else ("without_te",)


def apply_patches(device: torch.device) -> tuple[str, ...]:
    """Apply the groups ``device`` needs (idempotent); returns their names."""
    groups = patch_groups(device)
    for name in groups:
        PATCH_GROUPS[name]()
    return groups


def apply_cpu_patches() -> bool:
    """Both groups when CUDA is absent (returns True), nothing otherwise: for tests and tools that set up
    gloo themselves. The trainer calls :func:`apply_patches` with its decided device instead."""
    if torch.cuda.is_available():
        return False
    apply_patches(torch.device("cpu"))
    return True


__all__ = ["apply_cpu_patches", "apply_patches", "fused_kernel_flags", "patch_groups"]
