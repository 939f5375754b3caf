"""DepGraphPruner: Torch-Pruning's own selection, exact physical removal, stable keys, optimizer state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch_pruning as tp
from torch import nn

from dpm.core import DecayController
from dpm.measure import torch_pruning_macs_params
from dpm.models import build_model
from dpm.pruners import DepGraphPruner
from helpers import one_thread  # noqa: F401  (one_thread is an autouse fixture)


def model_and_input(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A model whose eval-mode output depends on its input, and a batch of two.

    Random affine BN parameters, then running statistics estimated on random batches: with BN at
    its init (mean 0, var 1, weight 1, bias 0) or with arbitrary statistics, a deep random net's
    eval output is nearly constant and a wrong removal could go unnoticed.
    """
    torch.manual_seed(seed)
    model = build_model(name, 10)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.2, 0.2)
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32))
    for m in bns:
        m.momentum = 0.1
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert (y[0] - y[1]).abs().max() > 1e-3, "the test model's output does not depend on its input"
    model.train()
    return model, x


def tag_channels(model: nn.Module) -> None:
    """Write each channel's original index into its BN running_mean: the buffer travels with the
    channel through pruning and plays no part in magnitude importance or in counting."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.arange(m.num_features, dtype=m.running_mean.dtype))


def surviving_channels(model: nn.Module) -> dict[str, list[int]]:
    return {
        n: m.running_mean.long().tolist()
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def speedup(pruner: DepGraphPruner) -> float:
    return pruner.base_native[0] / torch_pruning_macs_params(pruner.model, pruner.example_inputs)[0]


def zero_producers(targets, keys) -> None:
    with torch.no_grad():
        for k in keys:
            for s in targets[k].producers:
                s.param.index_fill_(s.dim, torch.tensor(s.indices), 0.0)


# ---------------------------------------------------------------------------- selection
@pytest.mark.slow
def test_select_is_torch_prunings_own_progressive_selection():
    model, x = model_and_input("resnet20")
    tag_channels(model)
    reference = copy.deepcopy(model).eval()

    # Torch-Pruning's CIFAR recipe, as its benchmark's progressive_pruning runs it.
    example = x[:1]
    base_ops, _ = tp.utils.count_ops_and_params(reference, example_inputs=example)
    ref_pruner = tp.pruner.MagnitudePruner(
        reference,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=True,
        iterative_steps=400,
        pruning_ratio=1.0,
        ignored_layers=[reference.fc],
    )
    current = 1.0
    while current < 2.0:
        ref_pruner.step()
        current = base_ops / tp.utils.count_ops_and_params(reference, example_inputs=example)[0]
        if ref_pruner.current_step == ref_pruner.iterative_steps:
            break

    pruner = DepGraphPruner(model, x, num_classes=10)
    before = copy.deepcopy(model.state_dict())
    keys = pruner.select(2.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "select() touched the live model"
    assert len(keys) == len(set(keys)) > 0
    pruner.remove(keys)

    assert surviving_channels(model) == surviving_channels(reference)
    ref_state = reference.state_dict()
    assert model.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    assert pruner.native_macs_params() == torch_pruning_macs_params(reference, x)
    assert speedup(pruner) == pytest.approx(current) and current >= 2.0


def test_select_first_step_takes_the_lowest_importance():
    model, x = model_and_input("resnet20")
    pruner = DepGraphPruner(model, x, num_classes=10, iterative_steps=400)
    keys = pruner.select(1.0001)  # one progressive step: ratio 1/400 of all channels
    scores = pruner.importance(list(pruner.targets()))
    lowest = sorted(scores, key=scores.__getitem__)[: len(keys)]
    assert set(keys) == set(lowest) and len(keys) >= 1


def test_excluded_keys_are_never_selected_and_keys_survive_removals():
    model, x = model_and_input("resnet20")
    pruner = DepGraphPruner(model, x, num_classes=10, iterative_steps=100)
    all_keys = set(pruner.targets())
    free = pruner.select(1.5)
    excluded = set(free[: len(free) // 2])
    keys = pruner.select(1.5, excluded=excluded)
    assert keys and not excluded & set(keys)

    # Per-channel BN values of every channel, by key, before the removal (conv rows lose the
    # input columns of removed channels, BN entries are the channel's own).
    def bn_values(targets):
        return {
            k: [s.param.detach()[list(s.indices)].clone() for s in t.producers if s.param.dim() == 1]
            for k, t in targets.items()
        }

    rows = bn_values(pruner.targets())
    pruner.remove(keys)
    assert speedup(pruner) >= 1.5
    now = pruner.targets()
    assert set(now) == all_keys - set(keys)
    for k, got in bn_values(now).items():  # a key still names the very same channel
        assert got and all(torch.equal(a, b) for a, b in zip(got, rows[k], strict=True)), k

    more = pruner.select(2.0, excluded=excluded)
    assert more and set(more) <= set(now) and not set(more) & (set(keys) | excluded)
    with pytest.raises(KeyError, match="not a channel of the current model"):
        pruner.remove([keys[0]])
    pruner.remove(more)
    assert speedup(pruner) >= 2.0


# ---------------------------------------------------------------------------- removal
@pytest.mark.parametrize("name", ["resnet56", "vgg16_bn", "vgg16", "mobilenet_v2"])
@pytest.mark.slow
def test_removing_zeroed_channels_keeps_the_function_and_meets_the_speedup(name):
    model, x = model_and_input(name)
    # Fewer, larger progressive steps than the recipe's 400: the same loop, a test-sized runtime.
    pruner = DepGraphPruner(model, x, num_classes=10, iterative_steps=40)
    keys = pruner.select(2.0)
    targets = pruner.targets(include_consumers=True)
    zero_producers(targets, keys)

    # What removal must do to each sliced parameter: drop exactly the indices of the removed keys.
    name_of = {id(p): n for n, p in model.named_parameters()}
    dropped: dict[str, dict[int, set[int]]] = {}
    for k in keys:
        for s in targets[k].slices:
            dropped.setdefault(name_of[id(s.param)], {}).setdefault(s.dim, set()).update(s.indices)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    zeroed = copy.deepcopy(model)

    model.eval()
    with torch.no_grad():
        y0 = model(x)
    pruner.remove(keys)
    with torch.no_grad():
        y1 = model(x)
    assert (y1 - y0).abs().max().item() <= 1e-5
    assert speedup(pruner) >= 2.0

    new = dict(model.named_parameters())
    for pname, cuts in dropped.items():  # a conv is cut along dim 0 by its group, dim 1 by the previous
        expected = old[pname]
        for dim, idx in cuts.items():
            expected = expected.index_select(dim, torch.tensor([i for i in range(expected.shape[dim]) if i not in idx]))
        assert torch.equal(new[pname], expected), pname
    changed = {n for n in old if new[n].shape != old[n].shape}
    assert changed == set(dropped), "a parameter was cut that no target slices (or vice versa)"

    # The check is sensitive: removing other channels (as many per group) changes the outputs.
    wrong = []
    for group in {k[0] for k in keys}:
        n = sum(k[0] == group for k in keys)
        wrong += [k for k in targets if k[0] == group and k not in set(keys)][:n]
    control = DepGraphPruner(zeroed, x, num_classes=10, iterative_steps=40)
    control.remove(wrong)
    zeroed.eval()
    with torch.no_grad():
        assert (zeroed(x) - y0).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
        lambda ps: torch.optim.Adam(ps, lr=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, amsgrad=True),
    ],
    ids=["sgd", "adam", "adamw_amsgrad"],
)
def test_optimizer_state_is_sliced_with_the_parameters(make):
    model, x = model_and_input("tiny_resnet")
    model.train()
    # Two parameter groups: the optimizer must follow parameters through both.
    bn = [p for n, p in model.named_parameters() if p.dim() == 1]
    rest = [p for n, p in model.named_parameters() if p.dim() > 1]
    opt = make([{"params": rest}, {"params": bn, "weight_decay": 0.0}])
    y = torch.randint(0, 10, (2,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # Make every parameter-shaped state a known function of its parameter: after slicing, the
    # state of every surviving element must still be that function of the surviving weights.
    fns = {
        "momentum_buffer": lambda p: 3 * p + 1,
        "exp_avg": lambda p: 2 * p - 1,
        "exp_avg_sq": lambda p: p * p + 1,
        "max_exp_avg_sq": lambda p: p * p + 2,
    }
    steps = {}
    with torch.no_grad():
        for p in model.parameters():
            for k, v in opt.state[p].items():
                if k in fns:
                    v.copy_(fns[k](p))
                else:
                    steps[k] = v.clone()
    opt_id = id(opt)
    shapes = {n: p.shape for n, p in model.named_parameters()}

    pruner = DepGraphPruner(model, x, num_classes=10, iterative_steps=20)
    keys = pruner.select(1.8)
    pruner.remove(keys, opt)

    assert id(opt) == opt_id
    params = list(model.parameters())
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len(params) and {id(p) for p in listed} == {id(p) for p in params}
    assert [p.dim() for p in opt.param_groups[1]["params"]] == [1] * len(bn)
    assert set(map(id, opt.state)) == {id(p) for p in params}
    assert any(p.shape != shapes[n] for n, p in model.named_parameters())
    for p in params:
        state = opt.state[p]
        for k, v in state.items():
            if k in fns:
                assert v.shape == p.shape and torch.equal(v, fns[k](p.detach())), k
            else:
                assert torch.equal(v, steps[k]), k  # scalar 'step' kept, not reset
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # still a consistent optimizer


# ---------------------------------------------------------------------------- targets
@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_producer_slices_zero_the_channel_output(name):
    model, x = model_and_input(name)
    pruner = DepGraphPruner(model, x, num_classes=10)
    targets = pruner.targets()
    families: dict = {}
    for k, t in targets.items():
        assert t.family == k[0] and t.key == k
        families.setdefault(t.family, []).append(t)
    # One channel per family, zeroed through its producer slices only.
    chosen = [ts[len(ts) // 2] for ts in families.values()]
    zero_producers(targets, [t.key for t in chosen])
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    watched: dict = {}
    for t in chosen:
        for s in t.producers:
            if s.param.dim() > 0 and s.dim == 0:
                watched.setdefault(owner[id(s.param)], set()).update(s.indices)
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o.detach())) for m in watched]
    for mode in (True, False):  # train-mode BN renormalises: zeroed weight AND bias still give 0
        model.train(mode)
        model(x)
        for m, idx in watched.items():
            out = outputs[m]
            assert out[:, sorted(idx)].abs().max().item() == 0.0, (type(m).__name__, mode)
            others = [i for i in range(out.shape[1]) if i not in idx]
            assert out[:, others].abs().max().item() > 0.0
    for h in hooks:
        h.remove()


def test_families_never_mix_groups_and_consumers_only_when_asked():
    model, x = model_and_input("mobilenet_v2")
    pruner = DepGraphPruner(model, x, num_classes=10)
    plain, full = pruner.targets(), pruner.targets(include_consumers=True)
    assert plain.keys() == full.keys()
    assert all(not t.consumers for t in plain.values())
    assert all(t.consumers for t in full.values())  # every channel feeds some following layer
    producers: dict = {}
    for t in full.values():
        ps = frozenset(id(s.param) for s in t.producers)
        assert producers.setdefault(t.family, ps) == ps  # one family = one set of producer tensors
    fams = list(producers.values())
    assert all(not (a & b) for i, a in enumerate(fams) for b in fams[i + 1 :])
    # A depthwise conv's channel is one of its rows, in the producer part.
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert dw and all(
        any(s.param is m.weight and not s.consumer and s.dim == 0 for t in full.values() for s in t.slices) for m in dw
    )
    DecayController(model, N=1).register(full.values())  # the controller accepts the families


# ---------------------------------------------------------------------------- state, modes, sparse learning
def test_state_dict_replay_rebuilds_the_pruned_architecture():
    model, x = model_and_input("resnet20")
    pruner = DepGraphPruner(model, x, num_classes=10, iterative_steps=50)
    pruner.remove(pruner.select(1.4))
    pruner.remove(pruner.select(1.8))
    buf = io.BytesIO()
    torch.save(pruner.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = build_model("resnet20", 10)
    replay = DepGraphPruner(fresh, x, num_classes=10, iterative_steps=50)
    replay.load_state_dict(state)
    fresh.load_state_dict(model.state_dict())  # strict: every shape matches
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert replay.targets().keys() == pruner.targets().keys()
    assert replay.native_macs_params() == pruner.native_macs_params()
    assert replay.state_dict()["removals"] == pruner.state_dict()["removals"]
    with pytest.raises(RuntimeError, match="unpruned model"):
        replay.load_state_dict(state)


@pytest.mark.parametrize("train", [True, False])
def test_model_mode_is_preserved(train):
    model, x = model_and_input("tiny_resnet")
    model.train(train)
    model.bn1.train(not train)  # a deliberately mixed model stays mixed
    modes = {n: m.training for n, m in model.named_modules()}
    pruner = DepGraphPruner(model, x, num_classes=10, sparse_learning=True)
    pruner.targets(include_consumers=True)
    keys = pruner.select(1.5)
    pruner.remove(keys, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    model(x).sum().backward()
    pruner.regularize(model)
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_regularize_changes_the_gradients():
    model, x = model_and_input("tiny_cnn")
    y = torch.randint(0, 10, (2,))

    def grads(reg: float | None) -> dict[str, torch.Tensor]:
        net = copy.deepcopy(model)
        pruner = DepGraphPruner(net, x, num_classes=10, sparse_learning=True, reg=reg or 0.0)
        nn.functional.cross_entropy(net(x), y).backward()
        if reg is not None:
            pruner.regularize(net)
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    plain, regularised = grads(None), grads(5e-4)
    conv = [n for n in plain if n.startswith("features") and n.endswith("weight") and plain[n].dim() == 4]
    assert conv and all(not torch.equal(plain[n], regularised[n]) for n in conv)
    assert all(torch.equal(plain[n], g) for n, g in grads(0.0).items())  # reg=0 adds nothing

    with pytest.raises(RuntimeError, match="sparse_learning=True"):
        DepGraphPruner(copy.deepcopy(model), x, num_classes=10).regularize(model)


def test_bad_input_gets_a_clear_error():
    model, x = model_and_input("tiny_cnn")
    with pytest.raises(ValueError, match="num_classes"):
        DepGraphPruner(model, x, num_classes=7)
    with pytest.raises(ValueError, match="iterative_steps"):
        DepGraphPruner(model, x, num_classes=10, iterative_steps=0)
    pruner = DepGraphPruner(model, x, num_classes=10)
    with pytest.raises(KeyError):
        pruner.importance([("no.such.layer", 0)])
    group = next(iter(pruner.targets()))[0]
    with pytest.raises(ValueError, match="empty"):
        pruner.remove([k for k in pruner.targets() if k[0] == group])


def test_removal_keeps_a_channels_last_model_channels_last():
    """The fast path trains channels_last; a removal mid-phase (DepGraph's rounds, OTOv2's zero groups,
    Gate Decorator's melt) must not drop the rest of the run back to NCHW, or a resumed run would
    start channels_last and differ from the uninterrupted one."""
    from dpm.models import is_channels_last
    from dpm.pruners.gate_decorator_units import channel_units, remove_channels

    model, x = model_and_input("resnet20")
    model = model.to(memory_format=torch.channels_last)
    pruner = DepGraphPruner(model, x, num_classes=10, iterative_steps=40)
    pruner.remove(pruner.select(1.3))
    assert is_channels_last(model)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)

    gd, _ = model_and_input("resnet20")
    gd = gd.to(memory_format=torch.channels_last)
    remove_channels(gd, [channel_units(gd, x, num_classes=10)[0].key], x)
    assert is_channels_last(gd)

    plain, _ = model_and_input("resnet20")  # an NCHW model stays NCHW
    nchw = DepGraphPruner(plain, x, num_classes=10, iterative_steps=40)
    nchw.remove(nchw.select(1.3))
    assert not is_channels_last(plain)
