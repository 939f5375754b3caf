"""Gate Decorator + DPM: gated BN, Taylor scores, tick selection, residual coupling, melt, smooth
decay of the gates, N = 1 as the base method, and base / +SP / +SR smoke runs through the runner."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import dpm.faults
from conftest import compose
from dpm.checkpoint import load_checkpoint
from dpm.pruners.gate_decorator import GateDecorator
from dpm.pruners.gate_decorator_gates import GatedBatchNorm2d, fold_gates, gate_model, gated_modules
from dpm.pruners.gate_decorator_units import channel_units, macs_without, remove_channels
from dpm.run import CHECKPOINT, run
from helpers import one_thread, tiny_net  # noqa: F401  (one_thread: autouse fixture)

RUN_SPECIFIC = {"wall_time_s", "run_dir", "pretrain_source", "history", "variant", "name", "git_sha"}


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN scales, shifts and running statistics (a fresh BN is the identity map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def gated(model: nn.Module, x: torch.Tensor, **kw) -> GateDecorator:
    """``model`` gated in place, with its GateDecorator (N = 1 unless given)."""
    units = channel_units(model, x, num_classes=model_classes(model))
    skeleton = copy.deepcopy(model)
    gate_model(model)
    options = dict(prune_ratio=0.2, min_channel_ratio=0.1, flops_target=0.5)
    options.update(kw)
    return GateDecorator(model, units, skeleton=skeleton, example=x, **options)


def model_classes(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def set_scores(gd: GateDecorator, per_bn: dict[str, list[float]]) -> None:
    for name, values in per_bn.items():
        gd.scores[name].copy_(torch.tensor(values, dtype=torch.float64))


def test_gated_bn_preserves_the_function_at_initialisation():
    model = randomised(tiny_net())
    x = torch.randn(8, 3, 8, 8)
    reference = copy.deepcopy(model)
    names = gate_model(model)
    assert names == ["1", "4"] and all(isinstance(m, GatedBatchNorm2d) for m in gated_modules(model).values())
    for m in gated_modules(model).values():
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.weight.requires_grad
        assert torch.equal(m.mask, torch.ones_like(m.mask)) and m.gate.requires_grad
    for mode in ("eval", "train"):  # running statistics, then batch statistics
        getattr(reference, mode)()
        getattr(model, mode)()
        with torch.no_grad():
            assert torch.allclose(model(x), reference(x), atol=1e-6, rtol=0)
    assert gated_modules(model)["1"].gate.tolist() == pytest.approx(reference[1].weight.tolist())


def test_taylor_score_is_the_sum_over_steps_of_abs_gate_times_its_gradient():
    torch.manual_seed(0)
    model = randomised(tiny_net())
    x = torch.randn(4, 3, 8, 8)
    gd = gated(model, x)
    gd.begin_phase("tick", 1, steps=2)
    opt = gd.optimizer(model, type("P", (), {"lr": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}))
    bn = gated_modules(model)["4"]
    expected = torch.zeros(bn.num_features, dtype=torch.float64)
    for step in range(2):
        xs, ys = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
        # By hand: y = BN(h) * g, so dL/dg_c = sum over batch and pixels of dL/dy * BN(h).
        captured = {}
        handle = bn.register_forward_hook(
            lambda m, i, o: captured.update(
                normed=nn.functional.batch_norm(i[0], None, None, m.weight, m.bias, True, 0.0, m.eps).detach(), out=o
            )
        )
        out = model(xs)
        handle.remove()
        captured["out"].retain_grad()
        loss = nn.functional.cross_entropy(out, ys)
        opt.zero_grad()
        loss.backward()
        dL_dg = (captured["out"].grad * captured["normed"]).sum(dim=(0, 2, 3))
        expected += (bn.gate.detach() * dL_dg).abs().double()
        gd.before_step(opt)
        opt.step()
        gd.after_step(opt)
    assert torch.allclose(gd.scores["4"], expected, rtol=1e-5, atol=1e-9)
    assert expected.abs().sum() > 0
    # convolutions are frozen in a tick: only the gates and the Linear layer moved
    assert not model[0].weight.requires_grad and model[8].weight.requires_grad


def test_units_rule_masks_exactly_the_lowest_scored_channels_above_the_floor():
    """dpm's earlier tick (pruner.tick_rule=units, floor_rounding=ceil): the p x remaining units
    with the lowest scores, exactly that many, counted now."""
    model = randomised(tiny_net())
    x = torch.randn(2, 3, 8, 8)
    gd = gated(
        model, x, prune_ratio=0.5, min_channel_ratio=0.5, tick_rule="units", floor_rounding="ceil"
    )  # 11 units: 5 per tick; floors 3 and 3
    gd.begin_phase("tick", 1, steps=1)
    # Layer "1" (6 channels) holds the 4 lowest scores, but may lose only 3; then the lowest of "4".
    set_scores(gd, {"1": [0.1, 0.2, 0.3, 0.4, 5.0, 6.0], "4": [0.9, 0.7, 3.0, 0.8, 4.0]})
    gd.ticks = 1
    record = gd.select()
    chosen = {tuple(k) for k in record["selected"]}
    assert chosen == {("0", 0), ("0", 1), ("0", 2), ("3", 1), ("3", 3)}
    bns = gated_modules(model)
    assert bns["1"].mask.tolist() == [0, 0, 0, 1, 1, 1] and bns["4"].mask.tolist() == [1, 0, 1, 0, 1]
    assert bns["1"].gate[:3].abs().sum() == 0 and bns["4"].gate[[1, 3]].abs().sum() == 0  # N = 1: zero at once
    # next tick: 6 remaining -> 3 requested, but both layers sit at their floor of 3
    set_scores(gd, {"1": [0.0] * 6, "4": [0.0] * 5})
    gd.ticks = 2
    assert gd.select()["selected"] == []


def test_residual_coupled_channels_are_scored_and_masked_together():
    from dpm.models import build_model

    torch.manual_seed(0)
    model = randomised(build_model("tiny_resnet", 10))
    x = torch.randn(2, 3, 8, 8)
    gd = gated(model, x, prune_ratio=0.02)  # one unit per tick
    coupled = [u for u in gd.units if len(u.bns) > 1]
    assert {bn for u in coupled for bn, _ in u.bns} >= {"bn1", "layer1.0.bn2", "layer2.0.bn2", "layer2.0.downsample.1"}
    unit = next(u for u in coupled if ("layer2.0.downsample.1", 5) in u.bns)
    assert dict(unit.bns) == {"layer2.0.bn2": 5, "layer2.0.downsample.1": 5}
    gd.begin_phase("tick", 1, steps=1)
    set_scores(gd, {n: [1.0] * m.num_features for n, m in gated_modules(model).items()})
    # Each coupled BN channel alone scores more than a plain channel; their sum is the lowest unit score.
    gd.scores["layer2.0.bn2"][5] = 0.3
    gd.scores["layer2.0.downsample.1"][5] = 0.3
    gd.scores["layer2.0.bn1"][2] = 0.7
    gd.ticks = 1
    assert [tuple(k) for k in gd.select()["selected"]] == [unit.key]
    bns = gated_modules(model)
    assert bns["layer2.0.bn2"].mask[5] == 0 and bns["layer2.0.downsample.1"].mask[5] == 0
    assert int(sum((m.mask == 0).sum() for m in bns.values())) == 2


# The original's tick (youzhonghui/gate-decorator-pruning, prune/universal.py and the VGG16 driver),
# restated from its rules on per-BN score vectors, independently of dpm's implementation:
# rule 1, num = int(p * left) with left lagging one tick; rule 2, per layer the highest `minimal`
# scores never prunable, the rest entered once per coupled BN, threshold = sorted(entries)[num],
# prune score <= threshold (ties too) unless among the layer's top `minimal`; rule 3, minimal =
# max(1, int(0.1 C)).
def original_ticks(
    layers: list[tuple[str, ...]],
    widths: dict[str, int],
    ticks: list[dict[str, list[float]]],
    p: float,
    ratio: float = 0.1,
) -> list[dict]:
    """Each tick's num, left and newly masked (bn, channel) pairs under the original's rules.

    ``layers``: the gated BN layers, coupled ones (one residual stage) together in one tuple.
    ``ticks``: per tick, the Taylor score of every BN channel (positive: the original drops zeros)."""
    masks = {bn: [1.0] * widths[bn] for bn in widths}
    total = sum(widths.values())
    pruned, out = 0, []
    for scores in ticks:
        left_filters = total - pruned
        num = int(left_filters * p)
        status = []
        for bns in layers:
            summed = [sum(scores[bn][c] * masks[bn][c] for bn in bns) for c in range(widths[bns[0]])]
            status.append((bns, summed, max(1, int(widths[bns[0]] * ratio))))
        left = sum(sum(1 for v in summed if v != 0) * len(bns) for bns, summed, _ in status)
        entries = []
        for bns, summed, minimal in status:
            kept = sorted(summed)[:-minimal]
            entries += [v for v in kept if v != 0] * len(bns)
        threshold = sorted(entries)[num]
        masked = set()
        for bns, summed, minimal in status:
            hard = sorted(summed)[-minimal]
            for c, v in enumerate(summed):
                if not (v >= hard or v > threshold) and masks[bns[0]][c]:
                    for bn in bns:
                        masks[bn][c] = 0.0
                        masked.add((bn, c))
        pruned = total - left  # what the driver reads back: counted before this tick's masks
        out.append({"num": num, "left": left_filters, "masked": masked})
    return out


ORIGINAL_NETS = {
    # a small ResNet with a projection shortcut: each stage's residual-add BNs are one coupled layer
    "tiny_resnet": [
        ("bn1", "layer1.0.bn2"),
        ("layer1.0.bn1",),
        ("layer2.0.bn1",),
        ("layer2.0.bn2", "layer2.0.downsample.1"),
    ],
    # VGG-like: conv-BN-ReLU x 3, every BN its own layer
    "tiny_cnn": [("features.1",), ("features.4",), ("features.7",)],
}


@pytest.mark.parametrize("net", sorted(ORIGINAL_NETS))
def test_tick_counts_selects_and_lags_as_the_original(net):
    from dpm.models import build_model

    torch.manual_seed(0)
    model = randomised(build_model(net, 10))
    x = torch.randn(2, 3, 8, 8)
    p = 0.1
    gd = gated(model, x, prune_ratio=p, flops_target=0.01)
    widths = {n: m.num_features for n, m in gated_modules(model).items()}
    assert {bn for layer in ORIGINAL_NETS[net] for bn in layer} == set(widths)
    # Small integer scores: ties at the threshold, at the per-layer floor and across layers.
    g = torch.Generator().manual_seed(1)
    ticks = [
        {bn: torch.randint(1, 7, (w,), generator=g).double().tolist() for bn, w in widths.items()} for _ in range(4)
    ]
    expected = original_ticks(ORIGINAL_NETS[net], widths, ticks, p)
    assert expected[0]["left"] == expected[1]["left"] == sum(widths.values())  # the lag: ticks 1, 2 alike
    assert expected[2]["left"] < expected[1]["left"]
    unit_of = {(bn, c): u.key for u in gd.units for bn, c in u.bns}
    for t, (scores, want) in enumerate(zip(ticks, expected), start=1):
        gd.begin_phase("tick", t, steps=1)
        set_scores(gd, scores)
        gd.ticks = t
        record = gd.select()
        assert record["requested"] == want["num"] and record["count_basis"] == want["left"], t
        selected = {tuple(k) for k in record["selected"]}
        assert selected == {unit_of[bc] for bc in want["masked"]}, t
        # a tick takes at least num + 1 BN-channel entries' worth (ties at the threshold go too)
        assert record["selected_entries"] == len(want["masked"]) >= want["num"] + 1, t
        masked = {(n, c) for n, m in gated_modules(model).items() for c in range(m.num_features) if m.mask[c] == 0}
        assert masked == set().union(*(e["masked"] for e in expected[:t])), t


@pytest.mark.parametrize("tick_rule", ["original", "units"])
def test_trim_to_target_masks_only_the_lowest_selected_units_the_target_needs(tick_rule):
    """A coarse tick (p large) can cross the FLOPs target by far: the CPU-scale recipe's p = 12% once
    left +SP at 21.8% FLOPs where its base stopped at 49.2% (seed 3, target 50%). With trim_to_target
    the crossing tick keeps the shortest lowest-scored prefix of its selection that reaches the
    target; without it (the original), the whole selection; a tick short of the target is untouched."""
    from dpm.models import build_model

    model = randomised(build_model("tiny_cnn", 10))
    x = torch.randn(2, 3, 8, 8)
    widths = {n: m.num_features for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    order = torch.randperm(sum(widths.values()), generator=torch.Generator().manual_seed(2)).double().tolist()
    scores, at = {}, 0
    for bn, w in widths.items():  # distinct scores: one lowest-first order
        scores[bn], at = order[at : at + w], at + w

    def first_tick(target: float, trim: bool) -> tuple[GateDecorator, dict]:
        options = dict(prune_ratio=0.6, flops_target=target, tick_rule=tick_rule, trim_to_target=trim)
        gd = gated(copy.deepcopy(model), x, **options)
        gd.begin_phase("tick", 1, steps=1)
        set_scores(gd, scores)
        gd.ticks = 1
        return gd, gd.select()

    whole_gd, whole = first_tick(0.8, trim=False)
    assert whole_gd.flops_remaining() < 0.7  # the premise: the tick overshoots the target by far
    trim_gd, trimmed = first_tick(0.8, trim=True)
    k = len(trimmed["selected"])
    assert 0 < k < len(whole["selected"]) and trimmed["selected"] == whole["selected"][:k]
    assert trimmed["trimmed_from"] == len(whole["selected"]) and whole["trimmed_from"] is None
    last = tuple(trimmed["selected"][-1])
    assert trim_gd.flops_remaining() <= 0.8 < trim_gd.flops_remaining(trim_gd.removed() - {last})
    # short of the target: the whole selection either way
    _, short = first_tick(0.01, trim=True)
    assert short["selected"] == whole["selected"] and short["trimmed_from"] is None


def test_first_tick_counts_bn_channel_entries_of_coupled_layers():
    """p = 0.05 on tiny_resnet (72 BN channels, two coupled stages): num = int(0.05 * 72) = 3, so the
    tick takes the 4 lowest entries; a coupled unit is 2 entries, so 3 units where the units rule
    (int(0.05 * 48 units) = 2) takes 2."""
    from dpm.models import build_model

    model = randomised(build_model("tiny_resnet", 10))
    x = torch.randn(2, 3, 8, 8)
    gd = gated(model, x, prune_ratio=0.05)
    gd.begin_phase("tick", 1, steps=1)
    scores = {n: [10.0 + c for c in range(m.num_features)] for n, m in gated_modules(model).items()}
    scores["layer2.0.bn2"][3] = scores["layer2.0.downsample.1"][3] = 0.5  # coupled: 1.0, 2 entries
    scores["layer2.0.bn1"][7] = 1.5
    scores["layer1.0.bn1"][2] = 2.0  # the 4th entry: the threshold
    scores["layer1.0.bn1"][5] = 3.0
    set_scores(gd, scores)
    gd.ticks = 1
    record = gd.select()
    assert record["requested"] == 3 and record["count_basis"] == 72
    assert {tuple(k) for k in record["selected"]} == {
        ("layer2.0.conv2", 3),
        ("layer2.0.conv1", 7),
        ("layer1.0.conv1", 2),
    }
    assert record["selected_entries"] == 4


def test_floor_is_max_1_int_tenth_of_the_layer_or_rounded_up_on_request():
    from dpm.models import build_model

    model = build_model("tiny_cnn", 10, widths=(9, 16, 64))
    x = torch.randn(2, 3, 8, 8)
    assert gated(copy.deepcopy(model), x).floor == {"features.0": 1, "features.3": 1, "features.6": 6}
    assert gated(copy.deepcopy(model), x, floor_rounding="ceil").floor == {
        "features.0": 1,
        "features.3": 2,
        "features.6": 7,
    }


def test_tick_trains_bn_bias_with_weight_decay_and_carries_momentum_to_the_next_phase():
    P = type("P", (), {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4})
    torch.manual_seed(0)
    model = randomised(tiny_net())
    x = torch.randn(4, 3, 8, 8)
    gd = gated(model, x)
    bns = gated_modules(model)

    def steps(opt, n=2):
        for _ in range(n):
            loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 3, (4,)))
            opt.zero_grad()
            loss.backward()
            gd.before_step(opt)
            opt.step()
            gd.after_step(opt)

    gd.begin_phase("tick", 1, steps=2)
    assert bns["1"].bias.requires_grad and bns["1"].gate.requires_grad and not bns["1"].weight.requires_grad
    assert not model[0].weight.requires_grad  # the convolutions are frozen
    bias = bns["1"].bias.detach().clone()
    opt = gd.optimizer(model, P)
    steps(opt)
    assert not torch.equal(bns["1"].bias, bias)  # BN bias trains in a tick
    gate_buf = opt.state[bns["1"].gate]["momentum_buffer"].clone()
    gd.begin_phase("tock", 1, steps=2)
    tock = gd.optimizer(model, P)
    assert torch.equal(tock.state[bns["1"].gate]["momentum_buffer"], gate_buf)  # one SGD's momentum, carried
    steps(tock)
    conv_buf = tock.state[model[0].weight]["momentum_buffer"].clone()
    gd.begin_phase("tick", 2, steps=2)
    tick = gd.optimizer(model, P)
    assert torch.equal(tick.state[bns["1"].gate]["momentum_buffer"], tock.state[bns["1"].gate]["momentum_buffer"])
    steps(tick)
    gd.begin_phase("tock", 2, steps=2)  # a frozen conv's momentum waits through the tick
    assert torch.equal(gd.optimizer(model, P).state[model[0].weight]["momentum_buffer"], conv_buf)
    # dpm's earlier tick: BN bias frozen, a fresh optimizer every phase
    earlier = gated(randomised(tiny_net()), x, tick_bn_bias=False, carry_momentum=False)
    earlier.begin_phase("tick", 1, steps=1)
    assert not gated_modules(earlier.model)["1"].bias.requires_grad
    earlier.optimizer(earlier.model, P)
    earlier.begin_phase("tick", 2, steps=1)
    assert not earlier.optimizer(earlier.model, P).state


def test_melt_keeps_the_function_and_removes_the_predicted_macs():
    from dpm.measure import thop_default_macs_params
    from dpm.models import build_model

    torch.manual_seed(1)
    model = randomised(build_model("tiny_resnet", 10))
    x = torch.randn(4, 3, 8, 8)
    gd = gated(model, x, prune_ratio=0.3, min_channel_ratio=0.25)
    with torch.no_grad():
        for m in gated_modules(model).values():
            m.gate.mul_(torch.rand_like(m.gate) + 0.5)
    gd.begin_phase("tick", 1, steps=1)
    set_scores(gd, {n: torch.rand(m.num_features).tolist() for n, m in gated_modules(model).items()})
    gd.ticks = 1
    selected = gd.select()["selected"]
    assert len(selected) >= 10
    predicted = macs_without(gd.skeleton, sorted(gd.removed()), x)
    assert predicted == pytest.approx(gd.flops_remaining() * gd.base_macs)
    model.eval()
    with torch.no_grad():
        before = model(x)
    fold_gates(model)
    remove_channels(model, sorted(gd.controller.pruned), x)
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() <= 1e-5
    macs = thop_default_macs_params(model, x)[0]
    assert macs == predicted < gd.base_macs
    # the removed channels are gone from the layers: widths are the kept counts
    kept = {g: sum(1 for u in gd.units if u.group == g and list(u.key) not in selected) for g in gd.floor}
    assert model.layer2[0].conv1.out_channels == kept["layer2.0.conv1"]
    assert model.layer2[0].conv2.out_channels == model.fc.in_features == kept["layer2.0.conv2"]


@pytest.mark.parametrize("decay_vector", ["gate", "channel"])
def test_sp_gates_reach_exactly_zero_after_N_steps_and_only_then_are_masked(decay_vector):
    model = randomised(tiny_net())
    x = torch.randn(4, 3, 8, 8)
    N = 4
    gd = gated(model, x, prune_ratio=0.2, N=N, decay_vector=decay_vector)  # 2 units a tick
    gd.begin_phase("tick", 1, steps=1)
    set_scores(gd, {"1": [5, 5, 5, 0.1, 5, 5], "4": [5, 0.2, 5, 5, 5]})
    bns = gated_modules(model)
    L0 = {"1": bns["1"].gate[3].item(), "4": bns["4"].gate[1].item()}
    gd.ticks = 1
    gd.select()
    gd.begin_phase("tock", 1, steps=N)
    opt = gd.optimizer(model, type("P", (), {"lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4}))
    for n in range(1, N + 1):
        if decay_vector == "gate":  # the gate alone is the vector: |g| follows L0 (1 - n/N)
            assert abs(bns["1"].gate[3].item()) == pytest.approx(abs(L0["1"]) * (1 - n / N), abs=1e-6)
            assert abs(bns["4"].gate[1].item()) == pytest.approx(abs(L0["4"]) * (1 - n / N), abs=1e-6)
        zero = n == N
        assert (bns["1"].gate[3].item() == 0.0) == zero and (bns["4"].gate[1].item() == 0.0) == zero
        assert (bns["1"].mask[3].item() == 0.0) == zero and (bns["4"].mask[1].item() == 0.0) == zero
        assert gd.controller.decaying == (frozenset() if zero else frozenset({("0", 3), ("3", 1)}))
        if zero:
            break
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 3, (4,)))
        opt.zero_grad()
        loss.backward()
        gd.step_start(opt)
        gd.before_step(opt)
        opt.step()
        gd.after_step(opt)
    if decay_vector == "channel":  # conv filter and BN bias of the channel are zero too
        assert model[0].weight[3].abs().sum() == 0 and model[0].bias[3] == 0 and bns["1"].bias[3] == 0
    assert bns["1"].mask.tolist() == [1, 1, 1, 0, 1, 1]


def smoke(*overrides: str):
    return compose(["experiment=gate_decorator_smoke", "trainer.progress=false", *overrides])


def test_sp_with_N_1_is_bitwise_the_base_method(tmp_path):
    base = run(smoke("dpm=base"), tmp_path / "base")
    sp = run(smoke("dpm=sp", "dpm.N=1"), tmp_path / "sp")
    assert base["status"] == sp["status"] == "complete" and base["N"] == sp["N"] == 1 and base["pruned"] > 0
    assert {k: v for k, v in sp.items() if k not in RUN_SPECIFIC} == {
        k: v for k, v in base.items() if k not in RUN_SPECIFIC
    }
    wb = load_checkpoint(tmp_path / "base" / CHECKPOINT)["model"]
    ws = load_checkpoint(tmp_path / "sp" / CHECKPOINT)["model"]
    assert wb.keys() == ws.keys() and all(torch.equal(wb[k], ws[k]) for k in wb)


@pytest.mark.slow
def test_smoke_runs_of_base_sp_sr_reach_the_flops_target_without_reselecting_decaying_channels(tmp_path):
    results = {v: run(smoke(f"dpm={v}"), tmp_path / v) for v in ("base", "sp", "sr")}
    for v, m in results.items():
        assert m["status"] == "complete" and m["target_met"], v
        assert m["flops_target"] <= 0.5 and m["native_flops_remaining"] <= m["flops_target"], v
        assert m["ticks"] >= 3 and m["tocks"] >= 1, v
        assert m["native_counter"] == "thop_default" and m["native_pruned_macs"] < m["native_base_macs"], v
        assert m["melt_max_abs_diff"] <= 1e-5 and m["epochs"]["finetune"] == 1, v
        # the tick rules that ran are recorded (defaults: the original's)
        assert (
            m["tick_rule"],
            m["floor_rounding"],
            m["tick_bn_bias"],
            m["carry_momentum"],
            m["tick_weight_decay"],
        ) == ("original", "floor", True, True, 5e-4), v
        ticks = json.loads((tmp_path / v / "gate_decorator_ticks.json").read_text())
        pruned: set = set()
        for record in ticks:
            selected = {tuple(k) for k in record["selected"]}
            # candidates never include a channel still decaying, nor one already zero
            assert not selected & {tuple(k) for k in record["decaying_before"]}, (v, record["tick"])
            assert record["excluded"] >= len(record["decaying_before"]), (v, record["tick"])
            assert not selected & pruned, (v, record["tick"])
            if v != "sr":  # without releases every earlier selection is decaying or zero
                pruned |= selected
    assert results["base"]["N"] == 1 and results["sp"]["N"] == results["sr"]["N"] == 6
    # N = 6 spans ticks of 4 steps: the next tick selects while the previous selection still decays
    sp_ticks = json.loads((tmp_path / "sp" / "gate_decorator_ticks.json").read_text())
    assert any(
        {tuple(k) for k in a["selected"]} & {tuple(k) for k in b["decaying_before"]}
        for a, b in zip(sp_ticks, sp_ticks[1:])
    )
    assert results["sp"]["drain_steps"] > 0 and results["sp"]["released"] == 0
    assert results["sr"]["released"] >= 1
    assert results["sp"]["pruned"] == results["sp"]["admitted"]


def test_bad_gate_decorator_keys_fail_with_one_line():
    from dpm.config import validate
    from dpm.errors import UserError

    with pytest.raises(UserError, match="pruner.flops_target"):
        validate(smoke("pruner.flops_target=1.5"))
    with pytest.raises(UserError, match="pruner.decay_vector"):
        validate(smoke("pruner.decay_vector=filter"))
    with pytest.raises(UserError, match="pruner.tick_rule='channels': valid: original, units"):
        validate(smoke("pruner.tick_rule=channels"))
    with pytest.raises(UserError, match="pruner.floor_rounding='round': valid: floor, ceil"):
        validate(smoke("pruner.floor_rounding=round"))
    validate(compose(["experiment=paper/gate_decorator_vgg16_cifar10", "dpm=sr"]))
    validate(compose(["experiment=paper/gate_decorator_resnet56_cifar10", "dpm=sp"]))


class Killed(BaseException):
    """Stands in for SIGKILL right after a checkpoint (in-process: a CLI run per kill costs ~20 s here)."""


class RaiseAt:
    """A fault hook (dpm.faults) that raises Killed at one point."""

    def __init__(self, at: str) -> None:
        self.at = at

    def point(self, name: str) -> None:
        if name == self.at:
            raise Killed(name)

    def step(self, phase: str, step: int, loss):
        return loss


@pytest.mark.parametrize("point", ["tick2:epoch1", "finetune:epoch1"])
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path, caplog, point):
    """Killed after tick 2's checkpoint (its selection not yet made, +SR decays in flight) or after
    the melted model's fine-tune epoch, the rerun continues to what an uninterrupted run gives."""
    ref = run(smoke("dpm=sr"), tmp_path / "ref")
    dpm.faults.install(RaiseAt(point))
    with pytest.raises(Killed):
        run(smoke("dpm=sr"), tmp_path / "run")
    dpm.faults.install(None)
    caplog.clear()
    with caplog.at_level("INFO"):
        resumed = run(smoke("dpm=sr"), tmp_path / "run")
    phase = point.split(":")[0]
    assert f"{phase}: resuming after epoch 1" in caplog.text
    assert ("gate_decorator: resuming at tick 2" if phase == "tick2" else "resuming the fine-tune") in caplog.text
    skip = RUN_SPECIFIC | {"pretrain_checkpoint"}
    assert ref["released"] >= 1 and ref["ticks"] >= 3
    assert {k: v for k, v in resumed.items() if k not in skip} == {k: v for k, v in ref.items() if k not in skip}
    assert (tmp_path / "run" / "gate_decorator_ticks.json").read_text() == (
        tmp_path / "ref" / "gate_decorator_ticks.json"
    ).read_text()
    wr = load_checkpoint(tmp_path / "ref" / CHECKPOINT)["model"]
    wk = load_checkpoint(tmp_path / "run" / CHECKPOINT)["model"]
    assert wr.keys() == wk.keys() and all(torch.equal(wr[k], wk[k]) for k in wr)


def test_strict_budget_replacements_are_drained_before_the_melt(tmp_path):
    m = run(smoke("dpm=sr", "dpm.budget=strict"), tmp_path / "strict")
    assert m["status"] == "complete" and m["target_met"] and m["released"] >= 1
    # every release was replaced by the next-lowest unit, and every admitted unit ended removed or released
    assert m["admitted"] == m["pruned"] + m["released"]


def test_drain_loader_resumed_inside_an_epoch_yields_only_the_steps_left():
    """A drain killed after a mid-epoch checkpoint resumes at its next step: the cut loader must take
    the start step (train_phase passes it) and stop at the drain's total, not a full epoch later."""
    from dpm.stages.gate_decorator import _Steps

    class Loader:
        def __init__(self):
            self.epoch = self.start = 0

        def set_epoch(self, epoch, start_step=0):
            self.epoch, self.start = epoch, start_step

        def __len__(self):
            return 10

        def __iter__(self):
            return iter(range(self.epoch * 10 + self.start, self.epoch * 10 + 10))

    steps = _Steps(Loader(), 14)  # one full epoch and 4 steps of the next
    steps.set_epoch(0)
    assert list(steps) == list(range(10))
    steps.set_epoch(1, 1)  # resumed after the drain's step 11
    assert len(steps) == 4 and list(steps) == [11, 12, 13]
