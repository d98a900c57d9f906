"""Cost of the operator-norm monitors (issue 17) at the default monitor interval, as a share of step time.

Usage (from the repository root; one process, or under torchrun for a parallel layout)::

    python bench/operator_norm_overhead.py --train.threads 1                        # configs/cpu_ladder/d4.yaml
    torchrun --nproc-per-node 2 bench/operator_norm_overhead.py --parallel.tensor 2

One model and optimizer are built once (``train.setup``, as ``bench/monitor_overhead.py``). Timed
alternately, ``--reps`` times each: one plain training step, and ``OperatorNormMonitor.records()`` in the
modes 'output' (the default: the output layer's RMS->inf and RMS->RMS norms, power iteration warm-started)
and 'all' (also every hidden matrix). The share of step time at interval N is
``median(records time) / (N * median(step time))``; medians of interleaved samples are insensitive to a
shared machine's load swings (the norms are a few matrix-vector products, far below the noise of whole
blocks of steps). Writes ``bench/results/operator_norm_overhead.json`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from common import repo_relative  # noqa: E402
from monitor_overhead import build  # the same session set-up


def main(argv=None) -> int:
    import torch

    from hyperp_megatron.operator_norms import OperatorNormMonitor

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs/cpu_ladder/d4.yaml"))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "bench/results/operator_norm_overhead.json"))
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    env, cfg, session, iterator, _ = build(args.config, overrides, steps=args.reps + 3)
    monitors = {mode: OperatorNormMonitor(mode, cfg.monitor.power_iterations, session.model_chunks,
                                          session.optimizer, session.pg_collection) for mode in ("output", "all")}
    device = next(session.model_chunks[0].parameters()).device
    for _ in range(2):
        session.runner.train_step(iterator)
    for monitor in monitors.values():
        monitor.records()  # the cold start (5x iterations) happens once per run
    samples: dict[str, list[float]] = {"step": [], "output": [], "all": []}
    records = {}
    for _ in range(args.reps):
        for name in samples:
            started = time.perf_counter()
            if name == "step":
                session.runner.train_step(iterator)
            else:
                records[name] = monitors[name].records()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - started)
    step = statistics.median(samples["step"])
    interval = cfg.monitor.interval
    summary = {"median_step_s": step, "monitor_interval": interval}
    for mode in ("output", "all"):
        cost = statistics.median(samples[mode])
        summary[f"median_{mode}_s"] = cost
        summary[f"overhead_pct_{mode}_at_interval"] = 100 * cost / (interval * step)
    if env.rank == 0:
        result = {
            "command": (f"torchrun --nproc-per-node {env.world_size} " if env.launcher == "torchrun" else "python ")
                       + "bench/operator_norm_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "config": repo_relative(args.config), "overrides": overrides, "world_size": env.world_size, "reps": args.reps,
            "power_iterations": cfg.monitor.power_iterations, "machine_cpus": os.cpu_count(),
            "load_average_after": os.getloadavg(), "summary": summary, "last_records": records,
            "samples_s": samples,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(summary, indent=1))
    from hyperp_megatron.parallel import destroy

    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
