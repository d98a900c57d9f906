"""The real trainer (sphere Muon) under a real local SLURM cluster (two emulated nodes) and under MPI.

- launch/slurm_per_task.sbatch (2 nodes x 1 task) and launch/slurm_multinode.sbatch (torchrun per node,
  2 nodes x 1 process): a job signalled mid-run (scancel --signal=TERM, as --signal=TERM@N does)
  checkpoints and is requeued by its own script (per task: on the trainer's exit status 75; multi-node: on
  the marker run_dir/preempted.json, as torchrun hides the status), whose run then exits 0. The requeued run
  removes the marker, resumes and finishes with the uninterrupted torchrun run's final loss and weights.
- launch/mpi.sh (mpiexec -n 2, MPICH from PyPI): the same losses and weights as torchrun.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.slurm import TERMINAL_STATES, SlurmCluster, job_master_port, slurm_cluster  # noqa: F401 - fixture
from trainer_utils import REPO, finish, final, job_env, launch_torchrun, wait_for_step, write_config

STEPS = 6
VENV_BIN = Path(sys.executable).parent
# One thread per process everywhere: the thread count changes sphere Muon's Newton-Schulz rounding (measured:
# 2 threads vs 1 differ in the last bit of the step-6 loss), and per-task SLURM ranks get a node each.
# checkpoint.interval 1: Megatron's checkpoint-writer helper processes exist when the preemption signal reaches
# every process of the step (they must survive it, checkpoint._start_writer_helpers).
# parallel.timeout_minutes 10: a rank that fails at start-up (the others wait for it in a collective) ends the
# job within minutes, not the default 30.
LAYOUT = {"train": {"steps": STEPS, "threads": 1}, "parallel": {"tensor": 2, "timeout_minutes": 10},
          "optim": {"name": "sphere_muon", "lr": 0.05}, "checkpoint": {"interval": 1}}


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory, embedded_corpus):
    tmp = tmp_path_factory.mktemp("ref")
    code, out = finish(launch_torchrun(write_config(tmp, tmp / "ref", merge_into=LAYOUT)), timeout=1200)
    assert code == 0, out[-3000:]
    return final(tmp / "ref")


def _logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))


@pytest.mark.parametrize("script, marker_line", [
    ("launch/slurm_per_task.sbatch", "step exited 75 (REQUEUE_EXIT_CODE): requeueing job"),
    ("launch/slurm_multinode.sbatch", "preempted at step"),
], ids=["per_task", "multinode"])
def test_slurm_job_preempted_requeues_itself_and_resumes_to_identical_weights(
        slurm_cluster: SlurmCluster, tmp_path, torchrun_reference, script, marker_line):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, run_dir, merge_into=LAYOUT)
    # multinode: NPROC_PER_NODE=1, the same 2-process world (and so the same weights) as the reference.
    # MASTER_PORT: one free port for both runs of the job (derived from the job id, it would collide with any
    # other test session's job 1 on this machine: "EADDRINUSE" at the restart, seen once under load).
    env = job_env(PYTHON=sys.executable, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                  NPROC_PER_NODE="1", MASTER_PORT=str(job_master_port()))
    job_id, _ = slurm_cluster.sbatch([script, "--config", str(config)], cwd=REPO, env=env,
                                     sbatch_args=[f"--output={tmp_path}/%x-%j.out", "--nodes=2",
                                                  "--ntasks-per-node=1"])
    log = tmp_path / f"hyperp-{job_id}.out"
    # Generous timeouts: on 2 cores shared with the rest of the suite a step can take a minute.
    try:
        wait_for_step(run_dir, 2, timeout=900)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {slurm_cluster.job_info(job_id)}\n{_logs(tmp_path)[-4000:]}") from None
    slurm_cluster.run(["scancel", "--signal=TERM", str(job_id)])
    # The ranks checkpoint and stop; the batch script requeues the job and exits 0. Slurm holds the job for
    # cred_expire + 1 = 11 s (BeginTime), then runs it again: wait for that run before waiting for the end.
    slurm_cluster.wait_for_restart(job_id, 1, log, timeout=900)
    info = slurm_cluster.wait_for_job(job_id, TERMINAL_STATES, timeout=1200)
    text = _logs(tmp_path)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-6000:]
    for line in (marker_line, "this run exits 0", "preemption signal: stopped after step", "resumed from",
                 "preempted.json (preempted at step"):  # the last: the requeued run removed the marker
        assert line in text, f"{line!r} not in the job log:\n{text[-6000:]}"
    assert not (run_dir / "preempted.json").exists()
    result = final(run_dir)
    assert result["weights_digest"] == torchrun_reference["weights_digest"]
    assert result["loss"] == torchrun_reference["loss"]


def test_mpiexec_matches_torchrun(tmp_path, torchrun_reference):
    run_dir = tmp_path / "mpi"
    config = write_config(tmp_path, run_dir, merge_into=LAYOUT)
    env = job_env(NUM_PROCS="2", MPIEXEC=str(VENV_BIN / "mpiexec"), PYTHON=sys.executable,
                  PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    out = subprocess.run(["launch/mpi.sh", "--config", str(config)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    result = final(run_dir)
    assert result["losses"] == torchrun_reference["losses"]
    assert result["weights_digest"] == torchrun_reference["weights_digest"]
