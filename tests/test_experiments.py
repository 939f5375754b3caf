"""The paper tables and ablations of experiments/ (issue 8): every config composes and validates, the
pretrain sweep fills exactly the cache entries its prune runs read, every entry's smoke version runs
end to end (three of them through the real SLURM cluster of .ci/slurm-up.sh, with the prune sweep
submitted with a dependency on the pretrain sweep), and the ablation sweeps end in their plots, the
N sweep's N = 1 point being the base method exactly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_slurm import _cancel, _sacct_states, _slurm_problem, slurm  # noqa: F401  (slurm: the fixture)

from conftest import ROOT, run_cli

sys.path.insert(0, str(ROOT / "experiments"))
import run_table  # noqa: E402

CONF = ROOT / "conf" / "experiment"
PAPER = sorted(p.stem for p in (ROOT / "experiments" / "paper").glob("*.sh"))
ABLATIONS = sorted(p.stem for p in (ROOT / "experiments" / "ablation").glob("*.sh"))
# Smoke tables that go through SLURM (one per warm-up kind: sparse learning, pretrain, none); the
# others run with the basic launcher.
SLURM_ENTRIES = {
    "depgraph_resnet56_cifar10": "sparse",
    "gate_decorator_vgg16_cifar10": "pretrain",
    "otov2_vgg16bn_cifar10": "none",
}
WARMUP_KIND = {
    "depgraph_resnet56_cifar10": "sparse",
    "depgraph_vgg19_cifar100": "sparse",
    "depgraph_resnet56_cifar10_nosl": "pretrain",
    "gate_decorator_vgg16_cifar10": "pretrain",
    "gate_decorator_resnet56_cifar10": "pretrain",
    "otov2_vgg16bn_cifar10": "none",
    "otov2_resnet50_cifar10": "none",
    "otov2_resnet50_imagenet": "none",
}
# Fields that differ between two runs of the same computation (where, when, and under which name).
RUN_SPECIFIC = {"wall_time_s", "run_dir", "git_sha", "pretrain_source", "pretrain_checkpoint", "history"}


def _configs(folder: str) -> list[str]:
    return sorted(str(p.relative_to(CONF).with_suffix("")) for p in (CONF / folder).rglob("*.yaml"))


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("metrics.json")) if "report" not in p.parts]


def _entry(kind: str, name: str, tmp_path: Path, timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    """experiments/<kind>/<name>.sh with SMOKE=1 and OUT=tmp_path/table (plus `env`)."""
    full = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "table"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        ["bash", str(ROOT / "experiments" / kind / f"{name}.sh")],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One pretrain cache for the ablation tests: their smoke sweeps share one tiny baseline."""
    return tmp_path_factory.mktemp("ablation-cache")


# ----------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("experiment", _configs("paper"))
def test_paper_configs_compose_and_validate_for_every_variant(experiment):
    from dpm.config import validate

    for variant in ("base", "sp", "sr"):
        cfg = run_table.compose([f"experiment={experiment}", f"dpm={variant}"])
        validate(cfg)
        assert cfg.dpm.variant == variant and cfg.table and cfg.pruner.name != "none"


@pytest.mark.parametrize("experiment", _configs("ablation"))
def test_ablation_configs_are_multiruns_whose_every_point_validates(experiment):
    from dpm.config import validate

    cfg = run_table.compose([f"experiment={experiment}"])
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.ablation
    params = dict(cfg.hydra.sweeper.params)
    facet = cfg.ablation
    assert f"dpm.{facet}" in params and "seed" in params, params
    points = run_table.sweep_points(cfg, [])
    seeds = str(params["seed"]).split(",")
    assert len(points) == len(str(params[f"dpm.{facet}"]).split(",")) * len(seeds)
    for point in points:
        if f"seed={seeds[0]}" in point:  # the other seeds change nothing validate() checks
            validate(run_table.compose([f"experiment={experiment}", *point]))


def test_the_N_ablation_starts_at_the_base_method_and_reaches_five_epochs():
    cfg = run_table.compose(["experiment=ablation/depgraph_N"])
    values = [int(v) for v in str(cfg.hydra.sweeper.params["dpm.N"]).split(",")]
    iters_per_epoch = -(-50_000 // cfg.trainer.finetune.batch_size)  # 391 (the last short batch is kept)
    assert values[0] == 1 and {iters_per_epoch, 5 * iters_per_epoch} <= set(values)
    assert cfg.dpm.N is None and cfg.dpm.N_epochs == 0.5  # the sweep sets dpm.N, which wins over the table's N_epochs


@pytest.mark.parametrize("name", PAPER)
def test_paper_entry_warms_up_the_cache_its_prune_runs_read(name):
    """plan() composes the warm-up and every prune point and refuses to start when their pretrain
    keys differ; the warm-up kind follows the recipe (sparse learning shared, OTOv2 none)."""
    for experiment in (f"paper/{name}", f"paper/smoke/{name}"):
        plan = run_table.plan(experiment, ["trainer.device=cpu"], "0,1", "base,sp,sr")
        assert plan["kind"] == WARMUP_KIND[name], experiment
        if plan["kind"] == "pretrain":
            assert "pruner=none" in plan["warmup"] and "trainer.finetune.epochs=0" in plan["warmup"]
            assert "trainer.device=cpu" in plan["warmup"]  # run-time overrides reach both sweeps
            # The baseline trains as the prune runs would train it: the same trainer but the later phases
            # (device, fast path, bf16 / channels_last left to resolve alike, deterministic, step cap).
            warm = run_table.compose(run_table.first_values(plan["warmup"]))
            assert _trainer_but_later_phases(warm) == _trainer_but_later_phases(plan["cfg"])
        assert "dpm=base,sp,sr" in plan["prune"] and "seed=0,1" in plan["prune"]


def _trainer_but_later_phases(cfg) -> dict:
    from omegaconf import OmegaConf

    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {k: v for k, v in trainer.items() if k not in ("finetune", "sparse")}


def test_a_pretrain_override_reaches_the_warm_up_sweep():
    plan = run_table.plan("paper/gate_decorator_vgg16_cifar10", ["trainer.pretrain.epochs=7"], "0", "base")
    warm = run_table.compose(run_table.first_values(plan["warmup"]))
    assert warm.trainer.pretrain.epochs == 7 and warm.pruner.name == "none"


@pytest.mark.parametrize("kind,names", [("paper", PAPER), ("ablation", ABLATIONS)])
def test_every_entry_has_its_config_its_smoke_config_and_a_readme_row(kind, names):
    readme = (ROOT / "experiments" / "README.md").read_text()
    assert len(names) == (8 if kind == "paper" else 6)
    for name in names:
        script = (ROOT / "experiments" / kind / f"{name}.sh").read_text()
        assert f"run_table.py {kind}/{name} " in script
        assert (CONF / kind / f"{name}.yaml").is_file() and (CONF / kind / "smoke" / f"{name}.yaml").is_file()
        assert f"experiments/{kind}/{name}.sh" in readme, name


# ----------------------------------------------------------------------------------------------
# Smoke tables


def _check_table(out: Path, name: str, seeds: list[int]) -> tuple[list[dict], list[dict]]:
    """The table's two sweeps: one warm-up run per seed that trained the baseline, base / +SP / +SR
    per seed that all read it from the cache, and the report of the prune sweep."""
    kind = WARMUP_KIND[name]
    prune = _metrics(out / "prune")
    expected = sorted((v, s) for v in ("base", "sp", "sr") for s in seeds)
    assert sorted((m["variant"], m["seed"]) for m in prune) == expected
    assert {m["status"] for m in prune} == {"complete"}, [m.get("error") for m in prune]
    runs = pd.read_csv(out / "prune" / "report" / "runs.csv")
    assert len(runs) == 3 * len(seeds) and set(runs["status"]) == {"complete"}
    table = pd.read_csv(out / "prune" / "report" / "paper_table.csv")
    assert list(table["variant"]) == ["base", "sp", "sr"] and set(table["n"]) == {len(seeds)}
    assert (out / "prune" / "report" / "plots" / "accuracy_vs_flops.png").is_file()
    warm = _metrics(out / "pretrain") if (out / "pretrain").exists() else []
    if kind == "none":
        assert not warm and {m["pretrain_source"] for m in prune} == {"scratch"}
        return prune, warm
    # Exactly one pretraining per seed, in the warm-up; every prune run reused its result.
    assert sorted(m["seed"] for m in warm) == seeds
    assert {m["pretrain_source"] for m in warm} == {"trained"} and {m["status"] for m in warm} == {"complete"}
    keys = {m["seed"]: m["pretrain_key"] for m in warm}
    assert len(set(keys.values())) == len(seeds)
    for m in prune:
        assert m["pretrain_source"] == "cache" and m["pretrain_key"] == keys[m["seed"]], m["run_dir"]
    if kind == "sparse":
        assert {m["sparse_source"] for m in warm} == {"trained"}
        sparse = {m["seed"]: m["sparse_key"] for m in warm}
        assert all(m["sparse_source"] == "cache" and m["sparse_key"] == sparse[m["seed"]] for m in prune)
    else:
        assert {m["pruner"] for m in warm} == {"none"}
    return prune, warm


@pytest.mark.parametrize("name", PAPER)
@pytest.mark.slow
def test_smoke_table_runs_with_the_basic_launcher(name, tmp_path):
    if name in SLURM_ENTRIES and _slurm_problem() is None:
        pytest.skip("runs through the SLURM cluster in test_smoke_table_runs_through_slurm_after_its_pretrain_sweep")
    done = _entry("paper", name, tmp_path, SEEDS="0")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    _check_table(tmp_path / "table", name, [0])
    assert f"report: {tmp_path / 'table' / 'prune' / 'report' / 'report.md'}" in done.stdout


def _array_of(sweep: Path) -> tuple[str, list[str]]:
    """The SLURM array id of a sweep and its task ids (from its submitit folder)."""
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    arrays = {t.split("_")[0] for t in tasks}
    assert len(arrays) == 1, tasks
    return arrays.pop(), tasks


def _sacct_times(job: str) -> tuple[str, str]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job, "-o", "JobID,Start,End"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    ((start, end),) = [(s, e) for jid, s, e in (line.split("|") for line in out.splitlines()) if jid == job]
    return start, end


@pytest.mark.parametrize("name", sorted(SLURM_ENTRIES))
@pytest.mark.slow
def test_smoke_table_runs_through_slurm_after_its_pretrain_sweep(slurm, name, tmp_path):  # noqa: F811
    """On the real cluster: the warm-up sweep is one job array; the prune sweep is submitted while it
    runs, with `--dependency=afterok:<that array>`, and none of its tasks starts before the warm-up's
    last task ended. Two seeds where there is a warm-up: one pretraining per seed, none in the prune jobs."""
    seeds = [0, 1] if SLURM_ENTRIES[name] != "none" else [0]
    out = tmp_path / "table"
    try:
        done = _entry(
            "paper", name, tmp_path, timeout=280, SEEDS=",".join(map(str, seeds)), LAUNCHER="hydra/launcher=slurm_cpu"
        )
    finally:
        for sweep in (out / "pretrain", out / "prune"):
            if sweep.exists():
                _cancel(sweep)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    _check_table(out, name, seeds)
    prune_array, prune_tasks = _array_of(out / "prune")
    assert len(prune_tasks) == 3 * len(seeds)
    for task in prune_tasks:
        assert _sacct_states(task)[-1][0] == "COMPLETED", (task, _sacct_states(task))
    script = (out / "prune" / ".submitit" / prune_array / f"{prune_array}_submission.sh").read_text()
    if SLURM_ENTRIES[name] == "none":  # OTOv2 trains from scratch: no warm-up, no dependency
        assert not (out / "pretrain").exists() and "--dependency" not in script
        return
    pre_array, pre_tasks = _array_of(out / "pretrain")
    assert len(pre_tasks) == len(seeds)
    assert f"#SBATCH --dependency=afterok:{pre_array}\n" in script and "#SBATCH --kill-on-invalid-dep=yes" in script
    assert f"pretrain sweep: SLURM job {pre_array}; prune sweep depends on it (afterok)" in done.stdout
    pre_end = max(_sacct_times(t)[1] for t in pre_tasks)
    assert all(_sacct_states(t)[-1][0] == "COMPLETED" for t in pre_tasks)
    starts = [_sacct_times(t)[0] for t in prune_tasks]
    assert min(starts) >= pre_end, (starts, pre_end)  # ISO timestamps: string order is time order


# ----------------------------------------------------------------------------------------------
# Ablations


@pytest.mark.parametrize("facet", [a.removeprefix("depgraph_") for a in ABLATIONS if a != "depgraph_N"])
@pytest.mark.slow
def test_ablation_smoke_sweep_ends_in_its_plot(facet, tmp_path, shared_cache, monkeypatch):
    monkeypatch.setenv("DPM_CACHE_DIR", str(shared_cache))
    sweep = tmp_path / "sweep"
    done = run_cli(
        [f"experiment=ablation/smoke/depgraph_{facet}", f"hydra.sweep.dir={sweep}"],
        env={"OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    cfg = run_table.compose([f"experiment=ablation/smoke/depgraph_{facet}"])
    values = str(cfg.hydra.sweeper.params[f"dpm.{facet}"]).split(",")
    runs = pd.read_csv(sweep / "report" / "runs.csv")
    assert len(runs) == len(values) and set(runs["status"]) == {"complete"} and set(runs["ablation"]) == {facet}
    assert sorted(runs[facet].astype(str)) == sorted(str(type(runs[facet].iloc[0])(v)) for v in values)
    # One table row per value, never averaged together as if they were seeds.
    table = pd.read_csv(sweep / "report" / "paper_table.csv")
    assert len(table) == len(values) and set(table["n"]) == {1}
    assert all(f"{facet}=" in s for s in table["setting"])
    plot = sweep / "report" / "plots" / f"ablation_{facet}"
    assert Path(f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(f"{plot}.png").stat().st_size > 5000
    assert Path(f"{plot}.pdf").read_bytes()[:5] == b"%PDF-"


@pytest.mark.slow
def test_N_ablation_runs_as_two_sweeps_and_its_N1_point_is_the_base_method(tmp_path, shared_cache):
    """The entry script: warm-up (pinned to the sweep's first point), then the N sweep with its plot;
    its N = 1 point (+SP, N = 1) ends exactly where DepGraph alone (dpm=base) ends (invariant 3)."""
    done = _entry("ablation", "depgraph_N", tmp_path, DPM_CACHE_DIR=str(shared_cache))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "table"
    warm = _metrics(out / "pretrain")
    assert len(warm) == 1 and warm[0]["variant"] == "base"  # one run per seed, not one per N
    points = {m["N"]: m for m in _metrics(out / "prune")}
    assert sorted(points) == [1, 3, 6] and {m["variant"] for m in points.values()} == {"sp"}
    assert {m["pretrain_source"] for m in points.values()} == {"cache"}
    assert (out / "prune" / "report" / "plots" / "ablation_N.png").stat().st_size > 5000

    base_dir = tmp_path / "base"
    base = run_cli(
        ["-m", "experiment=ablation/smoke/depgraph_N", "dpm=base", "dpm.N=1", f"hydra.sweep.dir={base_dir}"],
        env={"OMP_NUM_THREADS": "1", "DPM_CACHE_DIR": str(shared_cache)},
        timeout=120,
    )
    assert base.returncode == 0, base.stderr[-3000:]
    (ref,) = _metrics(base_dir)
    n1 = points[1]
    assert ref["variant"] == "base" and ref["status"] == n1["status"] == "complete"

    def comparable(m: dict) -> dict:
        out = {k: v for k, v in m.items() if k not in RUN_SPECIFIC | {"variant"}}
        out["history"] = {
            phase: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in records]
            for phase, records in m["history"].items()
        }
        return out

    assert comparable(n1) == comparable(ref)
    assert n1["history"]["finetune"] and n1["admitted"] > 0  # a real pruning run, not an empty one
