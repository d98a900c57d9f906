"""What a sweep's results folder holds, as tables: one :class:`RunResult` per finished run (its status,
final validation loss, derived values (its ``derived.json``), the last monitor record) and the
per-(variant, scale) LR sweeps of an experiment."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hyperp_megatron.config import load_config
from hyperp_megatron.derived import derive, read_derived
from hyperp_megatron.science.sweep import Spec, SweepRun, plan, read_status, run_dir


@dataclass
class RunResult:
    key: str
    status: str  # done | diverged | failed | pending
    val_loss: float | None
    lr: float | None  # the actual peak LR (HyperP rules applied)
    flops: float | None
    tokens: float | None
    num_params: float | None
    batch_tokens: int | None
    monitors: dict = field(default_factory=dict)  # the last record with monitor/ keys (without the prefix)
    wall_s: float | None = None
    config: dict = field(default_factory=dict)  # the resolved config.yaml

    def value(self, dotted: str):
        """A resolved config value by dotted key (None when absent)."""
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def finite(self) -> bool:
        return self.status == "done" and self.val_loss is not None and math.isfinite(self.val_loss)


def _last_monitor_record(path: Path) -> dict:
    last = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return last
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if any(k.startswith("monitor/") for k in record):
            last = {k.removeprefix("monitor/"): v for k, v in record.items() if k.startswith("monitor/")}
            last["step"] = record.get("step")
            for key in ("aux_loss", "loss"):
                if key in record:
                    last[f"train_{key}"] = record[key]
            break
    return last


def _derived(folder: Path) -> dict:
    """The run's derived values: its ``derived.json`` (what it trained with), else derived from its config."""
    recorded = read_derived(folder)
    if recorded is None:
        try:
            recorded = derive(load_config(folder / "config.yaml"), 1).to_dict()
        except (ValueError, OSError):
            return {}
    return {"lr": recorded["lr"], "flops": recorded["train_flops"], "tokens": float(recorded["trained_tokens"]),
            "num_params": recorded["num_params"], "batch_tokens": recorded["batch_tokens"]}


def collect(spec: Spec, results: str | Path, runs: list[SweepRun] | None = None) -> dict[str, RunResult]:
    """key -> RunResult for every planned run (``pending`` when it has not finished). ``results``: the sweep's
    results folder, or its summary file (``runs_summary.jsonl``, :func:`read_summary`)."""
    runs = runs if runs is not None else plan(spec)
    if Path(results).is_file():
        return read_summary(results, runs)
    out = {}
    for run in runs:
        folder = run_dir(Path(results), run)
        status = read_status(folder)
        if status is None:
            out[run.key] = RunResult(run.key, "pending", None, None, None, None, None, None)
            continue
        has_config = (folder / "config.yaml").is_file()
        derived = _derived(folder) if has_config else {}
        config = yaml.safe_load((folder / "config.yaml").read_text()) if has_config else {}
        out[run.key] = RunResult(run.key, status["status"], status.get("val_loss"), derived.get("lr"),
                                 derived.get("flops"), derived.get("tokens"), derived.get("num_params"),
                                 derived.get("batch_tokens"), _last_monitor_record(folder / "metrics.jsonl"),
                                 status.get("wall_s"), config or {})
    return out


def read_summary(path: str | Path, runs: list[SweepRun]) -> dict:
    """key -> RunResult for every planned run from a summary file (``runs_summary.jsonl``, science/summary.py) (``pending`` when it has no record)."""
    records = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{number}: not a JSON line (regenerate it with hyperp-sweep archive)") from None
            records[record["key"]] = record
    out = {}
    for run in runs:
        r = records.get(run.key)
        if r is None:
            out[run.key] = RunResult(run.key, "pending", None, None, None, None, None, None)
            continue
        out[run.key] = RunResult(run.key, r["status"], r["val_loss"], r["lr"], r["flops"], r["tokens"],
                                 r["num_params"], r["batch_tokens"], r.get("monitors") or {}, r.get("wall_s"),
                                 r.get("config") or {})
    return out


@dataclass
class Row:
    variant: str
    scale: str
    base_lr: float
    seed: int
    run: RunResult


def experiment_rows(spec: Spec, experiment: str, runs: list[SweepRun], results: dict[str, RunResult]) -> list[Row]:
    rows = []
    for run in runs:
        for m in run.memberships:
            if m.experiment == experiment:
                rows.append(Row(m.variant, m.scale, m.lr, m.seed, results[run.key]))
    return rows  # (a variant sharing another's runs at a scale has its own memberships: sweep.plan)


def sweep_points(rows: list[Row], variant: str, scale: str, x: str = "base") -> dict[float, list[float]]:
    """LR -> finite final validation losses (one per seed); ``x`` 'base' (the swept base LR) or 'actual'
    (the peak LR after the transfer rules)."""
    points: dict[float, list[float]] = {}
    for row in rows:
        if row.variant != variant or row.scale != scale or not row.run.finite:
            continue
        lr = row.base_lr if x == "base" else row.run.lr
        points.setdefault(lr, []).append(row.run.val_loss)
    return points


def completeness(rows: list[Row]) -> tuple[int, int]:
    """(finished runs, runs) of these rows (each run counted once)."""
    unique = {row.run.key: row.run for row in rows}
    return sum(r.status in ("done", "diverged") for r in unique.values()), len(unique)
