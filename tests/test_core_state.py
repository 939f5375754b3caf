"""state_dict / load_state_dict: a resumed run continues the decay bitwise."""

import io

import pytest
import torch
from torch import nn

from dpm.core import DecayController, RectifyConfig, Slice, Target, channel_targets
from helpers import one_thread, tiny_net  # noqa: F401  (one_thread is an autouse fixture)


def make(net, interval=1):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    # Low thresholds so that releases happen during the run and travel through the checkpoint.
    cfg = RectifyConfig(t_rate=0.0, t_len=0.9, release_cooldown=2)
    ctl = DecayController(net, N=8, interval=interval, rectify=cfg, optimizer=opt, include_consumers=True)
    a = channel_targets(
        "conv1",
        [(net[0].weight, 0), (net[0].bias, 0), (net[1].weight, 0), (net[1].bias, 0)],
        consumers=[(net[3].weight, 1)],
    )
    b = channel_targets("conv2", [(net[3].weight, 0), (net[3].bias, 0), (net[4].weight, 0), (net[4].bias, 0)])
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
    data = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(20)]
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


def _line(calls):
    """One 8-row 'layer' whose gradients are set by hand, Self-Rectifying with a strict budget."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 4))
    opt = torch.optim.SGD([w], lr=0.1)
    targets = [Target(("w", i), "w", (Slice(w, 0, (i,)),)) for i in range(8)]

    def replacement(released, excluded):
        calls.append(([t.key for t in released], sorted(excluded)))
        # Only rows 0-3 are candidates: at step 2 none is left, so the release of row 1 leaves a
        # stale row in the decay table until the next admission (a checkpoint can fall in between).
        return [t for t in targets[:4] if t.key not in excluded][: len(released)]

    cfg = RectifyConfig(t_rate=1.0, t_len=1.0, release_cooldown=1, budget="strict")
    ctl = DecayController([w], N=6, rectify=cfg, optimizer=opt, replacement=replacement, track=None)
    ctl.register(targets)
    return w, opt, ctl, targets


def _line_run(w, opt, ctl, targets, start, stop):
    inward = {1: [0], 2: [1], 3: [1, 2]}  # step -> rows whose gradient argues against their removal
    for i in range(start, stop):
        if i == 0:
            ctl.start_round()
            ctl.admit(targets[:3])
        if i == 3:
            ctl.start_round()
            ctl.admit(targets[1:2])  # row 1, released at step 2, selected again by the base method
        g = torch.zeros_like(w)
        for r in inward.get(i, []):
            g[r] = -50.0 * w.detach()[r] / w.detach()[r].norm()
        w.grad = g
        ctl.step(opt)


def test_resume_keeps_the_order_of_releases_in_one_step():
    calls: list = []
    w, opt, ctl, targets = _line(calls)
    _line_run(w, opt, ctl, targets, 0, 6)
    several = [s for s in {r["step"] for r in ctl.log.releases} if sum(r["step"] == s for r in ctl.log.releases) > 1]
    assert several, "the run should release several targets in one step"

    calls2: list = []
    w2, opt2, ctl2, targets2 = _line(calls2)
    _line_run(w2, opt2, ctl2, targets2, 0, 3)  # stop after row 1's release, before its re-admission
    buf = io.BytesIO()
    torch.save({"w": w2.detach(), "opt": opt2.state_dict(), "dpm": ctl2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    calls3: list = list(calls2)
    w3, opt3, ctl3, targets3 = _line(calls3)
    with torch.no_grad():
        w3.copy_(ckpt["w"])
    opt3.load_state_dict(ckpt["opt"])
    ctl3.load_state_dict(ckpt["dpm"])
    assert ctl3.state_dict() == ckpt["dpm"]  # what was loaded is what is saved again
    _line_run(w3, opt3, ctl3, targets3, 3, 6)

    assert torch.equal(w.detach(), w3.detach())
    assert ctl.log.state_dict() == ctl3.log.state_dict()  # releases logged in the same order
    assert calls == calls3  # ... and handed to the replacement callback in the same order
    assert ctl.state_dict()["decay_order"] == ctl3.state_dict()["decay_order"]
    assert ctl.state_dict() == ctl3.state_dict()


def _bound(resume: bool):
    """Family 'b' on parameter 'b': b0 is released, the layer is rebuilt (bind) and its targets
    registered again in another order; then b1 decays with gradients whose family mean depends on
    the order it is summed in (2**56 + 5 + 5 in float64 loses the fives one at a time, not both)."""
    torch.manual_seed(0)
    wa, wb = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3, 2))
    wb2 = nn.Parameter(wb.detach().clone())  # the rebuilt layer's weight
    opt = torch.optim.SGD([wa, wb, wb2], lr=1e-4)
    cfg = RectifyConfig(t_rate=1.0, t_len=1.0)
    ctl = DecayController({"a": wa, "b": wb}, N=6, rectify=cfg, optimizer=opt)

    def fam(w):
        return [Target(("b", i), "b", (Slice(w, 0, (i,)),)) for i in range(3)]

    b = fam(wb)
    ctl.register(b)
    ctl.admit(b[:1])
    wb.grad = torch.zeros_like(wb)
    ctl.step(opt)
    wb.grad = torch.zeros_like(wb)
    wb.grad[0] = -1e6 * wb.detach()[0] / wb.detach()[0].norm()
    ctl.step(opt)
    assert ctl.released == {("b", 0)}
    ctl.bind({"a": wa, "b": wb2})
    b2 = fam(wb2)
    ctl.register([b2[1], b2[2], b2[0]])
    if resume:
        state = ctl.state_dict()
        wa, wb2 = nn.Parameter(wa.detach().clone()), nn.Parameter(wb2.detach().clone())
        opt = torch.optim.SGD([wa, wb2], lr=1e-4)
        ctl = DecayController({"a": wa, "b": wb2}, N=6, rectify=cfg, optimizer=opt)
        ctl.load_state_dict(state)
        b2 = fam(wb2)
    ctl.admit(b2[1:2])
    g = torch.zeros_like(wb2)
    g[0, 0], g[1, 0], g[2, 0] = 2.0**56, 5.0, 5.0
    wb2.grad = g
    ctl.step(opt)
    return ctl


def test_resume_after_bind_and_reregistration_logs_the_same_c_len():
    ctl, ctl_resumed = _bound(resume=False), _bound(resume=True)
    assert "c_len" in ctl.log.history[-1]
    assert ctl.log.state_dict() == ctl_resumed.log.state_dict()
