"""Run a function on N real processes with a gloo process group (CPU), and collect results.

Used by every distributed test: the function must be a top-level (importable) function of a test
module; it is called as ``fn(rank, world_size, *args)`` after ``torch.distributed`` is initialized
with gloo, and its return value (picklable) comes back to the parent, one entry per rank.

The ranks are forked from a forkserver that has imported torch, Megatron-Core and this library once per
test session (``PRELOAD``): a freshly spawned interpreter spends seconds of CPU importing them, which was
most of the parallel tier's time. Each rank is still a new process with fresh module state (no parallel
state, RNG or process group survives from one test to the next); it takes the parent's environment and
working directory at the time of the call, as a spawned process would.
"""

from __future__ import annotations

import atexit
import os
import pickle
import socket
import traceback
from multiprocessing import forkserver

import torch.multiprocessing as mp

PRELOAD = (
    "torch",
    "torch.distributed",
    "megatron.core.parallel_state",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "hyperp_megatron.train",
    "hyperp_megatron.model.gpt",
    "hyperp_megatron.optim.builder",
    "hyperp_megatron.monitors",
    "_dist",
)
"""Modules the forkserver imports before it forks the first rank (a module that fails to import is skipped)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, environ, cwd):
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Plain pickle: torch's queue pickler would share tensor storage through file descriptors that
        # vanish when this process exits before the parent reads them.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop_forkserver():
    """Stop and reap the forkserver at exit, so that the CPU time of the ranks it reaped counts among this
    process's children (``bench/test_suite.py`` reports it) and no server outlives the session."""
    stop = getattr(forkserver._forkserver, "_stop", None)  # CPython's own shutdown (3.9+); absent: leave it
    if stop is not None:
        stop()


_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(list(PRELOAD))  # read when the first rank starts the server
atexit.register(_stop_forkserver)


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return per-rank results."""
    ctx = _CONTEXT
    queue = ctx.Queue()
    port = free_port()
    environ, cwd = dict(os.environ), os.getcwd()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue, environ, cwd), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else timeout)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[rank] for rank in range(world_size)]
