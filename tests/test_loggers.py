"""W&B logging in offline mode (tests never reach the network)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from conftest import compose
from dpm.run import run


def test_wandb_offline_run_records_config_epochs_and_summary(tmp_path):
    cfg = compose(["experiment=smoke", "logger=wandb", "logger.mode=offline"])
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "complete"
    # The offline record file is protobuf: keys and JSON values are stored as plain UTF-8.
    records = offline_records(tmp_path / "run")
    assert b"pretrain/test_top1" in records  # per-epoch metrics
    assert b"top1_final" in records and json.dumps(metrics["top1_final"]).encode() in records  # summary
    assert b"tiny_cnn" in records  # resolved config


def field_bytes(**fields) -> bytes:
    """How one RunRecord field is encoded in the offline file (protobuf: tag, length, UTF-8)."""
    from wandb.proto import wandb_internal_pb2 as pb

    return pb.RunRecord(**fields).SerializeToString()


# Record.exit (field 18) holding RunExitRecord.exit_code = 1: tag 0x92 0x01, a length byte, 0x08 0x01.
EXIT_FAILED = re.compile(rb"\x92\x01.\x08\x01", re.DOTALL)
# Any exit record: tag, then empty (exit code 0 is not encoded) or length + exit_code / runtime.
EXIT_RECORD = re.compile(rb"\x92\x01(\x00|.[\x08\x10])", re.DOTALL)


def offline_records(run_dir: Path, timeout: float = 20.0) -> bytes:
    """The bytes of the one offline W&B run under `run_dir/wandb` (protobuf; keys are plain UTF-8),
    once complete. wandb-core (0.31) writes the file asynchronously: run.finish() can return before
    the records reach the disk, so wait for the exit record (Record field 18, tag 0x92 0x01)."""
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    path = next(runs[0].glob("run-*.wandb"))
    deadline = time.monotonic() + timeout
    previous = b""
    while True:
        data = path.read_bytes()
        # Done: an exit record and no growth since the last look (records after it are the footer).
        if (EXIT_RECORD.search(data) and data == previous) or time.monotonic() > deadline:
            return data
        previous = data
        time.sleep(0.1)


def test_wandb_pruning_run_logs_steps_dpm_counters_group_and_job_type(tmp_path):
    cfg = compose(
        [
            "experiment=smoke",
            "pruner=depgraph",
            "dpm=sr",
            "dpm.N=3",
            "table=smoke_table",
            "ablation=N",
            "logger=wandb",
            "logger.log_every=2",
        ]
    )
    assert cfg.logger.mode == "offline"  # from WANDB_MODE (conftest), via conf/logger/wandb.yaml
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "complete"
    records = offline_records(tmp_path / "run")
    for key in (
        "pretrain/loss",
        "pretrain/lr",
        "pretrain/step",
        "finetune/loss",
        "finetune/dpm_decaying",
        "finetune/dpm_pruned",
        "finetune/dpm_released",
        "finetune/dpm_releases_total",
        "finetune/test_top1",
    ):
        assert key.encode() in records, key
    assert field_bytes(run_group="tiny_cnn-synthetic-depgraph-sr") in records
    assert field_bytes(job_type="run") in records  # stages are metric prefixes, see dpm/loggers.py
    assert field_bytes(tags=["smoke_table", "ablation", "ablation:N"]) in records
    assert metrics["ablation"] == "N"
    assert not re.search(EXIT_FAILED, records)


def test_failing_run_still_finishes_its_wandb_run_marked_failed(tmp_path, monkeypatch):
    import dpm.run as dpm_run

    def boom(*_args, **_kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(dpm_run, "execute", boom)
    cfg = compose(["experiment=smoke", "logger=wandb"])
    with pytest.raises(RuntimeError, match="injected"):
        run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    records = offline_records(tmp_path / "run")
    assert b"injected failure" in records  # the summary reached the file: finish() ran
    assert re.search(EXIT_FAILED, records)  # finished with exit_code=1: W&B shows it failed
    import wandb

    assert wandb.run is None  # finished, not left open for the next run in this process
