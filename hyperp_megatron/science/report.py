"""REPORT.md, claims.json and the plots from a sweep's (possibly partial) results (``hyperp-fit``)."""

from __future__ import annotations

import dataclasses
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

CLAIM_ORDER = ("capacity", "transfer", "token_law", "depth_mup", "weight_decay", "sqrt_gate", "stability", "compute",
               "norm_transfer")
CLAIM_TITLES = {"capacity": "Mechanism. The output layer's logit capacity drives the small-width LR drift",
                "transfer": "1. One base LR transfers across depth and width",
                "token_law": f"2. The optimal LR falls with tokens as T^{C.PAPER_TOKEN_EXPONENT}",
                "depth_mup": "3. Without Depth-muP the optimum drifts with depth",
                "weight_decay": "4. Weight decay changes nothing to first order on the sphere",
                "sqrt_gate": "5. SqrtGate keeps MoE output RMS and the optimal LR stable across k",
                "stability": "6. Z values, output RMS and outliers stay bounded as scale grows",
                "compute": "7. HyperP beats the Muon baseline at equal compute",
                "norm_transfer": "Issue 17. Optimal (LR, batch) pairs share one output-layer norm"}
# (experiment, variant, label) of each ladder, the unconfounded ones (issue 24) first: a verdict is judged on
# the first ones that have 2 or more fitted scales, the others are reported beside it
WIDTH_LADDERS = (("width_capacity", "hyperp", "width at constant logit capacity"),
                 ("width", "hyperp", "width at the reference output std 0.02"))
DEPTH_LADDERS = (("depth_fixed_width", "hyperp", "depth at fixed width C64"),
                 ("depth", "hyperp", "depth with width tied to it (C = 16 d)"))
NO_DEPTH_MUP_LADDERS = (("depth_fixed_width", "no_depth_mup", "depth at fixed width C64"),
                        ("depth", "no_depth_mup", "depth with width tied to it (C = 16 d)"))
TOKEN_LADDERS = (("tokens_capacity", "hyperp", "constant-capacity base (output std 0.04)"),
                 ("tokens", "hyperp", "reference base (output std 0.02)"))
MUON_LADDERS = (("muon_fair", "muon", "fair Muon baseline (wd 0, 64x LR grid)"),
                ("depth", "muon", "reference Muon baseline (independent wd 0.1)"))
NOISE_SWEEPS = {"reference base": ("weight_decay", "wd0", "base"), "constant-capacity base": ("seeds_capacity", "hyperp", "base"),
                "Muon base": ("seeds_muon", "muon", "base")}


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
    noise: dict = field(default_factory=dict)  # label -> seed sd of the final loss at that base point


def analyze(spec: Spec, results_dir: str | Path) -> Analysis:
    """Every sweep's fit and every verdict the (possibly partial) results allow. ``results_dir``: the results
    folder or its ``runs_summary.jsonl``."""
    runs = plan(spec)
    analysis = Analysis(spec, Path(results_dir), runs, collect(spec, results_dir, runs))
    for experiment in spec.experiments:
        rows = experiment_rows(spec, experiment.name, runs, analysis.results)
        analysis.rows[experiment.name] = rows
        analysis.sweeps[experiment.name] = C.sweeps(experiment.name, rows)
    adopt_seeded_sweeps(analysis)
    names = {e.name for e in spec.experiments}
    for label, (experiment, variant, scale) in NOISE_SWEEPS.items():
        value = C.noise_of(analysis.sweeps.get(experiment, {}).get((variant, scale)))
        if value is not None:
            analysis.noise[label] = value
    analysis.notes.append("seed noise of the final validation loss (median sd over LRs, 3 seeds): " + (
        ", ".join(f"{k} {v:.4f} nats" for k, v in analysis.noise.items()) or "n/a"))
    noise = max(analysis.noise.values(), default=None)
    rows_of = lambda *exps: [r for e in exps if e in names for r in analysis.rows[e]]  # noqa: E731
    v = analysis.verdicts
    if "width" in names and "width_capacity" in names:
        v["capacity"] = capacity_verdict(analysis)
    transfer = [_ladder_verdict(analysis, "transfer", ladder, flat=True) for ladder in WIDTH_LADDERS + DEPTH_LADDERS
                if ladder[0] in names]
    if transfer:
        v["transfer"] = _judged_on(analysis, "transfer", transfer, groups=(WIDTH_LADDERS, DEPTH_LADDERS))
    tokens = [_token_verdict(analysis, ladder) for ladder in TOKEN_LADDERS if ladder[0] in names]
    if tokens:
        v["token_law"] = _judged_on(analysis, "token_law", tokens, groups=(TOKEN_LADDERS,))
    depth = [_ladder_verdict(analysis, "depth_mup", ladder, flat=False, expected=C.DEPTH_MUP_SLOPE)
             for ladder in NO_DEPTH_MUP_LADDERS if ladder[0] in names]
    if depth:
        v["depth_mup"] = _judged_on(analysis, "depth_mup", depth, groups=(NO_DEPTH_MUP_LADDERS,))
    if "depth" in names:
        v["stability"] = C.stability_verdict(ladder_of(analysis, "depth", "hyperp"), analysis.rows["depth"])
        compute = [(label, C.compute_verdict(ladder_of(analysis, "depth", "hyperp"), ladder_of(analysis, e, variant),
                                             rows_of("depth", e), noise))
                   for e, variant, label in MUON_LADDERS if e in names]
        v["compute"] = _compute_judged_on(compute)
    if "weight_decay" in names:
        wd = analysis.sweeps["weight_decay"]
        v["weight_decay"] = C.weight_decay_verdict(wd.get(("wd0", "base")), wd.get(("wd0.1", "base")),
                                                   analysis.rows["weight_decay"])
    if "moe" in names:
        v["sqrt_gate"] = _sqrt_gate_verdict(analysis)
    groups = {e: [s for _, s in ladder_of(analysis, e, "hyperp")] for e in ("tokens", "batch") if e in names}
    if groups:
        v["norm_transfer"] = C.norm_transfer_verdict(groups, rows_of("tokens", "batch"))
    return analysis


def adopt_seeded_sweeps(analysis: Analysis) -> None:
    """A ladder's sweep whose runs are all in a seed experiment's sweep (claims: noise) with more runs (its
    other seeds) is replaced by that sweep, refitted: the base points of the ladders get their 3 seeds."""
    seeded = [s for e in analysis.spec.experiments if "noise" in e.claims for s in analysis.sweeps[e.name].values()]
    for experiment, by_key in analysis.sweeps.items():
        for key, sweep in list(by_key.items()):
            keys = {r.run.key for r in sweep.rows}
            supersets = [s for s in seeded if s is not sweep and keys < {r.run.key for r in s.rows}]
            if supersets:
                best = max(supersets, key=lambda s: len(s.rows))
                rows = [dataclasses.replace(r, variant=sweep.variant, scale=sweep.scale) for r in best.rows]
                by_key[key] = C.Sweep(experiment, sweep.variant, sweep.scale, best.points, best.optimum, rows,
                                      best.error)


def _ladder_verdict(analysis: Analysis, claim: str, ladder: tuple, **kwargs) -> tuple[tuple, C.Verdict]:
    experiment, variant, _ = ladder
    items = ladder_of(analysis, experiment, variant)
    return ladder, C.slope_verdict(claim, C.slope_across(items), C._edges(items), analysis.rows[experiment],
                                   paper=C.PAPER[claim], **kwargs)


def _judged_on(analysis: Analysis, claim: str, parts: list, groups) -> C.Verdict:
    """One verdict from several ladders: per group (e.g. width, depth), the first ladder with a fitted slope
    (the unconfounded one when it has results); the others are reported beside it."""
    by_ladder = {ladder: verdict for ladder, verdict in parts}
    judged = []
    for group in groups:
        present = [ladder for ladder in group if ladder in by_ladder]
        usable = [ladder for ladder in present if by_ladder[ladder].measured is not None]
        if usable or present:
            judged.append((usable or present)[0])
    verdicts = [by_ladder[ladder].verdict for ladder in judged]
    verdict = C.FAILS if C.FAILS in verdicts else C.HOLDS if verdicts and all(x == C.HOLDS for x in verdicts) \
        else C.OPEN
    why = "; ".join(f"judged on {ladder[2]}: {by_ladder[ladder].verdict}, {by_ladder[ladder].why}" for ladder in judged)
    others = [ladder for ladder, _ in parts if ladder not in judged]
    if others:
        why += "; beside it: " + "; ".join(f"{ladder[2]}: {by_ladder[ladder].why}" for ladder in others)
    return C.Verdict(claim, verdict, {ladder[2]: by_ladder[ladder].measured for ladder, _ in parts},
                     {ladder[2]: by_ladder[ladder].uncertainty for ladder, _ in parts}, C.PAPER[claim],
                     by_ladder[judged[0]].rule if judged else "", why,
                     {"judged_on": [ladder[2] for ladder in judged]})


def _token_verdict(analysis: Analysis, ladder: tuple) -> tuple[tuple, C.Verdict]:
    experiment = ladder[0]
    items = actual_ladder_of(analysis, experiment)
    rows = analysis.rows[experiment]
    law = C.slope_across(items)
    paper = C.PAPER_TOKEN_EXPONENT
    rule = (f"holds if |exponent - ({paper})| <= 2 sd with sd <= 0.15; does not hold if |exponent - ({paper})| > "
            f"2 sd")
    if law is None:
        return ladder, C.Verdict("token_law", C.OPEN, None, None, paper, rule,
                                 "fewer than 2 budgets fitted" + C._incomplete(rows))
    m, sd = law.slope, law.slope_sd
    verdict = C.HOLDS if abs(m - paper) <= 2 * sd and sd <= 0.15 else C.FAILS if abs(m - paper) > 2 * sd else C.OPEN
    edges = C._edges(items)
    why = f"exponent {m:+.3f} +- {sd:.3f} over {law.num_points} budgets"
    if edges and verdict != C.FAILS:
        verdict, why = C.OPEN, why + f"; best LR at the grid edge at {edges}"
    return ladder, C.Verdict("token_law", verdict, m, sd, paper, rule, why + C._incomplete(rows))


def _compute_judged_on(parts: list[tuple[str, C.Verdict]]) -> C.Verdict:
    """Claim 7 judged on the fair baseline when it has results, the reference baseline reported beside it."""
    usable = [(label, v) for label, v in parts if v.measured is not None]
    label, judged = (usable or parts)[0]
    why = f"judged on the {label}: {judged.why}"
    why += "".join(f"; beside it, the {other}: {v.why}" for other, v in parts if other != label)
    details = {**judged.details, "baselines": {other: v.details for other, v in parts}, "judged_on": label}
    return C.Verdict("compute", judged.verdict, judged.measured, judged.uncertainty, judged.paper, judged.rule, why,
                     details)


def capacity_verdict(analysis: Analysis) -> C.Verdict:
    """The width ladder at the reference output std against the one at constant logit capacity: the optimum's
    slope in C and the best loss per width. Holds if the constant-capacity slope is flat (the transfer rule)
    and the reference slope is not; does not hold if the two slopes agree within 2 combined sd."""
    reference = ladder_of(analysis, "width", "hyperp")
    constant = ladder_of(analysis, "width_capacity", "hyperp")
    law_ref, law_cap = C.slope_across(reference), C.slope_across(constant)
    rows = analysis.rows["width_capacity"]
    rule = ("slopes of log(base LR*) against log(C): holds if the constant-capacity slope is flat (|slope| <= "
            "max(2 sd, 0.1)) while the reference one is not; does not hold if the two agree within 2 combined sd")
    losses = {}
    by_scale = {sweep.scale: sweep for _, sweep in constant}
    for _, ref in reference:
        cap = by_scale.get(ref.scale)
        if cap is not None and ref.optimum and cap.optimum:
            losses[ref.scale] = {"reference": ref.optimum.loss, "constant_capacity": cap.optimum.loss,
                                 "lr_reference": ref.optimum.lr, "lr_constant_capacity": cap.optimum.lr}
    details = {"per_width": losses, "slope_reference": law_ref.to_dict() if law_ref else None,
               "slope_constant_capacity": law_cap.to_dict() if law_cap else None}
    if law_ref is None or law_cap is None:
        return C.Verdict("capacity", C.OPEN, None, None, "(not a paper claim)", rule,
                         "fewer than 2 widths fitted in a ladder" + C._incomplete(rows), details)
    flat = abs(law_cap.slope) <= max(2 * law_cap.slope_sd, 0.1)
    ref_flat = abs(law_ref.slope) <= max(2 * law_ref.slope_sd, 0.1)
    same = abs(law_cap.slope - law_ref.slope) <= 2 * math.hypot(law_cap.slope_sd, law_ref.slope_sd)
    verdict = C.HOLDS if flat and not ref_flat else C.FAILS if same else C.OPEN
    why = (f"slope of the optimum in C: reference std {law_ref.slope:+.3f} +- {law_ref.slope_sd:.3f}, constant "
           f"capacity {law_cap.slope:+.3f} +- {law_cap.slope_sd:.3f}; best loss (reference -> constant capacity): "
           + ", ".join(f"{k} {v['reference']:.3f} -> {v['constant_capacity']:.3f}" for k, v in losses.items()))
    edges = C._edges(constant)
    if edges and verdict == C.HOLDS:
        verdict, why = C.OPEN, why + f"; best LR at the grid edge at {edges}"
    return C.Verdict("capacity", verdict, {"reference": law_ref.slope, "constant_capacity": law_cap.slope},
                     {"reference": law_ref.slope_sd, "constant_capacity": law_cap.slope_sd}, "(not a paper claim)",
                     rule, why + C._incomplete(rows), details)


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
    from hyperp_megatron.science import narrative, plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plots.write_all(analysis, out_dir)
    claims = claims_json(analysis)
    (out_dir / "claims.json").write_text(json.dumps(claims, indent=1, default=_json_default))
    table = optima_table(analysis)
    (out_dir / "optima.json").write_text(json.dumps(table, indent=1, default=_json_default))
    report = out_dir / "REPORT.md"
    report.write_text(narrative.markdown(analysis, claims, table, figures, commands))
    return report


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
