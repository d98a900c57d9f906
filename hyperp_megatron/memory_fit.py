"""Does a run fit the GPU's memory, and if not, what would: the check ``hyperp-plan --gpu-memory`` prints and the
trainer refuses with at start-up (on a GPU), and the smallest change that fits.

The estimate is ``budget.memory_per_gpu`` (through ``derived.derive``: the most loaded pipeline stage, within
~30%); a run fits when it is at most ``hardware.MEMORY_HEADROOM`` of the GPU's memory. Proposals change one
lever family at a time, so each is a command-line override a user can paste:

- the smallest layout: the fewest GPUs per model replica (TP before PP at equal size, TP with sequence
  parallelism, at most 8 = one node), the distributed optimizer when there is data parallelism;
- the same layout with less activation memory: selective recompute, smaller micro-batches (the global batch
  is kept: more micro-batches per step), full recompute, in that order of cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hyperp_megatron.config import Config
from hyperp_megatron.derived import DerivedRun, derive
from hyperp_megatron.hardware import MEMORY_HEADROOM

MAX_MODEL_PARALLEL = 8
"""Largest tensor * pipeline size proposed for a model replica (one node of 8 GPUs)."""


def usable_gib(gpu_memory_gib: float) -> float:
    """What a plan may use of a GPU with ``gpu_memory_gib`` (``hardware.MEMORY_HEADROOM`` of it)."""
    return MEMORY_HEADROOM * gpu_memory_gib


def fits(derived: DerivedRun, gpu_memory_gib: float) -> bool:
    return derived.memory.total <= usable_gib(gpu_memory_gib)


@dataclass(frozen=True)
class Proposal:
    """A change that makes the run fit: dotted config overrides and the estimate with them."""

    overrides: dict
    memory_gib: float
    world_size: int

    def command_line(self) -> str:
        def text(value):
            return str(value).lower() if isinstance(value, bool) else str(value)

        return " ".join(f"--{key} {text(value)}" for key, value in self.overrides.items())


def _replace(cfg: Config, overrides: dict) -> Config:
    sections: dict[str, dict] = {}
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        sections.setdefault(section, {})[key] = value
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


def _try(cfg: Config, overrides: dict, world_size: int, vocab_size: int | None,
         gpu_memory_gib: float) -> Proposal | None:
    """The proposal if ``cfg`` with ``overrides`` is a valid layout (the trainer's check) that fits, else None."""
    try:
        run = derive(_replace(cfg, overrides), world_size, vocab_size=vocab_size)
    except ValueError:
        return None
    return Proposal(overrides, run.memory.total, world_size) if fits(run, gpu_memory_gib) else None


def _layouts(cfg: Config):
    """(tensor, pipeline) by replica size, TP first at equal size, up to ``MAX_MODEL_PARALLEL``."""
    sizes = (1, 2, 4, 8)
    pairs = [(tp, pp) for tp in sizes for pp in sizes if tp * pp <= MAX_MODEL_PARALLEL
             and cfg.model.num_layers % pp == 0]
    return sorted(pairs, key=lambda pair: (pair[0] * pair[1], pair[1]))


def smallest_layout(cfg: Config, gpu_memory_gib: float, *, world_size: int | None = None, data: int | None = None,
                    vocab_size: int | None = None) -> Proposal | None:
    """The fewest GPUs per model replica that fit, keeping either the world size (``world_size``: the data-
    parallel size follows, as for a launched job) or the data-parallel size (``data``: the world grows, as
    in ``hyperp-plan --dp``). None when no layout up to ``MAX_MODEL_PARALLEL`` fits."""
    p = cfg.parallel
    for tp, pp in _layouts(cfg):
        if world_size is not None and world_size % (tp * pp):
            continue
        world = world_size if world_size is not None else tp * pp * data
        dp = world // (tp * pp)
        overrides = {"parallel.tensor": tp, "parallel.pipeline": pp}
        if tp > 1 and not p.sequence_parallel:
            overrides["parallel.sequence_parallel"] = True
        if tp == 1 and p.sequence_parallel:
            overrides["parallel.sequence_parallel"] = False
        if dp > 1 and not p.distributed_optimizer:
            overrides["parallel.distributed_optimizer"] = True
        overrides = {k: v for k, v in overrides.items() if getattr(p, k.split(".")[1]) != v}
        found = _try(cfg, overrides, world, vocab_size, gpu_memory_gib)
        if found is not None:
            return found
    return None


def less_activation_memory(cfg: Config, gpu_memory_gib: float, world_size: int,
                           vocab_size: int | None = None) -> Proposal | None:
    """The cheapest change at the same layout that fits: selective recompute, then halved micro-batches (down
    to 1), then full recompute (with the configured micro-batch first). None when none fits."""
    recompute = cfg.model.recompute
    candidates = []
    if recompute == "none":
        candidates.append({"model.recompute": "selective"})
    micro = cfg.train.micro_batch_size // 2
    while micro >= 1:
        candidates.append({"train.micro_batch_size": micro})
        micro //= 2
    if recompute and recompute != "full":
        candidates.append({"model.recompute": "full"})
        micro = cfg.train.micro_batch_size // 2
        while micro >= 1:
            candidates.append({"model.recompute": "full", "train.micro_batch_size": micro})
            micro //= 2
    for overrides in candidates:
        found = _try(cfg, overrides, world_size, vocab_size, gpu_memory_gib)
        if found is not None:
            return found
    return None


def does_not_fit_line(cfg: Config, derived: DerivedRun, gpu_memory_gib: float, gpu_name: str,
                      world_size: int) -> str | None:
    """None when the run fits; else one line: the estimate by part, the GPU, and what would fit."""
    if fits(derived, gpu_memory_gib):
        return None
    m = derived.memory
    parts = ", ".join(f"{name} {getattr(m, name):.1f}" for name in ("weights", "grads", "optimizer", "activations",
                                                                   "workspace"))
    proposals = [p for p in (smallest_layout(cfg, gpu_memory_gib, world_size=world_size,
                                             vocab_size=derived.vocab_size),
                             less_activation_memory(cfg, gpu_memory_gib, world_size, vocab_size=derived.vocab_size))
                 if p is not None]
    fix = (" or ".join(f"{p.command_line()} ({p.memory_gib:.1f} GiB)" for p in proposals) if proposals
           else f"nothing at {world_size} GPUs up to TP * PP = {MAX_MODEL_PARALLEL} with recompute: use more GPUs")
    return (f"estimated memory {m.total:.1f} GiB per GPU ({parts}) exceeds {MEMORY_HEADROOM:.0%} of the "
            f"{gpu_memory_gib:.1f} GiB of {gpu_name}; fits: {fix} (hyperp-plan --gpu-memory shows the plan; "
            f"train.memory_check: false starts anyway)")
