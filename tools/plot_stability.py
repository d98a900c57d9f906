"""Plot the stability indicators (docs/method.md section 5) of one or several runs against steps and FLOPs.

Usage:
    python tools/plot_stability.py runs/cpu_ladder/d2 runs/cpu_ladder/d4 runs/cpu_ladder/d8
    python tools/plot_stability.py runs/a runs/b --labels "eta 0.01,eta 0.02" --out-dir plots/ --layers

Reads each run directory's ``metrics.jsonl`` (the ``monitor/*`` records the trainer logs every
``monitor.interval`` steps, plus ``grad_norm``, ``lr`` and ``aux_loss``) and writes two PNGs, as the
paper draws them: one panel per indicator (layer average; ``--layers`` adds every layer as thin lines),
runs overlaid in one colour each,

    stability_steps.png   against the optimizer step;
    stability_flops.png   against training FLOPs (log x): step * flops_per_token * batch tokens, from
                          ``hyperp_megatron.derived.derive`` on the run's ``config.yaml`` and
                          ``run_info.json`` (world size).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LOG_Y = ("grad norm (pre-clip)",)
PANELS = (  # (title, metric keys; a trailing '*' matches a prefix)
    ("attention Z", ("monitor/attn_z",)),
    ("router Z", ("monitor/router_z",)),
    ("attention output RMS", ("monitor/attn_rms",)),
    ("MLP / MoE output RMS", ("monitor/mlp_rms",)),
    ("attention outliers (%)", ("monitor/attn_outlier_pct",)),
    ("MLP / MoE outliers (%)", ("monitor/mlp_outlier_pct",)),
    ("MoE MaxVio", ("monitor/maxvio",)),
    ("grad norm (pre-clip)", ("grad_norm", "monitor/grad_norm_matrix", "monitor/grad_norm_other")),
    ("learning rate", ("monitor/lr/*",)),
    ("aux loss", ("aux_loss",)),
    ("sphere radius drift", ("monitor/sphere_radius_drift",)),
    ("skipped steps", ("skipped_steps",)),
)
LINE_STYLES = ("-", "--", ":", "-.")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: pass a run directory written by the trainer")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flops_per_step(run_dir: Path, vocab_size: int | None) -> float:
    """Training FLOPs of one optimizer step of the run (F/token x B): from its ``derived.json``, else derived
    from its config (``derived.derive``; runs written before derived.json existed)."""
    from hyperp_megatron.config import load_config
    from hyperp_megatron.derived import derive, read_derived

    recorded = read_derived(run_dir)
    if recorded is not None and vocab_size is None:
        return recorded["flops_per_token"] * recorded["batch_tokens"]
    config, info = run_dir / "config.yaml", run_dir / "run_info.json"
    if not config.is_file():
        raise ValueError(f"{config} not found: the FLOPs axis needs the run's resolved config")
    world_size = json.loads(info.read_text()).get("world_size", 1) if info.is_file() else 1
    try:
        derived = derive(load_config(config), world_size, vocab_size=vocab_size)
    except ValueError as exc:
        raise ValueError(f"{run_dir}: {exc} (pass --vocab-size)") from None
    return derived.flops_per_token * derived.batch_tokens


def matching_keys(records: list[dict], pattern: str, layers: bool) -> list[str]:
    keys = sorted({key for record in records for key in record})
    if pattern.endswith("*"):
        return [key for key in keys if key.startswith(pattern[:-1])]
    found = [pattern] if pattern in keys else []
    if layers:
        found += [key for key in keys if key.startswith(pattern + "/layer")]
    return found


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r["step"] > 0]
    return [p[0] for p in points], [p[1] for p in points]


def plot(runs: list[tuple[str, list[dict], float]], x_axis: str, out: Path, layers: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, keys) for title, keys in PANELS
              if any(matching_keys(records, k, False) for _, records, _ in runs for k in keys)]
    if not panels:
        raise ValueError("no indicator found in the runs' metrics.jsonl (is monitor.interval > 0?)")
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, patterns) in zip(axes.flat, panels):
        for run_index, (label, records, step_flops) in enumerate(runs):
            color = colors[run_index % len(colors)]
            averages = [k for p in patterns for k in matching_keys(records, p, False)]
            for style_index, key in enumerate(averages):
                steps, values = series(records, key)
                xs = [s * step_flops for s in steps] if x_axis == "flops" else steps
                name = label if len(averages) == 1 else f"{label}: {key.split('/', 1)[-1]}"
                ax.plot(xs, values, LINE_STYLES[style_index % len(LINE_STYLES)], color=color, label=name)
            for key in [k for p in patterns for k in matching_keys(records, p, layers) if "/layer" in k]:
                steps, values = series(records, key)
                xs = [s * step_flops for s in steps] if x_axis == "flops" else steps
                ax.plot(xs, values, "-", color=color, alpha=0.25, linewidth=0.7)
        ax.set_title(title)
        ax.set_xlabel("training FLOPs" if x_axis == "flops" else "step")
        if x_axis == "flops":
            ax.set_xscale("log")
        if title in LOG_Y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--labels", help="comma-separated, one per run (default: directory names)")
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    parser.add_argument("--layers", action="store_true", help="also draw every layer (thin lines)")
    parser.add_argument("--vocab-size", type=int, help="for runs whose config leaves model.vocab_size unset "
                                                       "with their own tokenizer")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [d.name for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        parser.error(f"--labels has {len(labels)} entries for {len(args.run_dirs)} runs")
    try:
        runs = [(label, read_metrics(d), flops_per_step(d, args.vocab_size)) for label, d in zip(labels, args.run_dirs)]
        for x_axis in ("steps", "flops"):
            plot(runs, x_axis, args.out_dir / f"stability_{x_axis}.png", args.layers)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir / 'stability_steps.png'} and {args.out_dir / 'stability_flops.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
