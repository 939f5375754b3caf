"""Seed statistics: paired-by-seed intervals of +SP / +SR minus base, the minimum detectable difference, a
bootstrap, the share of seeds won; and the per-seed differences they come from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from dpm.report.frame import (
    BLOCK_KEYS,
    BOOTSTRAP_MIN_N,
    BOOTSTRAP_RESAMPLES,
    CONFIDENCE,
    EQUAL_COST_POINTS,
    POWER,
    STAT_METRICS,
    VARIANT_LABEL,
    VARIANT_ORDER,
)
from dpm.report.loading import aggregated_runs, run_settings


@dataclass
class PairedInterval:
    """A paired comparison over seeds: differences d_i = x_i - y_i for the seeds both sides have."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    half_width: float
    mdd: float
    boot_low: float = float("nan")
    boot_high: float = float("nan")
    seeds: list = field(default_factory=list)

    @property
    def includes_zero(self) -> bool | None:
        """True when the t-interval includes 0; None when there is no interval (n < 2)."""
        if math.isnan(self.low):
            return None
        return not (self.low > 0 or self.high < 0)


def minimum_detectable(sd: float, n: int, confidence: float = CONFIDENCE, power: float = POWER) -> float:
    """MDD = (t_{(1+c)/2, n-1} + t_{power, n-1}) * sd / sqrt(n): the true mean paired difference a
    two-sided paired t-test at level 1 - c detects with probability `power` over n seeds whose
    differences spread by `sd` (see :func:`paired_interval`). NaN for n < 2."""
    from scipy import stats  # deferred: scipy is slow to import and only the intervals need it

    if n < 2:
        return float("nan")
    return (float(stats.t.ppf((1 + confidence) / 2, n - 1)) + float(stats.t.ppf(power, n - 1))) * sd / math.sqrt(n)


def paired_interval(
    diffs: Sequence[float],
    confidence: float = CONFIDENCE,
    power: float = POWER,
    bootstrap_min_n: int = BOOTSTRAP_MIN_N,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> PairedInterval:
    """The paired t-interval of the mean difference, and the minimum detectable difference.

    interval: mean(d) +- t_{(1+c)/2, n-1} * sd(d) / sqrt(n)      (sd with ddof = 1)
    MDD:      (t_{(1+c)/2, n-1} + t_{power, n-1}) * sd(d) / sqrt(n)
              the true mean difference a two-sided paired t-test at level 1 - c detects with
              probability `power` (normal-approximation power formula with t quantiles), given the
              observed sd(d). An effect smaller than the MDD is not something these seeds can show.
    bootstrap: percentile interval of mean(d) over `resamples` resamples of the seeds, only when
              n >= bootstrap_min_n (fewer seeds give too few distinct resamples to mean anything).
    n < 2 gives NaN bounds (no spread to estimate).
    """
    from scipy import stats  # deferred: scipy is slow to import and only the intervals need it

    d = np.asarray(list(diffs), dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    if n < 2:
        return PairedInterval(n, mean, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"))
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    t_crit = float(stats.t.ppf((1 + confidence) / 2, n - 1))
    half = t_crit * se
    mdd = minimum_detectable(sd, n, confidence, power)
    out = PairedInterval(n, mean, sd, mean - half, mean + half, half, mdd)
    if n >= bootstrap_min_n:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
        alpha = (1 - confidence) / 2
        out.boot_low, out.boot_high = (float(q) for q in np.quantile(means, [alpha, 1 - alpha]))
    return out


def _comparisons(
    frame: pd.DataFrame, metrics: Sequence[str]
) -> Iterator[tuple[dict, str, str, list, list, list, dict]]:
    """Every +SP / +SR group against its block's base, per metric: (block keys, comparison label,
    metric, paired seeds, their differences variant - base, unpaired seeds, cost: the group's
    `budget` and its paired FLOPs % differences)."""
    runs = aggregated_runs(frame).copy()
    if runs.empty or "variant" not in runs:
        return
    runs["table"] = runs.get("table", pd.Series(index=runs.index, dtype=object)).fillna("")
    for key in BLOCK_KEYS:
        if key not in runs:
            runs[key] = None
    runs["setting"] = run_settings(runs)
    for block_key, block in runs.groupby(BLOCK_KEYS, dropna=False, sort=True):
        bases = block[block["variant"] == "base"]
        if bases.empty or bases["seed"].duplicated().any():
            continue  # no base, or several base settings per seed: no single partner to pair with
        base = bases.set_index("seed")
        others = block[block["variant"] != "base"]
        for (variant, setting), group in sorted(
            others.groupby(["variant", "setting"], sort=False),
            key=lambda item: (VARIANT_ORDER.get(item[0][0], 9), item[0][0], item[0][1]),
        ):
            other = group.set_index("seed")
            label = VARIANT_LABEL.get(variant, variant) + (f" ({setting})" if setting else "")
            seeds = sorted(set(base.index) & set(other.index))
            unpaired = sorted(set(base.index) ^ set(other.index))

            def paired(m: str, other=other) -> list[float]:
                return [float(other.at[s, m]) - float(base.at[s, m]) for s in seeds]

            flops = "flops_remaining_pct"
            cost = {"budget": _one_value(group.get("budget")), "flops_gaps": paired(flops) if flops in block else []}
            for m in metrics:
                yield dict(zip(BLOCK_KEYS, block_key)), f"{label} - base", m, seeds, paired(m), unpaired, cost


def _one_value(values: pd.Series | None):
    """A group's value of a setting when all its runs share it (None where unset or mixed)."""
    if values is None:
        return None
    distinct = values.dropna().unique()
    return distinct[0] if len(distinct) == 1 else None


def paired_differences(frame: pd.DataFrame, metrics: Sequence[str] = STAT_METRICS) -> pd.DataFrame:
    """The per-seed differences the intervals of :func:`seed_statistics` come from: one row per
    block, comparison, metric and paired seed (``diff`` = variant - base)."""
    rows = [
        {**block, "comparison": label, "metric": m, "seed": seed, "diff": d}
        for block, label, m, seeds, diffs, *_ in _comparisons(frame, metrics)
        for seed, d in zip(seeds, diffs)
    ]
    return pd.DataFrame(rows, columns=[*BLOCK_KEYS, "comparison", "metric", "seed", "diff"])


def seed_statistics(frame: pd.DataFrame, metrics: Sequence[str] = STAT_METRICS) -> pd.DataFrame:
    """For every +SP / +SR group against its block's base: the paired (by seed) difference of each
    metric, n, its 95% t-interval, the MDD, a bootstrap interval when n >= 10, how many seeds the
    variant beat its base on (``wins``, a tie is not a win; ``win_share`` of n), the seeds that had
    no partner, and `includes_zero`; and the cost it ran at: ``flops_gap`` (mean paired FLOPs %
    difference, variant - base), ``equal_cost`` (its size within EQUAL_COST_POINTS) and the variant's
    ``budget`` (how +SR made up for releases)."""
    columns = [
        *BLOCK_KEYS,
        "comparison",
        "metric",
        "n",
        "mean_diff",
        "sd_diff",
        "ci_low",
        "ci_high",
        "half_width",
        "mdd",
        "boot_low",
        "boot_high",
        "includes_zero",
        "wins",
        "win_share",
        "unpaired_seeds",
        "flops_gap",
        "equal_cost",
        "budget",
    ]
    rows = []
    for block, label, m, _, diffs, unpaired, cost in _comparisons(frame, metrics):
        gap = float(np.mean(cost["flops_gaps"])) if cost["flops_gaps"] else float("nan")
        iv = paired_interval(diffs)
        wins = sum(d > 0 for d in diffs)
        rows.append(
            {
                **block,
                "comparison": label,
                "metric": m,
                "n": iv.n,
                "mean_diff": iv.mean,
                "sd_diff": iv.sd,
                "ci_low": iv.low,
                "ci_high": iv.high,
                "half_width": iv.half_width,
                "mdd": iv.mdd,
                "boot_low": iv.boot_low,
                "boot_high": iv.boot_high,
                "includes_zero": iv.includes_zero,
                "wins": wins,
                "win_share": wins / iv.n if iv.n else float("nan"),
                "unpaired_seeds": ",".join(str(int(s)) for s in unpaired),
                "flops_gap": gap,
                "equal_cost": None if math.isnan(gap) else bool(abs(gap) <= EQUAL_COST_POINTS),
                "budget": cost["budget"],
            }
        )
    return pd.DataFrame(rows, columns=columns)
