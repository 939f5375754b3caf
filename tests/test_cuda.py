"""The GPU path (bf16 autocast, channels_last); runs only where CUDA is present."""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from dpm.run import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_cuda_run_with_bf16_and_channels_last(tmp_path):
    cfg = compose(
        [
            "experiment=smoke",
            "trainer.device=cuda",
            "trainer.bf16=true",
            "trainer.channels_last=true",
            "trainer.deterministic=false",
        ]
    )
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "complete" and metrics["device"].startswith("cuda")
    assert metrics["base_macs"] > 0


def test_auto_device_picks_cuda():
    from dpm.train import resolve_device

    assert resolve_device("auto").type == "cuda"
