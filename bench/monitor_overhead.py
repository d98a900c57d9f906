"""Throughput cost of the stability monitors: monitor.interval 0 vs 10, side by side in one process.

Usage (from the repository root; one process, or under torchrun for a parallel layout)::

    python bench/monitor_overhead.py                                   # configs/cpu_ladder/d4.yaml
    python bench/monitor_overhead.py --config configs/tiny.yaml --parallel.tensor 1 --pairs 6
    torchrun --nproc-per-node 2 bench/monitor_overhead.py --config configs/tiny.yaml

One model and optimizer are built once (``train.setup``) and trained by ``StepRunner.train_step`` exactly
as the training loop calls it. Blocks of ``interval`` steps alternate between the two settings (ABBA
order, so slow drifts of a shared machine cancel): 'off' runs every step without the monitor
(interval 0), 'on' runs the monitor on the block's last step (interval 10: one step in ten). Reported:

- ``overhead_pct``: ratio of the summed 'on' and 'off' block times, minus 1 (what interval 10 costs);
- ``overhead_pct_median_pairs``: the median of the per-pair ratios (robust to one disturbed block);
- ``overhead_pct_from_step_cost``: (median monitor-step time - median plain-step time) /
  (interval * median plain-step time), the lowest-noise estimate on a loaded machine;
- ``overhead_pct_within_blocks``: the same from each 'on' block alone (its monitor step against the
  median of its 9 plain steps; median over blocks), insensitive to slow load changes.

Writes ``bench/results/monitor_overhead.json`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore")

from common import LoadSampler, git_sha, repo_relative  # noqa: E402

INTERVAL = 10


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs/cpu_ladder/d4.yaml"))
    parser.add_argument("--pairs", type=int, default=8, help="(off, on) block pairs, interleaved")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--out", default=str(REPO / "bench/results/monitor_overhead.json"))
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def build(config_path: str, overrides: list[str], steps: int):
    import torch

    from hyperp_megatron.compat import apply_patches
    from hyperp_megatron.config import load_config, validate
    from hyperp_megatron.monitors import StabilityMonitor
    from hyperp_megatron.parallel import decide_device, discover_launch_env, init_process_group
    from hyperp_megatron.train import _train_iterator, setup

    env = discover_launch_env(os.environ)
    cfg = load_config(config_path, overrides + ["--logging.run_dir", "/tmp/monitor_overhead",
                                                "--logging.tensorboard", "false", "--train.steps", str(steps),
                                                "--monitor.interval", str(INTERVAL)])
    validate(cfg, env.world_size)
    device = decide_device(cfg.parallel, env.local_rank)
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // env.local_world_size))
    apply_patches(device)
    init_process_group(env, cfg.parallel, device)
    session = setup(cfg, env.world_size, env.rank, device)
    for group in session.optimizer.param_groups:
        group["lr"] = session.peak_lr
    monitor = StabilityMonitor(cfg.monitor, cfg.model, session.model_chunks, session.optimizer,
                               session.pg_collection)
    return env, cfg, session, _train_iterator(session, 0), monitor


def timed_block(session, iterator, monitor) -> list[float]:
    """``INTERVAL`` steps; with a monitor, on the last one (as the loop does at interval 10)."""
    import torch

    times = []
    for index in range(INTERVAL):
        started = time.perf_counter()
        session.runner.train_step(iterator, monitor if monitor is not None and index == INTERVAL - 1 else None)
        if session.device.type == "cuda":
            torch.cuda.synchronize(session.device)
        times.append(time.perf_counter() - started)
    return times


def summarize(blocks: dict[str, list[list[float]]], tokens_per_step: int) -> dict:
    off, on = blocks["off"], blocks["on"]
    pair_ratios = [sum(b) / sum(a) for a, b in zip(off, on)]
    plain_steps = [t for block in off for t in block] + [t for block in on for t in block[:-1]]
    monitor_steps = [block[-1] for block in on]
    plain, monitored = statistics.median(plain_steps), statistics.median(monitor_steps)
    total_off, total_on = sum(map(sum, off)), sum(map(sum, on))
    return {
        "tokens_per_s_off": tokens_per_step * INTERVAL * len(off) / total_off,
        "tokens_per_s_on": tokens_per_step * INTERVAL * len(on) / total_on,
        "overhead_pct": 100 * (total_on / total_off - 1),
        "overhead_pct_median_pairs": 100 * (statistics.median(pair_ratios) - 1),
        "median_plain_step_s": plain,
        "median_monitor_step_s": monitored,
        "overhead_pct_from_step_cost": 100 * (monitored - plain) / (INTERVAL * plain),
        "overhead_pct_within_blocks": 100 * (statistics.median(
            block[-1] / statistics.median(block[:-1]) for block in on) - 1) / INTERVAL,
    }


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    steps = args.warmup + 2 * args.pairs * INTERVAL
    env, cfg, session, iterator, monitor = build(args.config, overrides, steps)
    for _ in range(args.warmup):
        session.runner.train_step(iterator)
    blocks: dict[str, list[list[float]]] = {"off": [], "on": []}
    load_before = os.getloadavg()
    with LoadSampler() as load:
        for pair in range(args.pairs):
            order = ("off", "on") if pair % 2 == 0 else ("on", "off")  # ABBA: drifts cancel
            for arm in order:
                blocks[arm].append(timed_block(session, iterator, monitor if arm == "on" else None))
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    summary = summarize(blocks, tokens_per_step)
    if env.rank == 0:
        result = {
            "command": (f"torchrun --nproc-per-node {env.world_size} " if env.launcher == "torchrun" else "python ")
                       + "bench/monitor_overhead.py " + " ".join(sys.argv[1:]),
            "config": repo_relative(args.config), "overrides": overrides, "world_size": env.world_size, "interval": INTERVAL,
            "pairs": args.pairs, "tokens_per_step": tokens_per_step, "monitor": vars(cfg.monitor),
            "git_sha": git_sha(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": _threads(),
                        "load_average_before": load_before, "load_average_after": os.getloadavg()},
            "load": load.summary(),
            "direct_measurements": ["overhead_pct (summed block times)", "overhead_pct_median_pairs"],
            "estimates": ["overhead_pct_from_step_cost", "overhead_pct_within_blocks"],
            "summary": summary, "block_seconds": blocks,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(summary, indent=1))
    from hyperp_megatron.parallel import destroy

    destroy()
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
