"""Multiruns through a real SLURM cluster (`hydra/launcher=slurm_cpu`), no mocks: the throw-away
single-node cluster of .ci/slurm-up.sh (partitions `debug`, default, and `high`, which pre-empts
`debug` with requeue; accounting on, which submitit needs to see a requeued or killed job).

Skipped, with the reason, where no such cluster answers; with DPM_REQUIRE_SLURM=1 (.ci/run) they
fail instead. Each test uses its own sweep dir and so its own submitit folder (job ids restart at 1
on a fresh cluster, and an old `<id>_result.pkl` would be taken for the new job's result).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, run_cli

# Run-level: minutes on 2 cores (`pytest -m "not slow"` leaves it out).
pytestmark = pytest.mark.slow

REQUIRED = os.environ.get("DPM_REQUIRE_SLURM") == "1"
LAUNCHER = ["hydra/launcher=slurm_cpu"]
# Tiny DepGraph + DPM runs (synthetic data, 4 steps an epoch, deterministic CPU).
TINY = ["experiment=smoke", "pruner=depgraph", "dpm.N=2", "pruner.iterative_steps=50"]
# Fields that differ between two runs of the same computation (where and when it ran).
RUN_SPECIFIC = {"wall_time_s", "run_dir", "git_sha", "pretrain_source", "pretrain_checkpoint", "history"}


def _slurm_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if shutil.which("sinfo") is None:
        return "no SLURM client here (sinfo not on PATH); start the throw-away cluster with .ci/slurm-up.sh"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=30)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"the SLURM client does not answer ({err}); start the cluster with .ci/slurm-up.sh"
    if info.returncode != 0:
        return f"no SLURM controller answers (sinfo: {info.stderr.strip()}); start one with .ci/slurm-up.sh"
    up = {line.split()[0].rstrip("*") for line in info.stdout.splitlines() if line.split()[1:] == ["up"]}
    if not {"debug", "high"} <= up:
        return f"partitions debug and high must be up (found {sorted(up)}): these tests need .ci/slurm-up.sh's cluster"
    if acct.returncode != 0:
        return f"SLURM accounting is off (sacct: {acct.stderr.strip()}); submitit needs it (.ci/slurm-up.sh)"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = _slurm_problem()
    if problem is not None:
        if REQUIRED:
            pytest.fail(f"DPM_REQUIRE_SLURM=1 but {problem}", pytrace=False)
        pytest.skip(problem)


def _job_ids(sweep: Path) -> list[str]:
    """The SLURM job ids submitit used under a sweep dir (`<array>_<task>`, or `<id>` for a one-job sweep):
    its folders that hold a job's stdout/stderr."""
    return sorted(p.name for p in (sweep / ".submitit").glob("*") if p.is_dir() and any(p.glob("*_log.*")))


def _cancel(sweep: Path) -> None:
    """Cancel whatever a failed test left on the cluster."""
    arrays = {j.split("_")[0] for j in _job_ids(sweep)}
    if arrays:
        subprocess.run(["scancel", *sorted(arrays)], capture_output=True, timeout=30)


def _sacct_states(job_id: str) -> list[tuple[str, str]]:
    """(state, partition) of every record of a job, requeued ones included (sacct -D), oldest first."""
    out = subprocess.run(
        ["sacct", "-n", "-P", "-D", "-X", "-j", job_id, "-o", "JobID,State,Partition"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [
        (state.split()[0], part) for jid, state, part in (line.split("|") for line in out.splitlines()) if jid == job_id
    ]


def _report_rows(sweep: Path) -> pd.DataFrame:
    return pd.read_csv(sweep / "report" / "runs.csv")


def _comparable(metrics: dict) -> dict:
    """A run's metrics without run-specific fields, with its per-epoch history minus timings."""
    out = {k: v for k, v in metrics.items() if k not in RUN_SPECIFIC}
    out["history"] = {
        phase: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in records]
        for phase, records in metrics["history"].items()
    }
    return out


def test_two_point_smoke_multirun_runs_as_slurm_jobs_and_reports_both_rows(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    try:
        done = run_cli(["-m", *TINY, "dpm=base,sp", *LAUNCHER, f"hydra.sweep.dir={sweep}"], timeout=240)
    finally:
        _cancel(sweep)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # Both points ran as tasks of one SLURM array on the default partition, and finished.
    jobs = _job_ids(sweep)
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs}) == 1, jobs
    for job in jobs:
        assert _sacct_states(job)[-1] == ("COMPLETED", "debug"), (job, _sacct_states(job))
    run_dirs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [json.loads((d / "metrics.json").read_text())["variant"] for d in run_dirs] == ["base", "sp"]
    hydra_job_ids = sorted(
        re.search(r"^    id: '?([0-9_]+)'?$", (d / ".hydra" / "hydra.yaml").read_text(), re.M)[1] for d in run_dirs
    )
    assert hydra_job_ids == jobs  # each run dir was written by its SLURM task
    # The report callback ran in the submitting process after both jobs ended: both rows are in.
    runs = _report_rows(sweep)
    assert sorted(runs["variant"]) == ["base", "sp"] and set(runs["status"]) == {"complete"}
    table = pd.read_csv(sweep / "report" / "paper_table.csv")
    assert sorted(table["variant"]) == ["base", "sp"] and list(table["n"]) == [1, 1]
    assert "0 failed or incomplete" in (sweep / "report" / "report.md").read_text()


EPOCHS = 6  # fine-tune epochs of the pre-empted run
PREEMPTED = [*TINY, "dpm=sp", "trainer.pretrain.epochs=1", f"trainer.finetune.epochs={EPOCHS}"]


def _preempted_sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path, str]:
    """A one-job sweep on `debug`, pre-empted by a `high` job right after its fine-tune epoch 2.

    The job sleeps 2 s after each epoch's checkpoint (DPM_FAULT_SLEEP_S, dpm.faults), so SIGUSR2
    arrives after epoch 2 or 3 of 6. Each start of the job appends its SLURM_RESTART_COUNT (empty on
    the first start) to tmp_path/restarts.txt. Returns the sweep's outcome, its dir and the id of
    the `high` job."""
    sweep, restarts = tmp_path / "sweep", tmp_path / "restarts.txt"
    setup = (
        f'hydra.launcher.setup=["export OMP_NUM_THREADS=1",'
        f'"echo $SLURM_JOB_ID restart=$SLURM_RESTART_COUNT >> {restarts}"]'
    )
    out = (tmp_path / "sweep.out").open("w")
    sweeping = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dpm",
            "-m",
            *PREEMPTED,
            *overrides,
            *LAUNCHER,
            "hydra.launcher.partition=debug",
            setup,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        env={**os.environ, "DPM_FAULT_SLEEP_S": "2"},
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 150
        while "finetune epoch 2/" not in _run_logs(sweep):
            assert sweeping.poll() is None, (tmp_path / "sweep.out").read_text()[-3000:]
            assert time.time() < deadline, "fine-tune epoch 2 never logged:\n" + _run_logs(sweep)[-3000:]
            time.sleep(0.3)
        # A `high` job asking for every CPU of the node pre-empts the `debug` job.
        ncpu = (
            subprocess.run(["sinfo", "-h", "-p", "high", "-o", "%c"], capture_output=True, text=True, timeout=30)
            .stdout.split()[0]
            .rstrip("+")
        )
        high = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "-p",
                "high",
                f"--cpus-per-task={ncpu}",
                "--mem=100M",
                "-o",
                str(tmp_path / "high.out"),
                "--wrap",
                "sleep 3",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert high.returncode == 0, high.stderr
        sweeping.wait(timeout=240)
    finally:
        if sweeping.poll() is None:
            sweeping.send_signal(signal.SIGINT)
            sweeping.wait(timeout=30)
        _cancel(sweep)
        out.close()
    done = subprocess.CompletedProcess(sweeping.args, sweeping.returncode, (tmp_path / "sweep.out").read_text(), "")
    return done, sweep, high.stdout.strip().split(";")[0]


def test_preempted_job_requeues_and_resumes_from_its_checkpoint_to_the_same_metrics(slurm, tmp_path):
    """A `debug` job pre-empted by a `high` job after fine-tune epoch 2 (of 6) gets SIGUSR2,
    submitit requeues it, and the restarted job (SLURM_RESTART_COUNT=1) resumes in the same run
    dir after epoch 2 or 3 and ends exactly where an uninterrupted run ends."""
    # The uninterrupted reference, meanwhile: the same run with the basic launcher, its own pretrain
    # cache, one thread like the SLURM job (the launcher's setup exports OMP_NUM_THREADS=1).
    ref_dir = tmp_path / "reference"
    reference = subprocess.Popen(
        [sys.executable, "-m", "dpm", *PREEMPTED, f"hydra.run.dir={ref_dir}"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DPM_CACHE_DIR": str(tmp_path / "ref-cache")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        done, sweep, high = _preempted_sweep(tmp_path)
        _, ref_err = reference.communicate(timeout=120)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert done.returncode == 0, done.stdout[-4000:]
    assert reference.returncode == 0, ref_err[-3000:]

    # SLURM pre-empted the job (submitit caught SIGUSR2 and checkpointed), requeued it, restarted it.
    (job,) = _job_ids(sweep)
    states = _sacct_states(job)
    assert states[0][0] in ("REQUEUED", "PREEMPTED") and states[-1] == ("COMPLETED", "debug"), states
    assert _sacct_states(high)[-1] == ("COMPLETED", "high")
    job_log = "".join(p.read_text() for p in (sweep / ".submitit" / job).glob("*_log.*"))
    assert "Caught signal SIGUSR2" in job_log and "this job is preempted" in job_log, job_log[-3000:]
    restarts = (tmp_path / "restarts.txt").read_text()
    counts = [int(c or 0) for c in re.findall(r"restart=(\d*)$", restarts, re.M)]
    assert len(counts) >= 2 and counts[0] == 0 and max(counts) >= 1, restarts

    # The restarted job resumed in the same run dir from an epoch strictly between the first and the last.
    logs = _run_logs(sweep)
    resumed = [int(k) for k in re.findall(r"finetune: resuming after epoch (\d+)", logs)]
    assert len(resumed) == 1 and 1 < resumed[0] + 1 < EPOCHS, logs[-3000:]
    before, after = logs.split("finetune: resuming after epoch")
    assert set(range(1, resumed[0] + 1)) <= {int(k) for k in re.findall(r"finetune epoch (\d+)/", before)}
    assert [int(k) for k in re.findall(r"finetune epoch (\d+)/", after)] == list(range(resumed[0] + 1, EPOCHS + 1))

    # Same result as the uninterrupted run, and the sweep's report counts it as complete.
    (metrics_path,) = sweep.glob("*/metrics.json")
    metrics = json.loads(metrics_path.read_text())
    ref = json.loads((ref_dir / "metrics.json").read_text())
    assert metrics["status"] == ref["status"] == "complete"
    assert _comparable(metrics) == _comparable(ref)
    runs = _report_rows(sweep)
    assert list(runs["status"]) == ["complete"] and list(runs["variant"]) == ["sp"]


def test_a_preempted_wandb_run_resumes_under_the_same_id(slurm, tmp_path):
    """The W&B id lives in the run dir (dpm.loggers.stable_run_id): the requeued job resumes that
    W&B run, and a W&B service killed at pre-emption does not fail the sweep."""
    done, sweep, _ = _preempted_sweep(tmp_path, "logger=wandb", "logger.mode=offline")
    (metrics_path,) = sweep.glob("*/metrics.json")
    # The sweep's report is a W&B run of its own (job_type report): count the training run's only.
    ids = {
        p.name.rsplit("-", 1)[-1]
        for p in tmp_path.rglob("offline-run-*")
        if p.is_dir() and "report" not in p.relative_to(tmp_path).parts
    }
    assert len(ids) == 1, f"W&B runs of one dpm run: {sorted(ids)}"
    assert done.returncode == 0, done.stdout[-4000:]
    assert json.loads(metrics_path.read_text())["status"] == "complete"
    assert "finetune: resuming after epoch" in _run_logs(sweep)


def test_a_crashed_job_is_reported_as_failed_not_lost(slurm, tmp_path):
    """One job of two is SIGKILLed (after pretrain epoch 2, like an OOM kill): SLURM marks it
    FAILED, the multirun fails, and the sweep's report still lists both runs, the killed one as
    failed or incomplete."""
    sweep = tmp_path / "sweep"
    try:
        done = run_cli(
            ["-m", "experiment=smoke", "trainer.pretrain.epochs=1,2", *LAUNCHER, f"hydra.sweep.dir={sweep}"],
            env={"DPM_FAULT_AT": "pretrain:epoch2"},
            timeout=240,
        )
    finally:
        _cancel(sweep)
    assert done.returncode != 0, done.stdout[-2000:]
    assert "has not produced any output (state: FAILED)" in done.stderr, done.stderr[-3000:]
    states = {job: _sacct_states(job)[-1][0] for job in _job_ids(sweep)}
    assert sorted(states.values()) == ["COMPLETED", "FAILED"], states
    runs = _report_rows(sweep).sort_values("run_dir")
    assert len(runs) == 2, runs
    complete, killed = runs.iloc[0], runs.iloc[1]
    assert complete["status"] == "complete" and complete["epochs.pretrain"] == 1
    assert killed["status"] != "complete" and "killed" in killed["problem"], killed.to_dict()
    assert "1 failed or incomplete" in (sweep / "report" / "report.md").read_text()


def _run_logs(sweep: Path) -> str:
    """The run dirs' own logs (appended across restarts)."""
    return "".join(p.read_text(errors="replace") for p in sorted(sweep.glob("*/*.log")))
