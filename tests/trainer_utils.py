"""Helpers to run the real trainer in test worker processes (see tests/_dist.py)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import yaml

from hyperp_megatron.config import merge_dicts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "seq_length": 64},
    "data": {"cache_dir": os.path.join(REPO, "data")},
    "train": {"steps": 4, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "eval_iters": 1,
              "log_interval": 1},
    "optim": {"name": "adamw", "lr": 1e-2},
    "logging": {"progress": False, "tensorboard": False},
    "checkpoint": {"save_final": False, "resume": False},
}


def merge(base: dict, extra: dict) -> dict:
    return merge_dicts(copy.deepcopy(base), extra)


def train_worker(rank: int, world_size: int, overrides: dict) -> dict:
    """Run the trainer in this (already gloo-initialized) process; returns its result dict."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import load_config, validate
    from hyperp_megatron.train import train

    apply_cpu_patches()
    cfg = load_config(None, merge(TINY, overrides))
    validate(cfg, world_size)
    try:
        return train(cfg, world_size, rank)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


# ---- real torchrun jobs (subprocesses) -----------------------------------------------------------


def write_config(tmp_path: Path, run_dir: Path, merge_into: dict | None = None, **extra) -> Path:
    """A YAML config for ``run_dir`` (TINY + ``merge_into`` + ``extra`` sections) in ``tmp_path``."""
    cfg = merge(TINY, {"logging": {"run_dir": str(run_dir)},
                       "checkpoint": {"save_final": True, "resume": True, "keep": 3}})
    cfg = merge(merge(cfg, merge_into or {}), extra)
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def job_env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)


def launch_torchrun(config: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "hyperp_megatron.train", "--config", str(config), *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while steps_logged(run_dir) < step:
        assert proc is None or proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "training did not reach the step in time"
        time.sleep(0.2)


def worker_pids(proc: subprocess.Popen) -> list[int]:
    children = psutil.Process(proc.pid).children(recursive=True)
    return [c.pid for c in children if "hyperp_megatron.train" in " ".join(c.cmdline())]


def final(run_dir: Path) -> dict:
    return json.loads((run_dir / "final.json").read_text())
