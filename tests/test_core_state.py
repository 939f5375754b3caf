"""state_dict / load_state_dict: a resumed run continues the decay bitwise."""

import io

import pytest
import torch
from torch import nn

from dpm.core import DecayController, RectifyConfig, channel_targets
from helpers import one_thread, tiny_net  # noqa: F401  (one_thread is an autouse fixture)


def make(net, interval=1):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    # Low thresholds so that releases happen during the run and travel through the checkpoint.
    cfg = RectifyConfig(t_rate=0.0, t_len=0.9, release_cooldown=2)
    ctl = DecayController(net, N=8, interval=interval, rectify=cfg, optimizer=opt,
                          include_consumers=True)
    a = channel_targets("conv1", [(net[0].weight, 0), (net[0].bias, 0), (net[1].weight, 0),
                                  (net[1].bias, 0)], consumers=[(net[3].weight, 1)])
    b = channel_targets("conv2", [(net[3].weight, 0), (net[3].bias, 0), (net[4].weight, 0),
                                  (net[4].bias, 0)])
    ctl.register(a + b)
    return opt, ctl, a, b


def run(net, opt, ctl, a, b, data, start, stop):
    for i in range(start, stop):
        if i == 1:
            ctl.admit(a[:3] + b[:2])
        if i == 4:
            ctl.start_round()
            ctl.admit([t for t in a + b if t.key not in ctl.candidates_excluded()][:2])
        x, y = data[i]
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        ctl.step(opt)


@pytest.mark.parametrize("interval", [1, 2])
def test_round_trip_mid_decay_continues_bitwise(interval):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(20)]
    net = tiny_net()
    opt, ctl, a, b = make(net, interval)
    run(net, opt, ctl, a, b, data, 0, 20)

    net2 = tiny_net()
    opt2, ctl2, a2, b2 = make(net2, interval)
    run(net2, opt2, ctl2, a2, b2, data, 0, 6)
    assert ctl2.counts()["decaying"] > 0  # the checkpoint is mid-decay
    buf = io.BytesIO()
    torch.save({"model": net2.state_dict(), "opt": opt2.state_dict(), "dpm": ctl2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    net3 = tiny_net()
    opt3, ctl3, a3, b3 = make(net3, interval)
    net3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    ctl3.load_state_dict(ckpt["dpm"])
    assert ctl3.decaying == ctl2.decaying and ctl3.iteration == 6
    run(net3, opt3, ctl3, a3, b3, data, 6, 20)

    for k, v in net.state_dict().items():
        assert torch.equal(v, net3.state_dict()[k]), k
    assert (ctl.decaying, ctl.pruned, ctl.released) == (ctl3.decaying, ctl3.pruned, ctl3.released)
    assert ctl.log.releases, "the run should exercise releases"
    assert ctl.log.state_dict() == ctl3.log.state_dict()
    assert ctl.candidates_excluded() == ctl3.candidates_excluded()


def test_load_rejects_other_settings():
    net = tiny_net()
    _, ctl, a, _ = make(net)
    ctl.admit(a[:1])
    other = DecayController(net, N=9)
    with pytest.raises(ValueError, match="settings differ"):
        other.load_state_dict(ctl.state_dict())


def test_state_dict_refused_inside_a_step():
    net = tiny_net()
    opt, ctl, a, _ = make(net)
    ctl.before_step(opt)
    with pytest.raises(RuntimeError, match="inside a step"):
        ctl.state_dict()
