"""MACs/params counters (docs/method.md section 8): pinned headline numbers, native units, hygiene."""

import copy
import math

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dpm.measure import (
    compare_models,
    conv_linear_macs_params,
    count_macs_params,
    count_params,
    layer_widths,
    measure_latency,
    native_macs_params,
    thop_default_macs_params,
    torch_pruning_macs_params,
)
from dpm.models import build_model

X = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet56():
    torch.manual_seed(0)
    return build_model("resnet56", 10)


@pytest.fixture(scope="module")
def resnet56_zeropad():
    torch.manual_seed(0)
    return build_model("resnet56", 10, shortcut="zeropad")


def _flop_counter_macs(model: nn.Module) -> int:
    shadow = copy.deepcopy(model).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        shadow(torch.randn(*X))
    return counter.get_total_flops() // 2  # FlopCounterMode counts a multiply-add as 2 FLOPs


def test_resnet56_headline_macs_projection(resnet56):
    macs, params = count_macs_params(resnet56)
    assert macs == 125_747_840
    assert round(macs / 1e6, 2) == 125.75
    assert params == 855_770


def test_resnet56_headline_macs_zeropad(resnet56_zeropad):
    macs, params = count_macs_params(resnet56_zeropad)
    assert macs == 125_485_696
    assert round(macs / 1e6, 2) == 125.49
    assert params == 853_018


@pytest.mark.parametrize("fixture", ["resnet56", "resnet56_zeropad"])
def test_headline_equals_flop_counter_mode_half(fixture, request):
    model = request.getfixturevalue(fixture)
    assert count_macs_params(model, X)[0] == _flop_counter_macs(model)


def test_headline_equals_flop_counter_mode_half_on_vgg():
    model = build_model("vgg16_bn", 10)
    macs, params = count_macs_params(model, X)
    assert macs == _flop_counter_macs(model) == 313_725_952
    assert params == 15_253_578


def test_native_counters_match_the_base_methods_units(resnet56):
    tp_macs, tp_params = torch_pruning_macs_params(resnet56, X)
    assert round(tp_macs / 1e6, 2) == 127.12  # DepGraph's units
    thop_macs, thop_params = thop_default_macs_params(resnet56, X)
    assert round(thop_macs / 1e6, 2) == 127.93  # Gate Decorator's units
    assert conv_linear_macs_params(resnet56, X) == count_macs_params(resnet56, X)  # OTOv2's units
    assert tp_params == thop_params == 855_770


def test_native_dispatcher(resnet56):
    assert native_macs_params(resnet56, X, "depgraph") == ("torch_pruning", 127_115_914, 855_770)
    assert native_macs_params(resnet56, X, "gate_decorator") == ("thop_default", 127_931_072, 855_770)
    assert native_macs_params(resnet56, X, "otov2") == ("conv_linear", 125_747_840, 855_770)
    assert native_macs_params(resnet56, X, "none") == ("conv_linear", 125_747_840, 855_770)
    with pytest.raises(ValueError, match=r"unknown pruner 'hrank'; valid: depgraph, otov2, gate_decorator, none"):
        native_macs_params(resnet56, X, "hrank")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "counter", [count_macs_params, thop_default_macs_params, torch_pruning_macs_params], ids=lambda f: f.__name__
)
def test_counters_leave_the_model_untouched(counter, training):
    model = build_model("tiny_resnet", 10).train(training)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    counter(model, torch.randn(4, 3, 32, 32))
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys()  # no total_ops / total_params buffers left behind
    assert all(torch.equal(after[k], state[k]) for k in state)  # BN statistics not updated
    assert not any(hasattr(m, "total_ops") or hasattr(m, "total_params") for m in model.modules())


def test_macs_are_per_sample_and_inputs_may_be_a_shape_or_tensor():
    model = build_model("tiny_cnn", 10, in_channels=1)
    one = count_macs_params(model, input_shape=(1, 1, 8, 8))
    assert count_macs_params(model, torch.randn(5, 1, 8, 8)) == one
    assert count_macs_params(model, (1, 1, 8, 8)) == one
    assert (
        torch_pruning_macs_params(model, torch.randn(5, 1, 8, 8))[0]
        == torch_pruning_macs_params(model, (1, 1, 8, 8))[0]
    )
    with pytest.raises(TypeError, match="example_inputs must be"):
        count_macs_params(model, "1x1x8x8")


@pytest.mark.parametrize("name", ["tiny_resnet", "resnet20"])
def test_channel_pruned_model_counts_less(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    x = torch.randn(1, 3, 32, 32)
    base = count_macs_params(model, x)
    base_tp = torch_pruning_macs_params(model, x)
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[model.fc]
    )
    pruner.step()
    pruned = count_macs_params(model, x)
    assert pruned[0] < base[0] and pruned[1] < base[1]
    assert pruned[0] == _flop_counter_macs(model)
    assert torch_pruning_macs_params(model, x)[0] < base_tp[0]
    assert thop_default_macs_params(model, x)[0] > pruned[0]  # BN still costs in thop's default units
    result = compare_models(base, pruned)
    assert result["speedup"] > 1.0
    assert 0.0 < result["flops_remaining_pct"] < 100.0


def test_layer_widths_name_each_conv_and_linear_with_what_is_left():
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    x = torch.randn(1, 3, 32, 32)
    before = layer_widths(model)
    assert before["conv1"] == 16 and before["layer3.2.conv2"] == 64 and before["fc"] == 10
    assert len(before) == 22  # 19 3x3 convs, the two 1x1 projection shortcuts and the classifier
    # Remove 12 of conv1's 16 channels: the stage-1 residual stream coupled to it narrows with it.
    group = (
        tp.DependencyGraph()
        .build_dependency(model, x)
        .get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=list(range(12)))
    )
    group.prune()
    after = layer_widths(model)
    assert after["conv1"] == 4 and after["layer1.0.conv2"] == 4 and after["layer1.0.conv1"] == 16
    assert after["layer3.2.conv2"] == 64 and after["fc"] == 10


def test_compare_models_arithmetic():
    result = compare_models((200, 1000), (50, 250))
    assert result == {
        "base_macs": 200,
        "pruned_macs": 50,
        "base_params": 1000,
        "pruned_params": 250,
        "flops_remaining_pct": 25.0,
        "params_remaining_pct": 25.0,
        "speedup": 4.0,
    }
    assert math.isinf(compare_models((200, 1000), (0, 10))["speedup"])
    with pytest.raises(ValueError, match="must be positive"):
        compare_models((0, 1000), (0, 10))


def test_count_params_counts_shared_tensors_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_params(model) == 20


def test_measure_latency_returns_positive_ms_and_keeps_mode():
    model = build_model("tiny_cnn", 10).train()
    ms = measure_latency(model, torch.randn(1, 3, 32, 32), "cpu", warmup=1, reps=3)
    assert ms > 0.0 and math.isfinite(ms)
    assert model.training
