"""DPM invariants 1-3 (method.md section 5) on the CPU fast path: the forward under bf16 autocast
with the model and inputs in channels_last, the controller (fp32, outside autocast) unchanged.

1. the decayed norm follows L0 (1 - n/N) at every step; 2. pruned slices are bit-exact +0.0 and
stay so; 3. N = 1 equals the base method's zeroing bit for bit. Plus: the same fast-path training
twice at the same thread count gives the same bits."""

import pytest
import torch
from torch import nn

from dpm.core import DecayController, channel_targets
from dpm.train import autocast
from helpers import OPTIMIZERS, one_thread, tiny_net  # noqa: F401  (one_thread is an autouse fixture)

CPU = torch.device("cpu")


def fast_net(seed: int = 0) -> nn.Sequential:
    return tiny_net(seed).to(memory_format=torch.channels_last)


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g).to(memory_format=torch.channels_last),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def backward(net: nn.Sequential, batch) -> None:
    """The fast path's step: forward under CPU bf16 autocast, fp32 loss on the fp32 copy of the logits."""
    x, y = batch
    with autocast(CPU, True):
        hidden = net[:3](x)
        assert hidden.dtype == torch.bfloat16, "the forward did not run in bf16"  # autocast is really on
        out = net[3:](hidden)
    nn.functional.cross_entropy(out.float(), y).backward()


def targets_of(net: nn.Sequential):
    conv, bn = net[0], net[1]
    return channel_targets("conv1", [(conv.weight, 0), (conv.bias, 0), (bn.weight, 0), (bn.bias, 0)],
                           consumers=[(net[3].weight, 1)])


def vec(t) -> torch.Tensor:
    return torch.cat([s.param.detach().index_select(s.dim, torch.tensor(s.indices)).reshape(-1) for s in t.producers])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_decayed_norm_follows_L0_schedule_on_the_fast_path(opt_name):
    net = fast_net()
    opt = OPTIMIZERS[opt_name](net.parameters())
    N = 6
    ctl = DecayController(net, N=N, optimizer=opt)
    targets = targets_of(net)[:3]
    L0 = [vec(t).norm().item() for t in targets]
    ctl.admit(targets)
    for n, batch in zip(range(2, N + 1), batches(N - 1)):
        opt.zero_grad()
        backward(net, batch)
        ctl.step(opt)
        for t, l0 in zip(targets, L0):
            assert vec(t).dtype == torch.float32
            assert vec(t).norm().item() == pytest.approx(l0 * (1 - n / N), rel=1e-5, abs=1e-7)
    assert ctl.pruned == {t.key for t in targets}
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)  # the controller kept the format


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_pruned_slices_stay_bit_exact_zero_on_the_fast_path(opt_name):
    net = fast_net()
    opt = OPTIMIZERS[opt_name](net.parameters())
    N = 3
    ctl = DecayController(net, N=N, optimizer=opt)
    targets = targets_of(net)[1:4]
    ctl.admit(targets)
    for i, batch in enumerate(batches(N - 1 + 20)):
        opt.zero_grad()
        backward(net, batch)
        ctl.step(opt)
        if i >= N - 2:
            for t in targets:
                for s in t.producers:
                    sl = s.param.detach().index_select(s.dim, torch.tensor(s.indices))
                    assert torch.equal(bits(sl), torch.zeros_like(sl, dtype=torch.int32))
    assert ctl.counts()["pruned"] == 3


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_N1_equals_base_zeroing_bitwise_on_the_fast_path(opt_name):
    data = batches(8)
    runs = []
    for use_dpm in (False, True):
        net = fast_net()
        opt = OPTIMIZERS[opt_name](net.parameters())
        ctl = DecayController(net, N=1, optimizer=opt) if use_dpm else None
        for i, batch in enumerate(data):
            if i == 3:
                targets = targets_of(net)[::2]
                ctl.admit(targets) if use_dpm else base_zero(opt, targets)
            opt.zero_grad()
            backward(net, batch)
            if use_dpm:
                ctl.step(opt)
            else:
                opt.step()
                if i >= 3:
                    base_zero(opt, targets)
        runs.append((net, opt))
    (n0, o0), (n1, o1) = runs
    for (name, a), b in zip(n0.state_dict().items(), n1.state_dict().values()):
        assert torch.equal(bits(a), bits(b)) if a.is_floating_point() else torch.equal(a, b), name
    for p0, p1 in zip(n0.parameters(), n1.parameters()):
        for k, v in o0.state[p0].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.equal(bits(v), bits(o1.state[p1][k])), k


def base_zero(opt, targets) -> None:
    with torch.no_grad():
        for t in targets:
            for s in t.producers:
                s.param.index_fill_(s.dim, torch.tensor(s.indices), 0.0)
                for v in opt.state[s.param].values():
                    if isinstance(v, torch.Tensor) and v.shape == s.param.shape:
                        v.index_fill_(s.dim, torch.tensor(s.indices), 0.0)


def test_fast_path_training_with_dpm_is_bitwise_reproducible():
    def train():
        net = fast_net()
        opt = OPTIMIZERS["sgd_momentum_wd"](net.parameters())
        ctl = DecayController(net, N=4, optimizer=opt)
        ctl.admit(targets_of(net)[:2])
        for batch in batches(10):
            opt.zero_grad()
            backward(net, batch)
            ctl.step(opt)
        return net.state_dict()

    a, b = train(), train()
    for key in a:
        assert torch.equal(bits(a[key]) if a[key].is_floating_point() else a[key],
                           bits(b[key]) if b[key].is_floating_point() else b[key]), key


@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_row_sums_equal_the_per_tensor_path_bit_for_bit(channels_last, monkeypatch):
    """The CPU controller's grouped row sums (one op per shape group) against one op per tensor:
    the same weights, logs and releases, to the bit, over a SR run with releases and prunings
    (channels_last: the same releases and prunings, weights to float32 rounding)."""
    from dpm.core import RectifyConfig, segments
    from dpm.models import build_model

    def run(grouped: bool):
        monkeypatch.setattr(segments, "ROW_GROUPS_ON_CPU", grouped)
        torch.manual_seed(0)
        net = build_model("resnet20", num_classes=10)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        # channels_last sums rows in another order: borderline release decisions could flip, so
        # there the thresholds are infinite (C_rate, C_len and the logs are still computed).
        rectify = RectifyConfig(t_rate=float("inf"), t_len=float("inf")) if channels_last else \
            RectifyConfig(t_rate=0.0, t_len=1.2)
        ctl = DecayController(net, N=5, optimizer=opt, rectify=rectify)
        targets = []
        convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        for (name, conv), bn in zip(convs, bns):
            targets += channel_targets(name, [(conv.weight, 0), (bn.weight, 0), (bn.bias, 0)])
        ctl.register(targets)
        ctl.admit(targets[::3])
        g = torch.Generator().manual_seed(2)
        for step in range(8):
            if step == 3:
                ctl.admit(targets[1::6])
            x = torch.randn(4, 3, 16, 16, generator=g)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), torch.randint(0, 10, (4,), generator=g)).backward()
            ctl.step(opt)
        return net, ctl

    (n0, c0), (n1, c1) = run(False), run(True)
    assert c1._D_plan._rows, "the grouped path did not run"
    assert c0.counts() == c1.counts() and c0.pruned and (c0.released or channels_last)
    assert c0.pruned == c1.pruned and c0.released == c1.released
    if channels_last:
        # Rows of channels_last tensors are summed in memory order: the same elements, another order.
        for (name, a), b in zip(n0.state_dict().items(), n1.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), (name, (a - b).abs().max())
        return
    assert c0.log.history == c1.log.history and c0.log.releases == c1.log.releases
    for (name, a), b in zip(n0.state_dict().items(), n1.state_dict().values()):
        assert torch.equal(bits(a), bits(b)) if a.is_floating_point() else torch.equal(a, b), name
