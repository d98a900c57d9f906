"""Cross-section validation: checks that need several sections, the world size, the file system or the
tokenizer (layout vs world size, heads vs TP, ...). The entry point calls :func:`validate` once the world size
is known, before any heavy work."""

from __future__ import annotations

from pathlib import Path

from hyperp_megatron.config.sections import Config


def validate(cfg: Config, world_size: int) -> None:
    """Checks that need several sections, the world size or the file system (the entry point's, before any heavy
    work); raises ValueError naming what to change."""
    check_layout(cfg, world_size)
    check_paths(cfg)
    check_optional_packages(cfg)


def check_optional_packages(cfg: Config) -> None:
    """An optional package the config asks for is installed: ``logging.wandb_project`` needs ``wandb``."""
    import importlib.util

    if cfg.logging.wandb_project and cfg.logging.wandb_mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ValueError("logging.wandb_project is set but wandb is not installed: pip install wandb (the package's "
                         "[wandb] extra), or unset logging.wandb_project")


def check_recompute(model, parallel) -> None:
    """Full recompute's chunking against the layers of one pipeline stage (``model.recompute_num_layers``)."""
    if model.recompute != "full":
        return
    layers, n = model.num_layers // parallel.pipeline, model.recompute_num_layers
    if model.recompute_method == "uniform" and layers % n:
        raise ValueError(f"model.recompute_num_layers ({n}) must divide the {layers} layers of a pipeline stage "
                         "under model.recompute_method uniform (or use recompute_method block)")
    if model.recompute_method == "block" and n > layers:
        raise ValueError(f"model.recompute_num_layers ({n}) exceeds the {layers} layers of a pipeline stage "
                         "(recompute_method block recomputes that many layers per stage)")


def check_layout(cfg: Config, world_size: int) -> None:
    """THE layout check: whether the parallel layout fits the model, the batch and the world size (pure;
    ``derived.derive`` runs it too, so the planner refuses what the trainer refuses). ValueError otherwise."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    model_parallel = p.tensor * p.pipeline
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tensor * parallel.pipeline "
            f"= {p.tensor} * {p.pipeline}; change the layout or the number of processes"
        )
    dp = world_size // model_parallel
    if dp % p.expert:
        raise ValueError(
            f"data-parallel size {dp} (world {world_size} / TP*PP {model_parallel}) is not divisible by "
            f"parallel.expert = {p.expert}"
        )
    expert_dp_ranks = world_size // p.pipeline
    if expert_dp_ranks % (p.expert * p.expert_tensor_size):
        raise ValueError(
            f"world size / PP = {expert_dp_ranks} is not divisible by parallel.expert * expert_tensor "
            f"= {p.expert} * {p.expert_tensor_size}"
        )
    if m.num_attention_heads % p.tensor:
        raise ValueError(
            f"model.num_attention_heads ({m.num_attention_heads}) is not divisible by parallel.tensor ({p.tensor})"
        )
    if m.num_query_groups % p.tensor:
        raise ValueError(
            f"model.num_query_groups ({m.num_query_groups}) is not divisible by parallel.tensor ({p.tensor})"
        )
    if m.ffn_size % p.tensor:
        raise ValueError(f"FFN width {m.ffn_size} is not divisible by parallel.tensor ({p.tensor})")
    if m.num_layers % p.pipeline:
        raise ValueError(f"model.num_layers ({m.num_layers}) is not divisible by parallel.pipeline ({p.pipeline})")
    check_recompute(m, p)
    if p.sequence_parallel and m.seq_length % p.tensor:
        raise ValueError(f"model.seq_length ({m.seq_length}) must be divisible by parallel.tensor with sequence parallel")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size * data-parallel size = {t.micro_batch_size} * {dp}"
        )
    if m.moe.enabled:
        # EP need not divide the routed experts: the model is padded with phantom experts (docs/moe.md).
        # Phantoms sit on the last EP ranks; each rank must hold at least one real expert.
        if m.moe.phantom_experts(p.expert) >= m.moe.padded_experts(p.expert) // p.expert:
            raise ValueError(f"parallel.expert = {p.expert} leaves an expert-parallel rank with only phantom experts "
                             f"({m.moe.num_routed_experts} routed experts padded to "
                             f"{m.moe.padded_experts(p.expert)}): use a smaller parallel.expert")
        if m.ffn_size % m.moe.granularity:
            raise ValueError(f"FFN width {m.ffn_size} is not divisible by model.moe.granularity "
                             f"({m.moe.granularity}); set model.ffn_hidden_size")
        if p.tensor > 1 and not p.sequence_parallel:
            raise ValueError("an MoE model with parallel.tensor > 1 needs parallel.sequence_parallel: true "
                             "(Megatron's MoE layer refuses to train without it)")
        if m.expert_ffn_size % p.expert_tensor_size:
            raise ValueError("expert FFN width (ffn / granularity) is not divisible by the expert tensor size")
        if cfg.optim.expert_sphere == "per_layer" and p.distributed_optimizer and cfg.optim.name == "sphere_muon":
            raise ValueError("optim.expert_sphere per_layer does not work with parallel.distributed_optimizer "
                             "(layer-wise updates split a layer's experts over ranks): use per_expert or turn it off")
        if m.moe.shared_expert and m.expert_ffn_size % p.tensor:
            raise ValueError(f"shared expert FFN width (ffn / granularity = {m.expert_ffn_size}) is not "
                             f"divisible by parallel.tensor ({p.tensor}): the shared expert is tensor-parallel")
    elif p.expert > 1:
        raise ValueError("parallel.expert > 1 needs an MoE model (model.moe.sparsity > 0)")


def check_paths(cfg: Config) -> None:
    """The files and directories the config names exist (data, tokenizer, checkpoint to load)."""
    for prefix in cfg.data.prefixes:
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).is_file():
                raise ValueError(f"data file not found: {prefix + ext} (check data.prefixes)")
    if cfg.data.tokenizer and not Path(cfg.data.tokenizer).is_dir():
        raise ValueError(f"tokenizer directory not found: {cfg.data.tokenizer} (check data.tokenizer)")
    if cfg.checkpoint.load and not Path(cfg.checkpoint.load).exists():
        raise ValueError(f"checkpoint not found: {cfg.checkpoint.load} (check checkpoint.load)")


class ConfigError(ValueError):
    """A config value that can only be checked once the data is prepared (the tokenizer is known), still
    before any model is built: the entry point reports it as one line."""


def check_vocab_size(cfg: Config, tokenizer_vocab_size: int) -> None:
    """``model.vocab_size`` (when set) must hold every token id of the tokenizer."""
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer_vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({tokenizer_vocab_size}): raise it or leave it unset to use the tokenizer's")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor * cfg.parallel.pipeline)
