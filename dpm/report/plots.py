"""Plots (PNG + PDF): accuracy vs FLOPs against the paper, paired differences by seed, norm trajectories,
ablations, releases."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from dpm.checkpoint import atomic_write_bytes
from dpm.report.frame import BLOCK_KEYS, GROUP_KEYS, VARIANT_LABEL
from dpm.report.loading import aggregated_runs
from dpm.report.statistics import paired_differences, paired_interval
from dpm.report.tables import paper_table


def file_label(label: str, limit: int = 120) -> str:
    """A run label fit for a file name: sweep-dir names of many overrides exceed the 255-byte limit,
    so long ones keep their start and a hash of the whole."""

    safe = label.replace("/", "_")
    if len(safe) <= limit:
        return safe
    return f"{safe[: limit - 9]}-{hashlib.sha1(safe.encode()).hexdigest()[:8]}"


def _save(fig, path_stem: Path) -> list[Path]:
    """PNG and PDF of a figure, each written atomically; the figure is closed either way."""
    try:
        paths = []
        for ext in ("png", "pdf"):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=ext, dpi=120, bbox_inches="tight")
            # Not with_suffix: run labels hold dots (Hydra's `dpm.N=10` sweep dirs) that it would cut.
            path = path_stem.parent / f"{path_stem.name}.{ext}"
            atomic_write_bytes(path, buffer.getvalue())
            paths.append(path)
        return paths
    finally:
        pyplot().close(fig)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib  # deferred: matplotlib takes a second to import, and only plots need it

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
            if ours.get("target", pd.Series(dtype=object)).nunique() > 1:  # one pruner at two targets
                label += f" ({row['target']})"
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
    return _save(fig, path_stem)


def plot_paired_differences(diffs: pd.DataFrame, path_stem: Path, metric: str = "top1_final") -> list[Path]:
    """One panel per block (base pruner, model, data set, table): each comparison's difference to
    its base seed by seed (variant - base, :func:`paired_differences`), its mean and 95% t-interval
    (:func:`paired_interval`, as in the seed statistics) as a band, and zero."""
    plt = pyplot()
    diffs = diffs[diffs["metric"] == metric]
    blocks = list(diffs.groupby(BLOCK_KEYS, dropna=False, sort=True))
    if not blocks:
        return []
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.5 * len(blocks), 4.2), squeeze=False)
    colors = ["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    for ax, (key, block) in zip(axes[0], blocks):
        keys = dict(zip(BLOCK_KEYS, key))
        comparisons = list(dict.fromkeys(block["comparison"]))
        for i, (comparison, color) in enumerate(zip(comparisons, colors)):
            rows = block[block["comparison"] == comparison]
            ax.scatter(rows["seed"] + 0.12 * (i - (len(comparisons) - 1) / 2), rows["diff"], color=color, s=22)
            iv = paired_interval(rows["diff"])
            label = f"{comparison}: {iv.mean:+.2f}"
            if not np.isnan(iv.low):
                ax.axhspan(iv.low, iv.high, color=color, alpha=0.15)
                label += f" [{iv.low:+.2f}, {iv.high:+.2f}], won {int((rows['diff'] > 0).sum())}/{iv.n}"
            ax.axhline(iv.mean, color=color, linewidth=1.2, label=label)
        ax.axhline(0.0, color="black", linestyle="--", linewidth=0.8)
        title = f"{keys.get('pruner')} {keys.get('model')}/{keys.get('dataset')}"
        if isinstance(keys.get("target"), str) and keys["target"]:  # NaN or "" where runs name none
            title += f" at {keys['target']}"
        ax.set_title(title + (f" ({keys['table']})" if keys.get("table") else ""), fontsize=9)
        ax.set_xlabel("seed")
        ax.set_ylabel(f"{metric}: variant - base (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path_stem)


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
    return _save(fig, path_stem)


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
    return _save(fig, path_stem)


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
    return _save(fig, path_stem)


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
    """accuracy_vs_flops, paired_differences, ablation_<facet> (facets with >= 2 values), released_over_training and
    trajectories_<run> for every complete run with a dpm_log.json; each as .png and .pdf."""
    written: list[Path] = []
    table = paper_table(runs, ref)
    if len(table):
        written += plot_accuracy_vs_flops(table, ref, out / "accuracy_vs_flops")
    written += plot_paired_differences(paired_differences(runs), out / "paired_differences")
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
