"""The CPU controller's grouped row sums (one op per shape group instead of one per tensor), from
concatenations or from packed parameters (dpm.core.packing), on NCHW and channels_last weights.
DPM's invariants 1-3 on the fast path: test_core_decay.py."""

import pytest
import torch
from torch import nn

from dpm.core import DecayController, channel_targets
from helpers import bitwise_equal, one_thread  # noqa: F401  (one_thread is an autouse fixture)


@pytest.mark.parametrize("packed", [False, True], ids=["concatenated", "packed"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_row_sums_equal_the_per_tensor_path_bit_for_bit(channels_last, packed, monkeypatch):
    """The CPU controller's grouped row sums (one op per shape group) against one op per tensor:
    the same weights, logs and releases, to the bit, over a SR run with releases and prunings
    (channels_last rows are summed in memory order on both paths)."""
    from dpm.core import RectifyConfig, segments
    from dpm.models import build_model

    def run(grouped: bool):
        monkeypatch.setattr(segments, "ROW_GROUPS_ON_CPU", grouped)
        torch.manual_seed(0)
        net = build_model("resnet20", num_classes=10)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        rectify = RectifyConfig(t_rate=0.0, t_len=1.2)
        ctl = DecayController(net, N=5, optimizer=opt, rectify=rectify, pack_rows=packed)
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
    if packed:
        assert c1._decays.plan._packed and c1._decays.plan._packed[1], "the packed path did not run"
        assert c1._families.plan._packed and c1._families.plan._packed[1], "the packed SR sums did not run"
    else:
        assert c1._decays.plan._rows, "the grouped path did not run"
    assert c0.counts() == c1.counts() and c0.pruned and c0.released
    assert c0.pruned == c1.pruned and c0.released == c1.released
    assert c0.log.history == c1.log.history and c0.log.releases == c1.log.releases
    for (name, a), b in zip(n0.state_dict().items(), n1.state_dict().values()):
        assert bitwise_equal(a, b) if a.is_floating_point() else torch.equal(a, b), name
