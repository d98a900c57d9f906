"""The report's figures, in the paper's style: loss against LR per scale with the fitted optimum starred,
optima against scale on log axes with the fitted power law, loss against FLOPs with the fitted laws,
indicators against FLOPs, and the output-layer norm against LR (issue 17)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hyperp_megatron.science import claims as C
from hyperp_megatron.science.ladders import actual_ladder_of, ladder_of


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sweep_panel(ax, ladder, title: str, xlabel: str = "base LR") -> None:
    colors = _colors(len(ladder))
    for color, (coordinate, sweep) in zip(colors, ladder):
        if not sweep.points:
            continue
        lrs = sorted(sweep.points)
        means = [np.mean(sweep.points[lr]) for lr in lrs]
        sds = [np.std(sweep.points[lr]) if len(sweep.points[lr]) > 1 else 0 for lr in lrs]
        ax.errorbar(lrs, means, yerr=sds, marker="o", ms=3, color=color, label=sweep.scale, lw=1)
        o = sweep.optimum
        if o is not None:
            if o.method != "best-point":
                xs = np.linspace(math.log(o.window[0]), math.log(o.window[1]), 50)
                ax.plot(np.exp(xs), np.polyval(o.coefficients, xs), color=color, lw=0.8, ls="--")
            ax.plot([o.lr], [o.loss], marker="*", ms=12, color=color, mec="black", mew=0.5)
    log_axis(ax, "x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation loss")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _clip_y(ax, ladder)


def _clip_y(ax, ladder) -> None:
    """Keep the minima readable: cut off only far outliers (diverging LRs) above the bulk of the points."""
    values = [float(np.mean(losses)) for _, s in ladder for losses in s.points.values()]
    if len(values) >= 3:
        low = min(values)
        high = min(max(values), low + 4 * (float(np.median(values)) - low) + 0.01)
        margin = 0.05 * (high - low + 1e-3)
        ax.set_ylim(low - margin, high + margin)


def log_axis(ax, axis: str = "x") -> None:
    """A readable log axis: log scale, ticks at 1-2-5 of every decade labelled with plain numbers (a range
    inside one decade, like an LR grid 0.035-0.28, still gets several labels), unlabelled minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    target.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    target.set_minor_formatter(NullFormatter())


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]


def _optima_panel(ax, ladders: dict, xlabel: str, reference_slope: float | None = None) -> None:
    for (label, ladder), marker in zip(ladders.items(), "osD^v"):
        pts = [(x, s.optimum) for x, s in ladder if s.optimum is not None]
        if not pts:
            continue
        xs = np.array([x for x, _ in pts])
        ys = np.array([o.lr for _, o in pts])
        err = np.array([[o.lr - o.lr_low for _, o in pts], [o.lr_high - o.lr for _, o in pts]])
        line = ax.errorbar(xs, ys, yerr=err, marker=marker, ls="none", label=label, capsize=2)
        law = C.slope_across(ladder)
        if law is not None:
            grid = np.geomspace(xs.min(), xs.max(), 20)
            ax.plot(grid, law(grid), color=line[0].get_color(), lw=1,
                    label=f"{label}: slope {law.slope:+.2f} +- {law.slope_sd:.2f}")
        if reference_slope is not None and law is not None:
            anchor = np.exp(np.mean(np.log(ys)))
            grid = np.geomspace(xs.min(), xs.max(), 20)
            ref = anchor * (grid / np.exp(np.mean(np.log(xs)))) ** reference_slope
            ax.plot(grid, ref, color="gray", ls=":", label=f"paper slope {reference_slope:+.2f}")
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("optimal LR")
    ax.legend(fontsize=7)


def _save(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    _plt().close(fig)
    return name


def write_all(analysis, out_dir: Path) -> dict[str, list[str]]:
    """Every figure the results allow; returns claim -> file names."""

    plt = _plt()
    names = {e.name for e in analysis.spec.experiments}
    figures: dict[str, list[str]] = {}

    def add(claims, name):
        for claim in claims:
            figures.setdefault(claim, []).append(name)

    if "depth" in names:
        variants = [v.name for v in analysis.spec.experiment("depth").variants]
        fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.6), squeeze=False)
        for ax, variant in zip(axes[0], variants):
            _sweep_panel(ax, ladder_of(analysis, "depth", variant), f"depth ladder: {variant}")
        add(["transfer", "depth_mup", "compute"], _save(fig, out_dir, "depth_lr.png"))
        ladders = {v: ladder_of(analysis, "depth", v) for v in variants if v != "muon"}
        fig, ax = plt.subplots(figsize=(4.6, 3.6))
        _optima_panel(ax, ladders, "depth d (C = 16 d)")
        add(["transfer", "depth_mup"], _save(fig, out_dir, "depth_optimum.png"))
        _stability_figure(analysis, out_dir, add, plt)
        _compute_figure(analysis, out_dir, add, plt)
    if "width" in names:
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
        ladder = ladder_of(analysis, "width", "hyperp")
        _sweep_panel(axes[0], ladder, "width ladder (d = 4)")
        _optima_panel(axes[1], {"hyperp": ladder}, "width C")
        add(["transfer"], _save(fig, out_dir, "width_lr.png"))
    if "tokens" in names:
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
        ladder = actual_ladder_of(analysis, "tokens")
        _sweep_panel(axes[0], ladder, "token budgets", xlabel="peak LR")
        _optima_panel(axes[1], {"hyperp": ladder}, "training tokens", reference_slope=C.PAPER_TOKEN_EXPONENT)
        add(["token_law"], _save(fig, out_dir, "tokens_lr.png"))
    if "weight_decay" in names:
        fig, ax = plt.subplots(figsize=(4.6, 3.6))
        _sweep_panel(ax, [(i, s) for i, (_, s) in enumerate(sorted(analysis.sweeps["weight_decay"].items()))],
                     "weight decay on the sphere (3 seeds, mean +- sd)")
        add(["weight_decay"], _save(fig, out_dir, "weight_decay.png"))
    _ladder_pair_figure(analysis, out_dir, add, plt,
                        [("width", "hyperp", "width, output std 0.02"),
                         ("width_capacity", "hyperp", "width, constant capacity")],
                        ["capacity", "transfer"], "capacity_width.png", "width C")
    _ladder_pair_figure(analysis, out_dir, add, plt,
                        [("depth_fixed_width", "hyperp", "depth at C64: Depth-muP"),
                         ("depth_fixed_width", "no_depth_mup", "depth at C64: no Depth-muP")],
                        ["transfer", "depth_mup"], "depth_fixed_width.png", "depth d (C = 64)")
    _ladder_pair_figure(analysis, out_dir, add, plt, [("tokens_capacity", "hyperp", "tokens, constant capacity")],
                        ["token_law"], "tokens_capacity.png", "training tokens", x="actual")
    if "muon_fair" in names:
        fig, ax = plt.subplots(figsize=(4.6, 3.6))
        _sweep_panel(ax, ladder_of(analysis, "muon_fair", "muon"), "fair Muon baseline (wd 0)")
        add(["compute"], _save(fig, out_dir, "muon_fair_lr.png"))
    if "moe" in names:
        _moe_figures(analysis, out_dir, add, plt)
    if "tokens" in names or "batch" in names:
        _norm_figure(analysis, out_dir, add, plt, [e for e in ("tokens", "batch") if e in names])
    return figures


def _stability_figure(analysis, out_dir, add, plt) -> None:
    verdict = analysis.verdicts.get("stability")
    if verdict is None or not verdict.details.get("values"):
        return
    flops = verdict.details["flops"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    groups = {"attention Z": ["attn_z"], "branch output RMS": ["attn_rms", "mlp_rms"],
              "outliers (%)": ["attn_outlier_pct", "mlp_outlier_pct"]}
    for ax, (title, keys) in zip(axes, groups.items()):
        for key in keys:
            values = verdict.details["values"].get(key, {})
            pts = sorted((flops[s], v) for s, v in values.items() if v is not None and s in flops)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        log_axis(ax, "x")
        ax.set_xlabel("training FLOPs")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    add(["stability"], _save(fig, out_dir, "stability.png"))


def _compute_figure(analysis, out_dir, add, plt) -> None:
    verdict = analysis.verdicts.get("compute")
    if verdict is None or not verdict.details.get("hyperp"):
        return
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    curves = {"hyperp": verdict.details["hyperp"]}
    for label, details in (verdict.details.get("baselines") or {}).items():
        if details.get("muon"):
            curves[label] = details["muon"]
    for (label, pts), marker in zip(curves.items(), "osD^"):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, lw=1, label=label)  # interpolated curve
    log_axis(ax, "x")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("best final validation loss")
    ax.set_title("best loss per scale (lines: the interpolation compared)", fontsize=9)
    ax.legend(fontsize=6)
    add(["compute"], _save(fig, out_dir, "loss_vs_flops.png"))


def _ladder_pair_figure(analysis, out_dir, add, plt, pairs, claims, name, xlabel, x="base") -> None:
    """Sweeps of each ladder in ``pairs`` ((experiment, variant, title)), then their optima on one panel."""
    from hyperp_megatron.science.ladders import actual_ladder_of

    names = {e.name for e in analysis.spec.experiments}
    pairs = [p for p in pairs if p[0] in names]
    if not pairs:
        return
    ladders = {title: (actual_ladder_of(analysis, e) if x == "actual" else ladder_of(analysis, e, v))
               for e, v, title in pairs}
    fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(4.2 * (len(pairs) + 1), 3.6), squeeze=False)
    for ax, (title, ladder) in zip(axes[0], ladders.items()):
        _sweep_panel(ax, ladder, title, xlabel="peak LR" if x == "actual" else "base LR")
    _optima_panel(axes[0][-1], ladders, xlabel,
                  reference_slope=C.PAPER_TOKEN_EXPONENT if "token_law" in claims else None)
    add(claims, _save(fig, out_dir, name))


def _moe_figures(analysis, out_dir, add, plt) -> None:

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
    ladders = {gate: ladder_of(analysis, "moe", gate) for gate in ("sqrt", "plain")}
    for ax, (gate, ladder) in zip(axes, ladders.items()):
        _sweep_panel(ax, ladder, f"MoE granularity k: {gate} gate")
    add(["sqrt_gate"], _save(fig, out_dir, "moe_lr.png"))
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
    _optima_panel(axes[0], ladders, "granularity k")
    for gate, ladder in ladders.items():
        pts = [(k, C.nearest_run(s)) for k, s in ladder]
        pts = [(k, r.run.monitors.get("mlp_rms")) for k, r in pts if r is not None and r.run.monitors.get("mlp_rms")]
        if pts:
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=gate)
    log_axis(axes[1], "x")
    axes[1].set_xlabel("granularity k")
    axes[1].set_ylabel("MoE branch output RMS (final, best LR)")
    axes[1].legend(fontsize=7)
    add(["sqrt_gate"], _save(fig, out_dir, "moe_optimum_rms.png"))


def _norm_figure(analysis, out_dir, add, plt, experiments) -> None:

    fig, axes = plt.subplots(1, len(experiments), figsize=(4.4 * len(experiments), 3.6), squeeze=False)
    for ax, experiment in zip(axes[0], experiments):
        ladder = ladder_of(analysis, experiment, "hyperp")
        for color, (_, sweep) in zip(_colors(len(ladder)), ladder):
            pts = sorted((r.base_lr, r.run.monitors.get("output_rms_inf")) for r in sweep.rows
                         if r.run.finite and r.run.monitors.get("output_rms_inf"))
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=color, label=sweep.scale)
            value = C.norm_at_optimum(sweep, "output_rms_inf")
            if value is not None:
                ax.plot([sweep.optimum.lr], [value], marker="*", ms=12, color=color, mec="black", mew=0.5)
        log_axis(ax, "x")
        ax.set_xlabel("base LR")
        ax.set_ylabel("output layer RMS->inf norm (final)")
        ax.set_title(f"{experiment}: optimum starred", fontsize=9)
        ax.legend(fontsize=7)
    add(["norm_transfer"], _save(fig, out_dir, "norm_transfer.png"))
