"""The trainer never loses or mixes a run (issue 21), with real torchrun jobs of two ranks: a second trainer on a
run directory is refused with one line naming the holder; a run whose only checkpoint is damaged stops with one
line and leaves it (and metrics.jsonl) untouched; a resume with another model shape is one line naming the keys;
a resume with another seed warns and is recorded; an unwritable run directory is one line."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from trainer_utils import finish, launch_torchrun, write_config

pytestmark = pytest.mark.tier("system")


def _one_error(code: int, out: str, message: str) -> str:
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and message in errors[0], out[-3000:]
    # No traceback from the training processes (torchrun's agent still reports the failed workers).
    assert "hyperp_megatron/" not in out and "[rank" not in out, out[-3000:]
    return errors[0]


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, embedded_corpus) -> tuple[Path, Path]:
    """(config, run directory) of a 2-step run with its final checkpoint."""
    tmp = tmp_path_factory.mktemp("base")
    config = write_config(tmp, tmp / "base", merge_into={"train": {"steps": 2}})
    code, out = finish(launch_torchrun(config))
    assert code == 0, out[-3000:]
    return config, tmp / "base"


def _copy(finished_run, tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(finished_run[1], run_dir)
    return run_dir


def test_second_trainer_is_refused_naming_the_holder(tmp_path, embedded_corpus):
    from hyperp_megatron.run_lock import RunLock

    run_dir = tmp_path / "locked"
    config = write_config(tmp_path, run_dir)
    with RunLock(run_dir):  # the first trainer (this process) holds the run directory
        started = time.time()
        code, out = finish(launch_torchrun(config), timeout=180)
        _one_error(code, out, f"run directory {run_dir} is in use by pid {os.getpid()} on host")
        assert time.time() - started < 120
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]  # nothing written before the lock


def test_only_checkpoint_damaged_stops_and_touches_nothing(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path, "damaged")
    step = run_dir / "checkpoints" / "step_000002"
    biggest = max(step.rglob("*.distcp"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    before = _snapshot(run_dir)
    code, out = finish(launch_torchrun(finished_run[0], "--logging.run_dir", str(run_dir), "--train.steps", "4"))
    error = _one_error(code, out, f"no intact checkpoint in {run_dir / 'checkpoints'}")
    assert "truncated file" in error and "--logging.run_dir NEW_DIR" in error
    assert "no other checkpoint to try" in out and "trying the previous one" not in out
    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != "run.lock"} == {k: v for k, v in before.items() if k != "run.lock"}


def test_resume_with_another_shape_names_the_keys(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path, "shape")
    code, out = finish(launch_torchrun(finished_run[0], "--logging.run_dir", str(run_dir), "--train.steps", "4",
                                       "--model.hidden_size", "128"))
    _one_error(code, out, "model.hidden_size 64 -> 128 differ from the checkpoint's config")


def test_resume_with_another_seed_warns_and_records(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path, "seed")
    code, out = finish(launch_torchrun(finished_run[0], "--logging.run_dir", str(run_dir), "--train.steps", "3",
                                       "--train.seed", "7"))
    assert code == 0, out[-3000:]
    assert out.count("[hyperp] warning: train.seed is 7, the checkpoint's run had 1234") == 1, out[-3000:]
    records = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == 2 and records[0]["changed"] == {"train.seed": [1234, 7]}


def test_unwritable_run_directory_is_one_line(tmp_path, embedded_corpus):
    (tmp_path / "a_file").write_text("not a directory")
    run_dir = tmp_path / "a_file" / "run"
    code, out = finish(launch_torchrun(write_config(tmp_path, run_dir)), timeout=180)
    _one_error(code, out, f"cannot write to the run directory {run_dir} (Not a directory): choose a writable "
                          "logging.run_dir")
