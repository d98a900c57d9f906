"""Sweeps of one experiment along its scale coordinate (a "ladder"), for the verdicts (``report``) and the
figures (``plots``). ``analysis`` is a ``report.Analysis``."""

from __future__ import annotations

from hyperp_megatron.science import claims as C


def ladder_of(analysis, experiment: str, variant: str, coordinate: str | None = None):
    """[(scale coordinate, Sweep)] of one variant, sorted by the coordinate (a resolved config value)."""
    exp = analysis.spec.experiment(experiment)
    key = coordinate or exp.scale_key
    out = []
    for (v, scale), sweep in analysis.sweeps.get(experiment, {}).items():
        if v != variant:
            continue
        finished = [r.run for r in sweep.rows if r.run.config]
        if not finished:
            continue
        x = finished[0].tokens if key == "tokens" else finished[0].value(key)
        if x is not None:
            out.append((float(x), sweep))
    return sorted(out, key=lambda item: item[0])


def actual_ladder_of(analysis, experiment: str):
    """Tokens -> sweep refitted against the ACTUAL peak LR (the token rule moves it with T)."""
    rows = analysis.rows[experiment]
    actual = C.sweeps(experiment, rows, x="actual")
    out = []
    for (variant, scale), sweep in actual.items():
        tokens = [r.run.tokens for r in sweep.rows if r.run.tokens]
        if variant == "hyperp" and tokens:
            out.append((tokens[0], sweep))
    return sorted(out, key=lambda item: item[0])
