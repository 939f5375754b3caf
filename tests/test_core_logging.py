"""What a run can log per decay step (docs/method.md section 5, invariant 7)."""

import math

import pytest
import torch
from torch import nn

from dpm.core import QUANTILES, DecayController, RectifyConfig, Slice, Target


def setup(track=3):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 4))
    opt = torch.optim.SGD([w], lr=0.1)
    cfg = RectifyConfig(t_rate=math.inf, t_len=math.inf)
    ctl = DecayController([w], N=5, rectify=cfg, optimizer=opt, track=track)
    targets = [Target(i, "w", (Slice(w, 0, (i,)),)) for i in range(8)]
    ctl.register(targets)
    return w, opt, ctl, targets


def test_counts_history_and_percentiles():
    w, opt, ctl, targets = setup()
    ctl.admit(targets[:5])
    g = torch.Generator().manual_seed(4)
    for step in range(4):
        w.grad = torch.randn(8, 4, generator=g)
        x = w.detach().clone()
        ctl.step(opt)
        rec = ctl.log.history[-1]
        assert rec["step"] == step
        if step < 3:
            assert (rec["decaying"], rec["pruned"]) == (5, 0)
            # C_rate (radial) by hand for the 5 decaying rows, summarised by the same percentiles.
            L0 = torch.tensor([ctl._registry.decay[i][0] for i in range(5)], dtype=torch.float64)
            xs, gs = x[:5].double(), w.grad[:5].double()
            rate = -(0.1 * (gs * xs).sum(1)) / xs.norm(dim=1) / (L0 / 5)
            gn = w.grad.double().norm(dim=1)
            length = gn[:5] / gn.mean()
            q = torch.tensor(list(QUANTILES.values()), dtype=torch.float64)
            assert list(rec["c_rate"].values()) == pytest.approx(torch.quantile(rate, q).tolist(), rel=1e-4, abs=1e-7)
            assert list(rec["c_len"].values()) == pytest.approx(torch.quantile(length, q).tolist(), rel=1e-4, abs=1e-7)
        else:  # decay step 5 = N: pruned, and the last step is not checked
            assert (rec["decaying"], rec["pruned"]) == (0, 5)
            assert "c_rate" not in rec
    assert ctl.counts() == {"decaying": 0, "pruned": 5, "released": 0, "releases_total": 0, "readmissions": 0}


def test_norm_trajectories_of_a_sample():
    w, opt, ctl, targets = setup(track=2)
    L0 = [w.detach()[i].norm().item() for i in range(3)]
    ctl.admit(targets[:3])
    actual = {0: [w.detach()[0].norm().item()], 1: [w.detach()[1].norm().item()]}
    for _ in range(4):
        w.grad = torch.randn(8, 4)
        ctl.step(opt)
        for i in (0, 1):
            actual[i].append(w.detach()[i].norm().item())
    assert set(ctl.log.trajectories) == {0, 1}  # only the first `track` targets
    for i in (0, 1):
        traj = ctl.log.trajectories[i]
        assert [n for _, n, _ in traj] == [1, 2, 3, 4, 5]
        assert [s for s, _, _ in traj] == [0, 0, 1, 2, 3]
        assert [v for _, _, v in traj] == pytest.approx(actual[i], rel=1e-5, abs=1e-7)
        assert traj[-1][2] == 0.0 and traj[0][2] == pytest.approx(L0[i] * 0.8, rel=1e-6)


def test_track_none_logs_every_admitted_target_and_a_bad_track_is_refused():
    w, opt, ctl, targets = setup(track=None)
    ctl.admit(targets[:3])
    ctl.step(opt)
    ctl.admit(targets[5:7])  # admitted later: tracked as well
    for _ in range(5):
        w.grad = torch.zeros(8, 4)
        ctl.step(opt)
    assert list(ctl.log.trajectories) == [0, 1, 2, 5, 6]
    assert all(traj[-1][2] == 0.0 and len(traj) == 5 for traj in ctl.log.trajectories.values())
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="track must be an integer >= 0 or None"):
            DecayController([w], N=5, track=bad)
