"""The README's Torch-Pruning example is real code: extract it and run it."""

import pytest
import torch
import torch_pruning as tp
from torchvision.models import resnet18

from helpers import run_readme_example


@pytest.mark.slow
def test_readme_torch_pruning_example_runs_and_prunes_to_the_ratio():
    ns, printed = run_readme_example("tp-example")
    smooth, model, removed = ns["smooth"], ns["model"], ns["removed"]
    assert smooth.done and f"{len(removed)} channels removed" in printed
    # Global ranking with pruning_ratio 0.5 over 2 steps: half of the ranked channels are gone.
    torch.manual_seed(0)
    fresh = resnet18(num_classes=10)
    DG = tp.DependencyGraph().build_dependency(fresh, example_inputs=ns["example"])
    groups = DG.get_all_groups(ignored_layers=[fresh.fc], root_module_types=[torch.nn.Conv2d, torch.nn.Linear])
    ranked = sum(len(g[0].idxs) for g in groups)
    assert len(set(removed)) == len(removed) == ranked - int(ranked * 0.5)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in fresh.parameters()) / 2
    # The optimizer trains the pruned parameters, its momentum sliced alike.
    opt = ns["opt"]
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in model.parameters())
