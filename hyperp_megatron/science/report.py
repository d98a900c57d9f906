"""REPORT.md, claims.json and the plots from a sweep's (possibly partial) results (``tools/fit_transfer.py``)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hyperp_megatron.science import claims as C
from hyperp_megatron.science.ladders import actual_ladder_of, ladder_of
from hyperp_megatron.science.results import collect, completeness, experiment_rows
from hyperp_megatron.science.sweep import Spec, plan

CLAIM_ORDER = ("transfer", "token_law", "depth_mup", "weight_decay", "sqrt_gate", "stability", "compute",
               "norm_transfer")
CLAIM_TITLES = {"transfer": "1. One base LR transfers across depth and width",
                "token_law": "2. The optimal LR falls with tokens as T^-0.32",
                "depth_mup": "3. Without Depth-muP the optimum drifts with depth",
                "weight_decay": "4. Weight decay changes nothing to first order on the sphere",
                "sqrt_gate": "5. SqrtGate keeps MoE output RMS and the optimal LR stable across k",
                "stability": "6. Z values, output RMS and outliers stay bounded as scale grows",
                "compute": "7. HyperP beats the Muon baseline at equal compute",
                "norm_transfer": "Issue 17. Optimal (LR, batch) pairs share one output-layer norm"}


@dataclass
class Analysis:
    spec: Spec
    results_dir: Path
    runs: list
    results: dict
    rows: dict = field(default_factory=dict)  # experiment -> rows
    sweeps: dict = field(default_factory=dict)  # experiment -> {(variant, scale): Sweep}
    verdicts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def analyze(spec: Spec, results_dir: str | Path) -> Analysis:
    runs = plan(spec)
    analysis = Analysis(spec, Path(results_dir), runs, collect(spec, results_dir, runs))
    for experiment in spec.experiments:
        rows = experiment_rows(spec, experiment.name, runs, analysis.results)
        analysis.rows[experiment.name] = rows
        analysis.sweeps[experiment.name] = C.sweeps(experiment.name, rows)
    names = {e.name for e in spec.experiments}
    rows_of = lambda *exps: [r for e in exps if e in names for r in analysis.rows[e]]  # noqa: E731
    wd = analysis.sweeps.get("weight_decay", {})
    noise = C.noise_of(wd.get(("wd0", "base")))
    analysis.notes.append(f"seed noise of the final validation loss at the base point: "
                          f"{'n/a' if noise is None else f'{noise:.4f} nats (median sd over LRs, 3 seeds)'}")
    v = analysis.verdicts
    if "depth" in names or "width" in names:
        parts = [C.slope_verdict("transfer", C.slope_across(ladder_of(analysis, e, "hyperp")),
                                 C._edges(ladder_of(analysis, e, "hyperp")), analysis.rows[e], flat=True,
                                 paper=C.PAPER["transfer"]) for e in ("depth", "width") if e in names]
        v["transfer"] = _combine("transfer", parts, ("depth", "width"))
    if "tokens" in names:
        ladder = actual_ladder_of(analysis, "tokens")
        v["token_law"] = _token_verdict(ladder, analysis.rows["tokens"])
    if "depth" in names:
        ladder = ladder_of(analysis, "depth", "no_depth_mup")
        v["depth_mup"] = C.slope_verdict("depth_mup", C.slope_across(ladder), C._edges(ladder),
                                         analysis.rows["depth"], flat=False, expected=-0.5, paper=C.PAPER["depth_mup"])
        v["stability"] = C.stability_verdict(ladder_of(analysis, "depth", "hyperp"), analysis.rows["depth"])
        v["compute"] = C.compute_verdict(ladder_of(analysis, "depth", "hyperp"), ladder_of(analysis, "depth", "muon"),
                                         analysis.rows["depth"], noise)
    if "weight_decay" in names:
        v["weight_decay"] = C.weight_decay_verdict(wd.get(("wd0", "base")), wd.get(("wd0.1", "base")),
                                                   analysis.rows["weight_decay"])
    if "moe" in names:
        v["sqrt_gate"] = _sqrt_gate_verdict(analysis)
    groups = {e: [s for _, s in ladder_of(analysis, e, "hyperp")] for e in ("tokens", "batch") if e in names}
    if groups:
        v["norm_transfer"] = C.norm_transfer_verdict(groups, rows_of("tokens", "batch"))
    return analysis


def _combine(claim: str, parts: list, labels) -> C.Verdict:
    verdicts = [p.verdict for p in parts]
    verdict = C.FAILS if C.FAILS in verdicts else C.HOLDS if verdicts and all(x == C.HOLDS for x in verdicts) \
        else C.OPEN
    why = "; ".join(f"{label}: {p.verdict}, {p.why}" for label, p in zip(labels, parts))
    return C.Verdict(claim, verdict, {l: p.measured for l, p in zip(labels, parts)},
                     {l: p.uncertainty for l, p in zip(labels, parts)}, C.PAPER[claim],
                     parts[0].rule if parts else "", why)


def _token_verdict(ladder, rows) -> C.Verdict:
    law = C.slope_across(ladder)
    rule = "holds if |exponent + 0.32| <= 2 sd with sd <= 0.15; does not hold if |exponent + 0.32| > 2 sd"
    if law is None:
        return C.Verdict("token_law", C.OPEN, None, None, -0.32, rule,
                         "fewer than 2 budgets fitted" + C._incomplete(rows))
    m, sd = law.slope, law.slope_sd
    verdict = C.HOLDS if abs(m + 0.32) <= 2 * sd and sd <= 0.15 else C.FAILS if abs(m + 0.32) > 2 * sd else C.OPEN
    edges = C._edges(ladder)
    why = f"exponent {m:+.3f} +- {sd:.3f} over {law.num_points} budgets"
    if edges and verdict != C.FAILS:
        verdict, why = C.OPEN, why + f"; best LR at the grid edge at {edges}"
    return C.Verdict("token_law", verdict, m, sd, -0.32, rule, why + C._incomplete(rows))


def _sqrt_gate_verdict(analysis: Analysis) -> C.Verdict:
    rows = analysis.rows["moe"]
    details, laws = {}, {}
    for gate in ("sqrt", "plain"):
        ladder = ladder_of(analysis, "moe", gate)
        laws[gate] = C.slope_across(ladder)
        rms = [(k, C.nearest_run(s).run.monitors.get("mlp_rms")) for k, s in ladder if C.nearest_run(s)]
        rms = [(k, r) for k, r in rms if r]
        from hyperp_megatron.science.fit import power_law

        details[gate] = {"optimum_lr": {s.scale: s.optimum.lr for _, s in ladder if s.optimum},
                         "mlp_rms": {f"k{int(k)}": r for k, r in rms},
                         "lr_slope": laws[gate].to_dict() if laws[gate] else None,
                         "rms_slope": (power_law([k for k, _ in rms], [r for _, r in rms]).slope
                                       if len(rms) >= 2 else None)}
    gamma = {}
    for (_, scale), sweep in analysis.sweeps.get("moe_gamma", {}).items():
        for row in sweep.rows:
            if row.run.finite:
                gamma[scale] = {"val_loss": row.run.val_loss, "maxvio": row.run.monitors.get("maxvio"),
                                "maxvio_step": row.run.monitors.get("maxvio_step"),
                                "aux_loss": row.run.monitors.get("train_aux_loss")}
    details["aux_loss_gamma"] = gamma
    sqrt_lr, sqrt_rms, plain_rms = laws["sqrt"], details["sqrt"]["rms_slope"], details["plain"]["rms_slope"]
    rule = ("holds if SqrtGate's optimal-LR slope in k is flat (|slope| <= max(2 sd, 0.1)) and its branch-RMS "
            "slope is within +-0.15 and above the plain gate's; does not hold if either SqrtGate slope is "
            "clearly non-flat (LR |slope| >= 0.25 beyond 2 sd, or RMS slope <= the plain gate's)")
    if sqrt_lr is None or sqrt_rms is None:
        return C.Verdict("sqrt_gate", C.OPEN, None, None, C.PAPER["sqrt_gate"], rule,
                         "too few granularities fitted" + C._incomplete(rows), details)
    lr_flat = abs(sqrt_lr.slope) <= max(2 * sqrt_lr.slope_sd, 0.1)
    lr_bad = abs(sqrt_lr.slope) >= 0.25 and abs(sqrt_lr.slope) > 2 * sqrt_lr.slope_sd
    rms_flat = abs(sqrt_rms) <= 0.15 and (plain_rms is None or sqrt_rms > plain_rms)
    rms_bad = plain_rms is not None and sqrt_rms <= plain_rms
    verdict = C.HOLDS if lr_flat and rms_flat else C.FAILS if lr_bad or rms_bad else C.OPEN
    why = (f"SqrtGate: optimal-LR slope {sqrt_lr.slope:+.3f} +- {sqrt_lr.slope_sd:.3f}, branch-RMS slope "
           f"{sqrt_rms:+.3f}; plain gate: RMS slope {plain_rms if plain_rms is None else f'{plain_rms:+.3f}'}"
           + (f", LR slope {laws['plain'].slope:+.3f} +- {laws['plain'].slope_sd:.3f}" if laws["plain"] else ""))
    edges = C._edges(ladder_of(analysis, "moe", "sqrt"))
    if edges and verdict == C.HOLDS:
        verdict, why = C.OPEN, why + f"; best LR at the grid edge at {edges}"
    return C.Verdict("sqrt_gate", verdict, {"lr_slope": sqrt_lr.slope, "rms_slope": sqrt_rms},
                     {"lr_slope_sd": sqrt_lr.slope_sd}, C.PAPER["sqrt_gate"], rule, why + C._incomplete(rows), details)


# ----------------------------------------------------------------------------------------------
# Outputs


def claims_json(analysis: Analysis) -> dict:
    out = {}
    for claim in CLAIM_ORDER:
        if claim in analysis.verdicts:
            verdict = analysis.verdicts[claim]
            out[claim] = {"title": CLAIM_TITLES[claim], "measured": verdict.measured,
                          "uncertainty": verdict.uncertainty, "paper": verdict.paper, "verdict": verdict.verdict,
                          "why": verdict.why, "rule": verdict.rule, "details": verdict.details}
    finished = sum(r.status in ("done", "diverged") for r in analysis.results.values())
    return {"generated": time.strftime("%Y-%m-%d %H:%M:%S"), "runs_finished": finished,
            "runs_planned": len(analysis.results), "claims": out}


def optima_table(analysis: Analysis) -> list[dict]:
    rows = []
    for experiment, by_key in analysis.sweeps.items():
        for (variant, scale), sweep in by_key.items():
            finished, total = completeness(sweep.rows)
            o = sweep.optimum
            rows.append({"experiment": experiment, "variant": variant, "scale": scale, "runs": f"{finished}/{total}",
                         "lr_opt": o.lr if o else None, "lr_band": (o.lr_low, o.lr_high) if o else None,
                         "loss_opt": o.loss if o else None, "method": o.method if o else sweep.error,
                         "seeds": o.num_seeds if o else None, "at_edge": o.at_edge if o else None})
    return rows


def write(analysis: Analysis, out_dir: str | Path, commands: dict) -> Path:
    """REPORT.md, claims.json, optima.json and the PNGs into ``out_dir``; returns the report's path."""
    from hyperp_megatron.science import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plots.write_all(analysis, out_dir)
    claims = claims_json(analysis)
    (out_dir / "claims.json").write_text(json.dumps(claims, indent=1, default=_json_default))
    table = optima_table(analysis)
    (out_dir / "optima.json").write_text(json.dumps(table, indent=1, default=_json_default))
    report = out_dir / "REPORT.md"
    report.write_text(_markdown(analysis, claims, table, figures, commands))
    return report


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _markdown(analysis: Analysis, claims: dict, table: list[dict], figures: dict, commands: dict) -> str:
    spec = analysis.spec
    lines = ["# HyperP's claims at the scale of two CPU cores", "",
             f"Generated {claims['generated']} from {claims['runs_finished']} of {claims['runs_planned']} planned "
             f"runs (`{spec.path}`; base config `{spec.base_config}`). Every number below comes from the run folders "
             "by `tools/fit_transfer.py`; a partial sweep gives a partial report (each verdict names missing runs).",
             "", "## Verdicts", "", "| claim | measured | uncertainty | paper | verdict |", "|---|---|---|---|---|"]
    for claim, body in claims["claims"].items():
        lines.append(f"| {body['title']} | {_fmt(body['measured'])} | {_fmt(body['uncertainty'])} | "
                     f"{_fmt(body['paper'])} | **{body['verdict']}** |")
    lines += ["", "## How it was run", "", "```bash", *[f"{cmd}  # {what}" for what, cmd in commands.items()],
              "```", "",
              "Setup: " + "; ".join(analysis.notes), "",
              "Experiments (each run: the base config plus these overrides; grids of base LRs "
              "`center * factor^k`):", ""]
    for experiment in spec.experiments:
        variants = ", ".join(f"{v.name} (grid {v.lr_grid.values()[0]:g}..{v.lr_grid.values()[-1]:g}, "
                             f"{v.lr_grid.points} points{', ' + str(v.overrides) if v.overrides else ''})"
                             for v in experiment.variants)
        scales = ", ".join(f"{name} {o or '(base)'}" for name, o in experiment.scales.items())
        lines.append(f"- **{experiment.name}** (claims {', '.join(experiment.claims)}; seeds "
                     f"{list(experiment.seeds)}{'; common ' + str(experiment.common) if experiment.common else ''}): "
                     f"scales {scales}; variants {variants}")
    for claim, body in claims["claims"].items():
        lines += ["", f"## {body['title']}", "", f"**{body['verdict']}**: {body['why']}", "",
                  f"Rule: {body['rule']}.", ""]
        for name in figures.get(claim, []):
            lines.append(f"![{name}]({name})")
        if body.get("details"):
            lines += ["", "<details><summary>details</summary>", "", "```json",
                      json.dumps(body["details"], indent=1, default=_json_default)[:6000], "```", "</details>"]
    lines += ["", "## Every fitted optimum", "",
              "| experiment | variant | scale | runs | base LR* (1 sd band) | loss at LR* | fit | seeds "
              "| at grid edge |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        band = row["lr_band"]
        lines.append(f"| {row['experiment']} | {row['variant']} | {row['scale']} | {row['runs']} | "
                     f"{_fmt(row['lr_opt'])} ({_fmt(band[0]) if band else '-'}-{_fmt(band[1]) if band else '-'}) | "
                     f"{_fmt(row['loss_opt'])} | {row['method']} | {_fmt(row['seeds'])} | {_fmt(row['at_edge'])} |")
    lines += ["", "Fits: quadratic in log(LR) over the 5 grid points around the best one (argmin kept inside them); "
              "uncertainty = bootstrap over seeds (3 seeds) or leave-one-out over the points (1 seed). Slopes: "
              "weighted least squares in log-log, errors scaled by the reduced chi-square when above 1.", ""]
    return "\n".join(lines)
