"""Statistics for records: t-intervals, the one-sided one-sample t-test that a
record must pass (H1: mean val loss < target, p < 0.01), bootstrap power and
Welch's t-test for A/B comparisons.

The test statistics are computed here from their definitions; scipy supplies
only the Student-t distribution (cdf/ppf), so the numbers can be checked
independently against scipy.stats.ttest_1samp / ttest_ind / t.interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

CONFIDENCE = 0.99
SIGNIFICANCE = 0.01


@dataclass
class Summary:
    n: int
    mean: float
    std: float | None  # sample standard deviation (ddof=1); None when n < 2
    ci: tuple | None  # two-sided CONFIDENCE t-interval of the mean; None when n < 2


def summarize(values, confidence: float = CONFIDENCE) -> Summary:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to summarise")
    mean = float(x.mean())
    if x.size < 2:
        return Summary(int(x.size), mean, None, None)
    std = float(x.std(ddof=1))
    half = float(student_t.ppf(0.5 + confidence / 2, x.size - 1)) * std / math.sqrt(x.size)
    return Summary(int(x.size), mean, std, (mean - half, mean + half))


def _t_from(diff, sem):
    """diff/sem with the limits scipy uses for zero spread: ±inf, or nan for 0/0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(diff, sem)


def one_sample_p_less(values, target: float) -> float | None:
    """p-value of the one-sided one-sample t-test, H1: mean < target. None when n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    t_stat = _t_from(x.mean() - target, x.std(ddof=1) / math.sqrt(x.size))
    return float(student_t.cdf(t_stat, x.size - 1))


def bootstrap_fraction_below(values, target: float, resamples: int, sample_size: int, seed: int,
                             alpha: float = SIGNIFICANCE) -> float:
    """Fraction of `resamples` bootstrap samples whose one-sided p is below alpha.

    Sampling is fixed so results are reproducible: rng = numpy.random.default_rng(seed), then
    indices = rng.integers(0, n, size=(resamples, sample_size)); sample i is values[indices[i]].
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0 or resamples < 1 or sample_size < 2:
        raise ValueError("bootstrap needs values, at least 1 resample and a sample size of at least 2")
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, x.size, size=(resamples, sample_size))]
    sem = samples.std(axis=1, ddof=1) / math.sqrt(sample_size)
    p = student_t.cdf(_t_from(samples.mean(axis=1) - target, sem), sample_size - 1)
    return float(np.mean(p < alpha))  # nan p (identical values equal to target) counts as not below


def welch_p(a, b) -> float | None:
    """Two-sided p of Welch's unequal-variance t-test; None when a side has fewer than 2 values."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or y.size < 2:
        return None
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    t_stat = _t_from(x.mean() - y.mean(), math.sqrt(vx + vy))
    with np.errstate(divide="ignore", invalid="ignore"):
        # Welch-Satterthwaite degrees of freedom
        df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    return float(2 * student_t.sf(abs(t_stat), df))


def record_stats(losses, target: float, times_ms=None, iterations: int | None = None,
                 bootstrap: int | None = None, sample_size: int | None = None, seed: int = 0) -> dict:
    """Everything `stats` reports, as one dict (times in minutes, as records quote them)."""
    loss = summarize(losses)
    out = {"n": loss.n, "mean": loss.mean, "std": loss.std, "ci99": list(loss.ci) if loss.ci else None,
           "p_value": one_sample_p_less(losses, target), "target": target}
    if times_ms is not None and len(times_ms):
        minutes = summarize(np.asarray(times_ms, dtype=np.float64) / 60_000)
        out.update(time_n=minutes.n, time_mean=minutes.mean, time_std=minutes.std,
                   time_ci99=list(minutes.ci) if minutes.ci else None)
        if iterations:
            out["ms_per_iter"] = float(np.mean(times_ms)) / iterations
            out["iterations"] = iterations
    if bootstrap:
        size = sample_size or loss.n
        out.update(boot_frac_below_001=bootstrap_fraction_below(losses, target, bootstrap, size, seed),
                   boot_resamples=bootstrap, boot_sample_size=size, boot_seed=seed)
    return out


def fmt(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_p(p) -> str:
    return fmt(p, ".4g")


def format_record_stats(s: dict) -> str:
    """Human-readable lines for the dict of record_stats; the precision the tests check against."""
    verdict = ""
    if s["p_value"] is not None:
        verdict = "  (p < 0.01: below target)" if s["p_value"] < SIGNIFICANCE else "  (not significant at 0.01)"
    ci = s["ci99"] or (None, None)
    lines = [
        f"runs: {s['n']}",
        f"val_loss: mean {fmt(s['mean'], '.6f')}  std {fmt(s['std'], '.6f')}  "
        f"99% CI ({fmt(ci[0], '.6f')}, {fmt(ci[1], '.6f')})",
        f"t-test vs target {s['target']:g} (one-sided, H1: mean < target): p = {format_p(s['p_value'])}{verdict}",
    ]
    if "time_mean" in s:
        tci = s["time_ci99"] or (None, None)
        std_s = None if s["time_std"] is None else s["time_std"] * 60
        line = (f"time: mean {fmt(s['time_mean'], '.5f')} min ({s['time_mean'] * 60:.2f} s)  "
                f"std {fmt(s['time_std'], '.5f')} min ({fmt(std_s, '.2f')} s)  "
                f"99% CI ({fmt(tci[0], '.5f')}, {fmt(tci[1], '.5f')}) min")
        if "ms_per_iter" in s:
            line += f"  {s['ms_per_iter']:.2f} ms/iter over {s['iterations']} iterations"
        lines.append(line)
    if "boot_frac_below_001" in s:
        lines.append(f"bootstrap: {100 * s['boot_frac_below_001']:.1f}% of {s['boot_resamples']} resamples of "
                     f"{s['boot_sample_size']} runs have p < 0.01 (seed {s['boot_seed']})")
    return "\n".join(lines)
