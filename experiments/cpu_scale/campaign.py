"""The CPU-scale CIFAR-10 campaign (issue 11): baselines, selection on validation, paired tables.

    python experiments/cpu_scale/campaign.py all            # every stage, resumable (hours on 2 cores)
    python experiments/cpu_scale/campaign.py pretrain       # the per-seed baselines (shared by all bases)
    python experiments/cpu_scale/campaign.py select --bases depgraph
    python experiments/cpu_scale/campaign.py table --bases depgraph,otov2
    python experiments/cpu_scale/campaign.py report         # results/cpu_scale/ from every finished table
    python experiments/cpu_scale/campaign.py trajectories   # seed 0's +SR again, every norm logged
    python experiments/cpu_scale/campaign.py status         # what is archived, what is left (runs nothing)

Every stage is a Hydra multirun of `python -m dpm` into a fixed sweep dir under
`$DPM_OUTPUT_ROOT/cpu_scale/` (run_id=campaign), so re-running a stage skips its complete runs and
resumes killed ones from their checkpoints: the campaign can be carried across several sittings.

Selection (never on the test set): on seed SELECT_SEED's validation split (5,000 held-out training
images), +SP picks N from N_GRID by `val_top1_final`; then +SR, at that N, picks (T_rate, T_len)
from SR_GRID_OF[base]; only runs that met their pruning target are eligible. `selection_<base>.csv`
records every point; the chosen values feed the table, which
runs base / +SP / +SR over SEEDS and reports test accuracy. `all` runs the tables one seed at a
time (the seed's baseline, then every base's runs from it: see seed_blocks).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The records' layer beside this file; on sys.path also when this file is loaded by path (tests).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from campaign_records import (  # noqa: E402
    PRETRAIN_SUBDIR,
    ROOT,
    TABLE_SUBDIR,
    VARIANTS,
    archive,
    archive_dir,
    archived_metrics,
    check_baselines,
    chosen,
    chosen_path,
    pretrain_run_name,
    restore,
    results_dir,
    runs_of,
    seed_list,
    sweep_dir,
    table_archived,
    table_done,
)

# depgraph_4x: the compression facet, DepGraph at 4x MACs (conf/experiment/cpu_scale/depgraph_4x.yaml),
# a base of its own here: its own selection, base runs and report block.
BASES = ("depgraph", "otov2", "gate_decorator", "depgraph_4x")
FACETS = ("depgraph_4x",)  # kept out of the SR defaults, which describe the three pruners
SEEDS = ",".join(str(s) for s in range(15))  # issue 23: 15 paired seeds (the five-seed campaign: 0-4)
SELECT_SEED = 0
N_GRID = {
    "depgraph": (0.1, 0.5, 1.5),
    "otov2": (0.1, 0.25, 1.0),
    "gate_decorator": (0.1, 0.5, 1.0),
    "depgraph_4x": (0.1, 0.5, 1.5),
}
# SR's two thresholds at two values each (radial C_rate, release rule `and`): 4 runs a base, sized
# so that the campaign fits a few sittings on 2 cores. T_len from a DepGraph pilot on seed 0 (N = 0.5
# epoch, T_rate 0): T_len 1 released 259 of 278 admitted channels, 2 released 13 of 128, 4 none.
# Gate Decorator's T_len is higher: its decaying units are single gates, whose per-step C_len is
# noisy, and the rule is checked at every one of N steps. A pilot on seed 0 (N = 1 epoch, no release
# possible, T_len 1e9) logged, over 775 checked steps, a per-step maximum C_len among the decaying
# units with median 2.84, 90th percentile 3.83, 99th 4.99 (max 6.37): with T_len 2 nearly every unit
# was released within its tick and the run never reached its FLOPs target.
SR_GRID = {"dpm.T_rate": (0.0, 1e-3), "dpm.T_len": (2.0, 3.0)}
SR_GRID_OF = {
    "depgraph": SR_GRID,
    "otov2": SR_GRID,
    "gate_decorator": {"dpm.T_rate": (0.0, 1e-3), "dpm.T_len": (4.0, 6.0)},
    "depgraph_4x": SR_GRID,
}
# Smoke mode (tests): a tiny slice of the same data and recipe, seconds per run.
SMOKE = [
    "dataset.train_subset=400",
    "dataset.val_size=200",
    "dataset.test_subset=200",
    "trainer.pretrain.epochs=1",
    "trainer.max_steps_per_epoch=3",
    "trainer.eval_batch_size=200",
]


# Fields a trajectories replay must share with the table run it repeats (dpm.track only logs).
REPLAY_FIELDS = ("top1_final", "val_top1_final", "test_loss_final", "released", "flops_remaining_pct")


def grids(base: str, smoke: bool) -> tuple[tuple, dict]:
    """N_epochs and SR grids (smaller in smoke mode)."""
    if smoke:
        return N_GRID[base][:2], {"dpm.T_rate": (0.0,), "dpm.T_len": (1.0, 2.0)}
    return N_GRID[base], SR_GRID_OF[base]


# Every stage trains on one thread: CPU runs are bitwise reproducible only at one thread count, so a
# selection run and the table run of the same config, seed and baseline are the same run; and two
# campaign processes (two seed ranges) side by side use both cores, where a 2-thread run beside a
# 1-thread one spins (README: 115-143 s a baseline epoch instead of 30 s).
THREADS = 1


def require_native_bf16() -> None:
    """The campaign's recipe is the fast path (bf16 autocast + channels_last): trainer.fast=null
    resolves to it only on a CPU with native bf16, elsewhere to fp32 NCHW, another recipe than the
    archived runs' (and about 2.5x slower). Refused with one line before any run starts."""
    import dpm.train

    native, how = dpm.train.cpu_bf16_native()
    if not native:
        raise SystemExit(
            f"this CPU has no native bf16 ({how}): the campaign's runs are defined on the fast path "
            f"(bf16 autocast + channels_last), which needs avx512_bf16 or amx; run it on such a CPU, "
            f"or add --smoke to try the pipeline here"
        )


def multirun(
    stage: str, overrides: list[str], smoke: bool, allow_failed: bool = False, subdir: str = "${hydra.job.num}"
) -> Path:
    """One resumable sweep; returns its dir. A failed point fails the stage (after the others ran),
    unless `allow_failed` (a selection grid: a point that failed, e.g. never reached its pruning
    target, is simply not eligible). Archived runs are restored first (except the baselines: their
    checkpoints are re-made, and check_baselines compares them), and every run that completes is
    archived as soon as it does. `subdir` names each run's folder (Hydra interpolation): the job
    number where the grid is fixed, the seed (and variant) where sittings run different seeds.
    A run another live process holds (a second campaign process on the same seeds) is skipped by the
    sweep, not failed: that process runs, archives and reports it."""
    out = sweep_dir(stage)
    if stage != "pretrain" and (n := restore(stage, smoke)):
        print(f"{stage}: {n} finished run(s) restored from {archive_dir(stage, smoke)}", flush=True)
    extra = []
    if smoke:  # DepGraph's second round must fall inside the 3-step smoke epochs
        extra = SMOKE + (["pruner.round_interval=6"] if "depgraph" in stage else [])
    # Numbered run dirs: the overrides would make names longer than a file name may be (each run's
    # config.yaml says what it is), and a job's number is stable when a stage is re-run.
    cmd = [
        sys.executable,
        "-m",
        "dpm",
        "-m",
        *overrides,
        *extra,
        "run_id=campaign",
        f"hydra.sweep.dir={out}",
        f"hydra.sweep.subdir={subdir}",
        *os.environ.get("CAMPAIGN_LAUNCHER", "").split(),
    ]
    print(f"+ OMP_NUM_THREADS={THREADS}", " ".join(cmd), flush=True)
    sweep = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    while sweep.poll() is None:
        time.sleep(1 if smoke else 30)
        archive(stage, smoke)
    archive(stage, smoke)
    if sweep.returncode != 0:
        if not allow_failed:
            raise SystemExit(
                f"{stage}: the sweep exited {sweep.returncode}: its error line above says how many runs did not "
                f"complete and where its report is (run again, the stage skips its complete runs)"
            )
        print(f"{stage}: some points failed (exit {sweep.returncode}); they are not eligible", flush=True)
    return out


def best(runs: list[dict], key: str) -> dict:
    """Highest validation accuracy among the runs that met their pruning target (a run that pruned
    less is not comparable); ties go to the first (the grids list conservative values first)."""
    if not runs:
        raise SystemExit(f"no complete selection run to choose {key} from: run the select stage first")
    eligible = [m for m in runs if m.get("target_met", True)]
    if not eligible:
        raise SystemExit(f"no selection run for {key} met its pruning target: see the selection CSV")
    return max(eligible, key=lambda m: m["val_top1_final"])


def select(base: str, smoke: bool) -> dict:
    """+SP's N, then +SR's thresholds at that N, on the validation split of SELECT_SEED. A base whose
    choice is already in the results is not selected again (delete its chosen_<base>.json to redo it):
    its table must keep using the choice it was given."""
    path = chosen_path(base, smoke)
    if path.exists():
        print(f"{base}: selection done, keeping {path}", flush=True)
        return json.loads(path.read_text())
    common = [f"experiment=cpu_scale/{base}", f"seed={SELECT_SEED}", "ablation=selection"]
    base_dir = multirun(f"select_{base}_base", [*common, "dpm=base"], smoke)
    n_grid, sr_grid = grids(base, smoke)
    sp_dir = multirun(
        f"select_{base}_sp", [*common, "dpm=sp", f"dpm.N_epochs={','.join(map(str, n_grid))}"], smoke, allow_failed=True
    )
    chosen_sp = best(runs_of(sp_dir), "N")
    n_epochs = n_epochs_of(chosen_sp)
    sr_dir = multirun(
        f"select_{base}_sr",
        [*common, "dpm=sr", f"dpm.N_epochs={n_epochs}", *(f"{k}={','.join(map(str, v))}" for k, v in sr_grid.items())],
        smoke,
        allow_failed=True,
    )
    sr_runs = runs_of(sr_dir)
    chosen_sr = best(sr_runs, "T_rate, T_len")
    choice = {
        "base": base,
        "N_epochs": n_epochs,
        "T_rate": chosen_sr["T_rate"],
        "T_len": chosen_sr["T_len"],
        "sp_val_top1": chosen_sp["val_top1_final"],
        "sr_val_top1": chosen_sr["val_top1_final"],
        "base_val_top1": next((m["val_top1_final"] for m in runs_of(base_dir)), None),
    }
    write_selection(base, runs_of(base_dir) + runs_of(sp_dir) + sr_runs, choice, smoke)
    return choice


def n_epochs_of(metrics: dict) -> float:
    """The dpm.N_epochs a run was configured with (from its resolved config)."""
    import yaml

    config = yaml.safe_load((Path(metrics["run_dir"]) / "config.yaml").read_text())
    return config["dpm"]["N_epochs"]


def write_selection(base: str, runs: list[dict], choice: dict, smoke: bool) -> None:
    import pandas as pd

    out = results_dir(smoke) / "selection"
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "variant": m["variant"],
            "N_epochs": n_epochs_of(m) if m["variant"] != "base" else None,
            "N": m["N"],
            "T_rate": m.get("T_rate"),
            "T_len": m.get("T_len"),
            "val_top1_final": m["val_top1_final"],
            "released": m.get("released"),
            "flops_remaining_pct": m["flops_remaining_pct"],
            "target_met": m.get("target_met"),
        }
        for m in runs
    ]
    frame = pd.DataFrame(rows)
    frame.to_csv(out / f"selection_{base}.csv", index=False)
    chosen_path(base, smoke).write_text(json.dumps(choice, indent=2) + "\n")
    plot_selection(base, frame, choice, out / f"selection_{base}.png")
    print(f"{base}: chose {choice}")


def plot_selection(base: str, frame, choice: dict, path: Path) -> None:
    """The selection as ablation curves of validation top-1: +SP against N (log scale), +SR against
    T_len, one line per T_rate, with the base run and the chosen +SP as reference lines; a point that
    missed its pruning target (never eligible) is crossed out in red."""
    from dpm.report import pyplot

    plt = pyplot()
    fig, (ax_n, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    sp = frame[frame["variant"] == "sp"].sort_values("N_epochs")
    ax_n.plot(sp["N_epochs"], sp["val_top1_final"], "o-", label="+SP")
    ax_n.axvline(choice["N_epochs"], color="tab:green", alpha=0.4, label="chosen N")
    ax_n.set_xscale("log")
    ax_n.set_xlabel("N (epochs of decay)")
    sr = frame[frame["variant"] == "sr"]
    for t_rate, group in sr.groupby("T_rate"):
        group = group.sort_values("T_len")
        ax_t.plot(group["T_len"], group["val_top1_final"], "o-", label=f"+SR, T_rate = {t_rate:g}")
    ax_t.axhline(choice["sp_val_top1"], color="tab:blue", linestyle=":", label="+SP at the chosen N")
    for ax, rows, x in ((ax_n, sp, "N_epochs"), (ax_t, sr, "T_len")):
        missed = rows[rows["target_met"] == False]  # noqa: E712 (NaN: unknown, not missed)
        if len(missed):
            ax.plot(missed[x], missed["val_top1_final"], "x", color="tab:red", ms=9, label="missed its target")
    ax_t.set_xlabel(f"T_len (+SR at N = {choice['N_epochs']:g} epochs)")
    for ax in (ax_n, ax_t):
        if choice.get("base_val_top1") is not None:
            ax.axhline(choice["base_val_top1"], color="gray", linestyle="--", label="base")
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{base}: selection on seed {SELECT_SEED}'s validation split")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def sr_defaults(bases: list[str], smoke: bool) -> dict:
    """The SR thresholds that beat +SP on validation by the most, averaged over the bases whose
    selection is done (each SR point against its base's chosen +SP); `beats_sp` false when none does."""
    import pandas as pd

    out = results_dir(smoke) / "selection"
    gains = []
    for base in bases:
        path = out / f"selection_{base}.csv"
        if not path.exists():
            continue
        frame = pd.read_csv(path)
        sp_val = chosen(base, smoke)["sp_val_top1"]
        sr = frame[(frame["variant"] == "sr") & (frame["target_met"] != False)]  # noqa: E712 (NaN: unknown)
        gains += [
            {"base": base, "T_rate": r.T_rate, "T_len": r.T_len, "gain": round(r.val_top1_final - sp_val, 4)}
            for r in sr.itertuples()
        ]
    if not gains:
        raise SystemExit("no selection has run yet: run the select stage first")
    gains = pd.DataFrame(gains)
    mean = gains.groupby(["T_rate", "T_len"])["gain"].agg(["mean", "count"]).reset_index()
    top = mean.loc[mean["mean"].idxmax()]
    # Each base's own verdict too: the grids differ between bases (SR_GRID_OF), so a grid point's
    # mean may stand for fewer bases than were selected (`bases` says how many).
    per_base = {}
    for b, g in gains.groupby("base", sort=False):
        win = g.loc[g["gain"].idxmax()]
        per_base[b] = {
            "T_rate": float(win["T_rate"]),
            "T_len": float(win["T_len"]),
            "best_val_gain_over_sp": float(win["gain"]),
            "beats_sp": bool(win["gain"] > 0),
        }
    result = {
        "c_rate_form": "radial",
        "T_rate": float(top["T_rate"]),
        "T_len": float(top["T_len"]),
        "mean_val_gain_over_sp": float(top["mean"]),
        "bases": int(top["count"]),
        "beats_sp": bool(top["mean"] > 0),
        "per_base": per_base,
        "grid": mean.to_dict(orient="records"),
    }
    (out / "sr_defaults.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"SR defaults from validation: {result}")
    return result


def table_overrides(base: str, smoke: bool) -> list[str]:
    """A base's table recipe at its chosen N and thresholds (no variant, no seed)."""
    c = chosen(base, smoke)
    return [
        f"experiment=cpu_scale/{base}",
        f"dpm.N_epochs={c['N_epochs']}",
        f"dpm.T_rate={c['T_rate']}",
        f"dpm.T_len={c['T_len']}",
    ]


def table(base: str, seeds: str, smoke: bool) -> Path:
    return multirun(
        f"table_{base}",
        [*table_overrides(base, smoke), f"dpm={','.join(VARIANTS)}", f"seed={seeds}"],
        smoke,
        subdir=TABLE_SUBDIR,
    )


def pretrain(seeds: str, smoke: bool) -> None:
    """The baselines of `seeds` (made again where only their record survives), each compared with its
    archived record."""
    multirun("pretrain", ["experiment=cpu_scale/pretrain", f"seed={seeds}"], smoke, subdir=PRETRAIN_SUBDIR)
    check_baselines(smoke)


def seed_blocks(bases: list[str], seeds: list[int], smoke: bool) -> None:
    """`all`'s tables, one seed at a time: a seed's baseline and every table run that starts from it
    in one sitting, so a later sitting (another host, maybe another torch build) never has to
    re-make a baseline its archived runs started from. A seed whose table runs are all archived is
    skipped without re-making its baseline; one interrupted inside its block re-makes it, and the
    baseline check refuses to go on if it came out different."""
    for seed in seeds:
        todo = [b for b in bases if not table_done(b, seed, smoke)]
        if not todo:
            print(f"seed {seed}: every table run is archived", flush=True)
            continue
        pretrain(str(seed), smoke)
        for base in todo:
            table(base, str(seed), smoke)


# Issue 23's goal: DepGraph 2x +SP's minimum detectable difference (80% power) at <= 0.25 points.
MDD_GOAL = 0.25


def spread_lines(base: str, planned: int, smoke: bool) -> list[str]:
    """Per variant, the spread of the paired differences (variant - base, test top-1) of the seeds
    archived so far, and the MDD `planned` seeds would reach at that spread, with the seeds MDD_GOAL
    needs: what decides whether the planned seeds suffice. Never the mean difference: choosing how
    many seeds to run from the spread leaves the test's level intact, from the mean it would not."""
    from dpm.report import VARIANT_LABEL, minimum_detectable

    top1 = {}
    for path in archived_metrics(f"table_{base}", smoke):
        m = json.loads(path.read_text())
        if m.get("status") == "complete" and m.get("top1_final") is not None:
            top1[(m["seed"], m["variant"])] = m["top1_final"]
    lines = []
    for variant in VARIANTS[1:]:
        paired = sorted(s for s, v in top1 if v == variant and (s, "base") in top1)
        label = f"  {base} {VARIANT_LABEL[variant]}"
        if len(paired) < 2:
            if paired:
                lines.append(f"{label}: 1 paired seed, no spread yet")
            continue
        sd = statistics.stdev([top1[(s, variant)] - top1[(s, "base")] for s in paired])
        need = next((n for n in range(2, 10_001) if minimum_detectable(sd, n) <= MDD_GOAL), None)
        lines.append(
            f"{label}: paired sd {sd:.2f} over {len(paired)} seeds; at that sd {planned} seeds detect "
            f"{minimum_detectable(sd, planned):.2f} points (MDD), {MDD_GOAL:g} needs "
            + (f"{need} seeds" if need else "more than 10,000 seeds")
        )
    return lines


def status(bases: list[str], seeds: list[int], smoke: bool) -> None:
    """What the archive holds and what is left (reads records only; no run starts): the baselines,
    per base its selection, its table and the median wall time of its archived runs, and the runs
    left with a rough time at those medians (one thread a run; two processes on disjoint seeds take
    about half), and the spread of each comparison's paired differences so far (spread_lines)."""

    def median_wall(paths: list[Path]) -> float | None:
        walls = [json.loads(p.read_text()).get("wall_time_s") for p in paths]
        walls = [w for w in walls if w]
        return statistics.median(walls) if walls else None

    def median_text(seconds: float | None) -> str:
        return f"median run {seconds:.0f} s" if seconds is not None else "no run timed yet"

    baselines = archived_metrics("pretrain", smoke)
    baseline_names = {p.parent.name for p in baselines}
    with_baseline = [s for s in seeds if pretrain_run_name(s) in baseline_names]
    baseline_wall = median_wall(baselines)
    print(
        f"baselines archived: {len(with_baseline)} of {len(seeds)} seeds ({seed_list(with_baseline)}); "
        + median_text(baseline_wall)
    )
    left: dict[str, int] = {}
    walls: dict[str, float | None] = {}
    for base in bases:
        n_grid, sr_grid = grids(base, smoke)
        selected = [p for v in VARIANTS for p in archived_metrics(f"select_{base}_{v}", smoke)]
        walls[base] = median_wall(selected + archived_metrics(f"table_{base}", smoke))
        left[base] = 0
        if chosen_path(base, smoke).exists():
            selection = "selection done"
        else:
            points = 1 + len(n_grid) + len(list(itertools.product(*sr_grid.values())))
            selection = f"selection {len(selected)}/{points} runs"
            left[base] += points - len(selected)
        per_seed = {s: table_archived(base, s, smoke) for s in seeds}
        complete = [s for s, n in per_seed.items() if n == len(VARIANTS)]
        partial = [s for s, n in per_seed.items() if 0 < n < len(VARIANTS)]
        have, total = sum(per_seed.values()), len(seeds) * len(VARIANTS)
        left[base] += total - have
        line = f"{base}: {selection}; table {have}/{total} runs, seeds complete: {seed_list(complete)}"
        print(line + (f", partial: {seed_list(partial)}" if partial else "") + "; " + median_text(walls[base]))
        for spread in spread_lines(base, len(seeds), smoke):
            print(spread)
    # A base with no timed run yet is estimated at the median of the others'.
    fallback = statistics.median([w for w in walls.values() if w is not None] or [0.0])
    baselines_left = len(seeds) - len(with_baseline)
    seconds = sum(n * (walls[b] if walls[b] is not None else fallback) for b, n in left.items())
    seconds += baselines_left * (baseline_wall or 0.0)
    print(
        f"left: {sum(left.values())} runs and {baselines_left} baseline{'s' if baselines_left != 1 else ''}, "
        f"about {seconds / 3600:.1f} h at one thread (each base's median archived run)"
    )


def trajectories(base: str, smoke: bool) -> dict:
    """Seed SELECT_SEED's +SR table run once more with every target's norm logged (dpm.track=null; the
    table's runs log the first 8 admitted, which were never released), its plot drawn with released
    targets first. The replay must equal the table run in REPLAY_FIELDS (tracking only logs), or the
    stage fails; `replay_<base>.json` records both."""
    from dpm.report import plot_trajectories

    restore(f"table_{base}", smoke)
    original = [m for m in runs_of(sweep_dir(f"table_{base}")) if m["variant"] == "sr" and m["seed"] == SELECT_SEED]
    if not original:
        raise SystemExit(f"{base}: the table has no complete +SR run of seed {SELECT_SEED}: run its table stage first")
    replay_dir = multirun(
        f"trajectories_{base}",
        [*table_overrides(base, smoke), "dpm=sr", f"seed={SELECT_SEED}", "dpm.track=null"],
        smoke,
    )
    (replay,) = runs_of(replay_dir)
    differ = {k: [original[0].get(k), replay.get(k)] for k in REPLAY_FIELDS if original[0].get(k) != replay.get(k)}
    out = results_dir(smoke) / "trajectories"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "base": base,
        "seed": SELECT_SEED,
        "same": not differ,
        "differ": differ,
        "table_run": {k: original[0].get(k) for k in REPLAY_FIELDS},
        "replay": {k: replay.get(k) for k in (*REPLAY_FIELDS, "wall_time_s", "git_sha")},
    }
    (out / f"replay_{base}.json").write_text(json.dumps(record, indent=2) + "\n")
    dpm_log = json.loads((Path(replay["run_dir"]) / "dpm_log.json").read_text())
    plot_trajectories(dpm_log, f"{base} +SR, seed {SELECT_SEED}", out / f"trajectories_{base}")
    if differ:
        raise SystemExit(
            f"{base}: the replay differs from the table run ({differ}): re-run it on the same torch "
            f"build and thread count (OMP_NUM_THREADS) as the table"
        )
    print(f"{base}: replay equals the table run; {out / f'trajectories_{base}.png'}", flush=True)
    return record


def report(bases: list[str], smoke: bool) -> None:
    """The full report (a trajectory plot for every run) under the output tree; into the results a
    curated copy: every table and CSV, the summary plots, and seed 0's +SP / +SR trajectories."""
    import shutil

    import pandas as pd

    from dpm.report import file_label, run_labels

    for b in bases:
        restore(f"table_{b}", smoke)
    dirs = [str(sweep_dir(f"table_{b}")) for b in bases if sweep_dir(f"table_{b}").exists()]
    if not dirs:
        raise SystemExit("no table sweep has run yet")
    full = sweep_dir("report")
    subprocess.run([sys.executable, "-m", "dpm.report", *dirs, "--out", str(full)], cwd=ROOT, check=True)
    out = results_dir(smoke) / "report"
    if out.exists():
        shutil.rmtree(out)
    (out / "plots").mkdir(parents=True)
    for path in full.iterdir():
        if path.is_file():
            shutil.copy2(path, out / path.name)
    runs = pd.read_csv(full / "runs.csv")
    seed0 = runs[(runs["seed"] == SELECT_SEED) & runs["variant"].isin(["sp", "sr"])]
    keep = {file_label(label) for label in run_labels(runs, seed0["run_dir"]).values()}  # dpm.report's plot names
    for path in (full / "plots").iterdir():
        stem = path.stem.removeprefix("trajectories_")
        if not path.stem.startswith("trajectories_") or (stem in keep and path.suffix == ".png"):
            shutil.copy2(path, out / "plots" / path.name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["pretrain", "select", "table", "report", "trajectories", "all", "status"])
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--seeds", default=SEEDS)
    parser.add_argument("--smoke", action="store_true", help="a tiny slice of the data, seconds per run (tests)")
    args = parser.parse_args(argv)
    bases = [b for b in args.bases.split(",") if b]
    unknown = set(bases) - set(BASES)
    if unknown:
        parser.error(f"unknown base(s) {sorted(unknown)}; valid: {', '.join(BASES)}")
    if not args.smoke and args.stage not in ("report", "status"):
        require_native_bf16()
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",") if s})
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2")
    if args.stage == "status":
        return status(bases, seeds, args.smoke)
    if args.stage == "pretrain":
        pretrain(",".join(map(str, sorted({*seeds, SELECT_SEED}))), args.smoke)
    # Every selection before any table: the SR defaults (conf/dpm/sr.yaml) need all bases' choices,
    # and a sitting that ends mid-campaign leaves complete selections rather than one finished base.
    # The selection starts from SELECT_SEED's baseline: `all` makes it only while a choice is missing.
    failed: dict[str, str] = {}
    if args.stage == "all" and any(not chosen_path(b, args.smoke).exists() for b in bases):
        pretrain(str(SELECT_SEED), args.smoke)
    if args.stage in ("select", "all"):
        for base in bases:
            try:
                select(base, args.smoke)
            except SystemExit as err:  # one base's selection must not hold up the others'
                failed[base] = str(err)
                print(f"{base}: selection failed: {err}", flush=True)
        sr_defaults([b for b in BASES if b not in failed and b not in FACETS], args.smoke)  # selected so far
    if args.stage == "table":
        for base in bases:
            if base not in failed:
                table(base, ",".join(map(str, seeds)), args.smoke)
    if args.stage == "all":
        seed_blocks([b for b in bases if b not in failed], seeds, args.smoke)
    if args.stage == "report":
        report(bases, args.smoke)
    if args.stage == "all":  # every base archived so far: an `all` of some bases never drops the others' tables
        report(list(BASES), args.smoke)
    if args.stage == "trajectories":  # extra runs, so not part of `all`
        for base in bases:
            trajectories(base, args.smoke)
    if failed:
        raise SystemExit("; ".join(f"{b}: {m}" for b, m in failed.items()))


if __name__ == "__main__":
    main()
