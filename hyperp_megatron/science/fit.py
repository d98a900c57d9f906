"""The fits of the sweep report (numpy only), each with an uncertainty.

- :func:`fit_optimum`: per scale, a quadratic in ``x = log(lr)`` through the grid points around the best one
  (a window of ``window`` points), its argmin, and the argmin's spread: a bootstrap over seeds when the LRs
  have several seeds, else leave-one-out (jackknife) over the window's points.
- :func:`power_law`: ``log y = slope log x + intercept`` by weighted least squares (weights ``1/sd^2``, the
  covariance scaled by the reduced chi-square when that is above 1), e.g. the optimal LR against tokens.
- :func:`equal_loss_points`: two methods' best-loss-vs-compute curves compared at equal loss (how much more
  compute method 2 needs for method 1's loss) and at equal compute (the loss gap), by interpolating the
  measured curves: no law is fitted (a parallel-curve law forces a constant multiplier, the data need not
  have one) and nothing is extrapolated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


# ----------------------------------------------------------------------------------------------
# The optimum of one LR sweep


@dataclass(frozen=True)
class OptimumFit:
    lr: float  # argmin of the fitted quadratic (or the best grid point if no convex fit)
    log_sd: float  # spread of log(lr*) (bootstrap over seeds, or jackknife)
    lr_low: float  # lr * exp(-log_sd), lr * exp(+log_sd)
    lr_high: float
    loss: float  # fitted loss at lr*
    coefficients: tuple[float, float, float]  # a, b, c of a x^2 + b x + c, x = log(lr)
    window: tuple[float, float]  # LR range of the points fitted
    num_points: int
    num_seeds: int
    method: str  # "bootstrap-seeds", "jackknife" or "best-point"
    at_edge: bool  # the optimum may lie outside the grid: the best point is an end of the grid, or the fitted
    # vertex was clamped to an end of the grid (the quadratic's minimum lies beyond the last LR tried)
    clamped: bool = False  # the vertex was clamped to an end of its fitting window (not a free minimum)

    def to_dict(self) -> dict:
        return asdict(self)


def _quadratic(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    if len(x) < 3:
        return None
    a, b, c = np.polyfit(x, y, 2)
    return (float(a), float(b), float(c)) if a > 0 else None


def _window(means: np.ndarray, window: int) -> slice:
    best = int(np.argmin(means))
    half = window // 2
    start = min(max(0, best - half), max(0, len(means) - window))
    return slice(start, start + window)


def _argmin(x: np.ndarray, means: np.ndarray, window: int) -> tuple[float, tuple | None, slice]:
    part = _window(means, window)
    coefficients = _quadratic(x[part], means[part])
    if coefficients is None:
        return float(x[int(np.argmin(means))]), None, part
    a, b, _ = coefficients
    # the vertex, kept within the fitted range (a flat quadratic can put it anywhere)
    return float(np.clip(-b / (2 * a), x[part][0], x[part][-1])), coefficients, part


def _vertex_clamped(coefficients: tuple | None, lo: float, hi: float) -> bool:
    """Whether the quadratic's free vertex lies outside [lo, hi] (so the argmin was clamped to an end)."""
    if coefficients is None:
        return False
    vertex = -coefficients[1] / (2 * coefficients[0])
    return not lo <= vertex <= hi


def fit_optimum(points: dict[float, list[float]], window: int = 5, bootstrap: int = 400,
                seed: int = 0) -> OptimumFit:
    """The optimal LR of one sweep. ``points``: lr -> finite losses (one per seed; diverged runs left out).

    Raises ValueError with fewer than 3 LRs.
    """
    lrs = np.array(sorted(lr for lr, losses in points.items() if losses))
    if len(lrs) < 3:
        raise ValueError(f"need losses at 3 or more LRs for a quadratic fit, got {len(lrs)}")
    samples = [np.asarray(points[lr], dtype=float) for lr in lrs]
    x = np.log(lrs)
    means = np.array([s.mean() for s in samples])
    x_star, coefficients, part = _argmin(x, means, window)
    num_seeds = min(len(s) for s in samples[part])
    estimates = []
    if num_seeds >= 2:
        method = "bootstrap-seeds"
        rng = np.random.default_rng(seed)
        for _ in range(bootstrap):
            resampled = np.array([rng.choice(s, size=len(s)).mean() for s in samples])
            estimates.append(_argmin(x, resampled, window)[0])
    elif coefficients is not None and part.stop - part.start >= 4:
        method = "jackknife"
        xs, ys = x[part], means[part]
        for drop in range(len(xs)):
            keep = np.arange(len(xs)) != drop
            refit = _quadratic(xs[keep], ys[keep])
            if refit is not None:
                estimates.append(float(np.clip(-refit[1] / (2 * refit[0]), xs[0], xs[-1])))
    else:
        method = "best-point"
    if method == "jackknife" and len(estimates) >= 2:
        n = len(estimates)
        log_sd = math.sqrt((n - 1) / n * float(np.sum((np.array(estimates) - np.mean(estimates)) ** 2)))
    elif method == "bootstrap-seeds":
        log_sd = float(np.std(estimates))
    else:  # no fit: the grid spacing is the resolution
        log_sd = float(np.median(np.diff(x))) if len(x) > 1 else float("inf")
    if coefficients is None:
        method = "best-point"
    loss = float(np.polyval(coefficients, x_star)) if coefficients else float(means.min())
    best = int(np.argmin(means))
    clamped = _vertex_clamped(coefficients, x[part][0], x[part][-1])
    # the optimum may lie beyond the grid: the best point is an end, or the vertex was clamped to an end
    beyond = clamped and (math.isclose(x_star, x[0]) or math.isclose(x_star, x[-1]))
    return OptimumFit(
        lr=math.exp(x_star), log_sd=log_sd, lr_low=math.exp(x_star - log_sd), lr_high=math.exp(x_star + log_sd),
        loss=loss, coefficients=tuple(coefficients) if coefficients else (0.0, 0.0, loss),
        window=(float(lrs[part][0]), float(lrs[part][-1])), num_points=part.stop - part.start,
        num_seeds=num_seeds, method=method, at_edge=best in (0, len(lrs) - 1) or beyond, clamped=clamped)


# ----------------------------------------------------------------------------------------------
# Power laws


@dataclass(frozen=True)
class PowerLaw:
    slope: float
    slope_sd: float
    intercept: float
    num_points: int

    def __call__(self, x):
        return np.exp(self.intercept) * np.asarray(x, dtype=float) ** self.slope

    def to_dict(self) -> dict:
        return asdict(self)


def power_law(x, y, log_sd=None, min_sd: float = 1e-3) -> PowerLaw:
    """``y = e^intercept x^slope`` by weighted least squares in log-log; ``log_sd``: sd of each ``log y``."""
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    if len(lx) < 2:
        raise ValueError("a power law needs 2 or more points")
    sd = np.full(len(lx), 0.1) if log_sd is None else np.maximum(np.asarray(log_sd, dtype=float), min_sd)
    weights = 1.0 / sd**2
    design = np.stack([lx, np.ones_like(lx)], axis=1)
    normal = design.T @ (design * weights[:, None])
    coef = np.linalg.solve(normal, design.T @ (weights * ly))
    covariance = np.linalg.inv(normal)
    if len(lx) > 2:
        residual = ly - design @ coef
        chi2 = float(np.sum(weights * residual**2)) / (len(lx) - 2)
        covariance = covariance * max(1.0, chi2)
    return PowerLaw(float(coef[0]), float(math.sqrt(covariance[0, 0])), float(coef[1]), len(lx))


# ----------------------------------------------------------------------------------------------
# Two methods at equal loss (interpolated curves, no fitted law)


@dataclass(frozen=True)
class EqualLossPoint:
    """Method 1's point (compute, loss), and what method 2's curve gives there."""

    compute: float
    loss: float
    compute_2: float | None  # method 2's compute for the same loss (None outside its loss range)
    multiplier: float | None  # compute_2 / compute: > 1 when method 1 needs less compute
    loss_gap: float | None  # method 2's loss at the same compute minus method 1's (None outside its range)

    def to_dict(self) -> dict:
        return asdict(self)


def _interpolate(x: np.ndarray, y: np.ndarray, at: float) -> float | None:
    """Piecewise-linear y(at) over sorted x, None outside [x0, x-1] (no extrapolation)."""
    if len(x) < 2 or not x[0] <= at <= x[-1]:
        return None
    return float(np.interp(at, x, y))


def equal_loss_points(curve_1, curve_2) -> list[EqualLossPoint]:
    """Each point of method 1's best-loss-vs-compute curve against method 2's, interpolated linearly in
    (log compute, loss): the compute method 2 needs for method 1's loss (its curve must be monotone: the
    decreasing envelope is used) and method 2's loss at method 1's compute. No law is fitted and nothing is
    extrapolated: points outside method 2's range get None."""
    c1 = sorted((float(c), float(l)) for c, l in curve_1)
    c2 = sorted((float(c), float(l)) for c, l in curve_2)
    log_c2 = np.log([c for c, _ in c2])
    loss_2 = np.array([l for _, l in c2])
    # method 2's frontier: the points that improve on every cheaper one (a strictly decreasing curve)
    frontier = [i for i in range(len(loss_2)) if all(loss_2[i] < loss_2[j] for j in range(i))]
    envelope, log_frontier = loss_2[frontier], log_c2[frontier]
    out = []
    for compute, loss in c1:
        gap = _interpolate(log_c2, loss_2, math.log(compute))
        compute_2 = None
        # loss -> log compute on the decreasing envelope (reverse: np.interp needs increasing x)
        if len(envelope) >= 2 and envelope[-1] <= loss <= envelope[0]:
            compute_2 = float(np.exp(np.interp(loss, envelope[::-1], log_frontier[::-1])))
        out.append(EqualLossPoint(compute, loss, compute_2, None if compute_2 is None else compute_2 / compute,
                                  None if gap is None else gap - loss))
    return out
