"""DDP on CPU (gloo): a 2-process DepGraph +SR run with a removal mid-run and releases, whose ranks
train on different shards, agree on every DPM decision, and leave exactly one metrics.json."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import compose
from dpm import distributed
from dpm.errors import UserError

# The digits +SR run of tests/test_depgraph_runs.py (rounds, releases, cooldowns), shortened.
DDP_OVERRIDES = [
    "experiment=quickstart",
    "pruner=depgraph",
    "dpm=sr",
    "trainer.device=cpu",
    "trainer.deterministic=true",
    "trainer.progress=false",
    "trainer.pretrain.epochs=2",
    "trainer.finetune.epochs=3",
    "dpm.N=5",
    "pruner.rounds=3",
    "pruner.round_interval=10",
    "dpm.release_cooldown=2",
    "dpm.T_rate=0.002",
    "dpm.T_len=1.2",
    "trainer.devices=2",
]


# `python -m dpm` on two CPU ranks through torchrun; the overrides follow.
TORCHRUN_DPM = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dpm"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, run_dirs: list[str], env: dict) -> None:
    """One DDP rank: run the config through dpm.run.run, recording what this rank decided and trained on."""
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    import dpm.run as R
    import dpm.stages.depgraph as stage
    from dpm.data.loaders import SplitLoader
    from dpm.pruners.rounds import PruningRounds
    from dpm.stages.base import decay_log

    record: dict = {"rounds": [], "shards": {}, "rewraps": 0}
    original_iter, original_start = SplitLoader.__iter__, PruningRounds._start_round

    def spy_iter(self):
        if self.train:
            record["shards"][f"{self.phase}:{self.epoch}"] = self.shard_indices(self.epoch).tolist()
        return original_iter(self)

    def spy_start(self, optimizer):
        original_start(self, optimizer)
        record["rounds"].append(
            {
                "iteration": self.iteration,
                "decaying": sorted(map(str, self.controller.decaying)),
                "pruned": sorted(map(str, self.controller.pruned)),
            }
        )

    captured = {}
    original_make_rounds = stage.make_rounds

    def spy_make_rounds(*args, **kwargs):
        captured["rounds"] = original_make_rounds(*args, **kwargs)
        return captured["rounds"]

    original_refresh = distributed.TrainModule.refresh

    def spy_refresh(self):
        before = self.signature
        module = original_refresh(self)
        if before is not None and self.signature is not before:
            record["rewraps"] += 1
        return module

    import dpm.phase

    # Patched where they are looked up: the phase's checkpoint writer, the runner's logger factory.
    record.update(checkpoints_written=0, loggers_made=0)
    original_save, original_logger = dpm.phase.atomic_torch_save, R.make_logger

    def spy_save(*args, **kwargs):
        record["checkpoints_written"] += 1
        return original_save(*args, **kwargs)

    def spy_logger(*args, **kwargs):
        record["loggers_made"] += 1
        return original_logger(*args, **kwargs)

    dpm.phase.atomic_torch_save, R.make_logger = spy_save, spy_logger
    SplitLoader.__iter__, PruningRounds._start_round, stage.make_rounds = spy_iter, spy_start, spy_make_rounds
    distributed.TrainModule.refresh = spy_refresh
    metrics = R.run(compose(DDP_OVERRIDES), run_dirs[rank])
    rounds = captured["rounds"]
    record.update(
        metrics={
            k: metrics.get(k)
            for k in (
                "status",
                "top1_final",
                "native_speedup",
                "released",
                "pruned",
                "admitted",
                "rounds_done",
                "world_size",
            )
        },
        removals=rounds.removals,
        summary=rounds.summary(),
        decay_log=decay_log(rounds.controller),
        sizes=[list(p.shape) for p in rounds.model.parameters()],
    )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record, default=str))


@pytest.mark.slow
def test_two_process_ddp_depgraph_sr_agrees_on_every_decision(tmp_path):
    run_dirs = [str(tmp_path / "run"), str(tmp_path / "rank1_own_dir")]  # rank 1 must adopt rank 0's dir
    env = {k: os.environ[k] for k in ("DPM_OUTPUT_ROOT", "DPM_CACHE_DIR")}
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), run_dirs, env), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # Each rank trained on its own half of every global batch: disjoint shards covering the batch.
    assert r0["shards"].keys() == r1["shards"].keys() and r0["shards"]
    for key in r0["shards"]:
        a, b = r0["shards"][key], r1["shards"][key]
        assert a and b and not set(a) & set(b) and abs(len(a) - len(b)) <= 1 + len(a) // 64

    # A physical removal mid-run (DDP rebuilt after it) and at least one release.
    assert r0["metrics"]["status"] == "complete" and r0["metrics"]["world_size"] == 2
    assert r0["removals"] and r0["removals"][0]["iteration"] > 0 and r0["rewraps"] >= 1
    assert r0["summary"]["released"] >= 1

    # Every DPM decision, the per-step decay log and the final shapes agree across ranks.
    for key in ("rounds", "removals", "summary", "decay_log", "sizes", "rewraps", "metrics"):
        assert r0[key] == r1[key], key

    # Checkpoints and the (W&B-capable) logger come from rank 0 only.
    assert r0["checkpoints_written"] >= 2 and r1["checkpoints_written"] == 0
    assert (r0["loggers_made"], r1["loggers_made"]) == (1, 0)

    # Exactly one metrics.json (rank 0's, in rank 0's run dir); rank 1 wrote nothing of its own.
    found = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("metrics.json"))
    assert found == ["run/metrics.json"]
    assert not Path(run_dirs[1]).exists()
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["status"] == "complete" and written["top1_final"] == r1["metrics"]["top1_final"]
    assert (tmp_path / "run" / "dpm_log.json").exists()


@pytest.mark.slow
def test_torchrun_cli_writes_one_run(tmp_path):
    import subprocess

    from conftest import ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            *TORCHRUN_DPM,
            "experiment=smoke",
            "pruner=depgraph",
            "dpm=sp",
            "dpm.N=2",
            "trainer.devices=2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = list((tmp_path / "outputs").rglob("metrics.json"))
    assert len(found) == 1 and json.loads(found[0].read_text())["world_size"] == 2
    assert proc.stdout.count("dpm smoke:") == 1  # one summary, from rank 0


def test_launch_env_from_torchrun_and_slurm():
    torchrun = distributed.launch_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    )
    assert (
        torchrun["rank"],
        torchrun["world_size"],
        torchrun["local_rank"],
        torchrun["master_addr"],
        torchrun["master_port"],
    ) == (3, 8, 1, "n1", 1234)
    slurm = distributed.launch_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_NODELIST": "gpu[07-09,12],cpu1",
            "SLURM_JOB_ID": "4242",
        }
    )
    assert (slurm["rank"], slurm["world_size"], slurm["local_rank"], slurm["master_addr"]) == (5, 8, 1, "gpu07")
    assert slurm["master_port"] == 20000 + 4242
    assert distributed.launch_env({}) is None
    assert distributed.first_host("node1") == "node1"
    assert distributed.first_host("a-b[001-004]") == "a-b001"


def test_devices_without_a_launcher_and_unsupported_pruners_are_clear_errors(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="torchrun --nproc_per_node 2"):
        distributed.setup(2, 1, "cpu")
    from dpm.config import validate

    with pytest.raises(UserError, match="not supported with trainer.devices > 1"):
        validate(compose(["experiment=gate_decorator_smoke", "trainer.devices=2"]))
    with pytest.raises(UserError, match="divide evenly"):
        validate(compose(["experiment=smoke", "pruner=depgraph", "trainer.devices=3"]))


@pytest.mark.slow
def test_killed_torchrun_run_resumes_inside_an_epoch_to_the_same_metrics(tmp_path):
    """Two ranks killed inside a fine-tune epoch (a decay under way) resume from the mid-epoch
    checkpoint rank 0 wrote and end with the metrics of an uninterrupted two-rank run."""
    import subprocess

    from conftest import ROOT

    def torchrun(run_dir: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DPM_CACHE_DIR": str(run_dir.parent / f"{run_dir.name}_cache")}
        if fault:
            env["DPM_FAULT_AT"] = fault
        return subprocess.run(
            [
                *TORCHRUN_DPM,
                "experiment=smoke",
                "pruner=depgraph",
                "dpm=sp",
                "dpm.N=3",
                "trainer.finetune.epochs=2",
                "trainer.devices=2",
                f"hydra.run.dir={run_dir}",
                *extra,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    ref = torchrun(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    # 4 steps an epoch: fine-tune step 7 is the 4th of epoch 2, after the checkpoint of its 2nd.
    killed = torchrun(tmp_path / "run", "trainer.checkpoint_every_steps=2", fault="finetune:kill_step7")
    assert killed.returncode != 0
    resumed = torchrun(tmp_path / "run", "trainer.checkpoint_every_steps=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finetune: resuming at step 2 of epoch 2" in resumed.stdout + resumed.stderr
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("top1_final", "top1_best", "pruned_macs", "pruned_params", "pruned", "admitted", "world_size"):
        assert a[key] == b[key], key
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in h["finetune"]]  # noqa: E731
    assert strip(b["history"]) == strip(a["history"])


def _due_worker(rank: int, world: int, port: int, out: str) -> None:
    import time

    import torch.distributed as tdist

    from dpm.phase import CHECKPOINT_POLL, checkpoint_due

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Rank 0's clock says due, rank 1's says not: both must follow rank 0 (or the barrier hangs).
        last_save = time.time() - (3600 if rank == 0 else 0)
        due = checkpoint_due(CHECKPOINT_POLL, last_save, 0, 5.0)
        Path(out, f"{rank}.json").write_text(json.dumps(due))
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_checkpoint_clock_is_rank_zeros_on_every_rank(tmp_path):
    mp.spawn(_due_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)] == [True, True]
