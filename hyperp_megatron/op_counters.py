"""Counters for tests and benchmarks: aten ops a block issues, and its host synchronizations.

``count_aten_ops()``: every aten op that reaches the dispatcher from Python (a ``TorchDispatchMode``; ops
an op's kernel calls internally are not counted, foreach ops count once), by name.

``count_host_syncs()``: the reads of tensor values by the host, which wait for the device on a GPU:
``_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``int(t)``) caught at the dispatcher,
plus ``.tolist()``, ``.cpu()`` and ``.numpy()`` caught on ``torch.Tensor`` (on a CPU tensor they do not
dispatch). Each record names the call, the innermost frame outside torch that made it, and the tensor's
data pointer (to tell host-resident tensors, such as torch's optimizer step counts, apart).
"""

from __future__ import annotations

import collections
import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_METHODS = ("tolist", "cpu", "numpy")


class _AtenOpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_aten_ops():
    """``with count_aten_ops() as ops: ...``; then ``sum(ops.values())`` and ``ops.most_common()``."""
    counter = _AtenOpCounter()
    with counter:
        yield counter.ops


def _caller() -> str:
    """``file:line function`` of the innermost frame outside torch, and ``<- file:line function`` of the
    innermost torch frame when there is one (e.g. ``torch/optim/adam.py``)."""
    stack = traceback.extract_stack()[:-2]
    where = [f for f in stack if not f.filename.endswith("op_counters.py")]
    outside = next((f for f in reversed(where) if "/torch/" not in f.filename), None)
    text = f"{outside.filename.rsplit('/', 2)[-1]}:{outside.lineno} {outside.name}" if outside else "?"
    if where and "/torch/" in where[-1].filename:
        inner = where[-1]
        text += f" <- torch/{inner.filename.split('/torch/', 1)[1]}:{inner.lineno} {inner.name}"
    return text


class _ScalarReadCounter(TorchDispatchMode):
    """Records ``_local_scalar_dense`` unless a counted Tensor method (``paused``) is already running."""

    def __init__(self, records: list) -> None:
        super().__init__()
        self.records = records
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.records.append(("item", _caller(), args[0].data_ptr()))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """``with count_host_syncs() as records: ...``: a list of (call, caller, data_ptr of the tensor read) for
    every host read."""
    records: list[tuple[str, str, int]] = []
    mode = _ScalarReadCounter(records)
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            records.append((name, _caller(), self.data_ptr()))
            mode.paused += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                mode.paused -= 1

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        with mode:
            yield records
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
