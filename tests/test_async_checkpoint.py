"""Asynchronous checkpoint saves (``checkpoint.async_save``, ``checkpoint.AsyncSaver``) on gloo.

- a 2-rank run saving every step in the background ends with the same losses and weights as the synchronous
  run, and its checkpoints (published by the finalize callback: manifest, rename, ``latest``) verify and resume;
- a save in flight is not visible: until every writer has finished, ``latest`` names the previous complete
  checkpoint and the new one exists only as ``.tmp``;
- (system) kill -9 of a TP=2 torchrun job while an async save is in flight (its writers stalled by
  ``tests/hooks.py``): the partial checkpoint is never complete, the relaunch resumes from the previous one with
  the killed run's losses, and nothing complete is deleted;
- (system) SIGTERM to one rank while an async save is in flight: the preemption checkpoint is written after the
  save in flight is published (both complete, ``latest`` on the preemption step).
"""

import pytest

from _dist import run_distributed
from trainer_utils import merge, train_worker

pytestmark = pytest.mark.tier("parallel")


def _train(rank, world_size, overrides):
    return train_worker(rank, world_size, overrides)


def test_async_save_equals_sync_save_and_resumes(tmp_path):
    from hyperp_megatron import checkpoint as ckpt

    runs = {}
    for mode in (False, True):
        run_dir = tmp_path / f"async_{mode}"
        overrides = {"checkpoint": {"interval": 1, "keep": 0, "async_save": mode, "save_final": True},
                     "logging": {"run_dir": str(run_dir)}, "train": {"threads": 1}}
        runs[mode] = run_distributed(_train, 2, overrides)[0]
        root = run_dir / "checkpoints"
        assert (root / ckpt.LATEST).read_text().strip() == "step_000004"
        assert [p.name for p in ckpt.complete_checkpoints(root)] == [f"step_00000{i}" for i in (4, 3, 2, 1)]
        assert not list(root.glob("*.tmp")) and all(ckpt.verify(p) is None for p in ckpt.complete_checkpoints(root))
    assert runs[True]["losses"] == runs[False]["losses"]
    assert runs[True]["weights_digest"] == runs[False]["weights_digest"]
    # the async checkpoints hold the same state: resuming from step 2 of each gives the same run
    resumed = {}
    for mode in (False, True):
        overrides = {"train": {"steps": 4, "threads": 1},
                     "checkpoint": {"load": str(tmp_path / f"async_{mode}" / "checkpoints" / "step_000002"),
                                    "resume": False},
                     "logging": {"run_dir": str(tmp_path / f"resumed_{mode}")}}
        resumed[mode] = run_distributed(_train, 2, overrides)[0]
    assert resumed[True]["losses"] == resumed[False]["losses"] == runs[False]["losses"][2:]
    assert resumed[True]["weights_digest"] == runs[False]["weights_digest"]


def _save_in_flight(rank, world_size, root):
    """Start an async save of step 2 after a synchronous step 1; look before and after publishing."""
    import warnings
    from pathlib import Path

    import torch.distributed as dist

    from hyperp_megatron import checkpoint as ckpt
    from hyperp_megatron import train as trainer
    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import load_config, validate
    from trainer_utils import TINY

    warnings.filterwarnings("ignore")
    apply_cpu_patches()
    cfg = load_config(None, merge(TINY, {"logging": {"run_dir": root}}))
    validate(cfg, world_size)
    s = trainer.setup(cfg, world_size, rank)
    root = Path(root) / "checkpoints"
    ckpt.save(root, ckpt.TrainState(step=1), s.model_chunks, s.optimizer, {})
    saver = ckpt.AsyncSaver()
    saver.save(root, ckpt.TrainState(step=2), s.model_chunks, s.optimizer, {})
    seen = {"latest": (root / ckpt.LATEST).read_text().strip(), "tmp": (root / "step_000002.tmp").is_dir(),
            "final": (root / "step_000002").exists()}
    dist.barrier()
    saver.close()
    seen.update(latest_after=(root / ckpt.LATEST).read_text().strip(), verified=ckpt.verify(root / "step_000002"))
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return seen


def test_save_in_flight_is_invisible_until_published(tmp_path):
    for seen in run_distributed(_save_in_flight, 2, str(tmp_path)):
        assert seen == {"latest": "step_000001", "tmp": True, "final": False, "latest_after": "step_000002",
                        "verified": None}


# ---- kill -9 while an asynchronous save is in flight (real torchrun jobs) ------------------------------------

KILL_STEPS = 6


def _losses(run_dir, skip_lines: int = 0) -> dict[int, float]:
    """step -> loss of ``metrics.jsonl`` after its first ``skip_lines`` lines (those of an earlier launch)."""
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[skip_lines:]
    records = [json.loads(line) for line in lines if line.strip()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def _kill_job(proc) -> None:
    """SIGKILL torchrun, its workers and every helper (the checkpoint writers), as a node failure would."""
    import contextlib
    import os
    import signal

    import psutil

    try:
        victims = [proc.pid, *(child.pid for child in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:  # the job already ended (a failed run): nothing of it is left to kill
        victims = []
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([psutil.Process(p) for p in victims if psutil.pid_exists(p)], timeout=30)


@pytest.mark.tier("system")
def test_kill9_during_async_save_resumes_from_previous_complete_checkpoint(tmp_path, embedded_corpus):
    """TP=2 torchrun, sphere Muon, ``checkpoint.async_save`` every 2 steps. The writers of the step-4 save stall
    (``tests/hooks.py``), so that save stays in flight while the loop trains steps 5 and 6; then the whole job
    is killed with SIGKILL. The partial step 4 is never complete (no manifest, ``latest`` still names step 2);
    the relaunch resumes from step 2, trains steps 3-6 with exactly the losses the killed run logged from that
    checkpoint, and step 2 is never deleted or changed."""
    import hashlib
    import time

    from hooks import STALL_MARKER
    from hyperp_megatron import checkpoint as ckpt
    from trainer_utils import finish, launch_torchrun, resumed_step, wait_for_step, write_config

    run_dir = tmp_path / "kill9_async"
    config = write_config(tmp_path, run_dir, merge_into={
        "train": {"steps": KILL_STEPS}, "parallel": {"tensor": 2}, "optim": {"name": "sphere_muon", "lr": 0.05},
        "checkpoint": {"interval": 2, "async_save": True}})
    root = run_dir / "checkpoints"
    proc = launch_torchrun(config, hook="async_writer_stalls:4")
    try:
        wait_for_step(run_dir, KILL_STEPS, proc)  # the loop went on past the stalled save (step 6 waits for it)
        deadline = time.time() + 60
        while not (run_dir / STALL_MARKER).is_file():
            assert proc.poll() is None and time.time() < deadline, "the step-4 writer never started"
            time.sleep(0.2)
        assert (root / ckpt.LATEST).read_text().strip() == "step_000002"  # still in flight: not published
    finally:
        _kill_job(proc)
    killed_losses = _losses(run_dir)
    killed_lines = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert sorted(killed_losses) == list(range(1, KILL_STEPS + 1))
    # The partial checkpoint: a .tmp without manifest, never listed as complete; the previous one intact.
    partial = root / "step_000004.tmp"
    assert partial.is_dir() and not (partial / ckpt.MANIFEST).exists() and not (root / "step_000004").exists()
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000002"]
    assert (root / ckpt.LATEST).read_text().strip() == "step_000002"
    assert ckpt.find_resumable(root) == root / "step_000002" and ckpt.verify(root / "step_000002") is None
    manifest = hashlib.sha256((root / "step_000002" / ckpt.MANIFEST).read_bytes()).hexdigest()

    code, out = finish(launch_torchrun(config))  # no hook: every save completes
    assert code == 0, out[-3000:]
    assert resumed_step(out) == 2, out[-3000:]
    resumed_losses = _losses(run_dir, skip_lines=killed_lines)
    assert resumed_losses == {step: killed_losses[step] for step in range(3, KILL_STEPS + 1)}  # bit-identical
    # Nothing complete was deleted or rewritten; the partial step 4 was replaced by a complete one.
    assert ckpt.verify(root / "step_000002") is None
    assert hashlib.sha256((root / "step_000002" / ckpt.MANIFEST).read_bytes()).hexdigest() == manifest
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000006", "step_000004", "step_000002"]
    assert (root / ckpt.LATEST).read_text().strip() == "step_000006" and not list(root.glob("*.tmp"))



@pytest.mark.tier("system")
def test_preemption_waits_for_the_async_save_in_flight(tmp_path, embedded_corpus):
    """SIGTERM to one rank while the step-4 save is in flight (its writers stalled for 8 s): every rank stops
    after the same step k with the requeue status, and before the preemption checkpoint is written the step-4
    save is finished and published, so both are complete and ``latest`` names step k."""
    import os
    import signal
    import time

    from hooks import STALL_MARKER
    from hyperp_megatron import checkpoint as ckpt
    from trainer_utils import finish, launch_torchrun, worker_pids, write_config

    run_dir = tmp_path / "preempt_async"
    config = write_config(tmp_path, run_dir, merge_into={
        "train": {"steps": 8}, "parallel": {"tensor": 2}, "checkpoint": {"interval": 2, "async_save": True}})
    proc = launch_torchrun(config, hook="async_writer_stalls:4:8")
    try:
        deadline = time.time() + 300
        while not (run_dir / STALL_MARKER).is_file():
            assert proc.poll() is None and time.time() < deadline, "the step-4 writer never started"
            time.sleep(0.2)
        workers = worker_pids(proc)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGTERM)  # like a SLURM signal reaching one task first
        code, out = finish(proc)
    finally:
        _kill_job(proc)
    assert "preemption signal: stopped after step" in out, out[-3000:]
    stopped = int(out.split("stopped after step")[1].split()[0].rstrip(","))
    assert 4 < stopped < 8 and code != 0, out[-3000:]
    root = run_dir / "checkpoints"
    complete = [p.name for p in ckpt.complete_checkpoints(root)]
    assert f"step_{stopped:06d}" in complete and "step_000004" in complete, complete
    assert all(ckpt.verify(root / name) is None for name in complete) and not list(root.glob("*.tmp"))
    assert (root / ckpt.LATEST).read_text().strip() == f"step_{stopped:06d}"
