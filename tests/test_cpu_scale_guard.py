"""The CPU-scale campaign's guards that need no data and no run (fast tier)."""

from __future__ import annotations

import importlib.util

import pytest

import dpm.train
from conftest import ROOT


def load_campaign():
    spec = importlib.util.spec_from_file_location("campaign", ROOT / "experiments" / "cpu_scale" / "campaign.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", ["pretrain", "select", "table", "trajectories", "all"])
def test_the_real_campaign_refuses_a_cpu_without_native_bf16(monkeypatch, capsys, stage):
    # The 15-seed campaign is defined on the fast path (bf16 autocast + channels_last): on a CPU that
    # only emulates bf16, trainer.fast=null falls back to fp32 NCHW and its runs would be a different
    # recipe from the archived ones. One line, before any run starts.
    monkeypatch.setattr(dpm.train, "cpu_bf16_native", lambda: (False, "cpu capability: no avx512_bf16 or amx"))
    campaign = load_campaign()
    monkeypatch.setattr(campaign, "multirun", lambda *a, **k: pytest.fail("a sweep started"))
    with pytest.raises(SystemExit) as stop:
        campaign.main([stage, "--bases", "depgraph", "--seeds", "0"])
    message = str(stop.value)
    assert message.startswith("this CPU has no native bf16 (cpu capability: no avx512_bf16 or amx)")
    assert "--smoke" in message and "\n" not in message


def test_the_smoke_campaign_and_the_report_run_on_any_cpu(monkeypatch):
    monkeypatch.setattr(dpm.train, "cpu_bf16_native", lambda: (False, "cpu capability: no avx512_bf16 or amx"))
    campaign = load_campaign()
    started = []
    monkeypatch.setattr(campaign, "multirun", lambda stage, *a, **k: started.append(stage) or ROOT)
    monkeypatch.setattr(campaign, "check_baselines", lambda smoke: None)
    campaign.main(["pretrain", "--seeds", "0", "--smoke"])
    assert started == ["pretrain"]
    reported = []
    monkeypatch.setattr(campaign, "report", lambda bases, smoke: reported.append(bases))
    campaign.main(["report", "--bases", "depgraph"])
    assert reported == [["depgraph"]]


def test_seeds_that_are_not_integers_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        load_campaign().main(["table", "--seeds", "0,one", "--smoke"])
    assert stop.value.code == 2
    assert "--seeds '0,one': give comma-separated integers, e.g. --seeds 0,1,2" in capsys.readouterr().err
