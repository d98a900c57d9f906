"""Rank discovery from launcher environments (the multi-process paths run for real in test_launch.py,
test_slurm_training.py and test_resilience.py)."""

import pytest

from hyperp_megatron.parallel import discover_launch_env

pytestmark = pytest.mark.tier("unit")


def test_torchrun():
    env = discover_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                               "MASTER_ADDR": "n7", "MASTER_PORT": "1234", "SLURM_PROCID": "0"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr, env.master_port,
            env.launcher) == (3, 8, 1, 2, "n7", 1234, "torchrun")


def test_slurm_srun_task():
    env = discover_launch_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0",
                               "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "2,1",
                               "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "77"})
    assert (env.rank, env.world_size, env.local_world_size, env.launcher) == (2, 3, 2, "slurm")
    assert env.master_addr in ("gpu12",)  # scontrol absent or present: the first host either way
    assert env.master_port == discover_launch_env({**{"SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_STEP_ID": "0",
                                                      "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "77"}}).master_port


def test_slurm_batch_shell_is_not_a_rank():
    env = discover_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"})
    assert (env.world_size, env.launcher) == (1, "single")


TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "1234"}
SRUN = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "7", "MASTER_ADDR": "n1"}


@pytest.mark.parametrize("base, changes, message", [
    (TORCHRUN, {"RANK": "1", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}, "RANK=1 is not below WORLD_SIZE=1"),
    (TORCHRUN, {"RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    (TORCHRUN, {"RANK": "-1"}, "RANK='-1' is not an integer >= 0"),
    (TORCHRUN, {"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer >= 1"),
    (TORCHRUN, {"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not an integer >= 1"),
    (TORCHRUN, {"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
    (TORCHRUN, {"LOCAL_RANK": ""}, "LOCAL_RANK='' is not an integer >= 0"),
    (TORCHRUN, {"LOCAL_WORLD_SIZE": "4"}, "LOCAL_WORLD_SIZE=4 exceeds WORLD_SIZE=2"),
    (TORCHRUN, {"MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer >= 1"),
    (TORCHRUN, {"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    (SRUN, {"SLURM_NTASKS": "x"}, "SLURM_NTASKS='x' is not an integer >= 1"),
    (SRUN, {"SLURM_NTASKS": ""}, "SLURM_NTASKS='' is not an integer >= 1"),
    (SRUN, {"SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not below SLURM_NTASKS=2"),
    (SRUN, {"SLURM_TASKS_PER_NODE": "two"}, "SLURM_TASKS_PER_NODE='two' is not a SLURM task count list"),
    (SRUN, {"SLURM_TASKS_PER_NODE": ""}, "SLURM_TASKS_PER_NODE='' is not a SLURM task count list"),
    (SRUN, {"MASTER_PORT": "1e4"}, "MASTER_PORT='1e4' is not an integer >= 1"),
    ({}, {"MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not an integer >= 1"),
])
def test_bad_launch_variables_are_one_line(base, changes, message):
    """Issue 21: RANK=1 WORLD_SIZE=1 waited parallel.timeout_minutes; a non-numeric variable was a traceback."""
    with pytest.raises(ValueError) as error:
        discover_launch_env({**base, **changes})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_good_variables_still_pass():
    assert discover_launch_env(TORCHRUN).world_size == 2
    env = discover_launch_env({**SRUN, "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NTASKS": "7", "SLURM_PROCID": "6",
                               "MASTER_PORT": ""})
    assert (env.rank, env.world_size, env.local_world_size) == (6, 7, 2)
    assert 10000 <= env.master_port < 20000  # empty MASTER_PORT: derived from the job id


def test_entry_point_reports_bad_rank_variables_at_once(tmp_path):
    """The trainer's entry point: one error line and exit 2, before any process group (it used to hang)."""
    import os
    import subprocess
    import sys
    import time

    started = time.time()
    out = subprocess.run([sys.executable, "-m", "hyperp_megatron.train", "--logging.run_dir", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RANK": "1", "WORLD_SIZE": "1", "MASTER_PORT": "29999"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == ["error: RANK=1 is not below WORLD_SIZE=1: check the launcher's "
                                               "environment"]
    assert time.time() - started < 60 and not (tmp_path / "r").exists()
