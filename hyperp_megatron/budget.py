"""Parameter, FLOP and memory budgets of a model of the HyperP family (docs/method.md section 2), pure functions.

Sources as ``transfer.py``: the reference code microsoft/ArchScale (``lit_gpt/config.py:get_parameters_count``,
``lit_gpt/speed_monitor.py:flops_per_param``); activation memory after Korthikanti et al., arXiv 2205.05198.
No torch here; ``derived.derive`` evaluates these for a run and ``python -m hyperp_megatron.plan`` over depths.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hyperp_megatron.config import ATTENTION_BACKENDS, ModelConfig, MoEConfig, ParallelConfig
from hyperp_megatron.transfer import check_positive

GIB = 2**30


# ----------------------------------------------------------------------------------------------
# Model family and parameter count


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the rules need: one member of the model family of docs/method.md section 2."""

    depth: int
    width: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: int
    vocab_size: int
    seq_length: int
    moe_sparsity: int = 0
    moe_granularity: int = 1
    moe_shared_expert: bool = False
    gated_attention: bool = False

    @classmethod
    def from_model_config(cls, model: ModelConfig, vocab_size: int) -> ModelShape:
        return cls(
            depth=model.num_layers, width=model.hidden_size, num_heads=model.num_attention_heads,
            num_kv_heads=model.num_query_groups, head_dim=model.kv_channels, ffn=model.ffn_size,
            vocab_size=vocab_size, seq_length=model.seq_length, moe_sparsity=model.moe.sparsity,
            moe_granularity=model.moe.granularity, moe_shared_expert=model.moe.shared_expert,
            gated_attention=model.gated_attention,
        )

    @property
    def query_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def _moe_config(self) -> MoEConfig:
        # The expert counts are MoEConfig's (one definition of s k - shared and k - shared).
        return MoEConfig(sparsity=self.moe_sparsity, granularity=self.moe_granularity,
                         shared_expert=self.moe_shared_expert)

    @property
    def moe(self) -> bool:
        return self._moe_config.enabled

    @property
    def num_routed_experts(self) -> int:
        return self._moe_config.num_routed_experts

    @property
    def router_topk(self) -> int:
        return self._moe_config.router_topk

    def padded_experts(self, expert_parallel: int) -> int:
        """Routed experts as held at this EP size, phantom experts included (``MoEConfig.padded_experts``)."""
        return self._moe_config.padded_experts(expert_parallel) if self.moe else 0

    @property
    def expert_ffn(self) -> int:
        return self._moe_config.expert_ffn(self.ffn)

    def at_depth(self, depth: int) -> ModelShape:
        """The same family at another depth: ``C/d``, ``heads/d`` and ``ffn/C`` fixed; KV heads,
        head dim, vocab, sequence and MoE shape fixed (the reference's ``ar = C/d`` family,
        ``n_head = 2d``, ``n_query_groups = 4``, ``head_dim = 128``). Raises ValueError when a
        dimension would not be an integer."""
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        scaled = {}
        for name in ("width", "num_heads", "ffn"):
            value = getattr(self, name) * depth / self.depth
            if not value.is_integer():
                raise ValueError(
                    f"depth {depth} breaks the family ratio: {name} = {getattr(self, name)} * {depth} / "
                    f"{self.depth} = {value:g} is not an integer (make hidden size, heads and FFN "
                    f"multiples of the depth)"
                )
            scaled[name] = int(value)
        return dataclasses.replace(self, depth=depth, **scaled)


def num_params(shape: ModelShape) -> float:
    """N(d) as the reference counts it (``get_parameters_count`` with ``v2scale``, untied):

        N = d * (12 C^2 + 2 C H hd + 2 C G hd) + 2 V C

    with ``12 C^2`` the dense-equivalent SwiGLU FFN at width 4C (3 matrices of C x 4C; written
    ``3 C ffn`` here), ``2 C H hd`` the Q and O projections (H query heads of dim hd),
    ``2 C G hd`` the K and V projections (G KV heads), and ``2 V C`` the token embedding plus the
    untied output layer (unpadded vocab). Not counted: norm gains, the MoE router, the gated-
    attention projection, inactive experts. For MoE the FFN term is the *active* width
    (k experts of ffn/k), so N equals the dense model's. Check (C = 128 d, H = 2d, hd = 128,
    G = 4, V = 32000): N(8) = 208.14M, N(24) = 3.896B.
    """
    C, V = shape.width, shape.vocab_size
    per_layer = 3 * C * shape.ffn + 2 * C * shape.query_width + 2 * C * shape.kv_width
    return float(shape.depth * per_layer + 2 * V * C)


def param_counts(shape: ModelShape) -> dict[str, float]:
    """Every parameter by role (the real count, all experts, norm gains): used for memory.

    Per layer: attention ``C (Cq + 2 Ckv) + Cq C`` (+ ``C H`` gate), norms ``2 C + 2 hd``
    (pre-norms, QK-norm gains), dense MLP ``3 C ffn`` or, for MoE, router ``E C``, routed experts
    ``E * 3 C ffn/k`` and a shared expert ``3 C ffn/k``. Global: embedding ``V C``, output layer
    ``V C``, final norm ``C``. Values of the per-layer keys are per layer.
    """
    C, Cq, Ckv = shape.width, shape.query_width, shape.kv_width
    attention = C * (Cq + 2 * Ckv) + Cq * C + (C * shape.num_heads if shape.gated_attention else 0)
    counts = {"embedding": shape.vocab_size * C, "output": shape.vocab_size * C, "final_norm": C,
              "attention": attention, "norms": 2 * C + 2 * shape.head_dim,
              "dense_mlp": 3 * C * shape.ffn, "router": 0, "experts": 0}
    if shape.moe:
        expert = 3 * C * shape.expert_ffn
        counts.update(dense_mlp=expert if shape.moe_shared_expert else 0,
                      router=shape.num_routed_experts * C, experts=shape.num_routed_experts * expert)
    return {k: float(v) for k, v in counts.items()}


def num_params_total(shape: ModelShape) -> float:
    """All parameters of the model (every expert, norms, router): sum of :func:`param_counts`."""
    c = param_counts(shape)
    per_layer = c["attention"] + c["norms"] + c["dense_mlp"] + c["router"] + c["experts"]
    return shape.depth * per_layer + c["embedding"] + c["output"] + c["final_norm"]


# ----------------------------------------------------------------------------------------------
# Compute


def flops_per_token(shape: ModelShape) -> float:
    """Training FLOPs per token, the reference's convention (``estimate_flops``/``flops_per_param``):

        F/token = 6 N + 12 d H hd s

    with N = :func:`num_params` (embeddings and output layer included), ``6 = 3 (fwd + bwd) * 2``
    FLOPs per multiply-add, and attention ``3 * 2 * 2 * H hd s`` per layer per token (QK^T and AV
    over the full ``s x s`` square: no causal halving, no sliding window). Check (d24, default
    T = 194.67e9): 6 N T = 4.550e21, attention 1.411e21, total 5.961e21 (paper: ~6e21).
    """
    attention = 12 * shape.depth * shape.query_width * shape.seq_length
    return 6 * num_params(shape) + attention


def model_flops_per_token(shape: ModelShape) -> float:
    """Model FLOPs per trained token, the MFU convention (the trainer's ``mfu``, ``bench/gpu_check.py``):

        F/token = 6 (N - V C) + 6 d H hd s

    ``6 = 3 (forward + backward) * 2`` FLOPs per multiply-add. ``N - V C``: :func:`num_params` without the
    input embedding (a lookup, no matmul); the output layer's ``V C`` is counted, as are the active experts
    (N counts k experts of ffn/k). Attention: ``QK^T`` and ``AV`` are ``2 * 2 H hd s`` per token and layer
    over the full ``s x s`` square, halved for the causal mask (the kernels skip the masked half), times 3.
    Not counted: norms, softmax, RoPE, the router and the gated-attention projection, and recomputation
    (MFU, not hardware FLOPs utilization). Differs from :func:`flops_per_token` (the reference's budget
    convention: embeddings in, attention not halved), which is larger. Check (dense d8, s = 2048):
    6 * 175.37M + 6 * 8 * 2048 * 2048 = 1.2535e9 (reference convention 1.6515e9).
    """
    attention = 6 * shape.depth * shape.query_width * shape.seq_length
    return 6 * (num_params(shape) - shape.vocab_size * shape.width) + attention


def training_flops(shape: ModelShape, tokens: float) -> float:
    """Total training FLOPs ``T * flops_per_token`` (see :func:`flops_per_token`)."""
    check_positive(tokens=tokens)
    return tokens * flops_per_token(shape)


# ----------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class Layout:
    """A parallel layout: world = tensor * pipeline * data; experts reuse data ranks. Whether it fits a model
    (divisibility) is ``config.check_layout``'s one check, which ``derived.derive`` runs."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    expert: int = 1
    expert_tensor: int | None = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False

    def __post_init__(self):
        for name in ("tensor", "pipeline", "data", "expert"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"layout {name} size must be a positive integer, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int) -> Layout:
        """The layout of ``parallel`` on ``world_size`` processes (checked by ``config.check_layout``)."""
        model_parallel = parallel.tensor * parallel.pipeline
        assert world_size % model_parallel == 0, f"world size {world_size} vs tensor * pipeline {model_parallel}"
        return cls(parallel.tensor, parallel.pipeline, world_size // model_parallel, parallel.expert,
                   parallel.expert_tensor, parallel.sequence_parallel, parallel.distributed_optimizer)

    @property
    def expert_tensor_size(self) -> int:
        return self.expert_tensor or self.tensor

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def expert_data(self) -> int:
        """Ranks holding a replica of the same experts: ``tensor * data / (expert * expert_tensor)``."""
        return self.tensor * self.data // (self.expert * self.expert_tensor_size)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory of the most loaded pipeline stage, in GiB (see :func:`memory_per_gpu`)."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    workspace: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.workspace

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def attention_keeps_scores(attention_backend: str) -> bool:
    """Whether the core attention saves ``b x heads x s x s`` scores for the backward: Megatron's unfused
    ``DotProductAttention`` does; TE's fused attention and torch SDPA (flash / cuDNN / memory-efficient)
    do not ('auto' is one of those two, whichever the layers use)."""
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention_backend!r}")
    return attention_backend == "megatron_local"


def attention_score_bytes(precision: str) -> int:
    """Bytes per ``s x s`` score element Megatron's unfused attention saves per layer: the fp32 softmax
    output (``attention_softmax_in_fp32``) and, in bf16, the probabilities cast back for the ``bmm`` (4 + 2);
    in fp32 one tensor serves both (4). Attention dropout is 0, so no mask is kept."""
    return 6 if precision == "bf16" else 4


def activation_bytes_per_token_layer(shape: ModelShape, layout: Layout, precision: str,
                                     attention_scores: bool = False) -> float:
    """Saved activations per token per layer in bytes (after Korthikanti et al., arXiv 2205.05198,
    adapted to flash attention, GQA, SwiGLU, QK-norm and MoE; no recomputation):

        outside the TP region: 4 C            (two norm inputs, two linear inputs; / TP only with SP)
        attention (/ TP):       3 Cq + 3 Ckv  (q,k before QK-norm; q,k,v into flash attention; its output)
                                + Cq + H      (gated attention: ungated output and gate)
        dense MLP (/ TP):       3 ffn         (fc1 output, gate and up; SwiGLU output)
        MoE:                    topk C + 3 ffn topk/k (/ ETP: dispatched copies, expert fc1/act)
                                + 3 ffn/k (/ TP, shared expert) + 2 E (fp32 router logits)

    times 2 bytes (bf16) or 4 (fp32). Flash attention keeps no ``s x s`` scores; with
    ``attention_scores`` (Megatron's unfused attention) add ``H/TP * s * attention_score_bytes`` per token.
    """
    C, Cq, Ckv, tp = shape.width, shape.query_width, shape.kv_width, layout.tensor
    outside = 4 * C / (tp if layout.sequence_parallel else 1)
    attention = 3 * Cq + 3 * Ckv + ((Cq + shape.num_heads) if shape.gated_attention else 0)
    if shape.moe:
        topk = shape.router_topk
        experts = (topk * C + 3 * shape.expert_ffn * topk) / layout.expert_tensor_size
        mlp = 3 * shape.expert_ffn * int(shape.moe_shared_expert) / tp + experts + 2 * shape.num_routed_experts
    else:
        mlp = 3 * shape.ffn / tp
    scores = shape.num_heads / tp * shape.seq_length * attention_score_bytes(precision) if attention_scores else 0.0
    return (2 if precision == "bf16" else 4) * (outside + attention / tp + mlp) + scores


RECOMPUTE = ("none", "selective", "full")
"""Activation recomputation settings the memory estimate knows (Megatron's ``recompute_granularity``)."""


@dataclass(frozen=True)
class Recompute:
    """Activation recomputation as Megatron does it (``model.recompute``, ``recompute_method``,
    ``recompute_num_layers``): 'none', 'selective' (the core attention) or 'full' (whole layers, 'uniform'
    chunks of ``num_layers`` or the first ``num_layers`` layers of a stage under 'block')."""

    mode: str = "none"
    method: str = "uniform"
    num_layers: int = 1

    def __post_init__(self):
        if self.mode not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {self.mode!r}")
        if self.method not in ("uniform", "block") or self.num_layers < 1:
            raise ValueError(f"recompute method must be uniform or block with num_layers >= 1, got "
                             f"{self.method!r}, {self.num_layers}")


def stage_activation_bytes(shape: ModelShape, layout: Layout, precision: str, attention_backend: str,
                           layers: int, recompute: Recompute = Recompute()) -> tuple[float, float]:
    """(bytes per token kept by one micro-batch in flight on a stage of ``layers`` layers, bytes per token that
    exist only while a recomputed chunk runs again in the backward):

    - 'none': :func:`activation_bytes_per_token_layer` per layer; nothing recomputed.
    - 'selective' (Megatron's ``core_attn``): the core attention is recomputed, so Megatron's unfused
      attention keeps no ``s x s`` scores (flash / SDPA keep none anyway: no change there).
    - 'full': a recomputed chunk keeps only its input, ``4 C`` bytes per token (the residual stream, fp32 in
      this project's bf16 runs; / TP with sequence parallelism), and its layers' activations exist again
      while it is recomputed; 'uniform' chunks all layers in groups of ``num_layers``, 'block' recomputes
      the first ``num_layers`` layers one by one and keeps everything of the others.
    """
    scores = attention_keeps_scores(attention_backend)
    per_layer = activation_bytes_per_token_layer(shape, layout, precision, attention_scores=scores)
    if recompute.mode == "none":
        return layers * per_layer, 0.0
    if recompute.mode == "selective":
        return layers * activation_bytes_per_token_layer(shape, layout, precision, attention_scores=False), 0.0
    chunk_input = 4 * shape.width / (layout.tensor if layout.sequence_parallel else 1)
    if recompute.method == "uniform":
        chunk = min(recompute.num_layers, layers)
        return math.ceil(layers / chunk) * chunk_input, chunk * per_layer
    recomputed = min(recompute.num_layers, layers)
    return recomputed * chunk_input + (layers - recomputed) * per_layer, per_layer if recomputed else 0.0


def memory_per_gpu(shape: ModelShape, layout: Layout, *, optimizer: str = "sphere_muon",
                   precision: str = "bf16", micro_batch_size: int = 1, num_micro_batches: int = 1,
                   attention_backend: str = "auto", recompute: Recompute = Recompute()) -> MemoryEstimate:
    """Rough per-GPU memory (within ~30%; allocator fragmentation and NCCL buffers not counted) of a valid
    layout (``config.check_layout``).

    Megatron mixed precision: weights 2 bytes/param (bf16; fp32: 4), gradients 4 (fp32 main_grad),
    master weights 4 (bf16 only); optimizer state AdamW 8 (m, v), sphere Muon / Muon 4 (momentum)
    for hidden matrices and 8 for the Adam groups (embedding, output layer, norm gains); the
    sphere radius is a scalar per matrix. The distributed optimizer divides master + state by the
    data-parallel size (experts: the expert-data-parallel size). Parameters: layers/PP of the
    per-layer counts (:func:`param_counts`), dense ones / TP, routed experts / (EP * ETP), the
    embedding on the first stage and the output layer on the last. When EP does not divide the routed
    experts, every EP rank holds ``padded / EP`` experts (``ModelShape.padded_experts``; the phantoms on the
    last rank have weights but no gradients or state), so the most loaded rank holds ``padded / EP`` real
    experts with gradients and state: the estimate counts the padded experts. Activations: 1F1B keeps
    ``min(PP, M)`` micro-batches in flight on the first stage (1 on the last),
    ``layers/PP * micro_batch * seq`` tokens each (:func:`activation_bytes_per_token_layer`),
    plus logits ``(2 + 4) V / TP`` bytes per token on the last stage. Workspace (Muon only):
    4 fp32 copies of the largest matrix for Newton-Schulz (gathered whole under TP). Attention
    (:func:`attention_keeps_scores`): with Megatron's unfused attention the saved scores per layer, plus a
    workspace of Megatron's preallocated score buffer and the fp32 softmax input of the layer being computed
    (``b H/TP s^2 (2|4 + 4)`` bytes). Recomputation (``recompute``, :func:`recomputed_activation_bytes`):
    fewer bytes kept per micro-batch, plus one chunk's activations while it is recomputed
    (:func:`stage_activation_bytes`).
    """
    if optimizer not in ("sphere_muon", "muon", "adamw"):
        raise ValueError(f"optimizer must be sphere_muon, muon or adamw, got {optimizer!r}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, got {precision!r}")
    check_positive(micro_batch_size=micro_batch_size, num_micro_batches=num_micro_batches)
    c = param_counts(shape)
    layers = shape.depth // layout.pipeline
    tp, pp = layout.tensor, layout.pipeline
    weight_bytes, master_bytes = (2, 4) if precision == "bf16" else (4, 0)
    matrix_state = 8 if optimizer == "adamw" else 4
    dp_shard = layout.data if layout.distributed_optimizer else 1
    edp_shard = layout.expert_data if layout.distributed_optimizer else 1
    tokens = micro_batch_size * shape.seq_length
    scores = attention_keeps_scores(attention_backend)
    kept, recomputed = stage_activation_bytes(shape, layout, precision, attention_backend, layers, recompute)
    largest = max(shape.width * 2 * (shape.expert_ffn if shape.moe else shape.ffn), shape.width * shape.query_width)
    workspace = 0.0 if optimizer == "adamw" else 4 * 4 * largest
    if scores:
        workspace += micro_batch_size * shape.num_heads / tp * shape.seq_length**2 * (weight_bytes + 4)
    stages = [("first", "last")] if pp == 1 else [("first",), ("last",)]
    best = None
    for stage in stages:
        adam = layers * c["norms"] / tp
        matrices = layers * (c["attention"] + c["dense_mlp"] + c["router"]) / tp
        padded = shape.padded_experts(layout.expert) / shape.num_routed_experts if shape.moe else 1.0
        experts = layers * c["experts"] * padded / (layout.expert * layout.expert_tensor_size)
        in_flight = min(pp, num_micro_batches) if "first" in stage else 1
        activations = (in_flight * kept + recomputed) * tokens
        if "first" in stage:
            adam += c["embedding"] / tp
        if "last" in stage:
            adam += (c["output"] + c["final_norm"]) / tp
            activations += tokens * 6 * shape.vocab_size / tp
        params = adam + matrices + experts
        opt = ((adam * (master_bytes + 8) + matrices * (master_bytes + matrix_state)) / dp_shard
               + experts * (master_bytes + matrix_state) / edp_shard)
        estimate = MemoryEstimate(weights=params * weight_bytes / GIB, grads=params * 4 / GIB,
                                  optimizer=opt / GIB, activations=activations / GIB, workspace=workspace / GIB)
        if best is None or estimate.total > best.total:
            best = estimate
    return best
