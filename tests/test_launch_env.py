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
