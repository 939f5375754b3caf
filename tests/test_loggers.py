"""W&B logging in offline mode (tests never reach the network)."""
from __future__ import annotations

import json

from conftest import compose
from dpm.run import run


def test_wandb_offline_run_records_config_epochs_and_summary(tmp_path):
    cfg = compose(["experiment=smoke", "logger=wandb", "logger.mode=offline"])
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "complete"
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The offline record file is protobuf: keys and JSON values are stored as plain UTF-8.
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"pretrain/test_top1" in records  # per-epoch metrics
    assert b"top1_final" in records and json.dumps(metrics["top1_final"]).encode() in records  # summary
    assert b"tiny_cnn" in records  # resolved config
