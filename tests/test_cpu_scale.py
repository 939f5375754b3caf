"""The CPU-scale campaign script (experiments/cpu_scale/campaign.py) end to end on a tiny slice of
the real CIFAR-10: baselines, selection on validation only, the paired table and its report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import CIFAR10, ROOT
from dpm.run_lock import run_dir_lock

# Run-level (minutes on 2 cores: `pytest -m "not slow"` leaves it out) and on the real data.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cifar10")]  # no data: skip, or fail under DPM_REQUIRE_DATA=1


def campaign(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPM_DATA_DIR": str(CIFAR10.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "experiments/cpu_scale/campaign.py", *args, "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_campaign_selects_on_validation_then_reports_paired_seeds():
    done = campaign("all", "--bases", "depgraph", "--seeds", "0,1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    root = Path(os.environ["DPM_OUTPUT_ROOT"]) / "cpu_scale"
    # One pretrained baseline per seed, shared by the selection and the table.
    pretrains = [json.loads(p.read_text()) for p in (root / "pretrain").rglob("metrics.json")]
    assert sorted(m["seed"] for m in pretrains) == [0, 1]
    table_runs = [json.loads(p.read_text()) for p in (root / "table_depgraph").rglob("metrics.json")]
    assert {m["pretrain_source"] for m in table_runs} == {"cache"}
    # Every stage pins one thread (bitwise reproducible only at one thread count).
    selection_runs = [json.loads(p.read_text()) for p in root.glob("select_depgraph_*/*/metrics.json")]
    assert selection_runs and {m["threads"] for m in selection_runs + table_runs + pretrains} == {1}
    # A table run's folder is its seed and variant, a baseline's its seed.
    assert sorted(p.parent.name for p in (root / "table_depgraph").glob("*/metrics.json")) == [
        f"s{s}_{v}" for s in (0, 1) for v in ("base", "sp", "sr")
    ]
    assert sorted(p.parent.name for p in (root / "pretrain").glob("*/metrics.json")) == ["s0", "s1"]
    # The selection read validation accuracy only and chose from its grid; the table used the choice.
    selection = pd.read_csv(root / "results_smoke" / "selection" / "selection_depgraph.csv")
    choice = json.loads((root / "results_smoke" / "selection" / "chosen_depgraph.json").read_text())
    eligible = selection[selection["target_met"] != False]  # noqa: E712 (a missed point is listed, never chosen)
    sp = eligible[eligible["variant"] == "sp"]
    assert choice["N_epochs"] == sp.loc[sp["val_top1_final"].idxmax(), "N_epochs"]
    assert set(selection["variant"]) == {"base", "sp", "sr"}
    assert sorted((m["variant"], m["seed"]) for m in table_runs) == sorted(
        (v, s) for v in ("base", "sp", "sr") for s in (0, 1)
    )
    assert all(m["status"] == "complete" for m in table_runs)
    assert {m["T_len"] for m in table_runs if m["variant"] == "sr"} == {choice["T_len"]}
    assert (root / "results_smoke" / "selection" / "selection_depgraph.png").stat().st_size > 0
    # SR's defaults: the grid point with the best validation gain over the chosen +SP.
    defaults = json.loads((root / "results_smoke" / "selection" / "sr_defaults.json").read_text())
    sr = eligible[eligible["variant"] == "sr"]
    best = sr.loc[sr["val_top1_final"].idxmax()]
    assert (defaults["T_rate"], defaults["T_len"]) == (best["T_rate"], best["T_len"])
    assert defaults["beats_sp"] == (best["val_top1_final"] > choice["sp_val_top1"])
    stats = pd.read_csv(root / "results_smoke" / "report" / "stats.csv")
    assert set(stats["comparison"]) >= {"+SP - base", "+SR - base"} and (stats["n"] == 2).all()
    # The committed copy keeps the summary plots and only seed 0's +SP / +SR trajectories.
    plots = {p.name for p in (root / "results_smoke" / "report" / "plots").iterdir()}
    assert "accuracy_vs_flops.png" in plots
    trajectories = sorted(n for n in plots if n.startswith("trajectories_"))
    full = sorted(p.name for p in (root / "report" / "plots").glob("trajectories_*.png"))
    assert len(trajectories) == 2 and len(full) == 6 and set(trajectories) < set(full)  # base runs too (N = 1)
    # Re-running a finished stage runs nothing again.
    again = campaign("table", "--bases", "depgraph", "--seeds", "0,1")
    assert (
        again.returncode == 0
        and again.stdout.count("run already finished (complete)")
        + again.stderr.count("run already finished (complete)")
        == 6
    )
    # The trajectories stage repeats seed 0's +SR with every norm logged; it must equal the table run.
    replayed = campaign("trajectories", "--bases", "depgraph")
    assert replayed.returncode == 0, replayed.stdout[-3000:] + replayed.stderr[-3000:]
    record = json.loads((root / "results_smoke" / "trajectories" / "replay_depgraph.json").read_text())
    sr0 = next(m for m in table_runs if m["variant"] == "sr" and m["seed"] == 0)
    assert record["same"] and record["replay"]["top1_final"] == sr0["top1_final"]
    replay_log = json.loads(next((root / "trajectories_depgraph").rglob("dpm_log.json")).read_text())
    table_log = json.loads((Path(sr0["run_dir"]) / "dpm_log.json").read_text())
    # every target once (a re-admitted one keeps its trajectory), against the first 8 in the table run
    assert len(replay_log["trajectories"]) == sr0["admitted"] - sr0["readmitted"] > len(table_log["trajectories"]) == 8
    assert replay_log["releases"] == table_log["releases"]
    assert (root / "results_smoke" / "trajectories" / "trajectories_depgraph.png").stat().st_size > 0


def test_a_later_sitting_continues_from_the_committed_records():
    """A fresh checkout has the committed results but no output tree and no baseline checkpoints:
    a seed whose table runs are all archived is skipped; in a seed cut short the archived runs are
    restored and skipped, the baseline is re-made and must match."""
    done = campaign("all", "--bases", "depgraph", "--seeds", "0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    root = Path(os.environ["DPM_OUTPUT_ROOT"]) / "cpu_scale"
    archived = root / "results_smoke" / "runs"
    # Every finished run has its record (no checkpoint) in the results, large logs gzipped.
    records = sorted(p.parent for p in archived.rglob("metrics.json"))
    runs = sorted(p.parent for p in root.rglob("metrics.json") if archived not in p.parents)
    assert [r.relative_to(archived) for r in records] == [r.relative_to(root) for r in runs]
    assert all((r / "config.yaml").exists() for r in records)
    assert not any(p.suffix == ".pt" for p in archived.rglob("*"))
    assert (archived / "table_depgraph" / "s0_sp" / "dpm_log.json.gz").exists()
    first = {r.relative_to(root): json.loads((r / "metrics.json").read_text()) for r in runs}

    def next_sitting():  # only the results survive (and the data cache)
        for path in root.iterdir():
            if path.name != "results_smoke":
                shutil.rmtree(path)
        shutil.rmtree(Path(os.environ["DPM_CACHE_DIR"]) / "pretrained", ignore_errors=True)  # none if none made

    # A seed whose table runs are all archived is done: its baseline is not re-made. The report that
    # ends an `all` of some bases keeps the other bases' archived tables (a stand-in copy here).
    next_sitting()
    shutil.copytree(archived / "table_depgraph", archived / "table_otov2")
    again = campaign("all", "--bases", "depgraph", "--seeds", "0")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "depgraph: selection done" in log and "seed 0: every table run is archived" in log
    assert "run already finished" not in log and not (root / "pretrain").exists()
    for rel, metrics in first.items():  # the report restored the table's records as they were
        if rel.parts[0] == "table_depgraph":
            assert json.loads((root / rel / "metrics.json").read_text()) == metrics, rel
    reported = pd.read_csv(root / "results_smoke" / "report" / "runs.csv")
    assert sorted(reported["run_dir"].map(lambda d: Path(d).parent.name).unique()) == ["table_depgraph", "table_otov2"]
    assert len(reported) == 6
    shutil.rmtree(archived / "table_otov2")
    shutil.rmtree(root / "table_otov2")

    # A seed block cut short: its baseline is re-made (it must come out the same) and only the
    # missing run runs, to the same record.
    shutil.rmtree(archived / "table_depgraph" / "s0_sr")
    next_sitting()
    again = campaign("all", "--bases", "depgraph", "--seeds", "0")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("run already finished (complete)") == 2
    for rel in (Path("pretrain/s0"), Path("table_depgraph/s0_sr")):
        now = json.loads((root / rel / "metrics.json").read_text())
        assert now["top1_final"] == first[rel]["top1_final"] and now["threads"] == 1, rel
    assert (root / "report" / "runs.csv").exists()

    # Two processes on one seed: the run the other holds is skipped, never a stop (seen 2026-12-07:
    # a CalledProcessError traceback ended the second process's whole `all`).
    shutil.rmtree(archived / "table_depgraph" / "s0_sr")
    next_sitting()
    held = root / "table_depgraph" / "s0_sr"
    held.mkdir(parents=True)
    with run_dir_lock(held):
        shared = campaign("all", "--bases", "depgraph", "--seeds", "0")
    assert shared.returncode == 0, shared.stdout[-3000:] + shared.stderr[-3000:]
    assert f"skipped: {held} is run by another process (pid {os.getpid()} on " in shared.stderr
    assert "Traceback" not in shared.stderr and not (held / "metrics.json").exists()
    assert campaign("all", "--bases", "depgraph", "--seeds", "0").returncode == 0  # the other one's turn
    assert (
        json.loads((held / "metrics.json").read_text())["top1_final"]
        == first[Path("table_depgraph/s0_sr")]["top1_final"]
    )

    # A baseline that does not come out the same stops the campaign before any table.
    record = archived / "pretrain" / "s0" / "metrics.json"
    metrics = json.loads(record.read_text())
    record.write_text(json.dumps({**metrics, "top1_final": metrics["top1_final"] + 1.0}))
    shutil.rmtree(root / "pretrain")
    refused = campaign("pretrain", "--seeds", "0")
    assert refused.returncode != 0
    assert "seed 0: the re-made baseline differs from the archived one (top1_final" in refused.stderr
