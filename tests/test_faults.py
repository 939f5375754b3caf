"""Fault injection: kills at every stage, corrupt checkpoints, bad configs, NaNs, full or read-only
disks, bad images, and two processes on one run dir. Every case runs for real (SIGKILL, real
files); the session ends with a summary line (tests/conftest.py) that the README quotes."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dpm_env_faults import EnvFaults

import dpm.faults
from conftest import compose, run_cli
from dpm.checkpoint import atomic_torch_save, load_checkpoint, previous_path
from dpm.errors import UserError
from dpm.run import CHECKPOINT, PRETRAIN_PROGRESS, run, run_dir_lock

pytestmark = pytest.mark.fault

# A DepGraph +SR run on digits that has every stage: pretrain, sparse learning, two rounds whose
# +SR decay (N = 30 > the 23 iterations of an epoch) crosses an epoch boundary, fine-tune.
CAMPAIGN = [
    "experiment=quickstart",
    "dpm=sr",
    "trainer.deterministic=true",
    "trainer.progress=false",
    "trainer.pretrain.epochs=2",
    "trainer.sparse.epochs=2",
    "trainer.finetune.epochs=4",
    "dpm.N=30",
    "pruner.rounds=2",
    "pruner.round_interval=40",
]
# What legitimately differs between a resumed run and an uninterrupted one.
VOLATILE = {
    "wall_time_s",
    "run_dir",
    "git_sha",
    "pretrain_source",
    "sparse_source",
    "pretrain_checkpoint",
    "epoch_time_s",
}


def comparable(metrics: dict) -> dict:
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(metrics)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_no_data_lost(run_dir: Path) -> None:
    """Nothing half-written that a resume or report would trust: no temporary files, and every
    checkpoint and metrics.json present parses (checksum verified)."""
    leftovers = [p for p in run_dir.rglob("*.tmp")]
    if leftovers:
        raise DataLost(f"temporary files left behind: {leftovers}")
    for ckpt in list(run_dir.glob("*.pt")) + list(run_dir.glob("*.pt.prev")):
        try:
            load_checkpoint(ckpt)
        except UserError as err:
            raise DataLost(f"unusable checkpoint {ckpt}: {err}") from None
    if (run_dir / "metrics.json").exists():
        json.loads((run_dir / "metrics.json").read_text())


class DataLost(AssertionError):
    """A fault case that lost or corrupted data (counted apart in the session summary)."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every kill case must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    proc = run_cli(
        [*CAMPAIGN, f"hydra.run.dir={root / 'run'}"],
        env={"DPM_CACHE_DIR": str(root / "cache"), "DPM_OUTPUT_ROOT": str(root / "out")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(root / "run")


# ------------------------------------------------------------------------------------ kill anywhere
KILL_POINTS = [
    ("pretrain:kill_step5", "mid-epoch in pretraining, before any checkpoint"),
    ("pretrain:epoch1", "right after a pretrain checkpoint"),
    ("sparse:kill_step15", "mid-epoch in sparse learning"),
    ("finetune:kill_step10", "mid-decay in the first round"),
    ("finetune:kill_step28", "mid-decay, the decay crossing the epoch-1 checkpoint"),
    ("rounds:before_removal", "between the decay's end and the physical removal"),
    ("finetune:epoch2", "right after a fine-tune checkpoint"),
    ("run:before_metrics", "after the work, before metrics.json"),
]


@pytest.mark.parametrize("point", [p for p, _ in KILL_POINTS], ids=[p for p, _ in KILL_POINTS])
@pytest.mark.slow
def test_kill_anywhere_then_resume_gives_the_same_metrics(tmp_path, reference, point):
    run_dir = tmp_path / "run"
    killed = run_cli([*CAMPAIGN, f"hydra.run.dir={run_dir}"], env={"DPM_FAULT_AT": point})
    assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
    assert not (run_dir / "metrics.json").exists() or read_metrics(run_dir)["status"] != "complete"
    assert_no_data_lost(run_dir)
    resumed = run_cli([*CAMPAIGN, f"hydra.run.dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_no_data_lost(run_dir)
    assert comparable(read_metrics(run_dir)) == comparable(reference)


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference):
    run_dir = tmp_path / "run"
    killed = run_cli([*CAMPAIGN, f"hydra.run.dir={run_dir}"], env={"DPM_FAULT_AT": "finetune:epoch2"})
    assert killed.returncode == -9
    latest, previous = run_dir / CHECKPOINT, previous_path(run_dir / CHECKPOINT)
    assert load_checkpoint(latest)["epoch"] == 2 and load_checkpoint(previous)["epoch"] == 1
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # a torn write, e.g. a node lost mid-save
    resumed = run_cli([*CAMPAIGN, f"hydra.run.dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "checksum mismatch" in log and "falling back to the previous one" in log
    assert "finetune: resuming after epoch 1" in log
    assert comparable(read_metrics(run_dir)) == comparable(reference)


def test_corrupt_byte_is_detected_by_the_checksum(tmp_path):
    path = tmp_path / "c.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(100)}, path)
    atomic_torch_save({"epoch": 2, "w": torch.ones(100)}, path)
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # one flipped byte inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))
    assert load_checkpoint(path)["epoch"] == 1  # the kept predecessor
    previous_path(path).write_bytes(b"garbage")
    with pytest.raises(UserError, match="no usable checkpoint at .*c.pt"):
        load_checkpoint(path)


@pytest.mark.slow
def test_killed_report_is_rewritten_whole(tmp_path):
    runs = tmp_path / "runs"
    for variant in ("base", "sp"):
        run(compose(["experiment=smoke", "pruner=depgraph", f"dpm={variant}", "dpm.N=2"]), runs / variant)
    whole = run_cli_report([str(runs), "--out", str(tmp_path / "whole"), "--no-plots"])
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    killed = run_cli_report([str(runs), "--out", str(out), "--no-plots"], fault="report:after_first_file")
    assert killed.returncode == -9
    assert len(list(out.iterdir())) == 1 and not list(out.glob(".*tmp"))  # one whole file, no part of one
    again = run_cli_report([str(runs), "--out", str(out), "--no-plots"])
    assert again.returncode == 0, again.stderr
    for f in (tmp_path / "whole").iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def run_cli_report(args: list[str], fault: str | None = None):
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, **({"DPM_FAULT_AT": fault} if fault else {})}
    return subprocess.run(
        [sys.executable, "-m", "dpm.report", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


# ------------------------------------------------------------------------------------ bad configs
BAD_CONFIGS = [
    (["dpm.N=0"], "dpm.N=0: N counts decay steps and must be >= 1"),
    (["dpm.N=2.5"], "dpm.N: Value '2.5' of type 'float' could not be converted to Integer: give an integer"),
    (["dpm=sr", "dpm.T_rate=-1"], "dpm.T_rate=-1.0: t_rate must be >= 0 (inf disables), got -1.0"),
    (["dpm=sr", "dpm.T_len=-0.5"], "dpm.T_len=-0.5: t_len must be >= 0 (inf disables), got -0.5"),
    (["dpm.interval=0"], "dpm.interval=0: must be >= 1"),
    (["pruner.speedup=1.0"], "pruner.speedup=1.0: the MACs speed-up target must be > 1"),
    (["pruner.speedup=500"], "pruner.speedup=500.0: tiny_cnn cannot get faster than about"),
    (["dpm=sp", "dpm.N=100000"], "dpm.N: N=100000 exceeds the 230 iterations left in this phase"),
    (["model=resnet57"], "model=resnet57: no such model config; valid: mobilenet_v2,"),
    (["model.name=resnet57"], "model.name='resnet57': unknown model; valid:"),
    (["pruner=prune_everything"], "pruner=prune_everything: no such pruner config; valid: depgraph,"),
    (["dataset.num_classes=100"], "dataset.num_classes=100: digits has 10 classes"),
    (["dpm.variant=fast"], "dpm.variant='fast': valid: base, sp, sr"),
    (["dpm.Nx=3"], "dpm.Nx: no such key"),
    (["trainer.finetune.lr=0"], "trainer.finetune.lr=0.0: must be > 0"),
    (
        ["dataset=cifar10", "model=resnet20", "dataset.root=/nonexistent/cifar10"],
        "dataset.root=/nonexistent/cifar10 holds neither train/ and test/ image folders",
    ),
    (["pretrain.checkpoint=/nonexistent.pt"], "pretrain.checkpoint=/nonexistent.pt does not exist"),
    (
        ["experiment=gate_decorator_smoke", "pruner.flops_target=0.001"],
        "pruner.flops_target=0.001: with every layer kept at pruner.min_channel_ratio=0.1 at least about",
    ),
    (
        ["experiment=otov2_smoke", "pruner.target_group_sparsity=1.2"],
        "pruner.target_group_sparsity=1.2: must be in (0, 1)",
    ),
]


@pytest.mark.parametrize("args,expected", BAD_CONFIGS, ids=[" ".join(a) for a, _ in BAD_CONFIGS])
@pytest.mark.slow
def test_bad_config_is_one_line_before_any_work(tmp_path, args, expected):
    run_dir = tmp_path / "bad"
    proc = run_cli(["experiment=quickstart", "trainer.progress=false", *args, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {expected}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    cache = Path(os.environ["DPM_CACHE_DIR"])
    assert not list(cache.glob("pretrained/*/model.pt")) and not list(cache.glob("pretrained/*/last.pt"))
    if run_dir.exists():  # a composition error stops before Hydra makes the run dir
        written = {p.name for p in run_dir.iterdir()}
        assert written <= {"metrics.json", "config.yaml", "run.lock", "run.log", ".hydra"}, written
        assert read_metrics(run_dir)["status"] == "failed"


def test_sweep_with_run_dir_names_too_long_is_one_line(tmp_path):
    many = [
        f"trainer.{phase}.{key}={value}"
        for phase in ("pretrain", "finetune")
        for key, value in (("lr", 0.05), ("weight_decay", 0.0005), ("momentum", 0.9), ("batch_size", 32))
    ]
    proc = run_cli(
        [
            "-m",
            "experiment=smoke",
            "seed=0,1",
            *many,
            "trainer.eval_batch_size=64",
            "dataset.val_size=0",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ]
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1].endswith("add 'hydra.sweep.subdir=${hydra.job.num}' (numbered run dirs)")
    )
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_checkpoint_of_another_model_is_one_line(tmp_path):
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "other.pt")
    proc = run_cli(
        ["experiment=quickstart", f"pretrain.checkpoint={tmp_path / 'other.pt'}", f"hydra.run.dir={tmp_path / 'run'}"]
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: pretrain.checkpoint={tmp_path / 'other.pt'} does not match the model")
    )


# ------------------------------------------------------------------------------------ resume safety
@pytest.mark.slow
def test_resume_with_another_config_is_refused_with_the_diff(tmp_path):
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", "trainer.finetune.epochs=3", f"hydra.run.dir={run_dir}"]
    assert run_cli(args, env={"DPM_FAULT_AT": "finetune:epoch1"}).returncode == -9
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    refused = run_cli([*args, "trainer.finetune.lr=0.5", "seed=3"])
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {run_dir} holds a run with another config (")
    assert "seed: 0 -> 3" in line and "trainer.finetune.lr: 0.01 -> 0.5" in line and "force_resume=true" in line
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    kept = lambda files: {k: v for k, v in files.items() if k not in ("run.log", "run.lock")}  # noqa: E731
    assert kept(after) == kept(before)
    # run-time keys may change; force_resume continues with the new config
    assert run_cli([*args, "trainer.device=cpu", "trainer.progress=false", "dpm.track=null"]).returncode == 0
    assert run_cli([*args, "trainer.finetune.lr=0.5", "force_resume=true"]).returncode == 0  # complete: returns


@pytest.mark.slow
def test_second_process_on_the_same_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with run_dir_lock(run_dir):
        proc = run_cli(["experiment=smoke", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2
    assert f"error: {run_dir} is in use by another process (pid {os.getpid()} on " in proc.stderr
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.slow
def test_a_sweep_skips_the_run_another_process_holds_and_exits_clean(tmp_path):
    """Two processes of one sweep (the CPU-scale campaign runs two side by side): the run the other
    holds is skipped with one line, the sweep's own runs complete, and its exit status is about them
    (before: the refused run counted as failed, exit 1, and the campaign stopped with a traceback)."""
    sweep = tmp_path / "sweep"
    held = sweep / "s0"
    held.mkdir(parents=True)
    with run_dir_lock(held):
        proc = run_cli(
            ["-m", "experiment=smoke", "seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=s${seed}"]
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((sweep / "s1" / "metrics.json").read_text())["status"] == "complete"
    assert not (held / "metrics.json").exists()
    assert f"skipped: {held} is run by another process (pid {os.getpid()} on " in proc.stderr
    assert "1 of 2 runs skipped: another process runs them and reports them" in proc.stderr
    assert "Traceback" not in proc.stderr and "did not complete" not in proc.stderr


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.lock").write_text("pid 999999 on elsewhere since 2026-01-01 00:00:00\n")
    with caplog.at_level("INFO", logger="dpm"):
        metrics = run(compose(["experiment=smoke"]), run_dir)
    assert metrics["status"] == "complete"
    assert "taking over the stale lock of a process that is gone (pid 999999" in caplog.text


# ------------------------------------------------------------------------------------ numerical faults
@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = ["experiment=quickstart", "pretrain.cache=false", "trainer.progress=false", f"hydra.run.dir={run_dir}"]
    proc = run_cli(args, env={"DPM_FAULT_AT": "pretrain:nan_step30"})  # step 7 of epoch 2
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "error: pretrain: the loss became NaN/inf at step 30 (epoch 2); the last good checkpoint is kept"
    )
    assert load_checkpoint(run_dir / PRETRAIN_PROGRESS)["epoch"] == 1
    failed = read_metrics(run_dir)
    assert failed["status"] == "failed" and "step 30" in failed["error"]
    assert_no_data_lost(run_dir)


def test_a_native_crash_prints_the_python_stack_where_it_happened(tmp_path):
    # A crash inside native code (glibc's "double free or corruption" aborts the process) must say
    # which Python line was running, or a crash seen only on another host cannot be located.
    args = ["experiment=smoke", "trainer.progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli(args, env={"DPM_FAULT_AT": "pretrain:abort_step3", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -6, proc.stderr[-2000:]  # SIGABRT
    assert "Fatal Python error: Aborted" in proc.stderr, proc.stderr[-2000:]
    assert 'dpm/train.py", line' in proc.stderr.replace("\\", "/"), proc.stderr[-2000:]


def test_on_nan_skip_step_skips_and_counts(tmp_path):
    dpm.faults.install(EnvFaults("pretrain:nan_step10"))  # isolated_env removes it afterwards
    metrics = run(
        compose(
            ["experiment=smoke", "trainer.on_nan=skip_step", "trainer.pretrain.epochs=3", "dataset.synthetic_train=512"]
        ),
        tmp_path / "run",
    )
    assert metrics["status"] == "complete" and metrics["nonfinite_steps_skipped"] == 1
    assert all(
        torch.isfinite(p).all()
        for p in load_checkpoint(tmp_path / "run" / CHECKPOINT)["model"].values()
        if p.is_floating_point()
    )


def test_diverging_run_stops_before_checkpointing_nan_weights(tmp_path):
    with pytest.raises(UserError, match=r"pretrain: the loss became NaN/inf at step \d+"):
        run(compose(["experiment=smoke", "pretrain.cache=false", "trainer.pretrain.lr=1e30"]), tmp_path / "run")
    assert not (tmp_path / "run" / PRETRAIN_PROGRESS).exists()  # no epoch finished: nothing bad saved
    assert read_metrics(tmp_path / "run")["status"] == "failed"


# ------------------------------------------------------------------------------------ disks
class FillingDisk:
    """Patches the writer under every atomic write: after `budget` bytes, ENOSPC (a full disk)."""

    def __init__(self, monkeypatch, budget: int):
        import dpm.checkpoint as ckpt

        self.budget, real_fdopen = budget, os.fdopen
        disk = self

        class Full:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                if len(data) > disk.budget:
                    self.f.write(data[: disk.budget])  # a partial write, as a filling disk does
                    disk.budget = 0
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.budget -= len(data)
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))


def test_disk_full_mid_run_fails_clearly_and_resumes_after_space_is_freed(tmp_path, monkeypatch):
    args = ["experiment=smoke", "trainer.finetune.epochs=3", "pretrain.cache=false", "trainer.deterministic=true"]
    reference = run(compose(args), tmp_path / "ref")
    run_dir = tmp_path / "run"
    # Enough room for the config and a few checkpoints, then the disk is full.
    ckpt_size = (tmp_path / "ref" / CHECKPOINT).stat().st_size
    with monkeypatch.context() as patch:
        FillingDisk(patch, budget=4 * ckpt_size)
        with pytest.raises(
            UserError,
            match=r"cannot write .*: No space left on device: free space there or point "
            r"output_root / cache_dir at a writable location",
        ):
            run(compose(args), run_dir)
    assert_no_data_lost(run_dir)
    assert not (run_dir / "metrics.json").exists() or read_metrics(run_dir)["status"] == "failed"
    resumed = run(compose(args), run_dir)  # space freed
    assert comparable(resumed) == comparable(reference)


def test_read_only_output_dir_fails_clearly_and_writes_nothing(tmp_path, monkeypatch):
    import tempfile

    import dpm.checkpoint as ckpt

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", read_only)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"cannot write .*config.yaml: Read-only file system"):
        run(compose(["experiment=smoke"]), run_dir)
    assert {p.name for p in run_dir.iterdir()} <= {"run.lock"}
    monkeypatch.setattr(ckpt.tempfile, "mkstemp", tempfile.mkstemp)


# ------------------------------------------------------------------------------------ bad data
def image_folder(root: Path, classes: int = 10, per_class: int = 2, size: int = 32) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.jpg", quality=90)
    return root


def test_corrupt_jpeg_is_named_or_skipped(tmp_path):
    from dpm.data import build_data

    root = image_folder(tmp_path / "cifar10")
    bad = root / "train" / "class3" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated mid-scan
    cfg = compose(["dataset=cifar10", f"dataset.root={root}", "model=resnet20"])
    with pytest.raises(UserError, match=f"cannot decode image {bad} .*set dataset.bad_images=skip"):
        build_data(cfg.dataset, cache_dir=str(tmp_path / "cache"))
    cfg = compose(["dataset=cifar10", f"dataset.root={root}", "model=resnet20", "dataset.bad_images=skip"])
    data = build_data(cfg.dataset, cache_dir=str(tmp_path / "cache"))
    assert len(data.train) == 19 and len(data.test) == 20


@pytest.mark.slow
def test_corrupt_jpeg_through_the_cli_is_one_line(tmp_path):
    root = image_folder(tmp_path / "cifar10")
    bad = root / "test" / "class0" / "0.jpg"
    bad.write_bytes(b"not a jpeg")
    proc = run_cli(
        [
            "experiment=smoke",
            "dataset=cifar10",
            f"dataset.root={root}",
            "dataset.image_size=32",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot decode image {bad}")


def test_empty_class_folder_and_wrong_layout_are_clear_errors(tmp_path):
    from dpm.data import build_data

    root = image_folder(tmp_path / "cifar10")
    for f in (root / "train" / "class7").iterdir():
        f.unlink()
    cfg = compose(["dataset=cifar10", f"dataset.root={root}", "model=resnet20"])
    with pytest.raises(UserError, match=f"class folder {root / 'train' / 'class7'} holds no images"):
        build_data(cfg.dataset)
    flat = tmp_path / "flat"
    for split in ("train", "test"):
        (flat / split).mkdir(parents=True)
        shutil.copy(root / "test" / "class0" / "0.jpg", flat / split / "0.jpg")
    cfg = compose(["dataset=cifar10", f"dataset.root={flat}", "model=resnet20"])
    with pytest.raises(UserError, match=f"{flat / 'train'} has no class folders: expected the ImageFolder layout"):
        build_data(cfg.dataset)
