"""The analysis behind the report: per-sweep optima, the fits across scales, and a verdict per claim.

Claims (docs/method.md section 7, issue 17) and how each is judged at our scale. ``sd`` is always the fit's own
uncertainty (seed bootstrap or jackknife, propagated by weighted least squares); thresholds are stated in
each verdict's ``rule`` and in REPORT.md. The paper's numbers are the constants below, defined once.

1. ``transfer``: the optimal BASE LR is the same at every depth and width: slope of log(base lr*) against
   log(scale).
2. ``token_law``: the optimal ACTUAL LR against tokens: exponent, paper :data:`PAPER_TOKEN_EXPONENT`.
3. ``depth_mup``: without the Depth-muP factor the optimum drifts with depth (:data:`DEPTH_MUP_SLOPE`).
4. ``weight_decay``: not tested. Under our decision (the radius R is fixed: decay, step, retract to R) weight
   decay is an exact LR rescale, ``eta -> eta / (1 - eta wd)``, so "no first-order effect" holds by
   construction; the paper's claim is about the reference's semantics (the radius shrinks by (1 - eta wd)
   per step), which this repository does not implement. The measured difference is reported, no verdict.
5. ``sqrt_gate``: SqrtGate keeps the MoE branch RMS and the optimal LR flat in the granularity k.
6. ``stability``: Z values, branch RMS and outlier percentages along the depth ladder (HyperP, at each
   depth's best LR) do not grow with FLOPs.
7. ``compute``: HyperP vs the Muon baseline, best loss per scale against FLOPs, compared at equal compute and
   at equal loss by interpolating each method's measured curve (``fit.equal_loss_points``), with the trend of
   the gap with scale; paper :data:`PAPER_COMPUTE_MULTIPLIER`.
``norm_transfer`` (issue 17): the output layer's RMS->inf norm of the optimal runs of every token budget and
batch size, against its spread over the whole grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from hyperp_megatron.science import fit
from hyperp_megatron.science.results import Row, completeness, sweep_points

PAPER_TOKEN_EXPONENT = -0.32
"""The paper's token law: optimal LR ~ T^-0.32 (docs/method.md section 3; ``hyperp.token_exponent``'s default)."""
PAPER_COMPUTE_MULTIPLIER = 1.58
"""The paper's compute multiplier of HyperP over its Muon baseline."""
DEPTH_MUP_SLOPE = -0.5
"""The drift of the optimal LR with depth that Depth-muP's factor sqrt(d0/d) removes."""
PAPER_REGIME = {"base depth d0": 8, "width at d0 (C = 128 d)": 1024, "vocabulary": 32000, "sequence": 4096,
                "batch tokens B0": 2**21, "tokens at d0 (T0)": 10.4e9}
"""The reference's regime (docs/method.md sections 2-3), for the report's comparison with ours."""
PAPER_OUTPUT_STD = 0.02
"""The reference's output-layer init std (its sphere radius): logit capacity 0.02 C."""
PAPER = {"transfer": "optimal base LR constant across width and depth (slope 0)",
         "token_law": PAPER_TOKEN_EXPONENT, "depth_mup": f"optimum drifts without Depth-muP (slope {DEPTH_MUP_SLOPE} expected)",
         "weight_decay": "no first-order effect", "sqrt_gate": "flat output RMS and optimal LR in k",
         "stability": "bounded, non-increasing with FLOPs", "compute": PAPER_COMPUTE_MULTIPLIER,
         "norm_transfer": "optimal (LR, batch) pairs share one output-layer norm (~27 RMS->inf, Scion)"}
HOLDS, FAILS, OPEN, NOT_TESTED = "holds", "does not hold", "inconclusive", "not tested"


@dataclass
class Verdict:
    claim: str
    verdict: str
    measured: object
    uncertainty: object
    paper: object
    rule: str
    why: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sweep:
    """One (variant, scale) LR sweep and its fit."""

    experiment: str
    variant: str
    scale: str
    points: dict  # lr -> losses
    optimum: fit.OptimumFit | None
    rows: list = field(default_factory=list)
    error: str | None = None


def sweeps(experiment: str, rows: list[Row], x: str = "base") -> dict[tuple[str, str], Sweep]:
    out = {}
    for variant, scale in dict.fromkeys((r.variant, r.scale) for r in rows):
        points = sweep_points(rows, variant, scale, x)
        mine = [r for r in rows if r.variant == variant and r.scale == scale]
        try:
            optimum = fit.fit_optimum(points)
            error = None
        except ValueError as exc:
            optimum, error = None, str(exc)
        out[variant, scale] = Sweep(experiment, variant, scale, points, optimum, mine, error)
    return out


def slope_across(sweeps_by_scale: list[tuple[float, Sweep]]) -> fit.PowerLaw | None:
    usable = [(x, s.optimum) for x, s in sweeps_by_scale if s.optimum is not None]
    if len(usable) < 2:
        return None
    return fit.power_law([x for x, _ in usable], [o.lr for _, o in usable], [o.log_sd for _, o in usable])


def _edges(items) -> list[str]:
    return [s.scale for _, s in items if s.optimum is not None and s.optimum.at_edge]


def _incomplete(rows: list[Row]) -> str:
    finished, total = completeness(rows)
    return "" if finished == total else f" ({finished} of {total} runs finished)"


def slope_verdict(claim: str, law: fit.PowerLaw | None, edges: list[str], rows, *, flat: bool,
                  expected: float = 0.0, paper=None, small: float = 0.1, large: float = 0.25) -> Verdict:
    """Verdict on a fitted slope: ``flat`` claims want ~0, others a drift (of ``expected``'s sign)."""
    incomplete = _incomplete(rows)
    if law is None:
        return Verdict(claim, OPEN, None, None, paper, "", "fewer than 2 scales with a fitted optimum" + incomplete)
    m, sd = law.slope, law.slope_sd
    if flat:
        rule = f"holds if |slope| <= max(2 sd, {small}); does not hold if |slope| > 2 sd and >= {large}"
        if abs(m) <= max(2 * sd, small):
            verdict = HOLDS
        elif abs(m) >= large:
            verdict = FAILS
        else:
            verdict = OPEN
    else:
        rule = (f"holds if the slope has the expected sign ({expected:+g}) and |slope| > 2 sd; does not hold if "
                f"|slope| <= 2 sd with sd < {large / 2}")
        if np.sign(m) == np.sign(expected) and abs(m) > 2 * sd:
            verdict = HOLDS
        elif abs(m) <= 2 * sd and sd < large / 2:
            verdict = FAILS
        else:
            verdict = OPEN
    why = f"slope {m:+.3f} +- {sd:.3f} over {law.num_points} scales"
    if edges and verdict != FAILS:
        verdict, why = OPEN, why + f"; the best LR is at the grid's edge at {edges} (optimum may lie outside)"
    return Verdict(claim, verdict, m, sd, paper, rule, why + incomplete)


def noise_of(wd_sweep: Sweep | None) -> float | None:
    """Median over LRs of the seed standard deviation of the final validation loss (the base point)."""
    if wd_sweep is None:
        return None
    sds = [float(np.std(v, ddof=1)) for v in wd_sweep.points.values() if len(v) >= 2]
    return float(np.median(sds)) if sds else None


def weight_decay_verdict(base: Sweep | None, decayed: Sweep | None, rows) -> Verdict:
    """Claim 4: the measured difference (wd 0.1 - wd 0, per LR, against the seed noise), no verdict: under
    our decision weight decay on the sphere is an exact LR rescale (module docstring)."""
    incomplete = _incomplete(rows)
    rule = ("not judged: with a fixed radius, normalize(W (1 - eta wd) - eta R D) = normalize(W - eta' R D) with "
            "eta' = eta / (1 - eta wd), an exact LR rescale (1% at eta 0.1, wd 0.1); the paper's claim needs the "
            "reference's semantics (radius shrink by (1 - eta wd) per step), not implemented here")
    if base is None or decayed is None:
        return Verdict("weight_decay", NOT_TESTED, None, None, PAPER["weight_decay"], rule,
                       "missing sweeps" + incomplete)
    diffs = {}
    for lr in sorted(set(base.points) & set(decayed.points)):
        a, b = np.array(base.points[lr]), np.array(decayed.points[lr])
        if len(a) >= 2 and len(b) >= 2:
            se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
            diffs[lr] = (float(b.mean() - a.mean()), se)
    if not diffs:
        return Verdict("weight_decay", NOT_TESTED, None, None, PAPER["weight_decay"], rule,
                       "no LR with 2+ seeds" + incomplete)
    worst = max(abs(d) / max(se, 1e-12) for d, se in diffs.values())
    mean_diff = float(np.mean([d for d, _ in diffs.values()]))
    why = (f"measured (our semantics, an LR rescale): largest |difference| / se = {worst:.2f} over {len(diffs)} "
           f"LRs; mean difference {mean_diff:+.4f} nats")
    return Verdict("weight_decay", NOT_TESTED, mean_diff, float(np.mean([se for _, se in diffs.values()])),
                   PAPER["weight_decay"], rule, why + incomplete,
                   {"per_lr": {f"{lr:g}": {"difference": d, "se": se} for lr, (d, se) in diffs.items()}})


def nearest_run(sweep: Sweep) -> Row | None:
    """The finished run at the grid LR closest (in log) to the fitted optimum (first seed)."""
    if sweep.optimum is None:
        return None
    finite = [r for r in sweep.rows if r.run.finite]
    if not finite:
        return None
    return min(finite, key=lambda r: (abs(math.log(r.base_lr / sweep.optimum.lr)), r.seed))


STABILITY_KEYS = ("attn_z", "attn_rms", "mlp_rms", "attn_outlier_pct", "mlp_outlier_pct")


def stability_verdict(ladder: list[tuple[float, Sweep]], rows, tolerance: float = 0.05,
                      large: float = 0.15) -> Verdict:
    incomplete = _incomplete(rows)
    points = []
    for _, sweep in ladder:
        row = nearest_run(sweep)
        if row is not None and row.run.flops and row.run.monitors:
            points.append((row.run.flops, row.run.monitors, sweep.scale))
    rule = (f"per indicator, slope of log(value) vs log(FLOPs) over the ladder at each scale's best LR: holds if "
            f"every slope <= {tolerance}; does not hold if one is > {large}")
    if len(points) < 2:
        return Verdict("stability", OPEN, None, None, PAPER["stability"], rule, "fewer than 2 scales" + incomplete)
    slopes, table = {}, {}
    for key in STABILITY_KEYS:
        values = [(f, m.get(key)) for f, m, _ in points if m.get(key) is not None and m.get(key) > 0]
        table[key] = {s: m.get(key) for _, m, s in points}
        if len(values) >= 2:
            slopes[key] = fit.power_law([f for f, _ in values], [v for _, v in values]).slope
    worst = max(slopes.values(), default=math.nan)
    verdict = OPEN if not slopes else HOLDS if worst <= tolerance else FAILS if worst > large else OPEN
    why = "slopes vs FLOPs: " + ", ".join(f"{k} {v:+.3f}" for k, v in slopes.items())
    return Verdict("stability", verdict, slopes, None, PAPER["stability"], rule, why + incomplete,
                   {"values": table, "flops": {s: f for f, _, s in points}})


def best_loss_curve(ladder: list[tuple[float, Sweep]]) -> list[tuple[float, float, str]]:
    """(training FLOPs, fitted best loss, scale) per scale of a ladder, by FLOPs."""
    out = []
    for _, sweep in ladder:
        row = nearest_run(sweep)
        if sweep.optimum is not None and row is not None and row.run.flops:
            out.append((row.run.flops, sweep.optimum.loss, sweep.scale))
    return sorted(out)


def compute_verdict(hyperp: list[tuple[float, Sweep]], muon: list[tuple[float, Sweep]], rows,
                    noise_sd: float | None) -> Verdict:
    """Claim 7 at equal loss and at equal compute, from the two measured curves (``fit.equal_loss_points``),
    and the trend of the gap with scale (slope of the loss gap against log10 FLOPs)."""
    incomplete = _incomplete(rows)
    a, b = best_loss_curve(hyperp), best_loss_curve(muon)
    noise = noise_sd if noise_sd is not None else 0.01
    rule = (f"each HyperP scale against the baseline's curve interpolated in (log FLOPs, loss), no extrapolation: "
            f"holds if at every compared scale the baseline's loss at equal compute is higher by more than 2 x the "
            f"seed noise ({noise:.3g} nats); does not hold if at the largest compared scale it is lower by more "
            f"than that; the multiplier is the baseline's compute for HyperP's loss over HyperP's")
    details = {"hyperp": [(c, l) for c, l, _ in a], "muon": [(c, l) for c, l, _ in b]}
    points = fit.equal_loss_points([(c, l) for c, l, _ in a], [(c, l) for c, l, _ in b]) if len(b) >= 2 else []
    compared = [(p, scale) for p, (_, _, scale) in zip(points, a) if p.loss_gap is not None]
    if not compared:
        return Verdict("compute", OPEN, None, None, PAPER["compute"], rule,
                       "no HyperP scale inside the baseline's FLOPs range" + incomplete, details)
    details["points"] = {scale: p.to_dict() for p, scale in compared}
    gaps = [p.loss_gap for p, _ in compared]
    multipliers = {scale: p.multiplier for p, scale in compared if p.multiplier is not None}
    trend = None
    if len(compared) >= 2:
        x = np.log10([p.compute for p, _ in compared])
        trend = float(np.polyfit(x, gaps, 1)[0])
    details["gap_trend_per_decade"] = trend
    if all(g > 2 * noise for g in gaps):
        verdict = HOLDS
    elif gaps[-1] < -2 * noise:
        verdict = FAILS
    else:
        verdict = OPEN
    why = ("loss gap (baseline - HyperP) at equal compute: "
           + ", ".join(f"{scale} {p.loss_gap:+.3f}" for p, scale in compared)
           + (f"; trend {trend:+.3f} nats per decade of FLOPs" if trend is not None else "")
           + ("; compute multiplier at equal loss: " + ", ".join(f"{k} {v:.2f}" for k, v in multipliers.items())
              if multipliers else "; no HyperP loss inside the baseline's loss range (no multiplier)"))
    return Verdict("compute", verdict, {"loss_gap": dict((scale, p.loss_gap) for p, scale in compared),
                                        "multiplier": multipliers, "gap_trend_per_decade": trend},
                   noise, PAPER["compute"], rule, why + incomplete, details)


def norm_at_optimum(sweep: Sweep, key: str) -> float | None:
    """The monitor value ``key`` (final step) interpolated in log-log at the sweep's fitted optimum."""
    if sweep.optimum is None:
        return None
    pairs = sorted((r.base_lr, r.run.monitors[key]) for r in sweep.rows
                   if r.run.finite and r.run.monitors.get(key))
    if len(pairs) < 2:
        return None
    x = np.log([p[0] for p in pairs])
    y = np.log([p[1] for p in pairs])
    return float(np.exp(np.interp(math.log(sweep.optimum.lr), x, y)))


def norm_transfer_verdict(groups: dict[str, list[Sweep]], rows, key: str = "output_rms_inf") -> Verdict:
    incomplete = _incomplete(rows)
    optimal, everything, seen = {}, {}, set()
    for group, group_sweeps in groups.items():
        for sweep in group_sweeps:
            runs = frozenset(r.run.key for r in sweep.rows)
            if runs in seen:  # the base point belongs to both ladders: one sweep, one optimum
                continue
            seen.add(runs)
            value = norm_at_optimum(sweep, key)
            if value is not None:
                optimal[f"{group}/{sweep.scale}"] = value
            everything |= {r.run.key: r.run.monitors[key] for r in sweep.rows
                           if r.run.finite and r.run.monitors.get(key)}
    everything = list(everything.values())
    rule = ("spread = sd of log(norm); holds if the optimal runs' spread is < 0.3 x the whole grid's and their "
            "max/min < 1.25; does not hold if the ratio is > 0.5 and max/min > 1.5")
    if len(optimal) < 2 or len(everything) < 3:
        return Verdict("norm_transfer", OPEN, None, None, PAPER["norm_transfer"], rule,
                       "too few optima with the norm logged" + incomplete)
    spread_opt = float(np.std(np.log(list(optimal.values()))))
    spread_grid = float(np.std(np.log(everything)))
    ratio = spread_opt / max(spread_grid, 1e-12)
    max_min = max(optimal.values()) / min(optimal.values())
    verdict = (HOLDS if ratio < 0.3 and max_min < 1.25 else FAILS if ratio > 0.5 and max_min > 1.5 else OPEN)
    why = (f"{key} at the optimum: {', '.join(f'{k} {v:.3g}' for k, v in optimal.items())}; spread at the optimum "
           f"{spread_opt:.3f} vs grid {spread_grid:.3f} (ratio {ratio:.2f}), max/min {max_min:.3f}")
    return Verdict("norm_transfer", verdict, float(np.exp(np.mean(np.log(list(optimal.values()))))),
                   {"spread_optimum": spread_opt, "spread_grid": spread_grid, "max_over_min": max_min},
                   PAPER["norm_transfer"], rule, why + incomplete, {"optimal": optimal})
