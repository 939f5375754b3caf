"""What several test files share: a one-thread fixture for tiny tensors, the optimizers every DPM
invariant is checked under, a tiny conv/BN net, bit-for-bit equality of float32 tensors, and the
README's examples run as code."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest
import torch
from torch import nn

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention (and seconds) on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal in every bit (float32): +0.0 differs from -0.0, a NaN equals the same NaN."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def run_readme_example(name: str) -> tuple[dict, str]:
    """Run the one python block between README's ``<!-- {name}:start -->`` and ``:end`` markers;
    returns its namespace and what it printed."""
    text = README.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert start in text and end in text, f"README.md lost its {name} markers"
    section = text[text.index(start) + len(start) : text.index(end)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one python block between the {name} markers, found {len(blocks)}"
    ns: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], f"README.md:{name}", "exec"), ns)
    return ns, out.getvalue()
