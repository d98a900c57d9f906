"""Checkpointed RNG streams: python, numpy, torch CPU, CUDA (when present) and Megatron's tensor-parallel
RNG tracker round-trip through a checkpoint's per-rank file, only under the same layout key.

Negative controls: with the restore removed (or only the tracker's), the round trip fails.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


def _draws(device: torch.device) -> dict:
    """One draw from every stream the trainer's randomness can come from (advances them all)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    draws = {"python": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(3).tolist()}
    for name in sorted(tracker.get_states()):
        with tracker.fork(name):  # on the CPU the tracker's streams are CPU generator states (compat)
            draws[f"tracker/{name}"] = torch.rand(3, device=device).tolist()
    if device.type == "cuda":
        draws["cuda"] = torch.rand(3, device=device).tolist()
    return draws


def _round_trip(tmp_path, pg_collection, load_key_changes: dict | None = None) -> tuple[dict, dict, str | None]:
    """Save the RNG file, draw, load it back, draw again: (draws after save, draws after load, problem)."""
    from hyperp_megatron.checkpoint import load_rng, save_rng
    from hyperp_megatron.parallel import layout_key, process_group_device

    device = process_group_device()
    key = layout_key(pg_collection, device)
    save_rng(tmp_path, 0, key, device)
    expected = _draws(device)
    problem = load_rng(tmp_path, 0, {**key, **(load_key_changes or {})}, device)
    return expected, _draws(device), problem


def test_layout_key_names_the_layout_and_device(pg_collection):
    from hyperp_megatron.parallel import layout_key

    key = layout_key(pg_collection, torch.device("cpu"))
    assert key == {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1, "etp": 1, "device": "cpu"}


def test_every_stream_round_trips(tmp_path, pg_collection):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    streams = set(get_cuda_rng_tracker().get_states())
    assert {"model-parallel-rng", "expert-parallel-rng", "data-parallel-rng"} <= streams
    expected, after, problem = _round_trip(tmp_path, pg_collection)
    assert problem is None
    assert after == expected
    assert _draws(torch.device("cpu")) != expected  # the streams moved on: equality above is not vacuous


def test_not_restored_into_another_layout(tmp_path, pg_collection):
    expected, after, problem = _round_trip(tmp_path, pg_collection, {"tp": 2})
    assert "saved for layout" in problem
    assert all(after[name] != expected[name] for name in expected)


def test_negative_control_without_the_restore(tmp_path, pg_collection, monkeypatch):
    from hyperp_megatron import checkpoint

    monkeypatch.setattr(checkpoint, "restore_rng_state", lambda state, device: None)
    expected, after, problem = _round_trip(tmp_path, pg_collection)
    assert problem is None  # the key matched; only the restore is missing
    assert after != expected
    assert all(after[name] != expected[name] for name in expected)


def test_negative_control_without_the_tracker_restore(tmp_path, pg_collection, monkeypatch):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    monkeypatch.setattr(type(get_cuda_rng_tracker()), "set_states", lambda self, states: None)
    expected, after, _ = _round_trip(tmp_path, pg_collection)
    differs = {name for name in expected if after[name] != expected[name]}
    assert differs == {name for name in expected if name.startswith("tracker/")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA generator exists only with a GPU")
def test_cuda_generator_round_trips(tmp_path):
    from hyperp_megatron.checkpoint import capture_rng_state, restore_rng_state

    device = torch.device("cuda", torch.cuda.current_device())
    state = capture_rng_state(device)
    expected = torch.rand(4, device=device)
    restore_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), expected)
