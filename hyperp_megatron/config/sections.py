"""The config sections: one small dataclass per section with a docstring per field (``config_docs.py`` reads
them for the README's config reference), and the top-level :class:`Config`.

Each section validates itself in ``__post_init__``; cross-section checks live in :mod:`.checks`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hyperp_megatron.transfer import (
    PAPER_BASE_BATCH_TOKENS,
    PAPER_BASE_DEPTH,
    PAPER_BASE_LR_DENSE,
    PAPER_BASE_TOKENS,
    PAPER_TOKEN_EXPONENT,
)

ATTENTION_BACKENDS = ("auto", "sdpa", "megatron_local")
"""``model.attention_backend`` (``model/sdpa_attention.py``); only 'megatron_local' keeps s x s scores."""

RECOMPUTE_MODES = ("none", "selective", "full")
"""``model.recompute``: Megatron's ``recompute_granularity`` (None, 'selective' = core attention, 'full')."""

RECOMPUTE_METHODS = ("uniform", "block")
"""``model.recompute_method`` under full recompute: Megatron's ``recompute_method``."""


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclass
class MoEConfig:
    """Mixture of experts (docs/method.md section 4). ``num_experts_total = 0`` means a dense model."""

    sparsity: int = 0
    """s: total experts = s * k (0 = dense MLP)."""
    granularity: int = 1
    """k: expert FFN width is ffn_hidden_size / k and k experts are active per token."""
    shared_expert: bool = False
    """One of the s*k experts is a shared (always active) expert: E = s*k - 1 routed, k - 1 selected."""
    gate: str = "sqrt"
    """Gate transform: 'sqrt' (SqrtGate) or 'plain' (ablation)."""
    aux_loss_coeff: float = 0.1
    """gamma of the switch-style load-balancing loss over the global batch."""
    token_dispatcher: str = "alltoall"
    """Megatron token dispatcher: 'alltoall' or 'allgather'."""
    grouped_gemm: str = "auto"
    """Grouped-GEMM experts (one weight per expert either way): 'auto' (on a GPU: Transformer Engine's
    TEGroupedMLP when TE is installed, else torch._grouped_mm experts; on CPU: Megatron's SequentialMLP),
    'true' (grouped experts on any device; on CPU the torch experts loop over experts) or 'false'
    (SequentialMLP)."""

    def __post_init__(self):
        _check_choice("model.moe.gate", self.gate, ("sqrt", "plain"))
        _check_choice("model.moe.token_dispatcher", self.token_dispatcher, ("alltoall", "allgather"))
        self.grouped_gemm = str(self.grouped_gemm).lower()  # YAML reads true/false as booleans
        _check_choice("model.moe.grouped_gemm", self.grouped_gemm, ("auto", "true", "false"))
        if self.sparsity < 0 or self.granularity < 1:
            raise ValueError("model.moe.sparsity must be >= 0 and model.moe.granularity >= 1")
        if self.aux_loss_coeff < 0:
            raise ValueError(f"model.moe.aux_loss_coeff must be >= 0, got {self.aux_loss_coeff}")
        if self.enabled and self.shared_expert and self.granularity < 2:
            raise ValueError("model.moe.shared_expert needs granularity >= 2 (k - 1 routed experts are selected)")

    @property
    def enabled(self) -> bool:
        return self.sparsity > 0

    @property
    def num_routed_experts(self) -> int:
        return self.sparsity * self.granularity - int(self.shared_expert)

    @property
    def router_topk(self) -> int:
        return self.granularity - int(self.shared_expert)

    def padded_experts(self, expert_parallel: int) -> int:
        """Routed experts as Megatron holds them at expert-parallel size ``expert_parallel``: the routed count
        rounded up to a multiple of EP. The extra ones are phantom experts (zero weights, never routed, not
        trained, not checkpointed; docs/moe.md), e.g. 63 routed experts at EP 8 -> 64."""
        return -(-self.num_routed_experts // expert_parallel) * expert_parallel

    def phantom_experts(self, expert_parallel: int) -> int:
        """How many phantom experts :meth:`padded_experts` adds per MoE layer (0 when EP divides the count)."""
        return self.padded_experts(expert_parallel) - self.num_routed_experts

    def expert_ffn(self, ffn_size: int) -> int:
        """FFN width of each expert (routed and shared): the dense width ``ffn_size`` over k."""
        return ffn_size // self.granularity


@dataclass
class ModelConfig:
    """The GPT architecture (docs/method.md section 2): RMSNorm pre-norm, RoPE, SwiGLU, GQA, untied embeddings."""

    num_layers: int = 4
    """Depth d (transformer layers)."""
    hidden_size: int = 256
    """Width C."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (GQA groups)."""
    head_dim: int | None = None
    """Head dimension (kv_channels); default hidden_size / num_attention_heads."""
    ffn_hidden_size: int | None = None
    """Dense FFN width; default 4 * hidden_size."""
    seq_length: int = 256
    """Training sequence length."""
    vocab_size: int | None = None
    """Vocabulary size; default: the tokenizer's (padded to a multiple of 128 * TP)."""
    rotary_base: int = 10000
    """RoPE base."""
    norm_epsilon: float = 1e-6
    """Epsilon of every RMSNorm (layer norms, QK-norm); imported Llama checkpoints often use 1e-5."""
    parameterization: str = "hyperp"
    """'hyperp' (sphere init, 1/sqrt(2d) branch multiplier, softmax scale sqrt(128)/hd), 'muon' (the
    Muon baseline: the HyperP architecture with output logits multiplied by hyperp.base_depth / d) or
    'standard' (Megatron's init and attention, no multipliers)."""
    qk_norm: bool = True
    """RMSNorm over the head dim on queries and keys, before RoPE."""
    gated_attention: bool = False
    """Per-head sigmoid output gate (HyperP optional)."""
    fp32_residual: bool = True
    """Keep the residual stream in fp32 in bf16 runs, as the HyperP reference (norms read it in fp32 and
    hand bf16 to the linear layers; model/residual.py). No effect in fp32 runs."""
    init_method_std: float = 0.02
    """Init std of the 'standard' parameterization (HyperP's and the 'muon' baseline's init has fixed scales,
    model/init.py)."""
    output_init_std: float = 0.02
    """Init std of the output layer under 'hyperp' and 'muon' (the reference's 0.02). Under sphere Muon the
    output layer stays on the sphere of its initial radius (about output_init_std * sqrt(vocab * C)), so
    this sets the logit capacity (about output_init_std * C * final-norm gain per average row): hold
    output_init_std * C constant to compare widths at equal capacity (docs/science.md)."""
    transformer_impl: str = "auto"
    """'auto' (Transformer Engine layers when TE and a GPU are present), 'local' or 'transformer_engine' (refused
    without TE and a GPU)."""
    attention_backend: str = "auto"
    """Core attention: 'auto' (TE's fused attention with TE layers, else 'sdpa'), 'sdpa' (torch
    scaled_dot_product_attention: flash / cuDNN / memory-efficient kernels, no s x s scores) or
    'megatron_local' (Megatron's unfused DotProductAttention: keeps b x heads x s x s scores)."""
    recompute: str = "none"
    """Activation recomputation (Megatron's ``recompute_granularity``; docs/performance.md): 'none', 'selective'
    (the core attention is recomputed in the backward: frees the b x heads x s x s scores of 'megatron_local'
    attention, next to nothing with flash / SDPA / TE fused attention) or 'full' (whole transformer layers:
    only each recomputed chunk's input is kept, at the cost of one more forward pass per step)."""
    recompute_method: str = "uniform"
    """Full recompute only (Megatron's ``recompute_method``): 'uniform' (every pipeline stage's layers in chunks
    of ``recompute_num_layers``, each chunk's input kept) or 'block' (the first ``recompute_num_layers`` layers of
    each stage recomputed, the others keep their activations)."""
    recompute_num_layers: int = 1
    """Full recompute only (Megatron's ``recompute_num_layers``): layers per recomputed chunk ('uniform'; must
    divide the layers of a pipeline stage) or recomputed layers per stage ('block')."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts settings."""

    def __post_init__(self):
        _check_choice("model.parameterization", self.parameterization, ("hyperp", "muon", "standard"))
        _check_choice("model.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("model.recompute", self.recompute, RECOMPUTE_MODES)
        _check_choice("model.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        if self.recompute_num_layers < 1:
            raise ValueError(f"model.recompute_num_layers must be >= 1, got {self.recompute_num_layers}")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "seq_length",
                     "rotary_base"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("head_dim", "ffn_hidden_size", "vocab_size"):  # None = derived; 0 would silently be too
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be positive (or unset for the default), got {getattr(self, name)}")
        if not self.init_method_std > 0:
            raise ValueError(f"model.init_method_std must be > 0, got {self.init_method_std}")
        if not self.output_init_std > 0:
            raise ValueError(f"model.output_init_std must be > 0, got {self.output_init_std}")
        if self.num_query_groups > self.num_attention_heads:
            raise ValueError(f"model.num_query_groups ({self.num_query_groups}) must be <= model.num_attention_heads "
                             f"({self.num_attention_heads}): each key/value head serves one or more query heads")
        if not self.norm_epsilon > 0:
            raise ValueError(f"model.norm_epsilon must be > 0, got {self.norm_epsilon}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"model.num_query_groups ({self.num_query_groups})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) is not divisible by model.num_attention_heads "
                f"({self.num_attention_heads}): set model.head_dim explicitly"
            )
        if self.kv_channels % 2:
            raise ValueError(f"the head dimension ({self.kv_channels}) must be even: RoPE rotates pairs of channels "
                             "(set model.head_dim, or hidden_size / num_attention_heads, to an even number)")

    @property
    def hyperp_architecture(self) -> bool:
        """Branch multiplier, HyperP softmax scale and init: 'hyperp' and its 'muon' baseline."""
        return self.parameterization in ("hyperp", "muon")

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def expert_ffn_size(self) -> int:
        """FFN width of each expert (routed and shared): ffn_size / k (``MoEConfig.expert_ffn``)."""
        return self.moe.expert_ffn(self.ffn_size)


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallel size = world_size / (tensor * pipeline) (experts reuse DP ranks)."""

    tensor: int = 1
    """Tensor-parallel size (TP)."""
    pipeline: int = 1
    """Pipeline-parallel size (PP)."""
    expert: int = 1
    """Expert-parallel size (EP), carved out of the data-parallel ranks. It need not divide the routed experts:
    they are padded with phantom experts (never routed, not trained or checkpointed; docs/moe.md)."""
    expert_tensor: int | None = None
    """Expert tensor-parallel size; default = tensor."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor > 1)."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (AdamW: Megatron's; sphere Muon: layer-wise)."""
    backend: str = "auto"
    """'auto' (nccl with CUDA, gloo otherwise), 'gloo' or 'nccl'."""
    timeout_minutes: int = 30
    """Collective timeout."""

    def __post_init__(self):
        _check_choice("parallel.backend", self.backend, ("auto", "gloo", "nccl"))
        for name in ("tensor", "pipeline", "expert", "timeout_minutes"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.expert_tensor is not None and self.expert_tensor < 1:
            raise ValueError(f"parallel.expert_tensor must be >= 1 (or unset for parallel.tensor), "
                             f"got {self.expert_tensor}")
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tensor > 1")

    @property
    def expert_tensor_size(self) -> int:
        return self.expert_tensor or self.tensor


@dataclass
class DataConfig:
    """Training data: the embedded corpus (default) or Megatron .bin/.idx prefixes."""

    prefixes: list[str] = field(default_factory=list)
    """Dataset prefixes (path without .bin/.idx); empty = the embedded Shakespeare corpus."""
    weights: list[float] = field(default_factory=list)
    """Blend weights, one per prefix (default: equal)."""
    tokenizer: str | None = None
    """Hugging Face tokenizer directory (required with prefixes; the embedded corpus brings its own)."""
    split: str = "969,30,1"
    """train,valid,test split of each dataset, Megatron style."""
    cache_dir: str = "data"
    """Where the embedded corpus, the tokenizer and the dataset index caches live."""
    embedded_vocab_size: int = 8192
    """Vocabulary of the byte-level BPE trained on the embedded corpus."""

    def __post_init__(self):
        if self.weights and len(self.weights) != len(self.prefixes):
            raise ValueError(
                f"data.weights has {len(self.weights)} entries but data.prefixes has {len(self.prefixes)}"
            )
        if self.prefixes and not self.tokenizer:
            raise ValueError("data.prefixes is set but data.tokenizer is missing: give the tokenizer directory")
        if any(not w > 0 for w in self.weights):
            raise ValueError(f"data.weights must all be > 0, got {self.weights}")
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ValueError(f"data.split must be three comma-separated numbers like '969,30,1', got {self.split!r}")
        if not float(parts[0]) > 0 or not float(parts[1]) > 0:
            raise ValueError(f"data.split {self.split!r} leaves no train or no validation data (the trainer validates "
                             "at least at the end): give both a weight, like '969,30,1'")
        if self.embedded_vocab_size < 257:
            raise ValueError(f"data.embedded_vocab_size must be >= 257 (256 bytes + end of document), "
                             f"got {self.embedded_vocab_size}")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw"
    """'sphere_muon' (HyperP), 'muon' (baseline) or 'adamw' (baseline)."""
    lr: float = 3e-3
    """Peak learning rate (under HyperP: derived from the hyperp section unless hyperp.enabled is false)."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (linear decay)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the matrix rules: the sphere matrices under sphere_muon (eta(t) wd per step, a
    first-order no-op that cannot shrink the sphere), the baseline's wd0 under muon (lambda = wd0 d0/d with
    hyperp.enabled, applied as (eta(t)/eta_peak) lambda per step, independent of the LR's size, as the
    reference), all decaying params under adamw. Embeddings and norm gains never decay under sphere_muon / muon."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    momentum: float = 0.95
    """Muon momentum (Nesterov)."""
    ns_mode: str = "gather"
    """Tensor-parallel Newton-Schulz: 'gather' or 'distributed' (Gram all-reduce)."""
    ns_dtype: str = "auto"
    """Newton-Schulz iterations of sphere_muon / muon: 'bf16' (as the HyperP reference and torch's Muon),
    'fp32', or 'auto' = bf16 on a GPU, fp32 on the CPU (where the exact parity tests run)."""
    expert_sphere: str = "per_expert"
    """Routed-expert spheres under sphere_muon: 'per_expert' (each expert its own sphere; results do not
    depend on EP) or 'per_layer' (all routed experts of a layer on one sphere, as the reference's block of
    experts on one GPU, made EP-invariant by an all-reduce over the expert-parallel group; an ablation)."""

    def __post_init__(self):
        _check_choice("optim.name", self.name, ("sphere_muon", "muon", "adamw"))
        _check_choice("optim.ns_mode", self.ns_mode, ("gather", "distributed"))
        _check_choice("optim.ns_dtype", self.ns_dtype, ("auto", "bf16", "fp32"))
        _check_choice("optim.expert_sphere", self.expert_sphere, ("per_expert", "per_layer"))
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.clip_grad and optim.weight_decay must be >= 0")
        for name in ("adam_beta1", "adam_beta2", "momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ValueError(f"optim.adam_eps must be > 0, got {self.adam_eps}")


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 200
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all data-parallel ranks (sets gradient accumulation)."""
    seed: int = 1234
    """Seed of initialization, data order and dropout."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (mixed precision with fp32 master weights)."""
    memory_check: bool = True
    """On a GPU, refuse to start (one line, with the smallest layout or recompute setting that fits) when the
    memory estimate (``budget.memory_per_gpu``) exceeds 90% of the GPU's memory (``hardware.MEMORY_HEADROOM``).
    The estimate is rough (~30%): false starts anyway. Not checked on the CPU."""
    eval_interval: int = 50
    """Validate every N steps (and at the end); 0 disables periodic validation."""
    eval_iters: int = 4
    """Validation micro-batches per evaluation."""
    log_interval: int = 10
    """Print a progress line every N steps."""
    threads: int = 0
    """torch intra-op threads per process on CPU (0 = cores / local processes)."""
    fp8: str | None = None
    """FP8 through Transformer Engine: None, 'e4m3' or 'hybrid' (needs TE layers on a GPU of compute capability
    >= 8.9, refused otherwise; master weights and optimizer state stay fp32, the output layer stays in high
    precision)."""
    fp8_recipe: str = "delayed"
    """TE FP8 recipe: 'delayed', 'tensorwise', 'blockwise' (Hopper) or 'mxfp8' (Blackwell)."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: steps of max-|x| history each FP8 scale is computed from."""
    fp8_amax_compute_algo: str = "max"
    """Delayed scaling: 'max' (largest amax in the history) or 'most_recent'."""
    deterministic: bool = False
    """GPU: deterministic algorithms (torch.use_deterministic_algorithms, cuBLAS workspace config, Megatron's
    deterministic_mode), so a rerun or a resume in the same layout is bit-identical; slower. Without it a
    resume on GPU reproduces the next losses within 1e-4 relative (fp32). On the CPU runs are bit-identical
    with one thread per process (train.threads 1; with several threads runs were measured to differ in the
    last bits)."""
    profile_steps: str | None = None
    """Torch profiler trace of these 1-based optimizer steps, 'first-last' (e.g. '5-7') or one step ('5'):
    a Chrome trace per rank at ``<run_dir>/profile/trace_rank<rank>.json``, each step a 'step N' range
    (docs/performance.md). None = no profiling."""
    tf32: bool = True
    """GPU: TF32 tensor cores for fp32 matmuls and convolutions (torch's 'high' float32 matmul precision);
    off under train.deterministic. No effect on the CPU."""

    def __post_init__(self):
        _check_choice("train.precision", self.precision, ("fp32", "bf16"))
        if self.fp8 is not None:
            _check_choice("train.fp8", self.fp8, ("e4m3", "hybrid"))
        _check_choice("train.fp8_recipe", self.fp8_recipe, ("delayed", "tensorwise", "blockwise", "mxfp8"))
        _check_choice("train.fp8_amax_compute_algo", self.fp8_amax_compute_algo, ("max", "most_recent"))
        if self.fp8_amax_history_len < 1:
            raise ValueError(f"train.fp8_amax_history_len must be >= 1, got {self.fp8_amax_history_len}")
        for name in ("steps", "micro_batch_size", "global_batch_size", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_interval", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.profile_steps is not None:
            from hyperp_megatron.profiling import parse_profile_steps

            parse_profile_steps(self.profile_steps)


@dataclass
class CheckpointConfig:
    """Megatron dist_checkpointing saves; automatic resume from the latest complete one."""

    interval: int = 0
    """Save every N steps (0 = only at the end)."""
    save_final: bool = True
    """Save when training ends."""
    resume: bool = True
    """Resume from the run directory's newest intact checkpoint if there is one (every file checked against its
    manifest; a damaged newer one is set aside as ``step_N.kept-K``, never overwritten; with none intact the run
    stops with one line). false in a run directory that already holds checkpoints is refused: choose a new
    logging.run_dir (docs/reliability.md)."""
    load: str | None = None
    """Start from this checkpoint (a ``step_*`` directory, a ``checkpoints/`` root or a run directory; no intact
    checkpoint there is an error) while the run has none of its own; once it has (a requeue or restart), it
    continues from its own latest (with checkpoint.resume)."""
    keep: int = 2
    """Complete checkpoints to keep (older ones are deleted; 0 keeps all)."""
    async_save: bool = False
    """Write checkpoints in the background (Megatron's dist_checkpointing async save): training goes on while
    a writer process per rank writes the tensors; the checkpoint is published (manifest, rename, ``latest``)
    only when every rank's writer has finished, and preemption and the end of training wait for it
    (docs/performance.md)."""


@dataclass
class HyperPConfig:
    """HyperP transfer base values (docs/method.md section 3)."""

    enabled: bool = False
    """Derive the LR (and token budget) from these base values instead of optim.lr."""
    base_depth: int = PAPER_BASE_DEPTH
    """d0: depth at which eta0 was tuned."""
    base_lr: float = PAPER_BASE_LR_DENSE
    """eta0: base learning rate at d0, B0, T0."""
    base_batch_tokens: float = PAPER_BASE_BATCH_TOKENS
    """B0: base batch in tokens."""
    base_tokens: float = PAPER_BASE_TOKENS
    """T0: training tokens at d0."""
    base_vocab_size: int | None = None
    """V0: the vocabulary the base values were tuned with (the reference family: 32000), or None. N(d) counts
    the embedding and output layer (2 V C), so a run with another vocabulary gets another default token
    budget and LR; when V0 is set and differs from the run's vocabulary, the trainer and ``hyperp-plan`` print
    one warning line with the values at V0 and at the run's vocabulary (``derived.vocab_change_line``)."""
    token_exponent: float = PAPER_TOKEN_EXPONENT
    """Exponent of the data-scaling law (T/T0)^exponent."""
    depth_rule: bool = True
    """Apply the Depth-muP factor sqrt(d0/d)."""
    token_rule: bool = True
    """Apply the token factor (T/T0)^exponent."""
    batch_rule: bool = True
    """Apply the square-root batch rule sqrt(B/B0)."""
    default_tokens: bool = False
    """Train for T = T0 N(d)/N(d0) tokens (train.steps becomes ceil(T/B))."""

    def __post_init__(self):
        if self.base_vocab_size is not None and self.base_vocab_size < 1:
            raise ValueError(f"hyperp.base_vocab_size must be a positive integer or null, got {self.base_vocab_size}")


@dataclass
class LoggingConfig:
    """Metrics and run directory."""

    run_dir: str = "runs/default"
    """Run directory: config, metrics.jsonl, TensorBoard events, checkpoints."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress: bool = True
    """Print the progress line on rank 0."""
    wandb_project: str | None = None
    """Also log the metrics to Weights & Biases under this project (rank 0; needs the optional ``wandb`` package:
    a run that sets this without it is refused at start-up). None = no W&B."""
    wandb_mode: str = "offline"
    """W&B mode: 'offline' (files under ``<run_dir>/wandb``, no network; upload later with ``wandb sync``),
    'online' or 'disabled'."""

    def __post_init__(self):
        _check_choice("logging.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        if self.wandb_project is not None and not str(self.wandb_project).strip():
            raise ValueError("logging.wandb_project must be a non-empty project name (or null for no W&B)")


@dataclass
class MonitorConfig:
    """Stability indicators (docs/method.md section 5, ``monitors.py``) and the non-finite step guard."""

    interval: int = 10
    """Compute and log the indicators every N optimizer steps (0 = off; the guard is always on)."""
    sample_tokens: int = 64
    """Attention Z: query positions per sequence, evenly spaced (0 = every position)."""
    sample_heads: int = 4
    """Attention Z: query heads, evenly spaced over all heads (0 = every head)."""
    outlier_sigma: float = 5.0
    """A branch-output element is an outlier when |x - mu_t| > outlier_sigma * sigma_t (per token)."""
    operator_norms: str = "output"
    """Operator norms logged with the indicators (``operator_norms.py``): 'output' (the output layer's
    RMS->infinity norm sqrt(fan_in) max_i ||row_i|| and RMS->RMS norm sqrt(fan_in/fan_out) sigma_max),
    'all' (also every hidden matrix's RMS->RMS norm and sigma_max / ||W||_F) or 'off'."""
    power_iterations: int = 2
    """Power iterations per monitor step for sigma_max (the vector is kept between monitor steps; a matrix's
    first estimate gets 5x as many)."""
    max_consecutive_skips: int = 5
    """Stop the run (non-zero exit) after this many consecutive steps with a non-finite loss or
    gradient norm (each such step is skipped: weights and optimizer state stay unchanged)."""

    def __post_init__(self):
        for name in ("interval", "sample_tokens", "sample_heads"):
            if getattr(self, name) < 0:
                raise ValueError(f"monitor.{name} must be >= 0, got {getattr(self, name)}")
        if not self.outlier_sigma > 0:
            raise ValueError(f"monitor.outlier_sigma must be > 0, got {self.outlier_sigma}")
        _check_choice("monitor.operator_norms", self.operator_norms, ("off", "output", "all"))
        if self.power_iterations < 1:
            raise ValueError(f"monitor.power_iterations must be >= 1, got {self.power_iterations}")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"monitor.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")


@dataclass
class DebugConfig:
    """Testing knobs (fault injection). Leave empty in real runs."""

    nan_at_steps: list[int] = field(default_factory=list)
    """TESTING ONLY: multiply the loss by NaN at these 1-based optimizer steps (loss and gradients
    become non-finite), to exercise the skip guard."""

    def __post_init__(self):
        if any(step < 1 for step in self.nan_at_steps):
            raise ValueError(f"debug.nan_at_steps are 1-based optimizer steps, got {self.nan_at_steps}")


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hyperp: HyperPConfig = field(default_factory=HyperPConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
