"""dpm.core imports only torch and the standard library (it is what practitioners vendor)."""

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("hydra", "omegaconf", "torch_pruning", "torchvision", "thop", "wandb", "pandas", "sklearn", "tqdm")


def loaded_modules(stmt: str) -> set[str]:
    code = f"import sys, json\n{stmt}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_dpm_core_imports_only_torch():
    # Compare with torch alone: torch itself may load helpers (e.g. tqdm) that are not ours.
    torch_only = loaded_modules("import torch")
    modules = loaded_modules("import dpm.core")
    added = modules - torch_only
    bad = sorted(m for m in added if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"dpm.core pulled in {bad}"
    outside = sorted(m for m in added if m.startswith("dpm.") and not m.startswith("dpm.core"))
    assert not outside, f"dpm.core imports other dpm modules: {outside}"
    assert "torch" in modules and "dpm.core.controller" in modules


# The static check of every import statement in dpm/core (function bodies included) is
# tests/test_architecture.py::test_core_imports_only_torch_and_itself.
