"""Checkpoints through Megatron ``dist_checkpointing``, written atomically.

Layout of ``<run_dir>/checkpoints``::

    step_000100/            a complete checkpoint (dist_checkpointing files + our files)
        manifest.json       every file's size and sha256, written last, verified on load
        train_state.json    step, consumed samples, config, derived values
        rng_rank00000.pt    per-rank RNG states: python, numpy, torch CPU, CUDA and Megatron's
                            tensor-parallel RNG tracker; restored only under the same layout key
    step_000100.tmp/        being written; never loaded, removed by the next save
    latest                  the name of the newest complete checkpoint (replaced atomically)

A checkpoint becomes visible only when complete: all ranks write into a temporary directory, rank 0
writes the manifest, renames the directory, then replaces ``latest``. A kill at any moment leaves
either the previous ``latest`` or the new complete one. On load the manifest is checked; a corrupt
or truncated checkpoint is reported and the previous complete one is used.

What a resume guarantees. On the CPU with one intra-op thread per process, and on a GPU with
``train.deterministic``, a run resumed in the same layout is bit-identical to the uninterrupted one
(weights digest; ``tests/test_resilience.py``, ``bench/gpu_check.py``). On a GPU without deterministic
algorithms, cuBLAS / atomics reduction orders vary from run to run, so a resumed run's next losses
equal the uninterrupted run's within 1e-4 relative (fp32; checked by ``bench/gpu_check.py``). In another
layout the weights and optimizer state reshard exactly, but the RNG streams are not restored (they
are per rank), and the next losses agree within the layout tolerance.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hyperp_megatron.model.params import unwrap
from hyperp_megatron.resilience import PREEMPTION_SIGNALS

MANIFEST = "manifest.json"
STATE = "train_state.json"
LATEST = "latest"


class NonFiniteStateError(RuntimeError):
    """A checkpoint was refused because some weight is NaN or infinite."""


@dataclass
class TrainState:
    """What the loop needs to continue exactly where it stopped."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_manifest(ckpt_dir: Path) -> None:
    files = {
        str(p.relative_to(ckpt_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    _write_json_atomic(ckpt_dir / MANIFEST, {"files": files})


def verify(ckpt_dir: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong."""
    manifest = ckpt_dir / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete checkpoint)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for rel, meta in files.items():
        path = ckpt_dir / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != meta["size"]:
            return f"truncated file {rel} ({path.stat().st_size} of {meta['size']} bytes)"
        if _sha256(path) != meta["sha256"]:
            return f"checksum mismatch in {rel}"
    return None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoints (with a manifest), newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and "." not in p.name and (p / MANIFEST).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def find_resumable(root: Path, log=print) -> Path | None:
    """The newest intact checkpoint under ``root`` (``latest`` first), reporting any that are damaged."""
    candidates = complete_checkpoints(root)
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for candidate in candidates:
        problem = verify(candidate) if candidate.is_dir() else "directory missing"
        if problem is None:
            return candidate
        log(f"[hyperp] checkpoint {candidate} is unusable ({problem}); trying the previous one")
    return None


def capture_rng_state(device: torch.device) -> dict:
    """Every RNG stream of this process: python, numpy, torch's CPU generator, the CUDA generator of
    ``device`` (on a GPU) and Megatron's tracker (model-, expert- and data-parallel streams, which
    drive tensor-parallel dropout; on the CPU they are CPU generator states, see ``compat/cpu.py``)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    device = torch.device(device)
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "tracker": {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()},
    }


def peek_resumable(root: Path) -> tuple[Path, int] | None:
    """The checkpoint a resume from ``root`` tries first (``root`` itself if it is one, else the one named in
    ``latest``, else the newest complete one) and its step, read without verifying its files."""
    if (root / MANIFEST).is_file():
        candidate = root
    elif (root / LATEST).is_file():
        candidate = root / (root / LATEST).read_text().strip()
    else:
        candidate = next(iter(complete_checkpoints(root)), None)
    if candidate is None:
        return None
    try:
        return candidate, int(json.loads((candidate / STATE).read_text())["train_state"]["step"])
    except (OSError, ValueError, KeyError):
        return None


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Set every stream :func:`capture_rng_state` captured (same device type)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _rng_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / f"rng_rank{rank:05d}.pt"


def save_rng(ckpt_dir: Path, rank: int, key: dict, device: torch.device) -> None:
    """This rank's RNG streams, with the layout ``key`` they belong to (``parallel.layout_key``)."""
    torch.save({"key": key, "state": capture_rng_state(device)}, _rng_file(ckpt_dir, rank))


def load_rng(ckpt_dir: Path, rank: int, key: dict, device: torch.device) -> str | None:
    """Restore this rank's RNG streams if they were saved under ``key``; else say why not."""
    path = _rng_file(ckpt_dir, rank)
    if not path.is_file():
        return f"no {path.name}"
    saved = torch.load(path, weights_only=False)
    if saved.get("key") != key:
        return f"saved for layout {saved.get('key')}, this run is {key}"
    restore_rng_state(saved["state"], device)
    return None


def _default_rng_key(device: torch.device) -> dict:
    return {"world_size": dist.get_world_size(), "device": device.type}


def sharded_state_dict(model_chunks: list, optimizer, is_loading: bool = False) -> dict:
    model_sd = {}
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        model_sd[key] = unwrap(chunk).sharded_state_dict()
    state = dict(model_sd)
    if optimizer is not None:
        flat = model_sd["model"] if len(model_chunks) == 1 else {k: v for sd in model_sd.values() for k, v in sd.items()}
        state["optimizer"] = optimizer.sharded_state_dict(flat, is_loading=is_loading)
    return state


def _check_finite_weights(model_chunks: list, step: int, device: torch.device) -> None:
    """Raise NonFiniteStateError on every rank if any rank holds a non-finite weight (collective)."""
    params = [p.detach() for chunk in model_chunks for p in chunk.parameters()]
    bad = torch.zeros(1, device=device)
    for param in params:
        bad += (~torch.isfinite(param)).sum()
    # World all-reduce: every rank refuses together, so no rank starts the (collective) save alone.
    dist.all_reduce(bad)
    if bad.item():
        raise NonFiniteStateError(f"refusing to checkpoint step {step}: {int(bad.item())} weight values (summed "
                                  "over ranks) are NaN or infinite; the previous checkpoint is kept")


def _model_device(model_chunks: list) -> torch.device:
    return next(p.device for chunk in model_chunks for p in chunk.parameters())


def _start_writer_helpers() -> None:
    """Start the helper processes Megatron's checkpoint writer spawns once per process with the preemption
    signals blocked, so that they inherit the blocked mask: the Manager behind
    ``megatron.core.dist_checkpointing.strategies.filesystem_async._get_write_results_queue`` and
    multiprocessing's resource tracker. SLURM signals every process of a step (``--signal``, ``scancel
    --signal``), and a helper with the default action dies, taking the preemption checkpoint with it
    (BrokenPipeError / EOFError in ``dist_checkpointing.save``). In this process a signal that arrives
    meanwhile stays pending and reaches the preemption handler as soon as the mask is restored."""
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        resource_tracker.ensure_running()  # (it ignores SIGTERM itself, and unblocks SIGTERM here on its way out)
        signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def save(root: Path, state: TrainState, model_chunks: list, optimizer, extra: dict, keep: int = 2, *,
         rng_key: dict | None = None) -> Path:
    """Save a complete checkpoint for ``state.step`` (collective: every rank calls it); refuses a state
    with non-finite weights (:class:`NonFiniteStateError`). ``rng_key``: the layout the RNG streams
    belong to (``parallel.layout_key``; default: world size and device type)."""
    from megatron.core import dist_checkpointing

    device = _model_device(model_chunks)
    _check_finite_weights(model_chunks, state.step, device)
    _start_writer_helpers()
    rank = dist.get_rank()
    final = root / f"step_{state.step:06d}"
    tmp = root / f"step_{state.step:06d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    dist_checkpointing.save(sharded_state_dict(model_chunks, optimizer), str(tmp))
    save_rng(tmp, rank, rng_key or _default_rng_key(device), device)
    dist.barrier()
    if rank == 0:
        _write_json_atomic(tmp / STATE, {"train_state": vars(state), "world_size": dist.get_world_size(), **extra})
        _write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_json_atomic_text(root / LATEST, final.name)
        _prune(root, keep)
    dist.barrier()
    return final


def _write_json_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for old in complete_checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)


def load(ckpt_dir: Path, model_chunks: list, optimizer, load_optimizer: bool = True, *,
         rng_key: dict | None = None, log=print) -> tuple[TrainState, dict]:
    """Load a checkpoint into the (possibly differently laid out) model and optimizer; the RNG streams
    only when saved under the same ``rng_key`` (see :func:`save`)."""
    from megatron.core import dist_checkpointing

    meta = json.loads((ckpt_dir / STATE).read_text())
    # A weights-only checkpoint (a Hugging Face import, hyperp_megatron.convert) starts a fresh optimizer.
    load_optimizer = load_optimizer and not meta.get("weights_only", False)
    sharded = sharded_state_dict(model_chunks, optimizer if load_optimizer else None, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    for i, chunk in enumerate(model_chunks):
        model = unwrap(chunk)
        state = loaded["model" if len(model_chunks) == 1 else f"model{i}"]
        # Phantom experts (docs/moe.md) are not in checkpoints: they keep their zeros.
        state.update({name: param.detach() for name, param in model.named_parameters()
                      if getattr(param, "phantom_expert", False)})
        model.load_state_dict(state)
    if load_optimizer and optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    device = _model_device(model_chunks)
    problem = load_rng(ckpt_dir, dist.get_rank(), rng_key or _default_rng_key(device), device)
    if problem and dist.get_rank() == 0:
        log(f"[hyperp] RNG streams not restored from {ckpt_dir.name} ({problem}); weights and optimizer state loaded")
    return TrainState(**meta["train_state"]), meta
