"""Tables of runs. Reads metrics.json dicts into pandas and lays them out for the terminal, and turns
directories of runs into a report against the paper.

    python -m dpm.report outputs/depgraph_resnet56_cifar10 [more dirs...] [--out DIR] [--no-plots]
                         [--wandb [--wandb-mode offline] [--wandb-project P]]

The quickstart prints `format_runs`; the paper tables (base / +SP / +SR against the paper, seed
statistics) build on `runs_frame`:

- `load_runs(dirs)`: one row per run dir (metrics.json + its config flattened into `cfg.*` columns),
  with `status` (`complete`, `failed`, `running`, `missing` = config.yaml but no metrics.json),
  `dup_key` / `duplicate_of` for runs that repeat a config and seed.
- `paper_table(frame, reference)`: mean / std / n over seeds per (table, model, dataset, pruner,
  sparse_learning, variant), deltas against base, the paper's numbers beside ours.
- `seed_statistics(frame)`: paired-by-seed 95% t-intervals of +SP / +SR minus base, n, the minimum
  detectable difference, a bootstrap interval when n >= 10.
- `write_report(dirs, out)`: all of it as Markdown, CSV, LaTeX and plots (PNG + PDF), atomically.
- `log_report_to_wandb(report)`: the tables as W&B Tables and the plots as images, one W&B run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from dpm.config import comparable_config

# metrics.json field -> column title, in display order.
RUN_COLUMNS = {
    "model": "model",
    "dataset": "dataset",
    "pruner": "pruner",
    "variant": "variant",
    "seed": "seed",
    "top1_final": "top1 %",
    "top1_best": "best %",
    "top1_best_epoch": "@ep",
    "pruned_macs_m": "MACs (M)",
    "pruned_params_m": "params (M)",
    "flops_remaining_pct": "MACs %",
    "params_remaining_pct": "params %",
    "speedup": "speed-up",
    "rounds_done": "rounds",
    "N": "N",
    "admitted": "admitted",
    "released": "released",
    "pruned": "removed",
    "wall_time_s": "time (s)",
    "status": "status",
}

REFERENCE_CSV = Path(__file__).resolve().parent.parent / "results" / "paper" / "reference_results.csv"
# What makes a paper-table row: one group of seeds.
GROUP_KEYS = ["table", "model", "dataset", "pruner", "sparse_learning", "variant"]
BLOCK_KEYS = GROUP_KEYS[:-1]
# Aggregated over seeds; top1_final is the headline, top1_best is what Torch-Pruning reports.
AGG_METRICS = ["top1_final", "top1_best", "flops_remaining_pct", "params_remaining_pct"]
STAT_METRICS = ["top1_final", "top1_best"]
VARIANT_ORDER = {"base": 0, "sp": 1, "sr": 2}
VARIANT_LABEL = {"base": "base", "sp": "+SP", "sr": "+SR"}
# Runs whose metrics.json has any other status (or none) are failed/incomplete, never aggregated.
COMPLETE = "complete"
TARGET_MISSED = "target_missed"  # finished, but short of its pruning target: listed as a problem
MISSING = "missing"
CONFIDENCE = 0.95
POWER = 0.80
BOOTSTRAP_MIN_N = 10
BOOTSTRAP_RESAMPLES = 10_000
REPORT_DIRNAME = "report"


def runs_frame(runs: Iterable[dict]) -> pd.DataFrame:
    """One row per run, with MACs and params also in millions."""
    frame = pd.DataFrame(list(runs))
    for key in ("pruned_macs", "pruned_params", "base_macs", "base_params"):
        if key in frame:
            frame[f"{key}_m"] = frame[key] / 1e6
    return frame


def format_runs(runs: Iterable[dict] | pd.DataFrame) -> str:
    """A fixed-width table of runs (what `python -m dpm` prints)."""
    frame = runs if isinstance(runs, pd.DataFrame) else runs_frame(runs)
    columns = [c for c in RUN_COLUMNS if c in frame]
    table = frame[columns].rename(columns=RUN_COLUMNS)
    return table.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-")


# ----------------------------------------------------------------------------------------------
# Reading run dirs


class NoRunsError(ValueError):
    """The given dirs hold no run (no metrics.json and no dpm config.yaml)."""


def _is_dpm_config(cfg: Any) -> bool:
    # W&B writes its own files/config.yaml inside run dirs: only a dpm config has these groups.
    return isinstance(cfg, dict) and {"model", "dataset", "dpm"} <= set(cfg)


def _load_config(run_dir: Path) -> tuple[dict | None, str | None]:
    """The run's config: the runner's resolved `config.yaml`, else Hydra's `.hydra/config.yaml`."""
    from omegaconf import OmegaConf

    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                # resolve=False: Hydra's copy still holds ${now:...}/${oc.env:...}; the keys that use
                # them are run-time keys, dropped before configs are compared.
                cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            except Exception:  # noqa: BLE001  (an unreadable config makes the run incomplete, not the report)
                continue
            if _is_dpm_config(cfg):
                return cfg, str(path)
    return None, None


def find_run_dirs(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Every run dir under `dirs`: a folder with a metrics.json or a dpm config.yaml (beside it or in
    `.hydra/`). Report dirs and W&B's folders are skipped."""
    found: set[Path] = set()
    for root in map(Path, dirs):
        for path in root.rglob("*"):
            parts = set(path.relative_to(root).parts[:-1])
            if "wandb" in parts or REPORT_DIRNAME in parts:
                continue
            if path.name == "metrics.json":
                found.add(path.parent)
            elif path.name == "config.yaml":
                run_dir = path.parent.parent if path.parent.name == ".hydra" else path.parent
                if run_dir not in found and _load_config(run_dir)[0] is not None:
                    found.add(run_dir)
    return sorted(found)


def _flatten(tree: dict, prefix: str) -> dict:
    """Nested dicts -> dotted keys; lists become JSON strings so that columns stay hashable."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _dup_key(cfg: dict | None, metrics: dict) -> str:
    """Equal for runs that should have given the same result: the config without run-time keys (seed
    included), or, without a config, what metrics.json says the run was."""
    if cfg is not None:
        basis: Any = comparable_config(cfg)
    else:
        basis = {
            k: metrics.get(k)
            for k in (
                "name",
                "table",
                "model",
                "dataset",
                "pruner",
                "variant",
                "seed",
                "N",
                "T_rate",
                "T_len",
                "sparse_learning",
            )
        }
    return hashlib.sha1(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_run(run_dir: Path) -> dict:
    """One run dir -> one flat row (metrics fields, `cfg.*` config facets, bookkeeping)."""
    metrics_path = run_dir / "metrics.json"
    cfg, cfg_path = _load_config(run_dir)
    metrics: dict[str, Any] = {}
    problem = None
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            problem = f"unreadable metrics.json: {err}"
    row: dict[str, Any] = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    row.update(_flatten({k: v for k, v in metrics.items() if k == "epochs" and isinstance(v, dict)}, ""))
    if cfg is not None:
        row.update(_flatten(cfg, "cfg."))
        # A run that failed before writing metrics (or never got there) still says what it was.
        identity = {
            "name": cfg.get("name"),
            "table": cfg.get("table"),
            "model": cfg["model"].get("name"),
            "dataset": cfg["dataset"].get("name"),
            "pruner": (cfg.get("pruner") or {}).get("name"),
            "variant": cfg["dpm"].get("variant"),
            "seed": cfg.get("seed"),
        }
        for key, value in identity.items():
            row.setdefault(key, value)
        if "sparse_learning" not in row and isinstance(cfg.get("trainer"), dict):
            row["sparse_learning"] = (cfg["trainer"].get("sparse") or {}).get("epochs", 0) > 0
        row.update(_choice_facets(cfg, row))
    if not metrics_path.is_file():
        problem = "config.yaml but no metrics.json (killed, or never started)"
    status = metrics.get("status") if metrics else MISSING
    row["status"] = status or MISSING
    if problem is None and row["status"] != COMPLETE:
        problem = metrics.get("error") or f"status {row['status']!r}"
    row["problem"] = problem
    row["run_dir"] = str(run_dir)
    row["config_path"] = cfg_path
    row["dup_key"] = _dup_key(cfg, metrics)
    row["mtime"] = (metrics_path if metrics_path.is_file() else run_dir).stat().st_mtime
    return row


#: DPM options an ablation sweeps that metrics.json does not record, read from the run's config
#: (`dpm.<name>`), and the variants they mean something to (release rule and budget act only with
#: Self-Rectifying, the schedule only when the decay is longer than one step).
CHOICE_FACETS = {"release_rule": ("sr",), "budget": ("sr",), "schedule": ("sp", "sr")}


def _choice_facets(cfg: dict, row: dict) -> dict:
    """`release_rule` / `budget` / `schedule` of a run (None where its variant does not use them), so
    that an ablation over them splits the table's rows and gets its plot."""
    dpm_cfg = cfg.get("dpm") if isinstance(cfg.get("dpm"), dict) else {}
    variant = row.get("variant", dpm_cfg.get("variant"))
    return {
        name: dpm_cfg.get(name) if variant in variants else None
        for name, variants in CHOICE_FACETS.items()
        if name not in row
    }


def load_runs(dirs: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """All runs under `dirs`, one row each, runs_frame's columns plus the config as `cfg.*` columns,
    `status`, `problem` (why it is not aggregated), `dup_key` and `duplicate_of` (the run dir kept
    for a config and seed that ran more than once: the newest complete one). Raises NoRunsError."""
    missing = [str(d) for d in dirs if not Path(d).is_dir()]
    if missing:
        raise NoRunsError(f"not a directory: {', '.join(missing)}")
    run_dirs = find_run_dirs(dirs)
    if not run_dirs:
        raise NoRunsError(f"no runs (metrics.json or config.yaml) under {', '.join(map(str, dirs))}")
    frame = runs_frame(load_run(d) for d in run_dirs)
    if "sparse_learning" in frame:
        frame["sparse_learning"] = frame["sparse_learning"].map(_as_bool)
    frame["duplicate_of"] = None
    for _, group in frame.groupby("dup_key", sort=False):
        if len(group) < 2:
            continue
        complete = group[group["status"] == COMPLETE]
        keep = (complete if len(complete) else group).sort_values("mtime").index[-1]
        for idx in group.index:
            if idx != keep:
                frame.at[idx, "duplicate_of"] = frame.at[keep, "run_dir"]
    return frame


def _as_bool(value: Any) -> Any:
    """metrics.json records sparse_learning as a bool, the reference CSV as true/false/empty."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def aggregated_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs that count: complete, and one per config and seed."""
    return frame[(frame["status"] == COMPLETE) & frame["duplicate_of"].isna()]


#: DPM hyper-parameters an ablation sweeps; they split a variant's row only where they vary.
SETTING_FACETS = ["N", "T_rate", "T_len", "release_rule", "budget", "schedule"]


def run_settings(runs: pd.DataFrame) -> pd.Series:
    """Per run, `N=.., T_rate=..` of the facets that vary within its (block, variant) group, else "".

    An ablation sweep has several +SR runs per seed that differ only in N / T_rate / T_len: they are
    separate rows of the table (never averaged together as if they were seeds) and separate paired
    comparisons. A table sweep (one setting per variant) gets "" everywhere: its layout is unchanged."""
    out = pd.Series("", index=runs.index, dtype=object)
    facets = [f for f in SETTING_FACETS if f in runs]
    if not facets or runs.empty:
        return out
    keys = [k for k in GROUP_KEYS if k in runs]
    for _, group in runs.groupby(keys, dropna=False, sort=False):
        varying = [f for f in facets if group[f].astype(str).nunique(dropna=False) > 1]
        if varying:
            out.loc[group.index] = [
                ", ".join(f"{f}={_facet_text(v)}" for f, v in zip(varying, values))
                for values in group[varying].itertuples(index=False)
            ]
    return out


def _facet_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


# ----------------------------------------------------------------------------------------------
# Paper tables


def load_reference(path: str | os.PathLike = REFERENCE_CSV) -> pd.DataFrame:
    """The paper's numbers (results/paper/reference_results.csv), sparse_learning as bool/None."""
    ref = pd.read_csv(path, dtype={"sparse_learning": str}, keep_default_na=False, na_values=[""])
    ref["sparse_learning"] = ref["sparse_learning"].map(_as_bool)
    return ref


def match_reference(ref: pd.DataFrame, key: dict) -> pd.Series | None:
    """The paper row for one group. A run's `table` (may be null) must equal the CSV's when set; an
    empty sparse_learning in the CSV (OTOv2, Gate Decorator) matches either. Among several matches
    the first in file order wins: each table lists the DPM paper's own rows before third-party runs."""
    hit = ref[
        (ref["base_pruner"] == key["pruner"])
        & (ref["model"] == key["model"])
        & (ref["dataset"] == key["dataset"])
        & (ref["variant"] == key["variant"])
    ]
    if key.get("table") not in (None, "") and not pd.isna(key.get("table")):
        hit = hit[hit["table"] == key["table"]]
    sl = key.get("sparse_learning")
    if sl is not None and not pd.isna(sl):
        hit = hit[hit["sparse_learning"].isna() | (hit["sparse_learning"] == bool(sl))]
    return hit.iloc[0] if len(hit) else None


def paper_table(frame: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Numeric paper table: one row per group of seeds (base, then +SP, +SR of each block), with
    `<metric>_mean/_std` and `n`, `d_<metric>` (mean minus the block's base mean), the paper's
    `paper_top1` / `paper_flops_pct` / `paper_params_pct` and `diff_*` (ours minus paper)."""
    runs = aggregated_runs(frame).copy()
    columns = [*GROUP_KEYS, "setting", "n", "seeds"] + [f"{m}_{s}" for m in AGG_METRICS for s in ("mean", "std")]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    for key in GROUP_KEYS:
        if key not in runs:
            runs[key] = None
    # groupby drops None keys; a run without a table still belongs in a row.
    runs["table"] = runs["table"].fillna("")
    runs["setting"] = run_settings(runs)
    for m in AGG_METRICS:
        runs[m] = pd.to_numeric(runs.get(m), errors="coerce")
    rows = []
    for key, group in runs.groupby([*GROUP_KEYS, "setting"], dropna=False, sort=False):
        row = dict(zip([*GROUP_KEYS, "setting"], key))
        row["n"] = len(group)
        row["seeds"] = ",".join(str(s) for s in sorted(group["seed"].dropna().astype(int)))
        for m in AGG_METRICS:
            row[f"{m}_mean"] = group[m].mean()
            row[f"{m}_std"] = group[m].std(ddof=1) if len(group) > 1 else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows, columns=columns)
    table["_order"] = table["variant"].map(VARIANT_ORDER).fillna(len(VARIANT_ORDER))
    table = table.sort_values([*BLOCK_KEYS, "_order", "variant", "setting"], key=_sort_key).drop(columns="_order")
    table = table.reset_index(drop=True)
    for m in AGG_METRICS:
        table[f"d_{m}"] = float("nan")
    for _, block in table.groupby(BLOCK_KEYS, dropna=False, sort=False):
        base = block[block["variant"] == "base"]
        if len(base):
            for m in AGG_METRICS:
                table.loc[block.index, f"d_{m}"] = block[f"{m}_mean"] - base.iloc[0][f"{m}_mean"]
    ref = load_reference() if reference is None else reference
    paper = {"paper_top1": "top1", "paper_flops_pct": "flops_remaining_pct", "paper_params_pct": "params_remaining_pct"}
    for col in paper:
        table[col] = float("nan")
    table["paper_table"] = None
    for idx, row in table.iterrows():
        hit = match_reference(ref, row.to_dict())
        if hit is not None:
            table.at[idx, "paper_table"] = hit["table"]
            for col, src in paper.items():
                table.at[idx, col] = hit[src]
    table["diff_top1"] = table["top1_final_mean"] - table["paper_top1"]
    table["diff_flops_pct"] = table["flops_remaining_pct_mean"] - table["paper_flops_pct"]
    table["diff_params_pct"] = table["params_remaining_pct_mean"] - table["paper_params_pct"]
    table["base_check"] = base_checks(table, runs)
    return table


# A base row further than this from the paper's base row is flagged (percentage points).
BASE_TOLERANCE = {"top1": 1.0, "flops_pct": 2.0}


def base_checks(table: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """The base-reproduction gate, one note per row. A variant row is compared only beside its
    base row: without one its deltas are withheld and the row says so. A base row is checked
    against the paper's base numbers when the reference has them (full paper runs), and otherwise
    against the base method's own rules: its runs met their target (DepGraph: in Torch-Pruning's
    own counter, with Torch-Pruning's selection)."""
    notes = []
    for _, row in table.iterrows():
        block = table
        for key in BLOCK_KEYS:
            block = block[block[key].astype(str) == str(row[key])]
        if row["variant"] != "base":
            notes.append("" if (block["variant"] == "base").any() else "no base row: deltas withheld")
            continue
        if not pd.isna(row["paper_top1"]):
            off = [
                f"{name} {diff:+.2f}"
                for name, diff in (("top1", row["diff_top1"]), ("FLOPs", row["diff_flops_pct"]))
                if not pd.isna(diff) and abs(diff) > BASE_TOLERANCE["top1" if name == "top1" else "flops_pct"]
            ]
            notes.append(f"base deviates from the paper's ({', '.join(off)})" if off else "base matches the paper's")
            continue
        members = runs
        for key in GROUP_KEYS:
            members = members[members[key].astype(str) == str(row[key])]
        met = members["target_met"] if "target_met" in members else pd.Series(dtype=object)
        met = met.dropna()
        if met.empty:
            notes.append("")
        elif not met.astype(bool).all():
            notes.append(f"base missed its target in {int((~met.astype(bool)).sum())} of {len(met)} runs")
        elif row["pruner"] == "depgraph":
            notes.append("base = Torch-Pruning's selection, target met")
        else:
            notes.append("base met its target")
    return notes


def _sort_key(col: pd.Series) -> pd.Series:
    # Mixed None/bool/str keys do not sort; their text does.
    return col if pd.api.types.is_numeric_dtype(col) else col.astype(str)


# ----------------------------------------------------------------------------------------------
# Seed statistics


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
    from scipy import stats

    d = np.asarray(list(diffs), dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    if n < 2:
        return PairedInterval(n, mean, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"))
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    t_crit = float(stats.t.ppf((1 + confidence) / 2, n - 1))
    half = t_crit * se
    mdd = (t_crit + float(stats.t.ppf(power, n - 1))) * se
    out = PairedInterval(n, mean, sd, mean - half, mean + half, half, mdd)
    if n >= bootstrap_min_n:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
        alpha = (1 - confidence) / 2
        out.boot_low, out.boot_high = (float(q) for q in np.quantile(means, [alpha, 1 - alpha]))
    return out


def seed_statistics(frame: pd.DataFrame, metrics: Sequence[str] = STAT_METRICS) -> pd.DataFrame:
    """For every +SP / +SR group against its block's base: the paired (by seed) difference of each
    metric, n, its 95% t-interval, the MDD, a bootstrap interval when n >= 10, the seeds that had no
    partner, and `includes_zero`."""
    runs = aggregated_runs(frame).copy()
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
        "unpaired_seeds",
    ]
    if runs.empty or "variant" not in runs:
        return pd.DataFrame(columns=columns)
    runs["table"] = runs.get("table", pd.Series(index=runs.index, dtype=object)).fillna("")
    for key in BLOCK_KEYS:
        if key not in runs:
            runs[key] = None
    runs["setting"] = run_settings(runs)
    rows = []
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
            for m in metrics:
                diffs = [float(other.at[s, m]) - float(base.at[s, m]) for s in seeds]
                iv = paired_interval(diffs)
                rows.append(
                    {
                        **dict(zip(BLOCK_KEYS, block_key)),
                        "comparison": f"{label} - base",
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
                        "unpaired_seeds": ",".join(str(int(s)) for s in unpaired),
                    }
                )
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------------------------
# Display


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        return f"{v:+.2f}" if signed else f"{v:.2f}"
    return str(v)


def _pm(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if std is None or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


PAPER_TABLE_COLUMNS = [
    "table",
    "model",
    "dataset",
    "pruner",
    "SL",
    "variant",
    "n",
    "top1 %",
    "Δtop1",
    "best %",
    "Δbest",
    "FLOPs %",
    "ΔFLOPs",
    "params %",
    "Δparams",
    "paper top1",
    "ours-paper top1",
    "paper FLOPs %",
    "ours-paper FLOPs",
    "paper params %",
    "base check",
]


def paper_table_display(table: pd.DataFrame) -> pd.DataFrame:
    """The paper table as text cells: mean ± std over seeds, signed deltas against base, the paper's
    numbers and ours minus theirs."""
    if table.empty:  # no complete run yet (e.g. a sweep whose only run failed): the header alone
        return pd.DataFrame(columns=PAPER_TABLE_COLUMNS)
    out = pd.DataFrame(
        {
            "table": table["table"].replace("", "-"),
            "model": table["model"],
            "dataset": table["dataset"],
            "pruner": table["pruner"],
            "SL": table["sparse_learning"].map({True: "yes", False: "no"}).fillna("-"),
            "variant": table["variant"].map(lambda v: VARIANT_LABEL.get(v, v)),
            "n": table["n"],
            "top1 %": [_pm(m, s) for m, s in zip(table["top1_final_mean"], table["top1_final_std"])],
            "Δtop1": table["d_top1_final"].map(lambda v: _fmt(v, True)),
            "best %": [_pm(m, s) for m, s in zip(table["top1_best_mean"], table["top1_best_std"])],
            "Δbest": table["d_top1_best"].map(lambda v: _fmt(v, True)),
            "FLOPs %": [_pm(m, s) for m, s in zip(table["flops_remaining_pct_mean"], table["flops_remaining_pct_std"])],
            "ΔFLOPs": table["d_flops_remaining_pct"].map(lambda v: _fmt(v, True)),
            "params %": [
                _pm(m, s) for m, s in zip(table["params_remaining_pct_mean"], table["params_remaining_pct_std"])
            ],
            "Δparams": table["d_params_remaining_pct"].map(lambda v: _fmt(v, True)),
            "paper top1": table["paper_top1"].map(_fmt),
            "ours-paper top1": table["diff_top1"].map(lambda v: _fmt(v, True)),
            "paper FLOPs %": table["paper_flops_pct"].map(_fmt),
            "ours-paper FLOPs": table["diff_flops_pct"].map(lambda v: _fmt(v, True)),
            "paper params %": table["paper_params_pct"].map(_fmt),
            "base check": table["base_check"].fillna("") if "base_check" in table else "",
        }
    )
    # The paper prints deltas only on the +SP / +SR rows.
    for col in ("Δtop1", "Δbest", "ΔFLOPs", "Δparams"):
        out.loc[(table["variant"] == "base").to_numpy(), col] = ""
    if "setting" in table and table["setting"].fillna("").astype(bool).any():  # an ablation sweep
        out.insert(out.columns.get_loc("variant") + 1, "setting", table["setting"].fillna("").to_numpy())
    return out


def stats_display(stats: pd.DataFrame) -> pd.DataFrame:
    """Seed statistics as text cells; `includes 0` is flagged `YES` (the gain is not shown)."""

    def interval(lo: float, hi: float) -> str:
        return "-" if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"

    return pd.DataFrame(
        {
            "table": stats["table"].replace("", "-"),
            "model": stats["model"],
            "dataset": stats["dataset"],
            "pruner": stats["pruner"],
            "SL": stats["sparse_learning"].map({True: "yes", False: "no"}).fillna("-"),
            "comparison": stats["comparison"],
            "metric": stats["metric"],
            "n": stats["n"],
            "mean diff": stats["mean_diff"].map(lambda v: _fmt(v, True)),
            "sd diff": stats["sd_diff"].map(_fmt),
            "95% t-interval": [interval(lo, hi) for lo, hi in zip(stats["ci_low"], stats["ci_high"])],
            "MDD (80%)": stats["mdd"].map(_fmt),
            "bootstrap 95%": [interval(lo, hi) for lo, hi in zip(stats["boot_low"], stats["boot_high"])],
            "includes 0": stats["includes_zero"].map({True: "YES", False: "no"}).fillna("n < 2"),
            "unpaired seeds": stats["unpaired_seeds"].replace("", "-"),
        }
    )


PROBLEM_COLUMNS = ["run_dir", "status", "model", "dataset", "pruner", "variant", "seed", "problem"]
DUPLICATE_COLUMNS = ["run_dir", "duplicate_of", "status", "model", "dataset", "pruner", "variant", "seed", "top1_final"]


def problem_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Failed, incomplete and short-of-target runs (status != complete, or config.yaml without metrics.json)."""
    bad = frame[frame["status"] != COMPLETE]
    return bad.reindex(columns=PROBLEM_COLUMNS)


def duplicate_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Every run of a config and seed that ran more than once, with the run dir that was kept."""
    groups = frame[frame["duplicate_of"].notna()]["dup_key"].unique()
    dups = frame[frame["dup_key"].isin(groups)].sort_values(["dup_key", "mtime"])
    return dups.reindex(columns=DUPLICATE_COLUMNS)


def _markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    # disable_numparse: cells are already formatted text ("+0.56" must keep its sign)
    return frame.to_markdown(index=False, disable_numparse=True)


def _latex(frame: pd.DataFrame, caption: str) -> str:
    if frame.empty:
        return f"% {caption}: none\n"
    text = frame.to_latex(index=False, escape=True, caption=caption, float_format="%.2f")
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")


@dataclass
class Report:
    """Everything a report holds; `write_report` returns it."""

    runs: pd.DataFrame
    table: pd.DataFrame
    stats: pd.DataFrame
    problems: pd.DataFrame
    duplicates: pd.DataFrame
    markdown: str
    out: Path
    files: list[Path]


def render_markdown(
    runs: pd.DataFrame,
    table: pd.DataFrame,
    stats: pd.DataFrame,
    problems: pd.DataFrame,
    duplicates: pd.DataFrame,
    dirs: Sequence[str | os.PathLike],
) -> str:
    """The whole report as one Markdown document (also what the CLI prints)."""
    n_ok = int((runs["status"] == COMPLETE).sum())
    n_missed = int((problems["status"] == TARGET_MISSED).sum())
    parts = [
        "# dpm report",
        "",
        f"{len(runs)} run dirs under {', '.join(map(str, dirs))}: {n_ok} complete, {n_missed} short of their "
        f"pruning target, {len(problems) - n_missed} failed or incomplete, "
        f"{int(runs['duplicate_of'].notna().sum())} duplicates left out.",
        "",
        "## Paper table",
        "",
        "Mean ± std over seeds (complete runs, one per config and seed). `top1 %` is the final test "
        "accuracy (headline), `best %` the best over fine-tune epochs (Torch-Pruning reports best). "
        "Δ = mean minus the block's base mean. Paper numbers: results/paper/reference_results.csv.",
        "",
        _markdown(paper_table_display(table)) if len(table) else "(no complete runs)",
        "",
        "## Seed statistics (paired by seed)",
        "",
        "Difference = variant minus base on the same seed (same pretrained checkpoint). 95% t-interval: "
        "mean ± t(0.975, n-1)·sd/√n. MDD (80% power): (t(0.975, n-1) + t(0.80, n-1))·sd/√n, the "
        "smallest true difference these seeds would detect 4 times in 5. Bootstrap (percentile, "
        f"{BOOTSTRAP_RESAMPLES} resamples) only when n >= {BOOTSTRAP_MIN_N}. `includes 0` = YES: the "
        "difference is not shown by these seeds.",
        "",
        _markdown(stats_display(stats)) if len(stats) else "(no base / variant pairs)",
        "",
        "## Failed and incomplete runs",
        "",
        "Never aggregated: failed, killed or unfinished runs, and runs that ended short of their pruning "
        "target (status `target_missed`, `problem` says what they reached).",
        "",
        _markdown(problems),
        "",
        "## Duplicates (same config except run-time keys, same seed)",
        "",
        "Only the newest complete run of each is aggregated.",
        "",
        _markdown(duplicates),
        "",
    ]
    return "\n".join(parts)


def write_report(
    dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    plots: bool = True,
) -> Report:
    """Read the runs under `dirs` and write the report into `out` (default `<first dir>/report`):
    report.md (everything), tables.tex, runs.csv, paper_table.csv, stats.csv, problems.csv,
    duplicates.csv and plots/*.png|pdf. Every file is written atomically. Raises NoRunsError."""
    from dpm.checkpoint import atomic_write_bytes

    out = Path(out) if out is not None else Path(dirs[0]) / REPORT_DIRNAME
    runs = load_runs(dirs)
    ref = load_reference(reference or REFERENCE_CSV)
    table = paper_table(runs, ref)
    stats = seed_statistics(runs)
    problems = problem_runs(runs)
    duplicates = duplicate_runs(runs)
    markdown = render_markdown(runs, table, stats, problems, duplicates, dirs)
    latex = "\n".join(
        [
            _latex(paper_table_display(table), "DPM: ours (mean $\\pm$ std over seeds) against the paper"),
            _latex(stats_display(stats), "Paired differences against base over seeds (95\\% t-intervals)"),
        ]
    )
    files: dict[str, bytes] = {
        "report.md": markdown.encode(),
        "tables.tex": latex.encode(),
        "runs.csv": runs.to_csv(index=False).encode(),
        "paper_table.csv": table.to_csv(index=False).encode(),
        "stats.csv": stats.to_csv(index=False).encode(),
        "problems.csv": problems.to_csv(index=False).encode(),
        "duplicates.csv": duplicates.to_csv(index=False).encode(),
    }
    written = []
    from dpm.faults import fault_point

    for name, data in files.items():
        atomic_write_bytes(out / name, data)
        written.append(out / name)
        fault_point("report:after_first_file")  # tests: a kill while the report is half written
    if plots:
        written += write_plots(runs, ref, out / "plots")
    return Report(runs, table, stats, problems, duplicates, markdown, out, written)


# ----------------------------------------------------------------------------------------------
# Plots


def file_label(label: str, limit: int = 120) -> str:
    """A run label fit for a file name: sweep-dir names of many overrides exceed the 255-byte limit,
    so long ones keep their start and a hash of the whole."""
    import hashlib

    safe = label.replace("/", "_")
    if len(safe) <= limit:
        return safe
    return f"{safe[: limit - 9]}-{hashlib.sha1(safe.encode()).hexdigest()[:8]}"


def _save(fig, path_stem: Path) -> list[Path]:
    """PNG and PDF of a figure, each written atomically."""
    import io

    from dpm.checkpoint import atomic_write_bytes

    paths = []
    for ext in ("png", "pdf"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=120, bbox_inches="tight")
        # Not with_suffix: run labels hold dots (Hydra's `dpm.N=10` sweep dirs) that it would cut.
        path = path_stem.parent / f"{path_stem.name}.{ext}"
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in tests
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_flops(table: pd.DataFrame, ref: pd.DataFrame, path_stem: Path) -> list[Path]:
    """One panel per base pruner: our mean top-1 (± std over seeds) against FLOPs % remaining per
    variant, and the paper's points for the same model and data set as hollow markers."""
    plt = pyplot()
    pruners = sorted(table["pruner"].dropna().unique())
    if not pruners:
        return []
    fig, axes = plt.subplots(1, len(pruners), figsize=(5.5 * len(pruners), 4.2), squeeze=False)
    colors = {"base": "tab:blue", "sp": "tab:orange", "sr": "tab:green"}
    for ax, pruner in zip(axes[0], pruners):
        ours = table[table["pruner"] == pruner]
        for _, row in ours.iterrows():
            label = f"ours {row['model']}/{row['dataset']} {VARIANT_LABEL.get(row['variant'], row['variant'])}"
            if row["sparse_learning"] is not None and not pd.isna(row["sparse_learning"]):
                label += " SL" if row["sparse_learning"] else " no-SL"
            ax.errorbar(
                row["flops_remaining_pct_mean"],
                row["top1_final_mean"],
                xerr=np.nan_to_num(row["flops_remaining_pct_std"]),
                yerr=np.nan_to_num(row["top1_final_std"]),
                fmt="o",
                color=colors.get(row["variant"], "tab:gray"),
                capsize=3,
                label=label,
            )
        models = set(zip(ours["model"], ours["dataset"]))
        same_setting = np.array([m in models for m in zip(ref["model"], ref["dataset"])], dtype=bool)
        theirs = ref[(ref["base_pruner"] == pruner).to_numpy() & same_setting]
        for _, row in theirs.iterrows():
            ax.scatter(
                row["flops_remaining_pct"],
                row["top1"],
                facecolors="none",
                edgecolors=colors.get(row["variant"], "tab:gray"),
                marker="s",
                s=50,
                label=f"paper {row['table']} {VARIANT_LABEL.get(row['variant'], row['variant'])}",
            )
        ax.set_title(pruner)
        ax.set_xlabel("FLOPs remaining (%)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    try:
        return _save(fig, path_stem)
    finally:
        plt.close(fig)


def trajectories_to_draw(dpm_log: dict, limit: int = 8) -> list:
    """At most `limit` of a dpm_log's (key, points) trajectories: the released targets' first (up to
    half of `limit`, more when too few others), then the others, each group in admission order."""
    released = {json.dumps(rel.get("key")) for rel in dpm_log.get("releases") or []}
    tracked = [(key, points) for key, points in dpm_log.get("trajectories") or [] if points]
    hit = [t for t in tracked if json.dumps(t[0]) in released]
    rest = [t for t in tracked if json.dumps(t[0]) not in released]
    n_hit = min(len(hit), max(limit // 2, limit - len(rest)))
    return hit[:n_hit] + rest[: limit - n_hit]


def plot_trajectories(dpm_log: dict, title: str, path_stem: Path, limit: int = 8) -> list[Path]:
    """Norm of tracked decaying targets against the training step (trajectories_to_draw picks at most
    `limit`, released ones first), releases marked: a red x on the trajectory of a released target,
    a faint vertical line at every release step, and a dotted line from a release to the target's
    next admission."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    releases = dpm_log.get("releases") or []
    released_at = {}
    for rel in releases:
        released_at.setdefault(json.dumps(rel.get("key")), []).append(rel["step"])
    for step in sorted({rel["step"] for rel in releases}):
        ax.axvline(step, color="tab:red", alpha=0.15, linestyle=":")
    drawn = trajectories_to_draw(dpm_log, limit)
    for key, points in drawn:
        steps = [p[0] for p in points]
        norms = [p[2] for p in points]
        # One solid line per admission (n restarts at 1); a dotted one from a release to the next
        # admission, where the norm was not logged (its end shows how far it grew back).
        starts = [i for i, p in enumerate(points) if i == 0 or p[1] <= points[i - 1][1]] + [len(points)]
        color = None
        for a, b in zip(starts, starts[1:]):
            (line,) = ax.plot(
                steps[a:b],
                norms[a:b],
                marker=".",
                markersize=3,
                linewidth=1,
                color=color,
                label=None if a else str(tuple(key)),
            )
            color = line.get_color()
            if a:
                ax.plot(steps[a - 1 : a + 1], norms[a - 1 : a + 1], linestyle=":", linewidth=1, color=color)
        for step in released_at.get(json.dumps(key), []):
            # the norm where it was released: the last point at or before the release step
            before = [n for s, n in zip(steps, norms) if s <= step] or norms[:1]
            ax.scatter([step], [before[-1]], marker="x", color="tab:red", s=60, zorder=3)
    tracked = sum(1 for _, points in dpm_log.get("trajectories") or [] if points)
    shown = sum(1 for key, _ in drawn if json.dumps(key) in released_at)
    ax.set_title(
        f"{title}: {len(releases)} releases (red); {len(drawn)} of {tracked} tracked drawn, {shown} released",
        fontsize=9,
    )
    ax.set_xlabel("fine-tune step")
    ax.set_ylabel("target norm")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=6, ncol=2)
    try:
        return _save(fig, path_stem)
    finally:
        plt.close(fig)


#: Facets of the ablation plots: metrics.json field -> axis label.
ABLATION_FACETS = {
    "N": "N (decay steps)",
    "T_rate": "T_rate",
    "T_len": "T_len",
    "release_rule": "release rule",
    "budget": "budget after a release",
    "schedule": "decay schedule s(n)",
}
#: Facets whose values are names, not numbers: drawn at evenly spaced positions, in this order.
CATEGORICAL_FACETS = {
    "release_rule": ["and", "or"],
    "budget": ["base", "strict"],
    "schedule": ["linear", "cosine", "exp"],
}
#: Metrics on the ablation plots' y-axes: field -> axis label.
ABLATION_METRICS = {"top1_final": "top-1 final (%)", "flops_remaining_pct": "FLOPs remaining (%)"}


def ablation_facets(runs: pd.DataFrame) -> list[str]:
    """The ablation facets with at least two distinct values among the aggregated runs of one
    variant of one table (a base / +SP / +SR table, whose base runs have N = 1 and whose +SP runs
    another N, is no N ablation)."""
    ok = aggregated_runs(runs)
    groups = [group for _, group in ok.groupby([ok[k].astype(str) for k in GROUP_KEYS if k in ok])] if len(ok) else []
    return [
        f
        for f in ABLATION_FACETS
        if f in ok and any(_facet_values(group[f], f).dropna().nunique() >= 2 for group in groups)
    ]


def _facet_values(values: pd.Series, facet: str) -> pd.Series:
    """Numbers for a numeric facet; for a categorical one its names (None/NaN where unset)."""
    if facet in CATEGORICAL_FACETS:
        return values.where(values.notna() & (values.astype(str) != "None"), None)
    return pd.to_numeric(values, errors="coerce")


def plot_ablation(runs: pd.DataFrame, facet: str, path_stem: Path) -> list[Path]:
    """Top-1 final and FLOPs % remaining against one facet (N, T_rate, T_len, or the release rule,
    budget or schedule, drawn as named positions): mean ± std over
    seeds, one curve per (model, dataset, pruner, variant). Runs without the facet (e.g. T_rate of a
    base run) are left out; other facets are averaged over, so sweep one facet at a time."""
    plt = pyplot()
    ok = aggregated_runs(runs).copy()
    ok[facet] = _facet_values(ok[facet], facet)
    ok = ok[ok[facet].notna()]
    categories = None
    if facet in CATEGORICAL_FACETS:  # names at evenly spaced positions, the known ones in their order
        known = CATEGORICAL_FACETS[facet]
        categories = [c for c in known if c in set(ok[facet])] + sorted(set(ok[facet]) - set(known))
        ok[facet] = ok[facet].map({c: i for i, c in enumerate(categories)})
    curves = ["model", "dataset", "pruner", "variant"]
    for key in curves:
        if key not in ok:
            ok[key] = None
    fig, axes = plt.subplots(1, len(ABLATION_METRICS), figsize=(5.5 * len(ABLATION_METRICS), 4.2), squeeze=False)
    for ax, (metric, label) in zip(axes[0], ABLATION_METRICS.items()):
        values = ok.assign(_y=pd.to_numeric(ok.get(metric), errors="coerce"))
        for key, group in values.groupby(curves, dropna=False, sort=True):
            stats = group.groupby(facet)["_y"].agg(["mean", "std", "count"]).sort_index()
            if stats["mean"].isna().all():
                continue
            name = f"{key[2]} {VARIANT_LABEL.get(key[3], key[3])} ({key[0]}/{key[1]})"
            ax.errorbar(stats.index, stats["mean"], yerr=np.nan_to_num(stats["std"]), marker="o", capsize=3, label=name)
        ax.set_xlabel(ABLATION_FACETS[facet])
        if categories is not None:
            ax.set_xticks(range(len(categories)), categories)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"ablation: {facet} (mean ± std over seeds)")
    try:
        return _save(fig, path_stem)
    finally:
        plt.close(fig)


def plot_released(logs: dict[str, dict], path_stem: Path) -> list[Path]:
    """Cumulative releases against the fine-tune step, one line per run, from each dpm_log.json's
    `history` (`releases_total` when recorded, else `released`), with the decaying count dashed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for label, dpm_log in logs.items():
        history = [h for h in dpm_log.get("history") or [] if "step" in h]
        if not history:
            continue
        steps = [h["step"] for h in history]
        released = [h.get("releases_total", h.get("released", 0)) for h in history]
        (line,) = axes[0][0].step(steps, released, where="post", label=label)
        axes[0][1].step(
            steps,
            [h.get("decaying", 0) for h in history],
            where="post",
            color=line.get_color(),
            linestyle="--",
            label=label,
        )
    for ax, ylabel in zip(axes[0], ("released (cumulative)", "decaying")):
        ax.set_xlabel("fine-tune step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle("DPM counters over training")
    try:
        return _save(fig, path_stem)
    finally:
        plt.close(fig)


def run_labels(runs: pd.DataFrame, run_dirs: Iterable[str]) -> dict[str, str]:
    """A short file-name-safe label per run dir: its path below the common root of all runs."""
    common = Path(os.path.commonpath([str(Path(d).resolve()) for d in runs["run_dir"]]))
    labels = {}
    for run_dir in run_dirs:
        resolved = Path(run_dir).resolve()
        rel = resolved.relative_to(common) if resolved != common else Path(resolved.name)
        labels[run_dir] = "_".join(rel.parts) or resolved.name
    return labels


def write_plots(runs: pd.DataFrame, ref: pd.DataFrame, out: Path) -> list[Path]:
    """accuracy_vs_flops, ablation_<facet> (facets with >= 2 values), released_over_training and
    trajectories_<run> for every complete run with a dpm_log.json; each as .png and .pdf."""
    written: list[Path] = []
    table = paper_table(runs, ref)
    if len(table):
        written += plot_accuracy_vs_flops(table, ref, out / "accuracy_vs_flops")
    for facet in ablation_facets(runs):
        written += plot_ablation(runs, facet, out / f"ablation_{facet}")
    ok = aggregated_runs(runs)
    if len(ok):
        logs: dict[str, dict] = {}
        for run_dir, label in run_labels(runs, ok["run_dir"]).items():
            log_path = Path(run_dir) / "dpm_log.json"
            if not log_path.is_file():
                continue
            logs[label] = json.loads(log_path.read_text())
            written += plot_trajectories(logs[label], label, out / f"trajectories_{file_label(label)}")
        if any(log.get("history") for log in logs.values()):
            written += plot_released(logs, out / "released_over_training")
    # plots/ is the report's own: a plot an earlier report into the same folder drew and this one
    # did not (a facet that no longer varies, a run left out) must not pass for one of this report's.
    for stale in [p for p in out.glob("*") if p.suffix in (".png", ".pdf") and p not in written]:
        stale.unlink()
    return written


# ----------------------------------------------------------------------------------------------
# W&B


def _wandb_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame W&B's Table accepts: numeric columns as they are, every other column as text (mixed
    None / bool / str columns make wandb.Table guess a type and refuse the rest)."""
    out = frame.reset_index(drop=True).copy()
    for col in out.columns:
        if not pd.api.types.is_numeric_dtype(out[col]) or pd.api.types.is_bool_dtype(out[col]):
            out[col] = out[col].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    out.columns = [str(c) for c in out.columns]
    return out


def log_report_to_wandb(
    report: Report, mode: str | None = None, project: str = "dpm", entity: str | None = None
) -> Path:
    """Log a written report into one W&B run (job_type `report`): the paper table, the seed
    statistics, the runs, the failed/incomplete runs and the duplicates as W&B Tables (display
    text, as in report.md; the numeric paper table too), every PNG plot as an image, and the counts
    as the summary. `mode` None: WANDB_MODE, else online. The W&B files go to `<report dir>/wandb`.
    Returns the W&B run's local dir."""
    import wandb

    run = wandb.init(
        project=project,
        entity=entity,
        mode=mode,
        job_type="report",
        name=f"report-{report.out.resolve().parent.name}",
        dir=str(report.out),
        config={"report_dir": str(report.out), "runs": int(len(report.runs))},
        reinit="finish_previous",
    )
    try:
        run_columns = [c for c in [*RUN_COLUMNS, "run_dir"] if c in report.runs]
        tables = {
            "paper_table": paper_table_display(report.table) if len(report.table) else report.table,
            "paper_table_numeric": report.table,
            "seed_statistics": stats_display(report.stats) if len(report.stats) else report.stats,
            "runs": report.runs[run_columns],
            "problems": report.problems,
            "duplicates": report.duplicates,
        }
        payload: dict[str, Any] = {name: wandb.Table(dataframe=_wandb_frame(frame)) for name, frame in tables.items()}
        for path in report.files:
            if path.suffix == ".png":
                payload[f"plots/{path.stem}"] = wandb.Image(str(path))
        run.log(payload)
        run.summary.update(
            {
                "runs": int(len(report.runs)),
                "complete": int((report.runs["status"] == COMPLETE).sum()),
                "failed_or_incomplete": int(len(report.problems)),
                "duplicates": int(report.runs["duplicate_of"].notna().sum()),
            }
        )
        run_dir = Path(run.dir).parent  # run.dir is <run>/files
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return run_dir


def report_runs(dirs: Sequence[str | os.PathLike], logger_cfg: Any = None, plots: bool = True) -> Report:
    """`write_report`, and with `logger_cfg.name == "wandb"` (the runs logged to W&B) the report
    logged there too: what the quickstart and the multirun callback end with."""
    report = write_report(dirs, plots=plots)
    if logger_cfg is not None and logger_cfg.name == "wandb":
        log_report_to_wandb(report, mode=logger_cfg.mode, project=logger_cfg.project, entity=logger_cfg.entity)
    return report


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dpm.report <dir>... [--out DIR] [--reference CSV] [--no-plots] [--wandb ...]`: write
    the report and print it (and log it to W&B with --wandb). Exit status 2 with one line for bad
    input (no runs, not a directory)."""
    parser = argparse.ArgumentParser(prog="python -m dpm.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="directories holding run dirs (searched recursively)")
    parser.add_argument("--out", help="report dir (default: <first dir>/report)")
    parser.add_argument("--reference", default=str(REFERENCE_CSV), help="the paper's numbers (CSV)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the tables (W&B Tables) and plots (images) into one W&B run, job_type report",
    )
    parser.add_argument(
        "--wandb-mode",
        choices=["online", "offline", "disabled"],
        help="W&B mode (default: $WANDB_MODE, else online); offline files go to <out>/wandb",
    )
    parser.add_argument("--wandb-project", default="dpm", help="W&B project (default: dpm)")
    args = parser.parse_args(argv)
    if not Path(args.reference).is_file():
        print(
            f"error: --reference={args.reference} does not exist: give the paper's reference_results.csv",
            file=sys.stderr,
        )
        return 2
    try:
        report = write_report(args.dirs, args.out, args.reference, plots=not args.no_plots)
    except NoRunsError as err:
        print(f"error: {err}: give the output dir of a run or sweep (e.g. outputs/quickstart)", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"report: {report.out} ({len(report.files)} files)")
    if args.wandb:
        print(f"W&B run: {log_report_to_wandb(report, mode=args.wandb_mode, project=args.wandb_project)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
