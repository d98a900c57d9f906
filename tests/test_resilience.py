"""Crash safety and preemption with real torchrun jobs: SIGTERM to one rank stops every rank after the
same step with a checkpoint and the requeue exit code; a relaunch resumes. kill -9 at a random step,
then relaunch, gives bit-identical final weights. A truncated latest checkpoint is detected and the
previous one used. Bad input fails with one line from rank 0."""

import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest

from trainer_utils import REPO, finish, final, launch_torchrun, wait_for_step, worker_pids, write_config

STEPS = 6


def _cfg(tmp_path: Path, run_dir: Path, **extra) -> Path:
    return write_config(tmp_path, run_dir, merge_into={"train": {"steps": STEPS}, "parallel": {"tensor": 2}}, **extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, embedded_corpus):
    tmp = tmp_path_factory.mktemp("ref")
    run_dir = tmp / "ref"
    code, out = finish(launch_torchrun(_cfg(tmp, run_dir)))
    assert code == 0, out[-3000:]
    return final(run_dir)


def test_preemption_signal_to_one_rank_checkpoints_and_resumes(tmp_path, uninterrupted):
    run_dir = tmp_path / "preempt"
    config = _cfg(tmp_path, run_dir)
    proc = launch_torchrun(config)
    wait_for_step(run_dir, 2, proc)
    workers = worker_pids(proc)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGTERM)  # like a SLURM signal reaching one task first
    code, out = finish(proc)
    assert "preemption signal: stopped after step" in out, out[-3000:]
    stopped = int(out.split("stopped after step")[1].split()[0].rstrip(","))
    assert stopped < STEPS
    assert (run_dir / "checkpoints" / f"step_{stopped:06d}" / "manifest.json").is_file()
    assert code != 0  # torchrun reports the workers' requeue status (75) as a failure
    code, out = finish(launch_torchrun(config))
    assert code == 0, out[-3000:]
    assert "resumed from" in out and f"at step {stopped}" in out
    result = final(run_dir)
    assert result["weights_digest"] == uninterrupted["weights_digest"]
    assert result["loss"] == uninterrupted["loss"]


def test_kill9_at_random_step_then_relaunch_is_bit_identical(tmp_path, uninterrupted):
    run_dir = tmp_path / "kill9"
    config = _cfg(tmp_path, run_dir, checkpoint={"interval": 2})
    proc = launch_torchrun(config)
    wait_for_step(run_dir, random.Random(os.getpid()).randint(2, STEPS - 1), proc)
    victims = [proc.pid, *worker_pids(proc)]
    for pid in victims:  # torchrun and both workers, mid-step or mid-save
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([psutil.Process(p) for p in victims if psutil.pid_exists(p)], timeout=30)
    code, out = finish(launch_torchrun(config))
    assert code == 0, out[-3000:]
    assert final(run_dir)["weights_digest"] == uninterrupted["weights_digest"]


def test_truncated_latest_checkpoint_falls_back_to_previous(tmp_path, uninterrupted):
    from hyperp_megatron import checkpoint as ckpt

    run_dir = tmp_path / "trunc"
    config = _cfg(tmp_path, run_dir, checkpoint={"interval": 2})
    code, out = finish(launch_torchrun(config, "--train.steps", "4"))
    assert code == 0, out[-3000:]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000004"
    biggest = max((p for p in (root / "step_000004").rglob("*.distcp")), key=lambda p: p.stat().st_size)
    with biggest.open("r+b") as handle:
        handle.truncate(biggest.stat().st_size // 2)
    messages = []
    assert ckpt.find_resumable(root, log=messages.append) == root / "step_000002"
    assert "truncated file" in messages[0]
    code, out = finish(launch_torchrun(config, "--train.steps", "4"))
    assert code == 0, out[-3000:]
    assert "is unusable (truncated file" in out and "at step 2" in out


@pytest.mark.parametrize("overrides, message", [
    (["--parallel.tensor", "4", "--model.num_attention_heads", "4", "--model.num_query_groups", "4"],
     "world size 2 is not divisible by parallel.tensor * parallel.pipeline = 4 * 1"),
    (["--data.prefixes", "[/nonexistent/corpus]", "--data.tokenizer", REPO], "data file not found"),
    (["--checkpoint.load", "/nonexistent/ckpt"], "checkpoint not found"),
    (["--optim.nam", "adamw"], "did you mean 'optim.name'"),
    # Checked once the data is prepared (the tokenizer is known), still before the model is built.
    (["--model.vocab_size", "100"], "model.vocab_size (100) is smaller than the tokenizer's vocabulary (8192)"),
    (["--data.split", "10000,1,0"], "gives the valid split 0 of the 2321 documents"),
])
def test_bad_input_one_line_from_rank0(tmp_path, overrides, message):
    config = _cfg(tmp_path, tmp_path / "bad")
    started = time.time()
    code, out = finish(launch_torchrun(config, *overrides), timeout=120)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and message in errors[0], out[-2000:]
    # No traceback from the training processes (torchrun's agent still reports the failed workers).
    assert "hyperp_megatron/" not in out and "[rank" not in out, out[-2000:]
    assert time.time() - started < 90  # before model construction


def test_rerunning_a_finished_run_says_nothing_to_do(tmp_path):
    run_dir = tmp_path / "done"
    config = _cfg(tmp_path, run_dir, train={"steps": 2})
    code, out = finish(launch_torchrun(config))
    assert code == 0, out[-3000:]
    digest = final(run_dir)["weights_digest"]
    for steps in ("2", "1"):  # the same run again; train.steps below the checkpoint's step
        started = time.time()
        code, out = finish(launch_torchrun(config, "--train.steps", steps), timeout=120)
        assert code == 0, out[-3000:]
        assert out.count(f"run already at step 2 >= train.steps {steps}: nothing to do "
                         "(raise train.steps to continue)") == 1, out[-3000:]  # rank 0 only
        assert "Traceback" not in out and "resumed from" not in out, out[-3000:]  # stopped before the model
        assert time.time() - started < 90
    assert final(run_dir)["weights_digest"] == digest  # untouched
