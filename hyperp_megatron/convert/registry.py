"""The adapters by name: ``--target`` (export) and an HF ``config.json``'s architecture (import).

The adapters import ``targets`` (the ``Target`` interface); this module imports them, so ``targets`` does not.
"""

from __future__ import annotations

from hyperp_megatron.config import Config
from hyperp_megatron.convert.hyperp import HyperPTarget
from hyperp_megatron.convert.llama import LlamaTarget, Qwen3Target
from hyperp_megatron.convert.qwen3_next import Qwen3NextTarget
from hyperp_megatron.convert.targets import Target


def registry() -> dict[str, Target]:
    """Every adapter by ``--target`` name."""
    targets = [Qwen3Target(), LlamaTarget(), Qwen3NextTarget(), HyperPTarget()]
    return {t.name: t for t in targets}


AUTO_ORDER = ("qwen3", "llama", "qwen3_next", "hyperp")
"""The most standard class first: Qwen3 and Llama load everywhere; Qwen3-Next needs a recent stack; the
custom ``hyperp`` class needs ``trust_remote_code``."""


def auto_target(cfg: Config) -> Target:
    targets = registry()
    for name in AUTO_ORDER:
        if targets[name].inexact_reason(cfg) is None:
            return targets[name]
    raise AssertionError("the hyperp target reproduces every model")  # pragma: no cover


def choose(name: str, cfg: Config, allow_inexact: bool = False) -> Target:
    """The adapter for ``--target name``; ValueError (one line) when it is unknown or inexact."""
    targets = registry()
    if name == "auto":
        return auto_target(cfg)
    if name not in targets:
        raise ValueError(f"unknown target {name!r}; choose auto, {', '.join(targets)}")
    reason = targets[name].inexact_reason(cfg)
    if reason is not None and not allow_inexact:
        raise ValueError(f"target {name} cannot reproduce this model exactly: {reason}; "
                         f"--target {auto_target(cfg).name} is exact")
    return targets[name]


def by_architecture(hf_config: dict) -> Target:
    """The adapter for an HF ``config.json`` (its ``architectures`` entry)."""
    architectures = hf_config.get("architectures") or []
    for target in registry().values():
        if target.architecture in architectures:
            return target
    known = ", ".join(t.architecture for t in registry().values())
    raise ValueError(f"unsupported architecture {architectures or hf_config.get('model_type')!r}; "
                     f"supported: {known}")
