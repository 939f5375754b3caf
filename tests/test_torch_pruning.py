"""dpm.torch_pruning.SmoothPruner: DPM around any Torch-Pruning pruner (MagnitudePruner L1/L2,
BNScalePruner, Taylor importance, GroupNormPruner; global and local; iterative steps)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torchvision.models import mobilenet_v2, resnet18

import dpm.torch_pruning
from dpm.core import RectifyConfig
from dpm.torch_pruning import SmoothPruner
from helpers import one_thread  # noqa: F401  (autouse fixture)

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))

IMPORTANCE = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "taylor": lambda: tp.importance.TaylorImportance(),
    "group_l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer="max"),
}
PRUNER = {
    "l1": "MagnitudePruner",
    "l2": "MagnitudePruner",
    "bn_scale": "BNScalePruner",
    "taylor": "MagnitudePruner",
    "group_l2": "GroupNormPruner",
}


class MLPBlock(nn.Module):
    """A transformer block's MLP on an embedding: LayerNorm, Linear up, GELU, Linear down, residual."""

    def __init__(self, d: int = 16, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 32 * 32, d)
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(1))
        return self.head(x + self.fc2(F.gelu(self.fc1(self.norm(x)))))


MODELS = {
    "resnet18": lambda: resnet18(num_classes=10),
    "mobilenet_v2": lambda: mobilenet_v2(num_classes=10),
    "mlp_block": MLPBlock,
}


def ignored(model: nn.Module) -> list[nn.Module]:
    """The classifier; in the MLP block also the embedding, which keeps the residual stream whole
    (LayerNorm's statistics over it make its removal not function-preserving): the MLP's hidden
    width is what a transformer prunes."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 10][-1]
    return [head] + ([model.embed] if isinstance(model, MLPBlock) else [])


def build(model: nn.Module, importance: str, global_pruning: bool, steps: int, ratio: float = 0.5):
    cls = getattr(tp.pruner, PRUNER[importance])
    return cls(
        model,
        X[:1],
        importance=IMPORTANCE[importance](),
        global_pruning=global_pruning,
        pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=ignored(model),
        # Fresh dicts: Torch-Pruning's defaults are shared mutable dicts that it writes to.
        in_channel_groups={},
        out_channel_groups={},
        num_heads={},
        channel_groups={},
    )


def backward(model: nn.Module) -> None:
    model.zero_grad()
    F.cross_entropy(model(X), Y).backward()


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


def pair(model_name: str, importance: str, global_pruning: bool, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    with torch.no_grad():  # trained-like norm scales (at init they are all 1: BN-scale ties)
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
    twin = copy.deepcopy(model)
    return (model, build(model, importance, global_pruning, steps)), (
        twin,
        build(twin, importance, global_pruning, steps),
    )


@pytest.mark.parametrize("global_pruning", [True, False], ids=["global", "local"])
@pytest.mark.parametrize("importance", list(IMPORTANCE))
def test_N1_is_the_wrapped_pruner_exactly(importance, global_pruning):
    """N = 1: each of 3 iterative steps leaves the structure and weights bit for bit those that
    pruner.step() leaves (resnet18, random init)."""
    (model, pruner), (twin, reference) = pair("resnet18", importance, global_pruning, steps=3)
    smooth = SmoothPruner(pruner, torch.optim.SGD(model.parameters(), lr=0.1), N=1)
    for _ in range(3):
        if importance == "taylor":
            backward(model)
            backward(twin)
        keys = smooth.step()
        reference.step()
        assert keys and smooth.done
        assert_same_model(model, twin)


@pytest.mark.parametrize("model_name", ["mobilenet_v2", "mlp_block"])
def test_N1_is_the_wrapped_pruner_exactly_on_other_models(model_name):
    (model, pruner), (twin, reference) = pair(model_name, "l2", True, steps=2)
    smooth = SmoothPruner(pruner, torch.optim.SGD(model.parameters(), lr=0.1), N=1)
    for _ in range(2):
        smooth.step()
        reference.step()
        assert_same_model(model, twin)


def train_steps(model: nn.Module, smooth: SmoothPruner, n: int) -> None:
    for _ in range(n):
        smooth.optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        smooth.optimizer_step()


@pytest.mark.parametrize("model_name", list(MODELS))
def test_a_decay_of_N_steps_removes_the_pruners_own_selection(model_name, monkeypatch):
    """N = 4 while training: the removed channels are the pruner's one-shot selection at step()
    (the same structure as pruner.step() there), removal leaves eval outputs unchanged, the
    optimizer keeps training the pruned model with its momentum sliced."""
    (model, pruner), (twin, reference) = pair(model_name, "l2", True, steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    smooth = SmoothPruner(pruner, optimizer, N=4)
    outputs = []
    real = dpm.torch_pruning.prune_groups

    def watched(m, groups, opt=None):
        model.eval()
        with torch.no_grad():
            before = model(X)
            real(m, groups, opt)
            outputs.append((before, model(X)))
        model.train()

    monkeypatch.setattr(dpm.torch_pruning, "prune_groups", watched)
    for i in range(2):
        reference.step()  # the one-shot selection at the same point (no training before it)
        shapes = {k: v.shape for k, v in twin.state_dict().items()}
        keys = smooth.step()  # decay step 1 of 4 at once, steps 2-4 at the next 3 optimizer steps
        assert keys and not smooth.done
        train_steps(model, smooth, 2)
        assert not smooth.done and len(outputs) == i
        train_steps(model, smooth, 1)
        assert smooth.done and len(outputs) == i + 1
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        twin.load_state_dict(model.state_dict())  # the next selection from the same weights
    assert len(outputs) == 2
    for before, after in outputs:
        assert torch.allclose(before, after, atol=1e-5, rtol=0)
    momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(m.shape == p.shape for m, p in zip(momentum, model.parameters()))
    train_steps(model, smooth, 1)


@pytest.mark.slow
def test_self_rectifying_runs_to_the_end_and_checkpoints(tmp_path):
    """+SR with budget=strict: a checkpoint taken mid-decay restores into a fresh copy and the
    two continue identically."""
    (model, pruner), (twin, twin_pruner) = pair("resnet18", "l2", True, steps=1)
    cfg = RectifyConfig(budget="strict")
    smooth = SmoothPruner(pruner, torch.optim.SGD(model.parameters(), lr=0.01), N=4, rectify=cfg)
    smooth.step()
    train_steps(model, smooth, 2)
    torch.save({"model": model.state_dict(), "smooth": smooth.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    twin.load_state_dict(ckpt["model"])
    resumed = SmoothPruner(twin_pruner, torch.optim.SGD(twin.parameters(), lr=0.01), N=4, rectify=cfg)
    resumed.load_state_dict(ckpt["smooth"])
    for _ in range(40):  # releases bring substitutes whose own decay runs N more steps
        if smooth.done:
            break
        train_steps(model, smooth, 1)
        train_steps(twin, resumed, 1)
    assert smooth.done and resumed.done
    assert smooth.controller.log.state_dict() == resumed.controller.log.state_dict()
    assert_same_model(model, twin)


def test_bad_input_is_one_clear_line():
    model = MLPBlock()
    pruner = build(model, "l2", True, steps=1)
    with pytest.raises(TypeError, match="SmoothPruner wraps a Torch-Pruning pruner .* got dict"):
        SmoothPruner({}, torch.optim.SGD(model.parameters(), lr=0.1), N=2)
    with pytest.raises(ValueError, match="N must be an integer >= 1, got 0"):
        SmoothPruner(pruner, torch.optim.SGD(model.parameters(), lr=0.1), N=0)
    other = torch.optim.SGD(MLPBlock().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the optimizer does not hold .* give SmoothPruner the optimizer"):
        SmoothPruner(pruner, other, N=2)
    smooth = SmoothPruner(pruner, torch.optim.SGD(model.parameters(), lr=0.1), N=2)
    smooth.optimizer = other
    with pytest.raises(ValueError, match="the optimizer does not hold"):
        smooth.optimizer_step()
    smooth.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    smooth.step()
    with pytest.raises(RuntimeError, match="still decaying: call step\\(\\) once smooth.done"):
        smooth.step()


# ------------------------------------------------------------------------------------ a small ViT
class Attention(nn.Module):
    """timm's attention: one qkv Linear, heads split by reshape (Torch-Pruning prunes heads through num_heads)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1))


class ViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1, b.attn, b.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
            b.fc1, b.fc2 = nn.Linear(dim, dim * 2), nn.Linear(dim * 2, dim)
            self.blocks.append(b)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for b in self.blocks:
            x = x + b.attn(b.norm1(x))
            x = x + b.fc2(F.gelu(b.fc1(b.norm2(x))))
        return self.head(self.norm(x).mean(1))


def vit_pruner(model: ViT):
    """Torch-Pruning's ViT recipe: half the heads and half the MLP width, the embedding kept."""
    return tp.pruner.MagnitudePruner(
        model,
        X[:1],
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[model.head, model.patch],
        num_heads={b.attn.qkv: b.attn.num_heads for b in model.blocks},
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=0.5,
        unwrapped_parameters=[(model.pos, 2)],
        in_channel_groups={},
        out_channel_groups={},
        channel_groups={},
    )


def update_heads(model: ViT, pruner) -> None:
    for b in model.blocks:  # what Torch-Pruning's ViT example does after pruner.step()
        b.attn.num_heads = pruner.num_heads[b.attn.qkv]


@pytest.mark.parametrize("N", [1, 3])
def test_vit_attention_heads_decay_and_go_as_the_pruner_removes_them(N, monkeypatch):
    torch.manual_seed(0)
    model = ViT()
    twin = copy.deepcopy(model)
    pruner, reference = vit_pruner(model), vit_pruner(twin)
    outputs = []
    smooth = SmoothPruner(
        pruner,
        torch.optim.SGD(model.parameters(), lr=0.01),
        N=N,
        on_remove=lambda: (update_heads(model, pruner), outputs.append(model.eval()(X)), model.train()),
    )
    real = dpm.torch_pruning.prune_groups

    def watched(m, groups, opt=None):
        outputs.append(model.eval()(X))
        model.train()
        real(m, groups, opt)

    monkeypatch.setattr(dpm.torch_pruning, "prune_groups", watched)
    reference.step()
    update_heads(twin, reference)
    smooth.step()
    train_steps(model, smooth, N - 1)
    assert smooth.done and [b.attn.num_heads for b in model.blocks] == [2, 2]
    if N == 1:
        assert_same_model(model, twin)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    before, after = outputs
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    train_steps(model, smooth, 1)


@pytest.mark.slow
def test_released_channels_stay_out_of_the_next_selection_for_the_cooldown():
    """+SR (budget=base, cooldown 2 selections): the channels the gradient defended are not what the
    pruner's next step selects, though their half-decayed weights rank them low."""
    (model, pruner), _ = pair("resnet18", "l2", True, steps=2)
    cfg = RectifyConfig(release_cooldown=2)
    smooth = SmoothPruner(pruner, torch.optim.SGD(model.parameters(), lr=0.01), N=4, rectify=cfg)
    smooth.step()
    train_steps(model, smooth, 3)
    released = smooth.controller.released
    assert smooth.done and released
    second = smooth.step()
    assert second and not released & set(second) and not smooth.controller.log.readmissions
