"""Test-only hooks for real torchrun trainers: they change timing, never results (for deliberately wrong
variants of the code, see ``tests/mutants.py``). From the repository root::

    torchrun --nproc-per-node 2 -m tests.hooks async_writer_stalls:4 --config run.yaml

(``trainer_utils.launch_torchrun(..., hook="async_writer_stalls:4")``) applies the hook and runs the trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

STALL_MARKER = "async_writer_stalled.json"
"""Written into the run directory by a stalled writer: the window for a kill is open."""
STALL_SECONDS = 900.0


def _stalling_write(original, step: int, seconds: float):
    def write(transform_list, *args, **kwargs):
        file_name = Path(kwargs["write_bucket"][0])  # <run_dir>/checkpoints/step_NNNNNN.tmp/__0_0.distcp
        if file_name.parent.name == f"step_{step:06d}.tmp":
            run_dir = file_name.parent.parent.parent
            (run_dir / STALL_MARKER).write_text(json.dumps({"step": step, "pid": os.getpid(), "file": file_name.name}))
            time.sleep(seconds)  # before writing and before reporting: the save stays in flight
        return original(transform_list, *args, **kwargs)

    return staticmethod(write)


def async_writer_stalls(step: str, seconds: str = str(STALL_SECONDS)):
    """Megatron's checkpoint writer processes stall (sleep ``seconds`` before writing a byte, then write) on the
    files of checkpoint ``step`` only, after leaving ``STALL_MARKER`` in the run directory; every other save is
    as usual. Under ``checkpoint.async_save`` the save of that step stays in flight while the step loop goes on.
    (The per-file writers are forked from the trainer, so they inherit this patch.)"""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.write_preloaded_data
    return mock.patch.object(FileSystemWriterAsync, "write_preloaded_data",
                             _stalling_write(original, int(step), float(seconds)))


HOOKS = {fn.__name__: fn for fn in (async_writer_stalls,)}


@contextlib.contextmanager
def hooked(spec: str):
    """Apply hook ``NAME`` or ``NAME:ARG[:ARG...]`` (a key of ``HOOKS``) inside the block."""
    name, *args = spec.split(":")
    with HOOKS[name](*args):
        yield


def main(argv: list[str]) -> int:
    """``python -m tests.hooks NAME[:ARG...] [trainer arguments]``: the trainer's entry point with the hook applied."""
    from hyperp_megatron import train

    with hooked(argv[0]):
        return train.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
