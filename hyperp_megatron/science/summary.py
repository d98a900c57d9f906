"""A sweep's results without its run folders: one JSON line per finished run (``runs_summary.jsonl``: what
the fit reads, plus the sha256 of every file of the run) and a reproducible ``tar.gz`` of the run folders
kept outside the repository, described by ``runs_archive.json`` (its sha256, size and members).

``hyperp-sweep archive --spec S --results R --out DIR --archive FILE.tar.gz`` writes both;
``hyperp-fit --spec S --results DIR/runs_summary.jsonl`` fits from the summary alone (the report is the same
as from the folders: :func:`~hyperp_megatron.science.results.read_summary` rebuilds the ``RunResult`` that
:func:`~hyperp_megatron.science.results.collect` reads from a folder). The archive is byte-for-byte
reproducible from the same folders (sorted members, zero mtimes and owners), so its checksum checks a copy.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from hyperp_megatron.science.results import collect
from hyperp_megatron.science.sweep import Spec, SweepRun, is_finished, run_dir

SUMMARY_FILE = "runs_summary.jsonl"
ARCHIVE_MANIFEST = "runs_archive.json"
SKIPPED = {"data", "pid"}  # the shared corpus links and the trainer's PID: not results


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_files(folder: Path) -> list[Path]:
    """The files of a run folder that are results (sorted; the data links and the PID file left out)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
                  and p.relative_to(folder).parts[0] not in SKIPPED)


def config_keys(spec: Spec) -> list[str]:
    """The config values a summary keeps per run: every scale key and every key a run overrides."""
    keys = {spec.lr_key, "train.seed"}
    for experiment in spec.experiments:
        if experiment.scale_key:
            keys.add(experiment.scale_key)
        keys |= set(experiment.common)
        for overrides in experiment.scales.values():
            keys |= set(overrides)
        for variant in experiment.variants:
            keys |= set(variant.overrides)
    return sorted(keys)


def _subset(config: dict, keys: list[str]) -> dict:
    out: dict = {}
    for dotted in keys:
        node, parts = config, dotted.split(".")
        for part in parts:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            continue
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = node
    return out


def summarize(spec: Spec, runs: list[SweepRun], results: str | Path) -> list[dict]:
    """One record per finished run (in plan order): status, loss, derived values, last monitors, the config
    values of :func:`config_keys`, and the sha256 of each result file."""
    results = Path(results)
    collected = collect(spec, results, runs)
    keys = config_keys(spec)
    records = []
    for run in runs:
        result = collected[run.key]
        if result.status == "pending":
            continue
        folder = run_dir(results, run)
        records.append({
            "key": run.key, "status": result.status, "val_loss": result.val_loss, "wall_s": result.wall_s,
            "lr": result.lr, "flops": result.flops, "tokens": result.tokens, "num_params": result.num_params,
            "batch_tokens": result.batch_tokens,
            "monitors": {k: v for k, v in result.monitors.items() if "/" not in k},  # model-wide, not per layer
            "config": _subset(result.config, keys), "overrides": run.overrides,
            "files": {str(p.relative_to(folder)): _sha256(p.read_bytes()) for p in run_files(folder)},
        })
    return records


def write_summary(spec: Spec, runs: list[SweepRun], results: str | Path, out_dir: str | Path) -> Path:
    path = Path(out_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, sort_keys=True) for record in summarize(spec, runs, results)]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_archive(runs: list[SweepRun], results: str | Path, archive: str | Path) -> dict:
    """A reproducible tar.gz of the finished runs' result files (``runs/<key>/...``); returns its manifest."""
    results, archive = Path(results), Path(archive)
    buffer = io.BytesIO()
    members = 0
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for run in sorted(runs, key=lambda r: r.key):
            folder = run_dir(results, run)
            if not is_finished(folder):
                continue
            for path in run_files(folder):
                data = path.read_bytes()
                info = tarfile.TarInfo(f"runs/{run.key}/{path.relative_to(folder)}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
                members += 1
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, filename="") as gz:
        gz.write(buffer.getvalue())
    data = compressed.getvalue()
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(data)
    return {"archive": archive.name, "sha256": _sha256(data), "bytes": len(data), "files": members,
            "runs": sum(is_finished(run_dir(results, r)) for r in runs)}


def verify_archive(archive: str | Path, manifest: dict) -> None:
    """ValueError when ``archive`` is not the one ``manifest`` describes."""
    data = Path(archive).read_bytes()
    if _sha256(data) != manifest["sha256"]:
        raise ValueError(f"{archive}: sha256 differs from the manifest's ({manifest['sha256'][:12]}...): "
                         "not the archive the summary was made from")
