"""Self-Rectifying (docs/method.md section 4; invariants 4 and 5 of section 5)."""

import math

import pytest
import torch
from torch import nn

from dpm.core import DecayController, RectifyConfig, Slice, Target, c_len, c_rate, channel_targets
from helpers import OPTIMIZERS, one_thread, tiny_net  # noqa: F401  (one_thread is an autouse fixture)


def net_targets(net):
    a = channel_targets("conv1", [(net[0].weight, 0), (net[0].bias, 0), (net[1].weight, 0), (net[1].bias, 0)])
    b = channel_targets("conv2", [(net[3].weight, 0), (net[3].bias, 0), (net[4].weight, 0), (net[4].bias, 0)])
    return a, b


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def train(net, opt, ctl, data, admit_at, targets):
    for i, (x, y) in enumerate(data):
        if i == admit_at:
            ctl.admit(targets)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        ctl.step(opt)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_infinite_thresholds_make_sr_identical_to_sp(opt_name):
    data = batches(10)
    states = []
    for rectify in (None, RectifyConfig(t_rate=math.inf, t_len=math.inf)):
        net = tiny_net()
        opt = OPTIMIZERS[opt_name](net.parameters())
        ctl = DecayController(net, N=6, rectify=rectify, optimizer=opt)
        a, b = net_targets(net)
        ctl.register(a + b)
        train(net, opt, ctl, data, 2, a[:3] + b[1:3])
        states.append((net.state_dict(), ctl))
    (s0, c0), (s1, c1) = states
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert c0.pruned == c1.pruned and c1.released == frozenset()
    # ... and SR did evaluate its criteria (so the equality is not vacuous).
    assert any("c_rate" in r for r in c1.log.history)


LR = {"sgd": 0.1, "sgd_momentum_wd": 0.1, "adam": 0.01}


def line_setup(N=6, opt_name="sgd", **rectify):
    """One 'layer' w (rows = targets) whose gradients are set by hand."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 4))
    opt = {
        "sgd": lambda: torch.optim.SGD([w], lr=LR["sgd"]),
        "sgd_momentum_wd": lambda: torch.optim.SGD([w], lr=LR["sgd_momentum_wd"], momentum=0.9, weight_decay=5e-4),
        "adam": lambda: torch.optim.Adam([w], lr=LR["adam"]),
    }[opt_name]()
    cfg = RectifyConfig(**{"t_rate": 1.0, "t_len": 1.0, **rectify})
    ctl = DecayController([w], N=N, rectify=cfg, optimizer=opt)
    targets = [Target(("w", i), "w", (Slice(w, 0, (i,)),)) for i in range(5)]
    ctl.register(targets)
    return w, opt, ctl, targets


def set_grad(w, rows: dict[int, torch.Tensor]):
    g = torch.zeros_like(w)
    for i, v in rows.items():
        g[i] = v
    w.grad = g


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_release_driven_by_hand_built_gradient_and_cooldown(opt_name):
    w, opt, ctl, targets = line_setup(N=6, opt_name=opt_name, release_cooldown=2)
    L0 = w.detach()[0].norm().item()
    Ls = L0 / 6
    ctl.admit(targets[:3])
    # Step 1 (decay step 2): no gradient, nothing released.
    set_grad(w, {})
    ctl.step(opt)
    assert ctl.decaying == {t.key for t in targets[:3]}
    # Step 2: row 0's loss gradient points inward, 3 decay steps' worth (C_rate = 3 > 1) and is
    # much longer than its family's (C_len > 1): released. Row 1 gets an outward gradient of the
    # same length (C_rate < 0), row 2 an inward one too short for C_len: both keep decaying.
    e0 = w.detach()[0] / w.detach()[0].norm()
    e1 = w.detach()[1] / w.detach()[1].norm()
    e2 = w.detach()[2] / w.detach()[2].norm()
    c = 3 * Ls / LR[opt_name]  # radial C_rate = lr * c / Ls = 3
    set_grad(w, {0: -c * e0, 1: c * e1, 2: -0.01 * c * e2, 3: 0.1 * torch.ones(4)})
    ctl.before_step(opt)
    opt.step()
    x_tilde = w.detach().clone()
    ctl.after_step(opt)
    assert ctl.released == {("w", 0)}
    assert ctl.decaying == {("w", 1), ("w", 2)}
    assert torch.equal(w.detach()[0], x_tilde[0])  # this step's projection skipped
    assert w.detach()[1].norm().item() == pytest.approx(L0_of(ctl, 1) * (1 - 3 / 6), rel=1e-5)
    rel = ctl.log.releases[0]
    assert rel["key"] == ("w", 0) and rel["c_rate"] == pytest.approx(3.0, rel=1e-5)
    # Never projected again: to the end of the others' decay only the optimizer moves it.
    for _ in range(5):
        set_grad(w, {0: torch.randn(4)})
        ctl.before_step(opt)
        opt.step()
        x_tilde = w.detach().clone()
        ctl.after_step(opt)
        assert torch.equal(w.detach()[0], x_tilde[0])
    assert len(ctl.log.releases) == 1
    assert ctl.pruned == {("w", 1), ("w", 2)}
    # Excluded from the base method's candidates, and admission is refused, for 2 rounds.
    assert ("w", 0) in ctl.candidates_excluded()
    with pytest.raises(ValueError, match="released in round 0"):
        ctl.admit([targets[0]])
    ctl.start_round()
    assert ("w", 0) in ctl.candidates_excluded()
    ctl.start_round()
    assert ("w", 0) not in ctl.candidates_excluded()
    ctl.admit([targets[0]])
    assert ctl.is_decaying(("w", 0))
    assert ctl.log.readmissions == [{"step": 7, "round": 2, "key": ("w", 0)}]
    assert ctl.counts()["readmissions"] == 1


def L0_of(ctl, row):
    return ctl._registry.decay[("w", row)][0]


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_target_not_meeting_the_rule_is_never_released(opt_name):
    w, opt, ctl, targets = line_setup(N=8, opt_name=opt_name)
    ctl.admit(targets[:2])
    torch.manual_seed(3)
    for _ in range(8):
        e0 = w.detach()[0] / w.detach()[0].norm()
        # Row 0: strong but outward (C_rate < 0); row 1: inward but tiny next to row 4 (C_len < 1).
        set_grad(w, {0: 5.0 * e0, 1: -1e-3 * w.detach()[1], 4: torch.full((4,), 10.0)})
        ctl.step(opt)
    assert ctl.released == frozenset() and ctl.log.releases == []
    assert ctl.pruned == {("w", 0), ("w", 1)}
    assert any("c_rate" in r for r in ctl.log.history)


def test_release_rule_or_and_no_check_at_last_step():
    w, opt, ctl, targets = line_setup(N=3, release_rule="or", t_len=math.inf)
    ctl.admit(targets[:1])
    e0 = w.detach()[0] / w.detach()[0].norm()
    # Decay step 2 of 3: C_rate alone triggers under "or".
    set_grad(w, {0: -10.0 * e0})
    ctl.step(opt)
    assert ctl.released == {("w", 0)}

    w, opt, ctl, targets = line_setup(N=2)
    ctl.admit(targets[:1])
    e0 = w.detach()[0] / w.detach()[0].norm()
    set_grad(w, {0: -100.0 * e0})
    ctl.step(opt)  # decay step 2 = N: the last step is never checked
    assert ctl.pruned == {("w", 0)} and ctl.released == frozenset()


def single_target_criteria(ctl):
    """With one decaying target the logged percentiles are its own C_rate / C_len."""
    rec = [r for r in ctl.log.history if "c_rate" in r][-1]
    assert rec["c_rate"]["min"] == rec["c_rate"]["max"]
    return rec["c_rate"]["p50"], rec["c_len"]["p50"]


@pytest.mark.parametrize("form", ["radial", "relative", "per_step"])
def test_c_rate_forms_equal_hand_computation(form):
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.1}, {"params": [b], "lr": 0.02, "momentum": 0.9}])
    N = 5
    cfg = RectifyConfig(t_rate=math.inf, t_len=math.inf, c_rate_form=form)
    ctl = DecayController([w, b], N=N, rectify=cfg, optimizer=opt)
    t = Target("t", "layer", (Slice(w, 0, (1,)), Slice(b, 0, (1,))))
    x_full = torch.cat([w.detach()[1], b.detach()[1:2]])
    L0 = x_full.norm().item()
    ctl.admit([t])
    for _ in range(2):
        w.grad, b.grad = torch.randn(3, 4), torch.randn(3)
        x = torch.cat([w.detach()[1], b.detach()[1:2]]).clone()
        g = torch.cat([w.grad[1], b.grad[1:2]])
        alpha = torch.tensor([0.1] * 4 + [0.02])
        ctl.before_step(opt)
        opt.step()
        x_tilde = torch.cat([w.detach()[1], b.detach()[1:2]]).clone()
        ctl.after_step(opt)
        Ls = L0 / N
        if form == "radial":
            expected = -(alpha * g * x).sum() / x.norm() / Ls
        elif form == "relative":
            expected = (x_tilde.norm() - x.norm()) / x.norm()
        else:
            expected = (x_tilde.norm() - x.norm()) / Ls
        got, _ = single_target_criteria(ctl)
        assert got == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)


def test_c_len_equals_hand_computation_over_non_pruned_family_only():
    torch.manual_seed(2)
    w1 = nn.Parameter(torch.randn(6, 3))
    w2 = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.SGD([w1, w2], lr=0.01)
    cfg = RectifyConfig(t_rate=math.inf, t_len=math.inf)
    ctl = DecayController([w1, w2], N=10, rectify=cfg, optimizer=opt)
    fam1 = [Target(("l1", i), "l1", (Slice(w1, 0, (i,)),)) for i in range(6)]
    fam2 = [Target(("l2", i), "l2", (Slice(w2, 0, (i,)),)) for i in range(4)]
    ctl.register(fam1 + fam2)
    ctl.admit(fam1[4:], N=1)  # pruned members leave the family mean
    ctl.admit(fam1[:1])
    g1 = torch.randn(6, 3)
    g2 = 100.0 * torch.randn(4, 3)  # another layer's much larger gradients must not enter
    w1.grad, w2.grad = g1.clone(), g2
    ctl.step(opt)
    norms = g1.norm(dim=1)
    expected = norms[0] / norms[:4].mean()  # members 0..3: decaying 0 included, pruned 4, 5 not
    _, got = single_target_criteria(ctl)
    assert got == pytest.approx(expected.item(), rel=1e-5)


def test_families_never_mix_layers():
    net = tiny_net()
    ctl = DecayController(net, N=3, rectify=RectifyConfig())
    a, b = net_targets(net)
    mixed = Target(("conv2", 0), "conv1", b[0].slices)
    with pytest.raises(ValueError, match="mixes layers"):
        ctl.register(a + [mixed])


def test_c_rate_c_len_vector_functions():
    nb = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    na = torch.tensor([2.5, 0.5, 1.0], dtype=torch.float64)
    ls = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    dot = torch.tensor([-1.0, 0.5, 3.0], dtype=torch.float64)
    assert c_rate("radial", norm_before=nb, norm_after=na, step_length=ls, lr_grad_dot_x=dot).tolist() == [
        1.0,
        -2.0,
        0.0,
    ]
    assert c_rate("relative", norm_before=nb, norm_after=na, step_length=ls).tolist() == [0.25, -0.5, 0.0]
    assert c_rate("per_step", norm_before=nb, norm_after=na, step_length=ls).tolist() == [1.0, -2.0, 4.0]
    gn = torch.tensor([1.0, 3.0, 2.0, 10.0, 4.0], dtype=torch.float64)
    fam = torch.tensor([0, 0, 0, 1, 1])
    counted = torch.tensor([True, True, False, True, True])
    assert c_len(gn, fam, counted, 2).tolist() == pytest.approx([0.5, 1.5, 1.0, 10 / 7, 4 / 7])


def test_strict_budget_admits_replacement_at_once():
    w, opt, _, targets = line_setup(N=6)
    asked = []

    def replacement(released, excluded):
        asked.append(([t.key for t in released], set(excluded)))
        return [t for t in targets if t.key not in excluded][: len(released)]

    cfg = RectifyConfig(t_rate=1.0, t_len=1.0, budget="strict")
    ctl = DecayController([w], N=6, rectify=cfg, optimizer=opt, replacement=replacement)
    ctl.register(targets)
    ctl.admit(targets[:2])
    set_grad(w, {})
    ctl.step(opt)
    e0 = w.detach()[0] / w.detach()[0].norm()
    set_grad(w, {0: -50.0 * e0})
    ctl.step(opt)
    assert ctl.released == {("w", 0)}
    assert asked == [([("w", 0)], {("w", 0), ("w", 1)})]
    assert ctl.decaying == {("w", 1), ("w", 2)}
    assert ctl.decay_progress(("w", 2)) == (1, 6)  # a fresh N-step decay
    with pytest.raises(ValueError, match="replacement"):
        DecayController([w], N=6, rectify=cfg)


def test_sr_requires_before_step():
    w, opt, ctl, targets = line_setup()
    ctl.admit(targets[:1])
    set_grad(w, {})
    opt.step()
    with pytest.raises(RuntimeError, match="before_step"):
        ctl.after_step(opt)


@pytest.mark.parametrize(
    "bad",
    [
        dict(t_rate=-1.0),
        dict(t_len=float("nan")),
        dict(c_rate_form="literal"),
        dict(release_rule="xor"),
        dict(release_cooldown=0),
        dict(budget="greedy"),
    ],
)
def test_rectify_config_validation(bad):
    with pytest.raises(ValueError):
        RectifyConfig(**bad)


def _two_group_run(add_later: bool):
    """conv1's targets decay from step 0; conv2's from step 2, with conv2 in a second param group
    (its own lr) that is either there from the start or added after the first SR step."""
    net = tiny_net()
    first = list(net[0].parameters()) + list(net[1].parameters())
    rest = [p for p in net.parameters() if all(p is not q for q in first)]
    groups = [{"params": first, "lr": 0.05}]
    if not add_later:
        groups.append({"params": rest, "lr": 0.2})
    opt = torch.optim.SGD(groups)
    ctl = DecayController(net, N=6, rectify=RectifyConfig(t_rate=0.0, t_len=0.9), optimizer=opt)
    a, b = net_targets(net)
    ctl.register(a + b)
    ctl.admit(a[:3])
    for i, (x, y) in enumerate(batches(6)):
        if i == 2:
            if add_later:
                opt.add_param_group({"params": rest, "lr": 0.2})
            ctl.admit(b[:2])
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if i < 2:
            for p in rest:  # not yet trained in either run, so both runs stay comparable
                p.grad = None
        ctl.step(opt)
    return net, ctl


def test_param_group_added_after_the_first_sr_step_is_used():
    net0, ctl0 = _two_group_run(add_later=False)
    net1, ctl1 = _two_group_run(add_later=True)  # used to fail: "... is decaying but not in the optimizer"
    for k, v in net0.state_dict().items():
        assert torch.equal(v, net1.state_dict()[k]), k
    assert ctl0.log.state_dict() == ctl1.log.state_dict()
    assert any("c_rate" in r for r in ctl1.log.history[2:])  # conv2's C_rate used its group's lr


def test_error_inside_before_step_does_not_leave_the_controller_inside_a_step():
    net = tiny_net()
    conv1 = list(net[0].parameters()) + list(net[1].parameters())
    rest = [p for p in net.parameters() if all(p is not q for q in conv1)]
    opt = torch.optim.SGD(rest, lr=0.05)  # conv1 forgotten: radial C_rate cannot find its lr
    ctl = DecayController(net, N=6, rectify=RectifyConfig(), optimizer=opt)
    a, _ = net_targets(net)
    ctl.admit(a[:2])
    x, y = batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    with pytest.raises(ValueError, match="not in the optimizer"):
        ctl.step(opt)
    # The failed step did not happen: the controller is between steps, checkpointable, and works
    # once the caller fixes the optimizer.
    assert ctl.iteration == 0
    ctl.state_dict()
    opt.add_param_group({"params": conv1, "lr": 0.05})
    ctl.step(opt)
    assert ctl.iteration == 1 and ctl.decay_progress(a[0].key) == (2, 6)


def test_error_inside_optimizer_step_does_not_leave_the_controller_inside_a_step():
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    ctl = DecayController(net, N=6, rectify=RectifyConfig(), optimizer=opt)
    a, _ = net_targets(net)
    ctl.admit(a[:2])
    x, y = batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    real_step = opt.step
    opt.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # e.g. a NaN guard raising
    with pytest.raises(RuntimeError, match="boom"):
        ctl.step(opt)
    opt.step = real_step
    ctl.state_dict()
    ctl.step(opt)
    assert ctl.iteration == 1
