"""LR sweeps over scale ladders and their report: ``hyperp-sweep`` and ``hyperp-fit`` (console scripts), or
``python -m hyperp_megatron.science sweep|fit ...``.

    hyperp-sweep plan --spec sweeps/science.yaml            # runs, FLOPs, estimate
    hyperp-sweep run  --spec sweeps/science.yaml --results RESULTS --jobs 2
    hyperp-sweep run-one --spec ... --results ... --index $SLURM_ARRAY_TASK_ID   # launch/sweep_array.sbatch
    hyperp-sweep status --spec ... --results ...
    hyperp-sweep archive --spec ... --results ... --out bench/results/science --archive DIR/science_runs.tar.gz
    hyperp-fit --spec sweeps/science.yaml --results RESULTS --out bench/results/science
    hyperp-fit --spec sweeps/science.yaml --results bench/results/science/runs_summary.jsonl --out DIR

The sweep is resumable: a run that finished (done, or diverged: a result) is never redone; rerunning the same
command continues with the rest (failed and interrupted runs start over). Each run's folder
``<results>/runs/<key>`` holds the resolved config, metrics.jsonl, final.json, train.log and status.json; no
checkpoints unless --save-checkpoints. ``archive`` writes the compact per-run summary the fit can read instead of
the folders (``runs_summary.jsonl``, with each file's sha256) and a reproducible tar.gz of the folders with its
manifest (``runs_archive.json``); the raw runs stay out of the repository.

The fit works on partial results (every verdict names its missing runs). Per scale: a quadratic in log(LR) of the
final validation loss, its argmin and uncertainty (bootstrap over seeds, or leave-one-out); across scales: power
laws of the optimum (depth, width, tokens, MoE granularity), loss-vs-compute laws and the HyperP / Muon compute
multiplier, the stability indicators, and the output-layer norm of the optimal runs (issue 17). It writes
REPORT.md, claims.json, optima.json and the plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from hyperp_megatron.science import report, sweep

SECONDS_PER_GFLOP = 0.035
"""Measured on the development machine (one idle core, the base model): the plan's time estimate."""


def _sweep_args(argv):
    parser = argparse.ArgumentParser(prog="hyperp-sweep", description="LR sweeps over scale ladders: plan, run "
                                     "locally a few processes at a time, or one run per SLURM array task.")
    parser.add_argument("command", choices=("plan", "run", "run-one", "status", "archive"))
    parser.add_argument("--spec", required=True, help="sweep spec YAML (sweeps/science.yaml)")
    parser.add_argument("--results", default="runs/sweep", help="results folder (one subfolder per run)")
    parser.add_argument("--only", default="", help="comma-separated experiment names (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time (run)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (run)")
    parser.add_argument("--index", type=int, default=None, help="the run to train (run-one; SLURM array index)")
    parser.add_argument("--data-cache", default=None, help="shared corpus/tokenizer cache (default RESULTS/data)")
    parser.add_argument("--trainer", default=f"{shlex.quote(sys.executable)} -m hyperp_megatron.train",
                        help="the trainer command (one process per run; prefix e.g. 'torchrun --nproc-per-node 2 -m "
                             "hyperp_megatron.train' for parallel layouts)")
    parser.add_argument("--save-checkpoints", action="store_true", help="keep each run's final checkpoint")
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads per training process")
    parser.add_argument("--out", default=None, help="folder for runs_summary.jsonl and runs_archive.json (archive)")
    parser.add_argument("--archive", default=None, help="the tar.gz of the run folders to write (archive; keep it "
                        "outside the repository)")
    return parser.parse_args(argv)


def sweep_main(argv=None) -> int:
    from hyperp_megatron.cli import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()  # the corpus preparation imports megatron-core
    args = _sweep_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = sweep.load_spec(args.spec)
        runs = sweep.plan(spec, [s for s in args.only.split(",") if s] or None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = Path(args.results)
    shared = Path(args.data_cache) if args.data_cache else results / "data"
    trainer = shlex.split(args.trainer)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    if args.command == "plan":
        return _plan(spec, runs)
    if args.command == "status":
        return _status(runs, results)
    if args.command == "archive":
        return _archive(spec, runs, results, args.out, args.archive)
    shared.mkdir(parents=True, exist_ok=True)
    if args.command == "run-one":
        if args.index is None or not 0 <= args.index < len(runs):
            print(f"error: --index must be in [0, {len(runs)}) for this spec", file=sys.stderr)
            return 2
        sweep.prepare_shared_data(spec, [runs[args.index]], shared)
        record = sweep.run_one(spec, runs[args.index], results, trainer=trainer, shared_data=shared, env=env,
                               save_checkpoints=args.save_checkpoints)
        print(json.dumps(record))
        return 0 if record["status"] in sweep.FINISHED else 1
    sweep.prepare_shared_data(spec, runs, shared)
    costs = {run.key: sweep.estimated_flops(spec, run) for run in runs}
    counts = sweep.run_local(spec, runs, results, jobs=args.jobs, trainer=trainer, shared_data=shared, env=env,
                             log=lambda line: print(line, flush=True), save_checkpoints=args.save_checkpoints,
                             costs=costs, max_runs=args.max_runs)
    print(f"[sweep] end: {json.dumps(counts)}", flush=True)
    return 0 if counts["failed"] == 0 else 1


def _plan(spec, runs) -> int:
    total = 0.0
    by_experiment: dict[str, list] = {}
    for run in runs:
        flops = sweep.estimated_flops(spec, run)
        total += flops
        by_experiment.setdefault(run.memberships[0].experiment, []).append(flops)
    for name, flops in by_experiment.items():
        print(f"{name:14s} {len(flops):4d} new runs  {sum(flops):.3g} FLOPs  "
              f"~{sum(flops) / 1e9 * SECONDS_PER_GFLOP / 3600:.2f} core-hours")
    print(f"{'total':14s} {len(runs):4d} runs      {total:.3g} FLOPs  ~{total / 1e9 * SECONDS_PER_GFLOP / 3600:.2f} "
          f"core-hours (+ ~10 s start-up per run)")
    return 0


def _archive(spec, runs, results: Path, out: str | None, archive: str | None) -> int:
    from hyperp_megatron.science import summary

    if not out or not archive:
        print("error: archive needs --out (the summary's folder) and --archive (the tar.gz to write)", file=sys.stderr)
        return 2
    if not results.is_dir():
        print(f"error: results folder not found: {results}", file=sys.stderr)
        return 2
    path = summary.write_summary(spec, runs, results, out)
    manifest = summary.write_archive(runs, results, archive)
    manifest["command"] = (f"hyperp-sweep archive --spec {spec.path} --results RESULTS --out {out} "
                           f"--archive {Path(archive).name}")
    (Path(out) / summary.ARCHIVE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {path} ({manifest['runs']} runs) and {archive} (sha256 {manifest['sha256'][:16]}...)")
    return 0


def _status(runs, results) -> int:
    counts: dict[str, int] = {}
    for run in runs:
        status = sweep.read_status(sweep.run_dir(results, run))
        state = status["status"] if status else "pending"
        counts[state] = counts.get(state, 0) + 1
    print(json.dumps({"runs": len(runs), **counts}))
    return 0


def fit_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hyperp-fit", description="Fit a sweep's results and write the report: "
                                     "REPORT.md, claims.json, optima.json and the plots.")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--results", required=True, help="the sweep's results folder, or its runs_summary.jsonl")
    parser.add_argument("--out", default="bench/results/science")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = sweep.load_spec(args.spec)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not Path(args.results).exists():
        print(f"error: results not found: {args.results} (a sweep's results folder or its runs_summary.jsonl)",
              file=sys.stderr)
        return 2
    analysis = report.analyze(spec, args.results)
    commands = {
        "the sweep (resumable)": f"hyperp-sweep run --spec {args.spec} --results {args.results} --jobs 2",
        "this report": f"hyperp-fit --spec {args.spec} --results {args.results} --out {args.out}",
    }
    path = report.write(analysis, args.out, commands)
    for claim, verdict in analysis.verdicts.items():
        print(f"{claim:14s} {verdict.verdict:14s} {verdict.why}")
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """``python -m hyperp_megatron.science sweep|fit ...``."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"sweep": sweep_main, "fit": fit_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m hyperp_megatron.science sweep|fit ... (hyperp-sweep --help, hyperp-fit --help)",
              file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
