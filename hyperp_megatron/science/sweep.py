"""LR sweeps over scale ladders (``hyperp-sweep``): the spec, the run list, each run's folder, and a
resumable local executor.

A spec (YAML, e.g. ``sweeps/science.yaml``) names a base config, the LR key and experiments;
an experiment is a grid ``scale x variant x LR x seed`` of dotted-key overrides (see that file's header).
:func:`plan` turns it into an ordered, de-duplicated list of :class:`SweepRun`: runs with identical
overrides are trained once and serve every experiment that lists them. A run's folder
``<results>/runs/<key>`` (``key`` = a hash of the base config path and the overrides) holds what the trainer
writes (``config.yaml`` resolved, ``run_info.json`` with the derived LR, ``metrics.jsonl``, ``final.json``),
the run's identity (``sweep_run.json``), its log (``train.log``) and ``status.json`` once it ended:
``done``, ``diverged`` (the trainer stopped on non-finite values: a result, never redone) or ``failed``
(redone on the next resume). A folder without ``status.json`` (an interrupted run) is cleared and redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from hyperp_megatron.config import load_config
from hyperp_megatron.derived import derive

STATUS_FILE = "status.json"
IDENTITY_FILE = "sweep_run.json"
EXIT_NON_FINITE = 3  # hyperp_megatron.train.EXIT_NON_FINITE (not imported: that module imports torch)
FINISHED = ("done", "diverged")


# ----------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class LRGrid:
    """``points`` values ``center * factor^k``, k symmetric around 0, rounded to 6 significant digits, and
    ``below`` more under them (extending a grid downwards keeps its values, hence its runs)."""

    center: float
    factor: float = 2.0
    points: int = 5
    below: int = 0

    def __post_init__(self):
        if not (self.center > 0 and self.factor > 1 and self.points >= 1 and self.below >= 0):
            raise ValueError(f"lr_grid needs center > 0, factor > 1, points >= 1 and below >= 0, got {self}")

    def values(self) -> list[float]:
        half = (self.points - 1) / 2
        return [float(f"{self.center * self.factor ** (k - half):.6g}") for k in range(-self.below, self.points)]


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict
    lr_grid: LRGrid
    share: dict  # scale name -> another variant whose runs at that scale stand for this one's


@dataclass(frozen=True)
class Experiment:
    name: str
    claims: tuple[str, ...]
    scale_key: str | None
    scales: dict  # name -> overrides (ordered)
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    common: dict


@dataclass(frozen=True)
class Spec:
    path: Path
    base_config: Path  # resolved (loadable from the working directory)
    lr_key: str
    experiments: tuple[Experiment, ...]
    base_config_name: str = ""  # as written in the spec: part of every run key, whatever the working directory

    def experiment(self, name: str) -> Experiment:
        for experiment in self.experiments:
            if experiment.name == name:
                return experiment
        raise ValueError(f"no experiment {name!r} in {self.path} (have: {[e.name for e in self.experiments]})")


def _grid(raw: dict | None, default: LRGrid | None, where: str) -> LRGrid:
    raw = dict(raw or {})
    unknown = set(raw) - {"center", "factor", "points", "below"}
    if unknown:
        raise ValueError(f"{where}: unknown lr_grid keys {sorted(unknown)} (center, factor, points, below)")
    typed = {k: int(v) if k in ("points", "below") else float(v) for k, v in raw.items()}
    if default is None:
        if "center" not in raw:
            raise ValueError(f"{where}: lr_grid needs a center")
        return LRGrid(**typed)
    return dataclasses.replace(default, **typed)


def _experiment(raw: dict, index: int) -> Experiment:
    name = raw.get("name") or f"experiment{index}"
    known = {"name", "claims", "scale_key", "lr_grid", "scales", "variants", "seeds", "common"}
    if set(raw) - known:
        raise ValueError(f"experiment {name!r}: unknown keys {sorted(set(raw) - known)} (known: {sorted(known)})")
    grid = _grid(raw.get("lr_grid"), None, f"experiment {name!r}")
    scales = {str(k): dict(v or {}) for k, v in (raw.get("scales") or {"base": {}}).items()}
    variants = []
    for variant_name, body in (raw.get("variants") or {"default": {}}).items():
        body = dict(body or {})
        if set(body) - {"overrides", "lr_grid", "share"}:
            raise ValueError(f"experiment {name!r}, variant {variant_name!r}: keys are overrides, lr_grid, share")
        share = {str(k): str(v) for k, v in (body.get("share") or {}).items()}
        variants.append(Variant(str(variant_name), dict(body.get("overrides") or {}),
                                _grid(body.get("lr_grid"), grid, f"variant {variant_name!r}"), share))
    names = [v.name for v in variants]
    for variant in variants:
        for scale, other in variant.share.items():
            if scale not in scales or other not in names or other == variant.name:
                raise ValueError(f"experiment {name!r}, variant {variant.name!r}: share {scale}: {other} must name "
                                 f"a scale ({list(scales)}) and another variant ({names})")
    seeds = tuple(int(s) for s in raw.get("seeds", [1234]))
    return Experiment(name, tuple(raw.get("claims", [])), raw.get("scale_key"), scales, tuple(variants), seeds,
                      dict(raw.get("common") or {}))


def load_spec(path: str | Path) -> Spec:
    """Parse and check a sweep spec; ValueError names what to fix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep spec not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    for key in ("base_config", "experiments"):
        if key not in raw:
            raise ValueError(f"{path}: missing '{key}'")
    base = Path(raw["base_config"])
    # relative paths: from the working directory, else from the spec's folder or its parent (the repository
    # root for sweeps/*.yaml)
    for candidate in (base, path.parent / base, path.parent.parent / base):
        if candidate.is_file():
            base = candidate
            break
    else:
        raise ValueError(f"{path}: base_config {raw['base_config']} not found")
    experiments = tuple(_experiment(e, i) for i, e in enumerate(raw["experiments"]))
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: experiment names must be unique, got {names}")
    return Spec(path, base, raw.get("lr_key", "optim.lr"), experiments, str(raw["base_config"]))


# ----------------------------------------------------------------------------------------------
# The run list


@dataclass(frozen=True)
class Membership:
    """One place a run takes in an experiment's grid."""

    experiment: str
    variant: str
    scale: str
    lr: float
    seed: int


@dataclass
class SweepRun:
    key: str
    overrides: dict  # dotted key -> value, sorted
    memberships: list[Membership] = field(default_factory=list)

    def argv(self) -> list[str]:
        """The overrides as trainer arguments (``--a.b value``; lists and dicts as YAML flow)."""
        out = []
        for key, value in self.overrides.items():
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() \
                if isinstance(value, (list, dict)) else str(value)
            out += [f"--{key}", text]
        return out


def run_key(base_config: str, overrides: dict) -> str:
    text = json.dumps({"base": str(base_config), "overrides": overrides}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def plan(spec: Spec, only: list[str] | None = None) -> list[SweepRun]:
    """Every run of the spec (or of the experiments in ``only``), in order: experiments as listed; within
    one, seed, then scale, then variant, then LR. Identical overrides -> one run with several memberships."""
    if only:
        for name in only:
            spec.experiment(name)  # raises for an unknown name
    runs: dict[str, SweepRun] = {}
    for experiment in spec.experiments:
        if only and experiment.name not in only:
            continue
        for seed in experiment.seeds:
            for scale, scale_overrides in experiment.scales.items():
                for variant in experiment.variants:
                    source = _variant(experiment, variant.share.get(scale, variant.name))
                    for lr in source.lr_grid.values():
                        overrides = {**experiment.common, **scale_overrides, **source.overrides,
                                     spec.lr_key: lr, "train.seed": seed}
                        overrides = dict(sorted(overrides.items()))
                        key = run_key(spec.base_config_name or str(spec.base_config), overrides)
                        run = runs.setdefault(key, SweepRun(key, overrides))
                        run.memberships.append(Membership(experiment.name, variant.name, scale, lr, seed))
    return list(runs.values())


def _variant(experiment: Experiment, name: str) -> Variant:
    return next(v for v in experiment.variants if v.name == name)


def estimated_flops(spec: Spec, run: SweepRun) -> float:
    """Training FLOPs of a run (``derived.derive``, one process): the cost model of the ETA."""
    cfg = load_config(spec.base_config, {k: v for k, v in nested_overrides(run.overrides).items()})
    return derive(cfg, 1).train_flops * (1.6 if cfg.model.moe.enabled else 1.0)  # MoE: routing (CPU time, measured)


def nested_overrides(dotted: dict) -> dict:
    nested: dict = {}
    for key, value in dotted.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


# ----------------------------------------------------------------------------------------------
# Run folders


def run_dir(results: Path, run: SweepRun) -> Path:
    return Path(results) / "runs" / run.key


def read_status(folder: Path) -> dict | None:
    path = folder / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_finished(folder: Path) -> bool:
    status = read_status(folder)
    return status is not None and status.get("status") in FINISHED


def _link_shared_data(data_dir: Path, shared: Path) -> None:
    """The run's data.cache_dir: links to the shared corpus/tokenizer, but its own dataset index cache
    (concurrent runs would otherwise write the same index files)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for entry in shared.iterdir() if shared.is_dir() else []:
        if entry.name != "index_cache" and not entry.name.startswith(".") and not (data_dir / entry.name).exists():
            (data_dir / entry.name).symlink_to(entry.resolve())


def command(spec: Spec, run: SweepRun, results: Path, trainer: list[str], shared_data: Path,
            save_checkpoints: bool = False) -> list[str]:
    folder = run_dir(results, run)
    extra = ["--logging.run_dir", str(folder), "--data.cache_dir", str(folder / "data"),
             "--checkpoint.resume", "false"]
    if not save_checkpoints:
        extra += ["--checkpoint.save_final", "false", "--checkpoint.interval", "0"]
    return [*trainer, "--config", str(spec.base_config), *run.argv(), *extra]


PID_FILE = "pid"


def _stop_orphan(folder: Path) -> None:
    """A trainer left running by a sweep that was killed (SIGKILL, a lost shell) would write into the folder
    we are about to reuse: stop it, if its command line still names this folder."""
    try:
        pid = int((folder / PID_FILE).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return
    if str(folder) in cmdline:
        try:
            os.killpg(pid, signal.SIGKILL)  # its own session (start_new_session): the trainer and its children
        except OSError:
            pass


def prepare_folder(run: SweepRun, results: Path, shared_data: Path) -> Path:
    """A clean folder for a run that has not finished, with its identity and the shared data linked."""
    folder = run_dir(results, run)
    if folder.exists():
        _stop_orphan(folder)
        shutil.rmtree(folder)  # an interrupted or failed attempt: start over (no checkpoints are kept)
    folder.mkdir(parents=True)
    identity = {"key": run.key, "overrides": run.overrides,
                "memberships": [dataclasses.asdict(m) for m in run.memberships]}
    (folder / IDENTITY_FILE).write_text(json.dumps(identity, indent=1))
    _link_shared_data(folder / "data", shared_data)
    return folder


def finish_folder(folder: Path, returncode: int, started: float) -> dict:
    """Write status.json from the exit status and final.json; drop the run's index cache (disk)."""
    final = None
    try:
        final = json.loads((folder / "final.json").read_text())
    except (OSError, ValueError):
        pass
    val_loss = None if final is None else final.get("val_loss")
    if returncode == 0 and val_loss is not None and math.isfinite(val_loss):
        status = "done"
    elif returncode == EXIT_NON_FINITE or (returncode == 0 and final is not None):
        status = "diverged"
    else:
        status = "failed"
    record = {"status": status, "returncode": returncode, "val_loss": val_loss,
              "wall_s": time.time() - started, "finished": time.time()}
    (folder / STATUS_FILE).write_text(json.dumps(record))
    shutil.rmtree(folder / "data" / "index_cache", ignore_errors=True)
    return record


# ----------------------------------------------------------------------------------------------
# The local executor


def _format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Progress:
    """Counts for the sweep's progress line; the ETA spreads the remaining FLOPs over the job slots at the
    seconds-per-FLOP measured on runs finished in this session."""

    total: int
    costs: dict  # key -> estimated FLOPs
    jobs: int
    counts: dict = field(default_factory=lambda: {"done": 0, "diverged": 0, "failed": 0, "skipped": 0})
    measured: list = field(default_factory=list)  # (flops, seconds) of runs finished in this session
    started: float = field(default_factory=time.time)

    def line(self, running: int, remaining_keys: list[str]) -> str:
        finished = self.counts["done"] + self.counts["diverged"] + self.counts["skipped"]
        eta = "?"
        if self.measured:
            rate = sum(s for _, s in self.measured) / max(sum(f for f, _ in self.measured), 1.0)
            eta = _format_seconds(rate * sum(self.costs[k] for k in remaining_keys) / self.jobs)
        return (f"[sweep] {finished}/{self.total} finished ({self.counts['skipped']} earlier, "
                f"{self.counts['diverged']} diverged), {self.counts['failed']} failed, {running} running | "
                f"elapsed {_format_seconds(time.time() - self.started)} | eta {eta}")


def run_local(spec: Spec, runs: list[SweepRun], results: Path, *, jobs: int, trainer: list[str],
              shared_data: Path, env: dict, log: Callable[[str], None] = print, save_checkpoints: bool = False,
              costs: dict | None = None, max_runs: int | None = None, poll_s: float = 0.5) -> dict:
    """Train every unfinished run, ``jobs`` processes at a time; returns the final counts.

    Finished runs (``done``/``diverged``) are never redone; failed and interrupted ones are. SIGINT/SIGTERM
    stop the children (their folders are cleared on the next resume) and return.
    """
    results = Path(results)
    costs = costs or {run.key: 1.0 for run in runs}
    progress = Progress(len(runs), costs, jobs)
    pending = []
    for run in runs:
        if is_finished(run_dir(results, run)):
            progress.counts["skipped"] += 1
        else:
            pending.append(run)
    if max_runs is not None:
        pending = pending[:max_runs]
    log(progress.line(0, [r.key for r in pending]))
    active: dict[str, tuple] = {}
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (pending or active) and not stop["now"]:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                folder = prepare_folder(run, results, shared_data)
                with open(folder / "train.log", "w") as out:
                    proc = subprocess.Popen(command(spec, run, results, trainer, shared_data, save_checkpoints),
                                            stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
                (folder / PID_FILE).write_text(str(proc.pid))
                active[run.key] = (run, proc, folder, time.time())
            time.sleep(poll_s)
            for key, (run, proc, folder, started) in list(active.items()):
                if proc.poll() is None:
                    continue
                del active[key]
                record = finish_folder(folder, proc.returncode, started)
                progress.counts[record["status"]] += 1
                if record["status"] in FINISHED:
                    progress.measured.append((costs[key], record["wall_s"]))
                label = ", ".join(f"{m.experiment}/{m.variant}/{m.scale}/lr{m.lr:g}/s{m.seed}"
                                  for m in run.memberships[:2])
                log(f"[sweep] {record['status']}: {label} val_loss {record['val_loss']} "
                    f"({record['wall_s']:.0f} s, {folder.name})")
                log(progress.line(len(active), [r.key for r in pending] + list(active)))
    finally:
        for run, proc, folder, _ in active.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the trainer checkpoints nothing here: just stop it
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stop["now"]:
        log(f"[sweep] interrupted: {len(active)} running runs stopped (redone on resume)")
    return progress.counts


def run_one(spec: Spec, run: SweepRun, results: Path, *, trainer: list[str], shared_data: Path, env: dict,
            save_checkpoints: bool = False) -> dict:
    """Train one run in the foreground (a SLURM array task); a finished run returns its status untouched."""
    folder = run_dir(results, run)
    if is_finished(folder):
        return {**read_status(folder), "skipped": True}
    folder = prepare_folder(run, results, shared_data)
    started = time.time()
    with open(folder / "train.log", "w") as out:
        returncode = subprocess.run(command(spec, run, results, trainer, shared_data, save_checkpoints),
                                    stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    return finish_folder(folder, returncode, started)


def prepare_shared_data(spec: Spec, runs: list[SweepRun], shared_data: Path) -> None:
    """Build the embedded corpus and tokenizer once per vocabulary size before any run starts (runs only
    link to it). Runs on user data (data.prefixes) need nothing here."""
    vocab_sizes = set()
    for run in runs:
        cfg = load_config(spec.base_config, nested_overrides(run.overrides))
        if not cfg.data.prefixes:
            vocab_sizes.add(cfg.data.embedded_vocab_size)
    if vocab_sizes:
        from hyperp_megatron.data.corpus import prepare_embedded_corpus  # imports megatron-core

        for vocab_size in sorted(vocab_sizes):
            prepare_embedded_corpus(str(shared_data), vocab_size)
