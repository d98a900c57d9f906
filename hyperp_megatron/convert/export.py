"""Export a checkpoint of this project (any TP / PP / EP layout) to a Hugging Face directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hyperp_megatron.convert import ours
from hyperp_megatron.convert.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPES,
    ShardWriter,
    copy_tokenizer,
    special_token_ids,
    staged_directory,
)
from hyperp_megatron.convert.registry import choose
from hyperp_megatron.convert.targets import SpecialTokens, Target

BLOCK = "hyperp_megatron"
"""The config.json key recording what the export did (read back by the import)."""
FORMAT_VERSION = 1
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def find_tokenizer(source: ours.Source, tokenizer: str | Path | None) -> Path:
    """The tokenizer the run trained with: ``tokenizer``, else ``data.tokenizer``, else the embedded
    corpus's under ``data.cache_dir`` (relative paths from the current directory)."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"--tokenizer {path} has no tokenizer.json (a Hugging Face fast tokenizer directory)")
        return path
    from hyperp_megatron.data.corpus import embedded_corpus_dir  # imports megatron-core: only when needed

    data = source.cfg.data
    candidates = [Path(data.tokenizer)] if data.tokenizer else []
    if not data.prefixes:
        candidates.append(embedded_corpus_dir(data.cache_dir, data.embedded_vocab_size) / "tokenizer")
    for path in candidates:
        if (path / "tokenizer.json").is_file():
            return path
    looked = ", ".join(str(p) for p in candidates) or "nowhere (the config names none)"
    raise ValueError(f"missing tokenizer: none found for {source.path} (looked in {looked}); pass --tokenizer DIR")


def _block(source: ours.Source, target: Target, exact_reason: str | None, folds) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "target": target.name,
        "exact": exact_reason is None,
        "inexact_reason": exact_reason,
        "folds": folds.to_dict(),
        "vocab_size": source.vocab_size,
        "padded_vocab_size_trimmed": source.padded_vocab_size,
        "source": {"checkpoint": str(source.path.resolve()), "step": source.step,
                   "git_sha": source.meta.get("git_sha")},
        "config": source.meta["config"],
    }


def protected_directory(checkpoint_dir: Path) -> Path:
    """What an export must never write into or replace: the checkpoint's run directory (``RUN`` of
    ``RUN/checkpoints/step_*``), else the checkpoint directory itself."""
    checkpoint_dir = checkpoint_dir.resolve()
    return checkpoint_dir.parent.parent if checkpoint_dir.parent.name == "checkpoints" else checkpoint_dir


def check_output(checkpoint_dir: Path, output: Path) -> None:
    """ValueError (one line) for an output that is, contains or lies inside the source's run directory: with
    --overwrite the export would delete the run it reads."""
    protected, out = protected_directory(checkpoint_dir), Path(output).resolve()
    if out == protected or protected in out.parents or out in protected.parents:
        relation = ("is" if out == protected else "lies inside" if protected in out.parents else "contains")
        raise ValueError(f"--output {output} {relation} the source's run directory {protected}: choose an output "
                         "outside it (an export never writes into the run it reads)")


def export(checkpoint: str | Path, output: str | Path, target: str = "auto", dtype: str = "fp32",
           tokenizer: str | Path | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
           overwrite: bool = False, allow_inexact: bool = False) -> dict:
    """Write ``output`` (config.json, generation_config.json, sharded safetensors + index, tokenizer files,
    the modeling file of the custom target); returns a summary. Every check runs before the model loads;
    the directory appears only when complete. ``allow_inexact`` (testing): accept an inexact target."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    check_output(ours.resolve_checkpoint(checkpoint), Path(output))
    source = ours.describe(checkpoint)
    cfg = source.cfg
    tokenizer_dir = find_tokenizer(source, tokenizer)
    bos, eos, tokenizer_vocab = special_token_ids(tokenizer_dir)
    if tokenizer_vocab > source.vocab_size:
        raise ValueError(f"vocab mismatch: tokenizer {tokenizer_dir} has {tokenizer_vocab} tokens but the model "
                         f"only {source.vocab_size}; pass the tokenizer the run trained with (--tokenizer)")
    adapter = choose(target, cfg, allow_inexact=allow_inexact)
    reason = adapter.inexact_reason(cfg)
    folds = adapter.folds(cfg)
    output = Path(output)
    with staged_directory(output, overwrite) as staging:
        with ours.single_process_world(cfg.train.seed) as pg_collection:
            model = ours.load(source, pg_collection)
            writer = ShardWriter(staging, DTYPES[dtype], max_shard_bytes)
            for group, pieces in ours.iter_pieces(model, cfg, source.vocab_size, release=True):
                pieces = folds.apply(pieces, qk_norm=cfg.model.qk_norm)
                if group == "top":
                    writer.add(adapter.top_to_hf(pieces))
                else:
                    writer.add(adapter.layer_to_hf(int(group.split(".")[1]), pieces, cfg))
            index = writer.finish()
            del model
        _write_metadata(staging, adapter, source, reason, folds, SpecialTokens(bos, eos), dtype)
        copy_tokenizer(tokenizer_dir, staging)
    return {"output": str(output), "target": adapter.name, "architecture": adapter.architecture,
            "exact": reason is None, "dtype": dtype, "step": source.step, "vocab_size": source.vocab_size,
            "num_shards": len(set(index["weight_map"].values())), "total_bytes": index["metadata"]["total_size"],
            "tokenizer": str(tokenizer_dir)}


def _write_metadata(directory: Path, adapter: Target, source: ours.Source, reason: str | None, folds,
                    special: SpecialTokens, dtype: str) -> None:
    from transformers import GenerationConfig

    config = adapter.hf_config(source.cfg, source.vocab_size, special, HF_DTYPE_NAMES[dtype])
    config[BLOCK] = _block(source, adapter, reason, folds)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=special.bos_token_id, eos_token_id=special.eos_token_id).save_pretrained(directory)
    if adapter.custom_code:
        from hyperp_megatron.convert.hyperp import MODELING_FILE

        shutil.copy2(MODELING_FILE, directory / MODELING_FILE.name)
