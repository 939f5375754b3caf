"""Vectorisation, asserted by counting torch ops (never by timing).

A controller step must issue a fixed number of tensor ops per parameter whatever the number of
targets: the same parameters with 10 or 1,000 decaying targets must produce the same op count.
"""

from collections import Counter

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dpm.core import DecayController, RectifyConfig, channel_targets, segments


class OpCounter(TorchFunctionMode):
    """Counts every torch function / tensor method call that reaches Python dispatch."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops[getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))] += 1
        return func(*args, **(kwargs or {}))


WIDTH = 1200


def setup(num_targets: int, rectify: bool, consumers: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    cfg = RectifyConfig(t_rate=float("inf"), t_len=float("inf")) if rectify else None
    ctl = DecayController(net, N=50, rectify=cfg, optimizer=opt, include_consumers=consumers)
    targets = channel_targets("fc1", [(net[0].weight, 0), (net[0].bias, 0)], consumers=[(net[2].weight, 1)])
    ctl.register(targets)
    return net, opt, ctl, targets[:num_targets]


def backward(net):
    net.zero_grad()
    net(torch.randn(16, 8)).pow(2).mean().backward()


def count_ops(num_targets: int, rectify: bool, consumers: bool) -> tuple[Counter, Counter]:
    net, opt, ctl, targets = setup(num_targets, rectify, consumers)
    # Prune a few first so the masks / optimizer-state path runs too.
    ctl.admit(targets[-3:], N=1)
    with OpCounter() as admit_ops:
        ctl.admit(targets[:-3])
    backward(net)
    ctl.step(opt)  # decay step 2; the next one is counted
    backward(net)
    with OpCounter() as step_ops:
        ctl.before_step(opt)
    opt.step()
    with step_ops:
        ctl.after_step(opt)
    assert ctl.counts()["decaying"] == num_targets - 3
    return admit_ops.ops, step_ops.ops


@pytest.mark.parametrize("stack", [False, True])
@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("consumers", [False, True])
def test_op_count_independent_of_number_of_targets(rectify, consumers, stack, monkeypatch):
    monkeypatch.setattr(segments, "STACK_ON_CPU", stack)
    admit_small, step_small = count_ops(10, rectify, consumers)
    admit_large, step_large = count_ops(1000, rectify, consumers)
    assert sum(step_small.values()) > 10  # the mode does see the controller's ops
    assert step_small == step_large
    assert admit_small == admit_large


def test_op_counter_detects_a_per_target_loop():
    """The counter is sharp enough to catch a loop over targets."""
    x = torch.zeros(WIDTH)

    def looped(n):
        with OpCounter() as c:
            for i in range(n):
                x[i] = x[i] * 0.5
        return sum(c.ops.values())

    assert looped(10) != looped(1000)


def mlp(seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()]
    for _ in range(3):  # same-shaped layers: the accelerator path stacks them
        layers += [nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(8, 3))


def run_mlp(stack: bool, monkeypatch):
    monkeypatch.setattr(segments, "STACK_ON_CPU", stack)
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ctl = DecayController(net, N=6, optimizer=opt, include_consumers=True, rectify=RectifyConfig(t_rate=0.0, t_len=1.0))
    targets = []
    for i in range(4):
        lin, bn, nxt = net[3 * i], net[3 * i + 1], net[3 * i + 3]
        targets += channel_targets(
            f"l{i}", [(lin.weight, 0), (lin.bias, 0), (bn.weight, 0), (bn.bias, 0)], consumers=[(nxt.weight, 1)]
        )
    ctl.register(targets)
    ctl.admit(targets[::3])
    g = torch.Generator().manual_seed(3)
    for _ in range(8):
        opt.zero_grad()
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        nn.functional.cross_entropy(net(x), y).backward()
        ctl.step(opt)
    return net, ctl


def test_stacked_path_matches_per_tensor_path(monkeypatch):
    """The accelerator path (same-shaped tensors stacked) computes what the CPU path computes."""
    net0, ctl0 = run_mlp(False, monkeypatch)
    net1, ctl1 = run_mlp(True, monkeypatch)
    plan = ctl1._decays.plan
    assert any(end - start > 1 for start, end, _, _ in plan.groups), "nothing was stacked"
    assert all(end - start == 1 for start, end, _, _ in ctl0._decays.plan.groups)
    assert (ctl0.pruned, ctl0.released) == (ctl1.pruned, ctl1.released)
    assert ctl0.pruned and ctl0.released  # both decay outcomes exercised
    for (name, a), b in zip(net0.state_dict().items(), net1.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name
