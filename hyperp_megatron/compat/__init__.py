"""Compatibility shims for megatron-core (CPU/gloo support); see :mod:`hyperp_megatron.compat.cpu`."""

from hyperp_megatron.compat.cpu import apply_cpu_patches

__all__ = ["apply_cpu_patches"]
