"""Checkpoints through Megatron ``dist_checkpointing``, written atomically.

Layout of ``<run_dir>/checkpoints``::

    step_000100/            a complete checkpoint (dist_checkpointing files + our files)
        manifest.json       every file's size and sha256, written last, verified on load
        train_state.json    step, consumed samples, config, derived values
        rng_rank00000.pt    per-rank RNG states: python, numpy, torch CPU, CUDA and Megatron's
                            tensor-parallel RNG tracker; restored only under the same layout key
    step_000100.tmp/        being written; never loaded, removed by the next save (or by the failed save)
    step_000100.kept-1/     a step directory that existed when this step was saved again (a damaged
                            checkpoint the run fell back from): set aside, never deleted
    latest                  the name of the newest complete checkpoint (replaced atomically); followed only
                            to a ``step_*`` directory inside ``checkpoints/``

A checkpoint becomes visible only when complete: all ranks write into a temporary directory, rank 0
writes the manifest, renames the directory, then replaces ``latest``. A kill at any moment leaves
either the previous ``latest`` or the new complete one. On load the manifest is checked; a corrupt
or truncated checkpoint is reported and the previous complete one is used; a damaged checkpoint is never
overwritten or deleted (see ``docs/reliability.md``).

Every file is read without unpickling code: the RNG states are tensors and plain numbers, loaded with
``torch.load(weights_only=True)``.

What a resume guarantees. On the CPU with one intra-op thread per process, and on a GPU with
``train.deterministic``, a run resumed in the same layout is bit-identical to the uninterrupted one
(weights digest; ``tests/test_resilience.py``, ``bench/gpu_check.py``). On a GPU without deterministic
algorithms, cuBLAS / atomics reduction orders vary from run to run, so a resumed run's next losses
equal the uninterrupted run's within 1e-4 relative (fp32; checked by ``bench/gpu_check.py``). In another
layout the weights and optimizer state reshard exactly, but the RNG streams are not restored (they
are per rank), and the next losses agree within the layout tolerance.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
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
STEP_NAME = re.compile(r"step_\d+")
DISK_FULL_BYTES = 1 << 20
"""Free bytes below which a failed write is reported as a full disk (writers such as torch's zip writer lose
the errno: ``unexpected pos 704 vs 598``)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written safely; reported as one line."""


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


def read_latest(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names (None without a ``latest``). It must name a ``step_*`` directory
    inside ``root``: anything else (``../..``, an absolute path, a link leading out) is a CheckpointError."""
    latest = root / LATEST
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    target = root / name
    if not STEP_NAME.fullmatch(name) or target.resolve().parent != root.resolve():
        raise CheckpointError(f"{latest} names {name!r}, not a step_* directory inside {root}: refusing to follow "
                              f"it (write a checkpoint's name, e.g. step_000100, into it or remove it)")
    return target


@dataclass
class Scan:
    """What a checkpoints root holds: the newest intact checkpoint and every damaged one tried before it."""

    intact: Path | None
    damaged: list[tuple[Path, str]]

    def describe_damage(self) -> str:
        return "; ".join(f"{path} ({problem})" for path, problem in self.damaged)


def scan(root: Path, log=print) -> Scan:
    """Verify ``root``'s checkpoints, ``latest`` first, then newest first, up to the first intact one; each
    damaged one is logged with what is tried next."""
    candidates = complete_checkpoints(root)
    named = read_latest(root)
    if named is not None:
        candidates = [named] + [c for c in candidates if c != named]
    damaged = []
    for i, candidate in enumerate(candidates):
        problem = verify(candidate) if candidate.is_dir() else "directory missing"
        if problem is None:
            return Scan(candidate, damaged)
        damaged.append((candidate, problem))
        following = f"trying {candidates[i + 1].name}" if i + 1 < len(candidates) else "no other checkpoint to try"
        log(f"[hyperp] checkpoint {candidate} is unusable ({problem}); {following}")
    return Scan(None, damaged)


def find_resumable(root: Path, log=print) -> Path | None:
    """The newest intact checkpoint under ``root`` (``latest`` first), reporting any that are damaged."""
    return scan(root, log).intact


def capture_rng_state(device: torch.device) -> dict:
    """Every RNG stream of this process: python, numpy, torch's CPU generator, the CUDA generator of
    ``device`` (on a GPU) and Megatron's tracker (model-, expert- and data-parallel streams, which
    drive tensor-parallel dropout; on the CPU they are CPU generator states, see ``compat/cpu.py``).

    Tensors, numbers and strings only, so that :func:`load_rng` reads it with ``weights_only=True``."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    device = torch.device(device)
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "tracker": {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()},
    }


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Set every stream :func:`capture_rng_state` captured (same device type)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
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
    saved = load_plain(path)
    if saved.get("key") != key:
        return f"saved for layout {saved.get('key')}, this run is {key}"
    restore_rng_state(saved["state"], device)
    return None


def load_plain(path: Path):
    """``torch.load(path, weights_only=True)``: tensors and plain data only, never code; anything else (a pickled
    object, e.g. an RNG file from before they were plain data, or a planted payload) is a CheckpointError."""
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        detail = re.search(r"Unsupported global: GLOBAL \S+|Unsupported [^\n.]*", str(exc))
        reason = detail.group(0).rstrip(". ") if detail else str(exc).splitlines()[0]
        raise CheckpointError(f"refusing to load {path}: it holds pickled objects, not only tensors and plain data "
                              f"({reason}); resume from a checkpoint written by this version") from None


def _default_rng_key(device: torch.device) -> dict:
    return {"world_size": dist.get_world_size(), "device": device.type}


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(opt, DistributedOptimizer)]


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Before a load: Megatron's DistributedOptimizer describes its state from the torch optimizer's, which is
    empty until the first step (``state_dict`` then fails on the missing Adam step). Megatron's own dummy
    initialization (a zero-gradient step) allocates it; the load then replaces every value (the Adam moments,
    the step and the fp32 main parameters) in place."""
    for opt in _distributed_optimizers(optimizer):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """After a load, each parameter's torch Adam ``step`` is the checkpoint's (its param groups carry it).
    Megatron's DistributedOptimizer leaves the per-parameter steps of the state it allocated for the load (the
    dummy step's 1), and where it does set them gives all parameters one shared tensor, which torch would
    increment once per parameter. Each parameter gets its own tensor holding the saved step."""
    for opt in _distributed_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = opt.optimizer.state.get(param, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype,
                                                 device=state["step"].device)


def _optimizer_metadata(optimizer) -> dict | None:
    """Megatron's DistributedOptimizer (AdamW with ``parallel.distributed_optimizer``) saves in the
    ``dp_reshardable`` format (Megatron-LM's default): it loads at another data-parallel size, not at another
    TP / PP layout. Its built-in default (``fully_sharded_model_space``) cannot be written by this megatron-core
    ("ShardedTensor.flattened_range is not supported"), and ``fully_reshardable`` cannot be loaded into torch's
    AdamW (no TE / apex: its per-parameter ``step``). Other optimizers take no metadata."""
    return {"distrib_optim_sharding_type": "dp_reshardable"} if _distributed_optimizers(optimizer) else None


def sharded_state_dict(model_chunks: list, optimizer, is_loading: bool = False) -> dict:
    model_sd = {}
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        model_sd[key] = unwrap(chunk).sharded_state_dict()
    state = dict(model_sd)
    if optimizer is not None:
        flat = model_sd["model"] if len(model_chunks) == 1 else {k: v for sd in model_sd.values() for k, v in sd.items()}
        state["optimizer"] = optimizer.sharded_state_dict(flat, is_loading=is_loading,
                                                          metadata=_optimizer_metadata(optimizer))
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
         rng_key: dict | None = None, log=print) -> Path:
    """Save a complete checkpoint for ``state.step`` (collective: every rank calls it); refuses a state
    with non-finite weights (:class:`NonFiniteStateError`). ``rng_key``: the layout the RNG streams
    belong to (``parallel.layout_key``; default: world size and device type).

    A write that fails on any rank (a full disk: "no space left on <root>") removes the partial ``.tmp`` and
    raises :class:`CheckpointError` on every rank; the previous checkpoint stays ``latest``."""
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
    failure = _attempt(lambda: (dist_checkpointing.save(sharded_state_dict(model_chunks, optimizer), str(tmp)),
                                save_rng(tmp, rank, rng_key or _default_rng_key(device), device)))
    _raise_if_any_failed(failure, root, tmp, state.step, device)
    if rank == 0:
        def publish():
            _write_json_atomic(tmp / STATE, {"train_state": vars(state), "world_size": dist.get_world_size(),
                                             **extra})
            _write_manifest(tmp)
            if final.exists():
                set_aside(final, log, "it existed when this step was saved again")
            os.replace(tmp, final)
            _write_json_atomic_text(root / LATEST, final.name)
        failure = _attempt(publish)
    _raise_if_any_failed(failure, root, tmp, state.step, device)
    if rank == 0:
        _prune(root, keep)
    dist.barrier()
    return final


def _prepare_tmp(root: Path, state: TrainState, model_chunks: list) -> tuple[Path, Path, torch.device]:
    """The checks and the fresh ``.tmp`` directory every save starts with (collective)."""
    device = _model_device(model_chunks)
    _check_finite_weights(model_chunks, state.step, device)
    _start_writer_helpers()
    final, tmp = root / f"step_{state.step:06d}", root / f"step_{state.step:06d}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    return final, tmp, device


class AsyncSaver:
    """Asynchronous checkpoint saves (``checkpoint.async_save``) through Megatron's ``dist_checkpointing`` async
    save and ``AsyncCallsQueue``: :meth:`save` writes the small files (RNG streams) and hands the tensors to a
    background writer process per rank (forked: on the CPU the fork's copy-on-write memory is the snapshot, on a
    GPU Megatron copies the tensors to host memory first), and the step loop goes on. When every rank's writer
    has finished, the finalize callback publishes the checkpoint exactly as :func:`save` does: the train state
    file, the manifest, the rename of ``.tmp`` and ``latest``, the pruning. Until then ``latest`` names the
    previous complete checkpoint, so a kill at any moment leaves a resumable run. One save is in flight at a
    time (a new one waits for the previous); :meth:`poll` (every step, on every rank: collective) publishes a
    finished save, :meth:`wait` blocks until it is published (preemption, end of training)."""

    def __init__(self, log=print):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        self.log = log
        self.pending: tuple | None = None
        """(root, tmp, step, device) of the save in flight."""

    def save(self, root: Path, state: TrainState, model_chunks: list, optimizer, extra: dict, keep: int = 2, *,
             rng_key: dict | None = None) -> Path:
        """Start saving ``state.step`` (collective); returns the directory it will have once published."""
        from megatron.core import dist_checkpointing

        self.wait()
        final, tmp, device = _prepare_tmp(root, state, model_chunks)
        rank, saved_state = dist.get_rank(), dict(vars(state))
        request = None

        def write():
            nonlocal request
            request = dist_checkpointing.save(sharded_state_dict(model_chunks, optimizer), str(tmp),
                                              async_sharded_save=True)
            save_rng(tmp, rank, rng_key or _default_rng_key(device), device)

        _raise_if_any_failed(_attempt(write), root, tmp, state.step, device)

        def publish():  # after every rank's writer finished (Megatron's finalize: all ranks, in order)
            if rank == 0:
                _write_json_atomic(tmp / STATE, {"train_state": saved_state, "world_size": dist.get_world_size(),
                                                 **extra})
                _write_manifest(tmp)
                if final.exists():
                    set_aside(final, self.log, "it existed when this step was saved again")
                os.replace(tmp, final)
                _write_json_atomic_text(root / LATEST, final.name)
                _prune(root, keep)
            dist.barrier()

        request.add_finalize_fn(publish)
        self.queue.schedule_async_request(request)
        self.pending = (root, tmp, state.step, device)
        return final

    def poll(self) -> None:
        """Publish the save in flight if every rank's writer has finished (collective; cheap when none is)."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Block until the save in flight (if any) is published (collective)."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if self.pending is None:
            return
        from torch.distributed.checkpoint.api import CheckpointException

        root, tmp, step, device = self.pending
        try:
            done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        except (OSError, RuntimeError, CheckpointException) as exc:  # raised on every rank by Megatron
            self.pending = None
            _raise_if_any_failed(exc, root, tmp, step, device)
            raise
        if done:
            self.pending = None

    def close(self) -> None:
        """Wait for the save in flight, then stop the queue."""
        self.wait()
        self.queue.close()


def _attempt(write) -> BaseException | None:
    """Run ``write``; the exception it raised (a full disk, an I/O error), or None."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        write()
    except (OSError, RuntimeError, CheckpointException) as exc:
        return exc
    return None


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes, and what torch's ``CheckpointException`` holds per rank (the writers' own errors,
    e.g. a full disk in a background writer process) with their causes, outermost first."""
    found, pending = [], [exc]
    while pending:
        seen = pending.pop(0)
        while seen is not None and seen not in found:
            found.append(seen)
            pending += [wrapped for wrapped, _ in getattr(seen, "failures", {}).values()]
            seen = seen.__cause__ or seen.__context__
    return found


def _is_disk_full(exc: BaseException, path: Path) -> bool:
    # Megatron's background writer reports its OSError as text only (RuntimeError "Worker failure: [Errno 28] ...").
    if any((isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or f"[Errno {errno.ENOSPC}]" in str(seen)
           for seen in _causes(exc)):
        return True
    try:
        return shutil.disk_usage(path).free < DISK_FULL_BYTES
    except OSError:
        return False


def _raise_if_any_failed(failure: BaseException | None, root: Path, tmp: Path, step: int,
                         device: torch.device) -> None:
    """Collective: if a write failed on any rank, rank 0 removes ``tmp`` and every rank raises CheckpointError."""
    failed = torch.tensor([0.0 if failure is None else 1.0], device=device)
    dist.all_reduce(failed)  # world: every rank has finished writing (or failed) before tmp is removed
    if not failed.item():
        return
    disk_full = failure is not None and _is_disk_full(failure, root)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = read_latest(root) if (root / LATEST).is_file() else None
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    if disk_full:
        raise CheckpointError(f"no space left on {root}: checkpoint step {step} not written (removed {tmp.name}); "
                              f"{kept}; free space and relaunch to resume")
    if failure is not None:
        failure = _causes(failure)[-1]  # the writer's own error, not torch's per-rank wrapper
    cause = str(failure).splitlines()[0] if failure is not None and str(failure) else type(failure).__name__
    where = f"{type(failure).__name__}: {cause}" if failure is not None else "on another rank"
    raise CheckpointError(f"writing checkpoint step {step} into {tmp} failed ({where}); removed it; {kept}")


def set_aside(path: Path, log=print, reason: str = "damaged") -> Path:
    """Rename a step directory (a damaged checkpoint the run fell back from) to a free ``<name>.kept-<k>``,
    which no save, prune or resume touches: a checkpoint is never overwritten or deleted by a later save."""
    k = 1
    while path.with_name(f"{path.name}.kept-{k}").exists():
        k += 1
    aside = path.with_name(f"{path.name}.kept-{k}")
    os.replace(path, aside)
    log(f"[hyperp] {path} set aside ({reason}): kept as {aside.name}")
    return aside


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
    if load_optimizer and optimizer is not None:
        _allocate_distributed_optimizer_state(optimizer)
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
        with torch.no_grad():  # Megatron's DistributedOptimizer copies into views of the parameters
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    device = _model_device(model_chunks)
    problem = load_rng(ckpt_dir, dist.get_rank(), rng_key or _default_rng_key(device), device)
    if problem and dist.get_rank() == 0:
        log(f"[hyperp] RNG streams not restored from {ckpt_dir.name} ({problem}); weights and optimizer state loaded")
    return TrainState(**meta["train_state"]), meta
