"""The typed config tree: small dataclasses with a docstring per field, loaded from YAML plus
dotted CLI overrides (``--train.steps 100``), validated before any heavy work starts.

Each section validates itself in ``__post_init__``; cross-section checks (layout vs world size, heads
vs TP, ...) live in :func:`validate`, which the entry point calls once the world size is known.

Modules:

- ``sections``: the section dataclasses (``ModelConfig``, ..., ``Config``) and their choice constants;
- ``load``: YAML + dotted overrides -> ``Config`` (``load_config``, ``parse_overrides``, ``merge_dicts``);
- ``checks``: cross-section validation (``validate``, ``check_layout``, ``check_paths``, ``check_vocab_size``).
"""

from hyperp_megatron.config.checks import (
    ConfigError,
    check_layout,
    check_paths,
    check_vocab_size,
    data_parallel_size,
    validate,
)
from hyperp_megatron.config.load import load_config, merge_dicts, parse_overrides
from hyperp_megatron.config.sections import (
    ATTENTION_BACKENDS,
    RECOMPUTE_METHODS,
    RECOMPUTE_MODES,
    CheckpointConfig,
    Config,
    DataConfig,
    DebugConfig,
    HyperPConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    MonitorConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "RECOMPUTE_METHODS",
    "RECOMPUTE_MODES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DebugConfig",
    "HyperPConfig",
    "LoggingConfig",
    "ModelConfig",
    "MoEConfig",
    "MonitorConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "check_layout",
    "check_paths",
    "check_vocab_size",
    "data_parallel_size",
    "load_config",
    "merge_dicts",
    "parse_overrides",
    "validate",
]
