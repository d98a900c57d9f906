"""Run directory bookkeeping and metrics: resolved config + provenance, JSONL, TensorBoard, progress line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml

_PACKAGES = ("torch", "megatron-core", "numpy", "tokenizers", "transformers", "transformer-engine", "mpi4py")


def git_sha(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_info(extra: dict | None = None) -> dict:
    """Provenance saved beside every run and checkpoint."""
    return {
        "git_sha": git_sha(Path(__file__).resolve().parent.parent),
        "versions": package_versions(),
        "argv": sys.argv,
        **(extra or {}),
    }


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """Peak GPU memory of this process since it started, allocated by tensors and reserved by the
    caching allocator (GiB); empty on the CPU."""
    if device.type != "cuda":
        return {}
    gib = float(1 << 30)
    return {"mem_peak_alloc_gib": torch.cuda.max_memory_allocated(device) / gib,
            "mem_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib}


def write_run_files(run_dir: Path, config: dict, info: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=1, default=str))


class MetricsLogger:
    """Writes metrics (rank 0 only): ``metrics.jsonl``, TensorBoard events, Weights & Biases (``wandb``: a
    dict of ``wandb.init`` arguments, see :func:`wandb_init_args`) and a progress line."""

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, tensorboard: bool, progress: bool,
                 wandb: dict | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.progress = progress and enabled
        self._start = time.time()
        self._start_step: int | None = None
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb is not None:
            import wandb as wandb_module  # optional: config.check_optional_packages refused a run without it

            self._wandb = wandb_module.init(**wandb)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def start(self, step: int) -> None:
        """Mark where this process started (the ETA extrapolates from here)."""
        self._start_step, self._start = step, time.time()

    def print_progress(self, step: int, values: dict) -> None:
        if not self.progress:
            return
        if self._start_step is None:
            self.start(step - 1)
        elapsed = time.time() - self._start
        done = step - self._start_step
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        parts = [f"step {step:>6}/{self.total_steps}"]
        parts += [_fmt_value(k, v) for k, v in values.items()]
        parts.append(f"eta {_fmt_seconds(eta)}")
        print(" | ".join(parts), flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def wandb_init_args(logging_cfg, run_dir: Path, config: dict) -> dict | None:
    """``wandb.init`` arguments for ``logging.wandb_project`` / ``wandb_mode`` (None without a project): files
    under ``run_dir/wandb``, the run named after the run directory, the resolved config attached."""
    if not logging_cfg.wandb_project:
        return None
    return {"project": logging_cfg.wandb_project, "mode": logging_cfg.wandb_mode, "dir": str(run_dir),
            "name": Path(run_dir).resolve().name, "config": config}


def _fmt_value(key: str, value) -> str:
    if key == "mfu":
        return f"mfu {100 * value:.1f}%"
    if key.startswith("tokens_per_s"):
        return f"{key} {value:,.0f}"
    return f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
