"""Statistics for records: t-intervals, the one-sided one-sample t-test that a
record must pass (H1: mean val loss < target, p < 0.01), bootstrap power and
Welch's t-test for A/B comparisons.

The tests and intervals are scipy's (ttest_1samp, ttest_ind with equal_var=False,
t.interval); the tests in tests/test_records.py pin them against the textbook
formulas. The bootstrap here is a power estimate (the share of resampled record
attempts that would pass), which scipy.stats.bootstrap does not compute: it gives
intervals of a statistic, so only the per-resample t-tests come from scipy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.99
SIGNIFICANCE = 0.01


@dataclass
class Summary:
    n: int
    mean: float
    std: float | None  # sample standard deviation (ddof=1); None when n < 2
    ci: tuple | None  # two-sided CONFIDENCE t-interval of the mean; None when n < 2


def _quiet(fn, *args, **kwargs):
    """scipy warns about identical values (zero spread); the result (±inf t, p 0/1, or nan) is what we want."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


def summarize(values, confidence: float = CONFIDENCE) -> Summary:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to summarise")
    mean = float(x.mean())
    if x.size < 2:
        return Summary(int(x.size), mean, None, None)
    std = float(x.std(ddof=1))
    if std == 0:
        return Summary(int(x.size), mean, std, (mean, mean))  # scipy gives nan for a zero scale
    low, high = sps.t.interval(confidence, x.size - 1, loc=mean, scale=std / math.sqrt(x.size))
    return Summary(int(x.size), mean, std, (float(low), float(high)))


def one_sample_p_less(values, target: float) -> float | None:
    """p-value of the one-sided one-sample t-test, H1: mean < target. None when n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    return float(_quiet(sps.ttest_1samp, x, target, alternative="less").pvalue)


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
    p = _quiet(sps.ttest_1samp, samples, target, axis=1, alternative="less").pvalue
    return float(np.mean(p < alpha))  # nan p (identical values equal to target) counts as not below


def welch_p(a, b) -> float | None:
    """Two-sided p of Welch's unequal-variance t-test; None when a side has fewer than 2 values."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or y.size < 2:
        return None
    return float(_quiet(sps.ttest_ind, x, y, equal_var=False).pvalue)


def verdict_problems(n: int, mean: float, p_value: float | None, target: float) -> list[str]:
    """Why a set of runs does not meet the record rule (mean below target, one-sided p < 0.01); [] when it does."""
    problems = []
    if n < 2:
        problems.append(f"only {n} run: no p-value (a record needs at least 2 runs, usually many more)")
    if mean >= target:
        problems.append(f"mean val_loss {mean:.6f} is not below the target {target:g}")
    if p_value is not None and not p_value < SIGNIFICANCE:
        problems.append(f"p = {format_p(p_value)} is not below {SIGNIFICANCE:g}")
    return problems


def record_stats(losses, target: float, times_ms=None, iterations: int | None = None,
                 bootstrap: int | None = None, sample_size: int | None = None, seed: int = 0) -> dict:
    """Everything `stats` reports, as one dict (times in minutes, as records quote them)."""
    loss = summarize(losses)
    p_value = one_sample_p_less(losses, target)
    problems = verdict_problems(loss.n, loss.mean, p_value, target)
    out = {"n": loss.n, "mean": loss.mean, "std": loss.std, "ci99": list(loss.ci) if loss.ci else None,
           "p_value": p_value, "target": target, "meets_rule": not problems, "problems": problems,
           "losses": [float(v) for v in losses]}
    if times_ms is not None and len(times_ms):
        if len(times_ms) != loss.n:
            raise ValueError(f"{len(times_ms)} times for {loss.n} losses; give one time per run")
        out["times_ms"] = [float(v) for v in times_ms]
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
    rule = ("verdict: meets the record rule (mean below target, p < 0.01)" if s["meets_rule"] else
            "verdict: does NOT meet the record rule: " + "; ".join(s["problems"]))
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
            line += f"  {s['ms_per_iter']:.2f} ms/iter over {s['iterations']} timed iterations"
        elif len(set(s.get("step_counts") or ())) > 1:
            line += f"  ms/iter: n/a (the runs time different step counts: {sorted(set(s['step_counts']))})"
        lines.append(line)
    if s.get("distinct_scripts", 1) > 1:
        lines.append(f"warning: these {s['n']} logs embed {s['distinct_scripts']} different scripts; a record holds "
                     "runs of one script (`new` refuses them)")
    if "boot_frac_below_001" in s:
        lines.append(f"bootstrap: {100 * s['boot_frac_below_001']:.1f}% of {s['boot_resamples']} resamples of "
                     f"{s['boot_sample_size']} runs have p < 0.01 (seed {s['boot_seed']})")
    lines.append(rule)
    return "\n".join(lines)
