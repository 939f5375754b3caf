"""The README's Torch-Pruning example is real code: extract it and run it."""

import contextlib
import io
import pathlib
import re

import pytest
import torch
import torch_pruning as tp
from torchvision.models import resnet18

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- tp-example:start -->", "<!-- tp-example:end -->"


def tp_example() -> str:
    text = README.read_text()
    assert START in text and END in text, "README.md lost its tp-example markers"
    section = text[text.index(START) + len(START) : text.index(END)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one python block between the markers, found {len(blocks)}"
    return blocks[0]


@pytest.mark.slow
def test_readme_torch_pruning_example_runs_and_prunes_to_the_ratio():
    ns: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(tp_example(), "README.md:tp-example", "exec"), ns)
    smooth, model, removed = ns["smooth"], ns["model"], ns["removed"]
    assert smooth.done and f"{len(removed)} channels removed" in out.getvalue()
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
