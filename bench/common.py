"""Shared by the benchmark scripts: provenance and the machine's load while they ran.

Benchmarks on the shared development machine are run beside other jobs; every result file states the
load it was measured under (``LoadSampler``), so numbers taken on a busy machine read as such.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (results never record this machine's paths)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(command: str) -> dict:
    return {"command": command, "git_sha": git_sha(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}


class LoadSampler:
    """Samples the 1-minute load average every ``period`` seconds while the block runs."""

    def __init__(self, period: float = 10.0):
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.period)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        """Load average (1 min) during the block, against the machine's core count."""
        samples = self.samples or [os.getloadavg()[0]]
        cpus = os.cpu_count() or 1
        median = statistics.median(samples)
        return {"load_average_1min": {"min": min(samples), "median": median, "max": max(samples),
                                      "samples": len(samples), "period_s": self.period},
                "cpus": cpus, "idle_machine": max(samples) <= 1.25 * cpus,
                "note": ("idle: the load stayed near the core count" if max(samples) <= 1.25 * cpus else
                         f"shared: median load {median:.1f} on {cpus} cores, i.e. other jobs ran beside this one "
                         "(wall times are inflated; compare only numbers measured side by side)")}
