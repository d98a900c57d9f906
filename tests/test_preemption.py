"""Preemption plumbing: the marker (hyperp_megatron/requeue.py) and its CLI as launch/slurm_multinode.sbatch
uses them, and checkpoint-writer helper processes that survive the preemption signal. The batch scripts are
tested on a real SLURM cluster: tests/test_launch.py (stand-in) and tests/test_slurm_training.py (the trainer)."""

import json
import os
import subprocess
import sys

from hyperp_megatron import requeue

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_7_RUN_1 = {"slurm_job_id": "7", "slurm_restart_count": 1}


def test_marker_round_trip_and_ownership(tmp_path):
    assert requeue.read_marker(tmp_path) is None and requeue.clear_marker(tmp_path) is None
    path = requeue.write_marker(tmp_path, 3, "step_000003", "SIGTERM", JOB_7_RUN_1)
    assert path == tmp_path / "preempted.json" and not list(tmp_path.glob("*.tmp"))
    marker = requeue.read_marker(tmp_path)
    assert marker["step"] == 3 and marker["checkpoint"] == "step_000003" and marker["signal"] == "SIGTERM"
    assert requeue.left_by(marker, JOB_7_RUN_1)
    assert not requeue.left_by(marker, {"slurm_job_id": "7", "slurm_restart_count": 2})  # a later run's check
    assert not requeue.left_by(marker, {"slurm_job_id": "8", "slurm_restart_count": 1})
    assert not requeue.left_by(requeue.read_marker(requeue.write_marker(tmp_path, 3, "c", None,
                                                                          requeue.slurm_run_id({}))),
                               requeue.slurm_run_id({}))  # outside SLURM: never a requeue
    assert requeue.clear_marker(tmp_path)["step"] == 3 and not path.exists()


def test_slurm_run_id():
    assert requeue.slurm_run_id({"SLURM_JOB_ID": "7"}) == {"slurm_job_id": "7", "slurm_restart_count": 0}
    assert requeue.slurm_run_id({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}) == JOB_7_RUN_1


def test_run_dir_from_args(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("logging:\n  run_dir: runs/from_yaml\ntrain:\n  steps: 3\n")
    assert requeue.run_dir_from_args(["--config", str(config)]) == "runs/from_yaml"
    assert requeue.run_dir_from_args([f"--config={config}", "--logging.run_dir", "/x"]) == "/x"
    # Only logging.run_dir is read: another entry point's keys (the launcher tests' stand-in) are fine.
    assert requeue.run_dir_from_args(["--config", str(config), "--stand_in.hold_s", "3"]) == "runs/from_yaml"
    assert requeue.run_dir_from_args(["--logging.run_dir=/y"]) == "/y"
    assert requeue.run_dir_from_args([]) == "runs/default"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hyperp_megatron.requeue", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_cli_as_the_batch_script_calls_it(tmp_path):
    out = _cli("run-dir", "--config", "configs/tiny.yaml", "--logging.run_dir", str(tmp_path))
    assert (out.returncode, out.stdout.strip()) == (0, str(tmp_path))
    out = _cli("run-dir", "--config", "/nonexistent.yaml")
    assert out.returncode == 2 and out.stderr.startswith("error: cannot resolve logging.run_dir")
    (tmp_path / "preempted.json").write_text(json.dumps({"step": 4, **JOB_7_RUN_1}))
    slurm = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}
    out = _cli("check", str(tmp_path), env=slurm)
    assert out.returncode == 0 and out.stdout.startswith("preempted at step 4"), out
    assert _cli("check", str(tmp_path), env={**slurm, "SLURM_RESTART_COUNT": "2"}).returncode == 1
    assert _cli("check", str(tmp_path / "nothing-here"), env=slurm).returncode == 1
    assert _cli("bogus").returncode == 2


HELPERS_SURVIVE = """
import os, signal, time, psutil
from hyperp_megatron import checkpoint
from megatron.core.dist_checkpointing.strategies import filesystem_async
if {start_first}:
    checkpoint._start_writer_helpers()
queue = filesystem_async._get_write_results_queue()  # what dist_checkpointing.save uses
helpers = psutil.Process().children(recursive=True)
for helper in helpers:  # as SLURM signals every process of a step
    os.kill(helper.pid, signal.SIGTERM)
    os.kill(helper.pid, signal.SIGUSR1)
time.sleep(1)
queue.put("written")
print(len(helpers), queue.get())
"""


def test_checkpoint_writer_helpers_survive_the_preemption_signal():
    """Megatron's checkpoint writer spawns a Manager (its results queue) once per process. Started by
    checkpoint.save, it ignores SIGTERM/SIGUSR1; started plainly (the control), the signal kills it."""
    def run(start_first: bool):
        return subprocess.run([sys.executable, "-c", HELPERS_SURVIVE.format(start_first=start_first)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    out = run(True)
    assert out.returncode == 0 and out.stdout.split() == ["2", "written"], out.stderr[-3000:]  # tracker + manager
    control = run(False)
    assert control.returncode != 0 and "written" not in control.stdout, control.stdout  # the manager is gone
    assert any(error in control.stderr for error in ("BrokenPipeError", "EOFError", "ConnectionRefusedError",
                                                     "ConnectionResetError")), control.stderr[-3000:]
