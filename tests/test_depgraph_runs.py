"""DepGraph + DPM through the runner: N = 1 is the base method, rounds, SR, real CIFAR-10 end to end."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CIFAR10, compose
from dpm.checkpoint import load_checkpoint
from dpm.run import CHECKPOINT, run

# Fields that differ between two runs of the same computation.
RUN_SPECIFIC = {"wall_time_s", "run_dir", "pretrain_source", "history", "variant", "name"}


# +SR in three rounds 10 steps apart with thresholds that release on digits (fine-tune epochs vary).
SR_ROUNDS = [
    "dpm.N=5",
    "pruner.rounds=3",
    "pruner.round_interval=10",
    "dpm.release_cooldown=2",
    "dpm.T_rate=0.002",
    "dpm.T_len=1.2",
]


def digits(*overrides: str):
    """A seconds-long DepGraph run on digits, deterministic on CPU."""
    return compose(
        [
            "experiment=quickstart",
            "trainer.deterministic=true",
            "trainer.progress=false",
            "trainer.pretrain.epochs=3",
            "trainer.finetune.epochs=2",
            *overrides,
        ]
    )


def final_weights(run_dir):
    return load_checkpoint(run_dir / CHECKPOINT)["model"]


def test_sp_with_N_1_is_bitwise_the_base_method(tmp_path):
    base = run(digits("dpm=base"), tmp_path / "base")
    sp = run(digits("dpm=sp", "dpm.N=1"), tmp_path / "sp")
    assert base["status"] == sp["status"] == "complete"
    assert base["N"] == sp["N"] == 1 and base["admitted"] > 0
    assert {k: v for k, v in sp.items() if k not in RUN_SPECIFIC} == {
        k: v for k, v in base.items() if k not in RUN_SPECIFIC
    }
    wb, ws = final_weights(tmp_path / "base"), final_weights(tmp_path / "sp")
    assert wb.keys() == ws.keys() and all(torch.equal(wb[k], ws[k]) for k in wb)


def test_base_meets_the_speedup_and_records_the_dpm_counters(tmp_path):
    m = run(digits("dpm=base", "pruner.speedup=2.5"), tmp_path / "run")
    assert m["target_met"] and m["native_speedup"] >= 2.5
    assert m["pruned_macs"] < m["base_macs"] and m["speedup"] > 1.5  # headline counter agrees in direction
    assert m["pruned"] == m["admitted"] > 0 and m["released"] == 0 and m["rounds_done"] == 1
    assert m["native_counter"] == "torch_pruning" and m["native_pruned_macs"] < m["native_base_macs"]
    assert m["epochs"]["finetune"] == 2
    # widths is the saved model's shape, and some layer is narrower than the unpruned one's.
    weights = final_weights(tmp_path / "run")
    assert m["widths"] == {name: weights[f"{name}.weight"].shape[0] for name in m["widths"]}
    unpruned = run(digits("pruner=none"), tmp_path / "unpruned")["widths"]
    assert unpruned.keys() == m["widths"].keys() and any(m["widths"][k] < unpruned[k] for k in unpruned)


def test_sp_decays_over_N_steps_then_removes(tmp_path):
    m = run(digits("dpm=sp", "dpm.N=10"), tmp_path / "run")
    assert m["N"] == 10 and m["target_met"]
    assert m["removals"][0]["iteration"] == 9  # admitted at iteration 0 (step 1), zero after 9 more steps
    log = json.loads((tmp_path / "run" / "dpm_log.json").read_text())
    for key, points in log["trajectories"]:
        l0 = points[0][2] / (1 - 1 / 10)
        for _, n, norm in points:
            assert norm == pytest.approx(l0 * (1 - n / 10), rel=1e-4, abs=1e-6)
    assert log["trajectories"]


def test_rounds_split_the_speedup_and_never_reselect(tmp_path, monkeypatch):
    from dpm.pruners.rounds import PruningRounds

    calls = []
    original = PruningRounds._start_round

    def spy(self, optimizer):
        excluded_before = self.controller.candidates_excluded()
        original(self, optimizer)
        admitted_now = self.controller.decaying | self.controller.pruned
        calls.append((excluded_before, admitted_now))

    monkeypatch.setattr(PruningRounds, "_start_round", spy)
    m = run(
        digits(
            "dpm=sr",
            "trainer.finetune.epochs=4",
            *SR_ROUNDS,
        ),
        tmp_path / "run",
    )
    assert m["rounds_done"] >= 3 and m["target_met"] and m["released"] >= 1
    assert any(excluded for excluded, _ in calls)  # cooling-down released channels were offered as exclusions
    for excluded, admitted in calls:
        assert not (excluded & admitted)
    speedups = [r["speedup"] for r in m["removals"]]
    assert speedups == sorted(speedups) and speedups[0] < m["native_speedup"]


@pytest.mark.usefixtures("cifar10")  # skips without the data, fails under DPM_REQUIRE_DATA=1
@pytest.mark.slow
def test_real_cifar10_base_sp_sr_end_to_end(tmp_path, decode_cache):
    common = [
        "dataset=cifar10",
        f"dataset.root={CIFAR10}",
        "model=resnet20",
        "dataset.train_subset=1000",
        "dataset.test_subset=500",
        "trainer.pretrain.epochs=4",
        "trainer.finetune.epochs=3",
        "trainer.pretrain.batch_size=50",
        "trainer.finetune.batch_size=50",
        "trainer.pretrain.lr=0.05",
        "pruner.speedup=1.6",
        "pruner.round_interval=12",
        f"cache_dir={decode_cache}",
        "dpm.N=10",
        # smoke thresholds: about the 90th percentile of this setting's C_rate, C_len above the
        # family mean; released channels stay out of later rounds (SR's extra rounds meet the target)
        "dpm.T_rate=0.0003",
        "dpm.T_len=1.2",
        "dpm.release_cooldown=100",
    ]
    results = {
        v: run(compose(["experiment=quickstart", *common, f"dpm={v}"]), tmp_path / v) for v in ("base", "sp", "sr")
    }
    for v, m in results.items():
        assert m["status"] == "complete" and m["target_met"], v
        assert m["top1_final"] > 15.0, (v, m["top1_final"])  # chance is 10%
    assert results["sp"]["N"] == 10 and results["sp"]["admitted"] > 0
    log = json.loads((tmp_path / "sp" / "dpm_log.json").read_text())
    key, points = log["trajectories"][0]
    l0 = points[0][2] / (1 - 1 / 10)
    assert [n for _, n, _ in points] == list(range(1, 11))
    assert all(norm == pytest.approx(l0 * (1 - n / 10), rel=1e-4, abs=1e-6) for _, n, norm in points)
    assert results["sr"]["released"] >= 1
    assert results["base"]["pretrain_key"] == results["sp"]["pretrain_key"] == results["sr"]["pretrain_key"]


@pytest.mark.slow
def test_killed_pruning_run_resumes_to_the_same_metrics(tmp_path):
    """Killed after fine-tune epoch 2 (channels removed, SR rounds under way), the rerun replays the
    removals, restores the decay controller and ends where an uninterrupted run ends."""
    from conftest import run_cli

    args = [
        "experiment=quickstart",
        "dpm=sr",
        "trainer.deterministic=true",
        "trainer.pretrain.epochs=3",
        "trainer.finetune.epochs=4",
        *SR_ROUNDS,
    ]
    ref = run_cli([*args, f"hydra.run.dir={tmp_path / 'ref'}"], env={"DPM_CACHE_DIR": str(tmp_path / "c1")})
    assert ref.returncode == 0, ref.stderr
    env = {"DPM_CACHE_DIR": str(tmp_path / "c2")}
    killed = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], env={**env, "DPM_FAULT_AT": "finetune:epoch2"})
    assert killed.returncode == -9
    resumed = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "finetune: resuming after epoch 2" in resumed.stdout + resumed.stderr
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "run" / "metrics.json").read_text())
    skip = RUN_SPECIFIC | {"pretrain_checkpoint"}
    assert a["released"] >= 1 and a["rounds_done"] >= 2
    assert {k: v for k, v in b.items() if k not in skip} == {k: v for k, v in a.items() if k not in skip}


@pytest.mark.slow
def test_sr_releases_in_the_last_round_are_made_up_so_the_target_is_met(tmp_path):
    """Thresholds of 0 release nearly every decaying channel: make-up rounds follow at once, and
    when no N-step decay fits any more the channels still missing go at once (invariant 6)."""
    m = run(
        digits(
            "dpm=sr",
            "trainer.finetune.epochs=2",
            "dpm.N=8",
            "pruner.rounds=2",
            "pruner.round_interval=10",
            "dpm.T_rate=0",
            "dpm.T_len=0",
            "pruner.max_extra_rounds=3",
        ),
        tmp_path / "run",
    )
    assert m["released"] >= 10 and m["target_met"] and m["native_speedup"] >= 2.0
    assert m["rounds_done"] > 2  # make-up rounds ran
    immediate = [r for r in m["removals"] if r.get("immediate")]
    assert immediate and immediate[-1]["speedup"] >= 2.0 and len({r["iteration"] for r in immediate}) == 1  # once


@pytest.mark.slow
def test_run_killed_inside_epochs_resumes_from_mid_epoch_checkpoints_to_the_same_metrics(tmp_path):
    """With trainer.checkpoint_every_steps, a kill inside a pretrain epoch and one inside a fine-tune
    epoch (round 2's decay under way: rounds at steps 0, 10, 20, N = 5) resume at the step after the
    last checkpoint and end where a run without mid-epoch checkpoints ends."""
    from conftest import run_cli

    args = [
        "experiment=quickstart",
        "dpm=sr",
        "trainer.deterministic=true",
        "trainer.pretrain.epochs=3",
        "trainer.finetune.epochs=2",
        *SR_ROUNDS,
    ]
    ref = run_cli([*args, f"hydra.run.dir={tmp_path / 'ref'}"], env={"DPM_CACHE_DIR": str(tmp_path / "c1")})
    assert ref.returncode == 0, ref.stderr
    run_args = [*args, "trainer.checkpoint_every_steps=4", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {"DPM_CACHE_DIR": str(tmp_path / "c2")}
    # 23 pretrain steps an epoch: step 35 is the 13th of epoch 2, killed after the checkpoint of its
    # 12th; fine-tune step 13 is inside epoch 1, after the checkpoint of its 12th (round 2 decaying).
    first = run_cli(run_args, env={**env, "DPM_FAULT_AT": "pretrain:kill_step35"})
    assert first.returncode == -9, first.stderr[-2000:]
    second = run_cli(run_args, env={**env, "DPM_FAULT_AT": "finetune:kill_step13"})
    assert second.returncode == -9, second.stderr[-2000:]
    assert "pretrain: resuming at step 12 of epoch 2" in second.stdout + second.stderr
    third = run_cli(run_args, env=env)
    assert third.returncode == 0, third.stderr
    assert "finetune: resuming at step 12 of epoch 1" in third.stdout + third.stderr
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "run" / "metrics.json").read_text())
    skip = RUN_SPECIFIC | {"pretrain_checkpoint"}
    assert a["rounds_done"] >= 2
    assert {k: v for k, v in b.items() if k not in skip} == {k: v for k, v in a.items() if k not in skip}
    strip = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in a["history"]["finetune"]]
    assert [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in b["history"]["finetune"]] == strip


@pytest.mark.slow
def test_sparse_learning_stage_is_shared_between_variants(tmp_path):
    sl = ["trainer.sparse.epochs=2", "trainer.sparse.lr=0.01", "pruner.reg=5e-4"]
    base = run(digits("dpm=base", *sl), tmp_path / "base")
    sp = run(digits("dpm=sp", "dpm.N=5", *sl), tmp_path / "sp")
    assert base["sparse_learning"] and base["epochs"]["sparse"] == 2
    assert (base["sparse_source"], sp["sparse_source"]) == ("trained", "cache")
    assert base["sparse_key"] == sp["sparse_key"] and base["top1_before_prune"] == sp["top1_before_prune"]
    plain = run(digits("dpm=base"), tmp_path / "plain")
    assert not plain["sparse_learning"] and "sparse_source" not in plain
    # the regularised weights differ from the plain pretrained ones, so the pruned models differ too
    assert final_weights(tmp_path / "plain").keys() == final_weights(tmp_path / "base").keys()
    assert any(
        not torch.equal(a, b)
        for a, b in zip(final_weights(tmp_path / "plain").values(), final_weights(tmp_path / "base").values())
    )


@pytest.mark.slow
def test_strict_budget_replaces_releases_within_the_round(tmp_path):
    base_budget = run(digits("dpm=sr"), tmp_path / "base_budget")
    strict = run(digits("dpm=sr", "dpm.budget=strict"), tmp_path / "strict")
    assert strict["released"] >= 1 and strict["target_met"]
    # each release is replaced at once by the next-least-important channel, in the same round
    assert strict["admitted"] == strict["pruned"] + strict["released"]
    assert strict["rounds_done"] == 1 < base_budget["rounds_done"]
