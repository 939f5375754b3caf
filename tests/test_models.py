"""Model zoo: every name builds and runs, parameter counts pinned to the base methods' own models."""

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from dpm.models import MODEL_NAMES, build_model, model_options

CIFAR_AND_TINY = ("resnet20", "resnet56", "resnet110", "vgg16", "vgg16_bn", "vgg19_bn", "tiny_cnn", "tiny_resnet")


def _build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    # Torch-Pruning 1.6.1's build_dependency leaves the model in eval mode (docs/method.md section 10):
    # restore the caller's mode, as every user of the graph must.
    was_training = model.training
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    model.train(was_training)
    return graph


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_and_runs_in_train_and_eval(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert model(x).shape == (2, 7)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_deepcopy_gives_an_identical_independent_model(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
    first = next(twin.parameters())
    with torch.no_grad():
        first.add_(1.0)
    assert not torch.equal(first, next(model.parameters()))


@pytest.mark.parametrize(
    "name, options, num_classes, expected",
    [
        # docs/method.md section 9: the two VGG16 tables use different networks.
        ("vgg16_bn", {}, 10, 15_253_578),  # OTOv2: 512-512-512-10 head
        ("vgg16", {}, 10, 14_728_266),  # Gate Decorator: one Linear(512, 10)
        # DepGraph's ResNet-56 ("0.86 M"): 16 + 9*2 + ... convs, BN pairs, three 1x1 projections.
        ("resnet56", {}, 10, 855_770),
        ("resnet56", {"shortcut": "zeropad"}, 10, 853_018),  # He et al. option A ("0.85 M")
        ("resnet20", {}, 10, 272_474),
        ("resnet110", {}, 10, 1_730_714),
        ("vgg19_bn", {}, 100, 20_086_692),  # DepGraph's CIFAR-100 VGG-19
        ("vgg16_bn", {"classifier": "linear"}, 10, 14_728_266),  # the head is the only difference
        ("resnet18", {}, 1000, 11_689_512),  # torchvision's own count: num_classes passes through
    ],
)
def test_parameter_counts_are_pinned(name, options, num_classes, expected):
    assert _num_params(build_model(name, num_classes, **options)) == expected


def test_unknown_name_is_one_line_naming_the_value_and_the_valid_ones():
    with pytest.raises(ValueError) as err:
        build_model("resnet57", 10)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("unknown model 'resnet57'; valid: resnet20, resnet56")
    assert all(name in message for name in MODEL_NAMES)


def test_unknown_option_and_bad_option_value_are_rejected():
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'depth' for model 'resnet56'; valid: shortcut"):
        build_model("resnet56", 10, depth=56)
    with pytest.raises(ValueError, match=r"for model 'resnet18'; valid: none"):
        build_model("resnet18", 10, shortcut="zeropad")
    with pytest.raises(ValueError, match=r"unknown shortcut 'B'; valid: projection, zeropad"):
        build_model("resnet56", 10, shortcut="B")
    with pytest.raises(ValueError, match=r"unknown classifier 'mlp3'"):
        build_model("vgg16", 10, classifier="mlp3")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_model("tiny_cnn", 0)


def test_model_options_lists_defaults():
    assert model_options("resnet56") == {"shortcut": "projection"}
    assert model_options("vgg16_bn") == {"classifier": "mlp"}
    assert model_options("vgg16") == {"classifier": "linear"}
    assert model_options("mobilenet_v2") == {}


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_resnet", "resnet20"])
def test_small_models_run_on_single_channel_8x8_digits(name):
    model = build_model(name, num_classes=10, in_channels=1)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "mobilenet_v2"])
def test_in_channels_reaches_the_stem(name):
    model = build_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_resnet56_structure_matches_depgraph():
    model = build_model("resnet56", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 1 stem + 27 blocks * 2 + 2 projections (stages 2 and 3 only).
    assert len(convs) == 57
    assert sum(1 for c in convs if c.kernel_size == (1, 1)) == 2
    assert model.fc.in_features == 64


@pytest.mark.parametrize("name", CIFAR_AND_TINY)
def test_torch_pruning_traces_the_model_and_mode_is_restored(name):
    model = build_model(name, num_classes=10).train()
    graph = _build_graph(model, torch.randn(1, 3, 32, 32))
    assert model.training
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    group = graph.get_pruning_group(first_conv, tp.prune_conv_out_channels, idxs=[0])
    assert len(group) > 1  # the conv drags its BN (and consumers) along


def test_zero_padding_shortcut_traces_but_refuses_channel_pruning_clearly():
    model = build_model("resnet20", num_classes=10, shortcut="zeropad").train()
    x = torch.randn(1, 3, 32, 32)
    _build_graph(model, x)
    assert model.training
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[model.fc]
    )
    pruner.step()
    with pytest.raises(RuntimeError, match="shortcut='zeropad' models cannot be pruned"):
        model(x)


def test_projection_resnet_prunes_and_still_runs():
    model = build_model("resnet20", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    before = _num_params(model)
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[model.fc]
    )
    pruner.step()
    assert _num_params(model) < before
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
