"""The runner end to end: metrics.json contract, CLI, pretrain cache, resume after a kill, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose, run_cli
from dpm.checkpoint import StageCache
from dpm.errors import UserError
from dpm.run import git_sha, pretrain_key_fields, run

CONTRACT = [
    "model",
    "dataset",
    "pruner",
    "variant",
    "seed",
    "N",
    "T_rate",
    "T_len",
    "top1_final",
    "top1_best",
    "top1_best_epoch",
    "top1_before_prune",
    "base_macs",
    "pruned_macs",
    "base_params",
    "pruned_params",
    "flops_remaining_pct",
    "params_remaining_pct",
    "speedup",
    "counter",
    "widths",
    "epochs",
    "wall_time_s",
    "git_sha",
    "status",
]
# Fields that legitimately differ between an interrupted-and-resumed run and an uninterrupted one.
RUN_SPECIFIC = {"wall_time_s", "run_dir", "pretrain_source", "pretrain_checkpoint", "history"}


def smoke(*overrides: str):
    return compose(["experiment=smoke", *overrides])


def test_run_writes_complete_metrics(tmp_path):
    metrics = run(smoke("dataset.val_size=32"), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["status"] == "complete"
    for key in CONTRACT:
        assert key in on_disk, key
    assert on_disk["widths"] and all(w > 0 for w in on_disk["widths"].values())
    assert on_disk == json.loads(json.dumps(metrics, default=str))
    assert on_disk["base_macs"] == on_disk["pruned_macs"] > 0  # no pruner: nothing removed
    assert on_disk["flops_remaining_pct"] == 100.0 and on_disk["speedup"] == 1.0
    assert 0 <= on_disk["top1_final"] <= 100 and on_disk["top1_best"] >= on_disk["top1_final"] - 1e-9
    assert on_disk["val_size"] == 32 and "val_top1_final" in on_disk and "val_top1_best" in on_disk
    assert on_disk["epochs"] == {"pretrain": 2, "sparse": 0, "finetune": 1}
    assert (tmp_path / "run" / "config.yaml").exists()
    assert not list((tmp_path / "run").glob(".*.tmp"))  # nothing half-written left behind


def test_git_sha_is_the_commit_the_process_loaded_not_the_one_checked_out_at_run_time(tmp_path, monkeypatch):
    # A sweep imports the code once and runs its jobs one after another: a commit that lands in
    # between must not be credited with the later jobs' results (their code is still the old one).
    import dpm.run as run_module

    loaded = run_module.CODE_SHA
    monkeypatch.setattr(run_module, "git_sha", lambda: "a-commit-that-landed-after-the-import")
    metrics = run(smoke(), tmp_path / "run")
    assert metrics["git_sha"] == loaded
    assert loaded is None or len(loaded.removesuffix("-dirty")) == 40


def test_git_sha_is_dirty_only_when_the_code_that_runs_changed(tmp_path):
    """`-dirty` says the code a run ran differs from its commit: an edited README or a report the
    campaign rewrote must not mark it (it did: every run made while a sitting edited docs was dirty)."""

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    for rel in ("dpm/run.py", "conf/config.yaml", "README.md", "results/report.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("one\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "README.md").write_text("two\n")
    (tmp_path / "results" / "report.md").write_text("two\n")
    (tmp_path / "results" / "new_record.json").write_text("{}\n")
    assert git_sha(tmp_path / "dpm") == head
    for code in ("dpm/run.py", "conf/config.yaml"):
        (tmp_path / code).write_text("two\n")
        assert git_sha(tmp_path / "dpm") == f"{head}-dirty", code
        git("checkout", "-q", "--", code)


@pytest.mark.slow
def test_cli_smoke_run_writes_metrics_and_prints_summary(tmp_path):
    out = tmp_path / "cli"
    proc = run_cli(["experiment=smoke", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["model"] == "tiny_cnn"
    assert (out / ".hydra" / "config.yaml").exists()
    assert "top1 %" in proc.stdout and "metrics.json" in proc.stdout


def test_second_run_reuses_the_cached_pretrained_baseline(tmp_path, caplog):
    first = run(smoke(), tmp_path / "a")
    with caplog.at_level("INFO", logger="dpm"):
        second = run(smoke("trainer.finetune.lr=0.02"), tmp_path / "b")  # another variant, same baseline
    assert first["pretrain_source"] == "trained" and second["pretrain_source"] == "cache"
    assert second["pretrain_key"] == first["pretrain_key"]
    assert second["top1_before_prune"] == first["top1_before_prune"]
    assert "reusing the cached pretrain result" in caplog.text
    third = run(smoke("seed=1"), tmp_path / "c")  # another seed is another baseline
    assert third["pretrain_source"] == "trained" and third["pretrain_key"] != first["pretrain_key"]


@pytest.mark.slow
def test_racing_runs_pretrain_once(tmp_path):
    """Two runs with one pretrain key start while the key is locked: both wait, then exactly one
    pretrains and the other reuses its result."""
    args = ["experiment=quickstart", "trainer.pretrain.epochs=3"]
    cache = StageCache(os.environ["DPM_CACHE_DIR"], pretrain_key_fields(compose(args)))
    dirs = [tmp_path / f"r{i}" for i in range(2)]
    with cache.lock():
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "dpm", *args, f"hydra.run.dir={d}"],
                cwd=ROOT,
                env=os.environ.copy(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for d in dirs
        ]
        deadline = time.time() + 120
        while not all((d / "run.log").exists() and "waiting for" in (d / "run.log").read_text() for d in dirs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "runs did not wait"
            time.sleep(0.2)
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    sources = sorted(json.loads((d / "metrics.json").read_text())["pretrain_source"] for d in dirs)
    assert sources == ["cache", "trained"]
    assert list(Path(os.environ["DPM_CACHE_DIR"]).glob("pretrained/*/model.pt")) == [cache.model_path]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    args = ["experiment=smoke", "trainer.pretrain.epochs=3", "trainer.finetune.epochs=3"]
    reference = run_cli(
        [*args, f"hydra.run.dir={tmp_path / 'ref'}"], env={"DPM_CACHE_DIR": str(tmp_path / "cache_ref")}
    )
    assert reference.returncode == 0, reference.stderr
    env = {"DPM_CACHE_DIR": str(tmp_path / "cache_killed")}
    killed_dir = tmp_path / "killed"
    for fault in ("pretrain:epoch2", "finetune:epoch1"):
        proc = run_cli([*args, f"hydra.run.dir={killed_dir}"], env={**env, "DPM_FAULT_AT": fault})
        assert proc.returncode == -9, (fault, proc.returncode, proc.stderr[-2000:])
        assert (
            not (killed_dir / "metrics.json").exists()
            or json.loads((killed_dir / "metrics.json").read_text())["status"] != "complete"
        )
    resumed = run_cli([*args, f"hydra.run.dir={killed_dir}"], env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((killed_dir / "metrics.json").read_text())
    assert {k: v for k, v in got.items() if k not in RUN_SPECIFIC} == {
        k: v for k, v in ref.items() if k not in RUN_SPECIFIC
    }
    assert got["history"]["finetune"] == [
        {**r, "epoch_time_s": g["epoch_time_s"]} for r, g in zip(ref["history"]["finetune"], got["history"]["finetune"])
    ]


@pytest.mark.slow
def test_resume_true_continues_the_newest_unfinished_run(tmp_path):
    args = ["experiment=smoke", "trainer.finetune.epochs=3", "pretrain.cache=false"]
    first = run_cli([*args, "run_id=first"], env={"DPM_FAULT_AT": "finetune:epoch2"})
    assert first.returncode == -9
    second = run_cli([*args, "run_id=second", "resume=true"])
    assert second.returncode == 0, second.stderr
    assert "resuming the unfinished run" in second.stderr + second.stdout
    assert "finetune: resuming after epoch 2" in second.stderr + second.stdout
    out = Path(os.environ["DPM_OUTPUT_ROOT"]) / "smoke" / "second" / "metrics.json"
    assert json.loads(out.read_text())["status"] == "complete"


def test_completed_run_dir_is_not_rerun(tmp_path):
    first = run(smoke(), tmp_path / "run")
    again = run(smoke(), tmp_path / "run")
    assert again == json.loads(json.dumps(first, default=str))


@pytest.mark.parametrize(
    "args,expected",
    [
        (["model=tiny_cnn", "model.name=resnet57"], "error: model.name='resnet57': unknown model; valid:"),
        (
            ["dataset=cifar10", "dataset.root=/nonexistent/cifar10", "model=resnet20"],
            "error: dataset.root=/nonexistent/cifar10 holds neither",
        ),
        (["pretrain.checkpoint=/nonexistent.pt"], "error: pretrain.checkpoint=/nonexistent.pt does not exist"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_clear_line(tmp_path, args, expected):
    proc = run_cli(["experiment=smoke", *args, f"hydra.run.dir={tmp_path / 'bad'}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr
    metrics = json.loads((tmp_path / "bad" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] in proc.stderr


def test_checkpoint_of_another_model_is_refused(tmp_path):
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not match the model"):
        run(smoke(f"pretrain.checkpoint={tmp_path / 'other.pt'}"), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_given_checkpoint_replaces_pretraining(tmp_path):
    first = run(smoke(), tmp_path / "a")
    loaded = run(
        smoke(f"pretrain.checkpoint={first['pretrain_checkpoint']}", "trainer.finetune.epochs=0"), tmp_path / "b"
    )
    assert loaded["pretrain_source"] == "checkpoint"
    assert loaded["top1_before_prune"] == first["top1_before_prune"]


@pytest.mark.slow
def test_cli_multirun_writes_one_run_dir_per_job(tmp_path):
    proc = run_cli(["-m", "experiment=smoke", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode == 0, proc.stderr
    found = sorted(
        (json.loads(p.read_text())["seed"], p.parent.name) for p in (tmp_path / "sweep").glob("*/metrics.json")
    )
    assert found == [(0, "0_seed=0"), (1, "1_seed=1")]  # the experiment is the sweep dir's name, not a subdir


# ----------------------------------------------------------------------------- loading runs no code
class _RunsCode:
    """Unpickling this calls open(marker, "w"): what a crafted checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path):
    from dpm.checkpoint import atomic_torch_save, load_checkpoint

    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1, "x": _RunsCode(marker)}, ckpt)  # checksummed: only the content is bad
    with pytest.raises(UserError) as err:
        load_checkpoint(ckpt)
    assert not marker.exists()
    assert "\n" not in str(err.value) and str(ckpt) in str(err.value) and "delete" in str(err.value)
    # A file named on the command line: one line, exit 2, nothing executed.
    weights = tmp_path / "weights.pt"
    torch.save({"model": _RunsCode(marker)}, weights)
    proc = run_cli(["experiment=smoke", f"pretrain.checkpoint={weights}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not marker.exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(weights) in last and "not loaded" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_rng_state_travels_in_a_weights_only_checkpoint():
    import io
    import random

    import numpy as np

    from dpm.checkpoint import rng_state, seed_everything, set_rng_state

    seed_everything(3)
    np.random.randn()  # numpy's cached Gaussian is part of its state
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    expected = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    got = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    assert torch.equal(got[0], expected[0]) and (got[1] == expected[1]).all() and got[2:] == expected[2:]


@pytest.mark.slow
def test_checkpoint_written_before_weights_only_loading_is_one_line_on_resume(tmp_path):
    import numpy as np

    from dpm.checkpoint import atomic_torch_save, load_checkpoint
    from dpm.run import CHECKPOINT

    args = [
        "experiment=smoke",
        "trainer.finetune.epochs=2",
        "pretrain.cache=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    assert run_cli(args, env={"DPM_FAULT_AT": "finetune:epoch1"}).returncode == -9
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    state["rng"]["numpy"] = np.random.get_state()  # how RNG states were stored before: a numpy array inside
    atomic_torch_save(state, tmp_path / "run" / CHECKPOINT, keep_previous=False)
    proc = run_cli(args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "run" / CHECKPOINT) in last and "delete" in last, last
    assert "Traceback" not in proc.stderr


def test_pruned_model_is_saved_as_weights_and_structure(tmp_path):
    import torch_pruning as tp

    from dpm.checkpoint import load_checkpoint, load_pruned_model, save_pruned_model
    from dpm.models import build_model

    model = build_model("tiny_cnn", 10, 1, widths=(8, 8, 8)).eval()
    x = torch.randn(4, 1, 8, 8)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    dg.get_pruning_group(convs[0], tp.prune_conv_out_channels, idxs=[0, 3, 5]).prune()
    dg.get_pruning_group(convs[1], tp.prune_conv_out_channels, idxs=[1]).prune()
    path = tmp_path / "pruned_model.pt"
    save_pruned_model(
        path, model, {"name": "tiny_cnn", "num_classes": 10, "in_channels": 1, "widths": [8, 8, 8]}, removed=4
    )
    # Plain data only: tensors and containers, nothing that unpickling would have to construct.
    assert load_checkpoint(path)["removed"] == 4
    loaded = load_pruned_model(path)
    assert type(loaded) is type(model) and not loaded.training
    assert [tuple(p.shape) for p in loaded.parameters()] == [tuple(p.shape) for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert torch.equal(loaded(x), model(x))
    assert (convs[0].out_channels, convs[1].in_channels) == (5, 5)
    loaded_convs = [m for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in loaded_convs] == [(c.in_channels, c.out_channels) for c in convs]
