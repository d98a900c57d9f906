"""Helpers to run the real trainer in test worker processes (see tests/_dist.py)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import yaml

from hyperp_megatron.config import merge_dicts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "seq_length": 64},
    "data": {"cache_dir": os.path.join(REPO, "data")},
    "train": {"steps": 4, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "eval_iters": 1,
              "log_interval": 1},
    "optim": {"name": "adamw", "lr": 1e-2},
    "logging": {"progress": False, "tensorboard": False},
    "checkpoint": {"save_final": False, "resume": False},
}


def merge(base: dict, extra: dict) -> dict:
    return merge_dicts(copy.deepcopy(base), extra)


def train_worker(rank: int, world_size: int, overrides: dict, weights: bool = False) -> dict:
    """Run the trainer in this (already gloo-initialized) process; returns its result dict.

    With ``weights``, the result also holds the weights as full tensors on rank 0 (None on the other
    ranks) after the run's first optimizer step (``weights_step1``) and at the end (``weights``), and
    ``replica_spread``, the largest difference between two ranks' copies of one shard at the end
    (see :func:`gather_full_weights`).
    """
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hyperp_megatron import train as trainer
    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import load_config, validate

    apply_cpu_patches()
    cfg = load_config(None, merge(TINY, overrides))
    validate(cfg, world_size)
    sessions, captured = [], {}

    def setup(*args, **kwargs):
        session = original_setup(*args, **kwargs)
        sessions.append(session)
        train_step = session.runner.train_step

        def train_step_then_gather(*step_args, **step_kwargs):
            metrics = train_step(*step_args, **step_kwargs)
            if "weights_step1" not in captured:
                captured["weights_step1"], _ = gather_full_weights(session.model_chunks)
            return metrics

        if weights:
            session.runner.train_step = train_step_then_gather
        return session

    original_setup = trainer.setup
    trainer.setup = setup
    try:
        result = trainer.train(cfg, world_size, rank)
        if weights:
            result["weights"], result["replica_spread"] = gather_full_weights(sessions[0].model_chunks)
            result["weights_step1"] = captured.get("weights_step1")
        return result
    finally:
        trainer.setup = original_setup
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def gather_full_weights(model_chunks) -> tuple[dict | None, float]:
    """Every parameter of the model as one full tensor, on rank 0 (None elsewhere). Collective.

    The shards come from the model's ``sharded_state_dict`` (what dist checkpoints save): each names its
    place in the global tensor, so TP / expert-TP shards, PP stages, EP experts and the two halves of a
    SwiGLU fc1 land where a single process holds them. Keys are checkpoint keys, e.g.
    ``decoder.layers.mlp.linear_fc1.weight`` with the layer (and expert) axes prepended. Also returns,
    on every rank, the largest absolute difference between two ranks' copies of the same shard (DP
    replicas, TP-replicated norms): 0.0 when replicas agree bit for bit.
    """
    import torch
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from hyperp_megatron.model.params import unwrap

    shards = []
    for chunk in model_chunks:
        state = unwrap(chunk).sharded_state_dict()
        apply_factories(state)
        for item in nested_values(state):
            if isinstance(item, ShardedTensor) and item.data.is_floating_point() and "_extra_state" not in item.key:
                assert item.flattened_range is None, item.key
                shards.append((item.key, item.global_shape, item.global_offset, item.prepend_axis_num,
                               item.data.detach().float().cpu().clone()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, shards)
    full, filled, spread = {}, {}, 0.0
    for key, global_shape, offset, prepended, data in (s for rank_shards in gathered for s in rank_shards):
        if key not in full:
            full[key] = torch.zeros(global_shape)
            filled[key] = torch.zeros(global_shape, dtype=torch.bool)
        index = tuple(offset[:prepended]) + tuple(
            slice(start, start + size) for start, size in zip(offset[prepended:], data.shape))
        if filled[key][index].any():
            assert filled[key][index].all(), f"{key}: overlapping shards"
            spread = max(spread, (full[key][index] - data).abs().max().item())
        else:
            full[key][index] = data
            filled[key][index] = True
    assert all(mask.all() for mask in filled.values()), [k for k, m in filled.items() if not m.all()]
    return (full if dist.get_rank() == 0 else None), spread


def weight_differences(weights: dict, reference: dict) -> dict[str, float]:
    """Per parameter: max |w - w_ref| / max |w_ref| (same keys and shapes required)."""
    assert weights.keys() == reference.keys(), set(weights) ^ set(reference)
    out = {}
    for key, expected in reference.items():
        assert weights[key].shape == expected.shape, (key, weights[key].shape, expected.shape)
        out[key] = ((weights[key] - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()
    return out


ELEMENTWISE_ADAM_KEYS = ("embedding.", "output_layer.", "layernorm.", "layer_norm_", ".bias")
"""Checkpoint keys of the parameters that sphere Muon / Muon update with an Adam direction (embedding,
output layer, norm gains, biases); under AdamW every parameter is."""


def weight_parity(weights: dict, reference: dict, optimizer: str) -> dict:
    """``matrix_max_rel``: max over Newton-Schulz matrices of max |w - w_ref| / max |w_ref|;
    ``adam_max_rel`` and ``adam_fro_rel`` (||w - w_ref||_F / ||w_ref||_F): the same over the
    Adam-direction parameters (every parameter under AdamW)."""
    summary = {"matrix_max_rel": 0.0, "adam_max_rel": 0.0, "adam_fro_rel": 0.0}
    for key, value in weight_differences(weights, reference).items():
        if optimizer == "adamw" or any(part in key for part in ELEMENTWISE_ADAM_KEYS):
            fro = ((weights[key] - reference[key]).norm() / reference[key].norm()).item()
            summary["adam_max_rel"] = max(summary["adam_max_rel"], value)
            summary["adam_fro_rel"] = max(summary["adam_fro_rel"], fro)
        else:
            summary["matrix_max_rel"] = max(summary["matrix_max_rel"], value)
    return summary


def parity(result: dict, reference: dict, optimizer: str) -> dict:
    """How far a layout's run (``train_worker(..., weights=True)``) is from the reference run: the largest
    relative loss difference over the steps, :func:`weight_parity` after the first step (``step1``,
    when both runs have it) and at the end (``final``), and the final ``replica_spread``.

    Adam-direction entries are the least reproducible: Adam's step moves an entry by ~lr g / (|g| + eps)
    whatever the gradient's size, so an entry whose gradient is within rounding of 0 moves by visibly
    different amounts in two layouts; Newton-Schulz multiplies the weak directions of the update (and
    their rounding) by up to ~490 (the product of its five ``a`` coefficients). Both feed back into
    every later step, so the final weights agree less closely than the losses or the first step.
    """
    losses, expected = result["losses"], reference["losses"]
    assert len(losses) == len(expected), (losses, expected)
    summary = {"loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, expected)),
               "replica_spread": result["replica_spread"],
               "final": weight_parity(result["weights"], reference["weights"], optimizer)}
    if result.get("weights_step1") is not None and reference.get("weights_step1") is not None:
        summary["step1"] = weight_parity(result["weights_step1"], reference["weights_step1"], optimizer)
    return summary


# ---- real torchrun jobs (subprocesses) -----------------------------------------------------------


def write_config(tmp_path: Path, run_dir: Path, merge_into: dict | None = None, **extra) -> Path:
    """A YAML config for ``run_dir`` (TINY + ``merge_into`` + ``extra`` sections) in ``tmp_path``."""
    cfg = merge(TINY, {"logging": {"run_dir": str(run_dir)},
                       "checkpoint": {"save_final": True, "resume": True, "keep": 3}})
    cfg = merge(merge(cfg, merge_into or {}), extra)
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def job_env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)


def launch_torchrun(config: Path, *overrides: str, nproc: int = 2, mutation: str | None = None,
                    hook: str | None = None) -> subprocess.Popen:
    """The trainer under torchrun; with ``mutation``, through ``tests/mutants.py`` with that mutation; with
    ``hook`` (``NAME[:ARG]``), through ``tests/hooks.py`` with that timing hook."""
    assert mutation is None or hook is None
    entry = ["-m", "hyperp_megatron.train"]
    if mutation is not None:
        entry = ["-m", "tests.mutants", mutation]
    elif hook is not None:
        entry = ["-m", "tests.hooks", hook]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *entry, "--config", str(config), *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while steps_logged(run_dir) < step:
        assert proc is None or proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "training did not reach the step in time"
        time.sleep(0.2)


def worker_pids(proc: subprocess.Popen) -> list[int]:
    """The trainer processes torchrun started: its direct children (a worker's own helpers, e.g. the
    checkpoint writer's Manager, are forked with the worker's command line, so they match it too)."""
    pids = []
    for child in psutil.Process(proc.pid).children(recursive=False):
        try:  # a short-lived helper process may exit (or be a zombie) while we look
            cmdline = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if any(entry in cmdline for entry in ("hyperp_megatron.train", "tests.mutants", "tests.hooks")):
            pids.append(child.pid)
    return pids


def resumed_step(output: str) -> int | None:
    """The step a relaunched job resumed from (its "[hyperp] resumed from ... at step N" line), or None."""
    lines = [line for line in output.splitlines() if line.startswith("[hyperp] resumed from ")]
    assert len(lines) <= 1, lines
    return int(lines[0].rsplit("at step", 1)[1]) if lines else None


def final(run_dir: Path) -> dict:
    return json.loads((run_dir / "final.json").read_text())
