"""Where a run starts from, decided once before the model is built: its own latest intact checkpoint
(``checkpoint.resume``), else ``checkpoint.load``, else step 0; and what changed since that checkpoint.

Refused with one line (:class:`~hyperp_megatron.checkpoint.CheckpointError`): a run whose own checkpoints are all
damaged (they are left untouched), ``checkpoint.resume false`` in a run directory that already holds checkpoints
(the new run would mix its steps, metrics and pruning with them), a ``checkpoint.load`` with no intact checkpoint,
and a resume with another model shape or optimizer (:func:`config_changes`).
"""

from __future__ import annotations

from pathlib import Path

from hyperp_megatron import checkpoint as ckpt
from hyperp_megatron.config import Config, load_config

INCOMPATIBLE = (
    "model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.num_query_groups",
    "model.head_dim", "model.ffn_hidden_size", "model.vocab_size", "model.qk_norm", "model.gated_attention",
    "model.parameterization", "model.moe.sparsity", "model.moe.granularity", "model.moe.shared_expert",
    "optim.name", "optim.expert_sphere",
)
"""Settings a checkpoint's weights or optimizer state are tied to: a resume that changes one is refused."""
OPTIMIZER_KEYS = ("optim.name", "optim.expert_sphere")
"""Not compared for a weights-only checkpoint (an import): it starts a fresh optimizer."""
CHANGES_THE_DATA = ("train.seed", "train.global_batch_size", "model.seq_length", "data.prefixes", "data.weights",
                    "data.split", "data.tokenizer", "data.embedded_vocab_size")
"""Settings that change which samples the run sees from the resumed step on: a warning line and a record."""


def own_root(cfg: Config) -> Path:
    return Path(cfg.logging.run_dir) / "checkpoints"


def resume_roots(cfg: Config) -> list[Path]:
    """Where a run may start from, in order of preference: its own checkpoints (``checkpoint.resume``; a
    requeued or restarted run continues from its latest even when it began from ``checkpoint.load``), then
    ``checkpoint.load`` (a checkpoint directory, a checkpoints root or a run directory)."""
    c = cfg.checkpoint
    roots = [own_root(cfg)] if c.resume else []
    return roots + ([load_root(Path(c.load))] if c.load else [])


def load_root(path: Path) -> Path:
    """``checkpoint.load`` as a checkpoint or a checkpoints root (a run directory means its ``checkpoints/``)."""
    if not (path / ckpt.MANIFEST).is_file() and (path / "checkpoints").is_dir() and not list(path.glob("step_*")):
        return path / "checkpoints"
    return path


def find_checkpoint(cfg: Config, log=print, damaged: list[Path] | None = None) -> Path | None:
    """The intact checkpoint the run starts from, or None (step 0); CheckpointError (one line) when there is no
    safe choice. ``damaged`` (out): the run's own damaged checkpoints passed over on the way (they are set aside
    before training, never overwritten)."""
    c = cfg.checkpoint
    own = own_root(cfg)
    if c.resume:
        found = ckpt.scan(own, log)
        if found.intact is not None:
            if damaged is not None:
                damaged.extend(path for path, _ in found.damaged if path.is_dir())
            return found.intact
        if found.damaged:
            raise ckpt.CheckpointError(
                f"no intact checkpoint in {own}: {found.describe_damage()}; they are left as they are. To train "
                f"anyway, start a new run: --logging.run_dir NEW_DIR (add --checkpoint.load CHECKPOINT to start "
                f"from another checkpoint)")
    elif ckpt.complete_checkpoints(own) or (own / ckpt.LATEST).is_file():
        raise ckpt.CheckpointError(
            f"checkpoint.resume is false but {own} already holds checkpoints of an earlier run: a new run there "
            f"would mix with them; choose a new logging.run_dir (or set checkpoint.resume true to continue)")
    if not c.load:
        return None
    root = load_root(Path(c.load))
    if (root / ckpt.MANIFEST).is_file():  # a named checkpoint directory
        problem = ckpt.verify(root)
        if problem is not None:
            raise ckpt.CheckpointError(f"checkpoint.load {root} is damaged ({problem}): give an intact checkpoint")
        return root
    found = ckpt.scan(root, log)
    if found.intact is not None:
        return found.intact
    what = (f"no intact checkpoint ({found.describe_damage()})" if found.damaged
            else "no checkpoint in it (no manifest.json, no complete step_* directory)")
    raise ckpt.CheckpointError(f"checkpoint.load {c.load}: {what}; give a step_* checkpoint, a checkpoints/ "
                               f"directory or a run directory")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _saved_config(meta: dict) -> dict | None:
    """The checkpoint's run config with today's defaults filled in (the raw one if it no longer loads)."""
    saved = meta.get("config")
    if not isinstance(saved, dict):
        return None
    try:
        return _flatten(load_config(None, {k: v for k, v in saved.items() if k != "parallel"}).to_dict())
    except ValueError:
        return _flatten(saved)


def config_changes(cfg: Config, meta: dict, where: Path) -> dict[str, list]:
    """The settings in :data:`CHANGES_THE_DATA` that differ from the checkpoint's (``{key: [saved, now]}``);
    CheckpointError naming every key of :data:`INCOMPATIBLE` that differs."""
    saved = _saved_config(meta)
    if saved is None:
        return {}
    now = _flatten(cfg.to_dict())
    keys = [k for k in INCOMPATIBLE if not (meta.get("weights_only") and k in OPTIMIZER_KEYS)]
    incompatible = [k for k in keys if k in saved and saved[k] != now.get(k)]
    if incompatible:
        listed = ", ".join(f"{k} {saved[k]!r} -> {now.get(k)!r}" for k in incompatible)
        raise ckpt.CheckpointError(f"cannot resume from {where}: {listed} differ from the checkpoint's config "
                                   f"({where / ckpt.STATE}); restore them, or start a new run with "
                                   f"--logging.run_dir NEW_DIR")
    return {k: [saved[k], now.get(k)] for k in CHANGES_THE_DATA if k in saved and saved[k] != now.get(k)}
