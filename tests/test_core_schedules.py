"""Decay schedules: s(0) = 1 and s(N) = 0 exactly; the controller follows them."""

import math

import pytest
import torch
from torch import nn

from dpm.core import SCHEDULES, DecayController, Slice, Target, resolve_decay_steps, schedule

NS = [1, 2, 3, 7, 10, 100, 391, 1000]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("N", NS)
def test_endpoints_exact(name, N):
    assert schedule(name, 0, N).item() == 1.0
    assert schedule(name, N, N).item() == 0.0
    n = torch.arange(N + 1, dtype=torch.float64)
    s = schedule(name, n, torch.full_like(n, N))
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert torch.all(s[1:] < s[:-1]), "strictly decreasing"
    assert torch.all((s >= 0) & (s <= 1))


def test_linear_is_the_papers():
    n = torch.arange(11, dtype=torch.float64)
    assert torch.allclose(schedule("linear", n, 10.0), 1 - n / 10, rtol=0, atol=1e-15)


def test_cosine_and_exp_shapes():
    assert schedule("cosine", 5, 10).item() == pytest.approx(0.5)
    k = 5.0
    assert schedule("exp", 5, 10).item() == pytest.approx((math.exp(-k / 2) - math.exp(-k)) / (1 - math.exp(-k)))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule("step", 1, 2)
    with pytest.raises(ValueError, match="unknown schedule"):
        DecayController([nn.Parameter(torch.ones(2))], N=2, schedule="step")


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_controller_follows_schedule(name):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 5))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    N = 7
    ctl = DecayController([w], N=N, schedule=name, optimizer=opt)
    L0 = w.detach()[0].norm().item()
    ctl.admit([Target("r0", "w", (Slice(w, 0, (0,)),))])
    norms = [w.detach()[0].norm().item()]
    for _ in range(N - 1):
        w.grad = torch.randn(3, 5)
        ctl.step(opt)
        norms.append(w.detach()[0].norm().item())
    expected = [L0 * schedule(name, n, N).item() for n in range(1, N + 1)]
    assert norms == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert norms[-1] == 0.0


def test_resolve_decay_steps():
    assert resolve_decay_steps(N=100) == 100
    assert resolve_decay_steps(N_epochs=2, iters_per_epoch=391) == 782
    assert resolve_decay_steps(N_epochs=0.5, iters_per_epoch=391, iters_left=1000) == 196
    with pytest.raises(ValueError, match="exceeds"):
        resolve_decay_steps(N=500, iters_left=400)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_decay_steps(N=5, N_epochs=1, iters_per_epoch=10)
    with pytest.raises(ValueError, match="iters_per_epoch"):
        resolve_decay_steps(N_epochs=1)
    with pytest.raises(ValueError, match="N must be"):
        resolve_decay_steps(N=0)
