"""Import a Hugging Face checkpoint as a run directory the trainer continues from.

``RUN_DIR/config.yaml`` (a complete trainer config, ``logging.run_dir`` = RUN_DIR), ``RUN_DIR/tokenizer/``
and ``RUN_DIR/checkpoints/step_000000`` (a weights-only checkpoint: the trainer starts a fresh optimizer on
it, in any layout). ``python -m hyperp_megatron.train --config RUN_DIR/config.yaml`` resumes there; sphere
Muon measures each sphere's radius at its first step, i.e. the imported weights' norms.

Our own exports (config.json has the ``hyperp_megatron`` block) come back with the run's config and every
folded factor divided out. Other checkpoints (Qwen3, Llama) get the ``standard`` parameterization (the HF
forward exactly); ``parameterization='hyperp'`` instead divides HyperP's multipliers out of the weights
(the same function, HyperP's architecture).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hyperp_megatron import checkpoint as ckpt
from hyperp_megatron.convert import ours
from hyperp_megatron.convert.export import BLOCK, FORMAT_VERSION
from hyperp_megatron.convert.folds import Folds
from hyperp_megatron.convert.hf_io import TensorReader, copy_tokenizer, special_token_ids, staged_directory
from hyperp_megatron.convert.registry import by_architecture

PARAMETERIZATIONS = ("standard", "hyperp", "muon")


def read_hf_config(hf_dir: Path) -> dict:
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{config_file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object (a model config), not a {type(config).__name__}")
    return config


def _run_config(hf_config: dict, adapter, parameterization: str | None, seq_length: int | None) -> dict:
    """Our run config (a dict the trainer reads) for this checkpoint, without layout or run directory."""
    block = hf_config.get(BLOCK)
    if block is not None:
        if block.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"config.json was written by converter format {block.get('format_version')}; "
                             f"this one reads format {FORMAT_VERSION}")
        if block.get("target") != adapter.name:
            raise ValueError(f"config.json records target {block.get('target')!r} but the architecture is "
                             f"{adapter.architecture}")
        if parameterization is not None:
            raise ValueError("--parameterization applies to checkpoints from elsewhere; this export carries its "
                             "run's parameterization")
        run = {k: v for k, v in block["config"].items() if k not in ("parallel", "logging", "checkpoint")}
        run["model"] = {**run["model"], "vocab_size": int(block["vocab_size"])}
    else:
        parameterization = parameterization or "standard"
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"--parameterization must be one of {', '.join(PARAMETERIZATIONS)}; "
                             f"got {parameterization!r}")
        run = {"model": {**adapter.model_config_from_hf(hf_config), "parameterization": parameterization}}
    if seq_length is not None:
        run["model"]["seq_length"] = int(seq_length)
    return run


def import_hf(hf_dir: str | Path, output: str | Path, parameterization: str | None = None,
              seq_length: int | None = None, overwrite: bool = False) -> dict:
    """Write the run directory ``output`` from ``hf_dir``; returns a summary. Every check that needs no
    weights runs first; the directory appears only when complete."""
    hf_dir, output = Path(hf_dir), Path(output)
    hf_config = read_hf_config(hf_dir)
    adapter = by_architecture(hf_config)
    run = _run_config(hf_config, adapter, parameterization, seq_length)
    run["logging"] = {"run_dir": str(output.resolve())}
    cfg = ours.single_process_config(run)  # validates the run config too
    block = hf_config.get(BLOCK)
    folds = Folds.from_dict(block["folds"]) if block else adapter.folds(cfg)
    vocab = cfg.model.vocab_size
    if hf_config.get("vocab_size") != vocab:
        raise ValueError(f"vocab mismatch: config.json has vocab_size {hf_config.get('vocab_size')}, "
                         f"the recorded run {vocab}")
    if not (hf_dir / "tokenizer.json").is_file():
        raise ValueError(f"missing tokenizer: {hf_dir} has no tokenizer.json (the trainer needs the model's tokenizer)")
    _, _, tokenizer_vocab = special_token_ids(hf_dir)
    if tokenizer_vocab > vocab:
        raise ValueError(f"vocab mismatch: the tokenizer has {tokenizer_vocab} tokens, the model's vocab_size "
                         f"is {vocab}")
    if block is None:  # the trainer reads data with this tokenizer (data.prefixes: the user's data)
        run["data"] = {**run.get("data", {}), "tokenizer": str(output.resolve() / "tokenizer")}
    read = TensorReader(hf_dir)
    m = cfg.model
    from hyperp_megatron.model.gpt import padded_vocab_size  # megatron-core: after the cheap checks

    with staged_directory(output, overwrite) as staging:
        with ours.single_process_world(cfg.train.seed) as pg_collection:
            model = ours.build(cfg, pg_collection, padded_vocab_size(vocab, 1))
            top = folds.apply(adapter.top_from_hf(read, hf_config), qk_norm=m.qk_norm, inverse=True)
            ours.assign_top(model, top)
            for i in range(m.num_layers):
                pieces = folds.apply(adapter.layer_from_hf(i, read, cfg), qk_norm=m.qk_norm, inverse=True)
                ours.assign(model, ours.megatron_layer(pieces, i, cfg))
            del top, pieces  # the model holds every weight now
            unused = read.unread()
            if unused:
                raise ValueError(f"{len(unused)} tensor(s) of the checkpoint do not fit the config "
                                 f"(e.g. {unused[0]}): config.json and the weights disagree")
            extra = {"config": run, "weights_only": True,
                     "imported_from": {"hf_dir": str(hf_dir.resolve()), "architecture": adapter.architecture,
                                       "folds": folds.to_dict()}}
            ckpt.save(staging / "checkpoints", ckpt.TrainState(), [model], None, extra, keep=0)
        copy_tokenizer(hf_dir, staging / "tokenizer")
        (staging / "config.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    return {"output": str(output), "architecture": adapter.architecture, "parameterization": m.parameterization,
            "from_our_export": block is not None, "checkpoint": str(output / "checkpoints" / "step_000000"),
            "vocab_size": vocab}
