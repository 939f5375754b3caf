"""include_consumers (docs/method.md section 2): the product rule on overlapping elements."""

import pytest
import torch
from torch import nn

from dpm.core import DecayController, channel_targets, schedule


def two_layers():
    torch.manual_seed(0)
    l1, l2, l3 = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)
    return nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), l3)


def targets(net):
    l1, l2, l3 = net[0], net[2], net[4]
    a = channel_targets("l1", [(l1.weight, 0), (l1.bias, 0)], consumers=[(l2.weight, 1)])
    b = channel_targets("l2", [(l2.weight, 0), (l2.bias, 0)], consumers=[(l3.weight, 1)])
    return a, b


def producer_norm(t, tensors=None):
    parts = []
    for s in t.producers:
        v = s.param.detach() if tensors is None else tensors[s.param]
        parts.append(v.index_select(s.dim, torch.tensor(s.indices)).reshape(-1))
    return torch.cat(parts).norm()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_overlapping_elements_get_the_product_of_factors(momentum):
    net = two_layers()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3)
    N = 5
    ctl = DecayController(net, N=N, include_consumers=True, optimizer=opt)
    a, b = targets(net)
    A, B = a[1], b[2]  # l2.weight[2, 1] is in B's producer row and A's consumer column
    L0 = {A.key: producer_norm(A).item(), B.key: producer_norm(B).item()}
    w2_before = net[2].weight.detach().clone()
    ctl.admit([A, B])
    s1 = float(schedule("linear", 1, N))
    w2 = net[2].weight.detach()
    assert w2[2, 1].item() == pytest.approx(w2_before[2, 1].item() * s1 * s1, rel=1e-6)
    assert w2[2, 0].item() == pytest.approx(w2_before[2, 0].item() * s1, rel=1e-6)
    assert w2[0, 1].item() == pytest.approx(w2_before[0, 1].item() * s1, rel=1e-6)
    assert w2[0, 0].item() == w2_before[0, 0].item()

    torch.manual_seed(1)
    for n in range(2, N + 1):
        x = torch.randn(16, 3)
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        ctl.before_step(opt)
        opt.step()
        snap = {p: p.detach().clone() for p in net.parameters()}
        ctl.after_step(opt)
        s_n = float(schedule("linear", n, N))
        # Factors are set on the producer norms of x~ (invariant 1 is stated on producer norms).
        fA = s_n * L0[A.key] / producer_norm(A, snap).item()
        fB = s_n * L0[B.key] / producer_norm(B, snap).item()
        w2, w3, w1 = net[2].weight.detach(), net[4].weight.detach(), net[0].weight.detach()
        xt2, xt3, xt1 = snap[net[2].weight], snap[net[4].weight], snap[net[0].weight]
        if n < N:
            assert w2[2, 1].item() == pytest.approx(xt2[2, 1].item() * fA * fB, rel=1e-5)
            assert torch.allclose(w2[2, [0, 2, 3]], xt2[2, [0, 2, 3]] * fB, rtol=1e-5)
            assert torch.allclose(w2[[0, 1, 3, 4], 1], xt2[[0, 1, 3, 4], 1] * fA, rtol=1e-5)
            assert torch.allclose(w3[:, 2], xt3[:, 2] * fB, rtol=1e-5)
            assert torch.allclose(w1[1], xt1[1] * fA, rtol=1e-5)
            assert torch.equal(w2[0, 0], xt2[0, 0])  # in no target: untouched
    # At N every slice, consumers included, is bit-exact zero.
    for t in (A, B):
        for s in t.slices:
            sl = s.param.detach().index_select(s.dim, torch.tensor(s.indices))
            assert torch.equal(sl.view(torch.int32), torch.zeros_like(sl, dtype=torch.int32))


def test_consumers_untouched_by_default():
    net = two_layers()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ctl = DecayController(net, N=1, optimizer=opt)
    a, _ = targets(net)
    w2 = net[2].weight.detach().clone()
    ctl.admit([a[1]])
    assert torch.count_nonzero(net[0].weight[1]) == 0
    assert torch.equal(net[2].weight.detach(), w2)
    assert not ctl.pruned_mask(net[2].weight).any()
    assert ctl.pruned_mask(net[0].weight)[1].all()
