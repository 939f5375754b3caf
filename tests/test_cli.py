"""`python -m dpm [overrides]` is the main job whatever the arguments: base / +SP / +SR from one
shared baseline, for every base pruner, each meeting its target; a decay length that fits every
experiment; one clean line for a bad sweep point; a help that names dpm's own options."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import cli_env, compose, run_cli
from dpm.config import validate
from dpm.errors import UserError
from dpm.run import run
from helpers import one_thread  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
BASES = ("depgraph", "otov2", "gate_decorator")
VARIANTS = ("base", "sp", "sr")


def cli(args: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m dpm` on one thread with this test's outputs and cache, W&B off."""
    return run_cli(args, env=cli_env(tmp_path), timeout=timeout)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The main job's printed table: variant -> its cells."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) > 5 and cells[3] in VARIANTS and cells[-1] in ("complete", "target_missed", "failed"):
            rows[cells[3]] = cells
    return rows


@pytest.mark.parametrize(
    "args,pruner",
    [(["seed=1"], "depgraph"), (["pruner=otov2"], "otov2"), (["pruner=gate_decorator"], "gate_decorator")],
)
@pytest.mark.slow
def test_any_overrides_run_the_main_job_and_every_variant_meets_its_target(args, pruner, tmp_path):
    """An argument no longer turns the main job into another program: the three variants run from
    one baseline with the overrides applied to all three, each base with its digits recipe."""
    proc = cli([*args, "trainer.progress=false"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert sorted(rows) == sorted(VARIANTS), proc.stdout[-3000:]
    assert all(r[2] == pruner and r[-1] == "complete" for r in rows.values()), proc.stdout[-3000:]
    if args == ["seed=1"]:
        assert all(r[4] == "1" for r in rows.values())
    header = next(line for line in proc.stdout.splitlines() if line.startswith("dpm quickstart:"))
    baseline = float(header.split("baseline (")[1].split("%")[0])
    for variant, r in rows.items():  # a result that teaches something: within a few points of the baseline
        assert float(r[5]) >= baseline - 5.0, (variant, r, baseline)
    assert "report:" in proc.stdout


@pytest.mark.slow
def test_one_variant_and_sweeps_stay_one_run_each(tmp_path):
    proc = cli(["dpm=sp", "trainer.progress=false", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(table_rows(proc.stdout)) == ["sp"] and (tmp_path / "one" / "metrics.json").exists()


@pytest.mark.parametrize("pruner", BASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_smoke_runs_every_base_and_variant_to_its_target(pruner, variant, tmp_path):
    cfg = compose(["experiment=smoke", f"pruner={pruner}", f"dpm={variant}", "trainer.progress=false"])
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "complete" and metrics["target_met"] is True, metrics.get("error")
    if variant != "base":
        assert metrics["N"] > 1


def experiments() -> list[str]:
    return sorted(
        str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml")
    )


@pytest.mark.parametrize("experiment", experiments())
def test_every_experiment_validates_with_every_variant(experiment):
    for variant in VARIANTS:
        cfg = compose([f"experiment={experiment}", f"dpm={variant}"])
        if cfg.pruner.name == "none" and variant != "base":
            with pytest.raises(UserError, match="smooth pruning needs a base pruner"):
                validate(cfg)
            continue
        validate(cfg)
        if variant != "base":  # the decay length is given in epochs of its phase, which any phase has
            assert cfg.dpm.N_epochs is not None or cfg.dpm.N is not None


@pytest.mark.slow
def test_a_bad_point_in_a_sweep_is_one_line_and_the_others_still_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        [
            "-m",
            "experiment=smoke",
            "pruner=depgraph",
            "dpm=base",
            "pruner.speedup=2,0.5",
            "trainer.progress=false",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "pruner.speedup=0.5" in errors[0] and "1 of 2 runs" in errors[1], proc.stderr
    assert (sweep / "report" / "report.md").exists()
    assert (
        "1 complete, 0 short of their pruning target, 1 failed or incomplete"
        in (sweep / "report" / "report.md").read_text()
    )


def test_help_names_dpm_and_its_options(tmp_path):
    proc = cli(["--help"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("dpm") and "powered by Hydra" not in out and "_schema" not in out
    assert "pruner: depgraph, gate_decorator, none, otov2" in out
    assert "dpm: base, sp, sr" in out and "python -m dpm" in out
