"""The preemption marker ``<run_dir>/preempted.json``: how a preempted run asks its launcher for a requeue.

torchrun exits 1 whatever its workers returned, so under ``launch/slurm_multinode.sbatch`` the trainer's
requeue status (75, :data:`~hyperp_megatron.resilience.EXIT_REQUEUE`) never reaches the batch script.
Instead rank 0 writes this marker once the preemption checkpoint is complete (every rank has passed the
checkpoint's last barrier). The batch script requeues the job when the marker was left by its own run
(same SLURM job id and restart count, so a stale marker never requeues a job), and the resumed run
removes the marker when it starts. Pure file handling: no torch, so the batch script's checks are quick.

    python -m hyperp_megatron.requeue run-dir --config FILE [--section.key value ...]  # prints logging.run_dir
    python -m hyperp_megatron.requeue check RUN_DIR   # exit 0 iff this SLURM run (job, restart) left a marker
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Mapping

MARKER = "preempted.json"


def marker_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / MARKER


def slurm_run_id(environ: Mapping[str, str]) -> dict:
    """This process's SLURM job id and restart count (None / 0 outside SLURM), as stored in the marker."""
    return {"slurm_job_id": environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(environ.get("SLURM_RESTART_COUNT") or 0)}


def write_marker(run_dir: str | Path, step: int, checkpoint: str, signal_name: str | None, run_id: dict) -> Path:
    """Write the marker atomically (rank 0 only, after the checkpoint of ``step`` is complete)."""
    path = marker_path(run_dir)
    payload = {"step": step, "checkpoint": checkpoint, "signal": signal_name,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run_id}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_marker(run_dir: str | Path) -> dict | None:
    """The marker's content, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(marker_path(run_dir).read_text())
    except (OSError, ValueError):
        return None


def clear_marker(run_dir: str | Path) -> dict | None:
    """Remove the marker (a resumed run, at its start); returns what it said, or None if there was none."""
    marker = read_marker(run_dir)
    marker_path(run_dir).unlink(missing_ok=True)
    return marker


def left_by(marker: dict | None, run_id: dict) -> bool:
    """True when ``marker`` was written by the SLURM run ``run_id`` (job id and restart count)."""
    return (marker is not None and run_id["slurm_job_id"] is not None
            and str(marker.get("slurm_job_id")) == str(run_id["slurm_job_id"])
            and marker.get("slurm_restart_count") == run_id["slurm_restart_count"])


def run_dir_from_args(argv: list[str]) -> str:
    """``logging.run_dir`` as the trainer would resolve it from ``--config FILE`` and dotted overrides.

    Reads only that key, so arguments for another entry point (a launcher test's stand-in) are fine.
    """
    import yaml

    from hyperp_megatron.cli import split_config_arg
    from hyperp_megatron.config import LoggingConfig, parse_overrides

    config_path, overrides = split_config_arg(argv, strict=False)
    data = (yaml.safe_load(Path(config_path).read_text()) or {}) if config_path else {}
    run_dir = (data.get("logging") or {}).get("run_dir", LoggingConfig.run_dir)
    return str(parse_overrides(overrides).get("logging", {}).get("run_dir", run_dir))


def main(argv: list[str]) -> int:
    usage = "usage: python -m hyperp_megatron.requeue {run-dir --config FILE [overrides] | check RUN_DIR}"
    if argv[:1] == ["run-dir"]:
        import yaml

        try:
            print(run_dir_from_args(argv[1:]))
        except (OSError, ValueError, AttributeError, yaml.YAMLError) as exc:
            print(f"error: cannot resolve logging.run_dir: {exc}", file=sys.stderr)
            return 2
        return 0
    if argv[:1] == ["check"] and len(argv) == 2:
        marker = read_marker(argv[1])
        if left_by(marker, slurm_run_id(os.environ)):
            print(f"preempted at step {marker['step']} ({marker_path(argv[1])})")
            return 0
        return 1
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
