"""The launch scripts, run for real: torchrun and mpiexec on this machine, and sbatch / srun / signals /
requeue on a local 2-node SLURM cluster (tests/cluster/slurm.py). The trainer is replaced by
tests/cluster/stand_in.py (TRAIN_SCRIPT), which discovers its rank like the trainer, all-reduces
``rank + 1`` and writes one JSON file per rank and run into ``--logging.run_dir``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.slurm import SlurmCluster, slurm_cluster, slurm_gpu_cluster  # noqa: F401 - fixtures

pytestmark = pytest.mark.tier("system")

REPO = Path(__file__).resolve().parents[1]
LAUNCH_SCRIPTS = sorted(p for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
STAND_IN = "tests/cluster/stand_in.py"
VENV_BIN = Path(sys.executable).parent
# The scripts run the stand-in with this interpreter, whether or not the venv is activated; the stand-in
# imports this checkout's package (hyperp_megatron.requeue), installed or not.
STAND_IN_ENV = {"TRAIN_SCRIPT": STAND_IN, "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def job_logs(directory: Path, cluster: SlurmCluster | None = None) -> str:
    """The jobs' output files in ``directory`` (and the cluster's state and daemon logs)."""
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(directory.glob("*.out")))
    return logs + (f"\n{cluster.describe()}" if cluster else "")


def wait_for_files(paths: list[Path], timeout: float = 60, logs_dir: Path | None = None,
                   cluster: SlurmCluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [str(p) for p in paths if not p.exists()]
            details = job_logs(logs_dir, cluster) if logs_dir else ""
            raise AssertionError(f"missing after {timeout} s: {missing}\n{details}")
        time.sleep(0.2)


def read_results(run_dir: Path, world_size: int, run: int = 0) -> list[dict]:
    paths = [run_dir / f"rank{rank}-run{run}.json" for rank in range(world_size)]
    wait_for_files(paths, timeout=5)
    return [json.loads(p.read_text()) for p in paths]


def assert_world(results: list[dict], world_size: int, source: str) -> None:
    assert [r["rank"] for r in results] == list(range(world_size))
    assert {r["world_size"] for r in results} == {world_size}
    assert {r["source"] for r in results} == {source}
    assert {r["allreduce"] for r in results} == {world_size * (world_size + 1) / 2}
    assert len({(r["master_addr"], r["master_port"]) for r in results}) == 1


def submit(cluster: SlurmCluster, command: list[str], tmp_path: Path, *, wait=False, env=None,
           sbatch_args=()) -> tuple[int, int]:
    """sbatch from the repo root (the scripts cd to the submit dir); job output goes to tmp_path."""
    return cluster.sbatch(
        command, wait=wait, cwd=REPO, env={**STAND_IN_ENV, **(env or {})},
        sbatch_args=[f"--output={tmp_path}/%x-%j.out", *sbatch_args],
    )


def wait_finished(cluster: SlurmCluster, job_id: int, tmp_path: Path, timeout: float = 90) -> dict:
    try:
        return cluster.wait_for_job(job_id, FINISHED, timeout=timeout)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{job_logs(tmp_path, cluster)}") from exc


# --- every script ---------------------------------------------------------------------------------

@pytest.mark.tier("unit")
@pytest.mark.parametrize("script", LAUNCH_SCRIPTS, ids=lambda p: p.name)
def test_script_syntax_and_usage_header(script: Path):
    subprocess.run(["bash", "-n", str(script)], check=True)
    header = script.read_text().split("set -euo pipefail")[0]
    assert "# Usage:" in header and "# Examples:" in header, f"{script.name}: no usage header"
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


# --- this machine ---------------------------------------------------------------------------------

def test_torchrun_single_node_passes_config_and_overrides(tmp_path: Path):
    run_dir = tmp_path / "run"
    subprocess.run(
        ["launch/torchrun.sh", "--train.steps", "20", "--logging.run_dir", str(run_dir)],
        cwd=REPO, env={**os.environ, **STAND_IN_ENV, "NPROC_PER_NODE": "2"}, check=True, timeout=120,
    )
    results = read_results(run_dir, 2)
    assert_world(results, 2, "torchrun")
    assert results[0]["args"] == {"config": "configs/tiny.yaml", "train.steps": "20",
                                  "logging.run_dir": str(run_dir)}


def test_mpiexec_two_ranks_broadcast_master(tmp_path: Path):
    run_dir = tmp_path / "run"
    subprocess.run(
        ["launch/mpi.sh", "--config", "configs/other.yaml", "--logging.run_dir", str(run_dir)],
        cwd=REPO, env={**os.environ, **STAND_IN_ENV, "NUM_PROCS": "2", "MPIEXEC": str(VENV_BIN / "mpiexec")},
        check=True, timeout=120,
    )
    results = read_results(run_dir, 2)
    assert_world(results, 2, "mpi")  # same master port on both: rank 0 picked a free one and broadcast it
    assert results[1]["master_addr"] == results[0]["hostname"]
    assert results[0]["args"]["config"] == "configs/other.yaml"  # the caller's --config, not the default


# --- SLURM ---------------------------------------------------------------------------------------

def test_slurm_per_task_two_nodes(slurm_cluster: SlurmCluster, tmp_path: Path):
    run_dir = tmp_path / "run"
    job_id, _ = submit(slurm_cluster, ["launch/slurm_per_task.sbatch", "--train.steps", "20",
                                       "--logging.run_dir", str(run_dir)], tmp_path)
    info = wait_finished(slurm_cluster, job_id, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_logs(tmp_path)
    results = read_results(run_dir, 2)
    assert_world(results, 2, "slurm")
    assert [r["node"] for r in results] == ["n1", "n2"]
    assert results[0]["master_addr"] == "n1"  # first host of SLURM_JOB_NODELIST
    assert results[0]["args"]["config"] == "configs/tiny.yaml"
    assert (tmp_path / f"hyperp-{job_id}.out").exists()


def test_slurm_multinode_torchrun_two_nodes(slurm_cluster: SlurmCluster, tmp_path: Path):
    # RDZV_BACKEND=c10d (default) here, static in the signal test.
    run_dir = tmp_path / "run"
    job_id, _ = submit(slurm_cluster, ["launch/slurm_multinode.sbatch", "--logging.run_dir", str(run_dir)],
                       tmp_path)
    info = wait_finished(slurm_cluster, job_id, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_logs(tmp_path)
    results = read_results(run_dir, 2)
    assert_world(results, 2, "torchrun")
    assert sorted(r["node"] for r in results) == ["n1", "n2"]  # c10d: node order = rendezvous order


def stand_in_apptainer(tmp_path: Path, image: str) -> tuple[Path, Path]:
    """A stand-in ``apptainer`` in ``tmp_path/bin`` that logs its arguments to ``tmp_path/apptainer.log`` and runs
    the command after ``image``."""
    bin_dir, log = tmp_path / "bin", tmp_path / "apptainer.log"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(f'#!/bin/bash\necho "$*" >> {log}\n'
                                       f'while [[ "$1" != {image} ]]; do shift; done\nshift\nexec "$@"\n')
    (bin_dir / "apptainer").chmod(0o755)
    return bin_dir, log


def test_slurm_multinode_runs_each_node_in_the_apptainer_image(slurm_cluster: SlurmCluster, tmp_path: Path):
    """APPTAINER_IMAGE wraps each node's torchrun in `apptainer exec --nv --bind REPO_DIR --pwd REPO_DIR IMAGE`
    (a stand-in apptainer on PATH logs its arguments and runs the command)."""
    image = "/images/pytorch.sif"
    bin_dir, log = stand_in_apptainer(tmp_path, image)
    run_dir = tmp_path / "run"
    env = {"APPTAINER_IMAGE": image, "HOST_PYTHON": sys.executable,
           "PATH": f"{bin_dir}{os.pathsep}{STAND_IN_ENV['PATH']}"}
    job_id, _ = submit(slurm_cluster, ["launch/slurm_multinode.sbatch", "--logging.run_dir", str(run_dir)],
                       tmp_path, env=env)
    info = wait_finished(slurm_cluster, job_id, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_logs(tmp_path)
    assert_world(read_results(run_dir, 2), 2, "torchrun")
    calls = [line for line in log.read_text().splitlines() if line.startswith("exec --")]  # the command spans lines
    assert calls == [f"exec --nv --bind {REPO} --pwd {REPO} {image} bash -c "] * 2, calls


def test_slurm_per_task_runs_each_task_in_the_apptainer_image(slurm_cluster: SlurmCluster, tmp_path: Path):
    """APPTAINER_IMAGE wraps each task's Python in `apptainer exec --nv --bind REPO_DIR,... --pwd REPO_DIR IMAGE`."""
    image = "/images/pytorch.sif"
    bin_dir, log = stand_in_apptainer(tmp_path, image)
    run_dir = tmp_path / "run"
    env = {"APPTAINER_IMAGE": image, "APPTAINER_BINDS": "/data", "PATH": f"{bin_dir}{os.pathsep}{STAND_IN_ENV['PATH']}"}
    job_id, _ = submit(slurm_cluster, ["launch/slurm_per_task.sbatch", "--logging.run_dir", str(run_dir)],
                       tmp_path, env=env)
    info = wait_finished(slurm_cluster, job_id, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_logs(tmp_path)
    assert_world(read_results(run_dir, 2), 2, "slurm")
    assert log.read_text().splitlines() == [f"exec --nv --bind {REPO},/data --pwd {REPO} {image} {sys.executable} "
                                            f"{STAND_IN} --config configs/tiny.yaml --logging.run_dir {run_dir}"] * 2


@pytest.mark.parametrize("script", ["launch/slurm_per_task.sbatch", "launch/slurm_multinode.sbatch"])
def test_slurm_scripts_pass_the_pyxis_container_options(slurm_cluster: SlurmCluster, tmp_path: Path, script: str):
    """CONTAINER_IMAGE adds pyxis's srun options (image, the checkout mounted at the same path as the working
    directory, CONTAINER_MOUNTS). No pyxis here: a stand-in srun on PATH records them and runs the step without."""
    import shutil

    bin_dir, log = tmp_path / "bin", tmp_path / "srun_container_args.log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nargs=()\nfor arg in \"$@\"; do\n"
        f"  if [[ \"$arg\" == --container-* ]]; then echo \"$arg\" >> {log}; else args+=(\"$arg\"); fi\n"
        f"done\nexec {shutil.which('srun')} \"${{args[@]}}\"\n")
    (bin_dir / "srun").chmod(0o755)
    run_dir, image = tmp_path / "run", "/images/pytorch.sqsh"
    env = {"CONTAINER_IMAGE": image, "CONTAINER_MOUNTS": "/data:/data", "HOST_PYTHON": sys.executable,
           "PATH": f"{bin_dir}{os.pathsep}{STAND_IN_ENV['PATH']}"}
    job_id, _ = submit(slurm_cluster, [script, "--logging.run_dir", str(run_dir)], tmp_path, env=env)
    info = wait_finished(slurm_cluster, job_id, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_logs(tmp_path)
    assert len(read_results(run_dir, 2)) == 2
    assert log.read_text().splitlines() == [f"--container-image={image}", f"--container-workdir={REPO}",
                                            f"--container-mounts={REPO}:{REPO},/data:/data"]


@pytest.mark.tier("unit")
@pytest.mark.parametrize("container", ["none", "pyxis", "apptainer"])
def test_sweep_array_finds_the_environment(tmp_path: Path, container: str):
    """launch/sweep_array.sbatch runs `$PYTHON -m hyperp_megatron.science sweep run-one --index TASK ...`, inside
    the container when CONTAINER_IMAGE (srun --container-*) or APPTAINER_IMAGE is set (stand-ins log the call)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in ("python-stand-in", "srun", "apptainer"):
        (bin_dir / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {log}\n')
        (bin_dir / name).chmod(0o755)
    python = bin_dir / "python-stand-in"
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "5", "PYTHON": str(python), "REPO_DIR": str(REPO),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VENV", None)
    if container == "pyxis":
        env.update(CONTAINER_IMAGE="/images/p.sqsh", CONTAINER_MOUNTS="/shared:/shared")
    elif container == "apptainer":
        env.update(APPTAINER_IMAGE="/images/p.sif", APPTAINER_BINDS="/shared")
    subprocess.run(["bash", "launch/sweep_array.sbatch", "--spec", "s.yaml", "--results", "r"], cwd=REPO, env=env,
                   check=True, timeout=60, capture_output=True)
    command = f"{python} -m hyperp_megatron.science sweep run-one --index 5 --spec s.yaml --results r"
    expected = {"none": f"python-stand-in {command.split(' ', 1)[1]}",
                "pyxis": f"srun --ntasks=1 --container-image=/images/p.sqsh --container-workdir={REPO} "
                         f"--container-mounts={REPO}:{REPO},/shared:/shared {command}",
                "apptainer": f"apptainer exec --nv --bind {REPO},/shared --pwd {REPO} /images/p.sif {command}"}
    assert log.read_text().splitlines() == [expected[container]]


def test_slurm_multinode_one_process_per_allocated_gpu(slurm_gpu_cluster: SlurmCluster, tmp_path: Path):
    run_dir = tmp_path / "run"
    job_id, _ = submit(slurm_gpu_cluster, ["launch/slurm_multinode.sbatch", "--logging.run_dir", str(run_dir)],
                       tmp_path, sbatch_args=["--gpus-per-node=2"])
    info = wait_finished(slurm_gpu_cluster, job_id, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_logs(tmp_path)
    results = read_results(run_dir, 4)  # NPROC_PER_NODE came from the 2 GPUs Slurm gave each node
    assert_world(results, 4, "torchrun")
    assert sorted(r["local_rank"] for r in results) == [0, 0, 1, 1]
    assert {r["cuda_visible_devices"] for r in results} == {"0,1"}


def test_slurm_step_exit_code_propagates_to_sbatch_wait(slurm_cluster: SlurmCluster, tmp_path: Path):
    # The only sbatch --wait here: it polls 2, 10 and 42 s after submitting, so the other tests poll
    # scontrol (same ExitCode), and this job exits before importing torch to be done by the first poll.
    # KILL_ON_BAD_EXIT=0 (default): with 1, the first task to exit 3 ends the other and srun reports 143.
    job_id, rc = submit(slurm_cluster, ["launch/slurm_per_task.sbatch", "--logging.run_dir",
                                        str(tmp_path / "run"), "--stand_in.exit_early", "3"], tmp_path, wait=True)
    assert rc == 3, job_logs(tmp_path)
    info = slurm_cluster.job_info(job_id)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "3:0"), job_logs(tmp_path)


def test_slurm_srun_mpi_pmi2(slurm_cluster: SlurmCluster, tmp_path: Path):
    run_dir = tmp_path / "run"
    job_id, _ = submit(slurm_cluster, [], tmp_path, env={"LAUNCHER": "srun", "SRUN_MPI": "pmi2"},
                       sbatch_args=["--nodes=2", "--ntasks-per-node=1",
                                    f"--wrap=launch/mpi.sh --logging.run_dir {run_dir}"])
    info = wait_finished(slurm_cluster, job_id, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_logs(tmp_path)
    results = read_results(run_dir, 2)
    assert_world(results, 2, "mpi")
    assert [r["node"] for r in results] == ["n1", "n2"]


def start_holding_job(cluster: SlurmCluster, script: str, tmp_path: Path, *extra: str, env=None) -> int:
    """Submit a job whose stand-in ranks hold for 60 s after the all-reduce; return once both wrote results."""
    run_dir = tmp_path / "run"
    job_id, _ = submit(cluster, [script, "--logging.run_dir", str(run_dir), "--stand_in.hold_s", "60", *extra],
                       tmp_path, env=env)
    wait_for_files([run_dir / f"rank{r}-run0.json" for r in range(2)], logs_dir=tmp_path, cluster=cluster)
    return job_id


@pytest.mark.parametrize("script", ["launch/slurm_per_task.sbatch", "launch/slurm_multinode.sbatch"])
def test_slurm_scancel_signal_reaches_every_task(slurm_cluster: SlurmCluster, tmp_path: Path, script: str):
    job_id = start_holding_job(slurm_cluster, script, tmp_path, env={"RDZV_BACKEND": "static"})
    slurm_cluster.run(["scancel", "--signal=TERM", str(job_id)])  # steps only: what --signal=TERM@N does
    wait_for_files([tmp_path / "run" / f"signal-rank{r}-run0.txt" for r in range(2)], timeout=30,
                   logs_dir=tmp_path, cluster=slurm_cluster)
    info = wait_finished(slurm_cluster, job_id, tmp_path)
    if script.endswith("per_task.sbatch"):  # torchrun exits 1 after SIGTERM, whatever its workers return
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_logs(tmp_path)


def rerun_when_requeued(cluster: SlurmCluster, job_id: int, tmp_path: Path, run: int) -> list[dict]:
    """Wait for the requeued job's next run and return its results.

    Slurm holds a requeued job for cred_expire + 1 s (11 s here), as it would in production. Never skip
    that with ``scontrol update StartTime=now``: slurmd refuses a launch credential no newer (in whole
    seconds) than its revocation of the previous run's, and slurmctld then ends the job FAILED, ExitCode
    1:0 ("Killing non-startable batch JobId=J: Job credential revoked"; 3 of 8 tries under load).
    """
    cluster.wait_for_job(job_id, ["PENDING"], Restarts=run, timeout=60)
    wait_for_files([tmp_path / "run" / f"rank{r}-run{run}.json" for r in range(2)], timeout=90,
                   logs_dir=tmp_path, cluster=cluster)
    return read_results(tmp_path / "run", 2, run=run)


def test_slurm_requeue_reruns_with_restart_count(slurm_cluster: SlurmCluster, tmp_path: Path):
    """scontrol requeue -> rerun; the trainer's requeue exit code -> the script requeues; cancel -> stays."""
    from hyperp_megatron.resilience import EXIT_REQUEUE  # the trainer's code is the script's default

    job_id = start_holding_job(slurm_cluster, "launch/slurm_per_task.sbatch", tmp_path,
                               "--stand_in.exit_code_on_signal", str(EXIT_REQUEUE))

    def signal_files(run: int) -> list[Path]:
        return [tmp_path / "run" / f"signal-rank{r}-run{run}.txt" for r in range(2)]

    # 1. Requeued from outside: the tasks get SIGTERM; their exit code must not requeue a second time.
    slurm_cluster.run(["scontrol", "requeue", str(job_id)])
    wait_for_files(signal_files(0), timeout=30, logs_dir=tmp_path, cluster=slurm_cluster)
    results = rerun_when_requeued(slurm_cluster, job_id, tmp_path, run=1)
    assert [r["restart_count"] for r in results] == [1, 1]
    assert {r["job_id"] for r in results} == {str(job_id)}
    assert_world(results, 2, "slurm")

    # 2. SIGTERM to the tasks only (as --signal=TERM@N does): they exit EXIT_REQUEUE, the script requeues.
    slurm_cluster.run(["scancel", "--signal=TERM", str(job_id)])
    wait_for_files(signal_files(1), timeout=30, logs_dir=tmp_path, cluster=slurm_cluster)
    results = rerun_when_requeued(slurm_cluster, job_id, tmp_path, run=2)
    assert [r["restart_count"] for r in results] == [2, 2]

    # 3. Cancelled: the tasks exit EXIT_REQUEUE again, but a cancelled job stays cancelled.
    slurm_cluster.run(["scancel", str(job_id)])
    wait_for_files(signal_files(2), timeout=30, logs_dir=tmp_path, cluster=slurm_cluster)
    wait_finished(slurm_cluster, job_id, tmp_path)  # CANCELLED once the batch script is done too
    time.sleep(1)
    info = slurm_cluster.job_info(job_id)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "2"), job_logs(tmp_path)
    log = (tmp_path / f"hyperp-{job_id}.out").read_text()
    assert all(f"restart {run}" in log for run in range(3)), log  # --open-mode=append kept every run


def test_slurm_multinode_requeues_itself_on_its_own_marker_only(slurm_cluster: SlurmCluster, tmp_path: Path):
    """torchrun hides the trainer's exit status: the script requeues when its own run left
    ``run_dir/preempted.json``; a marker from an earlier run (another restart count) requeues nothing."""
    job_id = start_holding_job(slurm_cluster, "launch/slurm_multinode.sbatch", tmp_path,
                               "--stand_in.marker_in_run", "0")
    log = tmp_path / f"hyperp-{job_id}.out"
    # 1. SIGTERM to the tasks: rank 0 of run 0 leaves the marker; the script requeues and exits 0.
    slurm_cluster.run(["scancel", "--signal=TERM", str(job_id)])
    results = rerun_when_requeued(slurm_cluster, job_id, tmp_path, run=1)
    assert [r["restart_count"] for r in results] == [1, 1]
    assert_world(results, 2, "torchrun")
    assert "this run exits 0" in log.read_text(), job_logs(tmp_path)
    # 2. Run 1 leaves no marker and run 0's is still there (the stand-in never removes it): no requeue.
    slurm_cluster.run(["scancel", "--signal=TERM", str(job_id)])
    wait_for_files([tmp_path / "run" / f"signal-rank{r}-run1.txt" for r in range(2)], timeout=30,
                   logs_dir=tmp_path, cluster=slurm_cluster)
    info = wait_finished(slurm_cluster, job_id, tmp_path)
    assert info["Restarts"] == "1", job_logs(tmp_path)
    assert log.read_text().count("requeueing job") == 1, job_logs(tmp_path)
    assert (tmp_path / "run" / "preempted.json").exists()
