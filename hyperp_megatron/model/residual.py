"""fp32 residual stream in bf16 runs (``model.fp32_residual``, default on as in the HyperP reference).

Megatron's ``TransformerConfig.fp32_residual_connection`` only casts the embedding output to fp32
(``LanguageModelEmbedding.forward``); from there the residual adds (our scaled bias-dropout-add:
``residual + x / sqrt(2d)``) promote to fp32 by themselves, because the branch outputs are bf16 and the
residual fp32. What it needs besides, and what :func:`keep_residual_stream_fp32` adds: every module that reads
the residual stream must hand bf16 on to the bf16 linear layers after it (apex's mixed-dtype norms did this in
the original Megatron). Per transformer layer the readers are the input norm and the pre-MLP norm (or, with
Transformer Engine's norm fused into ``linear_qkv`` / ``linear_fc1``, the attention and MLP modules
themselves), plus the final norm:

- a PyTorch norm (the local spec): a forward hook casts its OUTPUT to the weight dtype, so the norm
  itself reads the fp32 stream at full precision (computed in fp32, like apex's MixedFusedRMSNorm);
- any other reader (Transformer Engine modules require input dtype == parameter dtype outside autocast):
  a forward pre-hook casts its INPUT to its parameter dtype.

Pipeline stages exchange the fp32 stream (``pipeline_dtype`` fp32, ``gpt.transformer_config``).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.identity_op import IdentityOp

TORCH_NORMS = (torch.nn.RMSNorm, torch.nn.LayerNorm)


def _param_dtype(module: torch.nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters()), None)


def _cast_output(module, args, output):
    dtype = _param_dtype(module)
    return output if dtype is None else output.to(dtype)


def _cast_input(module, args, kwargs):
    dtype = _param_dtype(module)
    if dtype is None:
        return None
    if args:
        return (args[0].to(dtype), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].to(dtype)}


def residual_readers(model) -> list[torch.nn.Module]:
    """The modules of a GPTModel that read the residual stream directly (see the module docstring)."""
    decoder = model.decoder
    readers = []
    for layer in decoder.layers:
        for norm, branch in ((layer.input_layernorm, layer.self_attention), (layer.pre_mlp_layernorm, layer.mlp)):
            readers.append(branch if isinstance(norm, IdentityOp) else norm)
    if getattr(decoder, "final_layernorm", None) is not None:
        readers.append(decoder.final_layernorm)
    return readers


def keep_residual_stream_fp32(model) -> int:
    """Hooks so that an fp32 residual stream feeds the bf16 layers; returns the number of readers hooked."""
    readers = residual_readers(model)
    for module in readers:
        if isinstance(module, TORCH_NORMS):
            module.register_forward_hook(_cast_output)
        else:
            module.register_forward_pre_hook(_cast_input, with_kwargs=True)
    return len(readers)
