"""HyperP hyperparameter transfer rules (HYPERP.md sections 2-4), as pure functions of numbers.

One function per rule; each docstring gives the formula, its source and its assumptions. Sources:
HYPERP.md (the project spec); Ren et al., "Rethinking Language Model Scaling under Transferable
Hypersphere Optimization", arXiv 2603.28743 ("the paper"); the reference code microsoft/ArchScale
("the reference": ``pretrain.py:setup``, ``lit_gpt/config.py:get_parameters_count``,
``lit_gpt/speed_monitor.py:flops_per_param``).

No torch here. :func:`derive` turns a :class:`~hyperp_megatron.config.Config` into every derived
value of a run (the trainer logs it at start-up and saves it with the checkpoint);
``python -m hyperp_megatron.plan`` tabulates it over depths.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hyperp_megatron.config import Config, ModelConfig, ParallelConfig

GIB = 2**30


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Model family and parameter count


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the rules need: one member of the model family of HYPERP.md section 2."""

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
    def moe(self) -> bool:
        return self.moe_sparsity > 0

    @property
    def num_routed_experts(self) -> int:
        return self.moe_sparsity * self.moe_granularity - int(self.moe_shared_expert)

    @property
    def router_topk(self) -> int:
        return self.moe_granularity - int(self.moe_shared_expert)

    @property
    def expert_ffn(self) -> int:
        return self.ffn // self.moe_granularity

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
# Transfer rules (HYPERP.md section 3)


def default_tokens(base_tokens: float, num_params_target: float, num_params_base: float) -> float:
    """Chinchilla-style token budget ``T = T0 * N(d) / N(d0)`` (HYPERP.md section 3; reference
    ``train_tokens = int(t0 * n_target / n_base)``). With T0 = 10.4e9 and N(8) = 208.1M this is
    ~50 tokens per parameter, embeddings included."""
    _positive(base_tokens=base_tokens, num_params_target=num_params_target, num_params_base=num_params_base)
    return base_tokens * num_params_target / num_params_base


def depth_factor(depth: int, base_depth: int) -> float:
    """Depth-muP LR factor ``sqrt(d0 / d)`` (HYPERP.md section 3; paper: still needed on the sphere,
    with the ``1/sqrt(2d)`` residual-branch multiplier of section 2)."""
    _positive(depth=depth, base_depth=base_depth)
    return math.sqrt(base_depth / depth)


def token_factor(tokens: float, base_tokens: float, exponent: float = -0.32) -> float:
    """Data-scaling LR factor ``(T / T0) ** -0.32`` (HYPERP.md section 3; paper's fitted exponent,
    the same one seen for AdamW in arXiv 2409.19913; reference applies it to MuonH only)."""
    _positive(tokens=tokens, base_tokens=base_tokens)
    return (tokens / base_tokens) ** exponent


def batch_factor(batch_tokens: float, base_batch_tokens: float) -> float:
    """Square-root batch rule ``sqrt(B / B0)`` (HYPERP.md section 3; reference
    ``apply_batch_size_scaling(..., "default")``), B in tokens per optimizer step."""
    _positive(batch_tokens=batch_tokens, base_batch_tokens=base_batch_tokens)
    return math.sqrt(batch_tokens / base_batch_tokens)


def hyperp_lr(base_lr: float, *, depth: int, base_depth: int, tokens: float, base_tokens: float,
              batch_tokens: float, base_batch_tokens: float, token_exponent: float = -0.32,
              depth_rule: bool = True, token_rule: bool = True, batch_rule: bool = True) -> float:
    """Peak LR of a target run (HYPERP.md section 3):

        eta = eta0 * sqrt(B / B0) * sqrt(d0 / d) * (T / T0) ** -0.32

    Each switch replaces its factor by 1 (ablations, claims 2 and 3 of section 7). No width or
    MoE-granularity factor: the sphere's angular step and SqrtGate remove those dependences.
    Check (eta0 = 1.4e-2, B = B0, default T): 1.400e-2 (d8), 8.28e-3 (d12), 5.59e-3 (d16),
    4.10e-3 (d20), 3.17e-3 (d24).
    """
    _positive(base_lr=base_lr)
    lr = base_lr
    if batch_rule:
        lr *= batch_factor(batch_tokens, base_batch_tokens)
    if depth_rule:
        lr *= depth_factor(depth, base_depth)
    if token_rule:
        lr *= token_factor(tokens, base_tokens, token_exponent)
    return lr


def lr_at(step: int, total_steps: int, peak: float, min_ratio: float = 0.1, warmup: int = 0) -> float:
    """LR of the 0-based optimizer step ``step`` (HyperP schedule: no warmup, linear to 0.1 eta).

    Warmup (``step < warmup``): ``peak * (step + 1) / (warmup + 1)``. Then linear decay,

        lr = peak * ((1 - p) + min_ratio * p),   p = (step - warmup) / (total_steps - 1 - warmup)

    so the first decay step has exactly ``peak`` and the last step (``total_steps - 1``) exactly
    ``min_ratio * peak``; later steps stay at the minimum. Reference: ``min_lr_mult = 0.1``,
    ``warmup_tokens = 0`` for MuonH runs.
    """
    if total_steps < 1 or step < 0:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got step={step}, total_steps={total_steps}")
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if warmup < 0 or (warmup and warmup >= total_steps):
        raise ValueError(f"warmup must be in [0, total_steps) = [0, {total_steps}), got {warmup}")
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    decay_steps = total_steps - 1 - warmup
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup) / decay_steps)
    # the interpolation written this way is exact at both ends in floating point
    return peak * (1.0 - progress) + peak * min_ratio * progress


def muon_weight_decay(base_weight_decay: float, depth: int, base_depth: int) -> float:
    """Muon-baseline weight decay ``lambda = wd0 * d0 / d`` (HYPERP.md section 3; reference
    ``weight_decay * d0 / depth`` for Muon, after arXiv 2512.05620), applied "independently" of the LR's
    size: the weights shrink by ``(eta(t) / eta_peak) * lambda`` per step (reference: its group weight decay
    is ``lambda / eta_peak``, times the group LR ``eta(t)``), so a reference ``wd0`` carries over unchanged.
    Not used by sphere Muon, where weight decay is a first-order no-op (default 0)."""
    if base_weight_decay < 0:
        raise ValueError(f"base weight decay must be >= 0, got {base_weight_decay}")
    return base_weight_decay * depth_factor(depth, base_depth) ** 2


def muon_logit_multiplier(depth: int, base_depth: int) -> float:
    """Muon-baseline output-logit multiplier ``d0 / d`` (HYPERP.md section 3). HyperP uses none."""
    return depth_factor(depth, base_depth) ** 2


def muon_baseline_lr(base_lr: float, *, depth: int, base_depth: int, batch_tokens: float,
                     base_batch_tokens: float, depth_rule: bool = True, batch_rule: bool = True) -> float:
    """Muon-baseline LR ``eta0 * sqrt(B/B0) * sqrt(d0/d)``: the same depth factor, no token factor
    (HYPERP.md section 3). Its step is ``W (1 - (eta(t)/eta_peak) lambda) - eta(t) sqrt(fan_out/fan_in) O``
    with ``lambda`` = :func:`muon_weight_decay`."""
    return hyperp_lr(base_lr, depth=depth, base_depth=base_depth, tokens=1.0, base_tokens=1.0,
                     batch_tokens=batch_tokens, base_batch_tokens=base_batch_tokens,
                     depth_rule=depth_rule, token_rule=False, batch_rule=batch_rule)


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


def training_flops(shape: ModelShape, tokens: float) -> float:
    """Total training FLOPs ``T * flops_per_token`` (see :func:`flops_per_token`)."""
    _positive(tokens=tokens)
    return tokens * flops_per_token(shape)


# ----------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class Layout:
    """A parallel layout: world = tensor * pipeline * data; experts reuse data ranks."""

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
        if (self.tensor * self.data) % (self.expert * self.expert_tensor_size):
            raise ValueError(
                f"tensor * data = {self.tensor * self.data} is not divisible by expert * expert_tensor "
                f"= {self.expert} * {self.expert_tensor_size}"
            )

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int) -> Layout:
        model_parallel = parallel.tensor * parallel.pipeline
        if world_size < 1 or world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not a multiple of tensor * pipeline = {model_parallel}")
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


def check_layout(shape: ModelShape, layout: Layout) -> None:
    """The divisibility a layout needs from a shape (as :func:`config.validate`); ValueError otherwise."""
    checks = [
        (shape.num_heads % layout.tensor, f"{shape.num_heads} attention heads"),
        (shape.num_kv_heads % layout.tensor, f"{shape.num_kv_heads} KV heads"),
        (shape.ffn % layout.tensor, f"FFN width {shape.ffn}"),
    ]
    for bad, what in checks:
        if bad:
            raise ValueError(f"{what} not divisible by tensor-parallel size {layout.tensor} (depth {shape.depth})")
    if shape.depth % layout.pipeline:
        raise ValueError(f"depth {shape.depth} is not divisible by pipeline-parallel size {layout.pipeline}")
    if shape.moe and shape.num_routed_experts % layout.expert:
        raise ValueError(f"{shape.num_routed_experts} routed experts are not divisible by expert-parallel "
                         f"size {layout.expert}")
    if not shape.moe and layout.expert > 1:
        raise ValueError("expert parallelism > 1 needs an MoE model")


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


ATTENTION_BACKENDS = ("auto", "sdpa", "megatron_local")
"""``model.attention_backend`` (``model/sdpa_attention.py``): only 'megatron_local' keeps the scores."""


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


def memory_per_gpu(shape: ModelShape, layout: Layout, *, optimizer: str = "sphere_muon",
                   precision: str = "bf16", micro_batch_size: int = 1, num_micro_batches: int = 1,
                   attention_backend: str = "auto") -> MemoryEstimate:
    """Rough per-GPU memory (within ~30%; allocator fragmentation and NCCL buffers not counted).

    Megatron mixed precision: weights 2 bytes/param (bf16; fp32: 4), gradients 4 (fp32 main_grad),
    master weights 4 (bf16 only); optimizer state AdamW 8 (m, v), sphere Muon / Muon 4 (momentum)
    for hidden matrices and 8 for the Adam groups (embedding, output layer, norm gains); the
    sphere radius is a scalar per matrix. The distributed optimizer divides master + state by the
    data-parallel size (experts: the expert-data-parallel size). Parameters: layers/PP of the
    per-layer counts (:func:`param_counts`), dense ones / TP, routed experts / (EP * ETP), the
    embedding on the first stage and the output layer on the last. Activations: 1F1B keeps
    ``min(PP, M)`` micro-batches in flight on the first stage (1 on the last),
    ``layers/PP * micro_batch * seq`` tokens each (:func:`activation_bytes_per_token_layer`),
    plus logits ``(2 + 4) V / TP`` bytes per token on the last stage. Workspace (Muon only):
    4 fp32 copies of the largest matrix for Newton-Schulz (gathered whole under TP). Attention
    (:func:`attention_keeps_scores`): with Megatron's unfused attention the saved scores per layer, plus a
    workspace of Megatron's preallocated score buffer and the fp32 softmax input of the layer being computed
    (``b H/TP s^2 (2|4 + 4)`` bytes).
    """
    if optimizer not in ("sphere_muon", "muon", "adamw"):
        raise ValueError(f"optimizer must be sphere_muon, muon or adamw, got {optimizer!r}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, got {precision!r}")
    _positive(micro_batch_size=micro_batch_size, num_micro_batches=num_micro_batches)
    check_layout(shape, layout)
    c = param_counts(shape)
    layers = shape.depth // layout.pipeline
    tp, pp = layout.tensor, layout.pipeline
    weight_bytes, master_bytes = (2, 4) if precision == "bf16" else (4, 0)
    matrix_state = 8 if optimizer == "adamw" else 4
    dp_shard = layout.data if layout.distributed_optimizer else 1
    edp_shard = layout.expert_data if layout.distributed_optimizer else 1
    tokens = micro_batch_size * shape.seq_length
    scores = attention_keeps_scores(attention_backend)
    per_token_layer = activation_bytes_per_token_layer(shape, layout, precision, attention_scores=scores)
    largest = max(shape.width * 2 * (shape.expert_ffn if shape.moe else shape.ffn), shape.width * shape.query_width)
    workspace = 0.0 if optimizer == "adamw" else 4 * 4 * largest
    if scores:
        workspace += micro_batch_size * shape.num_heads / tp * shape.seq_length**2 * (weight_bytes + 4)
    stages = [("first", "last")] if pp == 1 else [("first",), ("last",)]
    best = None
    for stage in stages:
        adam = layers * c["norms"] / tp
        matrices = layers * (c["attention"] + c["dense_mlp"] + c["router"]) / tp
        experts = layers * c["experts"] / (layout.expert * layout.expert_tensor_size)
        in_flight = min(pp, num_micro_batches) if "first" in stage else 1
        activations = in_flight * layers * per_token_layer * tokens
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


# ----------------------------------------------------------------------------------------------
# Everything a run derives from its config


@dataclass(frozen=True)
class DerivedRun:
    """Every derived value of a run: the trainer logs it at start-up and saves it with the checkpoint."""

    rules: str
    """'hyperp' (sphere Muon), 'muon_baseline', 'depth_mup' (AdamW) or 'off' (hyperp.enabled false)."""
    shape: ModelShape
    layout: Layout
    num_params: float
    """N(d) as the reference counts it (:func:`num_params`)."""
    num_params_total: float
    base_num_params: float | None
    """N(d0) (None when HyperP is off)."""
    batch_tokens: int
    """B = global_batch_size * seq_length."""
    tokens: float
    """T of the token rule: the default T0 N(d)/N(d0), or steps * B."""
    default_tokens: float | None
    steps: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    depth_factor: float
    token_factor: float
    batch_factor: float
    weight_decay: float
    output_logit_multiplier: float
    flops_per_token: float
    train_flops: float
    """flops_per_token * steps * B."""
    memory: MemoryEstimate

    @property
    def trained_tokens(self) -> int:
        return self.steps * self.batch_tokens

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.steps, self.lr, self.min_lr_ratio, self.warmup_steps)

    def to_dict(self) -> dict:
        """JSON-ready: scalars, plus ``shape``, ``layout`` and ``memory_gib`` sub-dicts."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(shape=dataclasses.asdict(self.shape), layout=dataclasses.asdict(self.layout),
                   memory_gib=self.memory.to_dict(), trained_tokens=self.trained_tokens, min_lr=self.min_lr)
        del out["memory"]
        return out


def resolve_vocab_size(cfg: Config, vocab_size: int | None = None) -> int:
    """``vocab_size``, else model.vocab_size, else the embedded tokenizer's; ValueError if unknown."""
    vocab = vocab_size or cfg.model.vocab_size
    if vocab is None and not cfg.data.prefixes:
        vocab = cfg.data.embedded_vocab_size  # the embedded corpus's tokenizer
    if vocab is None:
        raise ValueError("model.vocab_size is unset and the tokenizer's size is not known here: "
                         "set model.vocab_size or pass vocab_size")
    return vocab


def _lr_rules(cfg: Config, shape: ModelShape, tokens: float, batch_tokens: float) -> dict:
    """Which rules apply per optimizer (reference ``pretrain.py:setup``): the token law is MuonH's
    only; Depth-muP and the batch rule apply to all; Muon also scales weight decay and logits."""
    h, o = cfg.hyperp, cfg.optim
    # The model applies the d0/d logit multiplier under model.parameterization 'muon' (model/gpt.py).
    logits = muon_logit_multiplier(shape.depth, h.base_depth) if cfg.model.parameterization == "muon" else 1.0
    if not h.enabled:
        return dict(rules="off", lr=o.lr, depth_factor=1.0, token_factor=1.0, batch_factor=1.0,
                    weight_decay=o.weight_decay, output_logit_multiplier=logits)
    token_rule = h.token_rule and o.name == "sphere_muon"
    factors = dict(
        depth_factor=depth_factor(shape.depth, h.base_depth) if h.depth_rule else 1.0,
        token_factor=token_factor(tokens, h.base_tokens, h.token_exponent) if token_rule else 1.0,
        batch_factor=batch_factor(batch_tokens, h.base_batch_tokens) if h.batch_rule else 1.0,
    )
    lr = h.base_lr * factors["depth_factor"] * factors["token_factor"] * factors["batch_factor"]
    if o.name == "muon":
        return dict(rules="muon_baseline", lr=lr, **factors,
                    weight_decay=muon_weight_decay(o.weight_decay, shape.depth, h.base_depth),
                    output_logit_multiplier=logits)
    rules = "hyperp" if o.name == "sphere_muon" else "depth_mup"
    return dict(rules=rules, lr=lr, **factors, weight_decay=o.weight_decay, output_logit_multiplier=logits)


def derive(cfg: Config, world_size: int, *, vocab_size: int | None = None,
           use_default_tokens: bool | None = None) -> DerivedRun:
    """Every derived value of a run from ``cfg.model``, ``cfg.parallel``, ``cfg.train``, ``cfg.optim``
    and ``cfg.hyperp``: B = global_batch_size * seq_length; T = steps * B, or (default tokens)
    T = T0 N(d)/N(d0) with steps = ceil(T / B); the LR, weight decay and logit multiplier of
    :func:`_lr_rules`; FLOPs; memory per GPU. ``vocab_size`` overrides an unset model.vocab_size
    (the tokenizer's). ``use_default_tokens`` defaults to ``cfg.hyperp.default_tokens`` if present.
    """
    vocab = resolve_vocab_size(cfg, vocab_size)
    shape = ModelShape.from_model_config(cfg.model, vocab)
    layout = Layout.from_config(cfg.parallel, world_size)
    h, t = cfg.hyperp, cfg.train
    batch_tokens = t.global_batch_size * shape.seq_length
    n = num_params(shape)
    try:
        base_n = num_params(shape.at_depth(h.base_depth)) if h.enabled else None
    except ValueError as exc:
        raise ValueError(f"N(d0) at hyperp.base_depth = {h.base_depth}: {exc}") from None
    default_t = default_tokens(h.base_tokens, n, base_n) if h.enabled else None
    if use_default_tokens is None:
        use_default_tokens = h.default_tokens
    if use_default_tokens:
        if not h.enabled:
            raise ValueError("the default token budget T0 N(d)/N(d0) needs hyperp.enabled: true")
        tokens, steps = default_t, math.ceil(default_t / batch_tokens)
    else:
        tokens, steps = float(t.steps * batch_tokens), t.steps
    if t.global_batch_size % (t.micro_batch_size * layout.data):
        raise ValueError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                         f"train.micro_batch_size * data-parallel size = {t.micro_batch_size} * {layout.data}")
    memory = memory_per_gpu(shape, layout, optimizer=cfg.optim.name, precision=t.precision,
                            micro_batch_size=t.micro_batch_size,
                            num_micro_batches=t.global_batch_size // (t.micro_batch_size * layout.data),
                            attention_backend=cfg.model.attention_backend)
    return DerivedRun(
        shape=shape, layout=layout, num_params=n, num_params_total=num_params_total(shape),
        base_num_params=base_n, batch_tokens=batch_tokens, tokens=tokens, default_tokens=default_t,
        steps=steps, min_lr_ratio=cfg.optim.min_lr_ratio, warmup_steps=cfg.optim.warmup_steps,
        flops_per_token=flops_per_token(shape), train_flops=training_flops(shape, steps * batch_tokens),
        memory=memory, **_lr_rules(cfg, shape, tokens, batch_tokens),
    )
