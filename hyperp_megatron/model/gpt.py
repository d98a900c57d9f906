"""Build Megatron's ``GPTModel`` from the config, for this rank's pipeline stage."""

from __future__ import annotations

import functools
import math

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from hyperp_megatron.compat import fused_kernel_flags
from hyperp_megatron.config import Config
from hyperp_megatron.derived import logit_multiplier as derived_logit_multiplier
from hyperp_megatron.model.fp8 import check_fp8, fp8_config_kwargs
from hyperp_megatron.model.init import initialize_parameters
from hyperp_megatron.model.moe import experts_impl
from hyperp_megatron.model.residual import keep_residual_stream_fp32
from hyperp_megatron.model.spec import HAVE_TE, build_layer_spec, softmax_scale, use_transformer_engine
from hyperp_megatron.parallel import process_group_device


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary so every TP rank holds an equal, aligned slice."""
    step = multiple * tensor_parallel
    return int(math.ceil(vocab_size / step) * step)


def _device_or_default(device) -> torch.device:
    return process_group_device() if device is None else torch.device(device)


def check_device_support(cfg: Config, device: torch.device) -> bool:
    """What the config asks of the hardware, checked before any heavy work (one-line ValueErrors):
    TE layers, FP8 (grouped-GEMM experts need nothing: without TE they are torch's, ``moe.experts_impl``).
    Returns whether TE layers are used."""
    use_te = use_transformer_engine(cfg.model.transformer_impl, device)
    check_fp8(cfg.train, use_te, HAVE_TE, device)
    return use_te


def transformer_config(cfg: Config, pg_collection, use_te: bool = False,
                       device: torch.device | None = None) -> TransformerConfig:
    """Megatron's TransformerConfig for ``cfg`` on ``device`` (default: the process group's)."""
    m, p = cfg.model, cfg.parallel
    device = _device_or_default(device)
    on_gpu = device.type == "cuda"
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_size,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor_size,
        sequence_parallel=p.sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        qk_layernorm=m.qk_norm,
        init_method_std=m.init_method_std,
        params_dtype=torch.float32,
        bf16=cfg.train.precision == "bf16",
        # bf16 runs keep the residual stream (which pipeline stages exchange) in fp32 by default (residual.py).
        fp32_residual_connection=fp32_residual(cfg),
        pipeline_dtype=torch.bfloat16 if cfg.train.precision == "bf16" and not fp32_residual(cfg) else torch.float32,
        use_cpu_initialization=not on_gpu,
        # Fused kernels only where they exist (GPU, kernel module importable): compat.without_te.
        **fused_kernel_flags(device),
        deterministic_mode=not on_gpu or cfg.train.deterministic,
    )
    kwargs.update(recompute_config_kwargs(m))
    if use_te:
        kwargs.update(fp8_config_kwargs(cfg.train))
    if m.hyperp_architecture:
        kwargs["softmax_scale"] = softmax_scale(m.kv_channels)
    if m.moe.enabled:
        kwargs.update(
            # Rounded up to a multiple of EP with phantom experts (model/moe.py, docs/moe.md).
            num_moe_experts=m.moe.padded_experts(p.expert),
            moe_router_topk=m.moe.router_topk,
            moe_ffn_hidden_size=m.expert_ffn_size,
            moe_shared_expert_intermediate_size=m.expert_ffn_size if m.moe.shared_expert else None,
            moe_token_dispatcher_type=m.moe.token_dispatcher,
            moe_aux_loss_coeff=m.moe.aux_loss_coeff,
            moe_router_load_balancing_type="global_aux_loss",
            # Megatron refuses top-1 without pre-softmax (a softmax over one logit has no gradient).
            # SqrtGateRouter ignores the flag: HyperP softmaxes over the k selected logits, so at k = 1
            # the gate is 1 and the router learns from the load-balancing loss only (as the reference).
            moe_router_pre_softmax=m.moe.router_topk == 1,
            moe_router_dtype="fp32",
            # Megatron's flag means TE's grouped experts (never with phantom experts: moe.experts_impl)
            moe_grouped_gemm=experts_impl(m.moe, device, m.moe.phantom_experts(p.expert)) == "te_grouped",
        )
    return TransformerConfig(**kwargs)


def recompute_config_kwargs(model) -> dict:
    """Megatron's recompute fields for ``model.recompute`` (``ModelConfig``): 'selective' recomputes the core
    attention (``recompute_modules=["core_attn"]``), 'full' whole layers by ``recompute_method`` /
    ``recompute_num_layers``; 'none' sets nothing (Megatron's default: every activation saved)."""
    if model.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if model.recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": model.recompute_method,
                "recompute_num_layers": model.recompute_num_layers}
    return {}


def build_model(cfg: Config, pg_collection, vocab_size: int, device: torch.device | None = None, *,
                logit_multiplier: float | None = None) -> list[torch.nn.Module]:
    """The model chunk(s) of this pipeline stage on ``device`` (default: the process group's), initialized
    identically for every parallel layout and device. ``logit_multiplier``: the run's derived output-logit
    multiplier (``DerivedRun.output_logit_multiplier``; default: the rule for ``cfg``)."""
    if logit_multiplier is None:
        logit_multiplier = derived_logit_multiplier(cfg)
    device = _device_or_default(device)
    use_te = check_device_support(cfg, device)
    tf_config = transformer_config(cfg, pg_collection, use_te, device)
    experts = experts_impl(cfg.model.moe, device, cfg.model.moe.phantom_experts(cfg.parallel.expert))
    spec = build_layer_spec(cfg.model, use_te=use_te, pg_collection=pg_collection, experts=experts)
    pp_rank = pg_collection.pp.rank()
    pp_size = pg_collection.pp.size()
    model = GPTModel(
        config=tf_config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, cfg.parallel.tensor),
        max_sequence_length=cfg.model.seq_length,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
        pg_collection=pg_collection,
    )
    initialize_parameters(model, cfg, pg_collection)
    if fp32_residual(cfg):
        keep_residual_stream_fp32(model)
    # As Megatron-LM's get_model: the whole model onto the device right after construction, before DDP
    # and the optimizer wrap it (TP layers are created on the GPU, torch norms and buffers on the CPU).
    model.to(device)
    if model.post_process and logit_multiplier != 1.0:
        scale_output_logits(model, logit_multiplier)
    return [model]


def fp32_residual(cfg: Config) -> bool:
    """Whether the residual stream is kept in fp32 (``model.fp32_residual`` in a bf16 run)."""
    return cfg.train.precision == "bf16" and cfg.model.fp32_residual


def _scale_logits(multiplier: float, module, args, output):
    logits, bias = output
    return logits * multiplier, bias


def scale_output_logits(model: GPTModel, multiplier: float) -> None:
    """Multiply the output layer's logits (each TP rank's vocab slice, before the loss) by ``multiplier``."""
    model.output_layer.register_forward_hook(functools.partial(_scale_logits, multiplier))
    model.output_logit_multiplier = multiplier
