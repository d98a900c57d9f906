"""Crash safety and preemption with real torchrun jobs: SIGTERM to one rank stops every rank after the
same step with a checkpoint and the requeue exit code; a relaunch resumes. kill -9 at a random step,
then relaunch, gives bit-identical final weights. A truncated latest checkpoint is detected and the
previous one used. Bad input fails with one line from rank 0."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from trainer_utils import REPO, TINY, merge

STEPS = 6


def _config(tmp_path: Path, run_dir: Path, **extra) -> Path:
    cfg = merge(TINY, {"train": {"steps": STEPS}, "parallel": {"tensor": 2},
                       "logging": {"run_dir": str(run_dir)},
                       "checkpoint": {"save_final": True, "resume": True, "keep": 3}})
    cfg = merge(cfg, extra)
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "hyperp_megatron.train", "--config", str(config), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while _steps_logged(run_dir) < step:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "training did not reach the step in time"
        time.sleep(0.2)


def _worker_pids(proc: subprocess.Popen) -> list[int]:
    children = psutil.Process(proc.pid).children(recursive=True)
    return [c.pid for c in children if "hyperp_megatron.train" in " ".join(c.cmdline())]


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "final.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, embedded_corpus):
    tmp = tmp_path_factory.mktemp("ref")
    run_dir = tmp / "ref"
    code, out = _finish(_launch(_config(tmp, run_dir)))
    assert code == 0, out[-3000:]
    return _final(run_dir)


def test_preemption_signal_to_one_rank_checkpoints_and_resumes(tmp_path, uninterrupted):
    run_dir = tmp_path / "preempt"
    config = _config(tmp_path, run_dir)
    proc = _launch(config)
    _wait_for_step(run_dir, 2, proc)
    workers = _worker_pids(proc)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGTERM)  # like a SLURM signal reaching one task first
    code, out = _finish(proc)
    assert "preemption signal: stopped after step" in out, out[-3000:]
    stopped = int(out.split("stopped after step")[1].split()[0].rstrip(","))
    assert stopped < STEPS
    assert (run_dir / "checkpoints" / f"step_{stopped:06d}" / "manifest.json").is_file()
    assert code != 0  # torchrun reports the workers' requeue status (75) as a failure
    code, out = _finish(_launch(config))
    assert code == 0, out[-3000:]
    assert f"resumed from" in out and f"at step {stopped}" in out
    final = _final(run_dir)
    assert final["weights_digest"] == uninterrupted["weights_digest"]
    assert final["loss"] == uninterrupted["loss"]


def test_kill9_at_random_step_then_relaunch_is_bit_identical(tmp_path, uninterrupted):
    run_dir = tmp_path / "kill9"
    config = _config(tmp_path, run_dir, checkpoint={"interval": 2})
    proc = _launch(config)
    _wait_for_step(run_dir, random.Random(os.getpid()).randint(2, STEPS - 1), proc)
    victims = [proc.pid, *_worker_pids(proc)]
    for pid in victims:  # torchrun and both workers, mid-step or mid-save
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([psutil.Process(p) for p in victims if psutil.pid_exists(p)], timeout=30)
    code, out = _finish(_launch(config))
    assert code == 0, out[-3000:]
    assert _final(run_dir)["weights_digest"] == uninterrupted["weights_digest"]


def test_truncated_latest_checkpoint_falls_back_to_previous(tmp_path, uninterrupted):
    from hyperp_megatron import checkpoint as ckpt

    run_dir = tmp_path / "trunc"
    config = _config(tmp_path, run_dir, checkpoint={"interval": 2})
    code, out = _finish(_launch(config, "--train.steps", "4"))
    assert code == 0, out[-3000:]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000004"
    biggest = max((p for p in (root / "step_000004").rglob("*.distcp")), key=lambda p: p.stat().st_size)
    with biggest.open("r+b") as handle:
        handle.truncate(biggest.stat().st_size // 2)
    messages = []
    assert ckpt.find_resumable(root, log=messages.append) == root / "step_000002"
    assert "truncated file" in messages[0]
    code, out = _finish(_launch(config, "--train.steps", "4"))
    assert code == 0, out[-3000:]
    assert "is unusable (truncated file" in out and "at step 2" in out


@pytest.mark.parametrize("overrides, message", [
    (["--parallel.tensor", "4", "--model.num_attention_heads", "4", "--model.num_query_groups", "4"],
     "world size 2 is not divisible by parallel.tensor * parallel.pipeline = 4 * 1"),
    (["--data.prefixes", "[/nonexistent/corpus]", "--data.tokenizer", REPO], "data file not found"),
    (["--checkpoint.load", "/nonexistent/ckpt"], "checkpoint not found"),
    (["--optim.nam", "adamw"], "did you mean 'optim.name'"),
])
def test_bad_input_one_line_from_rank0(tmp_path, overrides, message):
    config = _config(tmp_path, tmp_path / "bad")
    started = time.time()
    code, out = _finish(_launch(config, *overrides), timeout=120)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and message in errors[0], out[-2000:]
    # No traceback from the training processes (torchrun's agent still reports the failed workers).
    assert "hyperp_megatron/" not in out and "[rank" not in out, out[-2000:]
    assert time.time() - started < 90  # before model construction
