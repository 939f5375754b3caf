"""dpm.report: run dirs -> paper table, paired seed statistics, Markdown / CSV / LaTeX, plots, CLI,
the quickstart's report and the multirun callback."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_loggers import offline_records

from conftest import ROOT, run_cli
from dpm import report as rp
from dpm.report import plots as report_plots

TABLE = "depgraph_resnet56_cifar10"
# (variant, seed) -> top1_final; best = final + 0.2, FLOPs 47 %, params 50 + seed.
TOP1 = {
    ("base", 0): 93.0,
    ("base", 1): 93.5,
    ("base", 2): 94.0,
    ("sp", 0): 93.2,
    ("sp", 1): 93.6,
    ("sp", 2): 94.4,
    ("sr", 0): 93.5,
    ("sr", 1): 93.9,
}


def write_run(
    run_dir: Path,
    variant: str,
    seed: int,
    top1: float | None,
    status: str = "complete",
    metrics: bool = True,
    run_id: str = "r",
    hydra_only: bool = False,
    extra: dict | None = None,
    pruner: dict | None = None,
) -> Path:
    """A run dir as the runner leaves it: config.yaml (or only .hydra/config.yaml) and metrics.json."""
    run_dir.mkdir(parents=True)
    cfg = {
        "name": TABLE,
        "table": TABLE,
        "seed": seed,
        "run_id": run_id,
        "output_root": "outputs",
        "model": {"name": "resnet56"},
        "dataset": {"name": "cifar10"},
        "pruner": {"name": "depgraph", **(pruner or {})},
        "dpm": {"variant": variant, "N": 1 if variant == "base" else 195},
        "trainer": {"device": "auto", "sparse": {"epochs": 100}},
    }
    cfg_path = run_dir / (".hydra/config.yaml" if hydra_only else "config.yaml")
    cfg_path.parent.mkdir(exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg))
    if metrics:
        m = {
            "name": TABLE,
            "table": TABLE,
            "model": "resnet56",
            "dataset": "cifar10",
            "pruner": "depgraph",
            "variant": variant,
            "seed": seed,
            "status": status,
            "sparse_learning": True,
            "history": {"x": []},
        }
        if status == "complete":
            m.update(top1_final=top1, top1_best=top1 + 0.2, flops_remaining_pct=47.0, params_remaining_pct=50.0 + seed)
        else:
            m["error"] = "RuntimeError: boom"
        m.update(extra or {})
        (run_dir / "metrics.json").write_text(json.dumps(m))
    return run_dir


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    """Eight good runs (sr seed 2 missing), a failed run (sr seed 2), an incomplete run (config.yaml,
    no metrics.json), an older duplicate of base seed 0 with a different result, a Hydra-only config,
    and a W&B config.yaml that is not a run."""
    root = tmp_path / "sweep"
    for i, ((variant, seed), top1) in enumerate(TOP1.items()):
        write_run(root / f"{i}_{variant}_{seed}", variant, seed, top1, hydra_only=(i == 1))
    write_run(root / "8_sr_2", "sr", 2, None, status="failed")
    write_run(root / "9_sp_3", "sp", 3, None, metrics=False)
    dup = write_run(root / "old" / "base_0", "base", 0, 90.0, run_id="older")
    old = time.time() - 3600
    os.utime(dup / "metrics.json", (old, old))
    (root / "0_base_0" / "wandb" / "files").mkdir(parents=True)
    (root / "0_base_0" / "wandb" / "files" / "config.yaml").write_text("wandb_version: 1\n")
    # one run with a decay log, for the trajectory plot
    (root / "5_sp_2" / "dpm_log.json").write_text(
        json.dumps(
            {
                "trajectories": [
                    [["conv", 0], [[0, 1, 1.0], [1, 2, 0.5], [2, 3, 0.0]]],
                    [["conv", 1], [[0, 1, 2.0], [1, 2, 1.5]]],
                ],
                "releases": [{"step": 1, "round": 1, "key": ["conv", 1], "c_rate": 0.1, "c_len": 2.0}],
                "history": [],
                "readmissions": [],
            }
        )
    )
    return root


def test_load_runs_lists_every_run_dir_with_status_duplicates_and_config_columns(runs_dir):
    frame = rp.load_runs([runs_dir])
    assert len(frame) == 11  # 8 good + failed + incomplete + duplicate; the W&B config is not a run
    status = dict(zip(frame["run_dir"].map(lambda d: Path(d).relative_to(runs_dir).as_posix()), frame["status"]))
    assert status["8_sr_2"] == "failed" and status["9_sp_3"] == "missing"
    assert sum(s == "complete" for s in status.values()) == 9
    dups = frame[frame["duplicate_of"].notna()]
    assert list(dups["run_dir"]) == [str(runs_dir / "old" / "base_0")]  # the newer run is kept
    assert dups["duplicate_of"].iloc[0] == str(runs_dir / "0_base_0")
    assert frame["cfg.dpm.N"].notna().all() and "cfg.trainer.sparse.epochs" in frame
    hydra_row = frame[frame["run_dir"] == str(runs_dir / "1_base_1")].iloc[0]
    assert hydra_row["config_path"].endswith(".hydra/config.yaml")
    incomplete = frame[frame["status"] == "missing"].iloc[0]  # identity comes from its config
    assert (incomplete["variant"], incomplete["seed"], incomplete["sparse_learning"]) == ("sp", 3, True)


def test_paper_table_aggregates_over_seeds_with_deltas_and_the_papers_numbers(runs_dir):
    table = rp.paper_table(rp.load_runs([runs_dir]))
    assert list(table["variant"]) == ["base", "sp", "sr"]
    assert list(table["n"]) == [3, 3, 2] and list(table["seeds"]) == ["0,1,2", "0,1,2", "0,1"]
    sp = [93.2, 93.6, 94.4]
    expected_mean = [93.5, np.mean(sp), 93.7]
    expected_std = [0.5, np.std(sp, ddof=1), np.std([93.5, 93.9], ddof=1)]
    np.testing.assert_allclose(table["top1_final_mean"], expected_mean)
    np.testing.assert_allclose(table["top1_final_std"], expected_std)
    np.testing.assert_allclose(table["top1_best_mean"], np.add(expected_mean, 0.2))
    np.testing.assert_allclose(table["d_top1_final"], [0.0, np.mean(sp) - 93.5, 0.2], atol=1e-12)
    np.testing.assert_allclose(table["flops_remaining_pct_mean"], 47.0)
    np.testing.assert_allclose(table["params_remaining_pct_mean"], [51.0, 51.0, 50.5])
    np.testing.assert_allclose(table["d_params_remaining_pct"], [0.0, 0.0, -0.5], atol=1e-12)
    # the paper's DepGraph rows with sparse learning
    np.testing.assert_allclose(table["paper_top1"], [93.84, 93.96, 94.13])
    np.testing.assert_allclose(table["paper_flops_pct"], [46.86, 46.32, 45.80])
    np.testing.assert_allclose(table["diff_top1"], np.subtract(expected_mean, [93.84, 93.96, 94.13]))
    assert (table["sparse_learning"] == True).all() and (table["table"] == TABLE).all()  # noqa: E712


def test_reference_match_without_table_and_without_sparse_learning_column():
    ref = rp.load_reference()
    key = {"pruner": "depgraph", "model": "resnet56", "dataset": "cifar10", "variant": "base"}
    # table null: the paper's own row comes first, not Torch-Pruning's reproduction
    assert rp.match_reference(ref, {**key, "table": None, "sparse_learning": False})["top1"] == 93.32
    assert (
        rp.match_reference(ref, {**key, "table": "depgraph_resnet56_cifar10_tp", "sparse_learning": True})["top1"]
        == 93.77
    )
    otov2 = {"pruner": "otov2", "model": "vgg16_bn", "dataset": "cifar10", "variant": "sr", "table": None}
    assert rp.match_reference(ref, {**otov2, "sparse_learning": False})["top1"] == 93.8  # CSV leaves SL empty
    assert rp.match_reference(ref, {**key, "model": "tiny_cnn", "table": None, "sparse_learning": False}) is None


def test_seed_statistics_pair_by_seed_and_flag_intervals_with_zero(runs_dir):
    from scipy import stats as st

    s = rp.seed_statistics(rp.load_runs([runs_dir]))
    final = s[s["metric"] == "top1_final"].set_index("comparison")
    sp = final.loc["+SP - base"]
    d = np.array([0.2, 0.1, 0.4])
    half = st.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert sp["n"] == 3 and sp["unpaired_seeds"] == ""
    np.testing.assert_allclose(
        [sp["mean_diff"], sp["ci_low"], sp["ci_high"]], [d.mean(), d.mean() - half, d.mean() + half]
    )
    assert bool(sp["includes_zero"]) and math.isnan(sp["boot_low"])
    sr = final.loc["+SR - base"]
    assert sr["n"] == 2 and sr["unpaired_seeds"] == "2"  # seed 2 failed for +SR
    np.testing.assert_allclose(sr["mean_diff"], 0.45)


def test_seed_statistics_count_the_seeds_where_the_variant_beat_its_base(runs_dir):
    """Issue 23: per comparison the share of paired seeds where the variant beat its base (a tie is
    not a win), from the same per-seed differences the intervals use."""
    runs = rp.load_runs([runs_dir])
    s = rp.seed_statistics(runs)
    final = s[s["metric"] == "top1_final"].set_index("comparison")
    assert final.loc["+SP - base", "wins"] == 3 and final.loc["+SP - base", "win_share"] == 1.0
    assert final.loc["+SR - base", "wins"] == 2 and final.loc["+SR - base", "win_share"] == 1.0
    d = rp.paired_differences(runs)
    sp = d[(d["comparison"] == "+SP - base") & (d["metric"] == "top1_final")].sort_values("seed")
    assert sp["seed"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(sp["diff"], [0.2, 0.1, 0.4], atol=1e-9)
    shown = rp.stats_display(s)
    assert shown.loc[shown["comparison"] == "+SP - base", "beat base"].iloc[0] == "3/3"


def test_each_pruning_target_is_its_own_block_and_the_flops_gap_says_whether_cost_was_equal(tmp_path):
    """Issue 23: DepGraph at 2x and 4x in one sweep are two blocks (each paired with its own base),
    the table says which target a row ran at, and every comparison states its paired FLOPs gap and
    whether the variant ran at equal cost (within EQUAL_COST_POINTS of its base's FLOPs %)."""
    flops = {2.0: {"base": 50.0, "sp": 49.5, "sr": 52.0}, 4.0: {"base": 25.0, "sp": 25.2, "sr": 25.4}}
    for speedup, per_variant in flops.items():
        for variant, pct in per_variant.items():
            for seed in range(3):
                write_run(
                    tmp_path / f"{speedup:g}x_{variant}_{seed}",
                    variant,
                    seed,
                    90.0 - speedup + (0.1 * seed if variant != "base" else 0.0),
                    extra={"speedup_target": speedup, "flops_remaining_pct": pct + 0.1 * seed * (variant == "sr")},
                    pruner={"speedup": speedup},
                )
    runs = rp.load_runs([tmp_path])
    table = rp.paper_table(runs)
    assert table["target"].tolist() == ["2x MACs"] * 3 + ["4x MACs"] * 3
    assert table["n"].tolist() == [3] * 6
    s = rp.seed_statistics(runs)
    final = s[s["metric"] == "top1_final"].set_index(["target", "comparison"])
    assert final["n"].tolist() == [3] * 4  # paired within a target, never across
    np.testing.assert_allclose(final.loc[("4x MACs", "+SP - base"), "mean_diff"], 0.1)
    np.testing.assert_allclose(final.loc[("2x MACs", "+SR - base"), "flops_gap"], 2.1)
    np.testing.assert_allclose(final.loc[("4x MACs", "+SP - base"), "flops_gap"], 0.2, atol=1e-9)
    assert not final.loc[("2x MACs", "+SR - base"), "equal_cost"]  # 2.1 points more FLOPs than base
    assert final.loc[("2x MACs", "+SP - base"), "equal_cost"] and final.loc[("4x MACs", "+SR - base"), "equal_cost"]
    shown = rp.stats_display(s)
    assert "FLOPs gap" in shown and "target" in shown


def test_paired_interval_matches_scipy_and_the_mdd_formula():
    from scipy import stats as st

    rng = np.random.default_rng(1)
    x, y = rng.normal(93.5, 0.3, 8), rng.normal(93.2, 0.3, 8)
    iv = rp.paired_interval(x - y)
    ci = st.ttest_rel(x, y).confidence_interval(0.95)
    np.testing.assert_allclose([iv.low, iv.high], [ci.low, ci.high])
    se = np.std(x - y, ddof=1) / math.sqrt(8)
    np.testing.assert_allclose(iv.mdd, (st.t.ppf(0.975, 7) + st.t.ppf(0.8, 7)) * se)
    np.testing.assert_allclose(iv.half_width, st.t.ppf(0.975, 7) * se)
    assert math.isnan(iv.boot_low)  # n < 10: no bootstrap
    # known numbers: d = 1, 2, 3 -> mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 2.4841
    known = rp.paired_interval([1.0, 2.0, 3.0])
    np.testing.assert_allclose([known.low, known.high], [2 - 2.484138, 2 + 2.484138], atol=1e-5)
    assert known.includes_zero is True and rp.paired_interval([1.0, 1.1, 0.9]).includes_zero is False
    assert rp.paired_interval([0.5]).includes_zero is None  # n = 1: no interval
    ten = rp.paired_interval(np.linspace(0.1, 1.0, 10))
    assert ten.boot_low < ten.mean < ten.boot_high and ten.low < ten.boot_low


def test_write_report_outputs_parse_back(runs_dir, tmp_path):
    out = tmp_path / "rep"
    report = rp.write_report([runs_dir], out)
    csv = pd.read_csv(out / "paper_table.csv")
    assert list(csv["variant"]) == ["base", "sp", "sr"] and list(csv["n"]) == [3, 3, 2]
    np.testing.assert_allclose(csv["top1_final_mean"], report.table["top1_final_mean"])
    assert len(pd.read_csv(out / "runs.csv")) == 11
    problems = pd.read_csv(out / "problems.csv")
    assert sorted(problems["status"]) == ["failed", "missing"] and "boom" in problems["problem"].str.cat()
    assert len(pd.read_csv(out / "duplicates.csv")) == 2
    assert len(pd.read_csv(out / "stats.csv")) == 4  # (+SP, +SR) x (top1_final, top1_best)

    md = (out / "report.md").read_text()
    section = md.split("## Paper table")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[:9] == ["table", "model", "dataset", "pruner", "target", "SL", "variant", "n", "top1 %"]
    body = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
    assert [r[6] for r in body] == ["base", "+SP", "+SR"]
    assert body[0][4] == "-"  # these runs name no pruning target
    assert body[0][8] == "93.50 ± 0.50" and body[2][9] == "+0.20"
    assert body[0][header.index("paper top1")] == "93.84"
    for heading in ("## Seed statistics", "## Failed and incomplete runs", "## Duplicates"):
        assert heading in md
    assert "8_sr_2" in md and "9_sp_3" in md and "old/base_0" in md

    tex = (out / "tables.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 2 and tex.count(r"\end{tabular}") == 2
    assert r"93.50 $\pm$ 0.50" in tex and "93.84" in tex and r"+SP - base" in tex


def test_plots_are_written_and_non_empty(runs_dir, tmp_path):
    report = rp.write_report([runs_dir], tmp_path / "rep")
    plots = tmp_path / "rep" / "plots"
    for name in ("accuracy_vs_flops", "paired_differences", "trajectories_5_sp_2"):
        assert (plots / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (plots / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
        assert (plots / f"{name}.png").stat().st_size > 5000
    assert len([p for p in report.files if p.parent == plots]) == 6


@pytest.mark.slow
def test_cli_prints_the_report_and_refuses_a_dir_without_runs(runs_dir, tmp_path):
    out = tmp_path / "cli_report"
    done = subprocess.run(
        [sys.executable, "-m", "dpm.report", str(runs_dir), "--out", str(out), "--no-plots"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "## Paper table" in done.stdout and "93.50 ± 0.50" in done.stdout
    assert (out / "report.md").is_file() and not (out / "plots").exists()
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "nowhere"):
        done = subprocess.run(
            [sys.executable, "-m", "dpm.report", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2
        assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_quickstart_ends_with_a_report_of_its_three_runs(capsys):
    from dpm.quickstart import main

    rows = main(["trainer.pretrain.epochs=2", "trainer.finetune.epochs=2"])
    printed = capsys.readouterr().out
    root = Path(rows[0]["run_dir"]).parent
    assert f"report: {root / 'report'}/report.md" in printed
    table = pd.read_csv(root / "report" / "paper_table.csv")
    assert list(table["variant"]) == ["base", "sp", "sr"] and list(table["n"]) == [1, 1, 1]
    assert (root / "report" / "plots" / "trajectories_sr.png").stat().st_size > 0


@pytest.mark.slow
def test_multirun_callback_writes_the_sweep_report(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_cli(
        [
            "-m",
            "experiment=quickstart",
            "dpm=base,sp,sr",
            "trainer.pretrain.epochs=2",
            "trainer.finetune.epochs=2",
            "logger=wandb",
            "logger.mode=offline",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(sweep / "report" / "paper_table.csv")
    assert list(table["variant"]) == ["base", "sp", "sr"]
    assert (sweep / "report" / "report.md").read_text().count("complete") >= 1
    assert (sweep / "report" / "plots" / "accuracy_vs_flops.png").stat().st_size > 0
    # Issue 23: per base the paired differences seed by seed with their interval.
    assert (sweep / "report" / "plots" / "paired_differences.png").stat().st_size > 0
    records = offline_records(sweep / "report")  # with logger=wandb the report is logged too
    assert b"paper_table" in records and b"report" in records


@pytest.fixture
def ablation_dir(tmp_path) -> Path:
    """+SR runs sweeping N (10, 20, 40) and T_rate (0, 0.5) over two seeds, T_len fixed, each with a
    dpm_log.json whose history counts releases; plus a base run (N = 1, no T_rate)."""
    root = tmp_path / "ablation"
    i = 0
    for N in (10, 20, 40):
        for t_rate in (0.0, 0.5):
            for seed in (0, 1):
                run_dir = write_run(
                    root / f"{i}_sr_N{N}_T{t_rate}_s{seed}", "sr", seed, 90.0 + N / 10 + seed, run_id=f"N{N}_T{t_rate}"
                )
                metrics = json.loads((run_dir / "metrics.json").read_text())
                metrics.update(N=N, T_rate=t_rate, T_len=1.0, flops_remaining_pct=40.0 + N / 4)
                (run_dir / "metrics.json").write_text(json.dumps(metrics))
                cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
                cfg["dpm"].update(N=N, T_rate=t_rate, T_len=1.0)  # distinct configs, not duplicates
                (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
                history = [
                    {
                        "step": s,
                        "decaying": max(N - s, 0),
                        "pruned": 0,
                        "released": s // 3,
                        "releases_total": s // 3,
                        "released_now": int(s % 3 == 0),
                    }
                    for s in range(N)
                ]
                (run_dir / "dpm_log.json").write_text(
                    json.dumps({"history": history, "releases": [], "readmissions": [], "trajectories": []})
                )
                i += 1
    base = write_run(root / "base_0", "base", 0, 91.0)
    metrics = json.loads((base / "metrics.json").read_text())
    (base / "metrics.json").write_text(json.dumps({**metrics, "N": 1}))
    return root


@pytest.mark.slow
def test_ablation_and_released_plots_only_for_facets_that_vary(ablation_dir, tmp_path):
    runs = rp.load_runs([ablation_dir])
    assert rp.ablation_facets(runs) == ["N", "T_rate"]  # T_len is 1.0 everywhere: no curve to draw
    # Each (N, T_rate) is its own row over its two seeds, never averaged with the other settings.
    table = rp.paper_table(runs)
    sr = table[table["variant"] == "sr"]
    assert len(sr) == 6 and set(sr["n"]) == {2} and "N=10, T_rate=0" in set(sr["setting"])
    assert sr.set_index("setting").at["N=40, T_rate=0.5", "top1_final_mean"] == pytest.approx(94.5)
    stats = rp.seed_statistics(runs)
    assert (stats["comparison"] == "+SR (N=20, T_rate=0.5) - base").sum() == 2  # top1_final, top1_best
    report = rp.write_report([ablation_dir], tmp_path / "rep")
    plots = tmp_path / "rep" / "plots"
    for name in ("ablation_N", "ablation_T_rate", "released_over_training"):
        assert (plots / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (plots / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
        assert (plots / f"{name}.png").stat().st_size > 5000
    assert not (plots / "ablation_T_len.png").exists()
    assert plots / "released_over_training.pdf" in report.files


def test_a_table_whose_variants_differ_in_N_is_no_N_ablation(tmp_path):
    """base (N = 1) / +SP / +SR (N = 195) over seeds: N varies across the rows but within no variant."""
    root = tmp_path / "table"
    for i, ((variant, seed), top1) in enumerate(TOP1.items()):
        run_dir = write_run(root / f"{i}_{variant}_{seed}", variant, seed, top1)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        (run_dir / "metrics.json").write_text(json.dumps({**metrics, "N": 1 if variant == "base" else 195}))
    runs = rp.load_runs([root])
    assert rp.ablation_facets(runs) == []
    # a report into a folder that holds an earlier report's ablation plot removes it
    stale = tmp_path / "rep" / "plots" / "ablation_N.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    rp.write_report([root], tmp_path / "rep")
    assert not stale.exists() and (tmp_path / "rep" / "plots" / "accuracy_vs_flops.png").exists()
    # the same runs with a second N for +SP seed 0 make one
    extra = write_run(root / "9_sp_0_N50", "sp", 0, 93.0, run_id="N50")
    cfg = yaml.safe_load((extra / "config.yaml").read_text())
    (extra / "config.yaml").write_text(yaml.safe_dump({**cfg, "dpm": {**cfg["dpm"], "N": 50}}))
    metrics = json.loads((extra / "metrics.json").read_text())
    (extra / "metrics.json").write_text(json.dumps({**metrics, "N": 50}))
    assert rp.ablation_facets(rp.load_runs([root])) == ["N"]


@pytest.mark.slow
def test_report_logs_its_tables_and_plots_to_an_offline_wandb_run(runs_dir, tmp_path):
    out = tmp_path / "rep"
    done = subprocess.run(
        [sys.executable, "-m", "dpm.report", str(runs_dir), "--out", str(out), "--wandb", "--wandb-mode", "offline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wandb_run,) = (out / "wandb").glob("offline-run-*")
    records = offline_records(out)  # waits for wandb-core to finish writing
    from wandb.proto import wandb_internal_pb2 as pb

    assert pb.RunRecord(job_type="report").SerializeToString() in records
    for key in (b"paper_table", b"seed_statistics", b"problems", b"plots/accuracy_vs_flops"):
        assert key in records, key
    # The tables themselves are files beside the record: the paper table holds our mean ± std.
    tables = {p.name.split("_0_")[0]: p for p in (wandb_run / "files" / "media" / "table").glob("*.table.json")}
    assert {"paper_table", "seed_statistics", "runs", "problems"} <= set(tables), sorted(tables)
    paper = json.loads(tables["paper_table"].read_text())
    assert "top1 %" in paper["columns"] and any("93.50 ± 0.50" in map(str, row) for row in paper["data"])
    assert list((wandb_run / "files" / "media" / "images").glob("plots/accuracy_vs_flops*.png"))
    # A second report over the same dirs does not read the W&B files as runs.
    assert len(rp.load_runs([runs_dir])) == 11


def test_report_of_only_failed_runs_has_the_header_and_lists_them(tmp_path):
    from dpm.config import compose
    from dpm.errors import UserError
    from dpm.run import run

    with pytest.raises(UserError):
        run(compose(["experiment=smoke", "trainer.pretrain.lr=1e30", "pretrain.cache=false"]), tmp_path / "runs" / "a")
    report = rp.write_report([tmp_path / "runs"], tmp_path / "report", plots=False)
    assert (
        "0 complete, 0 short of their pruning target, 1 failed or incomplete" in report.markdown
        and "(no complete runs)" in report.markdown
    )
    assert (tmp_path / "report" / "tables.tex").exists()


def test_a_run_another_process_holds_is_running_and_fails_no_sweep(tmp_path, capsys):
    """Two processes share a sweep dir (the CPU-scale campaign runs two side by side): the report of
    one must list the other's run in flight as running, and its exit code must not count it."""
    from dpm import callbacks, cli
    from dpm.run_lock import run_dir_lock

    root = tmp_path / "sweep"
    write_run(root / "0_base_0", "base", 0, 92.0)
    busy = write_run(root / "1_sp_0", "sp", 0, None, metrics=False)
    with run_dir_lock(busy):
        report = rp.write_report([root], tmp_path / "report", plots=False)
        callbacks.LAST_REPORT = report
        cli.sweep_verdict()  # returns: nothing of this sweep failed
    status = dict(zip(report.runs["run_dir"].map(lambda d: Path(d).name), report.runs["status"]))
    assert status == {"0_base_0": "complete", "1_sp_0": "running"}
    problem = report.problems.set_index("status").loc["running", "problem"]
    assert problem.startswith(f"running in another process (pid {os.getpid()} on ")
    assert "1 complete, 0 short of their pruning target, 0 failed or incomplete, 1 running" in report.markdown
    # Once the lock is gone (the process died), the same dir is incomplete and fails the sweep.
    (busy / "run.lock").write_text("pid 999999 on elsewhere since 2026-01-01 00:00:00\n")
    callbacks.LAST_REPORT = rp.write_report([root], tmp_path / "report", plots=False)
    with pytest.raises(SystemExit):
        cli.sweep_verdict()
    assert "1 of 2 runs did not complete (0 short of their pruning target, 1 failed or incomplete)" in (
        capsys.readouterr().err
    )


def test_a_sweeps_exit_status_counts_only_the_runs_it_launched(tmp_path, capsys):
    """A sweep dir shared by two processes holds the other's killed run (config.yaml, no metrics.json,
    nobody holds its lock): the report lists it, but the exit status of this process's sweep is about
    its own jobs (seen 2026-12-07: one campaign process stopped on the other's killed run)."""
    from dpm import callbacks, cli

    root = tmp_path / "sweep"
    own = write_run(root / "s5_base", "base", 5, 92.0)
    # A sweep without any problem run at all returns too (an empty problems frame).
    callbacks.LAST_REPORT = rp.write_report([root], tmp_path / "report", plots=False)
    cli.SWEEP_RUN_DIRS.append(str(own))
    cli.sweep_verdict()
    write_run(root / "s4_sr", "sr", 4, None, metrics=False)  # the other process's, killed
    report = rp.write_report([root], tmp_path / "report", plots=False)
    assert "1 failed or incomplete" in report.markdown  # the report lists it
    callbacks.LAST_REPORT = report
    cli.SWEEP_RUN_DIRS.append(str(own))
    cli.sweep_verdict()  # returns: this sweep's one run completed
    assert not cli.SWEEP_RUN_DIRS  # cleared for the next multirun of this process
    # One of its own runs failing still fails it, and the count is of its own runs.
    failed = write_run(root / "s5_sp", "sp", 5, None, status="failed")
    callbacks.LAST_REPORT = rp.write_report([root], tmp_path / "report", plots=False)
    cli.SWEEP_RUN_DIRS.extend([str(own), str(failed)])
    with pytest.raises(SystemExit):
        cli.sweep_verdict()
    assert "1 of 2 runs did not complete (0 short of their pruning target, 1 failed or incomplete)" in (
        capsys.readouterr().err
    )


def test_base_gate_withholds_variants_without_base_and_checks_the_base_row(tmp_path):
    from dpm.config import compose
    from dpm.run import run

    for variant in ("base", "sp"):
        run(compose(["experiment=smoke", "pruner=depgraph", f"dpm={variant}", "dpm.N=2"]), tmp_path / "both" / variant)
    run(
        compose(["experiment=smoke", "pruner=depgraph", "dpm=sp", "dpm.N=2", "table=orphan"]),
        tmp_path / "orphan" / "sp",
    )
    table = rp.paper_table(rp.load_runs([tmp_path]))
    notes = dict(zip(zip(table["table"], table["variant"]), table["base_check"]))
    assert notes[("", "base")] == "base = Torch-Pruning's selection, target met"
    assert notes[("", "sp")] == ""
    assert notes[("orphan", "sp")] == "no base row: deltas withheld"
    ref = rp.load_reference()
    ref.loc[len(ref)] = {
        "table": "",
        "base_pruner": "depgraph",
        "model": "tiny_cnn",
        "dataset": "synthetic",
        "variant": "base",
        "top1": 150.0,
        "flops_remaining_pct": 50.0,
    }
    gated = rp.paper_table(rp.load_runs([tmp_path / "both"]), ref)
    assert (
        gated.loc[gated["variant"] == "base", "base_check"].item().startswith("base deviates from the paper's (top1 ")
    )


def test_trajectory_plots_draw_released_targets_first(tmp_path):
    from dpm.report import plot_trajectories, trajectories_to_draw

    points = [(0, 1, 1.0), (1, 2, 0.5)]
    dpm_log = {
        "trajectories": [[["conv", i], points] for i in range(20)] + [[["conv", 99], []]],
        "releases": [{"step": 1, "key": ["conv", i]} for i in (12, 15, 17)],
    }
    drawn = [key[1] for key, _ in trajectories_to_draw(dpm_log, limit=8)]
    assert drawn == [12, 15, 17, 0, 1, 2, 3, 4]  # released first, then the first admitted
    many = {**dpm_log, "releases": [{"step": 1, "key": ["conv", i]} for i in range(10, 20)]}
    assert [key[1] for key, _ in trajectories_to_draw(many, limit=8)] == [10, 11, 12, 13, 0, 1, 2, 3]
    few_others = {"trajectories": dpm_log["trajectories"][10:], "releases": many["releases"]}
    assert [key[1] for key, _ in trajectories_to_draw(few_others, limit=4)] == [10, 11, 12, 13]
    assert trajectories_to_draw({"trajectories": [], "releases": []}) == []
    written = plot_trajectories(dpm_log, "toy", tmp_path / "toy")
    assert [p.suffix for p in written] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in written)


def test_plots_tell_two_pruning_targets_of_one_pruner_apart(monkeypatch, tmp_path):
    # The CPU-scale facet runs DepGraph at 2x and 4x: each point and each paired block must say which.
    figs = []
    monkeypatch.setattr(report_plots, "_save", lambda fig, stem: figs.append(fig) or [])
    keys = {"table": "cpu_scale", "model": "resnet20", "dataset": "cifar10", "pruner": "depgraph"}
    keys["sparse_learning"] = None
    table = pd.DataFrame(
        [
            {**keys, "target": t, "variant": v, "flops_remaining_pct_mean": f, "flops_remaining_pct_std": 0.1}
            | {"top1_final_mean": a, "top1_final_std": 0.2}
            for t, f in (("2x MACs", 50.0), ("4x MACs", 25.0))
            for v, a in (("base", 77.0), ("sp", 77.2))
        ]
    )
    ref = pd.DataFrame(columns=["base_pruner", "model", "dataset", "flops_remaining_pct", "top1", "table", "variant"])
    report_plots.plot_accuracy_vs_flops(table, ref, tmp_path / "a")
    labels = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    assert len(set(labels)) == 4 and sum("4x MACs" in label for label in labels) == 2
    diffs = pd.DataFrame(
        [
            {**keys, "target": t, "comparison": "+SP - base", "seed": s, "diff": d, "metric": "top1_final"}
            for t in ("2x MACs", "4x MACs")
            for s, d in ((0, 0.1), (1, 0.3))
        ]
    )
    report_plots.plot_paired_differences(diffs, tmp_path / "p")
    titles = [ax.get_title() for ax in figs[1].axes]
    assert len(set(titles)) == 2 and sum("4x MACs" in title for title in titles) == 1
