"""Every value a run derives from its config, computed once: ``derive(cfg, world_size)`` -> ``DerivedRun``.

The trainer calls :func:`derive` once at start-up (with the tokenizer's vocabulary), logs it, writes it to
``derived.json`` beside ``config.yaml`` and saves it with every checkpoint; everything downstream reads it
instead of recomputing: the LR schedule and the number of steps (the loop), the matrix weight decay and the
Muon baseline's decay reference (the optimizer), the output-logit multiplier (the model). The config is
never changed after it is saved: under ``hyperp.default_tokens`` the steps are ``derived.steps``, not
``train.steps``. :func:`ignored_settings` names each setting that has no effect in a run (a warning line
each). The rules themselves are ``transfer.py``; parameter, FLOP and memory budgets ``budget.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from hyperp_megatron.budget import (
    Layout,
    MemoryEstimate,
    ModelShape,
    Recompute,
    flops_per_token,
    memory_per_gpu,
    model_flops_per_token,
    num_params,
    num_params_total,
    training_flops,
)
from hyperp_megatron.config import Config, check_layout
from hyperp_megatron.transfer import (
    compose_lr,
    default_tokens,
    lr_at,
    lr_factors,
    muon_weight_decay,
    output_logit_multiplier,
)

DERIVED_FILE = "derived.json"


@dataclass(frozen=True)
class DerivedRun:
    """Every derived value of a run: the trainer logs it at start-up and saves it with the checkpoint."""

    rules: str
    """'hyperp' (sphere Muon), 'muon_baseline', 'depth_mup' (AdamW) or 'off' (hyperp.enabled false)."""
    shape: ModelShape
    layout: Layout
    num_params: float
    """N(d) as the reference counts it (``budget.num_params``)."""
    num_params_total: float
    base_num_params: float | None
    """N(d0) (None when HyperP is off)."""
    batch_tokens: int
    """B = global_batch_size * seq_length."""
    num_micro_batches: int
    """Micro-batches per optimizer step on each data-parallel rank (gradient accumulation)."""
    tokens: float
    """T of the token rule: the default T0 N(d)/N(d0), or steps * B."""
    default_tokens: float | None
    steps: int
    """Optimizer steps of the run: ``train.steps``, or ceil(T / B) under ``hyperp.default_tokens``."""
    lr: float
    """The schedule's peak LR (``optim.lr``, or the transfer rules' under ``hyperp.enabled``)."""
    min_lr_ratio: float
    warmup_steps: int
    depth_factor: float
    token_factor: float
    batch_factor: float
    weight_decay: float
    """Weight decay of the matrix rules (and of AdamW): ``optim.weight_decay``, or the Muon baseline's
    ``wd0 d0 / d`` under ``hyperp.enabled``."""
    decay_peak_lr: float | None
    """The Muon baseline's decay reference ``eta_peak`` (its decay is ``(eta(t) / eta_peak) wd``); None otherwise."""
    output_logit_multiplier: float
    output_init_std: float
    """Init std of the output layer (``model.output_init_std`` under 'hyperp'/'muon', else
    ``model.init_method_std``): under sphere Muon it fixes the output sphere's radius."""
    logit_capacity: float
    """``output_init_std * C * output_logit_multiplier``: the logit an average output row produces from a
    unit-RMS final hidden state (times the final-norm gain); the reference has 0.02 C."""
    flops_per_token: float
    """Training FLOPs per token in the reference's budget convention (``budget.flops_per_token``)."""
    train_flops: float
    """flops_per_token * steps * B."""
    memory: MemoryEstimate
    vocab_size: int = 0
    """V: the vocabulary every count above uses (model.vocab_size, else the tokenizer's)."""
    model_flops_per_token: float = 0.0
    """Model FLOPs per token of the MFU convention (``budget.model_flops_per_token``: no input embedding,
    causal attention halved)."""
    at_base_vocab: dict | None = None
    """When ``hyperp.base_vocab_size`` is set and differs from V: N, tokens, steps and LR the run would have at
    that vocabulary (:func:`vocab_change_line` says what changed); None otherwise."""
    phantom_experts: int = 0
    """Phantom experts per MoE layer: routed experts added to reach a multiple of the expert-parallel size
    (zero weights, never routed, not trained or checkpointed; docs/moe.md). Counted in ``memory``."""

    @property
    def trained_tokens(self) -> int:
        return self.steps * self.batch_tokens

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    def lr_at(self, step: int) -> float:
        """The schedule's LR at 0-based optimizer step ``step`` (``transfer.lr_at``)."""
        return lr_at(step, self.steps, self.lr, self.min_lr_ratio, self.warmup_steps)

    def to_dict(self) -> dict:
        """JSON-ready: scalars, plus ``shape``, ``layout`` and ``memory_gib`` sub-dicts."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(shape=dataclasses.asdict(self.shape), layout=dataclasses.asdict(self.layout),
                   memory_gib=self.memory.to_dict(), trained_tokens=self.trained_tokens, min_lr=self.min_lr)
        del out["memory"]
        return out


def recompute_of(cfg: Config) -> Recompute:
    """The run's activation recomputation (``model.recompute``, its method and chunk size) for the memory
    estimate."""
    m = cfg.model
    return Recompute(m.recompute, m.recompute_method, m.recompute_num_layers)


def vocab_change_line(derived: DerivedRun) -> str | None:
    """One line saying what the run's vocabulary changes against ``hyperp.base_vocab_size`` (N(d) counts
    ``2 V C``, so the default token budget T0 N(d)/N(d0) and the LR's token factor move with V), or None."""
    base = derived.at_base_vocab
    if base is None:
        return None
    changes = [f"N(d) {base['num_params'] / 1e6:.5g}M -> {derived.num_params / 1e6:.5g}M"]
    for name, label, fmt in (("tokens", "tokens", ".4g"), ("steps", "steps", "d"), ("lr", "peak LR", ".4g")):
        if not math.isclose(base[name], getattr(derived, name), rel_tol=1e-12):
            changes.append(f"{label} {base[name]:{fmt}} -> {getattr(derived, name):{fmt}}")
    if len(changes) == 1:
        changes.append("token budget and LR unchanged")
    return (f"vocabulary {derived.vocab_size} differs from hyperp.base_vocab_size {base['vocab_size']} (the "
            f"vocabulary the base values were tuned with): {', '.join(changes)}; the rules count the run's "
            f"vocabulary (set hyperp.base_vocab_size: {derived.vocab_size} to accept this without the warning)")


def resolve_vocab_size(cfg: Config, vocab_size: int | None = None) -> int:
    """``vocab_size``, else model.vocab_size, else the embedded tokenizer's; ValueError if unknown."""
    vocab = vocab_size or cfg.model.vocab_size
    if vocab is None and not cfg.data.prefixes:
        vocab = cfg.data.embedded_vocab_size  # the embedded corpus's tokenizer
    if vocab is None:
        raise ValueError("model.vocab_size is unset and the tokenizer's size is not known here: "
                         "set model.vocab_size or pass vocab_size")
    return vocab


def logit_multiplier(cfg: Config) -> float:
    """The output-logit multiplier ``cfg`` implies (``transfer.output_logit_multiplier``: ``d0/d`` under the
    Muon baseline, else 1): ``DerivedRun.output_logit_multiplier``, the model's default and the converters'."""
    return output_logit_multiplier(cfg.model.parameterization, cfg.model.num_layers, cfg.hyperp.base_depth)


def _lr_rules(cfg: Config, shape: ModelShape, tokens: float, batch_tokens: float) -> dict:
    """Which rules apply per optimizer (reference ``pretrain.py:setup``): the token law is MuonH's
    only; Depth-muP and the batch rule apply to all; Muon also scales weight decay and logits."""
    h, o = cfg.hyperp, cfg.optim
    logits = logit_multiplier(cfg)
    if not h.enabled:
        rules, lr, weight_decay = "off", o.lr, o.weight_decay
        factors = dict(depth_factor=1.0, token_factor=1.0, batch_factor=1.0)
    else:
        factors = lr_factors(depth=shape.depth, base_depth=h.base_depth, tokens=tokens, base_tokens=h.base_tokens,
                             batch_tokens=batch_tokens, base_batch_tokens=h.base_batch_tokens,
                             token_exponent=h.token_exponent, depth_rule=h.depth_rule,
                             token_rule=h.token_rule and o.name == "sphere_muon", batch_rule=h.batch_rule)
        lr = compose_lr(h.base_lr, factors)
        rules = {"sphere_muon": "hyperp", "muon": "muon_baseline", "adamw": "depth_mup"}[o.name]
        weight_decay = (muon_weight_decay(o.weight_decay, shape.depth, h.base_depth) if o.name == "muon"
                        else o.weight_decay)
    return dict(rules=rules, lr=lr, **factors, weight_decay=weight_decay,
                decay_peak_lr=lr if o.name == "muon" else None, output_logit_multiplier=logits)


def derive(cfg: Config, world_size: int, *, vocab_size: int | None = None,
           use_default_tokens: bool | None = None) -> DerivedRun:
    """Every derived value of a run from ``cfg.model``, ``cfg.parallel``, ``cfg.train``, ``cfg.optim``
    and ``cfg.hyperp``: B = global_batch_size * seq_length; T = steps * B, or (default tokens)
    T = T0 N(d)/N(d0) with steps = ceil(T / B); the LR, weight decay and logit multiplier of
    :func:`_lr_rules`; FLOPs; memory per GPU. ``vocab_size`` overrides an unset model.vocab_size
    (the tokenizer's). ``use_default_tokens`` defaults to ``cfg.hyperp.default_tokens``. Runs the layout
    check (``config.check_layout``) first.
    """
    check_layout(cfg, world_size)
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
    num_micro_batches = t.global_batch_size // (t.micro_batch_size * layout.data)
    memory = memory_per_gpu(shape, layout, optimizer=cfg.optim.name, precision=t.precision,
                            micro_batch_size=t.micro_batch_size, num_micro_batches=num_micro_batches,
                            attention_backend=cfg.model.attention_backend, recompute=recompute_of(cfg))
    at_base_vocab = None
    if h.enabled and h.base_vocab_size and vocab != h.base_vocab_size:
        base = derive(cfg, world_size, vocab_size=h.base_vocab_size, use_default_tokens=use_default_tokens)
        at_base_vocab = {"vocab_size": h.base_vocab_size, "num_params": base.num_params, "tokens": base.tokens,
                         "steps": base.steps, "lr": base.lr}
    lr_rules = _lr_rules(cfg, shape, tokens, batch_tokens)
    output_std = cfg.model.output_init_std if cfg.model.hyperp_architecture else cfg.model.init_method_std
    return DerivedRun(
        output_init_std=output_std,
        logit_capacity=output_std * shape.width * lr_rules["output_logit_multiplier"],
        vocab_size=vocab, model_flops_per_token=model_flops_per_token(shape), at_base_vocab=at_base_vocab,
        shape=shape, layout=layout, num_params=n, num_params_total=num_params_total(shape),
        base_num_params=base_n, batch_tokens=batch_tokens, num_micro_batches=num_micro_batches, tokens=tokens,
        default_tokens=default_t, steps=steps, min_lr_ratio=cfg.optim.min_lr_ratio,
        warmup_steps=cfg.optim.warmup_steps, flops_per_token=flops_per_token(shape),
        train_flops=training_flops(shape, steps * batch_tokens), memory=memory,
        phantom_experts=cfg.model.moe.phantom_experts(layout.expert) if cfg.model.moe.enabled else 0,
        **lr_rules,
    )


# ----------------------------------------------------------------------------------------------
# Settings without effect, and the run directory's record


def _changed(cfg: Config, dotted: str) -> bool:
    """Whether the setting differs from its default (a setting at its default was most likely not set)."""
    section, key = dotted.split(".", 1)
    value, default = getattr(cfg, section), getattr(Config(), section)
    for part in key.split("."):
        value, default = getattr(value, part), getattr(default, part)
    return value != default


def _value(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def ignored_settings(cfg: Config, derived: DerivedRun) -> list[str]:
    """One line per setting that differs from its default but has no effect in this run, saying why."""
    o, h, m = cfg.optim, cfg.hyperp, cfg.model
    reasons: list[tuple[list[str], str]] = [
        (["optim.lr"] if h.enabled else [],
         f"hyperp.enabled derives the peak LR ({derived.lr:.4g}) from hyperp.base_lr"),
        (["optim.momentum", "optim.ns_mode"] if o.name == "adamw" else [],
         "it applies to the Newton-Schulz rules (optim.name sphere_muon / muon); this run uses adamw"),
        (["optim.expert_sphere"] if o.name != "sphere_muon" or not m.moe.enabled else [],
         "it applies to routed experts under optim.name sphere_muon"),
        ([f"model.moe.{k}" for k in ("granularity", "shared_expert", "gate", "aux_loss_coeff", "token_dispatcher",
                                     "grouped_gemm")] if not m.moe.enabled else [],
         "model.moe.sparsity is 0 (a dense model)"),
        ([f"hyperp.{k}" for k in ("base_lr", "base_batch_tokens", "base_tokens", "base_vocab_size", "token_exponent",
                                  "depth_rule", "token_rule", "batch_rule")] if not h.enabled else [],
         "hyperp.enabled is false (the LR is optim.lr)"),
        (["hyperp.base_depth"] if not h.enabled and m.parameterization != "muon" else [],
         "hyperp.enabled is false and model.parameterization is not 'muon'"),
        (["hyperp.token_rule", "hyperp.token_exponent"] if h.enabled and o.name != "sphere_muon" else [],
         f"the token law applies to sphere_muon only; this run uses {o.name}"),
        (["model.init_method_std"] if m.hyperp_architecture else [],
         f"the '{m.parameterization}' initialization has fixed scales (model/init.py)"),
        (["model.output_init_std"] if not m.hyperp_architecture else [],
         "the 'standard' initialization draws the output layer with model.init_method_std"),
        (["model.fp32_residual"] if cfg.train.precision == "fp32" else [], "the run is fp32"),
        (["model.recompute_method", "model.recompute_num_layers"] if m.recompute != "full" else [],
         f"it applies to model.recompute full; this run uses {m.recompute!r}"),
        ([f"train.{k}" for k in ("fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo")]
         if cfg.train.fp8 is None else [], "train.fp8 is off"),
        (["data.embedded_vocab_size"] if cfg.data.prefixes else [], "data.prefixes replaces the embedded corpus"),
    ]
    lines = [f"{key} = {_value(cfg, key)!r} is ignored: {why}"
             for keys, why in reasons for key in keys if _changed(cfg, key)]
    if derived.steps != cfg.train.steps:
        lines.append(f"train.steps = {cfg.train.steps} is ignored: hyperp.default_tokens trains {derived.steps} "
                     f"steps (T0 N(d)/N(d0) = {derived.tokens:.4g} tokens)")
    return lines


def write_derived(run_dir: Path, derived: DerivedRun, ignored: list[str]) -> Path:
    """``run_dir/derived.json`` beside ``config.yaml``: every derived value and the ignored settings."""
    path = Path(run_dir) / DERIVED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**derived.to_dict(), "ignored_settings": ignored}, indent=1) + "\n")
    return path


def read_derived(run_dir: Path) -> dict | None:
    """The run's ``derived.json`` (what it trained with), or None for a run directory without one."""
    path = Path(run_dir) / DERIVED_FILE
    return json.loads(path.read_text()) if path.is_file() else None
