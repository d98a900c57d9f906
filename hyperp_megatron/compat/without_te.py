"""Run megatron-core 0.16.1 without Transformer Engine or apex: needed on GPUs too, on any device.

- :func:`fused_kernel_flags`: every fused-kernel flag of ``TransformerConfig`` is on only when its
  kernel module can be imported (and the device is a GPU): Megatron imports some kernels lazily, at
  the first forward, so a flag set without its kernel fails after minutes of start-up
  (``No module named 'scaled_masked_softmax_cuda'`` on an H200 without apex).
- the MoE router GEMM (``moe_utils.RouterGatingLinearFunction``) names ``te_general_gemm``, which is
  bound only when TE imports (``NameError`` without TE, on the GPU as on the CPU).
- sequence parallelism with torch norms (``WrappedTorchNorm`` asserts it is off; the local spec uses
  torch norms whenever TE layers are not used).
- the multi-tensor fallbacks without apex (``megatron.core.utils.local_multi_tensor_l2_norm`` reads every
  gradient's norm to the host: one GPU sync per tensor; ``local_multi_tensor_scale`` one op pair per
  tensor): foreach versions, no host sync, where Megatron's optimizer and clip modules bound the fallback.

:func:`apply` installs the patches once; each is a no-op where Megatron does not need it.
"""

from __future__ import annotations

import copy
import importlib.util

import torch

FUSED_KERNEL_MODULES: dict[str, tuple[str, ...]] = {
    # megatron/core/fusions/fused_softmax.py imports these (apex / Megatron's compiled extensions):
    # causal (upper-triangular), padding-mask and mask-free kernels.
    "masked_softmax_fusion": ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda",
                              "scaled_softmax_cuda"),
    # tensor_parallel/layers.py: the weight-gradient GEMM that accumulates into main_grad (apex).
    "gradient_accumulation_fusion": ("fused_weight_gradient_mlp_cuda",),
    # fusions/fused_layer_norm.py: apex's persistent LayerNorm kernel.
    "persist_layer_norm": ("apex.contrib.layer_norm",),
    # models/common/embeddings/rope_utils.py: the fused RoPE kernels come from TE.
    "apply_rope_fusion": ("transformer_engine",),
    # fused_bias_swiglu.py / fused_bias_dropout.py: megatron.core.jit.jit_fuser is torch.compile, whose
    # GPU backend generates Triton kernels.
    "bias_activation_fusion": ("triton",),
    "bias_dropout_fusion": ("triton",),
}
"""``TransformerConfig`` fused-kernel flag -> the modules its kernel is imported from."""


def module_available(name: str) -> bool:
    """``importlib.util.find_spec(name)`` without importing more than its parent packages."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package ("apex" for "apex.contrib...")
        return False


def fused_kernel_flags(device: torch.device) -> dict[str, bool]:
    """Each fused-kernel flag: on iff ``device`` is a GPU and every module of its kernel is importable."""
    on_gpu = torch.device(device).type == "cuda"
    return {flag: on_gpu and all(module_available(module) for module in modules)
            for flag, modules in FUSED_KERNEL_MODULES.items()}


def _patch_router_gemm() -> bool:
    """``moe_utils.RouterGatingLinearFunction`` (0.16.1, moe_utils.py:1192) tests ``te_general_gemm is not
    None`` but the name is only bound when TE imports: bind it to None so the router takes its
    ``torch.mm`` path (fp32 logits from ``moe_router_dtype``, gradients in the input dtype)."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


def _copy_config(config, **changes):
    clone = copy.copy(config)
    for key, value in changes.items():
        object.__setattr__(clone, key, value)
    return clone


def _patch_sequence_parallel_norms() -> bool:
    """``WrappedTorchNorm.__new__`` (transformer/torch_norm.py) asserts ``not sequence_parallel``. The norm
    itself is the same with or without SP (it normalizes each token); what SP needs is that the gains'
    gradients, computed on each TP rank's sequence shard, are summed over TP. So build it without the
    flag and tag its parameters ``sequence_parallel=True``: ``finalize_model_grads`` all-reduces those
    over the TP group (as it does for TE's norms)."""
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__
    if getattr(original_new, "__hyperp_wrapped__", False):
        return False

    def new(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
            normalization="LayerNorm"):
        sequence_parallel = config.sequence_parallel
        if sequence_parallel:
            config = _copy_config(config, sequence_parallel=False)
        norm = original_new(cls, config, hidden_size, eps, persist_layer_norm, zero_centered_gamma,
                            normalization)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", sequence_parallel)
        return norm

    new.__hyperp_wrapped__ = True
    torch_norm.WrappedTorchNorm.__new__ = staticmethod(new)
    return True


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm`` (no per-tensor norms): ((1,) fp32 norm of all tensors, None),
    on their device, without reading anything to the host."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).view(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst <- src * scale`` for every pair, two foreach calls."""
    sources, targets = tensor_lists[0], tensor_lists[1]
    torch._foreach_copy_(targets, sources if scale == 1.0 else torch._foreach_mul(sources, scale))


def _patch_multi_tensor_fallbacks() -> bool:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    patched = False
    for module in (clip_grads, optimizer):
        if getattr(module, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
            module.l2_norm_impl, patched = foreach_l2_norm, True
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl, patched = foreach_scale, True
    return patched


def apply() -> None:
    """Install the patches (idempotent)."""
    _patch_router_gemm()
    _patch_sequence_parallel_norms()
    _patch_multi_tensor_fallbacks()
