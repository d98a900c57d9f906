"""Asynchronous checkpoint saves (``checkpoint.async_save``, ``checkpoint.AsyncSaver``) on gloo.

- a 2-rank run saving every step in the background ends with the same losses and weights as the synchronous
  run, and its checkpoints (published by the finalize callback: manifest, rename, ``latest``) verify and resume;
- a save in flight is not visible: until every writer has finished, ``latest`` names the previous complete
  checkpoint and the new one exists only as ``.tmp``.
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
