"""The paper tables: mean / std / n over seeds per row, deltas against base, the paper's numbers beside ours."""

from __future__ import annotations

import os

import pandas as pd

from dpm.report.frame import AGG_METRICS, BLOCK_KEYS, GROUP_KEYS, REFERENCE_CSV, VARIANT_ORDER
from dpm.report.loading import _as_bool, aggregated_runs, run_settings


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
