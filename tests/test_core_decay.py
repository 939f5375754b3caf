"""Smooth Pruning (docs/method.md section 3; invariants 1-3 of section 5) on a tiny conv/BN net.

Invariants 1-3 hold on both training paths: fp32 NCHW, and the CPU fast path (the forward under bf16
autocast with model and inputs channels_last; the controller runs in fp32 outside autocast)."""

import copy

import pytest
import torch
from torch import nn

from dpm.core import DecayController, Slice, Target, channel_targets
from dpm.train import autocast
from helpers import OPTIMIZERS, bitwise_equal, one_thread, tiny_net  # noqa: F401  (one_thread is an autouse fixture)

PATHS = ("fp32", "fast")


def make_net(path: str = "fp32", seed: int = 0) -> nn.Sequential:
    net = tiny_net(seed)
    return net.to(memory_format=torch.channels_last) if path == "fast" else net


def conv1_targets(net: nn.Sequential) -> list[Target]:
    conv, bn = net[0], net[1]
    return channel_targets(
        "conv1",
        [(conv.weight, 0), (conv.bias, 0), (bn.weight, 0), (bn.bias, 0)],
        consumers=[(net[3].weight, 1)],
    )


def batches(n: int, seed: int = 1, path: str = "fp32"):
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]
    return [(x.to(memory_format=torch.channels_last), y) for x, y in out] if path == "fast" else out


def vec(t: Target) -> torch.Tensor:
    """The target's producer vector x."""
    return torch.cat([s.param.detach().index_select(s.dim, torch.tensor(s.indices)).reshape(-1) for s in t.producers])


def backward(net, batch, path: str = "fp32"):
    """One step's backward; on the fast path the forward runs under CPU bf16 autocast and the loss
    in fp32 on the fp32 copy of the logits (as dpm.train does)."""
    x, y = batch
    if path == "fp32":
        nn.functional.cross_entropy(net(x), y).backward()
        return
    with autocast(torch.device("cpu"), True):
        hidden = net[:3](x)
        assert hidden.dtype == torch.bfloat16, "the forward did not run in bf16"  # autocast is really on
        out = net[3:](hidden)
    nn.functional.cross_entropy(out.float(), y).backward()


def fast_path_kept(net: nn.Sequential, path: str) -> bool:
    """The controller kept the weights fp32 and (on the fast path) channels_last."""
    fmt = torch.channels_last if path == "fast" else torch.contiguous_format
    return all(p.dtype == torch.float32 for p in net.parameters()) and net[0].weight.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_linear_norm_and_direction_every_step(opt_name, path):
    net = make_net(path)
    opt = OPTIMIZERS[opt_name](net.parameters())
    N = 6
    ctl = DecayController(net, N=N, optimizer=opt)
    targets = conv1_targets(net)[:3]
    L0 = [vec(t).norm().item() for t in targets]
    ctl.admit(targets)
    for t, l0 in zip(targets, L0):
        assert vec(t).norm().item() == pytest.approx(l0 * (1 - 1 / N), rel=1e-5)
    for n, batch in zip(range(2, N + 1), batches(N - 1, path=path)):
        opt.zero_grad()
        backward(net, batch, path)
        ctl.before_step(opt)
        opt.step()
        x_tilde = [vec(t).clone() for t in targets]
        ctl.after_step(opt)
        for t, l0, xt in zip(targets, L0, x_tilde):
            x = vec(t)
            assert x.norm().item() == pytest.approx(l0 * (1 - n / N), rel=1e-5, abs=1e-7)
            if n < N:  # the direction is the optimizer's: x is a positive multiple of x~
                cos = torch.dot(x, xt) / (x.norm() * xt.norm())
                assert cos.item() == pytest.approx(1.0, abs=1e-6)
                assert torch.allclose(x / x.norm(), xt / xt.norm(), atol=1e-6)
    assert ctl.pruned == {t.key for t in targets}
    assert fast_path_kept(net, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_bit_exact_zero_after_N_and_50_more_steps(opt_name, path):
    net = make_net(path)
    opt = OPTIMIZERS[opt_name](net.parameters())
    N = 4
    ctl = DecayController(net, N=N, optimizer=opt)
    targets = conv1_targets(net)[1:4]
    ctl.admit(targets)
    for i, batch in enumerate(batches(N - 1 + 50, path=path)):
        opt.zero_grad()
        backward(net, batch, path)
        ctl.step(opt)
        if i >= N - 2:
            for t in targets:
                for s in t.producers:
                    sl = s.param.detach().index_select(s.dim, torch.tensor(s.indices))
                    # +0.0 in every bit, not merely == 0 (-0.0 would differ from the base's zero_()).
                    assert torch.equal(sl.view(torch.int32), torch.zeros_like(sl, dtype=torch.int32))
                    for v in opt.state[s.param].values():
                        if isinstance(v, torch.Tensor) and v.shape == s.param.shape:
                            sv = v.index_select(s.dim, torch.tensor(s.indices))
                            assert torch.count_nonzero(sv) == 0
    # The network still trains: other channels moved.
    assert ctl.counts()["pruned"] == 3 and ctl.counts()["decaying"] == 0
    assert fast_path_kept(net, path)


@pytest.mark.parametrize(
    "make_opt,state_names",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), ["momentum_buffer"]),
        (lambda ps: torch.optim.Adam(ps, lr=1e-2), ["exp_avg", "exp_avg_sq"]),
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    ],
)
def test_pruned_slices_optimizer_state_zeroed(make_opt, state_names):
    net = tiny_net()
    opt = make_opt(net.parameters())
    ctl = DecayController(net, N=3, optimizer=opt)
    for batch in batches(2):  # build up non-zero state first
        opt.zero_grad()
        backward(net, batch)
        ctl.step(opt)
    t = conv1_targets(net)[2]
    w = net[0].weight
    for name in state_names:
        assert opt.state[w][name][2].abs().sum() > 0
    ctl.admit([t])
    for batch in batches(2, seed=5):
        opt.zero_grad()
        backward(net, batch)
        ctl.step(opt)
    assert ctl.pruned == {t.key}
    for name in state_names:
        assert torch.count_nonzero(opt.state[w][name][2]) == 0
        assert opt.state[w][name][3].abs().sum() > 0  # untouched neighbours


def base_zero(net, opt, targets):
    """The base method: zero the slices and their optimizer state (and keep them zero)."""
    with torch.no_grad():
        for t in targets:
            for s in t.producers:
                s.param.index_fill_(s.dim, torch.tensor(s.indices), 0.0)
                for v in opt.state[s.param].values():
                    if isinstance(v, torch.Tensor) and v.shape == s.param.shape:
                        v.index_fill_(s.dim, torch.tensor(s.indices), 0.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_N1_is_base_zeroing_bitwise(opt_name, path):
    data = batches(8, path=path)
    runs = []
    for use_dpm in (False, True):
        net = make_net(path)
        opt = OPTIMIZERS[opt_name](net.parameters())
        ctl = DecayController(net, N=1, optimizer=opt) if use_dpm else None
        for i, batch in enumerate(data):
            if i == 3:  # prune between steps, after some state has built up
                targets = conv1_targets(net)[::2]
                ctl.admit(targets) if use_dpm else base_zero(net, opt, targets)
            opt.zero_grad()
            backward(net, batch, path)
            if use_dpm:
                ctl.step(opt)
            else:
                opt.step()
                if i >= 3:
                    base_zero(net, opt, targets)
        runs.append((net, opt))
    (n0, o0), (n1, o1) = runs
    for (name, a), b in zip(n0.state_dict().items(), n1.state_dict().values()):
        if a.is_floating_point():
            assert bitwise_equal(a, b), name
        else:
            assert torch.equal(a, b), name
    for p0, p1 in zip(n0.parameters(), n1.parameters()):
        for k, v in o0.state[p0].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert bitwise_equal(v, o1.state[p1][k]), k


@pytest.mark.parametrize("path", PATHS)
def test_training_with_dpm_is_bitwise_reproducible(path):
    """The same training twice at the same thread count gives the same bits."""

    def train():
        net = make_net(path)
        opt = OPTIMIZERS["sgd_momentum_wd"](net.parameters())
        ctl = DecayController(net, N=4, optimizer=opt)
        ctl.admit(conv1_targets(net)[:2])
        for batch in batches(10, path=path):
            opt.zero_grad()
            backward(net, batch, path)
            ctl.step(opt)
        return net.state_dict()

    a, b = train(), train()
    for key in a:
        assert bitwise_equal(a[key], b[key]) if a[key].is_floating_point() else torch.equal(a[key], b[key]), key


def test_interval_decays_every_kth_step():
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    N, interval = 3, 2
    ctl = DecayController(net, N=N, interval=interval, optimizer=opt)
    t = conv1_targets(net)[0]
    L0 = vec(t).norm().item()
    ctl.admit([t])
    expected = {1: 1 / 3, 3: 0.0}  # after optimizer steps 1 and 3 (0-based): decay steps 2 and 3
    for i, batch in enumerate(batches(4)):
        opt.zero_grad()
        backward(net, batch)
        ctl.before_step(opt)
        opt.step()
        x_tilde = vec(t).clone()
        ctl.after_step(opt)
        if i in expected:
            assert vec(t).norm().item() == pytest.approx(L0 * expected[i], abs=1e-6)
        else:  # no decay step: the optimizer alone moved it
            assert torch.equal(vec(t), x_tilde)
            assert vec(t).norm().item() != pytest.approx(L0 * (2 / 3), rel=1e-6)
    assert ctl.pruned == {t.key}


def test_zero_norm_edge_cases():
    w = nn.Parameter(torch.randn(4, 3))
    with torch.no_grad():
        w[1].zero_()
    opt = torch.optim.SGD([w], lr=0.1)
    ctl = DecayController([w], N=5, optimizer=opt)
    t_zero = Target("zero", "w", (Slice(w, 0, (1,)),))
    t_live = Target("live", "w", (Slice(w, 0, (2,)),))
    ctl.admit([t_zero, t_live])
    assert ctl.pruned == {"zero"}  # L0 = 0 is already pruned
    assert ctl.decaying == {"live"}
    # ||x~|| = 0 mid-decay stays 0 (no NaN): the optimizer step happens to zero it.
    w.grad = torch.zeros_like(w)
    ctl.before_step(opt)
    opt.step()
    with torch.no_grad():
        w[2].zero_()
    ctl.after_step(opt)
    assert torch.isfinite(w).all() and torch.count_nonzero(w[2]) == 0


def test_custom_optimizer_trial_tensors():
    """OTOv2-style use: admission and decay steps applied to the step's trial point."""
    w = nn.Parameter(torch.randn(6, 4))
    ctl = DecayController([w], N=4)
    targets = [Target(("w", i), "w", (Slice(w, 0, (i,)),)) for i in range(6)]
    ctl.register(targets)
    lr = 0.1
    L0 = w.detach()[1].norm().item()

    def custom_step(admit=()):
        ctl.before_step(lr=lr)
        with torch.no_grad():
            trial = {w: w - lr * w.grad}
            ctl.admit(admit, tensors=trial)
            ctl.after_step(tensors=trial)
            w.copy_(trial[w])

    w.grad = torch.randn(6, 4)
    before = w.detach().clone()
    custom_step(admit=[targets[1]])
    trial = before - lr * w.grad
    L0 = trial[1].norm().item()  # L0 is the norm of the tensor the base would have zeroed
    # step 1 on the trial point, nothing else touched; step 2 not in the same optimizer step
    assert w.detach()[1].norm().item() == pytest.approx(L0 * 0.75, rel=1e-6)
    assert torch.equal(w.detach()[0], trial[0])
    assert ctl.decaying_mask(w)[1].all() and not ctl.decaying_mask(w)[0].any()
    for n in (2, 3, 4):
        w.grad = torch.randn(6, 4)
        custom_step()
        assert w.detach()[1].norm().item() == pytest.approx(L0 * (1 - n / 4), rel=1e-5, abs=1e-7)
    assert ctl.pruned == {("w", 1)}
    assert torch.count_nonzero(w.detach()[1]) == 0
    assert not ctl.decaying_mask(w).any() and ctl.pruned_mask(w)[1].all()


def test_admission_between_steps_uses_live_weights_and_L0():
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    ctl = DecayController(net, N=10, optimizer=opt)
    t = conv1_targets(net)[4]
    other = conv1_targets(net)[5]
    x0, y0 = vec(t).clone(), vec(other).clone()
    ctl.admit([t])
    assert torch.allclose(vec(t), x0 * 0.9, rtol=1e-6, atol=0)
    assert torch.equal(vec(other), y0)
    assert ctl.decay_progress(t.key) == (1, 10)


def test_invalid_admissions_rejected():
    net = tiny_net()
    ctl = DecayController(net, N=3)
    targets = conv1_targets(net)
    ctl.admit(targets[:1])
    with pytest.raises(ValueError, match="already decaying"):
        ctl.admit(targets[:1])
    overlapping = channel_targets("dup", [(net[0].weight, 0), (net[1].weight, 0)], channels=[0])
    with pytest.raises(ValueError, match="overlaps"):
        ctl.admit(overlapping)
    with pytest.raises(ValueError, match="mixes layers"):
        ctl.admit([Target(("conv1", 9), "conv1", (Slice(net[3].weight, 0, (0,)),))])
    stranger = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="not among the controller's parameters"):
        ctl.admit([Target("x", "x", (Slice(stranger, 0, (0,)),))])
    with pytest.raises(ValueError, match="N must be"):
        DecayController(net, N=0)


def test_forget_and_bind_after_physical_removal():
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    ctl = DecayController(net, N=1, optimizer=opt)
    ctl.admit(conv1_targets(net)[:2])
    assert len(ctl.pruned) == 2
    with pytest.raises(ValueError, match="forget"):
        ctl.bind(copy.deepcopy(net))
    ctl.forget()
    assert ctl.counts()["pruned"] == 0
    smaller = copy.deepcopy(net)
    ctl.bind(smaller)
    ctl.admit(conv1_targets(smaller)[:1])
    assert ctl.pruned == {("conv1", 0)}


def test_a_refused_bind_changes_nothing():
    net = tiny_net()
    ctl = DecayController(net, N=3)
    conv2 = channel_targets("conv2", [(net[3].weight, 0), (net[3].bias, 0)])
    ctl.register(conv2)  # known before the decaying target: the first a partial bind would drop
    ctl.admit(conv1_targets(net)[:1])
    before = ctl.state_dict()
    with pytest.raises(ValueError, match="forget"):
        ctl.bind(copy.deepcopy(net))
    # Registered targets on the refused set are kept, and the parameters keep their names.
    assert ctl.state_dict()["targets"] == before["targets"]
    assert ctl.status(conv2[0].key) == "registered"
