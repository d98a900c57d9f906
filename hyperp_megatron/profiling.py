"""The profiler hook (``train.profile_steps``): a torch profiler trace of a few optimizer steps.

Each rank writes ``<run_dir>/profile/trace_rank<rank>.json`` (Chrome trace format: open it in Perfetto or
chrome://tracing); every profiled step is a ``step N`` range (``torch.profiler.record_function``) around the
forward/backward and the optimizer update, N the 1-based optimizer step. CPU activity always, CUDA kernels on a
GPU. Torch is imported only when a profile is taken (the config imports this module to check the setting).
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def parse_profile_steps(text: str) -> tuple[int, int]:
    """``'first-last'`` or ``'step'`` (1-based optimizer steps) -> (first, last); ValueError otherwise."""
    parts = str(text).split("-")
    try:
        first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        first = last = 0
    if not 1 <= first <= last:
        raise ValueError(f"train.profile_steps must be 'first-last' or one step, 1-based (e.g. '5-7' or '5'), "
                         f"got {text!r}")
    return first, last


def trace_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "profile" / f"trace_rank{rank}.json"


class StepProfiler:
    """Profiles optimizer steps ``first..last`` of ``train.profile_steps`` (None: does nothing).

    ``with profiler.step(n): ...`` around optimizer step ``n``: the profiler starts at ``first``, each profiled
    step is a ``step n`` range, and the trace is written when step ``last`` ends (or at :meth:`close`, when
    the run stops earlier)."""

    def __init__(self, profile_steps: str | None, run_dir: Path, rank: int, device):
        self.window = parse_profile_steps(profile_steps) if profile_steps else None
        self.path = trace_path(run_dir, rank)
        self.device = device
        self._profile = None

    @contextlib.contextmanager
    def step(self, step: int):
        if self.window is None or not self.window[0] <= step <= self.window[1]:
            yield
            return
        import torch

        if self._profile is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if getattr(self.device, "type", None) == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(activities=activities, record_shapes=False)
            self._profile.__enter__()
        with torch.profiler.record_function(f"step {step}"):
            yield
        if step == self.window[1]:
            self.close()

    def close(self) -> Path | None:
        """Stop a running profile and write its trace; returns the trace's path (None if none was taken)."""
        if self._profile is None:
            return None
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(self.path))
        return self.path
