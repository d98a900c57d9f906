"""Crash safety and preemption with real torchrun jobs (TP=2): SIGTERM to one rank stops every rank
after the same step with a checkpoint and the requeue exit code; a relaunch resumes (AdamW). kill -9 at
a random step, then relaunch, resumes from the last checkpoint and gives bit-identical final weights
(sphere Muon; control: a relaunch that restarts from step 0 ends on the same weights too, and only the
resumed-step check catches it). A truncated latest checkpoint is detected and the previous one used.
Bad input fails with one line from rank 0."""

import contextlib
import os
import random
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from trainer_utils import (
    REPO,
    finish,
    final,
    launch_torchrun,
    resumed_step,
    wait_for_step,
    worker_pids,
    write_config,
)

STEPS = 6
OPTIMIZERS = {"adamw": {"name": "adamw", "lr": 1e-2}, "sphere_muon": {"name": "sphere_muon", "lr": 0.05}}


def _cfg(tmp_path: Path, run_dir: Path, optimizer: str = "adamw", **extra) -> Path:
    return write_config(tmp_path, run_dir, merge_into={"train": {"steps": STEPS}, "parallel": {"tensor": 2},
                                                       "optim": OPTIMIZERS[optimizer]}, **extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, embedded_corpus):
    """optimizer -> final.json of an uninterrupted run (each run once, when first asked for)."""
    cache = {}

    def run(optimizer: str) -> dict:
        if optimizer not in cache:
            tmp = tmp_path_factory.mktemp(f"ref_{optimizer}")
            code, out = finish(launch_torchrun(_cfg(tmp, tmp / "ref", optimizer)))
            assert code == 0, out[-3000:]
            cache[optimizer] = final(tmp / "ref")
        return cache[optimizer]

    return run


def check_resumed(output: str, at_least: int) -> int:
    """The relaunch resumed from a checkpoint at step >= ``at_least`` (not a restart from step 0)."""
    step = resumed_step(output)
    assert step is not None and step >= at_least, f"relaunch did not resume (resumed step {step}):\n{output[-2000:]}"
    return step


def test_preemption_signal_to_one_rank_checkpoints_and_resumes(tmp_path, uninterrupted):
    uninterrupted = uninterrupted("adamw")
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
    assert check_resumed(out, 2) == stopped
    result = final(run_dir)
    assert result["weights_digest"] == uninterrupted["weights_digest"]
    assert result["loss"] == uninterrupted["loss"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory, embedded_corpus):
    """A sphere-Muon run (momentum and radii in the checkpoint) killed with SIGKILL at a random step
    (torchrun and both workers, mid-step or mid-save), and a copy of its run directory."""
    tmp_path = tmp_path_factory.mktemp("kill9")
    run_dir = tmp_path / "kill9"
    config = _cfg(tmp_path, run_dir, "sphere_muon", checkpoint={"interval": 2})
    proc = launch_torchrun(config)
    wait_for_step(run_dir, random.Random(os.getpid()).randint(3, STEPS - 1), proc)  # step 2 is saved by then
    # torchrun, both workers and their helper processes (dist_checkpointing's), as a node failure would
    victims = [proc.pid, *(child.pid for child in psutil.Process(proc.pid).children(recursive=True))]
    assert len(worker_pids(proc)) == 2
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([psutil.Process(p) for p in victims if psutil.pid_exists(p)], timeout=30)
    shutil.copytree(run_dir, tmp_path / "kill9_copy")  # the same killed state, for the control
    return config, run_dir, tmp_path / "kill9_copy"


def test_kill9_at_random_step_then_relaunch_resumes_bit_identical(killed, uninterrupted):
    config, run_dir, _ = killed
    code, out = finish(launch_torchrun(config))
    assert code == 0, out[-3000:]
    check_resumed(out, 2)
    assert final(run_dir)["weights_digest"] == uninterrupted("sphere_muon")["weights_digest"]


def test_control_resume_restarts_from_step_0_is_caught(killed, uninterrupted):
    """Negative control: a relaunch whose ``maybe_resume`` returns a fresh state (restart from step 0)
    also reaches the uninterrupted digest, since training is deterministic: the digest alone cannot
    tell; the resumed-step check does."""
    config, _, copy = killed
    code, out = finish(launch_torchrun(config, "--logging.run_dir", str(copy), mutation="resume_restarts_from_step_0"))
    assert code == 0, out[-3000:]
    assert final(copy)["weights_digest"] == uninterrupted("sphere_muon")["weights_digest"]
    with pytest.raises(AssertionError, match="did not resume"):
        check_resumed(out, 2)


def test_truncated_latest_checkpoint_falls_back_to_previous(tmp_path, embedded_corpus):
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
    assert "is unusable (truncated file" in out and check_resumed(out, 2) == 2


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
