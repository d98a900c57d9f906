"""The fits of the sweep report (numpy only), each with an uncertainty.

- :func:`fit_optimum`: per scale, a quadratic in ``x = log(lr)`` through the grid points around the best one
  (a window of ``window`` points), its argmin, and the argmin's spread: a bootstrap over seeds when the LRs
  have several seeds, else leave-one-out (jackknife) over the window's points.
- :func:`power_law`: ``log y = slope log x + intercept`` by weighted least squares (weights ``1/sd^2``, the
  covariance scaled by the reduced chi-square when that is above 1), e.g. the optimal LR against tokens.
- :func:`compute_law` / :func:`joint_compute_law`: ``L = A C^-b + c`` (one method, or two methods sharing
  ``b`` and ``c``), and :func:`compute_multiplier`: how much more compute method 2 needs than method 1 for the
  same loss (``(A_2 / A_1)^(1/b)`` under the joint law; from two separate laws at a given compute).
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
    at_edge: bool  # the best grid point is an end of the grid: the optimum may lie outside

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
    return OptimumFit(
        lr=math.exp(x_star), log_sd=log_sd, lr_low=math.exp(x_star - log_sd), lr_high=math.exp(x_star + log_sd),
        loss=loss, coefficients=tuple(coefficients) if coefficients else (0.0, 0.0, loss),
        window=(float(lrs[part][0]), float(lrs[part][-1])), num_points=part.stop - part.start,
        num_seeds=num_seeds, method=method, at_edge=best in (0, len(lrs) - 1))


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
# Loss against compute


@dataclass(frozen=True)
class ComputeLaw:
    """``L = A (C / C_ref)^-b + c``."""

    A: float
    b: float
    c: float
    c_ref: float

    def __call__(self, compute):
        return self.A * (np.asarray(compute, dtype=float) / self.c_ref) ** -self.b + self.c

    def compute_for(self, loss: float) -> float:
        """The compute at which this law reaches ``loss`` (inf when ``loss <= c``)."""
        if loss <= self.c or self.A <= 0:
            return math.inf
        return self.c_ref * ((loss - self.c) / self.A) ** (-1 / self.b)

    def to_dict(self) -> dict:
        return asdict(self)


B_GRID = np.exp(np.linspace(np.log(0.01), np.log(3.0), 400))


def _best_over_b(design_for_b, losses: np.ndarray, nonneg_c: bool = True):
    best = None
    for b in B_GRID:
        design = design_for_b(b)
        coef, *_ = np.linalg.lstsq(design, losses, rcond=None)
        if nonneg_c and coef[-1] < 0:
            continue
        error = float(np.sum((design @ coef - losses) ** 2))
        if best is None or error < best[0]:
            best = (error, b, coef)
    if best is None:
        raise ValueError("no L = A C^-b + c with c >= 0 fits these points")
    return best


def compute_law(compute, loss) -> ComputeLaw:
    """Least squares ``L = A C^-b + c`` (b on a grid of 400 values in [0.01, 3], A and c linear, c >= 0)."""
    compute, loss = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    if len(compute) < 3:
        raise ValueError("L = A C^-b + c needs 3 or more points")
    ref = float(np.exp(np.mean(np.log(compute))))
    _, b, (A, c) = _best_over_b(lambda b: np.stack([(compute / ref) ** -b, np.ones_like(compute)], 1), loss)
    return ComputeLaw(float(A), float(b), float(c), ref)


def joint_compute_law(compute_1, loss_1, compute_2, loss_2) -> tuple[ComputeLaw, ComputeLaw]:
    """Two methods with a shared exponent ``b`` and floor ``c`` (their own ``A``): 2 + 2 parameters."""
    c1, l1 = np.asarray(compute_1, dtype=float), np.asarray(loss_1, dtype=float)
    c2, l2 = np.asarray(compute_2, dtype=float), np.asarray(loss_2, dtype=float)
    if len(c1) + len(c2) < 5 or min(len(c1), len(c2)) < 2:
        raise ValueError("a joint compute law needs 2+ points per method and 5+ in all")
    ref = float(np.exp(np.mean(np.log(np.concatenate([c1, c2])))))

    def design(b):
        first = np.concatenate([(c1 / ref) ** -b, np.zeros_like(c2)])
        second = np.concatenate([np.zeros_like(c1), (c2 / ref) ** -b])
        return np.stack([first, second, np.ones(len(c1) + len(c2))], 1)

    _, b, (A1, A2, c) = _best_over_b(design, np.concatenate([l1, l2]))
    return ComputeLaw(float(A1), float(b), float(c), ref), ComputeLaw(float(A2), float(b), float(c), ref)


def compute_multiplier(law_1: ComputeLaw, law_2: ComputeLaw, at_compute: float | None = None) -> float:
    """Compute method 2 needs for method 1's loss, over method 1's compute: > 1 means method 1 is more
    efficient. Shared ``b`` (joint law): the constant ``(A_2 / A_1)^(1/b)``. Otherwise at ``at_compute``:
    ``at_compute / C_1(L_2(at_compute))`` (how much less compute method 1 needs for method 2's loss there)."""
    if at_compute is None:
        if not (law_1.b == law_2.b and law_1.c == law_2.c):
            raise ValueError("compute_multiplier without at_compute needs a joint law (shared b and c)")
        return (law_2.A / law_1.A) ** (1 / law_1.b)
    return at_compute / law_1.compute_for(float(law_2(at_compute)))


def bootstrap_multiplier(compute_1, loss_1, compute_2, loss_2, noise_sd: float, draws: int = 300,
                         seed: int = 0) -> tuple[float, float, float]:
    """(16th, 50th, 84th percentile) of the joint-law multiplier with each loss redrawn as
    ``loss + N(0, noise_sd)`` (the seed noise of the base point)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        l1 = np.asarray(loss_1) + rng.normal(0, noise_sd, len(loss_1))
        l2 = np.asarray(loss_2) + rng.normal(0, noise_sd, len(loss_2))
        try:
            law_1, law_2 = joint_compute_law(compute_1, l1, compute_2, l2)
        except ValueError:
            continue
        values.append(compute_multiplier(law_1, law_2))
    if not values:
        return (math.nan, math.nan, math.nan)
    low, mid, high = np.percentile(values, [16, 50, 84])
    return float(low), float(mid), float(high)
