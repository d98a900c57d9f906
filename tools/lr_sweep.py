"""LR sweeps over scale ladders: plan, run locally a few processes at a time, or one run per SLURM array task.

    python tools/lr_sweep.py plan --spec sweeps/science.yaml            # runs, FLOPs, estimate
    python tools/lr_sweep.py run  --spec sweeps/science.yaml --results /work/science/results --jobs 2
    python tools/lr_sweep.py run-one --spec ... --results ... --index $SLURM_ARRAY_TASK_ID   # launch/sweep_array.sbatch
    python tools/lr_sweep.py status --spec ... --results ...

Resumable: a run that finished (done, or diverged: a result) is never redone; rerunning the same command
continues with the rest (failed and interrupted runs start over). Each run's folder
``<results>/runs/<key>`` holds the resolved config, metrics.jsonl, final.json, train.log and status.json; no
checkpoints unless --save-checkpoints. Then: python tools/fit_transfer.py --spec ... --results ...
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

# megatron-core warns at import about every optional GPU package it lacks (the corpus preparation imports it)
warnings.filterwarnings("ignore", module=r"megatron\..*")
warnings.filterwarnings("ignore", category=UserWarning, message=r".*(Apex|Transformer Engine|apex).*")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hyperp_megatron.science import sweep  # noqa: E402

SECONDS_PER_GFLOP = 0.035
"""Measured on the development machine (one idle core, the base model): the plan's time estimate."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("plan", "run", "run-one", "status"))
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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = sweep.load_spec(args.spec)
        runs = sweep.plan(spec, [s for s in args.only.split(",") if s] or None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = Path(args.results)
    shared = Path(args.data_cache) if args.data_cache else results / "data"
    trainer = shlex.split(args.trainer)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if args.command == "plan":
        return _plan(spec, runs)
    if args.command == "status":
        return _status(runs, results)
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


def _status(runs, results) -> int:
    counts: dict[str, int] = {}
    for run in runs:
        status = sweep.read_status(sweep.run_dir(results, run))
        state = status["status"] if status else "pending"
        counts[state] = counts.get(state, 0) + 1
    print(json.dumps({"runs": len(runs), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
