"""The real trainer under a real local SLURM cluster (two emulated nodes) and under MPI.

- sbatch launch/slurm_per_task.sbatch: 2 nodes x 1 task train to completion; a job signalled mid-run
  (scancel --signal=TERM, as --signal=TERM@N does) checkpoints, exits with the requeue status, is
  requeued by its script, resumes and finishes with the uninterrupted run's final loss and weights.
- launch/mpi.sh (mpiexec -n 2, MPICH from PyPI): the same losses as torchrun.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.slurm import slurm_cluster  # noqa: F401 - fixture
from trainer_utils import REPO, finish, final, job_env, launch_torchrun, wait_for_step, write_config

pytestmark = pytest.mark.tier("system")

STEPS = 6
VENV_BIN = Path(sys.executable).parent
LAYOUT = {"train": {"steps": STEPS}, "parallel": {"tensor": 2}}


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory, embedded_corpus):
    tmp = tmp_path_factory.mktemp("ref")
    code, out = finish(launch_torchrun(write_config(tmp, tmp / "ref", merge_into=LAYOUT)))
    assert code == 0, out[-3000:]
    return final(tmp / "ref")


def _logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("*.out")))


def test_slurm_job_preempted_requeued_resumes_to_identical_weights(slurm_cluster, tmp_path, torchrun_reference):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, run_dir, merge_into=LAYOUT)
    env = job_env(PYTHON=sys.executable, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    job_id, _ = slurm_cluster.sbatch(["launch/slurm_per_task.sbatch", "--config", str(config)], cwd=REPO, env=env,
                                     sbatch_args=[f"--output={tmp_path}/%x-%j.out", "--nodes=2",
                                                  "--ntasks-per-node=1"])
    wait_for_step(run_dir, 2, timeout=300)
    slurm_cluster.run(["scancel", "--signal=TERM", str(job_id)])
    # The tasks checkpoint and exit 75; the batch script requeues the job (held until BeginTime).
    slurm_cluster.wait_for_job(job_id, ["PENDING"], Restarts=1, timeout=180)
    slurm_cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
    info = slurm_cluster.wait_for_job(job_id, ["COMPLETED", "FAILED", "CANCELLED"], timeout=400)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), _logs(tmp_path)
    log = _logs(tmp_path)
    assert "preemption signal: stopped after step" in log and "resumed from" in log, log
    result = final(run_dir)
    assert result["weights_digest"] == torchrun_reference["weights_digest"]
    assert result["loss"] == torchrun_reference["loss"]


def test_mpiexec_matches_torchrun(tmp_path, torchrun_reference):
    run_dir = tmp_path / "mpi"
    config = write_config(tmp_path, run_dir, merge_into=LAYOUT)
    env = job_env(NUM_PROCS="2", MPIEXEC=str(VENV_BIN / "mpiexec"), PYTHON=sys.executable,
                  PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    started = time.time()
    out = subprocess.run(["launch/mpi.sh", "--config", str(config)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    result = final(run_dir)
    assert result["losses"] == torchrun_reference["losses"]
    assert result["weights_digest"] == torchrun_reference["weights_digest"]
    assert time.time() - started < 400
